//! `tpserve`: the command line. Parsing and dispatch only; the work lives in the crates.

mod commands;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use tpserve_fetch as fetch;

/// Serve large language models from a cluster of tensor- and pipeline-parallel workers.
#[derive(Parser)]
#[command(name = "tpserve", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Manage the model cache.
    Model {
        #[command(subcommand)]
        action: ModelAction,
    },
    /// Generate text from a prompt, streaming it to stdout.
    Generate(commands::generate::GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(commands::tokenize::TokenizeArgs),
    /// Start a worker that waits to be told which shard to load (or joins a coordinator).
    Worker(commands::worker::WorkerArgs),
    /// Plan the sharding, load it onto running workers, then serve requests.
    Coordinator(commands::coordinator::CoordinatorArgs),
    /// Start a coordinator and tp x pp local workers on loopback with one command.
    Up(commands::coordinator::UpArgs),
    /// Load-test any OpenAI-compatible server (vLLM bench serve's metrics).
    Bench(Box<commands::bench::BenchArgs>),
    /// Measure the accuracy of what the cluster serves (perplexity, KL divergence).
    Eval {
        #[command(subcommand)]
        command: commands::eval::EvalCommand,
    },
}

#[derive(Subcommand)]
enum ModelAction {
    /// Download the default model (Gemma 3 270M Q4_K_M) into $TPSERVE_HOME/models and verify it.
    Fetch {
        /// Download again even if a verified copy is cached.
        #[arg(long)]
        force: bool,
    },
    /// Print the path of the default model in the cache (fetching it if needed).
    Path,
    /// Print a model file's metadata and tensor directory.
    Info(ModelArgs),
    /// Write a model of random weights (the GPU check's models: the real one cannot travel).
    Synth(commands::synth::SynthArgs),
}

/// Which model to load and how many threads to compute with.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// A GGUF model file; without it the default model is fetched and cached.
    #[arg(long, env = "TPSERVE_MODEL")]
    pub model: Option<PathBuf>,
    /// Compute threads (default: the number of available cores).
    #[arg(long, env = "TPSERVE_THREADS")]
    pub threads: Option<usize>,
}

/// Keeps freed memory in this process for the next step instead of handing it back to the
/// kernel. glibc serves allocations from 128 KiB up (a step's logits, 16 MiB at 32 rows, and its
/// scratch buffers) with fresh `mmap`s and trims the heap's top after a free, so every step
/// page-faulted and zeroed them anew: 7-10% of a tp = 2 worker's time at 32 clients (`perf
/// record`: `clear_page_erms`, `exc_page_fault`). Raising both thresholds to glibc's maximum
/// (32 MiB) makes those buffers heap memory that is reused; what a process holds stays about
/// its high-water mark, which is what it holds at a busy step anyway.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets the allocator's tuning parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
    }
}

fn main() {
    use std::io::IsTerminal;
    keep_freed_memory();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never into a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Model { action: ModelAction::Fetch { force } } => fetch::fetch_default(force).map_err(Into::into).and_then(|p| commands::print_path(&p)),
        Command::Model { action: ModelAction::Path } => fetch::fetch_default(false).map_err(Into::into).and_then(|p| commands::print_path(&p)),
        Command::Model { action: ModelAction::Info(args) } => commands::info(&args),
        Command::Model { action: ModelAction::Synth(args) } => commands::synth::run(args),
        Command::Generate(args) => commands::generate::run(args),
        Command::Tokenize(args) => commands::tokenize::run(args),
        Command::Worker(args) => commands::worker::run(args),
        Command::Coordinator(args) => commands::coordinator::run_coordinator(args),
        Command::Up(args) => commands::coordinator::run_up(args),
        Command::Eval { command } => commands::eval::run(command),
        Command::Bench(args) => commands::bench::run(*args),
    };
    if let Err(e) = result {
        // A closed stdout (`tpserve model info | head`) means the reader has seen enough.
        if is_broken_pipe(&e) {
            std::process::exit(0);
        }
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

/// Whether the error comes from writing to a pipe whose reader has gone.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe))
}
