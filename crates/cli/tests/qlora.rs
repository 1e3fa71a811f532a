//! QLoRA against transformers + bitsandbytes + PEFT: `align eval perplexity --quantize` equals the
//! perplexity of the same model loaded with `BitsAndBytesConfig(load_in_4bit=True, …)` (NF4 with
//! double quantisation, FP4), and an adapter trained by `align train sft` with `[train] quantize`
//! loads in PEFT on the bitsandbytes 4-bit base with the perplexity align gives it (≤ 1e-3
//! relative). On the tiny Llama fixture always; on SmolLM2-135M too when `ALIGN_SMOLLM2_DIR` is set.
mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use align_testkit::python_with;
use serde_json::Value;
use support::{fixtures, ok, repo, s};

/// `align eval perplexity` of `model` (+ adapter) with the base quantised.
fn align_perplexity(model: &Path, adapter: Option<&Path>, quant: &str, double_quant: bool) -> f64 {
    let data = fixtures().join("perplexity.txt");
    let mut args = vec!["eval", "perplexity", "--model", s(model), "--data", s(&data), "--device", "cpu"];
    args.extend(["--quantize", quant, "--json"]);
    if double_quant {
        args.push("--double-quant");
    }
    if let Some(a) = adapter {
        args.extend(["--adapter", s(a)]);
    }
    let v: Value = serde_json::from_str(ok(&args).trim()).unwrap();
    v["perplexity"].as_f64().unwrap()
}

/// The same with transformers + bitsandbytes (+ PEFT): tests/fixtures/check_bnb_perplexity.py.
fn bnb_perplexity(python: &Path, model: &Path, adapter: Option<&Path>, quant: &str, double_quant: bool) -> f64 {
    let data = fixtures().join("perplexity.txt");
    let mut cmd = Command::new(python);
    cmd.arg(fixtures().join("check_bnb_perplexity.py"))
        .args(["--model", s(model), "--data", s(&data), "--quant", quant])
        .env("OMP_NUM_THREADS", "1");
    if double_quant {
        cmd.arg("--double-quant");
    }
    if let Some(a) = adapter {
        cmd.args(["--adapter", s(a)]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "check_bnb_perplexity.py failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let line = String::from_utf8_lossy(&out.stdout).lines().last().unwrap_or_default().to_string();
    let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
    v["perplexity"].as_f64().unwrap()
}

fn assert_close(ours: f64, theirs: f64, what: &str) {
    let rel = (ours - theirs).abs() / theirs;
    assert!(rel <= 1e-3, "{what}: align {ours} vs transformers + bitsandbytes {theirs} (relative {rel:.2e})");
}

/// Both 4-bit types (NF4 with double quantisation, FP4 without) against bitsandbytes.
fn quantised_perplexity_matches(python: &Path, model: &Path) {
    for (quant, dq) in [("nf4", true), ("fp4", false)] {
        let ours = align_perplexity(model, None, quant, dq);
        let theirs = bnb_perplexity(python, model, None, quant, dq);
        assert_close(ours, theirs, &format!("{} {quant} double_quant={dq}", model.display()));
    }
}

/// A few QLoRA SFT steps by align (NF4, double quantisation); its adapter on the bitsandbytes
/// base in PEFT gives align's perplexity of it, which differs from the base's.
fn qlora_adapter_loads_in_peft(python: &Path, model: &Path, steps: u64, max_length: usize) {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("qlora");
    let cfg = tmp.path().join("qlora.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\nmethod = \"lora\"\n[train]\nmax_steps = {steps}\nbatch_size = 4\nlr = 2e-2\nmax_length = {max_length}\ndevice = \"cpu\"\nquantize = \"nf4\"\ndouble_quant = true\n[lora]\nr = 8\nalpha = 16\ndropout = 0.0\n",
            model,
            repo().join("data/sft/medical_sharegpt.jsonl"),
            out
        ),
    )
    .unwrap();
    ok(&["train", "sft", "--config", s(&cfg)]);
    let adapter = out.join("final");
    assert!(adapter.join("adapter_model.safetensors").is_file() && !adapter.join("model.safetensors").exists());
    let ours = align_perplexity(model, Some(&adapter), "nf4", true);
    let theirs = bnb_perplexity(python, model, Some(&adapter), "nf4", true);
    assert_close(ours, theirs, &format!("QLoRA adapter on {}", model.display()));
    let base = align_perplexity(model, None, "nf4", true);
    assert!((ours - base).abs() / base > 1e-3, "the adapter should change the perplexity ({ours} vs base {base})");
}

fn tiny() -> PathBuf {
    fixtures().join("models/tiny-llama")
}

#[test]
fn quantised_perplexity_matches_bitsandbytes_on_the_tiny_model() {
    let Some(python) = python_with(&["transformers", "bitsandbytes"]) else { return };
    quantised_perplexity_matches(&python, &tiny());
}

#[test]
fn qlora_adapter_loads_in_peft_on_the_bitsandbytes_base() {
    let Some(python) = python_with(&["transformers", "peft", "bitsandbytes"]) else { return };
    qlora_adapter_loads_in_peft(&python, &tiny(), 12, 96);
}

fn smollm2(test: &str) -> Option<PathBuf> {
    let Some(dir) = std::env::var_os("ALIGN_SMOLLM2_DIR").filter(|d| !d.is_empty()).map(PathBuf::from) else {
        eprintln!(
            "SKIPPED {test}: set ALIGN_SMOLLM2_DIR to a SmolLM2-135M-Instruct folder (../shared/tools/make-smollm2.sh)"
        );
        return None;
    };
    assert!(dir.join("config.json").is_file(), "ALIGN_SMOLLM2_DIR={} has no config.json", dir.display());
    Some(dir)
}

#[test]
fn smollm2_quantised_perplexity_matches_bitsandbytes() {
    let Some(dir) = smollm2("smollm2_quantised_perplexity_matches_bitsandbytes") else { return };
    let Some(python) = python_with(&["transformers", "bitsandbytes"]) else { return };
    quantised_perplexity_matches(&python, &dir);
}

#[test]
fn smollm2_qlora_adapter_loads_in_peft_on_the_bitsandbytes_base() {
    let Some(dir) = smollm2("smollm2_qlora_adapter_loads_in_peft_on_the_bitsandbytes_base") else { return };
    let Some(python) = python_with(&["transformers", "peft", "bitsandbytes"]) else { return };
    qlora_adapter_loads_in_peft(&python, &dir, 3, 64);
}

/// int8 rows (inference only) stay close to the full-precision perplexity; `generate` takes
/// `--quantize`; flag mistakes are one clear line.
#[test]
fn int8_inference_and_quantize_flags() {
    let (data, model) = (fixtures().join("perplexity.txt"), tiny());
    let ppl = |extra: &[&str]| -> f64 {
        let mut args =
            vec!["eval", "perplexity", "--model", s(&model), "--data", s(&data), "--device", "cpu", "--json"];
        args.extend(extra);
        serde_json::from_str::<Value>(ok(&args).trim()).unwrap()["perplexity"].as_f64().unwrap()
    };
    let (full, int8) = (ppl(&[]), ppl(&["--quantize", "int8"]));
    assert!((int8 - full).abs() / full < 1e-2, "int8 {int8} vs full precision {full}");
    assert!(int8 != full);
    ok(&[
        "generate",
        "--model",
        s(&model),
        "--device",
        "cpu",
        "--prompt",
        "fever",
        "--max-new-tokens",
        "4",
        "--quantize",
        "nf4",
    ]);
    let e = support::fails(&["eval", "perplexity", "--model", s(&model), "--data", s(&data), "--quantize", "int4"]);
    assert!(e.contains("--quantize: expected nf4, fp4 or int8"), "{e}");
    let e = support::fails(&[
        "eval",
        "perplexity",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--quantize",
        "int8",
        "--double-quant",
    ]);
    assert!(e.contains("--double-quant: applies to the 4-bit types"), "{e}");
}
