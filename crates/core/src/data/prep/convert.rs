//! Converting records between layouts: SFT conversations to ShareGPT, OpenAI messages or Alpaca
//! (with LLaMA-Factory's `history` for earlier turns), preference pairs to TRL (explicit or
//! implicit prompt), MedicalGPT or LLaMA-Factory pairs. Records are read by the readers of
//! their kind (format detected per file), so what a stage would read is what is converted.
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Result};
use serde_json::{json, Map, Value};

use super::prep_options;
use crate::data::reader::{read_file, ReadMode};
use crate::data::source::{expand_data_paths, FileLayout};
use crate::data::{Conversation, DataFormat, DataKind, PreferencePair};
use crate::text::chat::ChatMessage;

/// A layout to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    /// `{"conversations": [{"from", "value"}…], "system"?}`
    ShareGpt,
    /// `{"messages": [{"role", "content"}…]}` (the system prompt as the first message)
    OpenAi,
    /// `{"instruction", "input": "", "output", "system"?, "history"?: [[q, a]…]}`
    Alpaca,
    /// `{"prompt", "chosen", "rejected"}`: the prompt a string when it is one user message,
    /// else a message list
    Trl,
    /// `{"chosen": [messages], "rejected": [messages]}`
    TrlImplicit,
    /// `{"conversations": [{"from", "value"}…], "chosen": "…", "rejected": "…", "system"?}`
    MedicalGpt,
    /// `{"conversations": […], "chosen": {"from": "gpt", "value"}, "rejected": {…}, "system"?}`
    LlamaFactory,
}

impl Target {
    pub const NAMES: &'static str = "sharegpt, openai, alpaca, trl, trl-implicit, medicalgpt, llama-factory";

    /// The name `--to` takes.
    pub fn name(self) -> &'static str {
        match self {
            Target::ShareGpt => "sharegpt",
            Target::OpenAi => "openai",
            Target::Alpaca => "alpaca",
            Target::Trl => "trl",
            Target::TrlImplicit => "trl-implicit",
            Target::MedicalGpt => "medicalgpt",
            Target::LlamaFactory => "llama-factory",
        }
    }

    /// The kind of data this layout holds.
    pub fn kind(self) -> DataKind {
        match self {
            Target::ShareGpt | Target::OpenAi | Target::Alpaca => DataKind::Sft,
            _ => DataKind::Preference,
        }
    }

    /// The reader's format that reads this layout back.
    pub fn format(self) -> DataFormat {
        match self {
            Target::ShareGpt => DataFormat::ShareGpt,
            Target::OpenAi => DataFormat::OpenAiMessages,
            Target::Alpaca => DataFormat::Alpaca,
            Target::Trl => DataFormat::TrlPairs,
            Target::TrlImplicit => DataFormat::TrlImplicitPairs,
            Target::MedicalGpt => DataFormat::MedicalGptPairs,
            Target::LlamaFactory => DataFormat::LlamaFactoryPairs,
        }
    }
}

impl FromStr for Target {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sharegpt" => Target::ShareGpt,
            "openai" => Target::OpenAi,
            "alpaca" => Target::Alpaca,
            "trl" => Target::Trl,
            "trl-implicit" => Target::TrlImplicit,
            "medicalgpt" => Target::MedicalGpt,
            "llama-factory" => Target::LlamaFactory,
            other => bail!("target layout: expected one of {}, found '{other}'", Target::NAMES),
        })
    }
}

fn sharegpt_turn(m: &ChatMessage) -> Value {
    let from = match m.role.as_str() {
        "user" => "human",
        "assistant" => "gpt",
        "tool" => "observation",
        other => other,
    };
    json!({"from": from, "value": m.content})
}

/// A ShareGPT turn of a message; an assistant turn with tool calls becomes LLaMA-Factory's
/// `function_call` turn (the calls as JSON text), which cannot also hold text.
fn sharegpt_turn_checked(m: &ChatMessage, at: &crate::data::Origin) -> Result<Value> {
    if m.tool_calls.is_empty() {
        return Ok(sharegpt_turn(m));
    }
    if !m.content.trim().is_empty() {
        bail!("{at}: an assistant turn with both text and tool calls cannot be written as ShareGPT (a function_call turn holds only the calls)");
    }
    let calls: Vec<Value> = m.tool_calls.iter().map(|c| json!({"name": c.name, "arguments": c.arguments})).collect();
    let value = if calls.len() == 1 { calls[0].clone() } else { Value::Array(calls) };
    Ok(json!({"from": "function_call", "value": value.to_string()}))
}

fn openai_message(m: &ChatMessage) -> Value {
    if m.tool_calls.is_empty() && m.tool_call_id.is_none() {
        json!({"role": m.role, "content": m.content})
    } else {
        m.to_template_json()
    }
}

/// The system prompt and the other messages of a message list.
fn split_system(messages: &[ChatMessage]) -> (Option<&str>, &[ChatMessage]) {
    match messages.first() {
        Some(m) if m.role == "system" => (Some(m.content.as_str()), &messages[1..]),
        _ => (None, messages),
    }
}

fn with_system(mut obj: Map<String, Value>, system: Option<&str>) -> Value {
    if let Some(s) = system {
        obj.insert("system".into(), Value::String(s.to_string()));
    }
    Value::Object(obj)
}

/// Alpaca's `instruction`, `input`, `output` and `history` of user/assistant turns that start
/// with a user turn and end with one (the instruction), and the answer to it.
fn alpaca_fields(turns: &[ChatMessage], answer: &str) -> Map<String, Value> {
    let (last, before) = (turns.len() - 1, &turns[..turns.len() - 1]);
    let history: Vec<Value> = before.chunks(2).map(|p| json!([p[0].content, p[1].content])).collect();
    let mut obj = Map::new();
    obj.insert("instruction".into(), Value::String(turns[last].content.clone()));
    obj.insert("input".into(), Value::String(String::new()));
    obj.insert("output".into(), Value::String(answer.to_string()));
    if !history.is_empty() {
        obj.insert("history".into(), Value::Array(history));
    }
    obj
}

/// A conversation in an SFT layout.
pub fn conversation_to(target: Target, c: &Conversation) -> Result<Value> {
    let system = c.system.as_deref();
    Ok(match target {
        Target::ShareGpt => {
            let mut obj = Map::new();
            let turns = c.messages.iter().map(|m| sharegpt_turn_checked(m, &c.origin)).collect::<Result<Vec<_>>>()?;
            obj.insert("conversations".into(), Value::Array(turns));
            if !c.tools.is_empty() {
                // LLaMA-Factory keeps the schemas as JSON text
                obj.insert("tools".into(), Value::String(Value::Array(c.tools.clone()).to_string()));
            }
            with_system(obj, system)
        }
        Target::OpenAi => {
            let mut obj = Map::new();
            obj.insert("messages".into(), Value::Array(c.to_messages().iter().map(openai_message).collect()));
            if !c.tools.is_empty() {
                obj.insert("tools".into(), Value::Array(c.tools.clone()));
            }
            Value::Object(obj)
        }
        Target::Alpaca
            if !c.tools.is_empty() || c.messages.iter().any(|m| m.role == "tool" || !m.tool_calls.is_empty()) =>
        {
            bail!("{}: a conversation with tool calls cannot be written as Alpaca (it has no place for calls and results); convert to sharegpt or openai", c.origin)
        }
        Target::Alpaca => {
            let n = c.messages.len();
            let obj = alpaca_fields(&c.messages[..n - 1], &c.messages[n - 1].content);
            with_system(obj, system)
        }
        other => bail!(
            "{}: a conversation cannot be written as preference data ({} needs a chosen and a rejected answer)",
            c.origin,
            other.name()
        ),
    })
}

/// A preference pair in a preference layout.
pub fn pair_to(target: Target, p: &PreferencePair) -> Result<Value> {
    let (system, turns) = split_system(&p.prompt);
    let conversations = || Value::Array(turns.iter().map(sharegpt_turn).collect());
    Ok(match target {
        Target::Trl => {
            let prompt = if system.is_none() && turns.len() == 1 {
                Value::String(turns[0].content.clone())
            } else {
                Value::Array(p.prompt.iter().map(openai_message).collect())
            };
            json!({"prompt": prompt, "chosen": p.chosen, "rejected": p.rejected})
        }
        Target::TrlImplicit => json!({
            "chosen": p.chosen_messages().iter().map(openai_message).collect::<Vec<_>>(),
            "rejected": p.rejected_messages().iter().map(openai_message).collect::<Vec<_>>(),
        }),
        Target::MedicalGpt => {
            let mut obj = Map::new();
            obj.insert("conversations".into(), conversations());
            obj.insert("chosen".into(), Value::String(p.chosen.clone()));
            obj.insert("rejected".into(), Value::String(p.rejected.clone()));
            with_system(obj, system)
        }
        Target::LlamaFactory => {
            let mut obj = Map::new();
            obj.insert("conversations".into(), conversations());
            obj.insert("chosen".into(), json!({"from": "gpt", "value": p.chosen}));
            obj.insert("rejected".into(), json!({"from": "gpt", "value": p.rejected}));
            with_system(obj, system)
        }
        other => bail!(
            "{}: a preference pair cannot be written as an SFT conversation ({} would lose the rejected answer)",
            p.origin,
            other.name()
        ),
    })
}

/// What was converted from one file.
#[derive(Debug, Clone)]
pub struct ConvertedFile {
    pub path: PathBuf,
    pub format: Option<DataFormat>,
    pub records: usize,
}

fn check_from(path: &Path, format: Option<DataFormat>, from: Option<DataFormat>) -> Result<()> {
    if let (Some(want), Some(got)) = (from, format) {
        if want != got {
            bail!("{}: the file's format is {got}, not {want} as --from says", path.display());
        }
    }
    Ok(())
}

/// Converts the records of `paths` (read as `target.kind()` data; every file must have format
/// `from` when it is given) to `target`, one compact JSON object per record. Keys the readers
/// do not use (`id`, `source`, …) are not carried over.
pub fn convert_files<P: AsRef<Path>>(
    paths: &[P],
    from: Option<DataFormat>,
    target: Target,
) -> Result<(Vec<String>, Vec<ConvertedFile>)> {
    let mut lines = Vec::new();
    let mut files = Vec::new();
    for path in expand_data_paths(paths)? {
        let layout = FileLayout::of(&path)?;
        let (format, n) = match target.kind() {
            DataKind::Sft => {
                let (records, report) = read_file::<Conversation>(&path, layout, &prep_options(), ReadMode::Load)
                    .map_err(|e| match read_file::<PreferencePair>(&path, layout, &prep_options(), ReadMode::Load) {
                        Ok((pairs, _)) if !pairs.is_empty() => anyhow::anyhow!(
                            "{}: a preference pair cannot be written as {} (an SFT layout): its rejected answer would be lost; convert it to trl, trl-implicit, medicalgpt or llama-factory",
                            pairs[0].origin,
                            target.name()
                        ),
                        _ => e,
                    })?;
                check_from(&path, report.format, from)?;
                for c in &records {
                    lines.push(conversation_to(target, c)?.to_string());
                }
                (report.format, records.len())
            }
            _ => {
                let (records, report) = read_file::<PreferencePair>(&path, layout, &prep_options(), ReadMode::Load)
                    .map_err(|e| match read_file::<Conversation>(&path, layout, &prep_options(), ReadMode::Load) {
                        Ok((convs, _)) if !convs.is_empty() => anyhow::anyhow!(
                            "{}: a conversation cannot be written as {} (a preference layout): it has no rejected answer; convert it to sharegpt, openai or alpaca",
                            convs[0].origin,
                            target.name()
                        ),
                        _ => anyhow::anyhow!("{e:#} (converting to {} reads preference data)", target.name()),
                    })?;
                check_from(&path, report.format, from)?;
                for p in &records {
                    lines.push(pair_to(target, p)?.to_string());
                }
                (report.format, records.len())
            }
        };
        files.push(ConvertedFile { path, format, records: n });
    }
    Ok((lines, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{read_preference, read_sft};

    fn roundtrip_sft(line: &str, target: Target) -> (Conversation, Conversation, String) {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("in.jsonl");
        std::fs::write(&src, format!("{line}\n")).unwrap();
        let (lines, _) = convert_files(&[&src], None, target).unwrap();
        let dst = dir.path().join("out.jsonl");
        std::fs::write(&dst, format!("{}\n", lines.join("\n"))).unwrap();
        let a = read_sft(&[&src], &prep_options()).unwrap().records.remove(0);
        let b = read_sft(&[&dst], &prep_options()).unwrap();
        assert_eq!(b.reports[0].format, Some(target.format()));
        (a, b.records.into_iter().next().unwrap(), lines[0].clone())
    }

    #[test]
    fn sft_layouts_round_trip_through_the_readers() {
        let multi = r#"{"conversations":[{"from":"system","value":"你是医生。"},{"from":"human","value":"发烧怎么办？"},{"from":"gpt","value":"多喝水。"},{"from":"human","value":"还要吃药吗？"},{"from":"gpt","value":"高烧时可以吃退烧药。"}]}"#;
        for target in [Target::ShareGpt, Target::OpenAi, Target::Alpaca] {
            let (a, b, line) = roundtrip_sft(multi, target);
            assert_eq!((a.system, a.messages), (b.system, b.messages), "{}: {line}", target.name());
        }
        let (_, _, alpaca) = roundtrip_sft(multi, Target::Alpaca);
        assert_eq!(
            alpaca,
            r#"{"instruction":"还要吃药吗？","input":"","output":"高烧时可以吃退烧药。","history":[["发烧怎么办？","多喝水。"]],"system":"你是医生。"}"#
        );
    }

    #[test]
    fn tool_call_conversations_convert_between_sharegpt_and_openai() {
        let share = r#"{"conversations":[{"from":"human","value":"北京天气？"},{"from":"function_call","value":"{\"name\":\"weather\",\"arguments\":{\"city\":\"北京\"}}"},{"from":"observation","value":"晴"},{"from":"gpt","value":"晴天。"}],"tools":"[{\"name\":\"weather\",\"parameters\":{\"type\":\"object\"}}]"}"#;
        for target in [Target::OpenAi, Target::ShareGpt] {
            let (a, b, _) = roundtrip_sft(share, target);
            assert_eq!((&a.messages, &a.tools), (&b.messages, &b.tools), "{}", target.name());
            assert_eq!(b.messages[1].tool_calls[0].name, "weather");
            assert_eq!(b.messages[2].role, "tool");
        }
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("t.jsonl");
        std::fs::write(&src, format!("{share}\n")).unwrap();
        let records = read_sft(&[&src], &prep_options()).unwrap().records;
        let e = conversation_to(Target::Alpaca, &records[0]).unwrap_err().to_string();
        assert!(e.contains("t.jsonl:1: a conversation with tool calls cannot be written as Alpaca"), "{e}");
    }

    #[test]
    fn preference_layouts_round_trip_and_lossy_targets_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("pairs.jsonl");
        std::fs::write(&src, "{\"prompt\":\"头痛怎么办？\",\"chosen\":\"休息。\",\"rejected\":\"不用管。\"}\n{\"prompt\":[{\"role\":\"system\",\"content\":\"S\"},{\"role\":\"user\",\"content\":\"Q\"}],\"chosen\":\"a\",\"rejected\":\"b\"}\n").unwrap();
        let original = read_preference(&[&src], &prep_options()).unwrap().records;
        for target in [Target::Trl, Target::TrlImplicit, Target::MedicalGpt, Target::LlamaFactory] {
            let (lines, _) = convert_files(&[&src], None, target).unwrap();
            let dst = dir.path().join("out.jsonl");
            std::fs::write(&dst, format!("{}\n", lines.join("\n"))).unwrap();
            let back = read_preference(&[&dst], &prep_options()).unwrap();
            assert_eq!(back.reports[0].format, Some(target.format()), "{}", target.name());
            for (a, b) in original.iter().zip(&back.records) {
                assert_eq!(
                    (&a.prompt, &a.chosen, &a.rejected),
                    (&b.prompt, &b.chosen, &b.rejected),
                    "{}",
                    target.name()
                );
            }
        }
        let e = convert_files(&[&src], Some(DataFormat::AlpacaPairs), Target::Trl).unwrap_err().to_string();
        assert!(e.contains("the file's format is TRL pairs, not Alpaca pairs"), "{e}");
        let c = Conversation {
            system: None,
            messages: vec![ChatMessage::new("user", "q"), ChatMessage::new("assistant", "a")],
            origin: crate::data::Origin::line(Path::new("x.jsonl"), 4),
            tools: Vec::new(),
        };
        let e = conversation_to(Target::Trl, &c).unwrap_err().to_string();
        assert!(e.starts_with("x.jsonl:4: a conversation cannot be written as preference data"), "{e}");
    }
}
