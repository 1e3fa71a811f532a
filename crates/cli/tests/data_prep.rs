//! `align data dedup | clean | mix | split | convert | stats` on small generated files: planted
//! near duplicates in Chinese medical text (one character changed, a phrase appended) and an
//! evaluation leak are each reported and removed; an 80/20 mix gives exactly those counts; the
//! split is deterministic, disjoint and covering; `[data_options] mix` is used by `align train sft`.
mod support;

use std::collections::HashSet;
use std::path::Path;

use serde_json::Value;
use support::{align, fails, ok, repo, s};

fn sharegpt(q: &str, a: &str) -> String {
    serde_json::json!({"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}).to_string()
}

fn write(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.iter().map(|l| format!("{l}\n")).collect::<String>()).unwrap();
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).unwrap().lines().map(str::to_string).collect()
}

const Q: &str = "高血压患者平时应该注意什么？";
const A: &str = "高血压患者应当低盐饮食，每天食盐摄入量不超过五克，同时坚持规律运动，按时服用降压药物，定期监测血压并记录，如有头晕头痛等不适应及时就医复诊。";
const EVAL_Q: &str = "孩子发烧到三十八度五怎么办？";
const EVAL_A: &str = "儿童发热超过三十八点五度时可以使用退烧药，例如布洛芬或对乙酰氨基酚，同时多喝水，注意观察精神状态，如果持续高热不退或者出现抽搐要马上去医院。";

#[test]
fn dedup_removes_planted_near_duplicates_exact_duplicates_and_eval_leaks() {
    let tmp = tempfile::tempdir().unwrap();
    let train = tmp.path().join("train.jsonl");
    let eval = tmp.path().join("eval.jsonl");
    let records = vec![
        sharegpt(Q, A), // 1 kept
        sharegpt(
            "糖尿病怎么控制血糖？",
            "控制碳水化合物的摄入，监测空腹和餐后血糖，遵医嘱使用胰岛素或口服降糖药，注意足部护理。",
        ), // 2 kept
        sharegpt(Q, &A.replacen("五克", "六克", 1)), // 3 near (one character)
        sharegpt(Q, &format!("{A}祝您早日康复。")), // 4 near (a phrase appended)
        sharegpt("感冒了要吃抗生素吗？", "普通感冒多由病毒引起，抗生素无效，应多休息多喝水，症状严重时对症治疗。"), // 5 kept
        sharegpt(
            "糖尿病怎么控制血糖?",
            "控制碳水化合物的摄入, 监测空腹和餐后血糖, 遵医嘱使用胰岛素或口服降糖药, 注意足部护理.",
        ), // 6 exact of 2
        sharegpt(EVAL_Q, &EVAL_A.replacen("三十八", "三十九", 1)), // 7 eval leak (near)
        sharegpt(
            "What should I do about a headache?",
            "Rest in a quiet, dark room, drink water and take a pain reliever if needed.",
        ), // 8 kept
    ];
    write(&train, &records);
    write(&eval, &[sharegpt(EVAL_Q, EVAL_A)]);
    let eval_before = std::fs::read(&eval).unwrap();
    let out = tmp.path().join("out");
    let report = tmp.path().join("report.json");
    let table = ok(&[
        "data",
        "dedup",
        "--kind",
        "sft",
        s(&train),
        "--eval",
        s(&eval),
        "--out",
        s(&out),
        "--report",
        s(&report),
    ]);
    let t = s(&train);
    for expected in [
        format!("{t}:3  near"),
        format!("{t}:4  near"),
        format!("{t}:6  exact"),
        format!("{t}:7  eval-leak"),
        "8 records, 4 kept, 4 dropped (1 eval-leak, 1 exact, 2 near)".to_string(),
    ] {
        assert!(table.contains(&expected), "missing {expected}:\n{table}");
    }
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let got: Vec<(String, String, String)> = v["duplicates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            let sim = d["similarity"].as_f64().unwrap();
            assert!((0.8..=1.0).contains(&sim), "{d}");
            (
                d["record"].as_str().unwrap().into(),
                d["reason"].as_str().unwrap().into(),
                d["duplicate_of"].as_str().unwrap().into(),
            )
        })
        .collect();
    let e = s(&eval);
    let want: Vec<(String, String, String)> = [
        (3, "near", format!("{t}:1")),
        (4, "near", format!("{t}:1")),
        (6, "exact", format!("{t}:2")),
        (7, "eval-leak", format!("{e}:1")),
    ]
    .into_iter()
    .map(|(l, r, of)| (format!("{t}:{l}"), r.to_string(), of))
    .collect();
    assert_eq!(got, want);
    // the kept records byte for byte, in order; the eval file untouched
    let kept = lines(&out.join("train.jsonl"));
    assert_eq!(kept, vec![records[0].clone(), records[1].clone(), records[4].clone(), records[7].clone()]);
    assert_eq!(std::fs::read(&eval).unwrap(), eval_before);
    // --json and --output; a stricter threshold keeps the near duplicates
    let one = tmp.path().join("one.jsonl");
    let v: Value = serde_json::from_str(&ok(&[
        "data",
        "dedup",
        "--kind",
        "sft",
        t,
        "--near-threshold",
        "0.95",
        "--output",
        s(&one),
        "--json",
    ]))
    .unwrap();
    assert_eq!((v["dropped"].as_u64(), v["kept"].as_u64()), (Some(1), Some(7)), "{v}");
    assert_eq!(lines(&one).len(), 7);
    // mistakes are one clear line
    assert!(fails(&["data", "dedup", "--kind", "sft", t, "--output", t]).contains("is an input"));
    assert!(fails(&["data", "dedup", "--kind", "sft", t, "--near-threshold", "1.5"]).contains("--near-threshold"));
    let bad = align(&["data", "dedup", "--kind", "sft", t, "--near-treshold", "0.5"]);
    assert!(!bad.status.success(), "an unknown flag is an error");
}

#[test]
fn dedup_reads_every_kind_and_names_bad_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let pairs = tmp.path().join("pairs.jsonl");
    write(
        &pairs,
        &[
            r#"{"prompt":"头痛怎么办？","chosen":"休息，必要时就医。","rejected":"不用管。"}"#.into(),
            r#"{"prompt":"头痛怎么办?","chosen":"休息, 必要时就医.","rejected":"不用管."}"#.into(),
            r#"{"prompt":"Q","chosen":"a","rejected":"a"}"#.into(),
        ],
    );
    let v: Value = serde_json::from_str(&ok(&["data", "dedup", "--kind", "preference", s(&pairs), "--json"])).unwrap();
    assert_eq!(v["records"], 3, "identical pairs are records too: {v}");
    assert_eq!(v["duplicates"][0]["record"], format!("{}:2", s(&pairs)));
    let bad = tmp.path().join("bad.jsonl");
    write(&bad, &[sharegpt("q", "a"), r#"{"conversations":[{"from":"bot","value":"x"}]}"#.into()]);
    let e = fails(&["data", "dedup", "--kind", "sft", s(&bad)]);
    assert!(e.contains("bad.jsonl:2: field 'conversations[0].from'"), "{e}");
}

#[test]
fn mix_gives_exactly_the_asked_counts() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("medical.jsonl"), tmp.path().join("general.jsonl"));
    write(&a, &(0..100).map(|i| format!(r#"{{"text":"medical {i}"}}"#)).collect::<Vec<_>>());
    write(&b, &(0..100).map(|i| format!(r#"{{"text":"general {i}"}}"#)).collect::<Vec<_>>());
    let out = tmp.path().join("mixed.jsonl");
    let (sa, sb) = (format!("{}=0.8", s(&a)), format!("{}=0.2", s(&b)));
    let count = |path: &Path, what: &str| lines(path).iter().filter(|l| l.contains(what)).count();
    let table = ok(&[
        "data",
        "mix",
        "--kind",
        "pretrain",
        "--source",
        &sa,
        "--source",
        &sb,
        "--total",
        "100",
        "--seed",
        "3",
        "--output",
        s(&out),
    ]);
    assert_eq!((count(&out, "medical"), count(&out, "general")), (80, 20));
    assert!(table.contains("80.0%") && table.contains("20.0%"), "{table}");
    let first = lines(&out);
    ok(&[
        "data",
        "mix",
        "--kind",
        "pretrain",
        "--source",
        &sa,
        "--source",
        &sb,
        "--total",
        "100",
        "--seed",
        "3",
        "--output",
        s(&out),
    ]);
    assert_eq!(lines(&out), first, "the same seed gives the same mix");
    assert_eq!(first.iter().collect::<HashSet<_>>().len(), 100, "no record twice without --upsample");
    // no total: as many as the smaller share allows (100 / 0.8 = 125)
    let v: Value = serde_json::from_str(&ok(&[
        "data",
        "mix",
        "--kind",
        "pretrain",
        "--source",
        &sa,
        "--source",
        &sb,
        "--output",
        s(&out),
        "--json",
    ]))
    .unwrap();
    assert_eq!(v["records"], 125);
    assert_eq!((v["sources"][0]["records"].as_u64(), v["sources"][1]["records"].as_u64()), (Some(100), Some(25)));
    // a source too small is an error, unless upsampling is asked for
    let e = fails(&[
        "data",
        "mix",
        "--kind",
        "pretrain",
        "--source",
        &sa,
        "--source",
        &sb,
        "--total",
        "200",
        "--output",
        s(&out),
    ]);
    assert!(e.contains("has 100 records but 160 are needed"), "{e}");
    ok(&[
        "data",
        "mix",
        "--kind",
        "pretrain",
        "--source",
        &sa,
        "--source",
        &sb,
        "--total",
        "200",
        "--upsample",
        "--output",
        s(&out),
    ]);
    assert_eq!((count(&out, "medical"), count(&out, "general")), (160, 40));
    assert!(fails(&["data", "mix", "--kind", "pretrain", "--source", s(&a), "--output", s(&out)])
        .contains("expected FILE=WEIGHT"));
}

#[test]
fn split_is_deterministic_disjoint_and_covering() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data.jsonl");
    let records: Vec<String> = (0..50).map(|i| sharegpt(&format!("问题{i}"), &format!("回答{i}"))).collect();
    write(&data, &records);
    let split = |dir: &Path| {
        ok(&[
            "data",
            "split",
            "--kind",
            "sft",
            s(&data),
            "--val",
            "0.1",
            "--test",
            "0.2",
            "--seed",
            "5",
            "--out",
            s(dir),
        ]);
        ["train", "validation", "test"].map(|n| lines(&dir.join(format!("{n}.jsonl"))))
    };
    let [train, val, test] = split(&tmp.path().join("a"));
    assert_eq!((train.len(), val.len(), test.len()), (35, 5, 10));
    let mut all: Vec<String> = train.iter().chain(&val).chain(&test).cloned().collect();
    all.sort();
    let mut want = records.clone();
    want.sort();
    assert_eq!(all, want, "every record once, byte for byte");
    assert_eq!(split(&tmp.path().join("b")), [train, val, test]);
    assert!(fails(&[
        "data",
        "split",
        "--kind",
        "sft",
        s(&data),
        "--val",
        "0.6",
        "--test",
        "0.5",
        "--out",
        s(tmp.path())
    ])
    .contains("--val / --test"));
}

#[test]
fn clean_reports_what_changed_and_why_records_were_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("raw.jsonl");
    write(
        &data,
        &[
            sharegpt("<p>发烧&nbsp;怎么办？</p>", "多喝水&amp;休息，\u{0007}注意观察体温变化。"),
            sharegpt("感冒怎么办？", "多休息，多喝水，必要时就医。"),
            sharegpt("What is a fever?", "A body temperature above 38 degrees Celsius."),
            sharegpt("痛", "忍"),
        ],
    );
    let out = tmp.path().join("clean.jsonl");
    let report = tmp.path().join("clean-report.json");
    let v: Value = serde_json::from_str(&ok(&[
        "data",
        "clean",
        "--kind",
        "sft",
        s(&data),
        "--lang",
        "zh",
        "--min-chars",
        "5",
        "--output",
        s(&out),
        "--report",
        s(&report),
        "--json",
    ]))
    .unwrap();
    assert_eq!(
        (v["records"].as_u64(), v["kept"].as_u64(), v["changed"].as_u64(), v["dropped"].as_u64()),
        (Some(4), Some(2), Some(1), Some(2)),
        "{v}"
    );
    let entries = v["entries"].as_array().unwrap();
    let d = s(&data);
    assert_eq!(entries[0]["file"], d);
    assert_eq!((entries[0]["line"].as_u64(), entries[0]["action"].as_str()), (Some(1), Some("changed")));
    assert!(entries[0]["reasons"].to_string().contains("HTML tags removed"), "{}", entries[0]);
    assert_eq!((entries[1]["line"].as_u64(), entries[1]["action"].as_str()), (Some(3), Some("dropped")));
    assert!(entries[1]["reasons"][0].as_str().unwrap().starts_with("language en"), "{}", entries[1]);
    assert_eq!(entries[2]["line"], 4);
    assert!(entries[2]["reasons"][0].as_str().unwrap().contains("fewer than 5"), "{}", entries[2]);
    let cleaned = lines(&out);
    assert_eq!(cleaned.len(), 2);
    assert!(
        cleaned[0].contains(r#""value":"发烧 怎么办？""#) && cleaned[0].contains("多喝水&休息，注意观察"),
        "{}",
        cleaned[0]
    );
    assert_eq!(
        cleaned[1],
        sharegpt("感冒怎么办？", "多休息，多喝水，必要时就医。"),
        "an unchanged record is kept byte for byte"
    );
    assert_eq!(serde_json::from_str::<Value>(&std::fs::read_to_string(&report).unwrap()).unwrap(), v);
    ok(&["data", "check", "--kind", "sft", s(&out)]);
    assert!(
        fails(&["data", "clean", "--kind", "sft", d, "--lang", "xx", "--output", s(&out)]).contains("language 'xx'")
    );
}

#[test]
fn convert_between_layouts_and_refuse_lossy_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let src = repo().join("data/sft/medical_alpaca.jsonl");
    let sharegpt = tmp.path().join("sharegpt.jsonl");
    let out =
        ok(&["data", "convert", "--from", "alpaca", "--to", "sharegpt", "--input", s(&src), "--output", s(&sharegpt)]);
    assert!(out.contains("(Alpaca)") && out.contains("(ShareGPT)"), "{out}");
    let check: Value = serde_json::from_str(&ok(&["data", "check", "--kind", "sft", "--json", s(&sharegpt)])).unwrap();
    assert_eq!(check["files"][0]["format"], "sharegpt");
    assert_eq!(check["records"].as_u64(), Some(lines(&src).iter().filter(|l| !l.trim().is_empty()).count() as u64));
    let back = tmp.path().join("alpaca.jsonl");
    ok(&["data", "convert", "--to", "alpaca", "--input", s(&sharegpt), "--output", s(&back)]);
    ok(&["data", "check", "--kind", "sft", s(&back)]);
    let pairs = repo().join("data/preference/medical_pairs_eval.jsonl");
    let trl = tmp.path().join("trl.jsonl");
    ok(&["data", "convert", "--to", "trl-implicit", "--input", s(&pairs), "--output", s(&trl)]);
    let check: Value =
        serde_json::from_str(&ok(&["data", "check", "--kind", "preference", "--json", s(&trl)])).unwrap();
    assert_eq!(check["files"][0]["format"], "trl_implicit_pairs");
    let e = fails(&[
        "data",
        "convert",
        "--to",
        "sharegpt",
        "--input",
        s(&pairs),
        "--output",
        s(&tmp.path().join("x.jsonl")),
    ]);
    assert!(e.contains(&format!("{}:1: a preference pair cannot be written as sharegpt", s(&pairs))), "{e}");
    let e =
        fails(&["data", "convert", "--to", "trl", "--input", s(&sharegpt), "--output", s(&tmp.path().join("y.jsonl"))]);
    assert!(e.contains("sharegpt.jsonl:1: a conversation cannot be written as trl"), "{e}");
    let e = fails(&[
        "data",
        "convert",
        "--from",
        "openai",
        "--to",
        "alpaca",
        "--input",
        s(&sharegpt),
        "--output",
        s(&back),
    ]);
    assert!(e.contains("the file's format is ShareGPT, not OpenAI messages"), "{e}");
}

#[test]
fn stats_count_records_tokens_turns_and_languages() {
    let data = repo().join("data/sft/medical_sft_eval.jsonl");
    let v: Value = serde_json::from_str(&ok(&[
        "data",
        "stats",
        "--kind",
        "sft",
        "--tokenizer",
        s(&support::fixtures().join("models/tiny-llama")),
        "--json",
        s(&data),
    ]))
    .unwrap();
    let total = &v["total"];
    let records = total["records"].as_u64().unwrap();
    assert!(records > 0);
    let hist: u64 = total["token_histogram"].as_array().unwrap().iter().map(|b| b["count"].as_u64().unwrap()).sum();
    assert_eq!(hist, records, "every record in one bucket");
    let turns: u64 = total["turns"].as_object().unwrap().values().map(|n| n.as_u64().unwrap()).sum();
    assert_eq!(turns, records);
    assert!(total["languages"]["zh"].as_u64().unwrap() > 0, "{}", total["languages"]);
    let table = ok(&["data", "stats", "--kind", "sft", s(&data)]);
    assert!(table.contains("ShareGPT") && table.contains("zh:"), "{table}");
}

#[test]
fn train_sft_uses_the_data_options_mix() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("medical.jsonl"), tmp.path().join("general.jsonl"));
    write(&a, &(0..20).map(|i| sharegpt(&format!("发烧{i}怎么办？"), "多喝水。")).collect::<Vec<_>>());
    write(&b, &(0..20).map(|i| sharegpt(&format!("What is {i}?"), "A number.")).collect::<Vec<_>>());
    let cfg = tmp.path().join("sft.toml");
    let write_cfg = |mix: &str| {
        std::fs::write(
            &cfg,
            format!(
                "model = {:?}\ndata = [{:?}, {:?}]\noutput_dir = {:?}\n[train]\nmax_steps = 1\nbatch_size = 2\nlr = 1e-3\nmax_length = 128\nval_ratio = 0.0\nseed = 7\n[data_options]\n{mix}\n",
                support::fixtures().join("models/tiny-llama"),
                a,
                b,
                tmp.path().join("run")
            ),
        )
        .unwrap();
    };
    write_cfg(&format!("mix = {{ {:?} = 0.8, {:?} = 0.2 }}\nmix_total = 10", s(&a), s(&b)));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_align"))
        .args(["train", "sft", "--config", s(&cfg)])
        .env("ALIGN_LOG", "info")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    // the sources in key order (here general before medical), each with its records and share
    let want = format!("data mix (seed 7): 10 records: {} 2 of 20 (20.0%), {} 8 of 20 (80.0%)", s(&b), s(&a));
    assert!(log.contains(&want), "missing {want} in:\n{log}");
    assert!(log.contains("SFT on 10 conversations"), "{log}");
    // a mistyped key, or a data file the mix does not weigh, is one clear line
    write_cfg(&format!("mix = {{ {:?} = 1.0 }}\nmix_totl = 10", s(&a)));
    assert!(fails(&["train", "sft", "--config", s(&cfg)]).contains("mix_totl"));
    write_cfg(&format!("mix = {{ {:?} = 1.0 }}", s(&a)));
    let e = fails(&["train", "sft", "--config", s(&cfg), "--restart"]);
    assert!(e.contains("general.jsonl has no weight"), "{e}");
}
