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
