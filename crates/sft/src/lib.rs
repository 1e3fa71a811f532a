//! Supervised fine-tuning (SFT): conversations rendered with the model's chat template (with their
//! tool schemas), labels on the assistant turns only (their tool calls and end-of-turn tokens
//! included, tool results not), next-token loss.
use anyhow::{bail, Result};
use serde::Deserialize;

use align_core::data::{read_sft, split_by_ratio, Conversation, DataOptions, LengthBudget, LengthDecision};
use align_core::text::conversation::{encode_conversation_with_tools, LabeledTokens};
use align_core::train::config::LoadedConfig;
use align_core::train::lm_objective::{
    pack_sequences, predicted_labels, NextTokenObjective, PackedObjective, SequenceSplits,
};
use align_core::train::setup::TrainingModel;
use align_core::train::trainer::{train_supervised, TrainRun, TrainSummary};

/// `[sft]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftSection {
    /// Also train on system and user tokens.
    #[serde(default)]
    pub train_on_prompt: bool,
    /// Pack conversations into rows of `train.max_length` tokens. Attention stays inside each
    /// conversation and positions restart, so results equal unpacked training; it saves padding.
    #[serde(default)]
    pub packing: bool,
}

/// How many conversations the length budget changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BudgetCounts {
    pub kept: usize,
    pub truncated: usize,
    pub dropped: usize,
}

/// Encodes conversations and applies the token budget: over-long ones are truncated or dropped as
/// configured; one left without any label after truncation is dropped too.
pub fn encode_all(
    tm: &TrainingModel,
    convs: &[&Conversation],
    train_on_prompt: bool,
    budget: LengthBudget,
) -> Result<(Vec<LabeledTokens>, BudgetCounts)> {
    let mut out = Vec::with_capacity(convs.len());
    let mut counts = BudgetCounts::default();
    for c in convs {
        let mut enc = encode_conversation_with_tools(&tm.tokenizer, &c.to_messages(), &c.tools, train_on_prompt)
            .map_err(|e| anyhow::anyhow!("{}: {e}", c.origin))?;
        match budget.decide(enc.input_ids.len()) {
            LengthDecision::Keep => {}
            LengthDecision::Truncate { to } => {
                enc.truncate(to);
                counts.truncated += 1;
            }
            LengthDecision::Drop => {
                counts.dropped += 1;
                continue;
            }
        }
        if predicted_labels(&enc) == 0 {
            counts.dropped += 1;
            continue;
        }
        counts.kept += 1;
        out.push(enc);
    }
    Ok((out, counts))
}

/// Runs (or resumes) the SFT stage described by `cfg`.
pub fn run(cfg: &LoadedConfig, restart: bool, stop_after: Option<u64>) -> Result<TrainSummary> {
    let section: SftSection = cfg.stage_section()?;
    let options: DataOptions = cfg.data_options()?;
    let c = &cfg.config;
    let tm = TrainingModel::load(cfg)?;
    tm.tokenizer.chat_template()?;
    let budget = LengthBudget::new(c.train.max_length, options.length_policy);
    let data = read_sft(&c.data, &options)?;
    let (train_convs, val_convs): (Vec<&Conversation>, Vec<&Conversation>) = if c.val_data.is_empty() {
        let (tr, va) = split_by_ratio(data.records.len(), c.train.val_ratio, c.train.seed);
        (tr.iter().map(|&i| &data.records[i]).collect(), va.iter().map(|&i| &data.records[i]).collect())
    } else {
        (data.records.iter().collect(), Vec::new())
    };
    let val_data = if c.val_data.is_empty() { None } else { Some(read_sft(&c.val_data, &options.without_mix())?) };
    let val_convs: Vec<&Conversation> = match &val_data {
        Some(v) => v.records.iter().collect(),
        None => val_convs,
    };
    let (train_seqs, tc) = encode_all(&tm, &train_convs, section.train_on_prompt, budget)?;
    let (val_seqs, vc) = encode_all(&tm, &val_convs, section.train_on_prompt, budget)?;
    if train_seqs.is_empty() {
        bail!(
            "{}: no training conversation is left after the length budget (train.max_length = {})",
            cfg.origin.display(),
            c.train.max_length
        );
    }
    tracing::info!(
        "SFT on {} conversations ({} truncated, {} dropped at max_length {}), {} validation",
        tc.kept,
        tc.truncated,
        tc.dropped,
        c.train.max_length,
        vc.kept
    );
    let params = tm.trainable_params();
    let run = TrainRun {
        settings: &c.train,
        output_dir: &c.output_dir,
        fingerprint: &cfg.fingerprint()?,
        restart,
        stop_after,
    };
    let pad_id = tm.tokenizer.padding_id();
    if section.packing {
        let train_rows = pack_sequences(&train_seqs, c.train.max_length);
        tracing::info!(
            "packed {} conversations into {} rows of ≤ {} tokens",
            train_seqs.len(),
            train_rows.len(),
            c.train.max_length
        );
        let validation = pack_sequences(&val_seqs, c.train.max_length);
        let mut objective = PackedObjective {
            lm: &tm.loaded.lm,
            train: train_rows,
            validation,
            pad_id,
            chunk_tokens: c.train.loss_chunk_tokens,
        };
        return train_supervised(run, &mut objective, &tm, params);
    }
    let mut objective = NextTokenObjective {
        lm: &tm.loaded.lm,
        data: SequenceSplits { train: train_seqs, validation: val_seqs },
        pad_id,
        chunk_tokens: c.train.loss_chunk_tokens,
    };
    train_supervised(run, &mut objective, &tm, params)
}
