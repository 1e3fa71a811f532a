//! `align serve`, `align board` and `align chat` on the tiny fixture model: the official `openai`
//! client against transformers and PEFT (tests/reference/check_serve.py), the web console in a
//! headless browser (check_console.py, skipped without chromium), and over plain HTTP: overload
//! answered 429 at once, a client that goes away frees its place, SIGTERM lets a running stream
//! finish, the API key, the dashboard's JSON; the terminal chat. Servers bind 127.0.0.1 on a free
//! port; every loop is bounded.
mod support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use support::{fixtures, s, Server};

fn tiny() -> PathBuf {
    fixtures().join("models/tiny-llama")
}

trait Http {
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String);
    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream;
    fn post(&self, path: &str, body: &Value) -> (u16, Value);
    fn health(&self) -> Value;
}

impl Http for Server {
    fn request(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        request(self.port, method, path, headers, body)
    }

    fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
        send(self.port, method, path, headers, body)
    }

    fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        post(self.port, path, body)
    }

    fn health(&self) -> Value {
        serde_json::from_str(&self.request("GET", "/health", &[], b"").1).unwrap()
    }
}

/// Sends one request (Connection: close) and returns its status and body (de-chunked).
fn request(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
    let mut conn = send(port, method, path, headers, body);
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).unwrap();
    parse_response(&raw)
}

fn send(port: u16, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> TcpStream {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    conn.write_all(head.as_bytes()).unwrap();
    conn.write_all(body).unwrap();
    conn
}

fn post(port: u16, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) =
        request(port, "POST", path, &[("Content-Type", "application/json")], body.to_string().as_bytes());
    (status, serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}: {text}")))
}

fn parse_response(raw: &[u8]) -> (u16, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    if !head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        return (status, body.to_string());
    }
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].strip_prefix("\r\n").unwrap_or(&after[n..]);
    }
    (status, out)
}

/// Reads from a streaming response until `needle` has arrived (bounded by the read timeout).
fn read_until(conn: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended before {needle:?}: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

/// A chat request that runs `max_tokens` tokens (the eos ids get a -100 logit bias).
fn long_chat(model: &str, max_tokens: usize, stream: bool) -> Value {
    let tok = align_core::ModelTokenizer::from_dir(&tiny()).unwrap();
    let mut bias = serde_json::Map::new();
    for e in tok.eos_token_ids.iter().chain([2i64].iter()) {
        bias.insert(e.to_string(), json!(-100));
    }
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "temperature": 0,
           "max_tokens": max_tokens, "stream": stream, "logit_bias": bias})
}

fn wait_for(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn the_openai_client_gets_what_transformers_and_peft_compute() {
    let Some(python) = align_testkit::python_with(&["openai", "transformers", "peft", "torch"]) else { return };
    let (all, qv) = (fixtures().join("peft/llama-all"), fixtures().join("peft/llama-qv"));
    let a_all = format!("all={}", s(&all));
    let a_qv = format!("qv={}", s(&qv));
    let server =
        Server::start(&["--model", s(&tiny()), "--served-model-name", "tiny", "--adapter", &a_all, "--adapter", &a_qv]);
    let out = Command::new(python)
        .arg(support::repo().join("tests/reference/check_serve.py"))
        .args(["--base-url", &format!("{}/v1", server.url()), "--model-dir", s(&tiny()), "--model-id", "tiny"])
        .args(["--adapter", &a_all, "--adapter", &a_qv, "--concurrency", "64"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "check_serve.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("64 concurrent clients: all answered"));
}

#[test]
fn overload_is_answered_429_at_once_and_a_client_that_leaves_frees_its_place() {
    let server = Server::start(&["--model", s(&tiny()), "--max-batch", "1", "--max-queue", "1"]);
    let body = long_chat(s(&tiny()), 150, false);
    let port = server.port;
    let results: Vec<(u16, Value, f64)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let body = body.clone();
                scope.spawn(move || {
                    let started = Instant::now();
                    let (status, v) = post(port, "/v1/chat/completions", &body);
                    (status, v, started.elapsed().as_secs_f64())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let ok: Vec<_> = results.iter().filter(|r| r.0 == 200).collect();
    let busy: Vec<_> = results.iter().filter(|r| r.0 == 429).collect();
    assert_eq!(ok.len() + busy.len(), 8, "{results:?}");
    assert!(ok.len() >= 2 && !busy.is_empty(), "ok {} busy {}", ok.len(), busy.len());
    let slowest_ok = ok.iter().map(|r| r.2).fold(0.0, f64::max);
    for (_, v, secs) in &busy {
        assert_eq!(v["error"]["code"], "rate_limit_exceeded", "{v}");
        assert!(*secs < slowest_ok, "a 429 came after {secs}s, the slowest answer after {slowest_ok}s");
    }
    for (_, v, _) in &ok {
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["completion_tokens"], 150);
    }
    // a streaming client that goes away mid-answer: its row leaves the batch, its place frees
    let mut conn = server.send(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        long_chat(s(&tiny()), 170, true).to_string().as_bytes(),
    );
    read_until(&mut conn, "\"content\":\"");
    drop(conn);
    wait_for("the gone client's row to leave", || {
        let h = server.health();
        h["running"] == 0 && h["in_flight"] == 0
    });
    let (status, _) = server.post("/v1/chat/completions", &long_chat(s(&tiny()), 5, false));
    assert_eq!(status, 200);
}

#[test]
fn sigterm_lets_the_running_stream_finish_then_the_server_exits() {
    let mut server = Server::start(&["--model", s(&tiny()), "--shutdown-timeout", "20"]);
    let mut conn = server.send(
        "POST",
        "/v1/chat/completions",
        &[("Content-Type", "application/json")],
        long_chat(s(&tiny()), 170, true).to_string().as_bytes(),
    );
    read_until(&mut conn, "\"content\":\"");
    let pid = server.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest).unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(
        rest.contains("\"finish_reason\":\"length\"") && rest.contains("data: [DONE]"),
        "the stream was cut: {rest}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(st) = server.child.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");
    assert!(TcpStream::connect(("127.0.0.1", server.port)).is_err(), "the port still accepts connections");
}

/// A run folder with a finished SFT stage and a running DPO stage (metrics and samples).
fn synthetic_run(dir: &Path) {
    let write = |rel: &str, text: String| {
        let p = dir.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, text).unwrap();
    };
    write("pipeline.json", json!({"name": "demo", "stages": ["sft", "dpo"]}).to_string());
    let stage = |kind: &str, status: &str| {
        json!({"name": kind, "kind": kind, "status": status, "config_hash": "x", "duration_seconds": 12.0}).to_string()
    };
    write("sft/stage.json", stage("sft", "done"));
    write("dpo/stage.json", stage("dpo", "running"));
    let lines = |f: &dyn Fn(u64) -> Value| (1..=20).map(|s| f(s).to_string() + "\n").collect::<String>();
    write("sft/metrics.jsonl", lines(&|s| json!({"step": s, "loss": 2.0 - s as f64 * 0.05})));
    write(
        "dpo/metrics.jsonl",
        lines(&|s| json!({"step": s, "loss": 0.69 - s as f64 * 0.01, "rewards/margins": s as f64 * 0.1})),
    );
    write("dpo/samples.jsonl", json!({"step": 20, "prompt": "p", "completion": "c"}).to_string() + "\n");
}

#[test]
fn the_api_key_guards_the_api_and_the_console_shows_chat_and_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    synthetic_run(&run);
    let server = Server::start(&[
        "--model",
        s(&tiny()),
        "--served-model-name",
        "tiny",
        "--api-key",
        "sesame",
        "--runs",
        s(&run),
    ]);
    let (status, body) = server.request("GET", "/v1/models", &[], b"");
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("invalid_api_key"));
    let (status, _) = server.request("GET", "/v1/models", &[("Authorization", "Bearer wrong")], b"");
    assert_eq!(status, 401);
    let (status, body) = server.request("GET", "/v1/models", &[("Authorization", "Bearer sesame")], b"");
    assert_eq!(status, 200, "{body}");
    assert_eq!(server.health()["status"], "ok", "health needs no key");
    let (status, page) = server.request("GET", "/", &[], b"");
    assert!(
        status == 200
            && page.contains("<title>align console</title>")
            && !page.contains("http://")
            && !page.contains("https://"),
        "the console loads nothing from elsewhere"
    );
    let (status, runs) = server.request("GET", "/api/runs", &[], b"");
    assert_eq!(status, 200);
    let runs: Value = serde_json::from_str(&runs).unwrap();
    let r = &runs["runs"][0];
    assert_eq!(r["stages"][1]["status"], "running", "{r}");
    assert_eq!(r["details"][1]["curves"]["rewards/margins"].as_array().unwrap().len(), 20);
    assert_eq!(r["details"][1]["samples"][0]["completion"], "c");
    let (status, body) = server.request("GET", "/v1/nothing", &[], b"");
    assert!(status == 404 && body.contains("\"error\""), "{status} {body}");

    // the console in a real browser: the playground streams the API's answer, the dashboard draws
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|c| Command::new(c).arg("--version").output().is_ok_and(|o| o.status.success()));
    let Some(chromium) = chromium else {
        println!("SKIPPED the browser part: no chromium installed (apt-get install chromium)");
        return;
    };
    let Some(python) = align_testkit::python_with(&["websocket"]) else { return };
    let (status, answer) = server.request(
        "POST",
        "/v1/chat/completions",
        &[("Authorization", "Bearer sesame"), ("Content-Type", "application/json")],
        json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 12}).to_string().as_bytes(),
    );
    assert_eq!(status, 200);
    let want = serde_json::from_str::<Value>(&answer).unwrap()["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string();
    // the browser check types the key into the page
    let shots = support::repo().join("target/console-screenshots");
    let out = Command::new(python)
        .arg(support::repo().join("tests/reference/check_console.py"))
        .args([
            "--url",
            &format!("{}/", server.url()),
            "--api-key",
            "sesame",
            "--model",
            "tiny",
            "--prompt",
            "hello",
            "--want",
            &want,
        ])
        .args(["--stage", "dpo", "--shots", s(&shots), "--chromium", chromium])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(out.status.success(), "check_console.py failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(shots.join("chat.png").is_file() && shots.join("runs.png").is_file());
}

#[test]
fn board_serves_the_dashboard_without_a_model() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    synthetic_run(&run);
    let board = Server::start_command("board", &[s(&run)]);
    let (status, runs) = board.request("GET", "/api/runs", &[], b"");
    assert_eq!(status, 200);
    assert_eq!(serde_json::from_str::<Value>(&runs).unwrap()["runs"][0]["stages"][0]["stage"], "sft");
    assert_eq!(board.request("GET", "/v1/models", &[], b"").0, 404, "no model behind a board");
    let out = support::fails(&["board", s(&tmp.path().join("missing"))]);
    assert!(out.contains("no such run folder"), "{out}");
}

#[test]
fn chat_keeps_the_history_and_follows_its_commands() {
    let tiny = tiny();
    let ask = |input: &str| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_align"))
            .args(["chat", "--model", s(&tiny), "--temperature", "0", "--max-new-tokens", "8"])
            .env("ALIGN_LOG", "warn")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    };
    let generate = |prompt: &str, system: Option<&str>| {
        let mut args = vec!["generate", "--model", s(&tiny), "--chat", "--prompt", prompt, "--max-new-tokens", "8"];
        if let Some(sys) = system {
            args.extend(["--system", sys]);
        }
        let out = support::ok(&args);
        out.strip_suffix('\n').unwrap_or(&out).to_string()
    };
    // the first answer equals generate's; after /reset the same question gets the same answer
    // again; /system changes the conversation; the second answer saw the first turn
    let (out, err) = ask("hello\nhow are you\n/reset\nhello\n/system Be brief.\nhello\n/nonsense\n/exit\nnever read\n");
    let first = generate("hello", None);
    let brief = generate("hello", Some("Be brief."));
    let tok = align_core::ModelTokenizer::from_dir(&tiny).unwrap();
    let m = align_core::text::chat::ChatMessage::new;
    let two =
        tok.apply_chat_template(&[m("user", "hello"), m("assistant", &first), m("user", "how are you")], true).unwrap();
    let lm = align_core::model::io::load_causal_lm(&tiny, tch::Device::Cpu, tch::Kind::Float).unwrap();
    let cfg = align_core::infer::generate::SamplingConfig { max_new_tokens: 8, ..Default::default() };
    let eos = align_core::eval::answers::stop_token_ids(&tok, &lm.lm.config.eos_token_ids);
    let g = align_core::infer::generate::generate(
        &lm.lm,
        &[tok.encode(&two, false).unwrap()],
        &cfg,
        &eos,
        tok.padding_id(),
    )
    .unwrap();
    let second = tok.decode(&g[0].tokens, true).unwrap();
    assert_eq!(out, format!("{first}\n{second}\n{first}\n{brief}\n"));
    assert!(err.contains("conversation reset") && err.contains("unknown command /nonsense"), "{err}");
}

#[test]
fn a_quantized_base_answers_as_generate_quantized() {
    let server =
        Server::start(&["--model", s(&tiny()), "--served-model-name", "tiny", "--quantize", "nf4", "--double-quant"]);
    let (status, v) = server.post(
        "/v1/chat/completions",
        &json!({"model": "tiny", "messages": [{"role": "user", "content": "hello"}], "temperature": 0, "max_tokens": 8}),
    );
    assert_eq!(status, 200, "{v}");
    let out = support::ok(&[
        "generate",
        "--model",
        s(&tiny()),
        "--quantize",
        "nf4",
        "--double-quant",
        "--chat",
        "--prompt",
        "hello",
        "--max-new-tokens",
        "8",
    ]);
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), out.strip_suffix('\n').unwrap_or(&out));
}
