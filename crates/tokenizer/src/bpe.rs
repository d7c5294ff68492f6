//! GPT-2-style byte-level BPE (GGUF `tokenizer.ggml.model == "gpt2"`: Llama 3, Qwen),
//! following llama.cpp's `llm_tokenizer_bpe_session`.
//!
//! Each pre-tokenised word is mapped byte by byte to printable characters (GPT-2's
//! `bytes_to_unicode`), split into characters, and the adjacent pair with the lowest merge
//! rank in `tokenizer.ggml.merges` is merged until no ranked pair is left (ties: leftmost).

use std::cmp::Ordering;
use std::collections::{BinaryHeap, HashMap};

/// GPT-2's reversible byte → printable character mapping, and its inverse.
pub(crate) struct ByteMap {
    to_char: [char; 256],
    to_byte: HashMap<char, u8>,
}

impl ByteMap {
    pub(crate) fn new() -> Self {
        let mut to_char = ['\0'; 256];
        let mut n = 0u32;
        for b in 0..=255u8 {
            let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
            to_char[b as usize] = if printable {
                b as char
            } else {
                n += 1;
                char::from_u32(255 + n).expect("256..=323 are valid code points")
            };
        }
        let to_byte = to_char.iter().enumerate().map(|(b, &c)| (c, b as u8)).collect();
        ByteMap { to_char, to_byte }
    }

    /// Appends the byte-level spelling of `bytes` to `out`.
    pub(crate) fn encode_into(&self, bytes: &[u8], out: &mut String) {
        out.extend(bytes.iter().map(|&b| self.to_char[b as usize]));
    }

    /// Appends the bytes a byte-level piece spells; a character outside the mapping (which a
    /// well-formed vocabulary never has) is kept as its own UTF-8.
    pub(crate) fn decode_into(&self, piece: &str, out: &mut Vec<u8>) {
        for c in piece.chars() {
            match self.to_byte.get(&c) {
                Some(&b) => out.push(b),
                None => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
    }
}

/// Merge ranks keyed by interned piece ids, so a lookup needs no allocation.
pub(crate) struct Merges {
    /// Every string that appears on either side of a merge.
    intern: super::FxMap<String, u32>,
    ranks: super::FxMap<(u32, u32), u32>,
}

impl Merges {
    /// Builds the table from `(left, right)` pairs in rank order (first = merged first).
    /// A repeated pair keeps its first (best) rank.
    pub(crate) fn new<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        let mut m = Merges { intern: Default::default(), ranks: Default::default() };
        for (rank, (l, r)) in pairs.into_iter().enumerate() {
            let li = m.intern_id(l);
            let ri = m.intern_id(r);
            m.ranks.entry((li, ri)).or_insert(rank as u32);
        }
        m
    }

    fn intern_id(&mut self, s: &str) -> u32 {
        let next = self.intern.len() as u32;
        *self.intern.entry(s.to_owned()).or_insert(next)
    }

    fn rank(&self, left: &str, right: &str) -> Option<u32> {
        let l = *self.intern.get(left)?;
        let r = *self.intern.get(right)?;
        self.ranks.get(&(l, r)).copied()
    }
}

/// A candidate merge: lower rank first, then leftmost.
struct Bigram {
    rank: u32,
    left: usize,
    right: usize,
    left_len: usize,
    right_len: usize,
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
    fn cmp(&self, other: &Self) -> Ordering {
        other.rank.cmp(&self.rank).then_with(|| other.left.cmp(&self.left))
    }
}

#[derive(Clone, Copy)]
struct Symbol {
    start: usize,
    len: usize,
    next: Option<usize>,
    prev: Option<usize>,
}

/// What the BPE algorithm needs from the vocabulary.
pub(crate) struct BpeVocab<'a> {
    pub piece_to_id: &'a super::FxMap<String, u32>,
    pub merges: &'a Merges,
    /// Llama 3 emits a word that is itself a vocabulary piece without merging it.
    pub ignore_merges: bool,
}

/// Tokenizes one byte-level-encoded word, appending ids to `out`.
pub(crate) fn tokenize_word(vocab: &BpeVocab<'_>, word: &str, out: &mut Vec<u32>) {
    if word.is_empty() {
        return;
    }
    if vocab.ignore_merges {
        if let Some(&id) = vocab.piece_to_id.get(word) {
            out.push(id);
            return;
        }
    }
    let mut symbols: Vec<Symbol> = Vec::with_capacity(word.len());
    for (start, ch) in word.char_indices() {
        let idx = symbols.len();
        let end = start + ch.len_utf8();
        symbols.push(Symbol { start, len: ch.len_utf8(), prev: idx.checked_sub(1), next: (end < word.len()).then_some(idx + 1) });
    }
    let text = |s: &Symbol| &word[s.start..s.start + s.len];
    let mut heap = BinaryHeap::new();
    let try_add = |heap: &mut BinaryHeap<Bigram>, symbols: &[Symbol], left: Option<usize>, right: Option<usize>| {
        let (Some(l), Some(r)) = (left, right) else { return };
        let (ls, rs) = (&symbols[l], &symbols[r]);
        if let Some(rank) = vocab.merges.rank(text(ls), text(rs)) {
            heap.push(Bigram { rank, left: l, right: r, left_len: ls.len, right_len: rs.len });
        }
    };
    for i in 1..symbols.len() {
        try_add(&mut heap, &symbols, Some(i - 1), Some(i));
    }
    while let Some(b) = heap.pop() {
        let (l, r) = (symbols[b.left], symbols[b.right]);
        // Stale: one side has been merged into something else since the pair was queued.
        if l.len != b.left_len || r.len != b.right_len || l.next != Some(b.right) {
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
        let piece = text(&s);
        match vocab.piece_to_id.get(piece) {
            Some(&id) => out.push(id),
            // As llama.cpp: emit whatever single characters of it are pieces, drop the rest.
            None => {
                for ch in piece.chars() {
                    if let Some(&id) = vocab.piece_to_id.get(ch.encode_utf8(&mut [0; 4]) as &str) {
                        out.push(id);
                    }
                }
            }
        }
        cur = s.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_byte_map_is_a_bijection_with_printable_ascii_unchanged() {
        let m = ByteMap::new();
        assert_eq!(m.to_byte.len(), 256);
        assert_eq!(m.to_char[b'A' as usize], 'A');
        assert_eq!(m.to_char[b' ' as usize], 'Ġ');
        assert_eq!(m.to_char[b'\n' as usize], 'Ċ');
        let all: Vec<u8> = (0..=255).collect();
        let mut s = String::new();
        m.encode_into(&all, &mut s);
        let mut back = Vec::new();
        m.decode_into(&s, &mut back);
        assert_eq!(back, all);
    }

    #[test]
    fn lower_ranked_merges_apply_first() {
        let pieces = ["a", "b", "c", "ab", "bc", "abc"];
        let map: super::super::FxMap<String, u32> = pieces.iter().enumerate().map(|(i, p)| (p.to_string(), i as u32)).collect();
        let merges = Merges::new([("b", "c"), ("a", "b"), ("a", "bc")]);
        let v = BpeVocab { piece_to_id: &map, merges: &merges, ignore_merges: false };
        let mut out = Vec::new();
        tokenize_word(&v, "abc", &mut out);
        assert_eq!(out, vec![5]); // b+c first (rank 0), then a+bc (rank 2)
        out.clear();
        tokenize_word(&v, "abab", &mut out);
        assert_eq!(out, vec![3, 3]);
    }
}
