//! Helpers shared by the tests of every crate (a dev-dependency only): where the repository's
//! fixtures and sample data are, a stage config from TOML text, `metrics.jsonl` readers, and the
//! lock that makes tests drawing from libtorch's process-global RNG take turns.
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
