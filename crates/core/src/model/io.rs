//! A causal LM from (or for) a Hugging Face model folder: the model's variables created in a
//! `VarStore` under their HF names and filled from the folder's safetensors.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Result};
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

/// Removes the variables `names` from `vs` (those it holds), so the store no longer keeps their
/// tensors alive: what merging adapters and quantising weights drop.
pub fn remove_variables(vs: &VarStore, names: &[String]) -> Result<()> {
    let mut vars =
        vs.variables_.lock().map_err(|_| anyhow!("the model's variable store is unusable (a thread panicked)"))?;
    let mut ptrs = std::collections::HashSet::new();
    for n in names {
        if let Some(t) = vars.named_variables.remove(n) {
            ptrs.insert(t.data_ptr() as usize);
        }
    }
    vars.trainable_variables.retain(|v| !ptrs.contains(&(v.tensor.data_ptr() as usize)));
    Ok(())
}

/// Bytes of every variable of `vs` (a quantised model holds the rest in its quantised
/// projections: `Trunk::quantized_bytes`).
pub fn variable_bytes(vs: &VarStore) -> i64 {
    vs.variables().values().map(crate::model::quant::tensor_bytes).sum()
}
