//! Random-initialised models from a small TOML description and a tokenizer folder (`align init`,
//! and the pipeline's `defaults.init`): vocabulary size and special-token ids come from the
//! tokenizer, weights are drawn as transformers' `_init_weights` draws them.
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Map, Value};
use tch::{Device, Kind};

use crate::hf::checkpoint::{save_pretrained, SaveOptions};
use crate::hf::config::json_kind_name as kind_name;
use crate::model::io::new_causal_lm;
use crate::{ModelConfig, ModelTokenizer};

const INIT_KEYS: &[&str] = &[
    "model_type",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "tie_word_embeddings",
    "initializer_range",
    "attention_bias",
    "mlp_bias",
    "vocab_size",
    "seed",
];

/// Builds `config.json` from the TOML description and the tokenizer's vocabulary and tokens.
pub fn init_config(desc: &toml::Table, origin: &Path, tok: &ModelTokenizer) -> Result<Value> {
    for key in desc.keys() {
        if !INIT_KEYS.contains(&key.as_str()) {
            bail!("{}: unknown key '{key}' (known: {})", origin.display(), INIT_KEYS.join(", "));
        }
    }
    let desc_json = serde_json::to_value(desc)?;
    let mut cfg = Map::new();
    let defaults = json!({
        "model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "tie_word_embeddings": true, "initializer_range": 0.02, "attention_bias": false, "mlp_bias": false, "use_cache": true,
    });
    for (k, v) in defaults.as_object().into_iter().flatten() {
        cfg.insert(k.clone(), v.clone());
    }
    for (k, v) in desc_json.as_object().into_iter().flatten() {
        if k != "seed" {
            cfg.insert(k.clone(), v.clone());
        }
    }
    let tok_vocab = tok.vocab_size() as i64;
    match cfg.get("vocab_size") {
        None => {
            cfg.insert("vocab_size".into(), json!(tok_vocab));
        }
        Some(v) => {
            let n = v.as_i64().ok_or_else(|| {
                anyhow!("{}: field 'vocab_size': expected an integer, found {}", origin.display(), kind_name(v))
            })?;
            if n < tok_vocab {
                bail!(
                    "{}: field 'vocab_size': {n} is smaller than the tokenizer's {tok_vocab} tokens",
                    origin.display()
                );
            }
        }
    }
    cfg.insert("bos_token_id".into(), json!(tok.bos_token_id));
    cfg.insert("eos_token_id".into(), json!(tok.eos_token_ids.first()));
    cfg.insert("pad_token_id".into(), json!(tok.pad_token_id));
    cfg.insert("torch_dtype".into(), json!("float32"));
    Ok(Value::Object(cfg))
}

/// Writes a random-initialised model folder to `out` (weights, config, generation config and the
/// tokenizer files). `seed` overrides the description's `seed` (default 0).
pub fn init_model(desc_path: &Path, tokenizer: &Path, out: &Path, seed: Option<i64>) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(desc_path).with_context(|| format!("{}: cannot read", desc_path.display()))?;
    let desc: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {}", desc_path.display(), e.to_string().trim()))?;
    let tok = ModelTokenizer::from_dir(tokenizer)?;
    let raw = init_config(&desc, desc_path, &tok)?;
    let std = raw["initializer_range"].as_f64().unwrap_or(0.02);
    let config = ModelConfig::from_json(raw).map_err(|e| anyhow!("{}: {e}", desc_path.display()))?;
    let seed = seed.or_else(|| desc.get("seed").and_then(|v| v.as_integer())).unwrap_or(0);

    let (vs, _lm) = new_causal_lm(&config, Device::Cpu, Kind::Float);
    tch::manual_seed(seed);
    let mut vars: Vec<(String, tch::Tensor)> = vs.variables().into_iter().collect();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| -> Result<()> {
        for (name, t) in vars.iter_mut() {
            // as transformers' _init_weights: N(0, initializer_range) for matrices, 0 biases, 1 norms
            if name.ends_with("norm.weight") {
                let _ = t.f_fill_(1.0)?;
            } else if name.ends_with(".bias") {
                let _ = t.f_zero_()?;
            } else {
                let _ = t.f_normal_(0.0, std)?;
            }
        }
        Ok(())
    })?;
    save_pretrained(&vs, &config, out, &SaveOptions { companions_from: Some(tokenizer), ..Default::default() })?;
    let gen =
        json!({"eos_token_id": tok.eos_token_ids, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id});
    std::fs::write(out.join("generation_config.json"), serde_json::to_string_pretty(&gen)? + "\n")?;
    Ok(config)
}
