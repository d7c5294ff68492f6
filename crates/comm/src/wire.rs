//! The bytes on a collective connection, as pure functions (no sockets), so tests and the
//! fuzz target (`fuzz/fuzz_targets/comm_wire.rs`) can feed them anything.
//!
//! **The hello** (one per connection, the higher rank connecting to the lower):
//!
//! ```text
//! acceptor  → connector  challenge: "TPC1", nonce_a (16 random bytes)                  20 B
//! connector → acceptor   hello:     rank (u64 LE), session (u64 LE), nonce_c (16 B),
//!                                   HMAC-SHA256(K, "tpserve-comm hello v1" ‖ session ‖
//!                                               connector rank ‖ acceptor rank ‖
//!                                               nonce_a ‖ nonce_c)                       64 B
//! acceptor  → connector  verdict:   1 (accepted), then HMAC-SHA256(K, "tpserve-comm
//!                                   accept v1" ‖ session ‖ acceptor rank ‖ connector rank
//!                                   ‖ nonce_a ‖ nonce_c); or a refusal code, then zeros    33 B
//! ```
//!
//! The key is the cluster token's bytes (empty when none is configured) and K = SHA-256(key)
//! (so keys that differ only in trailing zeros stay distinct); neither crosses the wire. The
//! MAC names both ranks, so a hello for one pair is refused by any other, and covers the
//! acceptor's fresh nonce, so a captured hello is refused even by the same rank in the same
//! session. The verdict's MAC covers the connector's nonce: a listener that does not
//! know the key cannot pass for a peer either. Every field has a fixed size, so the MAC's
//! input is unambiguous. MACs are compared in constant time.
//!
//! **A frame** is a u64 LE byte length, then that many bytes of little-endian f32.
//! [`frame_len`] checks a header before anything is allocated for its body.

use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

type HmacSha256 = Hmac<Sha256>;

/// Bytes of a random nonce (each side's contribution to a hello).
pub const NONCE_LEN: usize = 16;
/// Bytes of an HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Opens every challenge: "tpserve collective, hello version 1", so a connection to
/// something that is not a tpserve collective fails at once.
pub const MAGIC: [u8; 4] = *b"TPC1";
/// Bytes of the acceptor's challenge: [`MAGIC`] then its nonce.
pub const CHALLENGE_LEN: usize = MAGIC.len() + NONCE_LEN;
/// Bytes of the connector's hello: rank, session, its nonce, its tag.
pub const HELLO_LEN: usize = 8 + 8 + NONCE_LEN + TAG_LEN;
/// Bytes of the acceptor's verdict: a code, then a tag (zeros on a refusal).
pub const VERDICT_LEN: usize = 1 + TAG_LEN;
/// Bytes of a frame's length header.
pub const FRAME_HEADER_LEN: usize = 8;
/// Frames longer than this are refused as corrupt, whatever the operation expects.
pub const MAX_FRAME_BYTES: u64 = 1 << 32;

const HELLO_DOMAIN: &[u8] = b"tpserve-comm hello v1";
const ACCEPT_DOMAIN: &[u8] = b"tpserve-comm accept v1";

/// Why a hello (or its verdict) was refused. The acceptor sends its refusal's
/// [`code`](HelloError::code) back, so the connector can tell a stale session (retry) from a
/// wrong token (give up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HelloError {
    /// The bytes are not a hello of this protocol (wrong length or magic): not a peer.
    #[error("not a tpserve collective hello")]
    Garbage,
    /// A hello of another load: a leftover of an earlier attempt, or a peer that is already
    /// at the next one.
    #[error("hello for session {got}, this load is session {want}")]
    StaleSession {
        /// The session in the hello.
        got: u64,
        /// This load's session.
        want: u64,
    },
    /// The MAC does not verify: the sender does not hold this cluster's token (or claims a
    /// rank it is not).
    #[error("hello claiming rank {claimed} does not prove the cluster token")]
    BadProof {
        /// The rank the hello claims (unauthenticated: for the log only).
        claimed: u64,
    },
    /// A proven hello from a rank this side does not accept from (not above it, or not in
    /// the world): the ranks disagree about the world.
    #[error("hello from rank {claimed}, this rank {me} accepts only ranks {me}+1..{world}")]
    UnexpectedRank {
        /// The rank the hello proved.
        claimed: u64,
        /// The accepting rank.
        me: usize,
        /// The world size the acceptor was given.
        world: usize,
    },
    /// The acceptor refused the hello with this code (see [`HelloError::code`]).
    #[error("{}", refusal_text(*.0))]
    Refused(u8),
    /// The acceptor's verdict carries a MAC that does not verify: whatever listens at the
    /// peer's address does not hold the cluster token.
    #[error("the listener does not prove the cluster token")]
    BadVerdict,
}

impl HelloError {
    /// The refusal code the acceptor sends back for this error (never 1, which is "accepted").
    pub fn code(&self) -> u8 {
        match self {
            HelloError::StaleSession { .. } => 2,
            HelloError::BadProof { .. } => 3,
            HelloError::UnexpectedRank { .. } => 4,
            HelloError::Refused(c) => *c,
            HelloError::Garbage | HelloError::BadVerdict => 5,
        }
    }

    /// True when a retry may succeed: the acceptor is at another session (an earlier or a
    /// later load), not refusing this rank's token.
    pub fn is_stale(&self) -> bool {
        matches!(self, HelloError::StaleSession { .. } | HelloError::Refused(2))
    }
}

fn refusal_text(code: u8) -> &'static str {
    match code {
        2 => "the peer is at another session (an earlier or later load)",
        3 => "the peer refused this rank's proof: the cluster tokens differ",
        4 => "the peer does not accept this rank: the ranks disagree about the world",
        _ => "the peer refused the hello",
    }
}

/// The MAC over one message's fields. The HMAC key is SHA-256 of the cluster key: HMAC pads
/// its key with zeros, so keys that differ only in trailing zero bytes ("" and "\0") would
/// otherwise be the same key (the fuzzer found it).
fn mac(key: &[u8], domain: &[u8], session: u64, from: u64, to: u64, nonce_a: &[u8; NONCE_LEN], nonce_c: &[u8; NONCE_LEN]) -> HmacSha256 {
    let mut m = HmacSha256::new_from_slice(&Sha256::digest(key)).expect("HMAC takes a key of any length");
    m.update(domain);
    m.update(&session.to_le_bytes());
    m.update(&from.to_le_bytes());
    m.update(&to.to_le_bytes());
    m.update(nonce_a);
    m.update(nonce_c);
    m
}

/// The acceptor's challenge carrying its fresh `nonce`.
pub fn challenge(nonce: &[u8; NONCE_LEN]) -> [u8; CHALLENGE_LEN] {
    let mut out = [0u8; CHALLENGE_LEN];
    out[..4].copy_from_slice(&MAGIC);
    out[4..].copy_from_slice(nonce);
    out
}

/// The acceptor's nonce from a challenge, or [`HelloError::Garbage`].
pub fn parse_challenge(bytes: &[u8]) -> Result<[u8; NONCE_LEN], HelloError> {
    if bytes.len() != CHALLENGE_LEN || bytes[..4] != MAGIC {
        return Err(HelloError::Garbage);
    }
    Ok(bytes[4..].try_into().expect("16 bytes"))
}

/// The connector's hello: rank `from` of `session` answers acceptor rank `to`'s challenge
/// `nonce_a`, adding its own fresh `nonce_c` for the verdict to cover.
pub fn hello(key: &[u8], session: u64, from: usize, to: usize, nonce_a: &[u8; NONCE_LEN], nonce_c: &[u8; NONCE_LEN]) -> [u8; HELLO_LEN] {
    let tag = mac(key, HELLO_DOMAIN, session, from as u64, to as u64, nonce_a, nonce_c).finalize().into_bytes();
    let mut out = [0u8; HELLO_LEN];
    out[..8].copy_from_slice(&(from as u64).to_le_bytes());
    out[8..16].copy_from_slice(&session.to_le_bytes());
    out[16..32].copy_from_slice(nonce_c);
    out[32..].copy_from_slice(&tag);
    out
}

/// A hello that verified: who sent it, and the nonce its verdict must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// The connector's world rank (proven: it is under the MAC).
    pub rank: usize,
    /// The connector's nonce, for [`accept`].
    pub nonce: [u8; NONCE_LEN],
}

/// Checks `bytes` as a hello to rank `me` of a `world`-rank load of `session`, answering the
/// challenge `nonce_a`: the session first (a stale one is common and harmless), then the MAC
/// in constant time, then the rank (only ranks above `me` connect to it).
pub fn verify_hello(key: &[u8], session: u64, me: usize, world: usize, nonce_a: &[u8; NONCE_LEN], bytes: &[u8]) -> Result<Hello, HelloError> {
    if bytes.len() != HELLO_LEN {
        return Err(HelloError::Garbage);
    }
    let claimed = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes"));
    let got = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    if got != session {
        return Err(HelloError::StaleSession { got, want: session });
    }
    let nonce: [u8; NONCE_LEN] = bytes[16..32].try_into().expect("16 bytes");
    mac(key, HELLO_DOMAIN, session, claimed, me as u64, nonce_a, &nonce).verify_slice(&bytes[32..]).map_err(|_| HelloError::BadProof { claimed })?;
    match usize::try_from(claimed) {
        Ok(rank) if rank > me && rank < world => Ok(Hello { rank, nonce }),
        _ => Err(HelloError::UnexpectedRank { claimed, me, world }),
    }
}

/// The acceptor's verdict accepting `hello`: rank `me` proves the key back to it.
pub fn accept(key: &[u8], session: u64, me: usize, hello: &Hello, nonce_a: &[u8; NONCE_LEN]) -> [u8; VERDICT_LEN] {
    let tag = mac(key, ACCEPT_DOMAIN, session, me as u64, hello.rank as u64, nonce_a, &hello.nonce).finalize().into_bytes();
    let mut out = [0u8; VERDICT_LEN];
    out[0] = 1;
    out[1..].copy_from_slice(&tag);
    out
}

/// The acceptor's verdict refusing a hello for `why`.
pub fn refuse(why: &HelloError) -> [u8; VERDICT_LEN] {
    let mut out = [0u8; VERDICT_LEN];
    out[0] = why.code();
    out
}

/// Checks the verdict `bytes` that acceptor rank `to` sent connector rank `from`, which sent
/// `nonce_c` in answer to `nonce_a`: Ok when accepted by a holder of the key.
pub fn verify_verdict(
    key: &[u8],
    session: u64,
    from: usize,
    to: usize,
    nonce_a: &[u8; NONCE_LEN],
    nonce_c: &[u8; NONCE_LEN],
    bytes: &[u8],
) -> Result<(), HelloError> {
    match bytes {
        [1, tag @ ..] if tag.len() == TAG_LEN => {
            mac(key, ACCEPT_DOMAIN, session, to as u64, from as u64, nonce_a, nonce_c).verify_slice(tag).map_err(|_| HelloError::BadVerdict)
        }
        [code, ..] if bytes.len() == VERDICT_LEN && *code != 1 => Err(HelloError::Refused(*code)),
        _ => Err(HelloError::Garbage),
    }
}

/// Why a frame was refused before its body was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The header is not the length of any frame (not whole f32s, or over
    /// [`MAX_FRAME_BYTES`]): the stream is corrupt or not a peer's.
    #[error("corrupt frame length {bytes} bytes")]
    Corrupt {
        /// The length the header gave.
        bytes: u64,
    },
    /// A well-formed frame of another length than the operation expects: the ranks disagree
    /// about the step.
    #[error("frame of {got} elements, {expected} expected")]
    Mismatch {
        /// Elements the operation expects.
        expected: usize,
        /// Elements the header announces.
        got: usize,
    },
    /// Fewer bytes than the header announces ([`decode_frame`] only).
    #[error("frame of {want} bytes, {have} present")]
    Truncated {
        /// Bytes the frame needs, header included.
        want: usize,
        /// Bytes there are.
        have: usize,
    },
}

/// The number of f32s a frame `header` announces, checked before anything is allocated for
/// them: whole f32s, at most [`MAX_FRAME_BYTES`], and exactly `expected` when the operation
/// knows the shape (every one but an all-gather of uneven slices).
pub fn frame_len(header: [u8; FRAME_HEADER_LEN], expected: Option<usize>) -> Result<usize, FrameError> {
    let bytes = u64::from_le_bytes(header);
    if bytes > MAX_FRAME_BYTES || !bytes.is_multiple_of(4) {
        return Err(FrameError::Corrupt { bytes });
    }
    let got = usize::try_from(bytes / 4).map_err(|_| FrameError::Corrupt { bytes })?;
    match expected {
        Some(expected) if expected != got => Err(FrameError::Mismatch { expected, got }),
        _ => Ok(got),
    }
}

/// The header of a frame of `n` f32s.
pub fn frame_header(n: usize) -> [u8; FRAME_HEADER_LEN] {
    ((4 * n) as u64).to_le_bytes()
}

/// Appends the f32s in `bytes` (little-endian; a trailing partial value is ignored) to `out`.
pub fn extend_f32s(out: &mut Vec<f32>, bytes: &[u8]) {
    out.extend(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])));
}

/// Decodes one whole frame from the front of `bytes` (header checked by [`frame_len`] first),
/// returning its values and the bytes it took.
pub fn decode_frame(bytes: &[u8], expected: Option<usize>) -> Result<(Vec<f32>, usize), FrameError> {
    let have = bytes.len();
    let header: [u8; FRAME_HEADER_LEN] =
        bytes.get(..FRAME_HEADER_LEN).and_then(|h| h.try_into().ok()).ok_or(FrameError::Truncated { want: FRAME_HEADER_LEN, have })?;
    let n = frame_len(header, expected)?;
    let want = FRAME_HEADER_LEN + 4 * n;
    let body = bytes.get(FRAME_HEADER_LEN..want).ok_or(FrameError::Truncated { want, have })?;
    let mut out = Vec::with_capacity(n);
    extend_f32s(&mut out, body);
    Ok((out, want))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; NONCE_LEN] = [7; NONCE_LEN];
    const C: [u8; NONCE_LEN] = [9; NONCE_LEN];

    #[test]
    fn a_hello_verifies_only_for_its_key_session_pair_and_challenge() {
        let h = hello(b"token", 5, 2, 0, &A, &C);
        assert_eq!(verify_hello(b"token", 5, 0, 3, &A, &h), Ok(Hello { rank: 2, nonce: C }));
        assert_eq!(verify_hello(b"other", 5, 0, 3, &A, &h), Err(HelloError::BadProof { claimed: 2 }));
        assert_eq!(verify_hello(b"", 5, 0, 3, &A, &h), Err(HelloError::BadProof { claimed: 2 }));
        // HMAC alone would take these two keys for one.
        assert!(verify_hello(b"token\0", 5, 0, 3, &A, &h).is_err());
        assert!(verify_hello(b"\0", 5, 0, 3, &A, &hello(b"", 5, 2, 0, &A, &C)).is_err());
        assert_eq!(verify_hello(b"token", 6, 0, 3, &A, &h), Err(HelloError::StaleSession { got: 5, want: 6 }));
        // Replayed to another rank, or against another challenge.
        assert_eq!(verify_hello(b"token", 5, 1, 3, &A, &h), Err(HelloError::BadProof { claimed: 2 }));
        assert_eq!(verify_hello(b"token", 5, 0, 3, &[8; NONCE_LEN], &h), Err(HelloError::BadProof { claimed: 2 }));
        // One flipped bit anywhere.
        for i in 0..HELLO_LEN {
            let mut bad = h;
            bad[i] ^= 1;
            assert!(verify_hello(b"token", 5, 0, 3, &A, &bad).is_err(), "bit flip at byte {i} accepted");
        }
        assert_eq!(verify_hello(b"token", 5, 0, 3, &A, &h[..HELLO_LEN - 1]), Err(HelloError::Garbage));
        // A proven hello from a rank that should not connect here.
        let low = hello(b"token", 5, 0, 1, &A, &C);
        assert!(matches!(verify_hello(b"token", 5, 1, 3, &A, &low), Err(HelloError::UnexpectedRank { claimed: 0, .. })));
        let high = hello(b"token", 5, 3, 0, &A, &C);
        assert!(matches!(verify_hello(b"token", 5, 0, 3, &A, &high), Err(HelloError::UnexpectedRank { claimed: 3, .. })));
    }

    #[test]
    fn a_verdict_proves_the_acceptor_and_a_refusal_says_why() {
        let ok = Hello { rank: 2, nonce: C };
        let v = accept(b"k", 1, 0, &ok, &A);
        assert_eq!(verify_verdict(b"k", 1, 2, 0, &A, &C, &v), Ok(()));
        assert_eq!(verify_verdict(b"j", 1, 2, 0, &A, &C, &v), Err(HelloError::BadVerdict));
        assert_eq!(verify_verdict(b"k", 1, 2, 0, &A, &[0; NONCE_LEN], &v), Err(HelloError::BadVerdict));
        // A hello reflected back is not a verdict.
        let h = hello(b"k", 1, 2, 0, &A, &C);
        assert!(verify_verdict(b"k", 1, 2, 0, &A, &C, &h[..VERDICT_LEN]).is_err());
        let stale = refuse(&HelloError::StaleSession { got: 1, want: 2 });
        assert!(verify_verdict(b"k", 1, 2, 0, &A, &C, &stale).unwrap_err().is_stale());
        let bad = verify_verdict(b"k", 1, 2, 0, &A, &C, &refuse(&HelloError::BadProof { claimed: 2 })).unwrap_err();
        assert!(!bad.is_stale() && bad.to_string().contains("cluster tokens differ"), "{bad}");
        assert_eq!(verify_verdict(b"k", 1, 2, 0, &A, &C, &[1, 2]), Err(HelloError::Garbage));
    }

    #[test]
    fn a_challenge_round_trips_and_anything_else_is_garbage() {
        assert_eq!(parse_challenge(&challenge(&A)), Ok(A));
        assert_eq!(parse_challenge(b"HTTP/1.1 400 Bad Request\r\n"), Err(HelloError::Garbage));
        assert_eq!(parse_challenge(&[0; CHALLENGE_LEN]), Err(HelloError::Garbage));
    }

    #[test]
    fn a_frame_header_is_checked_against_the_expected_length_before_its_body() {
        assert_eq!(frame_len(frame_header(5), Some(5)), Ok(5));
        assert_eq!(frame_len(frame_header(5), None), Ok(5));
        assert_eq!(frame_len(frame_header(5), Some(4)), Err(FrameError::Mismatch { expected: 4, got: 5 }));
        for bytes in [u64::MAX, 1 << 40, MAX_FRAME_BYTES + 4, 3] {
            assert_eq!(frame_len(bytes.to_le_bytes(), None), Err(FrameError::Corrupt { bytes }));
        }
        // A lie about the length is refused without reading (or allocating for) the body.
        let mut lie = (1u64 << 40).to_le_bytes().to_vec();
        lie.extend_from_slice(&[0; 16]);
        assert_eq!(decode_frame(&lie, None), Err(FrameError::Corrupt { bytes: 1 << 40 }));
        let mut f = frame_header(2).to_vec();
        f.extend_from_slice(&1.5f32.to_le_bytes());
        assert_eq!(decode_frame(&f, Some(2)), Err(FrameError::Truncated { want: 16, have: 12 }));
        f.extend_from_slice(&(-2f32).to_le_bytes());
        f.push(0xff);
        assert_eq!(decode_frame(&f, Some(2)), Ok((vec![1.5, -2.0], 16)));
    }
}
