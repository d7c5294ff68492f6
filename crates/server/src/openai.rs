//! The OpenAI request bodies we accept, and their checking: every wrong value is a 400 that
//! names the parameter, before anything is queued.

use serde::Deserialize;
use serde_json::Value;
use tpserve_coordinator::Request;
use tpserve_types::sampling::Penalties;
use tpserve_types::SamplingParams;

use crate::error::ApiError;

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per position for log-probabilities.
pub const MAX_LOGPROBS: usize = 20;

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
            Value::Array(a) if a.len() == 1 && a[0].as_array().is_some_and(|x| x.iter().all(|v| v.is_u64())) => ids(a[0].as_array().unwrap_or(&Vec::new())).map(Prompt::Ids),
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

/// Limits a request is checked against.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub context_len: usize,
    /// Most positions one sequence may hold in the KV cache.
    pub kv_tokens: usize,
}

impl Sampling {
    /// The engine request for `prompt_ids`, or the 400 that says what is wrong.
    /// `default_max` is used when neither max_tokens nor max_completion_tokens is given
    /// (None: up to the context).
    pub fn to_request(&self, prompt_ids: Vec<u32>, limits: Limits, default_max: Option<usize>, prompt_param: &'static str) -> Result<Request, ApiError> {
        if prompt_ids.is_empty() {
            return Err(ApiError::invalid(Some(prompt_param), format!("{prompt_param} is empty")));
        }
        let room = limits.context_len.min(limits.kv_tokens);
        if prompt_ids.len() >= room {
            return Err(ApiError::invalid(
                Some(prompt_param),
                format!("This model's maximum context length is {room} tokens. However, your prompt has {} tokens.", prompt_ids.len()),
            )
            .with_code("context_length_exceeded"));
        }
        let (param, asked) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v),
        };
        let max_tokens = match asked {
            Some(v) if v <= 0 => return Err(ApiError::invalid(Some(param), format!("{param} must be at least 1, got {v}"))),
            Some(v) => {
                let v = v as u64;
                if v as usize + prompt_ids.len() > room || v > room as u64 {
                    return Err(ApiError::invalid(
                        Some(param),
                        format!(
                            "This model's maximum context length is {room} tokens. However, you requested {} tokens ({} in the prompt, {v} for the completion).",
                            prompt_ids.len() as u64 + v,
                            prompt_ids.len()
                        ),
                    )
                    .with_code("context_length_exceeded"));
                }
                v as usize
            }
            None => default_max.unwrap_or(usize::MAX).min(room - prompt_ids.len()),
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=2.0).contains(&temperature)) {
            return Err(ApiError::invalid(Some("temperature"), format!("temperature must be between 0 and 2, got {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(Some("top_p"), format!("top_p must be in (0, 1], got {top_p}")));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => k as usize,
            Some(k) => return Err(ApiError::invalid(Some("top_k"), format!("top_k must be -1 (off) or at least 1, got {k}"))),
        };
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::invalid(Some("n"), format!("only n = 1 is supported, got {n}")));
        }
        let penalty = |v: Option<f32>, name: &'static str| -> Result<f32, ApiError> {
            let v = v.unwrap_or(0.0);
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(ApiError::invalid(Some(name), format!("{name} must be between -2 and 2, got {v}")));
            }
            Ok(v)
        };
        let penalties = Penalties { presence: penalty(self.presence_penalty, "presence_penalty")?, frequency: penalty(self.frequency_penalty, "frequency_penalty")? };
        let stop = match &self.stop {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(a)) if a.iter().all(Value::is_string) => a.iter().filter_map(|v| v.as_str().map(str::to_string)).collect(),
            Some(_) => return Err(ApiError::invalid(Some("stop"), "stop must be a string or an array of strings")),
        };
        if stop.len() > MAX_STOP {
            return Err(ApiError::invalid(Some("stop"), format!("at most {MAX_STOP} stop strings, got {}", stop.len())));
        }
        let seed = match self.seed {
            Some(s) => s as u64,
            None => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64),
        };
        let sampling = SamplingParams { temperature, top_k, top_p, seed };
        sampling.validate().map_err(|e| ApiError::invalid(None, e.to_string()))?;
        Ok(Request { prompt_ids, max_tokens, sampling, penalties, stop, ignore_eos: self.ignore_eos, logprobs: None, prompt_logprobs: None })
    }

    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

/// Checks a log-probability count.
pub fn logprobs_count(v: Option<i64>, param: &'static str) -> Result<Option<usize>, ApiError> {
    match v {
        None => Ok(None),
        Some(n) if (0..=MAX_LOGPROBS as i64).contains(&n) => Ok(Some(n as usize)),
        Some(n) => Err(ApiError::invalid(Some(param), format!("{param} must be between 0 and {MAX_LOGPROBS}, got {n}"))),
    }
}
