//! Loading the model a training stage starts from (device, dtype, tuning method) — a causal LM
//! or a scalar-head model — and saving or restoring it for checkpoints: the part of every
//! stage's set-up that is not stage-specific.
use std::path::Path;

use anyhow::{bail, Result};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::checkpoint::{load_causal_lm, load_weights, resolve_model_dir, write_pretrained, LoadedModel, SaveOptions};
use crate::config::ModelConfig;
use crate::device::{enable_cpu_features, parse_device, parse_dtype};
use crate::scalar_model::{
    load_reward_model, scalar_model_from_causal_lm, write_scalar_model, LoadedScalarModel, ScoreInit,
};
use crate::tokenizer::ModelTokenizer;
use crate::train_config::{LoadedConfig, Method};
use crate::trainer::ModelState;

/// The policy model of a training run and its tokenizer.
pub struct TrainingModel {
    pub loaded: LoadedModel,
    pub tokenizer: ModelTokenizer,
    pub device: Device,
    pub kind: Kind,
    pub method: Method,
}

/// The device and dtype of a run (`train.device`, `train.dtype`, `train.threads` applied).
pub fn training_device(cfg: &LoadedConfig) -> Result<(Device, Kind)> {
    let t = &cfg.config.train;
    if let Some(n) = t.threads {
        tch::set_num_threads(n);
    }
    enable_cpu_features();
    let device = parse_device(&t.device)?;
    Ok((device, parse_dtype(t.dtype.as_deref(), device)?))
}

/// Refuses the tuning methods that are not available for training yet.
fn check_method(cfg: &LoadedConfig) -> Result<Method> {
    let method = cfg.config.method;
    match method {
        Method::Full => Ok(method),
        Method::Lora | Method::Freeze => bail!(
            "{}: key 'method': '{}' is not wired into training yet (use method = \"full\")",
            cfg.origin.display(),
            format!("{method:?}").to_lowercase()
        ),
    }
}

/// Parameters of `vs` that receive gradients, by HF name, sorted.
fn trainable(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut v: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

impl TrainingModel {
    /// Loads `model` of the config on `train.device` in `train.dtype` and prepares the method.
    pub fn load(cfg: &LoadedConfig) -> Result<Self> {
        let (device, kind) = training_device(cfg)?;
        let dir = resolve_model_dir(&cfg.config.model)?;
        let method = check_method(cfg)?;
        let loaded = load_causal_lm(&dir, device, kind)?;
        let tokenizer = ModelTokenizer::from_dir(&dir)?;
        Ok(TrainingModel { loaded, tokenizer, device, kind, method })
    }

    /// Parameters that receive gradients, by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        trainable(&self.loaded.vs)
    }
}

impl ModelState for TrainingModel {
    fn save(&self, dir: &Path) -> Result<()> {
        let opts = SaveOptions { companions_from: Some(&self.loaded.dir), ..Default::default() };
        write_pretrained(&self.loaded.vs, &self.loaded.lm.config, dir, &opts)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        load_weights(&self.loaded.vs, dir, self.loaded.lm.config.tie_word_embeddings)
    }
}

/// A scalar-head model being trained (the reward model; PPO's value model later) and its tokenizer.
pub struct TrainingScalarModel {
    pub loaded: LoadedScalarModel,
    pub tokenizer: ModelTokenizer,
    pub device: Device,
    pub kind: Kind,
}

impl TrainingScalarModel {
    /// Loads `model` of the config: a reward-model folder as it is, or a causal LM's trunk with a
    /// new head initialised by `init(hidden_size)`. The padding id is the tokenizer's.
    pub fn load(cfg: &LoadedConfig, init: impl FnOnce(i64) -> ScoreInit) -> Result<Self> {
        let (device, kind) = training_device(cfg)?;
        let dir = resolve_model_dir(&cfg.config.model)?;
        check_method(cfg)?;
        let tokenizer = ModelTokenizer::from_dir(&dir)?;
        let config = ModelConfig::from_dir(&dir)?;
        let is_scalar = config
            .raw
            .get("architectures")
            .and_then(|a| a.as_array())
            .is_some_and(|a| a.iter().filter_map(|x| x.as_str()).any(|x| x.ends_with("ForSequenceClassification")));
        let loaded = if is_scalar {
            load_reward_model(&dir, device, kind)?
        } else {
            scalar_model_from_causal_lm(&dir, device, kind, tokenizer.padding_id(), init(config.hidden_size))?
        };
        Ok(TrainingScalarModel { loaded, tokenizer, device, kind })
    }

    /// Parameters that receive gradients (trunk and head), by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        trainable(&self.loaded.vs)
    }
}

impl ModelState for TrainingScalarModel {
    fn save(&self, dir: &Path) -> Result<()> {
        write_scalar_model(&self.loaded.vs, &self.loaded.rm, dir, None, Some(&self.loaded.dir))
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        load_weights(&self.loaded.vs, dir, self.loaded.rm.config.tie_word_embeddings)
    }
}
