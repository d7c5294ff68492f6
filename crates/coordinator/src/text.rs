//! Turning sampled tokens into text a client can be shown at once: never half a UTF-8
//! character, never the start of a stop string, and nothing after a stop string.

use tpserve_tokenizer::{StreamDecoder, Tokenizer};

/// The text of one sequence as its tokens arrive.
pub struct TextOut<'a> {
    stream: StreamDecoder<'a>,
    stop: Vec<String>,
    /// Longest stop string, in bytes: that much minus one is held back.
    max_stop: usize,
    text: String,
    /// Bytes of `text` already handed out.
    emitted: usize,
}

/// What a new token changed.
pub struct Pushed<'t> {
    /// Text that is now final and was not handed out before.
    pub new_text: &'t str,
    /// A stop string was found: the text ends before it.
    pub stopped: bool,
}

impl<'a> TextOut<'a> {
    /// Text decoded with `tok`, ending before the first of the `stop` strings (empty ones
    /// are ignored).
    pub fn new(tok: &'a Tokenizer, stop: &[String]) -> Self {
        let stop: Vec<String> = stop.iter().filter(|s| !s.is_empty()).cloned().collect();
        let max_stop = stop.iter().map(|s| s.len()).max().unwrap_or(0);
        Self { stream: StreamDecoder::new(tok), stop, max_stop, text: String::new(), emitted: 0 }
    }

    /// Adds one generated token.
    pub fn push(&mut self, id: u32) -> Pushed<'_> {
        let piece = self.stream.push(id);
        self.text.push_str(&piece);
        let start = self.emitted;
        // A new stop string can only start in the part not yet handed out.
        if let Some(cut) = find_stop(&self.text[start..], &self.stop).map(|c| start + c) {
            self.text.truncate(cut);
            self.emitted = cut;
            return Pushed { new_text: &self.text[start..cut], stopped: true };
        }
        // Hold back the tail that could still become a stop string.
        let mut safe = self.text.len().saturating_sub(self.max_stop.saturating_sub(1));
        while !self.text.is_char_boundary(safe) {
            safe -= 1;
        }
        let safe = safe.max(start);
        self.emitted = safe;
        Pushed { new_text: &self.text[start..safe], stopped: false }
    }

    /// Ends the text (no more tokens): flushes what was held back, the bytes of an
    /// unfinished character included. Returns the rest of the text and whether a stop string
    /// was found in it.
    pub fn finish(&mut self) -> (&str, bool) {
        let tail = self.stream.finish();
        self.text.push_str(&tail);
        let start = self.emitted;
        let stopped = match find_stop(&self.text[start..], &self.stop) {
            Some(c) => {
                self.text.truncate(start + c);
                true
            }
            None => false,
        };
        self.emitted = self.text.len();
        (&self.text[start..], stopped)
    }

    /// Consumes the text.
    pub fn into_text(self) -> String {
        self.text
    }
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_string_wins() {
        let stops = vec!["b".to_string(), "cd".to_string()];
        assert_eq!(find_stop("xxcdxb", &stops), Some(2));
        assert_eq!(find_stop("xyz", &stops), None);
    }
}
