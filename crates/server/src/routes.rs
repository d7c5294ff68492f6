//! The HTTP routes: each turns an OpenAI request into an engine request (through the one
//! request builder), submits it, and shapes its events into the typed responses of
//! [`crate::response`], whole or as server-sent events.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Path, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::sse::{Event as Sse, KeepAlive};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Serialize;
use serde_json::json;
use tokio::sync::mpsc::UnboundedReceiver;
use tpserve_coordinator::{Event, Logprob, Summary};
use tpserve_tokenizer::chat;

use crate::error::ApiError;
use crate::openai::{self, Prompt, Sampling};
use crate::response::{
    AssistantMessage, ChatChoice, ChatChunk, ChatChunkChoice, ChatCompletion, ChatLogprobs, ChunkUsage, Completion, CompletionChoice, CompletionLogprobs,
    Delta, Head, ModelCard, ModelList, TokenLogprob, TopLogprob, Usage, LOGPROB_FLOOR,
};
use crate::AppState;

type St = State<Arc<AppState>>;

/// The largest request body read, in bytes (axum's default, stated so that the 413 can say it).
pub(crate) const MAX_BODY_BYTES: usize = 2 << 20;

/// The largest request head (the request line and headers) we answer, in bytes; over it,
/// a 431 with an error body. (Heads past the accept loop's buffer get hyper's bare 431.)
pub(crate) const MAX_HEADER_BYTES: usize = 32 << 10;

/// The most request headers we answer; over it, a 431.
const MAX_HEADERS: usize = 100;

/// A request body read within [`crate::ServerOptions::body_timeout`], or the error to answer
/// (413 over [`MAX_BODY_BYTES`], 408 when it did not arrive in time).
struct ReadBody(Result<Bytes, ApiError>);

impl FromRequest<Arc<AppState>> for ReadBody {
    type Rejection = Infallible;

    async fn from_request(req: axum::extract::Request, state: &Arc<AppState>) -> Result<Self, Infallible> {
        let limit = state.opts.body_timeout;
        let body = match tokio::time::timeout(limit, Bytes::from_request(req, state)).await {
            Ok(Ok(b)) => Ok(b),
            Ok(Err(e)) => Err(ApiError::unreadable_body(&e, MAX_BODY_BYTES)),
            Err(_) => Err(ApiError::body_timeout(limit)),
        };
        Ok(Self(body))
    }
}

/// Answers 431 with an error body to a request whose head is over our limits.
async fn check_head(req: axum::extract::Request, next: Next) -> Response {
    let h = req.headers();
    let bytes = req.uri().to_string().len() + h.iter().map(|(k, v)| k.as_str().len() + v.len() + 4).sum::<usize>();
    if h.len() > MAX_HEADERS {
        return ApiError::headers_too_large(format!("the request has {} headers; the limit is {MAX_HEADERS}", h.len())).into_response();
    }
    if bytes > MAX_HEADER_BYTES {
        return ApiError::headers_too_large(format!("the request's headers are {bytes} bytes; the limit is {MAX_HEADER_BYTES}")).into_response();
    }
    next.run(req).await
}

pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/models/{model}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(|uri: Uri| async move { ApiError::not_found(uri.path()) })
        .method_not_allowed_fallback(|method: Method, uri: Uri| async move { ApiError::method_not_allowed(&method, uri.path()) })
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn(check_head))
        .with_state(state)
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The token of an `Authorization: Bearer <token>` header (the scheme in any case).
fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim_start())
}

/// Whether `a` equals `b`, in a time that does not depend on where they differ.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Ok when `key` is unset or the request carries it as a Bearer token, else a 401.
fn require(key: Option<&str>, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = key else { return Ok(()) };
    match bearer(headers) {
        Some(given) if same_key(given.as_bytes(), key.as_bytes()) => Ok(()),
        _ => Err(ApiError::unauthorized()),
    }
}

fn auth(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    require(state.opts.api_key.as_deref(), headers)
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

async fn metrics(State(state): St, headers: HeaderMap) -> Result<Response, ApiError> {
    require(state.opts.metrics_api_key.as_deref(), &headers)?;
    state.prometheus.run_upkeep();
    Ok(([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.prometheus.render()).into_response())
}

fn model_card(state: &AppState) -> ModelCard {
    ModelCard { id: state.model.name.clone(), object: "model", created: 0, owned_by: "tpserve", max_model_len: state.limits.context_len }
}

async fn models(State(state): St, headers: HeaderMap) -> Result<Json<ModelList>, ApiError> {
    auth(&state, &headers)?;
    Ok(Json(ModelList { object: "list", data: vec![model_card(&state)] }))
}

async fn model(State(state): St, headers: HeaderMap, Path(id): Path<String>) -> Result<Json<ModelCard>, ApiError> {
    auth(&state, &headers)?;
    if id != state.model.name {
        return Err(ApiError::model_not_found(&id));
    }
    Ok(Json(model_card(&state)))
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

/// The head every response and chunk of one request shares.
fn head(state: &AppState, prefix: &str, object: &'static str) -> Head {
    Head { id: format!("{prefix}-{}", state.next_id.fetch_add(1, Ordering::Relaxed)), object, created: now_s(), model: state.model.name.clone() }
}

/// Log-probabilities in the completions format, accumulated token by token.
#[derive(Default)]
struct CompletionLogprobsBuilder {
    lp: CompletionLogprobs,
    /// Byte offset of the next token in the whole text.
    offset: usize,
}

impl CompletionLogprobsBuilder {
    fn push(&mut self, state: &AppState, lp: Option<&Logprob>, id: u32) {
        let text = token_text(state, id);
        self.lp.text_offset.push(self.offset);
        self.offset += text.len();
        self.lp.tokens.push(text);
        // Null only where there is no prediction (an echoed prompt's first token), as OpenAI
        // answers; a token outside the reported candidates gets the floor, as in chat.
        self.lp.token_logprobs.push(lp.map(|l| l.logprob.unwrap_or(LOGPROB_FLOOR)));
        self.lp.top_logprobs.push(lp.map(|l| l.top.iter().map(|&(t, v)| (token_text(state, t), v)).collect::<BTreeMap<_, _>>()));
    }

    /// What was pushed since the last take.
    fn take(&mut self) -> CompletionLogprobs {
        std::mem::take(&mut self.lp)
    }
}

fn token_logprob(state: &AppState, l: &Logprob) -> TokenLogprob {
    let token = token_text(state, l.id);
    let top_logprobs = l
        .top
        .iter()
        .map(|&(id, logprob)| {
            let token = token_text(state, id);
            TopLogprob { bytes: token.as_bytes().to_vec(), token, logprob }
        })
        .collect();
    TokenLogprob { bytes: token.as_bytes().to_vec(), token, logprob: l.logprob.unwrap_or(LOGPROB_FLOOR), top_logprobs }
}

/// Reads `rx` to the end of the request, calling `on_event` with every event before the
/// summary.
async fn collect(mut rx: UnboundedReceiver<Event>, mut on_event: impl FnMut(Event)) -> Result<Summary, ApiError> {
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Done(s) => return Ok(s),
            Event::Error(e) => return Err(ApiError::unavailable(e)),
            ev => on_event(ev),
        }
    }
    Err(ApiError::unavailable("the engine stopped before the request finished"))
}

async fn completions(State(state): St, headers: HeaderMap, ReadBody(body): ReadBody) -> Result<Response, ApiError> {
    auth(&state, &headers)?;
    let r = openai::parse_completion(&body?)?;
    check_model(&state, &r.common)?;
    let tok = &state.model.tokenizer;
    let (ids, text) = match r.prompt(state.limits.vocab)? {
        Prompt::Text(t) => (tok.encode(&t, true, true), t),
        // Every id is in the vocabulary (checked by `prompt`).
        Prompt::Ids(ids) => (ids.clone(), tok.decode(&ids)),
    };
    if text.is_empty() && !ids.iter().any(|&i| Some(i) != tok.bos_id()) {
        return Err(ApiError::invalid(Some("prompt"), "prompt is empty"));
    }
    let mut params = r.common.params(Some(16))?;
    params.logprobs = r.logprobs;
    let logprobs = r.logprobs.is_some();
    params.prompt_logprobs = (r.echo && logprobs).then_some(0);
    let req = params.build(ids, state.limits)?;
    let prompt_ids = req.prompt_ids.clone();
    let rx = state.submit(req).await?;
    let head = head(&state, "cmpl", "text_completion");
    let echo = r.echo.then_some(text);
    if r.common.stream {
        return Ok(sse(completion_stream(state, rx, head, echo, prompt_ids, logprobs, r.common.include_usage())));
    }
    let (mut text, mut lps) = (echo.unwrap_or_default(), CompletionLogprobsBuilder::default());
    let s = collect(rx, |ev| match ev {
        Event::Prompt(p) => p.iter().zip(&prompt_ids).for_each(|(lp, &id)| lps.push(&state, lp.as_ref(), id)),
        Event::Delta { text: t, tokens } => {
            text.push_str(&t);
            tokens.iter().for_each(|lp| lps.push(&state, Some(lp), lp.id));
        }
        _ => {}
    })
    .await?;
    let choice = CompletionChoice { index: 0, text, logprobs: logprobs.then(|| lps.take()), finish_reason: Some(s.finish_reason.as_str()) };
    Ok(Json(Completion { head, choices: vec![choice], usage: ChunkUsage::Usage(Usage::from(&s)) }).into_response())
}

async fn chat_completions(State(state): St, headers: HeaderMap, ReadBody(body): ReadBody) -> Result<Response, ApiError> {
    auth(&state, &headers)?;
    let r = openai::parse_chat(&body?)?;
    check_model(&state, &r.common)?;
    if r.messages.is_empty() {
        return Err(ApiError::invalid(Some("messages"), "messages is empty"));
    }
    let mut messages = Vec::with_capacity(r.messages.len());
    for (i, m) in r.messages.iter().enumerate() {
        if !matches!(m.role.as_str(), "system" | "user" | "assistant" | "developer") {
            return Err(ApiError::invalid_at(
                format!("messages[{i}].role"),
                format!("messages[{i}].role is {:?}: the roles are system, developer, user and assistant", m.role),
            ));
        }
        let role = if m.role == "developer" { "system".to_string() } else { m.role.clone() };
        messages.push(chat::Message { role, content: m.text(i)? });
    }
    let tok = &state.model.tokenizer;
    // The template's own special tokens are special; the messages' contents are plain text.
    let ids = state.model.chat_template.encode(tok, &messages, true).map_err(|e| ApiError::invalid(Some("messages"), e.to_string()))?;
    if r.top_logprobs.is_some() && !r.logprobs {
        return Err(ApiError::invalid(Some("top_logprobs"), "top_logprobs needs logprobs: true"));
    }
    let mut params = r.common.params(None)?;
    params.logprobs = r.logprobs.then_some(r.top_logprobs.unwrap_or(0));
    params.logprobs_param = Some("top_logprobs");
    // The prompt of a chat request is its messages.
    let req = params.build(ids, state.limits).map_err(|mut e| {
        if e.param == "prompt" {
            e.param = "messages";
        }
        ApiError::from(e)
    })?;
    let rx = state.submit(req).await?;
    if r.common.stream {
        let head = head(&state, "chatcmpl", "chat.completion.chunk");
        return Ok(sse(chat_stream(state, rx, head, r.logprobs, r.common.include_usage())));
    }
    let head = head(&state, "chatcmpl", "chat.completion");
    let (mut text, mut content) = (String::new(), Vec::new());
    let s = collect(rx, |ev| {
        if let Event::Delta { text: t, tokens } = ev {
            text.push_str(&t);
            content.extend(tokens.iter().map(|l| token_logprob(&state, l)));
        }
    })
    .await?;
    let choice = ChatChoice {
        index: 0,
        message: AssistantMessage { role: "assistant", content: text, refusal: None },
        logprobs: r.logprobs.then_some(ChatLogprobs { content, refusal: None }),
        finish_reason: s.finish_reason.as_str(),
    };
    Ok(Json(ChatCompletion { head, choices: vec![choice], usage: Usage::from(&s) }).into_response())
}

/// One SSE `data:` line per chunk, then `[DONE]`.
fn sse(stream: impl futures::Stream<Item = String> + Send + 'static) -> Response {
    let events = stream.map(|v| Ok::<_, Infallible>(Sse::default().data(v))).chain(futures::stream::once(async { Ok(Sse::default().data("[DONE]")) }));
    axum::response::Sse::new(events).keep_alive(KeepAlive::default()).into_response()
}

fn to_json(v: &impl Serialize) -> String {
    serde_json::to_string(v).expect("response types always serialize")
}

/// Turns a request's events into chunks with `on_event`, then, when `include_usage` asked
/// for it, the usage chunk `usage_chunk` makes. The receiver lives in the stream: when the
/// client goes away the stream is dropped, and the engine cancels the request.
fn chunks(
    mut rx: UnboundedReceiver<Event>,
    include_usage: bool,
    usage_chunk: impl Fn(Usage) -> String + Send + 'static,
    mut on_event: impl FnMut(Event) -> Vec<String> + Send + 'static,
) -> impl futures::Stream<Item = String> + Send + 'static {
    async_stream(move |tx| async move {
        while let Some(ev) = rx.recv().await {
            let done = match &ev {
                Event::Done(s) => Some(Usage::from(s)),
                _ => None,
            };
            let is_err = matches!(ev, Event::Error(_));
            for v in on_event(ev) {
                if tx.send(v).await.is_err() {
                    return;
                }
            }
            if let Some(u) = done {
                if include_usage {
                    let _ = tx.send(usage_chunk(u)).await;
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
fn async_stream<F, Fut>(f: F) -> impl futures::Stream<Item = String> + Send + 'static
where
    F: FnOnce(tokio::sync::mpsc::Sender<String>) -> Fut,
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

fn error_chunk(e: &str) -> String {
    to_json(&ApiError::unavailable(e).body())
}

/// `usage: null` on every chunk with a choice when the client asked for usage.
fn pending_usage(include_usage: bool) -> ChunkUsage {
    if include_usage {
        ChunkUsage::Null
    } else {
        ChunkUsage::Absent
    }
}

fn completion_stream(
    state: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    head: Head,
    echo: Option<String>,
    prompt_ids: Vec<u32>,
    logprobs: bool,
    include_usage: bool,
) -> impl futures::Stream<Item = String> + Send + 'static {
    let usage_head = head.clone();
    let chunk = move |text: &str, lp: Option<CompletionLogprobs>, finish: Option<&'static str>| {
        let choice = CompletionChoice { index: 0, text: text.to_string(), logprobs: lp, finish_reason: finish };
        to_json(&Completion { head: head.clone(), choices: vec![choice], usage: pending_usage(include_usage) })
    };
    let usage_chunk = move |u: Usage| to_json(&Completion { head: usage_head.clone(), choices: Vec::new(), usage: ChunkUsage::Usage(u) });
    let mut echo = echo;
    let mut lps = CompletionLogprobsBuilder::default();
    chunks(rx, include_usage, usage_chunk, move |ev| match ev {
        Event::Prompt(p) => {
            for (lp, &id) in p.iter().zip(&prompt_ids) {
                lps.push(&state, lp.as_ref(), id);
            }
            vec![chunk(&echo.take().unwrap_or_default(), logprobs.then(|| lps.take()), None)]
        }
        Event::Delta { text, tokens } => {
            let mut out = Vec::new();
            if let Some(e) = echo.take() {
                out.push(chunk(&e, None, None));
            }
            for lp in &tokens {
                lps.push(&state, Some(lp), lp.id);
            }
            if !text.is_empty() || !tokens.is_empty() {
                out.push(chunk(&text, logprobs.then(|| lps.take()), None));
            }
            out
        }
        Event::Done(s) => {
            let mut out: Vec<String> = echo.take().map(|e| chunk(&e, None, None)).into_iter().collect();
            out.push(chunk("", None, Some(s.finish_reason.as_str())));
            out
        }
        Event::Error(e) => vec![error_chunk(&e)],
    })
}

fn chat_stream(
    state: Arc<AppState>,
    rx: UnboundedReceiver<Event>,
    head: Head,
    logprobs: bool,
    include_usage: bool,
) -> impl futures::Stream<Item = String> + Send + 'static {
    let usage_head = head.clone();
    let chunk = move |delta: Delta, lp: Option<ChatLogprobs>, finish: Option<&'static str>| {
        let choice = ChatChunkChoice { index: 0, delta, logprobs: lp, finish_reason: finish };
        to_json(&ChatChunk { head: head.clone(), choices: vec![choice], usage: pending_usage(include_usage) })
    };
    let usage_chunk = move |u: Usage| to_json(&ChatChunk { head: usage_head.clone(), choices: Vec::new(), usage: ChunkUsage::Usage(u) });
    let mut first = true;
    chunks(rx, include_usage, usage_chunk, move |ev| {
        let mut out = Vec::new();
        if first && !matches!(ev, Event::Error(_)) {
            first = false;
            out.push(chunk(Delta { role: Some("assistant"), content: Some(String::new()) }, None, None));
        }
        match ev {
            Event::Delta { text, tokens } if !text.is_empty() || !tokens.is_empty() => {
                let lp = logprobs.then(|| ChatLogprobs { content: tokens.iter().map(|l| token_logprob(&state, l)).collect(), refusal: None });
                out.push(chunk(Delta { role: None, content: Some(text) }, lp, None));
            }
            Event::Done(s) => out.push(chunk(Delta::default(), None, Some(s.finish_reason.as_str()))),
            Event::Error(e) => out.push(error_chunk(&e)),
            _ => {}
        }
        out
    })
}
