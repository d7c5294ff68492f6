//! Fuzzes the tokenizer a model file describes: the bytes are written to a file and opened as
//! `tpserve` opens a model (mmap), then `Tokenizer::from_gguf` must build or fail with an
//! error. When it builds, encoding fixed texts and the vocabulary's own pieces must give ids
//! inside the vocabulary, and streamed detokenization must equal `decode`, as documented.
//!
//! `ModelConfig::from_gguf` is not called: it still aborts on absurd `block_count` values
//! (see the ignored test in `tests/cli.rs`), which would stop every run at once.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tpserve_gguf::Gguf;
use tpserve_tokenizer::{StreamDecoder, Tokenizer};

/// One scratch file per fuzzing process (in memory when `/dev/shm` exists).
fn scratch() -> &'static PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let dir = PathBuf::from("/dev/shm");
        let dir = if dir.is_dir() { dir } else { std::env::temp_dir() };
        dir.join(format!("tpserve-fuzz-{}.gguf", std::process::id()))
    })
}

const TEXTS: [&str; 4] = ["hello world", "<start_of_turn>user\nHi!<end_of_turn>\n", "  \u{1F642} caf\u{e9}\n\n\t<bos>x", ""];

fuzz_target!(|data: &[u8]| {
    std::fs::write(scratch(), data).expect("write the input to the scratch file");
    let Ok(gguf) = Gguf::open(scratch()) else {
        return;
    };
    let Ok(tok) = Tokenizer::from_gguf(&gguf) else {
        return;
    };
    let n = tok.vocab_size();
    assert!(n > 0);
    let pieces: String = (0..n.min(64) as u32).filter_map(|i| tok.token_str(i)).collect();
    for text in TEXTS.iter().copied().chain([pieces.as_str()]) {
        for (add_bos, parse_special) in [(true, true), (false, false)] {
            let ids = tok.encode(text, add_bos, parse_special);
            assert!(ids.iter().all(|&id| (id as usize) < n), "{text:?} encoded to ids outside the {n}-token vocabulary: {ids:?}");
            let whole = tok.decode(&ids);
            let mut stream = StreamDecoder::new(&tok);
            let mut streamed: String = ids.iter().map(|&id| stream.push(id)).collect();
            streamed.push_str(&stream.finish());
            assert_eq!(streamed, whole, "streamed and whole decoding of {ids:?} differ");
            for &id in &ids {
                let _ = (tok.is_eog(id), tok.token_type(id));
            }
        }
    }
});
