//! Loading the model a training stage starts from (device, dtype, tuning method: full, LoRA or
//! freeze) and saving or restoring it for checkpoints: the part of every stage's set-up that is
//! not stage-specific.
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Kind, Tensor};

use crate::checkpoint::{load_causal_lm, load_weights, resolve_model_dir, write_pretrained, LoadedModel, SaveOptions};
use crate::device::{enable_cpu_features, parse_device, parse_dtype};
use crate::lora::{
    apply_freeze, attach_lora, load_adapter, merge_lora, restore_adapter_weights, trainable_parameters, write_adapter,
    AdapterSaveOptions, FreezeConfig, LoraConfig,
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
    /// The `model` key as given (recorded as the adapter's base model).
    pub base_name: String,
}

impl TrainingModel {
    /// Loads `model` of the config on `train.device` in `train.dtype` and prepares the method:
    /// full (every weight trains), LoRA (`[lora]` adapters; a starting `adapter` is loaded into
    /// them) or freeze (`[freeze]` selects what trains). Under full/freeze a starting `adapter` is
    /// merged into the weights first.
    pub fn load(cfg: &LoadedConfig) -> Result<Self> {
        let c = &cfg.config;
        let t = &c.train;
        if let Some(n) = t.threads {
            tch::set_num_threads(n);
        }
        enable_cpu_features();
        let device = parse_device(&t.device)?;
        let kind = parse_dtype(t.dtype.as_deref(), device)?;
        let dir = resolve_model_dir(&c.model)?;
        let mut loaded = load_causal_lm(&dir, device, kind)?;
        let tokenizer = ModelTokenizer::from_dir(&dir)?;
        let at = |what: &str| format!("{}: {what}", cfg.origin.display());
        let adapter = c.adapter.as_ref().map(|a| resolve_model_dir(a)).transpose()?;
        match c.method {
            Method::Lora => {
                let lora: LoraConfig = cfg.section("lora", c.lora.as_ref())?;
                lora.validate().with_context(|| at("[lora]"))?;
                match &adapter {
                    Some(a) => {
                        load_adapter(&loaded.vs, &mut loaded.lm, a)?;
                    }
                    None => {
                        tch::manual_seed(t.seed as i64);
                        attach_lora(&loaded.vs, &mut loaded.lm, &lora).with_context(|| at("[lora]"))?;
                    }
                }
            }
            Method::Full | Method::Freeze => {
                if let Some(a) = &adapter {
                    load_adapter(&loaded.vs, &mut loaded.lm, a)?;
                    merge_lora(&loaded.vs, &mut loaded.lm)?;
                    for (_, v) in loaded.vs.variables() {
                        let _ = v.set_requires_grad(true);
                    }
                }
                if c.method == Method::Freeze {
                    let freeze: FreezeConfig = cfg.section("freeze", c.freeze.as_ref())?;
                    apply_freeze(&loaded.vs, &loaded.lm, &freeze).with_context(|| at("[freeze]"))?;
                }
            }
        }
        loaded.lm.set_training(true);
        Ok(TrainingModel { loaded, tokenizer, device, kind, method: c.method, base_name: c.model.clone() })
    }

    /// Parameters that receive gradients, by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        trainable_parameters(&self.loaded.vs)
    }
}

impl ModelState for TrainingModel {
    fn save(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora {
            let opts = AdapterSaveOptions {
                base_model_name_or_path: Some(self.base_name.clone()),
                companions_from: Some(&self.loaded.dir),
            };
            return write_adapter(&self.loaded.lm, dir, &opts);
        }
        let opts = SaveOptions { companions_from: Some(&self.loaded.dir), ..Default::default() };
        write_pretrained(&self.loaded.vs, &self.loaded.lm.config, dir, &opts)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora {
            return restore_adapter_weights(&self.loaded.vs, dir);
        }
        load_weights(&self.loaded.vs, dir, self.loaded.lm.config.tie_word_embeddings)
    }

    fn set_training(&self, on: bool) {
        self.loaded.lm.set_training(on);
    }
}
