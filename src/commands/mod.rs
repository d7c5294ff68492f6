//! One module per subcommand, plus the model loading they share.

mod auth;
pub mod bench;
mod bench_plot;
pub mod cluster;
pub mod coordinator;
pub mod eval;
pub mod generate;
mod local_workers;
pub mod serve;
pub mod synth;
pub mod tokenize;
pub mod worker;

use std::io::Write;

use anyhow::{bail, Context, Result};
use tpserve_fetch as fetch;
use tpserve_gguf::Gguf;
use tpserve_tokenizer::Tokenizer;

use crate::ModelArgs;

/// A model file opened with its tokenizer (and, when asked, its weights).
pub struct Loaded {
    pub gguf: Gguf,
    pub tokenizer: std::sync::Arc<Tokenizer>,
    pub path: std::path::PathBuf,
    /// The user named the file (`--model`); otherwise it is the cached default model.
    pub explicit: bool,
}

impl Loaded {
    pub fn open(args: &ModelArgs) -> Result<Self> {
        let path = fetch::resolve_model(args.model.as_deref())?;
        let gguf = Gguf::open(&path).with_context(|| format!("cannot load model {}", path.display()))?;
        let tokenizer = Tokenizer::from_gguf(&gguf).with_context(|| format!("cannot read the tokenizer of {}", path.display()))?;
        let path = std::fs::canonicalize(&path).unwrap_or(path);
        Ok(Self { gguf, tokenizer: std::sync::Arc::new(tokenizer), path, explicit: args.model.is_some() })
    }

    pub fn config(&self) -> Result<tpserve_model::config::ModelConfig> {
        tpserve_model::config::ModelConfig::from_gguf(&self.gguf).context("cannot read the model's configuration")
    }
}

/// Runs `fut` to completion on a fresh async runtime, then drops the runtime without
/// waiting for blocking reads still in flight (a read of an open standard input never ends
/// by itself, and must not keep the process alive after Ctrl-C). One thread: the network
/// side of a step is a few small messages, and every extra thread hand-off is a wake-up.
pub fn block_on<T>(fut: impl std::future::Future<Output = Result<T>>) -> Result<T> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("cannot start the async runtime")?;
    let out = rt.block_on(fut);
    rt.shutdown_background();
    out
}

/// The compute pool: `--threads` workers (default: available cores).
pub fn thread_pool(threads: Option<usize>) -> Result<rayon::ThreadPool> {
    let n = match threads {
        Some(0) => bail!("--threads 0: need at least one thread"),
        Some(n) => n,
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
    };
    rayon::ThreadPoolBuilder::new().num_threads(n).thread_name(|i| format!("tpserve-compute-{i}")).build().context("cannot start compute threads")
}

/// Prints `path` on its own line (`model fetch`, `model path`).
pub fn print_path(path: &std::path::Path) -> Result<()> {
    writeln!(std::io::stdout().lock(), "{}", path.display()).context("cannot write to standard output")
}

/// `tpserve model info`: metadata (arrays summarised) and tensors with their types and shapes.
pub fn info(args: &ModelArgs) -> Result<()> {
    let path = fetch::resolve_model(args.model.as_deref())?;
    let g = Gguf::open(&path).with_context(|| format!("cannot load model {}", path.display()))?;
    let mut out = std::io::stdout().lock();
    let mut write = || -> std::io::Result<()> {
        writeln!(out, "{} (GGUF v{}, {} bytes)", path.display(), g.version, g.file_len())?;
        for (k, v) in &g.metadata {
            match v.as_array() {
                Some(a) => writeln!(out, "{k} = [{} items]", a.len())?,
                None => writeln!(out, "{k} = {v:?}")?,
            }
        }
        for t in g.tensors.values() {
            writeln!(out, "{:<32} {:<5} {:?}", t.name, t.dtype, t.dims)?;
        }
        Ok(())
    };
    write().context("cannot write to standard output")?;
    Ok(())
}
