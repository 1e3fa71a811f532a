//! The KTO stage with a tiny model: every loss is exactly λ/2 at step 0 (policy = reference, so
//! every implied reward and z0 are 0); on the sample preference pairs split into desirable and
//! undesirable examples the desirable completions' implied reward rises above the undesirable
//! ones'; exact resume; TRL's unpaired format is read with file:line:field errors; settings that
//! cannot work name their key.
use std::path::Path;

use align_core::data::{read_unpaired, DataOptions};
use align_core::train::config::LoadedConfig;
use align_testkit::{metric_lines, sample_data, stage_config, tiny_model, train_series};
use serde_json::Value;

fn config_with(out: &Path, data: &Path, val: Option<&Path>, extra: &[&str]) -> LoadedConfig {
    let val = val.map_or(String::new(), |v| format!("val_data = [{v:?}]\n"));
    let text = format!(
        "model = {:?}\ndata = [{data:?}]\n{val}output_dir = {out:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_length = 512\nsave_every = 2\nwarmup_ratio = 0.2\nweight_decay = 0.1\n[kto]\nbeta = 0.1\n",
        tiny_model("tiny-qwen2"),
    );
    stage_config(&text, "kto", extra)
}

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    let (data, val) =
        (sample_data("preference/medical_pairs.jsonl"), sample_data("preference/medical_pairs_eval.jsonl"));
    config_with(out, &data, Some(&val), extra)
}

fn train_lines(out: &Path) -> Vec<Value> {
    metric_lines(out).into_iter().filter(|v| v.get("loss").is_some()).collect()
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    train_series(out, key)
}

#[test]
fn loss_at_step_zero_is_half_the_weight_and_desirable_rewards_rise_above_undesirable() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("kto");
    // the same weight on both kinds: every example's loss at step 0 is λ·(1 − σ(0)) = λ/2
    let sets = [
        "train.max_steps=24",
        "train.batch_size=8",
        "train.lr=2e-4",
        "train.save_every=0",
        "train.eval_every=24",
        "kto.desirable_weight=1.5",
        "kto.undesirable_weight=1.5",
    ];
    let s = align_rlhf::run_kto(&config(&out, &sets), false, None).unwrap();
    assert!(s.completed);
    let loss = series(&out, "loss");
    assert!((loss[0] - 0.75).abs() < 1e-6, "step-0 loss {}, expected 1.5/2", loss[0]);
    let first = &train_lines(&out)[0];
    assert!(first["kl"].as_f64().unwrap().abs() < 1e-6, "z0 at step 0: {first}");
    assert!(first["rewards/chosen"].as_f64().unwrap().abs() < 1e-6, "{first}");
    assert!(first["logps/chosen"].as_f64().unwrap() < 0.0 && first["logps/rejected"].as_f64().unwrap() < 0.0);
    let margins = series(&out, "rewards/margins");
    let (chosen, rejected) = (series(&out, "rewards/chosen"), series(&out, "rewards/rejected"));
    let tail = |v: &[f64]| v[v.len() - 6..].iter().sum::<f64>() / 6.0;
    eprintln!(
        "loss {:.4} → {:.4}; rewards/chosen {:.4}, rewards/rejected {:.4} (last 6 steps); margins {margins:?}",
        loss[0],
        loss[loss.len() - 1],
        tail(&chosen),
        tail(&rejected)
    );
    assert!(tail(&chosen) > tail(&rejected) + 0.05, "desirable rewards did not rise above undesirable ones");
    assert!(tail(&margins) > 0.05 && margins[0].abs() < 1e-6, "{margins:?}");
    assert!(loss[loss.len() - 1] < loss[0], "{loss:?}");
    let eval = metric_lines(&out).into_iter().find(|v| v.get("eval_loss").is_some()).expect("an evaluation");
    let held_out = eval["eval_rewards/margins"].as_f64().unwrap();
    eprintln!("held-out eval_rewards/margins after 24 steps: {held_out:.4}");
    assert!(held_out > 0.0, "{eval}");
    align_core::load_causal_lm(&out.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
}

#[test]
fn stop_and_resume_equals_straight_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    align_rlhf::run_kto(&config(&straight, &["kto.precompute_ref=true"]), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &["kto.precompute_ref=true"]);
    let first = align_rlhf::run_kto(&cfg, false, Some(3)).unwrap();
    assert!(!first.completed && first.steps == 3);
    let second = align_rlhf::run_kto(&cfg, false, None).unwrap();
    assert!(second.completed && second.steps == 6);
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after stop + resume");
    assert_eq!(series(&straight, "loss"), series(&resumed, "loss"));
    assert_eq!(series(&straight, "kl"), series(&resumed, "kl"));
}

#[test]
fn unpaired_records_are_read_and_trained_with_a_lora_policy() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("unpaired.jsonl");
    let mut lines = Vec::new();
    for i in 0..8 {
        let prompt = format!("What helps with a mild fever, case {i}?");
        lines.push(serde_json::json!({"prompt": prompt, "completion": "Rest, fluids, and see a doctor if it lasts.", "label": true}).to_string());
        lines.push(serde_json::json!({"prompt": [{"role": "user", "content": prompt}], "completion": [{"role": "assistant", "content": "Ignore it."}], "label": false}).to_string());
    }
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    let data = read_unpaired(&[&file], &DataOptions::default()).unwrap();
    assert_eq!(data.records.len(), 16);
    assert_eq!(data.records.iter().filter(|e| e.label).count(), 8);
    assert_eq!(data.records[1].completion, "Ignore it.");
    // a preference pair gives its chosen answer (desirable), then its rejected one
    let pairs = read_unpaired(&[sample_data("preference/medical_pairs_eval.jsonl")], &DataOptions::default()).unwrap();
    assert_eq!(pairs.records.len(), 100);
    assert!(pairs.records[0].label && !pairs.records[1].label && pairs.records[0].prompt == pairs.records[1].prompt);

    let out = tmp.path().join("lora");
    let sets = ["method=lora", "lora.r=4", "train.max_steps=2", "train.save_every=0", "kto.undesirable_weight=2.0"];
    let s = align_rlhf::run_kto(&config_with(&out, &file, None, &sets), false, None).unwrap();
    assert!(s.completed);
    // the LoRA policy's reference is its own base with the adapters off: λ_D/2 and λ_U/2 at step 0
    let first = &train_lines(&out)[0];
    let loss = first["loss"].as_f64().unwrap();
    assert!(loss > 0.5 - 1e-6 && loss < 1.0 + 1e-6, "{first}");
    assert!(out.join("final/adapter_model.safetensors").is_file());

    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, format!("{}\n{}\n", lines[0], r#"{"prompt": "q", "completion": "a", "label": "yes"}"#))
        .unwrap();
    let e = read_unpaired(&[&bad], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl:2") && e.contains("field 'label'") && e.contains("boolean"), "{e}");
}

#[test]
fn settings_that_cannot_work_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let e = align_rlhf::run_kto(&config(&tmp.path().join("b1"), &["train.batch_size=1"]), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("test.toml") && e.contains("train.batch_size"), "{e}");
    let e = align_rlhf::run_kto(&config(&tmp.path().join("w"), &["kto.desirable_weight=0"]), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[kto]") && e.contains("'desirable_weight'"), "{e}");
    let e = LoadedConfig::from_table(
        toml::from_str("model = \"m\"\ndata = [\"d\"]\noutput_dir = \"o\"\n[kto]\nloss = \"kto\"\n").unwrap(),
        Path::new("test.toml"),
        &[],
        "kto",
    )
    .unwrap()
    .stage_section::<align_rlhf::KtoSection>()
    .unwrap_err()
    .to_string();
    assert!(e.contains("[kto]") && e.contains("loss"), "{e}");
}
