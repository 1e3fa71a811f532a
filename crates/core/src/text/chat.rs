//! Chat templates: HF Jinja templates rendered with minijinja the way transformers'
//! `apply_chat_template` renders them (trim/lstrip blocks, Python string methods, `tojson` as
//! Python's `json.dumps`, `raise_exception`, `strftime_now`).
use anyhow::{anyhow, bail, Result};
use minijinja::value::{Kwargs, Value as JValue};
use minijinja::{Environment, Error as JError, ErrorKind};
use serde::Serialize;
use serde_json::Value;

/// One message of a conversation (`{"role": …, "content": …}`): `system`, `user`, `assistant`
/// (which may carry tool calls) or `tool` (the result of a call, with the call's id when known).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
    /// The functions an assistant message calls (empty for every other message).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// The call a `tool` message answers, when the data names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// One function call of an assistant message.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct ToolCall {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    pub name: String,
    /// The arguments, a JSON object.
    pub arguments: Value,
}

impl ChatMessage {
    pub fn new(role: &str, content: &str) -> Self {
        ChatMessage { role: role.to_string(), content: content.to_string(), tool_calls: Vec::new(), tool_call_id: None }
    }

    /// The message as HF chat templates take it (transformers' `apply_chat_template`): `role`,
    /// `content`, and `tool_calls` as `[{"id"?, "type": "function", "function": {"name",
    /// "arguments": {…}}}]` (arguments an object) or `tool_call_id` when present.
    pub fn to_template_json(&self) -> Value {
        let mut m = serde_json::Map::new();
        m.insert("role".into(), Value::String(self.role.clone()));
        m.insert("content".into(), Value::String(self.content.clone()));
        if !self.tool_calls.is_empty() {
            let calls = self
                .tool_calls
                .iter()
                .map(|c| {
                    let mut call = serde_json::Map::new();
                    if let Some(id) = &c.id {
                        call.insert("id".into(), Value::String(id.clone()));
                    }
                    call.insert("type".into(), Value::String("function".into()));
                    call.insert("function".into(), serde_json::json!({"name": c.name, "arguments": c.arguments}));
                    Value::Object(call)
                })
                .collect();
            m.insert("tool_calls".into(), Value::Array(calls));
        }
        if let Some(id) = &self.tool_call_id {
            m.insert("tool_call_id".into(), Value::String(id.clone()));
        }
        Value::Object(m)
    }
}

/// The special-token strings a template may refer to.
#[derive(Debug, Clone, Default)]
pub struct TemplateTokens {
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub pad_token: Option<String>,
    pub unk_token: Option<String>,
}

/// A compiled chat template.
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    tokens: TemplateTokens,
    /// The file the template came from (named in every error).
    origin: String,
}

const NAME: &str = "chat_template";

/// Template instructions one render may execute. HF chat templates spend about 30 per message
/// (Qwen2.5, Llama 3, SmolLM2), so this renders conversations of hundreds of thousands of
/// messages, while a template that loops without end stops within a second or two.
pub const TEMPLATE_FUEL: u64 = 20_000_000;

/// The most text one render may produce (64 MiB, some 16 million tokens).
pub const MAX_RENDERED_BYTES: usize = 64 << 20;

/// minijinja's `range()` refuses ranges of more than this many items (its own bound).
pub const MAX_RANGE_ITEMS: usize = 100_000;

impl ChatTemplate {
    /// Compiles `source`; `origin` (a file name) is used in error messages.
    pub fn new(source: &str, tokens: TemplateTokens, origin: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_fuel(Some(TEMPLATE_FUEL));
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_function("range", range);
        env.add_filter("tojson", tojson);
        env.add_template_owned(NAME, source.to_string())
            .map_err(|e| anyhow!("{origin}: chat template does not compile: {}", describe(&e)))?;
        Ok(ChatTemplate { env, source: source.to_string(), tokens, origin: origin.to_string() })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// The file the template came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Renders a conversation (any JSON messages, so tool calls etc. pass through).
    pub fn render_json(&self, messages: &[Value], add_generation_prompt: bool) -> Result<String> {
        self.render_with_tools(messages, None, add_generation_prompt)
    }

    /// Renders a conversation with tool definitions (`tools` in the template; None = no tools).
    pub fn render_with_tools(
        &self,
        messages: &[Value],
        tools: Option<&Value>,
        add_generation_prompt: bool,
    ) -> Result<String> {
        let origin = &self.origin;
        let tmpl = self.env.get_template(NAME).map_err(|e| anyhow!("{origin}: chat template: {}", describe(&e)))?;
        let ctx = minijinja::context! {
            messages => JValue::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            tools => tools.map(JValue::from_serialize).unwrap_or(JValue::from(())),
            documents => JValue::from(()),
            bos_token => self.tokens.bos_token.clone(),
            eos_token => self.tokens.eos_token.clone(),
            pad_token => self.tokens.pad_token.clone(),
            unk_token => self.tokens.unk_token.clone(),
        };
        let mut out = BoundedOutput { bytes: Vec::new(), overflowed: false };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => {}
            Err(_) if out.overflowed => bail!(
                "{origin}: chat template: the rendered text exceeds {} MiB (expected a conversation's text)",
                MAX_RENDERED_BYTES >> 20
            ),
            Err(e) if e.kind() == ErrorKind::OutOfFuel => bail!(
                "{origin}: chat template: stopped after {TEMPLATE_FUEL} template instructions{} (expected a template that renders a conversation in far fewer; a loop that does not end?)",
                e.line().map(|l| format!(" at template line {l}")).unwrap_or_default()
            ),
            Err(e) => bail!("{origin}: chat template: {}", describe(&e)),
        }
        String::from_utf8(out.bytes).map_err(|e| anyhow!("{origin}: chat template: rendered text is not UTF-8: {e}"))
    }

    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        self.render_messages(messages, &[], add_generation_prompt)
    }

    /// Renders messages (tool calls included) with the function schemas of `tools` passed to the
    /// template as `tools` (none when empty), as `apply_chat_template(messages, tools=…)`.
    pub fn render_messages(
        &self,
        messages: &[ChatMessage],
        tools: &[Value],
        add_generation_prompt: bool,
    ) -> Result<String> {
        let json: Vec<Value> = messages.iter().map(ChatMessage::to_template_json).collect();
        let tools = (!tools.is_empty()).then(|| Value::Array(tools.to_vec()));
        self.render_with_tools(&json, tools.as_ref(), add_generation_prompt)
    }
}

/// Where the text of one render goes: refuses to grow past [`MAX_RENDERED_BYTES`].
struct BoundedOutput {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for BoundedOutput {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_RENDERED_BYTES {
            self.overflowed = true;
            return Err(std::io::Error::other("rendered text too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// One line: what went wrong and the template line (minijinja's own "(in NAME:LINE)" left out).
fn describe(e: &JError) -> String {
    let mut s = match (e.kind(), e.detail()) {
        (ErrorKind::InvalidOperation, Some(detail)) => detail.to_string(),
        (kind, Some(detail)) => format!("{kind}: {detail}"),
        (kind, None) => kind.to_string(),
    };
    if let Some(line) = e.line() {
        s.push_str(&format!(" (template line {line})"));
    }
    s.replace(['\r', '\n'], " ")
}

/// minijinja's `range()`, its refusal of huge ranges said with the bound.
fn range(lower: isize, upper: Option<isize>, step: Option<isize>) -> Result<JValue, JError> {
    minijinja::functions::range(lower, upper, step).map_err(|e| match e.detail() {
        Some(d) if d.contains("too many elements") => JError::new(
            ErrorKind::InvalidOperation,
            format!("range() of more than {MAX_RANGE_ITEMS} items (expected a smaller range)"),
        ),
        _ => e,
    })
}

fn raise_exception(msg: String) -> Result<JValue, JError> {
    Err(JError::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: `json.dumps(x, ensure_ascii=False, indent=…)`.
fn tojson(value: &JValue, kwargs: Kwargs) -> Result<JValue, JError> {
    let indent: Option<usize> = kwargs.get("indent")?;
    let _: Option<bool> = kwargs.get("ensure_ascii")?;
    let _: Option<bool> = kwargs.get("sort_keys")?;
    kwargs.assert_all_used()?;
    let json =
        serde_json::to_value(value).map_err(|e| JError::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let mut out = String::new();
    python_json_dumps(&json, indent, 0, &mut out);
    Ok(JValue::from_safe_string(out))
}

/// Python's `json.dumps` layout: `", "` and `": "` separators, or newline + indent when given.
pub fn python_json_dumps(v: &Value, indent: Option<usize>, level: usize, out: &mut String) {
    let pad = |lvl: usize| indent.map(|n| format!("\n{}", " ".repeat(n * lvl)));
    match v {
        Value::Array(items) if !items.is_empty() => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                out.push_str(&pad(level + 1).unwrap_or_default());
                python_json_dumps(item, indent, level + 1, out);
            }
            out.push_str(&pad(level).unwrap_or_default());
            out.push(']');
        }
        Value::Object(map) if !map.is_empty() => {
            out.push('{');
            for (i, (k, item)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(if indent.is_some() { "," } else { ", " });
                }
                out.push_str(&pad(level + 1).unwrap_or_default());
                out.push_str(&Value::String(k.clone()).to_string());
                out.push_str(": ");
                python_json_dumps(item, indent, level + 1, out);
            }
            out.push_str(&pad(level).unwrap_or_default());
            out.push('}');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// `strftime_now(format)`: the current UTC time formatted with the common strftime codes.
fn strftime_now(format: String) -> Result<JValue, JError> {
    let secs =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0);
    Ok(JValue::from(strftime(&format, secs)))
}

/// Formats a Unix time (UTC) with `%d %m %Y %y %H %M %S %b %B %a %A %j %%`.
pub fn strftime(format: &str, unix_secs: i64) -> String {
    const MONTHS: [&str; 12] = [
        "January",
        "February",
        "March",
        "April",
        "May",
        "June",
        "July",
        "August",
        "September",
        "October",
        "November",
        "December",
    ];
    const DAYS: [&str; 7] = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"];
    let days = unix_secs.div_euclid(86400);
    let secs = unix_secs.rem_euclid(86400);
    // civil-from-days (Howard Hinnant's algorithm)
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z.rem_euclid(146097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let cum = [0, 31, 59, 90, 120, 151, 181, 212, 243, 273, 304, 334];
    let yday = cum[(m - 1) as usize] + d + i64::from(leap && m > 2);
    let weekday = (days + 3).rem_euclid(7) as usize; // 1970-01-01 was a Thursday
    let month = MONTHS[(m - 1) as usize];
    let mut out = String::new();
    let mut chars = format.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('d') => out.push_str(&format!("{d:02}")),
            Some('m') => out.push_str(&format!("{m:02}")),
            Some('Y') => out.push_str(&y.to_string()),
            Some('y') => out.push_str(&format!("{:02}", y % 100)),
            Some('H') => out.push_str(&format!("{:02}", secs / 3600)),
            Some('M') => out.push_str(&format!("{:02}", secs / 60 % 60)),
            Some('S') => out.push_str(&format!("{:02}", secs % 60)),
            Some('b') => out.push_str(&month[..3]),
            Some('B') => out.push_str(month),
            Some('a') => out.push_str(&DAYS[weekday][..3]),
            Some('A') => out.push_str(DAYS[weekday]),
            Some('j') => out.push_str(&format!("{yday:03}")),
            Some('%') => out.push('%'),
            Some(other) => {
                out.push('%');
                out.push(other);
            }
            None => out.push('%'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_dumps_matches_python_layout() {
        let v: Value = serde_json::from_str(r#"{"name":"f","args":[1,2.5,"中"],"e":{},"n":null}"#).unwrap();
        let mut s = String::new();
        python_json_dumps(&v, None, 0, &mut s);
        assert_eq!(s, r#"{"name": "f", "args": [1, 2.5, "中"], "e": {}, "n": null}"#);
        let mut s = String::new();
        python_json_dumps(&serde_json::json!({"a": [1]}), Some(2), 0, &mut s);
        assert_eq!(s, "{\n  \"a\": [\n    1\n  ]\n}");
    }

    #[test]
    fn strftime_known_dates() {
        assert_eq!(strftime("%d %b %Y", 0), "01 Jan 1970");
        // 2024-02-29 12:34:56 UTC
        assert_eq!(strftime("%Y-%m-%d %H:%M:%S %A %j", 1709210096), "2024-02-29 12:34:56 Thursday 060");
    }

    #[test]
    fn raise_exception_and_python_methods() {
        let t = ChatTemplate::new(
            "{% for m in messages %}{% if m.role not in ['user','assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}{{ m.content.strip().upper() }}{% if not loop.last %}|{% endif %}{% endfor %}",
            TemplateTokens::default(),
            "test",
        )
        .unwrap();
        let ok = t.render(&[ChatMessage::new("user", "  hi "), ChatMessage::new("assistant", "yo")], false).unwrap();
        assert_eq!(ok, "HI|YO");
        let err = t.render(&[ChatMessage::new("tool", "x")], false).unwrap_err().to_string();
        assert!(err.contains("bad role tool"), "{err}");
    }
}
