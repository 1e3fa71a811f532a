//! Hostile and broken inputs: each gives one clear line naming the file (and the line or field
//! where it applies), never a panic, a hang or an out-of-memory. Chat templates that do not end
//! or do not compile, tokenizers that do not fit the model or do not parse, config.json sizes no
//! model has, truncated safetensors, data files that are not UTF-8.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

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
