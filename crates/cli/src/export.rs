//! `align export`: merges a LoRA adapter into its base model and writes a plain HF model folder
//! (a causal LM, or for a reward-model adapter a `*ForSequenceClassification` folder), verified by
//! comparing the reloaded folder's logits (scores) with base + adapter on a probe batch — the
//! core's one merge path (`align_core::merge`), which the pipeline uses too; or, with `--format
//! gguf`, writes a causal LM (an adapter merged first) as one GGUF file for llama.cpp and Ollama.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};

use align_core::hf::folder::check_replaceable;
use align_core::load::gguf::{export_gguf, GgufDtype};
use align_core::load::merge::{adapter_base_dir, merge_adapter, MergeOptions};
use align_core::load::spec::ModelSpec;
use align_core::model::device::parse_dtype;

use crate::ModelArgs;

/// What `align export` writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ExportFormat {
    /// An HF model folder (the adapter merged into its base).
    Hf,
    /// One GGUF file (llama.cpp, Ollama) of a causal LM.
    Gguf,
}

#[derive(Args)]
pub struct ExportArgs {
    /// `--adapter` (the PEFT adapter folder to merge: required for `--format hf`, where a
    /// reward-model adapter, task_type SEQ_CLS with its score head, exports a reward model),
    /// `--model` (the base; default the adapter's base_model_name_or_path; with `--format gguf`
    /// the model to convert), `--dtype` (hf: stored dtype of the merged weights; gguf: f32, f16,
    /// bf16 or q8_0 for the 2-D weights, default f16), device and threads. The merge runs in f32.
    #[command(flatten)]
    pub model: ModelArgs,
    /// hf: a merged HF model folder; gguf: one GGUF file (llama / mistral as llama.cpp's `llama`,
    /// qwen2, qwen3; byte-level BPE tokenizer and chat template in the metadata).
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// hf: output folder for the merged model — new, empty, or a model folder (replaced); never
    /// an input or a folder holding one. gguf: the output file (e.g. model.gguf).
    #[arg(long)]
    pub out: PathBuf,
    /// Replace `--out` even when it holds files other than a model folder's (gguf: even when it is
    /// a file not ending in .gguf). Never an input.
    #[arg(long)]
    pub force: bool,
    /// Largest allowed |merged − (base + adapter)| probe logit difference (both in f32), relative
    /// to max(1, |logit|). An f16/bf16 export must then reproduce the merged weights rounded to
    /// that dtype exactly; the remaining (rounding) difference is printed.
    #[arg(long)]
    pub tolerance: Option<f64>,
}

pub fn run(args: ExportArgs) -> Result<()> {
    if args.format == ExportFormat::Gguf {
        return run_gguf(args);
    }
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

/// Removes a temporary folder when dropped (the merged model a GGUF export converts).
struct TempFolder(PathBuf);

impl Drop for TempFolder {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn folder_name(dir: &Path) -> String {
    dir.canonicalize()
        .ok()
        .and_then(|d| d.file_name().map(|n| n.to_string_lossy().to_string()))
        .unwrap_or_else(|| "model".to_string())
}

fn run_gguf(args: ExportArgs) -> Result<()> {
    let dtype = GgufDtype::parse(args.model.dtype.as_deref().unwrap_or("f16")).context("--dtype")?;
    let out = &args.out;
    if out.is_dir() {
        bail!("--out {}: is a folder; --format gguf writes one file (e.g. --out model.gguf)", out.display());
    }
    let is_gguf = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if out.exists() && !is_gguf && !args.force {
        bail!(
            "--out {}: exists and is not a .gguf file; it would be replaced — choose a new file, or pass --force to replace it",
            out.display()
        );
    }
    if let Some(t) = args.tolerance {
        if !(t >= 0.0) {
            bail!("--tolerance: expected a number ≥ 0, found {t}");
        }
    }
    let adapter = args.model.adapter.as_deref().map(PathBuf::from);
    if let Some(a) = &adapter {
        if !a.is_dir() {
            bail!("--adapter {}: no such adapter folder", a.display());
        }
    }
    let base = match (&args.model.model, &adapter) {
        (Some(m), _) => m.clone(),
        (None, Some(a)) => adapter_base_dir(a).context("--model not given")?.display().to_string(),
        (None, None) => bail!("--model: required with --format gguf (the HF model folder to convert)"),
    };
    let spec = ModelSpec::from_flags(&base, None, &args.model.device, None, args.model.threads)?;
    spec.apply_runtime();
    let base_dir = spec.model_dir()?;
    let (source, _merged, name) = match &adapter {
        None => (base_dir.clone(), None, folder_name(&base_dir)),
        Some(a) => {
            let parent = out.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
            let file = out.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default();
            let tmp = TempFolder(parent.join(format!(".{file}.merged-{}", std::process::id())));
            // merged and checked in f32; the GGUF types are applied to the merged weights
            let opts = MergeOptions {
                dtype: Some(tch::Kind::Float),
                device: spec.device,
                tolerance: args.tolerance.unwrap_or(1e-4),
            };
            let r = merge_adapter(&base_dir, a, &tmp.0, &opts)?;
            if r.reward {
                bail!(
                    "--adapter {}: a reward-model adapter (task_type SEQ_CLS); a GGUF file holds a causal LM — export it with --format hf",
                    a.display()
                );
            }
            println!(
                "merged {} ({}, {} modules) into {} (probe logits: max abs difference {:.3e} to base + adapter)",
                a.display(),
                r.adapter,
                r.adapted,
                base_dir.display(),
                r.exported_abs
            );
            (tmp.0.clone(), Some(tmp), folder_name(a))
        }
    };
    let r = export_gguf(&source, out, dtype, &name)?;
    println!(
        "wrote {} ({}, {}: {} tensors, {:.1} MB; vocabulary of {} tokens, {} merges, pre-tokenizer {}{})",
        out.display(),
        r.arch,
        dtype.name(),
        r.tensors,
        r.bytes as f64 / 1e6,
        r.tokens,
        r.merges,
        r.pre,
        if r.chat_template { ", chat template" } else { ", no chat template" }
    );
    if !r.f16_fallback.is_empty() {
        println!("stored as F16 (rows not a multiple of 32 values): {}", r.f16_fallback.join(", "));
    }
    Ok(())
}
