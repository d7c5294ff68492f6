//! The accept loop: HTTP/1.1 connections served by hyper with the limits axum's `serve`
//! does not set.
//!
//! - **Headers and idle keep-alive**: hyper's header-read timer runs whenever a connection
//!   waits for the head of a request — half-sent headers, and an idle keep-alive connection
//!   between requests — so either is closed after [`HttpLimits::idle`].
//! - **Bodies**: [`crate::ServerOptions::body_timeout`] bounds reading a request body (the
//!   handlers' body extractor answers 408 and closes the connection); a body a handler does
//!   not read is never waited on (hyper closes the connection after the answer).
//! - **Writes**: a write that makes no progress for [`HttpLimits::idle`] (a client that
//!   stopped reading) ends the connection. A stream that produces tokens is never cut: its
//!   writes progress, and it sends an SSE keep-alive comment every 15 s.
//! - **Connections**: at most [`HttpLimits::max_connections`] are served at once; one more is
//!   answered 503 with `Retry-After: 1` and an OpenAI error body, then closed, so the
//!   connections being served are not slowed by it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::TlsAcceptor;

/// What serves HTTPS: a rustls acceptor made by [`https_from_files`].
#[derive(Clone)]
pub struct Https(TlsAcceptor);

impl std::fmt::Debug for Https {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Https(..)")
    }
}

use crate::error::ApiError;

/// The limits of the HTTP connections (from [`crate::ServerOptions`]).
#[derive(Debug, Clone, Copy)]
pub(crate) struct HttpLimits {
    /// Headers must arrive, an idle keep-alive connection must start its next request, and a
    /// blocked write must progress within this.
    pub(crate) idle: Duration,
    /// Connections served at once.
    pub(crate) max_connections: usize,
}

/// The largest request head hyper buffers (bigger heads get hyper's own bare 431). Heads
/// under it but over [`crate::routes::MAX_HEADER_BYTES`] get our 431 with an error body.
const MAX_BUF_BYTES: usize = 256 << 10;

/// Refusals (503 answers to connections over the limit) in progress at once; past it an
/// extra connection is closed without an answer.
const MAX_REFUSING: usize = 64;

/// Serves `app` on `listener` (HTTPS when `tls` is set) until `shutdown` resolves, then stops
/// accepting, lets every connection finish its request in progress (no more keep-alive),
/// and returns once all are closed.
pub(crate) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<Https>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let refusing = Arc::new(Semaphore::new(MAX_REFUSING));
    // Connections wait on `stop` to change; the accept loop sends it on shutdown.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            metrics::counter!("tpserve_http_connections_refused_total").increment(1);
            tracing::debug!(%peer, limit = limits.max_connections, "connection refused: at the connection limit");
            if let Ok(r) = refusing.clone().try_acquire_owned() {
                tokio::spawn(async move {
                    refuse(stream, limits.max_connections).await;
                    drop(r);
                });
            }
            continue;
        };
        let app = app.clone();
        let stop = stop_rx.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, app, limits, stop, peer).await,
                // The handshake gets the same deadline as a request's headers.
                Some(Https(acceptor)) => match tokio::time::timeout(limits.idle, acceptor.accept(stream)).await {
                    Ok(Ok(s)) => serve_connection(s, app, limits, stop, peer).await,
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "no TLS handshake within the timeout"),
                },
            }
            drop(permit);
        });
    }
    drop(listener);
    let _ = stop_tx.send(true);
    // Every connection holds a permit until it closes.
    let all = u32::try_from(limits.max_connections).unwrap_or(u32::MAX);
    let _ = permits.acquire_many(all).await;
    Ok(())
}

/// Serves one connection with the limits until it ends, shutting it down gracefully once
/// `stop` says so.
async fn serve_connection<S>(stream: S, app: Router, limits: HttpLimits, mut stop: watch::Receiver<bool>, peer: std::net::SocketAddr)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let io = TokioIo::new(WriteDeadline::new(stream, limits.idle));
    let service = TowerToHyperService::new(app);
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(limits.idle).max_buf_size(MAX_BUF_BYTES).max_headers(256);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut stopping = *stop.borrow();
    if stopping {
        conn.as_mut().graceful_shutdown();
    }
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "connection ended");
                }
                break;
            }
            changed = stop.changed(), if !stopping => {
                stopping = true;
                let _ = changed;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

/// The HTTPS acceptor for `--ssl-certfile` and `--ssl-keyfile` (PEM; the certificate file
/// may hold the chain), with rustls's safe defaults (TLS 1.2 and 1.3).
pub fn https_from_files(cert: &std::path::Path, key: &std::path::Path) -> Result<Https, String> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs =
        CertificateDer::pem_file_iter(cert).and_then(|i| i.collect::<Result<Vec<_>, _>>()).map_err(|e| format!("--ssl-certfile {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!("--ssl-certfile {}: no certificate in it", cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--ssl-keyfile {}: {e}", key.display()))?;
    let provider = std::sync::Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let cfg = tokio_rustls::rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("--ssl-certfile/--ssl-keyfile: {e}"))?;
    Ok(Https(TlsAcceptor::from(std::sync::Arc::new(cfg))))
}

/// Answers a connection over the limit 503 and closes it. The request is not read; the
/// answer is written first, then whatever the client sends is read away for up to a second
/// so that closing does not reset the connection before the client has the answer.
async fn refuse(mut stream: TcpStream, limit: usize) {
    let e = ApiError::unavailable(format!("the server is at its limit of {limit} connections; retry later")).with_code("too_many_connections");
    let body = serde_json::to_string(&e.body()).unwrap_or_default();
    let head = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\ncontent-length: {}\r\nretry-after: 1\r\nconnection: close\r\n\r\n",
        body.len()
    );
    let answer = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body.as_bytes()).await?;
        stream.shutdown().await?;
        let mut sink = [0u8; 4096];
        while stream.read(&mut sink).await? > 0 {}
        Ok::<_, std::io::Error>(())
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), answer).await;
}

/// A stream whose writes fail when one makes no progress for `limit`: a client that stops
/// reading its answer cannot hold a connection forever.
struct WriteDeadline<S> {
    inner: S,
    limit: Duration,
    /// Set while a write is blocked: when it must have progressed.
    blocked: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<S> WriteDeadline<S> {
    fn new(inner: S, limit: Duration) -> Self {
        Self { inner, limit, blocked: None }
    }

    /// What to answer when the inner write or flush answered `p`.
    fn watch<T>(&mut self, p: Poll<std::io::Result<T>>, cx: &mut Context<'_>) -> Poll<std::io::Result<T>> {
        if p.is_ready() {
            self.blocked = None;
            return p;
        }
        let limit = self.limit;
        let sleep = self.blocked.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("the client read nothing of the answer for {limit:?}"))))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WriteDeadline<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(p, cx)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let p = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(p, cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(mut self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[std::io::IoSlice<'_>]) -> Poll<std::io::Result<usize>> {
        let p = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(p, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}
