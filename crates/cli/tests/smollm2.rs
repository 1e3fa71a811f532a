//! Checks against transformers on a real model, SmolLM2-135M-Instruct: logits, greedy `--chat`
//! generations and perplexity. Runs only when `ALIGN_SMOLLM2_DIR` points to the folder made by
//! `../shared/tools/make-smollm2.sh DIR .venv/bin/python`; otherwise each test says it is skipped —
//! the only interop checks that may skip under `CI=true` (no test can make the real model).
use std::path::{Path, PathBuf};
use std::process::Command;

use align_testkit::{python_with, repo};
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

fn setup(test: &str) -> Option<(PathBuf, PathBuf)> {
    let Some(dir) = std::env::var_os("ALIGN_SMOLLM2_DIR").filter(|d| !d.is_empty()).map(PathBuf::from) else {
        eprintln!(
            "SKIPPED {test}: set ALIGN_SMOLLM2_DIR to a SmolLM2-135M-Instruct folder (../shared/tools/make-smollm2.sh)"
        );
        return None;
    };
    assert!(dir.join("config.json").is_file(), "ALIGN_SMOLLM2_DIR={} has no config.json", dir.display());
    // with the model given, a Python without transformers is a failure under CI, as elsewhere
    let python = python_with(&["transformers"])?;
    Some((dir, python))
}

fn reference(python: &Path, args: &[&str]) {
    let out = Command::new(python).arg(repo().join("tests/reference/hf_reference.py")).args(args).output().unwrap();
    assert!(out.status.success(), "hf_reference.py {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn smollm2_logits_match_transformers_f32() {
    let Some((dir, python)) = setup("smollm2_logits_match_transformers_f32") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("logits.safetensors");
    let texts = [
        "The capital of France is Paris.",
        "患者应多喝水并注意休息。",
        "Hypertension is often called the silent killer because",
    ];
    let mut args = vec!["logits", "--model", dir.to_str().unwrap(), "--out", out.to_str().unwrap()];
    for t in &texts {
        args.extend(["--text", t]);
    }
    reference(&python, &args);
    let golden: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let m = align_core::load_causal_lm(&dir, Device::Cpu, Kind::Float).unwrap();
    let tok = align_core::ModelTokenizer::from_dir(&dir).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let ids = &golden[&format!("input_ids_{i}")];
        let ours: Vec<i64> = tok.encode(text, true).unwrap();
        assert_eq!(ours, Vec::<i64>::try_from(ids.flatten(0, -1)).unwrap(), "tokenisation of {text:?}");
        let want = &golden[&format!("logits_{i}")];
        let got = tch::no_grad(|| m.lm.forward(ids, &Default::default(), None)).unwrap();
        let rel = ((&got - want).abs() / want.abs().clamp_min(1.0)).max().double_value(&[]);
        assert!(rel <= 1e-4, "{text:?}: max relative logit difference {rel}");
    }
}

#[test]
fn smollm2_greedy_chat_matches_transformers() {
    let Some((dir, python)) = setup("smollm2_greedy_chat_matches_transformers") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let prompts = [
        "What is the capital of France?",
        "Give me one tip for staying healthy.",
        "What should I do if I have a mild fever?",
        "发烧了应该怎么办？",
    ];
    let convs: Vec<Value> = prompts.iter().map(|p| json!([{"role": "user", "content": p}])).collect();
    let conv_file = tmp.path().join("convs.json");
    std::fs::write(&conv_file, serde_json::to_string(&convs).unwrap()).unwrap();
    let out = tmp.path().join("chat.json");
    reference(
        &python,
        &[
            "chat",
            "--model",
            dir.to_str().unwrap(),
            "--messages-file",
            conv_file.to_str().unwrap(),
            "--max-new-tokens",
            "40",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let want: Vec<Value> = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();

    let prompts_file = tmp.path().join("prompts.jsonl");
    let lines: Vec<String> = prompts.iter().map(|p| json!({"prompt": p}).to_string()).collect();
    std::fs::write(&prompts_file, lines.join("\n")).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--prompts", prompts_file.to_str().unwrap(), "--chat"])
        .args(["--max-new-tokens", "40", "--json", "--dtype", "f32", "--batch-size", "4"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got: Vec<Value> =
        String::from_utf8_lossy(&run.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    for (g, w) in got.iter().zip(&want) {
        // exact equality is only meaningful where transformers' top-2 logits never nearly tie
        if w["min_top2_gap"].as_f64().unwrap_or(1.0) < 1e-3 {
            eprintln!("near-tie in reference for {:?}; comparing the first tokens only", g["prompt"]);
            continue;
        }
        assert_eq!(g["text"], w["text"], "prompt {}", g["prompt"]);
        assert_eq!(
            g["tokens"].as_u64().unwrap() as usize,
            w["new_ids"].as_array().unwrap().len(),
            "prompt {}",
            g["prompt"]
        );
    }
}

#[test]
fn smollm2_perplexity_matches_transformers() {
    let Some((dir, python)) = setup("smollm2_perplexity_matches_transformers") else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = repo().join("tests/fixtures/perplexity.txt");
    let out = tmp.path().join("ppl.json");
    reference(
        &python,
        &[
            "perplexity",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ],
    );
    let want: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let run = Command::new(env!("CARGO_BIN_EXE_align"))
        .args([
            "eval",
            "perplexity",
            "--model",
            dir.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--json",
            "--dtype",
            "f32",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let got: Value = serde_json::from_str(String::from_utf8_lossy(&run.stdout).trim()).unwrap();
    assert_eq!(got["tokens"], want["tokens"]);
    let (g, w) = (got["perplexity"].as_f64().unwrap(), want["perplexity"].as_f64().unwrap());
    assert!((g - w).abs() <= 1e-4 * w, "perplexity {g} vs transformers {w}");
}

#[test]
fn smollm2_bf16_generation_runs_and_agrees_on_a_short_answer() {
    let Some((dir, _)) = setup("smollm2_bf16_generation_runs_and_agrees_on_a_short_answer") else { return };
    let run = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["generate", "--model", dir.to_str().unwrap(), "--chat", "--prompt", "What is the capital of France?"])
        .args(["--max-new-tokens", "16", "--dtype", "bf16"])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(String::from_utf8_lossy(&run.stdout).contains("Paris"));
}
