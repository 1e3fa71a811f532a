#!/usr/bin/env python3
"""Writes crates/core/src/eval/choice/subjects.json: the task description of every subject of
lm-evaluation-harness's mmlu, cmmlu and ceval-valid tasks (their `dataset_name` → `description`),
read from the task YAML files of the installed lm_eval package. Run from the repository root:

    .venv/bin/python tests/reference/make_choice_subjects.py
"""

import glob
import json
import os

import lm_eval
import yaml

TASKS = {"mmlu": "mmlu/default/mmlu_*.yaml", "cmmlu": "cmmlu/cmmlu_*.yaml", "ceval": "ceval/ceval-valid_*.yaml"}

root = os.path.join(os.path.dirname(lm_eval.__file__), "tasks")
out = {}
for template, pattern in TASKS.items():
    table = {}
    for path in sorted(glob.glob(os.path.join(root, pattern))):
        with open(path) as f:
            y = yaml.safe_load(f)
        if isinstance(y, dict) and "dataset_name" in y and "description" in y:
            table[y["dataset_name"]] = y["description"]
    out[template] = table
with open("crates/core/src/eval/choice/subjects.json", "w") as f:
    json.dump(out, f, ensure_ascii=False, indent=0, sort_keys=True)
print({k: len(v) for k, v in out.items()}, f"(lm_eval {lm_eval.__version__})")
