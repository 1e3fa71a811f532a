//! Tool-call conversations through the CLI: `align data check --kind sft` reports tool files
//! (and their invalid records), `align train sft` trains on them end to end with a tool-aware
//! template, and a template without tool support is one clear error.
mod support;

use std::path::Path;

use serde_json::Value;
use support::{align, fails, fixtures, ok, s};

#[test]
fn data_check_reports_tool_call_files() {
    let tmp = tempfile::tempdir().unwrap();
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        concat!(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},{"role":"tool","tool_call_id":"c1","content":"1"},{"role":"assistant","content":"a"}]}"#,
            "\n",
            r#"{"messages":[{"role":"user","content":"q"},{"role":"tool","content":"1"},{"role":"assistant","content":"a"}]}"#,
            "\n",
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":"{oops"}}]},{"role":"tool","content":"1"},{"role":"assistant","content":"a"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let tools = fixtures().join("tools");
    let good = [tools.join("sharegpt_tools.jsonl"), tools.join("openai_tools.jsonl")];
    let out = ok(&["data", "check", "--kind", "sft", "--tokenizer", s(&tools), "--json", s(&good[0]), s(&good[1])]);
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v["ok"].as_bool(), v["records"].as_u64(), v["invalid"].as_u64()), (Some(true), Some(6), Some(0)));
    assert_eq!(v["files"][0]["format"], "sharegpt");
    assert_eq!(v["files"][1]["format"], "openai_messages");

    let out = align(&["data", "check", "--kind", "sft", s(&bad)]);
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!(
            "{}:2: field 'messages[1].role': a tool result ('tool') must follow a tool call ('assistant with tool_calls'), found one after 'user'",
            bad.display()
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "{}:3: field 'messages[1].tool_calls[0].function.arguments': expected a JSON object of arguments as JSON text, found a string that is not JSON",
            bad.display()
        )),
        "{text}"
    );
}

/// tiny-qwen2 with Qwen2.5's tool-aware template and room for the tool schemas (2048 positions:
/// the rendered tool conversations are 700–1100 tokens of the tiny tokenizer).
fn tool_model(dir: &Path) -> std::path::PathBuf {
    let src = fixtures().join("models/tiny-qwen2");
    let model = dir.join("tiny-qwen2-tools");
    std::fs::create_dir(&model).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, model.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::copy(fixtures().join("tools/chat_template.jinja"), model.join("chat_template.jinja")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(model.join("config.json")).unwrap()).unwrap();
    config["max_position_embeddings"] = Value::from(2048);
    std::fs::write(model.join("config.json"), serde_json::to_string_pretty(&config).unwrap()).unwrap();
    model
}

fn sft_config(dir: &Path, model: &Path, out: &Path) -> std::path::PathBuf {
    let tools = fixtures().join("tools");
    let cfg = dir.join(format!("{}.toml", out.file_name().unwrap().to_string_lossy()));
    std::fs::write(
        &cfg,
        format!(
            "model = {:?}\ndata = [{:?}, {:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 3\nbatch_size = 2\nlr = 1e-2\nmax_length = 1200\n[sft]\ntrain_on_prompt = false\n",
            model,
            tools.join("sharegpt_tools.jsonl"),
            tools.join("openai_tools.jsonl"),
            out
        ),
    )
    .unwrap();
    cfg
}

#[test]
fn train_sft_on_tool_calls_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tool_model(tmp.path());
    let out = tmp.path().join("sft-tools");
    let cfg = sft_config(tmp.path(), &model, &out);
    let out_text = support::align(&["train", "sft", "--config", s(&cfg)]);
    assert!(out_text.status.success(), "align train sft failed:\n{}", String::from_utf8_lossy(&out_text.stderr));
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok()?.get("loss")?.as_f64())
        .collect();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0), "{losses:?}");
    // the final folder carries the tool-aware template
    let template = std::fs::read_to_string(out.join("final/chat_template.jinja")).unwrap();
    assert!(template.contains("<tool_call>"));

    // SmolLM2's template (tiny-qwen2's own) renders no tool calls: one clear error
    let plain = tmp.path().join("sft-plain");
    let cfg = sft_config(tmp.path(), &fixtures().join("models/tiny-qwen2"), &plain);
    let line = fails(&["train", "sft", "--config", s(&cfg), "--set", "train.max_length=256"]);
    assert!(line.contains("sharegpt_tools.jsonl:1:") && line.contains("does not render the tool schemas"), "{line}");
}
