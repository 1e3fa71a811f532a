//! `align eval judge` against a fake OpenAI endpoint (fixed judgements: parsing, the swap rule,
//! win rate and interval end to end), against `align serve` on the tiny model (gibberish
//! judgements: all counted unparseable) and with a local judge folder; `align compare` on two
//! runs of a tiny SFT → answers pipeline that differ in one line. Servers bind 127.0.0.1 on a
//! free port; every loop is bounded.
mod support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use support::{fails, fixtures, ok, repo, s, Server};

fn tiny() -> PathBuf {
    fixtures().join("models/tiny-llama")
}

/// The five questions of the fake judge's prompts, by their code word.
const WORDS: [&str; 5] = ["alpha", "beta", "gamma", "delta", "epsilon"];

fn prompts(dir: &Path) -> PathBuf {
    let path = dir.join("prompts.jsonl");
    let lines: Vec<String> =
        WORDS.iter().map(|w| json!({"prompt": format!("Question {w}: what helps a fever?")}).to_string()).collect();
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    path
}

/// A fake OpenAI-compatible judge on a free port: `GET /v1/models` lists "fake-judge";
/// `POST /v1/chat/completions` answers `reply(code word, how many times it was asked about that
/// word before)`, and 401 without `Authorization: Bearer sekrit`. Serves at most `limit` requests.
fn fake_judge(limit: usize, reply: fn(&str, usize) -> &'static str) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
    std::thread::spawn(move || {
        for conn in listener.incoming().take(limit) {
            let Ok(mut conn) = conn else { continue };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let (mut head, mut line) = (String::new(), String::new());
            while reader.read_line(&mut line).unwrap_or(0) > 2 {
                head.push_str(&line);
                line.clear();
            }
            let length = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let mut body = vec![0u8; length];
            reader.read_exact(&mut body).unwrap();
            let (status, answer) = if head.starts_with("GET /v1/models") {
                ("200 OK", json!({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]}))
            } else if !head.contains("Authorization: Bearer sekrit") {
                ("401 Unauthorized", json!({"error": {"message": "bad key"}}))
            } else {
                let req: Value = serde_json::from_slice(&body).unwrap();
                assert_eq!(req["temperature"], 0);
                let text = req["messages"].as_array().unwrap().last().unwrap()["content"].as_str().unwrap().to_string();
                let word = WORDS.iter().find(|w| text.contains(*w)).copied().unwrap_or("none");
                let mut seen = seen.lock().unwrap();
                let n = seen.entry(word.to_string()).or_insert(0);
                // a second run of the command asks the same questions again
                let content = reply(word, *n % 2);
                *n += 1;
                (
                    "200 OK",
                    json!({"object": "chat.completion", "model": "fake-judge",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}),
                )
            };
            let body = answer.to_string();
            let _ = write!(
                conn,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    port
}

/// Runs `align ARGS` with the fake judge's key in `JUDGE_KEY`; returns stdout, or panics.
fn align_with_key(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_align"))
        .args(args)
        .env("ALIGN_LOG", "warn")
        .env("JUDGE_KEY", "sekrit")
        .output()
        .unwrap();
    assert!(out.status.success(), "align {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn pairwise_judging_on_a_fake_endpoint_applies_the_swap_rule() {
    let tiny = tiny();
    // model first (the 1st time a question is judged), then baseline first (the 2nd time):
    // alpha, beta: A then B → the model wins both orders → win
    // gamma: B then A → loss; delta: A both times (position bias) → tie
    // epsilon: unreadable in one order → unparseable, left out of the rate
    fn reply(word: &str, n: usize) -> &'static str {
        match (word, n) {
            ("alpha", 0) => "Assistant A is more complete. [[A]]",
            ("alpha", _) => "Assistant B covers more. [[B]]",
            ("beta", 0) => "My final verdict: [A]",
            ("beta", _) => "Final verdict: B",
            ("gamma", 0) => "[[B]]",
            ("gamma", _) => "[[A]]",
            ("delta", _) => "The first one. [[A]]",
            ("epsilon", 0) => "I cannot decide between them.",
            _ => "[[B]]",
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = fake_judge(32, reply);
    let url = format!("http://127.0.0.1:{port}/v1");
    let out = tmp.path().join("judged.jsonl");
    let p = prompts(tmp.path());
    let args = [
        "eval",
        "judge",
        "--model",
        s(&tiny),
        "--baseline",
        s(&tiny),
        "--judge",
        &url,
        "--prompts",
        s(&p),
        "--mode",
        "pairwise",
        "--api-key-env",
        "JUDGE_KEY",
        "--max-new-tokens",
        "8",
        "--output",
        s(&out),
        "--json",
    ];
    let v: Value = serde_json::from_str(&align_with_key(&args)).unwrap();
    assert_eq!((v["mode"].as_str(), v["judge_model"].as_str()), (Some("pairwise"), Some("fake-judge")));
    assert_eq!(
        (v["prompts"].as_u64(), v["judgements"].as_u64(), v["unparseable"].as_u64()),
        (Some(5), Some(10), Some(1))
    );
    let w = &v["win"];
    assert_eq!((w["wins"].as_u64(), w["ties"].as_u64(), w["losses"].as_u64()), (Some(2), Some(1), Some(1)));
    assert_eq!(w["unparseable"], 1);
    // (2 + ½·1) / 4; Wilson at z = 1.96: centre (0.625 + 0.4802)/1.9604 = 0.5638,
    // half 1.96·√(0.05859 + 0.06002)/1.9604 = 0.3443
    assert!((w["win_rate"].as_f64().unwrap() - 0.625).abs() < 1e-12, "{w}");
    let (lo, hi) = (w["ci_low"].as_f64().unwrap(), w["ci_high"].as_f64().unwrap());
    assert!((lo - 0.2194).abs() < 1e-3 && (hi - 0.9081).abs() < 1e-3, "{lo} {hi}");
    assert!(v["model"].is_null() && v["baseline"].is_null(), "{v}");
    // one record per prompt with both raw judgements
    let records: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 5);
    let eps = &records[4];
    assert!(eps["question"].as_str().unwrap().contains("epsilon"));
    assert_eq!(eps["outcome"], "unparseable");
    assert_eq!(eps["judgements"][0]["order"], "model_first");
    assert_eq!(eps["judgements"][0]["raw"], "I cannot decide between them.");
    assert_eq!(eps["judgements"][0]["parsed"], false);
    assert_eq!(eps["judgements"][1]["verdict"], "B");
    assert_eq!(records[0]["outcome"], "win");
    assert_eq!(records[3]["outcome"], "tie");
    assert_eq!(records[0]["answer"], records[0]["baseline_answer"]);
    // the table says the same
    let table = align_with_key(&args[..args.len() - 1]);
    assert!(table.contains("wins / ties / losses") && table.contains("2/1/1"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("unparseable") && l.ends_with(" 1")), "{table}");
}

#[test]
fn score_judging_on_a_fake_endpoint_reads_many_rating_styles() {
    let tiny = tiny();
    fn reply(word: &str, _: usize) -> &'static str {
        match word {
            "alpha" => "Helpful and accurate. Rating: [[8]]",
            "beta" => "评分：6",
            "gamma" => "I would give it 7/10.",
            "delta" => "Score: 9",
            _ => "This is an answer about fevers.",
        }
    }
    let tmp = tempfile::tempdir().unwrap();
    let port = fake_judge(16, reply);
    let p = prompts(tmp.path());
    let url = format!("http://127.0.0.1:{port}");
    let args = [
        "eval",
        "judge",
        "--model",
        s(&tiny),
        "--judge",
        &url,
        "--judge-model",
        "any",
        "--prompts",
        s(&p),
        "--api-key-env",
        "JUDGE_KEY",
        "--max-new-tokens",
        "8",
        "--json",
    ];
    let v: Value = serde_json::from_str(&align_with_key(&args)).unwrap();
    assert_eq!((v["mode"].as_str(), v["judge_model"].as_str()), (Some("score"), Some("any")));
    assert_eq!((v["judgements"].as_u64(), v["unparseable"].as_u64()), (Some(5), Some(1)));
    // 8, 6, 7, 9: mean 7.5, sample sd √(5/3), stderr √(5/3)/2
    let m = &v["model"];
    assert_eq!((m["n"].as_u64(), m["unparseable"].as_u64()), (Some(4), Some(1)));
    assert!((m["mean"].as_f64().unwrap() - 7.5).abs() < 1e-12, "{m}");
    assert!((m["stderr"].as_f64().unwrap() - (5.0f64 / 3.0).sqrt() / 2.0).abs() < 1e-12, "{m}");
    assert!(v["win"].is_null() && v["baseline"].is_null(), "{v}");
    // a missing key is the endpoint's 401, named with its URL
    let e = fails(&["eval", "judge", "--model", s(&tiny), "--judge", &url, "--judge-model", "x", "--prompts", s(&p)]);
    assert!(e.contains("/v1/chat/completions: HTTP 401"), "{e}");
}

#[test]
fn judging_with_align_serve_and_a_local_judge_counts_gibberish_as_unparseable() {
    let tiny = tiny();
    let tmp = tempfile::tempdir().unwrap();
    let p = prompts(tmp.path());
    // a short rubric, so that prompt + judgement fit the tiny model's 256 positions
    let rubric = tmp.path().join("rubric.txt");
    std::fs::write(&rubric, "Rate from 1 to 10: {answer}").unwrap();
    let server = Server::start(&["--model", s(&tiny), "--served-model-name", "tiny"]);
    let out = tmp.path().join("j.jsonl");
    let url = server.url();
    let base = ["eval", "judge", "--model", s(&tiny), "--prompts", s(&p), "--limit", "3", "--rubric", s(&rubric)];
    let tail = ["--max-new-tokens", "8", "--judge-max-new-tokens", "16", "--json"];
    let mut args: Vec<&str> = base.to_vec();
    args.extend(["--judge", &url, "--output", s(&out)]);
    args.extend(tail);
    let v: Value = serde_json::from_str(&ok(&args)).unwrap();
    assert_eq!(v["judge_model"], "tiny");
    assert_eq!((v["prompts"].as_u64(), v["judgements"].as_u64()), (Some(3), Some(3)));
    assert_eq!(v["unparseable"], v["judgements"], "{v}");
    assert_eq!((v["model"]["n"].as_u64(), v["model"]["unparseable"].as_u64()), (Some(0), Some(3)));
    assert!(v["model"]["mean"].is_null());
    let records: Vec<Value> =
        std::fs::read_to_string(&out).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(records.len(), 3);
    for r in &records {
        assert_eq!(
            (r["judgements"][0]["order"].as_str(), r["judgements"][0]["parsed"].as_bool()),
            (Some("model"), Some(false))
        );
        assert!(r["judgements"][0]["raw"].is_string() && r["outcome"].is_null(), "{r}");
    }
    // the same judge as a local folder: greedy with its chat template, the same shape
    let mut local: Vec<&str> = base.to_vec();
    local.extend(["--judge", s(&tiny)]);
    local.extend(tail);
    let v: Value = serde_json::from_str(&ok(&local)).unwrap();
    assert!(v["judge_model"].is_null());
    assert_eq!((v["judgements"].as_u64(), v["unparseable"].as_u64()), (Some(3), Some(3)));
    drop(server);
    // clear errors
    let with = |extra: &[&str]| {
        let mut a = vec!["eval", "judge", "--model", s(&tiny), "--prompts", s(&p)];
        a.extend_from_slice(extra);
        fails(&a)
    };
    let e = with(&["--judge", "https://judge.invalid/v1"]);
    assert!(e.contains("https is not supported"), "{e}");
    let e = with(&["--judge", s(&tiny), "--mode", "pairwise"]);
    assert!(e.contains("--mode pairwise: needs --baseline"), "{e}");
    let bad = tmp.path().join("bad.txt");
    std::fs::write(&bad, "Q {question}\nA {answer} vs {reference}").unwrap();
    let e = with(&["--judge", s(&tiny), "--rubric", s(&bad)]);
    assert!(e.contains("bad.txt:2: unknown placeholder {reference}"), "{e}");
}

/// A tiny pipeline: 2 LoRA SFT steps on the tiny Llama, then BLEU / EM / F1 of 3 answers.
fn sft_answers_pipeline(run: &Path, eval_data: &Path, lr: &str) -> String {
    format!(
        r#"[pipeline]
name = "cmp"
run_dir = {run:?}
[defaults]
model = {model:?}
device = "cpu"
[defaults.train]
batch_size = 2
lr = {lr}
max_steps = 2
max_length = 96
[[stage]]
name = "sft"
kind = "sft"
method = "lora"
data = [{sft:?}]
[stage.lora]
r = 4
[[stage]]
name = "answers"
kind = "eval"
eval = "answers"
from = "sft"
max_new_tokens = 8
data = [{eval_data:?}]
"#,
        model = tiny(),
        sft = repo().join("data/sft/medical_sharegpt.jsonl"),
    )
}

#[test]
fn compare_lines_up_two_runs_and_their_config_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let eval_data = tmp.path().join("eval3.jsonl");
    let all = std::fs::read_to_string(repo().join("data/sft/medical_sft_eval.jsonl")).unwrap();
    std::fs::write(&eval_data, all.lines().take(3).collect::<Vec<_>>().join("\n") + "\n").unwrap();
    let mut runs = Vec::new();
    for (name, lr) in [("fast", "1e-2"), ("slow", "1e-3")] {
        let run = tmp.path().join(name);
        let file = tmp.path().join(format!("{name}.toml"));
        std::fs::write(&file, sft_answers_pipeline(&run, &eval_data, lr)).unwrap();
        ok(&["run", s(&file)]);
        runs.push(run);
    }
    let html = tmp.path().join("out/compare.html");
    let v: Value = serde_json::from_str(&ok(&["compare", s(&runs[0]), s(&runs[1]), "--json"])).unwrap();
    // both runs are named "cmp": the folders label them
    assert_eq!(v["runs"], json!(["fast", "slow"]));
    let row = |stage: &str, metric: &str| {
        v["metrics"].as_array().unwrap().iter().find(|r| r["stage"] == stage && r["metric"] == metric).cloned()
    };
    for (i, run) in runs.iter().enumerate() {
        let record: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("answers/stage.json")).unwrap()).unwrap();
        for metric in ["bleu4", "rouge_l", "char_f1", "exact_match", "f1", "samples"] {
            let r = row("answers", metric).unwrap_or_else(|| panic!("no answers {metric} row: {v}"));
            assert_eq!(r["section"], "eval");
            assert_eq!(r["values"][i].as_f64(), record["eval"][metric].as_f64(), "{metric} of {}", run.display());
        }
        let summary: Value =
            serde_json::from_str(&std::fs::read_to_string(run.join("sft/train_summary.json")).unwrap()).unwrap();
        assert_eq!(row("sft", "last_loss").unwrap()["values"][i], summary["last_loss"]);
        assert_eq!(row("sft", "steps").unwrap()["values"][i], 2.0);
    }
    assert!(row("sft", "duration_seconds").is_some(), "{v}");
    // the one-line change, in every stage that records the training defaults; run paths are not differences
    let config = v["config"].as_array().unwrap();
    let keys: Vec<&str> = config.iter().map(|d| d["key"].as_str().unwrap()).collect();
    assert!(keys.contains(&"sft.train.lr"), "{keys:?}");
    assert!(keys.iter().all(|k| k.ends_with(".lr")), "{keys:?}");
    let lr = config.iter().find(|d| d["key"] == "sft.train.lr").unwrap();
    assert_eq!(lr["values"], json!(["0.01", "0.001"]));
    // the table and the HTML page
    let table = ok(&["compare", s(&runs[0]), s(&runs[1]), "--html", s(&html)]);
    assert!(table.lines().next().unwrap().contains("fast") && table.contains("answers  exact_match"), "{table}");
    assert!(
        table.lines().any(|l| l.starts_with("sft.train.lr") && l.contains("0.01") && l.contains("0.001")),
        "{table}"
    );
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>") && page.contains("<style>") && !page.contains("<script"), "{page}");
    assert!(page.contains("<td>sft.train.lr</td>") && page.contains("<td>exact_match</td>"), "{page}");
    assert!(page.contains("<th>fast</th>") && page.contains("<th>slow</th>"), "{page}");
    let e = fails(&["compare", s(&runs[0]), s(&tmp.path().join("nope"))]);
    assert!(e.ends_with("nope: no such run folder"), "{e}");
}
