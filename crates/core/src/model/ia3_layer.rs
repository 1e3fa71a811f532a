//! The (IA)³ vectors a decoder projection may carry (PEFT's `IA3`): a learned rescaling of its
//! output (`[out, 1]`, e.g. k_proj and v_proj) or, for the feed-forward modules, of its input
//! (`[1, in]`, e.g. down_proj). Attaching, merging and PEFT folders are the `peft` room's.
use std::sync::Arc;

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tch::Tensor;

use crate::model::decoder::RunMode;
use crate::model::lora_layer::LoraTargets;

/// `[ia3]`: which projections (IA)³ rescales. `target_modules` / `feedforward_modules` take
/// module names, path suffixes or a regular expression as LoRA's `targets` do (defaults: PEFT's
/// for the model type — `k_proj`, `v_proj`, `down_proj` for llama / mistral, `q_proj`, `v_proj`,
/// `down_proj` for qwen2 / qwen3 — with `down_proj` feed-forward). Feed-forward modules scale
/// their input, the others their output; every feed-forward module must be a target.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Ia3Config {
    #[serde(default)]
    pub target_modules: Option<LoraTargets>,
    #[serde(default)]
    pub feedforward_modules: Option<LoraTargets>,
}

/// One projection's (IA)³ vector.
#[derive(Debug)]
pub struct Ia3Vector {
    /// `[out, 1]` (output scaling) or `[1, in]` (feed-forward: input scaling), f32, as PEFT.
    pub vector: Tensor,
    pub feedforward: bool,
    pub(crate) mode: Arc<RunMode>,
}

impl Ia3Vector {
    pub fn new(vector: Tensor, feedforward: bool, mode: Arc<RunMode>) -> Self {
        Ia3Vector { vector, feedforward, mode }
    }

    pub fn is_enabled(&self) -> bool {
        self.mode.adapters_enabled()
    }

    pub fn shallow_clone(&self) -> Self {
        Ia3Vector { vector: self.vector.shallow_clone(), feedforward: self.feedforward, mode: self.mode.clone() }
    }

    /// The input of the projection: `x · l` for a feed-forward vector, else `x`.
    pub fn scale_input(&self, x: &Tensor) -> Result<Tensor> {
        if self.feedforward {
            Ok(x.f_mul(&self.vector.f_flatten(0, -1)?.f_to_kind(x.kind())?)?)
        } else {
            Ok(x.shallow_clone())
        }
    }

    /// The output of the projection: `y · l` for an output vector (the bias included, as PEFT),
    /// else `y`.
    pub fn scale_output(&self, y: &Tensor) -> Result<Tensor> {
        if self.feedforward {
            Ok(y.shallow_clone())
        } else {
            Ok(y.f_mul(&self.vector.f_flatten(0, -1)?.f_to_kind(y.kind())?)?)
        }
    }
}
