//! SentencePiece-style BPE with scores and byte fallback (GGUF `tokenizer.ggml.model ==
//! "llama"`: Gemma, Llama 2), following llama.cpp's `llm_tokenizer_spm_session`.
//!
//! The text (spaces already turned into U+2581 "▁") starts as one symbol per character;
//! we then keep merging the adjacent pair whose concatenation is a vocabulary piece with the
//! highest score (ties: the leftmost pair). Symbols live in a linked list over the text and
//! candidate pairs in a max-heap, so a prompt of n characters costs O(n log n). A final
//! symbol that is not a piece (only possible for a single unknown character) becomes its
//! UTF-8 bytes as `<0xXX>` tokens.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// A candidate merge of two adjacent symbols.
struct Bigram {
    score: f32,
    left: usize,
    right: usize,
    /// Byte length of the merged text when the pair was queued; a different sum of the two
    /// symbols' lengths at pop time means one of them has since been merged away.
    size: usize,
}

impl PartialEq for Bigram {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Bigram {
    /// Higher score first; on equal scores the leftmost pair first (llama.cpp's comparator).
    fn cmp(&self, other: &Self) -> Ordering {
        self.score.total_cmp(&other.score).then_with(|| other.left.cmp(&self.left))
    }
}

/// One symbol of the linked list: a byte range of the text.
#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    prev: Option<usize>,
    next: Option<usize>,
}

/// What the SPM algorithm needs from the vocabulary.
pub(crate) struct SpmVocab<'a> {
    pub piece_to_id: &'a super::FxMap<String, u32>,
    pub scores: &'a [f32],
    /// Token id of each byte's `<0xXX>` piece (falls back to `unk` when absent).
    pub byte_tokens: &'a [Option<u32>; 256],
    pub unk: Option<u32>,
}

/// Tokenizes already-escaped text (spaces as "▁"), appending ids to `out`.
pub(crate) fn tokenize(vocab: &SpmVocab<'_>, text: &str, out: &mut Vec<u32>) {
    if text.is_empty() {
        return;
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(text.len());
    for (start, ch) in text.char_indices() {
        let idx = symbols.len();
        symbols.push(Symbol {
            start,
            len: ch.len_utf8(),
            prev: idx.checked_sub(1),
            next: if start + ch.len_utf8() == text.len() { None } else { Some(idx + 1) },
        });
    }

    let mut heap = BinaryHeap::with_capacity(symbols.len());
    let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else { return };
        let (ls, rs) = (symbols[l], symbols[r]);
        let merged = &text[ls.start..rs.start + rs.len];
        if let Some(&id) = vocab.piece_to_id.get(merged) {
            let score = vocab.scores.get(id as usize).copied().unwrap_or(0.0);
            heap.push(Bigram { score, left: l, right: r, size: merged.len() });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut heap, &symbols, Some(i - 1), Some(i));
    }

    while let Some(b) = heap.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        if l.len == 0 || r.len == 0 || l.len + r.len != b.size {
            continue;
        }
        symbols[b.left].len += r.len;
        symbols[b.right].len = 0;
        symbols[b.left].next = r.next;
        if let Some(n) = r.next {
            symbols[n].prev = Some(b.left);
        }
        try_add(&mut heap, &symbols, symbols[b.left].prev, Some(b.left));
        try_add(&mut heap, &symbols, Some(b.left), symbols[b.left].next);
    }

    let mut cur = Some(0);
    while let Some(i) = cur {
        let s = symbols[i];
        let piece = &text[s.start..s.start + s.len];
        match vocab.piece_to_id.get(piece) {
            Some(&id) => out.push(id),
            None => {
                for &byte in piece.as_bytes() {
                    if let Some(id) = vocab.byte_tokens[byte as usize].or(vocab.unk) {
                        out.push(id);
                    }
                }
            }
        }
        cur = s.next;
    }
}

/// SentencePiece's whitespace escape: every ASCII space becomes U+2581 "▁".
pub(crate) fn escape_whitespace(text: &str) -> String {
    text.replace(' ', "\u{2581}")
}

/// Parses a byte-fallback piece `<0xXX>` into its byte.
pub(crate) fn parse_byte_piece(piece: &str) -> Option<u8> {
    let hex = piece.strip_prefix("<0x")?.strip_suffix('>')?;
    if hex.len() != 2 {
        return None;
    }
    u8::from_str_radix(hex, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(pieces: &[(&str, f32)]) -> (super::super::FxMap<String, u32>, Vec<f32>, [Option<u32>; 256]) {
        let mut map = super::super::FxMap::default();
        let mut scores = Vec::new();
        let mut bytes = [None; 256];
        for (i, (p, s)) in pieces.iter().enumerate() {
            map.insert(p.to_string(), i as u32);
            scores.push(*s);
            if let Some(b) = parse_byte_piece(p) {
                bytes[b as usize] = Some(i as u32);
            }
        }
        (map, scores, bytes)
    }

    fn run(pieces: &[(&str, f32)], text: &str) -> Vec<u32> {
        let (map, scores, bytes) = vocab(pieces);
        let v = SpmVocab { piece_to_id: &map, scores: &scores, byte_tokens: &bytes, unk: None };
        let mut out = Vec::new();
        tokenize(&v, &escape_whitespace(text), &mut out);
        out
    }

    #[test]
    fn the_highest_scoring_merge_is_applied_first() {
        // "ab" outranks "bc", so "abc" becomes "ab" + "c", not "a" + "bc".
        let p = [("a", 0.0), ("b", 0.0), ("c", 0.0), ("ab", -1.0), ("bc", -2.0)];
        assert_eq!(run(&p, "abc"), vec![3, 2]);
        let p = [("a", 0.0), ("b", 0.0), ("c", 0.0), ("ab", -3.0), ("bc", -2.0)];
        assert_eq!(run(&p, "abc"), vec![0, 4]);
    }

    #[test]
    fn equal_scores_merge_the_leftmost_pair_first() {
        let p = [("a", 0.0), ("aa", -1.0)];
        assert_eq!(run(&p, "aaa"), vec![1, 0]);
    }

    #[test]
    fn spaces_become_the_sentencepiece_marker() {
        let p = [("a", 0.0), ("\u{2581}", 0.0), ("\u{2581}a", -1.0)];
        assert_eq!(run(&p, "a a"), vec![0, 2]);
    }

    #[test]
    fn characters_missing_from_the_vocab_fall_back_to_byte_tokens() {
        let mut p: Vec<(String, f32)> = (0..=255u32).map(|b| (format!("<0x{b:02X}>"), 0.0)).collect();
        p.push(("x".into(), 0.0));
        let p: Vec<(&str, f32)> = p.iter().map(|(s, f)| (s.as_str(), *f)).collect();
        // "é" is C3 A9 in UTF-8.
        assert_eq!(run(&p, "xé"), vec![256, 0xC3, 0xA9]);
    }

    #[test]
    fn only_wellformed_byte_pieces_parse() {
        assert_eq!(parse_byte_piece("<0x0A>"), Some(10));
        assert_eq!(parse_byte_piece("<0xff>"), Some(255));
        assert_eq!(parse_byte_piece("<0x1>"), None);
        assert_eq!(parse_byte_piece("0x41"), None);
    }
}
