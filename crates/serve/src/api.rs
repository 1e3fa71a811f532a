//! The OpenAI request bodies `align serve` accepts, read field by field: a wrong type, a value
//! out of range or a field this server would ignore is a 400 naming the field; errors are
//! OpenAI's error objects.
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

/// An error answered to the client as `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
    pub kind: &'static str,
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param: (!param.is_empty()).then(|| param.to_string()),
            code: None,
        }
    }

    pub fn new(status: StatusCode, kind: &'static str, code: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError { status, message: message.into(), kind, param: None, code }
    }

    pub fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub type ApiResult<T> = std::result::Result<T, ApiError>;

/// Sampling and output options both endpoints share.
#[derive(Debug, Clone)]
pub struct Common {
    pub model: String,
    /// None: as many as the context leaves.
    pub max_tokens: Option<usize>,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub repetition_penalty: Option<f64>,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub logit_bias: Vec<(i64, f64)>,
    pub n: usize,
    pub stop: Vec<String>,
    pub seed: Option<u64>,
    pub stream: bool,
    pub include_usage: bool,
}

/// A chat completion request.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    pub common: Common,
    /// (role, content) in order.
    pub messages: Vec<(String, String)>,
    /// Some(k): log-probabilities with k alternatives.
    pub logprobs: Option<usize>,
}

/// What a completion request's `prompt` holds.
#[derive(Debug, Clone)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<i64>),
}

/// A (legacy) completion request.
#[derive(Debug, Clone)]
pub struct CompletionRequest {
    pub common: Common,
    pub prompts: Vec<Prompt>,
    pub logprobs: Option<usize>,
    pub echo: bool,
}

/// Most choices one request may ask for.
pub const MAX_N: usize = 16;
/// Most alternatives per token.
pub const MAX_TOP_LOGPROBS: usize = 20;

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Reads a body's fields, remembering which were read so that any other is refused.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    known: Vec<&'static str>,
}

impl<'a> Fields<'a> {
    fn get(&mut self, k: &'static str) -> Option<&'a Value> {
        self.known.push(k);
        self.obj.get(k).filter(|v| !v.is_null())
    }

    fn number(&mut self, k: &'static str, lo: f64, hi: f64) -> ApiResult<Option<f64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if !(x >= lo && x <= hi) {
                    return Err(ApiError::invalid(k, format!("'{k}': expected a number in [{lo}, {hi}], found {x}")));
                }
                Ok(Some(x))
            }
            Some(v) => Err(ApiError::invalid(k, format!("'{k}': expected a number, found {}", type_name(v)))),
        }
    }

    fn integer(&mut self, k: &'static str, lo: i64, hi: i64) -> ApiResult<Option<i64>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Number(n)) if n.as_i64().is_some() => {
                let x = n.as_i64().unwrap_or(0);
                if x < lo || x > hi {
                    return Err(ApiError::invalid(k, format!("'{k}': expected an integer in [{lo}, {hi}], found {x}")));
                }
                Ok(Some(x))
            }
            Some(v) => Err(ApiError::invalid(k, format!("'{k}': expected an integer, found {}", type_name(v)))),
        }
    }

    fn boolean(&mut self, k: &'static str) -> ApiResult<Option<bool>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(ApiError::invalid(k, format!("'{k}': expected a boolean, found {}", type_name(v)))),
        }
    }

    fn string(&mut self, k: &'static str) -> ApiResult<Option<&'a str>> {
        match self.get(k) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(v) => Err(ApiError::invalid(k, format!("'{k}': expected a string, found {}", type_name(v)))),
        }
    }

    /// Refuses what this server would ignore; `unsupported` get a message of their own.
    fn finish(&self, unsupported: &[(&str, &str)]) -> ApiResult<()> {
        for (k, v) in self.obj {
            if v.is_null() || self.known.contains(&k.as_str()) {
                continue;
            }
            if let Some((_, why)) = unsupported.iter().find(|(u, _)| u == k) {
                return Err(ApiError::invalid(k, format!("'{k}': {why}")));
            }
            return Err(ApiError::invalid(k, format!("'{k}': not a field this server reads")));
        }
        Ok(())
    }

    fn common(&mut self, default_max_tokens: Option<usize>) -> ApiResult<Common> {
        let model = self
            .string("model")?
            .ok_or_else(|| ApiError::invalid("model", "'model': required (GET /v1/models lists the served models)"))?
            .to_string();
        let max_tokens =
            match (self.integer("max_tokens", 0, i64::MAX)?, self.integer("max_completion_tokens", 0, i64::MAX)?) {
                (Some(a), Some(b)) if a != b => {
                    return Err(ApiError::invalid("max_tokens", "'max_tokens' and 'max_completion_tokens' differ"))
                }
                (Some(a), _) | (None, Some(a)) => Some(a as usize),
                (None, None) => default_max_tokens,
            };
        let temperature = self.number("temperature", 0.0, 2.0)?.unwrap_or(1.0);
        let top_p = self.number("top_p", 0.0, 1.0)?;
        if top_p == Some(0.0) {
            return Err(ApiError::invalid("top_p", "'top_p': expected a number in (0, 1], found 0"));
        }
        let top_k = self.integer("top_k", -1, i64::MAX)?.filter(|&k| k > 0);
        let repetition_penalty = self.number("repetition_penalty", 0.0, 100.0)?;
        if repetition_penalty == Some(0.0) {
            return Err(ApiError::invalid(
                "repetition_penalty",
                "'repetition_penalty': expected a number > 0, found 0",
            ));
        }
        let presence_penalty = self.number("presence_penalty", -2.0, 2.0)?.unwrap_or(0.0);
        let frequency_penalty = self.number("frequency_penalty", -2.0, 2.0)?.unwrap_or(0.0);
        let mut logit_bias = Vec::new();
        match self.get("logit_bias") {
            None => {}
            Some(Value::Object(m)) => {
                for (k, v) in m {
                    let id: i64 = k.parse().map_err(|_| {
                        ApiError::invalid("logit_bias", format!("'logit_bias': key {k:?} is not a token id"))
                    })?;
                    let b = v.as_f64().filter(|b| (-100.0..=100.0).contains(b)).ok_or_else(|| {
                        ApiError::invalid(
                            "logit_bias",
                            format!("'logit_bias': value of {k}: expected a number in [-100, 100]"),
                        )
                    })?;
                    logit_bias.push((id, b));
                }
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    "logit_bias",
                    format!("'logit_bias': expected an object, found {}", type_name(v)),
                ))
            }
        }
        let n = self.integer("n", 1, MAX_N as i64)?.unwrap_or(1) as usize;
        let stop = match self.get("stop") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) => {
                let mut out = Vec::new();
                for (i, s) in a.iter().enumerate() {
                    match s {
                        Value::String(s) if !s.is_empty() => out.push(s.clone()),
                        other => {
                            return Err(ApiError::invalid(
                                "stop",
                                format!("'stop'[{i}]: expected a non-empty string, found {}", type_name(other)),
                            ))
                        }
                    }
                }
                if out.len() > 4 {
                    return Err(ApiError::invalid("stop", format!("'stop': at most 4 sequences, found {}", out.len())));
                }
                out
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    "stop",
                    format!("'stop': expected a string or an array of strings, found {}", type_name(v)),
                ))
            }
        };
        if stop.iter().any(String::is_empty) {
            return Err(ApiError::invalid("stop", "'stop': an empty string"));
        }
        let seed = self.integer("seed", i64::MIN, i64::MAX)?.map(|s| s as u64);
        let stream = self.boolean("stream")?.unwrap_or(false);
        let include_usage = match self.get("stream_options") {
            None => false,
            Some(Value::Object(o)) => {
                for k in o.keys() {
                    if k != "include_usage" {
                        return Err(ApiError::invalid(
                            "stream_options",
                            format!("'stream_options.{k}': not a field this server reads"),
                        ));
                    }
                }
                if !stream {
                    return Err(ApiError::invalid("stream_options", "'stream_options': only with 'stream': true"));
                }
                match o.get("include_usage") {
                    None | Some(Value::Null) => false,
                    Some(Value::Bool(b)) => *b,
                    Some(v) => {
                        return Err(ApiError::invalid(
                            "stream_options",
                            format!("'stream_options.include_usage': expected a boolean, found {}", type_name(v)),
                        ))
                    }
                }
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    "stream_options",
                    format!("'stream_options': expected an object, found {}", type_name(v)),
                ))
            }
        };
        // metadata a client may send that changes nothing
        let _ = self.string("user")?;
        Ok(Common {
            model,
            max_tokens,
            temperature,
            top_p,
            top_k,
            repetition_penalty,
            presence_penalty,
            frequency_penalty,
            logit_bias,
            n,
            stop,
            seed,
            stream,
            include_usage,
        })
    }
}

/// Parses a request body: valid UTF-8, JSON, an object.
pub fn body_object(body: &[u8]) -> ApiResult<Map<String, Value>> {
    let text = std::str::from_utf8(body).map_err(|e| {
        ApiError::invalid("", format!("the request body is not valid UTF-8 (byte {})", e.valid_up_to()))
    })?;
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(o)) => Ok(o),
        Ok(v) => Err(ApiError::invalid("", format!("the request body must be a JSON object, found {}", type_name(&v)))),
        Err(e) => Err(ApiError::invalid("", format!("the request body is not valid JSON: {e}"))),
    }
}

const NO_TOOLS: &str = "tools and function calling are not supported by this server";

/// Reads a `POST /v1/chat/completions` body.
pub fn chat_request(obj: &Map<String, Value>) -> ApiResult<ChatRequest> {
    let mut f = Fields { obj, known: Vec::new() };
    let messages = match f.get("messages") {
        Some(Value::Array(a)) if !a.is_empty() => a,
        Some(Value::Array(_)) => return Err(ApiError::invalid("messages", "'messages': empty (at least one message)")),
        Some(v) => {
            return Err(ApiError::invalid("messages", format!("'messages': expected an array, found {}", type_name(v))))
        }
        None => return Err(ApiError::invalid("messages", "'messages': required")),
    };
    let mut out = Vec::with_capacity(messages.len());
    for (i, m) in messages.iter().enumerate() {
        let at = format!("messages[{i}]");
        let Value::Object(m) = m else {
            return Err(ApiError::invalid("messages", format!("'{at}': expected an object, found {}", type_name(m))));
        };
        let role = match m.get("role") {
            Some(Value::String(r)) => match r.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::invalid(
                        "messages",
                        format!("'{at}.role': {other:?} is not system, developer, user or assistant"),
                    ))
                }
            },
            Some(v) => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("'{at}.role': expected a string, found {}", type_name(v)),
                ))
            }
            None => return Err(ApiError::invalid("messages", format!("'{at}.role': required"))),
        };
        let content = match m.get("content") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(parts)) => {
                let mut s = String::new();
                for (j, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => s.push_str(t),
                        _ => {
                            return Err(ApiError::invalid(
                                "messages",
                                format!(
                                    "'{at}.content'[{j}]: only {{\"type\": \"text\", \"text\": …}} parts are supported"
                                ),
                            ))
                        }
                    }
                }
                s
            }
            Some(v) => {
                return Err(ApiError::invalid(
                    "messages",
                    format!("'{at}.content': expected a string or an array of text parts, found {}", type_name(v)),
                ))
            }
            None => return Err(ApiError::invalid("messages", format!("'{at}.content': required"))),
        };
        for k in m.keys() {
            if !matches!(k.as_str(), "role" | "content" | "name") {
                return Err(ApiError::invalid("messages", format!("'{at}.{k}': not a field this server reads")));
            }
        }
        out.push((role.to_string(), content));
    }
    let common = f.common(None)?;
    let logprobs = f.boolean("logprobs")?.unwrap_or(false);
    let top = f.integer("top_logprobs", 0, MAX_TOP_LOGPROBS as i64)?;
    if top.is_some() && !logprobs {
        return Err(ApiError::invalid("top_logprobs", "'top_logprobs': only with 'logprobs': true"));
    }
    match f.get("response_format") {
        None => {}
        Some(v) if v.get("type").and_then(Value::as_str) == Some("text") => {}
        Some(_) => {
            return Err(ApiError::invalid(
                "response_format",
                "'response_format': only {\"type\": \"text\"} is supported",
            ))
        }
    }
    f.finish(&[
        ("tools", NO_TOOLS),
        ("tool_choice", NO_TOOLS),
        ("functions", NO_TOOLS),
        ("function_call", NO_TOOLS),
        ("parallel_tool_calls", NO_TOOLS),
        ("audio", "audio output is not supported"),
        ("modalities", "only text is supported"),
    ])?;
    Ok(ChatRequest { common, messages: out, logprobs: logprobs.then(|| top.unwrap_or(0) as usize) })
}

/// Reads a `POST /v1/completions` body.
pub fn completion_request(obj: &Map<String, Value>) -> ApiResult<CompletionRequest> {
    let mut f = Fields { obj, known: Vec::new() };
    let bad = |what: String| ApiError::invalid("prompt", what);
    let token = |v: &Value, at: &str| -> ApiResult<i64> {
        v.as_i64()
            .filter(|&t| t >= 0)
            .ok_or_else(|| bad(format!("'{at}': expected a token id (an integer ≥ 0), found {v}")))
    };
    let prompts = match f.get("prompt") {
        None => return Err(bad("'prompt': required".into())),
        Some(Value::String(s)) => vec![Prompt::Text(s.clone())],
        Some(Value::Array(a)) if a.is_empty() => return Err(bad("'prompt': empty".into())),
        Some(Value::Array(a)) => match &a[0] {
            Value::Number(_) => vec![Prompt::Tokens(
                a.iter().enumerate().map(|(i, v)| token(v, &format!("prompt[{i}]"))).collect::<ApiResult<_>>()?,
            )],
            _ => {
                let mut out = Vec::with_capacity(a.len());
                for (i, p) in a.iter().enumerate() {
                    out.push(match p {
                        Value::String(s) => Prompt::Text(s.clone()),
                        Value::Array(t) => Prompt::Tokens(
                            t.iter()
                                .enumerate()
                                .map(|(j, v)| token(v, &format!("prompt[{i}][{j}]")))
                                .collect::<ApiResult<_>>()?,
                        ),
                        v => {
                            return Err(bad(format!(
                                "'prompt'[{i}]: expected a string or an array of token ids, found {}",
                                type_name(v)
                            )))
                        }
                    });
                }
                out
            }
        },
        Some(v) => {
            return Err(bad(format!(
                "'prompt': expected a string, an array of strings or of token ids, found {}",
                type_name(v)
            )))
        }
    };
    if prompts.len() > 64 {
        return Err(bad(format!("'prompt': at most 64 prompts per request, found {}", prompts.len())));
    }
    // OpenAI's default for completions
    let common = f.common(Some(16))?;
    let logprobs = f.integer("logprobs", 0, MAX_TOP_LOGPROBS as i64)?.map(|k| k as usize);
    let echo = f.boolean("echo")?.unwrap_or(false);
    if let Some(b) = f.integer("best_of", 1, MAX_N as i64)? {
        if b as usize != common.n {
            return Err(ApiError::invalid("best_of", "'best_of': only equal to 'n' (no ranking of choices)"));
        }
    }
    if echo && common.stream && logprobs.is_some() {
        return Err(ApiError::invalid("echo", "'echo' with 'logprobs' is answered without 'stream'"));
    }
    f.finish(&[("suffix", "insertion (suffix) is not supported")])?;
    Ok(CompletionRequest { common, prompts, logprobs, echo })
}
