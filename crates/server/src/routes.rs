//! The HTTP routes and the OpenAI response shapes.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;
use tpserve_coordinator::{Event, FinishReason, Logprob, Summary};
use tpserve_model::chat;

use crate::error::ApiError;
use crate::openai::{logprobs_count, ChatRequest, CompletionRequest, Prompt, Sampling};
use crate::AppState;

type St = State<Arc<AppState>>;

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .with_state(state)
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn auth(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.opts.api_key else { return Ok(()) };
    let given = headers.get(axum::http::header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    if given == Some(key.as_str()) {
        Ok(())
    } else {
        Err(ApiError::unauthorized())
    }
}

async fn ready(State(state): St) -> Response {
    let st = state.status();
    let fresh = st.last_ok.is_some_and(|t| t.elapsed() <= state.opts.ready_within);
    let (code, why) = if st.draining {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down".to_string())
    } else if st.loading {
        (StatusCode::SERVICE_UNAVAILABLE, "loading".to_string())
    } else if let Some(f) = st.failed {
        (StatusCode::SERVICE_UNAVAILABLE, f)
    } else if !fresh {
        (StatusCode::SERVICE_UNAVAILABLE, "no step has succeeded recently".to_string())
    } else {
        (StatusCode::OK, String::new())
    };
    metrics::gauge!("tpserve_ready").set(if code == StatusCode::OK { 1.0 } else { 0.0 });
    (code, Json(json!({ "ready": code == StatusCode::OK, "reason": why }))).into_response()
}

async fn metrics(State(state): St) -> Response {
    state.prometheus.run_upkeep();
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response()
}

async fn models(State(state): St, headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    auth(&state, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{ "id": state.model.name, "object": "model", "created": 0, "owned_by": "tpserve", "max_model_len": state.limits.context_len }],
    })))
}

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        let what = if e.is_syntax() || e.is_eof() { "the body is not valid JSON" } else { "the request does not have the expected fields" };
        ApiError::invalid(None, format!("{what}: {e}"))
    })
}

fn check_model(state: &AppState, c: &Sampling) -> Result<(), ApiError> {
    match &c.model {
        Some(m) if m != &state.model.name => Err(ApiError::model_not_found(m)),
        _ => Ok(()),
    }
}

/// The text of one token for log-probability listings.
fn token_text(state: &AppState, id: u32) -> String {
    state.model.tokenizer.decode(&[id])
}

#[derive(Clone)]
struct Ids {
    id: String,
    created: u64,
    model: String,
}

impl Ids {
    fn new(state: &AppState, prefix: &str) -> Self {
        Ids { id: format!("{prefix}-{}", state.next_id.fetch_add(1, Ordering::Relaxed)), created: now_s(), model: state.model.name.clone() }
    }
}

fn finish_str(f: FinishReason) -> &'static str {
    match f {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Cancelled => "abort",
    }
}

fn usage(s: &Summary) -> Value {
    json!({
        "prompt_tokens": s.prompt_tokens,
        "completion_tokens": s.completion_tokens,
        "total_tokens": s.prompt_tokens + s.completion_tokens,
        "prompt_tokens_details": { "cached_tokens": s.cached_tokens },
    })
}

/// Log-probabilities in the completions format, accumulated.
#[derive(Default)]
struct CompletionLogprobs {
    tokens: Vec<String>,
    token_logprobs: Vec<Option<f32>>,
    top: Vec<Option<Value>>,
    offsets: Vec<usize>,
    offset: usize,
}

impl CompletionLogprobs {
    fn push(&mut self, state: &AppState, lp: Option<&Logprob>, id: u32) {
        let text = token_text(state, id);
        self.offsets.push(self.offset);
        self.offset += text.len();
        self.tokens.push(text);
        self.token_logprobs.push(lp.and_then(|l| l.logprob));
        self.top.push(lp.map(|l| Value::Object(l.top.iter().map(|&(t, v)| (token_text(state, t), json!(v))).collect())));
    }

    fn take(&mut self) -> Value {
        let v = json!({ "tokens": self.tokens, "token_logprobs": self.token_logprobs, "top_logprobs": self.top, "text_offset": self.offsets });
        let offset = self.offset;
        *self = Self { offset, ..Self::default() };
        v
    }
}

fn chat_logprob(state: &AppState, l: &Logprob) -> Value {
    let entry = |id: u32, lp: Option<f32>| {
        let t = token_text(state, id);
        json!({ "token": t, "logprob": lp, "bytes": t.as_bytes() })
    };
    let mut e = entry(l.id, l.logprob);
    e["top_logprobs"] = Value::Array(l.top.iter().map(|&(id, v)| entry(id, Some(v))).collect());
    e
}

async fn completions(State(state): St, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    auth(&state, &headers)?;
    let r: CompletionRequest = parse(&body)?;
    check_model(&state, &r.common)?;
    let tok = &state.model.tokenizer;
    let (ids, text) = match r.prompt()? {
        Prompt::Text(t) => (tok.encode(&t, true, true), t),
        Prompt::Ids(ids) => {
            let vocab = tok.vocab_size().min(state.model.vocab);
            if let Some(&bad) = ids.iter().find(|&&i| i as usize >= vocab) {
                return Err(ApiError::invalid(Some("prompt"), format!("token id {bad} is outside the vocabulary ({vocab} tokens)")));
            }
            let t = tok.decode(&ids);
            (ids, t)
        }
    };
    if text.is_empty() && !ids.iter().any(|&i| Some(i) != tok.bos_id()) {
        return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
    }
    let mut req = r.common.to_request(ids, state.limits, Some(16), "prompt")?;
    let logprobs = logprobs_count(r.logprobs, "logprobs")?;
    req.logprobs = logprobs;
    req.prompt_logprobs = (r.echo && logprobs.is_some()).then_some(0);
    let prompt_ids = req.prompt_ids.clone();
    let rx = state.submit(req).await?;
    let ids = Ids::new(&state, "cmpl");
    let echo = r.echo.then_some(text);
    if r.common.stream {
        return Ok(sse(completion_stream(state, rx, ids, echo, prompt_ids, logprobs.is_some(), r.common.include_usage())));
    }
    let (mut text, mut lps, summary) = (echo.unwrap_or_default(), CompletionLogprobs::default(), None::<Summary>);
    let mut rx = rx;
    let mut summary = summary;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Prompt(p) => {
                for (lp, &id) in p.iter().zip(&prompt_ids) {
                    lps.push(&state, lp.as_ref(), id);
                }
            }
            Event::Delta { text: t, tokens } => {
                text.push_str(&t);
                for lp in &tokens {
                    lps.push(&state, Some(lp), lp.id);
                }
            }
            Event::Done(s) => {
                summary = Some(s);
                break;
            }
            Event::Error(e) => return Err(ApiError::unavailable(e)),
        }
    }
    let s = summary.ok_or_else(|| ApiError::unavailable("the engine stopped before the request finished"))?;
    let logprobs = if logprobs.is_some() { lps.take() } else { Value::Null };
    Ok(Json(json!({
        "id": ids.id, "object": "text_completion", "created": ids.created, "model": ids.model,
        "choices": [{ "index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish_str(s.finish_reason) }],
        "usage": usage(&s),
    }))
    .into_response())
}

async fn chat_completions(State(state): St, headers: HeaderMap, body: Bytes) -> Result<Response, ApiError> {
    auth(&state, &headers)?;
    let r: ChatRequest = parse(&body)?;
    check_model(&state, &r.common)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty"));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for m in &r.messages {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::invalid(Some("messages"), format!("unknown role {:?} (system, user or assistant)", m.role)));
        }
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        messages.push(chat::Message { role, content: m.text()? });
    }
    let tok = &state.model.tokenizer;
    let piece = |id: Option<u32>| id.and_then(|i| tok.token_str(i)).unwrap_or("").to_owned();
    let text = chat::render(&state.model.chat_template, &messages, &piece(tok.bos_id()), &piece(tok.eos_id()), true)
        .map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    let ids = tok.encode(&text, false, true);
    let mut req = r.common.to_request(ids, state.limits, None, "messages")?;
    let top = logprobs_count(r.top_logprobs, "top_logprobs")?;
    if top.is_some() && !r.logprobs {
        return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true"));
    }
    req.logprobs = r.logprobs.then_some(top.unwrap_or(0));
    let rx = state.submit(req).await?;
    let ids = Ids::new(&state, "chatcmpl");
    if r.common.stream {
        return Ok(sse(chat_stream(state, rx, ids, r.logprobs, r.common.include_usage())));
    }
    let (mut text, mut content_lp) = (String::new(), Vec::new());
    let mut rx = rx;
    let mut summary = None;
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Delta { text: t, tokens } => {
                text.push_str(&t);
                content_lp.extend(tokens.iter().map(|l| chat_logprob(&state, l)));
            }
            Event::Done(s) => {
                summary = Some(s);
                break;
            }
            Event::Error(e) => return Err(ApiError::unavailable(e)),
            Event::Prompt(_) => {}
        }
    }
    let s = summary.ok_or_else(|| ApiError::unavailable("the engine stopped before the request finished"))?;
    let logprobs = if r.logprobs { json!({ "content": content_lp }) } else { Value::Null };
    Ok(Json(json!({
        "id": ids.id, "object": "chat.completion", "created": ids.created, "model": ids.model,
        "choices": [{ "index": 0, "message": { "role": "assistant", "content": text }, "logprobs": logprobs, "finish_reason": finish_str(s.finish_reason) }],
        "usage": usage(&s),
    }))
    .into_response())
}

fn sse(stream: impl futures::Stream<Item = Value> + Send + 'static) -> Response {
    let events = stream.map(|v| Ok::<_, Infallible>(Sse::default().data(v.to_string()))).chain(futures::stream::once(async { Ok(Sse::default().data("[DONE]")) }));
    axum::response::Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

/// What every chunk of one stream shares: id, object, creation time, model.
#[derive(Clone)]
struct Envelope {
    ids: Ids,
    object: &'static str,
    include_usage: bool,
}

impl Envelope {
    /// A chunk with one choice. With `include_usage`, OpenAI sends `"usage": null` on every
    /// chunk but the last.
    fn chunk(&self, choice: Value) -> Value {
        let mut c = json!({ "id": self.ids.id, "object": self.object, "created": self.ids.created, "model": self.ids.model, "choices": [choice] });
        if self.include_usage {
            c["usage"] = Value::Null;
        }
        c
    }

    /// The last chunk, when `include_usage` asked for it: no choices, the usage.
    fn usage(&self, s: &Summary) -> Value {
        json!({ "id": self.ids.id, "object": self.object, "created": self.ids.created, "model": self.ids.model, "choices": [], "usage": usage(s) })
    }
}

/// Turns a request's events into chunks with `on_event`, then the usage chunk when asked
/// for. The receiver lives in the stream: when the client goes away the stream is dropped,
/// and the engine cancels the request.
fn chunks(mut rx: UnboundedReceiver<Event>, env: Envelope, mut on_event: impl FnMut(Event) -> Vec<Value> + Send + 'static) -> impl futures::Stream<Item = Value> + Send + 'static {
    async_stream(move |tx| async move {
        while let Some(ev) = rx.recv().await {
            let done = match &ev {
                Event::Done(s) => Some(s.clone()),
                _ => None,
            };
            let is_err = matches!(ev, Event::Error(_));
            for v in on_event(ev) {
                if tx.send(v).await.is_err() {
                    return;
                }
            }
            if let Some(s) = done {
                if env.include_usage {
                    let _ = tx.send(env.usage(&s)).await;
                }
                return;
            }
            if is_err {
                return;
            }
        }
    })
}

/// A stream fed by a task through a bounded channel (dropping the stream ends the task).
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = Value> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<Value>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let task = tokio::spawn(f(tx));
    let guard = AbortOnDrop(task);
    tokio_stream::wrappers::ReceiverStream::new(rx).map(move |v| {
        let _ = &guard;
        v
    })
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn error_chunk(e: &str) -> Value {
    ApiError::unavailable(e).body()
}

fn completion_stream(state: Arc<AppState>, rx: UnboundedReceiver<Event>, ids: Ids, echo: Option<String>, prompt_ids: Vec<u32>, logprobs: bool, include_usage: bool) -> impl futures::Stream<Item = Value> + Send + 'static {
    let env = Envelope { ids, object: "text_completion", include_usage };
    let chunk = {
        let env = env.clone();
        move |text: &str, lp: Value, finish: Option<&str>| env.chunk(json!({ "index": 0, "text": text, "logprobs": lp, "finish_reason": finish }))
    };
    let mut echo = echo;
    let mut lps = CompletionLogprobs::default();
    let st = state.clone();
    chunks(rx, env, move |ev| match ev {
        Event::Prompt(p) => {
            for (lp, &id) in p.iter().zip(&prompt_ids) {
                lps.push(&st, lp.as_ref(), id);
            }
            vec![chunk(&echo.take().unwrap_or_default(), if logprobs { lps.take() } else { Value::Null }, None)]
        }
        Event::Delta { text, tokens } => {
            let mut out = Vec::new();
            if let Some(e) = echo.take() {
                out.push(chunk(&e, Value::Null, None));
            }
            for lp in &tokens {
                lps.push(&st, Some(lp), lp.id);
            }
            if !text.is_empty() || !tokens.is_empty() {
                out.push(chunk(&text, if logprobs { lps.take() } else { Value::Null }, None));
            }
            out
        }
        Event::Done(s) => {
            let mut out: Vec<Value> = echo.take().map(|e| chunk(&e, Value::Null, None)).into_iter().collect();
            out.push(chunk("", Value::Null, Some(finish_str(s.finish_reason))));
            out
        }
        Event::Error(e) => vec![error_chunk(&e)],
    })
}

fn chat_stream(state: Arc<AppState>, rx: UnboundedReceiver<Event>, ids: Ids, logprobs: bool, include_usage: bool) -> impl futures::Stream<Item = Value> + Send + 'static {
    let env = Envelope { ids, object: "chat.completion.chunk", include_usage };
    let chunk = {
        let env = env.clone();
        move |delta: Value, lp: Value, finish: Option<&str>| env.chunk(json!({ "index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish }))
    };
    let mut first = true;
    chunks(rx, env, move |ev| {
        let mut out = Vec::new();
        if first && !matches!(ev, Event::Error(_)) {
            first = false;
            out.push(chunk(json!({ "role": "assistant", "content": "" }), Value::Null, None));
        }
        match ev {
            Event::Delta { text, tokens } if !text.is_empty() || !tokens.is_empty() => {
                let lp = if logprobs { json!({ "content": tokens.iter().map(|l| chat_logprob(&state, l)).collect::<Vec<_>>() }) } else { Value::Null };
                out.push(chunk(json!({ "content": text }), lp, None));
            }
            Event::Done(s) => out.push(chunk(json!({}), Value::Null, Some(finish_str(s.finish_reason)))),
            Event::Error(e) => out.push(error_chunk(&e)),
            _ => {}
        }
        out
    })
}
