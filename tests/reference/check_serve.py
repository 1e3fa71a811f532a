"""Checks a running `align serve` with the official `openai` client against transformers (and
PEFT for a served adapter): greedy chat completions equal transformers' greedy generations,
streaming chunks concatenate to the same text, completions with echo + logprobs equal
transformers' log-softmax of the prompt, seeded sampling repeats, bad requests get 4xx with an
OpenAI error object and the server stays up, N concurrent clients are all answered with the
texts they get one by one.

  python check_serve.py --base-url http://127.0.0.1:PORT/v1 --model-dir DIR --model-id ID \
      [--adapter NAME=DIR] [--concurrency 64]

Greedy texts are compared only for prompts whose greedy steps never nearly tie under
transformers (top-1 minus top-2 logit > 1e-3 at every step; f32 rounding moves logits by ~1e-6):
the script says how many it compared and fails when fewer than 3 qualify.
"""
import argparse
import concurrent.futures
import json
import sys

import urllib.error
import urllib.request
import openai
import torch
import transformers

PROMPTS = [
    "What is the capital of France?",
    "Name three symptoms of influenza.",
    "hello",
    "Explain what a reward model is.",
    "1 2 3 4",
    "Write one sentence about the sea.",
    "How are you today?",
    "Translate 'good morning' to German.",
    "Why is the sky blue?",
    "List two prime numbers.",
    "What does DPO stand for?",
    "Tell me a fact about cats.",
]
MAX_TOKENS = 12
GAP = 1e-3


def fail(msg):
    print("FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def greedy_reference(model, tok, prompt):
    """(text, min top-1/top-2 gap) of transformers' greedy generation for one user message."""
    ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt")
    if not torch.is_tensor(ids):
        ids = ids["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=MAX_TOKENS, output_scores=True,
                             return_dict_in_generate=True, pad_token_id=tok.pad_token_id)
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    new = out.sequences[0, ids.shape[1]:]
    return tok.decode(new, skip_special_tokens=True), min(gaps)


def http(method, url, body=None, headers=None):
    """(status, text) of a plain HTTP request (the standard library: no client's own checks)."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def chat(client, model, prompt, **kw):
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=MAX_TOKENS, **kw)
    return r


def stream_text(client, model, prompt):
    parts, finish, usage = [], None, None
    with client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}], temperature=0,
                                        max_tokens=MAX_TOKENS, stream=True,
                                        stream_options={"include_usage": True}) as s:
        for chunk in s:
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                if c.delta.content:
                    parts.append(c.delta.content)
                if c.finish_reason:
                    finish = c.finish_reason
    return "".join(parts), finish, usage


def expect_error(what, status, fn):
    try:
        fn()
    except openai.APIStatusError as e:
        if e.status_code != status:
            fail(f"{what}: expected HTTP {status}, got {e.status_code}: {e}")
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        if not isinstance(err, dict) or not err.get("message"):
            fail(f"{what}: no OpenAI error object in {e.body!r}")
        return err
    fail(f"{what}: expected HTTP {status}, the request succeeded")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--model-dir", required=True)
    ap.add_argument("--model-id", required=True)
    ap.add_argument("--adapter", action="append", default=[])
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--api-key", default="none")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=args.base_url, api_key=args.api_key, max_retries=0, timeout=120)

    tok = transformers.AutoTokenizer.from_pretrained(args.model_dir)
    base = transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32).eval()

    # the served models
    ids = [m.id for m in client.models.list().data]
    want_ids = [args.model_id] + [a.split("=", 1)[0] for a in args.adapter]
    if ids != want_ids:
        fail(f"/v1/models lists {ids}, expected {want_ids}")

    # greedy chat equals transformers; streaming equals non-streaming
    refs = {}
    for p in PROMPTS:
        text, gap = greedy_reference(base, tok, p)
        if gap > GAP:
            refs[p] = text
    if len(refs) < 3:
        fail(f"only {len(refs)} prompts have greedy steps that never nearly tie")
    for p, want in refs.items():
        r = chat(client, args.model_id, p)
        got = r.choices[0].message.content
        if got != want:
            fail(f"greedy chat for {p!r}: server {got!r}, transformers {want!r}")
        if r.usage.completion_tokens < 1 or r.usage.prompt_tokens < 1:
            fail(f"usage {r.usage}")
        streamed, finish, usage = stream_text(client, args.model_id, p)
        if streamed != got:
            fail(f"streamed chunks of {p!r} give {streamed!r}, the response {got!r}")
        if finish != r.choices[0].finish_reason or usage is None or usage.completion_tokens != r.usage.completion_tokens:
            fail(f"stream of {p!r}: finish {finish}, usage {usage} vs {r.choices[0].finish_reason}, {r.usage}")
    print(f"greedy chat: {len(refs)} of {len(PROMPTS)} prompts compared (the others nearly tie), equal to transformers; streaming equal")

    # chat logprobs: the chosen token is the most likely one under greedy decoding
    p0 = next(iter(refs))
    r = chat(client, args.model_id, p0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    if not content or any(len(c.top_logprobs) != 3 or c.top_logprobs[0].logprob != c.logprob for c in content):
        fail(f"chat logprobs: {content}")
    if "".join(c.token for c in content) != r.choices[0].message.content:
        fail("chat logprobs: the tokens do not spell the answer")

    # completions: echo + logprobs equal transformers' log-softmax; prompt as text and as ids
    text = "The patient reported a mild fever and"
    enc = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(base(enc).logits[0].float(), -1)
    want = [float(logp[i, enc[0, i + 1]]) for i in range(enc.shape[1] - 1)]
    for prompt in (text, enc[0].tolist()):
        c = client.completions.create(model=args.model_id, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
        lp = c.choices[0].logprobs
        if lp.token_logprobs[0] is not None or len(lp.token_logprobs) != enc.shape[1] + 1:
            fail(f"echo logprobs have {len(lp.token_logprobs)} entries for {enc.shape[1]} prompt tokens + 1")
        got = lp.token_logprobs[1:enc.shape[1]]
        worst = max(abs(a - b) for a, b in zip(got, want))
        if worst > 1e-4:
            fail(f"echo logprobs differ from transformers by {worst}")
        if not c.choices[0].text.startswith(text if isinstance(prompt, str) else tok.decode(enc[0])):
            fail(f"echo text {c.choices[0].text!r}")
    # max_tokens 0 scores the prompt only (how harnesses compute log-likelihoods)
    c = client.completions.create(model=args.model_id, prompt=text, max_tokens=0, echo=True, logprobs=2, temperature=0)
    if len(c.choices[0].logprobs.token_logprobs) != enc.shape[1] or c.choices[0].text != text:
        fail(f"max_tokens 0 + echo: {c.choices[0]}")
    print(f"completions echo + logprobs: within {worst:.1e} of transformers")

    # seeded sampling repeats; n choices
    kw = dict(model=args.model_id, messages=[{"role": "user", "content": "hello"}], temperature=1.0, max_tokens=10, n=3, seed=123)
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    if [c.message.content for c in a.choices] != [c.message.content for c in b.choices] or len(a.choices) != 3:
        fail("the same seed gave different samples")
    if len({c.message.content for c in a.choices}) < 2:
        fail("three sampled choices are all equal")

    # stop strings cut the text before them
    full = chat(client, args.model_id, p0).choices[0].message.content
    cut = next((i for i in range(2, len(full)) if full[i] != " "), None)
    if cut is not None:
        stop = full[cut:cut + 2]
        r = chat(client, args.model_id, p0, stop=[stop])
        if r.choices[0].message.content != full[:full.find(stop)] or r.choices[0].finish_reason != "stop":
            fail(f"stop {stop!r}: {r.choices[0].message.content!r} from {full!r}")

    # bad requests: 4xx with an error object naming the field; the server stays up
    err = expect_error("empty messages", 400, lambda: client.chat.completions.create(model=args.model_id, messages=[]))
    if err.get("param") != "messages":
        fail(f"empty messages: param {err.get('param')}")
    err = expect_error("wrong type", 400, lambda: client.chat.completions.create(
        model=args.model_id, messages=[{"role": "user", "content": "x"}], extra_body={"temperature": "hot"}))
    if err.get("param") != "temperature":
        fail(f"wrong type: param {err.get('param')}")
    expect_error("unknown model", 404, lambda: chat(client, "no-such-model", "x"))
    expect_error("too many tokens", 400, lambda: client.chat.completions.create(
        model=args.model_id, messages=[{"role": "user", "content": "x"}], max_tokens=10**6))
    context = json.loads(http("GET", args.base_url + "/models", None, {"Authorization": f"Bearer {args.api_key}"})[1])["data"][0]["max_model_len"]
    expect_error("long prompt", 400, lambda: client.completions.create(model=args.model_id, prompt="word " * (context + 8), max_tokens=1))
    expect_error("tools", 400, lambda: client.chat.completions.create(
        model=args.model_id, messages=[{"role": "user", "content": "x"}],
        tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]))
    expect_error("unknown role", 400, lambda: client.chat.completions.create(model=args.model_id, messages=[{"role": "wizard", "content": "x"}]))
    root = args.base_url.rsplit("/v1", 1)[0]
    headers = {"Authorization": f"Bearer {args.api_key}", "Content-Type": "application/json"}
    for body in (b"{not json", b"\xff\xfe{}", b"[1, 2]"):
        status, text = http("POST", args.base_url + "/chat/completions", body, headers)
        if status != 400 or "error" not in json.loads(text):
            fail(f"body {body!r}: {status} {text}")
    if json.loads(http("GET", root + "/health")[1]).get("status") != "ok":
        fail("the server is not healthy after the bad requests")
    print("bad requests: 4xx with OpenAI error objects; the server stays up")

    # served adapters: equal to transformers + PEFT, and not the base
    for a in args.adapter:
        import peft
        name, path = a.split("=", 1)
        adapted = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32), path).eval()
        compared = differs = 0
        for p in PROMPTS:
            want, gap = greedy_reference(adapted, tok, p)
            if gap <= GAP:
                continue
            got = chat(client, name, p).choices[0].message.content
            if got != want:
                fail(f"adapter {name}, {p!r}: server {got!r}, PEFT {want!r}")
            compared += 1
            differs += p in refs and refs[p] != got
        if compared < 3 or differs < 1:
            fail(f"adapter {name}: {compared} prompts compared, {differs} differ from the base")
        print(f"adapter {name}: {compared} prompts equal to PEFT, {differs} differ from the base")

    # N concurrent clients (mixed models, streaming and not): all answered, as one by one
    models = [args.model_id] + [a.split("=", 1)[0] for a in args.adapter]
    alone = {}
    for m in models:
        for p in refs:
            alone[(m, p)] = chat(client, m, p).choices[0].message.content
    jobs = [(models[i % len(models)], list(refs)[i % len(refs)], i % 2 == 0) for i in range(args.concurrency)]

    def one(job):
        m, p, streamed = job
        return stream_text(client, m, p)[0] if streamed else chat(client, m, p).choices[0].message.content

    with concurrent.futures.ThreadPoolExecutor(max_workers=args.concurrency) as pool:
        results = list(pool.map(one, jobs))
    for (m, p, s), got in zip(jobs, results):
        if got != alone[(m, p)]:
            fail(f"concurrent {m} {p!r} (stream {s}): {got!r} vs one by one {alone[(m, p)]!r}")
    metrics = http("GET", root + "/metrics")[1]
    if "align_time_to_first_token_seconds_count" not in metrics or "align_requests_total" not in metrics:
        fail("metrics lack the request counters or time to first token")
    print(f"{args.concurrency} concurrent clients: all answered, equal to one by one")
    print("OK")


if __name__ == "__main__":
    main()
