//! The OpenAI request bodies we accept, and the checks of their JSON shape: every wrong
//! value is a 400 that names the parameter, before anything is queued. The ranges of the
//! values are checked by the coordinator's request builder
//! ([`tpserve_coordinator::RequestParams::build`]), which [`Sampling::params`] feeds.
//! Fields tpserve does not know (`logit_bias`, `tools`, ...) are ignored.

use serde::Deserialize;
use serde_json::Value;
use tpserve_coordinator::{OverContext, RequestParams};

use crate::error::ApiError;

/// OpenAI's `stream_options`; meaningful only with `stream: true`.
#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    /// Send one more chunk before `[DONE]` with the request's `usage` (token counts) and no
    /// choices, and `"usage": null` on every earlier chunk. Default false: no `usage` key.
    #[serde(default)]
    pub include_usage: bool,
}

/// What completions and chat share (flattened into both bodies).
#[derive(Debug, Deserialize)]
pub struct Sampling {
    /// The model id. Optional here (OpenAI requires it); when given it must be the served
    /// model's name (`GET /v1/models`), else a 404 `model_not_found`.
    pub model: Option<String>,
    /// Most tokens to generate, at least 1. Prompt and `max_tokens` must fit the context
    /// (and the KV cache), else a 400 `context_length_exceeded`; generation stops there with
    /// `finish_reason: "length"`. Default: 16 on completions (OpenAI's), the rest of the
    /// context on chat.
    pub max_tokens: Option<i64>,
    /// Chat's newer name for `max_tokens` (accepted on both endpoints): same range and
    /// default, wins when both are given, and errors name it.
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature, 0 to 2, default 1; 0 is greedy (the argmax).
    pub temperature: Option<f32>,
    /// Nucleus sampling: only the most likely tokens whose probabilities sum to `top_p`
    /// are candidates (applied after `top_k`; without `top_k` the nucleus is cut at 512
    /// tokens). In (0, 1], default 1 (off).
    pub top_p: Option<f32>,
    /// Not OpenAI's (vLLM's extension): sample among the `top_k` most likely tokens. At
    /// least 1 (1 is greedy), or -1 or 0 for off, the default.
    pub top_k: Option<i64>,
    /// Seed of the sampling noise: the same seed, prompt and parameters give the same
    /// tokens. Any signed 64-bit integer; default: a fresh seed per request.
    pub seed: Option<i64>,
    /// A string or an array of up to 4 strings (null: none; empty strings are ignored).
    /// Generation ends before the first occurrence of any, with `finish_reason: "stop"`;
    /// the stop string is not returned.
    pub stop: Option<Value>,
    /// Choices per prompt: only 1, the default; any other value is a 400.
    pub n: Option<i64>,
    /// Answer with server-sent events (`data: {chunk}` lines as text becomes final, then
    /// `data: [DONE]`) instead of one JSON body. Default false.
    #[serde(default)]
    pub stream: bool,
    /// Options for a streamed answer.
    pub stream_options: Option<StreamOptions>,
    /// -2 to 2, default 0: lowers the logit of every token generated at least once by this
    /// much (negative raises it). Only generated tokens count, not the prompt's.
    pub presence_penalty: Option<f32>,
    /// -2 to 2, default 0: lowers a token's logit by this much per time it was generated.
    pub frequency_penalty: Option<f32>,
    /// Not OpenAI's (vLLM's extension, for benchmarks): keep generating past
    /// end-of-generation tokens, up to `max_tokens` or a stop string. Default false.
    #[serde(default)]
    pub ignore_eos: bool,
    /// Accepted and ignored (OpenAI's end-user id).
    pub user: Option<String>,
}

/// The body of `POST /v1/completions`.
#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    /// A string, an array of one string, an array of token ids, or an array holding one
    /// array of token ids (see [`CompletionRequest::prompt`]); several prompts are a 400.
    pub prompt: Value,
    /// The parameters chat shares.
    #[serde(flatten)]
    pub common: Sampling,
    /// Return each generated token's log-probability with this many most likely
    /// alternatives per position: 0 to 20; null (the default) returns none.
    pub logprobs: Option<i64>,
    /// Return the prompt's text before the completion; with `logprobs`, the prompt tokens'
    /// log-probabilities too (the first is null). Default false.
    #[serde(default)]
    pub echo: bool,
}

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    /// The conversation, at least one message, rendered with the model's chat template and
    /// the assistant's turn opened.
    pub messages: Vec<ChatMessage>,
    /// The parameters completions share.
    #[serde(flatten)]
    pub common: Sampling,
    /// Return each generated token's log-probability. Default false.
    #[serde(default)]
    pub logprobs: bool,
    /// With `logprobs: true`, the most likely alternatives returned per position, 0 to 20
    /// (default 0); given without it, a 400.
    pub top_logprobs: Option<i64>,
}

/// One message of a chat conversation.
#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    /// `system`, `developer` (rendered as `system`), `user` or `assistant`; any other role
    /// is a 400.
    pub role: String,
    /// A string, null (empty), or an array of `{"type": "text", "text": ...}` parts, joined;
    /// other parts (images, audio) are a 400. See [`ChatMessage::text`].
    #[serde(default)]
    pub content: Value,
}

/// The prompt as the client gave it.
pub enum Prompt {
    /// Text, tokenized with a BOS first when the model wants one and special tokens parsed.
    Text(String),
    /// Token ids, used as they are (the request builder refuses ids outside the vocabulary).
    Ids(Vec<u32>),
}

impl CompletionRequest {
    /// Which of the accepted forms `prompt` has, or a 400 naming `prompt`.
    pub fn prompt(&self) -> Result<Prompt, ApiError> {
        let bad = || ApiError::invalid(Some("prompt"), "prompt must be a string, an array of one string, or an array of token ids");
        let ids = |a: &[Value]| -> Result<Vec<u32>, ApiError> { a.iter().map(|v| v.as_u64().and_then(|i| u32::try_from(i).ok()).ok_or_else(bad)).collect() };
        match &self.prompt {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string())),
            Value::Array(a) if a.iter().all(|v| v.is_u64()) => ids(a).map(Prompt::Ids),
            // One prompt of token ids, as a batch of one.
            Value::Array(a) if a.len() == 1 && a[0].as_array().is_some_and(|x| x.iter().all(|v| v.is_u64())) => {
                ids(a[0].as_array().unwrap_or(&Vec::new())).map(Prompt::Ids)
            }
            Value::Array(a) if a.len() > 1 && a.iter().all(|v| v.is_string() || v.is_array()) => {
                Err(ApiError::invalid(Some("prompt"), "only one prompt per request is supported (n = 1, no prompt batches)"))
            }
            _ => Err(bad()),
        }
    }
}

impl ChatMessage {
    /// The message text: a string, or the text parts of a content array.
    pub fn text(&self) -> Result<String, ApiError> {
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => {
                let mut out = String::new();
                for p in parts {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        _ => return Err(ApiError::invalid(Some("messages"), "only text content parts are supported")),
                    }
                }
                Ok(out)
            }
            _ => Err(ApiError::invalid(Some("messages"), "message content must be a string or an array of text parts")),
        }
    }
}

impl Sampling {
    /// The request's values for [`RequestParams::build`], after the checks of their JSON
    /// shape; `default_max` is used when neither max_tokens nor max_completion_tokens is
    /// given (None: up to the context).
    pub fn params(&self, default_max: Option<usize>) -> Result<RequestParams, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(Some("n"), format!("only n = 1 is supported, got {n}")));
        }
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(_) => return Err(ApiError::invalid(Some("stop"), "stop must be a string or an array of strings")),
        };
        let (max_tokens_param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v),
        };
        Ok(RequestParams {
            max_tokens,
            max_tokens_param: Some(max_tokens_param),
            default_max_tokens: default_max,
            over_context: OverContext::Refuse,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            // Any 64-bit seed, negative ones included, as OpenAI takes them.
            seed: self.seed.map(|s| s as u64),
            stop,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            ignore_eos: self.ignore_eos,
            logprobs: None,
            logprobs_param: None,
            prompt_logprobs: None,
        })
    }

    /// Whether the client asked for a last chunk with the usage
    /// (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}
