//! `align export`: merges a LoRA adapter into its base model and writes a plain HF model folder
//! (a causal LM, or for a reward-model adapter a `*ForSequenceClassification` folder), verified by
//! comparing the reloaded folder's logits (scores) with base + adapter on a probe batch.
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use clap::Args;
use tch::{Device, Kind, Tensor};

use align_core::checkpoint::{
    causal_lm_tensors, copy_companions, load_causal_lm, resolve_model_dir, save_tensors, write_config, write_folder,
    DEFAULT_MAX_SHARD_BYTES,
};
use align_core::device::{parse_device, parse_dtype};
use align_core::lora::{load_adapter, merge_lora, read_adapter_folder_config, LoraConfig};
use align_core::model::ForwardOptions;
use align_core::scalar_model::{
    load_reward_model, load_scalar_model, write_scalar_model, LoadedScalarModel, ScoreInit,
};
use align_core::{LoadedModel, ModelConfig, ModelTokenizer};

#[derive(Args)]
pub struct ExportArgs {
    /// Base model folder (HF layout) or a hub id present in the local HF cache (default: the
    /// adapter's base_model_name_or_path).
    #[arg(long)]
    pub model: Option<String>,
    /// LoRA adapter folder (PEFT layout: adapter_config.json + adapter_model.safetensors). A
    /// reward-model adapter (task_type SEQ_CLS, with its score head) exports a reward model.
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

/// The model an adapter is merged into: a causal LM, or a reward model (trunk + score head).
enum Exported {
    Causal(LoadedModel),
    Reward(LoadedScalarModel),
}

impl Exported {
    /// `base` in f32; a reward model on a causal LM's trunk starts with a zero head (the adapter
    /// carries the trained one) and pads with `tokenizer_dir`'s padding id.
    fn load(base: &Path, reward: bool, tokenizer_dir: &Path, device: Device) -> Result<Self> {
        if !reward {
            return Ok(Exported::Causal(load_causal_lm(base, device, Kind::Float)?));
        }
        let pad = ModelTokenizer::from_dir(tokenizer_dir)?.padding_id();
        Ok(Exported::Reward(load_scalar_model(base, device, Kind::Float, pad, |_| ScoreInit::Zeros)?))
    }

    /// A written folder, loaded back in f32.
    fn reload(dir: &Path, reward: bool, device: Device) -> Result<Self> {
        Ok(if reward {
            Exported::Reward(load_reward_model(dir, device, Kind::Float)?)
        } else {
            Exported::Causal(load_causal_lm(dir, device, Kind::Float)?)
        })
    }

    fn config(&self) -> &ModelConfig {
        match self {
            Exported::Causal(m) => &m.lm.config,
            Exported::Reward(m) => &m.rm.config,
        }
    }

    fn vs(&self) -> &tch::nn::VarStore {
        match self {
            Exported::Causal(m) => &m.vs,
            Exported::Reward(m) => &m.vs,
        }
    }

    /// Logits `[B, T, vocab]`, or a reward model's score at every position `[B, T]`, in f32.
    fn probe(&self, ids: &Tensor) -> Result<Tensor> {
        let out = tch::no_grad(|| match self {
            Exported::Causal(m) => m.lm.forward(ids, &ForwardOptions::default(), None),
            Exported::Reward(m) => m.rm.forward_all(ids, &ForwardOptions::default()),
        })?;
        Ok(out.f_to_kind(Kind::Float)?)
    }

    /// Loads the adapter; returns its config and the number of adapted projections.
    fn load_adapter(&mut self, adapter: &Path) -> Result<(LoraConfig, usize)> {
        let (lora, linears) = match self {
            Exported::Causal(m) => (load_adapter(&m.vs, &mut m.lm, adapter)?, m.lm.linears()),
            Exported::Reward(m) => (load_adapter(&m.vs, &mut m.rm, adapter)?, m.rm.linears()),
        };
        let adapted = linears.into_iter().filter(|(_, l)| l.lora.is_some()).count();
        Ok((lora, adapted))
    }

    fn merge(&mut self) -> Result<()> {
        match self {
            Exported::Causal(m) => merge_lora(&m.vs, &mut m.lm),
            Exported::Reward(m) => merge_lora(&m.vs, &mut m.rm),
        }
    }

    /// Weights (in `stored`) and config.json into `dir`.
    fn write(&self, dir: &Path, stored: Kind) -> Result<()> {
        match self {
            Exported::Causal(m) => {
                let tensors = causal_lm_tensors(&m.vs, &m.lm.config);
                save_tensors(&tensors, dir, Some(stored), DEFAULT_MAX_SHARD_BYTES)?;
                write_config(&m.lm.config, dir, stored, m.lm.config.model_type.causal_lm_architecture())
            }
            Exported::Reward(m) => write_scalar_model(&m.vs, &m.rm, dir, Some(stored), None),
        }
    }
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
    if !args.adapter.is_dir() {
        bail!("--adapter {}: no such adapter folder", args.adapter.display());
    }
    let folder = read_adapter_folder_config(&args.adapter)?;
    let base_dir = match &args.model {
        Some(m) => resolve_model_dir(m)?,
        None => folder.base_model_dir(&args.adapter).context("--model not given")?,
    };
    if same_folder(&args.out, &base_dir) || same_folder(&args.out, &args.adapter) {
        bail!("--out {}: would overwrite an input folder; choose a new folder", args.out.display());
    }
    if let Some(t) = args.tolerance {
        if !(t >= 0.0) {
            bail!("--tolerance: expected a number ≥ 0, found {t}");
        }
    }
    let reward = folder.is_reward_model();
    let tokenizer_dir = if args.adapter.join("tokenizer.json").is_file() { &args.adapter } else { &base_dir };
    let mut m = Exported::load(&base_dir, reward, tokenizer_dir, device)?;
    let stored = match args.dtype.as_deref() {
        Some(d) => parse_dtype(Some(d), device)?,
        None => stored_kind(m.config().stored_dtype.as_deref()),
    };
    let probe = probe_ids(m.config().vocab_size, device)?;
    let base_out = m.probe(&probe)?;
    let (lora, adapted) = m.load_adapter(&args.adapter)?;
    let want = m.probe(&probe)?;
    let (effect, _) = logit_difference(&want, &base_out)?;
    m.merge()?;
    let tolerance = args.tolerance.unwrap_or(1e-4);
    let (merge_rel, merge_abs) = logit_difference(&m.probe(&probe)?, &want)?;
    let what = if reward { "scores" } else { "logits" };
    if !(merge_rel <= tolerance) {
        bail!(
            "merging {} changes the probe {what} by {merge_abs:.3e} (relative {merge_rel:.3e}), above the tolerance {tolerance:.1e}; nothing was written",
            args.adapter.display()
        );
    }

    let mut report = None;
    write_folder(&args.out, |tmp| {
        m.write(tmp, stored)?;
        copy_companions(&base_dir, tmp)?;
        // tokenizer files saved with the adapter (e.g. a chat template added in SFT) win
        copy_companions(&args.adapter, tmp)?;
        // the folder must give exactly the merged model as rounded to the stored dtype
        round_variables(m.vs(), stored)?;
        let expected = m.probe(&probe)?;
        drop(m);
        let got = Exported::reload(tmp, reward, device)?.probe(&probe)?;
        let (file_rel, file_abs) = logit_difference(&got, &expected)?;
        if !(file_rel <= 1e-6) {
            bail!(
                "the written folder does not reproduce the merged model: probe {what} differ by {file_abs:.3e}; nothing was written to {}",
                args.out.display()
            );
        }
        report = Some(logit_difference(&got, &want)?);
        Ok(())
    })?;
    let (rel, max_abs) = report.unwrap_or_default();
    println!(
        "merged {} (r {}, alpha {}, {adapted} modules{}) into {} → {} ({}{})",
        args.adapter.display(),
        lora.r,
        lora.alpha,
        if reward { ", score head" } else { "" },
        base_dir.display(),
        args.out.display(),
        if reward { "reward model, " } else { "" },
        align_core::checkpoint::hf_dtype_name(stored)
    );
    println!(
        "probe {what}: max abs difference {max_abs:.3e} (relative {rel:.3e}) between the exported model and base + adapter; merge in f32: {merge_abs:.3e} (tolerance {tolerance:.1e}); the adapter itself moves them by up to {effect:.3e} (relative)"
    );
    Ok(())
}
