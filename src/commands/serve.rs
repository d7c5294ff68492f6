//! Serving what `tpserve up` and `tpserve coordinator` loaded: the OpenAI-compatible HTTP
//! server (`tpserve-server`), or with `--stdin` JSON request lines on standard input, one
//! result line each on standard output (scripts and tests; one request at a time; a bad
//! line or a failed request gets an error line and the loop goes on).

use std::io::Write;
use std::ops::ControlFlow;

use anyhow::{Context, Result};
use serde::Deserialize;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tpserve_coordinator::{generate_batch, Backend, ClusterError, GenOptions, InvalidParam, Limits, OverContext, RequestParams};
use tpserve_tokenizer::Tokenizer;

/// Where and how to serve.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to serve HTTP on.
    #[arg(long, default_value = "127.0.0.1", env = "TPSERVE_HOST")]
    pub host: String,
    /// Port to serve HTTP on (0: any free port; the URL is printed).
    #[arg(long, default_value_t = 8000, env = "TPSERVE_PORT")]
    pub port: u16,
    /// Require `Authorization: Bearer KEY` on /v1/* (/health, /ready stay open, and /metrics
    /// unless --metrics-api-key is set).
    #[arg(long, env = "TPSERVE_API_KEY")]
    pub api_key: Option<String>,
    /// Require `Authorization: Bearer KEY` on /metrics (the scraper's key; without it
    /// /metrics is open).
    #[arg(long, env = "TPSERVE_METRICS_API_KEY")]
    pub metrics_api_key: Option<String>,
    /// Serve HTTPS with this certificate (PEM, the chain may follow), as vLLM's flag.
    #[arg(long, env = "TPSERVE_SSL_CERTFILE", requires = "ssl_keyfile")]
    pub ssl_certfile: Option<std::path::PathBuf>,
    /// The private key (PEM) of --ssl-certfile.
    #[arg(long, env = "TPSERVE_SSL_KEYFILE", requires = "ssl_certfile")]
    pub ssl_keyfile: Option<std::path::PathBuf>,
    /// Seconds an idle keep-alive connection, one still sending its request headers, or one
    /// whose client reads none of its answer stays open. Streams that produce tokens are
    /// never cut.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), env = "TPSERVE_HTTP_TIMEOUT_SECS")]
    pub http_timeout_secs: u64,
    /// Seconds a request body has to arrive after its headers, else a 408.
    #[arg(long, default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..), env = "TPSERVE_HTTP_BODY_TIMEOUT_SECS")]
    pub http_body_timeout_secs: u64,
    /// HTTP connections served at once; one more is answered 503 (Retry-After: 1) and closed.
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..), env = "TPSERVE_MAX_CONNECTIONS")]
    pub max_connections: u64,
    /// The model id clients send (default: the model file's name without .gguf).
    #[arg(long, env = "TPSERVE_SERVED_MODEL_NAME")]
    pub served_model_name: Option<String>,
    /// Seconds in-flight requests get to finish after Ctrl-C or SIGTERM (new requests get
    /// 503 "shutting down" meanwhile, and /ready 503).
    #[arg(long, default_value_t = 30, env = "TPSERVE_DRAIN_SECS")]
    pub drain_secs: u64,
    /// Seconds that requests waiting in the queue when a worker is lost wait for the
    /// cluster to recover before they get a 503 (new requests get a 503 at once meanwhile).
    #[arg(long, default_value_t = 30, env = "TPSERVE_RECOVERY_WAIT_SECS")]
    pub recovery_wait_secs: u64,
    /// Serve JSON request lines on standard input instead of HTTP.
    #[arg(long)]
    pub stdin: bool,
}

/// Serves the backend `load` gives over HTTP until Ctrl-C (or SIGTERM), then drains.
/// HTTP is up before `load` finishes: `/health` answers and `/ready` says "loading" meanwhile.
pub async fn serve_http<B: Backend>(
    load: impl std::future::Future<Output = Result<B>>,
    kv: tpserve_types::kv::KvLayout,
    loaded: &super::Loaded,
    args: &ServeArgs,
    serving: &super::cluster::ServingArgs,
) -> Result<()> {
    let cfg = loaded.config()?;
    let tok = loaded.tokenizer.clone();
    let chat_template = tpserve_tokenizer::chat::ChatTemplate::for_model(&loaded.gguf, &tok).context("cannot read the model's chat template")?;
    let name = match &args.served_model_name {
        Some(n) => n.clone(),
        None => loaded.path.file_stem().map_or_else(|| "model".to_string(), |s| s.to_string_lossy().into_owned()),
    };
    let engine = tpserve_coordinator::EngineConfig { scheduler: serving.scheduler(kv, cfg.context_len) };
    let listener = tokio::net::TcpListener::bind((args.host.as_str(), args.port))
        .await
        .with_context(|| format!("--host {} --port {}: cannot listen there", args.host, args.port))?;
    let addr = listener.local_addr()?;
    let model = tpserve_server::ServedModel { name: name.clone(), tokenizer: tok, chat_template, context_len: cfg.context_len, vocab: cfg.vocab };
    let opts = tpserve_server::ServerOptions {
        api_key: args.api_key.clone(),
        metrics_api_key: args.metrics_api_key.clone(),
        https: match (&args.ssl_certfile, &args.ssl_keyfile) {
            (Some(c), Some(k)) => Some(tpserve_server::https_from_files(c, k).map_err(anyhow::Error::msg)?),
            _ => None,
        },
        idle_timeout: std::time::Duration::from_secs(args.http_timeout_secs),
        body_timeout: std::time::Duration::from_secs(args.http_body_timeout_secs),
        max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
        drain_for: std::time::Duration::from_secs(args.drain_secs),
        recovery_wait: std::time::Duration::from_secs(args.recovery_wait_secs),
        ..Default::default()
    };
    let scheme = if opts.https.is_some() { "https" } else { "http" };
    eprintln!("serving {name} at {scheme}://{addr}/v1 (OpenAI API; /health, /ready, /metrics)");
    // The key itself never goes into a log: the hint reads it from the environment.
    let auth = if args.api_key.is_some() { " -H \"Authorization: Bearer $TPSERVE_API_KEY\"" } else { "" };
    let on_ready = move || {
        eprintln!("ready: try  curl {scheme}://{addr}/v1/completions -H 'Content-Type: application/json'{auth} -d '{{\"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}}'")
    };
    let shutdown = async {
        let term = async {
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(mut s) => {
                    s.recv().await;
                }
                Err(_) => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term => {}
        }
        eprintln!("stopping: finishing in-flight requests");
    };
    tpserve_server::serve(listener, load, model, engine, opts, shutdown, on_ready).await
}

/// One request line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LineRequest {
    prompt: String,
    #[serde(default = "default_max_tokens")]
    max_tokens: usize,
    #[serde(default = "one")]
    temperature: f32,
    #[serde(default)]
    top_k: usize,
    #[serde(default = "one")]
    top_p: f32,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    stop: Vec<String>,
    #[serde(default)]
    ignore_eos: bool,
}

fn default_max_tokens() -> usize {
    128
}
fn one() -> f32 {
    1.0
}

/// How often an idle `--stdin` loop shows its workers it is still there.
const KEEPALIVE: std::time::Duration = std::time::Duration::from_secs(2);

/// Reads request lines until standard input ends or Ctrl-C, answering each.
pub async fn serve_lines<B: Backend>(backend: &mut B, tok: &Tokenizer) -> Result<()> {
    let mut lines = BufReader::new(tokio::io::stdin()).lines();
    // One Ctrl-C future for the whole loop, so an interrupt during a request is seen too.
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    eprintln!(
        "ready: send one JSON request per line on standard input, e.g. {{\"prompt\": \"The capital of France is\", \"max_tokens\": 16, \"temperature\": 0}}"
    );
    loop {
        let line = tokio::select! {
            l = lines.next_line() => l.context("cannot read standard input")?,
            _ = &mut interrupted => { eprintln!("interrupted: stopping"); return Ok(()) }
            // Idle: an empty step now and then, so the workers know their coordinator is
            // still here (they drop their shards after --coordinator-timeout-secs without a
            // call). A failure marks the cluster failed; the next request recovers it.
            _ = tokio::time::sleep(KEEPALIVE) => {
                let _ = backend.step(&tpserve_types::step::StepPlan::default()).await;
                continue;
            }
        };
        let Some(line) = line else { return Ok(()) };
        if line.trim().is_empty() {
            continue;
        }
        let result = tokio::select! {
            r = answer(backend, tok, &line) => r,
            _ = &mut interrupted => { eprintln!("interrupted during a request: stopping"); return Ok(()) }
        };
        let answer = match result {
            Ok(v) => v,
            Err(e) => json!({ "error": { "message": format!("{e:#}"), "type": kind(&e) } }),
        };
        let mut out = std::io::stdout().lock();
        writeln!(out, "{answer}").and_then(|()| out.flush()).context("cannot write to standard output")?;
    }
}

fn kind(e: &anyhow::Error) -> &'static str {
    if e.downcast_ref::<InvalidParam>().is_some() {
        return "invalid_request_error";
    }
    match e.downcast_ref::<ClusterError>() {
        Some(ClusterError::WorkerLost(_) | ClusterError::Unavailable(_)) => "cluster_error",
        Some(ClusterError::Rejected(_)) | None => "invalid_request_error",
        Some(_) => "internal_error",
    }
}

async fn answer<B: Backend>(backend: &mut B, tok: &Tokenizer, line: &str) -> Result<serde_json::Value> {
    let r: LineRequest = serde_json::from_str(line).context("the request line is not a valid request")?;
    if r.prompt.is_empty() {
        anyhow::bail!("prompt is empty");
    }
    let params = RequestParams {
        max_tokens: Some(i64::try_from(r.max_tokens).unwrap_or(i64::MAX)),
        over_context: OverContext::Clamp,
        temperature: Some(r.temperature),
        top_p: Some(r.top_p),
        top_k: Some(i64::try_from(r.top_k).unwrap_or(i64::MAX)),
        seed: r.seed,
        stop: r.stop,
        ignore_eos: r.ignore_eos,
        ..RequestParams::default()
    };
    let prompt_ids = tok.encode(&r.prompt, true, true);
    let limits = Limits { context_len: backend.context_len(), kv_tokens: backend.kv_layout().token_capacity(), vocab: tok.vocab_size() };
    let req = params.build(prompt_ids.clone(), limits)?;
    // A cluster that lost a rank reloads here once the rank answers again.
    backend.recover().await?;
    let (mut outs, stats) = generate_batch(backend, tok, &[req], GenOptions::default(), |_, _| ControlFlow::Continue(())).await?;
    let out = outs.pop().expect("one output per request");
    Ok(json!({
        "text": out.text,
        "prompt_ids": prompt_ids,
        "output_ids": out.output_ids,
        "finish_reason": out.finish_reason,
        "timings": out.timings,
        "steps": stats,
    }))
}
