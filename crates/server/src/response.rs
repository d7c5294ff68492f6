//! The OpenAI response shapes as types (TGI's habit): what `/v1/completions`,
//! `/v1/chat/completions` (whole and streamed) and `/v1/models` answer. `tests/server.rs`
//! checks live answers against the schemas of OpenAI's published OpenAPI spec.

use std::collections::BTreeMap;

use serde::Serialize;
use tpserve_coordinator::Summary;

/// The log-probability reported for a token the ranks gave none for (vLLM's floor for
/// minus infinity; JSON has no infinity).
pub const LOGPROB_FLOOR: f32 = -9999.0;

/// Token counts of a request.
#[derive(Debug, Clone, Serialize)]
pub struct Usage {
    /// Tokens of the prompt as the model saw it (for chat, the whole rendered template).
    pub prompt_tokens: usize,
    /// Tokens sampled, an end-of-generation token included.
    pub completion_tokens: usize,
    /// Their sum.
    pub total_tokens: usize,
    /// How many prompt tokens came from the prefix cache.
    pub prompt_tokens_details: PromptTokensDetails,
}

/// Part of [`Usage`].
#[derive(Debug, Clone, Serialize)]
pub struct PromptTokensDetails {
    /// Prompt tokens served from the prefix cache.
    pub cached_tokens: usize,
}

impl From<&Summary> for Usage {
    fn from(s: &Summary) -> Self {
        Usage {
            prompt_tokens: s.prompt_tokens,
            completion_tokens: s.completion_tokens,
            total_tokens: s.prompt_tokens + s.completion_tokens,
            prompt_tokens_details: PromptTokensDetails { cached_tokens: s.cached_tokens },
        }
    }
}

/// What every response and chunk of one request carries.
#[derive(Debug, Clone, Serialize)]
pub struct Head {
    /// `cmpl-N` or `chatcmpl-N`.
    pub id: String,
    /// `text_completion`, `chat.completion` or `chat.completion.chunk`.
    pub object: &'static str,
    /// Unix time of the request, in seconds.
    pub created: u64,
    /// The served model's id.
    pub model: String,
}

/// `usage` of a streamed chunk: absent unless the client asked for it with
/// `stream_options.include_usage`; then `null` on every chunk but the last.
#[derive(Debug, Clone, Default)]
pub enum ChunkUsage {
    /// Not asked for: no `usage` key.
    #[default]
    Absent,
    /// Asked for, not yet known: `"usage": null`.
    Null,
    /// The last chunk.
    Usage(Usage),
}

impl ChunkUsage {
    fn is_absent(&self) -> bool {
        matches!(self, ChunkUsage::Absent)
    }
}

impl Serialize for ChunkUsage {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            ChunkUsage::Absent | ChunkUsage::Null => s.serialize_none(),
            ChunkUsage::Usage(u) => u.serialize(s),
        }
    }
}

/// A completion, or one chunk of a streamed one.
#[derive(Debug, Clone, Serialize)]
pub struct Completion {
    /// `id`, `object` (`text_completion`), `created`, `model`, at the top level.
    #[serde(flatten)]
    pub head: Head,
    /// One choice (n = 1), or none on the usage chunk of a stream.
    pub choices: Vec<CompletionChoice>,
    /// Always present on a whole response; see [`ChunkUsage`] for chunks.
    #[serde(skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
}

/// The one choice of a completion.
#[derive(Debug, Clone, Serialize)]
pub struct CompletionChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The text (with the prompt first when `echo`).
    pub text: String,
    /// Present when `logprobs` was asked for.
    pub logprobs: Option<CompletionLogprobs>,
    /// Set on the last choice; `null` on earlier stream chunks.
    pub finish_reason: Option<&'static str>,
}

/// Log-probabilities in the completions format: parallel arrays, one entry per token.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CompletionLogprobs {
    /// Each token's text.
    pub tokens: Vec<String>,
    /// Its log-probability (`null` for an echoed prompt's first token, as OpenAI answers).
    pub token_logprobs: Vec<Option<f32>>,
    /// The most likely tokens at its position, by text.
    pub top_logprobs: Vec<Option<BTreeMap<String, f32>>>,
    /// Byte offset of each token in the text.
    pub text_offset: Vec<usize>,
}

/// A chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatCompletion {
    /// `id`, `object` (`chat.completion`), `created`, `model`, at the top level.
    #[serde(flatten)]
    pub head: Head,
    /// One choice (n = 1).
    pub choices: Vec<ChatChoice>,
    /// Token counts.
    pub usage: Usage,
}

/// The one choice of a chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// The assistant's message.
    pub message: AssistantMessage,
    /// Present when `logprobs: true`.
    pub logprobs: Option<ChatLogprobs>,
    /// Why generation ended.
    pub finish_reason: &'static str,
}

/// The assistant's reply.
#[derive(Debug, Clone, Serialize)]
pub struct AssistantMessage {
    /// Always `assistant`.
    pub role: &'static str,
    /// The generated text.
    pub content: String,
    /// A refusal message; tpserve never refuses, so always `null` (OpenAI requires the key).
    pub refusal: Option<String>,
}

/// Log-probabilities in the chat format.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ChatLogprobs {
    /// One entry per generated token.
    pub content: Vec<TokenLogprob>,
    /// Refusal tokens: always `null` (OpenAI requires the key).
    pub refusal: Option<Vec<TokenLogprob>>,
}

/// One token's log-probability in the chat format.
#[derive(Debug, Clone, Serialize)]
pub struct TokenLogprob {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
    /// The most likely tokens at its position, best first.
    pub top_logprobs: Vec<TopLogprob>,
}

/// One alternative of a [`TokenLogprob`].
#[derive(Debug, Clone, Serialize)]
pub struct TopLogprob {
    /// Its text.
    pub token: String,
    /// Its log-probability.
    pub logprob: f32,
    /// The UTF-8 bytes of its text.
    pub bytes: Vec<u8>,
}

/// One chunk of a streamed chat completion.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunk {
    /// `id`, `object` (`chat.completion.chunk`), `created`, `model`: the same on every
    /// chunk of one request.
    #[serde(flatten)]
    pub head: Head,
    /// One choice, or none on the usage chunk.
    pub choices: Vec<ChatChunkChoice>,
    /// See [`ChunkUsage`].
    #[serde(skip_serializing_if = "ChunkUsage::is_absent")]
    pub usage: ChunkUsage,
}

/// The one choice of a chat chunk.
#[derive(Debug, Clone, Serialize)]
pub struct ChatChunkChoice {
    /// Always 0 (n = 1).
    pub index: u32,
    /// What the message gained.
    pub delta: Delta,
    /// The new tokens' log-probabilities when `logprobs: true`, else `null`.
    pub logprobs: Option<ChatLogprobs>,
    /// Set on the last chunk with a choice; `null` before.
    pub finish_reason: Option<&'static str>,
}

/// What a chat chunk adds to the message: the role on the first, text on later ones,
/// nothing on the last.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Delta {
    /// `assistant`, on the first chunk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// New text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// Always `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}

/// One model, as `GET /v1/models` lists it and `GET /v1/models/{model}` returns it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// The id clients send as `model`.
    pub id: String,
    /// Always `model`.
    pub object: &'static str,
    /// 0: tpserve does not know when the file was made.
    pub created: u64,
    /// Always `tpserve`.
    pub owned_by: &'static str,
    /// The context length served (vLLM's extension).
    pub max_model_len: usize,
}
