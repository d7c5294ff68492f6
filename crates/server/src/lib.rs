//! `tpserve-server`: the coordinator's HTTP face, OpenAI-compatible.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions` (JSON or SSE streaming),
//!   `GET /v1/models`; optional Bearer API key on `/v1/*`.
//! - `GET /health` (the process answers), `GET /ready` (every worker loaded and a step or an
//!   idle probe went through all of them within [`ServerOptions::ready_within`]; not while
//!   draining), `GET /metrics` (Prometheus).
//!
//! One task owns the [`Engine`] (and through it the cluster); handlers hand it requests over
//! a channel and read each request's events from its own channel, so a slow or vanished
//! client never holds up a step, and a dropped receiver cancels its request.

mod error;
mod listen;
pub use listen::{https_from_files, Https};
pub mod openai;
pub mod response;
mod routes;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::sync::{mpsc, oneshot};
use tpserve_coordinator::{Backend, Engine, EngineConfig, Event, Request};
use tpserve_scheduler::AddError;
use tpserve_tokenizer::Tokenizer;

pub use error::ApiError;

/// What the server knows about the model it serves.
pub struct ServedModel {
    /// The id clients name in `model` (and `GET /v1/models` lists).
    pub name: String,
    /// Encodes prompts and decodes generated tokens (shared with the engine task).
    pub tokenizer: Arc<Tokenizer>,
    /// Renders chat messages into the prompt text of `/v1/chat/completions`.
    pub chat_template: tpserve_tokenizer::chat::ChatTemplate,
    /// The model's context length in positions; requests get the smaller of it and the
    /// scheduler's (`GET /v1/models` reports that as `max_model_len`).
    pub context_len: usize,
    /// Token ids the model has embeddings for.
    pub vocab: usize,
}

/// How the server behaves.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// When set, every `/v1/*` request must send `Authorization: Bearer <key>` or get a
    /// 401; `/health` and `/ready` stay open (probes), and so does `/metrics` unless
    /// [`ServerOptions::metrics_api_key`] is set.
    pub api_key: Option<String>,
    /// When set, `GET /metrics` needs `Authorization: Bearer <key>` (a scraper's key, apart
    /// from the clients'); unset, it is open.
    pub metrics_api_key: Option<String>,
    /// An idle keep-alive connection, one whose request headers are not all there, and one
    /// whose client reads none of its answer are closed after this. Streams that produce
    /// tokens are never cut.
    pub idle_timeout: Duration,
    /// A request body must arrive within this of its headers, else a 408 and the
    /// connection is closed.
    pub body_timeout: Duration,
    /// Connections served at once; one more is answered 503 with `Retry-After` and closed.
    pub max_connections: usize,
    /// When idle, a probe step goes to every worker this often.
    pub probe_every: Duration,
    /// Ready only if a step or probe succeeded within this.
    pub ready_within: Duration,
    /// After a shutdown signal, in-flight requests get this long to finish.
    pub drain_for: Duration,
    /// After the cluster fails, requests that were waiting in the queue wait this long for
    /// it to recover before they get a 503 (new requests get a 503 at once meanwhile).
    pub recovery_wait: Duration,
    /// Serve HTTPS with this certificate instead of plain HTTP.
    pub https: Option<Https>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            metrics_api_key: None,
            idle_timeout: Duration::from_secs(60),
            body_timeout: Duration::from_secs(60),
            max_connections: 1024,
            probe_every: Duration::from_secs(1),
            ready_within: Duration::from_secs(10),
            drain_for: Duration::from_secs(30),
            recovery_wait: Duration::from_secs(30),
            https: None,
        }
    }
}

/// What the engine task publishes for `/ready`.
#[derive(Debug, Clone, Default)]
struct Status {
    /// The workers are still loading.
    loading: bool,
    /// Why the cluster cannot serve, once it cannot (the engine's [`Engine::failed`]).
    failed: Option<String>,
    /// When a step or probe last went through every worker.
    last_ok: Option<Instant>,
    /// A shutdown signal came: no new requests.
    draining: bool,
    /// Requests waiting or running in the engine.
    live: usize,
}

/// What handlers ask of the engine task.
enum Cmd {
    /// Queue a request.
    Submit {
        /// The checked request.
        req: Request,
        /// Where its events go; dropping the receiver cancels it.
        events: mpsc::UnboundedSender<Event>,
        /// Whether it was queued, or the error to answer (429 when the queue is full).
        reply: oneshot::Sender<Result<(), ApiError>>,
    },
    /// Ends every live request with this error.
    FailAll(String),
}

/// Shared by the handlers.
struct AppState {
    model: ServedModel,
    opts: ServerOptions,
    limits: tpserve_coordinator::Limits,
    cmds: mpsc::UnboundedSender<Cmd>,
    status: Arc<Mutex<Status>>,
    prometheus: PrometheusHandle,
    next_id: std::sync::atomic::AtomicU64,
}

impl AppState {
    fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Queues `req`; its events arrive on the returned receiver.
    async fn submit(&self, req: Request) -> Result<mpsc::UnboundedReceiver<Event>, ApiError> {
        let st = self.status();
        if st.draining {
            return Err(ApiError::unavailable("the server is shutting down"));
        }
        if st.loading {
            return Err(ApiError::unavailable("the model is still loading; retry when /ready answers 200"));
        }
        if let Some(f) = st.failed {
            return Err(ApiError::unavailable(format!("the cluster cannot serve: {f}")));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        let (reply, answer) = oneshot::channel();
        self.cmds.send(Cmd::Submit { req, events: tx, reply }).map_err(|_| ApiError::unavailable("the engine has stopped"))?;
        answer.await.map_err(|_| ApiError::unavailable("the engine has stopped"))??;
        Ok(rx)
    }
}

/// The Prometheus recorder of this process (installed once).
fn prometheus() -> anyhow::Result<PrometheusHandle> {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let seconds = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0];
    let tokens = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];
    let h = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &seconds)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full("tpserve_step_tokens".into()), &tokens))
        .context("cannot configure the metrics")?
        .install_recorder()
        .context("cannot install the metrics recorder")?;
    tpserve_coordinator::metrics::describe_metrics();
    metrics::describe_counter!(
        "tpserve_http_connections_refused_total",
        "HTTP connections answered 503 and closed because --max-connections were being served."
    );
    metrics::describe_gauge!(
        "tpserve_ready",
        "1 while GET /ready answers 200 (every worker loaded and answering, not draining), else 0; set when /ready is asked."
    );
    Ok(HANDLE.get_or_init(|| h).clone())
}

/// Serves on `listener` until `shutdown` resolves, then drains: no new requests, in-flight
/// ones get `opts.drain_for` to finish, then end with an error.
///
/// HTTP is up at once: while `load` (loading the workers) runs, `/health` answers and
/// `/ready` and requests get 503 "loading". `on_ready` is called once a first step has gone
/// through every worker; from then on requests are served. If loading or that first step
/// fails, so does this.
pub async fn serve<B: Backend>(
    listener: tokio::net::TcpListener,
    load: impl std::future::Future<Output = anyhow::Result<B>>,
    model: ServedModel,
    engine: EngineConfig,
    opts: ServerOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    on_ready: impl FnOnce(),
) -> anyhow::Result<()> {
    let prometheus = prometheus()?;
    let kv_tokens = engine.scheduler.kv.token_capacity();
    let limits = tpserve_coordinator::Limits {
        context_len: engine.scheduler.context_len.min(model.context_len),
        kv_tokens,
        vocab: model.tokenizer.vocab_size().min(model.vocab),
    };
    let (cmds, rx) = mpsc::unbounded_channel();
    let status = Arc::new(Mutex::new(Status { loading: true, ..Status::default() }));
    let tok = model.tokenizer.clone();
    let state = Arc::new(AppState { model, opts: opts.clone(), limits, cmds: cmds.clone(), status: status.clone(), prometheus, next_id: 0.into() });
    let app = routes::router(state);
    let drain_for = opts.drain_for;
    let st = status.clone();
    // On a shutdown signal, keep accepting connections (new requests get 503 "shutting
    // down", /ready 503) until the requests in flight are done or the drain deadline
    // passes; only then stop listening and let the connections finish.
    let graceful = async move {
        shutdown.await;
        st.lock().unwrap_or_else(|p| p.into_inner()).draining = true;
        tracing::info!("shutting down: draining in-flight requests");
        let deadline = tokio::time::Instant::now() + drain_for;
        while st.lock().unwrap_or_else(|p| p.into_inner()).live > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = cmds.send(Cmd::FailAll(format!("the server shut down before the request finished (drain deadline {drain_for:?})")));
    };
    let limits = listen::HttpLimits { idle: opts.idle_timeout, max_connections: opts.max_connections.max(1) };
    let http = listen::serve(listener, app, limits, opts.https.clone(), graceful);
    let engine = async {
        let backend = load.await?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let run = engine_loop(backend, tok, engine, rx, status.clone(), opts.clone(), ready_tx);
        tokio::pin!(run);
        // The loop makes the first step; wait for its outcome while it runs.
        tokio::select! {
            _ = &mut run => anyhow::bail!("the engine stopped before its first step"),
            first = ready_rx => match first {
                Ok(Ok(())) => {
                    status.lock().unwrap_or_else(|p| p.into_inner()).loading = false;
                    on_ready();
                }
                Ok(Err(e)) => anyhow::bail!("the first step through the workers failed: {e}"),
                Err(_) => anyhow::bail!("the engine stopped before its first step"),
            },
        }
        // Until the server stops (which drops this future).
        run.await;
        Ok(())
    };
    tokio::pin!(engine);
    tokio::select! {
        r = http => r.context("the HTTP server failed"),
        r = &mut engine => r,
    }
}

/// The task that owns the engine: takes requests, runs steps while there is work, probes
/// the workers while there is none.
/// The first wait between recovery attempts after the cluster fails.
const RECOVERY_BACKOFF_MIN: Duration = Duration::from_millis(250);
/// The longest wait between recovery attempts.
const RECOVERY_BACKOFF_MAX: Duration = Duration::from_secs(4);

async fn engine_loop<B: Backend>(
    backend: B,
    tok: Arc<Tokenizer>,
    cfg: EngineConfig,
    mut rx: mpsc::UnboundedReceiver<Cmd>,
    status: Arc<Mutex<Status>>,
    opts: ServerOptions,
    ready: oneshot::Sender<Result<(), String>>,
) {
    let mut engine = Engine::new(backend, &tok, cfg);
    let publish = |engine: &Engine<'_, B>| {
        let mut st = status.lock().unwrap_or_else(|p| p.into_inner());
        st.failed = engine.failed().map(str::to_string);
        st.last_ok = engine.last_ok();
        st.live = engine.n_live();
    };
    let handle = |engine: &mut Engine<'_, B>, cmd: Cmd| match cmd {
        Cmd::Submit { req, events, reply } => {
            let r = match engine.failed() {
                Some(f) => Err(ApiError::unavailable(format!("the cluster cannot serve: {f}"))),
                None => engine.add(req, events).map(|_| ()).map_err(|e| match e {
                    AddError::QueueFull(_) => ApiError::overloaded(format!("{e}; retry later")),
                    AddError::Duplicate(_) => ApiError::unavailable(e.to_string()),
                    AddError::EmptyPrompt => ApiError::invalid(Some("prompt"), e.to_string()),
                    AddError::TooLong { .. } | AddError::TooBig { .. } => {
                        ApiError::invalid(Some("max_tokens"), e.to_string()).with_code("context_length_exceeded")
                    }
                }),
            };
            let _ = reply.send(r);
        }
        Cmd::FailAll(why) => engine.fail_all(&why),
    };
    let first = engine.probe().await.map_err(|e| e.to_string());
    publish(&engine);
    let _ = ready.send(first);
    // Recovery polls back off from 250 ms to 4 s while the cluster stays down.
    let mut backoff = RECOVERY_BACKOFF_MIN;
    loop {
        loop {
            match rx.try_recv() {
                Ok(cmd) => handle(&mut engine, cmd),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return,
            }
        }
        if engine.failed().is_some() {
            if engine.failed_for().is_some_and(|t| t > opts.recovery_wait) && engine.n_live() > 0 {
                let why = format!("the cluster did not recover within {:?}: {}", opts.recovery_wait, engine.failed().unwrap_or_default());
                engine.fail_all(&why);
            }
            publish(&engine);
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => handle(&mut engine, cmd),
                    None => return,
                },
                _ = tokio::time::sleep(backoff) => match engine.recover().await {
                    Ok(()) => backoff = RECOVERY_BACKOFF_MIN,
                    Err(e) => {
                        tracing::debug!(error = %e, "not recovered yet");
                        backoff = (backoff * 2).min(RECOVERY_BACKOFF_MAX);
                    }
                },
            }
        } else if engine.has_work() {
            match engine.step().await {
                Ok(true) => {}
                // Work that no step can make progress on would be a bug: never spin on it.
                Ok(false) => tokio::time::sleep(std::time::Duration::from_millis(5)).await,
                Err(e) => tracing::warn!(error = %e, "step failed"),
            }
        } else {
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(cmd) => handle(&mut engine, cmd),
                    None => return,
                },
                _ = tokio::time::sleep(opts.probe_every) => {
                    if engine.failed().is_none() {
                        if let Err(e) = engine.probe().await {
                            tracing::warn!(error = %e, "probe failed");
                        }
                    }
                }
            }
        }
        publish(&engine);
    }
}
