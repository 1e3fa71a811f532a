//! Hostile inputs through the `align` binary: a chat template that does not end, a tokenizer
//! beyond the model's vocabulary, a data file that is not UTF-8 and an edited resume state each
//! end with one `error:` line (no panic, no hang) and a non-zero exit.
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod support;
use support::{align, fails, fixtures, ok, repo, s};

/// A copy of a fixture model folder that a test may break.
fn model_copy(tmp: &Path, name: &str) -> PathBuf {
    let dir = tmp.join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixtures().join("models").join(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    dir
}

#[test]
fn a_template_that_does_not_end_stops_with_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path(), "tiny-qwen2");
    let template = model.join("chat_template.jinja");
    std::fs::write(
        &template,
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ j }}{% endfor %}{% endfor %}",
    )
    .unwrap();
    let started = Instant::now();
    let e = fails(&["generate", "--model", s(&model), "--chat", "--prompt", "hi", "--max-new-tokens", "2"]);
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    assert!(e.contains(&format!("{}: chat template: stopped after", template.display())), "{e}");
}

#[test]
fn a_tokenizer_beyond_the_vocabulary_is_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let model = model_copy(tmp.path(), "tiny-llama");
    let config = model.join("config.json");
    let text = std::fs::read_to_string(&config).unwrap().replace("\"vocab_size\": 320", "\"vocab_size\": 300");
    std::fs::write(&config, text).unwrap();
    let e = fails(&["generate", "--model", s(&model), "--prompt", "hi", "--max-new-tokens", "2"]);
    assert!(e.contains("ids up to 319") && e.contains("vocab_size 300"), "{e}");
}

#[test]
fn data_check_names_the_line_that_is_not_utf8() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("p.jsonl");
    std::fs::write(&f, b"{\"prompt\": \"ok\"}\n{\"prompt\": \"\xff\"}\n").unwrap();
    let out = align(&["data", "check", "--kind", "prompt", s(&f)]);
    assert!(!out.status.success());
    let all = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!all.contains("panicked"), "{all}");
    assert!(all.contains("p.jsonl:2: invalid UTF-8: byte 0xff at column 13"), "{all}");
}

#[test]
fn an_edited_resume_state_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let cfg = tmp.path().join("pt.toml");
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 4\nbatch_size = 2\nlr = 1e-3\nmax_length = 16\nsave_every = 1\n[pretrain]\nblock_size = 16\n",
            fixtures().join("models/tiny-llama"),
            repo().join("data/pretrain/medical_corpus.txt"),
            out
        ),
    )
    .unwrap();
    ok(&["train", "pretrain", "--config", s(&cfg), "--stop-after", "2"]);
    let state = out.join("checkpoint-2/train_state/state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["nonfinite_total"] = serde_json::json!(7);
    std::fs::write(&state, v.to_string()).unwrap();
    // the newest checkpoint is refused naming the field; the run resumes from the older one
    let o = align(&["train", "pretrain", "--config", s(&cfg)]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(
        err.contains(&format!("{}: field 'nonfinite_total': 7 (expected at most step 2)", state.display())),
        "{err}"
    );
    assert!(err.contains("checkpoint-1"), "{err}");
    // with no older checkpoint to fall back to, the run stops: one error line naming the field
    std::fs::remove_dir_all(out.join("checkpoint-1")).unwrap();
    for k in 2..=4 {
        std::fs::remove_dir_all(out.join(format!("checkpoint-{k}"))).ok();
    }
    ok(&["train", "pretrain", "--config", s(&cfg), "--restart", "--stop-after", "1"]);
    let state = out.join("checkpoint-1/train_state/state.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    v["nonfinite_total"] = serde_json::json!(7);
    std::fs::write(&state, v.to_string()).unwrap();
    let e = fails(&["train", "pretrain", "--config", s(&cfg)]);
    assert!(e.contains(&format!("{}: field 'nonfinite_total': 7 (expected at most step 1)", state.display())), "{e}");
    assert!(e.contains("--restart"), "{e}");
}
