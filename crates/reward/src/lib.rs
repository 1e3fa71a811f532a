//! Reward-model (RM) stage: a scalar head on the SFT model's trunk scores the last non-pad token
//! of each whole conversation (prompt + answer); Bradley–Terry loss on chosen vs rejected.
use anyhow::{bail, Result};
use serde::Deserialize;
use tch::Kind;

use align_core::data::{DataOptions, LengthBudget};
use align_core::model::scalar::{ScalarModel, ScoreInit};
use align_core::train::config::LoadedConfig;
use align_core::train::preference_batch::{encode_pairs, read_pair_splits, EncodedPair, PairSplits, PreferenceBatch};
use align_core::train::setup::TrainingScalarModel;
use align_core::train::trainer::{train_supervised, MicroBatch, Objective, Split, TrainRun, TrainSummary};

pub mod bt_loss;

pub use bt_loss::bradley_terry_loss;

/// `[reward]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardSection {
    /// Required score gap: the loss is −log σ(r_c − r_r − margin).
    #[serde(default)]
    pub margin: f64,
    /// Weight of the reward-centring term (r_c + r_r)² (TRL's `center_rewards_coefficient`); 0 = off.
    #[serde(default)]
    pub center_rewards_coefficient: f64,
}

/// Scores of the chosen and rejected rows of a batch, each `[B]` f32.
pub fn score_batch(rm: &ScalarModel, batch: &PreferenceBatch) -> Result<(tch::Tensor, tch::Tensor)> {
    batch.split(&rm.forward(&batch.input_ids)?)
}

/// The Bradley–Terry objective; one loss unit per pair.
pub struct RewardObjective<'a> {
    pub rm: &'a ScalarModel,
    pub data: PairSplits,
    pub section: RewardSection,
}

impl Objective for RewardObjective<'_> {
    fn len(&self, split: Split) -> usize {
        self.data.get(split).len()
    }

    fn units(&self, _split: Split, _example: usize) -> f64 {
        1.0
    }

    fn forward(&mut self, split: Split, examples: &[usize]) -> Result<MicroBatch> {
        let batch = self.data.batch(split, examples, self.rm.pad_token_id, self.rm.device())?;
        let (rc, rr) = score_batch(self.rm, &batch)?;
        let loss = bradley_terry_loss(&rc, &rr, self.section.margin, self.section.center_rewards_coefficient)?;
        let sum = |t: &tch::Tensor| -> Result<f64> { Ok(t.f_detach()?.f_sum(Kind::Double)?.f_double_value(&[])?) };
        let margin = rc.f_sub(&rr)?;
        let metrics = vec![
            ("accuracy".to_string(), sum(&margin.f_gt(0.0)?.f_to_kind(Kind::Float)?)?),
            ("margin".to_string(), sum(&margin)?),
            ("chosen_reward".to_string(), sum(&rc)?),
            ("rejected_reward".to_string(), sum(&rr)?),
        ];
        Ok(MicroBatch::new(loss.f_sum(Kind::Float)?, batch.tokens, metrics))
    }
}

/// Pairwise accuracy and score means of a reward model over pairs.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct PairwiseStats {
    pub pairs: usize,
    /// Share of pairs scored chosen > rejected.
    pub accuracy: f64,
    /// Mean of r_chosen − r_rejected.
    pub mean_margin: f64,
    pub mean_chosen_reward: f64,
    pub mean_rejected_reward: f64,
    /// Pairs whose answers are length-matched (see [`is_length_matched`]).
    pub length_matched_pairs: usize,
    /// Accuracy on the length-matched pairs (`None` when there are none): how well the model
    /// ranks answers when length cannot be the cue.
    pub length_matched_accuracy: Option<f64>,
    /// Share of pairs whose chosen answer has more tokens than the rejected one: the accuracy of
    /// "prefer the longer answer", the baseline a length-biased model would reach.
    pub longer_chosen_share: f64,
}

/// Relative answer-length difference up to which a pair counts as length-matched.
pub const LENGTH_MATCH_TOLERANCE: f64 = 0.10;

/// A pair is length-matched when its answers' token counts (the labelled tokens: the answer and
/// its end token, not the shared prompt) differ by at most [`LENGTH_MATCH_TOLERANCE`] of the longer.
pub fn is_length_matched(chosen_tokens: usize, rejected_tokens: usize) -> bool {
    let longer = chosen_tokens.max(rejected_tokens) as f64;
    (chosen_tokens as f64 - rejected_tokens as f64).abs() <= LENGTH_MATCH_TOLERANCE * longer
}

/// Each pair's (chosen, rejected) scores (no gradients), in micro-batches of `batch_size` pairs.
pub fn pair_scores(rm: &ScalarModel, pairs: &[EncodedPair], batch_size: usize) -> Result<Vec<(f32, f32)>> {
    let _guard = tch::no_grad_guard();
    let refs: Vec<&EncodedPair> = pairs.iter().collect();
    let mut out = Vec::with_capacity(pairs.len());
    for chunk in refs.chunks(batch_size.max(1)) {
        let batch = PreferenceBatch::new(chunk, rm.pad_token_id, rm.device())?;
        let (rc, rr) = score_batch(rm, &batch)?;
        let rc: Vec<f32> = Vec::try_from(rc.f_to_device(tch::Device::Cpu)?)?;
        let rr: Vec<f32> = Vec::try_from(rr.f_to_device(tch::Device::Cpu)?)?;
        out.extend(rc.into_iter().zip(rr));
    }
    Ok(out)
}

/// Scores every pair (no gradients) in micro-batches of `batch_size` pairs.
pub fn pairwise_stats(rm: &ScalarModel, pairs: &[EncodedPair], batch_size: usize) -> Result<PairwiseStats> {
    let (mut correct, mut margin, mut chosen, mut rejected) = (0f64, 0f64, 0f64, 0f64);
    let (mut matched, mut matched_correct, mut longer_chosen) = (0usize, 0usize, 0usize);
    for ((c, r), pair) in pair_scores(rm, pairs, batch_size)?.into_iter().zip(pairs) {
        correct += f64::from(u8::from(c > r));
        margin += f64::from(c - r);
        chosen += f64::from(c);
        rejected += f64::from(r);
        let (lc, lr) = (pair.chosen.label_count(), pair.rejected.label_count());
        longer_chosen += usize::from(lc > lr);
        if is_length_matched(lc, lr) {
            matched += 1;
            matched_correct += usize::from(c > r);
        }
    }
    let n = pairs.len().max(1) as f64;
    Ok(PairwiseStats {
        pairs: pairs.len(),
        accuracy: correct / n,
        mean_margin: margin / n,
        mean_chosen_reward: chosen / n,
        mean_rejected_reward: rejected / n,
        length_matched_pairs: matched,
        length_matched_accuracy: (matched > 0).then(|| matched_correct as f64 / matched as f64),
        longer_chosen_share: longer_chosen as f64 / n,
    })
}

/// Runs (or resumes) the RM stage described by `cfg`. The head of a model started from a causal
/// LM is drawn from N(0, 1/hidden) with `train.seed`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: RewardSection = cfg.stage_section()?;
    let coef = section.center_rewards_coefficient;
    if !section.margin.is_finite() || !coef.is_finite() || coef < 0.0 {
        bail!(
            "{}: [reward]: expected a finite 'margin' and 'center_rewards_coefficient' ≥ 0, found {} and {}",
            cfg.origin.display(),
            section.margin,
            section.center_rewards_coefficient
        );
    }
    let options: DataOptions = cfg.data_options()?;
    let c = &cfg.config;
    let tm = TrainingScalarModel::load(cfg, |hidden| ScoreInit::default_for(hidden, c.train.seed))?;
    tm.tokenizer.chat_template()?;
    let budget = LengthBudget::new(c.train.max_length, options.length_policy);
    let (train_pairs, val_pairs) = read_pair_splits(cfg, &options)?;
    let (train_enc, tc) = encode_pairs(&tm.tokenizer, &train_pairs.iter().collect::<Vec<_>>(), budget)?;
    let (val_enc, vc) = encode_pairs(&tm.tokenizer, &val_pairs.iter().collect::<Vec<_>>(), budget)?;
    if train_enc.is_empty() {
        bail!(
            "{}: no training pair is left after the length budget (train.max_length = {})",
            cfg.origin.display(),
            c.train.max_length
        );
    }
    tracing::info!(
        "reward model on {} pairs ({} truncated, {} dropped at max_length {}), {} validation",
        tc.kept,
        tc.truncated,
        tc.dropped,
        c.train.max_length,
        vc.kept
    );
    let params = tm.trainable_params();
    let mut objective =
        RewardObjective { rm: &tm.loaded.rm, data: PairSplits { train: train_enc, validation: val_enc }, section };
    let run = TrainRun {
        settings: &c.train,
        output_dir: &c.output_dir,
        fingerprint: &cfg.fingerprint()?,
        restart,
        stop_after,
    };
    train_supervised(run, &mut objective, &tm, params)
}

#[cfg(test)]
mod length_match_tests {
    use super::is_length_matched;

    #[test]
    fn pairs_within_a_tenth_of_the_longer_answer_are_length_matched() {
        assert!(is_length_matched(50, 45)); // 5 ≤ 5
        assert!(is_length_matched(45, 50));
        assert!(!is_length_matched(50, 44)); // 6 > 5
        assert!(is_length_matched(10, 10));
        assert!(!is_length_matched(10, 0));
        assert!(is_length_matched(0, 0));
    }
}
