//! Preference pairs → token sequences and padded batches, shared by the reward-model and DPO
//! stages: chosen and rejected are each rendered as the whole conversation (prompt + answer as
//! the final assistant turn) through the chat template, labels on that answer only; a batch
//! stacks the chosen rows, then the rejected rows, right-padded, as one `[2B, T]` forward.
use anyhow::{anyhow, Result};
use tch::{Device, Tensor};

use crate::data::{
    read_preference, split_by_ratio, DataOptions, LengthBudget, LengthDecision, LoadedData, PreferencePair,
};
use crate::text::conversation::{encode_final_answer, LabeledTokens};
use crate::text::tokenizer::ModelTokenizer;
use crate::train::config::LoadedConfig;
use crate::train::lm_objective::{pad_batch, predicted_labels};
use crate::train::trainer::Split;

/// The training and validation pairs of a run: `val_data` when given, else `train.val_ratio` of
/// `data` held out by a seeded split.
pub fn read_pair_splits(
    cfg: &LoadedConfig,
    options: &DataOptions,
) -> Result<(Vec<PreferencePair>, Vec<PreferencePair>)> {
    read_splits(cfg, options, |paths, o| read_preference(paths, o))
}

/// The training and validation records of a run as `read` reads them from files: `val_data`
/// when given, else `train.val_ratio` of `data` held out by a seeded split.
pub fn read_splits<T: Clone>(
    cfg: &LoadedConfig,
    options: &DataOptions,
    read: impl Fn(&[String], &DataOptions) -> Result<LoadedData<T>>,
) -> Result<(Vec<T>, Vec<T>)> {
    let c = &cfg.config;
    let data = read(&c.data, options)?;
    if !c.val_data.is_empty() {
        return Ok((data.records, read(&c.val_data, &options.without_mix())?.records));
    }
    let (train, val) = split_by_ratio(data.records.len(), c.train.val_ratio, c.train.seed);
    Ok((
        train.iter().map(|&i| data.records[i].clone()).collect(),
        val.iter().map(|&i| data.records[i].clone()).collect(),
    ))
}

/// One pair as tokens.
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedPair {
    pub chosen: LabeledTokens,
    pub rejected: LabeledTokens,
}

impl EncodedPair {
    pub fn tokens(&self) -> usize {
        self.chosen.input_ids.len() + self.rejected.input_ids.len()
    }
}

/// Training and validation pairs as tokens.
#[derive(Debug, Clone, Default)]
pub struct PairSplits {
    pub train: Vec<EncodedPair>,
    pub validation: Vec<EncodedPair>,
}

impl PairSplits {
    pub fn get(&self, split: Split) -> &[EncodedPair] {
        match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
        }
    }

    /// The batch of the given examples of a split (chosen rows, then rejected rows).
    pub fn batch(&self, split: Split, examples: &[usize], pad_id: i64, device: Device) -> Result<PreferenceBatch> {
        let pairs: Vec<&EncodedPair> = examples.iter().map(|&e| &self.get(split)[e]).collect();
        PreferenceBatch::new(&pairs, pad_id, device)
    }
}

/// How many pairs the length budget changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PairCounts {
    pub kept: usize,
    pub truncated: usize,
    pub dropped: usize,
}

/// Encodes one pair; see the module doc.
pub fn encode_pair(tok: &ModelTokenizer, pair: &PreferencePair) -> Result<EncodedPair> {
    let chosen =
        encode_final_answer(tok, &pair.chosen_messages()).map_err(|e| anyhow!("{}: chosen: {e}", pair.origin))?;
    let rejected =
        encode_final_answer(tok, &pair.rejected_messages()).map_err(|e| anyhow!("{}: rejected: {e}", pair.origin))?;
    Ok(EncodedPair { chosen, rejected })
}

/// Encodes pairs and applies the token budget to each side: a side longer than `max_length` is
/// truncated or the pair dropped, as configured; a pair where either answer has no predicted
/// token left is dropped too.
pub fn encode_pairs(
    tok: &ModelTokenizer,
    pairs: &[&PreferencePair],
    budget: LengthBudget,
) -> Result<(Vec<EncodedPair>, PairCounts)> {
    let mut out = Vec::with_capacity(pairs.len());
    let mut counts = PairCounts::default();
    for pair in pairs {
        let mut enc = encode_pair(tok, pair)?;
        let mut truncated = false;
        let mut dropped = false;
        for side in [&mut enc.chosen, &mut enc.rejected] {
            match budget.decide(side.input_ids.len()) {
                LengthDecision::Keep => {}
                LengthDecision::Truncate { to } => {
                    side.truncate(to);
                    truncated = true;
                }
                LengthDecision::Drop => dropped = true,
            }
        }
        if dropped || predicted_labels(&enc.chosen) == 0 || predicted_labels(&enc.rejected) == 0 {
            counts.dropped += 1;
            continue;
        }
        counts.truncated += usize::from(truncated);
        counts.kept += 1;
        out.push(enc);
    }
    Ok((out, counts))
}

/// A micro-batch of pairs: rows `0..B` are the chosen sequences, rows `B..2B` the rejected ones.
pub struct PreferenceBatch {
    /// `[2B, T]`, right-padded with the padding id.
    pub input_ids: Tensor,
    /// `[2B, T]`, `IGNORE_INDEX` outside the answers and on padding.
    pub labels: Tensor,
    pub pairs: usize,
    /// Real (unpadded) tokens in the batch.
    pub tokens: usize,
}

impl PreferenceBatch {
    pub fn new(pairs: &[&EncodedPair], pad_id: i64, device: Device) -> Result<Self> {
        let rows: Vec<&LabeledTokens> =
            pairs.iter().map(|p| &p.chosen).chain(pairs.iter().map(|p| &p.rejected)).collect();
        let (input_ids, labels) = pad_batch(&rows, pad_id, device)?;
        Ok(PreferenceBatch { input_ids, labels, pairs: pairs.len(), tokens: pairs.iter().map(|p| p.tokens()).sum() })
    }

    /// Splits a `[2B, …]` per-row tensor into its chosen and rejected halves.
    pub fn split(&self, per_row: &Tensor) -> Result<(Tensor, Tensor)> {
        let b = self.pairs as i64;
        Ok((per_row.f_narrow(0, 0, b)?, per_row.f_narrow(0, b, b)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{LengthPolicy, Origin};
    use crate::infer::logprobs::IGNORE_INDEX;
    use crate::text::chat::ChatMessage;
    use std::path::Path;

    fn pair(chosen: &str, rejected: &str) -> PreferencePair {
        PreferencePair {
            prompt: vec![ChatMessage::new("user", "What is fever?")],
            chosen: chosen.into(),
            rejected: rejected.into(),
            origin: Origin::line(Path::new("p.jsonl"), 3),
        }
    }

    #[test]
    fn pairs_render_the_whole_conversation_and_batch_chosen_then_rejected() {
        let tok = ModelTokenizer::from_dir(
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen2"),
        )
        .unwrap();
        let long = pair("A high body temperature, often a sign of infection.", "No.");
        let (enc, counts) = encode_pairs(&tok, &[&long], LengthBudget::new(1000, LengthPolicy::Truncate)).unwrap();
        assert_eq!(counts, PairCounts { kept: 1, truncated: 0, dropped: 0 });
        let text = tok.decode(&enc[0].chosen.input_ids, false).unwrap();
        assert!(text.contains("What is fever?") && text.ends_with("infection.<|im_end|>\n"), "{text}");
        let labelled: Vec<i64> = enc[0].rejected.labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
        assert_eq!(tok.decode(&labelled, false).unwrap(), "No.<|im_end|>\n");

        let b = PreferenceBatch::new(&[&enc[0], &enc[0]], 0, Device::Cpu).unwrap();
        assert_eq!(b.input_ids.size(), vec![4, enc[0].chosen.input_ids.len() as i64]);
        let (c, r) = b.split(&b.input_ids).unwrap();
        assert_eq!(c.size()[0], 2);
        assert_eq!(r.int64_value(&[0, 0]), enc[0].rejected.input_ids[0]);
        // a padded position of a rejected row is padding and unlabelled
        let last = enc[0].chosen.input_ids.len() as i64 - 1;
        assert_eq!(r.int64_value(&[0, last]), 0);
        assert_eq!(b.labels.int64_value(&[2, last]), IGNORE_INDEX);

        // the prompt alone is longer than the budget: no answer token survives → dropped
        let (enc, counts) = encode_pairs(&tok, &[&long], LengthBudget::new(4, LengthPolicy::Truncate)).unwrap();
        assert!(enc.is_empty() && counts.dropped == 1);
        let (_, counts) = encode_pairs(&tok, &[&long], LengthBudget::new(20, LengthPolicy::Drop)).unwrap();
        assert_eq!(counts.dropped, 1);
    }
}
