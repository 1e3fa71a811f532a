//! The GRPO-family stage on a tiny policy: on a verifiable toy task (every record's reference
//! answer is "7", rewarded by the accuracy rule) GRPO's reward rises within 40 iterations;
//! metrics carry TRL's names; stop + resume gives bitwise the weights of one run; RLOO's and
//! REINFORCE++'s advantages have their estimators' shape; a LoRA policy's reference is its base;
//! a reward model, a command and rules are weighted and summed; config errors name the key.
use std::path::{Path, PathBuf};

use align_core::train::config::LoadedConfig;
use align_testkit::{metric_lines, rng_lock, same_bytes, stage_config, tiny_model};
use serde_json::Value;
use tch::{Device, Kind};

fn policy_dir() -> PathBuf {
    tiny_model("tiny-qwen2")
}

/// Question/answer records (MedicalGPT's grpo layout) whose reference answer is "7".
fn toy_prompts(dir: &Path) -> PathBuf {
    let file = dir.join("toy.jsonl");
    let questions = [
        "Write a digit.",
        "Give me a number.",
        "Pick a digit please.",
        "Count to one.",
        "What is three plus four?",
        "Name a digit.",
        "Any number?",
        "Say seven.",
    ];
    let lines: Vec<String> =
        questions.iter().map(|q| serde_json::json!({"question": q, "answer": "7"}).to_string()).collect();
    std::fs::write(&file, lines.join("\n") + "\n").unwrap();
    file
}

fn config(stage: &str, out: &Path, data: &Path, body: &str, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 4\nbatch_size = 16\nlr = 1e-3\nmax_length = 128\nsave_every = 2\n[{stage}]\nnum_generations = 4\ngeneration_batch_size = 16\nmax_completion_length = 8\nsample_every = 1\n{body}",
        policy_dir(),
        data,
        out,
    );
    stage_config(&text, stage, extra)
}

const ACCURACY: &str = "[[grpo.rewards]]\ntype = \"accuracy\"\nmode = \"contains\"\n";
const DIGITS: &str = "keywords = [\"0\", \"1\", \"2\", \"3\", \"4\", \"5\", \"6\", \"7\", \"8\", \"9\"]\n";

/// The accuracy rule plus a digits keyword rule of weight `w`: rewards go last in a section
/// (they are array tables).
fn rules_weighted(stage: &str, w: f64) -> String {
    format!(
        "{}[[{stage}.rewards]]\ntype = \"keywords\"\nname = \"digits\"\nweight = {w:?}\n{DIGITS}",
        ACCURACY.replace("grpo", stage)
    )
}

fn rules(stage: &str) -> String {
    rules_weighted(stage, 0.5)
}

fn samples(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("samples.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    metric_lines(out).iter().map(|v| v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))).collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn reward_rises_on_a_verifiable_toy_task_and_metrics_have_trl_names() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let out = tmp.path().join("grpo");
    let extra = ["train.max_steps=40", "train.lr=3e-3", "train.save_every=0", "grpo.sample_every=10"];
    let body = rules_weighted("grpo", 1.0);
    let summary = align_rlhf::run_grpo(&config("grpo", &out, &data, &body, &extra), false, None).unwrap();
    assert!(summary.completed && summary.steps == 40, "{summary:?}");
    for key in [
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "rewards/accuracy/mean",
        "rewards/accuracy/std",
        "rewards/digits/mean",
        "entropy",
        "clip_ratio/low_mean",
        "clip_ratio/high_mean",
        "clip_ratio/region_mean",
        "completions/mean_length",
        "completions/min_length",
        "completions/max_length",
        "completions/clipped_ratio",
        "loss",
        "lr",
        "grad_norm",
        "time/generation",
    ] {
        let v = series(&out, key);
        assert!(v.iter().all(|x| x.is_finite()), "{key}: {v:?}");
    }
    // the reward is the weighted sum of its functions
    for l in metric_lines(&out) {
        let want = l["rewards/accuracy/mean"].as_f64().unwrap() + l["rewards/digits/mean"].as_f64().unwrap();
        assert!((l["reward"].as_f64().unwrap() - want).abs() < 1e-9, "{l}");
    }
    let acc = series(&out, "rewards/accuracy/mean");
    let (first, last) = (mean(&acc[..5]), mean(&acc[acc.len() - 5..]));
    eprintln!("accuracy first 5 iterations {first:.3}, last 5 {last:.3}: {acc:?}");
    assert!(last > first + 0.4, "the accuracy reward did not rise: {first:.3} → {last:.3} ({acc:?})");
    let samples = samples(&out);
    assert_eq!(samples.len(), 4 * 4);
    assert_eq!(samples[0]["reference"], "7");
    assert!(samples[0]["completion"].is_string() && samples[0]["rewards/accuracy"].is_number());
    align_core::load_causal_lm(&out.join("final"), Device::Cpu, Kind::Float).unwrap();
}

/// μ = 2 passes in two minibatches, a KL term (reference model), dynamic sampling and a command
/// reward: 2 iterations + stop + resume + 2 equal 4 straight iterations to the bit.
#[test]
fn stop_and_resume_equals_one_run_bitwise() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let body = format!(
        "beta = 0.04\nnum_iterations = 2\nmini_batch_size = 8\nloss_type = \"grpo\"\ndynamic_sampling = true\nreward_command = \"awk '{{ print (length($0) % 5) / 4 }}'\"\nreward_command_weight = 0.25\n{}",
        rules("grpo")
    );
    let extra = ["train.batch_size=4"];
    let straight = tmp.path().join("straight");
    align_rlhf::run_grpo(&config("grpo", &straight, &data, &body, &extra), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    let s = align_rlhf::run_grpo(&config("grpo", &resumed, &data, &body, &extra), false, Some(2)).unwrap();
    assert!(!s.completed && s.steps == 2, "{s:?}");
    assert!(resumed.join("checkpoint-2/train_state/policy_optimizer.safetensors").is_file());
    let s = align_rlhf::run_grpo(&config("grpo", &resumed, &data, &body, &extra), false, None).unwrap();
    assert!(s.completed && s.steps == 4, "{s:?}");
    assert!(same_bytes(&straight.join("final/model.safetensors"), &resumed.join("final/model.safetensors")));
    let (a, b) = (metric_lines(&straight), metric_lines(&resumed));
    assert_eq!((a.len(), b.len()), (4, 4));
    for (x, y) in a.iter().zip(&b) {
        for key in [
            "reward",
            "rewards/reward_command/mean",
            "kl",
            "loss",
            "clip_ratio/region_mean",
            "dynamic_sampling/dropped_groups",
        ] {
            assert!(x[key].is_number(), "{key} missing: {x}");
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
    // the KL term moved the policy away from the reference after the first update
    assert!(a[3]["kl"].as_f64().unwrap() > 0.0, "{}", a[3]);
}

/// RLOO's leave-one-out advantages sum to 0 within each group; REINFORCE++'s batch-normalised
/// advantages have mean 0 over the batch; both penalise the KL in the reward (beta defaults to
/// 0.05) and share GRPO's loss (CISPO and GSPO here).
#[test]
fn rloo_and_reinforce_pp_advantages_have_their_estimators_shape() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let extra = ["train.max_steps=2", "train.save_every=0"];
    for (stage, more) in [
        ("rloo", "loss_type = \"cispo\"\n"),
        ("reinforce_pp", "importance_sampling_level = \"sequence\"\ngroup_baseline = true\n"),
    ] {
        let out = tmp.path().join(stage);
        let body = format!("num_samples = 16\n{more}{}", rules(stage));
        let s = align_rlhf::run_grpo(&config(stage, &out, &data, &body, &extra), false, None).unwrap();
        assert!(s.completed, "{stage}: {s:?}");
        let metrics = metric_lines(&out);
        assert!(metrics.iter().all(|m| m["kl"].as_f64().is_some_and(f64::is_finite)), "{stage}: {metrics:?}");
        let samples = samples(&out);
        assert_eq!(samples.len(), 2 * 16);
        for step in samples.chunks(16) {
            let adv: Vec<f64> = step.iter().map(|s| s["advantage"].as_f64().unwrap()).collect();
            if stage == "rloo" {
                assert!(metrics[0]["cispo_clip_ratio"].is_number());
                for g in adv.chunks(4) {
                    assert!(g.iter().sum::<f64>().abs() < 1e-9, "rloo group advantages {g:?}");
                }
            } else {
                assert!(mean(&adv).abs() < 1e-9, "reinforce_pp advantages {adv:?}");
                assert!(adv.iter().any(|a| a.abs() > 1e-3), "{adv:?}");
            }
        }
    }
}

/// A LoRA policy with fresh adapters and beta > 0 uses its own base as the reference: the first
/// iteration's KL is exactly 0.
#[test]
fn lora_policy_uses_its_base_as_reference() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let out = tmp.path().join("lora");
    let body = format!("beta = 0.1\n{}", rules("grpo"));
    let extra = ["method=\"lora\"", "train.max_steps=2", "lora.r=4"];
    align_rlhf::run_grpo(&config("grpo", &out, &data, &body, &extra), false, None).unwrap();
    let kl = series(&out, "kl");
    assert!(kl[0].abs() < 1e-6, "first-iteration KL {kl:?}");
    assert!(out.join("final/adapter_config.json").is_file());
}

/// A reward model (built from the policy with a fresh head), weighted, and a rule are summed.
#[test]
fn a_reward_model_and_rules_are_weighted_and_summed() {
    use align_core::model::scalar::{scalar_model_from_causal_lm, write_scalar_model, ScoreInit};
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let rm_dir = tmp.path().join("rm");
    let rm =
        scalar_model_from_causal_lm(&policy_dir(), Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 3)).unwrap();
    std::fs::create_dir_all(&rm_dir).unwrap();
    write_scalar_model(&rm.vs, &rm.rm, &rm_dir, None, Some(&policy_dir())).unwrap();
    let out = tmp.path().join("with-rm");
    let body = format!("reward_model = {:?}\nreward_model_weight = 0.5\n{ACCURACY}", rm_dir.display().to_string());
    let extra = ["train.max_steps=1"];
    align_rlhf::run_grpo(&config("grpo", &out, &data, &body, &extra), false, None).unwrap();
    let m = &metric_lines(&out)[0];
    let rm_mean = m["rewards/reward_model/mean"].as_f64().unwrap();
    assert!(rm_mean != 0.0 && m["rewards/reward_model/std"].as_f64().unwrap() > 0.0, "{m}");
    let want = 0.5 * rm_mean + m["rewards/accuracy/mean"].as_f64().unwrap();
    assert!((m["reward"].as_f64().unwrap() - want).abs() < 1e-9, "{m}");
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let data = toy_prompts(tmp.path());
    let out = tmp.path().join("x");
    let r = rules("grpo");
    for (stage, body, set, want) in [
        ("grpo", r.as_str(), "grpo.bogus=1", "bogus"),
        ("grpo", r.as_str(), "grpo.num_generations=1", "num_generations"),
        ("grpo", r.as_str(), "grpo.generation_batch_size=10", "generation_batch_size"),
        ("grpo", r.as_str(), "grpo.reference=\"x\"", "reference: beta = 0"),
        ("grpo", r.as_str(), "grpo.normalize_advantages=true", "normalize_advantages: only rloo"),
        ("grpo", "", "grpo.beta=0.1", "rewards: no reward given"),
        ("grpo", "[[grpo.rewards]]\ntype = \"format\"\nmode = \"exact\"\n", "grpo.beta=0.0", "rewards[0].mode"),
        (
            "rloo",
            "[[rloo.rewards]]\ntype = \"length\"\nmin = 2\n",
            "rloo.scale_rewards=\"none\"",
            "scale_rewards: only grpo",
        ),
    ] {
        let cfg = config(stage, &out, &data, body, &[set]);
        let msg = format!("{:#}", align_rlhf::run_grpo(&cfg, false, Some(0)).unwrap_err());
        assert!(msg.contains(&format!("[{stage}]")) && msg.contains(want), "{set}: {msg}");
    }
    let cfg = config("grpo", &out, &data, &r, &["grpo.loss_type=\"cispo\"", "grpo.epsilon=0.3"]);
    let msg = format!("{:#}", align_rlhf::run_grpo(&cfg, false, Some(0)).unwrap_err());
    assert!(msg.contains("epsilon: loss_type = \"cispo\" has no lower clip"), "{msg}");
    // an accuracy reward needs every record's reference answer, and names the record
    let bare = tmp.path().join("bare.jsonl");
    std::fs::write(&bare, "{\"prompt\": \"hello there\"}\n{\"prompt\": \"and again\"}\n").unwrap();
    let msg = format!("{:#}", align_rlhf::run_grpo(&config("grpo", &out, &bare, &r, &[]), false, None).unwrap_err());
    assert!(msg.contains("bare.jsonl:1") && msg.contains("reference answer"), "{msg}");
}
