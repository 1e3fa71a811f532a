//! The RM stage end to end on the sample preference data with a tiny model, in full and under
//! LoRA: exact resume, the held-out accuracy beats chance, and the final folder is a reward model
//! (or a PEFT reward-model adapter) that loads back with the scores of the last evaluation.
use std::path::{Path, PathBuf};

use align_core::data::{read_preference, DataOptions, LengthBudget, LengthPolicy};
use align_core::load::spec::load_reward_model_or_adapter;
use align_core::model::scalar::{load_reward_model, ScalarModel};
use align_core::train::config::LoadedConfig;
use align_core::train::preference_batch::{encode_pairs, EncodedPair};
use align_core::ModelTokenizer;
use serde_json::Value;

/// libtorch's random generator is global to the process: runs that draw from it (head and LoRA
/// init, dropout) must not overlap, or their exact-resume guarantees do not hold. Real runs are one
/// per process; these tests take turns.
static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());

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

/// Share of pairs whose chosen and rejected scores are within 1e-4 of each other. Scored in
/// other batches (other padding, so other kernels) such a pair's order may flip — scores are O(1)
/// and agree across batch shapes to ~1e-6 — so two accuracies over the same pairs may differ by
/// this share and no more.
fn near_tie_share(rm: &ScalarModel, pairs: &[EncodedPair]) -> f64 {
    let scores = align_reward::pair_scores(rm, pairs, 1).unwrap();
    scores.iter().filter(|(c, r)| (c - r).abs() < 1e-4).count() as f64 / pairs.len() as f64
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
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
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
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
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
    let ties = near_tie_share(&rm.rm, &enc);
    assert!((stats.accuracy - acc).abs() <= ties + 1e-9, "{} vs {acc} ({ties} near ties)", stats.accuracy);
    assert!((stats.mean_margin - evals[1]["eval_margin"].as_f64().unwrap()).abs() < 1e-3);
}

const LORA: &[&str] = &["method=lora", "lora.r=8", "lora.alpha=16", "lora.dropout=0.1"];

fn with_lora<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    LORA.iter().chain(extra).copied().collect()
}

fn tensor_names(file: &Path) -> Vec<String> {
    tch::Tensor::read_safetensors(file).unwrap().into_iter().map(|(n, _)| n).collect()
}

#[test]
fn lora_run_saves_peft_reward_adapters_and_resumes_bitwise() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let s = align_reward::run(&config(&straight, &with_lora(&[])), false, None).unwrap();
    assert!(s.completed && s.steps == 6);
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &with_lora(&[]));
    assert!(!align_reward::run(&cfg, false, Some(3)).unwrap().completed);
    assert!(align_reward::run(&cfg, false, None).unwrap().completed);
    for d in [&straight, &resumed] {
        assert!(d.join("final/adapter_config.json").is_file() && d.join("final/adapter_model.safetensors").is_file());
        assert!(!d.join("final/model.safetensors").exists(), "a LoRA run saves the adapter, not the base");
    }
    let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
    assert!(a == b, "adapter and head differ after stop + resume (dropout RNG and data order must be restored)");
    assert_eq!(losses(&straight), losses(&resumed));
    // checkpoints are PEFT reward-model adapters with their state: trunk adapters and the head only
    let ckpt = resumed.join("checkpoint-4");
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(ckpt.join("adapter_config.json")).unwrap()).unwrap();
    assert_eq!(cfg_json["task_type"], "SEQ_CLS");
    assert_eq!(cfg_json["modules_to_save"], serde_json::json!(["score"]));
    assert!(ckpt.join("train_state/optimizer.safetensors").is_file());
    let names = tensor_names(&ckpt.join("adapter_model.safetensors"));
    assert!(names.contains(&"base_model.model.score.weight".to_string()));
    assert!(names.iter().all(|n| n == "base_model.model.score.weight" || n.contains(".lora_")), "{names:?}");
    assert_eq!(names.len(), 1 + 2 * 7 * 2, "all-linear on 2 layers: 14 adapted projections + the head");
}

#[test]
fn lora_reward_model_beats_chance_and_its_adapter_scores_as_the_last_evaluation() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm-lora");
    let extra =
        ["train.max_steps=60", "train.batch_size=8", "train.lr=1e-2", "train.eval_every=30", "train.save_every=0"];
    let s = align_reward::run(&config(&out, &with_lora(&extra)), false, None).unwrap();
    assert!(s.completed);
    let lines = metric_lines(&out);
    let train_losses: Vec<f64> = lines.iter().filter_map(|v| v.get("loss")?.as_f64()).collect();
    let (first, last) = (&train_losses[..10], &train_losses[train_losses.len() - 10..]);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    assert!(mean(last) < mean(first), "training loss does not fall: {} → {}", mean(first), mean(last));
    let evals: Vec<&Value> = lines.iter().filter(|v| v.get("eval_loss").is_some()).collect();
    let acc = evals[1]["eval_accuracy"].as_f64().unwrap();
    eprintln!("LoRA RM held-out accuracy: {} after 15 steps, {acc} after 30", evals[0]["eval_accuracy"]);
    assert!(acc >= 0.7, "held-out pairwise accuracy {acc} (chance is 0.5)");

    // the adapter folder (base resolved from adapter_config.json) scores as the last evaluation did
    let (rm, tok_dir) =
        load_reward_model_or_adapter(&out.join("final"), None, tch::Device::Cpu, tch::Kind::Float).unwrap();
    assert_eq!(tok_dir, out.join("final"), "tokenizer files are saved with the adapter");
    let tok = ModelTokenizer::from_dir(&tok_dir).unwrap();
    let pairs = read_preference(&[repo().join("data/preference/medical_pairs_eval.jsonl")], &DataOptions::default())
        .unwrap()
        .records;
    let (enc, _) =
        encode_pairs(&tok, &pairs.iter().collect::<Vec<_>>(), LengthBudget::new(512, LengthPolicy::Truncate)).unwrap();
    let stats = align_reward::pairwise_stats(&rm.rm, &enc, 16).unwrap();
    let ties = near_tie_share(&rm.rm, &enc);
    assert!((stats.accuracy - acc).abs() <= ties + 1e-9, "{} vs {acc} ({ties} near ties)", stats.accuracy);
    assert!((stats.mean_margin - evals[1]["eval_margin"].as_f64().unwrap()).abs() < 1e-3);

    // only adapters and head changed: the merged model's other weights are the base's, bit for bit
    let base = repo().join("tests/fixtures/models/tiny-qwen2");
    let base_vars: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(base.join("model.safetensors")).unwrap().into_iter().collect();
    let vars = rm.vs.variables();
    let mut changed = Vec::new();
    for (name, t) in &vars {
        if name == "score.weight" {
            continue;
        }
        if !t.equal(&base_vars[name]) {
            changed.push(name.clone());
        }
    }
    let adapted = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"];
    assert!(!changed.is_empty());
    assert!(
        changed.iter().all(|n| n.ends_with(".weight") && adapted.iter().any(|p| n.contains(p))),
        "only adapted projection weights may differ after the merge: {changed:?}"
    );
}

#[test]
fn freeze_trains_the_last_layers_and_the_head() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("rm-freeze");
    let cfg = config(&out, &["method=freeze", "freeze.last_layers=1", "train.max_steps=2", "train.save_every=0"]);
    align_reward::run(&cfg, false, None).unwrap();
    let rm = load_reward_model(&out.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
    let base = repo().join("tests/fixtures/models/tiny-qwen2");
    let base_vars: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(base.join("model.safetensors")).unwrap().into_iter().collect();
    for (name, t) in rm.vs.variables() {
        if name == "score.weight" {
            continue;
        }
        let changed = !t.equal(&base_vars[&name]);
        assert_eq!(changed, name.starts_with("model.layers.1."), "{name}: changed = {changed}");
    }
}

#[test]
fn lora_run_continues_a_reward_adapter_and_refuses_a_causal_lm_adapter() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let peft = repo().join("tests/fixtures/peft");
    let llama = format!("model={:?}", repo().join("tests/fixtures/models/tiny-llama").display().to_string());
    // a PEFT reward-model adapter (r 4, its own targets and head) is trained further
    let out = tmp.path().join("continued");
    let start = format!("adapter={:?}", peft.join("llama-seqcls").display().to_string());
    let extra = ["method=lora", llama.as_str(), start.as_str(), "train.max_steps=2", "train.save_every=0"];
    align_reward::run(&config(&out, &extra), false, None).unwrap();
    let cfg: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg["r"].as_i64(), cfg["task_type"].as_str()), (Some(4), Some("SEQ_CLS")));
    assert_eq!(cfg["target_modules"], serde_json::json!(["down_proj", "q_proj", "v_proj"]));
    // a causal-LM adapter cannot be continued as a reward model's
    let start = format!("adapter={:?}", peft.join("llama-qv").display().to_string());
    let extra = ["method=lora", llama.as_str(), start.as_str(), "train.max_steps=2"];
    let e = format!("{:#}", align_reward::run(&config(&tmp.path().join("refused"), &extra), false, None).unwrap_err());
    assert!(e.contains("adapter") && e.contains("CAUSAL_LM") && e.contains("test.toml"), "{e}");
}

#[test]
fn gradient_checkpointing_trains_to_the_same_weights() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let (plain, ckpt) = (tmp.path().join("plain"), tmp.path().join("ckpt"));
    align_reward::run(&config(&plain, &["train.max_steps=3"]), false, None).unwrap();
    align_reward::run(&config(&ckpt, &["train.max_steps=3", "train.gradient_checkpointing=true"]), false, None)
        .unwrap();
    assert_eq!(losses(&plain), losses(&ckpt));
    let a = std::fs::read(plain.join("final/model.safetensors")).unwrap();
    assert!(a == std::fs::read(ckpt.join("final/model.safetensors")).unwrap(), "weights differ");
}

/// QLoRA reward model: LoRA on the 4-bit trunk with the head trained in full, saved as a PEFT
/// SEQ_CLS adapter, resumed bitwise.
#[test]
fn qlora_reward_model_saves_a_peft_adapter_and_resumes_bitwise() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let q = with_lora(&["train.quantize=nf4", "train.double_quant=true"]);
    let straight = tmp.path().join("straight");
    assert!(align_reward::run(&config(&straight, &q), false, None).unwrap().completed);
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &q);
    assert!(!align_reward::run(&cfg, false, Some(3)).unwrap().completed);
    assert!(align_reward::run(&cfg, false, None).unwrap().completed);
    let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
    assert!(a == b, "QLoRA reward adapter differs after stop + resume");
    assert_eq!(losses(&straight), losses(&resumed));
    assert!(losses(&straight).iter().all(|(_, l)| l.is_finite()));
    let names = tensor_names(&straight.join("final/adapter_model.safetensors"));
    assert!(names.contains(&"base_model.model.score.weight".to_string()), "{names:?}");
}

#[test]
fn ia3_run_saves_a_peft_seq_cls_ia3_adapter_and_resumes_bitwise() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    let extra = ["method=ia3", "train.max_steps=4", "train.lr=2e-2"];
    let straight = tmp.path().join("straight");
    assert!(align_reward::run(&config(&straight, &extra), false, None).unwrap().completed);
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &extra);
    assert!(!align_reward::run(&cfg, false, Some(2)).unwrap().completed);
    assert!(align_reward::run(&cfg, false, None).unwrap().completed);
    let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
    assert!(a == b, "(IA)³ vectors and head differ after stop + resume");
    assert_eq!(losses(&straight), losses(&resumed));
    assert!(!straight.join("final/model.safetensors").exists(), "an (IA)³ run saves the adapter, not the base");
    let cfg_json: Value =
        serde_json::from_str(&std::fs::read_to_string(resumed.join("final/adapter_config.json")).unwrap()).unwrap();
    assert_eq!((cfg_json["task_type"].as_str(), cfg_json["peft_type"].as_str()), (Some("SEQ_CLS"), Some("IA3")));
    let names = tensor_names(&resumed.join("checkpoint-2/adapter_model.safetensors"));
    assert!(names.contains(&"base_model.model.score.weight".to_string()));
    assert!(names.iter().all(|n| n == "base_model.model.score.weight" || n.ends_with(".ia3_l")), "{names:?}");
    // the folder loads as a reward model (merged) with the scores of the attached vectors
    let (rm, _) =
        load_reward_model_or_adapter(&resumed.join("final"), None, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let ids = tch::Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10]).view([1, 6]);
    assert!(tch::no_grad(|| rm.rm.forward(&ids)).unwrap().double_value(&[0]).is_finite());
}

#[test]
fn prompt_learning_runs_save_peft_seq_cls_adapters_resume_bitwise_and_continue() {
    let _turn = RNG.lock().unwrap_or_else(|e| e.into_inner());
    let tmp = tempfile::tempdir().unwrap();
    for (method, section) in [
        ("prompt_tuning", "prompt_tuning.num_virtual_tokens=4"),
        ("prefix_tuning", "prefix_tuning.num_virtual_tokens=3"),
    ] {
        let m = format!("method={method}");
        // max_length + the virtual tokens must fit the model's 256 positions
        let extra = [m.as_str(), section, "train.max_steps=4", "train.lr=2e-2", "train.max_length=200"];
        let straight = tmp.path().join(format!("{method}-straight"));
        assert!(align_reward::run(&config(&straight, &extra), false, None).unwrap().completed);
        let resumed = tmp.path().join(format!("{method}-resumed"));
        let cfg = config(&resumed, &extra);
        assert!(!align_reward::run(&cfg, false, Some(2)).unwrap().completed);
        assert!(align_reward::run(&cfg, false, None).unwrap().completed);
        let a = std::fs::read(straight.join("final/adapter_model.safetensors")).unwrap();
        let b = std::fs::read(resumed.join("final/adapter_model.safetensors")).unwrap();
        assert!(a == b, "{method}: virtual tokens and head differ after stop + resume");
        assert_eq!(losses(&straight), losses(&resumed));
        assert!(losses(&straight).iter().all(|(_, l)| l.is_finite()));
        assert!(!straight.join("final/model.safetensors").exists(), "{method}: the adapter is saved, not the base");
        let cfg_json: Value =
            serde_json::from_str(&std::fs::read_to_string(resumed.join("final/adapter_config.json")).unwrap()).unwrap();
        assert_eq!(cfg_json["task_type"], "SEQ_CLS", "{method}");
        let mut names = tensor_names(&resumed.join("checkpoint-2/adapter_model.safetensors"));
        names.sort();
        assert_eq!(names, ["base_model.score.weight", "prompt_embeddings"], "{method}");
        // the head trained: it differs between checkpoint 2 and the end
        let head = |dir: &Path| {
            tch::Tensor::read_safetensors(dir.join("adapter_model.safetensors"))
                .unwrap()
                .into_iter()
                .find(|(n, _)| n == "base_model.score.weight")
                .unwrap()
                .1
        };
        assert!(
            !head(&resumed.join("checkpoint-2")).equal(&head(&resumed.join("final"))),
            "{method}: the head did not train"
        );
        // the folder loads as a reward model with its virtual tokens attached
        let (rm, _) =
            load_reward_model_or_adapter(&resumed.join("final"), None, tch::Device::Cpu, tch::Kind::Float).unwrap();
        let ids = tch::Tensor::from_slice(&[5i64, 6, 7, 8, 9, 10]).view([1, 6]);
        assert!(tch::no_grad(|| rm.rm.forward(&ids)).unwrap().double_value(&[0]).is_finite());
        // an adapter of this method trains further; another method does not take it
        let fin = format!("adapter={:?}", resumed.join("final"));
        let again = [m.as_str(), fin.as_str(), "train.max_steps=2", "train.lr=2e-2", "train.max_length=200"];
        assert!(
            align_reward::run(&config(&tmp.path().join(format!("{method}-more")), &again), false, None)
                .unwrap()
                .completed
        );
        for other in ["method=lora", "method=full", "method=p_tuning"] {
            let more = [other, fin.as_str(), "train.max_steps=2", "train.max_length=200"];
            let Err(e) = align_reward::run(&config(&tmp.path().join("refused"), &more), false, None) else {
                panic!("{other} trained on a {method} adapter")
            };
            let e = format!("{e:#}");
            assert!(e.contains("key 'adapter'") && e.contains(method), "{other}: {e}");
        }
    }
}
