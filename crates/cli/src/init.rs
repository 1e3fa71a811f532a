//! `align tokenizer train` (byte-level BPE + ChatML template) and `align init` (a random-initialised
//! Llama-family model folder from a small TOML description and a tokenizer folder).
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use clap::Args;
use serde_json::{json, Map, Value};
use tokenizers::models::bpe::{BpeTrainerBuilder, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper, TokenizerBuilder,
};

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

pub fn init(args: InitArgs) -> Result<()> {
    crate::existing(&args.config, "model description")?;
    crate::existing(&args.tokenizer, "tokenizer folder")?;
    let config = align_core::model::init::init_model(&args.config, &args.tokenizer, &args.out, args.seed)?;
    eprintln!(
        "initialised a {} model with {} parameters → {}",
        config.model_type.as_str(),
        crate::common::human_count(config.num_parameters()),
        args.out.display()
    );
    Ok(())
}
