//! The RM stage end to end on the sample preference data with a tiny model: exact resume, the
//! held-out accuracy beats chance, and the final folder is a reward model that loads back.
use std::path::{Path, PathBuf};

use align_core::data::{read_preference, DataOptions, LengthBudget, LengthPolicy};
use align_core::preference_batch::encode_pairs;
use align_core::scalar_model::load_reward_model;
use align_core::train_config::LoadedConfig;
use align_core::ModelTokenizer;
use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\nval_data = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_length = 512\nsave_every = 2\nwarmup_ratio = 0.2\nweight_decay = 0.1\n[reward]\nmargin = 0.1\ncenter_rewards_coefficient = 0.01\n",
        repo().join("tests/fixtures/models/tiny-qwen2"),
        repo().join("data/preference/medical_pairs.jsonl"),
        repo().join("data/preference/medical_pairs_eval.jsonl"),
        out
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    LoadedConfig::from_table(table, Path::new("test.toml"), &extra, "reward").unwrap()
}

fn metric_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

fn losses(out: &Path) -> Vec<(u64, f64)> {
    metric_lines(out)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap(), v["loss"].as_f64().unwrap()))
        .collect()
}

#[test]
fn stop_and_resume_equals_straight_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let s = align_reward::run(&config(&straight, &[]), false, None).unwrap();
    assert!(s.completed && s.steps == 6);

    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &[]);
    let first = align_reward::run(&cfg, false, Some(3)).unwrap();
    assert!(!first.completed && first.steps == 3);
    let second = align_reward::run(&cfg, false, None).unwrap();
    assert!(second.completed);
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after stop + resume");
    assert_eq!(losses(&straight), losses(&resumed));
    // every train line has the RM metrics; checkpoints are reward-model folders with their state
    for v in metric_lines(&straight).iter().filter(|v| v.get("loss").is_some()) {
        for k in ["accuracy", "margin", "chosen_reward", "rejected_reward"] {
            assert!(v[k].is_f64(), "{k} missing in {v}");
        }
    }
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("checkpoint-4/config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architectures"][0], "Qwen2ForSequenceClassification");
    assert!(resumed.join("checkpoint-4/train_state/optimizer.safetensors").is_file());
}

#[test]
fn held_out_accuracy_beats_chance_and_the_saved_model_agrees() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    let cfg = config(&out, &["train.max_steps=60", "train.batch_size=8", "train.eval_every=30", "train.save_every=0"]);
    let s = align_reward::run(&cfg, false, None).unwrap();
    assert!(s.completed);
    let lines = metric_lines(&out);
    let evals: Vec<&Value> = lines.iter().filter(|v| v.get("eval_loss").is_some()).collect();
    assert_eq!(evals.len(), 2);
    let acc = evals[1]["eval_accuracy"].as_f64().unwrap();
    eprintln!("held-out accuracy: {} after 30 steps, {acc} after 60", evals[0]["eval_accuracy"]);
    assert!(acc >= 0.7, "held-out pairwise accuracy {acc} (chance is 0.5)");
    assert!(evals[1]["eval_margin"].as_f64().unwrap() > 0.0);

    // the final folder scores the held-out pairs as the last evaluation did
    let rm = load_reward_model(&out.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let tok = ModelTokenizer::from_dir(&out.join("final")).unwrap();
    let pairs = read_preference(&[repo().join("data/preference/medical_pairs_eval.jsonl")], &DataOptions::default())
        .unwrap()
        .records;
    let (enc, _) =
        encode_pairs(&tok, &pairs.iter().collect::<Vec<_>>(), LengthBudget::new(512, LengthPolicy::Truncate)).unwrap();
    let stats = align_reward::pairwise_stats(&rm.rm, &enc, 16).unwrap();
    assert!((stats.accuracy - acc).abs() < 1e-9, "{} vs {acc}", stats.accuracy);
    assert!((stats.mean_margin - evals[1]["eval_margin"].as_f64().unwrap()).abs() < 1e-3);
}
