//! `tpserve-tokenizer`: tokenizers read from GGUF metadata (`tokenizer.ggml.*`), bit-exact
//! with llama.cpp: the SentencePiece-style BPE of Gemma and Llama 2 (`spm`), and the
//! GPT-2-style byte-level BPE of Llama 3 and Qwen (`bpe`, `pretok`), with special tokens
//! written in the text parsed as llama.cpp does (`special`); the streaming detokenizer
//! ([`StreamDecoder`]) and chat templates ([`chat`]). It does no tensor math: the
//! coordinator and the HTTP server link it without the model's kernels.

mod bpe;
pub mod chat;
mod pretok;
mod special;
mod spm;
mod stream;
#[cfg(test)]
mod tests;
mod unicode_tables;

pub use pretok::PreTokenizer;
pub use stream::StreamDecoder;

use std::collections::HashMap;

use special::{Fragment, SpecialMatcher};
use tpserve_gguf::{Gguf, Value};

/// Everything that can be wrong with a model's tokenizer metadata. Each means the GGUF file
/// cannot be served as it is: convert the model again with a current llama.cpp, or pick a
/// model of a supported family.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// `tokenizer.ggml.model` names an algorithm other than "llama" or "gpt2" (e.g. "bert",
    /// "t5", "rwkv").
    #[error("unsupported tokenizer.ggml.model {0:?}: tpserve supports \"llama\" (SentencePiece-style BPE, e.g. Gemma, Llama 2) and \"gpt2\" (byte-level BPE, e.g. Llama 3, Qwen)")]
    UnsupportedModel(String),
    /// A gpt2 tokenizer's `tokenizer.ggml.pre` names a pre-tokenizer regex we have not
    /// written (see [`PreTokenizer::SUPPORTED`]).
    #[error("unsupported tokenizer.ggml.pre {0:?} for a gpt2 tokenizer (supported: {supported})", supported = PreTokenizer::SUPPORTED)]
    UnsupportedPre(String),
    /// A key every tokenizer of its kind needs (`tokenizer.ggml.model`, `.tokens`, and
    /// `.merges` for gpt2) is absent.
    #[error("metadata key {0:?} is missing; the GGUF file has no usable tokenizer")]
    MissingKey(&'static str),
    /// A `tokenizer.ggml.*` key, or an element of its array, has a type we cannot use.
    #[error("metadata key {key:?} has the wrong type: expected {expected}, found {found}")]
    WrongType {
        /// The metadata key.
        key: &'static str,
        /// What it must hold ("array of strings", "integer", "bool"...).
        expected: &'static str,
        /// The GGUF type found ([`tpserve_gguf::Value::type_name`]).
        found: &'static str,
    },
    /// `tokenizer.ggml.scores` or `.token_type` does not have one entry per token.
    #[error("{key} has {got} entries but tokenizer.ggml.tokens has {expected}")]
    LengthMismatch {
        /// The per-token array that is too short or too long.
        key: &'static str,
        /// The vocabulary size (entries of `tokenizer.ggml.tokens`).
        expected: usize,
        /// Entries the array has.
        got: usize,
    },
    /// A special token id (BOS, EOS, unknown, EOT, EOM) is not below the vocabulary size.
    #[error("{key} = {id} is outside the vocabulary of {vocab_size} tokens")]
    BadTokenId {
        /// The metadata key, e.g. `tokenizer.ggml.bos_token_id`.
        key: &'static str,
        /// The id it holds.
        id: u64,
        /// Entries of `tokenizer.ggml.tokens`.
        vocab_size: usize,
    },
    /// A `tokenizer.ggml.token_type` entry is not one of llama.cpp's token types 0..=6.
    #[error("tokenizer.ggml.token_type[{index}] = {value} is not a token type (0..=6)")]
    BadTokenType {
        /// The token id whose type is wrong.
        index: usize,
        /// The value found.
        value: i64,
    },
    /// A `tokenizer.ggml.merges` entry has no space to split it into the pair it merges.
    #[error("tokenizer.ggml.merges[{index}] = {merge:?} is not two pieces separated by a space")]
    BadMerge {
        /// Position in the merge list (its rank).
        index: usize,
        /// The entry as written.
        merge: String,
    },
    /// `tokenizer.ggml.tokens` is an empty array.
    #[error("tokenizer.ggml.tokens is empty")]
    EmptyVocab,
}

/// A vocabulary entry's type (`tokenizer.ggml.token_type`); it decides how the token is
/// matched in text and rendered when decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenType {
    /// Type 0: no type recorded; never matched as special, decoded as "".
    Undefined,
    /// Type 1 (and the default when the file has no types): ordinary pieces produced by the
    /// merge algorithm and decoded as their text.
    Normal,
    /// Type 2: the unknown-token piece (`<unk>`); parsed from text only with
    /// `parse_special`, decoded as "".
    Unknown,
    /// Type 3: BOS, EOS, `<start_of_turn>`…: parsed from text only with `parse_special`,
    /// decoded as "".
    Control,
    /// Type 4: always parsed from text (Gemma's "\n", "  ", "\t" runs) and decoded as written.
    UserDefined,
    /// Type 5: reserved slots (Gemma's `<unused0>`…); not matched as special, decoded as "".
    Unused,
    /// Type 6: `<0xXX>` byte-fallback pieces, for bytes no other piece covers; decoded as
    /// that one byte.
    Byte,
}

impl TokenType {
    fn from_i64(index: usize, value: i64) -> Result<Self, TokenizerError> {
        Ok(match value {
            0 => TokenType::Undefined,
            1 => TokenType::Normal,
            2 => TokenType::Unknown,
            3 => TokenType::Control,
            4 => TokenType::UserDefined,
            5 => TokenType::Unused,
            6 => TokenType::Byte,
            _ => return Err(TokenizerError::BadTokenType { index, value }),
        })
    }
}

/// The two algorithms and their model-specific data.
enum Algorithm {
    Spm { add_space_prefix: bool, byte_tokens: Box<[Option<u32>; 256]> },
    Bpe { pre: PreTokenizer, merges: bpe::Merges, bytes: Box<bpe::ByteMap>, ignore_merges: bool },
}

/// FxHash (rustc's hasher): vocabulary lookups hash every candidate merge, and SipHash made
/// them the bulk of encoding time. The table is fixed by the model file, so a non-keyed
/// hash exposes nothing to hash flooding from request text.
#[derive(Default, Clone, Copy)]
pub(crate) struct FxHasher(u64);

impl std::hash::Hasher for FxHasher {
    fn write(&mut self, bytes: &[u8]) {
        const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
            self.0 = (self.0.rotate_left(5) ^ w).wrapping_mul(K);
        }
        for &b in chunks.remainder() {
            self.0 = (self.0.rotate_left(5) ^ b as u64).wrapping_mul(K);
        }
    }
    fn write_u8(&mut self, i: u8) {
        self.write(&[i]);
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

/// A `HashMap` keyed with [`FxHasher`].
pub(crate) type FxMap<K, V> = HashMap<K, V, std::hash::BuildHasherDefault<FxHasher>>;

/// Texts of tokens that end generation besides EOS (llama.cpp's list).
const EOG_TEXTS: &[&str] = &[
    "<|eot_id|>",
    "<|im_end|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
    "<|eom_id|>",
    "<EOT>",
    "_<EOT>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<|return|>",
    "<|call|>",
];

/// A model's tokenizer, built once from its GGUF file; immutable, so `Send + Sync` and cheap
/// to share behind an `Arc` across request threads.
pub struct Tokenizer {
    algo: Algorithm,
    pieces: Vec<String>,
    scores: Vec<f32>,
    types: Vec<TokenType>,
    piece_to_id: FxMap<String, u32>,
    special: SpecialMatcher,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    eog: Vec<u32>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("model", &self.model_name())
            .field("vocab_size", &self.pieces.len())
            .field("special_tokens", &self.special.len())
            .field("bos", &self.bos)
            .field("eos", &self.eos)
            .field("eog", &self.eog)
            .finish()
    }
}

fn array<'g>(gguf: &'g Gguf, key: &'static str) -> Result<Option<&'g [Value]>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v.as_array().map(Some).ok_or(TokenizerError::WrongType { key, expected: "array", found: v.type_name() }),
    }
}

fn string<'g>(gguf: &'g Gguf, key: &'static str) -> Result<Option<&'g str>, TokenizerError> {
    match gguf.get(key) {
        None => Ok(None),
        Some(v) => v.as_str().map(Some).ok_or(TokenizerError::WrongType { key, expected: "string", found: v.type_name() }),
    }
}

fn flag(gguf: &Gguf, key: &'static str, default: bool) -> Result<bool, TokenizerError> {
    match gguf.get(key) {
        None => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => v.as_u64().map(|x| x != 0).ok_or(TokenizerError::WrongType { key, expected: "bool", found: v.type_name() }),
    }
}

impl Tokenizer {
    /// Builds the tokenizer from the file's `tokenizer.ggml.*` metadata.
    pub fn from_gguf(gguf: &Gguf) -> Result<Self, TokenizerError> {
        let model = string(gguf, "tokenizer.ggml.model")?.ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        if model != "llama" && model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let key = "tokenizer.ggml.tokens";
        let tokens = array(gguf, key)?.ok_or(TokenizerError::MissingKey(key))?;
        let mut pieces = Vec::with_capacity(tokens.len());
        for v in tokens {
            let s = v.as_str().ok_or(TokenizerError::WrongType { key, expected: "array of strings", found: v.type_name() })?;
            pieces.push(s.to_owned());
        }
        let n = pieces.len();
        if n == 0 {
            return Err(TokenizerError::EmptyVocab);
        }

        let key = "tokenizer.ggml.scores";
        let scores = match array(gguf, key)? {
            None => vec![0.0; n],
            Some(a) if a.len() != n => return Err(TokenizerError::LengthMismatch { key, expected: n, got: a.len() }),
            Some(a) => a
                .iter()
                .map(|v| v.as_f64().map(|x| x as f32).ok_or(TokenizerError::WrongType { key, expected: "array of numbers", found: v.type_name() }))
                .collect::<Result<_, _>>()?,
        };

        let key = "tokenizer.ggml.token_type";
        let types = match array(gguf, key)? {
            None => vec![TokenType::Normal; n],
            Some(a) if a.len() != n => return Err(TokenizerError::LengthMismatch { key, expected: n, got: a.len() }),
            Some(a) => a
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    let x = match *v {
                        Value::I8(x) => x as i64,
                        Value::I16(x) => x as i64,
                        Value::I32(x) => x as i64,
                        Value::I64(x) => x,
                        _ => v.as_u64().map(|x| x as i64).ok_or(TokenizerError::WrongType { key, expected: "array of integers", found: v.type_name() })?,
                    };
                    TokenType::from_i64(i, x)
                })
                .collect::<Result<_, _>>()?,
        };

        // Later duplicates win, as in llama.cpp's `token_to_id[text] = id`.
        let piece_to_id: FxMap<String, u32> = pieces.iter().enumerate().map(|(i, p)| (p.clone(), i as u32)).collect();

        let token_id = |key: &'static str| -> Result<Option<u32>, TokenizerError> {
            match gguf.get(key) {
                None => Ok(None),
                Some(v) => {
                    let id = v.as_u64().ok_or(TokenizerError::WrongType { key, expected: "integer", found: v.type_name() })?;
                    if id as usize >= n {
                        return Err(TokenizerError::BadTokenId { key, id, vocab_size: n });
                    }
                    Ok(Some(id as u32))
                }
            }
        };
        let bos = token_id("tokenizer.ggml.bos_token_id")?;
        let eos = token_id("tokenizer.ggml.eos_token_id")?;
        let unk = token_id("tokenizer.ggml.unknown_token_id")?;
        let eot = token_id("tokenizer.ggml.eot_token_id")?;
        let eom = token_id("tokenizer.ggml.eom_token_id")?;

        let pre_name = string(gguf, "tokenizer.ggml.pre")?.unwrap_or("default");
        let (algo, default_add_bos) = if model == "llama" {
            let mut byte_tokens = Box::new([None; 256]);
            for b in 0..=255u8 {
                byte_tokens[b as usize] = piece_to_id.get(&format!("<0x{b:02X}>")).or_else(|| piece_to_id.get(&(b as char).to_string())).copied();
            }
            let add_space_prefix = flag(gguf, "tokenizer.ggml.add_space_prefix", true)?;
            (Algorithm::Spm { add_space_prefix, byte_tokens }, true)
        } else {
            let pre = PreTokenizer::from_name(pre_name).ok_or_else(|| TokenizerError::UnsupportedPre(pre_name.to_owned()))?;
            let key = "tokenizer.ggml.merges";
            let merge_values = array(gguf, key)?.ok_or(TokenizerError::MissingKey(key))?;
            let mut pairs = Vec::with_capacity(merge_values.len());
            for (index, v) in merge_values.iter().enumerate() {
                let s = v.as_str().ok_or(TokenizerError::WrongType { key, expected: "array of strings", found: v.type_name() })?;
                // Split at the first space after the first character (a piece may start with
                // a space-like character but never contains a raw space in byte-level BPE).
                let first = s.chars().next().map_or(0, char::len_utf8);
                let cut = s[first..].find(' ').map(|i| i + first);
                match cut {
                    Some(c) => pairs.push((&s[..c], &s[c + 1..])),
                    None => return Err(TokenizerError::BadMerge { index, merge: s.to_owned() }),
                }
            }
            let merges = bpe::Merges::new(pairs);
            let llama3 = pre == PreTokenizer::Llama3;
            (Algorithm::Bpe { pre, merges, bytes: Box::new(bpe::ByteMap::new()), ignore_merges: llama3 }, llama3)
        };
        let add_bos = flag(gguf, "tokenizer.ggml.add_bos_token", default_add_bos)?;

        let special = SpecialMatcher::new(types.iter().enumerate().filter_map(|(i, t)| match t {
            TokenType::Control | TokenType::Unknown => Some((i as u32, pieces[i].as_str(), false)),
            TokenType::UserDefined => Some((i as u32, pieces[i].as_str(), true)),
            _ => None,
        }));

        let mut eog: Vec<u32> = [eos, eot, eom].into_iter().flatten().collect();
        for text in EOG_TEXTS {
            if let Some(&id) = piece_to_id.get(*text) {
                if matches!(types[id as usize], TokenType::Control | TokenType::UserDefined) {
                    eog.push(id);
                }
            }
        }
        eog.sort_unstable();
        eog.dedup();

        let tok = Tokenizer { algo, pieces, scores, types, piece_to_id, special, bos, eos, unk, add_bos, eog };
        tracing::debug!(?tok, pre = pre_name, "tokenizer loaded");
        Ok(tok)
    }

    fn model_name(&self) -> &'static str {
        match self.algo {
            Algorithm::Spm { .. } => "llama (SentencePiece BPE)",
            Algorithm::Bpe { .. } => "gpt2 (byte-level BPE)",
        }
    }

    /// Encodes text to token ids, as llama.cpp's `llama_tokenize(text, add_special =
    /// add_bos, parse_special)`: BOS is prepended only when `add_bos` is asked for *and* the
    /// model's `tokenizer.ggml.add_bos_token` says it wants one (EOS is never appended).
    /// With `parse_special`, control tokens spelled in the text (`<start_of_turn>`, `<bos>`)
    /// become their ids; user-defined tokens (Gemma's "\n") are matched either way.
    pub fn encode(&self, text: &str, add_bos: bool, parse_special: bool) -> Vec<u32> {
        self.encode_outside(text, add_bos, parse_special, &[])
    }

    /// [`Tokenizer::encode`] with special tokens parsed except where they overlap one of the
    /// sorted, disjoint byte ranges `plain` of `text`, which are read as plain text (as with
    /// `parse_special = false`). The text is otherwise tokenized as one, so a `text` whose
    /// plain ranges hold no special token gives exactly `encode(text, add_bos, true)`. For
    /// chat prompts: the template's own tokens are special, the messages' contents are not.
    pub fn encode_with_plain(&self, text: &str, add_bos: bool, plain: &[std::ops::Range<usize>]) -> Vec<u32> {
        self.encode_outside(text, add_bos, true, plain)
    }

    fn encode_outside(&self, text: &str, add_bos: bool, parse_special: bool, plain: &[std::ops::Range<usize>]) -> Vec<u32> {
        let mut out = Vec::with_capacity(text.len() / 3 + 2);
        if add_bos && self.add_bos {
            if let Some(bos) = self.bos {
                out.push(bos);
            }
        }
        let fragments = self.special.partition_outside(text, parse_special, plain);
        match &self.algo {
            Algorithm::Spm { add_space_prefix, byte_tokens } => {
                let vocab = spm::SpmVocab { piece_to_id: &self.piece_to_id, scores: &self.scores, byte_tokens, unk: self.unk };
                let mut prev_special = true;
                for f in fragments {
                    match f {
                        Fragment::Token(id) => {
                            out.push(id);
                            prev_special = true;
                        }
                        Fragment::Text(r) => {
                            let mut s = String::with_capacity(r.len() + 1);
                            if *add_space_prefix && prev_special {
                                s.push(' ');
                            }
                            s.push_str(&text[r]);
                            spm::tokenize(&vocab, &spm::escape_whitespace(&s), &mut out);
                            prev_special = false;
                        }
                    }
                }
            }
            Algorithm::Bpe { pre, merges, bytes, ignore_merges } => {
                let vocab = bpe::BpeVocab { piece_to_id: &self.piece_to_id, merges, ignore_merges: *ignore_merges };
                let mut word = String::new();
                for f in fragments {
                    match f {
                        Fragment::Token(id) => out.push(id),
                        Fragment::Text(r) => {
                            let frag = &text[r];
                            for w in pre.split(frag) {
                                word.clear();
                                bytes.encode_into(frag[w].as_bytes(), &mut word);
                                bpe::tokenize_word(&vocab, &word, &mut out);
                            }
                        }
                    }
                }
            }
        }
        out
    }

    /// Appends the bytes token `id` renders as, llama.cpp's `token_to_piece(special =
    /// false)`: normal pieces as text (SentencePiece "▁" → space, byte-level BPE characters
    /// → their bytes), byte tokens as their byte, user-defined tokens as written, and
    /// control / unknown / unused tokens and out-of-range ids as nothing.
    pub(crate) fn piece_bytes(&self, id: u32, out: &mut Vec<u8>) {
        let Some(piece) = self.pieces.get(id as usize) else { return };
        match self.types[id as usize] {
            TokenType::UserDefined => out.extend_from_slice(piece.as_bytes()),
            TokenType::Normal => match &self.algo {
                Algorithm::Spm { .. } => out.extend_from_slice(piece.replace('\u{2581}', " ").as_bytes()),
                Algorithm::Bpe { bytes, .. } => bytes.decode_into(piece, out),
            },
            TokenType::Byte => match spm::parse_byte_piece(piece) {
                Some(b) => out.push(b),
                None => out.extend_from_slice(piece.as_bytes()),
            },
            TokenType::Control | TokenType::Unknown | TokenType::Unused | TokenType::Undefined => {}
        }
    }

    /// Whether decoding should drop one leading space from the first rendered piece (the
    /// SentencePiece dummy prefix that `add_space_prefix` put there when encoding).
    pub(crate) fn strips_leading_space(&self) -> bool {
        matches!(self.algo, Algorithm::Spm { add_space_prefix: true, .. })
    }

    /// Decodes ids to text, rendering each token as [`Tokenizer::piece_bytes`] documents
    /// (control tokens such as BOS and `<end_of_turn>` vanish) and then turning the bytes
    /// into UTF-8, invalid sequences becoming U+FFFD. With `add_space_prefix` the one
    /// space the encoder added in front of the text is removed again.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::with_capacity(ids.len() * 4);
        let mut strip = self.strips_leading_space();
        for &id in ids {
            let start = bytes.len();
            self.piece_bytes(id, &mut bytes);
            if strip && bytes.len() > start {
                if bytes[start] == b' ' {
                    bytes.remove(start);
                }
                strip = false;
            }
        }
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// Number of tokens in the vocabulary (the model's embedding rows).
    pub fn vocab_size(&self) -> usize {
        self.pieces.len()
    }

    /// The beginning-of-sequence token, if the model has one.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// The end-of-sequence token, if the model has one.
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Whether the model's metadata asks for BOS at the start of a prompt (`encode` with
    /// `add_bos = true` honours this).
    pub fn adds_bos(&self) -> bool {
        self.add_bos
    }

    /// Whether generating `id` ends the response: EOS, the EOT/EOM ids from metadata, and
    /// control tokens llama.cpp treats as end-of-generation (Gemma's `<end_of_turn>`,
    /// Llama 3's `<|eot_id|>`, ChatML's `<|im_end|>`…).
    pub fn is_eog(&self, id: u32) -> bool {
        self.eog.binary_search(&id).is_ok()
    }

    /// All end-of-generation ids, sorted (for samplers that must never suppress them).
    pub fn eog_ids(&self) -> &[u32] {
        &self.eog
    }

    /// The raw vocabulary piece of `id` ("▁the", "<0x0A>", "<start_of_turn>").
    pub fn token_str(&self, id: u32) -> Option<&str> {
        self.pieces.get(id as usize).map(String::as_str)
    }

    /// The id of a raw vocabulary piece, e.g. to look up "<end_of_turn>" for a chat template.
    pub fn token_id(&self, piece: &str) -> Option<u32> {
        self.piece_to_id.get(piece).copied()
    }

    /// The type of token `id` (how it is parsed and rendered).
    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.types.get(id as usize).copied()
    }
}
