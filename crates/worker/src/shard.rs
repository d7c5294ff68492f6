//! One rank's loaded shard and the state of every sequence it is computing: the part of a
//! worker that runs a [`StepPlan`] without knowing about the network, so it is tested (and
//! used in-process at tp = 1) without gRPC.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use tpserve_comm::{Collective, Timed};
use tpserve_gguf::Gguf;
use tpserve_model::device::{DeviceOps, LoadedShard};
use tpserve_model::model::{ModelError, SeqChunk};
use tpserve_types::kv::{BlockId, KvLayout};
use tpserve_types::plan::RankShard;
use tpserve_types::sampling::Candidates;
use tpserve_types::step::{LogitsWanted, SeqId, SeqOutput, SeqStart, StepOutput, StepPlan};
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
        Ok(Self { model, shard: shard.clone(), seqs: HashMap::new(), comms, broken: None })
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
    /// A step that is refused changes nothing.
    pub fn step(&mut self, plan: &StepPlan) -> Result<StepOutput, StepError> {
        let rank = self.shard.rank;
        if let Some(reason) = &self.broken {
            return Err(StepError::Broken { rank, reason: reason.clone() });
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
        let logits = match self.model.forward(&chunks) {
            Ok(l) => l,
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

        let vocab_start = self.model.vocab_range().start as TokenId;
        let mut seqs = Vec::new();
        if self.shard.last_stage {
            let width = self.model.vocab_range().len();
            for (w, l) in plan.seqs.iter().zip(logits) {
                if w.logits == LogitsWanted::None {
                    continue;
                }
                let st = &self.seqs[&w.seq_id];
                let mut l = l;
                let rows = l
                    .chunks_exact_mut(width)
                    .enumerate()
                    .map(|(i, row)| {
                        st.start.penalties.apply(row, vocab_start, &st.counts);
                        st.start.logit_bias.apply(row, vocab_start);
                        let c = Candidates::from_logits(row, vocab_start, &st.start.sampling, w.sample_step, w.logprobs);
                        match w.targets.get(i) {
                            Some(&t) => c.with_target(row, vocab_start, t),
                            None => c,
                        }
                    })
                    .collect();
                seqs.push(SeqOutput { seq_id: w.seq_id, rows });
            }
        }
        Ok(StepOutput { rank, seqs, compute_us: t0.elapsed().as_micros() as u64, comm_us: (self.comm_time() - comm0).as_micros() as u64 })
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

    fn shard() -> (Shard, tempfile::NamedTempFile) {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), tiny_gguf(&TinySpec::gemma3())).unwrap();
        let g = Gguf::open(f.path()).unwrap();
        let plan = Plan::new(model_shape(&g).unwrap(), 1, 1).unwrap();
        let cfg = tpserve_model::config::ModelConfig::from_gguf(&g).unwrap();
        let kv = cfg.kv_layout(tpserve_types::kv::KvSizing { block_size: 4, tokens: 400, max_seqs: 16, max_chunk: 8 });
        (Shard::load(&tpserve_model::device::DeviceOps::Cpu(tpserve_model::ops::Cpu), &g, &plan.shard(0), Arc::new(Local), None, &kv).unwrap(), f)
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
        s.step(&StepPlan { step: 0, seqs, free })
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
