//! `align tokenizer train` (byte-level BPE + ChatML template) and `align init` (a random-initialised
//! Llama-family model folder from a small TOML description and a tokenizer folder).
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use tch::{Device, Kind};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

use align_core::checkpoint::{new_causal_lm, save_pretrained, SaveOptions};
use align_core::data::kind_name;
use align_core::{ModelConfig, ModelTokenizer};

/// Special tokens of tokenizers trained here: padding/document end, and ChatML turn markers.
pub const PAD_TOKEN: &str = "<|endoftext|>";
pub const IM_START: &str = "<|im_start|>";
pub const IM_END: &str = "<|im_end|>";

/// ChatML, as Qwen-style instruct models use it (no default system prompt).
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[derive(Args)]
pub struct TokenizerTrainArgs {
    /// Target vocabulary size (including the 256 byte symbols and 3 special tokens).
    #[arg(long)]
    pub vocab_size: usize,
    /// Output folder (tokenizer.json, tokenizer_config.json, chat_template.jinja).
    #[arg(long)]
    pub out: PathBuf,
    /// Pairs must occur at least this often to be merged.
    #[arg(long, default_value_t = 2)]
    pub min_frequency: u64,
    /// Training files: .txt (lines) or .jsonl/.json (every string value in each record).
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// The texts of a training file for the tokenizer.
fn training_texts(path: &Path) -> Result<Vec<String>> {
    let content = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut out = Vec::new();
    match path.extension().and_then(|e| e.to_str()) {
        Some("jsonl") => {
            for (i, line) in content.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: Value = serde_json::from_str(line)
                    .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), i + 1))?;
                collect_strings(&v, &mut out);
            }
        }
        Some("json") => {
            let v: Value = serde_json::from_str(&content)
                .map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?;
            collect_strings(&v, &mut out);
        }
        _ => out.extend(content.lines().filter(|l| !l.trim().is_empty()).map(str::to_string)),
    }
    Ok(out)
}

pub fn train_tokenizer(args: TokenizerTrainArgs) -> Result<()> {
    if args.vocab_size < 260 {
        bail!(
            "--vocab-size: a byte-level BPE needs at least 260 entries (256 bytes + specials), found {}",
            args.vocab_size
        );
    }
    let mut texts = Vec::new();
    for f in &args.files {
        crate::existing(f, "training file")?;
        texts.extend(training_texts(f)?);
    }
    if texts.is_empty() {
        bail!("no text found in the training files");
    }
    let specials: Vec<AddedToken> = [PAD_TOKEN, IM_START, IM_END].iter().map(|t| AddedToken::from(*t, true)).collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(args.vocab_size)
        .min_frequency(args.min_frequency)
        .special_tokens(specials)
        .initial_alphabet(alphabet)
        .show_progress(false)
        .build();
    let mut tokenizer =
        TokenizerBuilder::<BPE, NormalizerWrapper, PreTokenizerWrapper, PostProcessorWrapper, DecoderWrapper>::new()
            .with_model(BPE::default())
            .with_normalizer(None)
            .with_pre_tokenizer(Some(ByteLevel::default().add_prefix_space(false).into()))
            .with_post_processor(Some(ByteLevel::default().trim_offsets(false).into()))
            .with_decoder(Some(ByteLevel::default().into()))
            .build()
            .map_err(|e| anyhow!("tokenizer: {e}"))?;
    tokenizer.train(&mut trainer, texts.iter()).map_err(|e| anyhow!("tokenizer training failed: {e}"))?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("{}: cannot create", args.out.display()))?;
    let tok_path = args.out.join("tokenizer.json");
    tokenizer.save(&tok_path, false).map_err(|e| anyhow!("{}: cannot write: {e}", tok_path.display()))?;
    let mut decoder = Map::new();
    for t in [PAD_TOKEN, IM_START, IM_END] {
        let id = tokenizer.token_to_id(t).ok_or_else(|| anyhow!("special token {t} missing after training"))?;
        decoder.insert(id.to_string(), json!({"content": t, "lstrip": false, "normalized": false, "rstrip": false, "single_word": false, "special": true}));
    }
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": null,
        "eos_token": IM_END,
        "pad_token": PAD_TOKEN,
        "unk_token": null,
        "clean_up_tokenization_spaces": false,
        "model_max_length": 2048,
    });
    std::fs::write(args.out.join("tokenizer_config.json"), serde_json::to_string_pretty(&config)? + "\n")?;
    std::fs::write(args.out.join("chat_template.jinja"), CHATML_TEMPLATE)?;
    eprintln!(
        "trained a {}-token byte-level BPE on {} texts → {}",
        tokenizer.get_vocab_size(true),
        texts.len(),
        args.out.display()
    );
    Ok(())
}

#[derive(Args)]
pub struct InitArgs {
    /// Model description (TOML): model_type, hidden_size, intermediate_size, num_hidden_layers, …
    #[arg(long)]
    pub config: PathBuf,
    /// Tokenizer folder; its files are copied into the model and fix vocab_size and token ids.
    #[arg(long)]
    pub tokenizer: PathBuf,
    #[arg(long)]
    pub out: PathBuf,
    /// Seed of the random initialisation (overrides `seed` in the TOML).
    #[arg(long)]
    pub seed: Option<i64>,
}

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

pub fn init(args: InitArgs) -> Result<()> {
    crate::existing(&args.config, "model description")?;
    crate::existing(&args.tokenizer, "tokenizer folder")?;
    let text =
        std::fs::read_to_string(&args.config).with_context(|| format!("{}: cannot read", args.config.display()))?;
    let desc: toml::Table =
        toml::from_str(&text).map_err(|e| anyhow!("{}: {}", args.config.display(), e.to_string().trim()))?;
    let tok = ModelTokenizer::from_dir(&args.tokenizer)?;
    let raw = init_config(&desc, &args.config, &tok)?;
    let std = raw["initializer_range"].as_f64().unwrap_or(0.02);
    let config = ModelConfig::from_json(raw).map_err(|e| anyhow!("{}: {e}", args.config.display()))?;
    let seed = args.seed.or_else(|| desc.get("seed").and_then(|v| v.as_integer())).unwrap_or(0);

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
    save_pretrained(
        &vs,
        &config,
        &args.out,
        &SaveOptions { companions_from: Some(&args.tokenizer), ..Default::default() },
    )?;
    let gen =
        json!({"eos_token_id": tok.eos_token_ids, "pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id});
    std::fs::write(args.out.join("generation_config.json"), serde_json::to_string_pretty(&gen)? + "\n")?;
    eprintln!(
        "initialised a {} model with {} parameters (seed {seed}) → {}",
        config.model_type.as_str(),
        crate::common::human_count(config.num_parameters()),
        args.out.display()
    );
    Ok(())
}
