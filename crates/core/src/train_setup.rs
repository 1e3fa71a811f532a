//! Loading the model a training stage starts from (device, dtype, tuning method) and saving or
//! restoring it for checkpoints: the part of every stage's set-up that is not stage-specific.
use std::path::Path;

use anyhow::{bail, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_causal_lm, load_weights, resolve_model_dir, write_pretrained, LoadedModel, SaveOptions};
use crate::device::{enable_cpu_features, parse_device, parse_dtype};
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

impl TrainingModel {
    /// Loads `model` of the config on `train.device` in `train.dtype` and prepares the method.
    pub fn load(cfg: &LoadedConfig) -> Result<Self> {
        let t = &cfg.config.train;
        if let Some(n) = t.threads {
            tch::set_num_threads(n);
        }
        enable_cpu_features();
        let device = parse_device(&t.device)?;
        let kind = parse_dtype(t.dtype.as_deref(), device)?;
        let dir = resolve_model_dir(&cfg.config.model)?;
        let loaded = load_causal_lm(&dir, device, kind)?;
        let tokenizer = ModelTokenizer::from_dir(&dir)?;
        let method = cfg.config.method;
        match method {
            Method::Full => {}
            Method::Lora | Method::Freeze => {
                bail!("{}: method '{method:?}' is not wired into training yet", cfg.origin.display())
            }
        }
        Ok(TrainingModel { loaded, tokenizer, device, kind, method })
    }

    /// Parameters that receive gradients, by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        let mut v: Vec<(String, Tensor)> =
            self.loaded.vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
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
