//! Tool-call conversations (LLaMA-Factory ShareGPT `function_call` / `observation`, OpenAI
//! `tool_calls` / `tool`, a record's `tools`): read into messages as transformers takes them,
//! rendered byte for byte as `apply_chat_template(messages, tools=…)` renders them (golden
//! fixture from `tests/fixtures/make_tool_fixtures.py`), labels on the calls and not on the
//! results, and invalid records named by file:line and field.
use std::path::{Path, PathBuf};

use align_core::data::{check_files, read_sft, DataKind, DataOptions};
use align_core::text::chat::ChatMessage;
use align_core::text::conversation::{encode_conversation_with_tools, IGNORE_INDEX};
use align_core::text::tokenizer::ModelTokenizer;
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn golden() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("tools/golden.json")).unwrap()).unwrap()
}

#[test]
fn tool_conversations_render_like_transformers() {
    let tok = ModelTokenizer::from_dir(&fixtures().join("tools")).unwrap();
    let template = tok.chat_template().unwrap();
    let g = golden();
    let cases = g["cases"].as_array().unwrap();
    let mut seen = 0;
    for file in ["sharegpt_tools.jsonl", "openai_tools.jsonl"] {
        let data = read_sft(&[fixtures().join("tools").join(file)], &DataOptions::default()).unwrap();
        for conv in &data.records {
            let case = cases
                .iter()
                .find(|c| c["file"] == file && c["line"] == conv.origin.line)
                .unwrap_or_else(|| panic!("no golden case for {}", conv.origin));
            let messages: Vec<Value> = conv.to_messages().iter().map(ChatMessage::to_template_json).collect();
            assert_eq!(Value::Array(messages), case["messages"], "{}: messages", conv.origin);
            assert_eq!(Value::Array(conv.tools.clone()), case["tools"], "{}: tools", conv.origin);
            let rendered = template.render_messages(&conv.to_messages(), &conv.tools, false).unwrap();
            assert_eq!(rendered, case["rendered"].as_str().unwrap(), "{}: rendered text", conv.origin);
            let ids = tok.encode(&rendered, false).unwrap();
            let want: Vec<i64> = serde_json::from_value(case["input_ids"].clone()).unwrap();
            assert_eq!(ids, want, "{}: token ids", conv.origin);
            // the SFT encoding is the same text
            let enc = encode_conversation_with_tools(&tok, &conv.to_messages(), &conv.tools, false).unwrap();
            assert_eq!(enc.input_ids, want, "{}: encoded ids", conv.origin);
            seen += 1;
        }
    }
    assert_eq!(seen, cases.len());
}

/// The labelled tokens decoded, and the unlabelled ones.
fn split_by_label(tok: &ModelTokenizer, ids: &[i64], labels: &[i64]) -> (String, String) {
    let on: Vec<i64> = labels.iter().copied().filter(|&l| l != IGNORE_INDEX).collect();
    let off: Vec<i64> = ids.iter().zip(labels).filter(|(_, &l)| l == IGNORE_INDEX).map(|(&i, _)| i).collect();
    (tok.decode(&on, false).unwrap(), tok.decode(&off, false).unwrap())
}

#[test]
fn labels_cover_the_tool_calls_and_not_the_tool_results() {
    let tok = ModelTokenizer::from_dir(&fixtures().join("tools")).unwrap();
    let data = read_sft(&[fixtures().join("tools/sharegpt_tools.jsonl")], &DataOptions::default()).unwrap();
    let conv = &data.records[0];
    let enc = encode_conversation_with_tools(&tok, &conv.to_messages(), &conv.tools, false).unwrap();
    let (labelled, unlabelled) = split_by_label(&tok, &enc.input_ids, &enc.labels);
    assert_eq!(
        labelled,
        "<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call><|im_end|>\nIt is 21 °C and clear in Paris.<|im_end|>\n"
    );
    assert!(unlabelled.contains("<tool_response>\n{\"temperature\": 21, \"sky\": \"clear\"}\n</tool_response>"));
    assert!(unlabelled.contains("What is the weather in Paris?") && unlabelled.contains("<tools>"));

    // OpenAI: text before the calls and both calls are labelled; both results are not
    let data = read_sft(&[fixtures().join("tools/openai_tools.jsonl")], &DataOptions::default()).unwrap();
    let conv = &data.records[1];
    let enc = encode_conversation_with_tools(&tok, &conv.to_messages(), &conv.tools, false).unwrap();
    let (labelled, unlabelled) = split_by_label(&tok, &enc.input_ids, &enc.labels);
    assert_eq!(
        labelled,
        "Let me compute both.\n<tool_call>\n{\"name\": \"dose_for_weight\", \"arguments\": {\"kg\": 10}}\n</tool_call>\n<tool_call>\n{\"name\": \"dose_for_weight\", \"arguments\": {\"kg\": 15}}\n</tool_call><|im_end|>\n10 kg: 150 mg, 15 kg: 225 mg.<|im_end|>\n"
    );
    assert!(unlabelled.contains("<tool_response>\n150\n</tool_response>\n<tool_response>\n225\n</tool_response>"));
}

#[test]
fn a_template_without_tool_support_is_refused() {
    // tiny-qwen2 carries SmolLM2's template, which renders message.content only (the golden
    // fixture records transformers' rendering with it: the calls are gone)
    let tok = ModelTokenizer::from_dir(&fixtures().join("models/tiny-qwen2")).unwrap();
    let data = read_sft(&[fixtures().join("tools/sharegpt_tools.jsonl")], &DataOptions::default()).unwrap();
    let conv = &data.records[0];
    let e = encode_conversation_with_tools(&tok, &conv.to_messages(), &conv.tools, false).unwrap_err().to_string();
    assert!(e.contains("does not render the tool schemas ('get_weather' is missing"), "{e}");
    let e = encode_conversation_with_tools(&tok, &conv.to_messages(), &[], false).unwrap_err().to_string();
    assert!(e.contains("does not render tool calls (turn 3 calls 'get_weather'"), "{e}");
    // conversations without tools still encode
    assert!(encode_conversation_with_tools(&tok, &data.records[3].to_messages(), &[], false).is_ok());
    let g = golden();
    let smollm2 = g["cases"][0]["smollm2_rendered"].as_str().unwrap();
    assert!(!smollm2.contains("get_weather"));
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// The error of reading `record` as line 2 of an SFT `.jsonl` file (line 1 is `first`).
fn error_of(first: &str, record: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "t.jsonl", &format!("{first}\n{record}\n"));
    let e = read_sft(&[&f], &DataOptions::default()).expect_err("the record is invalid").to_string();
    let prefix = format!("{}/", dir.path().display());
    e.strip_prefix(&prefix).unwrap_or_else(|| panic!("error does not start with the file: {e}")).to_string()
}

const SHAREGPT_OK: &str = r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#;
const OPENAI_OK: &str = r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]}"#;

#[test]
fn invalid_tool_records_name_file_line_and_field() {
    let sg = |r: &str| error_of(SHAREGPT_OK, r);
    let oa = |r: &str| error_of(OPENAI_OK, r);
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"observation","value":"21"},{"from":"gpt","value":"a"}]}"#),
        "t.jsonl:2: field 'conversations[1].from': a tool result ('observation') must follow a tool call ('function_call'), found one after 'human'"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"get_weather(Paris)"},{"from":"observation","value":"21"},{"from":"gpt","value":"a"}]}"#),
        "t.jsonl:2: field 'conversations[1].value': expected a function call {\"name\", \"arguments\"} (or a list of them) as JSON text, found a string that is not JSON (expected value at line 1 column 1)"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"{\"name\": \"f\", \"arguments\": \"{city\"}"},{"from":"observation","value":"21"},{"from":"gpt","value":"a"}]}"#),
        "t.jsonl:2: field 'conversations[1].value.arguments': expected a JSON object of arguments as JSON text, found a string that is not JSON (key must be a string at line 1 column 2)"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"{\"name\": \"f\", \"arguments\": {}}"},{"from":"gpt","value":"a"}]}"#),
        "t.jsonl:2: field 'conversations[2].from': expected 'observation' (the result of the tool call in 'conversations[1].from'), found 'gpt'"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"tool_result","value":"21"}]}"#),
        "t.jsonl:2: field 'conversations[1].from': expected one of human, gpt, system, function_call, observation, found 'tool_result'"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}],"tools":"[{\"name\": "}"#),
        "t.jsonl:2: field 'tools': expected a list of function schemas as JSON text, found a string that is not JSON (EOF while parsing a value at line 1 column 10)"
    );
    assert_eq!(
        sg(r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}],"tools":[{"description":"no name"}]}"#),
        "t.jsonl:2: field 'tools[0]': expected a function schema {\"name\", \"description\", \"parameters\"} or {\"type\": \"function\", \"function\": {…}}, found an object"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q"},{"role":"tool","content":"21"},{"role":"assistant","content":"a"}]}"#),
        "t.jsonl:2: field 'messages[1].role': a tool result ('tool') must follow a tool call ('assistant with tool_calls'), found one after 'user'"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"not json"}}]},{"role":"tool","content":"21"},{"role":"assistant","content":"a"}]}"#),
        "t.jsonl:2: field 'messages[1].tool_calls[0].function.arguments': expected a JSON object of arguments as JSON text, found a string that is not JSON (expected ident at line 1 column 2)"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"id":"c1","function":{"name":"f","arguments":"[1]"}}]},{"role":"tool","content":"21"},{"role":"assistant","content":"a"}]}"#),
        "t.jsonl:2: field 'messages[1].tool_calls[0].function.arguments': expected a JSON object of arguments, found an array"
    );
    assert_eq!(
        oa(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"id":"c1","function":{"name":"f","arguments":{}}}]},{"role":"tool","tool_call_id":"c2","content":"21"},{"role":"assistant","content":"a"}]}"#
        ),
        "t.jsonl:2: field 'messages[2].tool_call_id': expected the id of a call in 'messages[1].role' (c1), found 'c2'"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{}}}]},{"role":"tool","content":"1"},{"role":"tool","content":"2"},{"role":"assistant","content":"a"}]}"#),
        "t.jsonl:2: field 'messages[3].role': expected at most 1 tool results for the calls of 'messages[1].role', found 2"
    );
    assert_eq!(
        oa(
            r#"{"messages":[{"role":"user","content":"q"},{"role":"function","content":"x"},{"role":"assistant","content":"a"}]}"#
        ),
        "t.jsonl:2: field 'messages[1].role': expected one of system, user, assistant, tool, found 'function'"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q","tool_calls":[{"function":{"name":"f","arguments":{}}}]},{"role":"assistant","content":"a"}]}"#),
        "t.jsonl:2: field 'messages[0].tool_calls': expected tool calls on assistant messages only, found them on a 'user' message"
    );
    assert_eq!(
        oa(r#"{"messages":[{"role":"user","content":"q"},{"role":"assistant","tool_calls":[{"function":{"name":"f","arguments":{}}}]},{"role":"tool","content":"1"}]}"#),
        "t.jsonl:2: field 'messages': expected the conversation to end with a turn from 'assistant', found one from 'tool'"
    );
}

#[test]
fn prompts_and_preference_data_refuse_tool_turns() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.jsonl",
        r#"{"conversations":[{"from":"human","value":"q"},{"from":"function_call","value":"{\"name\": \"f\", \"arguments\": {}}"},{"from":"observation","value":"1"},{"from":"human","value":"q2"}],"chosen":"a","rejected":"b"}"#,
    );
    let e = align_core::data::read_preference(&[&f], &DataOptions::default()).unwrap_err().to_string();
    assert!(
        e.ends_with("p.jsonl:1: field 'conversations[1].from': found a 'function_call' turn; tool calls and tool results are read in SFT conversations only"),
        "{e}"
    );
}

#[test]
fn data_check_reports_tool_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = std::fs::read_to_string(fixtures().join("tools/sharegpt_tools.jsonl")).unwrap();
    let bad = r#"{"conversations":[{"from":"human","value":"q"},{"from":"observation","value":"21"},{"from":"gpt","value":"a"}]}"#;
    let f = write(dir.path(), "mixed.jsonl", &format!("{good}{bad}\n"));
    let tools_tok = ModelTokenizer::from_dir(&fixtures().join("tools")).unwrap();
    let reports = check_files(DataKind::Sft, &[&f], &DataOptions::default(), Some(&tools_tok), None).unwrap();
    assert_eq!((reports[0].records, reports[0].invalid), (4, 1));
    assert_eq!(reports[0].invalid_records[0].origin.line, 5);
    assert!(reports[0].invalid_records[0].message.contains("field 'conversations[1].from': a tool result"));
    // with a template that has no tool support, the three tool records are invalid
    let plain_tok = ModelTokenizer::from_dir(&fixtures().join("models/tiny-qwen2")).unwrap();
    let reports = check_files(DataKind::Sft, &[&f], &DataOptions::default(), Some(&plain_tok), None).unwrap();
    assert_eq!((reports[0].records, reports[0].invalid), (1, 4));
    assert!(reports[0].invalid_records.iter().any(|r| r.message.contains("does not render")));
}
