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

/// The reference of a `{"prompt": …}` record: `completion` (a string or messages ending with the
/// assistant's answer) or `answer` / `reference` (strings).
fn prompt_reference(obj: &Map<String, Value>) -> FieldResult<Option<String>> {
    match obj.get("completion") {
        None | Some(Value::Null) => {}
        Some(v) => {
            let t = string_or_messages(v, "completion", Role::Assistant)?;
            return Ok(t.last().map(|t| t.content.clone()));
        }
    }
    for key in ["answer", "reference"] {
        if let Some(s) = optional_string(obj, key)? {
            return Ok(Some(s));
        }
    }
    Ok(None)
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
            let turn =
                Turn { role: Role::User, content: question, role_field: "question".into(), dialect: Dialect::OpenAi };
            (vec![turn], "question", system_field(obj, &["system"])?, optional_string(obj, "answer")?)
        }
        DataFormat::ShareGpt | DataFormat::OpenAiMessages => {
            let (key, dialect, system) = if format == DataFormat::ShareGpt {
                ("conversations", Dialect::ShareGpt, system_field(obj, &SHAREGPT_SYSTEM_KEYS)?)
            } else {
                ("messages", Dialect::OpenAi, None)
            };
            let mut t = turns(required(obj, key)?, key, dialect)?;
            // Everything before the last assistant turn is the prompt; that turn is the reference.
            let reference = match t.last() {
                Some(last) if last.role == Role::Assistant && t.len() > 1 => t.pop().map(|a| a.content),
                _ => None,
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
