//! End-to-end tests of `align status`, `align report` (on a synthetic run folder) and
//! `align eval answers` (on the tiny Llama fixture and the medical SFT eval sample).
use std::path::Path;

use serde_json::{json, Value};

mod support;
use support::repo;
use support::{fails, ok, s};

/// A run with a finished SFT stage (falling loss, eval lines) and a pending DPO stage.
fn small_run(dir: &Path) {
    std::fs::create_dir_all(dir.join("sft")).unwrap();
    std::fs::write(
        dir.join("pipeline.json"),
        json!({"name": "tiny", "stages": ["sft", "dpo"], "file": "p.toml"}).to_string(),
    )
    .unwrap();
    let record = json!({"name": "sft", "kind": "sft", "status": "done", "stale_reason": null, "config_hash": "h",
        "started_at": "2025-01-01T00:00:00Z", "finished_at": "2025-01-01T00:01:00Z", "duration_seconds": 61.0,
        "summary": {"steps": 12, "total_steps": 12, "completed": true, "stop_reason": "completed", "last_loss": 0.9,
                    "eval_loss": 1.1, "best_eval_loss": 1.1, "nonfinite_steps": 0, "tokens_seen": 4096, "seconds": 60.0,
                    "final_dir": "sft/final"},
        "eval": null, "error": null});
    std::fs::write(dir.join("sft/stage.json"), record.to_string()).unwrap();
    let mut lines = String::new();
    for step in 1..=12u64 {
        let loss = 3.0 - 0.175 * step as f64;
        lines += &format!("{}\n", json!({"step": step, "epoch": 1.0, "loss": loss, "lr": 1e-4, "grad_norm": 1.5}));
        if step % 4 == 0 {
            lines += &format!("{}\n", json!({"step": step, "eval_loss": loss + 0.2}));
        }
    }
    std::fs::write(dir.join("sft/metrics.jsonl"), lines).unwrap();
}

#[test]
fn status_prints_a_table_and_json() {
    let tmp = tempfile::tempdir().unwrap();
    small_run(tmp.path());
    let out = ok(&["status", s(tmp.path())]);
    assert!(out.starts_with("tiny  ("), "{out}");
    let sft = out.lines().find(|l| l.starts_with("sft ")).unwrap();
    for part in ["sft", "done", "12/12", "loss 0.9000", "1m01s"] {
        assert!(sft.contains(part), "{part} not in {sft}");
    }
    assert!(out.lines().any(|l| l.starts_with("dpo ") && l.contains("pending")), "{out}");
    assert!(out.contains("healthy: loss fell from 2.6500 to 1.0750"), "{out}");
    let v: Value = serde_json::from_str(&ok(&["status", s(tmp.path()), "--json"])).unwrap();
    assert_eq!(v["stages"][0]["steps"], 12);
    assert_eq!(v["stages"][0]["duration_seconds"], 61.0);
    assert_eq!(v["stages"][1]["status"], "pending");
    let e = fails(&["status", s(&tmp.path().join("nope"))]);
    assert!(e.ends_with("nope: no such run folder"), "{e}");
}

#[test]
fn report_writes_html_and_pngs_into_the_run_folder() {
    let tmp = tempfile::tempdir().unwrap();
    small_run(tmp.path());
    let out = ok(&["report", s(tmp.path())]);
    assert!(out.contains("wrote ") && out.contains("(3 plots)"), "{out}");
    let dir = tmp.path().join("report");
    let html = std::fs::read_to_string(dir.join("report.html")).unwrap();
    for png in ["sft_loss.png", "sft_lr.png", "sft_grad_norm.png"] {
        let bytes = std::fs::read(dir.join(png)).unwrap();
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{png} is not a PNG");
        assert!(html.contains(&format!("<img src=\"{png}\"")), "{png} not linked");
    }
    let elsewhere = tmp.path().join("elsewhere");
    ok(&["report", s(tmp.path()), "--out", s(&elsewhere)]);
    assert!(elsewhere.join("report.html").is_file() && elsewhere.join("sft_loss.png").is_file());
}

#[test]
fn eval_answers_scores_greedy_answers_on_the_tiny_model() {
    let model = repo().join("tests/fixtures/models/tiny-llama");
    let data = repo().join("data/sft/medical_sft_eval.jsonl");
    let args = ["eval", "answers", "--model", s(&model), "--data", s(&data), "--limit", "5", "--max-new-tokens", "16"];
    let mut json_args = args.to_vec();
    json_args.push("--json");
    let v: Value = serde_json::from_str(&ok(&json_args)).unwrap();
    assert_eq!(v["samples"], 5);
    for k in ["bleu4", "rouge_l", "char_f1", "exact_match", "f1"] {
        let x = v[k].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&x), "{k} = {x}");
    }
    let examples = v["examples"].as_array().unwrap();
    assert_eq!(examples.len(), 5);
    // the prompt is the rendered chat template up to the generation prompt; the reference is
    // the conversation's last assistant turn
    let first = &examples[0];
    assert!(first["prompt"].as_str().unwrap().contains("How is depression treated?"));
    assert!(first["prompt"].as_str().unwrap().ends_with("<|im_start|>assistant\n"));
    assert!(first["reference"].as_str().unwrap().starts_with("For depression, it usually helps"));
    // greedy decoding is deterministic
    assert_eq!(v, serde_json::from_str::<Value>(&ok(&json_args)).unwrap());
    let table = ok(&args);
    let rows: Vec<&str> = table.lines().collect();
    assert!(rows[0].starts_with("metric") && rows.len() == 6, "{table}");
    assert!(rows[4].starts_with("exact_match") && rows[5].starts_with("f1 "), "{table}");
    assert!(rows[1].starts_with("bleu4") && rows[1].trim_end().ends_with(" 5"), "{table}");
    let e = fails(&["eval", "answers", "--model", s(&model), "--data", s(&data), "--max-new-tokens", "300"]);
    assert!(e.contains("--max-new-tokens: expected 1 to 255"), "{e}");
}
