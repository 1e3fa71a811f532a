//! `align bench train` on CPU with the test model: each stage's real loop runs on synthetic data
//! and reports tokens/s, a step split that adds up to the step, peak memory and an MFU against the
//! matmul peak measured on this CPU; `--init` starts from a described random model; bad flags
//! are errors.
use std::process::Command;

use align_testkit::repo;
use serde_json::Value;

fn align() -> Command {
    Command::new(env!("CARGO_BIN_EXE_align"))
}

fn bench(args: &[&str]) -> Value {
    let out = align().args(["bench", "train", "--device", "cpu", "--json"]).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{args:?}:\n{stdout}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{args:?}: {e}: {stdout}"))
}

#[test]
fn every_stage_reports_throughput_split_memory_and_mfu() {
    let model = repo().join("tests/fixtures/models/tiny-llama");
    let m = model.to_str().unwrap();
    for (stage, method) in [("sft", "full"), ("sft", "lora"), ("dpo", "full"), ("grpo", "full"), ("ppo", "lora")] {
        let r = bench(
            &["--model", m, "--stage", stage, "--method", method, "--seq", "48", "--batch", "2"]
                .into_iter()
                .chain(["--steps", "2", "--new-tokens", "8"])
                .collect::<Vec<_>>(),
        );
        let f = |k: &str| r[k].as_f64().unwrap_or_else(|| panic!("{stage}/{method}: no '{k}' in {r}"));
        assert_eq!(r["steps_measured"], 2, "{stage}/{method}");
        assert!(f("tokens_per_second") > 0.0, "{stage}/{method}: {r}");
        let step = f("step_seconds_median");
        assert!(step > 0.0);
        for part in ["forward_seconds_median", "backward_seconds_median", "optimizer_seconds_median"] {
            assert!(f(part) > 0.0 && f(part) <= step, "{stage}/{method}: {part} in {r}");
        }
        let generation = f("generation_seconds_median");
        if stage == "grpo" || stage == "ppo" {
            assert!(generation > 0.0 && f("generated_tokens_per_second") > 0.0, "{stage}: {r}");
        } else {
            assert_eq!(generation, 0.0, "{stage}: no generation");
        }
        let mfu = f("mfu");
        assert!(mfu > 0.0 && mfu < 1.0, "{stage}/{method}: MFU {mfu}");
        assert!(r["peak_source"].as_str().unwrap().contains("measured on this CPU"));
        assert!(r["peak_rss_bytes"].as_u64().unwrap() > 0);
    }
}

#[test]
fn a_described_model_benches_and_bad_flags_fail() {
    let tmp = tempfile::tempdir().unwrap();
    let desc = tmp.path().join("model.toml");
    std::fs::write(
        &desc,
        "model_type = \"qwen2\"\nhidden_size = 32\nintermediate_size = 64\nnum_hidden_layers = 2\nnum_attention_heads = 4\nnum_key_value_heads = 2\nmax_position_embeddings = 256\n",
    )
    .unwrap();
    let tok = repo().join("tests/fixtures/tokenizer");
    let out = tmp.path().join("work");
    let r = bench(&[
        "--init",
        desc.to_str().unwrap(),
        "--tokenizer",
        tok.to_str().unwrap(),
        "--stage",
        "sft",
        "--seq",
        "32",
        "--batch",
        "2",
        "--steps",
        "1",
        "--peak-tflops",
        "1000",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(r["model_type"], "Qwen2");
    assert_eq!(r["peak_source"], "--peak-tflops");
    assert!(r["mfu"].as_f64().unwrap() > 0.0);
    // the run's metrics carry the split; the work folder holds the model, data and config
    let metrics = std::fs::read_to_string(out.join("run/metrics.jsonl")).unwrap();
    assert!(metrics.lines().all(|l| l.contains("\"time/backward\"") && l.contains("\"tokens\"")), "{metrics}");
    assert!(out.join("model/config.json").is_file() && out.join("bench.toml").is_file());

    let model = repo().join("tests/fixtures/models/tiny-llama");
    for (args, want) in [
        (vec!["--stage", "sft", "--method", "ia3"], "--method ia3"),
        (vec!["--stage", "grpo", "--batch", "3"], "even batch"),
        (vec!["--stage", "sft", "--steps", "0"], "--steps 0"),
    ] {
        let o = align()
            .args(["bench", "train", "--device", "cpu", "--model", model.to_str().unwrap()])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success() && err.contains(want), "{args:?}: {err}");
    }
}

/// `scripts/gpu-check.sh`'s CPU dry run (`GPU_CHECK_DRY=1`): every step — env, CPU vs device
/// perplexity, generation, the six-stage pipeline, the four training benches and the generation
/// bench — passes on tiny models, and the JSON and Markdown summaries are written.
#[test]
fn the_gpu_check_script_runs_end_to_end_in_its_cpu_dry_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let o = Command::new("bash")
        .arg(repo().join("scripts/gpu-check.sh"))
        .env("GPU_CHECK_DRY", "1")
        .env("OUT", &out)
        .env("ALIGN_BIN", env!("CARGO_BIN_EXE_align"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
    assert!(o.status.success(), "{text}");
    let summary: Value = serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    assert_eq!(summary["dry_run"], true);
    let steps: Vec<(&str, &str)> = summary["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["step"].as_str().unwrap(), s["status"].as_str().unwrap()))
        .collect();
    for want in
        ["env", "logits_match", "pipeline", "bench_sft", "bench_dpo", "bench_ppo", "bench_grpo", "bench_generate"]
    {
        assert!(steps.contains(&(want, "ok")), "{want} not ok in {steps:?}");
    }
    for stage in ["sft", "dpo", "ppo", "grpo"] {
        assert!(summary["bench_train"][stage]["mfu"].as_f64().is_some_and(|m| m > 0.0), "{stage}: {summary}");
    }
    let md = std::fs::read_to_string(out.join("summary.md")).unwrap();
    assert!(md.contains("| pipeline | ok |") && md.contains("MFU"), "{md}");
}
