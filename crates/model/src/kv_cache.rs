//! Per-sequence key/value history, kept outside the model so a forward pass can serve any
//! mix of sequences. Sliding-window layers drop keys that no future query can see.

/// One layer's keys and values for one sequence: `[held, kv_dim]` each.
#[derive(Debug, Default, Clone)]
pub struct LayerKv {
    pub k: Vec<f32>,
    pub v: Vec<f32>,
    /// Absolute position of the first key still held.
    pub pos0: usize,
}

/// The KV cache of one sequence on this rank.
#[derive(Debug, Clone)]
pub struct KvCache {
    pub layers: Vec<LayerKv>,
    /// Tokens processed so far (the position of the next token).
    len: usize,
    kv_dim: usize,
}

impl KvCache {
    pub fn new(n_layers: usize, kv_dim: usize) -> Self {
        Self { layers: vec![LayerKv::default(); n_layers], len: 0, kv_dim }
    }

    /// Tokens already in the cache.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends one layer's keys and values for the chunk being processed.
    pub(crate) fn append(&mut self, layer: usize, k: &[f32], v: &[f32]) {
        let l = &mut self.layers[layer];
        l.k.extend_from_slice(k);
        l.v.extend_from_slice(v);
    }

    /// Marks `n` more tokens as processed and lets windowed layers forget what no future
    /// query can see. Dropping happens when twice the window is held, so the copy is amortised.
    pub(crate) fn advance(&mut self, n: usize, windows: &[Option<usize>]) {
        self.len += n;
        for (l, w) in self.layers.iter_mut().zip(windows) {
            let Some(w) = *w else { continue };
            let held = l.k.len() / self.kv_dim;
            if held > w.saturating_mul(2) {
                // The next query, at position len, needs keys from len + 1 - w on.
                let keep_from = (self.len + 1).saturating_sub(w).max(l.pos0);
                let drop = (keep_from - l.pos0) * self.kv_dim;
                l.k.drain(..drop);
                l.v.drain(..drop);
                l.pos0 = keep_from;
            }
        }
    }

    /// Bytes held (keys and values, all layers).
    pub fn nbytes(&self) -> usize {
        self.layers.iter().map(|l| (l.k.len() + l.v.len()) * 4).sum()
    }
}
