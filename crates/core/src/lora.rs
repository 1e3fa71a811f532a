//! Parameter-efficient fine-tuning: LoRA adapters on the decoder's projections (attach, disable,
//! merge, save and load in PEFT's format) and freezing all but selected parameters.
//!
//! An adapted projection computes `x Wᵀ + b + scaling · dropout(x) Aᵀ Bᵀ` with `A: [r, in]`
//! (PEFT's kaiming-uniform init), `B: [out, r]` (zeros) and `scaling = alpha / r` (rsLoRA:
//! `alpha / √r`). The adapter variables live in the model's `VarStore` under
//! `<module>.lora_A.weight` / `<module>.lora_B.weight`; on disk (PEFT) the same names carry the
//! `base_model.model.` prefix.
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tch::{nn::VarStore, Kind, Tensor};

use crate::checkpoint::{copy_companions, for_each_tensor, save_tensors, write_folder, SINGLE_FILE};
use crate::model::{CausalLm, RunMode};

/// `targets` value selecting every projection of the decoder layers (not the LM head).
pub const ALL_LINEAR: &str = "all-linear";
pub const ADAPTER_CONFIG_FILE: &str = "adapter_config.json";
pub const ADAPTER_WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// PEFT's prefix of every saved key of a causal-LM adapter.
const PEFT_PREFIX: &str = "base_model.model.";

/// LoRA options (the `[lora]` table of a stage config).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoraConfig {
    /// Rank of the update.
    pub r: i64,
    /// The update is scaled by `alpha / r` (`alpha / √r` with `use_rslora`).
    pub alpha: f64,
    /// Dropout on the adapter's input, in training mode only.
    pub dropout: f64,
    /// Module names (`q_proj`, `v_proj`, or longer suffixes such as `model.layers.0.mlp.up_proj`),
    /// or `["all-linear"]`: q, k, v, o, gate, up and down of every decoder layer.
    pub targets: Vec<String>,
    pub use_rslora: bool,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig { r: 8, alpha: 16.0, dropout: 0.05, targets: vec![ALL_LINEAR.to_string()], use_rslora: false }
    }
}

impl LoraConfig {
    /// Checks the ranges of every field; errors name the field (`lora.r`, …).
    pub fn validate(&self) -> Result<()> {
        ensure!(self.r >= 1, "lora.r: expected an integer ≥ 1, found {}", self.r);
        ensure!(self.alpha.is_finite() && self.alpha > 0.0, "lora.alpha: expected a number > 0, found {}", self.alpha);
        ensure!(
            (0.0..1.0).contains(&self.dropout),
            "lora.dropout: expected a probability in [0, 1), found {}",
            self.dropout
        );
        ensure!(
            !self.targets.is_empty(),
            "lora.targets: expected module names (e.g. [\"q_proj\", \"v_proj\"]) or [\"{ALL_LINEAR}\"], found []"
        );
        for t in &self.targets {
            ensure!(!t.trim().is_empty(), "lora.targets: empty module name");
            ensure!(
                t != ALL_LINEAR || self.targets.len() == 1,
                "lora.targets: \"{ALL_LINEAR}\" selects every projection and cannot be combined with other names"
            );
        }
        Ok(())
    }

    /// The factor of the update: `alpha / r`, or `alpha / √r` with rsLoRA.
    pub fn scaling(&self) -> f64 {
        if self.use_rslora {
            self.alpha / (self.r as f64).sqrt()
        } else {
            self.alpha / self.r as f64
        }
    }
}

/// The low-rank update of one `Linear`: `scaling · dropout(x) Aᵀ Bᵀ`.
#[derive(Debug)]
pub struct LoraAdapter {
    /// `[r, in]`.
    pub lora_a: Tensor,
    /// `[out, r]`.
    pub lora_b: Tensor,
    pub scaling: f64,
    pub dropout: f64,
    mode: Arc<RunMode>,
}

impl LoraAdapter {
    /// False while the model's adapters are disabled.
    pub fn is_enabled(&self) -> bool {
        self.mode.adapters_enabled()
    }

    /// The update for input `x` (computed in the adapter's dtype, returned in `x`'s).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let kind = x.kind();
        let mut h = if kind == self.lora_a.kind() { x.shallow_clone() } else { x.f_to_kind(self.lora_a.kind())? };
        if self.dropout > 0.0 && self.mode.training() {
            h = h.f_dropout(self.dropout, true)?;
        }
        let y = h
            .f_linear::<Tensor>(&self.lora_a, None)?
            .f_linear::<Tensor>(&self.lora_b, None)?
            .f_mul_scalar(self.scaling)?;
        Ok(if y.kind() == kind { y } else { y.f_to_kind(kind)? })
    }

    /// `scaling · B A`, `[out, in]`, in the adapter's dtype.
    pub fn delta_weight(&self) -> Result<Tensor> {
        Ok(self.lora_b.f_matmul(&self.lora_a)?.f_mul_scalar(self.scaling)?)
    }
}

/// Adapter weights are kept in f32 (f64 for an f64 model) whatever the base dtype, as PEFT does
/// by default (`autocast_adapter_dtype`), so small updates are not lost to bf16 rounding.
fn adapter_kind(base: Kind) -> Kind {
    if base == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// True for the names of LoRA variables (`….lora_A.weight`, `….lora_B.weight`).
pub fn is_adapter_variable(name: &str) -> bool {
    name.contains(".lora_A.") || name.contains(".lora_B.")
}

fn module_matches(path: &str, target: &str) -> bool {
    path == target
        || (path.len() > target.len() && path.ends_with(target) && path[..path.len() - target.len()].ends_with('.'))
}

/// The module paths of `lm` selected by `targets` (PEFT's rule: a module is selected when its
/// path equals a target or ends with `.target`). Every target must select something.
fn resolve_targets(lm: &CausalLm, targets: &[String]) -> Result<Vec<String>> {
    let names: Vec<String> = lm.linears().into_iter().map(|(n, _)| n).collect();
    if targets.len() == 1 && targets[0] == ALL_LINEAR {
        return Ok(names);
    }
    for t in targets {
        if !names.iter().any(|n| module_matches(n, t)) {
            bail!(
                "target '{t}' matches no projection of this model (each decoder layer has q_proj, k_proj, v_proj, \
                 o_proj, gate_proj, up_proj and down_proj; embeddings and the LM head cannot be adapted)"
            );
        }
    }
    Ok(names.into_iter().filter(|n| targets.iter().any(|t| module_matches(n, t))).collect())
}

/// Attaches fresh adapters (A kaiming-uniform from libtorch's global generator, B zeros) to the
/// projections `config.targets` selects, registers them in `vs` and freezes every other
/// variable (`requires_grad = false`). Attach after loading the base weights. Returns the
/// adapted module paths.
pub fn attach_lora(vs: &VarStore, lm: &mut CausalLm, config: &LoraConfig) -> Result<Vec<String>> {
    attach(vs, lm, config, true)
}

fn attach(vs: &VarStore, lm: &mut CausalLm, config: &LoraConfig, random_a: bool) -> Result<Vec<String>> {
    config.validate()?;
    ensure!(lm.lora_config().is_none(), "LoRA adapters are already attached to this model");
    let modules = resolve_targets(lm, &config.targets).context("lora.targets")?;
    let wanted: HashSet<&str> = modules.iter().map(String::as_str).collect();
    let vars = vs.variables();
    for name in vars.keys() {
        ensure!(!is_adapter_variable(name), "the model already holds LoRA variable '{name}'");
    }
    let (kind, device, mode, r) = (adapter_kind(lm.kind()), lm.device(), lm.run_mode(), config.r);
    tch::no_grad(|| -> Result<()> {
        for v in vars.values() {
            let _ = v.shallow_clone().f_requires_grad_(false)?;
        }
        for (path, lin) in lm.linears_mut() {
            if !wanted.contains(path.as_str()) {
                continue;
            }
            let (fan_in, fan_out) = (lin.in_features(), lin.out_features());
            let a = if random_a {
                // kaiming_uniform_(a=√5): gain √(2/(1+5)), bound gain·√(3/fan_in) = 1/√fan_in
                let bound = 1.0 / (fan_in as f64).sqrt();
                Tensor::f_empty([r, fan_in], (kind, device))?.f_uniform_(-bound, bound)?
            } else {
                Tensor::f_zeros([r, fan_in], (kind, device))?
            };
            let b = Tensor::f_zeros([fan_out, r], (kind, device))?;
            let mut p = vs.root();
            for seg in path.split('.') {
                p = p.sub(seg);
            }
            let lora_a = p.sub("lora_A").add("weight", a, true);
            let lora_b = p.sub("lora_B").add("weight", b, true);
            lin.lora = Some(LoraAdapter {
                lora_a,
                lora_b,
                scaling: config.scaling(),
                dropout: config.dropout,
                mode: mode.clone(),
            });
        }
        Ok(())
    })?;
    lm.set_lora_config(Some(config.clone()));
    Ok(modules)
}

/// Runs `f` with the adapters disabled (the base model, e.g. the DPO/PPO reference), then
/// restores the previous state, also when `f` fails.
pub fn without_adapters<T>(lm: &CausalLm, f: impl FnOnce(&CausalLm) -> Result<T>) -> Result<T> {
    let was = lm.adapters_enabled();
    lm.set_adapters_enabled(false);
    let out = f(lm);
    lm.set_adapters_enabled(was);
    out
}

fn remove_variables(vs: &VarStore, names: &[String]) -> Result<()> {
    let mut vars =
        vs.variables_.lock().map_err(|_| anyhow!("the model's variable store is unusable (a thread panicked)"))?;
    let mut ptrs = HashSet::new();
    for n in names {
        if let Some(t) = vars.named_variables.remove(n) {
            ptrs.insert(t.data_ptr() as usize);
        }
    }
    vars.trainable_variables.retain(|v| !ptrs.contains(&(v.tensor.data_ptr() as usize)));
    Ok(())
}

/// Folds every adapter into its base weight (`W += scaling · B A`, in W's dtype), then removes
/// the adapters from the model and their variables from `vs`. The `requires_grad` flags of the
/// base weights are left as they are.
pub fn merge_lora(vs: &VarStore, lm: &mut CausalLm) -> Result<()> {
    ensure!(lm.lora_config().is_some(), "no LoRA adapters are attached: nothing to merge");
    let mut removed = Vec::new();
    tch::no_grad(|| -> Result<()> {
        let mut deltas = Vec::new();
        for (path, lin) in lm.linears() {
            if let Some(lora) = &lin.lora {
                deltas.push((path, lora.delta_weight()?.f_to_kind(lin.weight.kind())?));
            }
        }
        let mut deltas: HashMap<String, Tensor> = deltas.into_iter().collect();
        for (path, lin) in lm.linears_mut() {
            if let Some(delta) = deltas.remove(&path) {
                let _ = lin.weight.f_add_(&delta)?;
                lin.lora = None;
                removed.push(format!("{path}.lora_A.weight"));
                removed.push(format!("{path}.lora_B.weight"));
            }
        }
        Ok(())
    })?;
    remove_variables(vs, &removed)?;
    lm.set_lora_config(None);
    lm.set_adapters_enabled(true);
    Ok(())
}

/// The adapter weights under PEFT's saved names
/// (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`).
pub fn adapter_tensors(lm: &CausalLm) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (path, lin) in lm.linears() {
        if let Some(lora) = &lin.lora {
            out.insert(format!("{PEFT_PREFIX}{path}.lora_A.weight"), lora.lora_a.shallow_clone());
            out.insert(format!("{PEFT_PREFIX}{path}.lora_B.weight"), lora.lora_b.shallow_clone());
        }
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

/// `adapter_config.json` as PEFT 0.21 writes it for a plain LoRA adapter.
fn peft_config_json(lm: &CausalLm, config: &LoraConfig, base: Option<&str>) -> Value {
    let targets: Vec<String> = if config.targets.len() == 1 && config.targets[0] == ALL_LINEAR {
        let short: BTreeSet<String> = lm
            .linears()
            .into_iter()
            .filter(|(_, l)| l.lora.is_some())
            .filter_map(|(p, _)| p.rsplit('.').next().map(str::to_string))
            .collect();
        short.into_iter().collect()
    } else {
        config.targets.clone()
    };
    let alpha = if config.alpha.fract() == 0.0 && config.alpha.abs() < 1e15 {
        json!(config.alpha as i64)
    } else {
        json!(config.alpha)
    };
    json!({
        "alpha_pattern": {},
        "auto_mapping": null,
        "base_model_name_or_path": base,
        "bias": "none",
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "inference_mode": true,
        "init_lora_weights": true,
        "layer_replication": null,
        "layers_pattern": null,
        "layers_to_transform": null,
        "lora_alpha": alpha,
        "lora_bias": false,
        "lora_dropout": config.dropout,
        "modules_to_save": null,
        "peft_type": "LORA",
        "r": config.r,
        "rank_pattern": {},
        "revision": null,
        "target_modules": targets,
        "target_parameters": null,
        "task_type": "CAUSAL_LM",
        "use_dora": false,
        "use_rslora": config.use_rslora,
    })
}

/// Writes `adapter_model.safetensors`, `adapter_config.json` and the companion files into the
/// existing folder `dir` (no temporary folder: see `save_adapter`).
pub fn write_adapter(lm: &CausalLm, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    let config = lm.lora_config().ok_or_else(|| anyhow!("no LoRA adapters are attached: nothing to save"))?;
    let tensors = adapter_tensors(lm);
    // the one safetensors writer (checkpoint::save_tensors) names its file model.safetensors
    let staging = dir.join(".adapter-weights");
    std::fs::create_dir_all(&staging).with_context(|| format!("{}: cannot create", staging.display()))?;
    save_tensors(&tensors, &staging, None, usize::MAX)?;
    let target = dir.join(ADAPTER_WEIGHTS_FILE);
    std::fs::rename(staging.join(SINGLE_FILE), &target)
        .with_context(|| format!("{}: cannot move into place", target.display()))?;
    std::fs::remove_dir_all(&staging).with_context(|| format!("{}: cannot remove", staging.display()))?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let cfg = peft_config_json(lm, config, opts.base_model_name_or_path.as_deref());
    std::fs::write(&path, serde_json::to_string_pretty(&cfg)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))?;
    if let Some(from) = opts.companions_from {
        copy_companions(from, dir)?;
    }
    Ok(())
}

/// Saves the attached adapters as a PEFT adapter folder, written to a temporary sibling folder
/// and renamed into place when complete.
pub fn save_adapter(lm: &CausalLm, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    write_folder(dir, |tmp| write_adapter(lm, tmp, opts))
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

/// Reads `adapter_config.json` of an adapter folder (ours or PEFT's) as a `LoraConfig`. Options
/// this implementation does not have (DoRA, biases, per-layer ranks, modules_to_save, …) are
/// errors naming the field.
pub fn read_adapter_config(dir: &Path) -> Result<LoraConfig> {
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
    let obj = v.as_object().ok_or_else(|| anyhow!("{at}: expected a JSON object"))?;
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    match field("peft_type") {
        Some(Value::String(s)) if s == "LORA" => {}
        Some(other) => bail!("{at}: field 'peft_type': only \"LORA\" adapters are supported, found {other}"),
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
    let targets = match field("target_modules") {
        Some(Value::String(s)) if s == ALL_LINEAR => vec![ALL_LINEAR.to_string()],
        Some(Value::String(s)) => bail!(
            "{at}: field 'target_modules': a regular expression ({s:?}) is not supported; give a list of module names"
        ),
        Some(Value::Array(items)) => items
            .iter()
            .map(|t| {
                t.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| anyhow!("{at}: field 'target_modules': expected strings, found {t}"))
            })
            .collect::<Result<Vec<_>>>()?,
        Some(v) => bail!("{at}: field 'target_modules': expected a list of module names, found {v}"),
        None => bail!("{at}: field 'target_modules': missing (expected a list of module names)"),
    };
    if let Some(b) = field("bias") {
        ensure!(b == "none", "{at}: field 'bias': only \"none\" is supported, found {b}");
    }
    for key in [
        "use_dora",
        "lora_bias",
        "fan_in_fan_out",
        "modules_to_save",
        "layers_to_transform",
        "rank_pattern",
        "alpha_pattern",
        "exclude_modules",
        "layer_replication",
        "target_parameters",
        "trainable_token_indices",
        "use_qalora",
        "alora_invocation_tokens",
    ] {
        if !is_unset(obj.get(key)) {
            bail!("{at}: field '{key}': {} is not supported (only plain LoRA on linear layers is)", obj[key]);
        }
    }
    let config = LoraConfig { r, alpha, dropout, targets, use_rslora };
    config.validate().with_context(|| format!("{at}"))?;
    Ok(config)
}

/// `base_model.model.<module>.lora_A[.<adapter name>].weight` → `<module>.lora_A.weight`.
fn variable_name_of(key: &str) -> Option<String> {
    let rest = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
    let parts: Vec<&str> = rest.split('.').collect();
    let i = parts.iter().position(|p| *p == "lora_A" || *p == "lora_B")?;
    let tail = &parts[i + 1..];
    let ok = tail == ["weight"] || (tail.len() == 2 && tail[1] == "weight");
    (ok && i > 0).then(|| format!("{}.{}.weight", parts[..i].join("."), parts[i]))
}

/// Loads an adapter folder (written by `save_adapter` or by PEFT's `save_pretrained`) into `lm`.
/// Without attached adapters, attaches them as the folder's config says; with adapters attached
/// (resuming a LoRA run), the folder must have the same r, alpha, rsLoRA flag and modules.
/// Shapes are checked against the base model; errors name the file and the tensor. Returns the
/// configuration in effect.
pub fn load_adapter(vs: &VarStore, lm: &mut CausalLm, dir: &Path) -> Result<LoraConfig> {
    let file_config = read_adapter_config(dir)?;
    let config_path = dir.join(ADAPTER_CONFIG_FILE);
    let at = config_path.display();
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.is_file() {
        if dir.join("adapter_model.bin").is_file() {
            bail!("{}: only adapter_model.bin found; only safetensors adapters are read", dir.display());
        }
        bail!("{}: missing (the adapter weights)", weights.display());
    }
    let wanted = resolve_targets(lm, &file_config.targets).with_context(|| format!("{at}: field 'target_modules'"))?;
    match lm.lora_config() {
        None => {
            attach(vs, lm, &file_config, false).with_context(|| format!("{at}"))?;
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
            let attached: Vec<String> =
                lm.linears().into_iter().filter(|(_, l)| l.lora.is_some()).map(|(p, _)| p).collect();
            if attached != wanted {
                let only_file: Vec<&String> = wanted.iter().filter(|w| !attached.contains(w)).collect();
                let only_model: Vec<&String> = attached.iter().filter(|w| !wanted.contains(w)).collect();
                bail!(
                    "{at}: field 'target_modules': the adapter's modules differ from the attached LoRA's (only in the adapter: {only_file:?}; only attached: {only_model:?})"
                );
            }
        }
    }
    copy_adapter_weights(lm, &weights)?;
    lm.lora_config().cloned().ok_or_else(|| anyhow!("{at}: adapters were not attached"))
}

fn copy_adapter_weights(lm: &CausalLm, weights: &Path) -> Result<()> {
    let mut vars: HashMap<String, Tensor> = HashMap::new();
    for (path, lin) in lm.linears() {
        if let Some(l) = &lin.lora {
            vars.insert(format!("{path}.lora_A.weight"), l.lora_a.shallow_clone());
            vars.insert(format!("{path}.lora_B.weight"), l.lora_b.shallow_clone());
        }
    }
    let mut seen = HashSet::new();
    let files: Vec<PathBuf> = vec![weights.to_path_buf()];
    tch::no_grad(|| {
        for_each_tensor(&files, |file, name, t| {
            let at = file.display();
            let var_name = variable_name_of(name).ok_or_else(|| {
                anyhow!("{at}: tensor '{name}': not a LoRA weight (expected {PEFT_PREFIX}<module>.lora_A.weight or .lora_B.weight)")
            })?;
            let module = var_name.rsplitn(3, '.').nth(2).unwrap_or(&var_name).to_string();
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
            "{}: lacks {} tensor(s) for modules its adapter_config.json targets: {}{}",
            weights.display(),
            missing.len(),
            shown.join(", "),
            if missing.len() > shown.len() { " …" } else { "" }
        );
    }
    Ok(())
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

/// The decoder layer index of a parameter name (`model.layers.<i>.…`).
fn layer_of(name: &str) -> Option<i64> {
    name.strip_prefix("model.layers.")?.split('.').next()?.parse().ok()
}

/// Sets `requires_grad` on every variable of `vs` as `freeze` selects and returns the names of
/// the trainable ones (sorted). Cannot be combined with LoRA (the adapter checkpoint would not
/// hold the unfrozen base parameters).
pub fn apply_freeze(vs: &VarStore, lm: &CausalLm, freeze: &FreezeConfig) -> Result<Vec<String>> {
    ensure!(
        lm.lora_config().is_none(),
        "freeze: cannot be combined with LoRA (LoRA already trains only its adapters; an adapter checkpoint would not hold unfrozen base parameters)"
    );
    let layers = lm.config.num_hidden_layers;
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
    let first_trained = freeze.last_layers.map(|n| layers - n);
    let mut trainable = Vec::new();
    for (name, v) in &vars {
        let in_last = matches!((first_trained, layer_of(name)), (Some(f), Some(i)) if i >= f);
        let on = in_last || freeze.modules.iter().any(|m| name.contains(m.as_str()));
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

    #[test]
    fn peft_keys_map_to_variable_names() {
        let want = Some("model.layers.0.self_attn.q_proj.lora_A.weight".to_string());
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"), want);
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight"), want);
        assert_eq!(variable_name_of("model.layers.0.self_attn.q_proj.lora_A.weight"), want);
        assert_eq!(variable_name_of("base_model.model.model.layers.0.self_attn.q_proj.weight"), None);
        assert_eq!(variable_name_of("base_model.model.model.layers.0.mlp.lora_magnitude_vector.default.weight"), None);
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
        assert_eq!(c.targets, vec!["all-linear"]);
        let c: LoraConfig = serde_json::from_str(r#"{"r": 4, "alpha": 8, "targets": ["q_proj"]}"#).unwrap();
        assert_eq!((c.r, c.alpha, c.scaling()), (4, 8.0, 2.0));
        let e = serde_json::from_str::<LoraConfig>(r#"{"rank": 4}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `rank`"), "{e}");
        let e = serde_json::from_str::<FreezeConfig>(r#"{"layers": 2}"#).unwrap_err().to_string();
        assert!(e.contains("unknown field `layers`"), "{e}");
        let rs = LoraConfig { r: 16, alpha: 8.0, use_rslora: true, ..Default::default() };
        assert_eq!(rs.scaling(), 2.0);
        let bad = LoraConfig { targets: vec!["all-linear".into(), "q_proj".into()], ..Default::default() };
        assert!(bad.validate().unwrap_err().to_string().contains("lora.targets"));
        assert!(LoraConfig { r: 0, ..Default::default() }.validate().unwrap_err().to_string().contains("lora.r"));
    }
}

/// Copies the tensors of an adapter folder into adapters already attached to the model (resume
/// from a checkpoint of the same run); needs no mutable model. Every attached adapter tensor must
/// be present with its shape.
pub fn restore_adapter_weights(vs: &VarStore, dir: &Path) -> Result<()> {
    let file = dir.join(ADAPTER_WEIGHTS_FILE);
    let vars = vs.variables();
    let mut seen = std::collections::HashSet::new();
    tch::no_grad(|| {
        crate::checkpoint::for_each_tensor(std::slice::from_ref(&file), |f, key, t| {
            let name = variable_name_of(key).ok_or_else(|| anyhow!("{}: '{key}' is not a LoRA tensor", f.display()))?;
            let var = vars
                .get(&name)
                .ok_or_else(|| anyhow!("{}: '{key}' has no attached adapter in the model", f.display()))?;
            ensure!(
                var.size() == t.size(),
                "{}: '{key}' has shape {:?}, the attached adapter {:?}",
                f.display(),
                t.size(),
                var.size()
            );
            var.shallow_clone().f_copy_(&t)?;
            seen.insert(name);
            Ok(())
        })
    })?;
    let missing: Vec<&String> = vars.keys().filter(|k| is_adapter_variable(k) && !seen.contains(*k)).collect();
    ensure!(missing.is_empty(), "{}: lacks adapter tensors {missing:?}", file.display());
    Ok(())
}
