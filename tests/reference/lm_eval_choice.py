#!/usr/bin/env python3
"""lm-evaluation-harness (HF backend, CPU, float32) on local multiple-choice files, for
comparison with `align eval choice`.

    .venv/bin/python tests/reference/lm_eval_choice.py --model DIR --template mmlu \
        --subject anatomy --data anatomy_test.jsonl [--dev anatomy_dev.jsonl --shots 2] [--chat] \
        --out result.json

The task is lm-eval's own task YAML of that subject (`mmlu_anatomy`, `cmmlu_clinical_knowledge`,
`ceval-valid_basic_medicine`: description, doc_to_text, choices, target, few-shot sampler), with
only its dataset replaced by the local files (`.jsonl` or `.csv`). Writes per item the rendered
context, the log-likelihood of each option and acc / acc_norm, and the aggregated results.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

TASK_YAML = {
    "mmlu": ("mmlu/default/mmlu_{s}.yaml", "test"),
    "cmmlu": ("cmmlu/cmmlu_{s}.yaml", "test"),
    "ceval": ("ceval/ceval-valid_{s}.yaml", "val"),
}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--template", required=True, choices=sorted(TASK_YAML))
    ap.add_argument("--subject", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--dev")
    ap.add_argument("--shots", type=int, default=0)
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.manual_seed(0)

    tasks_dir = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
    pattern, eval_split = TASK_YAML[a.template]
    base = os.path.join(tasks_dir, pattern.format(s=a.subject))
    if not os.path.isfile(base):
        print(f"{base}: lm-eval has no such task", file=sys.stderr)
        return 2
    builder = "csv" if a.data.endswith(".csv") else "json"
    files = {eval_split: os.path.abspath(a.data)}
    if a.dev:
        files["dev"] = os.path.abspath(a.dev)
    with tempfile.TemporaryDirectory() as tmp:
        name = f"align_ref_{a.template}_{a.subject}"
        with open(os.path.join(tmp, f"{name}.yaml"), "w") as f:
            # the subject's own task YAML, only the data source replaced (JSON keeps it YAML)
            f.write(f"include: {json.dumps(base)}\n")
            f.write(f"task: {name}\n")
            f.write("tag: []\n")
            f.write(f"dataset_path: {builder}\n")
            f.write("dataset_name: null\n")
            f.write(f"dataset_kwargs: {json.dumps({'data_files': files})}\n")
        tm = TaskManager(include_path=tmp, include_defaults=False)
        res = lm_eval.simple_evaluate(
            model="hf",
            model_args=f"pretrained={os.path.abspath(a.model)},dtype=float32,attn_implementation=eager",
            tasks=[name],
            num_fewshot=a.shots,
            batch_size=a.batch_size,
            device="cpu",
            log_samples=True,
            apply_chat_template=a.chat,
            task_manager=tm,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    items = []
    for s in samples:
        items.append(
            {
                "doc_id": s["doc_id"],
                "context": s["arguments"][0][0],
                "continuations": [arg[1] for arg in s["arguments"]],
                "loglikelihoods": [float(r[0][0]) for r in s["resps"]],
                "is_greedy": [bool(r[0][1]) for r in s["resps"]],
                "acc": float(s["acc"]),
                "acc_norm": float(s["acc_norm"]) if "acc_norm" in s else None,
            }
        )
    r = res["results"][name]
    out = {
        "lm_eval_version": lm_eval.__version__,
        "model": os.path.basename(os.path.abspath(a.model)),
        "template": a.template,
        "subject": a.subject,
        "shots": a.shots,
        "chat": a.chat,
        "acc": r["acc,none"],
        "acc_stderr": r.get("acc_stderr,none"),
        "acc_norm": r.get("acc_norm,none"),
        "items": items,
    }
    with open(a.out, "w") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
