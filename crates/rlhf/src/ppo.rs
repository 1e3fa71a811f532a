//! PPO stage: each iteration samples responses to a batch of prompts with the policy (batched
//! KV-cache generation), scores them with the reward model, shapes per-token rewards with a KL
//! penalty against the reference, estimates advantages with GAE on the critic's values, and runs
//! `ppo_epochs` passes of clipped policy and value updates over minibatches. One iteration is
//! one step of the core's training loop ([`PpoStep`]), which owns checkpoints, exact resume at
//! iteration boundaries, metrics and the summary.
use std::path::Path;
use std::time::Instant;

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use align_core::eval::answers::stop_token_ids;
use align_core::eval::winrate::score_answers;
use align_core::hf::checkpoint::resolve_model_dir;
use align_core::hf::config::ModelConfig;
use align_core::infer::generate::{Generation, SamplingConfig};
use align_core::infer::logprobs::HeadOptions;
use align_core::model::recompute;
use align_core::model::scalar::{LoadedScalarModel, ScoreInit};
use align_core::text::chat::ChatMessage;
use align_core::train::config::{LoadedConfig, TrainSection};
use align_core::train::optim::AdamW;
use align_core::train::setup::{training_device, TrainingModel, TrainingScalarModel};
use align_core::train::trainer::{
    clip_and_step, epoch_order, rank_optimizer, rank_share, step_seed, stream_indices, train, ModelState, StepContext,
    StepReport, StopRequest, TrainRun, TrainStep, TrainSummary,
};
use align_core::ModelTokenizer;

use crate::ppo_config::{check_guardrails, GuardInputs, Guards, PpoSection};
use crate::ppo_loss::{
    clipped_policy_loss, clipped_value_loss, gae_advantages, kl_per_token, masked_whiten, token_rewards, whiten_with,
    AdaptiveKl, RunningMoments,
};
use crate::reference::{policy_reference, Reference};
use crate::rewards::load_reward_model;
use crate::rollout::{load_prompts, loss_and_metrics, sample_responses, ChunkSeeds, Prompt, RolloutBatch, SamplesLog};

/// PPO's own part of every checkpoint's state (the loop keeps the iteration count, the prompt
/// cursor, the optimizers' step counts and the non-finite counters).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct PpoState {
    kl_coef: f64,
    reward_moments: RunningMoments,
    guards: Guards,
}

/// The critic: from the reward model (default), from the policy with a fresh head, or a folder.
fn load_value_model(
    section: &PpoSection,
    reward_dir: &Path,
    policy_dir: &Path,
    seed: u64,
    device: Device,
    kind: Kind,
) -> Result<TrainingScalarModel> {
    let dir = match section.value_model.as_deref() {
        None | Some("reward_model") => reward_dir.to_path_buf(),
        Some("policy") => policy_dir.to_path_buf(),
        Some(other) => resolve_model_dir(other)?,
    };
    let value = TrainingScalarModel::from_dir(&dir, device, kind, |h| ScoreInit::default_for(h, seed))?;
    let policy_vocab = ModelConfig::from_dir(policy_dir)?.vocab_size;
    if value.loaded.rm.config.vocab_size != policy_vocab {
        bail!(
            "[ppo] value_model: {} has vocab_size {} but the policy has {policy_vocab}; the critic reads the policy's tokens (use value_model = \"policy\")",
            dir.display(),
            value.loaded.rm.config.vocab_size
        );
    }
    tracing::info!("value model (critic): {}", dir.display());
    Ok(value)
}

/// What one iteration measured, for metrics.jsonl.
struct IterationReport {
    line: Value,
    guard: GuardInputs,
    any_skipped: bool,
    new_tokens: usize,
}

/// The loaded models and settings of a run.
struct Ppo<'a> {
    section: &'a PpoSection,
    train: &'a TrainSection,
    policy: &'a TrainingModel,
    reference: &'a Reference,
    reward: &'a LoadedScalarModel,
    reward_tokenizer: &'a ModelTokenizer,
    value: &'a TrainingScalarModel,
    prompts: &'a [Prompt],
    stops: Vec<i64>,
    pad_id: i64,
    mini_batch: usize,
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.f_to_kind(Kind::Double)?.f_double_value(&[])?)
}

/// [`masked_whiten`] over the rollouts of every rank: the masked mean and (unbiased) variance
/// summed over the ranks first. In one process, `masked_whiten` itself.
fn whiten(x: &Tensor, mask: &Tensor, shift_mean: bool) -> Result<Tensor> {
    let world = align_core::dist::world();
    if world.size() == 1 {
        return masked_whiten(x, mask, shift_mean);
    }
    let m = mask.f_to_kind(x.kind())?;
    let mut first = [scalar(&x.f_mul(&m)?.f_sum(Kind::Double)?)?, scalar(&m.f_sum(Kind::Double)?)?];
    world.sum_f64(&mut first)?;
    let [sum, n] = first;
    if n < 2.0 {
        bail!("whitening needs at least two response tokens over all ranks, got {n}");
    }
    let mean = sum / n;
    let mut second = [scalar(&x.f_sub_scalar(mean)?.f_square()?.f_mul(&m)?.f_sum(Kind::Double)?)?];
    world.sum_f64(&mut second)?;
    whiten_with(x, mean, second[0] / (n - 1.0), shift_mean)
}

impl Ppo<'_> {
    fn sampling(&self) -> SamplingConfig {
        SamplingConfig {
            max_new_tokens: self.section.max_new_tokens,
            temperature: self.section.temperature,
            top_k: self.section.top_k,
            top_p: Some(self.section.top_p),
            repetition_penalty: None,
        }
    }

    /// How the policy's LM head scores response tokens: at the sampling temperature, in chunks
    /// of `train.loss_chunk_tokens`.
    fn head(&self) -> HeadOptions {
        HeadOptions {
            temperature: self.section.temperature,
            chunk_tokens: self.train.loss_chunk_tokens,
            entropy: false,
        }
    }

    /// Shapes raw RM scores: normalisation (running statistics), clipping, missing-eos penalty.
    /// `raw`: this rank's scores; `all`: every rank's (the running statistics see them all).
    fn shape_scores(
        &self,
        raw: &[f64],
        all: &[f64],
        generations: &[Generation],
        moments: &mut RunningMoments,
    ) -> Vec<f64> {
        let s = self.section;
        if s.normalize_reward {
            moments.update(all);
        }
        raw.iter()
            .zip(generations)
            .map(|(&x, g)| {
                let mut v = if s.normalize_reward { (x - moments.mean) / moments.std() } else { x };
                if let Some(c) = s.reward_clip {
                    v = v.clamp(-c, c);
                }
                if let (Some(p), false) = (s.missing_eos_penalty, g.stopped_on_eos) {
                    v -= p;
                }
                v
            })
            .collect()
    }

    /// One PPO iteration: rollouts, scoring, advantages, `ppo_epochs` of updates.
    fn iteration(
        &self,
        at: &StepContext,
        state: &mut PpoState,
        policy_opt: &mut AdamW,
        value_opt: &mut AdamW,
        value_lr: f64,
        samples: &mut SamplesLog,
    ) -> Result<IterationReport> {
        let s = self.section;
        let lm = &self.policy.loaded.lm;
        let critic = &self.value.loaded.rm;
        let device = lm.device();
        let started = Instant::now();
        // every rank draws the same prompts and rolls out its share of them
        let world = align_core::dist::world();
        let global = stream_indices(self.prompts.len(), self.train.seed, at.examples_consumed, s.rollout_batch_size);
        let picked = rank_share(&global).to_vec();
        let prompt_ids: Vec<Vec<i64>> = picked.iter().map(|&i| self.prompts[i].ids.clone()).collect();

        // 1. rollouts (dropout off, adapters on)
        let gen_batch = s.generation_batch_size.unwrap_or(s.rollout_batch_size);
        // each rank draws its own numbers (seeded by its rows' place in the global batch)
        let seeds = ChunkSeeds { base: step_seed(self.train.seed, at.step), first_row: world.rank() * picked.len() };
        let (generations, generation_seconds) =
            sample_responses(lm, &prompt_ids, &self.sampling(), &self.stops, self.pad_id, gen_batch, Some(seeds))?;
        let new_tokens: usize = generations.iter().map(|g| g.tokens.len()).sum();

        // 2. reward-model scores of prompt + response (rendered with the RM's chat template)
        let t = Instant::now();
        let tok = &self.policy.tokenizer;
        let answers: Vec<String> =
            generations.iter().map(|g| tok.decode(&g.tokens, true)).collect::<Result<Vec<_>>>()?;
        let conversations: Vec<Vec<ChatMessage>> = picked.iter().map(|&i| self.prompts[i].messages.clone()).collect();
        let rm = &self.reward.rm;
        let max_rm = rm.config.max_position_embeddings.max(1) as usize;
        let raw = score_answers(rm, self.reward_tokenizer, &conversations, &answers, max_rm, self.train.batch_size)?;
        let raw_all = world.gather_f64(&raw)?;
        let shaped = self.shape_scores(&raw, &raw_all, &generations, &mut state.reward_moments);
        let scoring_seconds = t.elapsed().as_secs_f64();

        // 3. old log-probs, reference log-probs and values (no gradients)
        let t = Instant::now();
        let batch = RolloutBatch::new(&prompt_ids, &generations, self.pad_id, device)?;
        let mask = &batch.response_mask;
        let head = self.head();
        let (old_logprobs, entropy, ref_logprobs, old_values) = tch::no_grad(|| -> Result<_> {
            let mut entropies = Vec::new();
            let old = batch.per_pass(self.train.batch_size, |b| {
                let scores = b.response_scores(lm, HeadOptions { entropy: true, ..head })?;
                entropies.extend(scores.entropy);
                Ok(scores.logprobs)
            })?;
            let reference = batch.per_pass(self.train.batch_size, |b| {
                self.reference
                    .run(lm, |r| b.response_logprobs(r, head))?
                    .ok_or_else(|| anyhow!("PPO needs a reference model"))
            })?;
            let values = batch.per_pass(self.train.batch_size, |b| b.response_values(critic))?;
            Ok((old, Tensor::f_cat(&entropies, 0)?, reference, values))
        })?;
        let forward_seconds = t.elapsed().as_secs_f64();

        // 4. rewards and advantages
        let scores = Tensor::from_slice(&shaped).f_to_device(device)?;
        let kl = kl_per_token(&old_logprobs, &ref_logprobs, mask, s.kl_estimator)?;
        let (mut rewards, non_score) = token_rewards(&kl, mask, &scores, state.kl_coef)?;
        if s.whiten_rewards {
            rewards = whiten(&rewards, mask, false)?.f_mul(mask)?;
        }
        let (advantages, returns) = gae_advantages(&rewards, &old_values, mask, s.gamma, s.lam)?;
        let advantages = whiten(&advantages, mask, true)?.f_mul(mask)?;

        // 5. PPO epochs over minibatches
        let t = Instant::now();
        let n = picked.len();
        let opt_stats = self.optimise(
            &batch,
            [&old_logprobs, &old_values, &advantages, &returns],
            at.step,
            policy_opt,
            value_opt,
            (at.lr, value_lr),
            n,
        )?;
        let optimisation_seconds = t.elapsed().as_secs_f64();

        // metrics (TRL / OpenRLHF names), over the rollouts of every rank
        let seq_sum = |x: &Tensor| -> Result<f64> { scalar(&x.f_sum(Kind::Double)?) };
        let lengths: Vec<usize> = generations.iter().map(|g| g.tokens.len()).collect();
        let mut sums = [
            picked.len() as f64,
            seq_sum(&kl)?,
            seq_sum(&non_score)?,
            shaped.iter().sum::<f64>(),
            raw.iter().sum::<f64>(),
            seq_sum(&old_logprobs.f_mul(mask)?)?,
            scalar(&entropy.f_mul(mask)?.f_sum(Kind::Double)?)?,
            seq_sum(&old_values)?,
            scalar(&mask.f_sum(Kind::Double)?)?,
            lengths.iter().sum::<usize>() as f64,
            generations.iter().filter(|g| g.stopped_on_eos).count() as f64,
            generations.iter().filter(|g| g.stopped_on_eos || g.tokens.len() < s.max_new_tokens).count() as f64,
            new_tokens as f64,
        ];
        world.sum_f64(&mut sums)?;
        let [rows, kl_sum, non_score_sum, shaped_sum, raw_sum, logprob_sum, entropy_sum, value_sum, tokens, length_sum, eos, not_at_max, all_new_tokens] =
            sums;
        let kl_mean = kl_sum / rows;
        let non_score_mean = non_score_sum / rows;
        let score_mean = shaped_sum / rows;
        let mean_length = length_sum / rows;
        let eos_rate = eos / rows;
        let all_at_max = not_at_max == 0.0;
        let tokens = tokens.max(1.0);
        let new_tokens = all_new_tokens as usize;
        let total_seconds = started.elapsed().as_secs_f64();
        let mut line = json!({
            "kl_coef": state.kl_coef,
            "objective/kl": kl_mean,
            "objective/entropy": -logprob_sum / rows,
            "policy/entropy_avg": entropy_sum / tokens,
            "objective/non_score_reward": non_score_mean,
            "objective/rlhf_reward": score_mean + non_score_mean,
            "objective/scores": score_mean,
            "rm/score": raw_sum / rows,
            "val/mean": value_sum / tokens,
            "response_length_mean": mean_length,
            "eos_rate": eos_rate,
            "time/generation": generation_seconds,
            "time/scoring": scoring_seconds,
            "time/forward": forward_seconds,
            "time/optimisation": optimisation_seconds,
            "time/iteration": total_seconds,
            "generation_share": generation_seconds / total_seconds.max(1e-9),
            "rollout_tokens_per_second": new_tokens as f64 / generation_seconds.max(1e-9),
        });
        for (k, v) in opt_stats.metrics {
            line[k] = json!(v);
        }
        let due = if world.is_main() { samples.due(at.step, s.sample_every)? } else { None };
        if let Some(log) = due {
            for (k, &i) in picked.iter().enumerate().take(s.num_samples) {
                log.write(&json!({
                    "step": at.step + 1,
                    "prompt": self.prompts[i].text,
                    "response": answers[k],
                    "score": raw[k],
                    "stopped_on_eos": generations[k].stopped_on_eos,
                }))?;
            }
        }
        Ok(IterationReport {
            line,
            guard: GuardInputs { kl: kl_mean, mean_length, all_at_max },
            any_skipped: opt_stats.skipped > 0 || !raw_all.iter().all(|x| x.is_finite()),
            new_tokens,
        })
    }

    /// `ppo_epochs` passes of minibatch updates of the policy and the critic. Each minibatch's
    /// losses are token means over its rollouts (micro-batches accumulate into one step).
    #[allow(clippy::too_many_arguments)]
    fn optimise(
        &self,
        batch: &RolloutBatch,
        [old_logprobs, old_values, advantages, returns]: [&Tensor; 4],
        iteration: u64,
        policy_opt: &mut AdamW,
        value_opt: &mut AdamW,
        (lr, value_lr): (f64, f64),
        n: usize,
    ) -> Result<OptimiseStats> {
        let s = self.section;
        let lm = &self.policy.loaded.lm;
        let critic = &self.value.loaded.rm;
        let device = lm.device();
        let mut sums = std::collections::BTreeMap::<&str, f64>::new();
        let mut updates = 0f64;
        let mut skipped = 0u64;
        let world = align_core::dist::world();
        let all_finite = |t: &Tensor| -> Result<bool> { Ok(t.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0) };
        let mut poisoned = [(!all_finite(advantages)? || !all_finite(returns)?) as u8 as f64];
        world.sum_f64(&mut poisoned)?;
        if poisoned[0] > 0.0 {
            // a non-finite score or value poisons every update of the iteration
            return Ok(OptimiseStats { metrics: Vec::new(), skipped: 1 });
        }
        let order_seed = self.train.seed ^ (iteration.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for epoch in 0..s.ppo_epochs as u64 {
            let order = epoch_order(n, order_seed, epoch);
            // each rank takes its share of every minibatch; the loss is a token mean over the
            // minibatch of all ranks
            for mb in order.chunks(self.mini_batch / world.size()) {
                let mb_index =
                    Tensor::from_slice(&mb.iter().map(|&r| r as i64).collect::<Vec<_>>()).f_to_device(device)?;
                let mut mb_tokens = [scalar(&batch.response_mask.f_index_select(0, &mb_index)?.f_sum(Kind::Double)?)?];
                world.sum_f64(&mut mb_tokens)?;
                let mb_tokens = mb_tokens[0].max(1.0);
                let mut mb_sums = [0f64; 7];
                for micro in mb.chunks(self.train.batch_size.max(1)) {
                    let sub = batch.rows(micro)?;
                    let idx =
                        Tensor::from_slice(&micro.iter().map(|&r| r as i64).collect::<Vec<_>>()).f_to_device(device)?;
                    let pick = |t: &Tensor| t.f_index_select(0, &idx);
                    let m = &sub.response_mask;
                    let new_logprobs = sub.response_logprobs(lm, self.head())?;
                    let new_values = sub.response_values(critic)?;
                    let pl = clipped_policy_loss(&new_logprobs, &pick(old_logprobs)?, &pick(advantages)?, s.cliprange)?;
                    let vl = clipped_value_loss(&new_values, &pick(old_values)?, &pick(returns)?, s.cliprange_value)?;
                    let masked_sum = |x: &Tensor| -> Result<Tensor> { Ok(x.f_mul(m)?.f_sum(Kind::Float)?) };
                    let pg = masked_sum(&pl.losses)?;
                    let vf = masked_sum(&vl.losses)?;
                    let loss = pg.f_add(&vf.f_mul_scalar(s.vf_coef)?)?.f_div_scalar(mb_tokens)?;
                    recompute::backward(&loss)?;
                    let _guard = tch::no_grad_guard();
                    for (k, x) in [
                        scalar(&pg)?,
                        scalar(&vf)?,
                        scalar(&masked_sum(&pl.clipped)?)?,
                        scalar(&masked_sum(&vl.clipped)?)?,
                        scalar(&masked_sum(&pl.approx_kl)?)?,
                        scalar(&masked_sum(&pl.ratio)?)?,
                        scalar(&loss)? * mb_tokens,
                    ]
                    .into_iter()
                    .enumerate()
                    {
                        mb_sums[k] += x;
                    }
                }
                policy_opt.reduce_grads()?;
                value_opt.reduce_grads()?;
                world.sum_f64(&mut mb_sums)?;
                let policy_norm = policy_opt.grad_norm()?;
                let value_norm = value_opt.grad_norm()?;
                let finite = mb_sums.iter().all(|x| x.is_finite()) && policy_norm.is_finite() && value_norm.is_finite();
                if finite {
                    clip_and_step(policy_opt, policy_norm, self.train.max_grad_norm, lr)?;
                    clip_and_step(value_opt, value_norm, self.train.max_grad_norm, value_lr)?;
                    updates += 1.0;
                    let names = [
                        "loss/policy",
                        "val/vf_loss",
                        "policy/clipfrac",
                        "val/clipfrac",
                        "policy/approxkl",
                        "policy/ratio",
                        "loss",
                    ];
                    for (name, v) in names.iter().zip(mb_sums) {
                        *sums.entry(name).or_default() += v / mb_tokens;
                    }
                    *sums.entry("grad_norm").or_default() += policy_norm;
                    *sums.entry("val/grad_norm").or_default() += value_norm;
                } else {
                    skipped += 1;
                    tracing::warn!(
                        "iteration {}: non-finite PPO loss or gradient (policy grad norm {policy_norm}, value grad norm {value_norm}); update skipped",
                        iteration + 1
                    );
                }
                policy_opt.zero_grad();
                value_opt.zero_grad();
            }
        }
        let mut metrics: Vec<(String, f64)> = sums
            .into_iter()
            .map(|(k, v)| (k.to_string(), if updates > 0.0 { v / updates } else { f64::NAN }))
            .collect();
        metrics.push(("skipped_updates".into(), skipped as f64));
        Ok(OptimiseStats { metrics, skipped })
    }
}

struct OptimiseStats {
    metrics: Vec<(String, f64)>,
    skipped: u64,
}

const POLICY_OPT: &str = "policy_optimizer";
const VALUE_OPT: &str = "value_optimizer";
const VALUE_DIR: &str = "value_model";

/// Writes the policy (HF folder, or PEFT adapter under LoRA) with the critic in `value_model/`.
fn save_models(dir: &Path, policy: &TrainingModel, value: &TrainingScalarModel) -> Result<()> {
    policy.save(dir)?;
    let value_dir = dir.join(VALUE_DIR);
    std::fs::create_dir_all(&value_dir).with_context(|| format!("{}: cannot create", value_dir.display()))?;
    value.save(&value_dir)
}

/// One PPO iteration as a step of the core's training loop: the models, both optimizers, the
/// KL controller and the reward statistics.
struct PpoStep<'a> {
    ppo: Ppo<'a>,
    policy_opt: AdamW,
    value_opt: AdamW,
    state: PpoState,
    controller: Option<AdaptiveKl>,
    samples: SamplesLog,
    value_lr_base: f64,
}

impl TrainStep for PpoStep<'_> {
    fn unit(&self) -> &'static str {
        "iteration"
    }

    fn examples(&self) -> usize {
        self.ppo.prompts.len()
    }

    fn examples_per_step(&self) -> usize {
        self.ppo.section.rollout_batch_size
    }

    fn step(&mut self, at: &StepContext) -> Result<StepReport> {
        let section = self.ppo.section;
        let t = self.ppo.train;
        let value_lr = if t.lr > 0.0 { self.value_lr_base * at.lr / t.lr } else { self.value_lr_base };
        let report = self.ppo.iteration(
            at,
            &mut self.state,
            &mut self.policy_opt,
            &mut self.value_opt,
            value_lr,
            &mut self.samples,
        )?;
        if let Some(ctl) = self.controller.as_mut() {
            ctl.update(report.guard.kl, section.rollout_batch_size);
            self.state.kl_coef = ctl.coef;
        }
        let Value::Object(line) = report.line else { bail!("PPO metrics are not a JSON object") };
        let get = |k: &str| line.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let progress = format!(
            "score {:.3} kl {:.3} len {:.1} eos {:.2} · generation {:.1}s scoring {:.1}s forward {:.1}s optimisation {:.1}s · {:.0} rollout tok/s",
            get("objective/scores"),
            report.guard.kl,
            report.guard.mean_length,
            get("eos_rate"),
            get("time/generation"),
            get("time/scoring"),
            get("time/forward"),
            get("time/optimisation"),
            get("rollout_tokens_per_second")
        );
        let (loss, metrics) = loss_and_metrics(&line);
        let mut stop = None;
        if let Some(g) = check_guardrails(section, &mut self.state.guards, &report.guard) {
            if section.stop_on_guardrail {
                stop = Some(StopRequest { reason: format!("stopped by a guardrail: {g}"), fail: true });
            } else {
                tracing::warn!("{g}");
            }
        }
        Ok(StepReport {
            loss,
            metrics,
            examples: section.rollout_batch_size as u64,
            tokens: report.new_tokens as u64,
            applied: !report.any_skipped,
            progress,
            stop,
        })
    }

    fn optimizers(&self) -> Vec<(&'static str, &AdamW)> {
        vec![(POLICY_OPT, &self.policy_opt), (VALUE_OPT, &self.value_opt)]
    }

    fn optimizers_mut(&mut self) -> Vec<(&'static str, &mut AdamW)> {
        vec![(POLICY_OPT, &mut self.policy_opt), (VALUE_OPT, &mut self.value_opt)]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_models(dir, self.ppo.policy, self.ppo.value)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        self.ppo.policy.restore(dir).with_context(|| format!("{}: cannot restore the policy", dir.display()))?;
        let value_dir = dir.join(VALUE_DIR);
        self.ppo
            .value
            .restore(&value_dir)
            .with_context(|| format!("{}: cannot restore the value model", value_dir.display()))
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.state)?)
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        self.state = serde_json::from_value(state.clone())?;
        if let Some(ctl) = self.controller.as_mut() {
            ctl.coef = self.state.kl_coef;
        }
        Ok(())
    }
}

/// Runs (or resumes) the PPO stage described by `cfg`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: PpoSection = cfg.stage_section()?;
    let origin = cfg.origin.display();
    section.validate().map_err(|e| anyhow!("{origin}: [ppo] {e}"))?;
    let c = &cfg.config;
    let t = &c.train;
    let world = align_core::dist::world();
    let mini_batch = section.mini_batch_size.unwrap_or(section.rollout_batch_size).min(section.rollout_batch_size);
    for (key, n) in [("rollout_batch_size", section.rollout_batch_size), ("mini_batch_size", mini_batch)] {
        if n % world.size() != 0 {
            bail!(
                "{origin}: [ppo] {key} = {n}: must be a multiple of the {} ranks (each rank rolls out and updates on its share)",
                world.size()
            );
        }
    }
    if !c.val_data.is_empty() || t.val_ratio > 0.0 {
        tracing::warn!("{origin}: PPO does not evaluate on held-out prompts; val_data / train.val_ratio are ignored");
    }
    let max_prompt = match section.max_prompt_length {
        Some(n) => n,
        None => t.max_length.checked_sub(section.max_new_tokens).filter(|&n| n > 0).ok_or_else(|| {
            anyhow!(
                "{origin}: train.max_length ({}) leaves no room for prompts after [ppo] max_new_tokens ({}); set [ppo] max_prompt_length",
                t.max_length,
                section.max_new_tokens
            )
        })?,
    };
    let (device, kind) = training_device(cfg)?;

    let policy_dir = resolve_model_dir(&c.model)?;
    let reward_dir = resolve_model_dir(&section.reward_model)?;
    let reference = policy_reference(cfg, section.reference.as_deref(), device, kind)?;
    // a reward-model folder, or a LoRA reward model's adapter folder (merged into its base)
    let (reward, reward_tokenizer) = load_reward_model(cfg, &reward_dir, device, kind)?;
    let value = load_value_model(&section, &reward_dir, &policy_dir, t.seed, device, kind)?;
    value.loaded.rm.model.set_gradient_checkpointing(t.checkpoint_every());
    let policy = TrainingModel::load(cfg)?;
    let prompts = load_prompts(cfg, &policy.tokenizer, max_prompt)?;
    let window = max_prompt + section.max_new_tokens;
    if window as i64 > policy.loaded.lm.config.max_position_embeddings {
        tracing::warn!(
            "prompt budget {max_prompt} + max_new_tokens {} exceeds the policy's max_position_embeddings ({})",
            section.max_new_tokens,
            policy.loaded.lm.config.max_position_embeddings
        );
    }

    let ppo = Ppo {
        section: &section,
        train: t,
        policy: &policy,
        reference: &reference,
        reward: &reward,
        reward_tokenizer: &reward_tokenizer,
        value: &value,
        prompts: &prompts,
        stops: stop_token_ids(&policy.tokenizer, &policy.loaded.lm.config.eos_token_ids),
        pad_id: policy.tokenizer.padding_id(),
        mini_batch,
    };
    tracing::info!(
        "PPO: {} prompts × {} per iteration, {} epochs of minibatches of {}, max_new_tokens {}, kl_coef {}{}",
        prompts.len(),
        section.rollout_batch_size,
        section.ppo_epochs,
        ppo.mini_batch,
        section.max_new_tokens,
        section.kl_coef,
        section.target_kl.map_or(String::new(), |k| format!(" (adaptive, target {k})"))
    );
    let mut step = PpoStep {
        ppo,
        policy_opt: rank_optimizer(policy.trainable_params(), t, policy.lora_config())?,
        value_opt: rank_optimizer(value.trainable_params(), t, value.lora_config())?,
        state: PpoState { kl_coef: section.kl_coef, ..Default::default() },
        controller: section.target_kl.map(|target| AdaptiveKl {
            coef: section.kl_coef,
            target,
            horizon: section.kl_horizon,
        }),
        samples: SamplesLog::new(&c.output_dir, section.sample_every),
        value_lr_base: section.value_lr.unwrap_or(t.lr),
    };
    let run =
        TrainRun { settings: t, output_dir: &c.output_dir, fingerprint: &cfg.fingerprint()?, restart, stop_after };
    train(run, &mut step)
}
