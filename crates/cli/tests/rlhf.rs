//! `align train reward|dpo` and `align eval reward` as a user runs them, in full and with LoRA.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn align() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.env("ALIGN_LOG", "warn").env_remove("ALIGN_TEST_CRASH_IN_SAVE").env_remove("ALIGN_TEST_STEP_DELAY_MS");
    c
}

fn ok(out: Output) -> String {
    assert!(out.status.success(), "align failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn write_config(dir: &Path, name: &str, out: &Path, stage: &str) -> PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\nval_data = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 20\nbatch_size = 8\nlr = 5e-3\nmax_length = 512\n{stage}\n",
            repo().join("tests/fixtures/models/tiny-qwen2"),
            repo().join("data/preference/medical_pairs.jsonl"),
            repo().join("data/preference/medical_pairs_eval.jsonl"),
            out
        ),
    )
    .unwrap();
    cfg
}

/// Share of the held-out pairs whose chosen and rejected scores under `model` (a reward-model
/// folder or adapter) are within 1e-4. Training evaluates in other batches (other padding, so
/// other kernels) than `align eval reward`, and a LoRA run evaluates unmerged where eval merges:
/// scores are O(1) and agree to ~1e-6, so only such near ties may rank differently, and the two
/// accuracies may differ by their share and no more.
fn near_tie_share(model: &Path) -> f64 {
    use align_core::data::{read_preference, DataOptions, LengthBudget, LengthPolicy};
    let (rm, tok_dir) =
        align_core::load::spec::load_reward_model_or_adapter(model, None, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let tok = align_core::ModelTokenizer::from_dir(&tok_dir).unwrap();
    let pairs = read_preference(&[repo().join("data/preference/medical_pairs_eval.jsonl")], &DataOptions::default())
        .unwrap()
        .records;
    let budget = LengthBudget::new(512, LengthPolicy::Truncate);
    let (enc, _) =
        align_core::train::preference_batch::encode_pairs(&tok, &pairs.iter().collect::<Vec<_>>(), budget).unwrap();
    let scores = align_reward::pair_scores(&rm.rm, &enc, 1).unwrap();
    scores.iter().filter(|(c, r)| (c - r).abs() < 1e-4).count() as f64 / enc.len() as f64
}

fn eval_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect()
}

#[test]
fn train_reward_then_eval_reward_agree_and_beat_chance() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm");
    let cfg = write_config(tmp.path(), "rm", &out, "[reward]\nmargin = 0.0\ncenter_rewards_coefficient = 0.01");
    ok(align().args(["train", "reward", "--config", s(&cfg)]).output().unwrap());
    let last_eval = eval_lines(&out).pop().unwrap();
    let printed = ok(align()
        .args([
            "eval",
            "reward",
            "--model",
            s(&out.join("final")),
            "--data",
            s(&repo().join("data/preference/medical_pairs_eval.jsonl")),
            "--max-length",
            "512",
            "--json",
        ])
        .output()
        .unwrap());
    let v: Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(v["pairs"], 50);
    let acc = v["accuracy"].as_f64().unwrap();
    assert!(acc > 0.6, "held-out accuracy {acc}");
    let ties = near_tie_share(&out.join("final"));
    assert!((acc - last_eval["eval_accuracy"].as_f64().unwrap()).abs() <= ties + 1e-9, "{acc} vs {last_eval}");
    assert!(v["mean_margin"].as_f64().unwrap() > 0.0);

    // a model judged against itself ties on every prompt: win rate 0.5 inside its interval
    let model = repo().join("tests/fixtures/models/tiny-qwen2");
    let printed = ok(align()
        .args([
            "eval",
            "winrate",
            "--model",
            s(&model),
            "--baseline",
            s(&model),
            "--reward-model",
            s(&out.join("final")),
        ])
        .args([
            "--prompts",
            s(&repo().join("data/prompts/medical_prompts.jsonl")),
            "--limit",
            "6",
            "--max-new-tokens",
            "8",
            "--json",
        ])
        .output()
        .unwrap());
    let w: Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!((w["ties"].as_u64(), w["prompts"].as_u64()), (Some(6), Some(6)));
    assert_eq!(w["win_rate"].as_f64(), Some(0.5));
    assert!(w["ci_low"].as_f64().unwrap() < 0.5 && w["ci_high"].as_f64().unwrap() > 0.5);
    // the table form
    let table = ok(align()
        .args(["eval", "reward", "--model", s(&out.join("final")), "--data"])
        .arg(repo().join("data/preference/medical_pairs_eval.jsonl"))
        .args(["--max-length", "512"])
        .output()
        .unwrap());
    assert!(table.contains("accuracy") && table.contains("mean margin"), "{table}");
    // a causal LM is not a reward model
    let bad = align()
        .args(["eval", "reward", "--model", s(&repo().join("tests/fixtures/models/tiny-qwen2")), "--data"])
        .arg(repo().join("data/preference/medical_pairs_eval.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("ForSequenceClassification"), "{err}");
}

#[test]
fn train_dpo_with_overrides_logs_trl_metrics() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let cfg = write_config(tmp.path(), "dpo", &out, "[dpo]\nbeta = 0.1\nprecompute_ref = true");
    ok(align()
        .args(["train", "dpo", "--config", s(&cfg), "--set", "train.max_steps=4", "--set", "train.lr=2e-4"])
        .output()
        .unwrap());
    let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let first: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-5, "{first}");
    for k in [
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
    ] {
        assert!(first[k].is_f64(), "{k} missing: {first}");
        assert!(eval_lines(&out)[0][format!("eval_{k}")].is_f64(), "eval_{k} missing");
    }
    assert!(out.join("final/model.safetensors").is_file());
}

#[test]
fn rlhf_config_mistakes_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    for (stage, section, set, want) in [
        ("reward", "[reward]", "reward.marginn=1", "marginn"),
        ("dpo", "[dpo]", "dpo.loss=kto", "kto"),
        ("dpo", "[dpo]", "dpo.beta=-1", "beta"),
        ("reward", "[reward]", "method=freeze", "freeze"),
    ] {
        let cfg = write_config(tmp.path(), stage, &tmp.path().join(stage), section);
        let out = align().args(["train", stage, "--config", s(&cfg), "--set", set]).output().unwrap();
        assert!(!out.status.success(), "--set {set} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let line =
            err.lines().find(|l| l.starts_with("error:")).unwrap_or_else(|| panic!("no error line for {set}:\n{err}"));
        assert!(line.contains(want) && line.contains(".toml"), "--set {set}: {line}");
    }
}

#[test]
fn dpo_with_lora_trains_an_adapter() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo-lora");
    let cfg = write_config(tmp.path(), "dpo", &out, "[dpo]");
    let run = align()
        .args([
            "train",
            "dpo",
            "--config",
            s(&cfg),
            "--set",
            "method=lora",
            "--set",
            "lora.r=4",
            "--set",
            "train.lr=1e-2",
        ])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    assert!(out.join("final/adapter_config.json").is_file() && out.join("final/adapter_model.safetensors").is_file());
    assert!(!out.join("final/model.safetensors").exists());
    // the reference is the policy with its (zero-initialised) adapters off: the first loss is ln 2
    let first: Value = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .next()
        .unwrap();
    assert!((first["loss"].as_f64().unwrap() - std::f64::consts::LN_2).abs() < 1e-6, "{first}");
}

fn ppo_config(dir: &Path, name: &str, out: &Path, reward: &Path) -> PathBuf {
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 4\nbatch_size = 4\nlr = 1e-3\nmax_length = 256\nsave_every = 1\n[ppo]\nreward_model = {:?}\nrollout_batch_size = 8\nppo_epochs = 2\nmax_new_tokens = 8\ntemperature = 1.0\ntarget_kl = 1.0\n",
            repo().join("tests/fixtures/models/tiny-qwen2"),
            repo().join("data/prompts/medical_qa.jsonl"),
            out,
            reward
        ),
    )
    .unwrap();
    cfg
}

/// PPO on MedicalGPT-style question/answer prompts with a reward model trained by `align train
/// reward`: SIGKILL in the middle of an iteration, then the same command again, ends with the
/// weights (policy and critic) of an uninterrupted run.
#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the test hooks: --features align-cli/fault-injection (scripts/test.sh sets it)"
)]
fn train_ppo_killed_mid_iteration_resumes_to_the_same_weights() {
    let tmp = tempfile::tempdir().unwrap();
    let rm = tmp.path().join("rm");
    let rm_cfg = write_config(tmp.path(), "rm", &rm, "[reward]");
    ok(align().args(["train", "reward", "--config", s(&rm_cfg), "--set", "train.max_steps=4"]).output().unwrap());

    let straight = tmp.path().join("straight");
    let cfg = ppo_config(tmp.path(), "straight", &straight, &rm.join("final"));
    ok(align().args(["train", "ppo", "--config", s(&cfg)]).output().unwrap());

    let killed = tmp.path().join("killed");
    let cfg = ppo_config(tmp.path(), "killed", &killed, &rm.join("final"));
    let mut child =
        align().args(["train", "ppo", "--config", s(&cfg)]).env("ALIGN_TEST_STEP_DELAY_MS", "400").spawn().unwrap();
    let started = std::time::Instant::now();
    while !killed.join("checkpoint-2/COMPLETE").is_file() {
        assert!(started.elapsed() < std::time::Duration::from_secs(300), "checkpoint-2 never appeared");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // iteration 3 is under way (its start is delayed by the test hook)
    std::thread::sleep(std::time::Duration::from_millis(100));
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!killed.join("final").exists(), "the run finished before it was killed");
    ok(align().args(["train", "ppo", "--config", s(&cfg)]).output().unwrap());
    for file in ["final/model.safetensors", "final/value_model/model.safetensors"] {
        let a = std::fs::read(straight.join(file)).unwrap();
        let b = std::fs::read(killed.join(file)).unwrap();
        assert!(a == b, "{file} differs after kill + resume");
    }
    let metrics = |dir: &Path| -> Vec<Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (a, b) = (metrics(&straight), metrics(&killed));
    assert_eq!(a.len(), 4);
    assert_eq!(b.len(), 4, "metrics.jsonl holds each iteration once after the resume");
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x["objective/scores"], y["objective/scores"]);
        assert_eq!(x["kl_coef"], y["kl_coef"]);
    }
}

fn reward_stats(args: &[&str]) -> Value {
    let printed = ok(align()
        .args(["eval", "reward"])
        .args(args)
        .arg("--data")
        .arg(repo().join("data/preference/medical_pairs_eval.jsonl"))
        .args(["--max-length", "512", "--device", "cpu", "--json"])
        .output()
        .unwrap());
    serde_json::from_str(printed.trim()).unwrap()
}

#[test]
fn lora_reward_model_is_an_adapter_that_eval_export_and_winrate_accept() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm-lora");
    let cfg = write_config(tmp.path(), "rm-lora", &out, "[lora]\nr = 8\n[reward]");
    ok(align()
        .args(["train", "reward", "--config", s(&cfg), "--set", "method=lora", "--set", "train.lr=1e-2"])
        .output()
        .unwrap());
    let adapter = out.join("final");
    assert!(adapter.join("adapter_config.json").is_file() && !adapter.join("model.safetensors").exists());
    let last_eval = eval_lines(&out).pop().unwrap();
    // the adapter folder alone (base from adapter_config.json), and base + --adapter, agree with
    // the run's last evaluation
    let alone = reward_stats(&["--model", s(&adapter)]);
    assert_eq!(alone["pairs"], 50);
    let ties = near_tie_share(&adapter);
    let eval_acc = last_eval["eval_accuracy"].as_f64().unwrap();
    assert!((alone["accuracy"].as_f64().unwrap() - eval_acc).abs() <= ties + 1e-9, "{alone} vs {last_eval}");
    assert!(alone["accuracy"].as_f64().unwrap() > 0.6, "{alone}");
    let base = repo().join("tests/fixtures/models/tiny-qwen2");
    let with_flag = reward_stats(&["--model", s(&base), "--adapter", s(&adapter)]);
    assert_eq!(alone, with_flag);
    // export merges it into a full reward model (base from adapter_config.json) with the same scores
    let merged = tmp.path().join("rm-merged");
    let printed = ok(align()
        .args(["export", "--adapter", s(&adapter), "--out", s(&merged), "--device", "cpu"])
        .output()
        .unwrap());
    assert!(printed.contains("reward model") && printed.contains("probe scores"), "{printed}");
    let cfg_json: Value = serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["architectures"][0], "Qwen2ForSequenceClassification");
    assert_eq!(cfg_json["num_labels"], 1);
    let full = reward_stats(&["--model", s(&merged)]);
    assert_eq!(full["accuracy"], alone["accuracy"]);
    let close = |k: &str| (full[k].as_f64().unwrap() - alone[k].as_f64().unwrap()).abs() < 1e-4;
    assert!(close("mean_margin") && close("mean_chosen_reward"), "{full} vs {alone}");
    // win rate judged by the adapter folder
    let printed = ok(align()
        .args(["eval", "winrate", "--model", s(&base), "--baseline", s(&base), "--reward-model", s(&adapter)])
        .args(["--prompts", s(&repo().join("data/prompts/medical_prompts.jsonl"))])
        .args(["--limit", "3", "--max-new-tokens", "4", "--device", "cpu", "--json"])
        .output()
        .unwrap());
    let w: Value = serde_json::from_str(printed.trim()).unwrap();
    assert_eq!(w["ties"].as_u64(), Some(3));
    // a causal-LM adapter is not a reward model
    let bad = align()
        .args([
            "eval",
            "reward",
            "--model",
            s(&base),
            "--adapter",
            s(&repo().join("tests/fixtures/peft/qwen2-all-rslora")),
        ])
        .arg("--data")
        .arg(repo().join("data/preference/medical_pairs_eval.jsonl"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && err.contains("reward-model adapter"), "{err}");
}
