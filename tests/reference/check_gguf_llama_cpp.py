"""Greedy generation from a GGUF file with llama.cpp (the `llama_cpp` package), for comparison
with `align generate` on the HF folder the file was exported from.

    check_gguf_llama_cpp.py FILE.gguf HF_DIR PROMPT MAX_NEW_TOKENS

Prints one JSON object: the prompt's ids as llama.cpp and as the HF tokenizer encode it, the
generated ids (stopping at the file's eos token), and their text decoded by the HF
tokenizer (special tokens skipped), as `align generate --json` prints it.
"""
import json
import sys
from pathlib import Path

import numpy as np
from llama_cpp import Llama
from tokenizers import Tokenizer


def main():
    path, hf_dir, prompt, n = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    m = Llama(model_path=path, n_ctx=0, logits_all=True, verbose=False, seed=0)
    ids = m.tokenize(prompt.encode(), add_bos=True, special=False)
    tok = Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    hf_ids = tok.encode(prompt, add_special_tokens=True).ids
    m.reset()
    m.eval(ids)
    out = []
    for _ in range(n):
        t = int(np.argmax(m.scores[m.n_tokens - 1]))
        if t == m.token_eos():
            break
        out.append(t)
        m.eval([t])
    print(json.dumps({"prompt_ids": ids, "hf_prompt_ids": hf_ids, "ids": out, "text": tok.decode(out, skip_special_tokens=True)}))


if __name__ == "__main__":
    main()
