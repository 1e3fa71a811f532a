"""TRL side of the DPO benchmark: DPOTrainer on the same preference pairs, max length, batch (pairs per
step), steps, learning rate, β and sigmoid loss as `align train dpo`, f32 on the CPU, no eval, no saving.
Prints one JSON object: pairs/s over the training steps after the first two (warm-up), i.e. the wall
time from the end of step 2 to the end of the last step; model loading, tokenisation and the
precompute pass are outside that window (the precompute pass runs in DPOTrainer's constructor; its
own time is printed as `ref_pass_seconds`). Peak RSS is measured by the caller (`/usr/bin/time -v`).
Used by benches/dpo_vs_trl.sh; not a dependency of align."""
import argparse, json, time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import DPOConfig, DPOTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument("--reference", choices=["live", "precomputed"], default="live")
ap.add_argument("--max-length", type=int, default=256)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--lr", type=float, default=5e-7)
ap.add_argument("--beta", type=float, default=0.1)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--out", default="/tmp/trl_dpo_bench")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

# align's preference records: ShareGPT `conversations` as the prompt, `chosen`/`rejected` answer strings
ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
rows = []
for line in open(a.data, encoding="utf-8"):
    rec = json.loads(line)
    prompt = [{"role": ROLE[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    if rec.get("system_prompt"):
        prompt.insert(0, {"role": "system", "content": rec["system_prompt"]})
    rows.append({
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": rec["chosen"]}],
        "rejected": [{"role": "assistant", "content": rec["rejected"]}],
    })
tok = AutoTokenizer.from_pretrained(a.model)
model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
# live: a second frozen copy loaded from the same folder, as align does; precomputed: no ref_model, so
# TRL scores the pairs with the policy before training and keeps no reference in memory
ref_model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32) if a.reference == "live" else None


class Clock(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter())


class TimedDPOTrainer(DPOTrainer):
    ref_pass_seconds = 0.0

    def _precompute_ref_logps(self, dataset, name, batch_size):
        t0 = time.perf_counter()
        out = super()._precompute_ref_logps(dataset, name, batch_size)
        TimedDPOTrainer.ref_pass_seconds += time.perf_counter() - t0
        return out


clock = Clock()
cfg = DPOConfig(
    output_dir=a.out, max_length=a.max_length, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
    learning_rate=a.lr, lr_scheduler_type="linear", beta=a.beta, loss_type=["sigmoid"],
    precompute_ref_log_probs=a.reference == "precomputed",
    # DPOConfig defaults to gradient checkpointing and bf16; align does neither
    gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
    logging_steps=1000, save_strategy="no", eval_strategy="no", report_to=[], dataloader_num_workers=0, seed=42,
)
trainer = TimedDPOTrainer(model=model, ref_model=ref_model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[clock])
lengths = [len(p) + len(c) for p, c in zip(trainer.train_dataset["prompt_ids"], trainer.train_dataset["chosen_ids"])]
lengths += [len(p) + len(r) for p, r in zip(trainer.train_dataset["prompt_ids"], trainer.train_dataset["rejected_ids"])]
trainer.train()
timed = clock.times[1:]  # from the end of step 2 to the end of the last step
steps = len(timed) - 1
secs = timed[-1] - timed[0]
print(json.dumps({
    "engine": "trl", "reference": a.reference, "steps_timed": steps, "seconds": secs,
    "pairs_per_second": steps * a.batch_size / secs, "ref_pass_seconds": TimedDPOTrainer.ref_pass_seconds,
    "pairs": len(rows), "mean_tokens_per_row": sum(min(n, a.max_length) for n in lengths) / len(lengths),
    "threads": torch.get_num_threads(),
}))
