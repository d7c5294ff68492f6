//! One rank's loaded shard and the state of every sequence it is computing: the part of a
//! worker that runs a [`StepPlan`] without knowing about the network, so it is tested (and
//! used in-process at tp = 1) without gRPC.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use tpserve_comm::{Collective, Timed};
use tpserve_gguf::Gguf;
use tpserve_model::device::{DeviceOps, LoadedShard};
use tpserve_model::model::{ModelError, SeqChunk};
use tpserve_types::kv::{BlockId, KvLayout};
use tpserve_types::plan::RankShard;
use tpserve_types::sampling::Candidates;
use tpserve_types::step::{HeadRows, LogitsWanted, SeqId, SeqOutput, SeqStart, StepOutput, StepPlan};
use tpserve_types::TokenId;

/// Why a step was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// The step asked for something impossible (an unknown or duplicated sequence, a wrong
    /// position, a token outside the vocabulary, too few blocks); nothing was changed, so
    /// the shard keeps serving. A coordinator bug or a bad request, not a worker fault.
    #[error("bad step {step}: {reason}")]
    Invalid {
        /// The plan's step number.
        step: u64,
        /// What was wrong, naming the sequence and the values.
        reason: String,
    },
    /// The forward pass failed part-way (a peer died or timed out): this shard's caches no
    /// longer agree with its peers', so it refuses further steps until it is loaded again.
    #[error("step {step} failed on rank {rank}: {source}")]
    Failed {
        /// The plan's step number.
        step: u64,
        /// The global rank that failed.
        rank: usize,
        /// The model's error (usually [`ModelError::Comm`]).
        source: ModelError,
    },
    /// An earlier step failed part-way; see [`StepError::Failed`].
    #[error("rank {rank} cannot run steps: an earlier step failed ({reason}); load the model again")]
    Broken {
        /// The global rank.
        rank: usize,
        /// The earlier failure's message.
        reason: String,
    },
    /// No shard has been loaded yet.
    #[error("no shard is loaded: send Load first")]
    NotLoaded,
    /// The step's reply was dropped unanswered: its compute thread panicked. Only a pool
    /// built with a panic handler gets here; by default rayon aborts the process on a panic
    /// in a spawned job.
    #[error("the step's compute thread panicked")]
    Panicked,
}

/// What a worker keeps about one live sequence between steps.
struct SeqState {
    /// Block table per KV group.
    tables: Vec<Vec<BlockId>>,
    /// Positions computed.
    len: usize,
    /// Sampling, penalties and prompt length, from the step that started it.
    start: SeqStart,
    /// How often each generated token was fed (for the penalties; empty without them).
    counts: HashMap<TokenId, u32>,
}

/// A wanted row's report from this rank's slice of the vocabulary: the sequence's penalties
/// and logit bias applied to `row` (logits of ids `vocab_start..`), then its candidates.
fn report(
    row: &mut [f32],
    vocab_start: TokenId,
    start: &SeqStart,
    counts: &HashMap<TokenId, u32>,
    sample_step: u64,
    logprobs: usize,
    target: Option<TokenId>,
) -> Candidates {
    start.penalties.apply(row, vocab_start, counts);
    start.logit_bias.apply(row, vocab_start);
    let c = Candidates::from_logits(row, vocab_start, &start.sampling, sample_step, logprobs);
    match target {
        Some(t) => c.with_target(row, vocab_start, t),
        None => c,
    }
}

/// What a rank with a vocabulary slice keeps from a step, with pp > 1, about one sequence
/// whose rows it projects once the last stage's hidden states come ([`HeadRows`]): the
/// sequence's state as of that step, which a later step may change or free.
struct PendingRows {
    seq_id: SeqId,
    rows: usize,
    start: SeqStart,
    counts: HashMap<TokenId, u32>,
    sample_step: u64,
    logprobs: usize,
    targets: Vec<TokenId>,
}

/// Steps whose rows are kept for their [`HeadRows`] at most. The coordinator keeps pp steps
/// in flight (a plan has at most as many stages as layers) and answers them oldest first,
/// and a step's rows drop every older step's, so only rows the coordinator gave up on (a
/// failed cluster, which reloads) could ever pile up; this bounds them anyway.
const MAX_PENDING_HEADS: usize = 1024;

/// A loaded shard with its sequences.
pub struct Shard {
    /// The weights and the keys and values of every sequence (in the blocks the coordinator
    /// assigns), on the worker's device.
    model: Box<dyn LoadedShard>,
    /// Which part of the model this is (rank, stage, layers, heads), as the plan gave it.
    shard: RankShard,
    /// The live sequences, by the coordinator's id.
    seqs: HashMap<SeqId, SeqState>,
    /// The collectives the model talks through, timed to report communication per step.
    comms: Vec<Arc<Timed>>,
    /// Set when a step failed part-way.
    broken: Option<String>,
    /// Before the last stage, with rows of the output projection: by step, the rows that
    /// step wanted, until its [`HeadRows`] come.
    pending_heads: BTreeMap<u64, Vec<PendingRows>>,
}

impl Shard {
    /// Loads `shard` of the model in `g` onto `device` and reserves its part of the KV
    /// cache `kv`. `tp_comm` joins the ranks of this stage; `pp_comm` this tensor-parallel
    /// rank of every stage (rank = stage), when pp > 1.
    pub fn load(
        device: &DeviceOps,
        g: &Gguf,
        shard: &RankShard,
        tp_comm: Arc<dyn Collective>,
        pp_comm: Option<Arc<dyn Collective>>,
        kv: &KvLayout,
    ) -> Result<Self, ModelError> {
        let tp = Arc::new(Timed::new(tp_comm));
        let pp = pp_comm.map(|c| Arc::new(Timed::new(c)));
        let model = device.load(g, shard, tp.clone(), pp.clone().map(|c| c as Arc<dyn Collective>), kv)?;
        let comms = std::iter::once(tp).chain(pp).collect();
        Ok(Self { model, shard: shard.clone(), seqs: HashMap::new(), comms, broken: None, pending_heads: BTreeMap::new() })
    }

    /// Bytes reserved for the KV cache.
    pub fn kv_bytes(&self) -> u64 {
        self.model.kv_bytes()
    }

    /// The loaded model (weights, config, vocabulary slice, KV memory), on its device.
    pub fn model(&self) -> &dyn LoadedShard {
        self.model.as_ref()
    }

    /// Which part of the model this rank holds, as the plan gave it.
    pub fn shard(&self) -> &RankShard {
        &self.shard
    }

    /// Why this shard cannot run steps, if it cannot.
    pub fn broken(&self) -> Option<&str> {
        self.broken.as_deref()
    }

    /// Live sequences.
    pub fn n_seqs(&self) -> usize {
        self.seqs.len()
    }

    /// Time spent in collectives since load, for a step's `comm_us`.
    fn comm_time(&self) -> std::time::Duration {
        self.comms.iter().map(|c| c.elapsed()).sum()
    }

    /// Runs one step: frees the finished sequences, then one batched forward pass over every
    /// sequence's new tokens, and (on the last stage) reports candidates for the wanted rows.
    /// A step that is refused changes nothing. A step with [`HeadRows`] instead projects an
    /// earlier step's rows through this rank's slice of the output projection.
    pub fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, StepError> {
        let rank = self.shard.rank;
        if let Some(reason) = &self.broken {
            return Err(StepError::Broken { rank, reason: reason.clone() });
        }
        if let Some(head) = &plan.head {
            return self.head(plan, head);
        }
        let t0 = Instant::now();
        let comm0 = self.comm_time();
        let invalid = |reason: String| StepError::Invalid { step: plan.step, reason };
        self.check(plan).map_err(invalid)?;
        for id in &plan.free {
            self.seqs.remove(id);
        }

        // This step's blocks join the tables now, and come off again if the model refuses
        // the step.
        let groups = self.model.kv_layout().groups.len();
        for w in &plan.seqs {
            let st = self.seqs.entry(w.seq_id).or_insert_with(|| SeqState {
                tables: vec![Vec::new(); groups],
                len: 0,
                start: w.start.clone().expect("checked: new sequences carry their start"),
                counts: HashMap::new(),
            });
            for (t, new) in st.tables.iter_mut().zip(&w.blocks) {
                t.extend_from_slice(new);
            }
        }
        let seqs = &self.seqs;
        let chunks: Vec<SeqChunk<'_>> =
            plan.seqs.iter().map(|w| SeqChunk { tokens: &w.tokens, pos: w.start_pos, tables: &seqs[&w.seq_id].tables, logits: w.logits }).collect();
        // With several stages, the last one projects its slice now, or with the others later.
        let slice_later = plan.slice_later && !self.shard.first_stage;
        let mut out = match self.model.forward(&chunks, slice_later) {
            Ok(o) => o,
            Err(e @ (ModelError::ContextOverflow { .. } | ModelError::BadToken { .. } | ModelError::EmptySequence | ModelError::Kv(_))) => {
                // Refused before any cache was touched: undo the tables.
                for w in &plan.seqs {
                    if w.starts() {
                        self.seqs.remove(&w.seq_id);
                    } else if let Some(st) = self.seqs.get_mut(&w.seq_id) {
                        for (t, new) in st.tables.iter_mut().zip(&w.blocks) {
                            t.truncate(t.len() - new.len());
                        }
                    }
                }
                return Err(invalid(e.to_string()));
            }
            Err(source) => {
                self.broken = Some(source.to_string());
                self.seqs.clear();
                return Err(StepError::Failed { step: plan.step, rank, source });
            }
        };
        for w in &plan.seqs {
            let st = self.seqs.get_mut(&w.seq_id).expect("every sequence of the step is held");
            st.len = w.start_pos + w.tokens.len();
            if !st.start.penalties.is_none() {
                for (i, &tok) in w.tokens.iter().enumerate() {
                    if w.start_pos + i >= st.start.prompt_len {
                        *st.counts.entry(tok).or_default() += 1;
                    }
                }
            }
        }

        let vocab = self.model.vocab_range();
        let mut seqs = Vec::new();
        if self.shard.last_stage && !slice_later && !vocab.is_empty() {
            for (w, l) in plan.seqs.iter().zip(out.logits_per_seq()).filter(|(w, _)| w.logits != LogitsWanted::None) {
                let st = &self.seqs[&w.seq_id];
                let rows = l
                    .chunks_exact_mut(vocab.len())
                    .enumerate()
                    .map(|(i, row)| report(row, vocab.start as TokenId, &st.start, &st.counts, w.sample_step, w.logprobs, w.targets.get(i).copied()))
                    .collect();
                seqs.push(SeqOutput { seq_id: w.seq_id, rows });
            }
        } else if !vocab.is_empty() {
            let keep: Vec<PendingRows> = plan
                .seqs
                .iter()
                .filter(|w| w.logits != LogitsWanted::None)
                .map(|w| {
                    let st = &self.seqs[&w.seq_id];
                    PendingRows {
                        seq_id: w.seq_id,
                        rows: if w.logits == LogitsWanted::All { w.tokens.len() } else { 1 },
                        start: st.start.clone(),
                        counts: st.counts.clone(),
                        sample_step: w.sample_step,
                        logprobs: w.logprobs,
                        targets: w.targets.clone(),
                    }
                })
                .collect();
            if !keep.is_empty() {
                self.pending_heads.insert(plan.step, keep);
                while self.pending_heads.len() > MAX_PENDING_HEADS {
                    self.pending_heads.pop_first();
                }
            }
        }
        let (compute_us, comm_us) = (t0.elapsed().as_micros() as u64, (self.comm_time() - comm0).as_micros() as u64);
        Ok(StepOutput { rank, seqs, compute_us, comm_us, hidden: out.hidden })
    }

    /// The second half of step `head.of_step` on a rank with a vocabulary slice (pp > 1; on the
    /// last stage only after a step with [`StepPlan::slice_later`]): its
    /// wanted rows' final hidden states through this rank's slice of the output projection,
    /// reported with the sequences' state as that step left it. Rows kept from steps before
    /// it are dropped (their answers are no longer awaited).
    fn head(&mut self, plan: &StepPlan, head: &HeadRows) -> Result<StepOutput, StepError> {
        let (rank, t0) = (self.shard.rank, Instant::now());
        let invalid = |reason: String| StepError::Invalid { step: plan.step, reason };
        if !plan.seqs.is_empty() || !plan.free.is_empty() {
            return Err(invalid("a step with head rows has no sequences and frees none".into()));
        }
        if (self.shard.first_stage && self.shard.last_stage) || self.model.vocab_range().is_empty() {
            return Err(invalid(format!("rank {rank} projects no rows in a step of their own (one stage, or no vocabulary slice)")));
        }
        let Some(kept) = self.pending_heads.remove(&head.of_step) else {
            return Err(invalid(format!("step {} left no rows to project on rank {rank}", head.of_step)));
        };
        self.pending_heads = self.pending_heads.split_off(&head.of_step);
        let (rows, width) = (kept.iter().map(|p| p.rows).sum::<usize>(), self.model.config().hidden);
        if head.hidden.len() != rows * width {
            return Err(invalid(format!("step {} wanted {rows} rows of {width}, the head rows hold {} values", head.of_step, head.hidden.len())));
        }
        let logits = self.model.head_logits(&head.hidden).map_err(|source| {
            self.broken = Some(source.to_string());
            self.seqs.clear();
            StepError::Failed { step: plan.step, rank, source }
        })?;
        let vocab = self.model.vocab_range();
        let mut rows = logits.chunks_exact(vocab.len());
        let seqs = kept
            .iter()
            .map(|p| SeqOutput {
                seq_id: p.seq_id,
                rows: (0..p.rows)
                    .map(|i| {
                        let mut row = rows.next().expect("checked: one row of logits per wanted row").to_vec();
                        report(&mut row, vocab.start as TokenId, &p.start, &p.counts, p.sample_step, p.logprobs, p.targets.get(i).copied())
                    })
                    .collect(),
            })
            .collect();
        Ok(StepOutput { rank, seqs, compute_us: t0.elapsed().as_micros() as u64, comm_us: 0, hidden: Vec::new() })
    }

    /// Why `plan` cannot run against the sequences this shard holds, if it cannot.
    fn check(&self, plan: &StepPlan) -> Result<(), String> {
        let mut seen = std::collections::HashSet::new();
        for w in &plan.seqs {
            if !seen.insert(w.seq_id) {
                return Err(format!("sequence {} appears twice", w.seq_id));
            }
            let freed = plan.free.contains(&w.seq_id);
            let groups = self.model.kv_layout().groups.len();
            if !(w.blocks.is_empty() || w.blocks.len() == groups) {
                return Err(format!("sequence {} brings blocks for {} KV groups, the cache has {groups}", w.seq_id, w.blocks.len()));
            }
            match (self.seqs.get(&w.seq_id).filter(|_| !freed), w.starts()) {
                (None, false) => {
                    return Err(format!(
                        "sequence {} is unknown here but continues at position {} (a new one needs sampling parameters)",
                        w.seq_id, w.start_pos
                    ))
                }
                (None, true) => {}
                (Some(_), true) => return Err(format!("sequence {} already exists; free it before starting it again", w.seq_id)),
                (Some(st), false) if st.len != w.start_pos => {
                    return Err(format!("sequence {} continues at position {} but this rank holds {} tokens", w.seq_id, w.start_pos, st.len))
                }
                (Some(_), false) => {}
            }
            if !w.targets.is_empty() && (w.logits != LogitsWanted::All || w.targets.len() != w.tokens.len()) {
                return Err(format!("sequence {} asks for {} target logits for {} tokens", w.seq_id, w.targets.len(), w.tokens.len()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tpserve_comm::Local;
    use tpserve_model::model::model_shape;
    use tpserve_model::testing::{tiny_gguf, TinySpec};
    use tpserve_types::plan::Plan;
    use tpserve_types::sampling::Penalties;
    use tpserve_types::step::SeqWork;
    use tpserve_types::SamplingParams;

    /// A tiny Gemma in a file (kept while the shards live), opened, and the KV layout the
    /// tests use.
    fn tiny() -> (tempfile::NamedTempFile, Gguf, KvLayout) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), tiny_gguf(&TinySpec::gemma3())).unwrap();
        let g = Gguf::open(f.path()).unwrap();
        let cfg = tpserve_model::config::ModelConfig::from_gguf(&g).unwrap();
        let kv = cfg.kv_layout(tpserve_types::kv::KvSizing { block_size: 4, tokens: 400, max_seqs: 16, max_chunk: 8 });
        (f, g, kv)
    }

    /// The whole of `g` in one shard.
    fn whole(g: &Gguf, kv: &KvLayout) -> Shard {
        let plan = Plan::new(model_shape(g).unwrap(), 1, 1).unwrap();
        Shard::load(&tpserve_model::device::DeviceOps::Cpu(tpserve_model::ops::Cpu), g, &plan.shard(0), Arc::new(Local), None, kv).unwrap()
    }

    fn shard() -> (Shard, tempfile::NamedTempFile) {
        let (f, g, kv) = tiny();
        (whole(&g, &kv), f)
    }

    /// Sequence `seq_id`'s blocks are `8 * seq_id ..`, four positions each, in both groups.
    fn work(seq_id: SeqId, tokens: Vec<u32>, start_pos: usize) -> SeqWork {
        let (from, to) = (start_pos.div_ceil(4), (start_pos + tokens.len()).div_ceil(4));
        let blocks: Vec<BlockId> = (from..to).map(|b| (seq_id as usize * 8 + b) as BlockId).collect();
        SeqWork {
            seq_id,
            tokens,
            start_pos,
            logits: LogitsWanted::Last,
            start: (start_pos == 0).then(|| SeqStart {
                sampling: SamplingParams::default(),
                penalties: Penalties::default(),
                prompt_len: 0,
                logit_bias: Default::default(),
            }),
            sample_step: 0,
            logprobs: 0,
            blocks: vec![blocks.clone(), blocks],
            targets: Vec::new(),
        }
    }

    fn step(s: &mut Shard, seqs: Vec<SeqWork>, free: Vec<SeqId>) -> Result<StepOutput, StepError> {
        s.step(&StepPlan { step: 0, seqs, free, ..Default::default() })
    }

    /// Stage `rank` of a tiny Gemma split into two pipeline stages (TCP between them), and
    /// the whole model in one shard, with the same KV layout.
    fn two_stages() -> (Vec<Shard>, Shard, tempfile::NamedTempFile) {
        let (f, g, kv) = tiny();
        let plan = Plan::new(model_shape(&g).unwrap(), 1, 2).unwrap();
        let cpu = tpserve_model::device::DeviceOps::Cpu(tpserve_model::ops::Cpu);
        let listeners: Vec<_> = (0..2).map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<_> = listeners.iter().map(|l| l.local_addr().unwrap()).collect();
        let stages = std::thread::scope(|sc| {
            let handles: Vec<_> = listeners
                .iter()
                .enumerate()
                .map(|(rank, l)| {
                    let (g, plan, kv, addrs, cpu) = (&g, &plan, &kv, &addrs, &cpu);
                    sc.spawn(move || {
                        let pp = tpserve_comm::TcpCollective::connect(rank, l, addrs, std::time::Duration::from_secs(10)).unwrap();
                        Shard::load(cpu, g, &plan.shard(rank), Arc::new(Local), Some(Arc::new(pp)), kv).unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        (stages, whole(&g, &kv), f)
    }

    /// Runs `plan` on both stages at once (they talk through the collective): their answers.
    fn both(stages: &mut [Shard], plan: &StepPlan) -> (StepOutput, StepOutput) {
        let (first, last) = stages.split_at_mut(1);
        std::thread::scope(|sc| {
            let a = sc.spawn(|| first[0].step(plan).unwrap());
            let b = last[0].step(plan).unwrap();
            (a.join().unwrap(), b)
        })
    }

    /// Runs `plan` on both stages at once, then its head rows on stage 0 (and with
    /// `slice_later` on stage 1 too) as the coordinator does; the merged report, and what
    /// stage 0 answered to the head rows.
    fn pipelined(stages: &mut [Shard], plan: &StepPlan) -> (String, Result<StepOutput, StepError>) {
        let (a, b) = both(stages, plan);
        assert!(a.seqs.is_empty() && a.hidden.is_empty(), "stage 0 answers nothing before the head rows come");
        let head = StepPlan { step: plan.step + 100, head: Some(HeadRows { of_step: plan.step, hidden: b.hidden.clone() }), ..Default::default() };
        let h = stages[0].step(&head);
        let mut parts = vec![h.as_ref().cloned().unwrap_or_default()];
        if plan.slice_later {
            assert!(b.seqs.is_empty(), "the last stage projects its slice later too");
            parts.push(stages[1].step(&head).unwrap());
        } else {
            parts.push(b);
        }
        (merged(&parts), h)
    }

    /// Rank answers merged as the coordinator merges them (3 candidates for sequence 1,
    /// which wants log-probabilities, 1 for the others), written out: every float exactly,
    /// and a NaN (no Gumbel draw when greedy) equal to itself.
    fn merged(parts: &[StepOutput]) -> String {
        format!("{:?}", tpserve_types::step::merge_outputs(parts, |id| if id == 1 { 3 } else { 1 }).unwrap())
    }

    #[test]
    fn stages_project_their_vocabulary_slices_from_the_last_stages_hidden_states() {
        let (mut stages, mut whole, _f) = two_stages();
        assert!(stages[0].model().vocab_range().start == 0 && stages[0].model().vocab_range().end == stages[1].model().vocab_range().start);
        let penalised =
            |w: SeqWork| SeqWork { start: w.start.map(|s| SeqStart { penalties: Penalties { presence: 1.5, frequency: 0.5 }, ..s }), logprobs: 3, ..w };
        let steps = [
            StepPlan {
                step: 1,
                seqs: vec![penalised(work(1, vec![2, 300, 301], 0)), SeqWork { logits: LogitsWanted::All, ..work(2, vec![2, 7, 9], 0) }],
                ..Default::default()
            },
            StepPlan { step: 2, seqs: vec![penalised(work(1, vec![301], 3)), work(3, vec![2, 5], 0)], free: vec![2], slice_later: true, ..Default::default() },
        ];
        for plan in &steps {
            let (two, _) = pipelined(&mut stages, plan);
            let alone = merged(&[whole.step(plan).unwrap()]);
            assert_eq!(two, alone, "step {}: two stages report what one does", plan.step);
        }

        // Head rows are answered once, for a step that wanted rows, and must be whole.
        let plan = StepPlan { step: 3, seqs: vec![work(1, vec![7], 4)], ..Default::default() };
        let (_, h) = pipelined(&mut stages, &plan);
        assert!(h.is_ok());
        whole.step(&plan).unwrap();
        let again = StepPlan { step: 9, head: Some(HeadRows { of_step: 3, hidden: vec![0.0; 640] }), ..Default::default() };
        let e = stages[0].step(&again).unwrap_err();
        assert!(matches!(e, StepError::Invalid { .. }) && e.to_string().contains("left no rows"), "{e}");
        let plan = StepPlan { step: 4, seqs: vec![work(1, vec![8], 5)], ..Default::default() };
        let width = stages[0].model().config().hidden;
        let torn = StepPlan { step: 9, head: Some(HeadRows { of_step: 4, hidden: vec![0.5; width + 1] }), ..Default::default() };
        both(&mut stages, &plan);
        whole.step(&plan).unwrap();
        let e = stages[0].step(&torn).unwrap_err();
        assert!(e.to_string().contains("wanted 1 rows"), "{e}");
        let e = stages[1].step(&torn).unwrap_err();
        assert!(e.to_string().contains("left no rows"), "the last stage projected step 4's rows itself: {e}");
        let e = whole.step(&torn).unwrap_err();
        assert!(e.to_string().contains("projects no rows"), "{e}");
        assert!(stages.iter().all(|s| s.broken().is_none()));

        // In flight, stage 0 runs the next step before the head rows of this one come: a
        // sequence that step frees (or feeds) is still reported as this step left it.
        let (k, next) = (
            StepPlan { step: 5, seqs: vec![penalised(work(1, vec![9], 6))], ..Default::default() },
            StepPlan { step: 6, seqs: vec![work(4, vec![2, 3], 0)], free: vec![1], ..Default::default() },
        );
        let (_, last_k) = both(&mut stages, &k);
        both(&mut stages, &next);
        let h = stages[0].step(&StepPlan { step: 7, head: Some(HeadRows { of_step: 5, hidden: last_k.hidden.clone() }), ..Default::default() }).unwrap();
        assert_eq!(merged(&[last_k, h]), merged(&[whole.step(&k).unwrap()]));
    }

    #[test]
    fn sequences_keep_their_state_between_steps_and_are_freed_on_request() {
        let (mut s, _f) = shard();
        let out = step(&mut s, vec![work(1, vec![2, 300, 301], 0), work(2, vec![2, 7], 0)], vec![]).unwrap();
        assert_eq!(out.seqs.len(), 2);
        assert_eq!(s.n_seqs(), 2);
        let out = step(&mut s, vec![work(1, vec![5], 3)], vec![2]).unwrap();
        assert_eq!(out.seqs.iter().map(|o| o.seq_id).collect::<Vec<_>>(), [1]);
        assert_eq!(s.n_seqs(), 1);
    }

    #[test]
    fn impossible_steps_are_refused_and_change_nothing() {
        let (mut s, _f) = shard();
        step(&mut s, vec![work(1, vec![2, 300], 0)], vec![]).unwrap();
        let bad: [(Vec<SeqWork>, &str); 6] = [
            (vec![work(1, vec![5], 7)], "holds 2 tokens"),
            (vec![work(9, vec![5], 4)], "unknown here"),
            (vec![work(1, vec![5], 0)], "already exists"),
            (vec![work(3, vec![5], 0), work(3, vec![6], 0)], "appears twice"),
            (vec![SeqWork { start: None, ..work(4, vec![1], 0) }], "needs sampling parameters"),
            (vec![SeqWork { blocks: vec![vec![], vec![]], ..work(5, vec![1, 2, 3, 4, 5], 0) }], "KV group 0 has 0 blocks"),
        ];
        for (seqs, needle) in bad {
            let e = step(&mut s, seqs, vec![]).unwrap_err();
            assert!(matches!(e, StepError::Invalid { .. }) && e.to_string().contains(needle), "{e}");
        }
        // A token outside the vocabulary is refused by the model before any cache changes,
        // in a step that brings new blocks for sequence 1 and starts sequence 6.
        let e = step(&mut s, vec![work(1, vec![5, 5, 5, 1 << 30], 2), work(6, vec![2, 3], 0)], vec![]).unwrap_err();
        assert!(matches!(e, StepError::Invalid { .. }), "{e}");
        // Sequence 1 is still at position 2 with its one block, and continues normally.
        assert_eq!(s.n_seqs(), 1);
        assert_eq!(s.seqs[&1].tables, [vec![8], vec![8]]);
        step(&mut s, vec![work(1, vec![5], 2)], vec![]).unwrap();
        assert!(s.broken().is_none());
    }
}
