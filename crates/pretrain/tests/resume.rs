//! Exact resume in-process: 6 straight steps equal 3 steps, a stop, and a resume to 6 — bitwise
//! identical weights and identical logged losses; gradient accumulation normalises by tokens.
use std::path::{Path, PathBuf};

use align_core::train::config::LoadedConfig;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 1e-2\nmax_length = 32\nsave_every = 2\nwarmup_ratio = 0.2\nweight_decay = 0.1\n",
        repo().join("tests/fixtures/models/tiny-llama"),
        repo().join("data/pretrain/medical_corpus.txt"),
        out
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    LoadedConfig::from_table(table, Path::new("test.toml"), &extra, "pretrain").unwrap()
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

#[test]
fn stop_and_resume_equals_straight_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let cfg = config(&straight, &[]);
    let s = align_pretrain::run(&cfg, false, None).unwrap();
    assert!(s.completed && s.steps == 6);

    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &[]);
    let first = align_pretrain::run(&cfg, false, Some(3)).unwrap();
    assert!(!first.completed && first.steps == 3 && first.final_dir.is_none());
    // step 3 was not saved (save_every = 2): the resume starts from checkpoint-2 and redoes step 3
    let second = align_pretrain::run(&cfg, false, None).unwrap();
    assert!(second.completed);

    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after stop + resume");
    assert_eq!(losses(&straight), losses(&resumed));
    assert_eq!(losses(&resumed).len(), 6);
    // checkpoints are complete HF folders with their training state
    for step in [2, 4, 6] {
        let c = resumed.join(format!("checkpoint-{step}"));
        for f in [
            "COMPLETE",
            "config.json",
            "model.safetensors",
            "tokenizer.json",
            "train_state/optimizer.safetensors",
            "train_state/state.json",
        ] {
            assert!(c.join(f).is_file(), "{} lacks {f}", c.display());
        }
    }
    // re-running a finished run changes nothing
    let again = align_pretrain::run(&cfg, false, None).unwrap();
    assert_eq!(again.steps, 6);
    assert_eq!(std::fs::read(resumed.join("final/model.safetensors")).unwrap(), b);
}

#[test]
fn gradient_accumulation_is_normalised_by_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    // one step over 4 blocks: as one batch of 4, or as 2 micro-batches of 2 accumulated
    let one = tmp.path().join("one");
    align_pretrain::run(&config(&one, &["train.max_steps=1", "train.batch_size=4"]), false, None).unwrap();
    let acc = tmp.path().join("acc");
    align_pretrain::run(&config(&acc, &["train.max_steps=1", "train.batch_size=2", "train.grad_accum=2"]), false, None)
        .unwrap();
    let (l1, l2) = (losses(&one)[0].1, losses(&acc)[0].1);
    assert!((l1 - l2).abs() < 1e-5, "loss {l1} vs accumulated {l2}");
    let w1 = align_core::load_causal_lm(&one.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let w2 = align_core::load_causal_lm(&acc.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
    for (name, t) in w1.vs.variables() {
        let d = (&t - &w2.vs.variables()[&name]).abs().max().double_value(&[]);
        assert!(d < 1e-5, "{name} differs by {d}");
    }
}

#[test]
fn restart_starts_over_and_limit_keeps_newest_checkpoints() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    align_pretrain::run(&config(&out, &["train.save_every=1", "train.save_total_limit=2"]), false, None).unwrap();
    let mut names: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with("checkpoint-"))
        .collect();
    names.sort();
    assert_eq!(names, vec!["checkpoint-5", "checkpoint-6"]);
    let s = align_pretrain::run(&config(&out, &["train.max_steps=2"]), true, None).unwrap();
    assert_eq!(s.steps, 2);
    assert_eq!(losses(&out).len(), 2);
}
