//! Who may call a worker or a coordinator: the cluster token on every gRPC call.
//!
//! Every process of a cluster is given the same secret (`--cluster-token`, the environment
//! variable `TPSERVE_CLUSTER_TOKEN`, or `--cluster-token-file` for a Kubernetes Secret).
//! Clients put it in the [`TOKEN_HEADER`] metadata of every call ([`SendToken`]); servers
//! compare it in constant time before the call reaches the service ([`CheckToken`]). A
//! server without a token accepts loopback peers only, unless it was told to accept anyone
//! ([`Admission::Anyone`], the worker's `--insecure`). The collective proves the same secret
//! without sending it (an HMAC in its hello, `tpserve-comm`).

use std::fmt;
use std::sync::Arc;

use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::Interceptor;
use tonic::{Request, Status};

/// The metadata key that carries the cluster token.
pub const TOKEN_HEADER: &str = "x-tpserve-cluster-token";

/// The shared secret of a cluster. Its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterToken(Arc<str>);

impl ClusterToken {
    /// A token from its text: 16 to 512 printable ASCII characters without spaces (it
    /// travels as gRPC metadata; surrounding whitespace, e.g. a file's last newline, is
    /// trimmed first).
    pub fn new(text: &str) -> Result<Self, String> {
        let t = text.trim();
        if t.len() < 16 {
            return Err(format!("the cluster token has {} characters; use at least 16 (e.g. `openssl rand -hex 32`)", t.len()));
        }
        if t.len() > 512 {
            return Err(format!("the cluster token has {} characters; use at most 512", t.len()));
        }
        if let Some(c) = t.chars().find(|c| !c.is_ascii_graphic()) {
            return Err(format!("the cluster token contains {c:?}; use printable ASCII without spaces (e.g. hex)"));
        }
        Ok(Self(t.into()))
    }

    /// The token's bytes (the collective's HMAC key).
    pub fn as_bytes(&self) -> &[u8] {
        self.0.as_bytes()
    }
}

impl fmt::Debug for ClusterToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterToken(..)")
    }
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    // Keep the compiler from turning the fold into an early exit.
    std::hint::black_box(diff) == 0
}

/// Whom a server lets in.
#[derive(Debug, Clone)]
pub enum Admission {
    /// Callers that present this token.
    Token(ClusterToken),
    /// No token configured: callers on the loopback interface only.
    LoopbackOnly,
    /// No token, any caller (`--insecure`: a network the operator trusts).
    Anyone,
}

impl Admission {
    /// The admission of a server given `token`, accepting anyone without one if `insecure`.
    pub fn from_token(token: Option<ClusterToken>, insecure: bool) -> Self {
        match token {
            Some(t) => Self::Token(t),
            None if insecure => Self::Anyone,
            None => Self::LoopbackOnly,
        }
    }
}

/// The server side: refuses, with `UNAUTHENTICATED`, every call its [`Admission`] does not
/// let in, before it reaches the service.
#[derive(Debug, Clone)]
pub struct CheckToken {
    admit: Admission,
}

impl CheckToken {
    /// Checks calls against `admit`.
    pub fn new(admit: Admission) -> Self {
        Self { admit }
    }
}

impl Interceptor for CheckToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        match &self.admit {
            Admission::Anyone => Ok(req),
            Admission::LoopbackOnly => match req.remote_addr() {
                Some(a) if a.ip().is_loopback() => Ok(req),
                peer => Err(Status::unauthenticated(format!(
                    "this process has no cluster token and accepts only loopback callers, not {}: give every process the same --cluster-token",
                    peer.map_or("an unknown peer".to_string(), |a| a.to_string())
                ))),
            },
            Admission::Token(token) => {
                let given = req.metadata().get(TOKEN_HEADER).map(|v| v.as_bytes());
                match given {
                    Some(g) if constant_time_eq(g, token.as_bytes()) => Ok(req),
                    Some(_) => Err(Status::unauthenticated("wrong cluster token: give every process of the cluster the same --cluster-token")),
                    None => Err(Status::unauthenticated("no cluster token: this cluster needs --cluster-token (or TPSERVE_CLUSTER_TOKEN) on every process")),
                }
            }
        }
    }
}

/// The client side: puts the token (if any) on every call.
#[derive(Debug, Clone)]
pub struct SendToken(Option<MetadataValue<Ascii>>);

impl SendToken {
    /// Sends `token` with every call (nothing when `None`).
    pub fn new(token: Option<&ClusterToken>) -> Self {
        // A ClusterToken is printable ASCII, always a valid metadata value.
        Self(token.and_then(|t| MetadataValue::try_from(&*t.0).ok()))
    }
}

impl Interceptor for SendToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert(TOKEN_HEADER, v.clone());
        }
        Ok(req)
    }
}

/// A channel whose every call carries the cluster token.
pub type AuthChannel = tonic::service::interceptor::InterceptedService<tonic::transport::Channel, SendToken>;

#[cfg(test)]
mod tests {
    use super::*;

    fn call(admit: Admission, token: Option<&str>, peer: &str) -> Result<(), tonic::Code> {
        let mut req = Request::new(());
        if let Some(t) = token {
            req.metadata_mut().insert(TOKEN_HEADER, t.parse().unwrap());
        }
        req.extensions_mut().insert(tonic::transport::server::TcpConnectInfo { local_addr: None, remote_addr: Some(peer.parse().unwrap()) });
        CheckToken::new(admit).call(req).map(|_| ()).map_err(|s| s.code())
    }

    #[test]
    fn only_the_right_token_or_a_loopback_peer_without_one_gets_in() {
        let t = ClusterToken::new("0123456789abcdef0123").unwrap();
        let with = || Admission::Token(t.clone());
        assert_eq!(call(with(), Some("0123456789abcdef0123"), "10.0.0.2:1"), Ok(()));
        assert_eq!(call(with(), Some("0123456789abcdef0124"), "127.0.0.1:1"), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(with(), Some("short"), "127.0.0.1:1"), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(with(), None, "127.0.0.1:1"), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(Admission::LoopbackOnly, None, "127.0.0.1:1"), Ok(()));
        assert_eq!(call(Admission::LoopbackOnly, None, "[::1]:1"), Ok(()));
        assert_eq!(call(Admission::LoopbackOnly, None, "10.0.0.2:1"), Err(tonic::Code::Unauthenticated));
        assert_eq!(call(Admission::Anyone, None, "10.0.0.2:1"), Ok(()));
    }

    #[test]
    fn a_token_is_long_printable_and_never_printed() {
        assert!(ClusterToken::new("short").is_err());
        assert!(ClusterToken::new("has a space in the middle of it").is_err());
        let t = ClusterToken::new("  0123456789abcdef\n").unwrap();
        assert_eq!(t.as_bytes(), b"0123456789abcdef");
        assert_eq!(format!("{t:?}"), "ClusterToken(..)");
        assert!(constant_time_eq(b"abc", b"abc") && !constant_time_eq(b"abc", b"abd") && !constant_time_eq(b"abc", b"ab"));
        let mut req = Request::new(());
        req = SendToken::new(Some(&t)).call(req).unwrap();
        assert_eq!(req.metadata().get(TOKEN_HEADER).unwrap(), "0123456789abcdef");
    }
}
