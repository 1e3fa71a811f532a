//! Loading the model a training stage starts from (device, dtype, tuning method: full, LoRA,
//! (IA)³, prompt learning or freeze) and saving or restoring it for checkpoints: the part of every stage's set-up that is
//! not stage-specific.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use tch::{Device, Kind, Tensor};

use crate::hf::checkpoint::{load_weights, write_pretrained, SaveOptions};
use crate::load::spec::{tokenizer_for, AdapterMode, LoadedAdapter, LoadedCausalLm, ModelSpec};
use crate::model::io::LoadedModel;
use crate::model::scalar::{write_scalar_model, LoadedScalarModel, ScoreInit};
use crate::peft::ia3::{attach_ia3, load_ia3_adapter, merge_ia3, write_ia3_adapter, Ia3Config};
use crate::peft::lora::{
    adapter_peft_type, apply_freeze, attach_lora, load_adapter, merge_lora, read_adapter_folder_config,
    refuse_quantized, restore_adapter_weights, trainable_parameters, write_adapter, AdapterSaveOptions, FreezeConfig,
    LoraConfig, ADAPTER_CONFIG_FILE,
};
use crate::peft::prompt::{
    attach_prompt_learning, is_prompt_adapter, load_prompt_adapter, read_prompt_folder_config, restore_prompt_weights,
    write_prompt_adapter,
};
use crate::text::tokenizer::ModelTokenizer;
use crate::train::config::{LoadedConfig, Method};
use crate::train::trainer::{train_supervised, ModelState, Objective, TrainRun, TrainSummary};

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
        let spec = training_spec(cfg)?;
        let at = |what: &str| format!("{}: {what}", cfg.origin.display());
        // the method's section was parsed and checked when the config loaded
        let mode = if c.method.is_adapter() { AdapterMode::Attach } else { AdapterMode::Merge };
        let LoadedCausalLm { model: mut loaded, tokenizer, adapter, device, kind } = spec.causal_lm(mode)?;
        let method = c.method.as_str();
        match (&adapter, c.method) {
            (Some((a, LoadedAdapter::Prompt(p))), m) if p.method_name() != m.as_str() => {
                bail!(
                    "{}: {} is a {} adapter: its virtual tokens cannot be merged into weights or trained as method = \"{method}\"; train it further with method = \"{}\"",
                    at("key 'adapter'"),
                    a.display(),
                    p.peft_type(),
                    p.method_name()
                );
            }
            (Some((a, LoadedAdapter::Ia3(_))), m) if m != Method::Ia3 && m.is_adapter() => {
                bail!(
                    "{}: {} is an (IA)³ adapter, which method = \"{method}\" does not train; train it further with method = \"ia3\", or merge it into the model first (align export)",
                    at("key 'adapter'"),
                    a.display()
                );
            }
            (Some((a, LoadedAdapter::Lora(_))), Method::Ia3) => {
                bail!(
                    "{}: {} is a LoRA adapter, which method = \"ia3\" does not train; merge it into the model first (align export) and give the merged folder as model",
                    at("key 'adapter'"),
                    a.display()
                );
            }
            (Some((a, LoadedAdapter::Lora(_))), m) if m.is_prompt_learning() => {
                bail!(
                    "{}: {} is a LoRA adapter, which method = \"{method}\" does not train; merge it into the model first (align export) and give the merged folder as model",
                    at("key 'adapter'"),
                    a.display()
                );
            }
            _ => {}
        }
        match c.method {
            Method::Lora => {
                if adapter.is_none() {
                    let lora: LoraConfig = cfg.section("lora", c.lora.as_ref())?;
                    tch::manual_seed(t.seed as i64);
                    attach_lora(&loaded.vs, &mut loaded.lm, &lora).with_context(|| at("[lora]"))?;
                }
            }
            Method::Ia3 => {
                if adapter.is_none() {
                    let ia3: Ia3Config = cfg.section("ia3", c.ia3.as_ref())?;
                    attach_ia3(&loaded.vs, &mut loaded.lm, &ia3).with_context(|| at("[ia3]"))?;
                }
            }
            Method::PromptTuning | Method::PTuning | Method::PrefixTuning => {
                if let Some(p) = cfg.prompt_learning()? {
                    tch::manual_seed(t.seed as i64);
                    attach_prompt_learning(&loaded.vs, &mut loaded.lm, &p, Some(&tokenizer))
                        .with_context(|| at(&format!("[{method}]")))?;
                }
            }
            Method::Full | Method::Freeze => {
                if adapter.is_some() {
                    // the merged adapter's base weights were frozen while it was attached
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
        check_virtual_tokens_fit(cfg, &loaded.lm.model, loaded.lm.config.max_position_embeddings)?;
        loaded.lm.set_training(true);
        loaded.lm.model.set_gradient_checkpointing(t.checkpoint_every());
        Ok(TrainingModel { loaded, tokenizer, device, kind, method: c.method, base_name: c.model.clone() })
    }

    /// The adapter folder options of this run's saves.
    fn adapter_options(&self) -> AdapterSaveOptions<'_> {
        AdapterSaveOptions {
            base_model_name_or_path: Some(self.base_name.clone()),
            companions_from: Some(&self.loaded.dir),
        }
    }

    /// Parameters that receive gradients, by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        trainable_parameters(&self.loaded.vs)
    }

    /// Trains this model's trainable parameters on `objective` through the one supervised loop
    /// ([`train_supervised`]), as the run `cfg` describes it (`[train]`, `output_dir`, the
    /// config and data fingerprint).
    pub fn train_on(
        &self,
        cfg: &LoadedConfig,
        objective: &mut dyn Objective,
        restart: bool,
        stop_after: Option<u64>,
    ) -> Result<TrainSummary> {
        let c = &cfg.config;
        let fingerprint = cfg.fingerprint()?;
        let run =
            TrainRun { settings: &c.train, output_dir: &c.output_dir, fingerprint: &fingerprint, restart, stop_after };
        train_supervised(run, objective, self, self.trainable_params())
    }
}

impl ModelState for TrainingModel {
    fn memory_plan(
        &self,
        settings: &crate::train::config::TrainSection,
    ) -> Result<Option<crate::train::plan::MemoryPlan>> {
        use crate::train::plan::{plan_memory, PlanSettings};
        let trainable = self.trainable_params().into_iter().map(|(n, _)| n).collect();
        let lora = if self.method == Method::Lora { self.loaded.lm.lora_config() } else { None };
        let s = PlanSettings::of_run(
            settings,
            self.kind,
            !self.device.is_cuda(),
            lora,
            trainable,
            self.method == Method::Full,
        );
        Ok(Some(plan_memory(&self.loaded.lm.config, &s)?))
    }

    fn lora_config(&self) -> Option<&LoraConfig> {
        self.loaded.lm.lora_config().filter(|_| self.method == Method::Lora)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora {
            return write_adapter(&self.loaded.lm, dir, &self.adapter_options());
        }
        if self.method.is_prompt_learning() {
            return write_prompt_adapter(&self.loaded.lm, dir, &self.adapter_options());
        }
        if self.method == Method::Ia3 {
            return write_ia3_adapter(&self.loaded.lm, dir, &self.adapter_options());
        }
        refuse_quantized(&self.loaded.lm.model, "save the full weights of")?;
        let opts = SaveOptions { companions_from: Some(&self.loaded.dir), ..Default::default() };
        write_pretrained(&self.loaded.vs, &self.loaded.lm.config, dir, &opts)
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora || self.method == Method::Ia3 {
            return restore_adapter_weights(&self.loaded.vs, dir);
        }
        if self.method.is_prompt_learning() {
            return restore_prompt_weights(&self.loaded.vs, dir);
        }
        load_weights(&self.loaded.vs, dir, self.loaded.lm.config.tie_word_embeddings)
    }

    fn set_training(&self, on: bool) {
        self.loaded.lm.set_training(on);
    }
}

/// `train.max_length` counts real tokens; with prompt learning attached the model also sees its
/// virtual ones, and both must fit in `max_position_embeddings`.
fn check_virtual_tokens_fit(cfg: &LoadedConfig, trunk: &crate::model::decoder::Trunk, max: i64) -> Result<()> {
    if let Some(p) = trunk.prompt_learning_config() {
        let (nv, len) = (p.num_virtual_tokens(), cfg.config.train.max_length);
        if len as i64 + nv > max {
            bail!(
                "{}: train.max_length = {len} plus {nv} virtual tokens exceeds the model's max_position_embeddings ({max})",
                cfg.origin.display()
            );
        }
    }
    Ok(())
}

/// The training method that continues the prompt-learning folder `dir` (`prompt_tuning`, …).
fn prompt_method_of(dir: &Path) -> Result<&'static str> {
    Ok(read_prompt_folder_config(dir, "SEQ_CLS")?.config.method_name())
}

/// The [`ModelSpec`] of a training run: `model`, `adapter`, `train.device`, `train.dtype`,
/// `train.threads`, `train.quantize` / `train.double_quant` (QLoRA: the base held in 4 bits).
pub fn training_spec(cfg: &LoadedConfig) -> Result<ModelSpec> {
    let c = &cfg.config;
    let t = &c.train;
    let spec = ModelSpec::from_flags(&c.model, c.adapter.as_deref(), &t.device, t.dtype.as_deref(), t.threads)?;
    Ok(spec.quantized(t.quantization()?))
}

/// Device and dtype of a training run (`train.device`, `train.dtype`), with `train.threads` applied.
pub fn training_device(cfg: &LoadedConfig) -> Result<(Device, Kind)> {
    let spec = training_spec(cfg)?;
    spec.apply_runtime();
    Ok((spec.device, spec.dtype))
}

/// A scalar-head model being trained (the reward model; PPO's value model) and its tokenizer.
pub struct TrainingScalarModel {
    pub loaded: LoadedScalarModel,
    pub tokenizer: ModelTokenizer,
    pub device: Device,
    pub kind: Kind,
    pub method: Method,
    /// The `model` key as given (recorded as the adapter's base model under LoRA).
    pub base_name: String,
}

impl TrainingScalarModel {
    /// Loads `model` of the config: a reward-model folder as it is, or a causal LM's trunk with a
    /// new head initialised by `init(hidden_size)`; the padding id is the tokenizer's. Then
    /// prepares the method as [`TrainingModel::load`] does: full, LoRA (`[lora]` adapters on the
    /// trunk; a starting `adapter` must be a reward-model adapter and is loaded into them), (IA)³
    /// (`[ia3]` vectors on the trunk; a starting `adapter` must be a `SEQ_CLS` (IA)³ folder) or
    /// freeze (`[freeze]`), or prompt learning (`[prompt_tuning]`, `[p_tuning]`,
    /// `[prefix_tuning]`: virtual tokens before every row; a starting `adapter` must be a `SEQ_CLS`
    /// folder of the same method). The head (`score`) always trains, as PEFT's `modules_to_save`.
    /// Under full/freeze a starting LoRA or (IA)³ `adapter` (of a reward model, or of the causal
    /// LM's trunk) is merged into the weights first; a prompt-learning one only continues its own
    /// method.
    pub fn load(cfg: &LoadedConfig, init: impl FnOnce(i64) -> ScoreInit) -> Result<Self> {
        let c = &cfg.config;
        let spec = training_spec(cfg)?;
        let (device, kind) = (spec.device, spec.dtype);
        let dir = spec.model_dir()?;
        if dir.join(ADAPTER_CONFIG_FILE).is_file() {
            bail!(
                "{}: key 'model': {} is an adapter folder; give its base model as model and the folder as adapter",
                cfg.origin.display(),
                dir.display()
            );
        }
        let (loaded, tokenizer) = spec.scalar_model_to_train(init)?;
        let mut tm =
            TrainingScalarModel { loaded, tokenizer, device, kind, method: Method::Full, base_name: c.model.clone() };
        let at = |what: &str| format!("{}: {what}", cfg.origin.display());
        let adapter = spec.adapter_dir()?;
        let loaded = &mut tm.loaded;
        if let Some(a) = adapter.as_deref().filter(|a| a.join(ADAPTER_CONFIG_FILE).is_file()) {
            let theirs = if is_prompt_adapter(a)? { prompt_method_of(a)? } else { c.method.as_str() };
            if c.method.as_str() != theirs {
                bail!(
                    "{}: {} is a {theirs} reward-model adapter ({}): its virtual tokens cannot be merged into weights or trained as method = \"{}\"; train it further with method = \"{theirs}\"",
                    at("key 'adapter'"),
                    a.display(),
                    adapter_peft_type(a)?,
                    c.method.as_str()
                );
            }
        }
        // [lora] and [freeze] were parsed and checked when the config loaded
        match c.method {
            Method::Lora => match &adapter {
                Some(a) => {
                    let folder = read_adapter_folder_config(a)?;
                    if !folder.is_reward_model() {
                        bail!(
                                "{}: {} is not a reward-model adapter (task_type {}): a LoRA reward model continues only a SEQ_CLS adapter; merge a causal-LM adapter into the model first (align export)",
                                at("key 'adapter'"),
                                a.display(),
                                folder.task_type.as_deref().unwrap_or("none")
                            );
                    }
                    load_adapter(&loaded.vs, &mut loaded.rm, a)?;
                }
                None => {
                    let lora: LoraConfig = cfg.section("lora", c.lora.as_ref())?;
                    tch::manual_seed(c.train.seed as i64);
                    attach_lora(&loaded.vs, &mut loaded.rm, &lora).with_context(|| at("[lora]"))?;
                }
            },
            Method::Ia3 => match &adapter {
                Some(a) => {
                    if adapter_peft_type(a)? != "IA3" {
                        bail!(
                            "{}: {} is not an (IA)³ adapter, which method = \"ia3\" would train; merge it into the model first (align export) and give the merged folder as model",
                            at("key 'adapter'"),
                            a.display()
                        );
                    }
                    load_ia3_adapter(&loaded.vs, &mut loaded.rm, a, true)?;
                }
                None => {
                    let ia3: Ia3Config = cfg.section("ia3", c.ia3.as_ref())?;
                    attach_ia3(&loaded.vs, &mut loaded.rm, &ia3).with_context(|| at("[ia3]"))?;
                }
            },
            Method::Full | Method::Freeze => {
                if let Some(a) = &adapter {
                    if adapter_peft_type(a)? == "IA3" {
                        load_ia3_adapter(&loaded.vs, &mut loaded.rm, a, false)?;
                        merge_ia3(&loaded.vs, &mut loaded.rm)?;
                    } else {
                        load_adapter(&loaded.vs, &mut loaded.rm, a)?;
                        merge_lora(&loaded.vs, &mut loaded.rm)?;
                    }
                    for (_, v) in loaded.vs.variables() {
                        let _ = v.set_requires_grad(true);
                    }
                }
                if c.method == Method::Freeze {
                    let freeze: FreezeConfig = cfg.section("freeze", c.freeze.as_ref())?;
                    apply_freeze(&loaded.vs, &loaded.rm, &freeze).with_context(|| at("[freeze]"))?;
                }
            }
            Method::PromptTuning | Method::PTuning | Method::PrefixTuning => match &adapter {
                Some(a) => {
                    let method = c.method.as_str();
                    if !is_prompt_adapter(a)? {
                        bail!(
                            "{}: {} is a {} adapter, which method = \"{method}\" does not train; continue a {method} reward-model adapter, or merge a LoRA / (IA)³ adapter into the model first (align export)",
                            at("key 'adapter'"),
                            a.display(),
                            adapter_peft_type(a)?
                        );
                    }
                    load_prompt_adapter(&loaded.vs, &mut loaded.rm, a, true)?;
                }
                None => {
                    let p = cfg
                        .prompt_learning()?
                        .ok_or_else(|| anyhow!("method = \"{}\" without its section", c.method.as_str()))?;
                    tch::manual_seed(c.train.seed as i64);
                    attach_prompt_learning(&loaded.vs, &mut loaded.rm, &p, Some(&tm.tokenizer))
                        .with_context(|| at(&format!("[{}]", c.method.as_str())))?;
                }
            },
        }
        check_virtual_tokens_fit(cfg, &tm.loaded.rm.model, tm.loaded.rm.config.max_position_embeddings)?;
        tm.method = c.method;
        // tokenizer files saved with the adapter win (the head pads with the base's padding id)
        tm.tokenizer = tokenizer_for(&spec.tokenizer_dir()?, &tm.loaded.rm.config, &tm.loaded.dir)?;
        tm.loaded.rm.set_training(true);
        tm.loaded.rm.model.set_gradient_checkpointing(c.train.checkpoint_every());
        Ok(tm)
    }

    /// Loads the scalar model at `dir` (a reward-model folder, a LoRA reward-model adapter folder
    /// merged into its `base_model_name_or_path`, or a causal LM's trunk with a new head) with
    /// every weight trainable (method full).
    pub fn from_dir(dir: &Path, device: Device, kind: Kind, init: impl FnOnce(i64) -> ScoreInit) -> Result<Self> {
        let base_name = dir.display().to_string();
        let spec = ModelSpec::at(dir, None, device, kind);
        if dir.join(ADAPTER_CONFIG_FILE).is_file() && is_prompt_adapter(dir)? {
            bail!(
                "{}: a {} reward-model adapter: its virtual tokens are not weights a value model (critic) can start from and train in full; set [ppo] value_model = \"policy\" or give a reward-model folder",
                dir.display(),
                adapter_peft_type(dir)?
            );
        }
        if dir.join(ADAPTER_CONFIG_FILE).is_file() {
            let (loaded, tokenizer) = spec.scalar_model()?;
            for (_, v) in loaded.vs.variables() {
                let _ = v.set_requires_grad(true);
            }
            return Ok(TrainingScalarModel { loaded, tokenizer, device, kind, method: Method::Full, base_name });
        }
        let (loaded, tokenizer) = spec.scalar_model_to_train(init)?;
        Ok(TrainingScalarModel { loaded, tokenizer, device, kind, method: Method::Full, base_name })
    }

    /// Parameters that receive gradients (trunk or adapters, and the head), by HF name, sorted.
    pub fn trainable_params(&self) -> Vec<(String, Tensor)> {
        trainable_parameters(&self.loaded.vs)
    }
}

impl ModelState for TrainingScalarModel {
    fn lora_config(&self) -> Option<&LoraConfig> {
        self.loaded.rm.lora_config().filter(|_| self.method == Method::Lora)
    }

    fn save(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora {
            let opts = AdapterSaveOptions {
                base_model_name_or_path: Some(self.base_name.clone()),
                companions_from: Some(&self.loaded.dir),
            };
            return write_adapter(&self.loaded.rm, dir, &opts);
        }
        if self.method == Method::Ia3 {
            let opts = AdapterSaveOptions {
                base_model_name_or_path: Some(self.base_name.clone()),
                companions_from: Some(&self.loaded.dir),
            };
            return write_ia3_adapter(&self.loaded.rm, dir, &opts);
        }
        if self.method.is_prompt_learning() {
            let opts = AdapterSaveOptions {
                base_model_name_or_path: Some(self.base_name.clone()),
                companions_from: Some(&self.loaded.dir),
            };
            return write_prompt_adapter(&self.loaded.rm, dir, &opts);
        }
        refuse_quantized(&self.loaded.rm.model, "save the full weights of")?;
        write_scalar_model(&self.loaded.vs, &self.loaded.rm, dir, None, Some(&self.loaded.dir))
    }

    fn restore(&self, dir: &Path) -> Result<()> {
        if self.method == Method::Lora || self.method == Method::Ia3 {
            return restore_adapter_weights(&self.loaded.vs, dir);
        }
        if self.method.is_prompt_learning() {
            return restore_prompt_weights(&self.loaded.vs, dir);
        }
        load_weights(&self.loaded.vs, dir, self.loaded.rm.config.tie_word_embeddings)
    }

    fn set_training(&self, on: bool) {
        self.loaded.rm.set_training(on);
    }
}
