//! The cluster token flags shared by `worker`, `coordinator` and `up`.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use tpserve_worker::{ClusterToken, Tls};

/// Who may drive this cluster's workers: every process of a cluster gets the same token.
#[derive(Args, Debug, Clone, Default)]
pub struct AuthArgs {
    /// The cluster's shared secret (16+ printable characters, e.g. `openssl rand -hex 32`):
    /// every gRPC call carries it and the collective's hello proves it. Prefer the
    /// environment variable or --cluster-token-file: a command line is visible in `ps`.
    #[arg(long, env = "TPSERVE_CLUSTER_TOKEN", hide_env_values = true, conflicts_with = "cluster_token_file")]
    pub cluster_token: Option<String>,
    /// Read the cluster token from this file (a mounted Kubernetes Secret).
    #[arg(long, env = "TPSERVE_CLUSTER_TOKEN_FILE")]
    pub cluster_token_file: Option<PathBuf>,
    /// This process's TLS certificate (PEM) for the control plane: a worker's gRPC server,
    /// the coordinator's join service; on a client, presented to servers that ask for one.
    #[arg(long, env = "TPSERVE_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, env = "TPSERVE_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// The CA (PEM) that signed the cluster's certificates: clients verify servers against
    /// it (and use TLS at all only with it); a server given it asks callers for a
    /// certificate it signed (mutual TLS).
    #[arg(long, env = "TPSERVE_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
}

impl AuthArgs {
    /// The token the flags give, if any.
    pub fn token(&self) -> Result<Option<ClusterToken>> {
        let text = match (&self.cluster_token, &self.cluster_token_file) {
            (Some(t), _) => t.clone(),
            (None, Some(f)) => std::fs::read_to_string(f).with_context(|| format!("--cluster-token-file {}: cannot read it", f.display()))?,
            (None, None) => return Ok(None),
        };
        match ClusterToken::new(&text) {
            Ok(t) => Ok(Some(t)),
            Err(why) if self.cluster_token.is_some() => bail!("--cluster-token: {why}"),
            Err(why) => bail!("--cluster-token-file: {why}"),
        }
    }
}

impl AuthArgs {
    /// The TLS files the flags name, read; `None` without any.
    pub fn tls(&self) -> Result<Option<Tls>> {
        Tls::from_files(self.tls_cert.as_deref(), self.tls_key.as_deref(), self.tls_ca.as_deref()).map_err(anyhow::Error::msg)
    }
}

/// A fresh random token, for the workers `up` starts itself.
pub fn random_token() -> ClusterToken {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    ClusterToken::new(&hex).expect("64 hex digits make a valid token")
}
