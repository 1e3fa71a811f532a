//! (IA)³ in PEFT's format (`IA3`): learned vectors that rescale the output of some projections
//! (k_proj, v_proj by default) and the input of the feed-forward ones (down_proj), the base
//! frozen; attach, disable (adapters off), merge exactly into the weights, save and load PEFT
//! folders. The vectors live in the model's `VarStore` as `<module>.ia3_l` (`[out, 1]` or
//! `[1, in]`, f32, initialised to ones as PEFT's `init_ia3_weights`), and on disk under PEFT's
//! prefix (`base_model.model.<module>.ia3_l`). A checkpoint restores them with
//! `lora::restore_adapter_weights` (the one restore of adapter variables). On a reward model
//! (PEFT's `SEQ_CLS`) the `score` head trains in full beside the vectors and is saved as PEFT
//! saves `modules_to_save` (`base_model.model.score.weight`).
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tch::{nn::VarStore, Kind, Tensor};

use crate::hf::checkpoint::for_each_tensor;
use crate::hf::config::ModelType;
use crate::hf::folder::write_folder;
use crate::model::decoder::LinearWeight;
pub use crate::model::ia3_layer::{Ia3Config, Ia3Vector};
use crate::model::io::remove_variables;
use crate::model::lora_layer::LoraTargets;
use crate::peft::lora::{
    read_adapter_json, refuse_quantized, write_adapter_config, write_tensor_file, AdapterSaveOptions, LoraModel,
    ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, PEFT_CLASSIFIER_NAMES,
};

/// PEFT's prefix of the saved keys.
const PEFT_PREFIX: &str = "base_model.model.";
/// The vector's name under its module.
const IA3_L: &str = "ia3_l";

/// PEFT's default `target_modules` and `feedforward_modules` for a model type.
pub fn default_modules(model_type: ModelType) -> (&'static [&'static str], &'static [&'static str]) {
    match model_type {
        ModelType::Llama | ModelType::Mistral => (&["k_proj", "v_proj", "down_proj"], &["down_proj"]),
        ModelType::Qwen2 | ModelType::Qwen3 => (&["q_proj", "v_proj", "down_proj"], &["down_proj"]),
    }
}

/// `config` with PEFT's defaults for `model_type` filled in.
pub fn with_defaults(config: &Ia3Config, model_type: ModelType) -> Ia3Config {
    let (targets, feedforward) = default_modules(model_type);
    Ia3Config {
        target_modules: Some(config.target_modules.clone().unwrap_or_else(|| LoraTargets::names(targets))),
        feedforward_modules: Some(
            config.feedforward_modules.clone().unwrap_or_else(|| LoraTargets::names(feedforward)),
        ),
    }
}

/// The adapted projections `(path, feed-forward)` of `config` (defaults filled in) on `model`.
fn resolve<M: LoraModel>(model: &M, config: &Ia3Config) -> Result<Vec<(String, bool)>> {
    let paths: Vec<String> = model.trunk().linears().into_iter().map(|(n, _)| n).collect();
    let targets = config.target_modules.as_ref().ok_or_else(|| anyhow!("target_modules: missing"))?;
    let feedforward = config.feedforward_modules.as_ref().ok_or_else(|| anyhow!("feedforward_modules: missing"))?;
    let selected = targets.select(&paths).context("target_modules")?;
    let ff: HashSet<String> = feedforward
        .select(&selected)
        .context("feedforward_modules (every feed-forward module must also be a target)")?
        .into_iter()
        .collect();
    Ok(selected.into_iter().map(|p| (p.clone(), ff.contains(&p))).collect())
}

/// Attaches (IA)³ vectors of ones (`config`'s modules, PEFT's defaults for the model type where
/// unset) to `model`: every variable is frozen but the vectors and the modules the model trains in
/// full. Returns the configuration in effect (defaults filled in).
pub fn attach_ia3<M: LoraModel>(vs: &VarStore, model: &mut M, config: &Ia3Config) -> Result<Ia3Config> {
    attach(vs, model, config, true)
}

fn attach<M: LoraModel>(vs: &VarStore, model: &mut M, config: &Ia3Config, trainable: bool) -> Result<Ia3Config> {
    let config = with_defaults(config, model.model_type());
    let trunk = model.trunk();
    ensure!(trunk.ia3_config().is_none(), "(IA)³ vectors are already attached to this model");
    ensure!(trunk.lora_config().is_none(), "LoRA adapters are attached to this model: (IA)³ cannot join them");
    ensure!(trunk.virtual_tokens().is_none(), "prompt learning is attached to this model: (IA)³ cannot join it");
    let modules = resolve(model, &config)?;
    let wanted: HashMap<&str, bool> = modules.iter().map(|(p, f)| (p.as_str(), *f)).collect();
    let vars = vs.variables();
    if let Some(name) = vars.keys().find(|n| n.ends_with(&format!(".{IA3_L}"))) {
        bail!("the model already holds the (IA)³ variable '{name}'");
    }
    let device = trunk.embed_tokens.device();
    let mode = trunk.run_mode();
    let full: Vec<Tensor> = model.modules_to_save().into_iter().map(|(_, t)| t).collect();
    tch::no_grad(|| -> Result<()> {
        for v in vars.values() {
            let _ = v.shallow_clone().f_requires_grad_(false)?;
        }
        for t in &full {
            let _ = t.shallow_clone().f_requires_grad_(trainable)?;
        }
        for (path, lin) in model.trunk_mut().linears_mut() {
            let Some(&feedforward) = wanted.get(path.as_str()) else { continue };
            let shape = if feedforward { [1, lin.in_features()] } else { [lin.out_features(), 1] };
            let mut p = vs.root();
            for seg in path.split('.') {
                p = p.sub(seg);
            }
            let vector = p.add(IA3_L, Tensor::f_ones(shape, (Kind::Float, device))?, trainable);
            lin.ia3 = Some(Ia3Vector::new(vector, feedforward, mode.clone()));
        }
        Ok(())
    })?;
    model.trunk_mut().set_ia3_config(Some(config.clone()));
    Ok(config)
}

/// Merges the attached vectors into the weights (`W · l` by rows for an output vector, its bias
/// too; by columns for a feed-forward one), exactly as PEFT's `merge_and_unload`, and removes
/// them.
pub fn merge_ia3<M: LoraModel>(vs: &VarStore, model: &mut M) -> Result<()> {
    ensure!(model.trunk().ia3_config().is_some(), "no (IA)³ vectors are attached: nothing to merge");
    refuse_quantized(model.trunk(), "merge (IA)³ vectors into")?;
    let mut removed = Vec::new();
    tch::no_grad(|| -> Result<()> {
        for (path, lin) in model.trunk_mut().linears_mut() {
            let Some(v) = lin.ia3.take() else { continue };
            if let LinearWeight::Dense(w) = &mut lin.weight {
                let scaled = w.f_mul(&v.vector.f_to_kind(w.kind())?)?;
                let _ = w.f_copy_(&scaled)?;
            }
            if let (false, Some(b)) = (v.feedforward, lin.bias.as_mut()) {
                let scaled = b.f_mul(&v.vector.f_flatten(0, -1)?.f_to_kind(b.kind())?)?;
                let _ = b.f_copy_(&scaled)?;
            }
            removed.push(format!("{path}.{IA3_L}"));
        }
        Ok(())
    })?;
    remove_variables(vs, &removed)?;
    let trunk = model.trunk_mut();
    trunk.set_ia3_config(None);
    trunk.set_adapters_enabled(true);
    Ok(())
}

/// The vectors under PEFT's saved names (`base_model.model.<module>.ia3_l`).
pub fn ia3_tensors<M: LoraModel>(model: &M) -> BTreeMap<String, Tensor> {
    let mut out = BTreeMap::new();
    for (path, lin) in model.trunk().linears() {
        if let Some(v) = &lin.ia3 {
            out.insert(format!("{PEFT_PREFIX}{path}.{IA3_L}"), v.vector.shallow_clone());
        }
    }
    out
}

/// Writes the attached (IA)³ vectors (and the modules the model trains in full: a reward
/// model's `score` head) as a PEFT adapter folder into the existing folder `dir`, as PEFT 0.21
/// writes it (a `SEQ_CLS` adapter lists `modules_to_save = ["classifier", "score"]`).
pub fn write_ia3_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    let config = model.trunk().ia3_config().ok_or_else(|| anyhow!("no (IA)³ vectors are attached: nothing to save"))?;
    let mut tensors = ia3_tensors(model);
    for (name, t) in model.modules_to_save() {
        tensors.insert(format!("{PEFT_PREFIX}{name}"), t);
    }
    let tensors: BTreeMap<String, Tensor> =
        tensors.into_iter().map(|(n, t)| Ok((n, t.f_detach()?.f_contiguous()?))).collect::<Result<_>>()?;
    write_tensor_file(&tensors, dir, ADAPTER_WEIGHTS_FILE)?;
    let modules_to_save = if M::MODULES_TO_SAVE.is_empty() { Value::Null } else { json!(PEFT_CLASSIFIER_NAMES) };
    let cfg = json!({
        "auto_mapping": null,
        "base_model_name_or_path": opts.base_model_name_or_path,
        "exclude_modules": null,
        "fan_in_fan_out": false,
        "feedforward_modules": config.feedforward_modules,
        "inference_mode": true,
        "init_ia3_weights": true,
        "modules_to_save": modules_to_save,
        "peft_type": "IA3",
        "revision": null,
        "target_modules": config.target_modules,
        "task_type": M::PEFT_TASK_TYPE,
    });
    write_adapter_config(dir, &cfg, opts)
}

/// Saves the attached (IA)³ vectors as a PEFT adapter folder (written to a temporary sibling
/// folder, renamed into place when complete).
pub fn save_ia3_adapter<M: LoraModel>(model: &M, dir: &Path, opts: &AdapterSaveOptions) -> Result<()> {
    write_folder(dir, |tmp| write_ia3_adapter(model, tmp, opts))
}

/// Reads `adapter_config.json` of a PEFT `IA3` folder for a model of PEFT task type `task_type`
/// (`CAUSAL_LM`, or `SEQ_CLS` for a reward model, whose `modules_to_save` may name only PEFT's
/// classifier names). Options this implementation does not have (`fan_in_fan_out`, excluded
/// modules, other modules trained in full, another task type) are errors naming the field.
pub fn read_ia3_folder_config(dir: &Path, task_type: &str) -> Result<Ia3Config> {
    let obj = read_adapter_json(dir)?;
    let path = dir.join(ADAPTER_CONFIG_FILE);
    let at = path.display();
    let field = |k: &str| obj.get(k).filter(|v| !v.is_null());
    ensure!(
        field("peft_type").and_then(Value::as_str) == Some("IA3"),
        "{at}: field 'peft_type': expected \"IA3\", found {}",
        field("peft_type").map_or("nothing".to_string(), Value::to_string)
    );
    let reward = task_type == "SEQ_CLS";
    let found = field("task_type").and_then(Value::as_str);
    if reward {
        ensure!(
            found == Some("SEQ_CLS"),
            "{at}: field 'task_type': a reward model takes a \"SEQ_CLS\" (IA)³ adapter (with its score head), found {}",
            field("task_type").map_or("nothing".to_string(), Value::to_string)
        );
    } else if let Some(t) = field("task_type") {
        let hint = if found == Some("SEQ_CLS") {
            " (a reward-model adapter: load it onto the reward model, e.g. with `align eval reward` or `align export`)"
        } else {
            ""
        };
        ensure!(
            found == Some("CAUSAL_LM"),
            "{at}: field 'task_type': (IA)³ is read for causal language models (\"CAUSAL_LM\") and reward models (\"SEQ_CLS\"), found {t}{hint}"
        );
    }
    for key in ["fan_in_fan_out"] {
        if let Some(v) = field(key) {
            ensure!(v == &Value::Bool(false), "{at}: field '{key}': only false is supported, found {v}");
        }
    }
    if let Some(v) = field("exclude_modules") {
        let empty = v.as_array().is_some_and(Vec::is_empty) || v.as_str().is_some_and(str::is_empty);
        ensure!(empty, "{at}: field 'exclude_modules': not supported, found {v}");
    }
    if let Some(v) = field("modules_to_save") {
        let names: Option<Vec<&str>> = v.as_array().map(|a| a.iter().filter_map(Value::as_str).collect());
        let ok = match (&names, v.as_array()) {
            (Some(n), Some(a)) if n.len() == a.len() => {
                n.is_empty() || (reward && n.iter().all(|m| PEFT_CLASSIFIER_NAMES.contains(m)))
            }
            _ => v.as_str().is_some_and(str::is_empty),
        };
        let what = if reward {
            "a reward model trains only its score head in full (\"classifier\", \"score\")"
        } else {
            "not supported"
        };
        ensure!(ok, "{at}: field 'modules_to_save': {what}, found {v}");
    }
    let modules = |key: &str| -> Result<Option<LoraTargets>> {
        match field(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(LoraTargets::Pattern(s.clone()))),
            Some(Value::Array(items)) => {
                let names = items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_string)
                            .ok_or_else(|| anyhow!("{at}: field '{key}': expected module names, found {i}"))
                    })
                    .collect::<Result<Vec<_>>>()?;
                Ok(Some(LoraTargets::Names(names)))
            }
            Some(v) => bail!("{at}: field '{key}': expected a list of module names or a regular expression, found {v}"),
        }
    };
    Ok(Ia3Config { target_modules: modules("target_modules")?, feedforward_modules: modules("feedforward_modules")? })
}

/// Loads a PEFT `IA3` folder onto `model` (nothing attached yet): the vectors it names, with their
/// shapes checked against the model, and for a reward model its `score` head, trainable or
/// frozen. Returns the configuration in effect.
pub fn load_ia3_adapter<M: LoraModel>(vs: &VarStore, model: &mut M, dir: &Path, trainable: bool) -> Result<Ia3Config> {
    let file_config = read_ia3_folder_config(dir, M::PEFT_TASK_TYPE)?;
    let at = dir.join(ADAPTER_CONFIG_FILE);
    let config = attach(vs, model, &file_config, trainable).with_context(|| format!("{}", at.display()))?;
    let weights = dir.join(ADAPTER_WEIGHTS_FILE);
    if !weights.is_file() {
        bail!("{}: missing (the adapter weights)", weights.display());
    }
    let mut vars: HashMap<String, Tensor> = model
        .trunk()
        .linears()
        .into_iter()
        .filter_map(|(p, l)| l.ia3.as_ref().map(|v| (format!("{p}.{IA3_L}"), v.vector.shallow_clone())))
        .collect();
    vars.extend(model.modules_to_save());
    let mut seen = HashSet::new();
    tch::no_grad(|| {
        for_each_tensor(std::slice::from_ref(&weights), |file, key, t| {
            let name = key.strip_prefix(PEFT_PREFIX).unwrap_or(key);
            let var = vars.get(name).ok_or_else(|| {
                anyhow!(
                    "{}: tensor '{key}': not an (IA)³ vector of a module adapter_config.json's target_modules select (nor a reward model's score head)",
                    file.display()
                )
            })?;
            ensure!(
                var.size() == t.size(),
                "{}: tensor '{key}' has shape {:?} but this base model needs {:?}: the adapter was made for a different base model (or another feedforward_modules)",
                file.display(),
                t.size(),
                var.size()
            );
            var.shallow_clone().f_copy_(&t)?;
            seen.insert(name.to_string());
            Ok(())
        })
    })?;
    let mut missing: Vec<&String> = vars.keys().filter(|k| !seen.contains(*k)).collect();
    missing.sort();
    ensure!(missing.is_empty(), "{}: lacks the vectors of {missing:?}", weights.display());
    Ok(config)
}
