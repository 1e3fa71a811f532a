//! Continued pretraining (PT): documents are tokenised, joined with the eos token and packed into
//! `block_size` blocks; the loss is next-token prediction on every position.
use anyhow::{bail, Result};
use serde::Deserialize;

use align_core::data::{read_pretrain, split_by_ratio, DataOptions};
use align_core::text::conversation::LabeledTokens;
use align_core::train::config::LoadedConfig;
use align_core::train::lm_objective::{NextTokenObjective, SequenceSplits};
use align_core::train::setup::TrainingModel;
use align_core::train::trainer::{train_supervised, TrainRun, TrainSummary};

/// `[pretrain]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PretrainSection {
    /// Tokens per training block (default: `train.max_length`).
    pub block_size: Option<usize>,
}

/// Concatenates documents, each followed by `eos`, and cuts the stream into blocks of `block`
/// tokens; the incomplete tail is dropped (and counted by the caller).
pub fn pack_blocks(docs: &[Vec<i64>], eos: i64, block: usize) -> Vec<Vec<i64>> {
    let mut stream = Vec::with_capacity(docs.iter().map(|d| d.len() + 1).sum());
    for d in docs {
        stream.extend_from_slice(d);
        stream.push(eos);
    }
    stream.chunks_exact(block).map(<[i64]>::to_vec).collect()
}

fn blocks_of(tm: &TrainingModel, texts: &[String], block: usize) -> Result<Vec<LabeledTokens>> {
    let eos = *tm.tokenizer.eos_token_ids.first().ok_or_else(|| {
        anyhow::anyhow!("{}: the tokenizer has no eos token to join documents with", tm.loaded.dir.display())
    })?;
    let docs = texts.iter().map(|t| tm.tokenizer.encode(t, false)).collect::<Result<Vec<_>>>()?;
    Ok(pack_blocks(&docs, eos, block).into_iter().map(|b| LabeledTokens { labels: b.clone(), input_ids: b }).collect())
}

/// Runs (or resumes) the PT stage described by `cfg`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: PretrainSection = cfg.stage_section()?;
    let options: DataOptions = cfg.data_options()?;
    let c = &cfg.config;
    let block = section.block_size.unwrap_or(c.train.max_length);
    if block < 2 {
        bail!("{}: [pretrain] block_size: expected at least 2 tokens", cfg.origin.display());
    }
    let tm = TrainingModel::load(cfg)?;
    let train_docs = read_pretrain(&c.data, &options)?;
    let texts: Vec<String> = train_docs.records.iter().map(|d| d.text.clone()).collect();
    let (train_texts, val_texts): (Vec<String>, Vec<String>) = if c.val_data.is_empty() {
        let (tr, va) = split_by_ratio(texts.len(), c.train.val_ratio, c.train.seed);
        (tr.iter().map(|&i| texts[i].clone()).collect(), va.iter().map(|&i| texts[i].clone()).collect())
    } else {
        let val = read_pretrain(&c.val_data, &options.without_mix())?;
        (texts, val.records.into_iter().map(|d| d.text).collect())
    };
    let data =
        SequenceSplits { train: blocks_of(&tm, &train_texts, block)?, validation: blocks_of(&tm, &val_texts, block)? };
    if data.train.is_empty() {
        bail!("{}: the training documents hold fewer than block_size = {block} tokens", cfg.origin.display());
    }
    tracing::info!(
        "pretraining on {} documents → {} blocks of {block} tokens ({} validation blocks)",
        train_texts.len(),
        data.train.len(),
        data.validation.len()
    );
    let params = tm.trainable_params();
    let mut objective = NextTokenObjective {
        lm: &tm.loaded.lm,
        data,
        pad_id: tm.tokenizer.padding_id(),
        chunk_tokens: c.train.loss_chunk_tokens,
    };
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
mod tests {
    use super::*;

    #[test]
    fn documents_are_joined_with_eos_and_cut_into_full_blocks() {
        let blocks = pack_blocks(&[vec![1, 2, 3], vec![4, 5], vec![6]], 0, 4);
        assert_eq!(blocks, vec![vec![1, 2, 3, 0], vec![4, 5, 0, 6]]); // tail [0] dropped
    }
}
