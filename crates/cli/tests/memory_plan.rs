//! `align plan` and the trainer's plan-vs-peak: the command prints every part for the test
//! model; on SmolLM2-135M (only when `ALIGN_SMOLLM2_DIR` is set, else SKIPPED) a short full SFT
//! run's measured peak (peak RSS) is within 15 % of the plan recorded in train_summary.json.
use std::path::PathBuf;
use std::process::Command;

use align_testkit::repo;
use serde_json::Value;

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

#[test]
fn plan_prints_every_part_and_refuses_unknown_settings() {
    let model = repo().join("tests/fixtures/models/tiny-llama");
    let out = align()
        .args(["plan", "--model", model.to_str().unwrap(), "--method", "lora", "--seq", "64", "--batch", "2"])
        .args(["--optimizer", "adamw8bit", "--zero", "1", "--world", "2", "--lora-r", "4"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    for part in ["weights", "gradients", "optimizer", "activations", "logits", "runtime", "total", "ZeRO stage 1"] {
        assert!(text.contains(part), "no '{part}' in:\n{text}");
    }
    let bad = align()
        .args(["plan", "--model", model.to_str().unwrap(), "--seq", "8", "--batch", "1", "--optimizer", "sgd"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("train.optimizer") && err.contains("adamw8bit"), "{err}");
    let bad = align()
        .args(["plan", "--model", model.to_str().unwrap(), "--seq", "8", "--batch", "1", "--lora-r", "4"])
        .output()
        .unwrap();
    assert!(!bad.status.success(), "--lora-r without --method lora is an error, not ignored");
}

#[test]
fn smollm2_planned_peak_is_within_15_percent_of_the_measured_peak() {
    let Some(dir) = std::env::var_os("ALIGN_SMOLLM2_DIR").filter(|d| !d.is_empty()).map(PathBuf::from) else {
        eprintln!("SKIPPED smollm2_planned_peak_is_within_15_percent_of_the_measured_peak: set ALIGN_SMOLLM2_DIR");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    for (name, method, seq, batch) in [("full", "full", 256, 1), ("lora", "lora", 1024, 1)] {
        let out = tmp.path().join(name);
        let config = tmp.path().join(format!("{name}.toml"));
        let lora = if method == "lora" { "[lora]\nr = 8\ntargets = \"all-linear\"\n" } else { "" };
        std::fs::write(
            &config,
            format!(
                "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = \"{method}\"\n[train]\nmax_steps = 2\n\
                 batch_size = {batch}\nlr = 1e-5\nmax_length = {seq}\n[sft]\npacking = true\n{lora}",
                dir,
                repo().join("data/sft/medical_sharegpt.jsonl"),
                out
            ),
        )
        .unwrap();
        let run = align().args(["train", "sft", "--config", config.to_str().unwrap()]).output().unwrap();
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("train_summary.json")).unwrap()).unwrap();
        let (peak, planned) =
            (summary["peak_rss_bytes"].as_f64().unwrap(), summary["planned_peak_bytes"].as_f64().unwrap());
        let off = planned / peak - 1.0;
        println!("{name} seq {seq} batch {batch}: planned {planned} B, measured {peak} B ({:+.1} %)", off * 100.0);
        assert!(off.abs() <= 0.15, "{name}: planned {planned} vs measured {peak} ({:+.1} %)", off * 100.0);
    }
}
