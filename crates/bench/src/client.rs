//! One streamed request, timed as the client sees it: send → each SSE chunk with text →
//! `[DONE]`. Works with `/v1/completions` and `/v1/chat/completions` of any OpenAI-compatible
//! server; the output token count comes from the final `usage` chunk when the server sends
//! one (`stream_options.include_usage`), else from the number of text chunks.

use std::time::Instant;

use futures::StreamExt;
use serde_json::{json, Value};

use crate::metrics::Record;

/// Where requests go.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's root, e.g. `http://127.0.0.1:8000` (a trailing `/` is dropped); the
    /// endpoint is appended to it.
    pub base_url: String,
    /// `/v1/completions` or `/v1/chat/completions`.
    pub endpoint: String,
    /// Sent as `model` when set (servers such as vLLM require it; tpserve does not).
    pub model: Option<String>,
    /// Sent as `Authorization: Bearer <key>` when set.
    pub api_key: Option<String>,
}

impl Target {
    /// Whether the endpoint is a chat one (its path contains `chat`): the prompt goes out as
    /// one user message and the text comes back in `delta.content`.
    pub fn is_chat(&self) -> bool {
        self.endpoint.contains("chat")
    }
}

/// One request of the workload.
#[derive(Debug, Clone, PartialEq)]
pub struct Prompt {
    /// Sent as `prompt`, or as the one user message on a chat endpoint.
    pub text: String,
    /// Its length in tokens (for the results).
    pub tokens: usize,
    /// Sent as `max_tokens`; with `ignore_eos` a server generates exactly this many.
    pub max_tokens: usize,
}

/// Sends `p` to `t`, streaming, and times it. `start` is when the run began (for the
/// record's `start`). Never fails: a failure is recorded with its kind.
pub async fn send(http: &reqwest::Client, t: &Target, p: &Prompt, ignore_eos: bool, start: Instant) -> Record {
    let mut body = if t.is_chat() { json!({ "messages": [{ "role": "user", "content": p.text }] }) } else { json!({ "prompt": p.text }) };
    body["max_tokens"] = json!(p.max_tokens);
    body["stream"] = json!(true);
    body["stream_options"] = json!({ "include_usage": true });
    body["temperature"] = json!(0);
    if ignore_eos {
        body["ignore_eos"] = json!(true);
    }
    if let Some(m) = &t.model {
        body["model"] = json!(m);
    }
    let sent = Instant::now();
    let mut rec = Record { input_tokens: p.tokens, start: (sent - start).as_secs_f64(), ..Record::default() };
    let mut req = http.post(format!("{}{}", t.base_url.trim_end_matches('/'), t.endpoint)).json(&body);
    if let Some(k) = &t.api_key {
        req = req.bearer_auth(k);
    }
    let resp = match req.send().await {
        Ok(r) => r,
        Err(e) => {
            return fail(
                rec,
                if e.is_connect() {
                    "connect".into()
                } else if e.is_timeout() {
                    "timeout".into()
                } else {
                    "request".into()
                },
            )
        }
    };
    if !resp.status().is_success() {
        return fail(rec, format!("http {}", resp.status().as_u16()));
    }
    let mut stream = resp.bytes_stream();
    let (mut buf, mut chunks, mut last, mut usage, mut done) = (Vec::new(), 0usize, None::<Instant>, None::<usize>, false);
    while let Some(piece) = stream.next().await {
        let Ok(piece) = piece else { return fail(rec, "stream".into()) };
        buf.extend_from_slice(&piece);
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let Some(data) = line.trim_end().strip_prefix("data:").map(str::trim) else { continue };
            if data == "[DONE]" {
                done = true;
                break;
            }
            let Ok(v) = serde_json::from_str::<Value>(data) else { return fail(rec, "bad chunk".into()) };
            if v.get("error").is_some() {
                return fail(rec, "error event".into());
            }
            if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                usage = Some(n as usize);
            }
            let text = if t.is_chat() { v["choices"][0]["delta"]["content"].as_str() } else { v["choices"][0]["text"].as_str() };
            if text.is_some_and(|s| !s.is_empty()) {
                let now = Instant::now();
                match last {
                    None => rec.ttft = (now - sent).as_secs_f64(),
                    Some(prev) => rec.itl.push((now - prev).as_secs_f64()),
                }
                last = Some(now);
                chunks += 1;
            }
        }
        if done {
            break;
        }
    }
    if !done {
        return fail(rec, "no [DONE]".into());
    }
    rec.e2el = last.map_or(0.0, |l| (l - sent).as_secs_f64());
    rec.output_tokens = usage.unwrap_or(chunks);
    rec
}

fn fail(mut r: Record, kind: String) -> Record {
    r.error = Some(kind);
    r
}
