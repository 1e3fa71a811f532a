//! Parameter-efficient fine-tuning: LoRA adapters on the projections of a decoder trunk (attach,
//! disable, merge, save and load in PEFT's format) and freezing all but selected parameters. One
//! implementation serves every model built on the trunk ([`LoraModel`]): the causal LM, and the
//! scalar (reward) model, whose `score` head trains in full beside the adapters and is saved with
//! them, as PEFT's `task_type = "SEQ_CLS"` with `modules_to_save = ["score"]` does.
//!
//! An adapted projection computes `x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`
//! (PEFT's kaiming-uniform init), `B: [out, r]` (zeros) and `scaling = alpha / r` (rsLoRA:
//! `alpha / √r`). The adapter variables live in the model's `VarStore` under
//! `<module>.lora_A.weight` / `<module>.lora_B.weight`; on disk (PEFT) the same names carry the
//! `base_model.model.` prefix, as do the weights of the modules saved in full (`score.weight`).
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::hf::checkpoint::{copy_companions, for_each_tensor, resolve_model_dir, save_tensors, SINGLE_FILE};
use crate::hf::folder::write_folder;
use crate::model::decoder::{LinearWeight, Trunk};
use crate::model::io::remove_variables;

pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every saved key of an adapter file (the adapter and the modules saved in full).
const PEFT_PREFIX: &str = "base_model.model.";
/// DoRA's magnitude vector of a module: `<module>.lora_magnitude_vector` in the `VarStore` and,
/// after PEFT's prefix, in adapter files.
const MAGNITUDE: &str = "lora_magnitude_vector";
pub use crate::model::lora_layer::{LoraAdapter, LoraConfig, LoraInit, LoraTargets, ALL_LINEAR};

/// Adapter weights are kept in f32 (f64 for an f64 model) whatever the base dtype, as PEFT does
/// by default (`autocast_adapter_dtype`), so small updates are not lost to bf16 rounding.
fn adapter_kind(base: Kind) -> Kind {
    if base == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// A model whose decoder trunk takes LoRA adapters, and what PEFT records for it: its
/// `task_type`, and the modules trained in full beside the adapters and saved with them
/// (`modules_to_save`; a reward model's `score` head). Every function of this module works on
/// any such model.
pub trait LoraModel {
    /// PEFT's `task_type` of an adapter made for this model (`CAUSAL_LM`, `SEQ_CLS`).
    const PEFT_TASK_TYPE: &'static str;
    /// PEFT's `modules_to_save`: module names whose variables train in full under LoRA and are
    /// stored in the adapter file as `base_model.model.<name>.weight`.
    const MODULES_TO_SAVE: &'static [&'static str];
    /// The decoder trunk whose projections take adapters.
    fn trunk(&self) -> &Trunk;
    fn trunk_mut(&mut self) -> &mut Trunk;
    /// The variables of `MODULES_TO_SAVE` by HF name (`score.weight`), sorted.
    fn modules_to_save(&self) -> Vec<(String, Tensor)>;
    /// The model type (PEFT's per-type defaults, e.g. (IA)³'s modules).
    fn model_type(&self) -> crate::hf::config::ModelType;
}

/// Module names PEFT adds to `modules_to_save` of every `SEQ_CLS` adapter (it keeps those the
/// model has): a model holds one of them.
pub(crate) const PEFT_CLASSIFIER_NAMES: &[&str] = &["classifier", "score"];

pub use crate::hf::checkpoint::is_adapter_variable;

/// The module paths of `trunk`'s projections that `config` adapts: those `targets` selects
/// (PEFT's rules, see [`LoraTargets`]) in the layers `layers_to_transform` names.
fn resolve_targets(trunk: &Trunk, config: &LoraConfig) -> Result<Vec<String>> {
    let names: Vec<String> = trunk.linears().into_iter().map(|(n, _)| n).collect();
    let selected = config.targets.select(&names)?;
    if let Some(layers) = &config.layers_to_transform {
        let n = trunk.layers.len() as i64;
        if let Some(i) = layers.iter().find(|i| **i >= n) {
            bail!("layers_to_transform: layer {i} does not exist (the model has decoder layers 0..{})", n - 1);
        }
    }
    Ok(selected.into_iter().filter(|p| config.transforms_layer_of(p)).collect())
}

/// The starting `(A, B)` of an adapter of rank `r` on weight `w` (`[out, in]`), and for PiSSA /
/// OLoRA the residual base weight `W − scaling · B A` (in `w`'s dtype). `random` false: zeros
/// (the weights will be copied in from a file), unless the initialisation moves part of the
/// base into the adapter, which loading must repeat.
fn initial_adapter(
    init: LoraInit,
    w: Option<&Tensor>,
    (r, fan_in, fan_out, scaling): (i64, i64, i64, f64),
    (kind, device): (Kind, Device),
    random: bool,
) -> Result<(Tensor, Tensor, Option<Tensor>)> {
    if init.mutates_base() {
        let w = w.ok_or_else(|| {
            anyhow!(
                "init_lora_weights = {}: needs the full-precision base weight (not a quantised base)",
                init.to_json()
            )
        })?;
        let wf = w.f_to_kind(Kind::Float)?;
        let (a, b) = match init {
            LoraInit::Pissa => {
                // W = U S Vᵀ: B = U_r √(S_r/scaling), A = √(S_r/scaling) V_rᵀ (PEFT's pissa_init)
                // torch.svd's (U, S, V) come from the same decomposition as linalg.svd's Vh = Vᵀ
                let (u, sv, v) = wf.f_svd(true, true)?;
                let vh = v.f_transpose(0, 1)?;
                let sr = sv.f_narrow(0, 0, r)?.f_div_scalar(scaling)?.f_sqrt()?.f_diag(0)?;
                (sr.f_matmul(&vh.f_narrow(0, 0, r)?)?, u.f_narrow(1, 0, r)?.f_matmul(&sr)?)
            }
            _ => {
                // W = Q R: B = Q[:, :r], A = R[:r] (PEFT's olora_init)
                let (q, rr) = Tensor::f_linalg_qr(&wf, "reduced")?;
                (rr.f_narrow(0, 0, r)?.f_contiguous()?, q.f_narrow(1, 0, r)?.f_contiguous()?)
            }
        };
        // `W − scaling · B @ A` evaluated as PEFT does: (scaling · B) @ A
        let residual = wf.f_sub(&b.f_mul_scalar(scaling)?.f_matmul(&a)?)?.f_to_kind(w.kind())?;
        return Ok((a.f_to_kind(kind)?, b.f_to_kind(kind)?, Some(residual)));
    }
    let a = if !random {
        Tensor::f_zeros([r, fan_in], (kind, device))?
    } else if init == LoraInit::Gaussian {
        Tensor::f_empty([r, fan_in], (kind, device))?.f_normal_(0.0, 1.0 / r as f64)?
    } else {
        // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in
        let bound = 1.0 / (fan_in as f64).sqrt();
        Tensor::f_empty([r, fan_in], (kind, device))?.f_uniform_(-bound, bound)?
    };
    Ok((a, Tensor::f_zeros([fan_out, r], (kind, device))?, None))
}

/// Attaches fresh adapters (as `config.init_lora_weights` says, random numbers from libtorch's
/// global generator) to the projections `config` selects, registers them in `vs` and freezes
/// every other variable (`requires_grad = false`) except those of the model's
/// `modules_to_save` (a reward model's head), which keep training in full. With DoRA each
/// adapter gets its magnitude vector `‖W‖` per row; PiSSA / OLoRA replace the adapted base
/// weights by their residuals. Attach after loading the base weights. Returns the adapted module
/// paths.
pub fn attach_lora<M: LoraModel>(vs: &VarStore, model: &mut M, config: &LoraConfig) -> Result<Vec<String>> {
    attach(vs, model, config, true)
}

fn attach<M: LoraModel>(vs: &VarStore, model: &mut M, config: &LoraConfig, random_a: bool) -> Result<Vec<String>> {
    config.validate()?;
    let trunk = model.trunk();
    ensure!(trunk.lora_config().is_none(), "LoRA adapters are already attached to this model");
    ensure!(
        trunk.virtual_tokens().is_none(),
        "prompt learning is attached to this model: LoRA adapters cannot join it"
    );
    let modules = resolve_targets(trunk, config).context("lora.targets")?;
    if config.init_lora_weights.mutates_base() {
        refuse_quantized(
            trunk,
            &format!("initialise adapters with init_lora_weights = {} on", config.init_lora_weights.to_json()),
        )?;
    }
    let wanted: HashSet<&str> = modules.iter().map(String::as_str).collect();
    let vars = vs.variables();
    for name in vars.keys() {
        ensure!(!is_adapter_variable(name), "the model already holds LoRA variable '{name}'");
    }
    let kind = adapter_kind(trunk.embed_tokens.kind());
    let (device, mode) = (trunk.embed_tokens.device(), trunk.run_mode());
    let full: Vec<Tensor> = model.modules_to_save().into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| -> Result<()> {
        for v in vars.values() {
            let _ = v.shallow_clone().f_requires_grad_(false)?;
        }
        for t in &full {
            let _ = t.shallow_clone().f_requires_grad_(true)?;
        }
        for (path, lin) in model.trunk_mut().linears_mut() {
            if !wanted.contains(path.as_str()) {
                continue;
            }
            let (r, scaling) = (config.rank_of(&path)?, config.scaling_of(&path)?);
            let (fan_in, fan_out) = (lin.in_features(), lin.out_features());
            ensure!(
                !config.init_lora_weights.mutates_base() || r <= fan_in.min(fan_out),
                "{path}: rank {r} is larger than the weight's smaller side {} (init_lora_weights = {})",
                fan_in.min(fan_out),
                config.init_lora_weights.to_json()
            );
            let (a, b, residual) = initial_adapter(
                config.init_lora_weights,
                lin.weight.dense(),
                (r, fan_in, fan_out, scaling),
                (kind, device),
                random_a,
            )
            .with_context(|| path.clone())?;
            let initial = match residual {
                Some(residual) => {
                    if let LinearWeight::Dense(w) = &mut lin.weight {
                        let _ = w.f_copy_(&residual)?;
                    }
                    Some((a.copy(), b.copy()))
                }
                None => None,
            };
            let mut p = vs.root();
            for seg in path.split('.') {
                p = p.sub(seg);
            }
            let magnitude = if config.use_dora {
                let w = match &lin.weight {
                    LinearWeight::Dense(w) => w.f_to_kind(kind)?,
                    LinearWeight::Quantized(q) => q.dequantize(kind)?,
                };
                // ‖W + scaling·B A‖ per row, B A = 0 at the start (PEFT's dora_init)
                let delta = b.f_matmul(&a)?.f_mul_scalar(scaling)?;
                let norm = w.f_add(&delta)?.f_linalg_norm(2.0, &[1i64][..], false, None::<Kind>)?;
                Some(p.add("lora_magnitude_vector", norm, true))
            } else {
                None
            };
            let lora_a = p.sub("lora_A").add("weight", a, true);
            let lora_b = p.sub("lora_B").add("weight", b, true);
            lin.lora = Some(LoraAdapter {
                lora_a,
                lora_b,
                magnitude,
                initial,
                scaling,
                dropout: config.dropout,
                mode: mode.clone(),
            });
        }
        Ok(())
    })?;
    model.trunk_mut().set_lora_config(Some(config.clone()));
    Ok(modules)
}

/// Runs `f` with the trunk's adapters disabled (the base model, e.g. the DPO/PPO reference),
/// then restores the previous state, also when `f` fails. Modules trained in full (a reward
/// model's head) keep their current weights: the model keeps only one copy of them.
pub fn without_adapters<M: LoraModel, T>(model: &M, f: impl FnOnce(&M) -> Result<T>) -> Result<T> {
    let trunk = model.trunk();
    let was = trunk.adapters_enabled();
    trunk.set_adapters_enabled(false);
    let out = f(model);
    trunk.set_adapters_enabled(was);
    out
}

/// Refuses `what` (merging, exporting, saving full weights) on a trunk whose base is held
/// quantised: a quantised base has no full-precision weights to write or fold into.
pub fn refuse_quantized(trunk: &Trunk, what: &str) -> Result<()> {
    match trunk.quantization() {
        Some(q) => bail!(
            "cannot {what} a model loaded quantised ({}): its base weights are not kept in full precision; load the full-precision base (no --quantize / [train] quantize) and export from it",
            q.describe()
        ),
        None => Ok(()),
    }
}

/// Folds every adapter into its base weight (`W += scaling · B A`, in W's dtype; with DoRA
/// `W ← m / ‖W + scaling · B A‖ · (W + scaling · B A)` row by row), then removes
/// the adapters from the model and their variables from `vs`, leaving a plain model (a reward
/// model keeps its trained head). The `requires_grad` flags of the base weights are left as they
/// are.
pub fn merge_lora<M: LoraModel>(vs: &VarStore, model: &mut M) -> Result<()> {
    ensure!(model.trunk().lora_config().is_some(), "no LoRA adapters are attached: nothing to merge");
    refuse_quantized(model.trunk(), "merge LoRA adapters into")?;
    let mut removed = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let mut merged = Vec::new();
        for (path, lin) in model.trunk().linears() {
            if let (Some(lora), Some(w)) = (&lin.lora, lin.weight.dense()) {
                merged.push((path, lora.merged_weight(w)?));
            }
        }
        let mut merged: HashMap<String, Tensor> = merged.into_iter().collect();
        for (path, lin) in model.trunk_mut().linears_mut() {
            if let (Some(new), LinearWeight::Dense(w)) = (merged.remove(&path), &mut lin.weight) {
                let _ = w.f_copy_(&new)?;
                if lin.lora.take().is_some_and(|l| l.magnitude.is_some()) {
                    removed.push(format!("{path}.lora_magnitude_vector"));
                }
                removed.push(format!("{path}.lora_A.weight"));
                removed.push(format!("{path}.lora_B.weight"));
            }
        }
        Ok(())
    })?;
    remove_variables(vs, &removed)?;
    let trunk = model.trunk_mut();
    trunk.set_lora_config(None);
    trunk.set_adapters_enabled(true);
    Ok(())
}

/// What an adapter file holds, under PEFT's saved names: the adapter weights
/// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`) and the weights of the
/// modules trained in full (`base_model.model.score.weight`).
pub fn adapter_tensors<M: LoraModel>(model: &M) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (path, lin) in model.trunk().linears() {
        if let Some(lora) = &lin.lora {
            out.insert(format!("{PEFT_PREFIX}{path}.lora_A.weight"), lora.lora_a.shallow_clone());
            out.insert(format!("{PEFT_PREFIX}{path}.lora_B.weight"), lora.lora_b.shallow_clone());
            if let Some(m) = &lora.magnitude {
                out.insert(format!("{PEFT_PREFIX}{path}.{MAGNITUDE}"), m.shallow_clone());
            }
        }
    }
    for (name, t) in model.modules_to_save() {
        out.insert(format!("{PEFT_PREFIX}{name}"), t);
    }
    out
}

/// What `save_adapter` records besides the weights.
#[derive(Default)]
pub struct AdapterSaveOptions<'a> {
    /// `base_model_name_or_path` in `adapter_config.json` (the base model folder or hub id).
    pub base_model_name_or_path: Option<String>,
    /// Copy the tokenizer and generation-config files from this folder.
    pub companions_from: Option<&'a Path>,
}

/// `adapter_config.json` as PEFT 0.21 writes it for a LoRA adapter on `model` (the training-only
/// `loraplus_lr_ratio` is not part of it).
/// `target_modules` is a list of names, or the regular expression given; `"all-linear"` is
/// written as the short names it selected, as PEFT does.
fn peft_config_json<M: LoraModel>(model: &M, config: &LoraConfig, base: Option<&str>) -> Value {
    let targets: Value = if config.targets.is_all_linear() {
        let short: BTreeSet<String> = model
            .trunk()
            .linears()
            .into_iter()
            .filter(|(_, l)| l.lora.is_some())
            .filter_map(|(p, _)| p.rsplit('.').next().map(str::to_string))
            .collect();
        json!(short.into_iter().collect::<Vec<_>>())
    } else {
        json!(config.targets)
    };
    // an integral alpha is written as PEFT's int
    let number = |a: f64| if a.fract() == 0.0 && a.abs() < 1e15 { json!(a as i64) } else { json!(a) };
    let alpha = number(config.alpha);
    let alpha_pattern: serde_json::Map<String, Value> =
        config.alpha_pattern.iter().map(|(k, a)| (k.clone(), number(*a))).collect();
    let modules_to_save = if M::MODULES_TO_SAVE.is_empty() { Value::Null } else { json!(M::MODULES_TO_SAVE) };
    json!({
        "alpha_pattern": alpha_pattern,
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": config.init_lora_weights.to_json(),
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": config.layers_to_transform,
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": config.dropout,
        "modules_to_save": modules_to_save,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": config.rank_pattern,
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": M::PEFT_TASK_TYPE,
        "use_dora": config.use_dora,
        "use_rslora": config.use_rslora,
    })
}

/// Writes `adapter_model.safetensors`, `adapter_config.json` and the companion files into the
/// existing folder `dir` (no temporary folder: see `save_adapter`).
pub fn write_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    let config =
        model.trunk().lora_config().ok_or_else(|| anyhow!("no LoRA adapters are attached: nothing to save"))?;
    write_tensor_file(&adapter_tensors(model), dir, ADAPTER_WEIGHTS_FILE)?;
    let cfg = peft_config_json(model, config, opts.base_model_name_or_path.as_deref());
    write_adapter_config(dir, &cfg, opts)
}

/// Writes `tensors` as the single safetensors file `name` in `dir` (through the one safetensors
/// writer, `checkpoint::save_tensors`, which names its file model.safetensors). Every kind of
/// adapter folder writes its weights with it.
pub(crate) fn write_tensor_file(tensors: &BTreeMap<String, Tensor>, dir: &Path, name: &str) -> Result<()> {
    let staging = dir.join(".adapter-weights");
    std::fs::create_dir_all(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
    save_tensors(tensors, &staging, None, usize::MAX)?;
    let target = dir.join(name);
    std::fs::rename(staging.join(SINGLE_FILE), &target)
        .with_context(|| format!("{}: cannot move into place", target.display()))?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove", staging.display()))
}

/// Writes `adapter_config.json` (`cfg`) and the companion files `opts` names into `dir`: the end
/// of every kind of adapter folder.
pub(crate) fn write_adapter_config(dir: &Path, cfg: &Value, opts: &AdapterSaveOptions) -> Result<()> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    std::fs::write(&path, serde_json::to_string_pretty(cfg)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))?;
    if let Some(from) = opts.companions_from {
        copy_companions(from, dir)?;
    }
    Ok(())
}

/// `adapter_config.json` of an adapter folder of any kind as a JSON object.
pub(crate) fn read_adapter_json(dir: &Path) -> Result<serde_json::Map<String, Value>> {
    let path = dir.join(ADAPTER_CONFIG_FILE);
    if !path.is_file() {
        bail!(
            "{}: no {ADAPTER_CONFIG_FILE} (an adapter folder holds {ADAPTER_CONFIG_FILE} and {ADAPTER_WEIGHTS_FILE}, as PEFT writes them)",
            dir.display()
        );
    }
    let at = path.display();
    let text = std::fs::read_to_string(&path).with_context(|| format!("{at}: cannot read"))?;
    let v: Value = serde_json::from_str(&text).map_err(|e| anyhow!("{at}:{}: invalid JSON: {e}", e.line()))?;
    match v {
        Value::Object(o) => Ok(o),
        _ => bail!("{at}: expected a JSON object"),
    }
}

/// `peft_type` of an adapter folder's `adapter_config.json` (`LORA`, `IA3`, `PROMPT_TUNING`, …).
pub fn adapter_peft_type(dir: &Path) -> Result<String> {
    let obj = read_adapter_json(dir)?;
    let at = dir.join(ADAPTER_CONFIG_FILE);
    match obj.get("peft_type") {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => bail!("{}: field 'peft_type': expected a string, found {other}", at.display()),
        None => bail!("{}: field 'peft_type': missing", at.display()),
    }
}

/// Whether an adapter folder of any kind (LoRA, (IA)³, …) is a reward model's: `task_type`
/// `SEQ_CLS`, or the `score` head among `modules_to_save`; and its `task_type` as written.
pub fn adapter_reward_task(dir: &Path) -> Result<(bool, Option<String>)> {
    let obj = read_adapter_json(dir)?;
    let task = obj.get("task_type").and_then(Value::as_str).map(str::to_string);
    let score = obj
        .get("modules_to_save")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().any(|m| m.as_str() == Some("score")));
    Ok((task.as_deref() == Some("SEQ_CLS") || score, task))
}

/// The base model folder an adapter folder of any kind names in `base_model_name_or_path` (a
/// folder, relative to the working directory as PEFT reads it, or a hub id in the local HF cache).
pub fn adapter_base_model_dir(dir: &Path) -> Result<PathBuf> {
    let obj = read_adapter_json(dir)?;
    resolve_base_model(obj.get("base_model_name_or_path").and_then(Value::as_str), dir)
}

fn resolve_base_model(base: Option<&str>, dir: &Path) -> Result<PathBuf> {
    let at = dir.join(ADAPTER_CONFIG_FILE);
    let at = at.display();
    let base = base
        .filter(|b| !b.is_empty())
        .ok_or_else(|| anyhow!("{at}: field 'base_model_name_or_path': missing; name the base model explicitly"))?;
    resolve_model_dir(base).with_context(|| format!("{at}: field 'base_model_name_or_path'"))
}

/// Saves the attached adapters (and the modules trained in full) as a PEFT adapter folder,
/// written to a temporary sibling folder and renamed into place when complete.
pub fn save_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    write_folder(dir, |tmp| write_adapter(model, tmp, opts))
}

/// A field that is absent or holds nothing (null, false, "", [], {}).
fn is_unset(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) | Some(Value::Bool(false)) => true,
        Some(Value::String(s)) => s.is_empty(),
        Some(Value::Array(a)) => a.is_empty(),
        Some(Value::Object(o)) => o.is_empty(),
        Some(_) => false,
    }
}

/// `adapter_config.json` of an adapter folder, as far as this implementation reads it.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterFolderConfig {
    pub lora: LoraConfig,
    /// `task_type` (`CAUSAL_LM`, `SEQ_CLS`, …), when given.
    pub task_type: Option<String>,
    /// `modules_to_save`, without repeats (PEFT writes `["score", "classifier", "score"]` for a
    /// sequence classifier).
    pub modules_to_save: Vec<String>,
    /// `base_model_name_or_path`, when given.
    pub base_model_name_or_path: Option<String>,
}

impl AdapterFolderConfig {
    /// True for an adapter of a reward model (`*ForSequenceClassification`): `task_type` is
    /// `SEQ_CLS` or the `score` head is among `modules_to_save`.
    pub fn is_reward_model(&self) -> bool {
        self.task_type.as_deref() == Some("SEQ_CLS") || self.modules_to_save.iter().any(|m| m == "score")
    }

    /// The base model folder `base_model_name_or_path` names (a folder, relative to the working
    /// directory as PEFT reads it, or a hub id in the local HF cache).
    pub fn base_model_dir(&self, dir: &Path) -> Result<PathBuf> {
        resolve_base_model(self.base_model_name_or_path.as_deref(), dir)
    }
}

/// Reads `adapter_config.json` of an adapter folder (ours or PEFT's) as a `LoraConfig`. Options
/// this implementation does not have (LoRA biases, `fan_in_fan_out`, excluded modules, …) are
/// errors naming the field. See [`read_adapter_folder_config`] for the task type and the modules saved in full.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
    Ok(read_adapter_folder_config(dir)?.lora)
}

/// Reads `adapter_config.json` of an adapter folder (ours or PEFT's): the LoRA options, the task
/// type, `modules_to_save` and the base model. Options this implementation does not have are
/// errors naming the field.
pub fn read_adapter_folder_config(dir: &Path) -> Result<AdapterFolderConfig> {
    let obj = read_adapter_json(dir)?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let at = path.display();
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match field("peft_type") {
        Some(Value::String(s)) if s == "LORA" => {}
        Some(Value::String(s)) if s == "PROMPT_TUNING" || s == "P_TUNING" || s == "PREFIX_TUNING" => bail!(
            "{at}: field 'peft_type': a {s} adapter adds virtual tokens and has no LoRA weights to merge; apply it with --adapter (generate, eval) or train it further with method = \"{}\"",
            s.to_lowercase()
        ),
        Some(Value::String(s)) if s == "IA3" => bail!(
            "{at}: field 'peft_type': an IA3 adapter, which this LoRA reader does not read (read it with peft::ia3; `align export` merges it, --adapter applies it, method = \"ia3\" trains it)"
        ),
        Some(other) => bail!("{at}: field 'peft_type': only \"LORA\", \"IA3\", \"PROMPT_TUNING\", \"P_TUNING\" and \"PREFIX_TUNING\" adapters are supported, found {other}"),
        None => bail!("{at}: field 'peft_type': missing (expected \"LORA\")"),
    }
    let r = match field("r") {
        None => 8,
        Some(v) => v
            .as_i64()
            .filter(|r| *r >= 1)
            .ok_or_else(|| anyhow!("{at}: field 'r': expected an integer ≥ 1, found {v}"))?,
    };
    let number = |k: &str, default: f64| -> Result<f64> {
        match field(k) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| anyhow!("{at}: field '{k}': expected a number, found {v}")),
        }
    };
    let alpha = number("lora_alpha", 8.0)?;
    let dropout = number("lora_dropout", 0.0)?;
    let use_rslora = match field("use_rslora") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => bail!("{at}: field 'use_rslora': expected true or false, found {v}"),
    };
    let strings = |k: &str, items: &[Value]| -> Result<Vec<String>> {
        items
            .iter()
            .map(|t| {
                t.as_str().map(str::to_string).ok_or_else(|| anyhow!("{at}: field '{k}': expected strings, found {t}"))
            })
            .collect()
    };
    let targets = match field("target_modules") {
        Some(Value::String(s)) => LoraTargets::Pattern(s.clone()),
        Some(Value::Array(items)) => LoraTargets::Names(strings("target_modules", items)?),
        Some(v) => bail!(
            "{at}: field 'target_modules': expected a list of module names or a string (\"{ALL_LINEAR}\" or a regular expression), found {v}"
        ),
        None => bail!("{at}: field 'target_modules': missing (expected a list of module names)"),
    };
    if let Some(p) = targets.problem() {
        bail!("{at}: field 'target_modules': {p}");
    }
    let mut modules_to_save: Vec<String> = Vec::new();
    match field("modules_to_save") {
        None => {}
        Some(Value::Array(items)) => {
            for m in strings("modules_to_save", items)? {
                if !modules_to_save.contains(&m) {
                    modules_to_save.push(m);
                }
            }
        }
        Some(v) => bail!("{at}: field 'modules_to_save': expected a list of module names, found {v}"),
    }
    let task_type = match field("task_type") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => bail!("{at}: field 'task_type': expected a string, found {v}"),
    };
    let base_model_name_or_path = match field("base_model_name_or_path") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => bail!("{at}: field 'base_model_name_or_path': expected a string, found {v}"),
    };
    if let Some(b) = field("bias") {
        ensure!(b == "none", "{at}: field 'bias': only \"none\" is supported, found {b}");
    }
    let use_dora = match field("use_dora") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => bail!("{at}: field 'use_dora': expected true or false, found {v}"),
    };
    let init_lora_weights = match field("init_lora_weights") {
        None => LoraInit::Default,
        Some(v) => LoraInit::from_json(v, true).map_err(|e| anyhow!("{at}: field 'init_lora_weights': {e}"))?,
    };
    let pattern = |k: &str| -> Result<Vec<(String, f64)>> {
        match field(k) {
            None => Ok(Vec::new()),
            Some(Value::Object(m)) => m
                .iter()
                .map(|(key, v)| {
                    v.as_f64()
                        .map(|n| (key.clone(), n))
                        .ok_or_else(|| anyhow!("{at}: field '{k}': '{key}': expected a number, found {v}"))
                })
                .collect(),
            Some(v) => bail!("{at}: field '{k}': expected an object of module patterns, found {v}"),
        }
    };
    let mut rank_pattern = BTreeMap::new();
    for (key, r) in pattern("rank_pattern")? {
        ensure!(
            r.fract() == 0.0 && r >= 1.0,
            "{at}: field 'rank_pattern': '{key}': expected an integer ≥ 1, found {r}"
        );
        rank_pattern.insert(key, r as i64);
    }
    let alpha_pattern: BTreeMap<String, f64> = pattern("alpha_pattern")?.into_iter().collect();
    let layers_to_transform = match field("layers_to_transform") {
        None => None,
        Some(Value::Array(items)) if items.is_empty() => None,
        Some(Value::Array(items)) => Some(
            items
                .iter()
                .map(|v| {
                    v.as_i64().ok_or_else(|| anyhow!("{at}: field 'layers_to_transform': expected integers, found {v}"))
                })
                .collect::<Result<Vec<i64>>>()?,
        ),
        Some(v) => match v.as_i64() {
            Some(i) => Some(vec![i]),
            None => bail!("{at}: field 'layers_to_transform': expected a layer index or a list of them, found {v}"),
        },
    };
    // the decoder's layers are under `layers`: PEFT's default (no pattern) and "layers" find them
    match field("layers_pattern") {
        None => {}
        Some(Value::String(p)) if p.is_empty() || p == "layers" => {}
        Some(Value::Array(items)) if items.iter().all(|p| p == "layers") => {}
        Some(v) => {
            bail!("{at}: field 'layers_pattern': only \"layers\" (the decoder's layer list) is supported, found {v}")
        }
    }
    for key in [
        "lora_bias",
        "fan_in_fan_out",
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "use_qalora",
        "alora_invocation_tokens",
    ] {
        if !is_unset(obj.get(key)) {
            bail!("{at}: field '{key}': {} is not supported (only LoRA and DoRA on linear layers are)", obj[key]);
        }
    }
    let lora = LoraConfig {
        r,
        alpha,
        dropout,
        targets,
        use_rslora,
        use_dora,
        init_lora_weights,
        rank_pattern,
        alpha_pattern,
        layers_to_transform,
        loraplus_lr_ratio: None,
    };
    lora.validate().with_context(|| format!("{at}"))?;
    Ok(AdapterFolderConfig { lora, task_type, modules_to_save, base_model_name_or_path })
}

/// The modules of `M` whose weights an adapter folder carries (PEFT's `modules_to_save` as PEFT
/// applies it: listed ones, and for an adapter of `M`'s own task type every module `M` saves in
/// full). A listed module `M` does not save in full is an error naming the field, except, for a
/// `SEQ_CLS` adapter on a `SEQ_CLS` model, the classifier names PEFT adds to every such adapter.
fn full_modules_of<M: LoraModel>(folder: &AdapterFolderConfig, at: &Path) -> Result<Vec<&'static str>> {
    let classifier = M::PEFT_TASK_TYPE == "SEQ_CLS" && folder.task_type.as_deref() == Some("SEQ_CLS");
    for m in &folder.modules_to_save {
        let known =
            M::MODULES_TO_SAVE.contains(&m.as_str()) || (classifier && PEFT_CLASSIFIER_NAMES.contains(&m.as_str()));
        if !known {
            let hint = if folder.is_reward_model() {
                " (a reward-model adapter: load it onto the reward model, e.g. with `align eval reward` or `align export`)"
            } else {
                " (modules trained in full are supported only for a reward model's score head)"
            };
            bail!(
                "{}: field 'modules_to_save': module '{m}' is not saved in full by a {} model{hint}",
                at.display(),
                M::PEFT_TASK_TYPE
            );
        }
    }
    let own_task = folder.task_type.as_deref() == Some(M::PEFT_TASK_TYPE);
    Ok(M::MODULES_TO_SAVE
        .iter()
        .copied()
        .filter(|m| own_task || folder.modules_to_save.iter().any(|l| l == m))
        .collect())
}

/// `base_model.model.<module>.lora_A[.<adapter name>].weight` → `<module>.lora_A.weight`;
/// DoRA's `base_model.model.<module>.lora_magnitude_vector` (PEFT's saved name; with
/// `[.<adapter name>][.weight]` as it is named in memory) → `<module>.lora_magnitude_vector`.
fn variable_name_of(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    if let Some(i) = parts.iter().position(|p| *p == MAGNITUDE) {
        let tail = &parts[i + 1..];
        let ok = tail.is_empty() || tail == ["weight"] || tail.len() == 1 || (tail.len() == 2 && tail[1] == "weight");
        return (ok && i > 0).then(|| format!("{}.{MAGNITUDE}", parts[..i].join(".")));
    }
    let i = parts.iter().position(|p| *p == "lora_A" || *p == "lora_B")?;
    let tail = &parts[i + 1..];
    let ok = tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight");
    (ok && i > 0).then(|| format!("{}.{}.weight", parts[..i].join("."), parts[i]))
}

/// Loads an adapter folder (written by `save_adapter` or by PEFT's `save_pretrained`) into
/// `model`. Without attached adapters, attaches them as the folder's config says; with adapters
/// attached (resuming a LoRA run), the folder must have the same r, alpha, rsLoRA and DoRA
/// flags, initialisation, patterns and modules. An adapter initialised with PiSSA / OLoRA
/// (`init_lora_weights`) is relative to the residual base that initialisation leaves: loading it
/// repeats the initialisation on the base (as PEFT does) before copying the weights. The weights of modules saved in full (a reward model's `score`) are copied into the
/// model. A trunk-only adapter loads onto any model on that trunk; one with modules saved in full
/// only onto a model that has them. Shapes are checked against the base model; errors name the
/// file and the tensor. Returns the configuration in effect.
pub fn load_adapter<M: LoraModel>(vs: &VarStore, model: &mut M, dir: &Path) -> Result<LoraConfig> {
    let folder = read_adapter_folder_config(dir)?;
    let file_config = &folder.lora;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let at = config_path.display();
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail!("{}: only adapter_model.bin found; only safetensors adapters are read", dir.display());
        }
        bail!("{}: missing (the adapter weights)", weights.display());
    }
    let full = full_modules_of::<M>(&folder, &config_path)?;
    let wanted =
        resolve_targets(model.trunk(), file_config).with_context(|| format!("{at}: field 'target_modules'"))?;
    match model.trunk().lora_config() {
        None => {
            attach(vs, model, file_config, false).with_context(|| format!("{at}"))?;
        }
        Some(have) => {
            ensure!(
                have.r == file_config.r,
                "{at}: field 'r': the adapter has rank {} but the attached LoRA has rank {}",
                file_config.r,
                have.r
            );
            ensure!(
                (have.alpha - file_config.alpha).abs() <= 1e-9 * have.alpha.abs().max(1.0),
                "{at}: field 'lora_alpha': the adapter has {} but the attached LoRA has {}",
                file_config.alpha,
                have.alpha
            );
            ensure!(
                have.use_rslora == file_config.use_rslora,
                "{at}: field 'use_rslora': the adapter has {} but the attached LoRA has {}",
                file_config.use_rslora,
                have.use_rslora
            );
            for (field, differs) in [
                ("use_dora", have.use_dora != file_config.use_dora),
                ("init_lora_weights", have.init_lora_weights != file_config.init_lora_weights),
                ("rank_pattern", have.rank_pattern != file_config.rank_pattern),
                ("alpha_pattern", have.alpha_pattern != file_config.alpha_pattern),
            ] {
                ensure!(!differs, "{at}: field '{field}': differs from the attached LoRA's");
            }
            let attached: Vec<String> =
                model.trunk().linears().into_iter().filter(|(_, l)| l.lora.is_some()).map(|(p, _)| p).collect();
            if attached != wanted {
                let only_file: Vec<&String> = wanted.iter().filter(|w| !attached.contains(w)).collect();
                let only_model: Vec<&String> = attached.iter().filter(|w| !wanted.contains(w)).collect();
                bail!(
                    "{at}: field 'target_modules': the adapter's modules differ from the attached LoRA's (only in the adapter: {only_file:?}; only attached: {only_model:?})"
                );
            }
        }
    }
    copy_adapter_weights(model, &full, &weights)?;
    model.trunk().lora_config().cloned().ok_or_else(|| anyhow!("{at}: adapters were not attached"))
}

/// Loads LoRA adapter folders (PEFT `LORA`, DoRA included) as a bank served together on one
/// base model: adapter `i` of `dirs` becomes number `i` of every projection's `bank`, and each
/// batch row of a forward pass takes the adapter `Trunk::set_adapter_rows` gives it. Every
/// folder is read by [`load_adapter`] (the same checks against the base), then moved off the
/// projections into the bank, so the base itself carries no adapter. Adapters initialised with
/// PiSSA / OLoRA change the base weights and are refused (merge them with `align export`).
/// Returns each adapter's configuration.
pub fn load_adapter_bank<M: LoraModel>(model: &mut M, dirs: &[PathBuf]) -> Result<Vec<LoraConfig>> {
    let trunk = model.trunk();
    ensure!(
        trunk.lora_config().is_none(),
        "a LoRA adapter is already attached to this model: a bank needs the bare base"
    );
    ensure!(trunk.virtual_tokens().is_none(), "prompt learning is attached to this model: a LoRA bank cannot join it");
    ensure!(trunk.bank_size() == 0, "this model already serves a bank of adapters");
    let device = trunk.embed_tokens.device();
    let mut configs = Vec::with_capacity(dirs.len());
    for (i, dir) in dirs.iter().enumerate() {
        let kind = adapter_peft_type(dir)?;
        ensure!(
            kind == "LORA",
            "{}: a {kind} adapter; several adapters are served together only when they are LoRA (serve a {kind} adapter alone as the model)",
            dir.display()
        );
        let file = read_adapter_config(dir)?;
        ensure!(
            !file.init_lora_weights.mutates_base(),
            "{}: field 'init_lora_weights' = {}: the adapter belongs to a changed base (PiSSA / OLoRA residual); merge it with `align export` and serve the merged model",
            dir.display(),
            file.init_lora_weights.to_json()
        );
        // each adapter's variables live in a store of their own: the bank is not trained
        let store = VarStore::new(device);
        let config = load_adapter(&store, model, dir)?;
        for (_, lin) in model.trunk_mut().linears_mut() {
            let taken = lin.lora.take();
            if let Some(a) = &taken {
                let _ = a.lora_a.set_requires_grad(false);
                let _ = a.lora_b.set_requires_grad(false);
            }
            lin.bank.resize_with(i + 1, || None);
            lin.bank[i] = taken;
        }
        model.trunk_mut().set_lora_config(None);
        configs.push(config);
    }
    Ok(configs)
}

/// Copies the tensors of an adapter file into the attached adapters and into the variables of
/// the `full` modules; every one of them must be present with its shape.
fn copy_adapter_weights<M: LoraModel>(model: &M, full: &[&str], weights: &Path) -> Result<()> {
    let mut vars: HashMap<String, Tensor> = HashMap::new();
    for (path, lin) in model.trunk().linears() {
        if let Some(l) = &lin.lora {
            vars.insert(format!("{path}.lora_A.weight"), l.lora_a.shallow_clone());
            vars.insert(format!("{path}.lora_B.weight"), l.lora_b.shallow_clone());
            if let Some(m) = &l.magnitude {
                vars.insert(format!("{path}.{MAGNITUDE}"), m.shallow_clone());
            }
        }
    }
    for (name, t) in model.modules_to_save() {
        if full.iter().any(|m| name.strip_prefix(m).is_some_and(|rest| rest.starts_with('.'))) {
            vars.insert(name, t);
        }
    }
    let mut seen = HashSet::new();
    let files: Vec<PathBuf> = vec![weights.to_path_buf()];
    tch::no_grad(|| {
        for_each_tensor(&files, |file, name, t| {
            let at = file.display();
            let (var_name, module) = match variable_name_of(name) {
                Some(v) => {
                    let module = match v.strip_suffix(&format!(".{MAGNITUDE}")) {
                        Some(m) => m.to_string(),
                        None => v.rsplitn(3, '.').nth(2).unwrap_or(&v).to_string(),
                    };
                    (v, module)
                }
                None => {
                    let v = name.strip_prefix(PEFT_PREFIX).unwrap_or(name).to_string();
                    if !vars.contains_key(&v) {
                        bail!(
                            "{at}: tensor '{name}': not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_A.weight or .lora_B.weight) nor a weight of a module adapter_config.json's modules_to_save names for this model"
                        );
                    }
                    let module = v.rsplit_once('.').map_or(v.as_str(), |(m, _)| m).to_string();
                    (v, module)
                }
            };
            let var = vars.get(&var_name).ok_or_else(|| {
                anyhow!("{at}: tensor '{name}': the model has no adapted module '{module}' (adapter_config.json's target_modules do not select it)")
            })?;
            if var.size() != t.size() {
                bail!(
                    "{at}: tensor '{name}' has shape {:?} but '{module}' of this base model needs {:?}: the adapter was made for a different base model",
                    t.size(),
                    var.size()
                );
            }
            var.shallow_clone().f_copy_(&t).map_err(|e| anyhow!("{at}: tensor '{name}': {e}"))?;
            seen.insert(var_name);
            Ok(())
        })
    })?;
    let mut missing: Vec<&String> = vars.keys().filter(|k| !seen.contains(*k)).collect();
    if !missing.is_empty() {
        missing.sort();
        let shown: Vec<String> = missing.iter().take(4).map(|m| format!("'{PEFT_PREFIX}{m}'")).collect();
        bail!(
            "{}: lacks {} tensor(s) for modules its adapter_config.json targets or saves in full: {}{}",
            weights.display(),
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() { " …" } else { "" }
        );
    }
    Ok(())
}

/// Copies the tensors of an adapter folder into adapters already attached to the model (resume
/// from a checkpoint of the same run); needs no mutable model. Every attached adapter tensor and
/// every other trainable variable (the modules trained in full, such as a reward model's head)
/// must be present with its shape.
pub fn restore_adapter_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    let file = dir.join(ADAPTER_WEIGHTS_FILE);
    let vars = vs.variables();
    let mut seen = HashSet::new();
    tch::no_grad(|| {
        for_each_tensor(std::slice::from_ref(&file), |f, key, t| {
            let name =
                variable_name_of(key).unwrap_or_else(|| key.strip_prefix(PEFT_PREFIX).unwrap_or(key).to_string());
            let var = vars.get(&name).filter(|v| is_adapter_variable(&name) || v.requires_grad()).ok_or_else(|| {
                anyhow!("{}: '{key}' is neither an attached adapter nor a trained module of the model", f.display())
            })?;
            ensure!(
                var.size() == t.size(),
                "{}: '{key}' has shape {:?}, the model's variable {:?}",
                f.display(),
                t.size(),
                var.size()
            );
            var.shallow_clone().f_copy_(&t)?;
            seen.insert(name);
            Ok(())
        })
    })?;
    let mut missing: Vec<&String> = vars
        .iter()
        .filter(|(k, v)| (is_adapter_variable(k) || v.requires_grad()) && !seen.contains(*k))
        .map(|(k, _)| k)
        .collect();
    missing.sort();
    ensure!(missing.is_empty(), "{}: lacks tensors {missing:?}", file.display());
    Ok(())
}

/// LoRA+ (`[lora] loraplus_lr_ratio`): the factor of the learning rate of a trainable
/// parameter — the ratio for `lora_B` and for the 1-D parameters (DoRA's magnitudes), as PEFT's
/// `create_loraplus_optimizer` groups them, 1 for the rest (`lora_A`, modules trained in full).
pub fn loraplus_lr_scale(config: &LoraConfig, name: &str, param: &Tensor) -> f64 {
    match config.loraplus_lr_ratio {
        Some(ratio) if name.contains(".lora_B.") || param.dim() == 1 => ratio,
        _ => 1.0,
    }
}

/// Which parameters a full (non-LoRA) fine-tune trains (the `[freeze]` table of a stage config).
/// A parameter trains when it lies in one of the last `last_layers` decoder layers, or when its
/// name contains one of `modules` (e.g. "mlp", "embed_tokens", "norm"); everything else is frozen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FreezeConfig {
    pub last_layers: Option<i64>,
    pub modules: Vec<String>,
}

/// The decoder layer index of a parameter name (`<trunk>.layers.<i>.…`).
fn layer_of(name: &str, trunk_prefix: &str) -> Option<i64> {
    name.strip_prefix(trunk_prefix)?.strip_prefix(".layers.")?.split('.').next()?.parse().ok()
}

/// Sets `requires_grad` on every variable of `vs` as `freeze` selects and returns the names of
/// the trainable ones (sorted). The model's modules saved in full under LoRA (a reward model's
/// new `score` head) always train. Cannot be combined with LoRA (the adapter checkpoint would
/// not hold the unfrozen base parameters).
pub fn apply_freeze<M: LoraModel>(vs: &VarStore, model: &M, freeze: &FreezeConfig) -> Result<Vec<String>> {
    let trunk = model.trunk();
    ensure!(
        trunk.lora_config().is_none(),
        "freeze: cannot be combined with LoRA (LoRA already trains only its adapters; an adapter checkpoint would not hold unfrozen base parameters)"
    );
    let layers = trunk.layers.len() as i64;
    if let Some(n) = freeze.last_layers {
        ensure!(
            (1..=layers).contains(&n),
            "freeze.last_layers: expected 1..={layers} (the model's decoder layers), found {n}"
        );
    }
    ensure!(
        freeze.last_layers.is_some() || !freeze.modules.is_empty(),
        "freeze: nothing would be trained; set last_layers and/or modules"
    );
    let vars = vs.variables();
    for m in &freeze.modules {
        ensure!(!m.trim().is_empty(), "freeze.modules: empty name");
        if !vars.keys().any(|k| k.contains(m.as_str())) {
            bail!("freeze.modules: '{m}' matches no parameter name (names look like model.layers.0.mlp.up_proj.weight, model.embed_tokens.weight, model.norm.weight)");
        }
    }
    let always: HashSet<String> = model.modules_to_save().into_iter().map(|(n, _)| n).collect();
    let first_trained = freeze.last_layers.map(|n| layers - n);
    let mut trainable = Vec::new();
    for (name, v) in &vars {
        let in_last = matches!((first_trained, layer_of(name, trunk.prefix())), (Some(f), Some(i)) if i >= f);
        let on = in_last || always.contains(name) || freeze.modules.iter().any(|m| name.contains(m.as_str()));
        let _ = v.shallow_clone().f_requires_grad_(on)?;
        if on {
            trainable.push(name.clone());
        }
    }
    trainable.sort();
    Ok(trainable)
}

/// The variables of `vs` that require gradients, by name (sorted): what an optimizer should
/// update after `attach_lora`, `load_adapter` or `apply_freeze`. (tch's
/// `VarStore::trainable_variables` still lists frozen variables.)
pub fn trainable_parameters(vs: &VarStore) -> Vec<(String, Tensor)> {
    let mut out: Vec<(String, Tensor)> = vs.variables().into_iter().filter(|(_, t)| t.requires_grad()).collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lora_layer::module_matches;

    #[test]
    fn peft_keys_map_to_variable_names() {
        let want = Some("model.layers.0.self_attn.q_proj.lora_A.weight".to_string());
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), want);
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"), want);
        assert_eq!(variable_name_of("model.layers.0.self_attn.q_proj.lora_A.weight"), want);
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.weight"), None);
        let magnitude = Some("model.layers.0.mlp.up_proj.lora_magnitude_vector".to_string());
        for key in [
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.default.weight",
            "base_model.model.model.layers.0.mlp.up_proj.lora_magnitude_vector.weight",
        ] {
            assert_eq!(variable_name_of(key), magnitude, "{key}");
        }
    }

    #[test]
    fn targets_match_whole_name_suffixes() {
        assert!(module_matches("model.layers.0.self_attn.q_proj", "q_proj"));
        assert!(module_matches("model.layers.0.self_attn.q_proj", "self_attn.q_proj"));
        assert!(module_matches("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.q_proj"));
        assert!(!module_matches("model.layers.0.self_attn.q_proj", "proj"));
        assert!(!module_matches("model.layers.10.self_attn.q_proj", "0.self_attn.q_proj"));
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c: LoraConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, LoraConfig::default());
        assert_eq!((c.r, c.alpha, c.dropout, c.use_rslora), (8, 16.0, 0.05, false));
        assert_eq!(c.targets, LoraTargets::Pattern("all-linear".into()));
        let c: LoraConfig = serde_json::from_str(r#"{"r": 4, "alpha": 8, "targets": ["q_proj"]}"#).unwrap();
        assert_eq!((c.r, c.alpha, c.scaling()), (4, 8.0, 2.0));
        let e = serde_json::from_str::<LoraConfig>(r#"{"rank": 4}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `rank`"), "{e}");
        let e = serde_json::from_str::<FreezeConfig>(r#"{"layers": 2}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `layers`"), "{e}");
        let rs = LoraConfig { r: 16, alpha: 8.0, use_rslora: true, ..Default::default() };
        assert_eq!(rs.scaling(), 2.0);
        let bad = LoraConfig { targets: LoraTargets::names(&["all-linear", "q_proj"]), ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("lora.targets"));
        assert!(LoraConfig { r: 0, ..Default::default() }.validate().unwrap_err().to_string().contains("lora.r"));
    }

    fn parse_targets(value: &str) -> LoraTargets {
        toml::from_str::<LoraConfig>(&format!("targets = {value}")).unwrap().targets
    }

    #[test]
    fn targets_take_a_list_all_linear_or_a_regular_expression() {
        let paths: Vec<String> = [
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.v_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.1.self_attn.q_proj",
            "model.layers.1.mlp.up_proj",
        ]
        .map(String::from)
        .to_vec();
        // "all-linear" as PEFT writes it (a string, any case), and the list form of older configs
        for v in [r#""all-linear""#, r#""ALL-LINEAR""#, r#"["all-linear"]"#] {
            let t = parse_targets(v);
            assert!(t.is_all_linear(), "{v}");
            assert_eq!(t.select(&paths).unwrap(), paths, "{v}");
        }
        // a list: names or whole path suffixes
        assert_eq!(parse_targets(r#"["q_proj"]"#).select(&paths).unwrap(), [&paths[0][..], &paths[3]]);
        assert_eq!(parse_targets(r#"["0.mlp.up_proj"]"#).select(&paths).unwrap(), [&paths[2][..]]);
        // any other string: a regular expression that must match a whole path (PEFT's re.fullmatch)
        let t = parse_targets(r"'model\.layers\.1\..*'");
        assert_eq!(t, LoraTargets::Pattern(r"model\.layers\.1\..*".into()));
        assert_eq!(t.select(&paths).unwrap(), [&paths[3][..], &paths[4]]);
        assert_eq!(parse_targets(r"'.*\.(q|v)_proj'").select(&paths).unwrap(), [&paths[0][..], &paths[1], &paths[3]]);
        // so the string "q_proj" matches no whole path, where the list ["q_proj"] does
        let e = parse_targets(r#""q_proj""#).select(&paths).unwrap_err().to_string();
        assert!(e.contains(r#"regular expression "q_proj" matches no projection"#), "{e}");
        let e = parse_targets(r#"["lm_head"]"#).select(&paths).unwrap_err().to_string();
        assert!(e.contains("'lm_head' matches no projection"), "{e}");
        // a config keeps its form when written back (a string stays a string)
        assert_eq!(serde_json::to_value(&t).unwrap(), serde_json::json!(r"model\.layers\.1\..*"));
        assert_eq!(serde_json::to_value(parse_targets(r#"["q_proj"]"#)).unwrap(), serde_json::json!(["q_proj"]));
    }

    #[test]
    fn bad_targets_are_errors_naming_the_key() {
        let e = toml::from_str::<LoraConfig>("targets = 3").unwrap_err().to_string();
        assert!(e.contains("`targets` as a list of module names") && e.contains("all-linear"), "{e}");
        let e = toml::from_str::<LoraConfig>("targets = [1]").unwrap_err().to_string();
        assert!(e.contains("expected a string"), "{e}");
        for (value, want) in [
            (r#""(""#, "not a valid regular expression"),
            (r#""""#, r#"found """#),
            ("[]", "found []"),
            (r#"[" "]"#, "empty module name"),
            (r#"["all-linear", "q_proj"]"#, "cannot be combined"),
        ] {
            let c = LoraConfig { targets: parse_targets(value), ..Default::default() };
            let e = c.validate().unwrap_err().to_string();
            assert!(e.starts_with("lora.targets: ") && e.contains(want), "{value}: {e}");
        }
    }
}
