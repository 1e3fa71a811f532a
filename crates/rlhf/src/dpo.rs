//! DPO stage: the policy's and the reference's summed log-probs of each pair's final answers
//! (chosen and rejected rendered through the chat template) → a DPO-family loss.
use anyhow::{anyhow, bail, Result};
use serde::Deserialize;
use tch::Kind;

use align_core::data::{DataOptions, LengthBudget};
use align_core::model::decoder::CausalLm;
use align_core::train::config::LoadedConfig;
use align_core::train::preference_batch::{encode_pairs, read_pair_splits, PairSplits};
use align_core::train::setup::{training_spec, TrainingModel};
use align_core::train::trainer::{MicroBatch, Objective, Split, TrainSummary};

use crate::dpo_loss::{dpo_loss, DpoLossParams, DpoLossType, PairLogps};
use crate::reference::{pair_logps, pair_reference, Reference};

fn d_beta() -> f64 {
    0.1
}
fn d_gamma() -> f64 {
    0.5
}
fn d_alpha() -> f64 {
    0.1
}

/// `[dpo]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpoSection {
    /// β: how far the policy may move from the reference (sigmoid, ipo, hinge, simpo).
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// sigmoid | ipo | hinge | simpo | orpo.
    #[serde(default)]
    pub loss: DpoLossType,
    /// cDPO label smoothing ε (sigmoid and simpo only).
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's target margin γ.
    #[serde(default = "d_gamma")]
    pub simpo_gamma: f64,
    /// ORPO's odds-ratio weight.
    #[serde(default = "d_alpha")]
    pub orpo_alpha: f64,
    /// Weight of an extra NLL term on the chosen answers (0 = none).
    #[serde(default)]
    pub sft_weight: f64,
    /// Compute the reference log-probs once before training and cache them in `output_dir`.
    #[serde(default)]
    pub precompute_ref: bool,
    /// Reference model folder (default: `model`, the initial policy).
    #[serde(default)]
    pub reference: Option<String>,
}

impl DpoSection {
    pub fn params(&self) -> DpoLossParams {
        DpoLossParams {
            loss: self.loss,
            beta: self.beta,
            label_smoothing: self.label_smoothing,
            simpo_gamma: self.simpo_gamma,
            orpo_alpha: self.orpo_alpha,
            sft_weight: self.sft_weight,
        }
    }
}

/// The DPO objective; one loss unit per pair. Metrics carry TRL's names.
pub struct DpoObjective<'a> {
    pub policy: &'a CausalLm,
    pub reference: &'a Reference,
    pub data: PairSplits,
    pub params: DpoLossParams,
    pub pad_id: i64,
    /// `train.loss_chunk_tokens`: the LM head in chunks of this many tokens (0 = at once).
    pub chunk_tokens: usize,
}

impl Objective for DpoObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.data.get(split).len()
    }

    fn units(&self, _split: Split, _example: usize) -> f64 {
        1.0
    }

    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let device = self.policy.device();
        let batch = self.data.batch(split, examples, self.pad_id, device)?;
        let chunk = self.chunk_tokens;
        let (pc, pr, nc, nr) = pair_logps(self.policy, &batch, chunk)?;
        let reference = match self.reference {
            Reference::Cached(r) => Some(r.select(split, examples, device)?),
            other => other.run(self.policy, |lm| pair_logps(lm, &batch, chunk))?.map(|(rc, rr, _, _)| (rc, rr)),
        };
        let out = dpo_loss(
            &PairLogps {
                policy_chosen_logps: &pc,
                policy_rejected_logps: &pr,
                ref_chosen_logps: reference.as_ref().map(|r| &r.0),
                ref_rejected_logps: reference.as_ref().map(|r| &r.1),
                chosen_tokens: &nc,
                rejected_tokens: &nr,
            },
            &self.params,
        )?;
        let sum = |t: &tch::Tensor| -> Result<f64> { Ok(t.f_detach()?.f_sum(Kind::Double)?.f_double_value(&[])?) };
        let (rc, rr) = (&out.chosen_rewards, &out.rejected_rewards);
        let metrics = vec![
            ("rewards/chosen".to_string(), sum(rc)?),
            ("rewards/rejected".to_string(), sum(rr)?),
            ("rewards/accuracies".to_string(), sum(&rc.f_gt_tensor(rr)?.f_to_kind(Kind::Float)?)?),
            ("rewards/margins".to_string(), sum(&rc.f_sub(rr)?)?),
            ("logps/chosen".to_string(), sum(&pc)?),
            ("logps/rejected".to_string(), sum(&pr)?),
        ];
        Ok(MicroBatch::new(out.loss.f_sum(Kind::Float)?, batch.tokens, metrics))
    }
}

/// Runs (or resumes) the DPO stage described by `cfg`. With `precompute_ref` the reference is
/// loaded (before the policy), used for every pair once and dropped; the log-probs are cached in
/// `output_dir/ref_logps-<key>.safetensors` and reused when the key matches.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: DpoSection = cfg.stage_section()?;
    let origin = cfg.origin.display();
    let params = section.params();
    params.validate().map_err(|e| anyhow!("{origin}: [dpo] {e}"))?;
    let options: DataOptions = cfg.data_options()?;
    let c = &cfg.config;
    let tokenizer = training_spec(cfg)?.tokenizer()?;
    tokenizer.chat_template()?;
    let pad_id = tokenizer.padding_id();

    let budget = LengthBudget::new(c.train.max_length, options.length_policy);
    let (train_pairs, val_pairs) = read_pair_splits(cfg, &options)?;
    let (train_enc, tc) = encode_pairs(&tokenizer, &train_pairs.iter().collect::<Vec<_>>(), budget)?;
    let (val_enc, vc) = encode_pairs(&tokenizer, &val_pairs.iter().collect::<Vec<_>>(), budget)?;
    if train_enc.is_empty() {
        bail!("{origin}: no training pair is left after the length budget (train.max_length = {})", c.train.max_length);
    }
    tracing::info!(
        "DPO ({}) on {} pairs ({} truncated, {} dropped at max_length {}), {} validation",
        params.loss.as_str(),
        tc.kept,
        tc.truncated,
        tc.dropped,
        c.train.max_length,
        vc.kept
    );
    let data = PairSplits { train: train_enc, validation: val_enc };

    let reference = if !params.loss.needs_reference() {
        if section.precompute_ref || section.reference.is_some() {
            tracing::warn!(
                "[dpo] loss '{}' is reference-free: 'reference' and 'precompute_ref' are ignored",
                params.loss.as_str()
            );
        }
        Reference::Free
    } else {
        pair_reference(cfg, "dpo", section.reference.as_deref(), section.precompute_ref, &data, &options)?
    };

    let tm = TrainingModel::load(cfg)?;
    let mut objective = DpoObjective {
        policy: &tm.loaded.lm,
        reference: &reference,
        data,
        params,
        pad_id,
        chunk_tokens: c.train.loss_chunk_tokens,
    };
    tm.train_on(cfg, &mut objective, restart, stop_after)
}
