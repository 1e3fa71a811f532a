//! `config.json` of a Llama-family model (llama, mistral, qwen2, qwen3), read in both the classic
//! form (`rope_theta`/`rope_scaling` at top level) and the transformers-5 form (`rope_parameters`).
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The model families one decoder implementation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelType {
    Llama,
    Mistral,
    Qwen2,
    Qwen3,
}

impl ModelType {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::Llama => "llama",
            ModelType::Mistral => "mistral",
            ModelType::Qwen2 => "qwen2",
            ModelType::Qwen3 => "qwen3",
        }
    }

    /// The `architectures` entry transformers uses for the causal-LM head of this family.
    pub fn causal_lm_architecture(self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForCausalLM",
            ModelType::Mistral => "MistralForCausalLM",
            ModelType::Qwen2 => "Qwen2ForCausalLM",
            ModelType::Qwen3 => "Qwen3ForCausalLM",
        }
    }

    /// The `architectures` entry transformers uses for a scalar (reward / value) head on the trunk.
    pub fn sequence_classification_architecture(self) -> &'static str {
        match self {
            ModelType::Llama => "LlamaForSequenceClassification",
            ModelType::Mistral => "MistralForSequenceClassification",
            ModelType::Qwen2 => "Qwen2ForSequenceClassification",
            ModelType::Qwen3 => "Qwen3ForSequenceClassification",
        }
    }
}

/// How RoPE frequencies are computed (`rope_type` in HF configs).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    Default,
    /// Positions divided by `factor`.
    Linear {
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The fields of `config.json` the decoder needs, resolved to their effective values.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub model_type: ModelType,
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_key_value_heads: i64,
    pub head_dim: i64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: RopeScaling,
    pub max_position_embeddings: i64,
    pub tie_word_embeddings: bool,
    /// q/k/v (and for llama `attention_bias`, o) projections carry a bias.
    pub qkv_bias: bool,
    pub o_bias: bool,
    pub mlp_bias: bool,
    /// Qwen3's per-head RMSNorm on queries and keys.
    pub qk_norm: bool,
    pub bos_token_id: Option<i64>,
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    /// The dtype the checkpoint says it was saved in (`torch_dtype` or `dtype`), if any.
    pub stored_dtype: Option<String>,
    /// The whole original JSON, kept so saving writes back every field we do not interpret.
    pub raw: Value,
    /// Warnings about fields that are present but not supported (e.g. sliding window).
    pub warnings: Vec<String>,
}

fn get_f64(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_f64)
}
fn get_i64(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64)
}
fn get_bool(v: &Value, key: &str) -> Option<bool> {
    v.get(key).and_then(Value::as_bool)
}

/// `eos_token_id` may be one integer or a list of them.
pub fn token_id_list(v: Option<&Value>) -> Vec<i64> {
    match v {
        Some(Value::Number(n)) => n.as_i64().into_iter().collect(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_i64).collect(),
        _ => Vec::new(),
    }
}

/// Upper bounds on the sizes of `config.json`: far above every released model (the largest
/// have hidden 16384, 126 layers, 256k vocabularies, 10M positions), so they only refuse a file
/// that would make the loader allocate absurd tensors before it reads a single weight.
pub const MAX_HIDDEN_SIZE: i64 = 65_536;
pub const MAX_INTERMEDIATE_SIZE: i64 = 1_048_576;
pub const MAX_HIDDEN_LAYERS: i64 = 1024;
pub const MAX_ATTENTION_HEADS: i64 = 1024;
pub const MAX_HEAD_DIM: i64 = 1024;
pub const MAX_VOCAB_SIZE: i64 = 1 << 22;
pub const MAX_POSITION_EMBEDDINGS: i64 = 1 << 24;
/// The most parameters the sizes together may imply (2 trillion).
pub const MAX_PARAMETERS: i64 = 2_000_000_000_000;

impl ModelConfig {
    /// Reads and validates `config.json` inside a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        if !path.is_file() {
            bail!("{}: no config.json in the model folder", path.display());
        }
        let text = std::fs::read_to_string(&path).with_context(|| format!("{}: cannot read", path.display()))?;
        let raw: Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?;
        Self::from_json(raw).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))
    }

    /// Interprets an already-parsed `config.json`. Errors name the field and what was expected.
    pub fn from_json(raw: Value) -> Result<Self> {
        if !raw.is_object() {
            bail!("expected a JSON object");
        }
        let model_type = match raw.get("model_type").and_then(Value::as_str) {
            Some("llama") => ModelType::Llama,
            Some("mistral") => ModelType::Mistral,
            Some("qwen2") => ModelType::Qwen2,
            Some("qwen3") => ModelType::Qwen3,
            Some(other) => {
                bail!("field 'model_type': unsupported model type '{other}' (supported: llama, mistral, qwen2, qwen3)")
            }
            None => bail!("field 'model_type': missing"),
        };
        // a size is a positive integer no larger than its bound
        let req = |key: &str, max: i64| -> Result<i64> {
            match raw.get(key) {
                Some(v) => {
                    let n = v
                        .as_i64()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| anyhow::anyhow!("field '{key}': expected a positive integer, found {v}"))?;
                    if n > max {
                        bail!(
                            "field '{key}': {n} is beyond what any model needs (expected a positive integer ≤ {max})"
                        );
                    }
                    Ok(n)
                }
                None => bail!("field '{key}': missing"),
            }
        };
        let vocab_size = req("vocab_size", MAX_VOCAB_SIZE)?;
        let hidden_size = req("hidden_size", MAX_HIDDEN_SIZE)?;
        let intermediate_size = req("intermediate_size", MAX_INTERMEDIATE_SIZE)?;
        let num_hidden_layers = req("num_hidden_layers", MAX_HIDDEN_LAYERS)?;
        let num_attention_heads = req("num_attention_heads", MAX_ATTENTION_HEADS)?;
        let num_key_value_heads = match raw.get("num_key_value_heads") {
            None | Some(Value::Null) => num_attention_heads,
            Some(_) => req("num_key_value_heads", MAX_ATTENTION_HEADS)?,
        };
        if num_attention_heads % num_key_value_heads != 0 {
            bail!("field 'num_key_value_heads': {num_key_value_heads} does not divide num_attention_heads {num_attention_heads}");
        }
        let head_dim = match raw.get("head_dim") {
            None | Some(Value::Null) => {
                if hidden_size % num_attention_heads != 0 {
                    bail!("field 'hidden_size': {hidden_size} is not a multiple of num_attention_heads {num_attention_heads} and no head_dim is given");
                }
                hidden_size / num_attention_heads
            }
            Some(_) => req("head_dim", MAX_HEAD_DIM)?,
        };
        if head_dim > MAX_HEAD_DIM {
            bail!("field 'hidden_size': {hidden_size} / num_attention_heads {num_attention_heads} gives a head dimension of {head_dim} (expected ≤ {MAX_HEAD_DIM})");
        }
        let max_position_embeddings = match raw.get("max_position_embeddings") {
            None | Some(Value::Null) => 4096,
            Some(_) => req("max_position_embeddings", MAX_POSITION_EMBEDDINGS)?,
        };
        if head_dim % 2 != 0 {
            bail!("field 'head_dim': RoPE needs an even head dimension, found {head_dim}");
        }
        let mut warnings = Vec::new();

        // RoPE: transformers-5 keeps everything in `rope_parameters`; the classic form has
        // `rope_theta` and `rope_scaling` at top level.
        let rope_params = raw.get("rope_parameters").filter(|v| v.is_object());
        let rope_theta = rope_params
            .and_then(|p| get_f64(p, "rope_theta"))
            .or_else(|| get_f64(&raw, "rope_theta"))
            .unwrap_or(10000.0);
        if !(rope_theta > 0.0 && rope_theta.is_finite()) {
            bail!("field 'rope_theta': expected a positive number, found {rope_theta}");
        }
        let scaling_src = rope_params.or_else(|| raw.get("rope_scaling").filter(|v| v.is_object()));
        let rope_scaling = match scaling_src {
            None => RopeScaling::Default,
            Some(s) => {
                let field = if rope_params.is_some() { "rope_parameters" } else { "rope_scaling" };
                let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(Value::as_str).unwrap_or("default");
                let num = |k: &str| -> Result<f64> {
                    get_f64(s, k).filter(|x| *x > 0.0 && x.is_finite()).ok_or_else(|| {
                        anyhow::anyhow!("field '{field}.{k}': expected a positive number for rope type '{kind}'")
                    })
                };
                match kind {
                    "default" => RopeScaling::Default,
                    "linear" => RopeScaling::Linear { factor: num("factor")? },
                    "llama3" => RopeScaling::Llama3 {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        original_max_position_embeddings: num("original_max_position_embeddings")?,
                    },
                    other => bail!("field '{field}.rope_type': unsupported RoPE type '{other}' (supported: default, linear, llama3)"),
                }
            }
        };

        if let Some(act) = raw.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" && act != "swish" {
                bail!("field 'hidden_act': only 'silu' is supported, found '{act}'");
            }
        }
        let sliding = match model_type {
            ModelType::Qwen2 | ModelType::Qwen3 => get_bool(&raw, "use_sliding_window").unwrap_or(false),
            _ => get_i64(&raw, "sliding_window").is_some(),
        };
        if sliding {
            warnings.push(format!(
                "sliding-window attention (sliding_window = {}) is not supported: full causal attention is used, which is identical for sequences shorter than the window",
                raw.get("sliding_window").unwrap_or(&Value::Null)
            ));
        }

        let (qkv_bias, o_bias, qk_norm) = match model_type {
            ModelType::Qwen2 => (true, false, false),
            ModelType::Qwen3 => {
                let b = get_bool(&raw, "attention_bias").unwrap_or(false);
                (b, b, true)
            }
            ModelType::Llama | ModelType::Mistral => {
                let b = get_bool(&raw, "attention_bias").unwrap_or(false);
                (b, b, false)
            }
        };
        let mlp_bias = get_bool(&raw, "mlp_bias").unwrap_or(false);
        let stored_dtype =
            raw.get("torch_dtype").or_else(|| raw.get("dtype")).and_then(Value::as_str).map(str::to_string);

        let rms_norm_eps = match raw.get("rms_norm_eps") {
            None | Some(Value::Null) => 1e-6,
            Some(v) => v
                .as_f64()
                .filter(|x| *x >= 0.0 && x.is_finite())
                .ok_or_else(|| anyhow::anyhow!("field 'rms_norm_eps': expected a non-negative number, found {v}"))?,
        };

        let config = ModelConfig {
            model_type,
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps,
            rope_theta,
            rope_scaling,
            max_position_embeddings,
            tie_word_embeddings: get_bool(&raw, "tie_word_embeddings").unwrap_or(false),
            qkv_bias,
            o_bias,
            mlp_bias,
            qk_norm,
            bos_token_id: get_i64(&raw, "bos_token_id"),
            eos_token_ids: token_id_list(raw.get("eos_token_id")),
            pad_token_id: get_i64(&raw, "pad_token_id"),
            stored_dtype,
            raw,
            warnings,
        };
        let params = config.parameter_count();
        if params > i128::from(MAX_PARAMETERS) {
            bail!(
                "the sizes imply {:.1} billion parameters (hidden_size {hidden_size}, intermediate_size {intermediate_size}, num_hidden_layers {num_hidden_layers}, vocab_size {vocab_size}; expected at most {} billion)",
                params as f64 / 1e9,
                MAX_PARAMETERS / 1_000_000_000
            );
        }
        Ok(config)
    }

    /// Number of parameters the decoder holds (tied embeddings counted once).
    pub fn num_parameters(&self) -> i64 {
        // from_json refused configs of more than MAX_PARAMETERS, so this fits
        i64::try_from(self.parameter_count()).unwrap_or(i64::MAX)
    }

    /// The parameter count in i128, so that any sizes a file states can be counted.
    fn parameter_count(&self) -> i128 {
        let h = i128::from(self.hidden_size);
        let head_dim = i128::from(self.head_dim);
        let q = i128::from(self.num_attention_heads) * head_dim;
        let kv = i128::from(self.num_key_value_heads) * head_dim;
        let inter = i128::from(self.intermediate_size);
        let vocab = i128::from(self.vocab_size);
        let attn = h * q
            + 2 * h * kv
            + q * h
            + if self.qkv_bias { q + 2 * kv } else { 0 }
            + if self.o_bias { h } else { 0 }
            + if self.qk_norm { 2 * head_dim } else { 0 };
        let mlp = 3 * h * inter + if self.mlp_bias { 2 * inter + h } else { 0 };
        let layer = attn + mlp + 2 * h;
        let emb = vocab * h;
        emb + i128::from(self.num_hidden_layers) * layer + h + if self.tie_word_embeddings { 0 } else { emb }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn base() -> Value {
        json!({"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
               "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2})
    }

    #[test]
    fn classic_and_v5_rope_forms_agree() {
        let mut classic = base();
        classic["rope_theta"] = json!(500000.0);
        classic["rope_scaling"] = json!({"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_theta":500000.0,"rope_type":"llama3","factor":8.0,"low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":8192});
        let a = ModelConfig::from_json(classic).unwrap();
        let b = ModelConfig::from_json(v5).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a.rope_theta, b.rope_theta);
        assert_eq!(a.rope_scaling, b.rope_scaling);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 8.0));
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = base();
        c["model_type"] = json!("gpt2");
        let e = ModelConfig::from_json(c).unwrap_err().to_string();
        assert!(e.contains("model_type") && e.contains("gpt2"), "{e}");
        let mut c = base();
        c["hidden_size"] = json!("big");
        let e = ModelConfig::from_json(c).unwrap_err().to_string();
        assert!(e.contains("'hidden_size'") && e.contains("positive integer"), "{e}");
        let mut c = base();
        c["rope_scaling"] = json!({"rope_type":"yarn","factor":4.0});
        let e = ModelConfig::from_json(c).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.rope_type") && e.contains("yarn"), "{e}");
    }

    #[test]
    fn eos_list_qwen_defaults_and_sliding_warning() {
        let mut c = base();
        c["model_type"] = json!("mistral");
        c["sliding_window"] = json!(4096);
        c["eos_token_id"] = json!([2, 7]);
        let m = ModelConfig::from_json(c).unwrap();
        assert_eq!(m.eos_token_ids, vec![2, 7]);
        assert_eq!(m.warnings.len(), 1);
        let mut c = base();
        c["model_type"] = json!("qwen2");
        c["sliding_window"] = json!(4096);
        c["use_sliding_window"] = json!(false);
        let m = ModelConfig::from_json(c).unwrap();
        assert!(m.qkv_bias && !m.o_bias && m.warnings.is_empty());
    }
}

/// A short name of a JSON value's type for error messages.
pub fn json_kind_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
