//! Single-process generation: prefill (in chunks), then decode token by token, with
//! sampling, stop strings, end-of-generation tokens and streamed, UTF-8-safe text.

use std::ops::ControlFlow;
use std::time::Instant;

use serde::Serialize;
use tpserve_types::sampling::sample;
use tpserve_types::SamplingParams;

use crate::model::{LogitsWanted, Model, ModelError, SeqChunk};
use crate::tokenizer::{StreamDecoder, Tokenizer};

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    /// Prompt token ids, BOS included when wanted.
    pub prompt_ids: Vec<u32>,
    pub max_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Prompt tokens per forward pass during prefill.
    pub prefill_chunk: usize,
}

/// Why generation ended (OpenAI's `finish_reason`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The consumer of the text went away (closed pipe, disconnected client).
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    pub prefill_tokens: usize,
    pub prefill_ms: f64,
    pub prefill_tokens_per_s: f64,
    /// Tokens produced by decode steps (the first token comes from the prefill).
    pub decode_tokens: usize,
    pub decode_ms: f64,
    pub decode_tokens_per_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct GenerateOutput {
    pub output_ids: Vec<u32>,
    pub text: String,
    pub finish_reason: FinishReason,
    pub timings: Timings,
}

/// Runs one request to completion, calling `on_text` with each piece of new text as soon as
/// it is final (never half a character, never part of a stop string). When `on_text` returns
/// `ControlFlow::Break` (the reader went away), generation stops with
/// [`FinishReason::Cancelled`] instead of computing tokens nobody will read.
pub fn generate(
    model: &Model,
    tok: &Tokenizer,
    req: &GenerateRequest,
    mut on_text: impl FnMut(&str) -> ControlFlow<()>,
) -> Result<GenerateOutput, ModelError> {
    let mut cache = model.new_cache();
    let max_ctx = model.config().context_len;
    let chunk = req.prefill_chunk.max(1);

    let t0 = Instant::now();
    let mut logits = Vec::new();
    let n_prompt = req.prompt_ids.len();
    for (i, piece) in req.prompt_ids.chunks(chunk).enumerate() {
        let last = (i + 1) * chunk >= n_prompt;
        let want = if last { LogitsWanted::Last } else { LogitsWanted::None };
        let mut batch = [SeqChunk { tokens: piece, cache: &mut cache, logits: want }];
        logits = model.forward(&mut batch)?.pop().unwrap_or_default();
    }
    let prefill = t0.elapsed();

    let mut out_ids = Vec::new();
    let mut text = String::new();
    let mut emitted = 0usize;
    let mut stream = StreamDecoder::new(tok);
    let max_stop = req.stop.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut finish = FinishReason::Length;
    // Set when the text is final as it stands (a stop string cut it, or it was cancelled).
    let mut stopped_by_string = false;
    let t1 = Instant::now();
    let mut decode_steps = 0usize;
    while out_ids.len() < req.max_tokens && !logits.is_empty() {
        let id = sample(&logits, &req.sampling, out_ids.len() as u64);
        if !req.ignore_eos && tok.is_eog(id) {
            finish = FinishReason::Stop;
            break;
        }
        out_ids.push(id);
        text.push_str(&stream.push(id));
        // A new stop string can only start in the part not yet emitted.
        if let Some(cut) = find_stop(&text[emitted..], &req.stop).map(|c| emitted + c) {
            text.truncate(cut);
            if cut > emitted {
                let _ = on_text(&text[emitted..cut]);
            }
            emitted = cut;
            finish = FinishReason::Stop;
            stopped_by_string = true;
            break;
        }
        // Hold back the tail that could still become a stop string.
        let mut safe = text.len().saturating_sub(max_stop.saturating_sub(1));
        while !text.is_char_boundary(safe) {
            safe -= 1;
        }
        if safe > emitted {
            let flow = on_text(&text[emitted..safe]);
            emitted = safe;
            if flow.is_break() {
                finish = FinishReason::Cancelled;
                stopped_by_string = true;
                break;
            }
        }
        if out_ids.len() >= req.max_tokens || cache.len() >= max_ctx {
            break;
        }
        let mut batch = [SeqChunk { tokens: std::slice::from_ref(&id), cache: &mut cache, logits: LogitsWanted::Last }];
        logits = model.forward(&mut batch)?.pop().unwrap_or_default();
        decode_steps += 1;
    }
    if !stopped_by_string {
        // Bytes of an unfinished character still held by the decoder.
        text.push_str(&stream.finish());
        if let Some(cut) = find_stop(&text[emitted..], &req.stop).map(|c| emitted + c) {
            text.truncate(cut);
            finish = FinishReason::Stop;
        }
    }
    if text.len() > emitted && finish != FinishReason::Cancelled {
        let _ = on_text(&text[emitted..]);
    }
    let decode = t1.elapsed();
    let per_s = |n: usize, d: std::time::Duration| if d.as_secs_f64() > 0.0 { n as f64 / d.as_secs_f64() } else { 0.0 };
    Ok(GenerateOutput {
        output_ids: out_ids,
        text,
        finish_reason: finish,
        timings: Timings {
            prefill_tokens: n_prompt,
            prefill_ms: prefill.as_secs_f64() * 1e3,
            prefill_tokens_per_s: per_s(n_prompt, prefill),
            decode_tokens: decode_steps,
            decode_ms: decode.as_secs_f64() * 1e3,
            decode_tokens_per_s: per_s(decode_steps, decode),
        },
    })
}

/// Byte offset of the earliest stop string in `text`.
fn find_stop(text: &str, stops: &[String]) -> Option<usize> {
    stops.iter().filter(|s| !s.is_empty()).filter_map(|s| text.find(s.as_str())).min()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_earliest_stop_string_wins() {
        let stops = vec!["b".to_string(), "cd".to_string()];
        assert_eq!(find_stop("xxcdxb", &stops), Some(2));
        assert_eq!(find_stop("xyz", &stops), None);
        assert_eq!(find_stop("abc", &[String::new()]), None);
    }
}
