//! Training a byte-level BPE tokenizer with a ChatML chat template from text files — the one
//! implementation behind `align tokenizer train` and the pipeline's `tokenizer` stage.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
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

/// The smallest usable vocabulary: 256 byte symbols + the 3 special tokens + one merge.
pub const MIN_VOCAB_SIZE: usize = 260;

/// What to train: target vocabulary size (bytes and specials included), the minimum pair
/// frequency for a merge, and the training files.
#[derive(Debug, Clone)]
pub struct BpeTraining {
    pub vocab_size: usize,
    pub min_frequency: u64,
    pub files: Vec<PathBuf>,
}

/// What training produced.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct TrainedTokenizer {
    /// Vocabulary size including the special tokens.
    pub vocab_size: usize,
    /// Number of texts it was trained on.
    pub texts: usize,
}

fn collect_strings(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(items) => items.iter().for_each(|i| collect_strings(i, out)),
        Value::Object(map) => map.values().for_each(|i| collect_strings(i, out)),
        _ => {}
    }
}

/// The texts of a training file: `.jsonl` / `.json` give every string value of each record,
/// anything else its non-empty lines.
pub fn training_texts(path: &Path) -> Result<Vec<String>> {
    let content = crate::hf::folder::read_text_file(path)?;
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

/// Trains the tokenizer and writes `tokenizer.json`, `tokenizer_config.json` and
/// `chat_template.jinja` to `out` (created when missing). Deterministic for the same files.
pub fn train_bpe_tokenizer(spec: &BpeTraining, out: &Path) -> Result<TrainedTokenizer> {
    if spec.vocab_size < MIN_VOCAB_SIZE {
        bail!(
            "vocab_size: a byte-level BPE needs at least {MIN_VOCAB_SIZE} entries (256 bytes + specials), found {}",
            spec.vocab_size
        );
    }
    let mut texts = Vec::new();
    for f in &spec.files {
        if !f.exists() {
            bail!("{}: training file not found", f.display());
        }
        texts.extend(training_texts(f)?);
    }
    if texts.is_empty() {
        bail!("no text found in the training files");
    }
    let specials: Vec<AddedToken> = [PAD_TOKEN, IM_START, IM_END].iter().map(|t| AddedToken::from(*t, true)).collect();
    let alphabet: HashSet<char> = ByteLevel::alphabet().into_iter().collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(spec.vocab_size)
        .min_frequency(spec.min_frequency)
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
    std::fs::create_dir_all(out).with_context(|| format!("{}: cannot create", out.display()))?;
    let tok_path = out.join("tokenizer.json");
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
    let write = |name: &str, text: &str| -> Result<()> {
        let p = out.join(name);
        std::fs::write(&p, text).with_context(|| format!("{}: cannot write", p.display()))
    };
    write("tokenizer_config.json", &(serde_json::to_string_pretty(&config)? + "\n"))?;
    write("chat_template.jinja", CHATML_TEMPLATE)?;
    Ok(TrainedTokenizer { vocab_size: tokenizer.get_vocab_size(true), texts: texts.len() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trains_a_loadable_tokenizer_with_chatml_specials_deterministically() {
        let tmp = tempfile::tempdir().unwrap();
        let txt = tmp.path().join("a.txt");
        std::fs::write(&txt, "the fever goes down\nrest and drink water\n\nthe fever is mild\n").unwrap();
        let jsonl = tmp.path().join("b.jsonl");
        std::fs::write(&jsonl, "{\"text\": \"drink water and rest\", \"n\": 3}\n").unwrap();
        let spec = BpeTraining { vocab_size: 300, min_frequency: 2, files: vec![txt, jsonl] };
        let got = train_bpe_tokenizer(&spec, &tmp.path().join("tok")).unwrap();
        assert_eq!(got.texts, 4, "three non-empty lines and one string value");
        assert!(got.vocab_size > 259 && got.vocab_size <= 300, "vocab {}", got.vocab_size);
        let tok = crate::ModelTokenizer::from_dir(&tmp.path().join("tok")).unwrap();
        assert_eq!(tok.vocab_size(), got.vocab_size);
        let again = train_bpe_tokenizer(&spec, &tmp.path().join("tok2")).unwrap();
        assert_eq!(got, again);
        let read = |d: &str| std::fs::read(tmp.path().join(d).join("tokenizer.json")).unwrap();
        assert_eq!(read("tok"), read("tok2"), "same files, same tokenizer");
    }

    #[test]
    fn a_too_small_vocabulary_or_missing_file_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = BpeTraining { vocab_size: 100, min_frequency: 2, files: vec![] };
        let e = train_bpe_tokenizer(&spec, tmp.path()).unwrap_err().to_string();
        assert!(e.contains("vocab_size") && e.contains("100"), "{e}");
        let spec = BpeTraining { vocab_size: 300, min_frequency: 2, files: vec![tmp.path().join("nope.txt")] };
        let e = train_bpe_tokenizer(&spec, tmp.path()).unwrap_err().to_string();
        assert!(e.contains("nope.txt") && e.contains("not found"), "{e}");
    }
}
