//! Splits text around special tokens written literally in it ("<start_of_turn>", "\n\n"),
//! reproducing llama.cpp's `tokenizer_st_partition` exactly but in one pass over the text.
//!
//! llama.cpp takes the special tokens longest first and, for each, cuts every left-to-right,
//! non-overlapping occurrence out of the text fragments not yet claimed by a longer token.
//! Doing that literally costs O(special tokens × text) (Gemma has 6,414 of them), so we find
//! every occurrence of every special token with a byte trie, then replay the same priority
//! order over the occurrences: an occurrence is kept when it overlaps neither a span kept for
//! an earlier (longer) token nor the previous kept occurrence of the same token.

use std::ops::Range;

/// A piece of the input after partitioning: plain text to encode, or a special token's id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Fragment {
    Text(Range<usize>),
    Token(u32),
}

/// One special token the matcher knows: its id, byte length, and whether it is matched
/// even when the caller did not ask for special-token parsing (user-defined tokens are).
#[derive(Debug, Clone)]
struct Entry {
    id: u32,
    len: usize,
    always: bool,
}

/// A byte trie over the text of every special token, in llama.cpp's priority order.
#[derive(Debug, Default)]
pub(crate) struct SpecialMatcher {
    /// Children of each node as (byte, child node), sorted by byte.
    children: Vec<Vec<(u8, u32)>>,
    /// For each node, the entry index (priority rank) of the token ending there, if any.
    terminal: Vec<Option<u32>>,
    /// Entries sorted by priority: longest text first, then lowest id.
    entries: Vec<Entry>,
}

impl SpecialMatcher {
    /// Builds the matcher from `(id, text, always)` triples; `always` marks tokens that are
    /// matched even without `parse_special` (llama.cpp's user-defined tokens).
    pub(crate) fn new<'a>(tokens: impl IntoIterator<Item = (u32, &'a str, bool)>) -> Self {
        let mut list: Vec<(u32, &str, bool)> = tokens.into_iter().filter(|(_, t, _)| !t.is_empty()).collect();
        list.sort_by(|a, b| b.1.len().cmp(&a.1.len()).then(a.0.cmp(&b.0)));
        let mut m = SpecialMatcher { children: vec![Vec::new()], terminal: vec![None], entries: Vec::new() };
        for (id, text, always) in list {
            let mut node = 0usize;
            for &b in text.as_bytes() {
                node = match m.children[node].binary_search_by_key(&b, |&(k, _)| k) {
                    Ok(i) => m.children[node][i].1 as usize,
                    Err(i) => {
                        let new = m.children.len();
                        m.children.push(Vec::new());
                        m.terminal.push(None);
                        m.children[node].insert(i, (b, new as u32));
                        new
                    }
                };
            }
            // Two tokens with the same text: the first in priority order wins, as a
            // text-keyed lookup would give only one of them anyway.
            if m.terminal[node].is_none() {
                m.terminal[node] = Some(m.entries.len() as u32);
                m.entries.push(Entry { id, len: text.len(), always });
            }
        }
        m
    }

    /// Number of special tokens known.
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    /// Cuts `text` into plain-text ranges and special tokens. With `parse_special == false`
    /// only the `always` tokens are recognised (the tests' entry; the tokenizer calls
    /// [`SpecialMatcher::partition_outside`]).
    #[cfg(test)]
    pub(crate) fn partition(&self, text: &str, parse_special: bool) -> Vec<Fragment> {
        self.partition_outside(text, parse_special, &[])
    }

    /// As [`SpecialMatcher::partition`], but an occurrence that overlaps any of the sorted,
    /// disjoint byte ranges `plain` is text (only the `always` tokens are recognised there):
    /// chat message contents inside a rendered template.
    pub(crate) fn partition_outside(&self, text: &str, parse_special: bool, plain: &[Range<usize>]) -> Vec<Fragment> {
        let bytes = text.as_bytes();
        // Whether start..end overlaps a plain range.
        let in_plain = |start: usize, end: usize| {
            let i = plain.partition_point(|r| r.end <= start);
            plain.get(i).is_some_and(|r| r.start < end)
        };
        if bytes.is_empty() {
            return Vec::new();
        }
        // Every occurrence as (priority rank, start).
        let mut occ: Vec<(u32, usize)> = Vec::new();
        if !self.entries.is_empty() {
            for start in 0..bytes.len() {
                let mut node = 0usize;
                for &b in &bytes[start..] {
                    match self.children[node].binary_search_by_key(&b, |&(k, _)| k) {
                        Ok(i) => node = self.children[node][i].1 as usize,
                        Err(_) => break,
                    }
                    if let Some(rank) = self.terminal[node] {
                        let e = &self.entries[rank as usize];
                        if e.always || (parse_special && !in_plain(start, start + e.len)) {
                            occ.push((rank, start));
                        }
                    }
                }
            }
        }
        if occ.is_empty() {
            return vec![Fragment::Text(0..bytes.len())];
        }
        occ.sort_unstable();

        let mut covered = vec![false; bytes.len()];
        // (start, id, len) of every kept occurrence.
        let mut kept: Vec<(usize, u32, usize)> = Vec::new();
        let mut i = 0;
        while i < occ.len() {
            let rank = occ[i].0;
            let entry = &self.entries[rank as usize];
            let mut last_end = 0usize;
            while i < occ.len() && occ[i].0 == rank {
                let start = occ[i].1;
                i += 1;
                let end = start + entry.len;
                if start < last_end || covered[start..end].iter().any(|&c| c) {
                    continue;
                }
                covered[start..end].iter_mut().for_each(|c| *c = true);
                kept.push((start, entry.id, entry.len));
                last_end = end;
            }
        }
        kept.sort_unstable_by_key(|k| k.0);

        let mut out = Vec::with_capacity(kept.len() * 2 + 1);
        let mut pos = 0usize;
        for (start, id, len) in kept {
            if start > pos {
                out.push(Fragment::Text(pos..start));
            }
            out.push(Fragment::Token(id));
            pos = start + len;
        }
        if pos < bytes.len() {
            out.push(Fragment::Text(pos..bytes.len()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn longer_special_tokens_win_over_shorter_ones_they_contain() {
        let m = SpecialMatcher::new([(1, "\n", true), (2, "\n\n", true), (3, "<s>", false)]);
        let f = m.partition("a\n\n\nb<s>", true);
        assert_eq!(f, vec![Fragment::Text(0..1), Fragment::Token(2), Fragment::Token(1), Fragment::Text(4..5), Fragment::Token(3)]);
    }

    #[test]
    fn control_tokens_are_plain_text_without_parse_special_but_user_defined_ones_are_not() {
        let m = SpecialMatcher::new([(1, "\n", true), (3, "<s>", false)]);
        assert_eq!(m.partition("<s>\n", false), vec![Fragment::Text(0..3), Fragment::Token(1)]);
        assert_eq!(m.partition("<s>\n", true), vec![Fragment::Token(3), Fragment::Token(1)]);
    }

    #[test]
    fn overlapping_occurrences_of_one_token_are_taken_left_to_right() {
        let m = SpecialMatcher::new([(7, "aa", false)]);
        assert_eq!(m.partition("aaa", true), vec![Fragment::Token(7), Fragment::Text(2..3)]);
        assert_eq!(m.partition("", true), vec![]);
    }
}
