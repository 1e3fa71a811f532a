//! The DPO stage on the sample preference data with a tiny model: ln 2 at step 0 when policy =
//! reference, rewards/accuracies rise, the precomputed (cached) reference gives the live
//! reference's losses (to f32 rounding), exact resume, and every loss type runs.
use std::path::{Path, PathBuf};

use align_core::train::config::LoadedConfig;
use align_testkit::{metric_lines, sample_data, stage_config, tiny_model};
use serde_json::Value;

fn config(out: &Path, extra: &[&str]) -> LoadedConfig {
    let text = format!(
        "model = {:?}\ndata = [{:?}]\nval_data = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 6\nbatch_size = 4\nlr = 5e-3\nmax_length = 512\nsave_every = 2\nwarmup_ratio = 0.2\nweight_decay = 0.1\n[dpo]\nbeta = 0.1\n",
        tiny_model("tiny-qwen2"),
        sample_data("preference/medical_pairs.jsonl"),
        sample_data("preference/medical_pairs_eval.jsonl"),
        out
    );
    stage_config(&text, "dpo", extra)
}

fn train_lines(out: &Path) -> Vec<Value> {
    metric_lines(out).into_iter().filter(|v| v.get("loss").is_some()).collect()
}

fn series(out: &Path, key: &str) -> Vec<f64> {
    train_lines(out).iter().map(|v| v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}"))).collect()
}

fn caches(out: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with("ref_logps-"))
        .collect()
}

#[test]
fn loss_at_step_zero_is_ln2_when_policy_equals_reference() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [("live", "dpo.precompute_ref=false"), ("cached", "dpo.precompute_ref=true")] {
        let out = tmp.path().join(name);
        align_rlhf::run_dpo(&config(&out, &["train.max_steps=1", extra]), false, None).unwrap();
        let loss = series(&out, "loss")[0];
        assert!((loss - std::f64::consts::LN_2).abs() < 1e-5, "{name}: step-0 loss {loss}, expected ln 2");
        let v = &train_lines(&out)[0];
        assert!(v["rewards/margins"].as_f64().unwrap().abs() < 1e-5, "{v}");
        assert!(v["logps/chosen"].as_f64().unwrap() < 0.0 && v["logps/rejected"].as_f64().unwrap() < 0.0);
    }
}

#[test]
fn rewards_accuracies_rise_over_a_short_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("dpo");
    let cfg = config(
        &out,
        &["train.max_steps=30", "train.batch_size=8", "train.lr=2e-4", "train.save_every=0", "train.eval_every=15"],
    );
    let s = align_rlhf::run_dpo(&cfg, false, None).unwrap();
    assert!(s.completed);
    let acc = series(&out, "rewards/accuracies");
    let first: f64 = acc[..4].iter().sum::<f64>() / 4.0;
    let last: f64 = acc[acc.len() - 8..].iter().sum::<f64>() / 8.0;
    let loss = series(&out, "loss");
    eprintln!(
        "rewards/accuracies: first 4 steps {first:.3}, last 8 steps {last:.3}; loss {:.4} → {:.4}; {acc:?}",
        loss[0],
        loss[loss.len() - 1]
    );
    // policy = reference at step 1: every margin is exactly 0, so no pair counts as ranked right
    assert_eq!(acc[0], 0.0);
    assert!(last > first + 0.2 && last > 0.8, "rewards/accuracies did not rise: {first:.3} → {last:.3}");
    let margins = series(&out, "rewards/margins");
    assert!(margins[margins.len() - 1] > margins[1], "rewards/margins did not grow: {margins:?}");
    let eval: Vec<Value> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|v| v.get("eval_loss").is_some())
        .collect();
    assert_eq!(eval.len(), 2);
    let eval_acc: Vec<f64> = eval.iter().map(|v| v["eval_rewards/accuracies"].as_f64().unwrap()).collect();
    eprintln!("held-out eval_rewards/accuracies after 15 and 30 steps: {eval_acc:?}");
    assert!(eval_acc[1] > 0.7, "held-out rewards/accuracies {eval_acc:?}");
    // the final folder is a loadable causal LM
    align_core::load_causal_lm(&out.join("final"), tch::Device::Cpu, tch::Kind::Float).unwrap();
}

/// The cached reference log-probs were computed in other batches (other padding widths, so other
/// kernels) than the live ones: they agree to f32 rounding, not bitwise. `adam_epsilon = 1` makes
/// the AdamW update `lr · m̂ / (√v̂ + 1)` Lipschitz in the gradient, so the two runs stay within
/// rounding of each other for all 6 steps; with the default 1e-8 the update is about
/// `lr · sign(g)` and a last-bit difference in a near-zero gradient moves a weight by a whole `lr`.
#[test]
fn precomputed_reference_gives_the_live_reference_losses_and_is_reused() {
    let tmp = tempfile::tempdir().unwrap();
    let live = tmp.path().join("live");
    align_rlhf::run_dpo(&config(&live, &["dpo.precompute_ref=false", "train.adam_epsilon=1.0"]), false, None).unwrap();
    let cached = tmp.path().join("cached");
    let cfg = config(&cached, &["dpo.precompute_ref=true", "train.adam_epsilon=1.0"]);
    align_rlhf::run_dpo(&cfg, false, None).unwrap();
    let (a, b) = (series(&live, "loss"), series(&cached, "loss"));
    assert_eq!(a.len(), 6);
    // A reference log-prob is a sum of a few hundred f32 token log-probs: the two computations
    // agree to 1e-6 of its magnitude (f32 epsilon 6e-8 times a summation a few levels deep;
    // measured ~1e-8). The sigmoid loss is 1-Lipschitz in the margin β·((πc − rc) − (πr − rr)),
    // so it moves by at most β·1e-6·(|rc| + |rr|), and each reward β·(π − r) by β·1e-6·|r|. A
    // wrong cache (another pair's log-probs) is off by whole units of β·log-prob.
    let beta = 0.1;
    let (lc, lr) = (series(&live, "logps/chosen"), series(&live, "logps/rejected"));
    let mut worst = 0f64;
    for step in 0..a.len() {
        let bound = beta * 1e-6 * (lc[step].abs() + lr[step].abs());
        assert!(bound > 0.0 && bound < 1e-3, "step {}: logps {} {}", step + 1, lc[step], lr[step]);
        let (x, y) = (a[step], b[step]);
        assert!((x - y).abs() <= bound, "step {}: live loss {x} vs precomputed {y} (bound {bound:.2e})", step + 1);
        worst = worst.max((x - y).abs() / bound);
    }
    eprintln!("live vs precomputed loss: worst difference {worst:.3} of the rounding bound");
    for (key, logps) in [("rewards/chosen", &lc), ("rewards/rejected", &lr)] {
        for (step, (x, y)) in series(&live, key).iter().zip(series(&cached, key)).enumerate() {
            let bound = beta * 1e-6 * logps[step].abs();
            assert!((x - y).abs() <= bound, "step {}: {key}: live {x} vs precomputed {y}", step + 1);
        }
    }
    // the policy's own log-probs differ only through the (Lipschitz) updates
    for key in ["logps/chosen", "logps/rejected"] {
        for (step, (x, y)) in series(&live, key).iter().zip(series(&cached, key)).enumerate() {
            assert!((x - y).abs() <= 1e-6 * x.abs(), "step {}: {key}: live {x} vs precomputed {y}", step + 1);
        }
    }
    // rewards/accuracies is not compared: at step 1 policy = reference, every margin is 0 live and
    // ±rounding cached, so the share of "margin > 0" is a coin toss per pair
    assert!(caches(&live).is_empty());
    let files = caches(&cached);
    assert_eq!(files.len(), 1, "{files:?}");
    let name = files[0].file_name().unwrap().to_string_lossy().to_string();
    assert_eq!(name.len(), "ref_logps-".len() + 64 + ".safetensors".len(), "{name}");
    // starting over reuses the cache (same key, file untouched) and gives the same run
    let before = std::fs::metadata(&files[0]).unwrap().modified().unwrap();
    align_rlhf::run_dpo(&cfg, true, None).unwrap();
    assert_eq!(std::fs::metadata(&files[0]).unwrap().modified().unwrap(), before);
    assert_eq!(series(&cached, "loss"), b);
    // a different max_length is a different key
    align_rlhf::run_dpo(
        &config(&cached, &["dpo.precompute_ref=true", "train.max_length=400", "train.max_steps=1"]),
        true,
        None,
    )
    .unwrap();
    assert_eq!(caches(&cached).len(), 2);
}

#[test]
fn stop_and_resume_equals_straight_run_bitwise() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    align_rlhf::run_dpo(&config(&straight, &["dpo.precompute_ref=true"]), false, None).unwrap();
    let resumed = tmp.path().join("resumed");
    let cfg = config(&resumed, &["dpo.precompute_ref=true"]);
    let first = align_rlhf::run_dpo(&cfg, false, Some(3)).unwrap();
    assert!(!first.completed && first.steps == 3);
    let second = align_rlhf::run_dpo(&cfg, false, None).unwrap();
    assert!(second.completed && second.steps == 6);
    let a = std::fs::read(straight.join("final/model.safetensors")).unwrap();
    let b = std::fs::read(resumed.join("final/model.safetensors")).unwrap();
    assert!(a == b, "final weights differ after stop + resume");
    assert_eq!(series(&straight, "loss"), series(&resumed, "loss"));
    assert_eq!(series(&straight, "rewards/accuracies"), series(&resumed, "rewards/accuracies"));
}

#[test]
fn every_loss_type_trains_and_bad_settings_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    for (loss, extra) in [
        ("ipo", "dpo.sft_weight=0.5"),
        ("hinge", "dpo.beta=0.5"),
        ("sigmoid", "dpo.label_smoothing=0.1"),
        ("simpo", "dpo.beta=2.0"),
        ("orpo", "dpo.orpo_alpha=0.5"),
    ] {
        let out = tmp.path().join(loss);
        let s = align_rlhf::run_dpo(
            &config(&out, &[&format!("dpo.loss={loss}"), extra, "train.max_steps=2", "train.save_every=0"]),
            false,
            None,
        )
        .unwrap();
        assert!(s.completed, "{loss}");
        let l = series(&out, "loss");
        assert!(l.iter().all(|x| x.is_finite()), "{loss}: {l:?}");
        if loss == "simpo" || loss == "orpo" {
            assert!(caches(&out).is_empty());
        }
    }
    let e = align_rlhf::run_dpo(
        &config(&tmp.path().join("bad"), &["dpo.loss=hinge", "dpo.label_smoothing=0.2"]),
        false,
        None,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("test.toml") && e.contains("[dpo]") && e.contains("label_smoothing"), "{e}");
    let e = LoadedConfig::from_table(
        toml::from_str("model = \"m\"\ndata = [\"d\"]\noutput_dir = \"o\"\n[dpo]\nloss = \"kto\"\n").unwrap(),
        Path::new("test.toml"),
        &[],
        "dpo",
    )
    .unwrap()
    .stage_section::<align_rlhf::DpoSection>()
    .unwrap_err()
    .to_string();
    assert!(e.contains("[dpo]") && e.contains("kto"), "{e}");
}

/// Gradient checkpointing trains to the same bytes; the chunked LM head (`loss_chunk_tokens`)
/// to the same losses up to the matrix kernels' summation order.
#[test]
fn gradient_checkpointing_and_the_chunked_head_give_the_same_run() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, more: &[&str]| {
        let out = tmp.path().join(name);
        let sets: Vec<&str> = ["train.max_steps=3"].iter().chain(more).copied().collect();
        align_rlhf::run_dpo(&config(&out, &sets), false, None).unwrap();
        out
    };
    let plain = run("plain", &[]);
    let ckpt = run("ckpt", &["train.gradient_checkpointing=true"]);
    assert_eq!(series(&plain, "loss"), series(&ckpt, "loss"));
    let a = std::fs::read(plain.join("final/model.safetensors")).unwrap();
    assert!(a == std::fs::read(ckpt.join("final/model.safetensors")).unwrap(), "weights differ");
    let chunked = run("chunked", &["train.gradient_checkpointing=true", "train.loss_chunk_tokens=16"]);
    for (x, y) in series(&plain, "loss").iter().zip(series(&chunked, "loss")) {
        assert!((x - y).abs() <= 1e-4 * x.abs().max(1e-3), "chunked loss {y} vs {x}");
    }
}

/// QLoRA DPO: policy and reference are the same 4-bit base (the reference with the adapters
/// disabled, or cached from it), so the first loss is ln 2; the run trains and saves an adapter.
#[test]
fn qlora_dpo_starts_at_ln2_and_trains() {
    let tmp = tempfile::tempdir().unwrap();
    for (name, extra) in [("live", "dpo.precompute_ref=false"), ("cached", "dpo.precompute_ref=true")] {
        let out = tmp.path().join(name);
        let sets =
            ["method=lora", "lora.r=8", "train.quantize=nf4", "train.double_quant=true", "train.max_steps=3", extra];
        align_rlhf::run_dpo(&config(&out, &sets), false, None).unwrap();
        let loss = series(&out, "loss");
        assert!((loss[0] - std::f64::consts::LN_2).abs() < 1e-5, "{name}: step-0 loss {loss:?}, expected ln 2");
        assert!(loss.iter().all(|l| l.is_finite()));
        assert!(out.join("final/adapter_model.safetensors").is_file() && !out.join("final/model.safetensors").exists());
    }
}
