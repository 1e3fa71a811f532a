//! A blocking client of an OpenAI-compatible chat endpoint (`POST /v1/chat/completions`,
//! `GET /v1/models`) over plain HTTP/1.1 on a `TcpStream`: one request per connection
//! (`Connection: close`), a body read to its `Content-Length`, chunked, or to the end. There is
//! no TLS: an `https://` URL is refused with an error saying so.
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::text::chat::ChatMessage;

/// Where the endpoint is and how to ask it.
#[derive(Debug, Clone)]
pub struct ChatEndpoint {
    /// `host:port`.
    pub authority: String,
    /// The API's path prefix, `/v1` or `/something/v1`.
    pub prefix: String,
    /// Sent as `Authorization: Bearer …` when set.
    pub api_key: Option<String>,
    pub timeout: Duration,
}

impl ChatEndpoint {
    /// `http://host[:port]` (the API under `/v1`) or `http://host[:port]/…/v1`.
    pub fn from_url(url: &str, api_key: Option<String>, timeout: Duration) -> Result<ChatEndpoint> {
        if url.starts_with("https://") {
            bail!("{url}: https is not supported (this build speaks plain HTTP only; use http://, e.g. through a local TLS-terminating proxy)");
        }
        let Some(rest) = url.strip_prefix("http://") else {
            bail!("{url}: expected an http:// URL of an OpenAI-compatible server (or a local model folder)");
        };
        let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
        if authority.is_empty() {
            bail!("{url}: no host");
        }
        let authority = if authority.contains(':') { authority.to_string() } else { format!("{authority}:80") };
        let path = path.trim_end_matches('/');
        let prefix = if path.is_empty() {
            "/v1".to_string()
        } else if path == "v1" || path.ends_with("/v1") {
            format!("/{path}")
        } else {
            format!("/{path}/v1")
        };
        Ok(ChatEndpoint { authority, prefix, api_key, timeout })
    }

    /// `http://host:port/…/v1`, for messages.
    pub fn base_url(&self) -> String {
        format!("http://{}{}", self.authority, self.prefix)
    }

    /// The first model `GET /v1/models` lists.
    pub fn first_model(&self) -> Result<String> {
        let v = self.request("GET", "/models", None)?;
        v.get("data")
            .and_then(Value::as_array)
            .and_then(|d| d.first())
            .and_then(|m| m.get("id"))
            .and_then(Value::as_str)
            .map(str::to_string)
            .ok_or_else(|| anyhow!("{}/models: no model listed in 'data' (pass --judge-model)", self.base_url()))
    }

    /// The reply of `model` to `messages`, greedy (temperature 0), at most `max_tokens` tokens.
    pub fn complete(&self, model: &str, messages: &[ChatMessage], max_tokens: usize) -> Result<String> {
        let messages: Vec<Value> = messages.iter().map(|m| json!({"role": m.role, "content": m.content})).collect();
        let body = json!({"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens});
        let v = self.request("POST", "/chat/completions", Some(&body))?;
        v.pointer("/choices/0/message/content").and_then(Value::as_str).map(str::to_string).ok_or_else(|| {
            anyhow!(
                "{}/chat/completions: the reply has no string 'choices[0].message.content': {}",
                self.base_url(),
                clip(&v.to_string())
            )
        })
    }

    fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let url = format!("{}{path}", self.base_url());
        let addr = self
            .authority
            .to_socket_addrs()
            .with_context(|| format!("{url}: cannot resolve {}", self.authority))?
            .next()
            .ok_or_else(|| anyhow!("{url}: {} resolves to no address", self.authority))?;
        let mut conn =
            TcpStream::connect_timeout(&addr, self.timeout).with_context(|| format!("{url}: cannot connect"))?;
        conn.set_read_timeout(Some(self.timeout))?;
        conn.set_write_timeout(Some(self.timeout))?;
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut head = format!(
            "{method} {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nAccept: application/json\r\n",
            self.prefix, self.authority
        );
        if body.is_some() {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n", payload.len()));
        }
        if let Some(key) = &self.api_key {
            head.push_str(&format!("Authorization: Bearer {key}\r\n"));
        }
        head.push_str("\r\n");
        conn.write_all(head.as_bytes())
            .and_then(|_| conn.write_all(payload.as_bytes()))
            .with_context(|| format!("{url}: cannot send the request"))?;
        let mut raw = Vec::new();
        conn.read_to_end(&mut raw).with_context(|| format!("{url}: no complete reply within {:?}", self.timeout))?;
        let (status, text) = parse_response(&raw).map_err(|e| anyhow!("{url}: {e}"))?;
        if !(200..300).contains(&status) {
            bail!("{url}: HTTP {status}: {}", clip(&text));
        }
        serde_json::from_str(&text).map_err(|e| anyhow!("{url}: the reply is not JSON ({e}): {}", clip(&text)))
    }
}

fn clip(text: &str) -> String {
    let t: String = text.chars().take(300).collect();
    if t.len() < text.len() {
        format!("{t}…")
    } else {
        t
    }
}

/// The status code and body (de-chunked) of a raw HTTP/1.1 response.
pub fn parse_response(raw: &[u8]) -> Result<(u16, String)> {
    let split =
        raw.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| anyhow!("the reply has no complete HTTP head"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let mut body = &raw[split + 4..];
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| anyhow!("the reply's status line is not HTTP: {:?}", head.lines().next().unwrap_or("")))?;
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    };
    let chunked = header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        loop {
            let line_end =
                body.windows(2).position(|w| w == b"\r\n").ok_or_else(|| anyhow!("a chunk size line is cut off"))?;
            let size_text = String::from_utf8_lossy(&body[..line_end]);
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| anyhow!("a chunk size is not hexadecimal: {size_text:?}"))?;
            body = &body[line_end + 2..];
            if size == 0 {
                break;
            }
            if body.len() < size {
                bail!("a chunk of {size} bytes is cut off after {}", body.len());
            }
            out.extend_from_slice(&body[..size]);
            body = body.get(size + 2..).unwrap_or(&[]);
        }
        return Ok((status, String::from_utf8_lossy(&out).into_owned()));
    }
    if let Some(n) = header("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if body.len() < n {
            bail!("the body is cut off: {} of {n} bytes", body.len());
        }
        body = &body[..n];
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_give_the_api_prefix_and_https_is_refused() {
        let t = Duration::from_secs(1);
        let e = ChatEndpoint::from_url("http://127.0.0.1:8000", None, t).unwrap();
        assert_eq!((e.authority.as_str(), e.prefix.as_str()), ("127.0.0.1:8000", "/v1"));
        assert_eq!(ChatEndpoint::from_url("http://h:1/v1/", None, t).unwrap().prefix, "/v1");
        assert_eq!(ChatEndpoint::from_url("http://h/api/v1", None, t).unwrap().authority, "h:80");
        assert_eq!(ChatEndpoint::from_url("http://h:1/api", None, t).unwrap().prefix, "/api/v1");
        let err = ChatEndpoint::from_url("https://h/v1", None, t).unwrap_err().to_string();
        assert!(err.contains("https is not supported"), "{err}");
    }

    #[test]
    fn responses_are_read_plain_sized_or_chunked() {
        let plain = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}xx";
        assert_eq!(parse_response(plain).unwrap(), (200, "{}".to_string()));
        let chunked =
            b"HTTP/1.1 400 Bad Request\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=1\r\nde\r\n0\r\n\r\n";
        assert_eq!(parse_response(chunked).unwrap(), (400, "abcde".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{}").is_err());
        assert!(parse_response(b"garbage").is_err());
    }
}
