//! Hugging Face model folders: memory-mapped safetensors loading (single file or shards) by HF
//! names, and saving the same layout with config, generation config and tokenizer files copied.
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, View};
use serde_json::{json, Value};
use tch::{nn::VarStore, Device, Kind, Tensor};

use crate::hf::config::ModelConfig;
use crate::hf::folder::write_folder;

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// Default shard size when saving, as transformers' `save_pretrained` (5 GB).
pub const DEFAULT_MAX_SHARD_BYTES: usize = 5_000_000_000;

/// Files that travel with the weights: written by `save_pretrained` next to them.
pub const COMPANION_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
];

/// True for the names of adapter variables — LoRA's (`….lora_A.weight`, `….lora_B.weight`, DoRA's
/// `….lora_magnitude_vector`), (IA)³'s (`….ia3_l`) and prompt learning's (`prompt_embeddings`, `prompt_encoder.…`) —
/// which a base model folder does not hold.
pub fn is_adapter_variable(name: &str) -> bool {
    name.contains(".lora_A.")
        || name.contains(".lora_B.")
        || name.ends_with(".lora_magnitude_vector")
        || name.ends_with(".ia3_l")
        || crate::model::prompt_layer::is_prompt_variable(name)
}

/// Resolves `--model`: a local folder, or a hub id (`org/name`) found in the local HF cache
/// (`$HF_HUB_CACHE`, `$HF_HOME/hub` or `~/.cache/huggingface/hub`). Nothing is downloaded.
pub fn resolve_model_dir(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.is_dir() {
        return Ok(p);
    }
    if p.exists() {
        bail!("{spec}: not a folder (a model is a folder with config.json and safetensors weights)");
    }
    let looks_like_hub_id = spec.split('/').count() == 2 && !spec.starts_with('.') && !spec.starts_with('/');
    if looks_like_hub_id {
        let cache = std::env::var_os("HF_HUB_CACHE")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HF_HOME").map(|h| PathBuf::from(h).join("hub")))
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")));
        if let Some(cache) = cache {
            let repo = cache.join(format!("models--{}", spec.replace('/', "--")));
            let by_ref =
                std::fs::read_to_string(repo.join("refs/main")).ok().map(|r| repo.join("snapshots").join(r.trim()));
            let any = || {
                std::fs::read_dir(repo.join("snapshots"))
                    .ok()?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path())
                    .find(|p| p.is_dir())
            };
            if let Some(dir) = by_ref.filter(|d| d.is_dir()).or_else(any) {
                return Ok(dir);
            }
        }
        bail!("{spec}: no such folder, and the hub id is not in the local Hugging Face cache (nothing is downloaded; pass a local model folder)");
    }
    bail!("{spec}: no such model folder")
}

/// The safetensors files of a model folder, in load order.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("{}: cannot read", index.display()))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", index.display(), e.line()))?;
        let map = v.get("weight_map").and_then(Value::as_object).ok_or_else(|| {
            anyhow!("{}: field 'weight_map': expected an object of tensor name → file", index.display())
        })?;
        let mut files: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_string)).collect();
        files.sort();
        files.dedup();
        let paths: Vec<PathBuf> = files.iter().map(|f| dir.join(f)).collect();
        for p in &paths {
            if !p.is_file() {
                bail!("{}: shard {} listed in the index is missing", index.display(), p.display());
            }
        }
        return Ok(paths);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    if dir.join("pytorch_model.bin").is_file() {
        bail!(
            "{}: only pytorch_model.bin found; convert it to safetensors first (only safetensors weights are read)",
            dir.display()
        );
    }
    bail!("{}: no {SINGLE_FILE} or {INDEX_FILE} in the model folder", dir.display())
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F16 => Kind::Half,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

fn dtype_of(kind: Kind) -> Result<Dtype> {
    Ok(match kind {
        Kind::Float => Dtype::F32,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Half => Dtype::F16,
        Kind::Double => Dtype::F64,
        Kind::Int64 => Dtype::I64,
        Kind::Int => Dtype::I32,
        Kind::Int16 => Dtype::I16,
        Kind::Int8 => Dtype::I8,
        Kind::Uint8 => Dtype::U8,
        Kind::Bool => Dtype::BOOL,
        other => bail!("cannot store tensors of kind {other:?} in safetensors"),
    })
}

/// The HF dtype name (`config.json`'s `dtype`) of a tensor kind.
pub fn hf_dtype_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bfloat16",
        Kind::Half => "float16",
        Kind::Double => "float64",
        _ => "float32",
    }
}

/// Tensors in the checkpoint that a model legitimately does not hold (buffers older
/// transformers versions saved, an untied copy of tied embeddings).
pub fn ignorable(name: &str, tied: bool) -> bool {
    name.ends_with("rotary_emb.inv_freq") || (tied && name == "lm_head.weight")
}

/// One line on why `SafeTensors::deserialize` refused `bytes` (the whole file): what the header
/// claims against what the file holds. Nothing is allocated for the tensors it describes.
fn safetensors_problem(e: &SafeTensorError, bytes: &[u8]) -> String {
    let len = bytes.len();
    let header_len = bytes.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes);
    match (e, header_len) {
        (SafeTensorError::HeaderTooSmall, _) => {
            format!("the file has {len} bytes (expected at least the 8-byte header length)")
        }
        (SafeTensorError::HeaderTooLarge, Some(n)) => {
            format!("the header claims {n} bytes of metadata (expected at most 100 MB; not a safetensors file?)")
        }
        (SafeTensorError::InvalidHeaderLength, Some(n)) => format!(
            "the header claims {n} bytes of metadata but the file has {} after the length (truncated?)",
            len.saturating_sub(8)
        ),
        (SafeTensorError::MetadataIncompleteBuffer, Some(n)) => {
            // the tensors end where the largest data offset says
            let start = 8 + n as usize;
            let end = bytes
                .get(8..start)
                .and_then(|h| serde_json::from_slice::<Value>(h).ok())
                .and_then(|h| h.as_object()?.values().filter_map(|t| t.get("data_offsets")?.get(1)?.as_u64()).max())
                .unwrap_or(0);
            format!(
                "the header describes {end} bytes of tensor data but the file holds {} (truncated, or bytes added?)",
                len.saturating_sub(start)
            )
        }
        (other, _) => other.to_string(),
    }
}

/// Calls `f(file, name, view)` for every tensor of the safetensors files, in the order
/// [`for_each_tensor`] reads them (file by file, names sorted). Files are memory-mapped.
fn for_each_view(
    files: &[PathBuf],
    mut f: impl FnMut(&Path, &str, safetensors::tensor::TensorView<'_>) -> Result<()>,
) -> Result<()> {
    for file in files {
        let handle = File::open(file).with_context(|| format!("{}: cannot open", file.display()))?;
        // SAFETY: the map is read-only and dropped before this function returns; a file changed
        // underneath us can give wrong values, never memory unsafety beyond what mmap implies.
        let mmap =
            unsafe { memmap2::Mmap::map(&handle) }.with_context(|| format!("{}: cannot memory-map", file.display()))?;
        let st = SafeTensors::deserialize(&mmap).map_err(|e| {
            anyhow!("{}: not a valid safetensors file: {}", file.display(), safetensors_problem(&e, &mmap))
        })?;
        let mut names: Vec<String> = st.names().into_iter().map(|s| s.to_string()).collect();
        names.sort();
        for name in names {
            let view = st.tensor(&name).map_err(|e| anyhow!("{}: tensor '{name}': {e:?}", file.display()))?;
            f(file, &name, view)?;
        }
    }
    Ok(())
}

/// Reads every tensor of the safetensors files, calling `f(file, name, tensor)` one at a time, so
/// only one tensor beyond the model is in memory. Files are memory-mapped.
pub fn for_each_tensor(files: &[PathBuf], mut f: impl FnMut(&Path, &str, Tensor) -> Result<()>) -> Result<()> {
    for_each_view(files, |file, name, view| {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| anyhow!("{}: tensor '{name}': unsupported dtype {:?}", file.display(), view.dtype()))?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)
            .map_err(|e| anyhow!("{}: tensor '{name}': {e}", file.display()))?;
        f(file, name, t)
    })
}

/// One tensor of a safetensors file as its header describes it.
#[derive(Debug, Clone)]
pub struct TensorHeader {
    pub file: PathBuf,
    pub name: String,
    pub shape: Vec<i64>,
    pub kind: Kind,
}

/// The tensors of the safetensors files (names, shapes, dtypes) without reading their data, in
/// the order [`for_each_tensor`] reads them.
pub fn tensor_headers(files: &[PathBuf]) -> Result<Vec<TensorHeader>> {
    let mut out = Vec::new();
    for_each_view(files, |file, name, view| {
        let kind = kind_of(view.dtype())
            .ok_or_else(|| anyhow!("{}: tensor '{name}': unsupported dtype {:?}", file.display(), view.dtype()))?;
        let shape = view.shape().iter().map(|&d| d as i64).collect();
        out.push(TensorHeader { file: file.to_path_buf(), name: name.to_string(), shape, kind });
        Ok(())
    })?;
    Ok(out)
}

/// Copies the weights of a model folder into the variables of `vs` (matched by HF name,
/// converted to each variable's dtype and device). Missing, unexpected or mis-shaped tensors are
/// errors naming the tensor and both shapes.
pub fn load_weights(vs: &VarStore, dir: &Path, tied_embeddings: bool) -> Result<()> {
    load_weights_except(vs, dir, tied_embeddings, &|_| false, &|_| false)
}

/// `load_weights` that leaves out checkpoint tensors for which `skip` holds (e.g. `lm_head.weight`
/// when a trunk gets a new head) and accepts variables for which `may_be_missing` holds staying
/// as they are (e.g. a freshly initialised `score.weight`).
pub fn load_weights_except(
    vs: &VarStore,
    dir: &Path,
    tied_embeddings: bool,
    skip: &dyn Fn(&str) -> bool,
    may_be_missing: &dyn Fn(&str) -> bool,
) -> Result<()> {
    let files = weight_files(dir)?;
    let vars = vs.variables();
    let mut seen = HashSet::new();
    let mut unexpected = Vec::new();
    tch::no_grad(|| {
        for_each_tensor(&files, |file, name, t| {
            match vars.get(name) {
                _ if skip(name) => {}
                None if ignorable(name, tied_embeddings) => {}
                None => {
                    unexpected.push(format!("'{name}' (in {})", file.file_name().unwrap_or_default().to_string_lossy()))
                }
                Some(var) => {
                    if var.size() != t.size() {
                        bail!("{}: tensor '{name}' has shape {:?} in the checkpoint but the model (from config.json) expects {:?}", file.display(), t.size(), var.size());
                    }
                    let mut var = var.shallow_clone();
                    var.f_copy_(&t).map_err(|e| anyhow!("{}: tensor '{name}': {e}", file.display()))?;
                    seen.insert(name.to_string());
                }
            }
            Ok(())
        })
    })?;
    if !unexpected.is_empty() {
        bail!(
            "{}: the checkpoint has {} tensor(s) this model does not use: {}",
            dir.display(),
            unexpected.len(),
            preview(&unexpected)
        );
    }
    // LoRA adapters attached before loading are not part of a base checkpoint
    let mut missing: Vec<String> = vars
        .keys()
        .filter(|k| !seen.contains(*k) && !is_adapter_variable(k) && !may_be_missing(k))
        .map(|k| format!("'{k}' {:?}", vars[k].size()))
        .collect();
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "{}: the checkpoint lacks {} tensor(s) the config requires: {}",
            dir.display(),
            missing.len(),
            preview(&missing)
        );
    }
    Ok(())
}

fn preview(items: &[String]) -> String {
    let shown: Vec<&str> = items.iter().take(6).map(String::as_str).collect();
    let more =
        if items.len() > shown.len() { format!(" … and {} more", items.len() - shown.len()) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn to_view(t: &Tensor, kind: Option<Kind>) -> Result<OwnedView> {
    let t = t.f_detach()?.f_to_device(Device::Cpu)?;
    let t = match kind {
        Some(k) if t.is_floating_point() => t.f_to_kind(k)?,
        _ => t,
    }
    .f_contiguous()?;
    let kind = t.kind();
    let numel = t.numel();
    let mut data = vec![0u8; numel * kind.elt_size_in_bytes()];
    t.f_copy_data_u8(&mut data, numel)?;
    Ok(OwnedView { dtype: dtype_of(kind)?, shape: t.size().iter().map(|&d| d as usize).collect(), data })
}

/// Writes named tensors as `model.safetensors`, or as shards of at most `max_shard_bytes` plus
/// `model.safetensors.index.json` when they do not fit in one. Floating tensors are stored in
/// `kind` when given. Returns the file names written.
pub fn save_tensors(
    tensors: &BTreeMap<String, Tensor>,
    dir: &Path,
    kind: Option<Kind>,
    max_shard_bytes: usize,
) -> Result<Vec<String>> {
    let mut shards: Vec<Vec<(String, OwnedView)>> = vec![Vec::new()];
    let mut shard_bytes = 0usize;
    let mut total = 0usize;
    for (name, t) in tensors {
        let view = to_view(t, kind).with_context(|| format!("tensor '{name}'"))?;
        let n = view.data.len();
        if shard_bytes > 0 && shard_bytes + n > max_shard_bytes {
            shards.push(Vec::new());
            shard_bytes = 0;
        }
        shard_bytes += n;
        total += n;
        shards.last_mut().map(|s| s.push((name.clone(), view)));
    }
    let meta: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let count = shards.len();
    let mut written = Vec::new();
    let mut weight_map = serde_json::Map::new();
    for (i, shard) in shards.iter().enumerate() {
        let file = if count == 1 {
            SINGLE_FILE.to_string()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", i + 1, count)
        };
        let path = dir.join(&file);
        let views: Vec<(&str, &OwnedView)> = shard.iter().map(|(n, v)| (n.as_str(), v)).collect();
        safetensors::tensor::serialize_to_file(views, Some(meta.clone()), &path)
            .map_err(|e| anyhow!("{}: cannot write: {e:?}", path.display()))?;
        for (name, _) in shard {
            weight_map.insert(name.clone(), Value::String(file.clone()));
        }
        written.push(file);
    }
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join(INDEX_FILE);
        std::fs::write(&path, serde_json::to_string_pretty(&index)?)
            .with_context(|| format!("{}: cannot write", path.display()))?;
        written.push(INDEX_FILE.to_string());
    }
    Ok(written)
}

/// Options for `save_pretrained`.
pub struct SaveOptions<'a> {
    /// Store floating weights in this dtype (None: as they are in memory).
    pub dtype: Option<Kind>,
    pub max_shard_bytes: usize,
    /// Copy tokenizer / generation-config files from this folder.
    pub companions_from: Option<&'a Path>,
}

impl Default for SaveOptions<'_> {
    fn default() -> Self {
        SaveOptions { dtype: None, max_shard_bytes: DEFAULT_MAX_SHARD_BYTES, companions_from: None }
    }
}

/// The parameters of a causal LM by HF name, the tied LM head left out as transformers does, and
/// LoRA adapters left out (they are saved with `lora::save_adapter`, or merged first).
pub fn causal_lm_tensors(vs: &VarStore, config: &ModelConfig) -> BTreeMap<String, Tensor> {
    vs.variables()
        .into_iter()
        .filter(|(name, _)| !(config.tie_word_embeddings && name == "lm_head.weight"))
        .filter(|(name, _)| !is_adapter_variable(name))
        .collect()
}

/// Writes `config.json` from the parsed config, keeping every original field and recording the
/// stored dtype and architecture.
pub fn write_config(config: &ModelConfig, dir: &Path, stored: Kind, architecture: &str) -> Result<()> {
    write_config_json(&config_json(config, stored, architecture), dir)
}

/// The `config.json` content `write_config` writes, for callers that add fields of their own.
pub fn config_json(config: &ModelConfig, stored: Kind, architecture: &str) -> Value {
    let mut raw = config.raw.clone();
    if let Some(obj) = raw.as_object_mut() {
        let dtype_key =
            if obj.contains_key("torch_dtype") && !obj.contains_key("dtype") { "torch_dtype" } else { "dtype" };
        obj.insert(dtype_key.to_string(), json!(hf_dtype_name(stored)));
        obj.insert("architectures".to_string(), json!([architecture]));
        obj.insert("tie_word_embeddings".to_string(), json!(config.tie_word_embeddings));
    }
    raw
}

/// Writes `raw` as `dir/config.json`.
pub fn write_config_json(raw: &Value, dir: &Path) -> Result<()> {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(raw)? + "\n")
        .with_context(|| format!("{}: cannot write", path.display()))
}

/// Copies the tokenizer and generation-config files present in `from` into `to`.
pub fn copy_companions(from: &Path, to: &Path) -> Result<()> {
    for name in COMPANION_FILES {
        let src = from.join(name);
        if src.is_file() {
            std::fs::copy(&src, to.join(name))
                .with_context(|| format!("{}: cannot copy to {}", src.display(), to.display()))?;
        }
    }
    Ok(())
}

/// Saves a causal LM as a complete HF folder: weights (sharded when large), config.json and the
/// companion files. Written into a temporary sibling folder and renamed into place when complete.
pub fn save_pretrained(vs: &VarStore, config: &ModelConfig, out: &Path, opts: &SaveOptions) -> Result<()> {
    write_folder(out, |tmp| write_pretrained(vs, config, tmp, opts))
}

/// Writes the files of `save_pretrained` into an existing folder (no renaming).
pub fn write_pretrained(vs: &VarStore, config: &ModelConfig, dir: &Path, opts: &SaveOptions) -> Result<()> {
    let tensors = causal_lm_tensors(vs, config);
    let stored = opts.dtype.or_else(|| tensors.values().next().map(Tensor::kind)).unwrap_or(Kind::Float);
    save_tensors(&tensors, dir, opts.dtype, opts.max_shard_bytes)?;
    write_config(config, dir, stored, config.model_type.causal_lm_architecture())?;
    if let Some(from) = opts.companions_from {
        copy_companions(from, dir)?;
    }
    Ok(())
}
