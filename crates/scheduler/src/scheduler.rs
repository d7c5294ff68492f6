//! The [`Scheduler`] itself: the waiting queue, the running set and each sequence's block
//! tables, turned into one [`Batch`] per step (see the crate doc for the policies).

use std::collections::VecDeque;
use std::hash::{Hash, Hasher};

use tpserve_types::kv::{BlockId, KvLayout, NO_BLOCK};
use tpserve_types::step::{LogitsWanted, SeqId};
use tpserve_types::TokenId;

use crate::blocks::BlockPool;

/// The caller's id for a request (the engine numbers them from 0); unlike the workers'
/// [`SeqId`], it stays the same when a preempted request starts again.
pub type ReqId = u64;

/// Limits the scheduler works within.
#[derive(Debug, Clone)]
pub struct SchedulerConfig {
    /// The KV cache the workers were loaded with: block size, groups and pool sizes, which
    /// the scheduler hands out block by block.
    pub kv: KvLayout,
    /// Most sequences running at once, so most in one step; waiting requests are admitted
    /// only below it.
    pub max_num_seqs: usize,
    /// Most new tokens in one step (decode tokens and prefill chunks together).
    pub token_budget: usize,
    /// Most requests waiting to start; more are refused ([`AddError::QueueFull`]).
    pub max_waiting: usize,
    /// Positions per sequence (prompt + generated); longer requests are refused
    /// ([`AddError::TooLong`]).
    pub context_len: usize,
    /// Whether full prompt blocks already computed for another request are reused (off:
    /// every prompt is computed in full).
    pub prefix_caching: bool,
}

/// A request to schedule.
#[derive(Debug, Clone)]
pub struct NewRequest {
    /// Unique among the waiting and running requests ([`AddError::Duplicate`]).
    pub id: ReqId,
    /// Prompt token ids; at least one.
    pub prompt: Vec<TokenId>,
    /// Most tokens it will generate (for the capacity check; the caller decides when it ends).
    pub max_tokens: usize,
    /// `Some(first)`: it wants the log-probabilities of its prompt tokens from index `first`
    /// on, so logits for every prompt position from `first - 1` on (no prefix cache for its
    /// first pass; a chunk never straddles `first - 1`, so positions before it cost no
    /// logits). `Some(0)` and `Some(1)` ask for the whole prompt.
    pub prompt_logprobs: Option<usize>,
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddError {
    /// [`SchedulerConfig::max_waiting`] requests (the number given) are already waiting:
    /// back-pressure, so the client should retry later (the server answers 429).
    #[error("the waiting queue is full ({0} requests)")]
    QueueFull(usize),
    /// The prompt has no tokens.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// Prompt and `max_tokens` together exceed [`SchedulerConfig::context_len`]: shorten
    /// the prompt or lower `max_tokens`.
    #[error("the prompt ({prompt} tokens) and max_tokens ({max_tokens}) exceed the context length {context}")]
    TooLong {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens it may generate.
        max_tokens: usize,
        /// The context length, in positions.
        context: usize,
    },
    /// Even running alone, the request would need more blocks than some group's pool has:
    /// lower `max_tokens`, or give the workers a larger KV cache.
    #[error("the prompt ({prompt} tokens) and max_tokens ({max_tokens}) need more KV cache than the workers have ({capacity} tokens)")]
    TooBig {
        /// Prompt tokens.
        prompt: usize,
        /// Tokens it may generate.
        max_tokens: usize,
        /// Positions the full-attention pool holds ([`Scheduler::capacity_tokens`]).
        capacity: usize,
    },
    /// A request with this id is already waiting or running: a bug in the caller, which
    /// must number its requests uniquely.
    #[error("request {0} already exists")]
    Duplicate(ReqId),
}

/// One sequence's work in a step.
#[derive(Debug, Clone, PartialEq)]
pub struct Scheduled {
    /// The request this work is for.
    pub req: ReqId,
    /// The sequence's id on the workers (a new one each time it starts again).
    pub seq_id: SeqId,
    /// It starts on the workers with this step (first time, or again after a preemption).
    pub starts: bool,
    /// Position of `tokens[0]`: the positions already computed (past 0 on a start after a
    /// prefix-cache hit).
    pub start_pos: usize,
    /// The new tokens: a prompt chunk (at most the step's token budget), or the one token
    /// sampled last step.
    pub tokens: Vec<TokenId>,
    /// Per KV group, the blocks to append to the workers' table.
    pub blocks: Vec<Vec<BlockId>>,
    /// Which rows need logits: the last when the chunk reaches the end of the known
    /// tokens, every row of a chunk whose prompt log-probabilities were asked for.
    pub logits: LogitsWanted,
    /// Prompt length (for the workers' penalties).
    pub prompt_len: usize,
    /// Tokens generated so far: the index of the token the last row predicts.
    pub generated: usize,
    /// Prompt tokens that came from the prefix cache when it started (0 otherwise).
    pub cached: usize,
}

/// One step's plan.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Batch {
    /// The sequences that compute, running ones first, then the newly admitted.
    pub seqs: Vec<Scheduled>,
    /// Worker sequence ids to forget before the step.
    pub free: Vec<SeqId>,
    /// Requests preempted while forming this step (they wait to be recomputed).
    pub preempted: Vec<ReqId>,
}

impl Batch {
    /// Whether there is nothing to send: no sequence computes and none is to be freed.
    pub fn is_empty(&self) -> bool {
        self.seqs.is_empty() && self.free.is_empty()
    }

    /// New tokens in the step.
    pub fn n_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }
}

/// Counters and gauges for metrics.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    /// Requests in the running set now.
    pub running: usize,
    /// Requests waiting to start (or to start again after a preemption) now.
    pub waiting: usize,
    /// Per group: blocks referenced by some sequence now.
    pub blocks_used: Vec<usize>,
    /// Per group: blocks in the pool.
    pub blocks_total: Vec<usize>,
    /// Prompt tokens looked up in the prefix cache, cumulative: every admission while
    /// prefix caching is on (a preempted request's again), except requests that still want
    /// prompt log-probabilities, which never use the cache.
    pub prefix_queries: u64,
    /// Of `prefix_queries`, the tokens found in the cache and not computed again.
    pub prefix_hits: u64,
    /// Running sequences preempted for want of blocks, cumulative.
    pub preemptions: u64,
}

#[derive(Debug)]
struct Seq {
    id: ReqId,
    tokens: Vec<TokenId>,
    prompt_len: usize,
    /// Positions whose keys the workers hold (or will after the step in flight).
    computed: usize,
    /// Per group; `NO_BLOCK` where a block left the window.
    tables: Vec<Vec<BlockId>>,
    /// Per group: table entries the workers have.
    sent: Vec<usize>,
    /// Chain hashes of the full blocks of `tokens` known so far.
    hashes: Vec<u64>,
    /// Blocks already offered to the prefix cache.
    registered: usize,
    worker_id: SeqId,
    /// The workers hold it.
    started: bool,
    /// Prompt log-probabilities still wanted: logits for prompt positions from this one on.
    prompt_logprobs: Option<usize>,
    /// Prompt tokens the prefix cache supplied when it last started.
    cached: usize,
}

/// The scheduler: waiting queue, running set, and the KV blocks of every group.
pub struct Scheduler {
    cfg: SchedulerConfig,
    pools: Vec<BlockPool>,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    /// Worker ids to free with the next step.
    to_free: Vec<SeqId>,
    next_worker_id: SeqId,
    stats: Stats,
}

impl Scheduler {
    /// A scheduler with nothing queued and every pool of `cfg.kv` free.
    pub fn new(cfg: SchedulerConfig) -> Self {
        let pools = cfg.kv.groups.iter().map(|g| BlockPool::new(g.blocks)).collect();
        Self { cfg, pools, waiting: VecDeque::new(), running: Vec::new(), to_free: Vec::new(), next_worker_id: 0, stats: Stats::default() }
    }

    /// The limits it was made with.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Whether anything is left to do (a step to run or sequences to free).
    pub fn has_work(&self) -> bool {
        !self.running.is_empty() || !self.waiting.is_empty() || !self.to_free.is_empty()
    }

    /// Requests in the running set (they hold blocks).
    pub fn n_running(&self) -> usize {
        self.running.len()
    }

    /// Requests waiting to start, preempted ones included.
    pub fn n_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Whether request `id` is waiting or running (not yet finished).
    pub fn contains(&self, id: ReqId) -> bool {
        self.running.iter().chain(&self.waiting).any(|s| s.id == id)
    }

    /// Positions that one sequence may hold: the full-attention pool.
    pub fn capacity_tokens(&self) -> usize {
        self.cfg.kv.token_capacity()
    }

    /// The gauges as they are now, with the cumulative counters.
    pub fn stats(&self) -> Stats {
        Stats {
            running: self.running.len(),
            waiting: self.waiting.len(),
            blocks_used: self.pools.iter().map(|p| p.len() - p.n_free()).collect(),
            blocks_total: self.pools.iter().map(|p| p.len()).collect(),
            ..self.stats.clone()
        }
    }

    /// The pool of group `g`, for tests and debugging (the metrics read
    /// [`Scheduler::stats`]).
    pub fn pool(&self, g: usize) -> &BlockPool {
        &self.pools[g]
    }

    /// Queues a request at the back of the waiting queue, or says why it can never run
    /// (or, for [`AddError::QueueFull`], not now).
    pub fn add(&mut self, r: NewRequest) -> Result<(), AddError> {
        if r.prompt.is_empty() {
            return Err(AddError::EmptyPrompt);
        }
        let (prompt, max_tokens) = (r.prompt.len(), r.max_tokens);
        if prompt + max_tokens > self.cfg.context_len {
            return Err(AddError::TooLong { prompt, max_tokens, context: self.cfg.context_len });
        }
        // Alone, it must fit: every full-attention group holds its whole history, every
        // windowed group its window and one chunk.
        let kv = &self.cfg.kv;
        let fits = kv.groups.iter().all(|g| match g.window {
            None => kv.blocks_for(prompt + max_tokens) <= g.blocks,
            Some(w) => KvLayout::window_blocks(kv.block_size, w, self.cfg.token_budget).min(kv.blocks_for(prompt + max_tokens)) <= g.blocks,
        });
        if !fits {
            return Err(AddError::TooBig { prompt, max_tokens, capacity: self.capacity_tokens() });
        }
        if self.contains(r.id) {
            return Err(AddError::Duplicate(r.id));
        }
        if self.waiting.len() >= self.cfg.max_waiting {
            return Err(AddError::QueueFull(self.cfg.max_waiting));
        }
        let groups = self.pools.len();
        let mut seq = Seq {
            id: r.id,
            prompt_len: prompt,
            tokens: r.prompt,
            computed: 0,
            tables: vec![Vec::new(); groups],
            sent: vec![0; groups],
            hashes: Vec::new(),
            registered: 0,
            worker_id: 0,
            started: false,
            prompt_logprobs: r.prompt_logprobs.map(|first| first.saturating_sub(1).min(prompt - 1)),
            cached: 0,
        };
        extend_hashes(self.cfg.kv.block_size, &mut seq);
        self.waiting.push_back(seq);
        Ok(())
    }

    /// Appends a token sampled for request `id` (it will be fed next step).
    pub fn append(&mut self, id: ReqId, token: TokenId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let s = &mut self.running[i];
            s.tokens.push(token);
            extend_hashes(self.cfg.kv.block_size, s);
        }
    }

    /// Ends request `id` (finished, cancelled or failed): its blocks go back, the workers
    /// forget it with the next step. Unknown ids are ignored.
    pub fn finish(&mut self, id: ReqId) {
        if let Some(i) = self.running.iter().position(|s| s.id == id) {
            let mut s = self.running.remove(i);
            self.release(&mut s);
        } else if let Some(i) = self.waiting.iter().position(|s| s.id == id) {
            let mut s = self.waiting.remove(i).expect("position is in range");
            self.release(&mut s);
        }
    }

    /// The workers lost every sequence and every block's contents (the cluster failed and is
    /// reloaded): the running requests are removed and returned (they cannot go on); the
    /// waiting ones stay and start from scratch; every pool starts empty (the prefix cache
    /// is forgotten: its blocks' keys are gone) and nothing is left to free on the workers.
    pub fn workers_lost(&mut self) -> Vec<ReqId> {
        let lost = self.running.drain(..).map(|s| s.id).collect();
        self.pools = self.cfg.kv.groups.iter().map(|g| BlockPool::new(g.blocks)).collect();
        for s in &mut self.waiting {
            s.tables.iter_mut().for_each(Vec::clear);
            s.sent.iter_mut().for_each(|n| *n = 0);
            s.registered = 0;
            s.started = false;
            s.computed = 0;
            s.cached = 0;
        }
        self.to_free.clear();
        lost
    }

    /// Called once the step of the last [`Scheduler::schedule`] ran: the blocks it filled
    /// join the prefix cache.
    pub fn step_done(&mut self) {
        if !self.cfg.prefix_caching {
            return;
        }
        let bs = self.cfg.kv.block_size;
        for s in &mut self.running {
            let full = (s.computed / bs).min(s.hashes.len());
            for (g, pool) in self.pools.iter_mut().enumerate() {
                for (b, &h) in s.tables[g].iter().zip(&s.hashes).take(full).skip(s.registered) {
                    if *b != NO_BLOCK {
                        pool.register(*b, h);
                    }
                }
            }
            s.registered = s.registered.max(full);
        }
    }

    /// Whether `seq_id` is request `id`'s sequence on the workers now: it runs, and has not
    /// been preempted (and perhaps started again under another id) since it was scheduled.
    /// A step's answer for a sequence that is not current is stale.
    pub fn is_current(&self, id: ReqId, seq_id: SeqId) -> bool {
        self.running.iter().any(|s| s.id == id && s.started && s.worker_id == seq_id)
    }

    /// Forms the next step.
    pub fn schedule(&mut self) -> Batch {
        self.schedule_at_most(usize::MAX)
    }

    /// Forms the next step with at most `max_seqs` sequences (at least one): with several
    /// steps in flight, each takes its share of the sequences, so that every stage of a
    /// pipeline gets a batch. A sequence whose known tokens are all computed or in flight
    /// is not scheduled again until its next token is appended.
    pub fn schedule_at_most(&mut self, max_seqs: usize) -> Batch {
        let max_seqs = max_seqs.max(1);
        let mut batch = Batch::default();
        let mut budget = self.cfg.token_budget.max(1);
        let mut i = 0;
        while i < self.running.len() && budget > 0 && batch.seqs.len() < max_seqs {
            let want = Self::chunk(&self.running[i], self.running[i].tokens.len() - self.running[i].computed, budget);
            if want == 0 {
                i += 1;
                continue;
            }
            self.trim_window(i);
            let mut lost_self = false;
            while !self.can_grow(&self.running[i], self.running[i].computed + want) {
                // Preempt the newest sequence; if that is this one, it waits too.
                let victim = self.running.len() - 1;
                batch.preempted.push(self.running[victim].id);
                self.preempt(victim);
                if victim == i {
                    lost_self = true;
                    break;
                }
            }
            if lost_self {
                break;
            }
            batch.seqs.push(Self::emit(&self.cfg, &mut self.pools, &mut self.running[i], want));
            budget -= want;
            i += 1;
        }
        // Admit waiting requests in order while there is room (never by preempting).
        while budget > 0 && self.running.len() < self.cfg.max_num_seqs && batch.preempted.is_empty() && batch.seqs.len() < max_seqs {
            let Some(mut s) = self.waiting.pop_front() else { break };
            let hit = self.prefix_hit(&s);
            let want = Self::chunk(&s, s.tokens.len() - hit.tokens, budget);
            if !self.can_start(&hit, hit.tokens + want) {
                self.waiting.push_front(s);
                break;
            }
            if self.cfg.prefix_caching && s.prompt_logprobs.is_none() {
                self.stats.prefix_queries += s.prompt_len as u64;
                self.stats.prefix_hits += hit.tokens.min(s.prompt_len) as u64;
            }
            for (g, blocks) in hit.tables.iter().enumerate() {
                for &b in blocks.iter().filter(|&&b| b != NO_BLOCK) {
                    self.pools[g].acquire(b);
                }
            }
            s.tables = hit.tables;
            s.computed = hit.tokens;
            s.cached = hit.tokens;
            s.sent = vec![0; self.pools.len()];
            s.worker_id = self.next_worker_id;
            self.next_worker_id += 1;
            batch.seqs.push(Self::emit(&self.cfg, &mut self.pools, &mut s, want));
            budget -= want;
            self.running.push(s);
        }
        batch.free = std::mem::take(&mut self.to_free);
        batch
    }

    /// How many of the `left` tokens of `s` to run within `budget`: a chunk that would
    /// start before the first position whose logits it wants stops there.
    fn chunk(s: &Seq, left: usize, budget: usize) -> usize {
        let want = left.min(budget);
        match s.prompt_logprobs {
            Some(from) if s.computed < from => want.min(from - s.computed),
            _ => want,
        }
    }

    /// Allocates the blocks for `want` more tokens of `s` (checked to be there) and
    /// describes its work. (Takes the fields it needs, so `s` may be one of `running`.)
    fn emit(cfg: &SchedulerConfig, pools: &mut [BlockPool], s: &mut Seq, want: usize) -> Scheduled {
        let end = s.computed + want;
        let need = cfg.kv.blocks_for(end);
        for (g, pool) in pools.iter_mut().enumerate() {
            while s.tables[g].len() < need {
                s.tables[g].push(pool.allocate().expect("checked: enough free blocks"));
            }
        }
        let blocks = (0..pools.len()).map(|g| s.tables[g][s.sent[g]..].to_vec()).collect();
        for g in 0..pools.len() {
            s.sent[g] = s.tables[g].len();
        }
        let in_prompt = s.computed < s.prompt_len;
        let logits = if in_prompt && s.prompt_logprobs.is_some_and(|from| s.computed >= from) {
            LogitsWanted::All
        } else if end == s.tokens.len() {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        if end >= s.prompt_len {
            s.prompt_logprobs = None;
        }
        let out = Scheduled {
            req: s.id,
            seq_id: s.worker_id,
            starts: !s.started,
            start_pos: s.computed,
            tokens: s.tokens[s.computed..end].to_vec(),
            blocks,
            logits,
            prompt_len: s.prompt_len,
            generated: s.tokens.len() - s.prompt_len,
            cached: s.cached,
        };
        s.started = true;
        s.computed = end;
        out
    }

    /// Whether `s` can hold positions `0..end` after taking the blocks it lacks.
    fn can_grow(&self, s: &Seq, end: usize) -> bool {
        let need = self.cfg.kv.blocks_for(end);
        self.pools.iter().zip(&s.tables).all(|(p, t)| need.saturating_sub(t.len()) <= p.n_free())
    }

    /// Whether a sequence starting from `hit` can hold positions `0..end`.
    fn can_start(&self, hit: &Hit, end: usize) -> bool {
        let need = self.cfg.kv.blocks_for(end);
        self.pools.iter().zip(&hit.tables).all(|(p, t)| {
            // Cached blocks that nobody references come out of the free list too.
            let revived = t.iter().filter(|&&b| b != NO_BLOCK && p.refs(b) == 0).count();
            need.saturating_sub(t.len()) + revived <= p.n_free()
        })
    }

    /// Gives back the blocks of windowed groups that no query from `computed` on can see.
    fn trim_window(&mut self, i: usize) {
        let s = &mut self.running[i];
        for (g, group) in self.cfg.kv.groups.iter().enumerate() {
            let first = self.cfg.kv.first_needed_block(group.window, s.computed).min(s.tables[g].len());
            for b in &mut s.tables[g][..first] {
                if *b != NO_BLOCK {
                    self.pools[g].release(*b);
                    *b = NO_BLOCK;
                }
            }
        }
    }

    /// Frees running sequence `i` and puts it at the front of the waiting queue, to be
    /// recomputed from position 0.
    fn preempt(&mut self, i: usize) {
        let mut s = self.running.remove(i);
        self.release(&mut s);
        s.computed = 0;
        s.cached = 0;
        self.stats.preemptions += 1;
        self.waiting.push_front(s);
    }

    /// Returns every block of `s` (the tail first, so it is reused first) and has the workers
    /// forget it.
    fn release(&mut self, s: &mut Seq) {
        for (g, t) in s.tables.iter_mut().enumerate() {
            for &b in t.iter().rev().filter(|&&b| b != NO_BLOCK) {
                self.pools[g].release(b);
            }
            t.clear();
        }
        s.sent.iter_mut().for_each(|n| *n = 0);
        s.registered = 0;
        if s.started {
            self.to_free.push(s.worker_id);
            s.started = false;
        }
    }

    /// The longest cached prefix of `s` that every group can start from: whole blocks of the
    /// prompt, at most all tokens but the last (whose logits are needed), with a windowed group needing
    /// only the blocks a query right after the prefix sees.
    fn prefix_hit(&self, s: &Seq) -> Hit {
        let groups = self.pools.len();
        let none = Hit { tokens: 0, tables: vec![Vec::new(); groups] };
        if !self.cfg.prefix_caching || s.prompt_logprobs.is_some() {
            return none;
        }
        let bs = self.cfg.kv.block_size;
        // Within the prompt: a sequence recomputed after preemption recomputes what it had
        // generated, so the workers see (and count, for penalties) every generated token.
        let max_blocks = ((s.tokens.len() - 1).min(s.prompt_len) / bs).min(s.hashes.len());
        // Full-attention groups need every block: how far the chain goes.
        let mut m = max_blocks;
        for (g, group) in self.cfg.kv.groups.iter().enumerate() {
            if group.window.is_none() {
                m = m.min(s.hashes.iter().take(max_blocks).take_while(|&&h| self.pools[g].lookup(h).is_some()).count());
            }
        }
        'candidates: for m in (1..=m).rev() {
            let mut tables = Vec::with_capacity(groups);
            for (g, group) in self.cfg.kv.groups.iter().enumerate() {
                let first = self.cfg.kv.first_needed_block(group.window, m * bs);
                let mut t = vec![NO_BLOCK; first];
                for &h in &s.hashes[first..m] {
                    match self.pools[g].lookup(h) {
                        Some(b) => t.push(b),
                        None => continue 'candidates,
                    }
                }
                tables.push(t);
            }
            return Hit { tokens: m * bs, tables };
        }
        none
    }
}

/// A prefix-cache hit: tokens covered and the blocks (per group) to start from.
struct Hit {
    tokens: usize,
    tables: Vec<Vec<BlockId>>,
}

impl Scheduler {
    /// Checks the bookkeeping: every block's reference count equals the tables that hold it,
    /// the free lists hold exactly the unreferenced blocks, waiting requests hold none, and
    /// running sequences are within limits. For tests and debugging.
    pub fn audit(&self) -> Result<(), String> {
        if self.running.len() > self.cfg.max_num_seqs {
            return Err(format!("{} running, limit {}", self.running.len(), self.cfg.max_num_seqs));
        }
        if let Some(s) = self.waiting.iter().find(|s| s.tables.iter().any(|t| !t.is_empty())) {
            return Err(format!("waiting request {} holds blocks", s.id));
        }
        for (g, pool) in self.pools.iter().enumerate() {
            let mut refs = vec![0u32; pool.len()];
            for s in &self.running {
                for &b in s.tables[g].iter().filter(|&&b| b != NO_BLOCK) {
                    refs[b as usize] += 1;
                }
            }
            for (b, &r) in refs.iter().enumerate() {
                if pool.refs(b as BlockId) != r {
                    return Err(format!("group {g} block {b}: {} references counted, {r} held", pool.refs(b as BlockId)));
                }
            }
            let unreferenced = refs.iter().filter(|&&r| r == 0).count();
            if pool.n_free() != unreferenced {
                return Err(format!("group {g}: {} free, {unreferenced} unreferenced", pool.n_free()));
            }
        }
        Ok(())
    }
}

/// Chain hashes for every full block (of `bs` tokens) of `s.tokens` not hashed yet.
fn extend_hashes(bs: usize, s: &mut Seq) {
    while (s.hashes.len() + 1) * bs <= s.tokens.len() {
        let b = s.hashes.len();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        s.hashes.last().copied().unwrap_or(0x7470_7365_7276_6521).hash(&mut h);
        s.tokens[b * bs..(b + 1) * bs].hash(&mut h);
        s.hashes.push(h.finish());
    }
}
