//! Preference pairs (a prompt, a chosen and a rejected answer) from MedicalGPT, LLaMA-Factory,
//! TRL (explicit and implicit prompt), Alpaca and question/response records.
use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{
    alpaca_prompt_turns, check_conversation, history_turns, required, required_string, string_or_messages,
    system_field, turn, turns, Dialect, FieldError, FieldResult, LastTurn, Role, Turn,
};
use super::sft::{with_system, SHAREGPT_SYSTEM_KEYS};
use super::{DataFormat, Origin};
use crate::text::chat::ChatMessage;

/// One preference pair: the conversation up to the answer (may start with a system message,
/// ends with a user message) and the chosen and rejected assistant answers.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PreferencePair {
    pub prompt: Vec<ChatMessage>,
    pub chosen: String,
    pub rejected: String,
    pub origin: Origin,
}

impl PreferencePair {
    /// The prompt followed by the chosen answer as an assistant message.
    pub fn chosen_messages(&self) -> Vec<ChatMessage> {
        self.with_answer(&self.chosen)
    }

    /// The prompt followed by the rejected answer as an assistant message.
    pub fn rejected_messages(&self) -> Vec<ChatMessage> {
        self.with_answer(&self.rejected)
    }

    /// Chosen and rejected are the same text (such pairs teach nothing and are counted).
    pub fn is_identical(&self) -> bool {
        self.chosen == self.rejected
    }

    fn with_answer(&self, answer: &str) -> Vec<ChatMessage> {
        let mut m = self.prompt.clone();
        m.push(ChatMessage::new("assistant", answer));
        m
    }
}

/// A TRL answer: a string, or a message list whose last message is the assistant's answer.
fn trl_answer(value: &Value, field: &str) -> FieldResult<String> {
    let turns = string_or_messages(value, field, Role::Assistant)?;
    let last =
        turns.last().ok_or_else(|| FieldError::new(field, "expected at least one message, found an empty list"))?;
    if last.role != Role::Assistant {
        return Err(FieldError::new(
            &last.role_field,
            format!("expected 'assistant' (the answer is the last message), found '{}'", last.role.as_str()),
        ));
    }
    last.answer_text()
}

/// A LLaMA-Factory answer: one `{"from": "gpt", "value"}` turn.
fn turn_answer(value: &Value, field: &str) -> FieldResult<String> {
    let t = turn(value, field, Dialect::ShareGpt)?;
    if t.role != Role::Assistant {
        return Err(FieldError::new(
            &t.role_field,
            format!("expected 'gpt', found '{}'", Dialect::ShareGpt.name(t.role)),
        ));
    }
    t.answer_text()
}

/// TRL implicit prompt: `chosen` and `rejected` are whole conversations that share every
/// message but the final assistant answer.
fn implicit_prompt(obj: &Map<String, Value>) -> FieldResult<(Vec<Turn>, String, String)> {
    let chosen = turns(required(obj, "chosen")?, "chosen", Dialect::OpenAi)?;
    let rejected = turns(required(obj, "rejected")?, "rejected", Dialect::OpenAi)?;
    let answer = |list: &[Turn], field: &str| -> FieldResult<String> {
        match list.last() {
            None => Err(FieldError::new(field, "expected the prompt messages and an answer, found an empty list")),
            Some(t) if t.role != Role::Assistant => Err(FieldError::new(
                &t.role_field,
                format!("expected 'assistant' (the answer is the last message), found '{}'", t.role.as_str()),
            )),
            Some(t) => t.answer_text(),
        }
    };
    let chosen_answer = answer(&chosen, "chosen")?;
    let rejected_answer = answer(&rejected, "rejected")?;
    let prompt = &chosen[..chosen.len() - 1];
    let rejected_prompt = &rejected[..rejected.len() - 1];
    if prompt.is_empty() {
        return Err(FieldError::new(
            "chosen",
            "expected the shared prompt messages before the final assistant answer, found only the answer",
        ));
    }
    for i in 0..prompt.len().max(rejected_prompt.len()) {
        let same = match (prompt.get(i), rejected_prompt.get(i)) {
            (Some(a), Some(b)) => a.role == b.role && a.content == b.content,
            _ => false,
        };
        if !same {
            return Err(FieldError::new(
                format!("rejected[{i}]"),
                format!(
                    "differs from 'chosen[{i}]'; expected 'chosen' and 'rejected' to share every message before their final assistant answer ({} shared messages in 'chosen')",
                    prompt.len()
                ),
            ));
        }
    }
    Ok((prompt.to_vec(), chosen_answer, rejected_answer))
}

pub(crate) fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<PreferencePair> {
    let (prompt_turns, field, system, chosen, rejected) = match format {
        DataFormat::MedicalGptPairs => (
            turns(required(obj, "conversations")?, "conversations", Dialect::ShareGpt)?,
            "conversations",
            system_field(obj, &SHAREGPT_SYSTEM_KEYS)?,
            required_string(obj, "chosen", "")?,
            required_string(obj, "rejected", "")?,
        ),
        DataFormat::LlamaFactoryPairs => (
            turns(required(obj, "conversations")?, "conversations", Dialect::ShareGpt)?,
            "conversations",
            system_field(obj, &SHAREGPT_SYSTEM_KEYS)?,
            turn_answer(required(obj, "chosen")?, "chosen")?,
            turn_answer(required(obj, "rejected")?, "rejected")?,
        ),
        DataFormat::TrlPairs => (
            string_or_messages(required(obj, "prompt")?, "prompt", Role::User)?,
            "prompt",
            None,
            trl_answer(required(obj, "chosen")?, "chosen")?,
            trl_answer(required(obj, "rejected")?, "rejected")?,
        ),
        DataFormat::TrlImplicitPairs => {
            let (prompt, chosen, rejected) = implicit_prompt(obj)?;
            (prompt, "chosen", None, chosen, rejected)
        }
        DataFormat::AlpacaPairs => (
            alpaca_prompt_turns(obj)?,
            "instruction",
            system_field(obj, &["system"])?,
            required_string(obj, "chosen", "")?,
            required_string(obj, "rejected", "")?,
        ),
        DataFormat::QuestionResponsePairs => {
            let mut t = history_turns(obj)?;
            let question = required_string(obj, "question", "")?;
            t.push(Turn::text(Role::User, question, "question", Dialect::OpenAi));
            (
                t,
                "question",
                system_field(obj, &["system"])?,
                required_string(obj, "response_chosen", "")?,
                required_string(obj, "response_rejected", "")?,
            )
        }
        other => return Err(FieldError::new("", format!("{other} is not a preference format"))),
    };
    let checked = check_conversation(prompt_turns, field, system, LastTurn::User)?;
    Ok(PreferencePair { prompt: with_system(checked.system.as_deref(), &checked.messages), chosen, rejected, origin })
}
