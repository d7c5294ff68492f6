//! The serving loop's core: requests come in at any time, the scheduler
//! (`tpserve-scheduler`) forms each step, the backend runs it on every rank, and tokens are
//! sampled here from the ranks' merged candidates (ARCHITECTURE.md, "Combining partial
//! logits"), so tp = 1 and tp = N run the very same sampler on the very same numbers. Each
//! request's text, log-probabilities and end are sent on its own channel; a request whose
//! receiver is gone (the client disconnected) is cancelled and its blocks freed.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Instant;

use futures::stream::{FuturesOrdered, StreamExt};
use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tpserve_scheduler::{AddError, Batch, NewRequest, ReqId, Scheduled, Scheduler, SchedulerConfig};
use tpserve_tokenizer::Tokenizer;
use tpserve_types::sampling::{candidates_needed, Candidates, Penalties};
use tpserve_types::step::{merge_outputs, LogitsWanted, SeqId, SeqOutput, SeqStart, SeqWork, StepPlan};
use tpserve_types::{SamplingParams, TokenId};
use tracing::{trace_span, Instrument};

use crate::backend::{Backend, Pending, StepReply};
use crate::error::ClusterError;
use crate::stats::StepStats;
use crate::text::TextOut;

/// What to generate for one prompt. Front ends make it with
/// [`crate::request::RequestParams::build`], which checks every value.
#[derive(Debug, Clone, Default)]
pub struct Request {
    /// Prompt token ids, BOS included when wanted.
    pub prompt_ids: Vec<TokenId>,
    /// Most tokens to generate (the prompt and these fit the context).
    pub max_tokens: usize,
    /// How tokens are sampled.
    pub sampling: SamplingParams,
    /// Presence and frequency penalties on generated tokens.
    pub penalties: Penalties,
    /// OpenAI's `logit_bias`, added to the logits on the workers.
    pub logit_bias: tpserve_types::LogitBias,
    /// Generation stops before the first occurrence of any of these strings.
    pub stop: Vec<String>,
    /// Keep going past end-of-generation tokens.
    pub ignore_eos: bool,
    /// Report each sampled token's log-probability and this many alternatives (None: no
    /// log-probabilities).
    pub logprobs: Option<usize>,
    /// `Some(first)`: report the log-probabilities of the prompt tokens from index `first` on
    /// (`echo` with `logprobs` asks for `Some(0)`, perplexity for the scored half of a
    /// window); earlier positions cost no logits.
    pub prompt_logprobs: Option<usize>,
}

/// Why generation ended: OpenAI's `finish_reason`, and vLLM's `abort` for a request whose
/// client went away.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// An end-of-generation token or a stop string.
    Stop,
    /// `max_tokens` or the context length was reached.
    Length,
    /// The consumer of the text went away (closed pipe, disconnected client).
    Abort,
}

impl FinishReason {
    /// The one string form: in responses, in `--json` output and as the metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Stop => "stop",
            FinishReason::Length => "length",
            FinishReason::Abort => "abort",
        }
    }
}

/// A token's log-probability and the most likely alternatives at its position.
#[derive(Debug, Clone, PartialEq)]
pub struct Logprob {
    /// The token.
    pub id: TokenId,
    /// None when the token was not among the candidates the ranks reported (temperature
    /// sampling without top-k can pick a token outside any short list).
    pub logprob: Option<f32>,
    /// The most likely tokens at the position, best first.
    pub top: Vec<(TokenId, f32)>,
}

/// How a request ended, with its accounting.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Why it ended.
    pub finish_reason: FinishReason,
    /// The whole generated text (stop string excluded).
    pub text: String,
    /// The generated tokens (an end-of-generation token excluded).
    pub output_ids: Vec<TokenId>,
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Sampled tokens, an end-of-generation token included.
    pub completion_tokens: usize,
    /// Prompt tokens that came from the prefix cache.
    pub cached_tokens: usize,
    /// Seconds from arrival to the first scheduled step.
    pub queue_s: f64,
    /// Seconds from arrival to the first token.
    pub ttft_s: f64,
    /// Seconds from arrival to the end.
    pub e2e_s: f64,
}

/// What a request's channel receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// Text that became final, and the tokens sampled since the last event (with their
    /// log-probabilities when asked for).
    Delta {
        /// The new text.
        text: String,
        /// The new tokens (log-probabilities only when asked for).
        tokens: Vec<Logprob>,
    },
    /// The prompt's log-probabilities (None for the first token), once, before any text.
    Prompt(Vec<Option<Logprob>>),
    /// The request ended; nothing follows.
    Done(Summary),
    /// The request failed; nothing follows.
    Error(String),
}

/// How steps are formed.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The scheduler's limits and the KV cache it hands out.
    pub scheduler: SchedulerConfig,
}

/// A request in flight and what it has produced so far.
struct Live<'t> {
    req: Request,
    events: UnboundedSender<Event>,
    text: TextOut<'t>,
    out_ids: Vec<TokenId>,
    /// Sampled tokens (an end-of-generation token included).
    sampled: usize,
    arrived: Instant,
    scheduled: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
    /// Prompt tokens served from the prefix cache.
    cached: usize,
    /// Prompt log-probabilities gathered so far (when asked for).
    prompt_lp: Vec<Option<Logprob>>,
    prompt_sent: bool,
}

/// A step sent to the ranks whose answers are still to come, with its batch and when it
/// was formed.
type InFlight = Pin<Box<dyn Future<Output = (Batch, Instant, Result<StepReply, ClusterError>)> + Send>>;

/// The loop state: scheduler, live requests, backend.
pub struct Engine<'t, B> {
    backend: B,
    tok: &'t Tokenizer,
    sched: Scheduler,
    live: HashMap<ReqId, Live<'t>>,
    next_id: ReqId,
    step_no: u64,
    stats: StepStats,
    /// Why the cluster cannot serve, from a step that failed that way until it recovers.
    failed: Option<String>,
    /// When it failed.
    failed_at: Option<Instant>,
    /// When the last step (or probe) succeeded.
    last_ok: Option<Instant>,
    /// Steps submitted and not yet taken back, oldest first (at most the backend's
    /// [`Backend::pipeline_depth`]; empty between calls when that is 1).
    in_flight: FuturesOrdered<InFlight>,
}

impl<'t, B: Backend> Engine<'t, B> {
    /// An engine over `backend`, detokenizing with `tok`.
    pub fn new(backend: B, tok: &'t Tokenizer, cfg: EngineConfig) -> Self {
        Self {
            backend,
            tok,
            sched: Scheduler::new(cfg.scheduler),
            live: HashMap::new(),
            next_id: 0,
            step_no: 0,
            stats: StepStats::default(),
            failed: None,
            failed_at: None,
            last_ok: None,
            in_flight: FuturesOrdered::new(),
        }
    }

    /// The scheduler (its configuration and statistics).
    pub fn scheduler(&self) -> &Scheduler {
        &self.sched
    }

    /// What the steps so far cost.
    pub fn stats(&self) -> &StepStats {
        &self.stats
    }

    /// Why the cluster cannot serve, if it cannot.
    pub fn failed(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// How long ago the cluster failed, while it has not recovered.
    pub fn failed_for(&self) -> Option<std::time::Duration> {
        self.failed_at.map(|t| t.elapsed())
    }

    /// Tries once to bring a failed cluster back ([`Backend::recover`]): Ok once it serves
    /// again, and the requests that waited meanwhile are scheduled from scratch.
    pub async fn recover(&mut self) -> Result<(), ClusterError> {
        if self.failed.is_none() {
            return Ok(());
        }
        self.backend.recover().await?;
        let took = self.failed_for().unwrap_or_default();
        tracing::info!(after_s = took.as_secs_f64(), waiting = self.sched.n_waiting(), "the cluster serves again");
        metrics::counter!("tpserve_cluster_recoveries_total").increment(1);
        self.failed = None;
        self.failed_at = None;
        self.last_ok = Some(Instant::now());
        Ok(())
    }

    /// When the last step or probe went through every rank.
    pub fn last_ok(&self) -> Option<Instant> {
        self.last_ok
    }

    /// Requests waiting or running (not yet ended).
    pub fn n_live(&self) -> usize {
        self.live.len()
    }

    /// Whether any request is waiting or running, or a step is still in flight.
    pub fn has_work(&self) -> bool {
        self.sched.has_work() || !self.in_flight.is_empty()
    }

    /// Queues a request; its events go to `events`.
    pub fn add(&mut self, req: Request, events: UnboundedSender<Event>) -> Result<ReqId, AddError> {
        let id = self.next_id;
        self.sched.add(NewRequest { id, prompt: req.prompt_ids.clone(), max_tokens: req.max_tokens, prompt_logprobs: req.prompt_logprobs })?;
        self.next_id += 1;
        metrics::counter!("tpserve_prompt_tokens_total").increment(req.prompt_ids.len() as u64);
        let text = TextOut::new(self.tok, &req.stop);
        let live = Live {
            events,
            text,
            out_ids: Vec::new(),
            sampled: 0,
            arrived: Instant::now(),
            scheduled: None,
            first_token: None,
            last_token: None,
            cached: 0,
            prompt_lp: Vec::new(),
            prompt_sent: false,
            req,
        };
        let nothing_to_do = live.req.max_tokens == 0;
        self.live.insert(id, live);
        if nothing_to_do {
            self.end(id, FinishReason::Length);
        }
        self.gauges();
        Ok(id)
    }

    /// Cancels request `id` (its channel gets nothing more).
    pub fn abort(&mut self, id: ReqId) {
        if self.live.remove(&id).is_some() {
            self.sched.finish(id);
            metrics::counter!("tpserve_request_success_total", "finished_reason" => FinishReason::Abort.as_str()).increment(1);
        }
    }

    /// Sends an empty step to every rank: proves the cluster still answers (steps in
    /// flight will prove it: then nothing is sent).
    pub async fn probe(&mut self) -> Result<(), ClusterError> {
        if let Some(f) = &self.failed {
            return Err(ClusterError::Unavailable(f.clone()));
        }
        if !self.in_flight.is_empty() {
            return Ok(());
        }
        let plan = StepPlan { step: self.step_no, ..Default::default() };
        self.step_no += 1;
        match self.backend.step(&plan).await {
            Ok(_) => {
                self.last_ok = Some(Instant::now());
                Ok(())
            }
            Err(e) => {
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Runs one step if there is anything to do; returns whether it ran one: cancels the
    /// requests whose receivers are gone, asks the scheduler for the batch, runs it on every
    /// rank, merges the last stage's candidates, and hands each sequence its rows. A failed
    /// step fails its requests (each gets [`Event::Error`]): only those of the step when
    /// every rank refused it, every live one when the cluster is broken.
    ///
    /// With a pipeline ([`Backend::pipeline_depth`] > 1) it first submits steps until that
    /// many are in flight, each with its share of the sequences that have work (a sequence
    /// waiting for its next token has none), then takes back the oldest: every stage
    /// computes a batch while the later stages finish the earlier ones. Tokens are the same
    /// as one step at a time: each rank runs the steps in order, a sequence's token depends
    /// only on its own rows (the kernels are batch-invariant), and its sampling noise on its
    /// own step count.
    pub async fn step(&mut self) -> Result<bool, ClusterError> {
        if let Some(f) = &self.failed {
            return Err(ClusterError::Unavailable(f.clone()));
        }
        self.reap_disconnected();
        let depth = self.backend.pipeline_depth().max(1);
        let taken = if depth == 1 && self.in_flight.is_empty() {
            match self.form(usize::MAX) {
                None => None,
                Some((batch, plan, started)) => {
                    let r = self.run(&plan, &batch).await;
                    Some((batch, started, r))
                }
            }
        } else {
            let share = |e: &Self| (e.sched.n_running() + e.sched.n_waiting()).div_ceil(depth);
            let mut next = if self.in_flight.len() < depth { self.form(share(self)) } else { None };
            while let Some((batch, mut plan, started)) = next.take() {
                // The step after this one is formed first: a step that goes alone (nothing in
                // flight, nothing after it) has no other batch to overlap with, so every
                // stage's slice of the output projection projects its rows at once.
                if self.in_flight.len() + 1 < depth {
                    next = self.form(share(self));
                }
                plan.slice_later = self.in_flight.is_empty() && next.is_none();
                let pending: Pending = match self.backend.submit(&plan) {
                    Some(p) => p,
                    // A backend that cannot pipeline runs it now: the order is kept.
                    None => Box::pin(std::future::ready(self.backend.step(&plan).await)),
                };
                let span = trace_span!("engine_step", step = plan.step, seqs = plan.seqs.len());
                self.in_flight.push_back(Box::pin(async move { (batch, started, pending.instrument(span).await) }));
            }
            match self.in_flight.next().await {
                None => None,
                Some((batch, started, r)) => {
                    let r = self.taken_back(&batch, r);
                    Some((batch, started, r))
                }
            }
        };
        let Some((batch, started, reply)) = taken else {
            self.gauges();
            return Ok(false);
        };
        let reply = reply?;
        self.record(&batch, &reply, started.elapsed().as_secs_f64());
        self.sched.step_done();
        let merged = self.merge(&batch, &reply)?;
        let by_seq: HashMap<SeqId, &Scheduled> = batch.seqs.iter().map(|s| (s.seq_id, s)).collect();
        let now = Instant::now();
        for m in merged {
            let s = by_seq[&m.seq_id];
            // A request that ended, or a sequence preempted while its step was in flight
            // (it is computed again from the start), takes nothing from it.
            if self.live.contains_key(&s.req) && self.sched.is_current(s.req, s.seq_id) {
                self.take_rows(s, m.rows, now);
            }
        }
        self.gauges();
        Ok(true)
    }

    /// Asks the scheduler for the next batch of at most `max_seqs` sequences and turns it
    /// into the step sent to the ranks; None when there is nothing to send.
    fn form(&mut self, max_seqs: usize) -> Option<(Batch, StepPlan, Instant)> {
        let batch = self.sched.schedule_at_most(max_seqs);
        metrics::counter!("tpserve_num_preemptions_total").increment(batch.preempted.len() as u64);
        if batch.is_empty() {
            return None;
        }
        let started = Instant::now();
        self.mark_scheduled(&batch, started);
        let plan = StepPlan { step: self.step_no, seqs: batch.seqs.iter().map(|s| self.work(s)).collect(), free: batch.free.clone(), ..Default::default() };
        self.step_no += 1;
        Some((batch, plan, started))
    }

    /// Cancels every request whose receiver was dropped.
    fn reap_disconnected(&mut self) {
        let gone: Vec<ReqId> = self.live.iter().filter(|(_, l)| l.events.is_closed()).map(|(&id, _)| id).collect();
        for id in gone {
            self.abort(id);
        }
    }

    /// Notes when each request of `batch` was first scheduled (its queue time).
    fn mark_scheduled(&mut self, batch: &Batch, now: Instant) {
        for s in &batch.seqs {
            if let Some(l) = self.live.get_mut(&s.req) {
                if l.scheduled.is_none() {
                    l.scheduled = Some(now);
                    l.cached = s.cached;
                    metrics::histogram!("tpserve_request_queue_time_seconds").record((now - l.arrived).as_secs_f64());
                }
            }
        }
    }

    /// Sends `plan` through the backend; on failure, fails the requests it takes down.
    async fn run(&mut self, plan: &StepPlan, batch: &Batch) -> Result<StepReply, ClusterError> {
        let span = trace_span!("engine_step", step = plan.step, seqs = plan.seqs.len());
        let r = self.backend.step(plan).instrument(span).await;
        self.taken_back(batch, r)
    }

    /// Looks at what a step of `batch` came back with; on failure, fails the requests it
    /// takes down (and, when the cluster failed, forgets the steps still in flight: the
    /// ranks lost their sequences).
    fn taken_back(&mut self, batch: &Batch, r: Result<StepReply, ClusterError>) -> Result<StepReply, ClusterError> {
        if let Err(e) = &r {
            self.backend.step_failed(e);
        }
        match r {
            Ok(r) => {
                self.last_ok = Some(Instant::now());
                Ok(r)
            }
            Err(e @ ClusterError::Rejected(_)) => {
                // Every rank refused the step and changed nothing: only this step's
                // requests fail; the others go on.
                let ids: Vec<ReqId> = batch.seqs.iter().map(|s| s.req).collect();
                self.fail_some(&ids, &e.to_string());
                Err(e)
            }
            Err(e) => {
                self.in_flight = FuturesOrdered::new();
                self.fail(&e);
                Err(e)
            }
        }
    }

    /// Adds one step's costs to the statistics and the metrics.
    fn record(&mut self, batch: &Batch, reply: &StepReply, took: f64) {
        let decode = batch.seqs.iter().all(|s| s.tokens.len() == 1 && !s.starts);
        let phase = if decode { "decode" } else { "prefill" };
        metrics::histogram!("tpserve_step_duration_seconds", "phase" => phase).record(took);
        metrics::histogram!("tpserve_step_tokens", "phase" => phase).record(batch.n_tokens() as f64);
        self.stats.add(reply, took * 1e3);
        for o in &reply.outputs {
            let rank = o.rank.to_string();
            metrics::histogram!("tpserve_rank_comm_seconds", "rank" => rank.clone()).record(o.comm_us as f64 / 1e6);
            metrics::histogram!("tpserve_rank_compute_seconds", "rank" => rank).record(o.compute_us as f64 / 1e6);
        }
    }

    /// The last stage's answers merged into one report per sequence and row, checked to be
    /// exactly the rows the plan asked for: anything else means the ranks ran something
    /// other than the plan, and the cluster is failed.
    fn merge(&mut self, batch: &Batch, reply: &StepReply) -> Result<Vec<SeqOutput>, ClusterError> {
        let by_seq: HashMap<SeqId, &Scheduled> = batch.seqs.iter().map(|s| (s.seq_id, s)).collect();
        let k_for =
            |id: SeqId| by_seq.get(&id).and_then(|s| self.live.get(&s.req)).map_or(1, |l| candidates_needed(&l.req.sampling, l.req.logprobs.unwrap_or(0)));
        let checked = merge_outputs(&reply.outputs, k_for).and_then(|merged| {
            let answered: HashMap<SeqId, usize> = merged.iter().map(|m| (m.seq_id, m.rows.len())).collect();
            if let Some(m) = merged.iter().find(|m| !by_seq.contains_key(&m.seq_id)) {
                return Err(format!("an answer for unknown sequence {}", m.seq_id));
            }
            for s in &batch.seqs {
                let want = match s.logits {
                    LogitsWanted::None => 0,
                    LogitsWanted::Last => 1,
                    LogitsWanted::All => s.tokens.len(),
                };
                if answered.get(&s.seq_id).copied().unwrap_or(0) != want {
                    return Err(format!("sequence {} wanted {want} rows of logits and got {:?}", s.seq_id, answered.get(&s.seq_id)));
                }
            }
            Ok(merged)
        });
        checked.map_err(|why| {
            let e = ClusterError::Protocol(why);
            self.fail(&e);
            e
        })
    }

    /// The workers' view of a scheduled sequence.
    fn work(&self, s: &Scheduled) -> SeqWork {
        let req = self.live.get(&s.req).map(|l| &l.req);
        let logprobs = req.map_or(0, |r| r.logprobs.unwrap_or(0).max(usize::from(r.logprobs.is_some() || r.prompt_logprobs.is_some())));
        let targets = if s.logits == LogitsWanted::All {
            let prompt = req.map_or(&[][..], |r| &r.prompt_ids[..]);
            (0..s.tokens.len()).map(|i| prompt.get(s.start_pos + i + 1).copied().unwrap_or(0)).collect()
        } else {
            Vec::new()
        };
        let start = s.starts.then(|| SeqStart {
            sampling: req.map(|r| r.sampling).unwrap_or_default(),
            penalties: req.map(|r| r.penalties).unwrap_or_default(),
            prompt_len: s.prompt_len,
            logit_bias: req.map(|r| r.logit_bias.clone()).unwrap_or_default(),
        });
        SeqWork {
            seq_id: s.seq_id,
            tokens: s.tokens.clone(),
            start_pos: s.start_pos,
            logits: s.logits,
            start,
            sample_step: s.generated as u64,
            logprobs,
            blocks: s.blocks.clone(),
            targets,
        }
    }

    /// Handles the rows one sequence got back: prompt log-probabilities, then, when the
    /// chunk reached the end of what the sequence holds, the next token.
    fn take_rows(&mut self, s: &Scheduled, rows: Vec<Candidates>, now: Instant) {
        if s.logits == LogitsWanted::All {
            self.take_prompt_rows(s, &rows);
        }
        let end = s.start_pos + s.tokens.len();
        let samples = s.logits != LogitsWanted::None && end == s.prompt_len + s.generated;
        if let (true, Some(cands)) = (samples, rows.last()) {
            self.sample(s.req, s.generated, cands, now);
        }
    }

    /// Row i of an all-positions chunk predicts the prompt token at `start_pos + i + 1`.
    fn take_prompt_rows(&mut self, s: &Scheduled, rows: &[Candidates]) {
        let l = self.live.get_mut(&s.req).expect("checked by the caller");
        if l.prompt_lp.is_empty() {
            l.prompt_lp = vec![None; s.prompt_len];
        }
        let n = l.req.logprobs.unwrap_or(0);
        for (i, row) in rows.iter().enumerate() {
            let target = s.start_pos + i + 1;
            if target < s.prompt_len && l.prompt_lp[target].is_none() {
                l.prompt_lp[target] = Some(Logprob { id: l.req.prompt_ids[target], logprob: row.target_logprob().map(|t| t.1), top: row.top_logprobs(n) });
            }
        }
        if s.start_pos + s.tokens.len() >= s.prompt_len && !l.prompt_sent {
            l.prompt_sent = true;
            let _ = l.events.send(Event::Prompt(l.prompt_lp.clone()));
        }
    }

    /// Samples request `id`'s next token (its `generated`-th) from `cands` and hands it on:
    /// the end of generation, or text and log-probabilities, and the token to the scheduler.
    fn sample(&mut self, id: ReqId, generated: usize, cands: &Candidates, now: Instant) {
        let l = self.live.get_mut(&id).expect("checked by the caller");
        let token = cands.pick(&l.req.sampling, generated as u64);
        l.sampled += 1;
        metrics::counter!("tpserve_generation_tokens_total").increment(1);
        match (l.first_token, l.last_token) {
            (None, _) => {
                l.first_token = Some(now);
                metrics::histogram!("tpserve_time_to_first_token_seconds").record((now - l.arrived).as_secs_f64());
            }
            (Some(_), Some(prev)) => metrics::histogram!("tpserve_inter_token_latency_seconds").record((now - prev).as_secs_f64()),
            (Some(_), None) => {}
        }
        l.last_token = Some(now);
        if !l.req.ignore_eos && self.tok.is_eog(token) {
            return self.end(id, FinishReason::Stop);
        }
        l.out_ids.push(token);
        let lp = l.req.logprobs.map(|n| Logprob { id: token, logprob: cands.logprob(token), top: cands.top_logprobs(n) });
        let pushed = l.text.push(token);
        let (text, stopped) = (pushed.new_text.to_string(), pushed.stopped);
        let sent = l.events.send(Event::Delta { text, tokens: lp.map_or_else(Vec::new, |lp| vec![lp]) }).is_ok();
        if stopped {
            return self.end(id, FinishReason::Stop);
        }
        if !sent {
            return self.abort(id);
        }
        // The scheduler admitted prompt + max_tokens within the context: max_tokens is the
        // only length limit left to check.
        if l.out_ids.len() >= l.req.max_tokens {
            return self.end(id, FinishReason::Length);
        }
        self.sched.append(id, token);
    }

    /// Ends request `id`: flushes its text, sends the summary, frees its sequence.
    fn end(&mut self, id: ReqId, mut finish: FinishReason) {
        let Some(mut l) = self.live.remove(&id) else { return };
        self.sched.finish(id);
        let (rest, stopped) = l.text.finish();
        if !rest.is_empty() {
            let _ = l.events.send(Event::Delta { text: rest.to_string(), tokens: Vec::new() });
        }
        if stopped {
            finish = FinishReason::Stop;
        }
        let now = Instant::now();
        let secs = |t: Option<Instant>| t.map_or(0.0, |t| (t - l.arrived).as_secs_f64());
        let e2e = (now - l.arrived).as_secs_f64();
        metrics::histogram!("tpserve_e2e_request_latency_seconds").record(e2e);
        metrics::counter!("tpserve_request_success_total", "finished_reason" => finish.as_str()).increment(1);
        if l.req.prompt_logprobs.is_some() && !l.prompt_sent {
            let _ = l.events.send(Event::Prompt(l.prompt_lp.clone()));
        }
        let summary = Summary {
            finish_reason: finish,
            text: l.text.into_text(),
            output_ids: l.out_ids,
            prompt_tokens: l.req.prompt_ids.len(),
            completion_tokens: l.sampled,
            cached_tokens: l.cached,
            queue_s: secs(l.scheduled),
            ttft_s: secs(l.first_token),
            e2e_s: e2e,
        };
        let _ = l.events.send(Event::Done(summary));
    }

    /// Ends every live request with `why` (the server is shutting down, or the cluster did
    /// not recover in time for the waiting ones).
    pub fn fail_all(&mut self, why: &str) {
        let ids: Vec<ReqId> = self.live.keys().copied().collect();
        self.fail_some(&ids, why);
    }

    /// Ends requests `ids` with `why`.
    fn fail_some(&mut self, ids: &[ReqId], why: &str) {
        for &id in ids {
            if let Some(l) = self.live.remove(&id) {
                let _ = l.events.send(Event::Error(why.to_string()));
            }
            self.sched.finish(id);
        }
        self.gauges();
    }

    /// A step failed and the cluster cannot serve until it recovers: every running request
    /// gets the error (the workers lost its sequence), the waiting ones stay queued for
    /// after the recovery (the server bounds how long). A step every rank refused is
    /// handled by the caller; here it fails every live request and leaves the cluster as it was.
    fn fail(&mut self, e: &ClusterError) {
        if matches!(e, ClusterError::Rejected(_)) {
            return self.fail_all(&e.to_string());
        }
        if self.failed.is_none() {
            self.failed = Some(e.to_string());
            self.failed_at = Some(Instant::now());
            metrics::counter!("tpserve_cluster_failures_total").increment(1);
        }
        let lost = self.sched.workers_lost();
        self.fail_some(&lost, &e.to_string());
    }

    fn gauges(&self) {
        let st = self.sched.stats();
        metrics::gauge!("tpserve_num_requests_running").set(st.running as f64);
        metrics::gauge!("tpserve_num_requests_waiting").set(st.waiting as f64);
        let full = self.sched.config().kv.groups.iter().position(|g| g.window.is_none()).unwrap_or(0);
        if let (Some(&u), Some(&t)) = (st.blocks_used.get(full), st.blocks_total.get(full)) {
            metrics::gauge!("tpserve_kv_cache_usage_perc").set(if t > 0 { u as f64 / t as f64 } else { 0.0 });
        }
        for (g, (&u, &t)) in st.blocks_used.iter().zip(&st.blocks_total).enumerate() {
            metrics::gauge!("tpserve_kv_cache_blocks_free", "group" => g.to_string()).set((t - u) as f64);
        }
        metrics::counter!("tpserve_prefix_cache_queries_total").absolute(st.prefix_queries);
        metrics::counter!("tpserve_prefix_cache_hits_total").absolute(st.prefix_hits);
    }
}

#[cfg(test)]
mod tests;
