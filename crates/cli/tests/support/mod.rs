//! Helpers shared by the CLI end-to-end tests: run the built `align`, expect success or exactly
//! one clear error line, and find the repository's fixtures.
#![allow(dead_code)]
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

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

/// A running `align serve` or `align board` on a free loopback port (killed when dropped).
pub struct Server {
    pub child: Child,
    pub port: u16,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_command("serve", args)
    }

    pub fn start_command(command: &str, args: &[&str]) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_align"))
            .arg(command)
            .args(args)
            .args(["--port", "0"])
            .env("ALIGN_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok());
        let Some(port) = port else {
            let _ = child.kill();
            panic!("align {command} printed {line:?} instead of its address");
        };
        Server { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
