//! Optional TLS on the control plane (tonic with rustls): the worker's and the
//! coordinator's gRPC servers present a certificate (`--tls-cert`, `--tls-key`), clients
//! verify it against `--tls-ca`; a server given `--tls-ca` also asks its callers for a
//! certificate signed by it (mutual TLS), and a client given its own cert and key presents
//! them. The cluster token still goes with every call, now encrypted.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

/// Certificates of one process: its own (cert + key), and the CA it trusts.
#[derive(Debug, Clone)]
pub struct Tls {
    identity: Option<Identity>,
    ca: Option<Certificate>,
}

impl Tls {
    /// Reads the PEM files; `None` if none is given. A certificate needs its key and a key
    /// its certificate; each error names the flag and the file.
    pub fn from_files(cert: Option<&Path>, key: Option<&Path>, ca: Option<&Path>) -> Result<Option<Self>, String> {
        let read = |flag: &str, p: &Path| std::fs::read(p).map_err(|e| format!("{flag} {}: cannot read it: {e}", p.display()));
        let pem = |flag: &str, p: &Path, what: &str| -> Result<Vec<u8>, String> {
            let bytes = read(flag, p)?;
            if !String::from_utf8_lossy(&bytes).contains("-----BEGIN ") {
                return Err(format!("{flag} {}: not a PEM file (expected {what})", p.display()));
            }
            Ok(bytes)
        };
        let identity = match (cert, key) {
            (None, None) => None,
            (Some(c), Some(k)) => Some(Identity::from_pem(pem("--tls-cert", c, "a certificate")?, pem("--tls-key", k, "a private key")?)),
            (Some(_), None) => return Err("--tls-cert needs --tls-key (the certificate's private key)".into()),
            (None, Some(_)) => return Err("--tls-key needs --tls-cert (the certificate it signs for)".into()),
        };
        let ca = ca.map(|p| pem("--tls-ca", p, "CA certificates").map(Certificate::from_pem)).transpose()?;
        Ok((identity.is_some() || ca.is_some()).then_some(Self { identity, ca }))
    }

    /// The server side: needs this process's certificate; with a CA, callers must present a
    /// certificate it signed.
    pub fn server(&self) -> Result<ServerTlsConfig, String> {
        let id = self.identity.clone().ok_or("serving TLS needs --tls-cert and --tls-key")?;
        let cfg = ServerTlsConfig::new().identity(id);
        Ok(match &self.ca {
            Some(ca) => cfg.client_ca_root(ca.clone()),
            None => cfg,
        })
    }

    /// The client side, for a server reached as `host`: verifies it against the CA
    /// (required: no system roots are trusted for a cluster), presenting this process's
    /// certificate if it has one.
    pub fn client(&self, host: &str) -> Result<ClientTlsConfig, String> {
        let ca = self.ca.clone().ok_or("connecting with TLS needs --tls-ca (the CA that signed the servers' certificates)")?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let cfg = ClientTlsConfig::new().ca_certificate(ca).domain_name(host);
        Ok(match &self.identity {
            Some(id) => cfg.identity(id.clone()),
            None => cfg,
        })
    }
}

/// The URL and endpoint to reach `addr` (host:port, or a URL) at, with TLS when `tls` is set.
pub fn endpoint(addr: &str, tls: Option<&Tls>) -> Result<tonic::transport::Endpoint, String> {
    let bare = addr.rsplit_once("://").map_or(addr, |(_, rest)| rest);
    let url = format!("{}://{bare}", if tls.is_some() { "https" } else { "http" });
    let ep = tonic::transport::Endpoint::from_shared(url).map_err(|e| format!("{addr:?} is not host:port: {e}"))?;
    match tls {
        None => Ok(ep),
        Some(t) => {
            let host = bare.rsplit_once(':').map_or(bare, |(h, _)| h);
            ep.tls_config(t.client(host)?).map_err(|e| format!("TLS for {addr}: {e}"))
        }
    }
}
