//! The layout of the paged KV cache, shared by the scheduler (which hands out blocks) and the
//! workers (which hold the memory).
//!
//! Keys and values live in fixed-size blocks of `block_size` positions. Layers with the same
//! attention window form a *group*: they share one block table per sequence and one pool of
//! blocks, so a block id names the same positions in every layer of its group. Full-attention
//! layers keep every block of a sequence; a sliding-window group gives back blocks that no
//! future query can see, so it needs only about `window / block_size` blocks per sequence
//! (on Gemma 3, 15 of 18 layers have a 512-token window).

use serde::{Deserialize, Serialize};

/// A block of one group's pool.
pub type BlockId = u32;

/// A table entry for a block the sequence no longer holds (it left the window).
pub const NO_BLOCK: BlockId = u32::MAX;

/// Layers that share block tables.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvGroup {
    /// The layers' attention window in positions (None: full attention).
    pub window: Option<usize>,
    /// Model layer indices in the group.
    pub layers: Vec<usize>,
    /// Blocks in the group's pool, over all sequences (each holds `block_size` positions
    /// of every layer of the group).
    pub blocks: usize,
}

/// The whole cache: block size and groups.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvLayout {
    /// Positions per block, the same in every group; at least 1.
    pub block_size: usize,
    /// The full-attention group first (when there is one), then one group per window size,
    /// smallest first. A group's index here is its index in [`crate::step::SeqWork::blocks`].
    pub groups: Vec<KvGroup>,
}

/// How big to make the cache.
#[derive(Debug, Clone, Copy)]
pub struct KvSizing {
    /// Positions per block (0 is taken as 1).
    pub block_size: usize,
    /// Positions each full-attention layer holds, over all sequences.
    pub tokens: usize,
    /// Most sequences running at once.
    pub max_seqs: usize,
    /// Most new tokens of one sequence in one step.
    pub max_chunk: usize,
}

impl KvLayout {
    /// Groups `windows[layer]` (full-attention layers first, then one group per window size)
    /// and sizes each pool. A full-attention pool holds `tokens` positions; a windowed pool
    /// holds what `max_seqs` sequences need at most at once (each its window and a partial
    /// block at both ends, plus one step's `max_chunk` new positions over them all), never
    /// more than a full pool.
    pub fn new(windows: &[Option<usize>], s: KvSizing) -> Self {
        let bs = s.block_size.max(1);
        let full_blocks = s.tokens.div_ceil(bs);
        let mut keys: Vec<Option<usize>> = windows.to_vec();
        keys.sort_unstable();
        keys.dedup();
        let groups = keys
            .into_iter()
            .map(|window| {
                let layers = (0..windows.len()).filter(|&l| windows[l] == window).collect();
                let blocks = match window {
                    None => full_blocks,
                    Some(w) => s
                        .max_seqs
                        .max(1)
                        .saturating_mul(w.saturating_sub(1).div_ceil(bs).saturating_add(2))
                        .saturating_add(s.max_chunk.div_ceil(bs))
                        .min(full_blocks),
                };
                KvGroup { window, layers, blocks }
            })
            .collect();
        Self { block_size: bs, groups }
    }

    /// Most blocks of a `window` group one sequence holds at once while computing up to
    /// `chunk` new positions.
    pub fn window_blocks(block_size: usize, window: usize, chunk: usize) -> usize {
        window.saturating_sub(1).saturating_add(chunk.max(1)).div_ceil(block_size).saturating_add(1)
    }

    /// The group of model layer `layer`.
    pub fn group_of(&self, layer: usize) -> Option<usize> {
        self.groups.iter().position(|g| g.layers.contains(&layer))
    }

    /// Blocks that hold positions `0..len`.
    pub fn blocks_for(&self, len: usize) -> usize {
        len.div_ceil(self.block_size)
    }

    /// The first block a query at position `pos` (or any later one) may read in a group with
    /// `window`: blocks before it can be given back.
    pub fn first_needed_block(&self, window: Option<usize>, pos: usize) -> usize {
        match window {
            Some(w) => (pos + 1).saturating_sub(w) / self.block_size,
            None => 0,
        }
    }

    /// Positions the full-attention pool holds (the longest total history): the smallest
    /// pool when every layer has a window.
    pub fn token_capacity(&self) -> usize {
        let full = self.groups.iter().find(|g| g.window.is_none()).or(self.groups.first());
        full.map_or(0, |g| g.blocks * self.block_size)
    }

    /// Bytes of keys and values one worker holds for `layers` of its stage, `kv_dim` floats
    /// per position (f32 keys and values).
    pub fn bytes(&self, layers: &std::ops::Range<usize>, kv_dim: usize) -> u64 {
        self.groups
            .iter()
            .map(|g| {
                let n = g.layers.iter().filter(|l| layers.contains(l)).count() as u64;
                n.saturating_mul(g.blocks as u64).saturating_mul((self.block_size * kv_dim * 8) as u64)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// What [`KvLayout::bytes`] would be if every layer kept the full history.
    pub fn bytes_without_windows(&self, layers: &std::ops::Range<usize>, kv_dim: usize) -> u64 {
        let n = self.groups.iter().flat_map(|g| &g.layers).filter(|l| layers.contains(l)).count();
        (n as u64).saturating_mul(self.token_capacity() as u64).saturating_mul((kv_dim * 8) as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemma_layers_split_into_a_full_and_a_windowed_group() {
        // Gemma 3: every sixth layer global, the others a 512 window.
        let windows: Vec<Option<usize>> = (0..18).map(|l| if l % 6 == 5 { None } else { Some(512) }).collect();
        let kv = KvLayout::new(&windows, KvSizing { block_size: 16, tokens: 32768, max_seqs: 8, max_chunk: 256 });
        assert_eq!(kv.groups.len(), 2);
        assert_eq!(kv.groups[0].window, None);
        assert_eq!(kv.groups[0].layers, [5, 11, 17]);
        assert_eq!(kv.groups[0].blocks, 2048);
        // 511 / 16 rounded up + 2 = 34 blocks per sequence, and 256 / 16 for one step's chunk.
        assert_eq!(kv.groups[1].blocks, 8 * 34 + 16);
        assert_eq!(kv.group_of(6), Some(1));
        assert_eq!(kv.token_capacity(), 32768);
        assert!(kv.bytes(&(0..18), 256) < kv.bytes_without_windows(&(0..18), 256) / 3);
        // A query at 600 sees keys from 89 on: block 5.
        assert_eq!(kv.first_needed_block(Some(512), 600), 5);
        assert_eq!(kv.first_needed_block(None, 600), 0);
    }
}
