//! The one model loader: a [`ModelSpec`] (model folder or cached hub id, optional PEFT adapter,
//! device, dtype, threads) loads a causal LM or a scalar (reward / value) model with its adapter
//! merged or attached, and the tokenizer — the adapter folder's tokenizer files win over the
//! base's (an adapter saved after SFT carries the chat template it was trained with). Every CLI
//! command, the pipeline, the DPO/PPO references and the trainer load through it.
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use tch::{Device, Kind};

use crate::hf::checkpoint::resolve_model_dir;
use crate::hf::config::ModelConfig;
use crate::model::device::{enable_cpu_features, parse_device, parse_dtype};
use crate::model::io::{load_causal_lm, variable_bytes, LoadedModel};
use crate::model::quant::Quantization;
use crate::model::scalar::{
    is_sequence_classifier, load_reward_model, load_scalar_model, LoadedScalarModel, ScoreInit,
};
use crate::peft::ia3::{load_ia3_adapter, merge_ia3, Ia3Config};
use crate::peft::lora::ADAPTER_CONFIG_FILE;
use crate::peft::lora::{adapter_base_model_dir, adapter_peft_type, adapter_reward_task};
use crate::peft::lora::{is_adapter_variable, load_adapter, merge_lora, LoraConfig};
use crate::peft::prompt::{is_prompt_adapter, load_prompt_adapter, PromptLearningConfig};
use crate::text::tokenizer::ModelTokenizer;

/// The adapter folder when it holds tokenizer files, else the model folder.
fn tokenizer_dir_of(model: &Path, adapter: Option<&Path>) -> PathBuf {
    match adapter {
        Some(a) if a.join("tokenizer.json").is_file() => a.to_path_buf(),
        _ => model.to_path_buf(),
    }
}

/// Refuses a tokenizer that produces ids the model has no embedding row for (its largest token
/// id or its padding id ≥ `vocab_size` of the model's config.json). A config vocabulary larger
/// than the tokenizer (padding rows, as many HF models have) is fine.
pub fn check_tokenizer_fits(tokenizer: &ModelTokenizer, config: &ModelConfig, model_dir: &Path) -> Result<()> {
    let vocab = config.vocab_size;
    let config_file = model_dir.join("config.json");
    if let Some(max) = tokenizer.max_token_id().filter(|&m| m >= vocab) {
        bail!(
            "{}: the tokenizer has {} tokens with ids up to {max}, but {} has vocab_size {vocab} (expected every token id below vocab_size; tokenizer and model do not belong together)",
            tokenizer.dir.display(),
            tokenizer.vocab_size(),
            config_file.display()
        );
    }
    let pad = tokenizer.padding_id();
    if pad < 0 || pad >= vocab {
        bail!(
            "{}: the padding token id {pad} is outside the vocabulary of {} (vocab_size {vocab}; expected 0 ≤ id < vocab_size)",
            tokenizer.dir.display(),
            config_file.display()
        );
    }
    Ok(())
}

/// The tokenizer of `tokenizer_dir`, checked to fit the model of `model_dir` ([`check_tokenizer_fits`]).
pub fn tokenizer_for(tokenizer_dir: &Path, config: &ModelConfig, model_dir: &Path) -> Result<ModelTokenizer> {
    let tokenizer = ModelTokenizer::from_dir(tokenizer_dir)?;
    check_tokenizer_fits(&tokenizer, config, model_dir)?;
    Ok(tokenizer)
}

/// What to load and where.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A model folder (HF layout) or a hub id already in the local Hugging Face cache.
    pub model: String,
    /// A PEFT adapter folder applied on top of `model`.
    pub adapter: Option<String>,
    pub device: Device,
    pub dtype: Kind,
    /// libtorch's intra-op CPU threads (None: libtorch's choice).
    pub threads: Option<i32>,
    /// Hold the decoder's projections quantised (applied after the weights are loaded; an
    /// adapter is then attached on top, never merged).
    pub quantize: Option<Quantization>,
}

/// What happens to the adapter at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterMode {
    /// Merged into the weights (inference, references, export): no adapter remains.
    Merge,
    /// Attached as trainable LoRA layers or virtual tokens (continuing an adapter run).
    Attach,
}

/// The adapter a [`ModelSpec`] applied.
#[derive(Debug, Clone, PartialEq)]
pub enum LoadedAdapter {
    Lora(LoraConfig),
    /// Prompt or prefix tuning: always attached (virtual tokens have no weights to merge into).
    Prompt(PromptLearningConfig),
    Ia3(Ia3Config),
}

/// A causal LM loaded by a [`ModelSpec`].
pub struct LoadedCausalLm {
    pub model: LoadedModel,
    pub tokenizer: ModelTokenizer,
    /// The adapter folder that was applied, and its configuration.
    pub adapter: Option<(PathBuf, LoadedAdapter)>,
    pub device: Device,
    pub kind: Kind,
}

impl ModelSpec {
    /// From user flags: `device` is `auto|cpu|cuda|cuda:N`, `dtype` `f32|bf16|f16` (None: f32 on
    /// CPU, bf16 on CUDA).
    pub fn from_flags(
        model: &str,
        adapter: Option<&str>,
        device: &str,
        dtype: Option<&str>,
        threads: Option<i32>,
    ) -> Result<Self> {
        let device = parse_device(device)?;
        let dtype = parse_dtype(dtype, device)?;
        Ok(ModelSpec {
            model: model.to_string(),
            adapter: adapter.map(str::to_string),
            device,
            dtype,
            threads,
            quantize: None,
        })
    }

    /// A folder (and adapter) on a device and dtype already chosen.
    pub fn at(model: &Path, adapter: Option<&Path>, device: Device, dtype: Kind) -> Self {
        ModelSpec {
            model: model.display().to_string(),
            adapter: adapter.map(|a| a.display().to_string()),
            device,
            dtype,
            threads: None,
            quantize: None,
        }
    }

    /// The same spec with the base held quantised as `q` says (None: in full precision).
    pub fn quantized(mut self, q: Option<Quantization>) -> Self {
        self.quantize = q;
        self
    }

    /// Applies the thread count and the CPU kernel settings (before the first tensor op).
    pub fn apply_runtime(&self) {
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        enable_cpu_features();
    }

    /// The model folder (a hub id resolved in the local cache).
    pub fn model_dir(&self) -> Result<PathBuf> {
        resolve_model_dir(&self.model)
    }

    /// The adapter folder, checked to exist.
    pub fn adapter_dir(&self) -> Result<Option<PathBuf>> {
        match &self.adapter {
            None => Ok(None),
            Some(a) => {
                let dir = PathBuf::from(a);
                if !dir.is_dir() {
                    bail!("adapter {}: no such adapter folder", dir.display());
                }
                Ok(Some(dir))
            }
        }
    }

    /// Where the tokenizer is read from: the adapter folder when it holds tokenizer files, else
    /// the model folder.
    pub fn tokenizer_dir(&self) -> Result<PathBuf> {
        Ok(tokenizer_dir_of(&self.model_dir()?, self.adapter_dir()?.as_deref()))
    }

    pub fn tokenizer(&self) -> Result<ModelTokenizer> {
        ModelTokenizer::from_dir(&self.tokenizer_dir()?)
    }

    /// Loads the causal LM with its adapter merged or attached, and its tokenizer. With
    /// `quantize` the projections are quantised after loading and an adapter is always attached
    /// (under `Merge` frozen, for inference).
    pub fn causal_lm(&self, mode: AdapterMode) -> Result<LoadedCausalLm> {
        self.apply_runtime();
        let dir = self.model_dir()?;
        let adapter_dir = self.adapter_dir()?;
        // the tokenizer is checked against config.json before any weight is read
        let tokenizer =
            tokenizer_for(&tokenizer_dir_of(&dir, adapter_dir.as_deref()), &ModelConfig::from_dir(&dir)?, &dir)?;
        let mut model = load_causal_lm(&dir, self.device, self.dtype)?;
        if let Some(q) = self.quantize {
            model.lm.model.quantize(&model.vs, q).with_context(|| format!("{}: quantising", dir.display()))?;
            tracing::info!(
                "quantised the projections to {} ({:.1} MiB; the rest of the model {:.1} MiB)",
                q.describe(),
                model.lm.model.quantized_bytes() as f64 / (1 << 20) as f64,
                variable_bytes(&model.vs) as f64 / (1 << 20) as f64
            );
        }
        let mut adapter = None;
        if let Some(a) = adapter_dir.clone().filter(|a| is_prompt_adapter(a).unwrap_or(false)) {
            // virtual tokens are attached, trainable only to continue training them
            let cfg = load_prompt_adapter(&model.vs, &mut model.lm, &a, mode == AdapterMode::Attach)?;
            tracing::info!(
                "attached {} adapter {} ({} virtual tokens)",
                cfg.peft_type(),
                a.display(),
                cfg.num_virtual_tokens()
            );
            return Ok(LoadedCausalLm {
                model,
                tokenizer,
                adapter: Some((a, LoadedAdapter::Prompt(cfg))),
                device: self.device,
                kind: self.dtype,
            });
        }
        if let Some(a) = adapter_dir.clone().filter(|a| adapter_peft_type(a).is_ok_and(|t| t == "IA3")) {
            let cfg = load_ia3_adapter(&model.vs, &mut model.lm, &a, mode == AdapterMode::Attach)?;
            if mode == AdapterMode::Merge && self.quantize.is_none() {
                merge_ia3(&model.vs, &mut model.lm)?;
                tracing::info!("merged (IA)³ adapter {}", a.display());
            } else {
                tracing::info!("attached (IA)³ adapter {}", a.display());
            }
            return Ok(LoadedCausalLm {
                model,
                tokenizer,
                adapter: Some((a, LoadedAdapter::Ia3(cfg))),
                device: self.device,
                kind: self.dtype,
            });
        }
        if let Some(a) = adapter_dir {
            let lora = load_adapter(&model.vs, &mut model.lm, &a)?;
            if mode == AdapterMode::Merge && self.quantize.is_some() {
                // never merged into a quantised base: attached on top, frozen
                for (name, v) in model.vs.variables() {
                    if is_adapter_variable(&name) {
                        let _ = v.set_requires_grad(false);
                    }
                }
                tracing::info!(
                    "attached LoRA adapter {} (r {}, alpha {}) on the quantised base",
                    a.display(),
                    lora.r,
                    lora.alpha
                );
            } else if mode == AdapterMode::Merge {
                merge_lora(&model.vs, &mut model.lm)?;
                tracing::info!("merged LoRA adapter {} (r {}, alpha {})", a.display(), lora.r, lora.alpha);
            }
            adapter = Some((a, LoadedAdapter::Lora(lora)));
        }
        Ok(LoadedCausalLm { model, tokenizer, adapter, device: self.device, kind: self.dtype })
    }

    /// Loads a reward model (a `*ForSequenceClassification` folder, or a `SEQ_CLS` adapter folder
    /// on its base, or `model` + `adapter`) with the adapter merged (prompt learning: attached),
    /// and its tokenizer.
    pub fn scalar_model(&self) -> Result<(LoadedScalarModel, ModelTokenizer)> {
        if let Some(q) = self.quantize {
            bail!(
                "{}: a reward model is loaded with its adapter merged, which a quantised ({}) base cannot take; score with the full-precision model",
                self.model,
                q.describe()
            );
        }
        self.apply_runtime();
        let dir = self.model_dir()?;
        let adapter = self.adapter_dir()?;
        let (m, tokenizer_dir) = load_reward_model_or_adapter(&dir, adapter.as_deref(), self.device, self.dtype)?;
        let tokenizer = tokenizer_for(&tokenizer_dir, &m.rm.config, &m.dir)?;
        Ok((m, tokenizer))
    }

    /// Loads `model` (no adapter) as a scalar model to train: a reward-model folder as it is, or
    /// a causal LM's trunk with a new head initialised by `init(hidden_size)`; padding with the
    /// tokenizer's padding id; with `quantize` the trunk's projections are quantised (the head
    /// stays dense and trains).
    pub fn scalar_model_to_train(
        &self,
        init: impl FnOnce(i64) -> ScoreInit,
    ) -> Result<(LoadedScalarModel, ModelTokenizer)> {
        self.apply_runtime();
        let dir = self.model_dir()?;
        let tokenizer = tokenizer_for(&dir, &ModelConfig::from_dir(&dir)?, &dir)?;
        let mut m = load_scalar_model(&dir, self.device, self.dtype, tokenizer.padding_id(), init)?;
        if let Some(q) = self.quantize {
            m.rm.model.quantize(&m.vs, q).with_context(|| format!("{}: quantising", dir.display()))?;
        }
        Ok((m, tokenizer))
    }
}

/// A reward model ready for scoring, from a reward-model folder or a reward-model adapter (LoRA,
/// (IA)³ or prompt learning), with the folder its tokenizer is read from:
/// * `dir` a `*ForSequenceClassification` folder, no `adapter`: that model;
/// * `dir` a PEFT adapter folder of a reward model (`adapter_config.json`, `task_type: "SEQ_CLS"`):
///   the adapter on its `base_model_name_or_path`;
/// * `adapter` given: that adapter on `dir` (a reward-model folder, or the causal LM whose trunk
///   the adapter and its `score` head were trained on).
///
/// A LoRA or (IA)³ adapter is merged into the weights, prompt learning's virtual tokens are
/// attached (frozen); tokenizer files saved with the adapter win over the base's.
pub fn load_reward_model_or_adapter(
    dir: &Path,
    adapter: Option<&Path>,
    device: Device,
    kind: Kind,
) -> Result<(LoadedScalarModel, PathBuf)> {
    let (base, adapter) = match adapter {
        Some(a) => {
            ensure!(
                !dir.join(ADAPTER_CONFIG_FILE).is_file(),
                "{}: an adapter folder given as the model together with the adapter {}; give the base model and the adapter",
                dir.display(),
                a.display()
            );
            (dir.to_path_buf(), a.to_path_buf())
        }
        None if dir.join(ADAPTER_CONFIG_FILE).is_file() => {
            let (reward, task) = adapter_reward_task(dir)?;
            ensure!(
                reward,
                "{}: field 'task_type': {} is not a reward-model adapter (expected \"SEQ_CLS\")",
                dir.join(ADAPTER_CONFIG_FILE).display(),
                task.as_deref().unwrap_or("none")
            );
            (adapter_base_model_dir(dir)?, dir.to_path_buf())
        }
        None => return Ok((load_reward_model(dir, device, kind)?, dir.to_path_buf())),
    };
    if !adapter.is_dir() {
        bail!("{}: no such adapter folder", adapter.display());
    }
    let tokenizer_dir = if adapter.join("tokenizer.json").is_file() { adapter.clone() } else { base.clone() };
    let base_config = ModelConfig::from_dir(&base)?;
    if !is_sequence_classifier(&base_config) {
        // the head must come from the adapter
        let (reward, task) = adapter_reward_task(&adapter)?;
        ensure!(
            reward,
            "{}: neither a reward model nor given with a reward-model adapter ({} has task_type {}, no score head)",
            base.display(),
            adapter.join(ADAPTER_CONFIG_FILE).display(),
            task.as_deref().unwrap_or("none")
        );
    }
    let pad = tokenizer_for(&tokenizer_dir, &base_config, &base)?.padding_id();
    let mut m = load_scalar_model(&base, device, kind, pad, |_| ScoreInit::Zeros)?;
    let context = || format!("adapter {} on {}", adapter.display(), base.display());
    if is_prompt_adapter(&adapter)? {
        // virtual tokens have no weights to merge into: attached, frozen
        load_prompt_adapter(&m.vs, &mut m.rm, &adapter, false).with_context(context)?;
    } else if adapter_peft_type(&adapter)? == "IA3" {
        load_ia3_adapter(&m.vs, &mut m.rm, &adapter, false).with_context(context)?;
        merge_ia3(&m.vs, &mut m.rm)?;
    } else {
        load_adapter(&m.vs, &mut m.rm, &adapter).with_context(context)?;
        merge_lora(&m.vs, &mut m.rm)?;
    }
    Ok((m, tokenizer_dir))
}
