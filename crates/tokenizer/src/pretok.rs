//! Pre-tokenisation for GPT-2-style byte-level BPE: splits text into "words" exactly as the
//! model's regex would, hand-written (as llama.cpp does) so the crate needs no regex engine
//! with look-ahead. Character classes use real Unicode categories (`\p{L}`, `\p{N}`) from
//! [`super::unicode_tables`]; `\s` is Unicode `White_Space` (Rust's `char::is_whitespace`).

use super::unicode_tables::{LETTER, NUMBER};

/// Which pre-tokenisation regex a model uses (`tokenizer.ggml.pre`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreTokenizer {
    /// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Llama 3: `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
    /// ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    Llama3,
    /// Qwen 2: the Llama 3 regex with single digits (`\p{N}` instead of `\p{N}{1,3}`).
    Qwen2,
}

impl PreTokenizer {
    /// Maps a `tokenizer.ggml.pre` name (llama.cpp's spelling) to its regex, if supported.
    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "default" | "gpt-2" | "gpt2" => PreTokenizer::Gpt2,
            "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "pixtral" => PreTokenizer::Llama3,
            "qwen2" | "deepseek-r1-qwen" | "megrez" => PreTokenizer::Qwen2,
            _ => return None,
        })
    }

    /// The pre-tokenizer names [`PreTokenizer::from_name`] accepts, for error messages.
    pub const SUPPORTED: &'static str = "default, gpt-2, llama3, llama-v3, llama-bpe, falcon3, pixtral, qwen2, deepseek-r1-qwen, megrez";

    /// Splits `text` into words; the returned byte ranges cover the text exactly, in order.
    pub fn split(self, text: &str) -> Vec<std::ops::Range<usize>> {
        let chars: Vec<(usize, char)> = text.char_indices().collect();
        let cls: Vec<Class> = chars.iter().map(|&(_, c)| classify(c)).collect();
        let ends = match self {
            PreTokenizer::Gpt2 => split_gpt2(&chars, &cls),
            PreTokenizer::Llama3 => split_llama3(&chars, &cls, 3),
            PreTokenizer::Qwen2 => split_llama3(&chars, &cls, 1),
        };
        let byte_at = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
        let mut out = Vec::with_capacity(ends.len());
        let mut prev = 0usize;
        for e in ends {
            out.push(byte_at(prev)..byte_at(e));
            prev = e;
        }
        out
    }
}

/// The character classes the regexes distinguish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
    /// Past the end of the text (never matches anything).
    End,
}

fn in_table(table: &[(u32, u32)], c: char) -> bool {
    let c = c as u32;
    table
        .binary_search_by(|&(lo, hi)| {
            if hi < c {
                std::cmp::Ordering::Less
            } else if lo > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        })
        .is_ok()
}

fn classify(c: char) -> Class {
    if c.is_ascii() {
        return if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        };
    }
    if in_table(LETTER, c) {
        Class::Letter
    } else if in_table(NUMBER, c) {
        Class::Number
    } else if c.is_whitespace() {
        Class::Space
    } else {
        Class::Other
    }
}

/// Shared state of the splitters: character and class look-ups that return `End` past the
/// text, and the list of word end positions (in characters).
struct Cursor<'a> {
    chars: &'a [(usize, char)],
    cls: &'a [Class],
    ends: Vec<usize>,
    prev_end: usize,
}

impl Cursor<'_> {
    fn ch(&self, i: usize) -> Option<char> {
        self.chars.get(i).map(|&(_, c)| c)
    }
    fn cl(&self, i: usize) -> Class {
        self.cls.get(i).copied().unwrap_or(Class::End)
    }
    /// Ends a word at `end` (if non-empty) and returns `end`.
    fn emit(&mut self, end: usize) -> usize {
        if end > self.prev_end {
            self.ends.push(end);
        }
        self.prev_end = end;
        end
    }
    /// The English contractions `'s 't 're 've 'm 'll 'd` at `pos`: their length, if any.
    fn contraction(&self, pos: usize, ignore_case: bool) -> Option<usize> {
        if self.ch(pos) != Some('\'') {
            return None;
        }
        let low = |c: Option<char>| c.map(|c| if ignore_case { c.to_ascii_lowercase() } else { c });
        let (a, b) = (low(self.ch(pos + 1)), low(self.ch(pos + 2)));
        match (a, b) {
            (Some('s' | 't' | 'm' | 'd'), _) => Some(2),
            (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => Some(3),
            _ => None,
        }
    }
    /// `\s+(?!\S)|\s+` and friends: counts whitespace from `pos`, and the position just past
    /// the last `\r`/`\n` in that run (0 if none).
    fn whitespace_run(&self, pos: usize) -> (usize, usize) {
        let mut n = 0;
        let mut last_nl = 0;
        while self.cl(pos + n) == Class::Space {
            if matches!(self.ch(pos + n), Some('\r' | '\n')) {
                last_nl = pos + n + 1;
            }
            n += 1;
        }
        (n, last_nl)
    }
}

fn is_other(c: Class) -> bool {
    c == Class::Other
}

fn split_gpt2(chars: &[(usize, char)], cls: &[Class]) -> Vec<usize> {
    let mut c = Cursor { chars, cls, ends: Vec::new(), prev_end: 0 };
    let n = chars.len();
    let mut pos = 0;
    while pos < n {
        if let Some(len) = c.contraction(pos, false) {
            pos = c.emit(pos + len);
            continue;
        }
        let sp = usize::from(c.ch(pos) == Some(' '));
        let class = c.cl(pos + sp);
        if matches!(class, Class::Letter | Class::Number) || is_other(class) {
            let mut p = pos + sp;
            while c.cl(p) == class {
                p += 1;
            }
            pos = c.emit(p);
            continue;
        }
        let (ws, _) = c.whitespace_run(pos);
        pos = if ws > 1 && pos + ws < n {
            c.emit(pos + ws - 1)
        } else if ws > 0 {
            c.emit(pos + ws)
        } else {
            c.emit(pos + 1)
        };
    }
    c.ends
}

/// The Llama 3 regex; `max_digits` is 3 for Llama 3 and 1 for Qwen 2.
fn split_llama3(chars: &[(usize, char)], cls: &[Class], max_digits: usize) -> Vec<usize> {
    let mut c = Cursor { chars, cls, ends: Vec::new(), prev_end: 0 };
    let n = chars.len();
    let mut pos = 0;
    while pos < n {
        if let Some(len) = c.contraction(pos, true) {
            pos = c.emit(pos + len);
            continue;
        }
        let ch = c.ch(pos);
        let class = c.cl(pos);
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !matches!(ch, Some('\r' | '\n')) && class != Class::Number && (class == Class::Letter || c.cl(pos + 1) == Class::Letter) {
            let mut p = pos + 1;
            while c.cl(p) == Class::Letter {
                p += 1;
            }
            pos = c.emit(p);
            continue;
        }
        // \p{N}{1,max_digits}
        if class == Class::Number {
            let mut p = pos;
            while c.cl(p) == Class::Number && p - pos < max_digits {
                p += 1;
            }
            pos = c.emit(p);
            continue;
        }
        // ' ?[^\s\p{L}\p{N}]+[\r\n]*'
        let sp = usize::from(ch == Some(' '));
        if is_other(c.cl(pos + sp)) {
            let mut p = pos + sp;
            while is_other(c.cl(p)) {
                p += 1;
            }
            while matches!(c.ch(p), Some('\r' | '\n')) {
                p += 1;
            }
            pos = c.emit(p);
            continue;
        }
        let (ws, last_nl) = c.whitespace_run(pos);
        pos = if last_nl > 0 {
            // \s*[\r\n]+
            c.emit(last_nl)
        } else if ws > 1 && pos + ws < n {
            // \s+(?!\S)
            c.emit(pos + ws - 1)
        } else if ws > 0 {
            c.emit(pos + ws)
        } else {
            c.emit(pos + 1)
        };
    }
    c.ends
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(p: PreTokenizer, text: &str) -> Vec<&str> {
        p.split(text).into_iter().map(|r| &text[r]).collect()
    }

    #[test]
    fn gpt2_splitting_keeps_the_leading_space_with_each_word() {
        assert_eq!(words(PreTokenizer::Gpt2, "Hello world's  end!!\n 12"), vec!["Hello", " world", "'s", " ", " end", "!!", "\n", " 12"]);
    }

    #[test]
    fn llama3_splitting_groups_digits_in_threes_and_attaches_newlines() {
        assert_eq!(words(PreTokenizer::Llama3, "I'M 12345 ok.\n\n  x  "), vec!["I", "'M", " ", "123", "45", " ok", ".\n\n", " ", " x", "  "]);
        assert_eq!(words(PreTokenizer::Qwen2, "a 123"), vec!["a", " ", "1", "2", "3"]);
    }

    #[test]
    fn llama3_splitting_treats_non_ascii_letters_and_marks_by_category() {
        // U+0301 COMBINING ACUTE is a mark (Mn), not a letter: it ends the word.
        assert_eq!(words(PreTokenizer::Llama3, "café e\u{301}t"), vec!["café", " e", "\u{301}t"]);
        assert_eq!(words(PreTokenizer::Llama3, "日本語🙂"), vec!["日本語", "🙂"]);
    }

    #[test]
    fn splitting_covers_the_whole_text() {
        for p in [PreTokenizer::Gpt2, PreTokenizer::Llama3, PreTokenizer::Qwen2] {
            let text = " \t\r\n x'll 3.14 --  \u{a0}über\n";
            assert_eq!(words(p, text).concat(), text);
            assert!(words(p, "").is_empty());
        }
    }
}
