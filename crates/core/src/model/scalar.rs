//! A scalar head (`score.weight`, `[1, hidden]`, no bias) on the shared decoder trunk: the reward
//! model (score of the last non-pad token) and, per position, a value model. Saved and loaded as
//! a transformers `*ForSequenceClassification` folder with `num_labels = 1`, or under LoRA as a
//! PEFT `SEQ_CLS` adapter folder (trunk adapters + the head, which trains in full).
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Result};
use serde_json::{json, Value};
use tch::{nn, nn::VarStore, Device, Kind, Tensor};

use crate::hf::checkpoint::{
    config_json, copy_companions, load_weights, load_weights_except, save_tensors, write_config_json,
    DEFAULT_MAX_SHARD_BYTES,
};
use crate::hf::config::ModelConfig;
use crate::model::decoder::{ForwardOptions, Linear, Trunk};
use crate::model::lora_layer::LoraConfig;

/// HF name of the head's weight.
pub const SCORE_WEIGHT: &str = "score.weight";

/// A bias-free projection of hidden states to one number.
#[derive(Debug)]
pub struct ScalarHead {
    /// `[1, hidden]`, as transformers stores `score.weight` for one label.
    pub weight: Tensor,
}

impl ScalarHead {
    /// Creates `score.weight` (zero-filled) under `p`.
    pub fn new(p: nn::Path, hidden: i64) -> Self {
        ScalarHead { weight: p.zeros("weight", &[1, hidden]) }
    }

    /// `[..., hidden]` → `[...]` scores in f32.
    pub fn forward(&self, hidden: &Tensor) -> Result<Tensor> {
        Ok(hidden.f_linear::<Tensor>(&self.weight, None)?.f_squeeze_dim(-1)?.f_to_kind(Kind::Float)?)
    }
}

/// Index of the rightmost token of each row that is not `pad_id`, `[B]` — the position
/// transformers' sequence classifiers read (0 for a row of padding only).
pub fn last_non_pad_index(input_ids: &Tensor, pad_id: i64) -> Result<Tensor> {
    let t = input_ids.size().last().copied().ok_or_else(|| anyhow!("input_ids has no dimensions"))?;
    let positions = Tensor::f_arange(t, (Kind::Int64, input_ids.device()))?;
    Ok(positions.f_mul(&input_ids.f_ne(pad_id)?)?.f_argmax(-1, false)?)
}

/// A trunk with a scalar head.
#[derive(Debug)]
pub struct ScalarModel {
    pub config: ModelConfig,
    pub model: Trunk,
    pub score: ScalarHead,
    /// The id whose trailing occurrences are padding (config.json's `pad_token_id`).
    pub pad_token_id: i64,
}

impl ScalarModel {
    /// Creates the parameters (`model.*`, `score.weight`) under their HF names in `root`.
    pub fn new(root: &nn::Path, config: &ModelConfig, pad_token_id: i64) -> Self {
        ScalarModel {
            config: config.clone(),
            model: Trunk::new(root / "model", config),
            score: ScalarHead::new(root / "score", config.hidden_size),
            pad_token_id,
        }
    }

    /// One score per row of `[B, T]` ids: the head applied to the hidden state of the last
    /// non-pad token. Rows are right-padded with `pad_token_id` (causal attention keeps the
    /// padding out of every real position).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let hidden = self.model.forward(input_ids, &ForwardOptions::default(), None)?;
        let last = last_non_pad_index(input_ids, self.pad_token_id)?;
        let (b, h) = (hidden.size()[0], hidden.size()[2]);
        let index = last.f_view([b, 1, 1])?.f_expand([b, 1, h], false)?;
        self.score.forward(&hidden.f_gather(1, &index, false)?.f_squeeze_dim(1)?)
    }

    /// A score for every position, `[B, T]` (a value model's per-token values).
    pub fn forward_all(&self, input_ids: &Tensor, opts: &ForwardOptions) -> Result<Tensor> {
        self.score.forward(&self.model.forward(input_ids, opts, None)?)
    }

    pub fn kind(&self) -> Kind {
        self.model.embed_tokens.kind()
    }

    pub fn device(&self) -> Device {
        self.model.embed_tokens.device()
    }

    /// Training mode turns on LoRA dropout; a new model starts in evaluation mode.
    pub fn set_training(&self, training: bool) {
        self.model.set_training(training);
    }

    /// The LoRA configuration of the adapters attached to the trunk, if any.
    pub fn lora_config(&self) -> Option<&LoraConfig> {
        self.model.lora_config()
    }

    /// The trunk's projections by HF module path (see `Trunk::linears`).
    pub fn linears(&self) -> Vec<(String, &Linear)> {
        self.model.linears()
    }
}

/// LoRA on the trunk; the head is PEFT's `modules_to_save` of a `SEQ_CLS` adapter.

/// A scalar model with its variables and the folder it came from.
pub struct LoadedScalarModel {
    pub vs: VarStore,
    pub rm: ScalarModel,
    pub dir: PathBuf,
}

/// How a new head is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ScoreInit {
    /// `N(0, std²)` from `seed` (drawn on the CPU, so the same on every device).
    Normal {
        std: f64,
        seed: u64,
    },
    Zeros,
}

impl ScoreInit {
    /// The default for a reward model: `N(0, 1/hidden)` (std `1/√hidden`), so initial scores
    /// are O(1) for unit-scale hidden states.
    pub fn default_for(hidden: i64, seed: u64) -> Self {
        ScoreInit::Normal { std: 1.0 / (hidden as f64).sqrt(), seed }
    }
}

fn build(config: &ModelConfig, pad_token_id: i64, device: Device, kind: Kind) -> (VarStore, ScalarModel) {
    crate::model::device::enable_cpu_features();
    let mut vs = VarStore::new(device);
    vs.set_kind(kind);
    let rm = ScalarModel::new(&vs.root(), config, pad_token_id);
    (vs, rm)
}

/// A new scalar model on the trunk of a causal-LM folder (its `lm_head` is left out) with a
/// fresh head. `pad_token_id` is the id that pads batches (the tokenizer's padding id).
pub fn scalar_model_from_causal_lm(
    dir: &Path,
    device: Device,
    kind: Kind,
    pad_token_id: i64,
    init: ScoreInit,
) -> Result<LoadedScalarModel> {
    let config = ModelConfig::from_dir(dir)?;
    for w in &config.warnings {
        tracing::warn!("{}: {w}", dir.join("config.json").display());
    }
    let (vs, rm) = build(&config, pad_token_id, device, kind);
    load_weights_except(&vs, dir, config.tie_word_embeddings, &|n| n == "lm_head.weight", &|n| n == SCORE_WEIGHT)?;
    let head = match init {
        ScoreInit::Zeros => Tensor::f_zeros([1, config.hidden_size], (Kind::Float, Device::Cpu))?,
        ScoreInit::Normal { std, seed } => {
            tch::manual_seed(seed as i64);
            Tensor::f_randn([1, config.hidden_size], (Kind::Float, Device::Cpu))?.f_mul_scalar(std)?
        }
    };
    tch::no_grad(|| rm.score.weight.shallow_clone().f_copy_(&head))?;
    Ok(LoadedScalarModel { vs, rm, dir: dir.to_path_buf() })
}

/// Whether `config.json` describes a one-label sequence classifier (a reward or value model).
fn check_reward_config(raw: &Value, path: &Path) -> Result<()> {
    let archs: Vec<&str> =
        raw.get("architectures").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str).collect();
    if !archs.iter().any(|a| a.ends_with("ForSequenceClassification")) {
        bail!(
            "{}: field 'architectures': expected a *ForSequenceClassification model (a reward model), found {archs:?}",
            path.display()
        );
    }
    let labels = match (raw.get("num_labels").and_then(Value::as_i64), raw.get("id2label").and_then(Value::as_object)) {
        (Some(n), _) => n as usize,
        (None, Some(m)) => m.len(),
        (None, None) => 2, // transformers' default
    };
    if labels != 1 {
        bail!(
            "{}: field 'num_labels' / 'id2label': expected one label (a scalar score), found {labels}",
            path.display()
        );
    }
    Ok(())
}

/// Whether `config.json` names a `*ForSequenceClassification` architecture.
pub fn is_sequence_classifier(config: &ModelConfig) -> bool {
    config
        .raw
        .get("architectures")
        .and_then(Value::as_array)
        .is_some_and(|a| a.iter().filter_map(Value::as_str).any(|x| x.ends_with("ForSequenceClassification")))
}

/// A scalar model from `dir`: a reward-model folder as it is, or a causal LM's trunk with a new
/// head initialised by `init(hidden_size)` and `pad_token_id` as its padding id.
pub fn load_scalar_model(
    dir: &Path,
    device: Device,
    kind: Kind,
    pad_token_id: i64,
    init: impl FnOnce(i64) -> ScoreInit,
) -> Result<LoadedScalarModel> {
    let config = ModelConfig::from_dir(dir)?;
    if is_sequence_classifier(&config) {
        load_reward_model(dir, device, kind)
    } else {
        scalar_model_from_causal_lm(dir, device, kind, pad_token_id, init(config.hidden_size))
    }
}

/// Loads a reward-model folder written by [`write_scalar_model`] or transformers
/// (`*ForSequenceClassification`, one label, `pad_token_id` set).
pub fn load_reward_model(dir: &Path, device: Device, kind: Kind) -> Result<LoadedScalarModel> {
    let config = ModelConfig::from_dir(dir)?;
    let path = dir.join("config.json");
    check_reward_config(&config.raw, &path)?;
    let pad = config.pad_token_id.ok_or_else(|| {
        anyhow!(
            "{}: field 'pad_token_id': missing; a reward model needs it to find each row's last token",
            path.display()
        )
    })?;
    let (vs, rm) = build(&config, pad, device, kind);
    load_weights(&vs, dir, config.tie_word_embeddings)?;
    Ok(LoadedScalarModel { vs, rm, dir: dir.to_path_buf() })
}

/// Writes a scalar model as an HF folder: `model.safetensors` (`model.*` + `score.weight`),
/// `config.json` (the trunk's config with `architectures: [<Family>ForSequenceClassification]`,
/// `num_labels: 1`, `id2label`/`label2id` as transformers writes them, `pad_token_id`), and the
/// tokenizer files of `companions_from`.
pub fn write_scalar_model(
    vs: &VarStore,
    rm: &ScalarModel,
    dir: &Path,
    dtype: Option<Kind>,
    companions_from: Option<&Path>,
) -> Result<()> {
    ensure!(
        rm.lora_config().is_none(),
        "{}: the scalar model has LoRA adapters attached; save them with lora::save_adapter or merge them first",
        dir.display()
    );
    let tensors = vs.variables().into_iter().collect();
    ensure!(vs.variables().contains_key(SCORE_WEIGHT), "scalar model has no {SCORE_WEIGHT}");
    save_tensors(&tensors, dir, dtype, DEFAULT_MAX_SHARD_BYTES)?;
    let stored = dtype.unwrap_or_else(|| rm.kind());
    let mut raw = config_json(&rm.config, stored, rm.config.model_type.sequence_classification_architecture());
    if let Some(obj) = raw.as_object_mut() {
        obj.insert("num_labels".into(), json!(1));
        obj.insert("id2label".into(), json!({"0": "LABEL_0"}));
        obj.insert("label2id".into(), json!({"LABEL_0": 0}));
        obj.insert("pad_token_id".into(), json!(rm.pad_token_id));
    }
    write_config_json(&raw, dir)?;
    if let Some(from) = companions_from {
        copy_companions(from, dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_non_pad_is_the_rightmost_real_token() {
        let ids = Tensor::from_slice(&[5i64, 6, 7, 0, 0, 0, 3, 0, 4, 0, 0, 0, 0, 0, 0]).view([3, 5]);
        let got: Vec<i64> = Vec::try_from(last_non_pad_index(&ids, 0).unwrap()).unwrap();
        // left padding, padding in the middle, and a row of padding only
        assert_eq!(got, vec![2, 3, 0]);
    }

    #[test]
    fn head_reads_last_token_and_ignores_right_padding() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-qwen2");
        let m = scalar_model_from_causal_lm(&dir, Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 1)).unwrap();
        assert!(!m.vs.variables().contains_key("lm_head.weight"));
        let short = Tensor::from_slice(&[11i64, 12, 13]).view([1, 3]);
        let padded = Tensor::from_slice(&[11i64, 12, 13, 0, 0, 14, 15, 16, 17, 18]).view([2, 5]);
        let a = m.rm.forward(&short).unwrap().double_value(&[0]);
        let b = m.rm.forward(&padded).unwrap();
        assert!((a - b.double_value(&[0])).abs() < 1e-5, "{a} vs {}", b.double_value(&[0]));
        let all = m.rm.forward_all(&padded, &ForwardOptions::default()).unwrap();
        assert_eq!(all.size(), vec![2, 5]);
        assert!((all.double_value(&[1, 4]) - b.double_value(&[1])).abs() < 1e-5);
        // the seeded head is reproducible; zeros give zero scores
        let again =
            scalar_model_from_causal_lm(&dir, Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 1)).unwrap();
        assert_eq!(again.rm.forward(&short).unwrap().double_value(&[0]), a);
        let zero = scalar_model_from_causal_lm(&dir, Device::Cpu, Kind::Float, 0, ScoreInit::Zeros).unwrap();
        assert_eq!(zero.rm.forward(&short).unwrap().double_value(&[0]), 0.0);
    }

    #[test]
    fn saved_folder_loads_back_with_the_same_scores_and_a_causal_lm_is_refused() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/tiny-llama");
        let m = scalar_model_from_causal_lm(&src, Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 7)).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("rm");
        std::fs::create_dir_all(&out).unwrap();
        write_scalar_model(&m.vs, &m.rm, &out, None, Some(&src)).unwrap();
        let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(cfg["architectures"], json!(["LlamaForSequenceClassification"]));
        assert_eq!(cfg["num_labels"], json!(1));
        assert_eq!(cfg["pad_token_id"], json!(0));
        assert!(out.join("tokenizer.json").is_file());
        let back = load_reward_model(&out, Device::Cpu, Kind::Float).unwrap();
        let ids = Tensor::from_slice(&[11i64, 12, 13, 14, 1, 2, 0, 0]).view([2, 4]);
        let a: Vec<f32> = Vec::try_from(m.rm.forward(&ids).unwrap()).unwrap();
        let b: Vec<f32> = Vec::try_from(back.rm.forward(&ids).unwrap()).unwrap();
        assert_eq!(a, b);
        let e = load_reward_model(&src, Device::Cpu, Kind::Float).err().unwrap().to_string();
        assert!(e.contains("architectures") && e.contains("config.json"), "{e}");
    }
}
