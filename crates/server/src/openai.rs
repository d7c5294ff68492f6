//! The OpenAI request bodies we accept, and the checks of their JSON shape: every wrong
//! value is a 400 that names the parameter (its path, `messages[2].content`) and says what
//! was wrong in the API's terms (`max_tokens must be an integer, got "ten"`), before
//! anything is queued. The ranges of the values are checked by the coordinator's request
//! builder ([`tpserve_coordinator::RequestParams::build`]), which [`Sampling::params`] feeds.
//! [`parse_completion`] and [`parse_chat`] turn a body's bytes into a request.
//!
//! OpenAI parameters, field by field (a `null` is always the same as leaving it out):
//! - **Served**: `model`, `prompt`, `messages`, `max_tokens`, `max_completion_tokens`,
//!   `temperature`, `top_p`, `seed`, `stop`, `stream`, `stream_options`,
//!   `presence_penalty`, `frequency_penalty`, `logit_bias`, `logprobs`, `top_logprobs`,
//!   `echo`; vLLM's `top_k` and `ignore_eos`.
//! - **Accepted at their neutral value only, else a 400 naming them**: `n` and `best_of`
//!   (1: one sample per prompt), `suffix` (""), `tool_choice` and `function_call`
//!   (`"none"`), `parallel_tool_calls` (false), `response_format` (`{"type": "text"}`),
//!   `modalities` (`["text"]`), `store` (false: nothing is stored); vLLM's `min_p` (0),
//!   `repetition_penalty` and `length_penalty` (1), `min_tokens` (0), `use_beam_search`
//!   and `include_stop_str_in_output` (false), `stop_token_ids` (`[]`).
//! - **Refused with a 400 naming them** (not implemented, and answering as if they were
//!   absent would be wrong): `tools`, `functions`, `audio`, `prediction`,
//!   `web_search_options`, `reasoning_effort`, `verbosity`; vLLM's `guided_json`,
//!   `guided_regex`, `guided_choice`, `guided_grammar`.
//! - **Accepted and ignored** (they do not change the answer): `user`, `metadata`,
//!   `service_tier`, `safety_identifier`, `prompt_cache_key` (prefixes are cached anyway).
//! - Any other field is ignored, as vLLM does, so clients that send extensions of other
//!   servers still work.

use std::fmt::Write as _;

use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{Map, Value};
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

/// What completions and chat share (read from the same body as the endpoint's own fields).
#[derive(Debug, Deserialize, Default)]
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
    /// OpenAI's `logit_bias`: an object from token ids (as strings, `{"50256": -100}`) to a
    /// bias from -100 to 100 added to that token's logit before sampling (after the
    /// penalties); -100 bans a token, +100 all but forces it. At most 1024 entries; ids
    /// must be in the vocabulary. Default: none.
    pub logit_bias: Option<Map<String, Value>>,
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
    #[serde(skip)]
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
    #[serde(skip)]
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
#[derive(Debug, PartialEq)]
pub enum Prompt {
    /// Text, tokenized with a BOS first when the model wants one and special tokens parsed.
    Text(String),
    /// Token ids, each checked against the vocabulary.
    Ids(Vec<u32>),
}

/// Reads a `POST /v1/completions` body: JSON syntax, the parameters we refuse, then every
/// field's type. Never panics, whatever the bytes.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let v = json_object(body)?;
    refuse_unsupported(&v)?;
    let mut r: CompletionRequest = typed(&v)?;
    r.common = typed(&v)?;
    Ok(r)
}

/// Reads a `POST /v1/chat/completions` body, as [`parse_completion`] does.
pub fn parse_chat(body: &[u8]) -> Result<ChatRequest, ApiError> {
    let v = json_object(body)?;
    refuse_unsupported(&v)?;
    let mut r: ChatRequest = typed(&v)?;
    r.common = typed(&v)?;
    Ok(r)
}

/// The body as a JSON object, or a 400 saying where the JSON is broken.
fn json_object(body: &[u8]) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::invalid(None, format!("the body is not valid JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::invalid(None, format!("the body must be a JSON object, got {}", shown(&v))));
    }
    Ok(v)
}

/// `v` as JSON, cut short when long (for messages).
fn shown(v: &Value) -> String {
    let s = v.to_string();
    match s.char_indices().nth(60) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s,
    }
}

/// Deserializes `T` from `v`; a wrong type is a 400 naming the field's path and what it
/// must be, in JSON's words (an integer, a number, an array), with the value given.
fn typed<T: DeserializeOwned>(v: &Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let mut at = v;
        for seg in e.path().iter() {
            at = match seg {
                serde_path_to_error::Segment::Seq { index } => at.get(index),
                serde_path_to_error::Segment::Map { key } => at.get(key),
                _ => None,
            }
            .unwrap_or(&Value::Null);
        }
        let path = e.path().to_string();
        type_error(if path == "." { "" } else { &path }, at, &e.into_inner().to_string())
    })
}

/// The 400 for serde's `msg` about the value `got` at `path`.
fn type_error(path: &str, got: &Value, msg: &str) -> ApiError {
    if let Some(field) = msg.strip_prefix("missing field `").and_then(|r| r.split('`').next()) {
        let param = if path.is_empty() { field.to_string() } else { format!("{path}.{field}") };
        return ApiError::invalid_at(param.clone(), format!("{param} is required"));
    }
    let expected = msg.rsplit_once(", expected ").map(|(_, e)| e);
    let param = if path.is_empty() { "body".to_string() } else { path.to_string() };
    let message = match expected {
        Some(e) if msg.starts_with("invalid type") => format!("{param} must be {}, got {}", in_words(e), shown(got)),
        Some(e) if msg.starts_with("invalid value") => {
            let range = match e {
                "i64" => " from -9223372036854775808 to 9223372036854775807",
                "u64" => " from 0 to 18446744073709551615",
                _ => "",
            };
            format!("{param} must be {}{range}, got {}", in_words(e), shown(got))
        }
        _ => format!("{param}: {msg}"),
    };
    ApiError::invalid_at(param, message)
}

/// serde's name of an expected type in JSON's words.
fn in_words(expected: &str) -> String {
    match expected {
        "i8" | "i16" | "i32" | "i64" | "u8" | "u16" | "u32" | "u64" | "usize" | "isize" => "an integer".into(),
        "f32" | "f64" => "a number".into(),
        "a boolean" => "true or false".into(),
        "a sequence" => "an array".into(),
        e if e.starts_with("struct ") || e == "a map" => "an object".into(),
        e => e.to_string(),
    }
}

/// Refuses the OpenAI (and vLLM) parameters tpserve does not implement, unless given at
/// their neutral value (see the module doc).
fn refuse_unsupported(body: &Value) -> Result<(), ApiError> {
    let refuse = |name: &'static str, why: &str| Err(ApiError::invalid(Some(name), format!("{name} is not supported: {why}")));
    let is_num = |v: &Value, x: f64| v.as_f64() == Some(x);
    let Some(obj) = body.as_object() else { return Ok(()) };
    for (name, v) in obj {
        if v.is_null() {
            continue;
        }
        match name.as_str() {
            "best_of" if !is_num(v, 1.0) => return refuse("best_of", &format!("one sample per prompt (best_of 1), got {}", shown(v))),
            "suffix" if v.as_str() != Some("") => return refuse("suffix", "no text insertion (send the prompt alone)"),
            "tools" => return refuse("tools", "no tool calling"),
            "functions" => return refuse("functions", "no function calling"),
            "tool_choice" if v.as_str() != Some("none") => return refuse("tool_choice", "no tool calling (only \"none\")"),
            "function_call" if v.as_str() != Some("none") => return refuse("function_call", "no function calling (only \"none\")"),
            "parallel_tool_calls" if v.as_bool() != Some(false) => return refuse("parallel_tool_calls", "no tool calling"),
            "response_format" if v.get("type").and_then(Value::as_str) != Some("text") || v.as_object().is_some_and(|o| o.len() != 1) => {
                return refuse("response_format", &format!("only {{\"type\": \"text\"}} (no JSON mode or structured outputs), got {}", shown(v)))
            }
            "modalities" if v.as_array().is_none_or(|a| a.iter().any(|m| m.as_str() != Some("text"))) => return refuse("modalities", "text only ([\"text\"])"),
            "store" if v.as_bool() != Some(false) => return refuse("store", "completions are not stored (only false)"),
            "audio" => return refuse("audio", "text output only"),
            "prediction" => return refuse("prediction", "no predicted outputs"),
            "web_search_options" => return refuse("web_search_options", "no web search"),
            "reasoning_effort" => return refuse("reasoning_effort", "the model is not served as a reasoning model"),
            "verbosity" => return refuse("verbosity", "not implemented"),
            "min_p" if !is_num(v, 0.0) => return refuse("min_p", "not implemented (only 0)"),
            "repetition_penalty" if !is_num(v, 1.0) => return refuse("repetition_penalty", "use presence_penalty or frequency_penalty (only 1)"),
            "length_penalty" if !is_num(v, 1.0) => return refuse("length_penalty", "no beam search (only 1)"),
            "min_tokens" if !is_num(v, 0.0) => return refuse("min_tokens", "not implemented (only 0)"),
            "use_beam_search" if v.as_bool() != Some(false) => return refuse("use_beam_search", "no beam search (only false)"),
            "include_stop_str_in_output" if v.as_bool() != Some(false) => return refuse("include_stop_str_in_output", "not implemented (only false)"),
            "stop_token_ids" if v.as_array().is_none_or(|a| !a.is_empty()) => return refuse("stop_token_ids", "use stop strings (only [])"),
            "guided_json" => return refuse("guided_json", "no guided decoding"),
            "guided_regex" => return refuse("guided_regex", "no guided decoding"),
            "guided_choice" => return refuse("guided_choice", "no guided decoding"),
            "guided_grammar" => return refuse("guided_grammar", "no guided decoding"),
            _ => {}
        }
    }
    Ok(())
}

/// Every check a body gets before the engine, short of the tokenizer: the body read as a
/// completions (`chat == false`) or chat request, its prompt or messages, and the request
/// builder against `limits`, with the text's bytes standing in for token ids. For the fuzz
/// target (`fuzz/fuzz_targets/http_request.rs`) and tests: whatever the bytes, an answer,
/// never a panic.
pub fn check_body(body: &[u8], chat: bool, limits: tpserve_coordinator::Limits) -> Result<tpserve_coordinator::Request, ApiError> {
    let (common, ids) = if chat {
        let r = parse_chat(body)?;
        let mut ids = vec![1];
        for (i, m) in r.messages.iter().enumerate() {
            ids.extend(m.text(i)?.bytes().map(u32::from));
        }
        (r.common, ids)
    } else {
        let r = parse_completion(body)?;
        let ids = match r.prompt(limits.vocab)? {
            Prompt::Ids(ids) => ids,
            Prompt::Text(t) => t.bytes().map(u32::from).collect(),
        };
        (r.common, ids)
    };
    Ok(common.params(Some(16))?.build(ids, limits)?)
}

impl CompletionRequest {
    /// Which of the accepted forms `prompt` has, or a 400 naming `prompt` (or the element
    /// at fault, `prompt[3]`) and what is wrong; token ids must be below `vocab`.
    pub fn prompt(&self, vocab: usize) -> Result<Prompt, ApiError> {
        let id_range = format!("token ids are integers from 0 to {}", vocab.saturating_sub(1));
        let ids = |a: &[Value], at: &str| -> Result<Vec<u32>, ApiError> {
            a.iter()
                .enumerate()
                .map(|(i, v)| {
                    v.as_u64().and_then(|i| u32::try_from(i).ok()).filter(|&i| (i as usize) < vocab).ok_or_else(|| {
                        let param = format!("{at}[{i}]");
                        ApiError::invalid_at(param.clone(), format!("{param} is {}: {id_range}", shown(v)))
                    })
                })
                .collect()
        };
        let forms = "prompt must be a string, an array of one string, or an array of token ids";
        match &self.prompt {
            Value::String(s) => Ok(Prompt::Text(s.clone())),
            Value::Array(a) if a.is_empty() => Err(ApiError::invalid(Some("prompt"), "prompt is empty")),
            Value::Array(a) if a.len() == 1 && a[0].is_string() => Ok(Prompt::Text(a[0].as_str().unwrap_or_default().to_string())),
            Value::Array(a) if a[0].is_number() => ids(a, "prompt").map(Prompt::Ids),
            // One prompt of token ids, as a batch of one.
            Value::Array(a) if a.len() == 1 && a[0].is_array() => ids(a[0].as_array().map_or(&[][..], |v| &v[..]), "prompt[0]").map(Prompt::Ids),
            Value::Array(a) if a.len() > 1 && (a[0].is_string() || a[0].is_array()) => {
                Err(ApiError::invalid(Some("prompt"), "only one prompt per request is supported (n = 1, no prompt batches)"))
            }
            Value::Array(a) => Err(ApiError::invalid_at("prompt[0]", format!("{forms}: prompt[0] is {}", shown(&a[0])))),
            v => Err(ApiError::invalid(Some("prompt"), format!("{forms}, got {}", shown(v)))),
        }
    }
}

impl ChatMessage {
    /// The message text: a string, or the text parts of a content array; `index` is the
    /// message's place in `messages`, for errors.
    pub fn text(&self, index: usize) -> Result<String, ApiError> {
        let param = format!("messages[{index}].content");
        match &self.content {
            Value::String(s) => Ok(s.clone()),
            Value::Null => Ok(String::new()),
            Value::Array(parts) => {
                let mut out = String::new();
                for (i, p) in parts.iter().enumerate() {
                    match (p.get("type").and_then(Value::as_str), p.get("text").and_then(Value::as_str)) {
                        (Some("text"), Some(t)) => out.push_str(t),
                        (Some("text"), None) => {
                            return Err(ApiError::invalid_at(
                                format!("{param}[{i}].text"),
                                format!("{param}[{i}].text must be a string, got {}", p.get("text").map_or("nothing".into(), shown)),
                            ))
                        }
                        (kind, _) => {
                            let mut m = format!("{param}[{i}]: only text content parts are supported");
                            if let Some(k) = kind {
                                let _ = write!(m, ", got type {k:?}");
                            }
                            return Err(ApiError::invalid_at(format!("{param}[{i}]"), m));
                        }
                    }
                }
                Ok(out)
            }
            v => Err(ApiError::invalid_at(param.clone(), format!("{param} must be a string or an array of text parts, got {}", shown(v)))),
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
            Some(Value::Array(a)) => {
                let mut out = Vec::with_capacity(a.len());
                for (i, v) in a.iter().enumerate() {
                    match v.as_str() {
                        Some(s) => out.push(s.to_string()),
                        None => return Err(ApiError::invalid_at(format!("stop[{i}]"), format!("stop[{i}] must be a string, got {}", shown(v)))),
                    }
                }
                out
            }
            Some(v) => return Err(ApiError::invalid(Some("stop"), format!("stop must be a string or an array of strings, got {}", shown(v)))),
        };
        let (max_tokens_param, max_tokens) = match (self.max_completion_tokens, self.max_tokens) {
            (Some(v), _) => ("max_completion_tokens", Some(v)),
            (None, v) => ("max_tokens", v),
        };
        let mut logit_bias = Vec::new();
        for (k, v) in self.logit_bias.iter().flatten() {
            let Ok(id) = k.trim().parse::<i64>() else {
                return Err(ApiError::invalid(
                    Some("logit_bias"),
                    format!("logit_bias key {k:?} is not a token id: keys are token ids written as strings, e.g. {{\"50256\": -100}}"),
                ));
            };
            let Some(b) = v.as_f64() else {
                return Err(ApiError::invalid(Some("logit_bias"), format!("logit_bias[\"{k}\"] must be a number from -100 to 100, got {}", shown(v))));
            };
            logit_bias.push((id, b as f32));
        }
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
            logit_bias,
        })
    }

    /// Whether the client asked for a last chunk with the usage
    /// (`stream_options.include_usage`).
    pub fn include_usage(&self) -> bool {
        self.stream_options.as_ref().is_some_and(|o| o.include_usage)
    }
}

#[cfg(test)]
mod tests;
