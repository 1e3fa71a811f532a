#!/usr/bin/env python3
"""Reference values from Hugging Face transformers for integration tests that
run against a real model folder (e.g. SmolLM2-135M-Instruct built by
/work/shared/tools/make-smollm2.sh).

    hf_reference.py logits     --model DIR --text "..." [--text "..."] --out FILE.safetensors
    hf_reference.py chat       --model DIR --messages-file CONVS.json --max-new-tokens N --out FILE.json
    hf_reference.py perplexity --model DIR --data FILE(.txt|.jsonl) [--max-length 1024] [--adapter PEFT_DIR] --out FILE.json

Common options (every subcommand): --dtype f32|bf16|f16 (compute dtype, default
f32), --attn eager|sdpa (default eager), --threads N (default 1).

logits
    For each text i: ids = tokenizer(text)["input_ids"] (default special
    tokens, no truncation); logits = model(ids).logits in float32.
    Writes safetensors with `input_ids_{i}` (int64 [1, T]) and `logits_{i}`
    (float32 [1, T, V]); metadata: "texts" (JSON list), "count", "model",
    "dtype", "attn_implementation", "transformers", "torch".

chat
    CONVS.json is a list of conversations, each a list of {"role", "content"}.
    For each: rendered = apply_chat_template(conv, tokenize=False,
    add_generation_prompt=True); input_ids = tokenizer(rendered,
    add_special_tokens=False)["input_ids"]; greedy generate(do_sample=False,
    max_new_tokens=N, temperature/top_p/top_k=None) with the model's
    generation_config EOS ids (transformers' default: stop after an EOS).
    new_ids are the generated ids up to and including the first EOS (so pads,
    which may equal EOS, never appear); text = decode(new_ids,
    skip_special_tokens=True).  Writes a JSON list, one object per conversation:
      {"messages": [...], "rendered": str, "input_ids": [int], "new_ids": [int],
       "text": str, "stopped_on_eos": bool, "eos_token_ids": [int],
       "top2_gaps": [float], "min_top2_gap": float}
    top2_gaps[k] is the top1 - top2 raw-logit gap at generation step k (small
    gaps mean a different implementation may legitimately pick another token).

perplexity
    Records: .txt = every line whose strip() is non-empty (the line itself,
    without its newline, is scored); .jsonl = the "text" field of every
    non-blank line.  Each record alone: ids = tokenizer(text, truncation=True,
    max_length=L)["input_ids"] (default special tokens); scored with
    labels=input_ids (token t+1 predicted from position t); NLL from a float32
    log-softmax, summed in float64.  Writes
      {"perplexity": exp(nll / tokens), "nll": total summed NLL,
       "tokens": total predicted tokens (sum of len-1), "records": record count,
       "max_length": L, "add_special_tokens": true, "model": DIR, "data": FILE,
       "per_record": [{"index", "num_tokens", "predicted_tokens", "nll"}]}
    Records with fewer than 2 tokens add 0 tokens and 0 NLL.

Progress and a short summary go to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

DTYPES = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}


def log(*a) -> None:
    print(*a, file=sys.stderr, flush=True)


def load(args):
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=getattr(torch, DTYPES[args.dtype]), attn_implementation=args.attn
    )
    if getattr(args, "adapter", None):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(args.adapter))
    model.eval()
    return tok, model


def meta(args) -> dict:
    import torch
    import transformers

    return {
        "model": str(args.model),
        "dtype": args.dtype,
        "attn_implementation": args.attn,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }


# ---------------------------------------------------------------------------


def cmd_logits(args) -> int:
    import torch
    from safetensors.torch import save_file

    if not args.text:
        raise SystemExit("logits: give at least one --text")
    tok, model = load(args)
    tensors = {}
    with torch.inference_mode():
        for i, text in enumerate(args.text):
            ids = tok(text)["input_ids"]
            if not ids:
                raise SystemExit(f"logits: text {i} tokenises to nothing: {text!r}")
            x = torch.tensor([ids], dtype=torch.int64)
            logits = model(input_ids=x).logits.float()
            tensors[f"input_ids_{i}"] = x.contiguous()
            tensors[f"logits_{i}"] = logits.contiguous()
            log(f"text {i}: {len(ids)} ids {ids[:12]}{'...' if len(ids) > 12 else ''}, logits {tuple(logits.shape)}")
    md = {k: str(v) for k, v in meta(args).items()}
    md["texts"] = json.dumps(args.text, ensure_ascii=False)
    md["count"] = str(len(args.text))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, args.out, metadata=md)
    log(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------


def eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    if eos is None:
        return []
    return list(eos) if isinstance(eos, (list, tuple)) else [int(eos)]


def cmd_chat(args) -> int:
    import torch

    convs = json.loads(Path(args.messages_file).read_text(encoding="utf-8"))
    if not isinstance(convs, list) or not all(isinstance(c, list) for c in convs):
        raise SystemExit("chat: --messages-file must hold a JSON list of conversations (lists of {role, content})")
    tok, model = load(args)
    eos = eos_ids(model)
    gc = model.generation_config
    pad = gc.pad_token_id if gc.pad_token_id is not None else model.config.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    log(f"eos ids {eos}, pad id {pad}, generation_config: do_sample={gc.do_sample} "
        f"temperature={gc.temperature} top_p={gc.top_p} top_k={gc.top_k}")
    out = []
    with torch.inference_mode():
        for ci, conv in enumerate(convs):
            rendered = tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
            ids = tok(rendered, add_special_tokens=False)["input_ids"]
            x = torch.tensor([ids], dtype=torch.int64)
            res = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                do_sample=False,
                temperature=None,
                top_p=None,
                top_k=None,
                num_beams=1,
                max_new_tokens=args.max_new_tokens,
                eos_token_id=eos if eos else None,
                pad_token_id=pad,
                use_cache=True,
                return_dict_in_generate=True,
                output_logits=True,
            )
            gen = res.sequences[0, len(ids):].tolist()
            new_ids, stopped = [], False
            for t in gen:
                new_ids.append(t)
                if t in eos:
                    stopped = True
                    break
            gaps = []
            for step in res.logits[: len(new_ids)]:
                top2 = torch.topk(step[0].float(), 2).values
                gaps.append(float(top2[0] - top2[1]))
            text = tok.decode(new_ids, skip_special_tokens=True)
            out.append({
                "messages": conv,
                "rendered": rendered,
                "input_ids": ids,
                "new_ids": new_ids,
                "text": text,
                "stopped_on_eos": stopped,
                "eos_token_ids": eos,
                "top2_gaps": gaps,
                "min_top2_gap": min(gaps) if gaps else None,
            })
            log(f"conv {ci}: {len(ids)} prompt ids -> {len(new_ids)} new ids (eos stop: {stopped}, "
                f"min top2 gap {min(gaps) if gaps else float('nan'):.4f}): {text!r}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------


def read_records(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        recs = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                raise SystemExit(f"{path}:{n}: record has no string 'text' field")
            recs.append(obj["text"])
        return recs
    return [line for line in text.splitlines() if line.strip()]


def cmd_perplexity(args) -> int:
    import torch

    records = read_records(Path(args.data))
    tok, model = load(args)
    per, total_nll, total_n = [], 0.0, 0
    with torch.inference_mode():
        for i, text in enumerate(records):
            ids = tok(text, truncation=True, max_length=args.max_length)["input_ids"]
            n = max(len(ids) - 1, 0)
            nll = 0.0
            if n > 0:
                x = torch.tensor([ids], dtype=torch.int64)
                o = model(input_ids=x, labels=x)
                # PEFT's prompt tuning / P-tuning also return the virtual tokens' logits, first
                extra = o.logits.shape[1] - x.shape[1]
                logp = torch.log_softmax(o.logits[0, extra:-1].float(), dim=-1)
                nll = -logp.gather(1, x[0, 1:, None]).double().sum().item()
                # (PEFT's prompt-tuning loss also scores the first token after the virtual ones: not
                # the same count, so compared only without virtual tokens)
                if args.dtype == "f32" and extra == 0:
                    assert abs(o.loss.item() * n - nll) < 1e-3 * max(1.0, nll), (o.loss.item() * n, nll)
            per.append({"index": i, "num_tokens": len(ids), "predicted_tokens": n, "nll": nll})
            total_nll += nll
            total_n += n
    if total_n == 0:
        raise SystemExit("perplexity: no predicted tokens (every record has < 2 tokens)")
    ppl = math.exp(total_nll / total_n)
    res = {
        "perplexity": ppl,
        "nll": total_nll,
        "tokens": total_n,
        "records": len(records),
        "max_length": args.max_length,
        "add_special_tokens": True,
        "data": str(args.data),
        **meta(args),
        "per_record": per,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    log(f"perplexity {ppl:.4f} (nll {total_nll:.4f} over {total_n} tokens, {len(records)} records); wrote {args.out}")
    return 0


# ---------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p):
        p.add_argument("--model", required=True, type=Path)
        p.add_argument("--out", required=True)
        p.add_argument("--dtype", choices=sorted(DTYPES), default="f32")
        p.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
        p.add_argument("--threads", type=int, default=1)

    p = sub.add_parser("logits", help="input ids and float32 logits per text -> safetensors")
    common(p)
    p.add_argument("--text", action="append", default=[])
    p.set_defaults(fn=cmd_logits)

    p = sub.add_parser("chat", help="greedy chat completions -> JSON")
    common(p)
    p.add_argument("--messages-file", required=True)
    p.add_argument("--max-new-tokens", type=int, required=True)
    p.set_defaults(fn=cmd_chat)

    p = sub.add_parser("perplexity", help="per-record NLL and perplexity -> JSON")
    common(p)
    p.add_argument("--data", required=True)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--adapter", type=Path, help="a PEFT adapter folder applied with PeftModel.from_pretrained")
    p.set_defaults(fn=cmd_perplexity)

    args = ap.parse_args()
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
