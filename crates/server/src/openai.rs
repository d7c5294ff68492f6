//! The OpenAI request bodies we accept, and their checking: every wrong value is a 400 that
//! names the parameter, before anything is queued.

use serde::Deserialize;
use serde_json::Value;
use tpserve_coordinator::{OverContext, RequestParams};

use crate::error::ApiError;

#[derive(Debug, Deserialize, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// What completions and chat share.
#[derive(Debug, Deserialize)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f32>,
    pub top_p: Option<f32>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<Value>,
    pub n: Option<i64>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub presence_penalty: Option<f32>,
    pub frequency_penalty: Option<f32>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// Accepted and ignored (OpenAI's end-user id).
    pub user: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    pub prompt: Value,
    #[serde(flatten)]
    pub common: Sampling,
    /// Alternatives per token (and log-probabilities at all).
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    pub messages: Vec<ChatMessage>,
    #[serde(flatten)]
    pub common: Sampling,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct ChatMessage {
    pub role: String,
    #[serde(default)]
    pub content: Value,
}

/// The prompt as the client gave it.
pub enum Prompt {
    Text(String),
    Ids(Vec<u32>),
}

impl CompletionRequest {
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

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}
