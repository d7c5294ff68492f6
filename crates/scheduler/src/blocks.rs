//! One KV group's pool of blocks: reference counts, the free list in least-recently-used
//! order, and the prefix cache (content hash → block) over blocks that still hold their
//! keys. A block nobody references stays in the cache until the free list hands it out again.

use std::collections::{BTreeMap, HashMap};

use tpserve_types::kv::BlockId;

/// The blocks of one group.
#[derive(Debug, Clone)]
pub struct BlockPool {
    /// Per block: how many sequences' tables hold it.
    refs: Vec<u32>,
    /// The content hash a block is cached under.
    hash: Vec<Option<u64>>,
    /// Content hash → the block holding it (the inverse of `hash`).
    cached: HashMap<u64, BlockId>,
    /// Unreferenced blocks by the tick they were freed at: the oldest is handed out first.
    free: BTreeMap<u64, BlockId>,
    /// Where each unreferenced block sits in `free`.
    free_at: Vec<Option<u64>>,
    tick: u64,
}

impl BlockPool {
    /// A pool of `n` blocks (ids `0..n`), all free and none cached.
    pub fn new(n: usize) -> Self {
        let mut p = Self { refs: vec![0; n], hash: vec![None; n], cached: HashMap::new(), free: BTreeMap::new(), free_at: vec![None; n], tick: 0 };
        for b in 0..n {
            p.push_free(b as BlockId);
        }
        p
    }

    /// Blocks in the pool, referenced or not.
    pub fn len(&self) -> usize {
        self.refs.len()
    }

    /// Whether the pool has no blocks at all (not whether they are all used: see
    /// [`BlockPool::n_free`]).
    pub fn is_empty(&self) -> bool {
        self.refs.is_empty()
    }

    /// Blocks nobody references (cached ones included: they can be handed out).
    pub fn n_free(&self) -> usize {
        self.free.len()
    }

    /// References to `b`.
    pub fn refs(&self, b: BlockId) -> u32 {
        self.refs[b as usize]
    }

    /// Unreferenced blocks that still hold cached content.
    pub fn n_cached_free(&self) -> usize {
        self.free.values().filter(|&&b| self.hash[b as usize].is_some()).count()
    }

    fn push_free(&mut self, b: BlockId) {
        self.tick += 1;
        self.free.insert(self.tick, b);
        self.free_at[b as usize] = Some(self.tick);
    }

    /// A fresh block (its cached content, if any, is forgotten), or None when all are used.
    pub fn allocate(&mut self) -> Option<BlockId> {
        let (_, b) = self.free.pop_first()?;
        self.free_at[b as usize] = None;
        if let Some(h) = self.hash[b as usize].take() {
            self.cached.remove(&h);
        }
        self.refs[b as usize] = 1;
        Some(b)
    }

    /// The cached block holding the content hashed `h`.
    pub fn lookup(&self, h: u64) -> Option<BlockId> {
        self.cached.get(&h).copied()
    }

    /// Takes one more reference to a (cached) block.
    pub fn acquire(&mut self, b: BlockId) {
        if let Some(t) = self.free_at[b as usize].take() {
            self.free.remove(&t);
        }
        self.refs[b as usize] += 1;
    }

    /// Drops one reference; the block is free when none is left (and stays cached).
    pub fn release(&mut self, b: BlockId) {
        let r = &mut self.refs[b as usize];
        assert!(*r > 0, "block {b} released more often than taken");
        *r -= 1;
        if *r == 0 {
            self.push_free(b);
        }
    }

    /// Caches `b` under `h` (no-op when another block already holds that content).
    pub fn register(&mut self, b: BlockId, h: u64) {
        if self.hash[b as usize].is_some() || self.cached.contains_key(&h) {
            return;
        }
        self.hash[b as usize] = Some(h);
        self.cached.insert(h, b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn freed_blocks_stay_cached_until_handed_out_again_oldest_first() {
        let mut p = BlockPool::new(3);
        let (a, b, c) = (p.allocate().unwrap(), p.allocate().unwrap(), p.allocate().unwrap());
        assert_eq!(p.allocate(), None);
        p.register(a, 11);
        p.release(a);
        p.release(b);
        assert_eq!(p.lookup(11), Some(a));
        assert_eq!(p.n_cached_free(), 1);
        // A hit takes the block back out of the free list.
        p.acquire(a);
        assert_eq!(p.n_free(), 1);
        p.release(a);
        // b was freed before a (re-freed): b goes first, then a, whose content is forgotten.
        assert_eq!(p.allocate(), Some(b));
        assert_eq!(p.allocate(), Some(a));
        assert_eq!(p.lookup(11), None);
        p.release(c);
        assert_eq!(p.n_free(), 1);
    }
}
