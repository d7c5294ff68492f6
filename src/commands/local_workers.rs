//! `tpserve worker` processes started by this process on loopback (`up`, and `generate` /
//! `eval` at tp x pp > 1): they exit when this process's end of their standard input
//! closes, so they never outlive it.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tpserve_types::device::Device;

/// Worker processes started by this process on loopback; killed when dropped.
pub struct LocalWorkers {
    pub children: Vec<Child>,
    pub addrs: Vec<String>,
}

impl LocalWorkers {
    /// Starts a `tpserve worker` process per device of `devices` (rank i on the i-th) on 127.0.0.1 with `threads` compute threads each,
    /// allowed to load `model` ("" = the cached default model) and accepting only callers
    /// with `token` (passed in their environment, never on a command line), and waits for
    /// each to say where it listens. They exit when this process's end of their standard
    /// input closes, so they never outlive it.
    pub async fn spawn(devices: &[Device], threads: usize, model: &str, token: &tpserve_worker::ClusterToken) -> Result<Self> {
        let n = devices.len();
        let exe = std::env::current_exe().context("cannot find the tpserve executable to start workers")?;
        let mut children = Vec::with_capacity(n);
        let mut addrs = Vec::with_capacity(n);
        for (rank, device) in devices.iter().enumerate() {
            // Workers inherit TPSERVE_COMM_SPIN_US and the rest of the environment.
            let mut child = Command::new(&exe)
                .args(["worker", "--listen", "127.0.0.1:0", "--threads", &threads.to_string(), "--exit-with-stdin", "--device", &device.to_string()])
                .args(if model.is_empty() { vec![] } else { vec!["--model", model] })
                .env("TPSERVE_CLUSTER_TOKEN", std::str::from_utf8(token.as_bytes()).expect("a token is ASCII"))
                .env_remove("TPSERVE_CLUSTER_TOKEN_FILE")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .kill_on_drop(true)
                // Their own process group: a terminal's Ctrl-C reaches only this process,
                // which then stops the workers in order (their stdin closes).
                .process_group(0)
                .spawn()
                .with_context(|| format!("cannot start worker {rank} ({})", exe.display()))?;
            let stdout = child.stdout.take().expect("stdout is piped");
            let mut lines = BufReader::new(stdout).lines();
            let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
                .await
                .map_err(|_| anyhow!("worker {rank} did not start within 30 s"))?
                .context("cannot read the worker's address")?
                .ok_or_else(|| anyhow!("worker {rank} exited before it started listening"))?;
            let addr = parse_listening(&line).ok_or_else(|| anyhow!("worker {rank} said {line:?}, not where it listens"))?;
            tracing::info!(rank, pid = child.id(), %addr, "started worker");
            eprintln!("worker {rank}: pid {} listening on {addr}", child.id().unwrap_or(0));
            addrs.push(addr);
            children.push(child);
        }
        Ok(Self { children, addrs })
    }

    /// Waits up to `grace` (in all) for every worker to exit, then kills what is left.
    pub async fn stop(mut self, grace: Duration) {
        for c in &mut self.children {
            // Closing stdin asks --exit-with-stdin workers to stop.
            drop(c.stdin.take());
        }
        let deadline = tokio::time::Instant::now() + grace;
        for c in &mut self.children {
            if tokio::time::timeout_at(deadline, c.wait()).await.is_err() {
                let _ = c.kill().await;
            }
        }
    }
}

/// The address in a worker's first line, `tpserve worker listening on ADDR ...`.
pub fn parse_listening(line: &str) -> Option<String> {
    let rest = line.split_once("listening on ")?.1;
    Some(rest.split_whitespace().next()?.to_string())
}

/// Default compute threads per local worker: the cores shared out, at least one each.
pub fn threads_per_worker(explicit: Option<usize>, world: usize) -> Result<usize> {
    match explicit {
        Some(0) => bail!("--threads 0: need at least one thread"),
        Some(n) => Ok(n),
        None => {
            let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
            Ok((cores / world.max(1)).max(1))
        }
    }
}
