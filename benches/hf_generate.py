#!/usr/bin/env python3
"""Hugging Face transformers side of the generation benchmark.

    .venv/bin/python benches/hf_generate.py --model DIR \
        [--batch-sizes 1,16] [--prompt-len 64] [--new-tokens 64] [--seed 0] \
        [--dtype f32|bf16|f16] [--device cpu|cuda] [--repeats 3] [--threads N]

Prompts are synthetic token ids, identical to the ones the Rust benchmark
builds: for batch row b and position j (both 0-based)

    id = 3 + ((b * 7919 + j * 104729 + seed * 31) % (vocab_size - 3))

with vocab_size from DIR/config.json.  The model is loaded with
AutoModelForCausalLM.from_pretrained(DIR, dtype=..., attn_implementation="sdpa")
and run in eval mode under torch.inference_mode().

For every batch size B: one warm-up (prefill + generate), then `repeats` runs of
  (a) prefill: one forward `model(input_ids, use_cache=True)` of the [B, L] batch;
  (b) generate: `model.generate(input_ids, attention_mask=ones, do_sample=False,
      max_new_tokens=N, min_new_tokens=N, use_cache=True)`.  min_new_tokens=N
      masks EOS until N tokens exist and max_new_tokens=N stops there, so every
      row always gets exactly N new tokens (checked).
Per run: prefill tok/s = B*L / prefill_s, decode tok/s = B*N / (generate_s - prefill_s).
Each reported number is the median over the runs of that per-run value
(prefill_seconds/generate_seconds/decode_seconds are medians too).
CUDA is synchronised around every timed region.

stdout: exactly one JSON object
  {"engine": "transformers", "version": str, "torch": str, "device": "cpu"|"cuda",
   "device_name": str, "dtype": "f32"|"bf16"|"f16", "threads": int, "model": str,
   "attn_implementation": "sdpa", "prompt_len": L, "new_tokens": N, "seed": int,
   "repeats": int, "vocab_size": int,
   "results": [{"batch": B, "prefill_tokens_per_second": float,
                "decode_tokens_per_second": float, "generate_seconds": float,
                "prefill_seconds": float, "decode_seconds": float}]}
Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def synthetic_prompt(batch: int, length: int, seed: int, vocab_size: int):
    import torch

    rows = [
        [3 + ((b * 7919 + j * 104729 + seed * 31) % (vocab_size - 3)) for j in range(length)]
        for b in range(batch)
    ]
    return torch.tensor(rows, dtype=torch.int64)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--batch-sizes", default="1,16")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) (default: torch's choice)")
    args = ap.parse_args()

    batch_sizes = [int(x) for x in args.batch_sizes.split(",") if x.strip()]
    if not batch_sizes or min(batch_sizes) < 1:
        ap.error("--batch-sizes must be a comma-separated list of positive integers")
    if args.prompt_len < 1 or args.new_tokens < 1 or args.repeats < 1:
        ap.error("--prompt-len, --new-tokens and --repeats must be >= 1")

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    import transformers
    from transformers import AutoModelForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()

    if args.device == "cuda" and not torch.cuda.is_available():
        log("error: --device cuda but torch.cuda.is_available() is False")
        return 2
    device = torch.device(args.device)
    dtype = getattr(torch, DTYPES[args.dtype])

    with open(os.path.join(args.model, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    vocab_size = int(config["vocab_size"])

    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="sdpa")
    model.to(device)
    model.eval()
    gc = model.generation_config
    pad_id = gc.pad_token_id
    if pad_id is None:
        pad_id = model.config.pad_token_id
    if pad_id is None:
        eos = gc.eos_token_id
        pad_id = (eos[0] if isinstance(eos, list) else eos) if eos is not None else 0
    device_name = torch.cuda.get_device_name(device) if args.device == "cuda" else "cpu"
    log(f"model {type(model).__name__} from {args.model}: dtype {args.dtype}, device {device_name}, "
        f"threads {torch.get_num_threads()}, vocab {vocab_size}")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    L, N = args.prompt_len, args.new_tokens

    def prefill(ids) -> float:
        sync()
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        _ = out.logits
        sync()
        return time.perf_counter() - t0

    def generate(ids, mask) -> float:
        sync()
        t0 = time.perf_counter()
        out = model.generate(
            ids,
            attention_mask=mask,
            do_sample=False,
            temperature=None,
            top_p=None,
            top_k=None,
            max_new_tokens=N,
            min_new_tokens=N,
            pad_token_id=pad_id,
            use_cache=True,
        )
        sync()
        dt = time.perf_counter() - t0
        if tuple(out.shape) != (ids.shape[0], L + N):
            raise SystemExit(f"generate returned shape {tuple(out.shape)}, expected {(ids.shape[0], L + N)}")
        return dt

    results = []
    with torch.inference_mode():
        for B in batch_sizes:
            ids = synthetic_prompt(B, L, args.seed, vocab_size).to(device)
            mask = torch.ones_like(ids)
            log(f"batch {B}: warm-up")
            prefill(ids)
            generate(ids, mask)
            runs = []
            for r in range(args.repeats):
                p = prefill(ids)
                g = generate(ids, mask)
                d = g - p
                runs.append({"prefill": p, "generate": g, "decode": d,
                             "prefill_tps": B * L / p, "decode_tps": B * N / d if d > 0 else float("inf")})
                log(f"batch {B} run {r + 1}/{args.repeats}: prefill {p * 1e3:.1f} ms "
                    f"({B * L / p:.1f} tok/s), generate {g:.3f} s, decode {runs[-1]['decode_tps']:.1f} tok/s")

            def med(key: str) -> float:
                return float(statistics.median(x[key] for x in runs))

            results.append({
                "batch": B,
                "prefill_tokens_per_second": med("prefill_tps"),
                "decode_tokens_per_second": med("decode_tps"),
                "generate_seconds": med("generate"),
                "prefill_seconds": med("prefill"),
                "decode_seconds": med("decode"),
            })

    print(json.dumps({
        "engine": "transformers",
        "version": transformers.__version__,
        "torch": torch.__version__,
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "model": args.model,
        "attn_implementation": "sdpa",
        "prompt_len": L,
        "new_tokens": N,
        "seed": args.seed,
        "repeats": args.repeats,
        "vocab_size": vocab_size,
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
