//! A model folder's tokenizer: `tokenizer.json` through `tokenizers`, special tokens from
//! `tokenizer_config.json` / `generation_config.json` / `config.json`, and the chat template.
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;

use crate::hf::config::token_id_list;
use crate::text::chat::{ChatMessage, ChatTemplate, TemplateTokens};

/// Tokenizer, special tokens and chat template of one model folder.
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    pub tokens: TemplateTokens,
    chat_template: Option<ChatTemplate>,
    /// Token ids that end generation (generation_config → config → tokenizer's eos token).
    pub eos_token_ids: Vec<i64>,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub dir: PathBuf,
}

/// A JSON file of a model folder, None when it is absent; errors name the file and line.
pub fn read_json(path: &Path) -> Result<Option<Value>> {
    if !path.is_file() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let v = serde_json::from_str(&text).map_err(|e| anyhow!("{}:{}: invalid JSON: {e}", path.display(), e.line()))?;
    Ok(Some(v))
}

/// A special token in tokenizer_config.json is a string or an AddedToken object with `content`.
fn token_string(v: Option<&Value>) -> Option<String> {
    match v? {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    }
}

/// The chat template of a folder: `chat_template.jinja`, else `chat_template.json`, else the
/// `chat_template` field of tokenizer_config.json (a string, or a list of named templates of
/// which `default` is used).
fn find_chat_template(dir: &Path, tok_config: Option<&Value>) -> Result<Option<(String, String)>> {
    let jinja = dir.join("chat_template.jinja");
    if jinja.is_file() {
        let s = std::fs::read_to_string(&jinja).with_context(|| format!("{}: cannot read", jinja.display()))?;
        return Ok(Some((s, jinja.display().to_string())));
    }
    let json_file = dir.join("chat_template.json");
    if let Some(v) = read_json(&json_file)? {
        if let Some(s) = v.get("chat_template").and_then(Value::as_str) {
            return Ok(Some((s.to_string(), json_file.display().to_string())));
        }
    }
    let origin = dir.join("tokenizer_config.json").display().to_string();
    match tok_config.and_then(|c| c.get("chat_template")) {
        Some(Value::String(s)) => Ok(Some((s.clone(), origin))),
        Some(Value::Array(list)) => {
            let pick = list
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template"))
                .and_then(Value::as_str);
            Ok(pick.map(|s| (s.to_string(), origin)))
        }
        Some(Value::Null) | None => Ok(None),
        Some(other) => {
            bail!("{origin}: field 'chat_template': expected a string or a list of templates, found {other}")
        }
    }
}

impl ModelTokenizer {
    /// Loads the tokenizer files of a model folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let tok_path = dir.join("tokenizer.json");
        if !tok_path.is_file() {
            bail!("{}: no tokenizer.json in the model folder (only fast tokenizers are supported)", tok_path.display());
        }
        let inner = tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| {
            anyhow!("{}: cannot load tokenizer (expected a tokenizers JSON file): {e}", tok_path.display())
        })?;
        let tok_config = read_json(&dir.join("tokenizer_config.json"))?;
        let special_map = read_json(&dir.join("special_tokens_map.json"))?;
        let token = |key: &str| {
            token_string(tok_config.as_ref().and_then(|c| c.get(key)))
                .or_else(|| token_string(special_map.as_ref().and_then(|c| c.get(key))))
        };
        let tokens = TemplateTokens {
            bos_token: token("bos_token"),
            eos_token: token("eos_token"),
            pad_token: token("pad_token"),
            unk_token: token("unk_token"),
        };
        let id_of = |t: &Option<String>| t.as_deref().and_then(|s| inner.token_to_id(s)).map(i64::from);

        let gen_config = read_json(&dir.join("generation_config.json"))?;
        let model_config = read_json(&dir.join("config.json"))?;
        let mut eos_token_ids = token_id_list(gen_config.as_ref().and_then(|g| g.get("eos_token_id")));
        if eos_token_ids.is_empty() {
            eos_token_ids = token_id_list(model_config.as_ref().and_then(|g| g.get("eos_token_id")));
        }
        if eos_token_ids.is_empty() {
            eos_token_ids.extend(id_of(&tokens.eos_token));
        }
        let pad_token_id = id_of(&tokens.pad_token)
            .or_else(|| gen_config.as_ref().and_then(|g| g.get("pad_token_id")).and_then(Value::as_i64))
            .or_else(|| model_config.as_ref().and_then(|g| g.get("pad_token_id")).and_then(Value::as_i64));
        let bos_token_id = id_of(&tokens.bos_token);

        let chat_template = match find_chat_template(dir, tok_config.as_ref())? {
            Some((source, origin)) => Some(ChatTemplate::new(&source, tokens.clone(), &origin)?),
            None => None,
        };
        Ok(ModelTokenizer {
            inner,
            tokens,
            chat_template,
            eos_token_ids,
            pad_token_id,
            bos_token_id,
            dir: dir.to_path_buf(),
        })
    }

    /// Token ids of `text`; with `add_special_tokens` the tokenizer's post-processor adds what
    /// `tokenizer(text)` adds in transformers (e.g. a BOS token).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<i64>> {
        let enc = self.inner.encode(text, add_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))?;
        Ok(enc.get_ids().iter().map(|&i| i64::from(i)).collect())
    }

    pub fn decode(&self, ids: &[i64], skip_special_tokens: bool) -> Result<String> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.inner.decode(&ids, skip_special_tokens).map_err(|e| anyhow!("tokenizer: {e}"))
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The largest id the tokenizer can produce (vocabulary and added tokens), None when empty.
    pub fn max_token_id(&self) -> Option<i64> {
        self.inner.get_vocab(true).into_values().max().map(i64::from)
    }

    pub fn token_to_id(&self, token: &str) -> Option<i64> {
        self.inner.token_to_id(token).map(i64::from)
    }

    /// The id used to fill padded positions (pad token, else the first eos id, else 0).
    pub fn padding_id(&self) -> i64 {
        self.pad_token_id.or_else(|| self.eos_token_ids.first().copied()).unwrap_or(0)
    }

    pub fn chat_template(&self) -> Result<&ChatTemplate> {
        self.chat_template
            .as_ref()
            .ok_or_else(|| anyhow!("{}: the tokenizer has no chat template (no chat_template.jinja and no 'chat_template' in tokenizer_config.json)", self.dir.display()))
    }

    /// Renders a conversation with the chat template, as `apply_chat_template(tokenize=False)`.
    pub fn apply_chat_template(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.chat_template()?.render(messages, add_generation_prompt)
    }

    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
