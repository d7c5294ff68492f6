//! The forward pass gives, bit for bit, the logits it gave before it was written over the
//! operation set (`tpserve_model::ops`, 2026-12-07): a fingerprint of every logit of a
//! batched prefill and decode on the tiny Gemma 3 and Llama models, recorded from the code
//! before that change. Its own test binary, so that it can cap the kernels to the portable
//! ones before any runs (the fingerprint must not depend on the CPU's vector units).

use tpserve_gguf::Gguf;
use tpserve_model::model::{LogitsWanted, Model};
use tpserve_model::testing::{tiny_gguf, Seqs, TinySpec};

/// FNV-1a over the bits of every logit, in order.
fn fingerprint(logits: &[Vec<f32>]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    for v in logits.iter().flatten() {
        for b in v.to_bits().to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    h
}

/// Two sequences: prefill chunks of 7 and 5 tokens (all logits, then the last), then
/// decode steps together, crossing Gemma's sliding window (8).
fn run(spec: &TinySpec) -> Vec<Vec<f32>> {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), tiny_gguf(spec)).unwrap();
    let model = Model::load(&Gguf::open(f.path()).unwrap()).unwrap();
    let a: Vec<u32> = (0..19u32).map(|i| 6 + (i * 37 + 11) % 290).collect();
    let b: Vec<u32> = (0..13u32).map(|i| 9 + (i * 53 + 5) % 280).collect();
    let mut seqs = Seqs::new(&model, 2, 32);
    let mut out = Vec::new();
    out.extend(seqs.forward(&model, &[(0, &a[..7], LogitsWanted::All), (1, &b[..5], LogitsWanted::Last)]).unwrap());
    out.extend(seqs.forward(&model, &[(0, &a[7..12], LogitsWanted::Last), (1, &b[5..], LogitsWanted::All)]).unwrap());
    for i in 12..19 {
        out.extend(seqs.forward(&model, &[(0, &a[i..i + 1], LogitsWanted::Last), (1, &a[i..i + 1], LogitsWanted::Last)]).unwrap());
    }
    out
}

#[test]
fn the_forward_pass_gives_the_logits_it_gave_before_the_operation_set() {
    // Before any kernel is chosen (this binary's only test).
    std::env::set_var("TPSERVE_KERNELS", "scalar");
    let got: Vec<(String, u64)> = [TinySpec::gemma3(), TinySpec::llama()].iter().map(|s| (format!("{:?}", s.arch), fingerprint(&run(s)))).collect();
    eprintln!("{got:x?}");
    let want = [("Gemma3", 0x9ec4_e2e9_99da_d98c), ("Llama", 0x2b5f_0164_5df9_97f0)];
    for ((arch, g), (warch, w)) in got.iter().zip(want) {
        assert_eq!((arch.as_str(), *g), (warch, w), "{arch}: the logits changed");
    }
}
