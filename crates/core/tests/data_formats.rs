//! Every data format is detected and parsed into the right conversations, pairs, prompts and
//! documents (English and Chinese), from `.jsonl`, `.json` arrays, `.txt`, folders and globs.
use std::path::{Path, PathBuf};

use align_core::data::{
    read_preference, read_pretrain, read_prompts, read_sft, split_records, DataFormat, DataOptions, TextMode,
};
use align_core::text::chat::ChatMessage;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&p, text).unwrap();
    p
}

fn msg(role: &str, content: &str) -> ChatMessage {
    ChatMessage::new(role, content)
}

fn opts() -> DataOptions {
    DataOptions::default()
}

#[test]
fn sft_sharegpt_with_system_prompt_field_and_system_turn() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "a.jsonl",
        concat!(
            r#"{"conversations":[{"from":"human","value":"发烧怎么办？"},{"from":"gpt","value":"多喝水，注意休息。"}],"system_prompt":"你是医生。"}"#,
            "\n\n",
            r#"{"conversations":[{"from":"system","value":"Be brief."},{"from":"user","value":"Hi"},{"from":"assistant","value":"Hello"},{"from":"human","value":"Cold?"},{"from":"model","value":"Rest."}]}"#,
            "\n",
            r#"{"conversations":[{"from":"human","value":"q"},{"from":"gpt","value":"a"}],"system":"S"}"#,
            "\n"
        ),
    );
    let data = read_sft(&[&f], &opts()).unwrap();
    assert_eq!(data.reports[0].format, Some(DataFormat::ShareGpt));
    assert_eq!(data.reports[0].records, 3);
    let c = &data.records[0];
    assert_eq!(c.system.as_deref(), Some("你是医生。"));
    assert_eq!(c.messages, vec![msg("user", "发烧怎么办？"), msg("assistant", "多喝水，注意休息。")]);
    assert_eq!(c.origin.line, 1);
    let c = &data.records[1];
    assert_eq!(c.origin.line, 3, "blank lines are skipped but counted");
    assert_eq!(c.system.as_deref(), Some("Be brief."));
    assert_eq!(c.messages.len(), 4);
    assert_eq!(c.messages[3], msg("assistant", "Rest."));
    assert_eq!(c.to_messages()[0], msg("system", "Be brief."));
    assert_eq!(data.records[2].system.as_deref(), Some("S"));
}

#[test]
fn sft_openai_alpaca_and_prompt_completion() {
    let dir = tempfile::tempdir().unwrap();
    let openai = write(
        dir.path(),
        "o.jsonl",
        r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"U"},{"role":"assistant","content":"A"}]}"#,
    );
    let alpaca = write(
        dir.path(),
        "al.jsonl",
        concat!(
            r#"{"instruction":"翻译","input":"hello","output":"你好","system":"译者","history":[["q1","a1"]]}"#,
            "\n",
            r#"{"instruction":"Name a fruit.","input":"","output":"Apple."}"#,
            "\n",
            r#"{"instruction":"Name a fruit.","output":"Pear.","input":null}"#
        ),
    );
    let pc = write(
        dir.path(),
        "pc.jsonl",
        concat!(
            r#"{"prompt":"2+2?","completion":"4"}"#,
            "\n",
            r#"{"prompt":[{"role":"user","content":"hi"}],"completion":[{"role":"assistant","content":"hey"}]}"#
        ),
    );
    let data = read_sft(&[&openai, &alpaca, &pc], &opts()).unwrap();
    let formats: Vec<_> = data.reports.iter().map(|r| r.format).collect();
    assert_eq!(
        formats,
        vec![Some(DataFormat::OpenAiMessages), Some(DataFormat::Alpaca), Some(DataFormat::PromptCompletion)]
    );
    let r = &data.records;
    assert_eq!(r[0].system.as_deref(), Some("S"));
    assert_eq!(r[0].messages, vec![msg("user", "U"), msg("assistant", "A")]);
    assert_eq!(r[1].system.as_deref(), Some("译者"));
    assert_eq!(
        r[1].messages,
        vec![msg("user", "q1"), msg("assistant", "a1"), msg("user", "翻译\nhello"), msg("assistant", "你好")]
    );
    assert_eq!(r[2].messages, vec![msg("user", "Name a fruit."), msg("assistant", "Apple.")]);
    assert_eq!(r[3].messages[1], msg("assistant", "Pear."));
    assert_eq!(r[4].messages, vec![msg("user", "2+2?"), msg("assistant", "4")]);
    assert_eq!(r[5].messages, vec![msg("user", "hi"), msg("assistant", "hey")]);
}

#[test]
fn preference_formats() {
    let dir = tempfile::tempdir().unwrap();
    let lines = [
        (
            "medicalgpt.jsonl",
            r#"{"conversations":[{"from":"human","value":"头痛？"}],"chosen":"休息。","rejected":"不用管。"}"#,
        ),
        (
            "llama_factory.jsonl",
            r#"{"conversations":[{"from":"system","value":"S"},{"from":"human","value":"Q"}],"chosen":{"from":"gpt","value":"good"},"rejected":{"from":"gpt","value":"bad"}}"#,
        ),
        ("trl_strings.jsonl", r#"{"prompt":"Q","chosen":"good","rejected":"bad"}"#),
        (
            "trl_messages.jsonl",
            r#"{"prompt":[{"role":"system","content":"S"},{"role":"user","content":"Q"}],"chosen":[{"role":"assistant","content":"good"}],"rejected":[{"role":"assistant","content":"bad"}]}"#,
        ),
        (
            "trl_implicit.jsonl",
            r#"{"chosen":[{"role":"user","content":"Q"},{"role":"assistant","content":"good"}],"rejected":[{"role":"user","content":"Q"},{"role":"assistant","content":"bad"}]}"#,
        ),
        ("alpaca.jsonl", r#"{"instruction":"Q","input":"","chosen":"good","rejected":"bad"}"#),
        (
            "question_response.jsonl",
            r#"{"system":"","history":[],"question":"Q","response_chosen":"good","response_rejected":"bad"}"#,
        ),
    ];
    let expected = [
        DataFormat::MedicalGptPairs,
        DataFormat::LlamaFactoryPairs,
        DataFormat::TrlPairs,
        DataFormat::TrlPairs,
        DataFormat::TrlImplicitPairs,
        DataFormat::AlpacaPairs,
        DataFormat::QuestionResponsePairs,
    ];
    let files: Vec<PathBuf> = lines.iter().map(|(n, l)| write(dir.path(), n, l)).collect();
    let data = read_preference(&files, &opts()).unwrap();
    for (report, format) in data.reports.iter().zip(expected) {
        assert_eq!(report.format, Some(format), "{}", report.path.display());
    }
    let p = &data.records[0];
    assert_eq!(
        (p.prompt.clone(), p.chosen.as_str(), p.rejected.as_str()),
        (vec![msg("user", "头痛？")], "休息。", "不用管。")
    );
    assert_eq!(p.chosen_messages().last(), Some(&msg("assistant", "休息。")));
    let with_system = vec![msg("system", "S"), msg("user", "Q")];
    for i in [1, 3] {
        assert_eq!(data.records[i].prompt, with_system, "{}", files[i].display());
    }
    for i in [2, 4, 5, 6] {
        assert_eq!(data.records[i].prompt, vec![msg("user", "Q")], "{}", files[i].display());
    }
    for r in &data.records[1..] {
        assert_eq!((r.chosen.as_str(), r.rejected.as_str()), ("good", "bad"));
    }
}

#[test]
fn identical_pairs_are_counted_and_left_out_unless_kept() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "p.jsonl",
        concat!(
            r#"{"prompt":"Q","chosen":"same","rejected":"same"}"#,
            "\n",
            r#"{"prompt":"Q","chosen":"good","rejected":"bad"}"#
        ),
    );
    let data = read_preference(&[&f], &opts()).unwrap();
    assert_eq!(data.records.len(), 1);
    let r = &data.reports[0];
    assert_eq!((r.records, r.identical_pairs, r.skipped), (1, 1, 1));
    let keep = DataOptions { keep_identical_pairs: true, ..opts() };
    let data = read_preference(&[&f], &keep).unwrap();
    assert_eq!(data.records.len(), 2);
    assert_eq!(data.reports[0].identical_pairs, 1);
}

#[test]
fn prompt_formats_and_references() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = write(
        dir.path(),
        "p.jsonl",
        concat!(r#"{"prompt":"什么是高血压？"}"#, "\n", r#"{"prompt":[{"role":"user","content":"hi"}]}"#),
    );
    let qa = write(dir.path(), "qa.jsonl", r#"{"question":"Q","answer":"A"}"#);
    let share = write(
        dir.path(),
        "s.jsonl",
        concat!(
            r#"{"conversations":[{"from":"human","value":"q1"},{"from":"gpt","value":"a1"},{"from":"human","value":"q2"},{"from":"gpt","value":"a2"}]}"#,
            "\n",
            r#"{"conversations":[{"from":"human","value":"q1"},{"from":"gpt","value":"a1"},{"from":"human","value":"q2"}]}"#
        ),
    );
    let openai = write(
        dir.path(),
        "o.jsonl",
        r#"{"messages":[{"role":"system","content":"S"},{"role":"user","content":"U"},{"role":"assistant","content":"A"}]}"#,
    );
    let alpaca = write(dir.path(), "a.jsonl", r#"{"instruction":"I","input":"X","output":"O"}"#);
    let data = read_prompts(&[&prompt, &qa, &share, &openai, &alpaca], &opts()).unwrap();
    let formats: Vec<_> = data.reports.iter().filter_map(|r| r.format).collect();
    assert_eq!(
        formats,
        vec![
            DataFormat::Prompt,
            DataFormat::QuestionAnswer,
            DataFormat::ShareGpt,
            DataFormat::OpenAiMessages,
            DataFormat::Alpaca
        ]
    );
    let r = &data.records;
    assert_eq!((r[0].messages.clone(), r[0].reference.clone()), (vec![msg("user", "什么是高血压？")], None));
    assert_eq!(r[1].messages, vec![msg("user", "hi")]);
    assert_eq!((r[2].messages.clone(), r[2].reference.as_deref()), (vec![msg("user", "Q")], Some("A")));
    assert_eq!(r[3].messages, vec![msg("user", "q1"), msg("assistant", "a1"), msg("user", "q2")]);
    assert_eq!(r[3].reference.as_deref(), Some("a2"));
    assert_eq!(r[4].messages.len(), 3);
    assert_eq!(r[4].reference, None, "a conversation ending with a user turn is all prompt");
    assert_eq!(
        (r[5].messages.clone(), r[5].reference.as_deref()),
        (vec![msg("system", "S"), msg("user", "U")], Some("A"))
    );
    assert_eq!((r[6].messages.clone(), r[6].reference.as_deref()), (vec![msg("user", "I\nX")], Some("O")));
}

#[test]
fn pretrain_txt_lines_whole_file_and_json_text() {
    let dir = tempfile::tempdir().unwrap();
    let txt = write(dir.path(), "c.txt", "First line.\n\n第二行。\n");
    let jl = write(dir.path(), "n.jsonl", "{\"text\": \"doc one\"}\n{\"text\": \"文档二\", \"id\": 2}\n");
    let data = read_pretrain(&[&txt, &jl], &opts()).unwrap();
    let texts: Vec<&str> = data.records.iter().map(|d| d.text.as_str()).collect();
    assert_eq!(texts, vec!["First line.", "第二行。", "doc one", "文档二"]);
    assert_eq!(data.records[1].origin.line, 3);
    assert_eq!(data.reports[0].format, Some(DataFormat::TextLines));
    assert_eq!(data.reports[1].format, Some(DataFormat::JsonText));
    let whole = DataOptions { text_mode: TextMode::File, ..opts() };
    let data = read_pretrain(&[&txt], &whole).unwrap();
    assert_eq!(data.records.len(), 1);
    assert_eq!(data.records[0].text, "First line.\n\n第二行。\n");
    assert_eq!(data.reports[0].format, Some(DataFormat::TextFile));
}

#[test]
fn json_arrays_report_item_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "d.json",
        "[\n  {\"messages\": [{\"role\": \"user\", \"content\": \"u\"}, {\"role\": \"assistant\", \"content\": \"a\"}]},\n  {\"messages\": [{\"role\": \"user\", \"content\": \"u2\"},\n    {\"role\": \"assistant\", \"content\": \"a2\"}]}\n]\n",
    );
    let data = read_sft(&[&f], &opts()).unwrap();
    assert_eq!(data.records.len(), 2);
    assert_eq!(data.records[1].origin.line, 3);
    assert_eq!(data.records[1].origin.array_item, Some(2));
    assert!(data.records[1].origin.to_string().ends_with("d.json:3 (item 2)"));
}

#[test]
fn globs_and_folders_expand_sorted_and_once() {
    let dir = tempfile::tempdir().unwrap();
    let one = r#"{"prompt":"p","completion":"c"}"#;
    write(dir.path(), "sft/b.jsonl", one);
    write(dir.path(), "sft/a.jsonl", &format!("{one}\n{one}"));
    write(dir.path(), "sft/notes.md", "not data");
    let pattern = format!("{}/sft/*.jsonl", dir.path().display());
    let a = dir.path().join("sft/a.jsonl");
    let data = read_sft(&[pattern.clone(), a.display().to_string()], &opts()).unwrap();
    let names: Vec<String> =
        data.reports.iter().map(|r| r.path.file_name().unwrap().to_string_lossy().into_owned()).collect();
    assert_eq!(names, vec!["a.jsonl", "b.jsonl"]);
    assert_eq!(data.records.len(), 3);
    let data = read_sft(&[dir.path().join("sft")], &opts()).unwrap();
    assert_eq!(data.reports.len(), 2, "a folder gives its data files only");
    let e = read_sft(&[format!("{}/nothing/*.jsonl", dir.path().display())], &opts()).unwrap_err().to_string();
    assert!(e.ends_with("nothing/*.jsonl: the pattern matches no files"), "{e}");
    let e = read_sft(&[dir.path().join("missing.jsonl")], &opts()).unwrap_err().to_string();
    assert!(e.ends_with("missing.jsonl: data file not found"), "{e}");
}

#[test]
fn project_sample_data_reads_cleanly() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../data");
    let o = opts();
    let pt = read_pretrain(&[root.join("pretrain")], &o).unwrap();
    assert_eq!(pt.records.len(), 800);
    let sft = read_sft(&[root.join("sft/*.jsonl")], &o).unwrap();
    assert_eq!(sft.records.len(), 490);
    assert!(sft.records.iter().any(|c| c.system.is_some()));
    let pref = read_preference(&[root.join("preference")], &o).unwrap();
    assert_eq!(pref.records.len(), 350);
    assert_eq!(pref.reports.iter().map(|r| r.identical_pairs).sum::<usize>(), 0);
    let prompts = read_prompts(&[root.join("prompts")], &o).unwrap();
    assert_eq!(prompts.records.len(), 260);
    assert_eq!(prompts.records.iter().filter(|p| p.reference.is_some()).count(), 60);
    let (train, val) = split_records(sft.records, 0.1, 42);
    assert_eq!((train.len(), val.len()), (441, 49));
}

#[test]
fn ranked_lists_expand_to_preference_pairs() {
    use align_core::data::{check_files, read_unpaired, DataKind, RankedPairs};
    let dir = tempfile::tempdir().unwrap();
    let f = write(
        dir.path(),
        "ranked.jsonl",
        concat!(
            r#"{"prompt":"发烧怎么办？","responses":["多喝水，注意休息。","吃药。","不用管。"]}"#,
            "\n",
            r#"{"prompt":[{"role":"system","content":"S"},{"role":"user","content":"Q"}],"responses":["a","b","a","c"]}"#,
            "\n"
        ),
    );
    let data = read_preference(&[&f], &opts()).unwrap();
    // 3 + 6 pairs, less the identical ("a", "a") one
    assert_eq!(data.records.len(), 8);
    assert_eq!(data.reports[0].format, Some(DataFormat::RankedResponses));
    assert_eq!((data.reports[0].ranked_lists, data.reports[0].identical_pairs), (2, 1));
    let first: Vec<(&str, &str)> = data.records[..3].iter().map(|p| (p.chosen.as_str(), p.rejected.as_str())).collect();
    assert_eq!(
        first,
        vec![("多喝水，注意休息。", "吃药。"), ("多喝水，注意休息。", "不用管。"), ("吃药。", "不用管。")]
    );
    assert_eq!(data.records[0].prompt, vec![msg("user", "发烧怎么办？")]);
    assert_eq!(data.records[3].prompt, vec![msg("system", "S"), msg("user", "Q")]);
    assert!(
        data.records[..3].iter().all(|p| p.origin.line == 1) && data.records[3..].iter().all(|p| p.origin.line == 2)
    );

    for (mode, want) in [(RankedPairs::Adjacent, 5), (RankedPairs::BestVsRest, 4)] {
        let o = DataOptions { ranked_pairs: mode, ..opts() };
        // adjacent: 2 + 3 (no identical pair); best vs rest: 2 + 3, less ("a", "a")
        assert_eq!(read_preference(&[&f], &o).unwrap().records.len(), want, "{mode:?}");
        let reports = check_files(DataKind::Preference, &[&f], &o, None, None).unwrap();
        assert_eq!(reports[0].records, want);
    }

    // UltraFeedback-style scored completions: ordered by score, ties give no pair
    let g = write(
        dir.path(),
        "scored.jsonl",
        concat!(
            r#"{"instruction":"Q","completions":[{"response":"ok","overall_score":6},{"response":"best","overall_score":9},{"response":"also ok","overall_score":6}]}"#,
            "\n"
        ),
    );
    let data = read_preference(&[&g], &opts()).unwrap();
    let got: Vec<(&str, &str)> = data.records.iter().map(|p| (p.chosen.as_str(), p.rejected.as_str())).collect();
    assert_eq!(got, vec![("best", "ok"), ("best", "also ok")]);
    assert_eq!(data.reports[0].format, Some(DataFormat::ScoredCompletions));

    // unpaired data refuses ranked lists
    let e = read_unpaired(&[&f], &opts()).unwrap_err().to_string();
    assert!(e.contains("ranked.jsonl:1: ranked responses lists are read as preference data"), "{e}");
}
