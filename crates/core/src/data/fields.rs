//! Reading the fields of one JSON record with errors that name the field and what was expected,
//! and turning role-tagged turns (ShareGPT `from`/`value`, OpenAI `role`/`content`) into checked
//! conversations.
use std::fmt;

use serde_json::{Map, Value};

use super::kind_name;
use crate::text::chat::ChatMessage;

/// What is wrong with one record: the field (a path such as `conversations[2].from`; empty for
/// the record as a whole) and the problem.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct FieldError {
    pub field: String,
    pub message: String,
}

impl FieldError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        FieldError { field: field.into(), message: message.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "field '{}': {}", self.field, self.message)
        }
    }
}

pub(crate) type FieldResult<T> = std::result::Result<T, FieldError>;

pub(crate) fn join(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// `value` must be a string.
pub(crate) fn as_string(value: &Value, field: &str) -> FieldResult<String> {
    match value {
        Value::String(s) => Ok(s.clone()),
        other => Err(FieldError::new(field, format!("expected a string, found {}", kind_name(other)))),
    }
}

/// A required string field.
pub(crate) fn required_string(obj: &Map<String, Value>, key: &str, parent: &str) -> FieldResult<String> {
    let field = join(parent, key);
    match obj.get(key) {
        Some(v) => as_string(v, &field),
        None => Err(FieldError::new(field, "missing")),
    }
}

/// An optional string field: missing and null are `None`.
pub(crate) fn optional_string(obj: &Map<String, Value>, key: &str) -> FieldResult<Option<String>> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => as_string(v, key).map(Some),
    }
}

/// A required field that must be present (any type).
pub(crate) fn required<'a>(obj: &'a Map<String, Value>, key: &str) -> FieldResult<&'a Value> {
    obj.get(key).ok_or_else(|| FieldError::new(key, "missing"))
}

/// The optional system prompt of a record: the first of `keys` that holds a non-empty string.
pub(crate) fn system_field(obj: &Map<String, Value>, keys: &[&str]) -> FieldResult<Option<String>> {
    for key in keys {
        if let Some(s) = optional_string(obj, key)? {
            if !s.is_empty() {
                return Ok(Some(s));
            }
        }
    }
    Ok(None)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    System,
    User,
    Assistant,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
        }
    }
}

/// How a format spells turns: ShareGPT (`from`: human/gpt/system, `value`) or OpenAI messages
/// (`role`: system/user/assistant, `content`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    ShareGpt,
    OpenAi,
}

impl Dialect {
    fn role_key(self) -> &'static str {
        match self {
            Dialect::ShareGpt => "from",
            Dialect::OpenAi => "role",
        }
    }

    fn content_key(self) -> &'static str {
        match self {
            Dialect::ShareGpt => "value",
            Dialect::OpenAi => "content",
        }
    }

    /// The name of a role in this dialect's own words (for messages).
    pub(crate) fn name(self, role: Role) -> &'static str {
        match (self, role) {
            (Dialect::ShareGpt, Role::System) => "system",
            (Dialect::ShareGpt, Role::User) => "human",
            (Dialect::ShareGpt, Role::Assistant) => "gpt",
            (Dialect::OpenAi, r) => r.as_str(),
        }
    }

    fn parse_role(self, raw: &str) -> Option<Role> {
        match (self, raw) {
            (_, "system") => Some(Role::System),
            (_, "user") => Some(Role::User),
            (_, "assistant") => Some(Role::Assistant),
            (Dialect::ShareGpt, "human") => Some(Role::User),
            (Dialect::ShareGpt, "gpt" | "model") => Some(Role::Assistant),
            _ => None,
        }
    }

    fn expected_roles(self) -> &'static str {
        match self {
            Dialect::ShareGpt => "human, gpt, system",
            Dialect::OpenAi => "system, user, assistant",
        }
    }
}

/// One turn with the field paths used in error messages.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    pub role: Role,
    pub content: String,
    /// e.g. `conversations[2].from`.
    pub role_field: String,
    pub dialect: Dialect,
}

impl Turn {
    pub(crate) fn message(&self) -> ChatMessage {
        ChatMessage { role: self.role.as_str().to_string(), content: self.content.clone() }
    }

    fn role_name(&self) -> &'static str {
        self.dialect.name(self.role)
    }
}

/// A single turn object (`{"from", "value"}` or `{"role", "content"}`) at `field`.
pub(crate) fn turn(value: &Value, field: &str, dialect: Dialect) -> FieldResult<Turn> {
    let (role_key, content_key) = (dialect.role_key(), dialect.content_key());
    let obj = value.as_object().ok_or_else(|| {
        FieldError::new(
            field,
            format!("expected an object with '{role_key}' and '{content_key}', found {}", kind_name(value)),
        )
    })?;
    let raw_role = required_string(obj, role_key, field)?;
    let role_field = join(field, role_key);
    let role = dialect.parse_role(&raw_role).ok_or_else(|| {
        FieldError::new(&role_field, format!("expected one of {}, found '{raw_role}'", dialect.expected_roles()))
    })?;
    let content = required_string(obj, content_key, field)?;
    Ok(Turn { role, content, role_field, dialect })
}

/// A list of turns (`value` must be an array) at `field`.
pub(crate) fn turns(value: &Value, field: &str, dialect: Dialect) -> FieldResult<Vec<Turn>> {
    let items = value
        .as_array()
        .ok_or_else(|| FieldError::new(field, format!("expected a list of turns, found {}", kind_name(value))))?;
    items.iter().enumerate().map(|(i, item)| turn(item, &format!("{field}[{i}]"), dialect)).collect()
}

/// A prompt/answer field that is either a string (one turn of `role_if_string`) or a list of
/// OpenAI messages.
pub(crate) fn string_or_messages(value: &Value, field: &str, role_if_string: Role) -> FieldResult<Vec<Turn>> {
    match value {
        Value::String(s) => Ok(vec![Turn {
            role: role_if_string,
            content: s.clone(),
            role_field: field.to_string(),
            dialect: Dialect::OpenAi,
        }]),
        Value::Array(_) => turns(value, field, Dialect::OpenAi),
        other => {
            Err(FieldError::new(field, format!("expected a string or a list of messages, found {}", kind_name(other))))
        }
    }
}

/// What the last turn of a conversation must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LastTurn {
    /// A complete conversation (SFT): ends with an assistant turn.
    Assistant,
    /// A prompt: ends with a user turn.
    User,
}

/// A checked conversation: the system prompt and the user/assistant messages that follow it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Checked {
    pub system: Option<String>,
    pub messages: Vec<ChatMessage>,
}

/// Checks a conversation: an optional leading system turn (which conflicts with a different
/// `system` from a separate field), then user/assistant turns alternating from a user turn, and
/// the last turn as `last` requires. `field` names the whole list in messages.
pub(crate) fn check_conversation(
    mut turns: Vec<Turn>,
    field: &str,
    system: Option<String>,
    last: LastTurn,
) -> FieldResult<Checked> {
    let mut system = system;
    if let Some(first) = turns.first() {
        if first.role == Role::System {
            let leading = turns.remove(0);
            match &system {
                Some(s) if s != &leading.content && !leading.content.is_empty() => {
                    return Err(FieldError::new(
                        leading.role_field,
                        "a system turn and a different system prompt field are both given; keep one",
                    ));
                }
                Some(_) => {}
                None if leading.content.is_empty() => {}
                None => system = Some(leading.content),
            }
        }
    }
    if turns.is_empty() {
        return Err(FieldError::new(field, "expected at least one turn besides the system prompt, found none"));
    }
    for (i, t) in turns.iter().enumerate() {
        let expected = if i % 2 == 0 { Role::User } else { Role::Assistant };
        if t.role == Role::System {
            return Err(FieldError::new(&t.role_field, "a system turn is only allowed as the first turn"));
        }
        if t.role != expected {
            let d = t.dialect;
            return Err(FieldError::new(
                &t.role_field,
                format!(
                    "expected '{}' (turns alternate {}, {} after an optional system turn), found '{}'",
                    d.name(expected),
                    d.name(Role::User),
                    d.name(Role::Assistant),
                    t.role_name()
                ),
            ));
        }
    }
    if let Some(t) = turns.last() {
        let d = t.dialect;
        match last {
            LastTurn::Assistant if t.role != Role::Assistant => {
                return Err(FieldError::new(
                    field,
                    format!(
                        "expected the conversation to end with a turn from '{}', found one from '{}'",
                        d.name(Role::Assistant),
                        t.role_name()
                    ),
                ));
            }
            LastTurn::User if t.role != Role::User => {
                return Err(FieldError::new(
                    field,
                    format!(
                        "expected the prompt to end with a turn from '{}', found one from '{}'",
                        d.name(Role::User),
                        t.role_name()
                    ),
                ));
            }
            _ => {}
        }
    }
    Ok(Checked { system, messages: turns.iter().map(Turn::message).collect() })
}

/// Alpaca-style `history`: a list of `[question, answer]` pairs, as user/assistant turns.
pub(crate) fn history_turns(obj: &Map<String, Value>) -> FieldResult<Vec<Turn>> {
    let items = match obj.get("history") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(items)) => items,
        Some(other) => {
            return Err(FieldError::new(
                "history",
                format!("expected a list of [question, answer] pairs, found {}", kind_name(other)),
            ));
        }
    };
    let mut out = Vec::with_capacity(items.len() * 2);
    for (i, item) in items.iter().enumerate() {
        let field = format!("history[{i}]");
        let pair = match item {
            Value::Array(pair) if pair.len() == 2 => pair,
            Value::Array(pair) => {
                return Err(FieldError::new(
                    field,
                    format!("expected a [question, answer] pair, found a list of {} items", pair.len()),
                ));
            }
            other => {
                return Err(FieldError::new(
                    field,
                    format!("expected a [question, answer] pair, found {}", kind_name(other)),
                ));
            }
        };
        for (j, role) in [(0, Role::User), (1, Role::Assistant)] {
            let f = format!("{field}[{j}]");
            out.push(Turn { role, content: as_string(&pair[j], &f)?, role_field: f, dialect: Dialect::ShareGpt });
        }
    }
    Ok(out)
}

/// The Alpaca user turn: `instruction`, plus `"\n" + input` when `input` is not empty.
pub(crate) fn alpaca_user_turn(obj: &Map<String, Value>) -> FieldResult<Turn> {
    let instruction = required_string(obj, "instruction", "")?;
    let input = optional_string(obj, "input")?.unwrap_or_default();
    let content = match (instruction.is_empty(), input.is_empty()) {
        (_, true) => instruction,
        (true, false) => input,
        (false, false) => format!("{instruction}\n{input}"),
    };
    Ok(Turn { role: Role::User, content, role_field: "instruction".into(), dialect: Dialect::OpenAi })
}

/// The Alpaca prompt turns: `history` pairs, then the instruction (+ input).
pub(crate) fn alpaca_prompt_turns(obj: &Map<String, Value>) -> FieldResult<Vec<Turn>> {
    let mut turns = history_turns(obj)?;
    turns.push(alpaca_user_turn(obj)?);
    Ok(turns)
}

/// A plain assistant turn from a string field.
pub(crate) fn assistant_turn(content: String, field: &str) -> Turn {
    Turn { role: Role::Assistant, content, role_field: field.to_string(), dialect: Dialect::OpenAi }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn alternation_errors_name_the_turn() {
        let v = json!([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]);
        let t = turns(&v, "conversations", Dialect::ShareGpt).unwrap();
        let e = check_conversation(t, "conversations", None, LastTurn::Assistant).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 'conversations[1].from': expected 'gpt' (turns alternate human, gpt after an optional system turn), found 'human'"
        );
        let v = json!([{"role": "user", "content": "a"}]);
        let t = turns(&v, "messages", Dialect::OpenAi).unwrap();
        let e = check_conversation(t, "messages", None, LastTurn::Assistant).unwrap_err();
        assert_eq!(
            e.to_string(),
            "field 'messages': expected the conversation to end with a turn from 'assistant', found one from 'user'"
        );
    }
}
