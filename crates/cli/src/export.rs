//! `align export`: merges a LoRA adapter into its base model and writes a plain HF model folder
//! (a causal LM, or for a reward-model adapter a `*ForSequenceClassification` folder), verified by
//! comparing the reloaded folder's logits (scores) with base + adapter on a probe batch — the
//! core's one merge path (`align_core::merge`), which the pipeline uses too.
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;

use align_core::hf::folder::check_replaceable;
use align_core::load::merge::{adapter_base_dir, merge_adapter, MergeOptions};
use align_core::load::spec::ModelSpec;
use align_core::model::device::parse_dtype;

use crate::ModelArgs;

#[derive(Args)]
pub struct ExportArgs {
    /// `--adapter` (required: the PEFT adapter folder to merge; a reward-model adapter, task_type
    /// SEQ_CLS with its score head, exports a reward model), `--model` (the base; default the
    /// adapter's base_model_name_or_path), `--dtype` (stored dtype of the merged weights), device
    /// and threads. The merge runs in f32.
    #[command(flatten)]
    pub model: ModelArgs,
    /// Output folder for the merged model: new, empty, or a model folder (replaced); never an
    /// input or a folder holding one.
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it holds files other than a model folder's (never an input).
    #[arg(long)]
    pub force: bool,
    /// Largest allowed |merged − (base + adapter)| probe logit difference (both in f32), relative
    /// to max(1, |logit|). An f16/bf16 export must then reproduce the merged weights rounded to
    /// that dtype exactly; the remaining (rounding) difference is printed.
    #[arg(long)]
    pub tolerance: Option<f64>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    let adapter = PathBuf::from(
        args.model.adapter.as_deref().ok_or_else(|| anyhow!("--adapter: required (the adapter folder to merge)"))?,
    );
    if !adapter.is_dir() {
        bail!("--adapter {}: no such adapter folder", adapter.display());
    }
    let base = match &args.model.model {
        Some(m) => m.clone(),
        None => adapter_base_dir(&adapter).context("--model not given")?.display().to_string(),
    };
    // the merge runs in f32; --dtype is the stored dtype of the merged weights
    let spec = ModelSpec::from_flags(&base, None, &args.model.device, None, args.model.threads)?;
    spec.apply_runtime();
    let device = spec.device;
    let base_dir = spec.model_dir()?;
    check_replaceable(&args.out, &[&base_dir, &adapter], args.force, "--out")?;
    if let Some(t) = args.tolerance {
        if !(t >= 0.0) {
            bail!("--tolerance: expected a number ≥ 0, found {t}");
        }
    }
    let stored = args.model.dtype.as_deref().map(|d| parse_dtype(Some(d), device)).transpose()?;
    let opts = MergeOptions { dtype: stored, device, tolerance: args.tolerance.unwrap_or(1e-4) };
    let r = merge_adapter(&base_dir, &adapter, &args.out, &opts)?;
    let what = if r.reward { "scores" } else { "logits" };
    println!(
        "merged {} ({}, {} modules{}) into {} → {} ({}{})",
        adapter.display(),
        r.adapter,
        r.adapted,
        if r.reward { ", score head" } else { "" },
        base_dir.display(),
        args.out.display(),
        if r.reward { "reward model, " } else { "" },
        align_core::hf::checkpoint::hf_dtype_name(r.stored)
    );
    println!(
        "probe {what}: max abs difference {:.3e} (relative {:.3e}) between the exported model and base + adapter; merge in f32: {:.3e} (tolerance {:.1e}); the adapter itself moves them by up to {:.3e} (relative)",
        r.exported_abs,
        r.exported_rel,
        r.merge_abs,
        opts.tolerance,
        r.effect
    );
    Ok(())
}
