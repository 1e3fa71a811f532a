"""N concurrent streaming chat clients against an OpenAI-compatible server: requests/s, median
time to first token, and generated tokens/s (completions re-tokenised with the model's own
tokenizer, so both servers are counted alike).

  python serve_load.py --base-url URL/v1 --model ID --tokenizer DIR --concurrency N --requests R [--max-tokens 32]
Prints one JSON line.
"""
import argparse
import concurrent.futures
import json
import statistics
import time

import openai
import transformers

PROMPTS = [
    "What are the common symptoms of type 2 diabetes?",
    "How should a mild fever be treated at home?",
    "Explain what blood pressure numbers mean.",
    "Give three tips for better sleep.",
    "What is the difference between a virus and a bacterium?",
    "Why is hand washing important?",
    "What does a normal resting heart rate look like?",
    "How much water should an adult drink per day?",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--concurrency", type=int, required=True)
    ap.add_argument("--requests", type=int, required=True)
    ap.add_argument("--max-tokens", type=int, default=32)
    args = ap.parse_args()
    tok = transformers.AutoTokenizer.from_pretrained(args.tokenizer)
    client = openai.OpenAI(base_url=args.base_url, api_key="none", max_retries=0, timeout=600)

    def one(i):
        started = time.perf_counter()
        first = None
        parts = []
        stream = client.chat.completions.create(
            model=args.model, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            temperature=0, max_tokens=args.max_tokens, stream=True)
        for chunk in stream:
            for c in chunk.choices:
                if c.delta.content:
                    if first is None:
                        first = time.perf_counter() - started
                    parts.append(c.delta.content)
        return first, len(tok("".join(parts), add_special_tokens=False).input_ids)

    one(0)  # warm-up
    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - started
    ttfts = [r[0] for r in results if r[0] is not None]
    tokens = sum(r[1] for r in results)
    print(json.dumps({"concurrency": args.concurrency, "requests": args.requests, "seconds": wall,
                      "requests_per_second": args.requests / wall, "tokens_per_second": tokens / wall,
                      "ttft_median": statistics.median(ttfts) if ttfts else None, "tokens": tokens}))


if __name__ == "__main__":
    main()
