//! Helpers shared by the CLI end-to-end tests: run the built `align`, expect success or exactly
//! one clear error line, and find the repository's fixtures.
#![allow(dead_code)]
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// Runs `align ARGS` with warnings-only logging.
pub fn align(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align")).args(args).env("ALIGN_LOG", "warn").output().expect("run align")
}

/// Runs a command that must succeed and returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = align(args);
    assert!(out.status.success(), "align {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("stdout is UTF-8")
}

/// Runs a failing command and returns its error line, checking it is one clear line.
pub fn fails(args: &[&str]) -> String {
    let out = align(args);
    assert!(!out.status.success(), "align {args:?} should fail");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!err.contains("panicked"), "align {args:?} panicked:\n{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "expected one error line, got:\n{err}");
    lines[0].to_string()
}

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures` of the repository.
pub fn fixtures() -> PathBuf {
    repo().join("tests/fixtures")
}

/// A path as a `&str` argument.
pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// A pipeline in `run` on the tiny Llama: LoRA SFT "sft" → LoRA reward model "rm" (on the SFT
/// adapter merged) → LoRA DPO "dpo" (the SFT model as reference) → perplexity "ppl", 3 steps of
/// `batch` each; `train_extra` and `lora_extra` are added to `[defaults.train]` and each
/// `[stage.lora]`.
pub fn lora_chain_pipeline(run: &Path, batch: usize, train_extra: &str, lora_extra: &str) -> String {
    let r = repo();
    format!(
        r#"[pipeline]
name = "lora-chain"
run_dir = {run:?}
[defaults]
model = {model:?}
device = "cpu"
[defaults.train]
batch_size = {batch}
lr = 1e-2
max_steps = 3
max_length = 96
{train_extra}[[stage]]
name = "sft"
kind = "sft"
method = "lora"
data = [{sft:?}]
[stage.lora]
r = 4
{lora_extra}[[stage]]
name = "rm"
kind = "reward"
from = "sft"
method = "lora"
data = [{pairs:?}]
[stage.lora]
r = 4
{lora_extra}[[stage]]
name = "dpo"
kind = "dpo"
from = "sft"
reference = "sft"
method = "lora"
data = [{pairs:?}]
[stage.lora]
r = 4
{lora_extra}[[stage]]
name = "ppl"
kind = "eval"
eval = "perplexity"
from = "dpo"
data = [{ppl:?}]
"#,
        model = r.join("tests/fixtures/models/tiny-llama"),
        sft = r.join("data/sft/medical_sharegpt.jsonl"),
        pairs = r.join("data/preference/medical_pairs.jsonl"),
        ppl = r.join("tests/fixtures/perplexity.txt"),
    )
}
