"""TRL side of the PPO benchmark: TRL's PPOTrainer (`trl.experimental.ppo`, TRL 1.12 — the last release
that ships it) with the same policy, reward model (also the critic), prompts and settings as
`align train ppo` in benches/ppo_bench.sh. Not a dependency of align; runs in .venv-trl-ppo.

TRL logs no per-phase timing, so this script times its phases itself by wrapping the functions
the trainer calls (module globals of trl.experimental.ppo.ppo_trainer) and the optimizer:
  generation   = `batch_generation` (HF `generate` with KV cache, one batch of rollout prompts)
  scoring      = `get_reward` called with the reward model
  forward      = the no-grad `forward` of the reference policy + `get_reward` with the critic
                 (TRL takes the rollout log-probs from `generate`'s scores, so no policy forward)
  optimisation = from the first forward with gradients to the end of the last optimizer step
  iteration    = from one `on_step_end` callback to the next (the first from `on_train_begin`):
                 the whole loop body of one PPO update
Rollout tokens = response tokens up to and including the first eos (what align counts), and
"decoded" = rows × positions `generate` produced (it pads finished rows until every row is done).
Prints one JSON object (last line): per-iteration lists and the settings. Peak RSS: the caller."""
import argparse, json, os, sys, time

import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback  # noqa: E402
from trl.experimental.ppo import PPOConfig, PPOTrainer  # noqa: E402
from trl.experimental.ppo import ppo_trainer as ppo_module  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("--policy", required=True)
ap.add_argument("--reward-model", required=True)
ap.add_argument("--prompts", required=True)
ap.add_argument("--iterations", type=int, default=5)
ap.add_argument("--rollout-batch-size", type=int, default=8)
ap.add_argument("--batch-size", type=int, default=4, help="rows per forward/backward pass (micro-batch)")
ap.add_argument("--ppo-epochs", type=int, default=1)
ap.add_argument("--max-new-tokens", type=int, default=48)
ap.add_argument("--temperature", type=float, default=0.7)
ap.add_argument("--kl-coef", type=float, default=0.05)
ap.add_argument("--lr", type=float, default=1e-6)
ap.add_argument("--seed", type=int, default=42)
ap.add_argument("--threads", type=int, default=None)
ap.add_argument("--out", default="/tmp/trl_ppo_bench")
a = ap.parse_args()
if a.threads:
    torch.set_num_threads(a.threads)
if a.rollout_batch_size % a.batch_size:
    sys.exit("--rollout-batch-size must be a multiple of --batch-size")

# Prompts: the question of each record as the user's turn, the policy's chat template with a
# generation prompt (as align renders prompt records). Left padding for generation; a pad token
# distinct from eos (SmolLM2's pad is its eos, which TRL's masks `ids != pad` would hide), as
# TRL's own PPO example does — TRL replaces pad ids by 0 before every forward, so the new id
# never reaches the embedding.
tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
tok.add_special_tokens({"pad_token": "[PAD]"})
rows = []
for line in open(a.prompts, encoding="utf-8"):
    rec = json.loads(line)
    text = rec.get("question") or rec.get("prompt") or rec.get("instruction")
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):
        ids = ids["input_ids"]
    rows.append({"input_ids": list(ids)})
dataset = Dataset.from_list(rows)

policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
ref_policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
reward_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, dtype=torch.float32)
value_model = AutoModelForSequenceClassification.from_pretrained(a.reward_model, num_labels=1, dtype=torch.float32)

# ---- phase timers -------------------------------------------------------------------------
cur = {}  # the current iteration's sums
done = []  # one dict per finished iteration


def reset():
    cur.clear()
    cur.update(generation=0.0, scoring=0.0, forward=0.0, opt_start=None, opt_end=None, tokens=0, decoded=0)


reset()
eos_id = tok.eos_token_id
_batch_generation, _get_reward, _forward = ppo_module.batch_generation, ppo_module.get_reward, ppo_module.forward


def timed_batch_generation(model, queries, *args, **kw):
    t = time.perf_counter()
    out = _batch_generation(model, queries, *args, **kw)
    cur["generation"] += time.perf_counter() - t
    responses = out[0][:, queries.shape[1]:]
    for row in responses.tolist():
        n = row.index(eos_id) + 1 if eos_id in row else len(row)
        cur["tokens"] += n
    cur["decoded"] += responses.numel()
    return out


def timed_get_reward(model, *args, **kw):
    t = time.perf_counter()
    out = _get_reward(model, *args, **kw)
    cur["scoring" if model is reward_model else "forward"] += time.perf_counter() - t
    return out


def timed_forward(model, *args, **kw):
    if torch.is_grad_enabled():
        if cur["opt_start"] is None:
            cur["opt_start"] = time.perf_counter()
        return _forward(model, *args, **kw)
    t = time.perf_counter()
    out = _forward(model, *args, **kw)
    cur["forward"] += time.perf_counter() - t
    return out


ppo_module.batch_generation = timed_batch_generation
ppo_module.get_reward = timed_get_reward
ppo_module.forward = timed_forward


class Clock(TrainerCallback):
    def __init__(self):
        self.last = None

    def on_train_begin(self, args, state, control, **kw):
        self.last = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        now = time.perf_counter()
        done.append({
            "generation": cur["generation"], "scoring": cur["scoring"], "forward": cur["forward"],
            "optimisation": (cur["opt_end"] or now) - (cur["opt_start"] or now), "iteration": now - self.last,
            "tokens": cur["tokens"], "decoded": cur["decoded"],
        })
        self.last = now
        reset()


cfg = PPOConfig(
    output_dir=a.out, report_to=[], use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False,
    seed=a.seed, learning_rate=a.lr, lr_scheduler_type="constant",
    per_device_train_batch_size=a.batch_size, gradient_accumulation_steps=a.rollout_batch_size // a.batch_size,
    num_mini_batches=1, local_rollout_forward_batch_size=a.rollout_batch_size,
    total_episodes=a.iterations * a.rollout_batch_size, num_ppo_epochs=a.ppo_epochs,
    response_length=a.max_new_tokens, temperature=a.temperature, kl_coef=a.kl_coef, kl_estimator="k1",
    stop_token="eos", num_sample_generations=0, save_strategy="no", eval_strategy="no",
    logging_steps=1, dataloader_num_workers=0, disable_tqdm=True,
)
trainer = PPOTrainer(
    args=cfg, processing_class=tok, model=policy, ref_model=ref_policy, reward_model=reward_model,
    value_model=value_model, train_dataset=dataset, callbacks=[Clock()],
)
_step = trainer.optimizer.step


def timed_step(*args, **kw):
    out = _step(*args, **kw)
    cur["opt_end"] = time.perf_counter()
    return out


trainer.optimizer.step = timed_step
trainer.train()

print(json.dumps({
    "engine": "trl", "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
    "threads": torch.get_num_threads(), "iterations": done,
    "mean_prompt_tokens": sum(len(r["input_ids"]) for r in rows) / len(rows),
}))
