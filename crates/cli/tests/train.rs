//! `align train` as a user runs it: SIGKILL mid-run and a crash while writing a checkpoint both
//! resume to bitwise the same final weights and losses as an uninterrupted run; SFT learns;
//! config mistakes are one clear line.
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

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
    String::from_utf8_lossy(&out.stderr).to_string()
}

fn write_pt_config(dir: &Path, out: &Path) -> PathBuf {
    let cfg = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 8\nbatch_size = 4\nlr = 1e-2\nmax_length = 32\nsave_every = 1\nsave_total_limit = 3\n[pretrain]\nblock_size = 32\n",
            repo().join("tests/fixtures/models/tiny-llama"),
            repo().join("data/pretrain/medical_corpus.txt"),
            out
        ),
    )
    .unwrap();
    cfg
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

fn same_run(a: &Path, b: &Path) {
    let wa = std::fs::read(a.join("final/model.safetensors")).unwrap();
    let wb = std::fs::read(b.join("final/model.safetensors")).unwrap();
    assert!(wa == wb, "final weights of {} and {} differ", a.display(), b.display());
    assert_eq!(losses(a), losses(b));
}

#[test]
#[cfg_attr(
    not(feature = "fault-injection"),
    ignore = "needs the test hooks: --features align-cli/fault-injection (scripts/test.sh sets it)"
)]
fn sigkill_mid_run_and_crash_during_save_resume_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    let cfg = write_pt_config(tmp.path(), &straight);
    ok(align().args(["train", "pretrain", "--config", cfg.to_str().unwrap()]).output().unwrap());

    // SIGKILL once checkpoint-3 is complete, while step 4 runs
    let killed = tmp.path().join("killed");
    let cfg = write_pt_config(tmp.path(), &killed);
    let mut child = align()
        .args(["train", "pretrain", "--config", cfg.to_str().unwrap()])
        .env("ALIGN_TEST_STEP_DELAY_MS", "150")
        .spawn()
        .unwrap();
    let started = Instant::now();
    while !killed.join("checkpoint-3/COMPLETE").is_file() {
        assert!(started.elapsed() < Duration::from_secs(120), "checkpoint-3 never appeared");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(!killed.join("final").exists(), "the run finished before it could be killed");
    ok(align().args(["train", "pretrain", "--config", cfg.to_str().unwrap()]).output().unwrap());
    same_run(&straight, &killed);

    // die in the middle of writing checkpoint-5 (model written, state half-written)
    let crashed = tmp.path().join("crashed");
    let cfg = write_pt_config(tmp.path(), &crashed);
    let out = align()
        .args(["train", "pretrain", "--config", cfg.to_str().unwrap()])
        .env("ALIGN_TEST_CRASH_IN_SAVE", "5")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(!crashed.join("checkpoint-5").exists(), "a half-written checkpoint is visible under its final name");
    assert!(crashed.join("checkpoint-4/COMPLETE").is_file());
    ok(align().args(["train", "pretrain", "--config", cfg.to_str().unwrap()]).output().unwrap());
    same_run(&straight, &crashed);
    let leftovers: Vec<String> = std::fs::read_dir(&crashed)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with('.') && (n.contains(".tmp-") || n.contains(".old-")))
        .collect();
    assert!(leftovers.is_empty(), "temporary folders left behind: {leftovers:?}");
}

#[test]
fn sft_loss_goes_down_on_the_sample_data() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sft");
    let cfg = tmp.path().join("sft.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}, {:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 30\nbatch_size = 8\nlr = 2e-2\nmax_length = 96\nval_ratio = 0.1\neval_every = 15\n[sft]\ntrain_on_prompt = false\n",
            repo().join("tests/fixtures/models/tiny-qwen2"),
            repo().join("data/sft/medical_sharegpt.jsonl"),
            repo().join("data/sft/medical_alpaca.jsonl"),
            out
        ),
    )
    .unwrap();
    ok(align().args(["train", "sft", "--config", cfg.to_str().unwrap()]).output().unwrap());
    let l = losses(&out);
    let first: f64 = l[..5].iter().map(|x| x.1).sum::<f64>() / 5.0;
    let last: f64 = l[l.len() - 5..].iter().map(|x| x.1).sum::<f64>() / 5.0;
    assert!(last < first - 0.5, "SFT loss did not go down: first {first:.3}, last {last:.3}");
    let evals: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("eval_loss")?.as_f64())
        .collect();
    assert_eq!(evals.len(), 2);
    assert!(evals[1] < evals[0]);
    // the final folder is a loadable model that generates
    let final_dir = out.join("final");
    ok(align()
        .args([
            "generate",
            "--model",
            final_dir.to_str().unwrap(),
            "--chat",
            "--prompt",
            "What is fever?",
            "--max-new-tokens",
            "4",
        ])
        .output()
        .unwrap());
}

#[test]
fn config_mistakes_are_one_clear_line() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = write_pt_config(tmp.path(), &tmp.path().join("x"));
    let cases: [(&[&str], &str); 7] = [
        (&["train.lrr=1"], "lrr"),
        (&["train.val_ratio=2"], "train.val_ratio"),
        (&["sft.train_on_prompt=true"], "sft"),
        (&["pretrain.block=3"], "[pretrain]"),
        // a method's section without the method would silently train something else
        (&["lora.r=4"], r#"[lora] is set but method = "full"; set method = "lora" (or remove [lora])"#),
        (&["freeze.last_layers=1", "method=lora"], r#"[freeze] is set but method = "lora"; set method = "freeze""#),
        (&["method=lora", "lora.targets=3"], "`targets` as a list of module names"),
    ];
    for (sets, want) in cases {
        let mut args = vec!["train", "pretrain", "--config", cfg.to_str().unwrap()];
        for set in sets {
            args.extend(["--set", set]);
        }
        let out = align().args(&args).output().unwrap();
        assert!(!out.status.success(), "--set {sets:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        let line = err
            .lines()
            .find(|l| l.starts_with("error:"))
            .unwrap_or_else(|| panic!("no error line for {sets:?}:\n{err}"));
        assert!(line.contains(want) && line.contains(".toml"), "--set {sets:?}: {line}");
    }
    let bad_data = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad_data,
        "{\"conversations\": [{\"from\": \"human\", \"value\": \"hi\"}, {\"from\": \"gpt\", \"value\": 3}]}\n",
    )
    .unwrap();
    let sft_cfg = tmp.path().join("sft.toml");
    std::fs::write(
        &sft_cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n",
            repo().join("tests/fixtures/models/tiny-qwen2"),
            bad_data,
            tmp.path().join("s")
        ),
    )
    .unwrap();
    let out = align().args(["train", "sft", "--config", sft_cfg.to_str().unwrap()]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("bad.jsonl:1"), "{err}");
}
