"""Reads a GGUF file written by `align export --format gguf` back with the `gguf` package
(gguf-py, llama.cpp's own reader) and checks it against the HF folder it came from: metadata
(hyper-parameters, tokenizer, chat template), tensor names, types, shapes and values.

    check_gguf.py FILE.gguf HF_DIR --dtype f32|f16|bf16|q8_0 --name NAME --pre PRE

Values: the HF weights in f32, with q_proj / k_proj rows reordered for llama.cpp's rotary layout
on the llama architecture, must equal the stored tensors exactly (F32, F16, BF16: the HF values
rounded to nearest even); Q8_0 bytes must equal gguf-py's own `quants.quantize` bit for bit, and
its `quants.dequantize` must lie within half a quantisation step of every HF value (plus what
rounding the scale to f16 adds).
The special ids, merges and chat template are compared with gguf-py's `SpecialVocab` (what
llama.cpp's converter writes), the tokens with transformers' tokenizer. Exits 1 naming every
difference.
"""
import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

import gguf
from gguf import GGMLQuantizationType as Q

problems = []


def check(ok, what):
    if not ok:
        problems.append(what)


def field(reader, key):
    f = reader.get_field(key)
    if f is None:
        return None
    if f.types and f.types[0] == gguf.GGUFValueType.ARRAY:
        return f.contents()
    return f.contents()


def hf_tensors(folder):
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    out = {}
    for name in files:
        with safe_open(str(folder / name), "pt") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k).float()
    return out


def rotary_rows(w, heads):
    """HF's rotate-half rows of one head reordered to llama.cpp's interleaved pairs."""
    d = w.shape[0] // heads
    rest = w.shape[1:]
    return w.reshape(heads, 2, d // 2, *rest).transpose(1, 2).reshape(w.shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("file")
    ap.add_argument("hf_dir")
    ap.add_argument("--dtype", required=True, choices=["f32", "f16", "bf16", "q8_0"])
    ap.add_argument("--name", required=True)
    ap.add_argument("--pre", required=True)
    args = ap.parse_args()
    folder = Path(args.hf_dir)
    cfg = json.loads((folder / "config.json").read_text())
    r = gguf.GGUFReader(args.file)

    model_type = cfg["model_type"]
    arch = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}[model_type]
    heads, kv_heads = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    file_type = {"f32": 0, "f16": 1, "q8_0": 7, "bf16": 32}[args.dtype]

    # --- metadata
    want = {
        "general.architecture": arch,
        "general.name": args.name,
        "general.file_type": file_type,
        "general.alignment": 32,
        "general.quantization_version": 2,
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": kv_heads,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": args.pre,
        "tokenizer.ggml.add_bos_token": False,
    }
    if "head_dim" in cfg or head_dim * heads != cfg["hidden_size"]:
        want[f"{arch}.attention.key_length"] = head_dim
        want[f"{arch}.attention.value_length"] = head_dim
    if arch == "llama":
        want[f"{arch}.vocab_size"] = cfg["vocab_size"]
        want[f"{arch}.rope.dimension_count"] = head_dim
    for k, v in want.items():
        got = field(r, k)
        check(got == v, f"metadata {k}: {got!r}, expected {v!r}")
    for k, v in [(f"{arch}.rope.freq_base", theta), (f"{arch}.attention.layer_norm_rms_epsilon", cfg.get("rms_norm_eps", 1e-6))]:
        got = field(r, k)
        check(got is not None and np.float32(got) == np.float32(v), f"metadata {k}: {got!r}, expected {v!r} (as f32)")

    # --- tokenizer: special ids, merges and chat template as gguf-py's SpecialVocab reads the folder
    sv = gguf.SpecialVocab(folder, load_merges=True)
    check(field(r, "tokenizer.ggml.merges") == sv.merges, "tokenizer.ggml.merges differ from SpecialVocab's")
    keys = {"bos": "bos_token_id", "eos": "eos_token_id", "unk": "unknown_token_id", "pad": "padding_token_id"}
    for typ, key in keys.items():
        got = field(r, f"tokenizer.ggml.{key}")
        check(got == sv.special_token_ids.get(typ), f"tokenizer.ggml.{key}: {got!r}, SpecialVocab has {sv.special_token_ids.get(typ)!r}")
    template = (folder / "chat_template.jinja").read_text() if (folder / "chat_template.jinja").is_file() else sv.chat_template
    check(field(r, "tokenizer.chat_template") == template, "tokenizer.chat_template differs from the folder's")

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    by_id = {i: t for t, i in tok.get_vocab().items()}
    added = tok.added_tokens_decoder
    tokens, types = [], []
    for i in range(cfg["vocab_size"]):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(5)
        elif i in added:
            t = added[i].content
            control = added[i].special or (t.startswith("<|") and t.endswith("|>"))
            tokens.append(t if control else t.replace("\u2581", " "))
            types.append(3 if control else 4)
        else:
            tokens.append(by_id[i])
            types.append(1)
    check(field(r, "tokenizer.ggml.tokens") == tokens, "tokenizer.ggml.tokens differ from the tokenizer's vocabulary")
    check(field(r, "tokenizer.ggml.token_type") == types, "tokenizer.ggml.token_type differ")

    # --- tensors
    hf = hf_tensors(folder)
    tied = cfg.get("tie_word_embeddings", False)
    expected = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}
    if not tied:
        expected["output.weight"] = "lm_head.weight"
    per_layer = {
        "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
        "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    }
    for i in range(cfg["num_hidden_layers"]):
        for g, h in per_layer.items():
            for part in ("weight", "bias"):
                if f"model.layers.{i}.{h}.{part}" in hf:
                    expected[f"blk.{i}.{g}.{part}"] = f"model.layers.{i}.{h}.{part}"
    llama3 = (rope.get("rope_type") or rope.get("type")) == "llama3"
    names = {t.name for t in r.tensors}
    want_names = set(expected) | ({"rope_freqs.weight"} if llama3 else set())
    check(names == want_names, f"tensor names: extra {sorted(names - want_names)}, missing {sorted(want_names - names)}")

    stored = {"f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16, "q8_0": Q.Q8_0}[args.dtype]
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
            old = rope["original_max_position_embeddings"]
            ref = []
            for j in range(head_dim // 2):
                wavelen = 2 * math.pi * theta ** (2 * j / head_dim)
                if wavelen < old / high:
                    ref.append(1.0)
                elif wavelen > old / low:
                    ref.append(factor)
                else:
                    s = (old / wavelen - low) / (high - low)
                    ref.append(1 / ((1 - s) / factor + s))
            check(t.tensor_type == Q.F32 and np.allclose(t.data, ref, rtol=1e-6, atol=0), f"rope_freqs.weight: {t.data} vs {ref}")
            continue
        if t.name not in expected:
            continue
        w = hf[expected[t.name]]
        if arch == "llama" and ".attn_q." in t.name:
            w = rotary_rows(w, heads)
        if arch == "llama" and ".attn_k." in t.name:
            w = rotary_rows(w, kv_heads)
        shape = [int(d) for d in reversed(t.shape)]
        check(shape == list(w.shape), f"{t.name}: shape {shape} (PyTorch order), HF has {list(w.shape)}")
        ty = Q.F32 if w.dim() <= 1 else stored
        if ty == Q.Q8_0 and w.shape[-1] % 32 != 0:
            ty = Q.F16
        check(t.tensor_type == ty, f"{t.name}: type {t.tensor_type.name}, expected {ty.name}")
        if t.tensor_type != ty or shape != list(w.shape):
            continue
        x = w.numpy()
        if ty == Q.F32:
            ok = np.array_equal(np.asarray(t.data).reshape(x.shape), x)
        elif ty == Q.F16:
            ok = np.array_equal(np.asarray(t.data).reshape(x.shape), x.astype(np.float16))
        elif ty == Q.BF16:
            got = gguf.quants.dequantize(t.data, Q.BF16).reshape(x.shape)
            ok = np.array_equal(got, w.bfloat16().float().numpy())
        else:
            raw = np.asarray(t.data)
            ok = np.array_equal(raw.reshape(-1), gguf.quants.quantize(x, Q.Q8_0).reshape(-1))
            check(ok, f"{t.name}: Q8_0 bytes differ from gguf-py's quants.quantize")
            got = gguf.quants.dequantize(raw, Q.Q8_0).reshape(x.shape)
            blocks = x.reshape(-1, 32)
            step = np.abs(blocks).max(axis=1, keepdims=True) / 127
            err = np.abs(got.reshape(-1, 32) - blocks)
            # half a step, plus the f16 rounding of the scale times the largest |q| (127)
            d16 = step.astype(np.float16).astype(np.float32)
            ok = bool(np.all(err <= step / 2 + 127 * np.abs(step - d16) + 1e-6 * step + 1e-12))
            check(ok, f"{t.name}: Q8_0 dequantised values are off by up to {float((err / np.maximum(step, 1e-30)).max()):.3f} steps")
            continue
        check(ok, f"{t.name}: {ty.name} values differ from the HF weights")

    if problems:
        print(f"{args.file}: {len(problems)} problem(s):")
        for p in problems:
            print("  " + p)
        sys.exit(1)
    print(f"{args.file}: OK ({len(r.tensors)} tensors, {len(tokens)} tokens, {args.dtype})")


if __name__ == "__main__":
    main()
