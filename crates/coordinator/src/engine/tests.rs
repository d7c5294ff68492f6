//! The engine against a fake [`Backend`] that answers like one last-stage rank holding the
//! whole vocabulary, with scripted failures: admission, cancellation, stop strings, a
//! refused step and a lost worker, without any process.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tpserve_scheduler::{AddError, SchedulerConfig};
use tpserve_tokenizer::Tokenizer;
use tpserve_types::kv::{KvLayout, KvSizing};
use tpserve_types::sampling::Candidates;
use tpserve_types::step::{LogitsWanted, SeqId, SeqOutput, StepOutput, StepPlan};
use tpserve_types::SamplingParams;

use super::*;

/// The tiny test vocabulary: ids 263..=288 are the letters a..z (see
/// `tpserve_model::testing::tiny_vocab`), 1 is the end-of-sequence token.
const A: u32 = 263;
const Z: u32 = 288;
const EOS: u32 = 1;
const VOCAB: usize = 304;
const CONTEXT: usize = 64;

fn tokenizer() -> Tokenizer {
    let spec = tpserve_model::testing::TinySpec { n_layers: 1, ..tpserve_model::testing::TinySpec::gemma3() };
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), tpserve_model::testing::tiny_gguf(&spec)).unwrap();
    Tokenizer::from_gguf(&tpserve_gguf::Gguf::open(f.path()).unwrap()).unwrap()
}

/// The fake model's next token after `t`: the next letter, and end-of-sequence after z.
fn next_after(t: u32) -> u32 {
    match t {
        Z => EOS,
        A..Z => t + 1,
        _ => A,
    }
}

/// What the fake answers to the next step.
enum Answer {
    Ok,
    Refuse,
    LoseWorker,
}

/// One rank with the whole vocabulary: it keeps each sequence's sampling parameters from
/// its start, as a worker does, and reports candidates from logits that put 8 nats on
/// [`next_after`] the row's token.
struct Fake {
    kv: KvLayout,
    sampling: HashMap<SeqId, SamplingParams>,
    plans: Vec<StepPlan>,
    script: VecDeque<Answer>,
    /// Recovery attempts that still fail (the lost worker has not come back yet).
    recover_fails: usize,
    /// Steps it lets be in flight ([`Backend::pipeline_depth`]); above 1 it takes them
    /// through [`Backend::submit`].
    depth: usize,
    /// Positions each sequence holds, to refuse a step that continues one elsewhere (as a
    /// worker does): steps run out of order would show here.
    lens: HashMap<SeqId, usize>,
    /// Submitted steps not yet answered, and the most there ever were at once.
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Fake {
    fn new() -> Self {
        let kv = KvLayout::new(&[None, None], KvSizing { block_size: 4, tokens: 256, max_seqs: 8, max_chunk: 16 });
        Self {
            kv,
            sampling: HashMap::new(),
            plans: Vec::new(),
            script: VecDeque::new(),
            recover_fails: 0,
            depth: 1,
            lens: HashMap::new(),
            in_flight: Arc::new(AtomicUsize::new(0)),
            max_in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn logits(&self, token: u32) -> Vec<f32> {
        let mut logits = vec![0f32; VOCAB];
        logits[next_after(token) as usize] = 8.0;
        logits
    }

    fn row(&self, seq: SeqId, token: u32, step: u64, logprobs: usize) -> Candidates {
        Candidates::from_logits(&self.logits(token), 0, &self.sampling[&seq], step, logprobs)
    }
}

impl Backend for Fake {
    fn context_len(&self) -> usize {
        CONTEXT
    }

    fn kv_layout(&self) -> &KvLayout {
        &self.kv
    }

    async fn recover(&mut self) -> Result<(), ClusterError> {
        if self.recover_fails > 0 {
            self.recover_fails -= 1;
            return Err(ClusterError::Unavailable("waiting for rank 1 to come back".into()));
        }
        // Reloaded: the ranks hold no sequence.
        self.sampling.clear();
        self.lens.clear();
        Ok(())
    }

    async fn step(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        self.answer(plan)
    }

    fn pipeline_depth(&self) -> usize {
        self.depth
    }

    /// Answers at once, as ranks that run their steps in order would, and lets the answer
    /// out only after a few turns of the runtime, so the engine has several in flight.
    fn submit(&mut self, plan: &StepPlan) -> Option<Pending> {
        let answer = self.answer(plan);
        let (now, most) = (self.in_flight.clone(), self.max_in_flight.clone());
        most.fetch_max(now.fetch_add(1, Ordering::SeqCst) + 1, Ordering::SeqCst);
        Some(Box::pin(async move {
            for _ in 0..3 {
                tokio::task::yield_now().await;
            }
            now.fetch_sub(1, Ordering::SeqCst);
            answer
        }))
    }
}

impl Fake {
    fn answer(&mut self, plan: &StepPlan) -> Result<StepReply, ClusterError> {
        self.plans.push(plan.clone());
        match self.script.pop_front().unwrap_or(Answer::Ok) {
            Answer::Ok => {}
            Answer::Refuse => return Err(ClusterError::Rejected("token id 9999 is outside the vocabulary".into())),
            Answer::LoseWorker => return Err(ClusterError::WorkerLost("worker rank 1 (127.0.0.1:1) is unreachable".into())),
        }
        for id in &plan.free {
            self.sampling.remove(id);
            self.lens.remove(id);
        }
        let mut seqs = Vec::new();
        for w in &plan.seqs {
            if let Some(start) = &w.start {
                self.sampling.insert(w.seq_id, start.sampling);
            } else if self.lens.get(&w.seq_id) != Some(&w.start_pos) {
                return Err(ClusterError::Protocol(format!("sequence {} continues at {} but holds {:?}", w.seq_id, w.start_pos, self.lens.get(&w.seq_id))));
            }
            self.lens.insert(w.seq_id, w.start_pos + w.tokens.len());
            let rows: Vec<u32> = match w.logits {
                LogitsWanted::None => continue,
                LogitsWanted::Last => vec![*w.tokens.last().unwrap()],
                LogitsWanted::All => w.tokens.clone(),
            };
            let rows = rows
                .into_iter()
                .enumerate()
                .map(|(i, t)| {
                    let c = self.row(w.seq_id, t, w.sample_step, w.logprobs);
                    match w.targets.get(i) {
                        Some(&target) => c.with_target(&self.logits(t), 0, target),
                        None => c,
                    }
                })
                .collect();
            seqs.push(SeqOutput { seq_id: w.seq_id, rows });
        }
        Ok(StepReply { outputs: vec![StepOutput { rank: 0, seqs, compute_us: 10, comm_us: 0, hidden: Vec::new() }], request_bytes: 0, response_bytes: 0 })
    }
}

fn config(backend: &Fake, max_waiting: usize) -> EngineConfig {
    EngineConfig {
        scheduler: SchedulerConfig { kv: backend.kv.clone(), max_num_seqs: 8, token_budget: 16, max_waiting, context_len: CONTEXT, prefix_caching: false },
    }
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> Request {
    Request { prompt_ids: prompt, max_tokens, sampling: SamplingParams { temperature: 0.0, ..SamplingParams::default() }, ..Request::default() }
}

/// Every event a request's channel holds now.
fn drain(rx: &mut mpsc::UnboundedReceiver<Event>) -> Vec<Event> {
    std::iter::from_fn(|| rx.try_recv().ok()).collect()
}

fn summary(events: &[Event]) -> &Summary {
    match events.last() {
        Some(Event::Done(s)) => s,
        other => panic!("the request did not end with a summary: {other:?}"),
    }
}

fn text(events: &[Event]) -> String {
    events.iter().filter_map(|e| if let Event::Delta { text, .. } = e { Some(text.as_str()) } else { None }).collect()
}

async fn run_to_end<B: Backend>(engine: &mut Engine<'_, B>) {
    while engine.has_work() {
        assert!(engine.step().await.unwrap(), "the engine has work but ran no step");
    }
}

#[tokio::test]
async fn requests_are_admitted_batched_and_finish_with_their_tokens_and_accounting() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    let cfg = config(&fake, 2);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 4), tx1).unwrap();
    engine.add(greedy(vec![2, A + 20], 10), tx2).unwrap();
    // The waiting queue holds two: a third is refused, as is one that cannot fit.
    let (tx3, _rx3) = mpsc::unbounded_channel();
    assert!(matches!(engine.add(greedy(vec![2, A], 4), tx3.clone()), Err(AddError::QueueFull(2))));
    run_to_end(&mut engine).await;
    assert!(matches!(engine.add(greedy(vec![2; 10], CONTEXT), tx3), Err(AddError::TooLong { .. })));

    // Four letters after a; then u, v, w, x, y, z and the end of the sequence.
    let (e1, e2) = (drain(&mut rx1), drain(&mut rx2));
    let (s1, s2) = (summary(&e1), summary(&e2));
    assert_eq!(s1.output_ids, [A + 1, A + 2, A + 3, A + 4]);
    assert_eq!((s1.finish_reason, s1.completion_tokens, s1.prompt_tokens), (FinishReason::Length, 4, 2));
    assert_eq!(text(&e1), "bcde");
    assert_eq!(s1.text, "bcde");
    assert_eq!(s2.output_ids, (A + 21..=Z).collect::<Vec<_>>());
    assert_eq!((s2.finish_reason, s2.completion_tokens), (FinishReason::Stop, 6), "the end-of-sequence token counts as sampled");
    // Both prompts went in the same first step, and every step after carried both until
    // the first one ended.
    let plans = &engine.backend.plans;
    assert_eq!(plans[0].seqs.len(), 2);
    assert!(plans[0].seqs.iter().all(|w| w.start.is_some()) && plans[1].seqs.iter().all(|w| w.start.is_none()));
    assert_eq!(engine.stats().steps, plans.len());
}

#[tokio::test]
async fn a_dropped_receiver_cancels_its_request_and_frees_its_sequence_while_the_others_go_on() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    let cfg = config(&fake, 8);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx1, rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 12), tx1).unwrap();
    engine.add(greedy(vec![2, A], 12), tx2).unwrap();
    engine.step().await.unwrap();
    engine.step().await.unwrap();
    let gone = engine.backend.plans[0].seqs[0].seq_id;
    drop(rx1);
    run_to_end(&mut engine).await;
    let plans = &engine.backend.plans;
    assert!(plans[2].free.contains(&gone), "the step after the disconnect frees sequence {gone}: {:?}", plans[2]);
    assert!(plans[2..].iter().all(|p| p.seqs.iter().all(|w| w.seq_id != gone)), "the cancelled sequence was stepped again");
    assert_eq!(summary(&drain(&mut rx2)).output_ids.len(), 12);
    assert_eq!(engine.scheduler().stats().running, 0);
}

#[tokio::test]
async fn text_ends_before_the_first_stop_string_and_never_shows_its_start() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    let cfg = config(&fake, 8);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx, mut rx) = mpsc::unbounded_channel();
    engine.add(Request { stop: vec!["fgh".into(), "zz".into()], ..greedy(vec![2, A], 20) }, tx).unwrap();
    run_to_end(&mut engine).await;
    let events = drain(&mut rx);
    let s = summary(&events);
    assert_eq!((s.text.as_str(), s.finish_reason), ("bcde", FinishReason::Stop));
    // What was streamed is exactly the final text: "f" and "fg" were held back, not sent.
    assert_eq!(text(&events), "bcde");
    assert!(s.output_ids.len() < 20);
}

#[tokio::test]
async fn a_step_every_rank_refused_fails_only_its_own_requests_and_the_engine_serves_on() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    fake.script.extend([Answer::Ok, Answer::Refuse]);
    let cfg = config(&fake, 8);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 8), tx1).unwrap();
    engine.step().await.unwrap();
    assert!(matches!(engine.step().await, Err(ClusterError::Rejected(_))));
    assert!(matches!(drain(&mut rx1).last(), Some(Event::Error(e)) if e.contains("outside the vocabulary")));
    assert!(engine.failed().is_none(), "a refused step leaves the cluster healthy");
    let st = engine.scheduler().stats();
    assert_eq!((st.running, st.waiting), (0, 0));
    // A new request is served as if nothing happened.
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 3), tx2).unwrap();
    run_to_end(&mut engine).await;
    assert_eq!(summary(&drain(&mut rx2)).output_ids, [A + 1, A + 2, A + 3]);
}

#[tokio::test]
async fn a_lost_worker_fails_every_live_request_and_every_later_step_names_it() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    fake.script.extend([Answer::Ok, Answer::LoseWorker]);
    let cfg = config(&fake, 8);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 8), tx1).unwrap();
    engine.step().await.unwrap();
    // The second request waits in the queue when the worker is lost: it fails too.
    engine.add(greedy(vec![2, A], 8), tx2).unwrap();
    assert!(matches!(engine.step().await, Err(ClusterError::WorkerLost(_))));
    for rx in [&mut rx1, &mut rx2] {
        assert!(matches!(drain(rx).last(), Some(Event::Error(e)) if e.contains("worker rank 1")));
    }
    assert!(engine.failed().is_some_and(|f| f.contains("worker rank 1")));
    assert!(matches!(engine.probe().await, Err(ClusterError::Unavailable(f)) if f.contains("worker rank 1")));
}

#[tokio::test]
async fn after_a_lost_worker_queued_requests_wait_and_are_served_from_scratch_once_the_cluster_recovers() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    fake.script.extend([Answer::Ok, Answer::LoseWorker]);
    fake.recover_fails = 1;
    let mut cfg = config(&fake, 8);
    cfg.scheduler.max_num_seqs = 1;
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx1, mut rx1) = mpsc::unbounded_channel();
    let (tx2, mut rx2) = mpsc::unbounded_channel();
    engine.add(greedy(vec![2, A], 8), tx1).unwrap();
    engine.add(greedy(vec![2, A], 3), tx2).unwrap();
    engine.step().await.unwrap();
    assert!(matches!(engine.step().await, Err(ClusterError::WorkerLost(_))));
    // The running request fails; the queued one waits, with nothing sent to it yet.
    assert!(matches!(drain(&mut rx1).last(), Some(Event::Error(e)) if e.contains("worker rank 1")));
    assert!(drain(&mut rx2).is_empty());
    assert_eq!((engine.n_live(), engine.scheduler().n_waiting()), (1, 1));
    // Failed: no step reaches the backend until it recovers.
    let sent = engine.backend.plans.len();
    assert!(matches!(engine.step().await, Err(ClusterError::Unavailable(_))));
    assert_eq!(engine.backend.plans.len(), sent);
    assert!(engine.recover().await.is_err(), "rank 1 is not back yet");
    assert!(engine.failed().is_some() && engine.failed_for().is_some());
    engine.recover().await.unwrap();
    assert!(engine.failed().is_none());
    run_to_end(&mut engine).await;
    assert_eq!(summary(&drain(&mut rx2)).output_ids, [A + 1, A + 2, A + 3]);
    // The reloaded ranks are asked to free nothing and get the queued request from position 0.
    let first = &engine.backend.plans[sent];
    assert!(first.free.is_empty(), "{first:?}");
    assert_eq!((first.seqs[0].start_pos, first.seqs[0].start.is_some()), (0, true));
}

#[tokio::test]
async fn prompt_log_probabilities_come_once_before_the_text_for_the_positions_asked_for() {
    let tok = tokenizer();
    let mut fake = Fake::new();
    let cfg = config(&fake, 8);
    let mut engine = Engine::new(&mut fake, &tok, cfg);
    let (tx, mut rx) = mpsc::unbounded_channel();
    // The prompt follows the fake model exactly from its second token on.
    let prompt = vec![2, A, A + 1, A + 2, A + 3];
    engine.add(Request { logprobs: Some(1), prompt_logprobs: Some(0), ..greedy(prompt.clone(), 2) }, tx).unwrap();
    run_to_end(&mut engine).await;
    let events = drain(&mut rx);
    let Some(Event::Prompt(lps)) = events.first() else { panic!("the prompt's log-probabilities come first: {events:?}") };
    assert_eq!(lps.len(), prompt.len());
    assert!(lps[0].is_none(), "nothing predicts the first token");
    // The fake puts 8 nats on the next letter over the other 303 tokens.
    let expected = -(1.0 + (VOCAB - 1) as f32 * (-8f32).exp()).ln();
    for (lp, &id) in lps[2..].iter().zip(&prompt[2..]) {
        let lp = lp.as_ref().unwrap();
        assert_eq!(lp.id, id);
        assert!((lp.logprob.unwrap() - expected).abs() < 1e-4, "{lp:?}, expected {expected}");
    }
    assert_eq!(events.iter().filter(|e| matches!(e, Event::Prompt(_))).count(), 1);
    assert_eq!(summary(&events).output_ids, [A + 4, A + 5]);
}

#[tokio::test]
async fn a_pipeline_keeps_several_steps_in_flight_each_with_its_share_and_tokens_do_not_change() {
    let tok = tokenizer();
    let run = |depth: usize, kv_tokens: usize| {
        let tok = &tok;
        async move {
            let mut fake = Fake::new();
            fake.depth = depth;
            // A small cache preempts sequences, some while a step of theirs is in flight.
            fake.kv = KvLayout::new(&[None, None], KvSizing { block_size: 4, tokens: kv_tokens, max_seqs: 8, max_chunk: 16 });
            let cfg = config(&fake, 16);
            let mut engine = Engine::new(&mut fake, tok, cfg);
            let mut rxs = Vec::new();
            for i in 0..6u32 {
                let (tx, rx) = mpsc::unbounded_channel();
                let prompt: Vec<u32> = std::iter::once(2).chain((0..=i * 3).map(|k| A + k % 3)).collect();
                engine.add(greedy(prompt, 10 + i as usize), tx).unwrap();
                rxs.push(rx);
            }
            run_to_end(&mut engine).await;
            let outs: Vec<Vec<u32>> = rxs.iter_mut().map(|rx| summary(&drain(rx)).output_ids.clone()).collect();
            let preempted = engine.scheduler().stats().preemptions;
            let plans = engine.backend.plans.clone();
            drop(engine);
            (outs, preempted, plans, fake.max_in_flight.load(Ordering::SeqCst))
        }
    };
    let (serial, _, serial_plans, _) = run(1, 256).await;
    for (i, out) in serial.iter().enumerate() {
        assert_eq!(out.len(), 10 + i, "request {i} ran to max_tokens");
    }
    let (piped, _, plans, most) = run(2, 256).await;
    assert_eq!(piped, serial, "a pipeline of two changes no token");
    assert_eq!(most, 2, "two steps were in flight at once");
    assert!(plans.iter().all(|p| p.seqs.len() <= 3), "each step takes at most its share (6 requests / 2)");
    assert!(plans.len() > serial_plans.len(), "the sequences are split over more, smaller steps");
    // A step goes alone (every vocabulary slice projects at once) only when nothing is in
    // flight and nothing follows it: never one step at a time, never while two are sent.
    assert!(serial_plans.iter().all(|p| !p.slice_later));
    assert!(!plans[0].slice_later && !plans[1].slice_later, "the first two steps go together");
    assert!(plans.iter().filter(|p| p.slice_later).all(|p| p.seqs.len() <= 1), "alone means at most one sequence left with work");
    assert!(plans.last().is_some_and(|p| p.slice_later), "the longest request finishes alone");
    let (tight, preempted, _, _) = run(2, 48).await;
    assert!(preempted > 0, "the small cache preempted sequences");
    assert_eq!(tight, serial, "an answer for a sequence preempted in flight is not used");
}
