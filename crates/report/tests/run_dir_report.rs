//! A synthetic run folder (every stage kind, every status) through the reader, the status table
//! and the HTML report: files exist, the page links every PNG, the PNGs are PNGs.
use std::path::Path;

use align_report::{read_run_dir, status_json, status_rows, status_table, write_report, StageStatus, Thresholds};
use serde_json::{json, Value};

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn stage_json(kind: &str, status: &str, extra: Value) -> String {
    let mut v = json!({
        "name": "x", "kind": kind, "status": status, "stale_reason": null, "config_hash": "abc123",
        "started_at": "2025-01-01T10:00:00Z", "finished_at": null, "duration_seconds": null,
        "summary": null, "eval": null, "error": null
    });
    for (k, val) in extra.as_object().unwrap() {
        v[k] = val.clone();
    }
    serde_json::to_string_pretty(&v).unwrap()
}

fn metrics(lines: impl IntoIterator<Item = Value>) -> String {
    lines.into_iter().map(|l| l.to_string() + "\n").collect()
}

/// pt: healthy; sft: over-fitting; rm: healthy with accuracy; dpo: running; ppo: failed with a
/// KL runaway; eval: done with results; later: pending without a folder.
fn synthetic_run(dir: &Path) {
    write(
        &dir.join("pipeline.json"),
        &json!({"name": "demo", "stages": ["pt", "sft", "rm", "dpo", "ppo", "eval", "later"], "file": "pipelines/demo.toml"})
            .to_string(),
    );
    let summary = |steps: u64, loss: f64| {
        json!({"steps": steps, "total_steps": steps, "completed": true, "stop_reason": "completed", "last_loss": loss,
               "eval_loss": null, "best_eval_loss": null, "nonfinite_steps": 0, "tokens_seen": 1000, "seconds": 12.5,
               "final_dir": "pt/final"})
    };
    write(
        &dir.join("pt/stage.json"),
        &stage_json("pretrain", "done", json!({"duration_seconds": 75.0, "summary": summary(40, 1.2)})),
    );
    write(
        &dir.join("pt/metrics.jsonl"),
        &metrics((1..=40).map(|s| {
            let loss = 4.0 * (-(s as f64) / 15.0).exp() + 1.2;
            json!({"step": s, "epoch": s as f64 / 40.0, "loss": loss, "lr": 1e-3 * (1.0 - s as f64 / 40.0),
                   "grad_norm": 2.0 / (s as f64).sqrt(), "tokens_per_second": 900.0})
        })),
    );
    write(
        &dir.join("sft/stage.json"),
        &stage_json("sft", "done", json!({"duration_seconds": 3725.0, "summary": summary(30, 0.3)})),
    );
    let mut sft: Vec<Value> = (1..=30)
        .map(|s| json!({"step": s, "epoch": 1.0, "loss": 2.0 - s as f64 * 0.05, "lr": 2e-5, "grad_norm": 1.0}))
        .collect();
    for (step, eval) in [(10, 1.5), (20, 1.55), (25, 1.6), (30, 1.7)] {
        sft.push(json!({"step": step, "eval_loss": eval}));
    }
    write(&dir.join("sft/metrics.jsonl"), &metrics(sft));
    write(
        &dir.join("rm/stage.json"),
        &stage_json("reward", "stale", json!({"stale_reason": "sft changed since", "summary": summary(20, 0.4)})),
    );
    write(
        &dir.join("rm/metrics.jsonl"),
        &metrics((1..=20).map(|s| {
            let f = s as f64 / 20.0;
            json!({"step": s, "loss": 0.69 - 0.3 * f, "accuracy": 0.5 + 0.4 * f, "margin": 2.0 * f,
                   "chosen_reward": f, "rejected_reward": -f, "lr": 1e-5, "grad_norm": 0.5})
        })),
    );
    write(&dir.join("dpo/stage.json"), &stage_json("dpo", "running", json!({})));
    write(
        &dir.join("dpo/metrics.jsonl"),
        &metrics((1..=8).map(|s| {
            let f = s as f64 / 8.0;
            json!({"step": s, "loss": 0.69 - 0.2 * f, "rewards/chosen": 0.1 * f, "rewards/rejected": -0.1 * f,
                   "rewards/accuracies": 0.5 + 0.3 * f, "rewards/margins": 0.2 * f, "logps/chosen": -40.0 + f,
                   "logps/rejected": -42.0 - f, "lr": 5e-6, "grad_norm": 1.0})
        })),
    );
    write(
        &dir.join("ppo/stage.json"),
        &stage_json(
            "ppo",
            "failed",
            json!({"error": "stopping: 3 non-finite steps in a row", "duration_seconds": 30.0}),
        ),
    );
    write(
        &dir.join("ppo/metrics.jsonl"),
        &metrics((1..=10).map(|s| {
            json!({"step": s, "loss": 0.1, "objective/kl": (s * s) as f64 * 0.2, "objective/rlhf_reward": 0.1 * s as f64,
                   "objective/scores": 0.2 * s as f64, "response_length_mean": 20.0 + s as f64,
                   "policy/approxkl": 0.01, "policy/clipfrac": 0.1, "val/vf_loss": 1.0 / s as f64, "eos_rate": 0.5})
        })),
    );
    write(
        &dir.join("eval/stage.json"),
        &stage_json(
            "eval",
            "done",
            json!({"duration_seconds": 5.0, "eval": {"bleu4": 0.12, "rouge_l": 0.3, "char_f1": 0.45, "samples": 5,
                   "examples": [{"prompt": "Fever?", "reference": "Rest <b>and</b> fluids.", "answer": "Rest."}]}}),
        ),
    );
}

fn is_png(path: &Path) -> bool {
    let bytes = std::fs::read(path).unwrap();
    bytes.starts_with(&[0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A]) && bytes.len() > 1000
}

#[test]
fn report_writes_html_linking_valid_pngs() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path());
    let run = read_run_dir(tmp.path()).unwrap();
    assert_eq!(run.stages.len(), 7);
    let out = tmp.path().join("report");
    let files = write_report(&run, &out, &Thresholds::default()).unwrap();
    assert!(files.html.is_file());
    let html = std::fs::read_to_string(&files.html).unwrap();
    // the plots each stage kind gets when its metrics are present
    let expected = [
        "pt_loss.png",
        "pt_lr.png",
        "pt_grad_norm.png",
        "sft_loss.png",
        "rm_loss.png",
        "rm_accuracy.png",
        "rm_rewards.png",
        "dpo_loss.png",
        "dpo_margins.png",
        "dpo_accuracy.png",
        "dpo_logps.png",
        "ppo_reward.png",
        "ppo_kl.png",
        "ppo_response_length.png",
        "ppo_policy.png",
        "ppo_value_loss.png",
        "ppo_eos_rate.png",
    ];
    for name in expected {
        let path = out.join(name);
        assert!(path.is_file(), "{name} missing");
        assert!(is_png(&path), "{name} is not a PNG");
        assert!(html.contains(&format!("<img src=\"{name}\"")), "report.html does not show {name}");
    }
    // no plot for a metric nobody logged (ppo entropy), nor for the eval stage
    assert!(!out.join("ppo_entropy.png").exists());
    assert!(files.pngs.iter().all(|p| !p.file_name().unwrap().to_string_lossy().starts_with("eval_")));
    // every <img> points at a file beside the page
    for src in html.split("<img src=\"").skip(1) {
        let name = &src[..src.find('"').unwrap()];
        assert!(out.join(name).is_file(), "{name}");
    }
    // the stage table with diagnoses, eval results as a table, HTML escaped
    assert!(html.contains("healthy: loss fell from"), "pt diagnosis");
    assert!(html.contains("over-fitting: eval loss rose over the last 3 evaluations"), "sft diagnosis");
    assert!(html.contains("KL runaway"), "ppo diagnosis");
    assert!(html.contains("<th>bleu4</th><td>0.1200</td>"));
    assert!(html.contains("Rest &lt;b&gt;and&lt;/b&gt; fluids."));
    assert!(html.contains("stopping: 3 non-finite steps in a row"));
    assert!(!html.contains("<script"));
}

#[test]
fn status_table_and_json_show_every_stage() {
    let tmp = tempfile::tempdir().unwrap();
    synthetic_run(tmp.path());
    let run = read_run_dir(tmp.path()).unwrap();
    let rows = status_rows(&run, &Thresholds::default());
    let table = status_table(&rows);
    let lines: Vec<&str> = table.lines().collect();
    assert!(
        lines[0].starts_with("stage") && lines[0].contains("last loss/metric") && lines[0].contains("stale reason")
    );
    let row = |name: &str| *lines.iter().find(|l| l.starts_with(&format!("{name} "))).unwrap();
    let pt = row("pt");
    assert!(pt.contains("pretrain") && pt.contains("done") && pt.contains("40/40") && pt.contains("loss 1.2000"));
    assert!(pt.contains("1m15s"), "{pt}");
    assert!(row("sft").contains("1h02m"));
    assert!(row("rm").contains("stale") && row("rm").contains("sft changed since"));
    assert!(row("dpo").contains("running") && row("dpo").contains(" 8 "));
    let ppo = row("ppo");
    assert!(ppo.contains("failed") && ppo.contains("objective/rlhf_reward 1.0000") && ppo.contains("error: stopping"));
    assert!(row("eval").contains("bleu4 0.1200"));
    assert!(row("later").contains("pending"));
    assert!(table.contains("later  not started"), "{table}");
    assert!(table.contains("results: bleu4 0.1200, rouge_l 0.3000, char_f1 0.4500"), "{table}");

    let v = status_json(&run, &rows);
    assert_eq!(v["name"], "demo");
    let stages = v["stages"].as_array().unwrap();
    assert_eq!(stages.len(), 7);
    assert_eq!(stages[0]["kind"], "pretrain");
    assert_eq!(stages[0]["steps"], 40);
    assert_eq!(stages[0]["metric"]["name"], "loss");
    assert_eq!(stages[2]["stale_reason"], "sft changed since");
    assert_eq!(stages[6]["status"], "pending");
    assert!(stages[6]["kind"].is_null());
    assert_eq!(rows[3].status, StageStatus::Running);
}

#[test]
fn bad_files_are_named_with_line_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let e = read_run_dir(dir).unwrap_err().to_string();
    assert!(e.ends_with("pipeline.json: missing (is ") || e.contains("pipeline.json: missing"), "{e}");
    write(&dir.join("pipeline.json"), "{\"name\": \"x\",\n \"stages\": [\"a\"]\n");
    let e = read_run_dir(dir).unwrap_err().to_string();
    assert!(e.contains("pipeline.json:3: invalid JSON"), "{e}");
    write(&dir.join("pipeline.json"), "{\"name\": \"x\", \"stages\": [\"a\", 3]}");
    let e = read_run_dir(dir).unwrap_err().to_string();
    assert!(e.contains("field 'stages' item 2: expected a stage folder name, found 3"), "{e}");
    write(&dir.join("pipeline.json"), "{\"name\": \"x\", \"stages\": [\"a\"]}");
    write(&dir.join("a/stage.json"), "{\"kind\": \"sft\",\n \"status\": \"finished\"}");
    let e = read_run_dir(dir).unwrap_err().to_string();
    assert!(
        e.ends_with(
            "a/stage.json: field 'status': expected one of pending, running, done, failed, stale, found 'finished'"
        ),
        "{e}"
    );
    write(&dir.join("a/stage.json"), "{\"kind\": \"sft\", \"status\": \"done\"}");
    write(&dir.join("a/metrics.jsonl"), "{\"step\": 1, \"loss\": 2.0}\n{\"step\": \"two\"}\n");
    let e = read_run_dir(dir).unwrap_err().to_string();
    assert!(e.ends_with("a/metrics.jsonl:2: field 'step': expected a non-negative integer, found \"two\""), "{e}");
}
