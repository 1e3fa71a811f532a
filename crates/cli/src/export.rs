//! `align export`: merges a LoRA adapter into its base model and writes a plain HF model folder,
//! verified by comparing the reloaded folder's logits with base + adapter on a probe batch.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use clap::Args;
use tch::{Device, Kind, Tensor};

use align_core::checkpoint::{
    causal_lm_tensors, copy_companions, load_causal_lm, resolve_model_dir, save_tensors, write_config, write_folder,
    DEFAULT_MAX_SHARD_BYTES,
};
use align_core::device::{parse_device, parse_dtype};
use align_core::lora::{load_adapter, merge_lora};
use align_core::model::ForwardOptions;
use align_core::CausalLm;

#[derive(Args)]
pub struct ExportArgs {
    /// Base model folder (HF layout) or a hub id present in the local HF cache.
    #[arg(long)]
    pub model: String,
    /// LoRA adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    pub adapter: PathBuf,
    /// Output folder for the merged model (replaced if it exists).
    #[arg(long)]
    pub out: PathBuf,
    /// Stored dtype of the merged weights: f32, bf16 or f16 (default: the base checkpoint's).
    #[arg(long)]
    pub dtype: Option<String>,
    /// auto (CUDA when available), cpu, cuda or cuda:N. The merge runs in f32.
    #[arg(long, default_value = "auto")]
    pub device: String,
    /// Largest allowed |merged − (base + adapter)| probe logit difference (both in f32), relative
    /// to max(1, |logit|). An f16/bf16 export must then reproduce the merged weights rounded to
    /// that dtype exactly; the remaining (rounding) difference is printed.
    #[arg(long)]
    pub tolerance: Option<f64>,
    /// Intra-op CPU threads for libtorch (default: libtorch's choice).
    #[arg(long)]
    pub threads: Option<i32>,
}

/// A few fixed token sequences covering the vocabulary, `[3, 16]`.
fn probe_ids(vocab: i64, device: Device) -> Result<Tensor> {
    let ids: Vec<i64> =
        (0..3i64).flat_map(|s| (0..16i64).map(move |j| (7 + 31 * j + 17 * j * j + 101 * s) % vocab.max(1))).collect();
    Ok(Tensor::f_from_slice(&ids)?.f_view([3, 16])?.f_to_device(device)?)
}

fn probe_logits(lm: &CausalLm, ids: &Tensor) -> Result<Tensor> {
    Ok(tch::no_grad(|| lm.forward(ids, &ForwardOptions::default(), None))?.f_to_kind(Kind::Float)?)
}

fn stored_kind(name: Option<&str>) -> Kind {
    match name {
        Some("bfloat16") => Kind::BFloat16,
        Some("float16") => Kind::Half,
        _ => Kind::Float,
    }
}

fn same_folder(a: &Path, b: &Path) -> bool {
    matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Largest `|a − b| / max(1, |b|)`, and the largest `|a − b|`.
fn logit_difference(a: &Tensor, b: &Tensor) -> Result<(f64, f64)> {
    let diff = a.f_sub(b)?.f_abs()?;
    let rel = diff.f_div(&b.f_abs()?.f_clamp_min(1.0)?)?.f_max()?.f_double_value(&[])?;
    Ok((rel, diff.f_max()?.f_double_value(&[])?))
}

/// Rounds every variable to `stored` and back (what loading an export in that dtype gives).
fn round_variables(vs: &tch::nn::VarStore, stored: Kind) -> Result<()> {
    tch::no_grad(|| {
        for (_, v) in vs.variables() {
            let rounded = v.f_to_kind(stored)?.f_to_kind(v.kind())?;
            v.shallow_clone().f_copy_(&rounded)?;
        }
        Ok(())
    })
}

pub fn run(args: ExportArgs) -> Result<()> {
    if let Some(n) = args.threads {
        tch::set_num_threads(n);
    }
    let device = parse_device(&args.device)?;
    let base_dir = resolve_model_dir(&args.model)?;
    if !args.adapter.is_dir() {
        bail!("--adapter {}: no such adapter folder", args.adapter.display());
    }
    if same_folder(&args.out, &base_dir) || same_folder(&args.out, &args.adapter) {
        bail!("--out {}: would overwrite an input folder; choose a new folder", args.out.display());
    }
    if let Some(t) = args.tolerance {
        if !(t >= 0.0) {
            bail!("--tolerance: expected a number ≥ 0, found {t}");
        }
    }
    let mut m = load_causal_lm(&base_dir, device, Kind::Float)?;
    let stored = match args.dtype.as_deref() {
        Some(d) => parse_dtype(Some(d), device)?,
        None => stored_kind(m.lm.config.stored_dtype.as_deref()),
    };
    let probe = probe_ids(m.lm.config.vocab_size, device)?;
    let base_logits = probe_logits(&m.lm, &probe)?;
    let lora = load_adapter(&m.vs, &mut m.lm, &args.adapter)?;
    let adapted = m.lm.linears().into_iter().filter(|(_, l)| l.lora.is_some()).count();
    let want = probe_logits(&m.lm, &probe)?;
    let (effect, _) = logit_difference(&want, &base_logits)?;
    merge_lora(&m.vs, &mut m.lm)?;
    let tolerance = args.tolerance.unwrap_or(1e-4);
    let (merge_rel, merge_abs) = logit_difference(&probe_logits(&m.lm, &probe)?, &want)?;
    if !(merge_rel <= tolerance) {
        bail!(
            "merging {} changes the probe logits by {merge_abs:.3e} (relative {merge_rel:.3e}), above the tolerance {tolerance:.1e}; nothing was written",
            args.adapter.display()
        );
    }

    let mut report = None;
    write_folder(&args.out, |tmp| {
        let tensors = causal_lm_tensors(&m.vs, &m.lm.config);
        save_tensors(&tensors, tmp, Some(stored), DEFAULT_MAX_SHARD_BYTES)?;
        write_config(&m.lm.config, tmp, stored, m.lm.config.model_type.causal_lm_architecture())?;
        copy_companions(&base_dir, tmp)?;
        // tokenizer files saved with the adapter (e.g. a chat template added in SFT) win
        copy_companions(&args.adapter, tmp)?;
        drop(tensors);
        // the folder must give exactly the merged model as rounded to the stored dtype
        round_variables(&m.vs, stored)?;
        let expected = probe_logits(&m.lm, &probe)?;
        drop(m);
        let written = load_causal_lm(tmp, device, Kind::Float)?;
        let got = probe_logits(&written.lm, &probe)?;
        let (file_rel, file_abs) = logit_difference(&got, &expected)?;
        if !(file_rel <= 1e-6) {
            bail!(
                "the written folder does not reproduce the merged model: probe logits differ by {file_abs:.3e}; nothing was written to {}",
                args.out.display()
            );
        }
        report = Some(logit_difference(&got, &want)?);
        Ok(())
    })?;
    let (rel, max_abs) = report.unwrap_or_default();
    println!(
        "merged {} (r {}, alpha {}, {adapted} modules) into {} → {} ({})",
        args.adapter.display(),
        lora.r,
        lora.alpha,
        base_dir.display(),
        args.out.display(),
        align_core::checkpoint::hf_dtype_name(stored)
    );
    println!(
        "probe logits: max abs difference {max_abs:.3e} (relative {rel:.3e}) between the exported model and base + adapter; merge in f32: {merge_abs:.3e} (tolerance {tolerance:.1e}); the adapter itself moves them by up to {effect:.3e} (relative)"
    );
    Ok(())
}
