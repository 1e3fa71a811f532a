//! The PPO stage on a tiny policy with a rule-based toy reward model the test builds: the score
//! rises within a bounded number of iterations while the KL stays bounded, metrics are finite and
//! named as TRL/OpenRLHF name them, and stop + resume gives bitwise the weights of one run.
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use align_core::model::scalar::{write_scalar_model, ScalarModel};
use align_core::train::config::LoadedConfig;
use align_core::ModelConfig;
use serde_json::Value;
use tch::{nn::VarStore, Device, Kind, Tensor};

/// libtorch's random generator is process-global: PPO runs sample, so they take turns.
static RNG: Mutex<()> = Mutex::new(());

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn policy_dir() -> PathBuf {
    repo().join("tests/fixtures/models/tiny-qwen2")
}

/// A one-layer reward model whose score grows with the share of digit tokens in the
/// conversation (prompts rarely hold digits, so the response decides): attention is uniform (zero queries and keys), values and output are
/// the identity, the MLP is off, so the last position's hidden state is the mean of the
/// (normalised) embeddings; the head points at the mean embedding of the favoured tokens.
fn toy_reward_model(dir: &Path) -> Vec<i64> {
    let tokenizer: Value =
        serde_json::from_str(&std::fs::read_to_string(policy_dir().join("tokenizer.json")).unwrap()).unwrap();
    let favoured: Vec<i64> = tokenizer["model"]["vocab"]
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| k.chars().any(|c| c.is_ascii_digit()))
        .map(|(_, v)| v.as_i64().unwrap())
        .collect();
    std::fs::create_dir_all(dir).unwrap();
    let config = serde_json::json!({
        "architectures": ["LlamaForSequenceClassification"], "model_type": "llama", "vocab_size": 320,
        "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 4, "head_dim": 8, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
        "max_position_embeddings": 512, "tie_word_embeddings": false, "pad_token_id": 0, "eos_token_id": 2,
        "num_labels": 1
    });
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    let config = ModelConfig::from_dir(dir).unwrap();
    let vs = VarStore::new(Device::Cpu);
    let rm = ScalarModel::new(&vs.root(), &config, 0);
    tch::manual_seed(7);
    let embed = Tensor::randn([320, 32], (Kind::Float, Device::Cpu)) * 0.01;
    let unit = |t: &Tensor| t / t.square().mean_dim(-1, true, Kind::Float).sqrt();
    let direction = unit(&embed).index_select(0, &Tensor::from_slice(&favoured)).mean_dim(0, false, Kind::Float);
    let direction = unit(&direction.view([1, 32])) * 2.0;
    tch::no_grad(|| {
        for (name, mut t) in vs.variables() {
            let value = match name.as_str() {
                "model.embed_tokens.weight" => embed.shallow_clone(),
                "score.weight" => direction.shallow_clone(),
                n if n.ends_with("v_proj.weight") || n.ends_with("o_proj.weight") => {
                    Tensor::eye(32, (Kind::Float, Device::Cpu))
                }
                n if n.contains("norm") => Tensor::ones(t.size(), (Kind::Float, Device::Cpu)),
                _ => Tensor::zeros(t.size(), (Kind::Float, Device::Cpu)),
            };
            t.copy_(&value);
        }
    });
    write_scalar_model(&vs, &rm, dir, None, Some(&policy_dir())).unwrap();
    favoured
}

fn config(out: &Path, reward: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 4\nbatch_size = 8\nlr = 1e-3\nmax_length = 256\nsave_every = 2\n[ppo]\nreward_model = {:?}\nrollout_batch_size = 16\nmini_batch_size = 8\nppo_epochs = 2\nmax_new_tokens = 12\ntemperature = 1.0\nkl_coef = 0.05\nsample_every = 2\n",
        policy_dir(),
        repo().join("data/prompts/medical_prompts.jsonl"),
        out,
        reward
    );
    let table: toml::Table = toml::from_str(&text).unwrap();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    LoadedConfig::from_table(table, Path::new("ppo.toml"), &extra, "ppo").unwrap()
}

fn lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .collect()
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    lines(out).iter().map(|v| v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))).collect()
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn toy_reward_model_prefers_the_favoured_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("rm");
    toy_reward_model(&dir);
    let rm = align_core::model::scalar::load_reward_model(&dir, Device::Cpu, Kind::Float).unwrap();
    let tok = align_core::ModelTokenizer::from_dir(&dir).unwrap();
    let prompt = vec![vec![align_core::text::chat::ChatMessage::new("user", "What helps a headache?")]; 3];
    let answers = ["the rest".to_string(), "xyz abc xyz".to_string(), "123 456 7890 42".to_string()];
    let s = align_core::eval::winrate::score_answers(&rm.rm, &tok, &prompt, &answers, 512, 4).unwrap();
    eprintln!("toy scores: {s:?}");
    assert!(s[2] > s[0] + 1.0 && s[2] > s[1] + 1.0, "{s:?}");
}

#[test]
fn reward_rises_with_bounded_kl_and_metrics_are_named_and_finite() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let out = tmp.path().join("ppo");
    let cfg = config(
        &out,
        &reward,
        &[
            "train.max_steps=20",
            "train.save_every=0",
            "ppo.value_model=\"policy\"",
            "ppo.rollout_batch_size=32",
            "ppo.mini_batch_size=16",
            "ppo.max_new_tokens=16",
        ],
    );
    let summary = align_rlhf::run_ppo(&cfg, false, None).unwrap();
    assert!(summary.completed && summary.steps == 20, "{summary:?}");
    let all = lines(&out);
    for key in [
        "objective/kl",
        "objective/entropy",
        "objective/rlhf_reward",
        "objective/scores",
        "objective/non_score_reward",
        "policy/approxkl",
        "policy/clipfrac",
        "val/vf_loss",
        "val/clipfrac",
        "val/mean",
        "response_length_mean",
        "eos_rate",
        "time/generation",
        "time/scoring",
        "time/forward",
        "time/optimisation",
        "rollout_tokens_per_second",
        "loss",
        "lr",
        "grad_norm",
    ] {
        for v in &all {
            let x = v[key].as_f64().unwrap_or_else(|| panic!("{key} missing in {v}"));
            assert!(x.is_finite(), "{key} = {x} in {v}");
        }
    }
    let score = series(&out, "rm/score");
    let kl = series(&out, "objective/kl");
    let (first, last) = (mean(&score[..5]), mean(&score[score.len() - 5..]));
    eprintln!("rm/score first 5 iterations {first:.4}, last 5 {last:.4}; kl {kl:?}; scores {score:?}");
    assert!(last > first + 0.5, "the reward did not rise: {first:.4} → {last:.4} ({score:?})");
    assert!(kl.iter().all(|k| k.abs() < 10.0), "KL not bounded: {kl:?}");
    // samples every 2 iterations, 4 each
    let samples = std::fs::read_to_string(out.join("samples.jsonl")).unwrap();
    let samples: Vec<Value> = samples.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(samples.len(), 10 * 4);
    assert!(samples[0]["prompt"].as_str().unwrap().contains("<|im_start|>assistant"));
    assert!(samples[0]["score"].as_f64().is_some() && samples[0]["response"].is_string());
    // the final folder is a loadable causal LM with its critic beside it
    align_core::load_causal_lm(&out.join("final"), Device::Cpu, Kind::Float).unwrap();
    align_core::model::scalar::load_reward_model(&out.join("final/value_model"), Device::Cpu, Kind::Float).unwrap();
}

fn tensors(dir: &Path) -> Vec<(String, Tensor)> {
    let mut v = Tensor::read_safetensors(dir.join("model.safetensors")).unwrap();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn assert_same_weights(a: &Path, b: &Path) {
    let (x, y) = (tensors(a), tensors(b));
    assert_eq!(x.len(), y.len());
    for ((n, s), (_, t)) in x.iter().zip(&y) {
        assert!(s.equal(t), "{n} differs between {} and {}", a.display(), b.display());
    }
}

#[test]
fn stop_and_resume_equals_one_run_bitwise() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let straight = tmp.path().join("straight");
    let extra = ["ppo.target_kl=0.5", "ppo.normalize_reward=true", "ppo.missing_eos_penalty=0.5"];
    align_rlhf::run_ppo(&config(&straight, &reward, &extra), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    let s = align_rlhf::run_ppo(&config(&resumed, &reward, &extra), false, Some(2)).unwrap();
    assert!(!s.completed && s.steps == 2, "{s:?}");
    assert!(resumed.join("checkpoint-2/value_model/model.safetensors").is_file());
    assert!(resumed.join("checkpoint-2/train_state/policy_optimizer.safetensors").is_file());
    let s = align_rlhf::run_ppo(&config(&resumed, &reward, &extra), false, None).unwrap();
    assert!(s.completed && s.steps == 4, "{s:?}");
    assert_same_weights(&straight.join("final"), &resumed.join("final"));
    assert_same_weights(&straight.join("final/value_model"), &resumed.join("final/value_model"));
    let (a, b) = (lines(&straight), lines(&resumed));
    assert_eq!(a.len(), 4);
    for (x, y) in a.iter().zip(&b) {
        for key in ["objective/scores", "objective/kl", "kl_coef", "loss", "val/vf_loss"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
    // the adaptive controller moved the coefficient and it survived the resume
    assert_ne!(a[3]["kl_coef"].as_f64(), Some(0.05));
}

#[test]
fn lora_policy_uses_its_base_as_reference() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let out = tmp.path().join("lora");
    let cfg = config(
        &out,
        &reward,
        &["method=\"lora\"", "train.max_steps=2", "lora.r=4", "lora.targets=[\"q_proj\",\"v_proj\"]"],
    );
    align_rlhf::run_ppo(&cfg, false, None).unwrap();
    let kl = series(&out, "objective/kl");
    // fresh adapters start as the identity (B = 0): the first rollout's KL is exactly 0
    assert!(kl[0].abs() < 1e-6, "first-iteration KL {kl:?}");
    assert!(out.join("final/adapter_config.json").is_file());
    assert!(out.join("final/value_model/config.json").is_file());
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    let out = tmp.path().join("x");
    for (set, want) in [
        ("ppo.rollout_batch_size=1", "rollout_batch_size"),
        ("ppo.temperature=0.0", "temperature"),
        ("ppo.lam=1.5", "lam"),
        ("ppo.bogus=1", "bogus"),
    ] {
        let err = align_rlhf::run_ppo(&config(&out, &reward, &[set]), false, None).unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.contains("[ppo]") && msg.contains(want), "{set}: {msg}");
    }
    let err = align_rlhf::run_ppo(&config(&out, &reward, &[]), false, None).unwrap_err();
    assert!(format!("{err:#}").contains("rm"), "{err:#}");
}

/// A LoRA reward model (`align train reward` with `method = "lora"` saves a PEFT `SEQ_CLS`
/// adapter folder) is accepted as `[ppo] reward_model`, for the reward and the critic, and gives
/// bitwise the run of its merged full folder.
#[test]
fn a_lora_reward_adapter_folder_runs_as_its_merged_reward_model() {
    use align_core::load::spec::load_reward_model_or_adapter;
    use align_core::model::scalar::{scalar_model_from_causal_lm, ScoreInit};
    use align_core::peft::lora::{attach_lora, save_adapter, AdapterSaveOptions, LoraConfig, LoraTargets};
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("rm-lora");
    let mut m =
        scalar_model_from_causal_lm(&policy_dir(), Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 3)).unwrap();
    tch::manual_seed(4);
    let lora =
        LoraConfig { r: 4, alpha: 8.0, targets: LoraTargets::names(&["q_proj", "v_proj"]), ..Default::default() };
    attach_lora(&m.vs, &mut m.rm, &lora).unwrap();
    tch::no_grad(|| {
        for (_, lin) in m.rm.linears() {
            if let Some(l) = &lin.lora {
                l.lora_b.shallow_clone().copy_(&(Tensor::randn(l.lora_b.size(), (Kind::Float, Device::Cpu)) * 0.1));
            }
        }
    });
    let opts = AdapterSaveOptions {
        base_model_name_or_path: Some(policy_dir().display().to_string()),
        companions_from: Some(&policy_dir()),
    };
    save_adapter(&m.rm, &adapter, &opts).unwrap();
    let merged = tmp.path().join("rm-merged");
    let (full, _) = load_reward_model_or_adapter(&adapter, None, Device::Cpu, Kind::Float).unwrap();
    std::fs::create_dir_all(&merged).unwrap();
    write_scalar_model(&full.vs, &full.rm, &merged, None, Some(&policy_dir())).unwrap();

    let extra = ["train.max_steps=2", "train.save_every=0"];
    let (a, b) = (tmp.path().join("with-adapter"), tmp.path().join("with-merged"));
    align_rlhf::run_ppo(&config(&a, &adapter, &extra), false, None).unwrap();
    align_rlhf::run_ppo(&config(&b, &merged, &extra), false, None).unwrap();
    let (x, y) = (lines(&a), lines(&b));
    assert_eq!(x.len(), 2);
    for (x, y) in x.iter().zip(&y) {
        for key in ["objective/scores", "val/vf_loss", "loss"] {
            assert_eq!(x[key], y[key], "{key}: {x} vs {y}");
        }
    }
    // the critic started from the merged reward model and trained in full
    assert_same_weights(&a.join("final/value_model"), &b.join("final/value_model"));
}

/// An (IA)³ reward model (a PEFT `SEQ_CLS` IA3 folder, as `align train rm` with
/// `method = "ia3"` saves) is accepted as `[ppo] reward_model`: the reward and the value model
/// (critic) are its merged model, and the run trains and saves the critic.
#[test]
fn an_ia3_reward_adapter_folder_runs_as_reward_and_value_model() {
    use align_core::model::scalar::{scalar_model_from_causal_lm, ScoreInit};
    use align_core::peft::ia3::{attach_ia3, save_ia3_adapter, Ia3Config};
    use align_core::peft::lora::AdapterSaveOptions;
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let adapter = tmp.path().join("rm-ia3");
    let mut m =
        scalar_model_from_causal_lm(&policy_dir(), Device::Cpu, Kind::Float, 0, ScoreInit::default_for(32, 3)).unwrap();
    attach_ia3(&m.vs, &mut m.rm, &Ia3Config::default()).unwrap();
    let opts = AdapterSaveOptions {
        base_model_name_or_path: Some(policy_dir().display().to_string()),
        companions_from: Some(&policy_dir()),
    };
    save_ia3_adapter(&m.rm, &adapter, &opts).unwrap();
    let out = tmp.path().join("ppo");
    align_rlhf::run_ppo(&config(&out, &adapter, &["train.max_steps=2", "train.save_every=0"]), false, None).unwrap();
    let l = lines(&out);
    assert_eq!(l.len(), 2);
    assert!(l.iter().all(|v| v["val/vf_loss"].as_f64().is_some_and(f64::is_finite)), "{l:?}");
    assert!(out.join("final/value_model/config.json").is_file());
}

/// A guardrail that trips every iteration (responses can never reach 1000 tokens): with
/// `stop_on_guardrail` the run stops with an error after `guardrail_patience` iterations, the
/// summary says why, and the iteration that tripped it is not saved (checkpoints before it are
/// kept); without it the run only warns and completes.
#[test]
fn a_guardrail_stops_the_run_only_with_stop_on_guardrail() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let guard = ["ppo.min_response_length=1000", "ppo.guardrail_patience=2", "ppo.stop_on_guardrail=true"];
    let stopped = tmp.path().join("stopped");
    let e = align_rlhf::run_ppo(&config(&stopped, &reward, &guard), false, None).unwrap_err().to_string();
    assert!(e.contains("guardrail") && e.contains("min_response_length"), "{e}");
    let summary: Value =
        serde_json::from_str(&std::fs::read_to_string(stopped.join("train_summary.json")).unwrap()).unwrap();
    assert_eq!(summary["completed"], false, "{summary}");
    assert_eq!(summary["steps"], 2, "{summary}");
    assert!(summary["stop_reason"].as_str().unwrap().contains("stopped by a guardrail"), "{summary}");
    assert!(!stopped.join("checkpoint-2").exists(), "the iteration that tripped the guardrail is not saved");
    assert!(!stopped.join("final").exists(), "a stopped run writes no final/");

    let warned = tmp.path().join("warned");
    let s = align_rlhf::run_ppo(&config(&warned, &reward, &guard[..2]), false, None).unwrap();
    assert!(s.completed && s.steps == 4, "{s:?}");
}

/// PPO's updates with gradient checkpointing (policy and critic) train to the same bytes, and
/// the entropy metric is there.
#[test]
fn gradient_checkpointing_gives_the_same_updates() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let run = |name: &str, more: &[&str]| {
        let out = tmp.path().join(name);
        let sets: Vec<&str> = ["train.max_steps=2"].iter().chain(more).copied().collect();
        align_rlhf::run_ppo(&config(&out, &reward, &sets), false, None).unwrap();
        out
    };
    let plain = run("plain", &[]);
    let ckpt = run("ckpt", &["train.gradient_checkpointing=true"]);
    let a = std::fs::read(plain.join("final/model.safetensors")).unwrap();
    assert!(a == std::fs::read(ckpt.join("final/model.safetensors")).unwrap(), "policy weights differ");
    let entropy = series(&plain, "policy/entropy_avg");
    assert!(entropy.iter().all(|e| e.is_finite() && *e > 0.0), "{entropy:?}");
    assert_eq!(entropy, series(&ckpt, "policy/entropy_avg"));
}

/// QLoRA PPO: the policy's base is held in 4 bits (NF4), the reference is that quantised base
/// with the adapters disabled (first KL exactly 0), the critic stays a full-precision model.
#[test]
fn qlora_policy_uses_its_quantised_base_as_reference() {
    let _rng = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let reward = tmp.path().join("rm");
    toy_reward_model(&reward);
    let out = tmp.path().join("qlora");
    let cfg = config(
        &out,
        &reward,
        &["method=\"lora\"", "train.max_steps=2", "lora.r=4", "train.quantize=\"nf4\"", "train.double_quant=true"],
    );
    align_rlhf::run_ppo(&cfg, false, None).unwrap();
    let kl = series(&out, "objective/kl");
    assert!(kl[0].abs() < 1e-6, "first-iteration KL {kl:?}");
    assert!(series(&out, "loss/policy").iter().all(|l| l.is_finite()));
    assert!(out.join("final/adapter_config.json").is_file() && !out.join("final/model.safetensors").exists());
    assert!(out.join("final/value_model/config.json").is_file());
}
