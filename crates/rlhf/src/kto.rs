//! KTO stage: unpaired desirable/undesirable completions (or preference pairs split into both);
//! each example is scored with its own completion and with a mismatched one (the KL completion,
//! another example's completion after the same prompt), under the policy and the reference → the
//! KTO loss.
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use tch::{Kind, Tensor};

use align_core::data::{read_unpaired, DataOptions, LengthBudget, PreferencePair, UnpairedExample};
use align_core::model::decoder::CausalLm;
use align_core::text::conversation::LabeledTokens;
use align_core::train::config::LoadedConfig;
use align_core::train::lm_objective::pad_batch;
use align_core::train::preference_batch::{encode_pairs, read_splits, EncodedPair, PairSplits};
use align_core::train::setup::{training_spec, TrainingModel};
use align_core::train::trainer::{MicroBatch, Objective, Split, TrainSummary};

use crate::kto_loss::{kto_loss, KtoLogps, KtoLossParams};
use crate::reference::{pair_reference, sequence_logps, Reference};

fn d_beta() -> f64 {
    0.1
}
fn d_weight() -> f64 {
    1.0
}

/// `[kto]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KtoSection {
    /// β: how far the policy may move from the reference.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Weight of a desirable example's loss (λ_D).
    #[serde(default = "d_weight")]
    pub desirable_weight: f64,
    /// Weight of an undesirable example's loss (λ_U).
    #[serde(default = "d_weight")]
    pub undesirable_weight: f64,
    /// Compute the reference log-probs once before training and cache them in `output_dir`.
    #[serde(default)]
    pub precompute_ref: bool,
    /// Reference model folder (default: `model`, the initial policy).
    #[serde(default)]
    pub reference: Option<String>,
}

impl KtoSection {
    pub fn params(&self) -> KtoLossParams {
        KtoLossParams {
            beta: self.beta,
            desirable_weight: self.desirable_weight,
            undesirable_weight: self.undesirable_weight,
        }
    }
}

/// The KL partner of each of `n` examples, as TRL's KTO dataset builds it: in consecutive
/// groups of `group` examples, example `j` takes the completion of example `j − 1` of its group
/// and the first the last one's ((x₁, yₙ), (x₂, y₁), …, (xₙ, yₙ₋₁)).
pub fn kl_partners(n: usize, group: usize) -> Vec<usize> {
    let group = group.max(1);
    (0..n)
        .map(|i| {
            let start = i / group * group;
            let size = group.min(n - start);
            start + (i - start + size - 1) % size
        })
        .collect()
}

/// Examples as tokens: each an [`EncodedPair`] of (prompt + completion, prompt + KL completion),
/// so the pair machinery (batches, log-prob sums, the reference cache) serves KTO unchanged.
#[derive(Debug, Clone, Default)]
pub struct KtoSplits {
    pub sequences: PairSplits,
    pub train_desirable: Vec<bool>,
    pub validation_desirable: Vec<bool>,
}

impl KtoSplits {
    fn desirable(&self, split: Split) -> &[bool] {
        match split {
            Split::Train => &self.train_desirable,
            Split::Validation => &self.validation_desirable,
        }
    }
}

/// Encodes examples with their KL partners ([`kl_partners`] in groups of `group`); an example
/// whose completion or KL completion has no token left after the length budget is dropped.
/// Returns the encoded examples, their labels and how many were dropped or truncated.
pub fn encode_examples(
    tok: &align_core::text::tokenizer::ModelTokenizer,
    examples: &[UnpairedExample],
    group: usize,
    budget: LengthBudget,
) -> Result<(Vec<EncodedPair>, Vec<bool>, usize, usize)> {
    let partners = kl_partners(examples.len(), group);
    let (mut encoded, mut labels, mut dropped, mut truncated) = (Vec::new(), Vec::new(), 0, 0);
    for (e, &p) in examples.iter().zip(&partners) {
        let pair = PreferencePair {
            prompt: e.prompt.clone(),
            chosen: e.completion.clone(),
            rejected: examples[p].completion.clone(),
            origin: e.origin.clone(),
        };
        let (mut enc, counts) = encode_pairs(tok, &[&pair], budget)?;
        dropped += counts.dropped;
        truncated += counts.truncated;
        if let Some(enc) = enc.pop() {
            encoded.push(enc);
            labels.push(e.label);
        }
    }
    Ok((encoded, labels, dropped, truncated))
}

/// The KTO objective; one loss unit per example. Metrics carry TRL's names: `rewards/chosen`
/// and `logps/chosen` are means over the desirable examples, `…/rejected` over the undesirable
/// ones, `kl` (z0) and `rewards/margins` means over the micro-batches (that have both kinds).
pub struct KtoObjective<'a> {
    pub policy: &'a CausalLm,
    pub reference: &'a Reference,
    pub data: KtoSplits,
    pub params: KtoLossParams,
    pub pad_id: i64,
    /// `train.loss_chunk_tokens`: the LM head in chunks of this many tokens (0 = at once).
    pub chunk_tokens: usize,
}

impl Objective for KtoObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.data.sequences.get(split).len()
    }

    fn units(&self, _split: Split, _example: usize) -> f64 {
        1.0
    }

    /// The policy scores the completions with gradients and the KL completions without (z0 is
    /// detached), as TRL does; the reference scores both alike.
    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let device = self.policy.device();
        let pairs: Vec<&EncodedPair> = examples.iter().map(|&e| &self.data.sequences.get(split)[e]).collect();
        let tokens = pairs.iter().map(|p| p.tokens()).sum();
        let completions: Vec<&LabeledTokens> = pairs.iter().map(|p| &p.chosen).collect();
        let kl_completions: Vec<&LabeledTokens> = pairs.iter().map(|p| &p.rejected).collect();
        let (ids, labels) = pad_batch(&completions, self.pad_id, device)?;
        let (kl_ids, kl_labels) = pad_batch(&kl_completions, self.pad_id, device)?;
        let chunk = self.chunk_tokens;
        let score = |lm: &CausalLm, ids: &Tensor, labels: &Tensor| -> Result<Tensor> {
            Ok(sequence_logps(lm, ids, labels, chunk)?.0)
        };
        let policy_logps = score(self.policy, &ids, &labels)?;
        let policy_kl_logps = tch::no_grad(|| score(self.policy, &kl_ids, &kl_labels))?;
        let (ref_logps, ref_kl_logps) = match self.reference {
            Reference::Cached(r) => r.select(split, examples, device)?,
            other => other
                .run(self.policy, |lm| Ok((score(lm, &ids, &labels)?, score(lm, &kl_ids, &kl_labels)?)))?
                .ok_or_else(|| anyhow!("KTO needs a reference"))?,
        };
        let labels: Vec<bool> = examples.iter().map(|&e| self.data.desirable(split)[e]).collect();
        let desirable = Tensor::from_slice(&labels).f_to_device(device)?;
        // z0 over the micro-batches of every rank (each rank runs the same number of training
        // micro-batches in step); evaluation shards its chunks unevenly, so its z0 stays per
        // chunk, as one process's
        let world = align_core::dist::world();
        let kl_mean = if split == Split::Train && world.size() > 1 {
            let log_ratio = policy_kl_logps.f_sub(&ref_kl_logps)?.f_sum(Kind::Double)?.f_double_value(&[])?;
            let mut sums = [log_ratio, examples.len() as f64];
            world.sum_f64(&mut sums)?;
            Some(sums[0] / sums[1].max(1.0))
        } else {
            None
        };
        let out = kto_loss(
            &KtoLogps {
                policy_logps: &policy_logps,
                ref_logps: &ref_logps,
                policy_kl_logps: &policy_kl_logps,
                ref_kl_logps: &ref_kl_logps,
                desirable: &desirable,
            },
            &self.params,
            kl_mean,
        )?;
        let n_chosen = labels.iter().filter(|&&l| l).count() as f64;
        let n_rejected = labels.len() as f64 - n_chosen;
        let undesirable = desirable.f_logical_not()?;
        let sum_where = |t: &Tensor, mask: &Tensor| -> Result<f64> {
            Ok(t.f_detach()?.f_where_scalarother(mask, 0.0)?.f_sum(Kind::Double)?.f_double_value(&[])?)
        };
        let chosen_rewards = sum_where(&out.rewards, &desirable)?;
        let rejected_rewards = sum_where(&out.rewards, &undesirable)?;
        let both = n_chosen > 0.0 && n_rejected > 0.0;
        let margin = if both { chosen_rewards / n_chosen - rejected_rewards / n_rejected } else { 0.0 };
        let metrics = vec![
            ("rewards/chosen".to_string(), chosen_rewards),
            ("rewards/rejected".to_string(), rejected_rewards),
            ("rewards/margins".to_string(), margin),
            ("logps/chosen".to_string(), sum_where(&policy_logps, &desirable)?),
            ("logps/rejected".to_string(), sum_where(&policy_logps, &undesirable)?),
            ("kl".to_string(), out.kl.f_double_value(&[])?),
        ];
        let metric_counts = vec![
            ("rewards/chosen".to_string(), n_chosen),
            ("rewards/rejected".to_string(), n_rejected),
            ("rewards/margins".to_string(), f64::from(u8::from(both))),
            ("logps/chosen".to_string(), n_chosen),
            ("logps/rejected".to_string(), n_rejected),
            ("kl".to_string(), 1.0),
        ];
        Ok(MicroBatch { loss_sum: out.loss.f_sum(Kind::Float)?, tokens, metrics, metric_counts })
    }
}

/// Runs (or resumes) the KTO stage described by `cfg`. The reference is DPO's: a frozen copy of
/// the initial policy (or `reference`), the LoRA policy with its adapters disabled, or with
/// `precompute_ref` its log-probs cached once in `output_dir`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: KtoSection = cfg.stage_section()?;
    let origin = cfg.origin.display();
    let params = section.params();
    params.validate().map_err(|e| anyhow!("{origin}: [kto] {e}"))?;
    let c = &cfg.config;
    if c.train.batch_size < 2 {
        bail!(
            "{origin}: key 'train.batch_size': KTO needs at least 2 (found {}): the KL reference point pairs each prompt with the completion of another example of its batch",
            c.train.batch_size
        );
    }
    let options: DataOptions = cfg.data_options()?;
    let tokenizer = training_spec(cfg)?.tokenizer()?;
    tokenizer.chat_template()?;
    let pad_id = tokenizer.padding_id();
    let budget = LengthBudget::new(c.train.max_length, options.length_policy);
    let (train, val) = read_splits(cfg, &options, |paths, o| read_unpaired(paths, o))?;
    // the KL completions rotate within groups of the global micro-batch (every rank's
    // train.batch_size examples), so they do not depend on how many ranks share it
    let group = c.train.batch_size * align_core::dist::world().size();
    let (train_enc, train_desirable, dropped, truncated) = encode_examples(&tokenizer, &train, group, budget)?;
    let (val_enc, validation_desirable, _, _) = encode_examples(&tokenizer, &val, group, budget)?;
    if train_enc.is_empty() {
        bail!(
            "{origin}: no training example is left after the length budget (train.max_length = {})",
            c.train.max_length
        );
    }
    let desirable = train_desirable.iter().filter(|&&d| d).count();
    tracing::info!(
        "KTO on {} examples ({desirable} desirable, {} undesirable; {truncated} truncated, {dropped} dropped at max_length {}), {} validation",
        train_enc.len(),
        train_enc.len() - desirable,
        c.train.max_length,
        val_enc.len()
    );
    let data = KtoSplits {
        sequences: PairSplits { train: train_enc, validation: val_enc },
        train_desirable,
        validation_desirable,
    };
    let reference =
        pair_reference(cfg, "kto", section.reference.as_deref(), section.precompute_ref, &data.sequences, &options)?;

    let tm = TrainingModel::load(cfg)?;
    let mut objective = KtoObjective {
        policy: &tm.loaded.lm,
        reference: &reference,
        data,
        params,
        pad_id,
        chunk_tokens: c.train.loss_chunk_tokens,
    };
    tm.train_on(cfg, &mut objective, restart, stop_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kl_partners_rotate_completions_within_groups_as_trl() {
        // groups of 3: [0 1 2] [3 4 5] [6]
        assert_eq!(kl_partners(7, 3), vec![2, 0, 1, 5, 3, 4, 6]);
        assert_eq!(kl_partners(4, 2), vec![1, 0, 3, 2]);
        assert!(kl_partners(0, 4).is_empty());
    }
}
