"""TRL side of the SFT benchmark: SFTTrainer on the same conversations, sequence length, batch and
method (full or LoRA) as `align train sft`. Prints one JSON object: tokens/s and steps/s measured
over the steps after the first two (warm-up), and the sequence count. Peak RSS is measured by the
caller (`/usr/bin/time -v`). Used by benches/sft_vs_trl.sh; not a dependency of align."""
import argparse, json, sys, time

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import SFTConfig, SFTTrainer

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--data", required=True)
ap.add_argument(
    "--method", choices=["full", "lora", "qlora", "dora", "ia3", "prompt_tuning", "prefix_tuning"], default="full"
)
ap.add_argument("--gradient-checkpointing", action="store_true")
ap.add_argument("--max-length", type=int, default=256)
ap.add_argument("--batch-size", type=int, default=4)
ap.add_argument("--steps", type=int, default=12)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--out", default="/tmp/trl_sft_bench")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)

ROLE = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}
rows = []
for line in open(a.data, encoding="utf-8"):
    rec = json.loads(line)
    msgs = [{"role": ROLE[t["from"]], "content": t["value"]} for t in rec["conversations"]]
    if rec.get("system_prompt"):
        msgs.insert(0, {"role": "system", "content": rec["system_prompt"]})
    rows.append({"messages": msgs})
tok = AutoTokenizer.from_pretrained(a.model)
if a.method == "qlora":
    # bitsandbytes' 4-bit NF4 base with double quantisation, computing in f32 (CPU)
    from transformers import BitsAndBytesConfig
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, quantization_config=bnb, device_map="cpu")
else:
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)

peft_config = None
if a.method in ("lora", "qlora", "dora"):
    from peft import LoraConfig
    peft_config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM",
        use_dora=a.method == "dora",
    )
elif a.method == "ia3":
    from peft import IA3Config
    peft_config = IA3Config(task_type="CAUSAL_LM")  # PEFT's defaults for the model type
elif a.method == "prompt_tuning":
    from peft import PromptTuningConfig
    peft_config = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)
elif a.method == "prefix_tuning":
    from peft import PrefixTuningConfig
    peft_config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=20)


class Clock(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter())


clock = Clock()
cfg = SFTConfig(
    output_dir=a.out, max_length=a.max_length, per_device_train_batch_size=a.batch_size, max_steps=a.steps,
    learning_rate=1e-5, logging_steps=1000, save_strategy="no", report_to=[], use_cpu=True, packing=False,
    dataloader_num_workers=0, seed=42, bf16=False, fp16=False, assistant_only_loss=False,
    gradient_checkpointing=a.gradient_checkpointing,
)
trainer = SFTTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok, peft_config=peft_config, callbacks=[clock])
lengths = [len(x) for x in trainer.train_dataset["input_ids"]]
trainer.train()
timed = clock.times[2:]
steps = len(timed) - 1
secs = timed[-1] - timed[0]
mean_len = sum(min(l, a.max_length) for l in lengths) / len(lengths)
print(json.dumps({
    "engine": "trl", "method": a.method, "steps_timed": steps, "seconds": secs,
    "steps_per_second": steps / secs, "tokens_per_second": steps * a.batch_size * mean_len / secs,
    "mean_tokens_per_sequence": mean_len, "threads": torch.get_num_threads(),
}))
