//! SFT conversations from ShareGPT, OpenAI-messages, Alpaca and prompt/completion records, tool
//! calls and their results included (ShareGPT `function_call` / `observation`, OpenAI `tool_calls` /
//! `tool`, a record's `tools`).
use serde::Serialize;
use serde_json::{Map, Value};

use super::fields::{
    alpaca_prompt_turns, assistant_turn, check_conversation, required, required_string, string_or_messages,
    system_field, tools_field, turns, Dialect, FieldError, FieldResult, LastTurn, Role,
};
use super::{DataFormat, Origin};
use crate::text::chat::ChatMessage;

/// One SFT conversation: an optional system prompt, then user/assistant messages that alternate
/// from a user message and end with an assistant message (roles are `user` / `assistant`). An
/// assistant message may call tools; its calls are answered by `tool` messages, which are
/// followed by an assistant message again.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Conversation {
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
    /// The function schemas given to the chat template (`tools`), in the
    /// `{"type": "function", "function": {…}}` form; empty when the record has none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Value>,
    pub origin: Origin,
}

impl Conversation {
    /// The messages as a chat template takes them: the system message first when there is one.
    pub fn to_messages(&self) -> Vec<ChatMessage> {
        with_system(self.system.as_deref(), &self.messages)
    }
}

/// `system` (when given) as a leading system message, then `messages`.
pub(crate) fn with_system(system: Option<&str>, messages: &[ChatMessage]) -> Vec<ChatMessage> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(s) = system {
        out.push(ChatMessage::new("system", s));
    }
    out.extend(messages.iter().cloned());
    out
}

/// The keys that may hold a ShareGPT record's system prompt.
pub(crate) const SHAREGPT_SYSTEM_KEYS: [&str; 2] = ["system_prompt", "system"];

pub(crate) fn parse(format: DataFormat, obj: &Map<String, Value>, origin: Origin) -> FieldResult<Conversation> {
    let tools = match format {
        DataFormat::ShareGpt | DataFormat::OpenAiMessages => tools_field(obj)?,
        _ => Vec::new(),
    };
    let (turns, field, system) = match format {
        DataFormat::ShareGpt => (
            turns(required(obj, "conversations")?, "conversations", Dialect::ShareGpt)?,
            "conversations",
            system_field(obj, &SHAREGPT_SYSTEM_KEYS)?,
        ),
        DataFormat::OpenAiMessages => {
            (turns(required(obj, "messages")?, "messages", Dialect::OpenAi)?, "messages", None)
        }
        DataFormat::Alpaca => {
            let mut t = alpaca_prompt_turns(obj)?;
            t.push(assistant_turn(required_string(obj, "output", "")?, "output"));
            (t, "instruction", system_field(obj, &["system"])?)
        }
        DataFormat::PromptCompletion => {
            let mut t = string_or_messages(required(obj, "prompt")?, "prompt", Role::User)?;
            t.extend(string_or_messages(required(obj, "completion")?, "completion", Role::Assistant)?);
            (t, "completion", None)
        }
        other => return Err(FieldError::new("", format!("{other} is not an SFT format"))),
    };
    let checked = check_conversation(turns, field, system, LastTurn::Assistant)?;
    Ok(Conversation { system: checked.system, messages: checked.messages, tools, origin })
}
