//! A causal LM from (or for) a Hugging Face model folder: the model's variables created in a
//! `VarStore` under their HF names and filled from the folder's safetensors.
use std::path::{Path, PathBuf};

use anyhow::Result;
use tch::{nn::VarStore, Device, Kind};

use crate::hf::checkpoint::load_weights;
use crate::hf::config::ModelConfig;
use crate::model::decoder::CausalLm;

/// A causal LM with its variables, loaded from (or created for) a model folder.
pub struct LoadedModel {
    pub vs: VarStore,
    pub lm: CausalLm,
    pub dir: PathBuf,
}

/// Builds the model described by `config` with its variables in `vs`, in `kind` on `device`.
pub fn new_causal_lm(config: &ModelConfig, device: Device, kind: Kind) -> (VarStore, CausalLm) {
    crate::model::device::enable_cpu_features();
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let lm = CausalLm::new(&vs.root(), config);
    (vs, lm)
}

/// Loads an HF model folder as a causal LM in `kind` on `device`.
pub fn load_causal_lm(dir: &Path, device: Device, kind: Kind) -> Result<LoadedModel> {
    let config = ModelConfig::from_dir(dir)?;
    for w in &config.warnings {
        tracing::warn!("{}: {w}", dir.join("config.json").display());
    }
    let (vs, lm) = new_causal_lm(&config, device, kind);
    load_weights(&vs, dir, config.tie_word_embeddings)?;
    Ok(LoadedModel { vs, lm, dir: dir.to_path_buf() })
}
