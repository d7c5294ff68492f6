//! `tpserve model synth`: a GGUF model of random weights, written by the same code as the
//! tests' tiny models (`tpserve_model::testing::tiny_gguf`), for machines where the real
//! model cannot travel (the GPU check, `scripts/gpu-check.sh`) and for benchmarks of shapes
//! we have no file of. Its text is gibberish; its numbers exercise every kernel.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use tpserve_model::config::Arch;
use tpserve_model::testing::{tiny_gguf, TinySpec};

/// The shapes `synth` knows (`--preset` says what they are).
#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Preset {
    Tiny,
    Llama1b,
}

#[derive(Args, Debug)]
pub struct SynthArgs {
    /// Where to write the GGUF file.
    #[arg(long)]
    pub out: PathBuf,
    /// The shape: `tiny`, the tests' Gemma 3 that splits at tp 1, 2 and 4 (6 layers of
    /// 256, 4 heads of 256, every weight type tpserve computes with in turn); or `llama1b`,
    /// a Llama-3.2-1B shape (16 layers of 2048, FFN 8192, 32 query heads of 64 over 8 KV
    /// heads; about 1.0 B parameters) in the default model's weight types (Q5_0, Q4_K,
    /// Q6_K, Q8_0) in turn.
    #[arg(long, value_enum, default_value = "tiny")]
    pub preset: Preset,
    /// Seed of the weights: the same seed writes the same file.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

pub fn run(args: SynthArgs) -> Result<()> {
    use tpserve_model::quant::GgmlDType;
    let spec = match args.preset {
        Preset::Tiny => TinySpec { seed: args.seed, ..TinySpec::gemma3_shardable() },
        Preset::Llama1b => TinySpec {
            arch: Arch::Llama,
            n_layers: 16,
            hidden: 2048,
            ffn: 8192,
            n_heads: 32,
            n_kv_heads: 8,
            head_dim: 64,
            context_len: 4096,
            seed: args.seed,
            dtypes: vec![GgmlDType::Q5_0, GgmlDType::Q4_K, GgmlDType::Q6_K, GgmlDType::Q8_0],
            ..TinySpec::llama()
        },
    };
    if args.out.is_dir() {
        bail!("--out {} is a directory: name the file to write", args.out.display());
    }
    let bytes = tiny_gguf(&spec);
    std::fs::write(&args.out, &bytes).with_context(|| format!("cannot write {}", args.out.display()))?;
    println!("{} ({:.1} MiB, {:?})", args.out.display(), bytes.len() as f64 / (1u64 << 20) as f64, args.preset);
    Ok(())
}
