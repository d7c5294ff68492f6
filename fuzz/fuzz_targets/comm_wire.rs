//! Fuzzes what a collective connection reads from a peer before trusting it: the hello
//! (challenge, hello, verdict) and the frame header. Arbitrary bytes must never pass a MAC
//! check, a hello built from arbitrary fields must verify exactly for its own key, session,
//! pair and challenge, and a frame decodes only within the bytes present, with a length
//! checked against the expected one before anything is allocated for it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tpserve_comm::wire::{self, HelloError, FRAME_HEADER_LEN, HELLO_LEN, MAX_FRAME_BYTES, NONCE_LEN, VERDICT_LEN};

const KEY: &[u8] = b"the fuzzer's cluster token";

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let nonce_a = [0x5a; NONCE_LEN];
    let _ = wire::parse_challenge(data);

    // Raw bytes as a hello, with the session they carry (so the MAC check is reached): never
    // accepted, whatever the rank, world or key.
    let session = u64_at(data, 8);
    let world = (u64_at(data, 0) % 8) as usize + 1;
    for me in 0..world {
        match wire::verify_hello(KEY, session, me, world, &nonce_a, data) {
            Ok(h) => panic!("random bytes verified as a hello from rank {}", h.rank),
            Err(HelloError::Garbage) => assert_ne!(data.len(), HELLO_LEN),
            Err(_) => assert_eq!(data.len(), HELLO_LEN),
        }
    }
    assert!(wire::verify_verdict(KEY, session, 1, 0, &nonce_a, &[0; NONCE_LEN], data).is_err(), "random bytes verified as a verdict");

    // A hello built from arbitrary fields verifies for exactly its own parameters.
    let key = data.get(16..).unwrap_or(&[]);
    let (from, to) = (1 + (u64_at(data, 0) % 7) as usize, (u64_at(data, 1) % 8) as usize);
    let nonce_c = [data.len() as u8; NONCE_LEN];
    let h = wire::hello(key, session, from, to, &nonce_a, &nonce_c);
    let got = wire::verify_hello(key, session, to, 8, &nonce_a, &h);
    if from > to {
        let ok = got.expect("an honest hello was refused");
        assert_eq!((ok.rank, ok.nonce), (from, nonce_c));
        let v = wire::accept(key, session, to, &ok, &nonce_a);
        assert_eq!(v.len(), VERDICT_LEN);
        assert_eq!(wire::verify_verdict(key, session, from, to, &nonce_a, &nonce_c, &v), Ok(()));
    } else {
        assert!(matches!(got, Err(HelloError::UnexpectedRank { .. })), "{got:?}");
    }
    let mut other_key = key.to_vec();
    other_key.push(0);
    assert!(wire::verify_hello(&other_key, session, to, 8, &nonce_a, &h).is_err());
    assert!(wire::verify_hello(key, session.wrapping_add(1), to, 8, &nonce_a, &h).is_err());

    // Frames: every header is checked before its body; a decoded frame lies inside the input.
    for expected in [None, Some((u64_at(data, 0) % 1024) as usize)] {
        if let Some(h) = data.get(..FRAME_HEADER_LEN) {
            if let Ok(n) = wire::frame_len(h.try_into().expect("8 bytes"), expected) {
                assert!(4 * n as u64 <= MAX_FRAME_BYTES);
                assert!(expected.is_none_or(|e| e == n));
            }
        }
        if let Ok((values, used)) = wire::decode_frame(data, expected) {
            assert_eq!(used, FRAME_HEADER_LEN + 4 * values.len());
            assert!(used <= data.len());
            assert_eq!(wire::frame_header(values.len())[..], data[..FRAME_HEADER_LEN]);
        }
    }
});
