//! The distillation stage with tiny models (student tiny-qwen2, teacher tiny-qwen3: other
//! weights, the same tokenizer): the student's KL to the teacher falls clearly within a few dozen
//! steps; exact resume with on-policy batches (sampling draws from the step's seeded stream); a
//! LoRA student and the chunked heads train; a teacher with another vocabulary and misused keys
//! are errors that name the key.
use std::path::Path;

use align_core::train::config::LoadedConfig;
use align_testkit::{metric_lines, rng_lock, sample_data, stage_config, tiny_model, train_series};
use serde_json::Value;

fn config_with(out: &Path, teacher: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\nval_data = [{:?}]\noutput_dir = {out:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_length = 256\nsave_every = 2\nwarmup_ratio = 0.1\n[distill]\nteacher = {teacher:?}\n",
        tiny_model("tiny-qwen2"),
        sample_data("sft/medical_sharegpt.jsonl"),
        sample_data("sft/medical_sft_eval.jsonl"),
    );
    stage_config(&text, "distill", extra)
}

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    config_with(out, &tiny_model("tiny-qwen3"), extra)
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    train_series(out, key)
}

/// β = 0 makes the divergence the forward KL(teacher ‖ student) per completion token. Step 1's
/// value is measured before any update; the mean of the last 5 steps must be well under it, and
/// the held-out value must fall between the two evaluations.
#[test]
fn distillation_lowers_the_students_kl_to_the_teacher() {
    // every training loop reseeds the process-global generator: runs take turns
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("distill");
    let sets = [
        "distill.beta=0.0",
        "distill.temperature=1.0",
        "train.max_steps=16",
        "train.batch_size=8",
        "train.lr=1e-2",
        "train.save_every=0",
        "train.eval_every=8",
    ];
    let s = align_rlhf::run_distill(&config(&out, &sets), false, None).unwrap();
    assert!(s.completed);
    let eval: Vec<f64> =
        metric_lines(&out).iter().filter_map(|v| v.get("eval_divergence").and_then(Value::as_f64)).collect();
    let train = series(&out, "divergence");
    let tail = train[train.len() - 5..].iter().sum::<f64>() / 5.0;
    eprintln!("KL(teacher ‖ student) per token: step 1 {:.4}, last 5 steps {tail:.4}; held-out {eval:?}", train[0]);
    assert_eq!(train.len(), 16);
    assert!(tail < 0.6 * train[0], "the KL to the teacher did not fall clearly: {train:?}");
    assert!(eval.len() >= 2 && eval[eval.len() - 1] < eval[0], "held-out KL did not fall: {eval:?}");
    // alpha = 0: the loss is the divergence alone
    for (l, d) in series(&out, "loss").iter().zip(&train) {
        assert!((l - d).abs() <= 1e-5 * d.abs().max(1e-3), "loss {l} vs divergence {d}");
    }
    align_core::load_causal_lm(&out.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
}

#[test]
fn on_policy_stop_and_resume_equals_straight_run_bitwise() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let sets = ["distill.lmbda=0.5", "distill.max_new_tokens=8", "distill.alpha=0.3", "val_data=[]"];
    let straight = tmp.path().join("straight");
    align_rlhf::run_distill(&config(&straight, &sets), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &sets);
    let first = align_rlhf::run_distill(&cfg, false, Some(3)).unwrap();
    assert!(!first.completed && first.steps == 3);
    let second = align_rlhf::run_distill(&cfg, false, None).unwrap();
    assert!(second.completed && second.steps == 6);
    eprintln!("on-policy resume: {:.1}s + {:.1}s", first.seconds, second.seconds);
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after stop + resume");
    assert_eq!(series(&straight, "loss"), series(&resumed, "loss"));
    let on = series(&straight, "on_policy");
    assert_eq!(on, series(&resumed, "on_policy"));
    // 6 steps of one micro-batch each, each on-policy with probability ½: both kinds occur here
    assert!(on.contains(&1.0) && on.contains(&0.0), "{on:?}");
}

#[test]
fn a_lora_student_trains_with_chunked_heads_like_the_whole_heads() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, more: &[&str]| {
        let out = tmp.path().join(name);
        let sets: Vec<&str> =
            ["method=lora", "lora.r=4", "lora.dropout=0.0", "train.max_steps=2", "train.save_every=0", "val_data=[]"]
                .iter()
                .chain(more)
                .copied()
                .collect();
        align_rlhf::run_distill(&config(&out, &sets), false, None).unwrap();
        out
    };
    let whole = run("whole", &[]);
    let chunked = run("chunked", &["train.loss_chunk_tokens=16"]);
    for (x, y) in series(&whole, "loss").iter().zip(series(&chunked, "loss")) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3), "chunked loss {y} vs {x}");
    }
    assert!(chunked.join("final/adapter_model.safetensors").is_file());
}

/// The teacher held in 4 bits (NF4, the QLoRA layout) scores the student's batches: the
/// divergence differs from the full-precision teacher's, but only by the quantisation error.
#[test]
fn a_4bit_teacher_teaches() {
    let _rng = rng_lock();
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, more: &[&str]| {
        let out = tmp.path().join(name);
        let sets: Vec<&str> =
            ["train.max_steps=1", "train.save_every=0", "val_data=[]"].iter().chain(more).copied().collect();
        align_rlhf::run_distill(&config(&out, &sets), false, None).unwrap();
        series(&out, "divergence")[0]
    };
    let (full, nf4) = (run("full", &[]), run("nf4", &["distill.teacher_quantize=nf4"]));
    eprintln!("step-1 divergence: full-precision teacher {full:.6}, NF4 teacher {nf4:.6}");
    assert!(nf4.is_finite() && nf4 > 0.0 && nf4 != full, "{full} vs {nf4}");
    assert!((nf4 - full).abs() < 0.5 * full, "{full} vs {nf4}");
}

#[test]
fn a_teacher_with_another_vocabulary_and_misused_keys_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let teacher = tmp.path().join("teacher");
    std::fs::create_dir(&teacher).unwrap();
    let src = tiny_model("tiny-qwen3");
    for f in std::fs::read_dir(&src).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, teacher.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = teacher.join("config.json");
    let mut c: Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    c["vocab_size"] = Value::from(400);
    std::fs::write(&cfg_path, c.to_string()).unwrap();
    let e = align_rlhf::run_distill(&config_with(&tmp.path().join("v"), &teacher, &[]), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[distill] teacher") && e.contains("vocab_size 400"), "{e}");
    let e = align_rlhf::run_distill(&config(&tmp.path().join("l"), &["distill.lmbda=0.5"]), false, None)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("test.toml") && e.contains("[distill]") && e.contains("'max_new_tokens'"), "{e}");
    let e = LoadedConfig::from_table(
        toml::from_str(
            "model = \"m\"\ndata = [\"d\"]\noutput_dir = \"o\"\n[distill]\nteacher = \"t\"\nkl = \"reverse\"\n",
        )
        .unwrap(),
        Path::new("test.toml"),
        &[],
        "distill",
    )
    .unwrap()
    .stage_section::<align_rlhf::DistillSection>()
    .unwrap_err()
    .to_string();
    assert!(e.contains("[distill]") && e.contains("kl"), "{e}");
}
