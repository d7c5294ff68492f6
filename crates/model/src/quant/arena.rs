//! Memory for the repacked weights (and the row kernels' copies): zeroed, 64-byte aligned regions carved from 2 MiB-aligned
//! chunks that the kernel is asked to back with transparent huge pages.
//!
//! A decode step streams every weight byte once. On 4 KiB pages that is a TLB miss every
//! 4 KiB and a hardware prefetcher that starts over at every page boundary; on 2 MiB pages
//! the same bytes stream faster (docs/PERFORMANCE.md, "The weights on huge pages": batch-1
//! decode 1.37x with the packed kernels, 1.09x with the AVX2 row kernels).
//! Transparent huge pages are commonly in `madvise` mode, where nothing is huge unless asked,
//! and a matrix of a layer (a few hundred KiB to a few MiB) would not fill an aligned 2 MiB
//! page of its own: so small regions share 32 MiB chunks, one after the other, and a region
//! of a quarter chunk or more gets a chunk of its own, huge over its whole 2 MiB pages only.
//!
//! A chunk is unmapped when the last region in it is dropped (the open chunk is held weakly),
//! so a model that is dropped and loaded again does not keep its old weights. The advice is
//! best effort: where the kernel refuses it or has huge pages off, the pages stay small and
//! the memory works as any other (the row kernels' copies, which exist only for the huge
//! pages, are then not made: [`huge_pages_enabled`]).

use std::sync::{Arc, Mutex, OnceLock, Weak};

/// A huge page (x86-64 and aarch64 with 4 KiB base pages).
const HUGE: usize = 2 << 20;
/// Bytes of a chunk that small regions share.
const CHUNK: usize = 32 << 20;
/// Regions of this many bytes or more get a chunk of their own.
const OWN_CHUNK: usize = CHUNK / 4;
/// Alignment of every region: one cache line, so the kernels' 64-byte loads are aligned.
const ALIGN: usize = 64;

/// Whether transparent huge pages can back memory advised `MADV_HUGEPAGE` here (Linux with
/// them `always` or `madvise`, not `never`), read once per process.
pub(crate) fn huge_pages_enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED
        .get_or_init(|| std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]")))
}

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
    /// Maps `len` zeroed bytes (rounded up to whole 2 MiB pages, all advised huge) at a 2 MiB
    /// boundary. Panics if the system refuses the mapping, as a failed allocation does.
    fn new(len: usize) -> Self {
        let len = len.checked_next_multiple_of(HUGE).expect("weight memory: size overflows");
        let map_len = len.checked_add(HUGE).expect("weight memory: size overflows");
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing.
        let map = unsafe { libc::mmap(std::ptr::null_mut(), map_len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0) };
        if map == libc::MAP_FAILED {
            panic!("cannot map {map_len} bytes for the weights: {}", std::io::Error::last_os_error());
        }
        // SAFETY: the offset to the next 2 MiB boundary is below HUGE, inside the mapping.
        let start = unsafe { map.cast::<u8>().add((map as usize).next_multiple_of(HUGE) - map as usize) };
        #[cfg(target_os = "linux")]
        // SAFETY: [start, start + len) lies inside the mapping; MADV_HUGEPAGE changes only how
        // the kernel backs the pages, never their contents. Errors are ignored.
        unsafe {
            libc::madvise(start.cast(), len, libc::MADV_HUGEPAGE)
        };
        Self { map, map_len, start, len }
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
        let len_aligned = len.checked_next_multiple_of(ALIGN).expect("weight memory: size overflows");
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
        let first_chunk = Arc::downgrade(&small[0].chunk);
        let kept: Vec<(usize, Region)> = small.into_iter().enumerate().filter(|(i, _)| i % 3 == 0).collect();
        for (i, r) in &kept {
            assert!(r.as_slice().iter().all(|&b| b == *i as u8 + 1), "region {i} changed");
        }
        // A chunk is unmapped with the last region in it.
        assert!(first_chunk.upgrade().is_some());
        let own = Arc::downgrade(&big.chunk);
        drop((kept, big));
        assert!(own.upgrade().is_none(), "a large region's chunk outlived it");
        // (Regions of other tests may share the first chunk: wait for them to go.)
        let t0 = std::time::Instant::now();
        while first_chunk.upgrade().is_some() && t0.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(first_chunk.upgrade().is_none(), "a shared chunk outlived its regions");
    }
}
