//! Prompts for PPO/GRPO rollouts (a conversation ending with a user turn, and an optional
//! reference answer) from prompt, question/answer, ShareGPT, OpenAI-messages and Alpaca records.
use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{
    alpaca_prompt_turns, check_conversation, optional_string, required, required_string, string_or_messages,
    system_field, turns, Dialect, FieldError, FieldResult, LastTurn, Role, Turn,
};
use super::sft::{with_system, SHAREGPT_SYSTEM_KEYS};
use super::{DataFormat, Origin};
use crate::text::chat::ChatMessage;

/// One rollout prompt: messages (may start with a system message; end with a user message) and
/// the reference answer when the record has one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PromptRecord {
    pub messages: Vec<ChatMessage>,
    pub reference: Option<String>,
    pub origin: Origin,
}

/// A reference answer field: the first of `keys` present, a string or a number (GSM8K-style
/// `"answer": 42`); anything else is an error naming the field.
fn reference_field(obj: &Map<String, Value>, keys: &[&str]) -> FieldResult<Option<String>> {
    for key in keys {
        match obj.get(*key) {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) => return Ok(Some(n.to_string())),
            Some(_) => return optional_string(obj, key),
        }
    }
    Ok(None)
}

/// Fields that hold a reference answer besides the format's own (OpenAI-messages and ShareGPT
/// records of math/verifiable data carry it beside the conversation).
const REFERENCE_KEYS: [&str; 2] = ["solution", "answer"];

/// The reference of a `{"prompt": …}` record: `completion` (a string or messages ending with the
/// assistant's answer) or `answer` / `reference` / `solution` (strings or numbers).
fn prompt_reference(obj: &Map<String, Value>) -> FieldResult<Option<String>> {
    match obj.get("completion") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let t = string_or_messages(v, "completion", Role::Assistant)?;
            return Ok(t.last().map(|t| t.content.clone()));
        }
    }
    reference_field(obj, &["answer", "reference", "solution"])
}

pub(crate) fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<PromptRecord> {
    let (prompt_turns, field, system, reference) = match format {
        DataFormat::Prompt => (
            string_or_messages(required(obj, "prompt")?, "prompt", Role::User)?,
            "prompt",
            system_field(obj, &["system"])?,
            prompt_reference(obj)?,
        ),
        DataFormat::QuestionAnswer => {
            let question = required_string(obj, "question", "")?;
            let turn = Turn::text(Role::User, question, "question", Dialect::OpenAi);
            (vec![turn], "question", system_field(obj, &["system"])?, reference_field(obj, &["answer", "solution"])?)
        }
        DataFormat::ShareGpt | DataFormat::OpenAiMessages => {
            let (key, dialect, system) = if format == DataFormat::ShareGpt {
                ("conversations", Dialect::ShareGpt, system_field(obj, &SHAREGPT_SYSTEM_KEYS)?)
            } else {
                ("messages", Dialect::OpenAi, None)
            };
            let mut t = turns(required(obj, key)?, key, dialect)?;
            // Everything before the last assistant turn is the prompt; that turn is the reference,
            // else a `solution` / `answer` field beside the conversation.
            let reference = match t.last() {
                Some(last) if last.role == Role::Assistant && t.len() > 1 => {
                    let answer = last.answer_text()?;
                    t.pop();
                    Some(answer)
                }
                _ => reference_field(obj, &REFERENCE_KEYS)?,
            };
            (t, key, system, reference)
        }
        DataFormat::Alpaca => {
            (alpaca_prompt_turns(obj)?, "instruction", system_field(obj, &["system"])?, optional_string(obj, "output")?)
        }
        other => return Err(FieldError::new("", format!("{other} is not a prompt format"))),
    };
    let checked = check_conversation(prompt_turns, field, system, LastTurn::User)?;
    Ok(PromptRecord { messages: with_system(checked.system.as_deref(), &checked.messages), reference, origin })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn parse_json(format: DataFormat, text: &str) -> FieldResult<PromptRecord> {
        let v: Value = serde_json::from_str(text).unwrap();
        parse(format, v.as_object().unwrap(), Origin::line(Path::new("p.jsonl"), 3))
    }

    /// Verifiable-reward data: MedicalGPT grpo/*.jsonl (`question` / `answer`), OpenAI messages
    /// with a `solution` or `answer` field, prompts with a numeric answer.
    #[test]
    fn reference_answers_of_the_formats_users_bring() {
        let r = parse_json(DataFormat::QuestionAnswer, r#"{"question": "2+2?", "answer": "4"}"#).unwrap();
        assert_eq!(r.reference.as_deref(), Some("4"));
        let r = parse_json(
            DataFormat::OpenAiMessages,
            r#"{"messages": [{"role": "user", "content": "2+3?"}], "solution": "5"}"#,
        )
        .unwrap();
        assert_eq!((r.messages.len(), r.reference.as_deref()), (1, Some("5")));
        let r = parse_json(
            DataFormat::OpenAiMessages,
            r#"{"messages": [{"role": "user", "content": "6*7?"}], "answer": 42}"#,
        )
        .unwrap();
        assert_eq!(r.reference.as_deref(), Some("42"));
        let r = parse_json(DataFormat::Prompt, r#"{"prompt": "1+1?", "solution": 2}"#).unwrap();
        assert_eq!(r.reference.as_deref(), Some("2"));
        let e = parse_json(
            DataFormat::OpenAiMessages,
            r#"{"messages": [{"role": "user", "content": "q"}], "solution": [1]}"#,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("solution") && e.contains("expected a string"), "{e}");
    }
}
