//! The parameter-efficient methods as a user runs them: an SFT run under DoRA + LoRA+, PiSSA with
//! per-module ranks, prompt tuning (text initialisation), P-tuning (LSTM encoder) and prefix
//! tuning (projection MLP) and (IA)³ each
//! trains (that they learn: the core tests), stops and resumes to bitwise the adapter and losses of a straight run, and its adapter
//! folder is taken by `align generate --adapter` (the mergeable ones by `align export`); DPO trains a prompt-tuning policy against its
//! base; mistakes are one clear line.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn align() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.env("ALIGN_LOG", "warn");
    c
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "align failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn fails(out: Output) -> String {
    assert!(!out.status.success(), "align should have failed");
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

fn model() -> PathBuf {
    repo().join("tests/fixtures/models/tiny-qwen2")
}

fn sft_config(dir: &Path, name: &str, method: &str, section: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = {method:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-2\nmax_length = 128\nsave_every = 1\nsave_total_limit = 2\n{section}\n",
            model(),
            repo().join("data/sft/medical_sharegpt.jsonl"),
            out
        ),
    )
    .unwrap();
    (cfg, out)
}

const METHODS: &[(&str, &str, &str)] = &[
    ("dora", "lora", "[lora]\nr = 4\nalpha = 8\nuse_dora = true\nloraplus_lr_ratio = 16\ntargets = \"all-linear\"\n"),
    ("pissa", "lora", "[lora]\nr = 4\nalpha = 8\ninit_lora_weights = \"pissa\"\nrank_pattern = { v_proj = 2 }\n"),
    (
        "prompt",
        "prompt_tuning",
        "[prompt_tuning]\nnum_virtual_tokens = 4\nprompt_tuning_init = \"text\"\nprompt_tuning_init_text = \"You are a doctor.\"\n",
    ),
    ("prefix", "prefix_tuning", "[prefix_tuning]\nnum_virtual_tokens = 3\nprefix_projection = true\nencoder_hidden_size = 16\n"),
    (
        "ptuning",
        "p_tuning",
        "[p_tuning]\nnum_virtual_tokens = 3\nencoder_reparameterization_type = \"lstm\"\nencoder_hidden_size = 8\nencoder_num_layers = 1\n",
    ),
    ("ia3", "ia3", "[ia3]\ntarget_modules = [\"k_proj\", \"v_proj\", \"down_proj\"]\n"),
];

#[test]
fn every_method_trains_resumes_bitwise_and_generates_with_its_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, method, section) in METHODS {
        let (cfg, straight) = sft_config(tmp.path(), &format!("{name}-straight"), method, section);
        ok(align().args(["train", "sft", "--config", cfg.to_str().unwrap()]).output().unwrap());
        let (cfg2, resumed) = sft_config(tmp.path(), &format!("{name}-resumed"), method, section);
        ok(align().args(["train", "sft", "--config", cfg2.to_str().unwrap(), "--stop-after", "3"]).output().unwrap());
        assert!(!resumed.join("final").exists(), "{name}: stopped after 3 of 6 steps");
        ok(align().args(["train", "sft", "--config", cfg2.to_str().unwrap()]).output().unwrap());
        let weights = |d: &Path| std::fs::read(d.join("final/adapter_model.safetensors")).unwrap();
        assert!(weights(&straight) == weights(&resumed), "{name}: resumed adapter differs from the straight run's");
        let l = losses(&straight);
        assert_eq!(l.len(), 6, "{name}");
        assert_eq!(l, losses(&resumed), "{name}: losses");
        assert!(l.iter().all(|(_, x)| x.is_finite()), "{name}: {l:?}");
        let config: Value =
            serde_json::from_str(&std::fs::read_to_string(straight.join("final/adapter_config.json")).unwrap())
                .unwrap();
        let want = match *method {
            "lora" => "LORA",
            "prompt_tuning" => "PROMPT_TUNING",
            "p_tuning" => "P_TUNING",
            "ia3" => "IA3",
            _ => "PREFIX_TUNING",
        };
        assert_eq!(config["peft_type"], want, "{name}");
        ok(align()
            .args([
                "generate",
                "--model",
                model().to_str().unwrap(),
                "--adapter",
                straight.join("final").to_str().unwrap(),
                "--chat",
                "--prompt",
                "What is fever?",
                "--max-new-tokens",
                "4",
            ])
            .output()
            .unwrap());
        if matches!(*method, "lora" | "ia3") {
            // mergeable: the export's own probe check compares the merged folder with base + adapter
            let merged = tmp.path().join(format!("{name}-merged"));
            let report = ok(align()
                .args([
                    "export",
                    "--model",
                    model().to_str().unwrap(),
                    "--adapter",
                    straight.join("final").to_str().unwrap(),
                    "--out",
                    merged.to_str().unwrap(),
                ])
                .output()
                .unwrap());
            assert!(report.contains("merged") && merged.join("model.safetensors").is_file(), "{name}: {report}");
        }
    }
}

#[test]
fn dpo_trains_a_prompt_tuning_policy_against_its_base() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let cfg = tmp.path().join("dpo.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = \"prompt_tuning\"\n[train]\nmax_steps = 3\nbatch_size = 2\nlr = 1e-2\nmax_length = 128\n[prompt_tuning]\nnum_virtual_tokens = 4\n[dpo]\nbeta = 0.1\n",
            model(),
            repo().join("data/preference/medical_pairs.jsonl"),
            out
        ),
    )
    .unwrap();
    ok(align().args(["train", "dpo", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!(config["peft_type"], "PROMPT_TUNING");
    // the reference is the base (the prompt disabled), the policy sees the prompt: already at
    // step 1 their log-ratios differ, so the loss is not ln 2 (which it is when policy = reference)
    let l = losses(&out);
    assert_eq!(l.len(), 3);
    assert!(
        (l[0].1 - std::f64::consts::LN_2).abs() > 1e-4,
        "step 1 loss {} is ln 2: the policy ignores its prompt",
        l[0].1
    );
}

#[test]
fn prompt_learning_mistakes_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        ("prompt_tuning", "", "method = \"prompt_tuning\" needs a [prompt_tuning] section"),
        ("full", "[prompt_tuning]\nnum_virtual_tokens = 2\n", "[prompt_tuning] is set but method = \"full\""),
        ("prompt_tuning", "[prompt_tuning]\nnum_virtual_tokens = 2\nwidth = 3\n", "unknown field `width`"),
        (
            "prompt_tuning",
            "[prompt_tuning]\nnum_virtual_tokens = 2\nprompt_tuning_init = \"text\"\n",
            "prompt_tuning_init_text: required",
        ),
        ("prefix_tuning", "[prefix_tuning]\nnum_virtual_tokens = 0\n", "num_virtual_tokens"),
        (
            "prefix_tuning",
            "[prefix_tuning]\nnum_virtual_tokens = 2\nencoder_hidden_size = 8\n",
            "read only with prefix_projection = true",
        ),
    ];
    for (i, (method, section, want)) in cases.iter().enumerate() {
        let (cfg, _) = sft_config(tmp.path(), &format!("bad{i}"), method, section);
        let e = fails(align().args(["train", "sft", "--config", cfg.to_str().unwrap()]).output().unwrap());
        assert!(e.contains(want) && e.contains(".toml"), "{method} {section:?}: {e}");
    }
    // a prompt adapter cannot start a LoRA or full run, and has nothing to merge
    let (cfg, out) = sft_config(tmp.path(), "p", "prompt_tuning", "[prompt_tuning]\nnum_virtual_tokens = 2\n");
    ok(align()
        .args(["train", "sft", "--config", cfg.to_str().unwrap(), "--set", "train.max_steps=1"])
        .output()
        .unwrap());
    let adapter = out.join("final");
    let (cfg, _) = sft_config(tmp.path(), "l", "lora", "");
    let e = fails(
        align()
            .args(["train", "sft", "--config", cfg.to_str().unwrap(), "--set", &format!("adapter={:?}", adapter)])
            .output()
            .unwrap(),
    );
    assert!(e.contains("is a PROMPT_TUNING adapter") && e.contains("method = \"prompt_tuning\""), "{e}");
    let e = fails(
        align()
            .args([
                "export",
                "--model",
                model().to_str().unwrap(),
                "--adapter",
                adapter.to_str().unwrap(),
                "--out",
                tmp.path().join("merged").to_str().unwrap(),
            ])
            .output()
            .unwrap(),
    );
    assert!(e.contains("PROMPT_TUNING adapter adds virtual tokens"), "{e}");
    // continuing it under its own method works
    let (cfg, _) = sft_config(tmp.path(), "again", "prompt_tuning", "");
    ok(align()
        .args([
            "train",
            "sft",
            "--config",
            cfg.to_str().unwrap(),
            "--set",
            &format!("adapter={:?}", adapter),
            "--set",
            "train.max_steps=1",
        ])
        .output()
        .unwrap());
}
