//! Writes the seed corpus of the `gguf_parse` fuzz target into `corpus/gguf_parse/` (or the
//! folder given as the first argument): small tiny-model files of both architectures (their
//! SentencePiece-style vocabulary), one file with every metadata value type and every
//! supported tensor type, and one byte-level BPE (`gpt2`) tokenizer with merges. Both fuzz
//! targets use the same seeds.

use std::path::PathBuf;

use tpserve_gguf::{GgufWriter, Value};
use tpserve_model::config::Arch;
use tpserve_model::quant::{quantize, GgmlDType, SUPPORTED};
use tpserve_model::testing::{tiny_gguf, TinySpec};

fn main() -> std::io::Result<()> {
    let dir = std::env::args_os().nth(1).map(PathBuf::from).unwrap_or_else(|| PathBuf::from("corpus/gguf_parse"));
    std::fs::create_dir_all(&dir)?;
    // Narrow tiny models (32-element blocks only) so each seed is tens of kilobytes, not megabytes.
    let small = |arch: Arch, dtypes: Vec<GgmlDType>| TinySpec {
        arch,
        n_layers: 1,
        hidden: 64,
        ffn: 64,
        n_heads: 2,
        n_kv_heads: 1,
        head_dim: 32,
        context_len: 64,
        sliding_window: 4,
        seed: 3,
        dtypes,
        embed_range: 1.0,
    };
    let seeds = [
        ("tiny_gemma3.gguf", tiny_gguf(&small(Arch::Gemma3, vec![GgmlDType::Q8_0, GgmlDType::Q4_0, GgmlDType::F16, GgmlDType::F32]))),
        ("tiny_llama.gguf", tiny_gguf(&small(Arch::Llama, vec![GgmlDType::Q5_0, GgmlDType::BF16]))),
        ("all_types.gguf", all_types()),
        ("gpt2_tokenizer.gguf", gpt2_tokenizer()),
    ];
    for (name, bytes) in seeds {
        let path = dir.join(name);
        std::fs::write(&path, &bytes)?;
        println!("{} ({} bytes)", path.display(), bytes.len());
    }
    Ok(())
}

/// Every metadata value type (nested arrays included) and one small tensor of each type
/// tpserve computes with, 1-D and 2-D.
fn all_types() -> Vec<u8> {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("gemma3".into()))
        .meta("general.alignment", Value::U32(32))
        .meta("u8", Value::U8(7))
        .meta("i8", Value::I8(-7))
        .meta("u16", Value::U16(700))
        .meta("i16", Value::I16(-700))
        .meta("u32", Value::U32(70_000))
        .meta("i32", Value::I32(-70_000))
        .meta("u64", Value::U64(1 << 40))
        .meta("i64", Value::I64(-(1 << 40)))
        .meta("f32", Value::F32(0.5))
        .meta("f64", Value::F64(-0.25))
        .meta("bool", Value::Bool(true))
        .meta("string", Value::String("héllo ▁world".into()))
        .meta("array.u32", Value::Array(vec![Value::U32(1), Value::U32(2), Value::U32(3)]))
        .meta("array.string", Value::Array(vec![Value::String("<bos>".into()), Value::String("a".into())]))
        .meta("array.empty", Value::Array(vec![]))
        .meta("array.nested", Value::Array(vec![Value::Array(vec![Value::I16(1), Value::I16(-1)]), Value::Array(vec![Value::I16(2)])]));
    for (i, dtype) in SUPPORTED.iter().enumerate() {
        let n = dtype.block_size().max(8);
        let values: Vec<f32> = (0..2 * n).map(|k| ((k * 37 + i) % 17) as f32 / 8.0 - 1.0).collect();
        let two_rows = quantize(*dtype, &values).expect("whole blocks");
        let one_row = quantize(*dtype, &values[..n]).expect("whole blocks");
        w.tensor(&format!("t{i}.{dtype}.matrix"), &[n as u64, 2], *dtype, two_rows);
        w.tensor(&format!("t{i}.{dtype}.vector"), &[n as u64], *dtype, one_row);
    }
    w.to_bytes()
}

/// A byte-level BPE vocabulary (GPT-2's byte-to-character map), a few merges and two
/// control tokens, with the Llama 3 pre-tokenizer; metadata only.
fn gpt2_tokenizer() -> Vec<u8> {
    // GPT-2 maps printable bytes to themselves and the rest to U+0100 onwards.
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
    let mut next = 0x100u32;
    let mut tokens: Vec<String> = (0..=255u8)
        .map(|b| {
            if printable(b) {
                char::from(b).to_string()
            } else {
                next += 1;
                char::from_u32(next - 1).expect("valid code point").to_string()
            }
        })
        .collect();
    let merges = ["h e", "l l", "he ll", "hell o", "\u{120} w", "o r", "\u{120}w or", "l d", "\u{120}wor ld"];
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    for special in ["<|begin_of_text|>", "<|eot_id|>"] {
        tokens.push(special.to_owned());
        types.push(3);
    }
    let n = tokens.len();
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()))
        .meta("tokenizer.ggml.model", Value::String("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::String("llama-bpe".into()))
        .meta("tokenizer.ggml.tokens", Value::Array(tokens.into_iter().map(Value::String).collect()))
        .meta("tokenizer.ggml.token_type", Value::Array(types.into_iter().map(Value::I32).collect()))
        .meta("tokenizer.ggml.merges", Value::Array(merges.iter().map(|m| Value::String((*m).to_owned())).collect()))
        .meta("tokenizer.ggml.bos_token_id", Value::U32(n as u32 - 2))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(n as u32 - 1));
    w.to_bytes()
}
