//! GGUF export: an HF causal-LM folder (llama, mistral, qwen2, qwen3) written as one GGUF file that
//! llama.cpp and Ollama load — tensors named, permuted and typed as llama.cpp's
//! `convert_hf_to_gguf.py` writes them, the hyper-parameters, the byte-level BPE vocabulary
//! (tokens, token types, merges, special ids) and the chat template in the metadata.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use tch::Tensor;

use crate::hf::checkpoint::{for_each_tensor, ignorable, tensor_headers, weight_files};
use crate::hf::config::{ModelConfig, ModelType, RopeScaling};
use crate::hf::gguf::{
    encode_tensor, write_gguf_file, GgmlType, GgufTensorInfo, GgufValue, GGML_QUANT_VERSION, GGUF_ALIGNMENT,
};
use crate::load::spec::tokenizer_for;
use crate::text::tokenizer::read_json;

/// The stored type of the 2-D weights (1-D tensors — norms, biases — are always F32, as llama.cpp's
/// converter keeps them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgufDtype {
    F32,
    F16,
    BF16,
    Q8_0,
}

impl GgufDtype {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => GgufDtype::F32,
            "f16" | "fp16" | "float16" => GgufDtype::F16,
            "bf16" | "bfloat16" => GgufDtype::BF16,
            "q8_0" => GgufDtype::Q8_0,
            _ => bail!("expected f32, f16, bf16 or q8_0 for a GGUF file, found '{s}'"),
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            GgufDtype::F32 => "f32",
            GgufDtype::F16 => "f16",
            GgufDtype::BF16 => "bf16",
            GgufDtype::Q8_0 => "q8_0",
        }
    }

    /// `general.file_type` (llama.cpp's `LlamaFileType`).
    fn file_type(self) -> u32 {
        match self {
            GgufDtype::F32 => 0,
            GgufDtype::F16 => 1,
            GgufDtype::Q8_0 => 7,
            GgufDtype::BF16 => 32,
        }
    }

    fn ggml_type(self) -> GgmlType {
        match self {
            GgufDtype::F32 => GgmlType::F32,
            GgufDtype::F16 => GgmlType::F16,
            GgufDtype::BF16 => GgmlType::BF16,
            GgufDtype::Q8_0 => GgmlType::Q8_0,
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct GgufExport {
    /// `general.architecture`: llama (also for mistral, as llama.cpp's converter writes it), qwen2, qwen3.
    pub arch: &'static str,
    pub tensors: usize,
    pub bytes: u64,
    /// 2-D tensors stored as F16 because their rows are not a whole number of Q8_0 blocks.
    pub f16_fallback: Vec<String>,
    pub tokens: usize,
    pub merges: usize,
    /// `tokenizer.ggml.pre`: the llama.cpp pre-tokenizer of the vocabulary.
    pub pre: &'static str,
    pub chat_template: bool,
}

/// llama.cpp's architecture for an HF model type.
fn gguf_arch(t: ModelType) -> &'static str {
    match t {
        ModelType::Llama | ModelType::Mistral => "llama",
        ModelType::Qwen2 => "qwen2",
        ModelType::Qwen3 => "qwen3",
    }
}

/// Every tensor the checkpoint of `c` must hold: HF name → (shape, GGUF name).
fn expected_tensors(c: &ModelConfig) -> BTreeMap<String, (Vec<i64>, String)> {
    let (h, v, inter, hd) = (c.hidden_size, c.vocab_size, c.intermediate_size, c.head_dim);
    let (q, kv) = (c.num_attention_heads * hd, c.num_key_value_heads * hd);
    let mut m = BTreeMap::new();
    let mut add = |hf: String, shape: Vec<i64>, gguf: String| {
        m.insert(hf, (shape, gguf));
    };
    add("model.embed_tokens.weight".into(), vec![v, h], "token_embd.weight".into());
    add("model.norm.weight".into(), vec![h], "output_norm.weight".into());
    if !c.tie_word_embeddings {
        add("lm_head.weight".into(), vec![v, h], "output.weight".into());
    }
    for i in 0..c.num_hidden_layers {
        let hf = |s: &str| format!("model.layers.{i}.{s}");
        let gg = |s: &str| format!("blk.{i}.{s}");
        add(hf("input_layernorm.weight"), vec![h], gg("attn_norm.weight"));
        add(hf("post_attention_layernorm.weight"), vec![h], gg("ffn_norm.weight"));
        for (proj, out, name) in [("q_proj", q, "attn_q"), ("k_proj", kv, "attn_k"), ("v_proj", kv, "attn_v")] {
            add(hf(&format!("self_attn.{proj}.weight")), vec![out, h], gg(&format!("{name}.weight")));
            if c.qkv_bias {
                add(hf(&format!("self_attn.{proj}.bias")), vec![out], gg(&format!("{name}.bias")));
            }
        }
        add(hf("self_attn.o_proj.weight"), vec![h, q], gg("attn_output.weight"));
        if c.o_bias {
            add(hf("self_attn.o_proj.bias"), vec![h], gg("attn_output.bias"));
        }
        if c.qk_norm {
            add(hf("self_attn.q_norm.weight"), vec![hd], gg("attn_q_norm.weight"));
            add(hf("self_attn.k_norm.weight"), vec![hd], gg("attn_k_norm.weight"));
        }
        for (proj, shape, name) in [
            ("gate_proj", vec![inter, h], "ffn_gate"),
            ("up_proj", vec![inter, h], "ffn_up"),
            ("down_proj", vec![h, inter], "ffn_down"),
        ] {
            let bias = vec![shape[0]];
            add(hf(&format!("mlp.{proj}.weight")), shape, gg(&format!("{name}.weight")));
            if c.mlp_bias {
                add(hf(&format!("mlp.{proj}.bias")), bias, gg(&format!("{name}.bias")));
            }
        }
    }
    m
}

/// llama.cpp's `llama` architecture rotates interleaved pairs (2i, 2i+1) where HF's Llama rotates
/// halves (i, i + d/2): the converter reorders the rows of q_proj / k_proj (weights and biases)
/// within each head, `reshape(heads, 2, d/2, …).swapaxes(1, 2)`. qwen2 / qwen3 keep HF's order.
fn permute_rotary_rows(t: &Tensor, heads: i64) -> Result<Tensor> {
    let shape = t.size();
    let mut split = vec![heads, 2, shape[0] / heads / 2];
    split.extend_from_slice(&shape[1..]);
    Ok(t.f_reshape(&split)?.f_swapaxes(1, 2)?.f_reshape(&shape)?)
}

/// The per-frequency divisors of Llama 3.1's RoPE scaling (`rope_freqs.weight`, as llama.cpp's
/// converter generates it), from the `rope_scaling` of config.json.
fn llama3_rope_factors(c: &ModelConfig, factor: f64, low: f64, high: f64, original: f64) -> Vec<f32> {
    let dim = c.head_dim as f64;
    let (low_wavelen, high_wavelen) = (original / low, original / high);
    (0..c.head_dim / 2)
        .map(|i| {
            let freq = 1.0 / c.rope_theta.powf(2.0 * i as f64 / dim);
            let wavelen = 2.0 * std::f64::consts::PI / freq;
            let f = if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor
            } else {
                let smooth = (original / wavelen - low) / (high - low);
                1.0 / ((1.0 - smooth) / factor + smooth)
            };
            f as f32
        })
        .collect()
}

/// The hyper-parameters of the model as llama.cpp reads them (`{arch}.…`).
fn model_metadata(c: &ModelConfig, arch: &str, dtype: GgufDtype, name: &str) -> Result<Vec<(String, GgufValue)>> {
    let u32_of = |v: i64, field: &str| -> Result<GgufValue> {
        Ok(GgufValue::U32(u32::try_from(v).map_err(|_| anyhow!("field '{field}': {v} does not fit GGUF's u32"))?))
    };
    let k = |s: &str| format!("{arch}.{s}");
    let mut m = vec![
        ("general.architecture".to_string(), GgufValue::String(arch.into())),
        ("general.type".to_string(), GgufValue::String("model".into())),
        ("general.name".to_string(), GgufValue::String(name.into())),
        ("general.alignment".to_string(), GgufValue::U32(GGUF_ALIGNMENT as u32)),
        (k("block_count"), u32_of(c.num_hidden_layers, "num_hidden_layers")?),
        (k("context_length"), u32_of(c.max_position_embeddings, "max_position_embeddings")?),
        (k("embedding_length"), u32_of(c.hidden_size, "hidden_size")?),
        (k("feed_forward_length"), u32_of(c.intermediate_size, "intermediate_size")?),
        (k("attention.head_count"), u32_of(c.num_attention_heads, "num_attention_heads")?),
        (k("attention.head_count_kv"), u32_of(c.num_key_value_heads, "num_key_value_heads")?),
        (k("rope.freq_base"), GgufValue::F32(c.rope_theta as f32)),
        (k("attention.layer_norm_rms_epsilon"), GgufValue::F32(c.rms_norm_eps as f32)),
    ];
    match c.rope_scaling {
        RopeScaling::Default => {}
        RopeScaling::Linear { factor } => {
            m.push((k("rope.scaling.type"), GgufValue::String("linear".into())));
            m.push((k("rope.scaling.factor"), GgufValue::F32(factor as f32)));
        }
        // rope_freqs.weight carries it (llama only: checked by the caller)
        RopeScaling::Llama3 { .. } => {}
    }
    // the converter writes them whenever config.json names head_dim; they are needed where it
    // differs from hidden_size / num_attention_heads
    let head_dim_given = c.raw.get("head_dim").is_some_and(|v| !v.is_null());
    if head_dim_given || c.head_dim * c.num_attention_heads != c.hidden_size {
        m.push((k("attention.key_length"), u32_of(c.head_dim, "head_dim")?));
        m.push((k("attention.value_length"), u32_of(c.head_dim, "head_dim")?));
    }
    m.push(("general.file_type".to_string(), GgufValue::U32(dtype.file_type())));
    if arch == "llama" {
        m.push((k("vocab_size"), u32_of(c.vocab_size, "vocab_size")?));
        m.push((k("rope.dimension_count"), u32_of(c.head_dim, "head_dim")?));
    }
    m.push(("general.quantization_version".to_string(), GgufValue::U32(GGML_QUANT_VERSION)));
    Ok(m)
}

/// The `Split` regexes of Llama 3's and Qwen2's tokenizer.json (GPT-2's is `ByteLevel`'s own, `use_regex`).
const LLAMA3_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
const QWEN2_SPLIT: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The llama.cpp pre-tokenizer (`tokenizer.ggml.pre`) that splits text as `pre_tokenizer` of
/// tokenizer.json does: Qwen2's split (`qwen2`), Llama 3's (`llama-bpe`), or GPT-2's — `smollm`
/// (GPT-2's split with digits one by one, no space clean-up on decoding) when the vocabulary has
/// no multi-digit token or the tokenizer splits digits anyway and does not clean up spaces, else
/// `gpt-2`.
fn pre_tokenizer_name(
    tok: &Value,
    vocab: &serde_json::Map<String, Value>,
    clean_up: bool,
    file: &Path,
) -> Result<&'static str> {
    let pre = tok.get("pre_tokenizer").filter(|v| !v.is_null());
    let steps: Vec<&Value> = match pre {
        Some(p) if p.get("type").and_then(Value::as_str) == Some("Sequence") => {
            p.get("pretokenizers").and_then(Value::as_array).map(|a| a.iter().collect()).unwrap_or_default()
        }
        Some(p) => vec![p],
        None => vec![],
    };
    let kind = |v: &Value| v.get("type").and_then(Value::as_str).unwrap_or("?").to_string();
    let kinds: Vec<String> = steps.iter().map(|v| kind(v)).collect();
    let refuse = |why: &str| -> Result<&'static str> {
        bail!(
            "{}: field 'pre_tokenizer': {} — {why}; a GGUF export supports byte-level BPE with GPT-2's, Llama 3's or Qwen2's split",
            file.display(),
            if kinds.is_empty() { "none".to_string() } else { kinds.join(" + ") }
        )
    };
    let byte_level = match steps.last() {
        Some(b) if kind(b) == "ByteLevel" => *b,
        _ => return refuse("not byte-level"),
    };
    if byte_level.get("add_prefix_space").and_then(Value::as_bool) == Some(true) {
        return refuse("ByteLevel with add_prefix_space, which llama.cpp's BPE does not do");
    }
    let use_regex = byte_level.get("use_regex").and_then(Value::as_bool).unwrap_or(true);
    let before = &steps[..steps.len() - 1];
    match (before, use_regex) {
        ([split], false) if kind(split) == "Split" => {
            let pattern = split.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str).unwrap_or("");
            match pattern {
                QWEN2_SPLIT => Ok("qwen2"),
                LLAMA3_SPLIT => Ok("llama-bpe"),
                _ => refuse("a Split whose regex is neither Llama 3's nor Qwen2's"),
            }
        }
        ([], true) => {
            let multi_digit =
                vocab.keys().any(|t| t.as_bytes().windows(2).any(|w| w[0].is_ascii_digit() && w[1].is_ascii_digit()));
            Ok(if !multi_digit && !clean_up { "smollm" } else { "gpt-2" })
        }
        ([digits], true)
            if kind(digits) == "Digits" && digits.get("individual_digits").and_then(Value::as_bool) == Some(true) =>
        {
            Ok("smollm")
        }
        _ => refuse("a combination llama.cpp has no pre-tokenizer for"),
    }
}

/// Added tokens llama.cpp's converter treats as control tokens though not marked special.
fn looks_special(t: &str) -> bool {
    matches!(t, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (t.starts_with("<|") && t.ends_with("|>"))
        || (t.starts_with("<\u{ff5c}") && t.ends_with("\u{ff5c}>"))
        || (t.starts_with("<unused") && t.ends_with('>'))
}

/// llama.cpp's token types.
const TOKEN_NORMAL: i32 = 1;
const TOKEN_CONTROL: i32 = 3;
const TOKEN_USER_DEFINED: i32 = 4;
const TOKEN_UNUSED: i32 = 5;

struct Vocab {
    metadata: Vec<(String, GgufValue)>,
    tokens: usize,
    merges: usize,
    pre: &'static str,
    chat_template: bool,
}

/// `tokenizer.*` metadata of a byte-level BPE tokenizer (`tokenizer.ggml.model = gpt2`).
fn vocab_metadata(dir: &Path, config: &ModelConfig, arch: &str) -> Result<Vocab> {
    let tok_file = dir.join("tokenizer.json");
    if !tok_file.is_file() {
        if dir.join("tokenizer.model").is_file() {
            bail!("{}: only a SentencePiece tokenizer.model, which a GGUF export does not convert (byte-level BPE tokenizer.json only)", dir.display());
        }
        bail!("{}: no tokenizer.json in the model folder (a GGUF file carries the tokenizer)", tok_file.display());
    }
    let tokenizer = tokenizer_for(dir, config, dir)?;
    let tok = read_json(&tok_file)?.ok_or_else(|| anyhow!("{}: cannot read", tok_file.display()))?;
    let tok_config = read_json(&dir.join("tokenizer_config.json"))?.unwrap_or(Value::Null);
    let model = tok.get("model").ok_or_else(|| anyhow!("{}: field 'model': missing", tok_file.display()))?;
    let model_type = model.get("type").and_then(Value::as_str).unwrap_or("?");
    if model_type != "BPE" {
        let sp = if dir.join("tokenizer.model").is_file() {
            " (SentencePiece tokenizer.model is not supported)"
        } else {
            ""
        };
        bail!(
            "{}: field 'model.type': a {model_type} tokenizer; a GGUF export supports byte-level BPE only{sp}",
            tok_file.display()
        );
    }
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        bail!("{}: field 'model.byte_fallback': a SentencePiece-style BPE (byte fallback); a GGUF export supports byte-level BPE only", tok_file.display());
    }
    let vocab = model
        .get("vocab")
        .and_then(Value::as_object)
        .ok_or_else(|| anyhow!("{}: field 'model.vocab': expected an object of token → id", tok_file.display()))?;
    let clean_up = tok_config.get("clean_up_tokenization_spaces").and_then(Value::as_bool) == Some(true);
    let pre = pre_tokenizer_name(&tok, vocab, clean_up, &tok_file)?;

    let n = usize::try_from(config.vocab_size).unwrap_or(0);
    let mut tokens: Vec<Option<(String, i32)>> = vec![None; n];
    let slot = |id: Option<u64>, what: &str| -> Result<usize> {
        id.and_then(|i| usize::try_from(i).ok()).filter(|&i| i < n).ok_or_else(|| {
            anyhow!("{}: {what}: id {id:?} is not below vocab_size {n} of config.json", tok_file.display())
        })
    };
    for (t, id) in vocab {
        tokens[slot(id.as_u64(), &format!("token {t:?}"))?] = Some((t.clone(), TOKEN_NORMAL));
    }
    for (k, a) in tok.get("added_tokens").and_then(Value::as_array).into_iter().flatten().enumerate() {
        let content = a
            .get("content")
            .and_then(Value::as_str)
            .ok_or_else(|| anyhow!("{}: field 'added_tokens[{k}].content': expected a string", tok_file.display()))?;
        let special = a.get("special").and_then(Value::as_bool).unwrap_or(false);
        let entry = if special || looks_special(content) {
            (content.to_string(), TOKEN_CONTROL)
        } else {
            // user-defined tokens are stored pre-normalised (SentencePiece's ▁ as a space)
            (content.replace('\u{2581}', " "), TOKEN_USER_DEFINED)
        };
        tokens[slot(a.get("id").and_then(Value::as_u64), &format!("added token {content:?}"))?] = Some(entry);
    }
    let (names, types): (Vec<String>, Vec<i32>) =
        tokens.into_iter().enumerate().map(|(i, t)| t.unwrap_or_else(|| (format!("[PAD{i}]"), TOKEN_UNUSED))).unzip();

    // merges: "a b" strings, or [a, b] pairs (a space inside a part written as U+0120, as gguf-py does)
    let merges: Vec<String> = match model.get("merges").and_then(Value::as_array) {
        None => Vec::new(),
        Some(list) => list
            .iter()
            .enumerate()
            .map(|(k, m)| match m {
                Value::String(s) => Ok(s.clone()),
                Value::Array(pair) if pair.len() == 2 && pair.iter().all(Value::is_string) => Ok(pair
                    .iter()
                    .filter_map(Value::as_str)
                    .map(|p| p.replace(' ', "\u{120}"))
                    .collect::<Vec<_>>()
                    .join(" ")),
                other => bail!(
                    "{}: field 'model.merges[{k}]': expected \"a b\" or [a, b], found {other}",
                    tok_file.display()
                ),
            })
            .collect::<Result<_>>()?,
    };
    if merges.is_empty() {
        bail!(
            "{}: field 'model.merges': empty; a BPE vocabulary without merges cannot tokenize in llama.cpp",
            tok_file.display()
        );
    }

    let mut m = vec![
        ("tokenizer.ggml.model".to_string(), GgufValue::String("gpt2".into())),
        ("tokenizer.ggml.pre".to_string(), GgufValue::String(pre.into())),
        ("tokenizer.ggml.tokens".to_string(), GgufValue::Strings(names)),
        ("tokenizer.ggml.token_type".to_string(), GgufValue::I32s(types)),
        ("tokenizer.ggml.merges".to_string(), GgufValue::Strings(merges.clone())),
    ];
    // special ids: tokenizer_config.json's tokens, else config.json's `*_token_id`
    let t = &tokenizer.tokens;
    let specials = [
        ("bos", &t.bos_token, "tokenizer.ggml.bos_token_id"),
        ("eos", &t.eos_token, "tokenizer.ggml.eos_token_id"),
        ("unk", &t.unk_token, "tokenizer.ggml.unknown_token_id"),
        ("pad", &t.pad_token, "tokenizer.ggml.padding_token_id"),
    ];
    for (typ, token, key) in specials {
        let from_config = || match config.raw.get(format!("{typ}_token_id")) {
            Some(Value::Array(ids)) => ids.first().and_then(Value::as_i64),
            Some(v) => v.as_i64(),
            None => None,
        };
        let id = token.as_deref().and_then(|s| tokenizer.token_to_id(s)).or_else(from_config);
        if let Some(id) = id.filter(|&i| i >= 0 && i < config.vocab_size) {
            m.push((key.to_string(), GgufValue::U32(id as u32)));
        }
    }
    // whether encoding adds BOS / EOS: tokenizer_config.json's add_*_token, else the post-processor
    let template_edge = |first: bool| -> Option<String> {
        let single = tok.get("post_processor")?.get("single")?.as_array()?;
        let edge = if first { single.first()? } else { single.last()? };
        edge.get("SpecialToken")?.get("id")?.as_str().map(str::to_string)
    };
    let adds = |typ: &str, token: &Option<String>, first: bool| {
        tok_config
            .get(format!("add_{typ}_token"))
            .and_then(Value::as_bool)
            .unwrap_or_else(|| token.is_some() && template_edge(first) == *token)
    };
    m.push(("tokenizer.ggml.add_bos_token".to_string(), GgufValue::Bool(adds("bos", &t.bos_token, true))));
    m.push(("tokenizer.ggml.add_eos_token".to_string(), GgufValue::Bool(adds("eos", &t.eos_token, false))));
    if arch == "llama" {
        if let Some(b) = tok_config.get("add_prefix_space").and_then(Value::as_bool) {
            m.push(("tokenizer.ggml.add_space_prefix".to_string(), GgufValue::Bool(b)));
        }
    }
    let template = tokenizer.chat_template().ok().map(|c| c.source().to_string());
    let chat_template = template.is_some();
    if let Some(s) = template {
        m.push(("tokenizer.chat_template".to_string(), GgufValue::String(s)));
    }
    Ok(Vocab { metadata: m, tokens: n, merges: merges.len(), pre, chat_template })
}

/// One tensor of the plan: where it comes from and how it is stored.
struct Planned {
    gguf: String,
    ty: GgmlType,
    /// Rows to reorder for llama.cpp's rotary layout: the number of heads.
    permute: Option<i64>,
}

/// Writes the causal LM of `model_dir` as the GGUF file `out` (through a temporary sibling), its
/// 2-D weights stored as `dtype`. `name` is `general.name`.
pub fn export_gguf(model_dir: &Path, out: &Path, dtype: GgufDtype, name: &str) -> Result<GgufExport> {
    let config = ModelConfig::from_dir(model_dir)?;
    let arch = gguf_arch(config.model_type);
    let config_file = model_dir.join("config.json");
    let rope_freqs = match config.rope_scaling {
        RopeScaling::Llama3 { factor, low_freq_factor, high_freq_factor, original_max_position_embeddings } => {
            if arch != "llama" {
                bail!("{}: Llama 3 RoPE scaling on a {} model has no GGUF form llama.cpp reads (only the llama architecture carries rope_freqs)", config_file.display(), config.model_type.as_str());
            }
            Some(llama3_rope_factors(
                &config,
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            ))
        }
        _ => None,
    };
    let expected = expected_tensors(&config);
    let files = weight_files(model_dir)?;
    let headers = tensor_headers(&files)?;

    let mut plan: HashMap<String, Planned> = HashMap::new();
    let mut infos = Vec::new();
    let mut f16_fallback = Vec::new();
    if let Some(f) = &rope_freqs {
        infos.push(GgufTensorInfo { name: "rope_freqs.weight".into(), shape: vec![f.len()], ty: GgmlType::F32 });
    }
    for h in &headers {
        if ignorable(&h.name, config.tie_word_embeddings) {
            continue;
        }
        let file = h.file.display();
        let (shape, gguf) = expected.get(&h.name).ok_or_else(|| {
            anyhow!("{file}: tensor '{}' is not part of a {} causal LM as config.json describes it (a GGUF export writes the plain model; merge adapters first)", h.name, config.model_type.as_str())
        })?;
        if *shape != h.shape {
            bail!("{file}: tensor '{}' has shape {:?} but config.json implies {shape:?}", h.name, h.shape);
        }
        let mut ty = if h.shape.len() <= 1 { GgmlType::F32 } else { dtype.ggml_type() };
        let row = *h.shape.last().unwrap_or(&1) as usize;
        if !ty.fits_row(row) {
            f16_fallback.push(gguf.clone());
            ty = GgmlType::F16;
        }
        let permute = match (arch, h.name.rsplit('.').nth(1)) {
            ("llama", Some("q_proj")) => Some(config.num_attention_heads),
            ("llama", Some("k_proj")) => Some(config.num_key_value_heads),
            _ => None,
        };
        infos.push(GgufTensorInfo { name: gguf.clone(), shape: h.shape.iter().map(|&d| d as usize).collect(), ty });
        plan.insert(h.name.clone(), Planned { gguf: gguf.clone(), ty, permute });
    }
    let mut missing: Vec<&String> = expected.keys().filter(|k| !plan.contains_key(*k)).collect();
    if !missing.is_empty() {
        missing.sort();
        bail!(
            "{}: the checkpoint lacks {} tensor(s) config.json requires: {}",
            model_dir.display(),
            missing.len(),
            missing.iter().take(6).map(|s| format!("'{s}'")).collect::<Vec<_>>().join(", ")
        );
    }

    let vocab = vocab_metadata(model_dir, &config, arch)?;
    let mut metadata = model_metadata(&config, arch, dtype, name)?;
    metadata.extend(vocab.metadata);
    let count = infos.len();
    let bytes = tch::no_grad(|| {
        write_gguf_file(out, &metadata, infos, |w| {
            if let Some(f) = &rope_freqs {
                w.write_tensor("rope_freqs.weight", &encode_tensor(&Tensor::f_from_slice(f)?, GgmlType::F32)?)?;
            }
            for_each_tensor(&files, |file, hf_name, t| {
                let Some(p) = plan.get(hf_name) else { return Ok(()) };
                let t = match p.permute {
                    Some(heads) => permute_rotary_rows(&t.f_to_kind(tch::Kind::Float)?, heads)?,
                    None => t,
                };
                let data =
                    encode_tensor(&t, p.ty).with_context(|| format!("{}: tensor '{hf_name}'", file.display()))?;
                w.write_tensor(&p.gguf, &data)
            })
        })
    })?;
    Ok(GgufExport {
        arch,
        tensors: count,
        bytes,
        f16_fallback,
        tokens: vocab.tokens,
        merges: vocab.merges,
        pre: vocab.pre,
        chat_template: vocab.chat_template,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotary_permutation_interleaves_the_halves_of_each_head() {
        // 2 heads of dim 4, one input column: rows [0 1 2 3 | 4 5 6 7] → [0 2 1 3 | 4 6 5 7]
        let w = Tensor::arange(8, (tch::Kind::Float, tch::Device::Cpu)).view([8, 1]);
        let p = permute_rotary_rows(&w, 2).unwrap();
        let got: Vec<f32> = Vec::try_from(p.view([8])).unwrap();
        assert_eq!(got, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn dtype_names() {
        assert_eq!(GgufDtype::parse("Q8_0").unwrap(), GgufDtype::Q8_0);
        assert_eq!(GgufDtype::parse("bfloat16").unwrap(), GgufDtype::BF16);
        let e = GgufDtype::parse("q4_k").unwrap_err().to_string();
        assert!(e.contains("q8_0") && e.contains("q4_k"), "{e}");
    }
}
