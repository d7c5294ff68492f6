//! One way in for a request. Every front end (the HTTP API, `--stdin` lines, `tpserve
//! generate`) hands what its user wrote to [`RequestParams::build`], which checks each value
//! against the model's [`Limits`] and answers with the engine's [`Request`] or with an
//! [`InvalidParam`] naming the parameter, its value and what is wrong. The front ends only
//! turn their own syntax into [`RequestParams`] and the error into theirs (an OpenAI error
//! body, a message naming the flag).

use tpserve_types::sampling::{Penalties, MAX_LOGIT_BIAS};
use tpserve_types::{SamplingParams, TokenId};

use crate::engine::Request;

/// Most stop strings per request (OpenAI's limit).
pub const MAX_STOP: usize = 4;
/// Most alternatives per position for log-probabilities (OpenAI's limit).
pub const MAX_LOGPROBS: usize = 20;
/// Highest sampling temperature (OpenAI's range is 0 to 2).
pub const MAX_TEMPERATURE: f32 = 2.0;

/// A parameter whose value cannot be served, in the user's terms.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{param} {value}: {reason}")]
pub struct InvalidParam {
    /// The parameter as the HTTP API names it (`max_tokens`, `top_p`); the CLI shows it as
    /// a flag (`--max-tokens`, see [`InvalidParam::flag`]).
    pub param: &'static str,
    /// The value as given.
    pub value: String,
    /// What is wrong with it and what would be accepted.
    pub reason: String,
    /// OpenAI's error code for it, when it has one (`context_length_exceeded`).
    pub code: Option<&'static str>,
}

impl InvalidParam {
    fn new(param: &'static str, value: impl ToString, reason: impl Into<String>) -> Self {
        Self { param, value: value.to_string(), reason: reason.into(), code: None }
    }

    fn context(param: &'static str, value: impl ToString, reason: String) -> Self {
        Self { code: Some("context_length_exceeded"), ..Self::new(param, value, reason) }
    }

    /// The parameter as a command-line flag: `top_p` is `--top-p`.
    pub fn flag(&self) -> String {
        format!("--{}", self.param.replace('_', "-"))
    }

    /// The message with the parameter written as a flag (`--top-p 0: must be ...`).
    pub fn as_flag_message(&self) -> String {
        format!("{} {}: {}", self.flag(), self.value, self.reason)
    }
}

/// What a request is checked against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Positions per sequence the model (and the scheduler) allow.
    pub context_len: usize,
    /// Positions one sequence may hold in the KV cache.
    pub kv_tokens: usize,
    /// Token ids the model has embeddings for.
    pub vocab: usize,
}

impl Limits {
    /// Positions one request may use: prompt and completion together.
    pub fn room(&self) -> usize {
        self.context_len.min(self.kv_tokens)
    }
}

/// What a `max_tokens` beyond the context means.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OverContext {
    /// A 400 with `context_length_exceeded`, as OpenAI's API answers.
    #[default]
    Refuse,
    /// Generation stops at the end of the context with finish reason "length" (the CLI).
    Clamp,
}

/// The values a user gave for one request, unchecked; `None` where they gave none.
#[derive(Debug, Clone, Default)]
pub struct RequestParams {
    /// Most tokens to generate.
    pub max_tokens: Option<i64>,
    /// The name `max_tokens` was given under, for messages (default `max_tokens`; chat's
    /// `max_completion_tokens`).
    pub max_tokens_param: Option<&'static str>,
    /// Used when `max_tokens` is not given; `None`: up to the end of the context.
    pub default_max_tokens: Option<usize>,
    /// What a `max_tokens` beyond the context means.
    pub over_context: OverContext,
    /// Sampling temperature, 0 to [`MAX_TEMPERATURE`] (default 1; 0 = greedy).
    pub temperature: Option<f32>,
    /// Nucleus sampling, in (0, 1] (default 1 = off).
    pub top_p: Option<f32>,
    /// Sample among the k most likely tokens; 0 or -1 = off (the default).
    pub top_k: Option<i64>,
    /// Seed of the sampling noise (default: a fresh one).
    pub seed: Option<u64>,
    /// Generation stops before the first occurrence of any of these (at most [`MAX_STOP`]).
    pub stop: Vec<String>,
    /// OpenAI's presence penalty, -2 to 2.
    pub presence_penalty: Option<f32>,
    /// OpenAI's frequency penalty, -2 to 2.
    pub frequency_penalty: Option<f32>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Log-probabilities of each sampled token with this many alternatives (0 to
    /// [`MAX_LOGPROBS`]); `None`: none.
    pub logprobs: Option<i64>,
    /// The name `logprobs` was given under (chat's `top_logprobs`).
    pub logprobs_param: Option<&'static str>,
    /// Log-probabilities of the prompt tokens from this index on (`echo`, perplexity).
    pub prompt_logprobs: Option<usize>,
    /// OpenAI's `logit_bias`: (token id, bias) pairs; ids must be in the vocabulary, biases
    /// in [-100, 100], at most [`MAX_LOGIT_BIAS_ENTRIES`] of them.
    pub logit_bias: Vec<(i64, f32)>,
}

/// The most `logit_bias` entries a request may give (each travels to every worker).
pub const MAX_LOGIT_BIAS_ENTRIES: usize = 1024;

/// A seed that differs from request to request.
pub fn fresh_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The checked values that do not depend on the prompt.
struct Checked {
    sampling: SamplingParams,
    penalties: Penalties,
    logprobs: Option<usize>,
}

impl RequestParams {
    /// Checks every value that does not depend on the prompt or the model, so a front end
    /// can refuse a bad flag before it loads anything; [`RequestParams::build`] checks them
    /// again with the rest.
    pub fn validate(&self) -> Result<(), InvalidParam> {
        self.checked().map(|_| ())
    }

    /// Checks every value and makes the engine's request for `prompt_ids`.
    pub fn build(&self, prompt_ids: Vec<TokenId>, limits: Limits) -> Result<Request, InvalidParam> {
        let c = self.checked()?;
        let max_tokens = self.max_tokens(&prompt_ids, limits)?;
        Ok(Request {
            prompt_ids,
            max_tokens,
            sampling: c.sampling,
            penalties: c.penalties,
            stop: self.stop.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ignore_eos: self.ignore_eos,
            logprobs: c.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            logit_bias: self.logit_bias(limits)?,
        })
    }

    fn checked(&self) -> Result<Checked, InvalidParam> {
        if let Some(v) = self.max_tokens.filter(|&v| v <= 0) {
            return Err(InvalidParam::new(self.max_tokens_param.unwrap_or("max_tokens"), v, "must be at least 1"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !(temperature.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&temperature)) {
            return Err(InvalidParam::new("temperature", temperature, format!("must be between 0 and {MAX_TEMPERATURE} (0 = greedy)")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(InvalidParam::new("top_p", top_p, "must be greater than 0 and at most 1 (1 = no limit)"));
        }
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => return Err(InvalidParam::new("top_k", k, "must be -1 or 0 (off), or at least 1")),
        };
        let penalty = |v: Option<f32>, name: &'static str| -> Result<f32, InvalidParam> {
            let v = v.unwrap_or(0.0);
            if !(v.is_finite() && (-2.0..=2.0).contains(&v)) {
                return Err(InvalidParam::new(name, v, "must be between -2 and 2"));
            }
            Ok(v)
        };
        let penalties =
            Penalties { presence: penalty(self.presence_penalty, "presence_penalty")?, frequency: penalty(self.frequency_penalty, "frequency_penalty")? };
        if self.stop.len() > MAX_STOP {
            return Err(InvalidParam::new("stop", format!("[{} strings]", self.stop.len()), format!("at most {MAX_STOP} stop strings")));
        }
        let logprobs = match self.logprobs {
            None => None,
            Some(n) if (0..=MAX_LOGPROBS as i64).contains(&n) => Some(n as usize),
            Some(n) => return Err(InvalidParam::new(self.logprobs_param.unwrap_or("logprobs"), n, format!("must be between 0 and {MAX_LOGPROBS}"))),
        };
        let sampling = SamplingParams { temperature, top_k, top_p, seed: self.seed.unwrap_or_else(fresh_seed) };
        Ok(Checked { sampling, penalties, logprobs })
    }

    /// The `logit_bias` entries checked against the vocabulary.
    fn logit_bias(&self, limits: Limits) -> Result<tpserve_types::LogitBias, InvalidParam> {
        if self.logit_bias.len() > MAX_LOGIT_BIAS_ENTRIES {
            return Err(InvalidParam::new(
                "logit_bias",
                format!("{{{} entries}}", self.logit_bias.len()),
                format!("at most {MAX_LOGIT_BIAS_ENTRIES} token ids may be biased"),
            ));
        }
        let mut out = Vec::with_capacity(self.logit_bias.len());
        for &(id, bias) in &self.logit_bias {
            let max = limits.vocab.saturating_sub(1);
            let Some(id) = u32::try_from(id).ok().filter(|&i| (i as usize) < limits.vocab) else {
                return Err(InvalidParam::new("logit_bias", format!("{{\"{id}\": {bias}}}"), format!("token ids are integers from 0 to {max}")));
            };
            if !(bias.is_finite() && (-MAX_LOGIT_BIAS..=MAX_LOGIT_BIAS).contains(&bias)) {
                return Err(InvalidParam::new("logit_bias", format!("{{\"{id}\": {bias}}}"), "biases must be numbers from -100 to 100"));
            }
            out.push((id, bias));
        }
        Ok(tpserve_types::LogitBias::new(out))
    }

    /// The prompt checked against the model, and how many tokens may follow it.
    fn max_tokens(&self, prompt_ids: &[TokenId], limits: Limits) -> Result<usize, InvalidParam> {
        let n = prompt_ids.len();
        if n == 0 {
            return Err(InvalidParam::new("prompt", "\"\"", "is empty"));
        }
        if let Some(&bad) = prompt_ids.iter().find(|&&i| i as usize >= limits.vocab) {
            return Err(InvalidParam::new("prompt", format!("[.., {bad}, ..]"), format!("token id {bad} is outside the vocabulary ({} tokens)", limits.vocab)));
        }
        let room = limits.room();
        if n >= room {
            return Err(InvalidParam::context(
                "prompt",
                format!("[{n} tokens]"),
                format!("This model's maximum context length is {room} tokens. However, your prompt has {n} tokens."),
            ));
        }
        let param = self.max_tokens_param.unwrap_or("max_tokens");
        match self.max_tokens {
            None => Ok(self.default_max_tokens.unwrap_or(usize::MAX).min(room - n)),
            Some(v) => {
                let v = u64::try_from(v).unwrap_or(0);
                if v.saturating_add(n as u64) <= room as u64 {
                    return Ok(v as usize);
                }
                match self.over_context {
                    OverContext::Clamp => Ok(room - n),
                    OverContext::Refuse => Err(InvalidParam::context(
                        param,
                        v,
                        format!("This model's maximum context length is {room} tokens. However, you requested {} tokens ({n} in the prompt, {v} for the completion).", v + n as u64),
                    )),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits { context_len: 100, kv_tokens: 1000, vocab: 50 };

    #[test]
    fn defaults_give_temperature_one_and_the_rest_of_the_context() {
        let r = RequestParams { seed: Some(3), ..Default::default() }.build(vec![1, 2, 3], LIMITS).unwrap();
        assert_eq!(r.max_tokens, 97);
        assert_eq!(r.sampling, SamplingParams { temperature: 1.0, top_k: 0, top_p: 1.0, seed: 3 });
        let r = RequestParams { default_max_tokens: Some(16), top_k: Some(-1), ..Default::default() }.build(vec![1], LIMITS).unwrap();
        assert_eq!((r.max_tokens, r.sampling.top_k), (16, 0));
    }

    #[test]
    fn every_bad_value_is_named_with_its_value() {
        let cases: Vec<(RequestParams, &str, &str)> = vec![
            (RequestParams { temperature: Some(2.5), ..Default::default() }, "temperature", "2.5"),
            (RequestParams { temperature: Some(f32::NAN), ..Default::default() }, "temperature", "NaN"),
            (RequestParams { top_p: Some(0.0), ..Default::default() }, "top_p", "0"),
            (RequestParams { top_k: Some(-2), ..Default::default() }, "top_k", "-2"),
            (RequestParams { max_tokens: Some(0), ..Default::default() }, "max_tokens", "0"),
            (RequestParams { max_tokens: Some(0), max_tokens_param: Some("max_completion_tokens"), ..Default::default() }, "max_completion_tokens", "0"),
            (RequestParams { max_tokens: Some(98), ..Default::default() }, "max_tokens", "98"),
            (RequestParams { presence_penalty: Some(3.0), ..Default::default() }, "presence_penalty", "3"),
            (RequestParams { stop: vec!["a".into(); 5], ..Default::default() }, "stop", "[5 strings]"),
            (RequestParams { logprobs: Some(21), logprobs_param: Some("top_logprobs"), ..Default::default() }, "top_logprobs", "21"),
        ];
        for (p, param, value) in cases {
            let e = p.build(vec![1, 2, 3], LIMITS).unwrap_err();
            assert_eq!((e.param, e.value.as_str()), (param, value), "{e}");
        }
        let e = RequestParams::default().build(vec![1, 99], LIMITS).unwrap_err();
        assert!(e.param == "prompt" && e.reason.contains("token id 99"), "{e}");
        let e = RequestParams::default().build(vec![1; 100], LIMITS).unwrap_err();
        assert_eq!((e.param, e.code), ("prompt", Some("context_length_exceeded")));
        assert_eq!(RequestParams::default().build(vec![], LIMITS).unwrap_err().param, "prompt");
    }

    #[test]
    fn the_cli_clamps_max_tokens_to_the_context_where_the_api_refuses() {
        let api = RequestParams { max_tokens: Some(500), ..Default::default() };
        assert_eq!(api.build(vec![1; 10], LIMITS).unwrap_err().code, Some("context_length_exceeded"));
        let cli = RequestParams { over_context: OverContext::Clamp, ..api };
        assert_eq!(cli.build(vec![1; 10], LIMITS).unwrap().max_tokens, 90);
        // The KV cache can be the tighter limit.
        let small = Limits { kv_tokens: 40, ..LIMITS };
        assert_eq!(cli.build(vec![1; 10], small).unwrap().max_tokens, 30);
    }

    #[test]
    fn flags_are_named_as_the_cli_spells_them() {
        let e = RequestParams { top_p: Some(1.5), ..Default::default() }.build(vec![1], LIMITS).unwrap_err();
        assert_eq!(e.flag(), "--top-p");
        assert!(e.as_flag_message().starts_with("--top-p 1.5: "), "{}", e.as_flag_message());
    }
}
