//! Incremental detokenisation for streaming responses: tokens arrive one at a time, but a
//! character may span several byte-fallback tokens (`<0xF0><0x9F><0x99><0x82>` is "🙂"), so
//! bytes are held back until they form whole UTF-8 characters.

use super::Tokenizer;

/// Turns a stream of token ids into text pieces that never split a character; the
/// concatenation of every `push` and the final `finish` equals [`Tokenizer::decode`] of all
/// the ids.
pub struct StreamDecoder<'a> {
    tok: &'a Tokenizer,
    /// Rendered bytes not yet returned: at most an incomplete trailing UTF-8 sequence.
    pending: Vec<u8>,
    /// Still to drop the SentencePiece dummy-prefix space from the first non-empty piece.
    strip_space: bool,
}

impl<'a> StreamDecoder<'a> {
    /// A decoder at the start of a response, borrowing `tok` (one per streamed sequence).
    pub fn new(tok: &'a Tokenizer) -> Self {
        StreamDecoder { tok, pending: Vec::new(), strip_space: tok.strips_leading_space() }
    }

    /// Adds one token and returns the text that is now complete (possibly empty).
    pub fn push(&mut self, id: u32) -> String {
        let start = self.pending.len();
        self.tok.piece_bytes(id, &mut self.pending);
        if self.strip_space && self.pending.len() > start {
            if self.pending[start] == b' ' {
                self.pending.remove(start);
            }
            self.strip_space = false;
        }
        self.take_complete()
    }

    /// Returns whatever is left (an incomplete character becomes U+FFFD) and resets.
    pub fn finish(&mut self) -> String {
        let rest = std::mem::take(&mut self.pending);
        String::from_utf8_lossy(&rest).into_owned()
    }

    /// Emits the longest prefix of `pending` that ends on a character boundary, replacing
    /// invalid sequences with U+FFFD exactly as `String::from_utf8_lossy` would on the whole.
    fn take_complete(&mut self) -> String {
        let mut out = String::new();
        let mut pos = 0usize;
        loop {
            match std::str::from_utf8(&self.pending[pos..]) {
                Ok(s) => {
                    out.push_str(s);
                    pos = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    out.push_str(std::str::from_utf8(&self.pending[pos..pos + valid]).expect("checked valid"));
                    pos += valid;
                    match e.error_len() {
                        // An incomplete character at the end: wait for more bytes.
                        None => break,
                        Some(n) => {
                            out.push('\u{FFFD}');
                            pos += n;
                        }
                    }
                }
            }
        }
        self.pending.drain(..pos);
        out
    }
}
