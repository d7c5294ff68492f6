//! Accuracy of what a cluster serves: perplexity with exact distributed log-likelihoods
//! (each prompt position's target logit comes from the rank whose vocabulary slice holds it,
//! normalised by the merged log-sum-exp), chunked the way llama.cpp's perplexity tool does so
//! the numbers compare, and the KL divergence of one model's next-token distributions from
//! another's.

use std::collections::HashMap;

use tokio::sync::mpsc;
use tpserve_types::{SamplingParams, TokenId};

use crate::backend::Backend;
use crate::engine::{Engine, Event, Request};
use crate::error::ClusterError;

/// llama.cpp's perplexity windows: the text's tokens cut into non-overlapping windows of
/// `ctx`, each starting with BOS (replacing its first token), at most `max_chunks` of them.
/// Only the second half of each window is scored ([`scored_positions`]).
pub fn llama_cpp_windows(tokens: &[TokenId], ctx: usize, bos: Option<TokenId>, max_chunks: Option<usize>) -> Result<Vec<Vec<TokenId>>, String> {
    if ctx < 4 {
        return Err(format!("a window of {ctx} tokens is too short to score (at least 4)"));
    }
    let n = (tokens.len() / ctx).min(max_chunks.unwrap_or(usize::MAX));
    if n == 0 {
        return Err(format!("the text has {} tokens, fewer than one window of {ctx}", tokens.len()));
    }
    Ok((0..n)
        .map(|i| {
            let mut w = tokens[i * ctx..(i + 1) * ctx].to_vec();
            if let Some(b) = bos {
                w[0] = b;
            }
            w
        })
        .collect())
}

/// The positions of a `ctx` window whose tokens are scored: those predicted from at least
/// half a window of context (llama.cpp: `first = ctx / 2`, tokens `first + 1 .. ctx`).
pub fn scored_positions(ctx: usize) -> std::ops::Range<usize> {
    ctx / 2 + 1..ctx
}

/// Running negative log-likelihood statistics.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Nll {
    /// Sum of the negative log-likelihoods pushed, in nats.
    pub sum: f64,
    /// Sum of their squares (for the standard error).
    pub sum2: f64,
    /// Scored tokens pushed.
    pub n: usize,
}

impl Nll {
    /// Adds one scored token's negative log-likelihood (nats, `-log p`).
    pub fn push(&mut self, nll: f64) {
        self.sum += nll;
        self.sum2 += nll * nll;
        self.n += 1;
    }

    /// Mean negative log-likelihood per token, in nats (0 when nothing was pushed).
    pub fn mean(&self) -> f64 {
        self.sum / self.n.max(1) as f64
    }

    /// Standard error of the mean.
    pub fn stderr(&self) -> f64 {
        if self.n < 2 {
            return 0.0;
        }
        let m = self.mean();
        ((self.sum2 / self.n as f64 - m * m).max(0.0) / (self.n - 1) as f64).sqrt()
    }

    /// The perplexity: `exp(mean)`.
    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// The perplexity's ± (llama.cpp's: the mean's standard error carried through exp).
    pub fn ppl_stderr(&self) -> f64 {
        self.ppl() * self.stderr()
    }
}

/// The log-probability of each window's tokens from index `first` on (index t:
/// `log p(window[t] | window[..t])`; None before `first` and at t = 0), through the engine,
/// `in_flight` windows at a time; `done(i, logprobs)` is called as each window finishes.
/// Positions before `first - 1` compute no logits.
pub async fn window_logprobs<B: Backend>(
    engine: &mut Engine<'_, B>,
    windows: &[Vec<TokenId>],
    first: usize,
    in_flight: usize,
    mut done: impl FnMut(usize, Vec<Option<f32>>),
) -> Result<(), ClusterError> {
    let mut next = 0;
    let mut live: HashMap<usize, mpsc::UnboundedReceiver<Event>> = HashMap::new();
    while next < windows.len() || !live.is_empty() {
        while live.len() < in_flight.max(1) && next < windows.len() {
            let (tx, rx) = mpsc::unbounded_channel();
            let req = Request {
                prompt_ids: windows[next].clone(),
                max_tokens: 1,
                sampling: SamplingParams::default(),
                logprobs: Some(0),
                prompt_logprobs: Some(first),
                ignore_eos: true,
                ..Request::default()
            };
            engine.add(req, tx).map_err(|e| ClusterError::Rejected(format!("window {next}: {e}")))?;
            live.insert(next, rx);
            next += 1;
        }
        if !engine.step().await? && engine.has_work() {
            return Err(ClusterError::Protocol("the scheduler has work but formed no step".into()));
        }
        let mut finished = Vec::new();
        for (&i, rx) in live.iter_mut() {
            while let Ok(ev) = rx.try_recv() {
                match ev {
                    Event::Prompt(lps) => done(i, lps.into_iter().map(|l| l.and_then(|l| l.logprob)).collect()),
                    Event::Done(_) => finished.push(i),
                    Event::Error(e) => return Err(ClusterError::Unavailable(format!("window {i}: {e}"))),
                    Event::Delta { .. } => {}
                }
            }
        }
        for i in finished {
            live.remove(&i);
        }
    }
    Ok(())
}

/// KL(p_ref || p_model) in nats and whether both argmaxes agree, for one position's full
/// logits of the two models.
pub fn kl_and_top1(reference: &[f32], model: &[f32]) -> (f64, bool) {
    let lse = |l: &[f32]| {
        let m = l.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        m + l.iter().map(|&x| (x as f64 - m).exp()).sum::<f64>().ln()
    };
    let (la, lb) = (lse(reference), lse(model));
    let kl = reference.iter().zip(model).map(|(&a, &b)| {
        let lpa = a as f64 - la;
        lpa.exp() * (lpa - (b as f64 - lb))
    });
    use tpserve_types::sampling::argmax;
    (kl.sum::<f64>().max(0.0), argmax(reference) == argmax(model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_cut_like_llama_cpp() {
        let tokens: Vec<TokenId> = (10..30).collect();
        let w = llama_cpp_windows(&tokens, 8, Some(1), None).unwrap();
        assert_eq!(w, [vec![1, 11, 12, 13, 14, 15, 16, 17], vec![1, 19, 20, 21, 22, 23, 24, 25]]);
        assert_eq!(llama_cpp_windows(&tokens, 8, Some(1), Some(1)).unwrap().len(), 1);
        assert!(llama_cpp_windows(&tokens, 32, Some(1), None).is_err());
        // Positions 5, 6, 7 of an 8-token window: predicted from at least 4 tokens.
        assert_eq!(scored_positions(8), 5..8);
    }

    #[test]
    fn perplexity_statistics() {
        let mut s = Nll::default();
        for x in [1.0, 2.0, 3.0] {
            s.push(x);
        }
        assert!((s.mean() - 2.0).abs() < 1e-12);
        assert!((s.ppl() - 2f64.exp()).abs() < 1e-9);
        // llama.cpp's estimate: sqrt(var / (n - 1)) with the population variance 2/3.
        assert!((s.stderr() - (2.0f64 / 3.0 / 2.0).sqrt()).abs() < 1e-12);
    }

    #[test]
    fn kl_is_zero_for_equal_distributions_and_positive_otherwise() {
        let a = [1.0, 2.0, 3.0];
        assert_eq!(kl_and_top1(&a, &[11.0, 12.0, 13.0]), (0.0, true));
        let (kl, top1) = kl_and_top1(&a, &[3.0, 2.0, 1.0]);
        assert!(kl > 0.5 && !top1);
    }
}
