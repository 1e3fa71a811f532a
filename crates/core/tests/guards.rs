//! Hostile and broken inputs: each gives one clear line naming the file (and the line or field
//! where it applies), never a panic, a hang or an out-of-memory. Chat templates that do not end
//! or do not compile, tokenizers that do not fit the model or do not parse, config.json sizes no
//! model has, truncated safetensors, data files that are not UTF-8.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use align_core::data::{check_files, read_pretrain, read_sft, DataKind, DataOptions, TextMode};
use align_core::hf::config::ModelConfig;
use align_core::load::spec::{check_tokenizer_fits, AdapterMode, ModelSpec};
use align_core::model::scalar::ScoreInit;
use align_core::text::chat::{ChatMessage, ChatTemplate, TemplateTokens};
use align_core::ModelTokenizer;
use serde_json::{json, Value};
use tch::{Device, Kind};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A copy of a fixture model folder that a test may break.
fn model_copy(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

fn one_line(e: &str) {
    assert!(!e.contains('\n'), "error spans lines: {e}");
}

fn causal_lm_error(dir: &Path) -> String {
    match ModelSpec::at(dir, None, Device::Cpu, Kind::Float).causal_lm(AdapterMode::Merge) {
        Ok(_) => panic!("{} must not load", dir.display()),
        Err(e) => e.to_string(),
    }
}

// ---------------------------------------------------------------- chat templates

#[test]
fn a_template_that_does_not_end_runs_out_of_fuel_naming_its_file() {
    let (_tmp, dir) = model_copy("tiny-qwen2");
    let file = dir.join("chat_template.jinja");
    std::fs::write(&file, "{% for i in range(100000) %}{% for j in range(100000) %}{{ i }}{% endfor %}{% endfor %}")
        .unwrap();
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    let started = Instant::now();
    let e = tok.apply_chat_template(&[ChatMessage::new("user", "hi")], true).unwrap_err().to_string();
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    one_line(&e);
    assert!(e.starts_with(&format!("{}: chat template: stopped after ", file.display())), "{e}");
    assert!(e.contains("template instructions"), "{e}");
}

#[test]
fn a_template_that_does_not_compile_names_its_file() {
    let (_tmp, dir) = model_copy("tiny-qwen2");
    let file = dir.join("chat_template.jinja");
    std::fs::write(&file, "{% for m in messages %}\n{{ m.content }}\n").unwrap();
    let e = ModelTokenizer::from_dir(&dir).err().expect("must not compile").to_string();
    one_line(&e);
    assert!(e.starts_with(&format!("{}: chat template does not compile: ", file.display())), "{e}");
    assert!(e.contains("template line"), "{e}");
    // the same from tokenizer_config.json's chat_template field
    std::fs::remove_file(&file).unwrap();
    let config = dir.join("tokenizer_config.json");
    edit_json(&config, |v| v["chat_template"] = json!("{{ messages[0].content "));
    let e = ModelTokenizer::from_dir(&dir).err().expect("must not compile").to_string();
    one_line(&e);
    assert!(e.starts_with(&format!("{}: chat template does not compile: ", config.display())), "{e}");
}

#[test]
fn huge_ranges_and_huge_output_are_refused() {
    let render = |source: &str| {
        let t = ChatTemplate::new(source, TemplateTokens::default(), "x/chat_template.jinja").unwrap();
        t.render(&[ChatMessage::new("user", "hi")], false).unwrap_err().to_string()
    };
    let e = render("{% for i in range(1000000) %}.{% endfor %}");
    one_line(&e);
    assert!(e.starts_with("x/chat_template.jinja: chat template: range() of more than 100000 items"), "{e}");
    // ranges within the bound still work
    let t = ChatTemplate::new("{{ range(3)|list }}{{ range(5, 0, -2)|list }}", TemplateTokens::default(), "y").unwrap();
    assert_eq!(t.render(&[], false).unwrap(), "[0, 1, 2][5, 3, 1]");
    let started = Instant::now();
    let e = render("{% for i in range(200) %}{{ 'x' * 1000000 }}{% endfor %}");
    assert!(started.elapsed() < Duration::from_secs(20), "took {:?}", started.elapsed());
    one_line(&e);
    assert!(e.starts_with("x/chat_template.jinja: chat template: the rendered text exceeds 64 MiB"), "{e}");
}

/// The fuel is generous: the real templates of the fixtures render a 20001-message conversation.
#[test]
fn real_templates_render_long_conversations_within_the_fuel() {
    let cases: Vec<Value> =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("chat_templates.json")).unwrap()).unwrap();
    let mut messages = Vec::new();
    for i in 0..20_001 {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        messages.push(ChatMessage::new(role, &format!("message {i}: a few words of text")));
    }
    let mut seen = Vec::new();
    for case in &cases {
        let family = case["name"].as_str().unwrap().split('/').next().unwrap().to_string();
        if seen.contains(&family) {
            continue;
        }
        let tokens = TemplateTokens {
            bos_token: case["bos_token"].as_str().map(str::to_string),
            eos_token: case["eos_token"].as_str().map(str::to_string),
            ..Default::default()
        };
        let t = ChatTemplate::new(case["template"].as_str().unwrap(), tokens, &family).unwrap();
        let text = t.render(&messages, true).unwrap_or_else(|e| panic!("{family}: {e}"));
        assert!(text.contains("message 20000: a few words of text"), "{family}");
        seen.push(family);
    }
    assert!(seen.len() >= 4, "{seen:?}");
}

// ---------------------------------------------------------------- tokenizer vs model

#[test]
fn a_tokenizer_with_ids_beyond_the_vocabulary_is_refused_before_the_weights() {
    let (_tmp, dir) = model_copy("tiny-llama");
    edit_json(&dir.join("config.json"), |v| v["vocab_size"] = json!(300));
    // no weights at all: the check comes before they are read
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    let e = causal_lm_error(&dir);
    one_line(&e);
    assert!(e.starts_with(&format!("{}: the tokenizer has ", dir.display())), "{e}");
    assert!(e.contains("ids up to 319") && e.contains("vocab_size 300"), "{e}");
    assert!(e.contains(&dir.join("config.json").display().to_string()), "{e}");
    // the scalar-model loads go through the same check
    let spec = ModelSpec::at(&dir, None, Device::Cpu, Kind::Float);
    let e = spec.scalar_model_to_train(|_| ScoreInit::Zeros).err().expect("must not load").to_string();
    assert!(e.contains("ids up to 319") && e.contains("vocab_size 300"), "{e}");
}

#[test]
fn a_vocabulary_larger_than_the_tokenizer_is_fine() {
    let dir = fixtures().join("models/tiny-llama");
    let tok = ModelTokenizer::from_dir(&dir).unwrap();
    let mut config = ModelConfig::from_dir(&dir).unwrap();
    assert_eq!(tok.max_token_id(), Some(config.vocab_size - 1));
    check_tokenizer_fits(&tok, &config, &dir).unwrap();
    config.vocab_size += 64; // padding rows, as many HF models have
    check_tokenizer_fits(&tok, &config, &dir).unwrap();
    config.vocab_size -= 65;
    let e = check_tokenizer_fits(&tok, &config, &dir).unwrap_err().to_string();
    assert!(e.contains(&format!("vocab_size {}", config.vocab_size)), "{e}");
}

#[test]
fn a_broken_tokenizer_json_names_the_file() {
    let (_tmp, dir) = model_copy("tiny-llama");
    let file = dir.join("tokenizer.json");
    let text = std::fs::read_to_string(&file).unwrap();
    for broken in [&text[..text.len() / 2], "{not json", "", r#"{"model": 5}"#, "[]"] {
        std::fs::write(&file, broken).unwrap();
        let e = ModelTokenizer::from_dir(&dir).err().expect("must not load").to_string();
        one_line(&e);
        assert!(e.starts_with(&format!("{}: cannot load tokenizer", file.display())), "{e}");
    }
}

// ---------------------------------------------------------------- config.json sizes

fn base_config() -> Value {
    json!({"model_type":"llama","vocab_size":100,"hidden_size":64,"intermediate_size":128,
           "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2})
}

fn config_error(edit: impl FnOnce(&mut Value)) -> String {
    let tmp = tempfile::tempdir().unwrap();
    let mut v = base_config();
    edit(&mut v);
    std::fs::write(tmp.path().join("config.json"), v.to_string()).unwrap();
    let e = ModelConfig::from_dir(tmp.path()).err().expect("must be refused").to_string();
    one_line(&e);
    let prefix = format!("{}: ", tmp.path().join("config.json").display());
    e.strip_prefix(&prefix).unwrap_or_else(|| panic!("error does not start with the file: {e}")).to_string()
}

#[test]
fn config_sizes_beyond_any_model_are_refused() {
    let e = config_error(|v| v["hidden_size"] = json!(1_000_000));
    assert_eq!(e, "field 'hidden_size': 1000000 is beyond what any model needs (expected a positive integer ≤ 65536)");
    assert!(config_error(|v| v["num_hidden_layers"] = json!(100_000)).starts_with("field 'num_hidden_layers': 100000"));
    assert!(config_error(|v| v["vocab_size"] = json!(1u64 << 40)).starts_with("field 'vocab_size': "));
    assert!(config_error(|v| v["intermediate_size"] = json!(1 << 21)).starts_with("field 'intermediate_size': "));
    assert!(config_error(|v| v["num_attention_heads"] = json!(4096)).starts_with("field 'num_attention_heads': "));
    assert!(config_error(|v| v["head_dim"] = json!(4096)).starts_with("field 'head_dim': "));
    let e = config_error(|v| v["max_position_embeddings"] = json!(1u64 << 40));
    assert!(e.starts_with("field 'max_position_embeddings': 1099511627776 is beyond"), "{e}");
    let e = config_error(|v| v["max_position_embeddings"] = json!("long"));
    assert!(e.starts_with("field 'max_position_embeddings': expected a positive integer"), "{e}");
    // zero, negative and mismatched sizes
    assert!(config_error(|v| v["hidden_size"] = json!(0)).contains("expected a positive integer, found 0"));
    assert!(config_error(|v| v["num_key_value_heads"] = json!(-2)).contains("expected a positive integer, found -2"));
    assert!(config_error(|v| v["num_key_value_heads"] = json!(3)).contains("does not divide"));
    assert!(config_error(|v| v["hidden_size"] = json!(66)).contains("not a multiple of num_attention_heads"));
    assert!(
        config_error(|v| v["rope_theta"] = json!(0.0)).starts_with("field 'rope_theta': expected a positive number")
    );
    assert!(config_error(|v| v["rms_norm_eps"] = json!(-1e-6)).starts_with("field 'rms_norm_eps'"));
    // each size within bounds, together more than 2 trillion parameters
    let e = config_error(|v| {
        v["hidden_size"] = json!(65536);
        v["intermediate_size"] = json!(1_048_576);
        v["num_hidden_layers"] = json!(1024);
        v["num_attention_heads"] = json!(512);
        v["num_key_value_heads"] = json!(512);
    });
    assert!(e.starts_with("the sizes imply ") && e.contains("expected at most 2000 billion"), "{e}");
}

#[test]
fn the_largest_real_configs_are_within_bounds() {
    // Llama 3.1 405B and Qwen2.5 72B
    let llama = json!({"model_type":"llama","vocab_size":128256,"hidden_size":16384,"intermediate_size":53248,
        "num_hidden_layers":126,"num_attention_heads":128,"num_key_value_heads":8,"max_position_embeddings":131072,
        "rope_theta":500000.0,"rms_norm_eps":1e-5});
    let c = ModelConfig::from_json(llama).unwrap();
    assert!((400e9..420e9).contains(&(c.num_parameters() as f64)), "{}", c.num_parameters());
    let qwen = json!({"model_type":"qwen2","vocab_size":152064,"hidden_size":8192,"intermediate_size":29568,
        "num_hidden_layers":80,"num_attention_heads":64,"num_key_value_heads":8,"max_position_embeddings":32768});
    ModelConfig::from_json(qwen).unwrap();
}

#[test]
fn an_absurd_config_fails_before_allocating() {
    let (_tmp, dir) = model_copy("tiny-llama");
    edit_json(&dir.join("config.json"), |v| {
        v["hidden_size"] = json!(65536);
        v["intermediate_size"] = json!(1_048_576);
        v["num_hidden_layers"] = json!(1024);
    });
    let started = Instant::now();
    let e = causal_lm_error(&dir);
    assert!(started.elapsed() < Duration::from_secs(10), "took {:?}", started.elapsed());
    one_line(&e);
    assert!(e.starts_with(&format!("{}: the sizes imply ", dir.join("config.json").display())), "{e}");
}

// ---------------------------------------------------------------- safetensors

#[test]
fn truncated_and_lying_safetensors_give_one_line() {
    let (_tmp, dir) = model_copy("tiny-llama");
    let file = dir.join("model.safetensors");
    let good = std::fs::read(&file).unwrap();
    let header_len = u64::from_le_bytes(good[..8].try_into().unwrap());
    let data_len = good.len() as u64 - 8 - header_len;
    let expect = |bytes: &[u8], wanted: &str| {
        std::fs::write(&file, bytes).unwrap();
        let e = causal_lm_error(&dir);
        one_line(&e);
        assert!(e.starts_with(&format!("{}: not a valid safetensors file: ", file.display())), "{e}");
        assert!(e.contains(wanted), "{e}");
    };
    // the tensor data cut short
    expect(
        &good[..good.len() - 1000],
        &format!("the header describes {data_len} bytes of tensor data but the file holds {}", data_len - 1000),
    );
    // cut inside the header
    expect(&good[..100], &format!("the header claims {header_len} bytes of metadata but the file has 92"));
    // a header length larger than the file, and one far too large
    let mut lying = good.clone();
    lying[..8].copy_from_slice(&(good.len() as u64 * 2).to_le_bytes());
    expect(&lying, &format!("the header claims {} bytes of metadata", good.len() * 2));
    lying[..8].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    expect(&lying, "expected at most 100 MB");
    expect(&[], "the file has 0 bytes");
    expect(&good[..5], "the file has 5 bytes");
}

// ---------------------------------------------------------------- data files that are not UTF-8

fn write_bytes(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

const GOOD_SHAREGPT: &str = r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#;

#[test]
fn invalid_utf8_in_jsonl_names_the_line_and_can_be_skipped() {
    let tmp = tempfile::tempdir().unwrap();
    let mut bytes = format!("{GOOD_SHAREGPT}\n").into_bytes();
    bytes.extend_from_slice(b"{\"conversations\":[{\"from\":\"human\",\"value\":\"q\xff\"}]}\n");
    bytes.extend_from_slice(format!("{GOOD_SHAREGPT}\r\n\n{GOOD_SHAREGPT}").as_bytes());
    let f = write_bytes(tmp.path(), "s.jsonl", &bytes);
    let e = read_sft(&[&f], &DataOptions::default()).unwrap_err().to_string();
    assert_eq!(e, format!("{}:2: invalid UTF-8: byte 0xff at column 45 (expected UTF-8 text)", f.display()));
    let o = DataOptions { skip_invalid: true, ..Default::default() };
    let data = read_sft(&[&f], &o).unwrap();
    let r = &data.reports[0];
    assert_eq!((r.records, r.invalid, r.skipped), (3, 1, 1));
    assert_eq!(r.invalid_records[0].origin.line, 2);
    let lines: Vec<usize> = data.records.iter().map(|c| c.origin.line).collect();
    assert_eq!(lines, vec![1, 3, 5]);
    // `align data check` lists it like any other invalid record
    let reports = check_files(DataKind::Sft, &[&f], &DataOptions::default(), None, None).unwrap();
    assert_eq!((reports[0].records, reports[0].invalid), (3, 1));
    assert!(reports[0].invalid_records[0].message.starts_with("invalid UTF-8"));
}

#[test]
fn invalid_utf8_in_text_and_json_files_names_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let txt = write_bytes(tmp.path(), "t.txt", b"first line\nsecond \xc3\x28 line\nthird line\n");
    let e = read_pretrain(&[&txt], &DataOptions::default()).unwrap_err().to_string();
    assert_eq!(e, format!("{}:2: invalid UTF-8: byte 0xc3 at column 8 (expected UTF-8 text)", txt.display()));
    let skip = DataOptions { skip_invalid: true, ..Default::default() };
    let data = read_pretrain(&[&txt], &skip).unwrap();
    let texts: Vec<&str> = data.records.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, vec!["first line", "third line"]);
    assert_eq!((data.reports[0].invalid, data.reports[0].skipped), (1, 1));
    // one document per file: the document is the invalid record, at the line of the bad byte
    let whole = DataOptions { text_mode: TextMode::File, ..Default::default() };
    let e = read_pretrain(&[&txt], &whole).unwrap_err().to_string();
    assert!(e.starts_with(&format!("{}:2: invalid UTF-8: byte 0xc3", txt.display())), "{e}");
    let good = write_bytes(tmp.path(), "u.txt", "ok ü\n".as_bytes());
    let data = read_pretrain(&[&txt, &good], &DataOptions { skip_invalid: true, ..whole }).unwrap();
    assert_eq!((data.records.len(), data.reports[0].skipped), (1, 1));
    // a .json array that is not UTF-8 cannot be parsed at all: always an error
    let json = write_bytes(tmp.path(), "a.json", b"[\n {\"text\": \"a\"},\n {\"text\": \"\xfe\"}\n]\n");
    let e = read_pretrain(&[&json], &skip).unwrap_err().to_string();
    assert_eq!(e, format!("{}:3: invalid UTF-8: byte 0xfe at column 12 (expected UTF-8 text)", json.display()));
}
