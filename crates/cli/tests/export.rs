//! `align export` end to end (merged folder loads in transformers with PEFT's logits) and the
//! `--adapter` flag of the model-loading commands, plus one-line errors for bad adapters.
use std::path::Path;
use std::process::Command;

use align_testkit::python_with;
use serde_json::Value;

mod support;
use support::fixtures;
use support::{fails, ok, s};

fn tensor_names(file: &Path) -> Vec<String> {
    tch::Tensor::read_safetensors(file).unwrap().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn export_merges_peft_adapters_into_folders_transformers_loads() {
    let tmp = tempfile::tempdir().unwrap();
    for (adapter, base) in [("llama-all", "tiny-llama"), ("qwen2-all-rslora", "tiny-qwen2")] {
        let model = fixtures().join("models").join(base);
        let adapter_dir = fixtures().join("peft").join(adapter);
        let out = tmp.path().join(adapter);
        let stdout =
            ok(&["export", "--model", s(&model), "--adapter", s(&adapter_dir), "--out", s(&out), "--device", "cpu"]);
        assert!(stdout.contains("max abs difference"), "{stdout}");
        for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
            assert!(out.join(f).is_file(), "{adapter}: {f} missing");
        }
        let names = tensor_names(&out.join("model.safetensors"));
        assert!(names.iter().all(|n| !n.contains("lora")), "{adapter}: LoRA tensors in the merged folder");
        assert_eq!(names.len(), tensor_names(&model.join("model.safetensors")).len());
        if let Some(python) = python_with(&["transformers"]) {
            let r = Command::new(python)
                .arg(fixtures().join("check_hf_load.py"))
                .args([s(&out), s(&adapter_dir.join("golden.safetensors"))])
                .output()
                .unwrap();
            let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
            assert!(r.status.success(), "{adapter}: transformers does not reproduce PEFT's logits:\n{text}");
        }
    }
    // bf16 storage
    let out = tmp.path().join("bf16");
    let model = fixtures().join("models/tiny-llama");
    let adapter = fixtures().join("peft/llama-qv");
    ok(&[
        "export",
        "--model",
        s(&model),
        "--adapter",
        s(&adapter),
        "--out",
        s(&out),
        "--dtype",
        "bf16",
        "--device",
        "cpu",
    ]);
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["torch_dtype"], "bfloat16");
    let kinds: Vec<tch::Kind> =
        tch::Tensor::read_safetensors(out.join("model.safetensors")).unwrap().iter().map(|(_, t)| t.kind()).collect();
    assert!(kinds.iter().all(|k| *k == tch::Kind::BFloat16));
}

#[test]
fn adapter_flag_equals_the_exported_model() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-llama");
    let adapter = fixtures().join("peft/llama-all");
    let merged = tmp.path().join("merged");
    ok(&["export", "--model", s(&model), "--adapter", s(&adapter), "--out", s(&merged), "--device", "cpu"]);
    let data = fixtures().join("perplexity.txt");
    let ppl = |extra: &[&str]| -> f64 {
        let mut args = vec!["eval", "perplexity", "--data", s(&data), "--json", "--device", "cpu"];
        args.extend_from_slice(extra);
        let v: Value = serde_json::from_str(ok(&args).trim()).unwrap();
        v["perplexity"].as_f64().unwrap()
    };
    let base = ppl(&["--model", s(&model)]);
    let with_adapter = ppl(&["--model", s(&model), "--adapter", s(&adapter)]);
    let exported = ppl(&["--model", s(&merged)]);
    assert!((with_adapter - base).abs() > 1.0, "the adapter should change perplexity: {base} vs {with_adapter}");
    assert!((with_adapter - exported).abs() < 1e-3 * exported, "--adapter {with_adapter} vs export {exported}");

    let gen = |extra: &[&str]| {
        let mut args = vec!["generate", "--prompt", "fever and rest", "--max-new-tokens", "12", "--device", "cpu"];
        args.extend_from_slice(extra);
        ok(&args)
    };
    assert_eq!(gen(&["--model", s(&model), "--adapter", s(&adapter)]), gen(&["--model", s(&merged)]));
}

#[test]
fn bad_adapters_and_outputs_fail_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = fixtures().join("models/tiny-llama");
    let qwen3 = fixtures().join("models/tiny-qwen3");
    let adapter = fixtures().join("peft/llama-qv");
    let out = tmp.path().join("out");
    // tiny-qwen3 has head_dim 16: q_proj has 64 outputs where the adapter's base had 32
    let e = fails(&["export", "--model", s(&qwen3), "--adapter", s(&adapter), "--out", s(&out), "--device", "cpu"]);
    assert!(e.contains("q_proj.lora_B.weight") && e.contains("different base model"), "{e}");
    assert!(!out.exists(), "nothing is written on failure");
    let e = fails(&["generate", "--model", s(&qwen3), "--adapter", s(&adapter), "--prompt", "hi", "--device", "cpu"]);
    assert!(e.contains("different base model"), "{e}");
    let nowhere = tmp.path().join("nowhere");
    let e = fails(&[
        "eval",
        "perplexity",
        "--model",
        s(&llama),
        "--adapter",
        s(&nowhere),
        "--data",
        s(&fixtures().join("perplexity.txt")),
    ]);
    assert!(e.contains("no such adapter folder"), "{e}");
    let e = fails(&["export", "--model", s(&llama), "--adapter", s(&adapter), "--out", s(&llama), "--device", "cpu"]);
    assert!(e.contains("is an input"), "{e}");
    // never delete what we did not write: a folder holding an input, or a user's file
    let parent = llama.parent().unwrap();
    let e = fails(&["export", "--model", s(&llama), "--adapter", s(&adapter), "--out", s(parent), "--device", "cpu"]);
    assert!(e.contains("holds the input") && e.lines().count() == 1, "{e}");
    let mine = tmp.path().join("mine");
    std::fs::create_dir_all(&mine).unwrap();
    std::fs::write(mine.join("notes.txt"), "my notes").unwrap();
    let e = fails(&["export", "--model", s(&llama), "--adapter", s(&adapter), "--out", s(&mine), "--device", "cpu"]);
    assert!(e.contains("'notes.txt'") && e.contains("--force"), "{e}");
    assert_eq!(std::fs::read_to_string(mine.join("notes.txt")).unwrap(), "my notes", "the user's file survives");
    // a model folder is not an adapter folder
    let e = fails(&["export", "--model", s(&llama), "--adapter", s(&llama), "--out", s(&out), "--device", "cpu"]);
    assert!(e.contains("adapter_config.json"), "{e}");
}

#[test]
fn export_merges_a_peft_reward_adapter_into_a_reward_model_transformers_loads() {
    let tmp = tempfile::tempdir().unwrap();
    let model = fixtures().join("models/tiny-llama");
    let adapter = fixtures().join("peft/llama-seqcls");
    let out = tmp.path().join("rm");
    let stdout = ok(&["export", "--model", s(&model), "--adapter", s(&adapter), "--out", s(&out), "--device", "cpu"]);
    assert!(stdout.contains("score head") && stdout.contains("probe scores"), "{stdout}");
    let cfg: Value = serde_json::from_str(&std::fs::read_to_string(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg["architectures"][0], "LlamaForSequenceClassification");
    assert_eq!((cfg["num_labels"].as_i64(), cfg["pad_token_id"].as_i64()), (Some(1), Some(0)));
    let names = tensor_names(&out.join("model.safetensors"));
    assert!(names.contains(&"score.weight".to_string()) && !names.iter().any(|n| n.contains("lora")), "{names:?}");
    assert!(!names.contains(&"lm_head.weight".to_string()));
    // transformers reproduces PEFT's scores of base + adapter from the merged folder alone
    let golden = tch::Tensor::read_safetensors(adapter.join("golden.safetensors")).unwrap();
    let get = |n: &str| golden.iter().find(|(k, _)| k == n).unwrap().1.shallow_clone();
    let ids = get("input_ids");
    let rows: Vec<Vec<i64>> = (0..ids.size()[0]).map(|i| Vec::try_from(ids.get(i)).unwrap()).collect();
    let scores: Vec<f32> = Vec::try_from(get("scores")).unwrap();
    let file = tmp.path().join("scores.json");
    std::fs::write(&file, serde_json::json!({"input_ids": rows, "scores": scores}).to_string()).unwrap();
    if let Some(python) = python_with(&["transformers"]) {
        let r = Command::new(python)
            .arg(fixtures().join("check_reward_model.py"))
            .args([s(&out), s(&file)])
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&r.stdout), String::from_utf8_lossy(&r.stderr));
        assert!(r.status.success(), "transformers does not reproduce PEFT's scores:\n{text}");
    }
    // a reward-model adapter is not an adapter of the causal LM
    let e = fails(&["generate", "--model", s(&model), "--adapter", s(&adapter), "--prompt", "hi", "--device", "cpu"]);
    assert!(e.contains("modules_to_save") && e.contains("reward"), "{e}");
}
