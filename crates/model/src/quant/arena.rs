//! Memory for the repacked weights (and the row kernels' copies): zeroed, 64-byte aligned regions carved from 2 MiB-aligned
//! chunks that the kernel is asked to back with transparent huge pages.
//!
//! A decode step streams every weight byte once. On 4 KiB pages that is a TLB miss every
//! 4 KiB and a hardware prefetcher that starts over at every page boundary; on 2 MiB pages
//! the same bytes stream faster (measured in docs/PERFORMANCE.md, "Weights on huge pages").
//! Transparent huge pages are commonly in `madvise` mode, where nothing is huge unless asked,
//! and a matrix of a layer (a few hundred KiB to a few MiB) would not fill an aligned 2 MiB
//! page of its own: so small regions share 32 MiB chunks, one after the other, and a region
//! of a quarter chunk or more gets a chunk of its own, huge over its whole 2 MiB pages only.
//!
//! A chunk is unmapped when the last region in it is dropped (the open chunk is held weakly),
//! so a model that is dropped and loaded again does not keep its old weights. The advice is
//! best effort: where the kernel refuses it or has huge pages off, the pages stay small and
//! nothing else changes.

use std::sync::{Arc, Mutex, Weak};

/// A huge page (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;
/// Bytes of a chunk that small regions share.
const CHUNK: usize = 32 << 20;
/// Regions of this many bytes or more get a chunk of their own.
const OWN_CHUNK: usize = CHUNK / 4;
/// Alignment of every region: one cache line, so the kernels' 64-byte loads are aligned.
const ALIGN: usize = 64;

/// One anonymous mapping, `len` usable bytes from the 2 MiB-aligned `start`.
struct Chunk {
    /// What `mmap` returned and its length, for `munmap`.
    map: *mut libc::c_void,
    map_len: usize,
    start: *mut u8,
    len: usize,
}

// SAFETY: a chunk is plain memory; regions hand out disjoint ranges of it (see `Region`).
unsafe impl Send for Chunk {}
unsafe impl Sync for Chunk {}

impl Chunk {
    /// Maps `len` zeroed bytes at a 2 MiB boundary and advises huge pages over its whole
    /// 2 MiB pages. Panics if the system refuses the mapping, as a failed allocation does.
    fn new(len: usize) -> Self {
        let map_len = len + HUGE;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
        let map = unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if map == libc::MAP_FAILED {
            panic!("repacked weights: cannot map {map_len} bytes: {}", std::io::Error::last_os_error());
        }
        let start = (map as usize).next_multiple_of(HUGE);
        let whole = len / HUGE * HUGE;
        #[cfg(target_os = "linux")]
        if whole > 0 {
            // SAFETY: [start, start + whole) lies inside the mapping; MADV_HUGEPAGE changes
            // only how the kernel backs the pages, never their contents. Errors are ignored.
            unsafe { libc::madvise(start as *mut libc::c_void, whole, libc::MADV_HUGEPAGE) };
        }
        Self { map, map_len, start: start as *mut u8, len }
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`; no region outlives the chunk (each holds an Arc).
        unsafe { libc::munmap(self.map, self.map_len) };
    }
}

/// The chunk small regions are being carved from, and the bytes of it already handed out.
static OPEN: Mutex<Option<(Weak<Chunk>, usize)>> = Mutex::new(None);

/// `len` zeroed bytes at a 64-byte boundary, owned alone until dropped.
pub(crate) struct Region {
    chunk: Arc<Chunk>,
    offset: usize,
    len: usize,
}

impl Region {
    pub(crate) fn new(len: usize) -> Self {
        let len_aligned = len.next_multiple_of(ALIGN);
        if len_aligned >= OWN_CHUNK {
            return Self { chunk: Arc::new(Chunk::new(len_aligned)), offset: 0, len };
        }
        let mut open = OPEN.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((chunk, used)) = open.as_mut() {
            if let Some(chunk) = chunk.upgrade().filter(|c| *used + len_aligned <= c.len) {
                let offset = *used;
                *used += len_aligned;
                return Self { chunk, offset, len };
            }
        }
        let chunk = Arc::new(Chunk::new(CHUNK));
        *open = Some((Arc::downgrade(&chunk), len_aligned));
        Self { chunk, offset: 0, len }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn as_slice(&self) -> &[u8] {
        // SAFETY: [offset, offset + len) is inside the chunk, which lives as long as `self`,
        // and no other region covers it (regions are carved one after the other, never again).
        unsafe { std::slice::from_raw_parts(self.chunk.start.add(self.offset), self.len) }
    }

    pub(crate) fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`; `&mut self` makes this the only reference to the range.
        unsafe { std::slice::from_raw_parts_mut(self.chunk.start.add(self.offset), self.len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_zeroed_aligned_disjoint_and_outlive_their_neighbours() {
        let mut small: Vec<Region> = (0..40).map(|i| Region::new(1000 + 100_000 * i)).collect();
        let big = Region::new(OWN_CHUNK + 100);
        assert_eq!(big.offset, 0, "a large region gets a chunk of its own");
        assert_eq!(big.chunk.start as usize % HUGE, 0);
        assert!(big.as_slice().iter().all(|&b| b == 0));
        for (i, r) in small.iter_mut().enumerate() {
            assert_eq!(r.len(), 1000 + 100_000 * i);
            assert_eq!(r.as_slice().as_ptr() as usize % ALIGN, 0);
            assert!(r.as_slice().iter().all(|&b| b == 0), "region {i} not zeroed");
            r.as_mut_slice().fill(i as u8 + 1);
        }
        // 40 regions of 1 KB-3.9 MB (78 MB) fill more than one chunk; none overlaps another.
        let mut spans: Vec<(usize, usize)> = small.iter().map(|r| (r.as_slice().as_ptr() as usize, r.len())).collect();
        spans.sort();
        assert!(spans.windows(2).all(|w| w[0].0 + w[0].1 <= w[1].0));
        assert!(small.iter().any(|r| !Arc::ptr_eq(&r.chunk, &small[0].chunk)), "the regions span chunks");
        // Dropping some regions leaves the others' bytes as written.
        let kept: Vec<(usize, Region)> = small.into_iter().enumerate().filter(|(i, _)| i % 3 == 0).collect();
        for (i, r) in &kept {
            assert!(r.as_slice().iter().all(|&b| b == *i as u8 + 1), "region {i} changed");
        }
    }
}
