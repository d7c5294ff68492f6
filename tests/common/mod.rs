//! What the end-to-end tests share: the binary with a clean environment, a spawned process
//! whose output lines arrive on channels (killed with every worker it reported when
//! dropped), and tiny models written to a temporary directory.
#![allow(dead_code, unused_imports)] // each test binary uses its own part of it

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod netns;
use tempfile::TempDir;
use tpserve_model::testing::{tiny_gguf, TinySpec};

/// Longest wait for any one answer or process exit.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// The binary, with none of the environment variables that would change what it does.
pub fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_tpserve"));
    for v in [
        "TPSERVE_MODEL",
        "TPSERVE_THREADS",
        "TPSERVE_TP",
        "TPSERVE_PP",
        "TPSERVE_MAX_TOKENS",
        "TPSERVE_WORKERS",
        "TPSERVE_JOIN",
        "TPSERVE_CLUSTER_TOKEN",
        "TPSERVE_CLUSTER_TOKEN_FILE",
        "TPSERVE_MODEL_DIR",
        "TPSERVE_INSECURE",
        "TPSERVE_FETCH_WITH",
        "TPSERVE_INDEX_URL",
        "RUST_LOG",
        "RUST_BACKTRACE",
    ] {
        c.env_remove(v);
    }
    c
}

/// What a finished child printed.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn assert_success(&self) {
        assert_eq!(self.code, Some(0), "tpserve failed\nstdout:\n{}\nstderr:\n{}", self.stdout, self.stderr);
    }

    /// A clean failure: non-zero exit, no panic, and one `error: ...` line that contains every
    /// one of `needles`.
    pub fn assert_clean_error(&self, needles: &[&str]) {
        assert!(self.code.is_some_and(|c| c != 0), "expected a failure, got exit {:?}\nstdout:\n{}\nstderr:\n{}", self.code, self.stdout, self.stderr);
        assert!(!self.stderr.contains("panicked"), "tpserve panicked:\n{}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        assert_eq!(lines.len(), 1, "expected one line on stderr, got:\n{}", self.stderr);
        assert!(lines[0].starts_with("error: "), "stderr does not start with `error: `:\n{}", self.stderr);
        for n in needles {
            assert!(lines[0].contains(n), "the error does not mention {n:?}:\n{}", self.stderr);
        }
    }
}

/// Runs `cmd` to its end, feeding it `stdin` (else no input); with `close_stdout` the read end
/// of its stdout is closed at once, as `cmd | head -0` would. Killed after [`DEADLINE`].
pub fn run_to_end(mut cmd: Command, stdin: Option<&str>, close_stdout: bool) -> Output {
    cmd.stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() }).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn tpserve");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).expect("write stdin");
        // Dropping the pipe closes it, so the child sees end-of-file.
    }
    // Drain both pipes on threads so a chatty child cannot block on a full pipe.
    let drain = |mut r: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = r.read_to_end(&mut buf);
            String::from_utf8_lossy(&buf).into_owned()
        })
    };
    let stdout = child.stdout.take().expect("piped stdout");
    let out_thread = if close_stdout {
        drop(stdout);
        std::thread::spawn(String::new)
    } else {
        drain(Box::new(stdout))
    };
    let err_thread = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let start = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll tpserve") {
            break status;
        }
        if start.elapsed() > DEADLINE {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err_thread.join().unwrap_or_default();
            panic!("tpserve {:?} did not finish within {DEADLINE:?}; killed it. stderr:\n{stderr}", cmd.get_args().collect::<Vec<_>>());
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { code: status.code(), stdout: out_thread.join().expect("stdout reader"), stderr: err_thread.join().expect("stderr reader") }
}

/// A running process whose stdout lines and stderr lines arrive on channels.
pub struct Proc {
    pub child: Child,
    pub stdin: Option<ChildStdin>,
    pub out: Receiver<String>,
    pub err: Receiver<String>,
    /// Every stderr line so far, for failure messages.
    log: Arc<Mutex<String>>,
    /// Worker pids it reported (`worker N: pid P ...`), killed on drop too.
    pub pids: Vec<u32>,
}

impl Proc {
    pub fn spawn(mut cmd: Command) -> Proc {
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn tpserve");
        let stdin = child.stdin.take();
        let log = Arc::new(Mutex::new(String::new()));
        let lines = |r: Box<dyn std::io::Read + Send>, log: Option<Arc<Mutex<String>>>| {
            let (tx, rx) = channel();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    if let Some(log) = &log {
                        let mut g = log.lock().unwrap();
                        g.push_str(&l);
                        g.push('\n');
                    }
                    let _ = tx.send(l);
                }
            });
            rx
        };
        let out = lines(Box::new(child.stdout.take().unwrap()), None);
        let err = lines(Box::new(child.stderr.take().unwrap()), Some(log.clone()));
        Proc { child, stdin, out, err, log, pids: Vec::new() }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits for a stderr line containing `needle`, remembering worker pids on the way.
    pub fn wait_stderr(&mut self, needle: &str) -> String {
        let start = Instant::now();
        loop {
            let left = DEADLINE.saturating_sub(start.elapsed());
            match self.err.recv_timeout(left) {
                Ok(l) => {
                    if let Some(pid) =
                        l.strip_prefix("worker ").and_then(|r| r.split_once(": pid ")).and_then(|(_, p)| p.split_whitespace().next()?.parse().ok())
                    {
                        self.pids.push(pid);
                    }
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("no stderr line with {needle:?} within {DEADLINE:?}; stderr:\n{}", self.log()),
            }
        }
    }

    /// Sends one request line and waits for its answer line.
    pub fn ask(&mut self, req: &Value) -> Value {
        let stdin = self.stdin.as_mut().expect("stdin open");
        writeln!(stdin, "{req}").and_then(|()| stdin.flush()).expect("write request");
        self.answer(DEADLINE)
    }

    pub fn answer(&mut self, within: Duration) -> Value {
        match self.out.recv_timeout(within) {
            Ok(l) => serde_json::from_str(&l).unwrap_or_else(|e| panic!("answer {l:?} is not JSON: {e}")),
            Err(_) => panic!("no answer within {within:?}; stderr:\n{}", self.log()),
        }
    }

    /// Waits up to `within` for the process to exit; `why` says what should have ended it.
    pub fn wait_exit(&mut self, within: Duration, why: &str) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code();
            }
            assert!(start.elapsed() < within, "tpserve did not exit after {why} within {within:?}; stderr:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes stdin and waits for the exit status.
    pub fn finish(mut self) -> (Option<i32>, String) {
        drop(self.stdin.take());
        let code = self.wait_exit(DEADLINE, "its stdin closed");
        (code, self.log())
    }
}

/// Waits up to `within` for process `pid` to be gone.
pub fn wait_gone(pid: u32, within: Duration) {
    let start = Instant::now();
    while pid_alive(pid) {
        assert!(start.elapsed() < within, "process {pid} did not exit within {within:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        for &pid in &self.pids {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
        }
    }
}

pub fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists() && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"))
}

pub fn tiny(dir: &TempDir, name: &str, spec: &TinySpec) -> PathBuf {
    let p = dir.path().join(name);
    std::fs::write(&p, tiny_gguf(spec)).unwrap();
    p
}

pub use tpserve_fetch::testing::default_model;

/// The first `n` prompts of llama.cpp's reference outputs (`tests/data/reference`).
pub fn shared_prompts(n: usize) -> Vec<String> {
    tpserve_fetch::testing::reference("greedy.jsonl").into_iter().take(n).map(|v| v["prompt"].as_str().unwrap().to_string()).collect()
}

/// `tpserve worker --listen 127.0.0.1:0 --threads 1 extra..` and the address it listens on.
pub fn worker(extra: &[&str]) -> (Proc, String) {
    let mut c = bin();
    c.args(["worker", "--listen", "127.0.0.1:0", "--threads", "1"]).args(extra);
    let w = Proc::spawn(c);
    let line = w.out.recv_timeout(DEADLINE).expect("the worker says where it listens");
    let addr = line.split_once("listening on ").unwrap().1.split_whitespace().next().unwrap().to_string();
    (w, addr)
}

/// A server's HTTP side (shared by the threads of a test).
pub struct Http {
    pub url: String,
    pub agent: ureq::Agent,
}

impl Http {
    pub fn post_raw(&self, path: &str, body: &str, key: Option<&str>) -> (u16, Value) {
        let mut r = self.agent.post(&format!("{}{path}", self.url)).set("Content-Type", "application/json");
        if let Some(k) = key {
            r = r.set("Authorization", &format!("Bearer {k}"));
        }
        match r.send_string(body) {
            Ok(resp) => (resp.status(), resp.into_json().expect("a JSON answer")),
            Err(ureq::Error::Status(code, resp)) => (code, resp.into_json().expect("a JSON error body")),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.post_raw(path, &body.to_string(), None)
    }

    /// A successful completion's text.
    pub fn text(&self, body: &Value) -> String {
        let (code, v) = self.post("/v1/completions", body);
        assert_eq!(code, 200, "{v}");
        v["choices"][0]["text"].as_str().unwrap().to_string()
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        match self.agent.get(&format!("{}{path}", self.url)).call() {
            Ok(r) => (r.status(), r.into_string().unwrap()),
            Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap()),
            Err(e) => panic!("GET {path}: {e}"),
        }
    }

    /// POSTs `body` (or GETs, without one) and returns the status, the `Content-Type` and
    /// the body as JSON (as a JSON string when it is not JSON).
    pub fn exchange(&self, path: &str, body: Option<&str>) -> (u16, Option<String>, Value) {
        let url = format!("{}{path}", self.url);
        let r = match body {
            Some(b) => self.agent.post(&url).set("Content-Type", "application/json").send_string(b),
            None => self.agent.get(&url).call(),
        };
        let resp = match r {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{path}: {e}"),
        };
        let (code, content_type) = (resp.status(), resp.header("content-type").map(str::to_string));
        let text = resp.into_string().unwrap();
        (code, content_type, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric(&self.get("/metrics").1, name)
    }

    /// Polls `what` until it holds, or fails after the deadline.
    pub fn eventually(&self, what: &str, mut f: impl FnMut(&Http) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < DEADLINE, "{what} never happened; metrics:\n{}", self.get("/metrics").1);
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Server-sent events of a streaming request, as JSON values until `[DONE]`; stops
    /// reading (and drops the connection) after `max` events.
    pub fn stream(&self, path: &str, body: &Value, max: usize) -> Vec<Value> {
        let resp = self.agent.post(&format!("{}{path}", self.url)).send_json(body.clone()).expect("a streaming answer");
        assert_eq!(resp.header("content-type"), Some("text/event-stream"));
        let mut out = Vec::new();
        for line in BufReader::new(resp.into_reader()).lines() {
            let line = line.unwrap();
            let Some(data) = line.strip_prefix("data: ") else { continue };
            if data == "[DONE]" || out.len() >= max {
                break;
            }
            out.push(serde_json::from_str(data).unwrap());
        }
        out
    }
}

/// The value of a Prometheus sample named exactly `name` (labels included); 0 if absent.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines().find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')).map(|v| v.trim().parse().unwrap())).unwrap_or(0.0)
}
