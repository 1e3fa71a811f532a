//! Data parallelism as a user runs it: `align train` as 2 ranks on this machine (c10d's Gloo over
//! loopback, the variables torchrun sets), against 1 rank on the same global batch; ZeRO-1/2
//! against ZeRO-0; a rank killed mid-run, then the same launch resuming exactly; a 2-rank
//! checkpoint resumed by 1 rank.
use std::collections::BTreeMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use tch::Tensor;

mod support;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn command(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_align"));
    c.args(args)
        .env("ALIGN_LOG", "warn")
        .env_remove("ALIGN_TEST_CRASH_IN_SAVE")
        .env_remove("ALIGN_TEST_STEP_DELAY_MS")
        .env_remove("WORLD_SIZE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

/// `align ARGS` as ranks 0..world of one job (as torchrun starts them).
fn spawn(world: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<Child> {
    let port = free_port().to_string();
    (0..world)
        .map(|rank| {
            let mut c = command(args);
            if world > 1 {
                c.env("RANK", rank.to_string())
                    .env("LOCAL_RANK", rank.to_string())
                    .env("WORLD_SIZE", world.to_string())
                    .env("MASTER_ADDR", "127.0.0.1")
                    .env("MASTER_PORT", &port)
                    .env("ALIGN_DIST_TIMEOUT", "30");
            }
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect()
}

fn finish(children: Vec<Child>) -> Vec<Output> {
    children.into_iter().map(|c| c.wait_with_output().unwrap()).collect()
}

fn log(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Runs the job; every rank must succeed.
fn launch(world: usize, args: &[&str]) {
    for (rank, o) in finish(spawn(world, args, &[])).iter().enumerate() {
        assert!(o.status.success(), "rank {rank} of {world}: align {args:?} failed:\n{}", log(o));
    }
}

/// A LoRA run of 4 steps. No LoRA dropout: its masks are drawn per micro-batch, so a rank's
/// half of the batch would get other masks than the same rows of one process's whole batch.
fn write_config(dir: &Path, name: &str, stage: &str, batch: usize, extra: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let cfg = dir.join(format!("{name}.toml"));
    let (model, data, section) = match stage {
        "sft" => ("tiny-llama", "data/sft/medical_sharegpt.jsonl", "[sft]\n"),
        "kto" => ("tiny-qwen2", "data/preference/medical_pairs.jsonl", "[kto]\nbeta = 0.1\n"),
        _ => ("tiny-qwen2", "data/preference/medical_pairs.jsonl", "[dpo]\nbeta = 0.1\n"),
    };
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = \"lora\"\n[lora]\nr = 4\ndropout = 0.0\n[train]\nmax_steps = 4\n\
             batch_size = {batch}\nlr = 2e-3\nmax_length = 96\nthreads = 1\nsave_every = 1\n{extra}\n{section}",
            repo().join("tests/fixtures/models").join(model),
            repo().join(data),
            out
        ),
    )
    .unwrap();
    (cfg, out)
}

/// The values of metric `key` in `out/metrics.jsonl`, in step order.
fn series(out: &Path, key: &str) -> Vec<f64> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter_map(|v| v.get(key).and_then(Value::as_f64))
        .collect()
}

fn losses(out: &Path) -> Vec<f64> {
    series(out, "loss")
}

fn adapter(out: &Path) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(out.join("final/adapter_model.safetensors")).unwrap().into_iter().collect()
}

/// Losses within `tol` relative, final adapter weights within `tol` absolute: the two runs do
/// the same sums over differently padded micro-batches, so they agree to float rounding, which
/// Adam's normalised steps carry into the weights.
fn assert_close_runs(a: &Path, b: &Path, tol: f64) {
    assert_close_runs_at_scale(a, b, tol, 0.0)
}

/// [`assert_close_runs`] with the losses compared relative to at least `scale` (for a loss that
/// is a sum of terms of that size which nearly cancel).
fn assert_close_runs_at_scale(a: &Path, b: &Path, tol: f64, scale: f64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!(la.len(), lb.len(), "{} vs {}", a.display(), b.display());
    for (i, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!(
            (x - y).abs() <= tol * y.abs().max(scale),
            "step {}: loss {x} vs {y} ({} vs {})",
            i + 1,
            a.display(),
            b.display()
        );
    }
    let (wa, wb) = (adapter(a), adapter(b));
    assert_eq!(wa.keys().collect::<Vec<_>>(), wb.keys().collect::<Vec<_>>());
    for (k, x) in &wa {
        let y = &wb[k];
        let diff = (x - y).abs().max().double_value(&[]);
        assert!(diff <= tol, "{k}: max difference {diff}");
    }
}

fn assert_same_runs(a: &Path, b: &Path) {
    assert_eq!(losses(a), losses(b), "{} vs {}", a.display(), b.display());
    let wa = std::fs::read(a.join("final/adapter_model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/adapter_model.safetensors")).unwrap();
    assert!(wa == wb, "final adapters of {} and {} differ", a.display(), b.display());
}

#[test]
fn sft_on_two_ranks_equals_one_rank_on_the_global_batch_and_zero_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let (one_cfg, one) = write_config(tmp.path(), "one", "sft", 4, "");
    launch(1, &["train", "sft", "--config", one_cfg.to_str().unwrap()]);
    let mut two = Vec::new();
    for zero in 0..3 {
        let (cfg, out) = write_config(tmp.path(), &format!("two-zero{zero}"), "sft", 2, &format!("zero = {zero}"));
        launch(2, &["train", "sft", "--config", cfg.to_str().unwrap()]);
        two.push(out);
    }
    // only rank 0 writes: one metrics line per step, one final folder
    assert_eq!(losses(&two[0]).len(), 4);
    assert_close_runs(&two[0], &one, 1e-5);
    // partitioned optimizer state, reduced-to-owner gradients: the same arithmetic, bit for bit
    assert_same_runs(&two[1], &two[0]);
    assert_same_runs(&two[2], &two[0]);
    // the checkpoints hold the whole optimizer state (gathered from both ranks)
    let st = |out: &Path| -> Vec<String> {
        Tensor::read_safetensors(out.join("checkpoint-4/train_state/optimizer.safetensors"))
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    };
    let (mut a, mut b) = (st(&two[0]), st(&two[1]));
    a.sort();
    b.sort();
    assert!(!a.is_empty());
    assert_eq!(a, b);
}

#[test]
fn dpo_on_two_ranks_equals_one_rank_on_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (one_cfg, one) = write_config(tmp.path(), "one", "dpo", 4, "");
    launch(1, &["train", "dpo", "--config", one_cfg.to_str().unwrap()]);
    let (two_cfg, two) = write_config(tmp.path(), "two", "dpo", 2, "zero = 1");
    launch(2, &["train", "dpo", "--config", two_cfg.to_str().unwrap()]);
    assert_close_runs(&two, &one, 1e-5);
}

/// KTO's reference point z0 is the mean over the KL completions of both ranks' micro-batches
/// (as TRL gathers it), and the KL completions rotate within the global micro-batch: 2 ranks × 2
/// examples train as 1 rank × 4.
#[test]
fn kto_on_two_ranks_equals_one_rank_on_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    let (one_cfg, one) = write_config(tmp.path(), "one", "kto", 4, "");
    launch(1, &["train", "kto", "--config", one_cfg.to_str().unwrap()]);
    let (two_cfg, two) = write_config(tmp.path(), "two", "kto", 2, "");
    launch(2, &["train", "kto", "--config", two_cfg.to_str().unwrap()]);
    // z0 is above its clamp at 0 in some step, so it shapes the loss there
    assert!(series(&one, "kl").iter().any(|&z| z > 1e-3), "{:?}", series(&one, "kl"));
    assert_close_runs(&two, &one, 1e-5);
}

/// A LoRA GRPO-family run (`stage` = grpo, rloo or reinforce_pp) of 3 iterations: 4 prompts ×
/// 2 completions, generated in chunks of 4 (each chunk seeded by its first row of the global
/// batch, so one process's chunks are the two ranks' shares), rule rewards (the share of a few
/// letters in the completion, and the overlong penalty), 2 passes of 2 minibatches, a KL term
/// against the base.
fn write_grpo(dir: &Path, name: &str, stage: &str, extra: &str) -> (PathBuf, PathBuf) {
    let out = dir.join(name);
    let cfg = dir.join(format!("{name}.toml"));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = \"lora\"\n[lora]\nr = 4\ndropout = 0.0\n[train]\nmax_steps = 3\n\
             batch_size = 2\nlr = 5e-4\nmax_length = 128\nthreads = 1\nsave_every = 1\nzero = 1\n[{stage}]\nnum_generations = 2\n\
             generation_batch_size = 8\ngeneration_chunk_size = 4\nmax_completion_length = 8\ntemperature = 1.0\nbeta = 0.04\n\
             num_iterations = 2\nmini_batch_size = 4\n{extra}[[{stage}.rewards]]\ntype = \"keywords\"\nkeywords = [\"a\", \"e\", \"i\", \"o\", \"n\", \"t\"]\n\
             [[{stage}.rewards]]\ntype = \"overlong\"\nbuffer = 4\n",
            repo().join("tests/fixtures/models/tiny-qwen2"),
            repo().join("data/prompts/medical_qa.jsonl"),
            out
        ),
    )
    .unwrap();
    (cfg, out)
}

/// GRPO (per-sequence token means, group advantages) and REINFORCE++ (advantages normalised
/// over the global batch, the KL in the reward, token means over all ranks) on 2 ranks, each
/// generating and scoring half of the groups, equal 1 rank on the whole batch: the seeded
/// chunks make the rollouts the same, the rest is the same sums. A 2-rank GRPO run stopped
/// after 2 iterations resumes to the uninterrupted one, bit for bit; a batch of groups the
/// ranks cannot split is refused, naming the key.
#[test]
fn grpo_and_reinforce_pp_on_two_ranks_equal_one_rank_on_the_global_batch() {
    let tmp = tempfile::tempdir().unwrap();
    for (stage, extra) in [("grpo", "loss_type = \"grpo\"\n"), ("reinforce_pp", "loss_type = \"dapo\"\n")] {
        let (cfg, one) = write_grpo(tmp.path(), &format!("{stage}-one"), stage, extra);
        launch(1, &["train", stage, "--config", cfg.to_str().unwrap()]);
        let (cfg, two) = write_grpo(tmp.path(), &format!("{stage}-two"), stage, extra);
        launch(2, &["train", stage, "--config", cfg.to_str().unwrap()]);
        assert_eq!(losses(&two).len(), 3, "{stage}");
        // the rewards differ within groups: the updates move the policy
        assert!(losses(&one).iter().all(|l| l.abs() > 1e-4), "{stage}: {:?}", losses(&one));
        // the policy loss sums ±advantage terms (of size 1; a group's advantages sum to 0) that
        // nearly cancel: its float rounding is relative to them, not to the small sum
        assert_close_runs_at_scale(&two, &one, 1e-5, 1.0);
        if stage == "grpo" {
            let (cfg, resumed) = write_grpo(tmp.path(), "grpo-resumed", stage, extra);
            launch(2, &["train", stage, "--config", cfg.to_str().unwrap(), "--stop-after", "2"]);
            launch(2, &["train", stage, "--config", cfg.to_str().unwrap()]);
            assert_same_runs(&resumed, &two);
        }
    }
    let (cfg, _) = write_grpo(tmp.path(), "odd", "grpo", "");
    let outputs = finish(spawn(
        2,
        &["train", "grpo", "--config", cfg.to_str().unwrap(), "--set", "grpo.generation_batch_size=6"],
        &[],
    ));
    assert!(!outputs[0].status.success());
    assert!(log(&outputs[0]).contains("generation_batch_size = 6: must be a multiple of"), "{}", log(&outputs[0]));
}

#[test]
fn a_two_rank_checkpoint_resumes_in_one_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let mut outs = Vec::new();
    for zero in [0, 1] {
        let (cfg, out) = write_config(tmp.path(), &format!("z{zero}"), "sft", 2, &format!("zero = {zero}"));
        launch(2, &["train", "sft", "--config", cfg.to_str().unwrap(), "--stop-after", "2"]);
        assert!(out.join("checkpoint-2").is_dir() && !out.join("final").exists());
        let o = finish(spawn(1, &["train", "sft", "--config", cfg.to_str().unwrap()], &[("ALIGN_LOG", "info")]));
        assert!(o[0].status.success(), "{}", log(&o[0]));
        assert!(log(&o[0]).contains("resuming from"), "{}", log(&o[0]));
        assert_eq!(losses(&out).len(), 4);
        outs.push(out);
    }
    // the ZeRO-1 checkpoint held both ranks' optimizer state: its 1-rank continuation is the
    // unsharded one's, bit for bit
    assert_same_runs(&outs[1], &outs[0]);
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the test hooks: --features align-cli/fault-injection (scripts/test.sh sets it)"
)]
fn a_killed_rank_fails_the_job_and_the_same_launch_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (ref_cfg, reference) = write_config(tmp.path(), "reference", "sft", 2, "zero = 1");
    launch(2, &["train", "sft", "--config", ref_cfg.to_str().unwrap()]);
    let (cfg, out) = write_config(tmp.path(), "killed", "sft", 2, "zero = 1");
    let args = ["train", "sft", "--config", cfg.to_str().unwrap()];
    let mut children = spawn(2, &args, &[("ALIGN_TEST_STEP_DELAY_MS", "400")]);
    let started = Instant::now();
    while !out.join("checkpoint-2/COMPLETE").exists() {
        assert!(started.elapsed() < Duration::from_secs(60), "no checkpoint-2 within 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    children[1].kill().unwrap();
    let killed_at = Instant::now();
    let outputs = finish(children);
    let survivor = &outputs[0];
    assert!(!survivor.status.success(), "rank 0 should fail when rank 1 dies:\n{}", log(survivor));
    assert!(killed_at.elapsed() < Duration::from_secs(30), "rank 0 took {:?} to fail", killed_at.elapsed());
    assert!(log(survivor).contains("error (rank 0 of 2)"), "{}", log(survivor));
    assert!(!out.join("final").exists());
    // the same launch again: resumes from the newest checkpoint, ends where one run ends
    launch(2, &args);
    assert_same_runs(&out, &reference);
}

#[test]
fn commands_that_are_not_data_parallel_refuse_a_world() {
    let o = command(&["env"])
        .env("WORLD_SIZE", "2")
        .env("RANK", "0")
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(log(&o).contains("only `align train` and `align run` are data-parallel"), "{}", log(&o));
}

/// The LoRA chain of the pipeline tests (SFT → RM on the merged SFT adapter → DPO → perplexity)
/// in `dir/name`, one thread a rank, no LoRA dropout.
fn write_pipeline(dir: &Path, name: &str, batch: usize) -> (PathBuf, PathBuf) {
    let run = dir.join(name);
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(&file, support::lora_chain_pipeline(&run, batch, "threads = 1\n", "dropout = 0.0\n")).unwrap();
    (file, run)
}

fn record(run: &Path, stage: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run.join(stage).join("stage.json")).unwrap()).unwrap()
}

#[test]
fn a_pipeline_runs_every_stage_on_two_ranks_and_skips_when_done() {
    let tmp = tempfile::tempdir().unwrap();
    let (one_file, one) = write_pipeline(tmp.path(), "one", 4);
    launch(1, &["run", one_file.to_str().unwrap()]);
    let (two_file, two) = write_pipeline(tmp.path(), "two", 2);
    launch(2, &["run", two_file.to_str().unwrap()]);
    for stage in ["sft", "rm", "dpo", "ppl"] {
        assert_eq!(record(&two, stage)["status"], "done", "{stage}");
    }
    assert!(two.join("sft/merged/model.safetensors").is_file());
    // the same training per stage (the weights are compared by the tests above; here the losses)
    for stage in ["sft", "rm", "dpo"] {
        let (a, b) = (losses(&two.join(stage)), losses(&one.join(stage)));
        assert_eq!(a.len(), 3, "{stage}");
        for (x, y) in a.iter().zip(&b) {
            assert!((x - y).abs() <= 1e-5 * y.abs(), "{stage}: loss {x} vs {y}");
        }
    }
    let ppl = |run: &Path| record(run, "ppl")["eval"]["perplexity"].as_f64().unwrap();
    assert!((ppl(&two) - ppl(&one)).abs() <= 1e-4 * ppl(&one), "{} vs {}", ppl(&two), ppl(&one));
    // run again: every rank finds every stage done
    let outputs = finish(spawn(2, &["run", two_file.to_str().unwrap()], &[]));
    for o in &outputs {
        assert!(o.status.success(), "{}", log(o));
    }
    assert_eq!(log(&outputs[0]).matches("up to date (skipped)").count(), 4, "{}", log(&outputs[0]));
}

fn weights(out: &Path) -> Vec<u8> {
    let mut all = std::fs::read(out.join("final/model.safetensors")).unwrap();
    all.extend(std::fs::read(out.join("final/value_model/model.safetensors")).unwrap());
    all
}

/// PPO on 2 ranks (each rolls out and updates on half of every batch, whitening and reward
/// statistics over both): its metrics are finite, and a run stopped after 2 iterations resumes
/// to the policy and critic of an uninterrupted one, bit for bit.
#[test]
fn ppo_on_two_ranks_runs_and_resumes_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let r = repo();
    let rm_cfg = tmp.path().join("rm.toml");
    std::fs::write(
        &rm_cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 2\nbatch_size = 4\nlr = 1e-3\nmax_length = 256\nthreads = 1\n[reward]\n",
            r.join("tests/fixtures/models/tiny-qwen2"),
            r.join("data/preference/medical_pairs.jsonl"),
            tmp.path().join("rm")
        ),
    )
    .unwrap();
    launch(1, &["train", "reward", "--config", rm_cfg.to_str().unwrap()]);
    let ppo = |name: &str| -> (PathBuf, PathBuf) {
        let out = tmp.path().join(name);
        let cfg = tmp.path().join(format!("{name}.toml"));
        std::fs::write(
            &cfg,
            format!(
                "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 3\nbatch_size = 2\nlr = 1e-3\nmax_length = 256\nthreads = 1\nsave_every = 1\nzero = 1\n[ppo]\nreward_model = {:?}\nrollout_batch_size = 8\nmini_batch_size = 4\nppo_epochs = 2\nmax_new_tokens = 8\ntemperature = 1.0\ntarget_kl = 1.0\nnormalize_reward = true\n",
                r.join("tests/fixtures/models/tiny-qwen2"),
                r.join("data/prompts/medical_qa.jsonl"),
                out,
                tmp.path().join("rm/final")
            ),
        )
        .unwrap();
        (cfg, out)
    };
    let (cfg, straight) = ppo("straight");
    launch(2, &["train", "ppo", "--config", cfg.to_str().unwrap()]);
    let lines: Vec<Value> = std::fs::read_to_string(straight.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    for key in ["objective/kl", "objective/scores", "loss/policy", "val/vf_loss", "grad_norm", "kl_coef"] {
        assert!(lines.iter().all(|l| l[key].as_f64().is_some_and(f64::is_finite)), "{key}: {lines:?}");
    }
    let (cfg, resumed) = ppo("resumed");
    launch(2, &["train", "ppo", "--config", cfg.to_str().unwrap(), "--stop-after", "2"]);
    launch(2, &["train", "ppo", "--config", cfg.to_str().unwrap()]);
    assert!(weights(&resumed) == weights(&straight), "resumed PPO weights differ from one run's");
    // a rollout batch the ranks cannot split evenly is refused, naming the key
    let (cfg, _) = ppo("odd");
    let outputs = finish(spawn(
        2,
        &["train", "ppo", "--config", cfg.to_str().unwrap(), "--set", "ppo.rollout_batch_size=7"],
        &[],
    ));
    assert!(!outputs[0].status.success());
    assert!(
        log(&outputs[0]).contains("rollout_batch_size = 7: must be a multiple of the 2 ranks"),
        "{}",
        log(&outputs[0])
    );
}
