//! Reading the fields of one JSON record with errors that name the field and what was expected,
//! and turning role-tagged turns (ShareGPT `from`/`value`, OpenAI `role`/`content`, their tool
//! calls and results, a record's `tools`) into checked conversations.
use std::fmt;

use serde_json::{Map, Value};

use super::kind_name;
use crate::text::chat::{ChatMessage, ToolCall};

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
    /// The result of a tool call (ShareGPT `observation`, OpenAI `tool`).
    Tool,
}

impl Role {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }
}

/// How a format spells turns: ShareGPT (`from`: human/gpt/system, LLaMA-Factory's
/// function_call/observation, `value`) or OpenAI messages (`role`: system/user/assistant/tool,
/// `content`, `tool_calls`, `tool_call_id`).
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
            (Dialect::ShareGpt, Role::Tool) => "observation",
            (Dialect::OpenAi, r) => r.as_str(),
        }
    }

    /// The name of a turn that calls tools.
    fn call_name(self) -> &'static str {
        match self {
            Dialect::ShareGpt => "function_call",
            Dialect::OpenAi => "assistant with tool_calls",
        }
    }

    fn parse_role(self, raw: &str) -> Option<Role> {
        match (self, raw) {
            (_, "system") => Some(Role::System),
            (_, "user") => Some(Role::User),
            (_, "assistant") => Some(Role::Assistant),
            (Dialect::ShareGpt, "human") => Some(Role::User),
            (Dialect::ShareGpt, "gpt" | "model" | "function_call") => Some(Role::Assistant),
            (Dialect::ShareGpt, "observation") => Some(Role::Tool),
            (Dialect::OpenAi, "tool") => Some(Role::Tool),
            _ => None,
        }
    }

    fn expected_roles(self) -> &'static str {
        match self {
            Dialect::ShareGpt => "human, gpt, system, function_call, observation",
            Dialect::OpenAi => "system, user, assistant, tool",
        }
    }
}

/// One turn with the field paths used in error messages.
#[derive(Debug, Clone)]
pub(crate) struct Turn {
    pub role: Role,
    pub content: String,
    /// The calls of an assistant turn (ShareGPT `function_call`, OpenAI `tool_calls`).
    pub tool_calls: Vec<ToolCall>,
    /// The call a tool turn answers (OpenAI `tool_call_id`).
    pub tool_call_id: Option<String>,
    /// e.g. `conversations[2].from`.
    pub role_field: String,
    pub dialect: Dialect,
}

impl Turn {
    /// A turn of text only.
    pub(crate) fn text(role: Role, content: String, role_field: impl Into<String>, dialect: Dialect) -> Turn {
        Turn { role, content, tool_calls: Vec::new(), tool_call_id: None, role_field: role_field.into(), dialect }
    }

    pub(crate) fn message(&self) -> ChatMessage {
        ChatMessage {
            role: self.role.as_str().to_string(),
            content: self.content.clone(),
            tool_calls: self.tool_calls.clone(),
            tool_call_id: self.tool_call_id.clone(),
        }
    }

    fn role_name(&self) -> &'static str {
        if self.is_tool_turn() && self.role == Role::Assistant {
            self.dialect.call_name()
        } else {
            self.dialect.name(self.role)
        }
    }

    /// A tool call or a tool result.
    pub(crate) fn is_tool_turn(&self) -> bool {
        self.role == Role::Tool || !self.tool_calls.is_empty()
    }

    /// The text of an answer turn: a turn with tool calls is refused (only SFT reads them).
    pub(crate) fn answer_text(&self) -> FieldResult<String> {
        if self.is_tool_turn() {
            return Err(tools_only_for_sft(self));
        }
        Ok(self.content.clone())
    }
}

fn tools_only_for_sft(t: &Turn) -> FieldError {
    FieldError::new(
        &t.role_field,
        format!("found a '{}' turn; tool calls and tool results are read in SFT conversations only", t.role_name()),
    )
}

/// JSON text: a string that must parse (`what` says what it should hold).
fn parse_json_string(text: &str, field: &str, what: &str) -> FieldResult<Value> {
    serde_json::from_str(text).map_err(|e| {
        FieldError::new(field, format!("expected {what} as JSON text, found a string that is not JSON ({e})"))
    })
}

/// The arguments of a call: a JSON object, or a string holding one (OpenAI's form).
fn call_arguments(value: Option<&Value>, field: &str) -> FieldResult<Value> {
    let parsed = match value {
        None => return Err(FieldError::new(field, "missing")),
        Some(Value::String(s)) => parse_json_string(s, field, "a JSON object of arguments")?,
        Some(v) => v.clone(),
    };
    if !parsed.is_object() {
        return Err(FieldError::new(
            field,
            format!("expected a JSON object of arguments, found {}", kind_name(&parsed)),
        ));
    }
    Ok(parsed)
}

/// One call `{"name", "arguments"}` at `field` (the inside of OpenAI's `function`, or an item of
/// a ShareGPT `function_call` value).
fn name_and_arguments(value: &Value, field: &str, id: Option<String>) -> FieldResult<ToolCall> {
    let obj = value.as_object().ok_or_else(|| {
        FieldError::new(field, format!("expected a call {{\"name\", \"arguments\"}}, found {}", kind_name(value)))
    })?;
    let name = required_string(obj, "name", field)?;
    if name.is_empty() {
        return Err(FieldError::new(join(field, "name"), "expected a function name, found an empty string"));
    }
    let arguments = call_arguments(obj.get("arguments"), &join(field, "arguments"))?;
    Ok(ToolCall { id, name, arguments })
}

/// A ShareGPT `function_call` value: JSON text of one call `{"name", "arguments"}` or a list of
/// them (parallel calls), as LLaMA-Factory writes it.
fn sharegpt_calls(text: &str, field: &str) -> FieldResult<Vec<ToolCall>> {
    let value = parse_json_string(text, field, "a function call {\"name\", \"arguments\"} (or a list of them)")?;
    let calls = match &value {
        Value::Array(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| name_and_arguments(item, &format!("{field}[{i}]"), None))
            .collect::<FieldResult<Vec<_>>>()?,
        _ => vec![name_and_arguments(&value, field, None)?],
    };
    if calls.is_empty() {
        return Err(FieldError::new(field, "expected at least one function call, found an empty list"));
    }
    Ok(calls)
}

/// OpenAI `tool_calls`: `[{"id"?, "type": "function", "function": {"name", "arguments"}}]`,
/// arguments a JSON string or an object.
fn openai_calls(value: &Value, field: &str) -> FieldResult<Vec<ToolCall>> {
    let items = value
        .as_array()
        .ok_or_else(|| FieldError::new(field, format!("expected a list of tool calls, found {}", kind_name(value))))?;
    let mut calls = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let f = format!("{field}[{i}]");
        let obj = item.as_object().ok_or_else(|| {
            FieldError::new(
                &f,
                format!(
                    "expected a tool call {{\"id\", \"type\": \"function\", \"function\"}}, found {}",
                    kind_name(item)
                ),
            )
        })?;
        if let Some(kind) = optional_string(obj, "type").map_err(|e| FieldError::new(join(&f, "type"), e.message))? {
            if kind != "function" {
                return Err(FieldError::new(join(&f, "type"), format!("expected 'function', found '{kind}'")));
            }
        }
        let id = optional_string(obj, "id").map_err(|e| FieldError::new(join(&f, "id"), e.message))?;
        let function = obj.get("function").ok_or_else(|| FieldError::new(join(&f, "function"), "missing"))?;
        calls.push(name_and_arguments(function, &join(&f, "function"), id)?);
    }
    Ok(calls)
}

/// A single turn object (`{"from", "value"}` or `{"role", "content"}`) at `field`. ShareGPT
/// `function_call` turns hold their calls as JSON text in `value`; OpenAI assistant messages may
/// carry `tool_calls` (their `content` may then be null or missing) and tool messages a
/// `tool_call_id`.
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
    let content_field = join(field, content_key);
    let calls_value = match obj.get("tool_calls") {
        Some(Value::Null) | None => None,
        Some(v) if dialect == Dialect::OpenAi => Some(v),
        Some(_) => None,
    };
    let mut t = Turn::text(role, String::new(), role_field, dialect);
    match (dialect, raw_role.as_str()) {
        (Dialect::ShareGpt, "function_call") => {
            t.tool_calls = sharegpt_calls(&required_string(obj, content_key, field)?, &content_field)?;
        }
        (Dialect::OpenAi, "assistant") if calls_value.is_some() => {
            let tool_calls_field = join(field, "tool_calls");
            t.tool_calls = openai_calls(calls_value.unwrap_or(&Value::Null), &tool_calls_field)?;
            t.content = optional_string(obj, content_key)
                .map_err(|e| FieldError::new(&content_field, e.message))?
                .unwrap_or_default();
        }
        _ => {
            if calls_value.is_some_and(|v| v.as_array().is_none_or(|calls| !calls.is_empty())) {
                return Err(FieldError::new(
                    join(field, "tool_calls"),
                    format!("expected tool calls on assistant messages only, found them on a '{raw_role}' message"),
                ));
            }
            t.content = required_string(obj, content_key, field)?;
        }
    }
    if dialect == Dialect::OpenAi && role == Role::Tool {
        t.tool_call_id = optional_string(obj, "tool_call_id")
            .map_err(|e| FieldError::new(join(field, "tool_call_id"), e.message))?;
    }
    Ok(t)
}

/// A list of turns (`value` must be an array) at `field`.
pub(crate) fn turns(value: &Value, field: &str, dialect: Dialect) -> FieldResult<Vec<Turn>> {
    let items = value
        .as_array()
        .ok_or_else(|| FieldError::new(field, format!("expected a list of turns, found {}", kind_name(value))))?;
    items.iter().enumerate().map(|(i, item)| turn(item, &format!("{field}[{i}]"), dialect)).collect()
}

/// A record's `tools`: a list of function schemas, or JSON text of one (LLaMA-Factory). Missing,
/// null, `""` and `[]` are no tools. A bare schema (`{"name", "description", "parameters"}`) is
/// wrapped as `{"type": "function", "function": schema}`, the form HF chat templates expect.
pub(crate) fn tools_field(obj: &Map<String, Value>) -> FieldResult<Vec<Value>> {
    let parsed;
    let list = match obj.get("tools") {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) if s.trim().is_empty() => return Ok(Vec::new()),
        Some(Value::String(s)) => {
            parsed = parse_json_string(s, "tools", "a list of function schemas")?;
            &parsed
        }
        Some(v) => v,
    };
    let items = list.as_array().ok_or_else(|| {
        FieldError::new("tools", format!("expected a list of function schemas, found {}", kind_name(list)))
    })?;
    items
        .iter()
        .enumerate()
        .map(|(i, item)| {
            let f = format!("tools[{i}]");
            let obj = item.as_object();
            let wrapped = obj.is_some_and(|o| o.get("type").and_then(Value::as_str) == Some("function"));
            let function = if wrapped { obj.and_then(|o| o.get("function")) } else { Some(item) };
            match function.and_then(Value::as_object).and_then(|f| f.get("name")) {
                Some(Value::String(name)) if !name.is_empty() => {}
                _ => {
                    return Err(FieldError::new(
                        f,
                        format!(
                            "expected a function schema {{\"name\", \"description\", \"parameters\"}} or {{\"type\": \"function\", \"function\": {{…}}}}, found {}",
                            kind_name(item)
                        ),
                    ))
                }
            }
            Ok(if wrapped { item.clone() } else { serde_json::json!({"type": "function", "function": item}) })
        })
        .collect()
}

/// A prompt/answer field that is either a string (one turn of `role_if_string`) or a list of
/// OpenAI messages.
pub(crate) fn string_or_messages(value: &Value, field: &str, role_if_string: Role) -> FieldResult<Vec<Turn>> {
    match value {
        Value::String(s) => Ok(vec![Turn::text(role_if_string, s.clone(), field, Dialect::OpenAi)]),
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
/// the last turn as `last` requires. `field` names the whole list in messages. A complete
/// conversation (`LastTurn::Assistant`, SFT) may hold tool turns: an assistant turn with tool
/// calls is followed by one result per call (at most), then by an assistant turn; prompts refuse
/// them.
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
    let allow_tools = last == LastTurn::Assistant;
    for (i, t) in turns.iter().enumerate() {
        if t.role == Role::System {
            return Err(FieldError::new(&t.role_field, "a system turn is only allowed as the first turn"));
        }
        if t.is_tool_turn() && !allow_tools {
            return Err(tools_only_for_sft(t));
        }
        let prev = i.checked_sub(1).map(|j| &turns[j]);
        let d = t.dialect;
        match (prev, t.role) {
            (_, Role::Tool) => {
                check_tool_result(&turns[..i], t)?;
                continue;
            }
            (Some(p), Role::Assistant) if p.role == Role::Tool => continue,
            (Some(p), _) if !p.tool_calls.is_empty() => {
                return Err(FieldError::new(
                    &t.role_field,
                    format!(
                        "expected '{}' (the result of the tool call in '{}'), found '{}'",
                        d.name(Role::Tool),
                        p.role_field,
                        t.role_name()
                    ),
                ));
            }
            (Some(p), _) if p.role == Role::Tool => {
                return Err(FieldError::new(
                    &t.role_field,
                    format!("expected '{}' after the tool results, found '{}'", d.name(Role::Assistant), t.role_name()),
                ));
            }
            _ => {}
        }
        let expected = match prev {
            Some(p) if p.role == Role::User => Role::Assistant,
            _ => Role::User,
        };
        if t.role != expected {
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

/// A tool result must follow the assistant turn that made the call (or another result of the
/// same turn), there may be no more results than calls, and a `tool_call_id` must name one of
/// the calls when the calls have ids.
fn check_tool_result(before: &[Turn], t: &Turn) -> FieldResult<()> {
    let results_before = before.iter().rev().take_while(|b| b.role == Role::Tool).count();
    let d = t.dialect;
    let caller = match before.len().checked_sub(results_before + 1).map(|j| &before[j]) {
        Some(c) if !c.tool_calls.is_empty() => c,
        Some(c) => {
            return Err(FieldError::new(
                &t.role_field,
                format!(
                    "a tool result ('{}') must follow a tool call ('{}'), found one after '{}'",
                    d.name(Role::Tool),
                    d.call_name(),
                    c.role_name()
                ),
            ));
        }
        None => {
            return Err(FieldError::new(
                &t.role_field,
                format!(
                    "a tool result ('{}') must follow a tool call ('{}'), found one with no call before it",
                    d.name(Role::Tool),
                    d.call_name()
                ),
            ));
        }
    };
    if results_before + 1 > caller.tool_calls.len() {
        return Err(FieldError::new(
            &t.role_field,
            format!(
                "expected at most {} tool results for the calls of '{}', found {}",
                caller.tool_calls.len(),
                caller.role_field,
                results_before + 1
            ),
        ));
    }
    if let Some(id) = &t.tool_call_id {
        let ids: Vec<&str> = caller.tool_calls.iter().filter_map(|c| c.id.as_deref()).collect();
        if !ids.is_empty() && !ids.contains(&id.as_str()) {
            let turn_field = t.role_field.rsplit_once('.').map_or(t.role_field.as_str(), |(a, _)| a);
            return Err(FieldError::new(
                join(turn_field, "tool_call_id"),
                format!("expected the id of a call in '{}' ({}), found '{id}'", caller.role_field, ids.join(", ")),
            ));
        }
    }
    Ok(())
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
            out.push(Turn::text(role, as_string(&pair[j], &f)?, f, Dialect::ShareGpt));
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
    Ok(Turn::text(Role::User, content, "instruction", Dialect::OpenAi))
}

/// The Alpaca prompt turns: `history` pairs, then the instruction (+ input).
pub(crate) fn alpaca_prompt_turns(obj: &Map<String, Value>) -> FieldResult<Vec<Turn>> {
    let mut turns = history_turns(obj)?;
    turns.push(alpaca_user_turn(obj)?);
    Ok(turns)
}

/// A plain assistant turn from a string field.
pub(crate) fn assistant_turn(content: String, field: &str) -> Turn {
    Turn::text(Role::Assistant, content, field, Dialect::OpenAi)
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
