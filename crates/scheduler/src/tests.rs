//! The scheduler's policies in scenarios (decodes first, chunked prefill, prefix hits,
//! preemption, refusals), and a property test that drives it against fake workers holding
//! the blocks it hands out: no block leaks, and every step reads its own history.

use std::collections::HashMap;

use proptest::prelude::*;
use tpserve_types::kv::{BlockId, KvGroup, KvLayout, NO_BLOCK};
use tpserve_types::step::{LogitsWanted, SeqId};
use tpserve_types::TokenId;

use crate::{AddError, Batch, NewRequest, Scheduler, SchedulerConfig};

/// Two groups like Gemma's: full attention, and a window of `window` positions.
fn config(block_size: usize, full_blocks: usize, window_blocks: usize, window: usize, budget: usize, max_seqs: usize) -> SchedulerConfig {
    SchedulerConfig {
        kv: KvLayout {
            block_size,
            groups: vec![
                KvGroup { window: None, layers: vec![1], blocks: full_blocks },
                KvGroup { window: Some(window), layers: vec![0], blocks: window_blocks },
            ],
        },
        max_num_seqs: max_seqs,
        token_budget: budget,
        max_waiting: 64,
        context_len: 4096,
        prefix_caching: true,
    }
}

fn req(id: u64, prompt: Vec<TokenId>, max_tokens: usize) -> NewRequest {
    NewRequest { id, prompt, max_tokens, prompt_logprobs: None }
}

/// What a worker would hold: per sequence its block tables, per block position the token
/// written there and a hash of every token up to it. Checks that each step reads exactly
/// the keys of its own history (prefix hits included) and writes only blocks it owns.
#[derive(Default)]
struct Workers {
    tables: HashMap<SeqId, Vec<Vec<BlockId>>>,
    mem: HashMap<(usize, BlockId, usize), u64>,
}

/// A hash of `tokens[..=p]` for every p.
fn prefix_hashes(tokens: &[TokenId]) -> Vec<u64> {
    let mut h = 0xcbf2_9ce4_8422_2325u64;
    tokens
        .iter()
        .map(|&t| {
            h = (h ^ t as u64).wrapping_mul(0x100_0000_01b3);
            h
        })
        .collect()
}

impl Workers {
    fn run(&mut self, kv: &KvLayout, batch: &Batch, tokens_of: &HashMap<u64, Vec<TokenId>>) {
        for id in &batch.free {
            assert!(self.tables.remove(id).is_some(), "freeing sequence {id} the workers do not hold");
        }
        let bs = kv.block_size;
        for s in &batch.seqs {
            if s.starts {
                assert!(self.tables.insert(s.seq_id, vec![Vec::new(); kv.groups.len()]).is_none(), "sequence {} started twice", s.seq_id);
            }
            let t = self.tables.get_mut(&s.seq_id).expect("a continuing sequence is held");
            for (t, new) in t.iter_mut().zip(&s.blocks) {
                t.extend_from_slice(new);
            }
            let all = &tokens_of[&s.req];
            assert_eq!(&all[s.start_pos..s.start_pos + s.tokens.len()], &s.tokens[..], "request {}: wrong tokens", s.req);
            let hashes = prefix_hashes(all);
            let end = s.start_pos + s.tokens.len();
            for (g, group) in kv.groups.iter().enumerate() {
                let table = &t[g];
                assert!(table.len() >= kv.blocks_for(end), "request {}: table too short", s.req);
                // What it reads must be its own history.
                let first = kv.first_needed_block(group.window, s.start_pos) * bs;
                for p in first..s.start_pos {
                    let b = table[p / bs];
                    assert_ne!(b, NO_BLOCK, "request {}: reads position {p} of group {g} from no block", s.req);
                    assert_eq!(self.mem.get(&(g, b, p % bs)), Some(&hashes[p]), "request {}: position {p} of group {g} holds someone else's key", s.req);
                }
                for p in s.start_pos..end {
                    let b = table[p / bs];
                    assert!(b != NO_BLOCK && (b as usize) < group.blocks);
                    self.mem.insert((g, b, p % bs), hashes[p]);
                }
            }
        }
    }
}

#[test]
fn decodes_go_first_and_long_prompts_are_chunked_under_the_budget() {
    let mut s = Scheduler::new(config(4, 64, 64, 8, 10, 8));
    s.add(req(1, vec![1; 6], 4)).unwrap();
    s.add(req(2, vec![2; 25], 4)).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs.iter().map(|x| (x.req, x.tokens.len(), x.logits)).collect::<Vec<_>>(), [(1, 6, LogitsWanted::Last), (2, 4, LogitsWanted::None)]);
    s.step_done();
    s.append(1, 9);
    let b = s.schedule();
    // Request 1 decodes one token, request 2 gets the rest of the budget.
    assert_eq!(b.seqs.iter().map(|x| (x.req, x.start_pos, x.tokens.len())).collect::<Vec<_>>(), [(1, 6, 1), (2, 4, 9)]);
    assert!(b.n_tokens() <= 10);
    s.audit().unwrap();
}

#[test]
fn prompt_logprobs_from_a_position_cost_logits_only_from_there() {
    let mut s = Scheduler::new(config(4, 64, 64, 8, 100, 8));
    // Log-probabilities of tokens 6..10: logits for positions 5..10, in a chunk of their own.
    s.add(NewRequest { id: 1, prompt: (0..10).collect(), max_tokens: 1, prompt_logprobs: Some(6) }).unwrap();
    // The whole prompt (0 and 1 mean the same: token 0 has nothing before it).
    s.add(NewRequest { id: 2, prompt: (0..7).collect(), max_tokens: 1, prompt_logprobs: Some(0) }).unwrap();
    // From beyond the prompt: its last position only.
    s.add(NewRequest { id: 3, prompt: (0..5).collect(), max_tokens: 1, prompt_logprobs: Some(40) }).unwrap();
    let b = s.schedule();
    let chunks = |b: &Batch| b.seqs.iter().map(|x| (x.req, x.start_pos, x.tokens.len(), x.logits)).collect::<Vec<_>>();
    assert_eq!(chunks(&b), [(1, 0, 5, LogitsWanted::None), (2, 0, 7, LogitsWanted::All), (3, 0, 4, LogitsWanted::None)]);
    s.step_done();
    let b = s.schedule();
    assert_eq!(chunks(&b), [(1, 5, 5, LogitsWanted::All), (3, 4, 1, LogitsWanted::All)]);
    s.audit().unwrap();
}

#[test]
fn a_shared_prefix_is_computed_once() {
    let mut s = Scheduler::new(config(4, 64, 64, 8, 64, 8));
    let system: Vec<TokenId> = (100..117).collect(); // 17 tokens: four full blocks
    let mut p1 = system.clone();
    p1.extend([1, 2, 3]);
    s.add(req(1, p1, 2)).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs[0].cached, 0);
    s.step_done();
    s.finish(1);
    let mut p2 = system.clone();
    p2.extend([7, 8]);
    s.add(req(2, p2, 2)).unwrap();
    let b = s.schedule();
    // 16 tokens (four blocks) come from the cache; the windowed group starts from the
    // blocks a query at 16 sees (positions 9.. : blocks 2 and 3).
    assert_eq!((b.seqs[0].start_pos, b.seqs[0].cached, b.seqs[0].tokens.len()), (16, 16, 3));
    assert!(b.seqs[0].starts);
    assert_eq!(b.seqs[0].blocks[1][..2], [NO_BLOCK, NO_BLOCK]);
    let st = s.stats();
    assert_eq!((st.prefix_queries, st.prefix_hits), (20 + 19, 16));
    s.audit().unwrap();
}

#[test]
fn after_the_workers_are_lost_running_requests_end_waiting_ones_start_over_and_the_cache_is_empty() {
    let mut s = Scheduler::new(config(4, 64, 64, 8, 64, 1));
    let system: Vec<TokenId> = (100..117).collect();
    s.add(req(1, system.clone(), 4)).unwrap();
    s.add(req(2, system.clone(), 4)).unwrap();
    let b = s.schedule();
    assert_eq!(b.seqs.len(), 1, "one running at a time");
    s.step_done();
    assert_eq!(s.workers_lost(), vec![1]);
    assert_eq!((s.n_running(), s.n_waiting()), (0, 1));
    s.audit().unwrap();
    // Request 2 starts from scratch on the reloaded workers: nothing cached, nothing to free.
    let b = s.schedule();
    assert!(b.free.is_empty());
    assert_eq!((b.seqs[0].req, b.seqs[0].start_pos, b.seqs[0].cached), (2, 0, 0));
    assert!(b.seqs[0].starts);
    s.audit().unwrap();
}

#[test]
fn running_out_of_blocks_preempts_the_newest_and_recomputes_it_later() {
    // 6 full blocks of 4: two sequences of 9 + growth cannot both stay.
    let mut s = Scheduler::new(config(4, 6, 6, 64, 64, 8));
    let mut tokens: HashMap<u64, Vec<TokenId>> = HashMap::new();
    for id in [1, 2] {
        tokens.insert(id, vec![id as TokenId * 10; 9]);
        s.add(req(id, tokens[&id].clone(), 12)).unwrap();
    }
    let mut w = Workers::default();
    let mut preempted = 0;
    let mut done = 0;
    let mut gen: HashMap<u64, usize> = HashMap::new();
    for _ in 0..200 {
        if !s.has_work() {
            break;
        }
        let b = s.schedule();
        preempted += b.preempted.len();
        w.run(&s.config().kv, &b, &tokens);
        s.step_done();
        for x in &b.seqs {
            if x.logits == LogitsWanted::Last {
                let g = gen.entry(x.req).or_default();
                *g += 1;
                if *g == 12 {
                    s.finish(x.req);
                    done += 1;
                } else {
                    tokens.get_mut(&x.req).unwrap().push(*g as TokenId);
                    s.append(x.req, *g as TokenId);
                }
            }
        }
        s.audit().unwrap();
    }
    assert_eq!(done, 2);
    assert!(preempted > 0, "the cache was big enough for both: the test tests nothing");
    assert_eq!(s.pool(0).n_free(), 6);
}

#[test]
fn impossible_requests_are_refused_with_reasons() {
    let mut s = Scheduler::new(config(4, 8, 8, 8, 16, 8));
    assert_eq!(s.add(req(1, vec![], 4)), Err(AddError::EmptyPrompt));
    assert!(matches!(s.add(req(1, vec![1; 4000], 200)), Err(AddError::TooLong { .. })));
    assert!(matches!(s.add(req(1, vec![1; 30], 10)), Err(AddError::TooBig { capacity: 32, .. })));
    s.add(req(1, vec![1; 3], 1)).unwrap();
    assert_eq!(s.add(req(1, vec![1; 3], 1)), Err(AddError::Duplicate(1)));
    let mut small = config(4, 8, 8, 8, 16, 8);
    small.max_waiting = 1;
    let mut s = Scheduler::new(small);
    s.add(req(1, vec![1; 3], 1)).unwrap();
    assert_eq!(s.add(req(2, vec![1; 3], 1)), Err(AddError::QueueFull(1)));
}

#[derive(Debug, Clone)]
enum Op {
    /// Prompt from one of a few shared prefixes plus a tail, and how many tokens to generate.
    Add {
        prefix: u8,
        prefix_len: usize,
        tail: usize,
        max_tokens: usize,
        logprobs: Option<usize>,
    },
    Step,
    Cancel(usize),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0u8..3, 0usize..24, 1usize..10, 1usize..12, prop::option::weighted(0.15, 0usize..36))
            .prop_map(|(prefix, prefix_len, tail, max_tokens, logprobs)| Op::Add { prefix, prefix_len, tail, max_tokens, logprobs }),
        Just(Op::Step),
        Just(Op::Step),
        Just(Op::Step),
        (0usize..8).prop_map(Op::Cancel),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    /// Any sequence of admissions, steps, finishes, cancellations and (forced) preemptions
    /// keeps the books straight, respects the budget, reads only a sequence's own keys, and
    /// ends with every block back in the free lists.
    #[test]
    fn no_block_leaks_and_every_step_reads_its_own_history(ops in prop::collection::vec(op(), 1..80), bs in 1usize..6, full in 10usize..40, win_frac in 0.3f64..1.0, budget in 1usize..24, max_seqs in 1usize..6) {
        let window = 6;
        // The windowed pool smaller than the full one, as on Gemma.
        let win = ((full as f64 * win_frac) as usize).max(KvLayout::window_blocks(bs, window, budget));
        let mut cfg = config(bs, full, win, window, budget, max_seqs);
        cfg.max_waiting = 16;
        let mut s = Scheduler::new(cfg);
        let mut tokens: HashMap<u64, Vec<TokenId>> = HashMap::new();
        let mut left: HashMap<u64, usize> = HashMap::new();
        let mut w = Workers::default();
        let mut next_id = 0u64;
        // Requests that want prompt log-probabilities: the first position whose logits they
        // want, and the prompt positions that got them.
        let mut lp: HashMap<u64, (usize, Vec<bool>)> = HashMap::new();
        let step = |s: &mut Scheduler, w: &mut Workers, tokens: &mut HashMap<u64, Vec<TokenId>>, left: &mut HashMap<u64, usize>, lp: &mut HashMap<u64, (usize, Vec<bool>)>| -> Result<(), TestCaseError> {
            let b = s.schedule();
            prop_assert!(b.n_tokens() <= budget.max(1));
            prop_assert!(b.seqs.len() <= max_seqs);
            w.run(&s.config().kv, &b, tokens);
            s.step_done();
            for x in &b.seqs {
                if x.logits == LogitsWanted::All {
                    let (from, got) = lp.get_mut(&x.req).expect("all logits only for prompt log-probabilities");
                    prop_assert!(x.start_pos >= *from, "logits from {} before the first wanted position {from}", x.start_pos);
                    for p in x.start_pos..(x.start_pos + x.tokens.len()).min(got.len()) {
                        got[p] = true;
                    }
                }
                let all = &tokens[&x.req];
                if x.start_pos + x.tokens.len() == all.len() && x.logits != LogitsWanted::None {
                    let l = left.get_mut(&x.req).unwrap();
                    *l -= 1;
                    if let Some((from, got)) = lp.remove(&x.req) {
                        prop_assert!(got[from..].iter().all(|&g| g), "prompt positions {from}.. lacked logits: {got:?}");
                    }
                    if *l == 0 {
                        s.finish(x.req);
                        tokens.remove(&x.req);
                    } else {
                        let t = (all.len() * 7 % 50) as TokenId;
                        tokens.get_mut(&x.req).unwrap().push(t);
                        s.append(x.req, t);
                    }
                }
            }
            s.audit().map_err(TestCaseError::fail)?;
            Ok(())
        };
        for op in ops {
            match op {
                Op::Add { prefix, prefix_len, tail, max_tokens, logprobs } => {
                    let mut p: Vec<TokenId> = (0..prefix_len).map(|i| 100 * (prefix as TokenId + 1) + i as TokenId).collect();
                    p.extend((0..tail).map(|i| (next_id as TokenId * 13 + i as TokenId) % 40));
                    let r = NewRequest { id: next_id, prompt: p.clone(), max_tokens, prompt_logprobs: logprobs };
                    if s.add(r).is_ok() {
                        if let Some(first) = logprobs {
                            lp.insert(next_id, (first.saturating_sub(1).min(p.len() - 1), vec![false; p.len()]));
                        }
                        tokens.insert(next_id, p);
                        left.insert(next_id, max_tokens);
                    }
                    next_id += 1;
                }
                Op::Step => step(&mut s, &mut w, &mut tokens, &mut left, &mut lp)?,
                Op::Cancel(k) => {
                    let mut ids: Vec<u64> = tokens.keys().copied().collect();
                    ids.sort_unstable();
                    if let Some(&id) = ids.get(k) {
                        s.finish(id);
                        tokens.remove(&id);
                        lp.remove(&id);
                    }
                }
            }
            s.audit().map_err(TestCaseError::fail)?;
        }
        // Everything left finishes on its own: no request starves, nothing deadlocks.
        for _ in 0..2000 {
            if !s.has_work() {
                break;
            }
            step(&mut s, &mut w, &mut tokens, &mut left, &mut lp)?;
        }
        prop_assert!(!s.has_work(), "requests never finished: {} running, {} waiting", s.n_running(), s.n_waiting());
        prop_assert!(w.tables.is_empty(), "the workers still hold {} sequences", w.tables.len());
        prop_assert_eq!(s.pool(0).n_free(), full);
        prop_assert_eq!(s.pool(1).n_free(), win);
    }
}
