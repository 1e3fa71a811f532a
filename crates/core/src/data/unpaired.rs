//! Unpaired examples for KTO: a prompt, one completion and whether it is desirable — TRL's
//! unpaired `{"prompt", "completion", "label"}` records, or any preference pair split into both
//! (the chosen answer desirable, the rejected one undesirable).
use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{check_conversation, required, string_or_messages, FieldError, FieldResult, LastTurn, Role};
use super::preference::{self, PreferencePair};
use super::sft::with_system;
use super::{kind_name, DataFormat, Origin};
use crate::text::chat::ChatMessage;

/// One unpaired example: the conversation up to the answer (may start with a system message,
/// ends with a user message), the assistant's completion, and its label.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnpairedExample {
    pub prompt: Vec<ChatMessage>,
    pub completion: String,
    /// True: a desirable completion; false: an undesirable one.
    pub label: bool,
    pub origin: Origin,
}

/// One record of an unpaired file: an example, or a preference pair that gives two.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum UnpairedRecord {
    One(UnpairedExample),
    Pair(PreferencePair),
}

impl UnpairedRecord {
    pub(crate) fn origin(&self) -> &Origin {
        match self {
            UnpairedRecord::One(e) => &e.origin,
            UnpairedRecord::Pair(p) => &p.origin,
        }
    }

    /// The record's examples: a pair's chosen answer (desirable), then its rejected one.
    pub(crate) fn into_examples(self) -> Vec<UnpairedExample> {
        match self {
            UnpairedRecord::One(e) => vec![e],
            UnpairedRecord::Pair(p) => vec![
                UnpairedExample {
                    prompt: p.prompt.clone(),
                    completion: p.chosen,
                    label: true,
                    origin: p.origin.clone(),
                },
                UnpairedExample { prompt: p.prompt, completion: p.rejected, label: false, origin: p.origin },
            ],
        }
    }

    pub(crate) fn is_identical_pair(&self) -> bool {
        matches!(self, UnpairedRecord::Pair(p) if p.is_identical())
    }
}

impl UnpairedExample {
    /// The prompt followed by the completion as an assistant message.
    pub fn messages(&self) -> Vec<ChatMessage> {
        let mut m = self.prompt.clone();
        m.push(ChatMessage::new("assistant", &self.completion));
        m
    }
}

pub(crate) fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<UnpairedRecord> {
    if format.is_ranked() {
        return Err(FieldError::new(
            "",
            format!("{format} lists are read as preference data (--kind preference) only; expected one unpaired example or one preference pair per record"),
        ));
    }
    if format != DataFormat::TrlUnpaired {
        return preference::parse(format, obj, origin).map(UnpairedRecord::Pair);
    }
    let prompt = string_or_messages(required(obj, "prompt")?, "prompt", Role::User)?;
    let completion = string_or_messages(required(obj, "completion")?, "completion", Role::Assistant)?;
    let label = match required(obj, "label")? {
        Value::Bool(b) => *b,
        other => {
            return Err(FieldError::new(
                "label",
                format!("expected a boolean (true = desirable, false = undesirable), found {}", kind_name(other)),
            ))
        }
    };
    let answer = match completion.as_slice() {
        [one] if one.role == Role::Assistant => one.answer_text()?,
        [one] => {
            return Err(FieldError::new(
                &one.role_field,
                format!("expected 'assistant' (the completion is the answer), found '{}'", one.role.as_str()),
            ))
        }
        _ => {
            return Err(FieldError::new(
                "completion",
                format!("expected one assistant answer, found {} messages", completion.len()),
            ))
        }
    };
    let checked = check_conversation(prompt, "prompt", None, LastTurn::User)?;
    Ok(UnpairedRecord::One(UnpairedExample {
        prompt: with_system(checked.system.as_deref(), &checked.messages),
        completion: answer,
        label,
        origin,
    }))
}
