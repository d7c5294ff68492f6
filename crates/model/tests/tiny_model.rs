//! The loader and forward pass on tiny random-weight models written by the test itself.

mod common;

use tpserve_gguf::{Gguf, GgufError, GgufWriter, Value};
use tpserve_model::model::{LogitsWanted, Model, ModelError};
use tpserve_model::testing::{tiny_gguf, Seqs, TinySpec};

fn load(bytes: &[u8]) -> Result<Model, ModelError> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), bytes).unwrap();
    let g = Gguf::open(f.path())?;
    Model::load(&g)
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn prompt(n: usize) -> Vec<u32> {
    (0..n as u32).map(|i| 6 + (i * 37 + 11) % 290).collect()
}

/// All logits of a prompt run through in chunks of `chunk` tokens.
fn logits_in_chunks(model: &Model, tokens: &[u32], chunk: usize) -> Vec<f32> {
    let mut seqs = Seqs::new(model, 1, tokens.len());
    let mut all = Vec::new();
    for piece in tokens.chunks(chunk) {
        all.extend(seqs.forward(model, &[(0, piece, LogitsWanted::All)]).unwrap().remove(0));
    }
    all
}

#[test]
fn chunked_prefill_equals_one_shot_prefill_on_tiny_gemma_and_llama() {
    for spec in [TinySpec::gemma3(), TinySpec::llama()] {
        let model = load(&tiny_gguf(&spec)).unwrap();
        // 29 tokens: longer than the sliding window (8) so local layers forget keys.
        let tokens = prompt(29);
        let one_shot = logits_in_chunks(&model, &tokens, 29);
        assert!(one_shot.iter().all(|v| v.is_finite()));
        for chunk in [1, 5, 8, 13] {
            let chunked = logits_in_chunks(&model, &tokens, chunk);
            // Every kernel is batch-invariant, so this holds bit for bit, not just closely.
            let d = max_diff(&one_shot, &chunked);
            assert!(d == 0.0, "{:?}: chunk {chunk} differs from one shot by {d}", spec.arch);
        }
    }
}

#[test]
fn a_batch_of_sequences_equals_each_sequence_alone() {
    let model = load(&tiny_gguf(&TinySpec::gemma3())).unwrap();
    let a = prompt(17);
    let b: Vec<u32> = prompt(11).into_iter().rev().collect();
    let alone_a = logits_in_chunks(&model, &a, 17);
    let alone_b = logits_in_chunks(&model, &b, 11);
    let mut seqs = Seqs::new(&model, 2, 17);
    let out = seqs.forward(&model, &[(0, &a, LogitsWanted::All), (1, &b, LogitsWanted::Last)]).unwrap();
    assert_eq!(max_diff(&out[0], &alone_a), 0.0);
    let v = model.config().vocab;
    assert_eq!(max_diff(&out[1], &alone_b[alone_b.len() - v..]), 0.0);
}

#[test]
fn the_sliding_window_changes_what_local_layers_see() {
    // Same weights, window 8 vs a window longer than the prompt: the logits of late
    // positions must differ, the first 8 positions must not.
    let short = TinySpec::gemma3();
    let long = TinySpec { sliding_window: 4096, ..TinySpec::gemma3() };
    let (ms, ml) = (load(&tiny_gguf(&short)).unwrap(), load(&tiny_gguf(&long)).unwrap());
    let tokens = prompt(20);
    let (ls, ll) = (logits_in_chunks(&ms, &tokens, 20), logits_in_chunks(&ml, &tokens, 20));
    let v = ms.config().vocab;
    assert!(max_diff(&ls[..8 * v], &ll[..8 * v]) < 1e-5);
    assert!(max_diff(&ls[19 * v..], &ll[19 * v..]) > 1e-3);
}

#[test]
fn a_context_overflow_or_bad_token_is_an_error_that_leaves_the_cache_alone() {
    let model = load(&tiny_gguf(&TinySpec::llama())).unwrap();
    let mut seqs = Seqs::new(&model, 2, 513);
    let too_long = prompt(513);
    let e = seqs.forward(&model, &[(0, &too_long, LogitsWanted::Last)]);
    assert!(matches!(e, Err(ModelError::ContextOverflow { pos: 513, max: 512 }) | Err(ModelError::Kv(_))), "{e:?}");
    let bad = [5u32, 100_000];
    assert!(matches!(seqs.forward(&model, &[(0, &bad, LogitsWanted::Last)]), Err(ModelError::BadToken { id: 100_000, .. })));
    assert_eq!(seqs.len(0), 0);
    // A sequence with nothing new cannot have logits (it would read a neighbour's).
    assert!(matches!(seqs.forward(&model, &[(0, &[], LogitsWanted::Last), (1, &[5], LogitsWanted::Last)]), Err(ModelError::EmptySequence)));
    assert_eq!(seqs.len(1), 0);
}

fn err_of(bytes: &[u8]) -> String {
    match load(bytes) {
        Ok(_) => panic!("a malformed file loaded"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn malformed_files_give_clear_errors_not_panics() {
    let good = tiny_gguf(&TinySpec::llama());
    // Truncated at many points: header, metadata, tensor directory, tensor data.
    for cut in [0, 3, 10, 30, 200, 5_000, good.len() / 2, good.len() - 1] {
        let msg = err_of(&good[..cut]);
        assert!(msg.contains("truncated") || msg.contains("outside the file") || msg.contains("magic"), "cut {cut}: {msg}");
    }
    let mut bad_magic = good.clone();
    bad_magic[..4].copy_from_slice(b"GGML");
    assert!(err_of(&bad_magic).contains("not a GGUF file"));

    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("mamba".into()));
    assert!(err_of(&w.to_bytes()).contains("unsupported model architecture \"mamba\""));
}

#[test]
fn a_missing_tensor_or_a_wrong_shape_is_named_in_the_error() {
    // Rebuild the tiny model without one tensor, and with one tensor of the wrong shape.
    let bytes = tiny_gguf(&TinySpec::llama());
    let (meta, tensors) = Gguf::parse_bytes(&bytes).unwrap();
    let rebuild = |skip: &str, reshape: Option<&str>| {
        let mut w = GgufWriter::new();
        for (k, v) in &meta {
            w.meta(k, v.clone());
        }
        for t in tensors.values() {
            if t.name == skip {
                continue;
            }
            let data = bytes[t.offset as usize..(t.offset + t.nbytes) as usize].to_vec();
            let mut dims = t.dims.clone();
            if Some(t.name.as_str()) == reshape {
                dims.reverse();
            }
            w.tensor(&t.name, &dims, t.dtype, data);
        }
        w.to_bytes()
    };
    let msg = err_of(&rebuild("blk.1.ffn_up.weight", None));
    assert!(msg.contains("no tensor named \"blk.1.ffn_up.weight\""), "{msg}");
    let msg = err_of(&rebuild("", Some("blk.0.ffn_down.weight")));
    assert!(msg.contains("blk.0.ffn_down.weight") && msg.contains("shape"), "{msg}");
}

#[test]
fn unknown_tensor_types_are_refused_by_name() {
    let mut w = GgufWriter::new();
    w.meta("general.architecture", Value::String("llama".into()));
    let mut bytes = w.tensor("x", &[32], tpserve_gguf::GgmlDType::F32, vec![0; 128]).to_bytes();
    // Patch the type id (it follows the name, n_dims and one dim) to 99.
    let name_at = bytes.windows(9).position(|w| w == b"\x01\0\0\0\0\0\0\0x").unwrap();
    let type_at = name_at + 9 + 4 + 8;
    bytes[type_at..type_at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = Gguf::parse_bytes(&bytes).unwrap_err();
    assert!(matches!(err, GgufError::UnknownType { id: 99, .. }), "{err}");
}

#[test]
fn prefault_repacks_what_the_forward_multiplies_so_a_request_repacks_nothing() {
    // Every tensor Q8_0 (a repacked type) and the head tied to the embedding, as in Gemma 3:
    // the embedding is read a row per token and must not be repacked; the head, its own
    // matrix over the same bytes, must be, at load and not on the first request.
    let model = load(&tiny_gguf(&TinySpec { dtypes: vec![tpserve_model::quant::GgmlDType::Q8_0], ..TinySpec::gemma3() })).unwrap();
    let repacked = model.prefault(|_, _| {});
    assert_eq!(repacked, model.repacked_bytes());
    let kernels = tpserve_model::quant::kernel_name();
    if repacked == 0 {
        // The row kernels on a system without transparent huge pages: no copy is made.
        eprintln!("the {kernels} kernels read the file's blocks as they are: nothing to check here");
        return;
    }
    // The layers' and the head's Q8_0 rows, padded to groups of 16 rows and 64-byte lines
    // (or, with the row kernels, copied as they are): the embedding's own copy would double
    // the head's share.
    let weights = model.weight_bytes() as usize;
    assert!(repacked <= weights + weights / 8, "{repacked} bytes repacked for {weights} bytes of weights ({kernels})");
    Seqs::new(&model, 1, 16).forward(&model, &[(0, &prompt(9), LogitsWanted::Last)]).unwrap();
    assert_eq!(model.repacked_bytes(), repacked, "the forward pass repacked a matrix that prefault did not ({kernels})");
}
