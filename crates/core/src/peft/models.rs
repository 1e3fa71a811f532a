//! The models that take LoRA adapters, and what PEFT records for each: its `task_type` and the
//! modules trained in full beside the adapters (`modules_to_save`).
use tch::Tensor;

use crate::hf::config::ModelType;

use crate::model::decoder::{CausalLm, Trunk};
use crate::model::scalar::{ScalarModel, SCORE_WEIGHT};
use crate::peft::lora::LoraModel;

impl LoraModel for CausalLm {
    const PEFT_TASK_TYPE: &'static str = "CAUSAL_LM";
    const MODULES_TO_SAVE: &'static [&'static str] = &[];

    fn trunk(&self) -> &Trunk {
        &self.model
    }

    fn trunk_mut(&mut self) -> &mut Trunk {
        &mut self.model
    }

    fn modules_to_save(&self) -> Vec<(String, Tensor)> {
        Vec::new()
    }

    fn model_type(&self) -> ModelType {
        self.config.model_type
    }
}

impl LoraModel for ScalarModel {
    const PEFT_TASK_TYPE: &'static str = "SEQ_CLS";
    const MODULES_TO_SAVE: &'static [&'static str] = &["score"];

    fn trunk(&self) -> &Trunk {
        &self.model
    }

    fn trunk_mut(&mut self) -> &mut Trunk {
        &mut self.model
    }

    fn modules_to_save(&self) -> Vec<(String, Tensor)> {
        vec![(SCORE_WEIGHT.to_string(), self.score.weight.shallow_clone())]
    }

    fn model_type(&self) -> ModelType {
        self.config.model_type
    }
}
