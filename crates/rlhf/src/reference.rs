//! The reference log-probs of DPO and KTO: each answer's summed log-prob under the frozen initial
//! policy, computed live per batch by a second model (no gradients), or once before training and
//! cached on disk under a key of everything they depend on, so no reference model is held in
//! training. Both stages score pairs of sequences (DPO: chosen and rejected; KTO: an example's
//! completion and its mismatched KL completion) and share all of it.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use align_core::data::{expand_data_paths, DataOptions};
use align_core::hf::checkpoint::{resolve_model_dir, weight_files};
use align_core::hf::config::ModelConfig;
use align_core::hf::folder::{sha256_file, sync_path};
use align_core::infer::logprobs::{head_logprobs, HeadOptions};
use align_core::load::spec::{AdapterMode, ModelSpec};
use align_core::model::decoder::{CausalLm, ForwardOptions};
use align_core::model::io::LoadedModel;
use align_core::model::quant::Quantization;
use align_core::peft::lora::without_adapters;
use align_core::train::config::LoadedConfig;
use align_core::train::config::{canonical_json, sha256_hex};
use align_core::train::preference_batch::{PairSplits, PreferenceBatch};
use align_core::train::setup::{training_device, training_spec};
use align_core::train::trainer::Split;

/// Summed answer log-probs and answer token counts of a batch's chosen and rejected rows,
/// each `[B]` f32: `(chosen_logps, rejected_logps, chosen_tokens, rejected_tokens)`; the LM head
/// runs in chunks of `chunk_tokens` (`train.loss_chunk_tokens`, 0 = at once).
pub fn pair_logps(
    lm: &CausalLm,
    batch: &PreferenceBatch,
    chunk_tokens: usize,
) -> Result<(Tensor, Tensor, Tensor, Tensor)> {
    let (sums, counts) = sequence_logps(lm, &batch.input_ids, &batch.labels, chunk_tokens)?;
    let (pc, pr) = batch.split(&sums)?;
    let (nc, nr) = batch.split(&counts)?;
    Ok((pc, pr, nc, nr))
}

/// Summed label log-probs and label counts of each row of right-padded `[B, T]` ids and labels,
/// both `[B]` f32; the LM head runs in chunks of `chunk_tokens` (0 = at once).
pub fn sequence_logps(
    lm: &CausalLm,
    input_ids: &Tensor,
    labels: &Tensor,
    chunk_tokens: usize,
) -> Result<(Tensor, Tensor)> {
    let hidden = lm.model.forward(input_ids, &ForwardOptions::default(), None)?;
    head_logprobs(lm, &hidden, labels, HeadOptions { chunk_tokens, ..Default::default() })?.sequence_sums()
}

/// Precomputed reference log-probs, `[N]` f32 on the CPU, per split: (chosen, rejected).
pub struct ReferenceLogps {
    pub train: (Tensor, Tensor),
    pub validation: (Tensor, Tensor),
}

impl ReferenceLogps {
    /// The reference log-probs of `examples` of `split`, on `device`.
    pub fn select(&self, split: Split, examples: &[usize], device: Device) -> Result<(Tensor, Tensor)> {
        let (c, r) = match split {
            Split::Train => &self.train,
            Split::Validation => &self.validation,
        };
        let idx: Vec<i64> = examples.iter().map(|&e| e as i64).collect();
        let idx = Tensor::from_slice(&idx);
        Ok((c.f_index_select(0, &idx)?.f_to_device(device)?, r.f_index_select(0, &idx)?.f_to_device(device)?))
    }

    fn matches(&self, data: &PairSplits) -> bool {
        let n = |t: &Tensor| t.size().first().copied().unwrap_or(-1);
        n(&self.train.0) == data.train.len() as i64
            && n(&self.train.1) == data.train.len() as i64
            && n(&self.validation.0) == data.validation.len() as i64
            && n(&self.validation.1) == data.validation.len() as i64
    }
}

/// Where the reference log-probs of a batch come from.
pub enum Reference {
    /// The loss is reference-free (simpo, orpo).
    Free,
    /// A frozen model run under `no_grad` for every batch.
    Live(Box<LoadedModel>),
    /// The LoRA policy itself with its adapters switched off: the base it started from, with no
    /// second copy of the weights in memory.
    BaseOfPolicy,
    /// Computed once before training.
    Cached(ReferenceLogps),
}

impl Reference {
    /// Runs `f` without gradients on the reference model: the frozen copy, or the policy with
    /// its adapters switched off. None when the reference is not a model (free, cached).
    pub fn run<T>(&self, policy: &CausalLm, f: impl FnOnce(&CausalLm) -> Result<T>) -> Result<Option<T>> {
        match self {
            Reference::Free | Reference::Cached(_) => Ok(None),
            Reference::Live(m) => tch::no_grad(|| f(&m.lm)).map(Some),
            Reference::BaseOfPolicy => tch::no_grad(|| without_adapters(policy, f)).map(Some),
        }
    }
}

/// Loads the reference model with every parameter frozen; `adapter` (a PEFT folder) is merged
/// into it first, or, with `quantize` (a QLoRA run: the reference is held as the policy's base
/// is), attached frozen on the quantised base.
pub fn load_reference_model(
    dir: &Path,
    adapter: Option<&Path>,
    device: Device,
    kind: Kind,
    quantize: Option<Quantization>,
) -> Result<Box<LoadedModel>> {
    let mut m = ModelSpec::at(dir, adapter, device, kind).quantized(quantize).causal_lm(AdapterMode::Merge)?.model;
    m.vs.freeze();
    Ok(Box::new(m))
}

/// The reference of a policy-optimisation stage whose policy starts from `model` (+ `adapter`):
/// that same model, frozen, unless `explicit` names another folder. A LoRA policy with fresh
/// adapters uses its own base with the adapters disabled, so no second copy is loaded.
pub fn policy_reference(cfg: &LoadedConfig, explicit: Option<&str>, device: Device, kind: Kind) -> Result<Reference> {
    let c = &cfg.config;
    let quantize = c.train.quantization()?;
    if let Some(dir) = explicit {
        let dir = resolve_model_dir(dir)?;
        tracing::info!("reference: {} (frozen)", dir.display());
        return Ok(Reference::Live(load_reference_model(&dir, None, device, kind, quantize)?));
    }
    if c.method.is_adapter() && c.adapter.is_none() {
        tracing::info!(
            "reference: the policy's base model with its {} adapter disabled (one copy of the weights)",
            c.method.as_str()
        );
        return Ok(Reference::BaseOfPolicy);
    }
    let dir = resolve_model_dir(&c.model)?;
    let adapter = c.adapter.as_deref().map(resolve_model_dir).transpose()?;
    tracing::info!(
        "reference: a frozen copy of the initial policy {}{}",
        dir.display(),
        adapter.as_ref().map_or(String::new(), |a| format!(" + adapter {}", a.display()))
    );
    Ok(Reference::Live(load_reference_model(&dir, adapter.as_deref(), device, kind, quantize)?))
}

/// The cache settings, plus the base's quantisation when the run holds it quantised (QLoRA), so
/// a cache made on a full-precision reference is not reused (keys of other runs are unchanged).
fn with_quantization(mut settings: Value, q: Option<Quantization>) -> Value {
    if let Some(q) = q {
        settings["quantize"] = Value::String(q.describe());
    }
    settings
}

/// The reference of a stage that scores `data` (`[section]` names the stage in messages): a
/// model (`explicit`, else the initial policy; see [`policy_reference`]) that must share the
/// policy's vocabulary, or with `precompute` its log-probs of every pair, computed once (the
/// reference loaded before the policy, used and dropped) and cached in
/// `output_dir/ref_logps-<key>.safetensors`, reused when the key matches.
pub fn pair_reference(
    cfg: &LoadedConfig,
    section: &str,
    explicit: Option<&str>,
    precompute: bool,
    data: &PairSplits,
    options: &DataOptions,
) -> Result<Reference> {
    let c = &cfg.config;
    let (device, kind) = training_device(cfg)?;
    let policy_dir = resolve_model_dir(&c.model)?;
    let ref_dir = resolve_model_dir(explicit.unwrap_or(&c.model))?;
    // without an explicit reference, the reference is the initial policy: model + its adapter
    let ref_adapter = match explicit {
        None => c.adapter.as_deref().map(resolve_model_dir).transpose()?,
        Some(_) => None,
    };
    let ref_config = ModelConfig::from_dir(&ref_dir)?;
    let policy_config = ModelConfig::from_dir(&policy_dir)?;
    if ref_config.vocab_size != policy_config.vocab_size {
        anyhow::bail!(
            "{}: [{section}] reference: {} has vocab_size {} but the policy {} has {}; the reference must share the policy's tokenizer",
            cfg.origin.display(),
            ref_dir.display(),
            ref_config.vocab_size,
            policy_dir.display(),
            policy_config.vocab_size
        );
    }
    if !precompute {
        return policy_reference(cfg, explicit, device, kind);
    }
    let tokenizer = training_spec(cfg)?.tokenizer()?;
    let template = tokenizer.chat_template()?.source().to_string();
    let inputs = CacheInputs {
        reference_dir: &ref_dir,
        data_files: &expand_data_paths(&c.data)?,
        val_files: &if c.val_data.is_empty() { Vec::new() } else { expand_data_paths(&c.val_data)? },
        chat_template: &template,
        max_length: c.train.max_length,
        settings: with_quantization(
            json!({
                "length_policy": options.length_policy,
                "val_ratio": c.train.val_ratio,
                "seed": c.train.seed,
                "dtype": format!("{kind:?}"),
                "device": if device.is_cuda() { "cuda" } else { "cpu" },
                "reference_adapter": match &ref_adapter {
                    Some(a) => json!([
                        sha256_file(&a.join("adapter_config.json"))?,
                        sha256_file(&a.join("adapter_model.safetensors"))?
                    ]),
                    None => Value::Null,
                },
            }),
            c.train.quantization()?,
        ),
        data,
    };
    let key = reference_cache_key(&inputs)?;
    let (logps, path, reused) = cached_reference_logps(&c.output_dir, &key, data, || {
        tracing::info!("computing reference log-probs with {} (once)", ref_dir.display());
        let model = load_reference_model(&ref_dir, ref_adapter.as_deref(), device, kind, c.train.quantization()?)?;
        compute_reference_logps(&model.lm, data, c.train.batch_size, tokenizer.padding_id(), c.train.loss_chunk_tokens)
    })?;
    tracing::info!("reference log-probs {} {}", if reused { "reused from" } else { "cached in" }, path.display());
    Ok(Reference::Cached(logps))
}

/// Reference log-probs of every pair of both splits, in micro-batches of `batch_size` pairs.
pub fn compute_reference_logps(
    lm: &CausalLm,
    data: &PairSplits,
    batch_size: usize,
    pad_id: i64,
    chunk_tokens: usize,
) -> Result<ReferenceLogps> {
    let _guard = tch::no_grad_guard();
    let mut per_split = Vec::new();
    for split in [Split::Train, Split::Validation] {
        let pairs: Vec<_> = data.get(split).iter().collect();
        let (mut chosen, mut rejected) = (Vec::new(), Vec::new());
        for chunk in pairs.chunks(batch_size.max(1)) {
            let batch = PreferenceBatch::new(chunk, pad_id, lm.device())?;
            let (pc, pr, _, _) = pair_logps(lm, &batch, chunk_tokens)?;
            chosen.push(pc.f_to_device(Device::Cpu)?);
            rejected.push(pr.f_to_device(Device::Cpu)?);
        }
        let cat = |v: &[Tensor]| -> Result<Tensor> {
            Ok(if v.is_empty() { Tensor::f_zeros([0], (Kind::Float, Device::Cpu))? } else { Tensor::f_cat(v, 0)? })
        };
        per_split.push((cat(&chosen)?, cat(&rejected)?));
    }
    let validation = per_split.pop().ok_or_else(|| anyhow!("no validation split"))?;
    let train = per_split.pop().ok_or_else(|| anyhow!("no train split"))?;
    Ok(ReferenceLogps { train, validation })
}

/// What the cached log-probs depend on besides the reference weights and the data files.
pub struct CacheInputs<'a> {
    pub reference_dir: &'a Path,
    pub data_files: &'a [PathBuf],
    pub val_files: &'a [PathBuf],
    pub chat_template: &'a str,
    pub max_length: usize,
    /// Split and length settings, dtype and device: anything else that changes the numbers.
    pub settings: Value,
    /// The encoded pairs themselves (covers the tokenizer, template and split exactly).
    pub data: &'a PairSplits,
}

/// SHA-256 key of the cache: hashes of the reference's config and weight files, of the data
/// files' contents, the chat template, `max_length`, the other settings and the encoded pairs.
pub fn reference_cache_key(inputs: &CacheInputs) -> Result<String> {
    let mut weights = vec![sha256_file(&inputs.reference_dir.join("config.json"))?];
    for f in weight_files(inputs.reference_dir)? {
        weights.push(sha256_file(&f)?);
    }
    let files = |fs: &[PathBuf]| fs.iter().map(|f| sha256_file(f)).collect::<Result<Vec<_>>>();
    let mut pairs = Sha256::new();
    for split in [Split::Train, Split::Validation] {
        pairs.update(format!("{split:?}:{};", inputs.data.get(split).len()));
        for p in inputs.data.get(split) {
            for side in [&p.chosen, &p.rejected] {
                pairs.update((side.input_ids.len() as u64).to_le_bytes());
                for (id, label) in side.input_ids.iter().zip(&side.labels) {
                    pairs.update(id.to_le_bytes());
                    pairs.update(label.to_le_bytes());
                }
            }
        }
    }
    let pairs: String = pairs.finalize().iter().map(|b| format!("{b:02x}")).collect();
    let key = json!({
        "format": 1,
        "reference_weights": weights,
        "data": files(inputs.data_files)?,
        "val_data": files(inputs.val_files)?,
        "chat_template": inputs.chat_template,
        "max_length": inputs.max_length,
        "settings": inputs.settings,
        "pairs": pairs,
    });
    Ok(sha256_hex(canonical_json(&key).as_bytes()))
}

/// The cache file of a key under `output_dir`.
pub fn cache_path(output_dir: &Path, key: &str) -> PathBuf {
    output_dir.join(format!("ref_logps-{key}.safetensors"))
}

const NAMES: [&str; 4] = ["train_chosen", "train_rejected", "validation_chosen", "validation_rejected"];

fn read_cache(path: &Path) -> Result<ReferenceLogps> {
    let tensors = Tensor::read_safetensors(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let get = |name: &str| -> Result<Tensor> {
        tensors
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.shallow_clone())
            .ok_or_else(|| anyhow!("{}: tensor '{name}' is missing", path.display()))
    };
    Ok(ReferenceLogps { train: (get(NAMES[0])?, get(NAMES[1])?), validation: (get(NAMES[2])?, get(NAMES[3])?) })
}

/// The reference log-probs for `key`: read from `output_dir/ref_logps-<key>.safetensors` when it
/// exists and fits the data, else computed by `compute` (which loads, uses and drops the
/// reference model) and written atomically. Returns the log-probs, the file and whether it
/// was reused.
pub fn cached_reference_logps(
    output_dir: &Path,
    key: &str,
    data: &PairSplits,
    compute: impl FnOnce() -> Result<ReferenceLogps>,
) -> Result<(ReferenceLogps, PathBuf, bool)> {
    let path = cache_path(output_dir, key);
    if path.is_file() {
        match read_cache(&path) {
            Ok(r) if r.matches(data) => return Ok((r, path, true)),
            Ok(_) => tracing::warn!("{}: does not fit the data; computing it again", path.display()),
            Err(e) => tracing::warn!("{e}; computing the reference log-probs again"),
        }
    }
    let logps = compute()?;
    std::fs::create_dir_all(output_dir).with_context(|| format!("{}: cannot create", output_dir.display()))?;
    let tmp = output_dir.join(format!(".ref_logps-{key}.tmp-{}", std::process::id()));
    let named = [
        (NAMES[0], &logps.train.0),
        (NAMES[1], &logps.train.1),
        (NAMES[2], &logps.validation.0),
        (NAMES[3], &logps.validation.1),
    ];
    Tensor::write_safetensors(&named, &tmp).map_err(|e| anyhow!("{}: cannot write: {e}", tmp.display()))?;
    sync_path(&tmp)?;
    std::fs::rename(&tmp, &path).with_context(|| format!("{}: cannot rename into place", path.display()))?;
    sync_path(output_dir)?;
    Ok((logps, path, false))
}
