//! Helpers shared by the tests of every crate (a dev-dependency only): where the repository's
//! fixtures and sample data are, a stage config from TOML text, `metrics.jsonl` readers, the
//! lock that makes tests drawing from libtorch's process-global RNG take turns, and the Python of
//! the interop checks (which fail instead of skipping under `CI=true`).
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use align_core::train::config::LoadedConfig;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// `tests/fixtures/…` of the repository.
pub fn fixture(rel: &str) -> PathBuf {
    repo().join("tests/fixtures").join(rel)
}

/// A tiny model of `tests/fixtures/models/` (`tiny-llama`, `tiny-qwen2`, …).
pub fn tiny_model(name: &str) -> PathBuf {
    fixture(&format!("models/{name}"))
}

/// `data/…` of the repository (the sample data).
pub fn sample_data(rel: &str) -> PathBuf {
    repo().join("data").join(rel)
}

/// A stage config from TOML text (as `align train KIND --config` reads it), with `--set` overrides.
pub fn stage_config(text: &str, kind: &str, overrides: &[&str]) -> LoadedConfig {
    let table: toml::Table = toml::from_str(text).expect("test config is TOML");
    let overrides: Vec<String> = overrides.iter().map(|s| s.to_string()).collect();
    LoadedConfig::from_table(table, Path::new("test.toml"), &overrides, kind).expect("test config is valid")
}

/// Every line of `OUT/metrics.jsonl`.
pub fn metric_lines(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
        .collect()
}

/// The values of `key` on every training line (one with a `loss`) of `OUT/metrics.jsonl`.
pub fn train_series(out: &Path, key: &str) -> Vec<f64> {
    metric_lines(out)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| v[key].as_f64().unwrap_or_else(|| panic!("no {key} in {v}")))
        .collect()
}

/// `(step, loss)` of every training line of `OUT/metrics.jsonl`.
pub fn losses(out: &Path) -> Vec<(u64, f64)> {
    metric_lines(out)
        .iter()
        .filter(|v| v.get("loss").is_some())
        .map(|v| (v["step"].as_u64().unwrap_or(0), v["loss"].as_f64().unwrap_or(f64::NAN)))
        .collect()
}

/// libtorch's random generator is global to the process: runs that draw from it (head and LoRA
/// init, dropout) must not overlap, or their exact-resume guarantees do not hold. Real runs are
/// one per process; tests take turns through this lock.
pub fn rng_lock() -> MutexGuard<'static, ()> {
    static RNG: Mutex<()> = Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// True when two files have the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("file a") == std::fs::read(b).expect("file b")
}

/// True when the interop checks must run rather than skip: `CI=true` (or `1`), as CI
/// environments set it, or `ALIGN_REQUIRE_INTEROP=1`, as `scripts/test.sh` sets it after
/// installing the Python packages they need.
pub fn interop_required() -> bool {
    let set = |name: &str, values: &[&str]| {
        std::env::var(name).map(|v| values.iter().any(|w| v.trim().eq_ignore_ascii_case(w))).unwrap_or(false)
    };
    set("CI", &["true", "1"]) || set("ALIGN_REQUIRE_INTEROP", &["1", "true"])
}

/// The Python of the interop checks (align ↔ transformers / PEFT) when it can import every one
/// of `modules` (`&["transformers", "peft"]`): `ALIGN_PYTHON`, else the repository's
/// `.venv/bin/python`. Without such a Python the calling test prints `SKIPPED <test>: …` and
/// gets `None` — unless [`interop_required`] (`CI=true` or `ALIGN_REQUIRE_INTEROP=1`), where it
/// panics naming the Python and the missing module, so a check cannot silently skip in CI.
/// (Only the SmolLM2 checks of `crates/cli/tests/smollm2.rs` may still skip there: they need
/// `ALIGN_SMOLLM2_DIR`, a real model folder that no test can make.) The answer is computed once
/// per process and set of modules.
pub fn python_with(modules: &[&str]) -> Option<PathBuf> {
    static SEEN: Mutex<Vec<(PathBuf, String, Result<(), String>)>> = Mutex::new(Vec::new());
    let python = std::env::var_os("ALIGN_PYTHON").map(PathBuf::from).unwrap_or_else(|| repo().join(".venv/bin/python"));
    let imports = format!("import {}", modules.join(", "));
    let answer = {
        let mut seen = SEEN.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match seen.iter().find(|(p, i, _)| *p == python && *i == imports) {
            Some((_, _, answer)) => answer.clone(),
            None => {
                let answer = match std::process::Command::new(&python).args(["-c", &imports]).output() {
                    Ok(o) if o.status.success() => Ok(()),
                    Ok(o) => Err(String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .rev()
                        .find(|l| !l.trim().is_empty())
                        .unwrap_or("exit status without a message")
                        .trim()
                        .to_string()),
                    Err(e) => Err(format!("cannot run it: {e}")),
                };
                seen.push((python.clone(), imports.clone(), answer.clone()));
                answer
            }
        }
    };
    let why = match answer {
        Ok(()) => return Some(python),
        Err(why) => why,
    };
    let thread = std::thread::current();
    let test = thread.name().unwrap_or("this test");
    let problem = format!("{}: `{imports}` fails ({why})", python.display());
    if interop_required() {
        panic!(
            "{test}: the interop check cannot run: {problem}. CI=true or ALIGN_REQUIRE_INTEROP=1 makes it required: \
             run scripts/test.sh (it installs the pinned transformers and peft into .venv) or set ALIGN_PYTHON \
             to a Python that has them"
        );
    }
    println!("SKIPPED {test}: {problem} (set ALIGN_PYTHON, or run scripts/test.sh, which installs it)");
    None
}
