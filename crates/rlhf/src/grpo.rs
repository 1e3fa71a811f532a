//! GRPO, RLOO and REINFORCE++ — one stage parameterised by its advantage estimator: each
//! iteration samples `num_generations` completions per prompt with the policy (batched KV-cache
//! generation), scores them with the configured rewards (reward model, rules, command), makes
//! group-relative advantages, and runs `num_iterations` passes of the clipped token-level
//! objective (no critic), the rollout log-probs as the old policy. One iteration is one step of
//! the core's training loop ([`GrpoStep`]), which owns checkpoints, exact resume, metrics and
//! the summary.
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tch::{Kind, Tensor};

use align_core::eval::answers::stop_token_ids;
use align_core::hf::checkpoint::resolve_model_dir;
use align_core::infer::generate::{Generation, SamplingConfig};
use align_core::infer::logprobs::HeadOptions;
use align_core::model::recompute;
use align_core::train::config::{LoadedConfig, TrainSection};
use align_core::train::optim::AdamW;
use align_core::train::setup::{training_device, TrainingModel};
use align_core::train::trainer::{
    clip_and_step, epoch_order, rank_optimizer, rank_share, step_seed, stream_indices, train, ModelState, StepContext,
    StepReport, TrainRun, TrainStep, TrainSummary,
};

use crate::grpo_config::GrpoSection;
use crate::grpo_loss::{
    aggregate_loss, group_advantages, masked_sum, policy_loss, std_unbiased, AdvantageEstimator, ImportanceLevel,
    LossNormaliser, LossType, PolicyLossParams, ScaleRewards,
};
use crate::reference::{policy_reference, Reference};
use crate::rewards::{load_reward_model, weighted_sum, Completion, RewardCommand, RewardFunctions};
use crate::rollout::{load_prompts, loss_and_metrics, sample_responses, ChunkSeeds, Prompt, RolloutBatch, SamplesLog};

/// The stage's own part of every checkpoint's state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
struct GrpoState {
    /// Groups left out by dynamic sampling so far.
    dropped_groups: u64,
}

/// The loaded models and settings of a run.
struct Grpo<'a> {
    section: &'a GrpoSection,
    train: &'a TrainSection,
    estimator: AdvantageEstimator,
    params: PolicyLossParams,
    beta: f64,
    policy: &'a TrainingModel,
    reference: Option<&'a Reference>,
    rewards: &'a RewardFunctions,
    prompts: &'a [Prompt],
    stops: Vec<i64>,
    pad_id: i64,
    mini_batch: usize,
}

fn host(t: &Tensor) -> Result<f64> {
    Ok(t.f_to_kind(Kind::Double)?.f_double_value(&[])?)
}

fn index(rows: &[usize], device: tch::Device) -> Result<Tensor> {
    Ok(Tensor::from_slice(&rows.iter().map(|&r| r as i64).collect::<Vec<_>>()).f_to_device(device)?)
}

/// What advantages and metrics need of every completion of the iteration, over all ranks in
/// rank order (this rank's own in a world of one).
struct GlobalRows {
    rewards: Vec<f64>,
    /// Each completion's summed log-ratio to the reference (0 when not penalised).
    kl: Vec<f64>,
    lengths: Vec<f64>,
    stopped: Vec<bool>,
    /// Per reward function, its scores.
    per_function: Vec<Vec<f64>>,
}

/// Gathers this rank's rewards, KL, lengths, eos flags and per-function scores from every rank
/// (one collective of a few numbers per completion).
fn gather_rows(
    rewards: &[f64],
    kl: &[f64],
    generations: &[Generation],
    per_function: &[Vec<f64>],
) -> Result<GlobalRows> {
    let width = 4 + per_function.len();
    let mut local = Vec::with_capacity(rewards.len() * width);
    for (i, gen) in generations.iter().enumerate() {
        local.extend([rewards[i], kl[i], gen.tokens.len() as f64, f64::from(u8::from(gen.stopped_on_eos))]);
        local.extend(per_function.iter().map(|f| f[i]));
    }
    let all = align_core::dist::world().gather_f64(&local)?;
    let column = |c: usize| -> Vec<f64> { all.chunks(width).map(|row| row[c]).collect() };
    Ok(GlobalRows {
        rewards: column(0),
        kl: column(1),
        lengths: column(2),
        stopped: column(3).into_iter().map(|x| x > 0.5).collect(),
        per_function: (0..per_function.len()).map(|f| column(4 + f)).collect(),
    })
}

/// Sums of what the updates measured, for the iteration's metrics.
#[derive(Default)]
struct UpdateSums {
    tokens: f64,
    sequences: f64,
    kl: f64,
    low: f64,
    high: f64,
    region: f64,
    entropy: f64,
    entropy_tokens: f64,
    loss: f64,
    grad_norm: f64,
    updates: f64,
    skipped: u64,
}

struct IterationReport {
    line: Map<String, Value>,
    applied: bool,
    new_tokens: usize,
    reward: f64,
}

impl Grpo<'_> {
    fn head(&self, entropy: bool) -> HeadOptions {
        HeadOptions { temperature: self.section.temperature, chunk_tokens: self.train.loss_chunk_tokens, entropy }
    }

    /// Old log-probs are needed when the policy moves between the rollout and an update
    /// (several passes or minibatches of the iteration's `rows` completions over all ranks);
    /// otherwise the ratio is 1 and TRL uses the detached current log-probs.
    fn needs_old_logprobs(&self, rows: usize) -> bool {
        self.section.num_iterations > 1
            || self.mini_batch < rows
            || self.estimator != AdvantageEstimator::Grpo && self.beta != 0.0
    }

    fn iteration(
        &self,
        at: &StepContext,
        state: &mut GrpoState,
        opt: &mut AdamW,
        samples: &mut SamplesLog,
    ) -> Result<IterationReport> {
        let s = self.section;
        let g = s.num_generations;
        let lm = &self.policy.loaded.lm;
        let device = lm.device();
        let started = Instant::now();
        // every rank draws the same prompts and generates the whole groups of its share of them
        let world = align_core::dist::world();
        let n_prompts = s.generation_batch_size / g;
        let picked = stream_indices(self.prompts.len(), self.train.seed, at.examples_consumed, n_prompts);
        let rows: Vec<usize> = rank_share(&picked).iter().flat_map(|&p| std::iter::repeat(p).take(g)).collect();
        let prompt_ids: Vec<Vec<i64>> = rows.iter().map(|&i| self.prompts[i].ids.clone()).collect();
        let n = rows.len();
        let global_rows = s.generation_batch_size;
        let offset = world.rank() * n;

        // 1. completions
        let sampling = SamplingConfig {
            max_new_tokens: s.max_completion_length,
            temperature: s.temperature,
            top_k: s.top_k,
            top_p: Some(s.top_p),
            repetition_penalty: None,
        };
        let chunk = s.generation_chunk_size.unwrap_or(s.generation_batch_size);
        let seeds = ChunkSeeds { base: step_seed(self.train.seed, at.step), first_row: offset };
        let (generations, generation_seconds) =
            sample_responses(lm, &prompt_ids, &sampling, &self.stops, self.pad_id, chunk, Some(seeds))?;

        // 2. rewards
        let t = Instant::now();
        let tok = &self.policy.tokenizer;
        let texts: Vec<String> = generations.iter().map(|g| tok.decode(&g.tokens, true)).collect::<Result<_>>()?;
        let completions: Vec<Completion> = rows
            .iter()
            .zip(&texts)
            .zip(&generations)
            .map(|((&i, text), gen)| {
                let p = &self.prompts[i];
                Completion {
                    messages: &p.messages,
                    prompt_text: &p.text,
                    text,
                    tokens: gen.tokens.len(),
                    reference: p.reference.as_deref(),
                }
            })
            .collect();
        let per_function = self.rewards.score(&completions, self.train.batch_size)?;
        let names = self.rewards.names();
        let weights: Vec<f64> = names.iter().map(|(_, w)| *w).collect();
        let rewards = weighted_sum(&per_function, &weights);
        let scoring_seconds = t.elapsed().as_secs_f64();

        // 3. old and reference log-probs (no gradients)
        let t = Instant::now();
        let batch = RolloutBatch::new(&prompt_ids, &generations, self.pad_id, device)?;
        let per_pass = self.train.batch_size;
        let old = if self.needs_old_logprobs(global_rows) {
            Some(tch::no_grad(|| batch.per_pass(per_pass, |b| b.response_logprobs(lm, self.head(false))))?)
        } else {
            None
        };
        let reference = match (self.reference, self.beta != 0.0) {
            (Some(r), true) => Some(tch::no_grad(|| {
                batch.per_pass(per_pass, |b| {
                    r.run(lm, |m| b.response_logprobs(m, self.head(false)))?
                        .ok_or_else(|| anyhow!("no reference model"))
                })
            })?),
            _ => None,
        };
        let forward_seconds = t.elapsed().as_secs_f64();

        // 4. advantages (RLOO / REINFORCE++ take the KL as a reward penalty, as TRL's RLOO)
        // (over the global batch: every rank gathers the rewards, lengths and KL of all of
        // them and computes the same advantages, which is exact for every estimator)
        let mask = &batch.response_mask;
        let kl_penalised = matches!(
            (self.estimator, &old, &reference),
            (AdvantageEstimator::Rloo | AdvantageEstimator::ReinforcePp, Some(_), Some(_))
        );
        let kl: Vec<f64> = match (kl_penalised, &old, &reference) {
            (true, Some(old), Some(r)) => Vec::try_from(
                old.f_sub(r)?.f_mul(mask)?.f_sum_dim_intlist(1, false, Kind::Double)?.f_to_device(tch::Device::Cpu)?,
            )?,
            _ => vec![0.0; n],
        };
        let all = gather_rows(&rewards, &kl, &generations, &per_function)?;
        let shaped: Vec<f64> = if kl_penalised {
            all.rewards.iter().zip(&all.kl).map(|(r, k)| r - self.beta * k).collect()
        } else {
            all.rewards.clone()
        };
        let sequence_kl = kl_penalised.then(|| all.kl.iter().sum::<f64>() / global_rows as f64);
        let finite = shaped.iter().all(|x| x.is_finite());
        let scale = s.scale_rewards.unwrap_or_default();
        let adv = if finite {
            Some(group_advantages(&shaped, g, self.estimator, scale, s.normalize(self.estimator))?)
        } else {
            tracing::warn!("iteration {}: non-finite rewards; the update is skipped", at.step + 1);
            None
        };

        // 5. which completions train (global rows): dynamic sampling drops groups of equal rewards
        let mut keep: Vec<usize> = (0..global_rows).collect();
        let mut dropped = 0usize;
        if let (true, Some(a)) = (s.dynamic_sampling, &adv) {
            keep.retain(|&i| !a.zero_std[i / g]);
            dropped = a.zero_std.iter().filter(|z| **z).count();
            state.dropped_groups += dropped as u64;
        }
        let mut loss_mask = mask.shallow_clone();
        if s.mask_truncated_completions {
            let stopped: Vec<f32> = generations.iter().map(|g| if g.stopped_on_eos { 1.0 } else { 0.0 }).collect();
            loss_mask = loss_mask.f_mul(&Tensor::from_slice(&stopped).f_to_device(device)?.f_unsqueeze(1)?)?;
        }

        // 6. num_iterations passes of minibatch updates
        let t = Instant::now();
        let mut sums = UpdateSums::default();
        if let Some(a) = adv.as_ref().filter(|_| !keep.is_empty()) {
            let advantages =
                Tensor::from_slice(&a.advantages[offset..offset + n]).f_to_device(device)?.f_to_kind(Kind::Float)?;
            self.optimise(
                &batch,
                &loss_mask,
                old.as_ref(),
                reference.as_ref(),
                &advantages,
                (&keep, offset),
                at,
                opt,
                &mut sums,
            )?;
        }
        let optimisation_seconds = t.elapsed().as_secs_f64();

        // metrics (TRL's names), over the completions of every rank
        let rows_f = global_rows as f64;
        let rewards = &all.rewards;
        let mut line = Map::new();
        let mut put = |k: &str, v: f64| {
            line.insert(k.to_string(), json!(v));
        };
        let reward_mean = rewards.iter().sum::<f64>() / rows_f;
        put("reward", reward_mean);
        put("reward_std", std_unbiased(rewards));
        let zero_frac = match (&adv, scale, self.estimator) {
            (Some(_), ScaleRewards::Batch, AdvantageEstimator::Grpo) => {
                if std_unbiased(rewards).abs() <= 1e-8 {
                    1.0
                } else {
                    0.0
                }
            }
            (Some(a), _, _) => a.zero_std.iter().filter(|z| **z).count() as f64 / a.zero_std.len() as f64,
            (None, _, _) => f64::NAN,
        };
        put("frac_reward_zero_std", zero_frac);
        for ((name, _), values) in names.iter().zip(&all.per_function) {
            put(&format!("rewards/{name}/mean"), values.iter().sum::<f64>() / rows_f);
            put(&format!("rewards/{name}/std"), std_unbiased(values));
        }
        let lengths = &all.lengths;
        put("completions/mean_length", lengths.iter().sum::<f64>() / rows_f);
        put("completions/min_length", lengths.iter().cloned().fold(f64::INFINITY, f64::min));
        put("completions/max_length", lengths.iter().cloned().fold(0.0, f64::max));
        let truncated = all.stopped.iter().filter(|s| !**s).count() as f64;
        put("completions/clipped_ratio", truncated / rows_f);
        let terminated: Vec<f64> = lengths.iter().zip(&all.stopped).filter(|(_, s)| **s).map(|(l, _)| *l).collect();
        put(
            "completions/mean_terminated_length",
            if terminated.is_empty() { 0.0 } else { terminated.iter().sum::<f64>() / terminated.len() as f64 },
        );
        if self.beta != 0.0 {
            // GRPO: the k3 estimate per token in the loss; RLOO / REINFORCE++: the k1 sum per sequence
            put("kl", sequence_kl.unwrap_or(sums.kl / sums.tokens.max(1.0)));
        }
        if sums.updates > 0.0 {
            put("entropy", sums.entropy / sums.entropy_tokens.max(1.0));
            let denom =
                if s.importance_sampling_level == ImportanceLevel::Sequence { sums.sequences } else { sums.tokens };
            if s.loss_type == LossType::Cispo {
                put("cispo_clip_ratio", sums.high / denom.max(1.0));
            } else {
                put("clip_ratio/low_mean", sums.low / denom.max(1.0));
                put("clip_ratio/high_mean", sums.high / denom.max(1.0));
                put("clip_ratio/region_mean", sums.region / denom.max(1.0));
            }
            put("loss", sums.loss / sums.updates);
            put("grad_norm", sums.grad_norm / sums.updates);
        }
        if s.dynamic_sampling {
            put("dynamic_sampling/dropped_groups", dropped as f64);
        }
        put("skipped_updates", sums.skipped as f64);
        let total = started.elapsed().as_secs_f64();
        put("time/generation", generation_seconds);
        put("time/scoring", scoring_seconds);
        put("time/forward", forward_seconds);
        put("time/optimisation", optimisation_seconds);
        put("time/iteration", total);
        let new_tokens = lengths.iter().sum::<f64>() as usize;
        put("rollout_tokens_per_second", new_tokens as f64 / generation_seconds.max(1e-9));

        // rank 0 writes the samples, from its own share of the completions
        let due = if world.is_main() { samples.due(at.step, s.sample_every)? } else { None };
        if let Some(log) = due {
            for k in 0..s.num_samples.min(n) {
                let p = &self.prompts[rows[k]];
                let mut line = json!({
                    "step": at.step + 1,
                    "prompt": p.text,
                    "completion": texts[k],
                    "reference": p.reference,
                    "reward": rewards[k],
                    "advantage": adv.as_ref().map(|a| a.advantages[k]),
                    "stopped_on_eos": generations[k].stopped_on_eos,
                });
                for ((name, _), values) in names.iter().zip(&per_function) {
                    line[format!("rewards/{name}")] = json!(values[k]);
                }
                log.write(&line)?;
            }
        }
        // an iteration whose groups dynamic sampling all dropped has nothing to learn, which is
        // not a failed update
        let applied = adv.is_some() && sums.skipped == 0;
        Ok(IterationReport { line, applied, new_tokens, reward: reward_mean })
    }

    /// `num_iterations` passes over the kept completions in shuffled minibatches of
    /// `mini_batch_size`, each one optimizer step (micro-batches of `train.batch_size` rows
    /// accumulate into it).
    ///
    /// Data parallel: `keep` and the minibatches are global rows (the same shuffle on every
    /// rank), and each rank computes the loss of the rows it generated (`offset ..` its share),
    /// normalised by the counts of the whole minibatch; the gradients are summed over the
    /// ranks, so a minibatch's step is the one-process step on the global batch. Per
    /// `loss_type`: grpo divides the sequences' token means by the minibatch's sequences;
    /// dapo / cispo divide by its tokens over all ranks; dr_grpo by its sequences ×
    /// `max_completion_length`. TRL 1.16 does the same under DDP for these (grpo, dr_grpo per
    /// local micro-batch, which DDP's gradient mean turns into the global mean when the
    /// micro-batches are of equal size; dapo by the global tokens / processes). bnpo is each
    /// micro-batch's token mean divided by the micro-batches of all ranks, as TRL's local-batch
    /// mean averaged by DDP: it equals one process's only when the micro-batches hold the same
    /// rows.
    #[allow(clippy::too_many_arguments)]
    fn optimise(
        &self,
        batch: &RolloutBatch,
        loss_mask: &Tensor,
        old: Option<&Tensor>,
        reference: Option<&Tensor>,
        advantages: &Tensor,
        (keep, offset): (&[usize], usize),
        at: &StepContext,
        opt: &mut AdamW,
        sums: &mut UpdateSums,
    ) -> Result<()> {
        let s = self.section;
        let lm = &self.policy.loaded.lm;
        let device = lm.device();
        let per_pass = self.train.batch_size.max(1);
        let world = align_core::dist::world();
        let local = offset..offset + loss_mask.size()[0] as usize;
        let order_seed = self.train.seed ^ (at.step.wrapping_add(1)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for pass in 0..s.num_iterations as u64 {
            let order: Vec<usize> = epoch_order(keep.len(), order_seed, pass).into_iter().map(|i| keep[i]).collect();
            for global_mb in order.chunks(self.mini_batch) {
                // this rank's rows of the minibatch, as rows of its rollouts
                let mb: Vec<usize> = global_mb.iter().filter(|r| local.contains(r)).map(|r| r - offset).collect();
                let mut counts = [
                    if mb.is_empty() {
                        0.0
                    } else {
                        host(&loss_mask.f_index_select(0, &index(&mb, device)?)?.f_sum(Kind::Double)?)?
                    },
                    mb.chunks(per_pass).count() as f64,
                ];
                world.sum_f64(&mut counts)?;
                let norm = LossNormaliser {
                    sequences: global_mb.len() as f64,
                    tokens: counts[0],
                    micro_batches: counts[1],
                    max_completion_length: s.max_completion_length as f64,
                };
                let mut step_loss = 0f64;
                let mut mb_sums = UpdateSums::default();
                for micro in mb.chunks(per_pass) {
                    let idx = index(micro, device)?;
                    let pick = |t: &Tensor| t.f_index_select(0, &idx);
                    let sub = batch.rows(micro)?;
                    let m = pick(loss_mask)?;
                    let scores = sub.response_scores(lm, self.head(pass == 0))?;
                    let logps = scores.logprobs;
                    let old_logps = match old {
                        Some(o) => pick(o)?,
                        None => logps.f_detach()?,
                    };
                    let ref_logps = reference.map(pick).transpose()?;
                    let out =
                        policy_loss(&logps, &old_logps, ref_logps.as_ref(), &pick(advantages)?, &m, &self.params)?;
                    let loss = aggregate_loss(&out.per_token_loss, &m, self.params.loss_type, &norm)?;
                    recompute::backward(&loss)?;
                    let _guard = tch::no_grad_guard();
                    step_loss += host(&loss)?;
                    let tokens = host(&m.f_sum(Kind::Double)?)?;
                    mb_sums.tokens += tokens;
                    mb_sums.sequences += micro.len() as f64;
                    if let Some(kl) = &out.kl {
                        mb_sums.kl += masked_sum(kl, &m)?;
                    }
                    let (low, high, region) = if self.params.level == ImportanceLevel::Sequence {
                        let sum = |x: &Tensor| host(&x.f_sum(Kind::Double)?);
                        (sum(&out.low_clipped)?, sum(&out.high_clipped)?, sum(&out.region_clipped)?)
                    } else {
                        (
                            masked_sum(&out.low_clipped, &m)?,
                            masked_sum(&out.high_clipped, &m)?,
                            masked_sum(&out.region_clipped, &m)?,
                        )
                    };
                    // CISPO counts weights capped at epsilon_high where A > 0
                    let high = if self.params.loss_type == LossType::Cispo {
                        let capped = out
                            .ratio
                            .f_gt(self.params.epsilon_high)?
                            .f_logical_and(&pick(advantages)?.f_unsqueeze(1)?.f_gt(0.0)?)?;
                        if self.params.level == ImportanceLevel::Sequence {
                            host(&capped.f_sum(Kind::Double)?)?
                        } else {
                            masked_sum(&capped, &m)?
                        }
                    } else {
                        high
                    };
                    mb_sums.low += low;
                    mb_sums.high += high;
                    mb_sums.region += region;
                    if let Some(e) = &scores.entropy {
                        mb_sums.entropy += masked_sum(e, &sub.response_mask)?;
                        mb_sums.entropy_tokens += host(&sub.response_mask.f_sum(Kind::Double)?)?;
                    }
                }
                opt.reduce_grads()?;
                let mut reduced = [
                    step_loss,
                    mb_sums.tokens,
                    mb_sums.sequences,
                    mb_sums.kl,
                    mb_sums.low,
                    mb_sums.high,
                    mb_sums.region,
                    mb_sums.entropy,
                    mb_sums.entropy_tokens,
                ];
                world.sum_f64(&mut reduced)?;
                let [step_loss, tokens, sequences, kl, low, high, region, entropy, entropy_tokens] = reduced;
                let mb_sums = UpdateSums {
                    tokens,
                    sequences,
                    kl,
                    low,
                    high,
                    region,
                    entropy,
                    entropy_tokens,
                    ..UpdateSums::default()
                };
                let grad_norm = opt.grad_norm()?;
                if step_loss.is_finite() && grad_norm.is_finite() {
                    clip_and_step(opt, grad_norm, self.train.max_grad_norm, at.lr)?;
                    sums.updates += 1.0;
                    sums.loss += step_loss;
                    sums.grad_norm += grad_norm;
                    sums.tokens += mb_sums.tokens;
                    sums.sequences += mb_sums.sequences;
                    sums.kl += mb_sums.kl;
                    sums.low += mb_sums.low;
                    sums.high += mb_sums.high;
                    sums.region += mb_sums.region;
                    sums.entropy += mb_sums.entropy;
                    sums.entropy_tokens += mb_sums.entropy_tokens;
                } else {
                    sums.skipped += 1;
                    tracing::warn!(
                        "iteration {}: non-finite loss {step_loss} or gradient norm {grad_norm}; update skipped",
                        at.step + 1
                    );
                }
                opt.zero_grad();
            }
        }
        Ok(())
    }
}

const POLICY_OPT: &str = "policy_optimizer";

/// One GRPO / RLOO / REINFORCE++ iteration as a step of the core's training loop.
struct GrpoStep<'a> {
    grpo: Grpo<'a>,
    opt: AdamW,
    state: GrpoState,
    samples: SamplesLog,
}

impl TrainStep for GrpoStep<'_> {
    fn unit(&self) -> &'static str {
        "iteration"
    }

    fn examples(&self) -> usize {
        self.grpo.prompts.len()
    }

    fn examples_per_step(&self) -> usize {
        self.grpo.section.generation_batch_size / self.grpo.section.num_generations
    }

    fn step(&mut self, at: &StepContext) -> Result<StepReport> {
        let r = self.grpo.iteration(at, &mut self.state, &mut self.opt, &mut self.samples)?;
        let get = |k: &str| r.line.get(k).and_then(Value::as_f64).unwrap_or(f64::NAN);
        let progress = format!(
            "reward {:.3} (std {:.3}, zero-std groups {:.2}) len {:.1} · generation {:.1}s scoring {:.1}s optimisation {:.1}s",
            r.reward,
            get("reward_std"),
            get("frac_reward_zero_std"),
            get("completions/mean_length"),
            get("time/generation"),
            get("time/scoring"),
            get("time/optimisation"),
        );
        let (loss, metrics) = loss_and_metrics(&r.line);
        Ok(StepReport {
            loss,
            metrics,
            examples: self.examples_per_step() as u64,
            tokens: r.new_tokens as u64,
            applied: r.applied,
            progress,
            stop: None,
        })
    }

    fn optimizers(&self) -> Vec<(&'static str, &AdamW)> {
        vec![(POLICY_OPT, &self.opt)]
    }

    fn optimizers_mut(&mut self) -> Vec<(&'static str, &mut AdamW)> {
        vec![(POLICY_OPT, &mut self.opt)]
    }

    fn save(&self, dir: &Path) -> Result<()> {
        self.grpo.policy.save(dir)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        self.grpo.policy.restore(dir).with_context(|| format!("{}: cannot restore the policy", dir.display()))
    }

    fn state(&self) -> Result<Value> {
        Ok(serde_json::to_value(&self.state)?)
    }

    fn load_state(&mut self, state: &Value) -> Result<()> {
        self.state = serde_json::from_value(state.clone()).context("the GRPO state of the checkpoint")?;
        Ok(())
    }

    fn memory_plan(&self) -> Result<Option<align_core::train::plan::MemoryPlan>> {
        Ok(None)
    }
}

/// The estimator of a stage kind's section name (`grpo`, `rloo`, `reinforce_pp`).
pub fn estimator_of(stage: &str) -> Result<AdvantageEstimator> {
    Ok(match stage {
        "grpo" => AdvantageEstimator::Grpo,
        "rloo" => AdvantageEstimator::Rloo,
        "reinforce_pp" => AdvantageEstimator::ReinforcePp,
        other => bail!("'{other}' is not a GRPO-family stage (grpo, rloo, reinforce_pp)"),
    })
}

/// Parses and checks the stage's section (`[grpo]`, `[rloo]` or `[reinforce_pp]`).
pub fn section_of(cfg: &LoadedConfig) -> Result<(GrpoSection, AdvantageEstimator)> {
    let estimator = estimator_of(&cfg.stage_name)?;
    let section: GrpoSection = cfg.stage_section()?;
    section.validate(estimator).map_err(|e| anyhow!("{}: [{}] {e}", cfg.origin.display(), cfg.stage_name))?;
    Ok((section, estimator))
}

/// Runs (or resumes) the GRPO, RLOO or REINFORCE++ stage described by `cfg` (its section name
/// picks the advantage estimator).
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let (section, estimator) = section_of(cfg)?;
    let name = cfg.stage_name.clone();
    let origin = cfg.origin.display();
    let c = &cfg.config;
    let t = &c.train;
    let world = align_core::dist::world();
    let per_iteration = section.generation_batch_size / section.num_generations;
    if per_iteration % world.size() != 0 {
        bail!(
            "{origin}: [{name}] generation_batch_size = {}: must be a multiple of num_generations ({}) × the {} ranks (each rank generates and scores whole groups of its share of the prompts)",
            section.generation_batch_size,
            section.num_generations,
            world.size()
        );
    }
    if !c.val_data.is_empty() || t.val_ratio > 0.0 {
        tracing::warn!(
            "{origin}: {name} does not evaluate on held-out prompts; val_data / train.val_ratio are ignored"
        );
    }
    let max_prompt = match section.max_prompt_length {
        Some(n) => n,
        None => t.max_length.checked_sub(section.max_completion_length).filter(|&n| n > 0).ok_or_else(|| {
            anyhow!(
                "{origin}: train.max_length ({}) leaves no room for prompts after [{name}] max_completion_length ({}); set [{name}] max_prompt_length",
                t.max_length,
                section.max_completion_length
            )
        })?,
    };
    let (device, kind) = training_device(cfg)?;
    let rules = section
        .rewards
        .iter()
        .enumerate()
        .map(|(i, r)| r.compile(&format!("{origin}: [{name}] rewards[{i}]"), section.max_completion_length))
        .collect::<Result<Vec<_>>>()?;
    let model = match &section.reward_model {
        Some(dir) => {
            let (rm, tok) = load_reward_model(cfg, &resolve_model_dir(dir)?, device, kind)?;
            Some((rm, tok, section.reward_model_weight.unwrap_or(1.0)))
        }
        None => None,
    };
    let command = section.reward_command.as_ref().map(|cmd| {
        let timeout = Duration::from_secs_f64(section.command_timeout());
        (RewardCommand { command: cmd.clone(), timeout }, section.reward_command_weight.unwrap_or(1.0))
    });
    let rewards = RewardFunctions { rules, model, command };
    let mut seen = std::collections::BTreeSet::new();
    for (n, _) in rewards.names() {
        if !seen.insert(n.clone()) {
            bail!("{origin}: [{name}] rewards: two rewards are named '{n}' (give one a name = \"…\")");
        }
    }
    let beta = section.beta(estimator);
    let reference =
        if beta != 0.0 { Some(policy_reference(cfg, section.reference.as_deref(), device, kind)?) } else { None };
    let policy = TrainingModel::load(cfg)?;
    let prompts = load_prompts(cfg, &policy.tokenizer, max_prompt)?;
    if rewards.rules.iter().any(|r| r.rule.needs_reference()) {
        if let Some(p) = prompts.iter().find(|p| p.reference.is_none()) {
            bail!(
                "{}: the record has no reference answer, which the accuracy reward of [{name}] needs (question/answer, prompt with answer/solution, or messages with solution/answer)",
                p.origin
            );
        }
    }
    let window = max_prompt + section.max_completion_length;
    if window as i64 > policy.loaded.lm.config.max_position_embeddings {
        tracing::warn!(
            "prompt budget {max_prompt} + max_completion_length {} exceeds the policy's max_position_embeddings ({})",
            section.max_completion_length,
            policy.loaded.lm.config.max_position_embeddings
        );
    }
    let params = section.loss_params(estimator);
    let grpo = Grpo {
        section: &section,
        train: t,
        estimator,
        params,
        beta,
        policy: &policy,
        reference: reference.as_ref(),
        rewards: &rewards,
        prompts: &prompts,
        stops: stop_token_ids(&policy.tokenizer, &policy.loaded.lm.config.eos_token_ids),
        pad_id: policy.tokenizer.padding_id(),
        mini_batch: section.mini_batch_size.unwrap_or(section.generation_batch_size).min(section.generation_batch_size),
    };
    tracing::info!(
        "{name}: {} prompts, {} per iteration × {} completions, {} pass(es) in minibatches of {}, loss_type {:?}, beta {beta}, rewards {:?}",
        prompts.len(),
        section.generation_batch_size / section.num_generations,
        section.num_generations,
        section.num_iterations,
        grpo.mini_batch,
        section.loss_type,
        rewards.names()
    );
    let mut step = GrpoStep {
        grpo,
        opt: rank_optimizer(policy.trainable_params(), t, policy.lora_config())?,
        state: GrpoState::default(),
        samples: SamplesLog::new(&c.output_dir, section.sample_every),
    };
    let run =
        TrainRun { settings: t, output_dir: &c.output_dir, fingerprint: &cfg.fingerprint()?, restart, stop_after };
    train(run, &mut step)
}
