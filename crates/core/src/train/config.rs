//! The one training-config schema every stage reads (`align train STAGE --config FILE.toml
//! [--set key=value …]`): top-level model/data/output keys, `[train]`, `[lora]`, `[freeze]`,
//! `[data_options]`, plus the stage's own section, which the stage crate deserialises itself.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::train::optim::{OptimizerKind, Schedule};

/// How the model's weights are tuned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    /// Every weight is trained.
    #[default]
    Full,
    /// Low-rank adapters (`[lora]`); the base stays frozen.
    Lora,
    /// Only the parts named in `[freeze]` are trained.
    Freeze,
    /// Learned virtual-token embeddings before every sequence (`[prompt_tuning]`); the base stays
    /// frozen.
    PromptTuning,
    /// Prompt tuning whose embeddings an MLP / LSTM prompt encoder produces (`[p_tuning]`).
    PTuning,
    /// Learned key/value prefixes in every layer (`[prefix_tuning]`, P-tuning v2); the base
    /// stays frozen.
    PrefixTuning,
    /// (IA)³ rescaling vectors (`[ia3]`); the base stays frozen.
    Ia3,
}

impl Method {
    /// The value as written in a config (`"full"`, `"lora"`, `"freeze"`, `"prompt_tuning"`,
    /// `"p_tuning"`, `"prefix_tuning"`, `"ia3"`), also the name of its section.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Full => "full",
            Method::Lora => "lora",
            Method::Freeze => "freeze",
            Method::PromptTuning => "prompt_tuning",
            Method::PTuning => "p_tuning",
            Method::PrefixTuning => "prefix_tuning",
            Method::Ia3 => "ia3",
        }
    }

    /// True for the methods that train an adapter on a frozen base (saved as a PEFT adapter
    /// folder, disabled for the reference of DPO / PPO).
    pub fn is_adapter(self) -> bool {
        matches!(self, Method::Lora | Method::PromptTuning | Method::PTuning | Method::PrefixTuning | Method::Ia3)
    }

    /// True for prompt tuning, P-tuning and prefix tuning.
    pub fn is_prompt_learning(self) -> bool {
        matches!(self, Method::PromptTuning | Method::PTuning | Method::PrefixTuning)
    }
}

fn d_epochs() -> f64 {
    1.0
}
fn d_batch() -> usize {
    8
}
fn d_one() -> usize {
    1
}
fn d_lr() -> f64 {
    2e-5
}
fn d_clip() -> f64 {
    1.0
}
fn d_len() -> usize {
    1024
}
fn d_seed() -> u64 {
    42
}
fn d_device() -> String {
    "auto".into()
}
fn d_log() -> u64 {
    10
}
fn d_nonfinite() -> u64 {
    3
}
fn d_beta1() -> f64 {
    0.9
}
fn d_beta2() -> f64 {
    0.999
}
fn d_eps() -> f64 {
    1e-8
}

/// `[train]`: the loop's settings. Every field has a default (docs/config.md lists them).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    /// Optimizer steps; 0 = derive from `epochs`.
    #[serde(default)]
    pub max_steps: u64,
    #[serde(default = "d_epochs")]
    pub epochs: f64,
    /// Examples per micro-batch.
    #[serde(default = "d_batch")]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub grad_accum: usize,
    #[serde(default = "d_lr")]
    pub lr: f64,
    #[serde(default)]
    pub schedule: Schedule,
    #[serde(default)]
    pub warmup_ratio: f64,
    #[serde(default)]
    pub min_lr_ratio: f64,
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 = no clipping.
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Token budget per example.
    #[serde(default = "d_len")]
    pub max_length: usize,
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Save a checkpoint every N steps (0 = only at the end).
    #[serde(default)]
    pub save_every: u64,
    /// Keep only the newest N checkpoints (0 = keep all).
    #[serde(default)]
    pub save_total_limit: usize,
    /// Evaluate on the validation split every N steps (0 = only at the end).
    #[serde(default)]
    pub eval_every: u64,
    /// Share of the training records held out for validation when no `val_data` is given.
    #[serde(default)]
    pub val_ratio: f64,
    /// Stop when the eval loss has not improved for this many evaluations (0 = never).
    #[serde(default)]
    pub early_stopping_patience: u64,
    /// Stop after this many non-finite (NaN/inf) steps in a row.
    #[serde(default = "d_nonfinite")]
    pub max_nonfinite_steps: u64,
    #[serde(default = "d_device")]
    pub device: String,
    /// f32, bf16, f16 (default: f32 on CPU, bf16 on CUDA; bf16/f16 keep f32 master weights).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Log a line every N steps when stderr is not a terminal.
    #[serde(default = "d_log")]
    pub log_every: u64,
    #[serde(default = "d_beta1")]
    pub adam_beta1: f64,
    #[serde(default = "d_beta2")]
    pub adam_beta2: f64,
    #[serde(default = "d_eps")]
    pub adam_epsilon: f64,
    /// `adamw` (f32 moments) or `adamw8bit` (bitsandbytes-style 8-bit block-wise moments).
    #[serde(default)]
    pub optimizer: OptimizerKind,
    /// Intra-op CPU threads (default: libtorch's choice).
    #[serde(default)]
    pub threads: Option<i32>,
    /// Run the LM head and the loss (PT, SFT) or the token log-probs (DPO, PPO) over chunks of
    /// this many tokens, so the `[batch, seq, vocab]` logits never exist at once (0 = all at
    /// once).
    #[serde(default)]
    pub loss_chunk_tokens: usize,
    /// Activation checkpointing: decoder layers keep only their inputs in the forward pass and
    /// are recomputed in the backward pass (the trained models of every stage).
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// With `gradient_checkpointing`: checkpoint every k-th layer (0, k, 2k, …); the others keep
    /// their activations (default 1: every layer).
    #[serde(default)]
    pub gradient_checkpointing_every: Option<usize>,
    /// QLoRA: hold the frozen base's projections in 4 bits, `"nf4"` or `"fp4"` (bitsandbytes'
    /// layout, blocks of 64), dequantised on the fly in the compute dtype (`dtype`); only with
    /// `method = "lora"`. None: the base stays in full precision.
    #[serde(default)]
    pub quantize: Option<String>,
    /// QLoRA's double quantisation: the 4-bit blocks' absmax quantised again (8-bit, blocks of
    /// 256); needs `quantize`. Default false, as transformers' `BitsAndBytesConfig`.
    #[serde(default)]
    pub double_quant: Option<bool>,
    /// Data-parallel runs (torchrun): 0 = every rank keeps the whole optimizer state; 1 = AdamW's
    /// moments and f32 masters partitioned over the ranks (ZeRO-1); 2 = and each gradient reduced
    /// to its owner only (ZeRO-2). The same weights either way; no effect in one process.
    #[serde(default)]
    pub zero: u8,
}

impl Default for TrainSection {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("all [train] fields have defaults"))
    }
}

impl TrainSection {
    /// What `model::decoder::Trunk::set_gradient_checkpointing` gets: every k-th layer, 0 = off.
    pub fn checkpoint_every(&self) -> usize {
        if self.gradient_checkpointing {
            self.gradient_checkpointing_every.unwrap_or(1)
        } else {
            0
        }
    }

    /// The quantisation of the base, from `quantize` and `double_quant` (checked when the
    /// config loads: only 4-bit types, only under LoRA).
    pub fn quantization(&self) -> Result<Option<crate::model::quant::Quantization>> {
        use crate::model::quant::{QuantType4, Quantization};
        let quant_type = match self.quantize.as_deref() {
            None => {
                if self.double_quant.is_some() {
                    bail!("key 'train.double_quant': applies to a 4-bit base; set train.quantize = \"nf4\" or \"fp4\" (or remove train.double_quant)");
                }
                return Ok(None);
            }
            Some("nf4") => QuantType4::Nf4,
            Some("fp4") => QuantType4::Fp4,
            Some("int8") => bail!(
                "key 'train.quantize': \"int8\" is for inference only (align generate / eval perplexity --quantize int8); QLoRA trains on a 4-bit base: \"nf4\" or \"fp4\""
            ),
            Some(other) => bail!("key 'train.quantize': expected \"nf4\" or \"fp4\", found {other:?}"),
        };
        Ok(Some(Quantization::FourBit { quant_type, double_quant: self.double_quant.unwrap_or(false) }))
    }

    /// The optimizer settings of `[train]`.
    pub fn adamw(&self) -> crate::train::optim::AdamWConfig {
        crate::train::optim::AdamWConfig {
            beta1: self.adam_beta1,
            beta2: self.adam_beta2,
            eps: self.adam_epsilon,
            weight_decay: self.weight_decay,
            kind: self.optimizer,
        }
    }
}

/// A training config: the keys shared by every stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Model folder to start from.
    pub model: String,
    /// LoRA adapter folder to start from (trained further under `method = "lora"`).
    #[serde(default)]
    pub adapter: Option<String>,
    /// Training files (paths or glob patterns).
    pub data: Vec<String>,
    /// Validation files; when empty, `train.val_ratio` of `data` is held out.
    #[serde(default)]
    pub val_data: Vec<String>,
    pub output_dir: PathBuf,
    #[serde(default)]
    pub method: Method,
    #[serde(default)]
    pub train: TrainSection,
    #[serde(default)]
    pub lora: Option<toml::Table>,
    #[serde(default)]
    pub freeze: Option<toml::Table>,
    #[serde(default)]
    pub prompt_tuning: Option<toml::Table>,
    #[serde(default)]
    pub p_tuning: Option<toml::Table>,
    #[serde(default)]
    pub prefix_tuning: Option<toml::Table>,
    #[serde(default)]
    pub ia3: Option<toml::Table>,
    #[serde(default)]
    pub data_options: Option<toml::Table>,
}

/// `[train]` keys that change how much memory a run takes but not one bit of what it computes:
/// left out of the config's hash, so turning them on resumes the run (e.g. after running out of
/// memory) and leaves a finished pipeline stage done.
pub const RESULT_NEUTRAL_TRAIN_KEYS: &[&str] = &["gradient_checkpointing", "gradient_checkpointing_every", "zero"];

/// A parsed config plus the stage's own section and where it came from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: TrainConfig,
    /// The stage section (`[sft]`, `[pretrain]`, …), empty when absent.
    pub stage: toml::Table,
    pub stage_name: String,
    pub origin: PathBuf,
    /// SHA-256 of the resolved config (both parts), stable across key order.
    pub hash: String,
    /// The resolved config (both parts) as JSON: what [`RunFingerprint`] records.
    pub resolved: serde_json::Value,
}

/// What a training run trains on, recorded in every checkpoint: resuming with any of it changed
/// is refused, naming what changed.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct RunFingerprint {
    pub config_hash: String,
    /// The resolved config, so that a refusal can name the keys that changed.
    pub config: serde_json::Value,
    /// SHA-256 of every training and validation file, by path (data options and the seed, which
    /// shape the order, are part of the config).
    pub data: std::collections::BTreeMap<String, String>,
}

impl RunFingerprint {
    /// What differs from `saved` (the fingerprint of the run being resumed), one line each:
    /// `train.lr: 0.001 → 0.002`, `data file a.jsonl: contents changed`. Empty when the same.
    pub fn changes_since(&self, saved: &RunFingerprint) -> Vec<String> {
        let mut out = Vec::new();
        if saved.config_hash != self.config_hash {
            if saved.config.is_null() {
                out.push(format!("config hash {} → {}", short(&saved.config_hash), short(&self.config_hash)));
            } else {
                json_changes("", &saved.config, &self.config, &mut out);
                if out.is_empty() {
                    out.push(format!("config hash {} → {}", short(&saved.config_hash), short(&self.config_hash)));
                }
            }
        }
        for (path, hash) in &saved.data {
            match self.data.get(path) {
                None => out.push(format!("data file {path}: no longer part of the data")),
                Some(h) if h != hash => out.push(format!("data file {path}: contents changed")),
                _ => {}
            }
        }
        for path in self.data.keys().filter(|p| !saved.data.contains_key(*p)) {
            out.push(format!("data file {path}: new"));
        }
        out
    }
}

fn short(hash: &str) -> &str {
    &hash[..hash.len().min(12)]
}

/// Leaf-level differences between two JSON values, as `a.b: old → new`.
fn json_changes(at: &str, old: &serde_json::Value, new: &serde_json::Value, out: &mut Vec<String>) {
    use serde_json::Value;
    match (old, new) {
        (Value::Object(a), Value::Object(b)) => {
            let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = if at.is_empty() { k.clone() } else { format!("{at}.{k}") };
                match (a.get(k), b.get(k)) {
                    (Some(x), Some(y)) => json_changes(&key, x, y, out),
                    (Some(x), None) => out.push(format!("{key}: {x} → (unset)")),
                    (None, Some(y)) => out.push(format!("{key}: (unset) → {y}")),
                    (None, None) => {}
                }
            }
        }
        (a, b) if a != b => out.push(format!("{at}: {a} → {b}")),
        _ => {}
    }
}

/// Parses `--set a.b=VALUE` into a key path and a TOML value (a bare word is a string).
pub fn parse_override(s: &str) -> Result<(Vec<String>, toml::Value)> {
    let (key, value) = s.split_once('=').ok_or_else(|| anyhow!("--set {s}: expected KEY=VALUE"))?;
    let path: Vec<String> = key.trim().split('.').map(|p| p.trim().to_string()).collect();
    if path.iter().any(String::is_empty) {
        bail!("--set {s}: empty key component");
    }
    let raw = value.trim();
    let parsed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((path, parsed))
}

/// Sets `value` at `path` inside `table`, creating tables on the way.
pub fn set_path(table: &mut toml::Table, path: &[String], value: toml::Value) -> Result<()> {
    let (last, parents) = path.split_last().ok_or_else(|| anyhow!("empty key"))?;
    let mut cur = table;
    for (i, p) in parents.iter().enumerate() {
        let entry = cur.entry(p.clone()).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        cur = entry.as_table_mut().ok_or_else(|| anyhow!("key '{}' is not a table", path[..=i].join(".")))?;
    }
    cur.insert(last.clone(), value);
    Ok(())
}

/// SHA-256 hex digest of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// JSON text of a value with object keys sorted, so equal configs hash equally.
pub fn canonical_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            let items: Vec<String> = keys
                .iter()
                .map(|k| format!("{}:{}", serde_json::Value::String((*k).clone()), canonical_json(&map[*k])))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        serde_json::Value::Array(items) => {
            format!("[{}]", items.iter().map(canonical_json).collect::<Vec<_>>().join(","))
        }
        other => other.to_string(),
    }
}

impl LoadedConfig {
    /// Reads `path`, applies `--set` overrides, splits off `[stage]` and validates the rest.
    pub fn load(path: &Path, overrides: &[String], stage: &str) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim()))?;
        Self::from_table(table, path, overrides, stage)
    }

    pub fn from_table(mut table: toml::Table, origin: &Path, overrides: &[String], stage: &str) -> Result<Self> {
        for o in overrides {
            let (key, value) = parse_override(o)?;
            set_path(&mut table, &key, value)?;
        }
        let stage_table = match table.remove(stage) {
            None => toml::Table::new(),
            Some(toml::Value::Table(t)) => t,
            Some(other) => bail!("{}: key '{stage}': expected a table, found {}", origin.display(), other.type_str()),
        };
        let config: TrainConfig = toml::Value::Table(table.clone())
            .try_into()
            .map_err(|e: toml::de::Error| anyhow!("{}: {}", origin.display(), describe_toml_error(&e, stage)))?;
        validate(&config).map_err(|e| anyhow!("{}: {e}", origin.display()))?;
        let loaded_sections = LoadedConfig {
            config: config.clone(),
            stage: toml::Table::new(),
            stage_name: stage.to_string(),
            origin: origin.to_path_buf(),
            hash: String::new(),
            resolved: serde_json::Value::Null,
        };
        loaded_sections.check_method_sections()?;
        let mut whole = serde_json::to_value(&table)?;
        whole[stage] = serde_json::to_value(&stage_table)?;
        if let Some(train) = whole.get_mut("train").and_then(|t| t.as_object_mut()) {
            for key in RESULT_NEUTRAL_TRAIN_KEYS {
                train.remove(*key);
            }
        }
        let hash = sha256_hex(canonical_json(&whole).as_bytes());
        Ok(LoadedConfig {
            config,
            stage: stage_table,
            stage_name: stage.to_string(),
            origin: origin.to_path_buf(),
            hash,
            resolved: whole,
        })
    }

    /// `[lora]` and `[freeze]` are read only under their `method`: a section the method ignores is
    /// an error (it would silently train something else), and the section of the method in
    /// effect is parsed and checked here, before any model is loaded.
    fn check_method_sections(&self) -> Result<()> {
        let c = &self.config;
        let at = self.origin.display();
        for (section, present, wants) in [
            ("lora", c.lora.is_some(), Method::Lora),
            ("freeze", c.freeze.is_some(), Method::Freeze),
            ("prompt_tuning", c.prompt_tuning.is_some(), Method::PromptTuning),
            ("p_tuning", c.p_tuning.is_some(), Method::PTuning),
            ("prefix_tuning", c.prefix_tuning.is_some(), Method::PrefixTuning),
            ("ia3", c.ia3.is_some(), Method::Ia3),
        ] {
            if present && c.method != wants {
                let method = c.method.as_str();
                let wanted = wants.as_str();
                bail!("{at}: [{section}] is set but method = \"{method}\"; set method = \"{wanted}\" (or remove [{section}])");
            }
        }
        match c.method {
            Method::Lora => {
                let lora: crate::peft::lora::LoraConfig = self.section("lora", c.lora.as_ref())?;
                lora.validate().map_err(|e| anyhow!("{at}: [lora] {e}"))
            }
            Method::Freeze => self.section::<crate::peft::lora::FreezeConfig>("freeze", c.freeze.as_ref()).map(|_| ()),
            Method::PromptTuning | Method::PTuning | Method::PrefixTuning => self.prompt_learning().map(|_| ()),
            Method::Ia3 => self.section::<crate::peft::ia3::Ia3Config>("ia3", c.ia3.as_ref()).map(|_| ()),
            Method::Full => Ok(()),
        }
    }

    /// The prompt learning of `method = "prompt_tuning"` / `"p_tuning"` / `"prefix_tuning"`, from its section
    /// (which must be present: `num_virtual_tokens` has no default), checked. None for the other
    /// methods.
    pub fn prompt_learning(&self) -> Result<Option<crate::peft::prompt::PromptLearningConfig>> {
        use crate::peft::prompt::PromptLearningConfig;
        let c = &self.config;
        let at = self.origin.display();
        let (name, table) = match c.method {
            Method::PromptTuning => ("prompt_tuning", c.prompt_tuning.as_ref()),
            Method::PTuning => ("p_tuning", c.p_tuning.as_ref()),
            Method::PrefixTuning => ("prefix_tuning", c.prefix_tuning.as_ref()),
            _ => return Ok(None),
        };
        let Some(table) = table else {
            if c.adapter.is_some() {
                return Ok(None); // the starting adapter's configuration holds
            }
            bail!("{at}: method = \"{name}\" needs a [{name}] section (at least num_virtual_tokens)");
        };
        if c.adapter.is_some() {
            bail!("{at}: [{name}] is set together with key 'adapter', whose adapter_config.json configures the virtual tokens; remove [{name}]");
        }
        let parse = |e: toml::de::Error| anyhow!("{at}: [{name}]: {}", e.message().trim());
        let value = toml::Value::Table(table.clone());
        let config = match c.method {
            Method::PromptTuning => PromptLearningConfig::PromptTuning(value.try_into().map_err(parse)?),
            Method::PTuning => PromptLearningConfig::PTuning(value.try_into().map_err(parse)?),
            _ => PromptLearningConfig::PrefixTuning(value.try_into().map_err(parse)?),
        };
        config.validate().map_err(|e| anyhow!("{at}: [{name}] {e}"))?;
        Ok(Some(config))
    }

    /// The run's fingerprint: the config and the SHA-256 of every data file it names.
    pub fn fingerprint(&self) -> Result<RunFingerprint> {
        let c = &self.config;
        let mut data = std::collections::BTreeMap::new();
        for patterns in [&c.data, &c.val_data].into_iter().filter(|p| !p.is_empty()) {
            for file in crate::data::expand_data_paths(patterns)? {
                data.insert(file.display().to_string(), crate::hf::folder::sha256_file(&file)?);
            }
        }
        Ok(RunFingerprint { config_hash: self.hash.clone(), config: self.resolved.clone(), data })
    }

    /// Deserialises the stage section into the stage's own struct, naming the section on error.
    pub fn stage_section<T: serde::de::DeserializeOwned>(&self) -> Result<T> {
        toml::Value::Table(self.stage.clone()).try_into().map_err(|e: toml::de::Error| {
            anyhow!("{}: [{}]: {}", self.origin.display(), self.stage_name, e.message().trim())
        })
    }

    /// `[data_options]` as the data readers take it. The split is configured once, in `[train]`
    /// (`val_ratio`, `seed`), so those two keys are refused here; `train.seed` also seeds `mix`.
    pub fn data_options(&self) -> Result<crate::data::DataOptions> {
        let table = self.config.data_options.as_ref();
        for key in ["val_ratio", "seed"] {
            if table.is_some_and(|t| t.contains_key(key)) {
                bail!(
                    "{}: [data_options] {key}: set train.{key} instead (the split is configured in [train])",
                    self.origin.display()
                );
            }
        }
        let mut options: crate::data::DataOptions = self.section("data_options", table)?;
        // `mix` samples with the run's seed
        options.seed = self.config.train.seed;
        options.validate().map_err(|e| anyhow!("{}: {e}", self.origin.display()))?;
        Ok(options)
    }

    /// Deserialises an optional table (`lora`, `freeze`, `data_options`) into its struct.
    pub fn section<T: serde::de::DeserializeOwned + Default>(
        &self,
        name: &str,
        table: Option<&toml::Table>,
    ) -> Result<T> {
        match table {
            None => Ok(T::default()),
            Some(t) => toml::Value::Table(t.clone())
                .try_into()
                .map_err(|e: toml::de::Error| anyhow!("{}: [{name}]: {}", self.origin.display(), e.message().trim())),
        }
    }
}

fn describe_toml_error(e: &toml::de::Error, stage: &str) -> String {
    let msg = e.message().trim().to_string();
    if msg.starts_with("unknown field") {
        format!("{msg} (stage sections other than [{stage}] are not accepted here)")
    } else {
        msg
    }
}

fn validate(c: &TrainConfig) -> Result<()> {
    let t = &c.train;
    if c.data.is_empty() {
        bail!("key 'data': expected at least one file");
    }
    if t.batch_size == 0 || t.grad_accum == 0 {
        bail!("key 'train.batch_size' / 'train.grad_accum': expected ≥ 1");
    }
    if !(t.lr > 0.0) {
        bail!("key 'train.lr': expected a positive number, found {}", t.lr);
    }
    if !(0.0..1.0).contains(&t.val_ratio) {
        bail!("key 'train.val_ratio': expected a number in [0, 1), found {}", t.val_ratio);
    }
    if !(0.0..=1.0).contains(&t.warmup_ratio) || !(0.0..=1.0).contains(&t.min_lr_ratio) {
        bail!("keys 'train.warmup_ratio' and 'train.min_lr_ratio': expected numbers in [0, 1]");
    }
    if t.max_steps == 0 && !(t.epochs > 0.0) {
        bail!("key 'train.epochs': expected a positive number when train.max_steps is 0");
    }
    if t.max_length < 2 {
        bail!("key 'train.max_length': expected at least 2 tokens");
    }
    if t.zero > 2 {
        bail!("key 'train.zero': expected 0, 1 or 2 (ZeRO stage), found {}", t.zero);
    }
    match t.gradient_checkpointing_every {
        Some(0) => bail!("key 'train.gradient_checkpointing_every': expected an integer ≥ 1 (every k-th layer)"),
        Some(_) if !t.gradient_checkpointing => bail!(
            "key 'train.gradient_checkpointing_every' is set but train.gradient_checkpointing is false; set \
             gradient_checkpointing = true (or remove the key)"
        ),
        _ => {}
    }
    if t.quantization()?.is_some() && c.method != Method::Lora {
        bail!(
            "key 'train.quantize': QLoRA trains LoRA adapters on the frozen quantised base; set method = \"lora\" (found method = \"{}\")",
            c.method.as_str()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, sets: &[&str]) -> Result<LoadedConfig> {
        let table: toml::Table = toml::from_str(text).unwrap();
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        LoadedConfig::from_table(table, Path::new("c.toml"), &sets, "sft")
    }

    const BASE: &str = "model = \"m\"\ndata = [\"d.jsonl\"]\noutput_dir = \"out\"\n[train]\nlr = 1e-4\n[sft]\ntrain_on_prompt = true\n";

    #[test]
    fn defaults_overrides_and_stage_section() {
        let c = load(BASE, &["train.lr=3e-4", "train.schedule=linear", "method=lora", "sft.packing=true"]).unwrap();
        assert_eq!(c.config.train.lr, 3e-4);
        assert_eq!(c.config.train.schedule, Schedule::Linear);
        assert_eq!(c.config.method, Method::Lora);
        assert_eq!(c.config.train.batch_size, 8);
        assert_eq!(c.stage.get("packing").and_then(|v| v.as_bool()), Some(true));
        assert_eq!(c.hash.len(), 64);
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let e = load(BASE, &["train.lrr=1"]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("lrr"), "{e}");
        let e = load(&format!("colour = 1\n{BASE}"), &[]).unwrap_err().to_string();
        assert!(e.contains("colour"), "{e}");
        let e = load(BASE, &["train.val_ratio=1.5"]).unwrap_err().to_string();
        assert!(e.contains("train.val_ratio"), "{e}");
    }

    #[test]
    fn gradient_checkpointing_keys() {
        let c = load(BASE, &["train.gradient_checkpointing=true"]).unwrap();
        assert_eq!(c.config.train.checkpoint_every(), 1);
        let c = load(BASE, &["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=2"]).unwrap();
        assert_eq!(c.config.train.checkpoint_every(), 2);
        assert_eq!(load(BASE, &[]).unwrap().config.train.checkpoint_every(), 0);
        let e = load(BASE, &["train.gradient_checkpointing_every=2"]).unwrap_err().to_string();
        assert!(e.contains("train.gradient_checkpointing_every") && e.contains("gradient_checkpointing = true"), "{e}");
        let e = load(BASE, &["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=0"])
            .unwrap_err()
            .to_string();
        assert!(e.contains("≥ 1"), "{e}");
        // it changes no result: same hash, so a run resumes with it turned on
        let on = load(BASE, &["train.gradient_checkpointing=true", "train.gradient_checkpointing_every=2"]).unwrap();
        assert_eq!(on.hash, load(BASE, &[]).unwrap().hash);
        assert_ne!(load(BASE, &["train.loss_chunk_tokens=64"]).unwrap().hash, on.hash);
    }

    #[test]
    fn the_optimizer_is_adamw_or_adamw8bit() {
        assert_eq!(load(BASE, &[]).unwrap().config.train.optimizer, OptimizerKind::Adamw);
        let c = load(BASE, &["train.optimizer=adamw8bit"]).unwrap();
        assert_eq!(c.config.train.adamw().kind, OptimizerKind::Adamw8bit);
        let e = load(BASE, &["train.optimizer=adam8"]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: ") && e.contains("train.optimizer") && e.contains("\"adam8\""), "{e}");
        assert!(e.contains(r#""adamw", "adamw8bit""#), "{e}");
    }

    #[test]
    fn a_method_section_needs_its_method() {
        let e = load(&format!("{BASE}[lora]\nr = 4\n"), &[]).unwrap_err().to_string();
        assert_eq!(e, r#"c.toml: [lora] is set but method = "full"; set method = "lora" (or remove [lora])"#);
        let e = load(BASE, &["lora.r=4", "method=freeze"]).unwrap_err().to_string();
        assert!(e.contains(r#"[lora] is set but method = "freeze"; set method = "lora""#), "{e}");
        let e = load(BASE, &["freeze.last_layers=1"]).unwrap_err().to_string();
        assert_eq!(e, r#"c.toml: [freeze] is set but method = "full"; set method = "freeze" (or remove [freeze])"#);
        let e = load(BASE, &["freeze.last_layers=1", "method=lora"]).unwrap_err().to_string();
        assert!(e.contains("[freeze] is set but method = \"lora\""), "{e}");
        // with its method, each section is read (and checked) when the config loads
        let c = load(BASE, &["method=lora", "lora.r=4", "lora.targets=all-linear"]).unwrap();
        assert_eq!(c.config.method, Method::Lora);
        load(BASE, &["method=freeze", "freeze.last_layers=1"]).unwrap();
        load(BASE, &["method=lora"]).unwrap();
        let e = load(BASE, &["method=lora", "lora.targets=3"]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: [lora]: ") && e.contains("`targets` as a list of module names"), "{e}");
        let e = load(BASE, &["method=lora", "lora.targets=\"(\""]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: [lora] lora.targets: ") && e.contains("regular expression"), "{e}");
        let e = load(BASE, &["method=lora", "lora.r=0"]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("lora.r"), "{e}");
        let e = load(BASE, &["method=freeze", "freeze.layers=1"]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: [freeze]: ") && e.contains("layers"), "{e}");
    }

    #[test]
    fn quantize_needs_lora_and_a_four_bit_type() {
        use crate::model::quant::{QuantType4, Quantization};
        let c = load(BASE, &["method=lora", "train.quantize=nf4", "train.double_quant=true"]).unwrap();
        assert_eq!(
            c.config.train.quantization().unwrap(),
            Some(Quantization::FourBit { quant_type: QuantType4::Nf4, double_quant: true })
        );
        let c = load(BASE, &["method=lora", "train.quantize=fp4"]).unwrap();
        assert_eq!(
            c.config.train.quantization().unwrap(),
            Some(Quantization::FourBit { quant_type: QuantType4::Fp4, double_quant: false })
        );
        assert_eq!(load(BASE, &[]).unwrap().config.train.quantization().unwrap(), None);
        let e = load(BASE, &["train.quantize=nf4"]).unwrap_err().to_string();
        assert!(e.starts_with("c.toml: key 'train.quantize'") && e.contains("QLoRA trains LoRA adapters"), "{e}");
        assert!(e.contains(r#"method = "full""#), "{e}");
        let e = load(BASE, &["method=freeze", "freeze.last_layers=1", "train.quantize=nf4"]).unwrap_err().to_string();
        assert!(e.contains(r#"set method = "lora" (found method = "freeze")"#), "{e}");
        let e = load(BASE, &["method=lora", "train.double_quant=true"]).unwrap_err().to_string();
        assert!(e.contains("key 'train.double_quant'") && e.contains("train.quantize"), "{e}");
        let e = load(BASE, &["method=lora", "train.quantize=int8"]).unwrap_err().to_string();
        assert!(e.contains("key 'train.quantize'") && e.contains("inference only"), "{e}");
        let e = load(BASE, &["method=lora", "train.quantize=nf8"]).unwrap_err().to_string();
        assert!(e.contains(r#"expected "nf4" or "fp4", found "nf8""#), "{e}");
        let e = load(BASE, &["method=lora", "train.quantize=nf4", "train.double_quant=1"]).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("bool"), "{e}");
    }

    #[test]
    fn hash_ignores_key_order_and_sees_values() {
        let a = load(BASE, &[]).unwrap().hash;
        let reordered = "output_dir = \"out\"\ndata = [\"d.jsonl\"]\nmodel = \"m\"\n[sft]\ntrain_on_prompt = true\n[train]\nlr = 1e-4\n";
        assert_eq!(a, load(reordered, &[]).unwrap().hash);
        assert_ne!(a, load(BASE, &["train.lr=2e-4"]).unwrap().hash);
    }
}
