//! Malformed records: each error names the file, the line and the field with what was expected;
//! `skip_invalid` counts and lists them instead; `check_files` reports every one.
use std::path::{Path, PathBuf};

use align_core::data::{
    check_files, read_preference, read_pretrain, read_prompts, read_sft, read_unpaired, reports_table, DataKind,
    DataOptions,
};

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const GOOD_SHAREGPT: &str = r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}]}"#;

/// The error of reading `record` as line 2 of a `.jsonl` file of `kind` (line 1 is `first`),
/// without the temporary folder's path.
fn error_of(kind: DataKind, first: &str, record: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let f = write(dir.path(), "x.jsonl", &format!("{first}\n{record}\n"));
    let o = DataOptions::default();
    let e = match kind {
        DataKind::Pretrain => read_pretrain(&[&f], &o).map(|_| ()),
        DataKind::Sft => read_sft(&[&f], &o).map(|_| ()),
        DataKind::Preference => read_preference(&[&f], &o).map(|_| ()),
        DataKind::Prompt => read_prompts(&[&f], &o).map(|_| ()),
        DataKind::Unpaired => read_unpaired(&[&f], &o).map(|_| ()),
    }
    .expect_err("the record is invalid")
    .to_string();
    let prefix = format!("{}/", dir.path().display());
    e.strip_prefix(&prefix).unwrap_or_else(|| panic!("error does not start with the file: {e}")).to_string()
}

#[test]
fn sft_errors_name_file_line_and_field() {
    let sft = |r: &str| error_of(DataKind::Sft, GOOD_SHAREGPT, r);
    assert_eq!(
        sft(
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"},{"from":"bot","value":"x"}]}"#
        ),
        "x.jsonl:2: field 'conversations[2].from': expected one of human, gpt, system, function_call, observation, found 'bot'"
    );
    assert_eq!(
        sft(r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":7}]}"#),
        "x.jsonl:2: field 'conversations[1].value': expected a string, found a number"
    );
    assert_eq!(
        sft(r#"{"conversations":[{"from":"human","value":"q"}]}"#),
        "x.jsonl:2: field 'conversations': expected the conversation to end with a turn from 'gpt', found one from 'human'"
    );
    assert_eq!(
        sft(r#"{"conversations":[{"from":"gpt","value":"a"},{"from":"human","value":"q"}]}"#),
        "x.jsonl:2: field 'conversations[0].from': expected 'human' (turns alternate human, gpt after an optional system turn), found 'gpt'"
    );
    assert_eq!(
        sft(
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"system","value":"s"},{"from":"gpt","value":"a"}]}"#
        ),
        "x.jsonl:2: field 'conversations[1].from': a system turn is only allowed as the first turn"
    );
    assert_eq!(
        sft(r#"{"conversations":"hello"}"#),
        "x.jsonl:2: field 'conversations': expected a list of turns, found a string"
    );
    assert_eq!(
        sft(r#"{"conversations":["hello"]}"#),
        "x.jsonl:2: field 'conversations[0]': expected an object with 'from' and 'value', found a string"
    );
    assert_eq!(sft(r#"{"conversations":[{"value":"q"}]}"#), "x.jsonl:2: field 'conversations[0].from': missing");
    assert_eq!(
        sft(r#"{"conversations":[]}"#),
        "x.jsonl:2: field 'conversations': expected at least one turn besides the system prompt, found none"
    );
    assert!(sft("{not json").starts_with("x.jsonl:2: invalid JSON: "));
    assert_eq!(sft("[1, 2]"), "x.jsonl:2: expected a JSON object, found an array");
    // A record of another format in a ShareGPT file says what the file is.
    assert_eq!(
        sft(r#"{"instruction":"i","output":"o"}"#),
        "x.jsonl:2: field 'conversations': missing (this record looks like Alpaca; the file's format is ShareGPT, detected at line 1)"
    );
    let alpaca = r#"{"instruction":"i","input":"","output":"o"}"#;
    assert_eq!(
        error_of(DataKind::Sft, alpaca, r#"{"instruction":"i","output":3}"#),
        "x.jsonl:2: field 'output': expected a string, found a number"
    );
    assert_eq!(
        error_of(DataKind::Sft, alpaca, r#"{"instruction":"i","output":"o","history":[["q"]]}"#),
        "x.jsonl:2: field 'history[0]': expected a [question, answer] pair, found a list of 1 items"
    );
    let openai = r#"{"messages":[{"role":"user","content":"u"},{"role":"assistant","content":"a"}]}"#;
    assert_eq!(
        error_of(DataKind::Sft, openai, r#"{"messages":[{"role":"bot","content":"u"}]}"#),
        "x.jsonl:2: field 'messages[0].role': expected one of system, user, assistant, tool, found 'bot'"
    );
    assert_eq!(
        error_of(DataKind::Sft, openai, r#"{"messages":[{"role":"tool","content":"u"}]}"#),
        "x.jsonl:2: field 'messages[0].role': a tool result ('tool') must follow a tool call ('assistant with tool_calls'), found one with no call before it"
    );
    assert_eq!(
        error_of(DataKind::Sft, r#"{"foo": 1, "bar": 2}"#, openai),
        "x.jsonl:1: no sft format matches the record's keys ('foo', 'bar'); expected 'conversations' (ShareGPT), 'messages' (OpenAI), 'instruction' + 'output' (Alpaca) or 'prompt' + 'completion'"
    );
}

#[test]
fn preference_prompt_and_pretrain_errors() {
    let medical = r#"{"conversations":[{"from":"human","value":"q"}],"chosen":"a","rejected":"b"}"#;
    let pref = |r: &str| error_of(DataKind::Preference, medical, r);
    assert_eq!(
        pref(r#"{"conversations":[{"from":"human","value":"q"}],"chosen":"a"}"#),
        "x.jsonl:2: field 'rejected': missing"
    );
    assert_eq!(
        pref(
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}],"chosen":"a","rejected":"b"}"#
        ),
        "x.jsonl:2: field 'conversations': expected the prompt to end with a turn from 'human', found one from 'gpt'"
    );
    let implicit = r#"{"chosen":[{"role":"user","content":"Q"},{"role":"assistant","content":"g"}],"rejected":[{"role":"user","content":"Q"},{"role":"assistant","content":"b"}]}"#;
    assert_eq!(
        error_of(
            DataKind::Preference,
            implicit,
            r#"{"chosen":[{"role":"user","content":"Q"},{"role":"assistant","content":"g"}],"rejected":[{"role":"user","content":"other"},{"role":"assistant","content":"b"}]}"#
        ),
        "x.jsonl:2: field 'rejected[0]': differs from 'chosen[0]'; expected 'chosen' and 'rejected' to share every message before their final assistant answer (1 shared messages in 'chosen')"
    );
    assert_eq!(
        error_of(
            DataKind::Preference,
            implicit,
            r#"{"chosen":[{"role":"assistant","content":"g"}],"rejected":[{"role":"assistant","content":"b"}]}"#
        ),
        "x.jsonl:2: field 'chosen': expected the shared prompt messages before the final assistant answer, found only the answer"
    );
    let factory = r#"{"conversations":[{"from":"human","value":"q"}],"chosen":{"from":"gpt","value":"a"},"rejected":{"from":"gpt","value":"b"}}"#;
    assert_eq!(
        error_of(
            DataKind::Preference,
            factory,
            r#"{"conversations":[{"from":"human","value":"q"}],"chosen":{"from":"gpt","value":"a"},"rejected":{"from":"human","value":"b"}}"#
        ),
        "x.jsonl:2: field 'rejected.from': expected 'gpt', found 'human'"
    );
    let trl = r#"{"prompt":"q","chosen":"a","rejected":"b"}"#;
    assert_eq!(
        error_of(
            DataKind::Preference,
            trl,
            r#"{"prompt":"q","chosen":[{"role":"user","content":"a"}],"rejected":"b"}"#
        ),
        "x.jsonl:2: field 'chosen[0].role': expected 'assistant' (the answer is the last message), found 'user'"
    );
    assert_eq!(
        error_of(DataKind::Prompt, r#"{"prompt":"q"}"#, r#"{"prompt":5}"#),
        "x.jsonl:2: field 'prompt': expected a string or a list of messages, found a number"
    );
    assert_eq!(
        error_of(DataKind::Prompt, r#"{"question":"q","answer":"a"}"#, r#"{"question":"q","answer":["a"]}"#),
        "x.jsonl:2: field 'answer': expected a string, found an array"
    );
    assert_eq!(
        error_of(DataKind::Pretrain, r#"{"text":"t"}"#, r#"{"text":null}"#),
        "x.jsonl:2: field 'text': expected a string, found null"
    );
    let unpaired = r#"{"prompt":"q","completion":"a","label":true}"#;
    assert_eq!(
        error_of(DataKind::Unpaired, unpaired, r#"{"prompt":"q","completion":"a","label":1}"#),
        "x.jsonl:2: field 'label': expected a boolean (true = desirable, false = undesirable), found a number"
    );
    assert_eq!(
        error_of(DataKind::Unpaired, unpaired, r#"{"prompt":"q","label":false}"#),
        "x.jsonl:2: field 'completion': missing"
    );
    assert_eq!(
        error_of(
            DataKind::Unpaired,
            unpaired,
            r#"{"prompt":"q","completion":[{"role":"user","content":"a"}],"label":false}"#
        ),
        "x.jsonl:2: field 'completion[0].role': expected 'assistant' (the completion is the answer), found 'user'"
    );
}

#[test]
fn txt_is_for_pretraining_only_and_json_must_be_an_array() {
    let dir = tempfile::tempdir().unwrap();
    let txt = write(dir.path(), "a.txt", "hello\n");
    let e = read_sft(&[&txt], &DataOptions::default()).unwrap_err().to_string();
    assert!(
        e.ends_with("a.txt: .txt files hold pretraining text only; sft data must be a .jsonl or .json file"),
        "{e}"
    );
    let obj = write(dir.path(), "o.json", "{\"data\": []}");
    let e = read_sft(&[&obj], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.ends_with("o.json:1: expected a JSON array of records, found an object"), "{e}");
    let bad = write(dir.path(), "b.json", "[\n {\"text\": \"a\"},\n {\"text\": }\n]");
    let e = read_pretrain(&[&bad], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.contains("b.json:3: invalid JSON"), "{e}");
    let arr = write(dir.path(), "c.json", "[\n {\"text\": \"a\"},\n {\"text\": 1}\n]");
    let e = read_pretrain(&[&arr], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.ends_with("c.json:3 (item 2): field 'text': expected a string, found a number"), "{e}");
    let csv = write(dir.path(), "d.csv", "a,b\n");
    let e = read_pretrain(&[&csv], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.ends_with("d.csv: unsupported data file; expected a .jsonl, .json or .txt file"), "{e}");
}

#[test]
fn skip_invalid_counts_and_lists_with_a_cap() {
    let dir = tempfile::tempdir().unwrap();
    let mut text = String::new();
    for i in 0..10 {
        if i % 3 == 1 {
            text.push_str("{\"conversations\": 3}\n");
        } else {
            text.push_str(GOOD_SHAREGPT);
            text.push('\n');
        }
    }
    let f = write(dir.path(), "s.jsonl", &text);
    let o = DataOptions { skip_invalid: true, max_invalid_shown: 2, ..Default::default() };
    let data = read_sft(&[&f], &o).unwrap();
    assert_eq!(data.records.len(), 7);
    let r = &data.reports[0];
    assert_eq!((r.records, r.invalid, r.skipped, r.invalid_records.len()), (7, 3, 3, 2));
    assert_eq!(r.invalid_records[0].origin.line, 2);
    assert_eq!(r.invalid_records[1].origin.line, 5);
    assert!(r.invalid_records[0]
        .to_string()
        .ends_with("s.jsonl:2: field 'conversations': expected a list of turns, found a number"));
    let shown = r.to_string();
    assert!(shown.contains("7 records, 3 invalid, 3 skipped"), "{shown}");
    assert!(shown.contains("… and 1 more invalid record in"), "{shown}");
    let all_bad = write(dir.path(), "bad.jsonl", "{\"conversations\": 3}\n");
    let e = read_sft(&[&all_bad], &o).unwrap_err().to_string();
    assert!(e.contains("bad.jsonl: no valid sft records (1 invalid; the first: "), "{e}");
    assert!(e.ends_with("bad.jsonl:1: field 'conversations': expected a list of turns, found a number)"), "{e}");
    // Without skip_invalid the first one is an error.
    let e = read_sft(&[&f], &DataOptions::default()).unwrap_err().to_string();
    assert!(e.ends_with("s.jsonl:2: field 'conversations': expected a list of turns, found a number"), "{e}");
}

#[test]
fn check_files_lists_every_invalid_record_and_detects_from_the_first_valid_one() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.jsonl",
        "{\"bogus\": 1}\n{\"question\": \"q\", \"answer\": \"a\"}\n{\"prompt\": \"p\"}\n{\"question\": 2}\n",
    );
    let broken = write(dir.path(), "broken.json", "[{\"prompt\": \"p\"},");
    let reports = check_files(DataKind::Prompt, &[&f, &broken], &DataOptions::default(), None, None).unwrap();
    let r = &reports[0];
    assert_eq!(r.format, Some(align_core::data::DataFormat::QuestionAnswer));
    assert_eq!((r.records, r.invalid), (1, 3));
    let lines: Vec<usize> = r.invalid_records.iter().map(|i| i.origin.line).collect();
    assert_eq!(lines, vec![1, 3, 4]);
    assert!(
        r.invalid_records[1]
            .message
            .contains("(this record looks like prompt; the file's format is question/answer, detected at line 2)"),
        "{}",
        r.invalid_records[1].message
    );
    assert_eq!((reports[1].records, reports[1].invalid, reports[1].format), (0, 1, None));
    let table = reports_table(&reports);
    assert!(table.contains("invalid records:"), "{table}");
    assert!(table.contains("p.jsonl:4: field 'question': expected a string, found a number"), "{table}");
    assert!(table.contains("total (2 files)"), "{table}");
}
