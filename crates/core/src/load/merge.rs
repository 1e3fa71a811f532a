//! The one merge path: a PEFT adapter merged into its base model (a causal LM, or for a
//! reward-model adapter a `*ForSequenceClassification` model), checked on a probe batch
//! (merged logits or scores against base + adapter), written to a folder and checked again
//! after reloading it. `align export` and the pipeline both write merged models through it.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::hf::checkpoint::{causal_lm_tensors, copy_companions, save_tensors, write_config, DEFAULT_MAX_SHARD_BYTES};
use crate::hf::folder::write_folder;
use crate::load::spec::{tokenizer_for, AdapterMode, ModelSpec};
use crate::model::decoder::ForwardOptions;
use crate::model::scalar::{load_reward_model, load_scalar_model, write_scalar_model, LoadedScalarModel, ScoreInit};
use crate::peft::ia3::{load_ia3_adapter, merge_ia3};
use crate::peft::lora::{
    adapter_base_model_dir, adapter_peft_type, adapter_reward_task, load_adapter, merge_lora,
    read_adapter_folder_config, LoraConfig,
};
use crate::{LoadedModel, ModelConfig};

/// How to merge.
#[derive(Debug, Clone)]
pub struct MergeOptions {
    /// Stored dtype of the merged weights (None: the base checkpoint's).
    pub dtype: Option<Kind>,
    /// Where the merge runs (always in f32).
    pub device: Device,
    /// Largest allowed |merged − (base + adapter)| probe difference, relative to max(1, |logit|).
    pub tolerance: f64,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions { dtype: None, device: Device::Cpu, tolerance: 1e-4 }
    }
}

/// What a merge measured.
#[derive(Debug, Clone)]
pub struct MergeReport {
    /// What was merged (`LoRA r 8, alpha 16`, `DoRA r 8, alpha 16`, `(IA)³`).
    pub adapter: String,
    /// Adapted projections.
    pub adapted: usize,
    /// A reward-model adapter (the output is a `*ForSequenceClassification` folder).
    pub reward: bool,
    pub stored: Kind,
    /// Largest relative probe change the adapter itself makes.
    pub effect: f64,
    /// Merge in f32 vs base + adapter: largest absolute and relative probe difference.
    pub merge_abs: f64,
    pub merge_rel: f64,
    /// The written folder vs base + adapter.
    pub exported_abs: f64,
    pub exported_rel: f64,
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
            return Ok(Exported::Causal(
                ModelSpec::at(base, None, device, Kind::Float).causal_lm(AdapterMode::Merge)?.model,
            ));
        }
        let pad = tokenizer_for(tokenizer_dir, &ModelConfig::from_dir(base)?, base)?.padding_id();
        Ok(Exported::Reward(load_scalar_model(base, device, Kind::Float, pad, |_| ScoreInit::Zeros)?))
    }

    /// A written folder, loaded back in f32.
    fn reload(dir: &Path, reward: bool, device: Device) -> Result<Self> {
        Ok(if reward {
            Exported::Reward(load_reward_model(dir, device, Kind::Float)?)
        } else {
            Exported::Causal(ModelSpec::at(dir, None, device, Kind::Float).causal_lm(AdapterMode::Merge)?.model)
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

    /// Loads the adapter (LoRA, or (IA)³ on a causal LM); returns what it is and the number of
    /// adapted projections.
    fn load_adapter(&mut self, adapter: &Path) -> Result<(String, usize)> {
        let describe =
            |l: &LoraConfig| format!("{} r {}, alpha {}", if l.use_dora { "DoRA" } else { "LoRA" }, l.r, l.alpha);
        let ia3 = adapter_peft_type(adapter)? == "IA3";
        let (what, linears) = match self {
            Exported::Causal(m) if ia3 => {
                load_ia3_adapter(&m.vs, &mut m.lm, adapter, false)?;
                ("(IA)³".to_string(), m.lm.linears())
            }
            Exported::Causal(m) => (describe(&load_adapter(&m.vs, &mut m.lm, adapter)?), m.lm.linears()),
            Exported::Reward(m) if ia3 => {
                load_ia3_adapter(&m.vs, &mut m.rm, adapter, false)?;
                ("(IA)³".to_string(), m.rm.linears())
            }
            Exported::Reward(m) => (describe(&load_adapter(&m.vs, &mut m.rm, adapter)?), m.rm.linears()),
        };
        let adapted = linears.into_iter().filter(|(_, l)| l.lora.is_some() || l.ia3.is_some()).count();
        Ok((what, adapted))
    }

    fn merge(&mut self) -> Result<()> {
        match self {
            Exported::Causal(m) if m.lm.model.ia3_config().is_some() => merge_ia3(&m.vs, &mut m.lm),
            Exported::Causal(m) => merge_lora(&m.vs, &mut m.lm),
            Exported::Reward(m) if m.rm.model.ia3_config().is_some() => merge_ia3(&m.vs, &mut m.rm),
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

/// Merges `adapter` into `base_dir` and writes the merged model to `out` (through a temporary
/// folder: nothing is written when a check fails). Tokenizer files saved with the adapter win
/// over the base's.
pub fn merge_adapter(base_dir: &Path, adapter: &Path, out: &Path, opts: &MergeOptions) -> Result<MergeReport> {
    let device = opts.device;
    if !adapter.is_dir() {
        bail!("{}: no such adapter folder", adapter.display());
    }
    if same_folder(out, base_dir) || same_folder(out, adapter) {
        bail!("{}: would overwrite an input folder; choose a new folder", out.display());
    }
    let reward = adapter_reward_task(adapter)?.0;
    let tokenizer_dir = if adapter.join("tokenizer.json").is_file() { adapter } else { base_dir };
    let mut m = Exported::load(base_dir, reward, tokenizer_dir, device)?;
    let stored = opts.dtype.unwrap_or_else(|| stored_kind(m.config().stored_dtype.as_deref()));
    let probe = probe_ids(m.config().vocab_size, device)?;
    let base_out = m.probe(&probe)?;
    let (merged_kind, adapted) = m.load_adapter(adapter)?;
    let want = m.probe(&probe)?;
    let (effect, _) = logit_difference(&want, &base_out)?;
    m.merge()?;
    let tolerance = opts.tolerance;
    let (merge_rel, merge_abs) = logit_difference(&m.probe(&probe)?, &want)?;
    let what = if reward { "scores" } else { "logits" };
    if !(merge_rel <= tolerance) {
        bail!(
            "merging {} changes the probe {what} by {merge_abs:.3e} (relative {merge_rel:.3e}), above the tolerance {tolerance:.1e}; nothing was written",
            adapter.display()
        );
    }

    let mut report = None;
    write_folder(out, |tmp| {
        m.write(tmp, stored)?;
        copy_companions(base_dir, tmp)?;
        // tokenizer files saved with the adapter (e.g. a chat template added in SFT) win
        copy_companions(adapter, tmp)?;
        // the folder must give exactly the merged model as rounded to the stored dtype
        round_variables(m.vs(), stored)?;
        let expected = m.probe(&probe)?;
        drop(m);
        let got = Exported::reload(tmp, reward, device)?.probe(&probe)?;
        let (file_rel, file_abs) = logit_difference(&got, &expected)?;
        if !(file_rel <= 1e-6) {
            bail!(
                "the written folder does not reproduce the merged model: probe {what} differ by {file_abs:.3e}; nothing was written to {}",
                out.display()
            );
        }
        report = Some(logit_difference(&got, &want)?);
        Ok(())
    })?;
    let (exported_rel, exported_abs) = report.unwrap_or_default();
    Ok(MergeReport {
        adapter: merged_kind,
        adapted,
        reward,
        stored,
        effect,
        merge_abs,
        merge_rel,
        exported_abs,
        exported_rel,
    })
}

/// The base a PEFT adapter folder names (`base_model_name_or_path`), resolved.
pub fn adapter_base_dir(adapter: &Path) -> Result<PathBuf> {
    if adapter_peft_type(adapter)? != "LORA" {
        return adapter_base_model_dir(adapter);
    }
    read_adapter_folder_config(adapter)?.base_model_dir(adapter)
}
