//! `align data check` on the project's sample data (all valid, with and without a tokenizer,
//! table and JSON) and on broken files (non-zero exit, every bad line named).
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn align(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_align"))
        .args(args)
        .current_dir(root())
        .env("ALIGN_LOG", "warn")
        .output()
        .expect("run align")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

const TOKENIZER: &str = "tests/fixtures/models/tiny-llama";

const SAMPLE_DATA: [(&str, &[&str]); 4] = [
    ("pretrain", &["data/pretrain/medical_corpus.txt", "data/pretrain/medical_notes.jsonl"]),
    ("sft", &["data/sft/medical_sharegpt.jsonl", "data/sft/medical_alpaca.jsonl", "data/sft/medical_sft_eval.jsonl"]),
    ("preference", &["data/preference/medical_pairs.jsonl", "data/preference/medical_pairs_eval.jsonl"]),
    ("prompt", &["data/prompts/medical_prompts.jsonl", "data/prompts/medical_qa.jsonl"]),
];

#[test]
fn sample_data_passes_with_token_lengths() {
    for (kind, files) in SAMPLE_DATA {
        let mut args = vec!["data", "check", "--kind", kind, "--tokenizer", TOKENIZER, "--max-length", "256", "--json"];
        args.extend_from_slice(files);
        let out = align(&args);
        assert!(out.status.success(), "align {args:?} failed:\n{}{}", stdout(&out), stderr(&out));
        let v: Value = serde_json::from_str(&stdout(&out)).expect("one JSON object");
        assert_eq!(v["ok"], true);
        assert_eq!(v["invalid"], 0);
        let reports = v["files"].as_array().unwrap();
        assert_eq!(reports.len(), files.len(), "{kind}");
        for r in reports {
            assert!(r["records"].as_u64().unwrap() > 0, "{r}");
            assert!(r["format"].is_string(), "{r}");
            let l = &r["lengths"];
            let (p50, p95, max) = (l["p50"].as_u64().unwrap(), l["p95"].as_u64().unwrap(), l["max"].as_u64().unwrap());
            assert!(0 < p50 && p50 <= p95 && p95 <= max, "{r}");
            assert_eq!(l["max_length"], 256);
            assert!(l["over_max_length"].is_u64());
        }
    }
}

#[test]
fn sample_data_table_names_formats() {
    let out = align(&["data", "check", "--kind", "sft", "data/sft/*.jsonl"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for expected in ["medical_sharegpt.jsonl", "ShareGPT", "medical_alpaca.jsonl", "Alpaca", "total (3 files)"] {
        assert!(table.contains(expected), "missing {expected}:\n{table}");
    }
    let out = align(&["data", "check", "--kind", "prompt", "--tokenizer", TOKENIZER, "data/prompts"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    for expected in ["prompt", "question/answer", "p50 tok", "p95 tok", "max tok"] {
        assert!(table.contains(expected), "missing {expected}:\n{table}");
    }
}

#[test]
fn broken_file_fails_after_listing_every_bad_line() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        concat!(
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#,
            "\n",
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"bot","value":"a"}]}"#,
            "\n",
            "{oops\n",
            "\n",
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":1}]}"#,
            "\n",
        ),
    )
    .unwrap();
    let bad = bad.to_str().unwrap();
    let out = align(&["data", "check", "--kind", "sft", "data/sft/medical_sft_eval.jsonl", bad]);
    assert!(!out.status.success(), "a broken file must fail");
    let (table, err) = (stdout(&out), stderr(&out));
    assert!(!err.contains("panicked"), "{err}");
    assert!(table.contains("medical_sft_eval.jsonl"), "every report is printed first:\n{table}");
    for expected in [
        format!("{bad}:2: field 'conversations[1].from': expected one of human, gpt, system, function_call, observation, found 'bot'"),
        format!("{bad}:3: invalid JSON"),
        format!("{bad}:5: field 'conversations[1].value': expected a string, found a number"),
    ] {
        assert!(table.contains(&expected), "missing {expected}:\n{table}");
    }
    assert!(err.contains("error: 3 invalid records in 1 of 2 files"), "{err}");

    let out = align(&["data", "check", "--kind", "sft", "--json", bad]);
    assert!(!out.status.success());
    let v: Value = serde_json::from_str(&stdout(&out)).expect("JSON even when invalid");
    assert_eq!(v["ok"], false);
    assert_eq!(v["invalid"], 3);
    let lines: Vec<u64> =
        v["files"][0]["invalid_records"].as_array().unwrap().iter().map(|r| r["line"].as_u64().unwrap()).collect();
    assert_eq!(lines, vec![2, 3, 5]);
}

#[test]
fn usage_errors_are_one_clear_line() {
    let out = align(&["data", "check", "--kind", "sft", "--max-length", "10", "data/sft/medical_sft_eval.jsonl"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("error: --max-length: token lengths need --tokenizer"), "{}", stderr(&out));
    let out = align(&["data", "check", "--kind", "sft", "data/nothing/*.jsonl"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("error: data/nothing/*.jsonl: the pattern matches no files"), "{}", stderr(&out));
    let out = align(&["data", "check", "--kind", "sft", "data/pretrain/medical_corpus.txt"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains(".txt files hold pretraining text only"), "{}", stderr(&out));
}

#[test]
fn ranked_lists_are_counted_as_pairs() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("ranked.jsonl");
    std::fs::write(
        &f,
        concat!(
            r#"{"prompt":"Q","responses":["a","b","c","d"]}"#,
            "\n",
            r#"{"conversations":[{"from":"human","value":"Q"}],"ranked":["a"]}"#,
            "\n"
        ),
    )
    .unwrap();
    let f = f.to_str().unwrap();
    let run = |mode: &str| {
        let out = align(&["data", "check", "--kind", "preference", "--ranked-pairs", mode, "--json", f]);
        assert!(!out.status.success());
        serde_json::from_str::<Value>(&stdout(&out)).unwrap()
    };
    let v = run("all");
    assert_eq!((v["records"].as_u64(), v["invalid"].as_u64()), (Some(6), Some(1)));
    assert_eq!(v["files"][0]["format"], "ranked_responses");
    assert_eq!(v["files"][0]["ranked_lists"], 1);
    assert_eq!(
        v["files"][0]["invalid_records"][0]["message"],
        "field 'ranked': expected at least 2 answers to rank, found 1"
    );
    assert_eq!(run("adjacent")["records"], 3);
    assert_eq!(run("best-vs-rest")["records"], 3);
}
