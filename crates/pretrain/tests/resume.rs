//! Exact resume in-process: 6 straight steps equal 3 steps, a stop, and a resume to 6 — bitwise
//! identical weights and identical logged losses; gradient accumulation normalises by tokens
//! (compared as gradients, to f32 rounding: the two computations run different kernels).
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

/// The step's gradient as the loop applied it: after one AdamW step from zero moments the first
/// moment `exp_avg` is `(1 − β1) · g` (β1 = 0.9), saved in `checkpoint-1/train_state`.
fn first_step_gradients(out: &Path) -> Vec<(String, tch::Tensor)> {
    let file = out.join("checkpoint-1/train_state/optimizer.safetensors");
    let mut g: Vec<(String, tch::Tensor)> = tch::Tensor::read_safetensors(&file)
        .unwrap()
        .into_iter()
        .filter_map(|(n, t)| Some((n.strip_prefix("exp_avg.")?.to_string(), t / 0.1)))
        .collect();
    g.sort_by(|a, b| a.0.cmp(&b.0));
    g
}

/// One batch of 4 and two accumulated micro-batches of 2 are the same sum in another order: the
/// gradients agree to f32 rounding. They are compared before the optimizer, not the weights
/// after it: AdamW's first step is `lr · g / (|g| + eps)`, about `lr · sign(g)`, so a last-bit
/// difference in a near-zero gradient element moves that weight by up to a whole `lr`, and
/// whether that happens depends on which CPU kernels (AVX2, AVX-512, …) ran.
#[test]
fn gradient_accumulation_is_normalised_by_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    // one step over 4 blocks: as one batch of 4, or as 2 micro-batches of 2 accumulated
    let one = tmp.path().join("one");
    align_pretrain::run(&config(&one, &["train.max_steps=1", "train.batch_size=4"]), false, None).unwrap();
    let acc = tmp.path().join("acc");
    align_pretrain::run(&config(&acc, &["train.max_steps=1", "train.batch_size=2", "train.grad_accum=2"]), false, None)
        .unwrap();
    // the loss is the same sum divided by the same token count: f32 rounding of ~128 log-probs
    // summed in two orders, ~1e-7 relative
    let (l1, l2) = (losses(&one)[0].1, losses(&acc)[0].1);
    assert!((l1 - l2).abs() <= 1e-5 * l1.abs(), "loss {l1} vs accumulated {l2}");
    let grad_norm = |out: &Path| -> f64 {
        let text = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        serde_json::from_str::<Value>(text.lines().next().unwrap()).unwrap()["grad_norm"].as_f64().unwrap()
    };
    let (n1, n2) = (grad_norm(&one), grad_norm(&acc));
    assert!(n1 > 0.0 && (n1 - n2).abs() <= 1e-5 * n1, "grad norm {n1} vs accumulated {n2}");
    // every parameter's gradient: ‖g₁ − g₂‖ ≤ 1e-5 ‖g₁‖ (f32 rounding of two orders of one sum
    // is ~1e-7 relative; a wrong normalisation, e.g. per micro-batch, is off by a factor)
    let (g1, g2) = (first_step_gradients(&one), first_step_gradients(&acc));
    assert_eq!(g1.len(), g2.len());
    assert!(g1.len() > 10, "only {} gradients in the optimizer state", g1.len());
    let mut worst = 0f64;
    for ((name, a), (name2, b)) in g1.iter().zip(&g2) {
        assert_eq!(name, name2);
        let scale = a.norm().double_value(&[]);
        let diff = (a - b).norm().double_value(&[]);
        assert!(scale > 0.0, "{name}: no gradient");
        assert!(diff <= 1e-5 * scale, "{name}: gradients differ by {diff:.3e} (norm {scale:.3e})");
        worst = worst.max(diff / scale);
    }
    eprintln!("loss {l1} vs {l2}; grad norm {n1} vs {n2}; worst relative gradient difference {worst:.2e}");
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

/// `optimizer = "adamw8bit"`: the 8-bit codes and absmax are saved in `train_state/` and
/// restored, so 3 steps + stop + resume to 6 equal 6 straight steps bitwise (weights, losses and
/// the optimizer state itself).
#[test]
fn eight_bit_adamw_resumes_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let eight = ["train.optimizer=adamw8bit"];
    let straight = tmp.path().join("straight");
    assert!(align_pretrain::run(&config(&straight, &eight), false, None).unwrap().completed);
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &eight);
    assert_eq!(align_pretrain::run(&cfg, false, Some(3)).unwrap().steps, 3);
    assert!(align_pretrain::run(&cfg, false, None).unwrap().completed);
    let read = |dir: &Path, f: &str| std::fs::read(dir.join(f)).unwrap();
    assert!(read(&straight, "final/model.safetensors") == read(&resumed, "final/model.safetensors"));
    let state = "checkpoint-6/train_state/optimizer.safetensors";
    assert!(read(&straight, state) == read(&resumed, state), "optimizer state differs after resume");
    assert_eq!(losses(&straight), losses(&resumed));
    // the embedding (320 × 32 ≥ 4096 elements) has 8-bit moments, the small tensors f32 ones
    let tensors: std::collections::BTreeMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(straight.join(state)).unwrap().into_iter().collect();
    assert_eq!(tensors["exp_avg.model.embed_tokens.weight"].kind(), tch::Kind::Uint8);
    assert_eq!(tensors["exp_avg_sq_absmax.model.embed_tokens.weight"].size(), [40]);
    assert_eq!(tensors["exp_avg.model.norm.weight"].kind(), tch::Kind::Float);
    // a different optimizer is a different run: resuming it is refused, naming the key
    let e = align_pretrain::run(&config(&resumed, &[]), false, None).unwrap_err().to_string();
    assert!(e.contains("train.optimizer"), "{e}");
}
