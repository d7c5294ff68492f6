//! The TCP collective against connections that are not its peers: idle ones, garbage, a
//! wrong cluster key, a lying frame header. None of them may join a world, delay it, crash
//! it, or make it allocate what a header asks for.

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tpserve_comm::wire::{self, CHALLENGE_LEN, NONCE_LEN, VERDICT_LEN};
use tpserve_comm::{Collective, CommError, TcpCollective};

/// Records the largest single allocation this test process makes.
struct Largest;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Largest {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        LARGEST.fetch_max(l.size(), Ordering::Relaxed);
        System.alloc_zeroed(l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LARGEST.fetch_max(new, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        System.dealloc(p, l)
    }
}

#[global_allocator]
static ALLOC: Largest = Largest;

const MIB: usize = 1 << 20;

fn listeners(n: usize) -> (Vec<TcpListener>, Vec<SocketAddr>) {
    let ls: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = ls.iter().map(|l| l.local_addr().unwrap()).collect();
    (ls, addrs)
}

/// Connects every rank of a loopback world at once, rank r with `keys[r]`; each rank's result
/// and how long its connect took.
fn connect_world(
    keys: &[&[u8]],
    session: u64,
    ls: Vec<TcpListener>,
    addrs: &[SocketAddr],
    within: Duration,
) -> Vec<(Result<TcpCollective, CommError>, Duration)> {
    std::thread::scope(|s| {
        let hs: Vec<_> = ls
            .into_iter()
            .enumerate()
            .map(|(rank, l)| {
                let key = keys[rank];
                s.spawn(move || {
                    let t = Instant::now();
                    let c = TcpCollective::connect_within(rank, &l, addrs, session, key, within, Duration::from_secs(10));
                    // Keep the listener until the result is in: a peer may still be connecting.
                    let out = (c, t.elapsed());
                    drop(l);
                    out
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Sums each rank's rank + 1 over the world and gathers the ranks: every rank must see the
/// same, right values.
fn check_world(world: Vec<TcpCollective>) {
    let n = world.len();
    std::thread::scope(|s| {
        let hs: Vec<_> = world
            .iter()
            .map(|c| {
                s.spawn(move || {
                    let mut v = vec![(c.rank() + 1) as f32; 3];
                    c.all_reduce_sum(&mut v).unwrap();
                    (v, c.all_gather(&[c.rank() as f32]).unwrap())
                })
            })
            .collect();
        for h in hs {
            let (sum, gathered) = h.join().unwrap();
            assert_eq!(sum, vec![(n * (n + 1) / 2) as f32; 3]);
            assert_eq!(gathered, (0..n).map(|r| r as f32).collect::<Vec<_>>());
        }
    });
}

/// Plays rank `from` connecting to rank `to` at `addr` with `key`: the verdict it gets.
fn fake_connector(addr: SocketAddr, key: &[u8], session: u64, from: usize, to: usize) -> (TcpStream, [u8; VERDICT_LEN]) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut challenge = [0u8; CHALLENGE_LEN];
    s.read_exact(&mut challenge).unwrap();
    let nonce_a = wire::parse_challenge(&challenge).unwrap();
    s.write_all(&wire::hello(key, session, from, to, &nonce_a, &[5; NONCE_LEN])).unwrap();
    let mut verdict = [0u8; VERDICT_LEN];
    s.read_exact(&mut verdict).unwrap();
    (s, verdict)
}

#[test]
fn idle_garbage_and_wrong_key_connections_neither_delay_nor_join_a_world() {
    let (ls, addrs) = listeners(3);
    // Three connections that never speak, one that speaks garbage, all queued first.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(addrs[0]).unwrap()).collect();
    let mut garbage = TcpStream::connect(addrs[0]).unwrap();
    garbage.write_all(&[0xAB; 200]).unwrap();
    let results = std::thread::scope(|s| {
        // One that claims rank 1 with the wrong key.
        let impostor = s.spawn(|| fake_connector(addrs[0], b"guess", 7, 1, 0).1);
        let world = connect_world(&[&b"secret"[..]; 3], 7, ls, &addrs, Duration::from_secs(30));
        (impostor.join().unwrap(), world)
    });
    let (verdict, world) = results;
    assert_eq!(verdict[0], 3, "the wrong key was not refused as a bad proof: {verdict:?}");
    let mut ranks = Vec::new();
    for (rank, (c, took)) in world.into_iter().enumerate() {
        let c = c.unwrap_or_else(|e| panic!("rank {rank}: {e}"));
        // Each idle connection used to hold the accept loop for the whole 10 s I/O timeout.
        assert!(took < Duration::from_secs(5), "rank {rank} took {took:?} to connect");
        ranks.push(c);
    }
    check_world(ranks);
    // Rank 0 challenged each idle connection, then closed it.
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut challenge = [0u8; CHALLENGE_LEN];
        s.read_exact(&mut challenge).unwrap();
        assert!(wire::parse_challenge(&challenge).is_ok());
        assert_eq!(s.read(&mut [0u8; 1]).unwrap(), 0, "an idle connection was kept open");
    }
}

#[test]
fn a_wrong_key_on_one_rank_fails_the_connect_naming_it_on_every_side() {
    let within = Duration::from_millis(1500);
    let (ls, addrs) = listeners(2);
    let got = connect_world(&[b"secret".as_slice(), b"wrong"], 1, ls, &addrs, within);
    match &got[1].0 {
        Err(CommError::Refused { peer: 0, reason }) => assert!(reason.contains("cluster tokens differ"), "{reason}"),
        other => panic!("rank 1 with the wrong key: {:?}", other.as_ref().err()),
    }
    match &got[0].0 {
        Err(e @ CommError::Refused { peer: 1, .. }) => assert!(e.to_string().contains("did not prove the cluster token"), "{e}"),
        other => panic!("rank 0 facing the wrong key: {:?}", other.as_ref().err()),
    }
    // World 3, rank 1 wrong: rank 0 refuses it, rank 2 never hears from it; nobody connects.
    let (ls, addrs) = listeners(3);
    let got = connect_world(&[b"secret".as_slice(), b"wrong", b"secret"], 1, ls, &addrs, within);
    assert!(matches!(got[0].0, Err(CommError::Refused { peer: 1, .. })), "{:?}", got[0].0.as_ref().err());
    assert!(matches!(got[1].0, Err(CommError::Refused { peer: 0, .. })), "{:?}", got[1].0.as_ref().err());
    assert!(matches!(got[2].0, Err(CommError::Timeout { peer: 1, .. }) | Err(CommError::Io { peer: 1, .. })), "{:?}", got[2].0.as_ref().err());
}

#[test]
fn a_listener_that_cannot_prove_the_key_is_refused_by_the_connector() {
    let (mut ls, addrs) = listeners(2);
    let fake = ls.remove(0);
    let l1 = ls.remove(0);
    std::thread::scope(|s| {
        s.spawn(move || {
            let (mut c, _) = fake.accept().unwrap();
            c.write_all(&wire::challenge(&[1; NONCE_LEN])).unwrap();
            let mut hello = [0u8; wire::HELLO_LEN];
            c.read_exact(&mut hello).unwrap();
            // "Accepted", with a tag it cannot compute.
            let mut verdict = [0u8; VERDICT_LEN];
            verdict[0] = 1;
            c.write_all(&verdict).unwrap();
        });
        let t = Duration::from_secs(10);
        let err = TcpCollective::connect_within(1, &l1, &addrs, 3, b"secret", t, t).err().expect("a fake rank 0 was trusted");
        assert!(matches!(&err, CommError::Refused { peer: 0, reason } if reason.contains("does not prove")), "{err}");
    });
}

#[test]
fn the_right_key_connects_worlds_of_two_to_four() {
    for n in 2..=4 {
        let (ls, addrs) = listeners(n);
        let keys = vec![&b"a cluster token"[..]; n];
        let world = connect_world(&keys, 40 + n as u64, ls, &addrs, Duration::from_secs(30));
        check_world(world.into_iter().map(|(c, _)| c.unwrap()).collect());
    }
}

/// Rank 0 of a world of two whose rank 1 is this test, speaking raw bytes after a proper
/// hello: `f` gets the collective and the raw connection.
fn with_raw_rank_one<T>(io_timeout: Duration, f: impl FnOnce(&TcpCollective, &mut TcpStream) -> T) -> T {
    let (mut ls, addrs) = listeners(2);
    let l0 = ls.remove(0);
    std::thread::scope(|s| {
        let raw = s.spawn(|| {
            let (s, verdict) = fake_connector(addrs[0], b"k", 9, 1, 0);
            assert_eq!(verdict[0], 1, "the proper hello was refused");
            s
        });
        let c = TcpCollective::connect_within(0, &l0, &addrs, 9, b"k", Duration::from_secs(20), io_timeout).unwrap();
        let mut raw = raw.join().unwrap();
        f(&c, &mut raw)
    })
}

#[test]
fn huge_or_lying_frame_headers_and_random_bytes_are_errors_that_allocate_nothing_like_them() {
    let t = Duration::from_millis(500);
    for header in [u64::MAX, 1 << 40, (1 << 32) + 4, 6] {
        let err = with_raw_rank_one(t, |c, raw| {
            raw.write_all(&header.to_le_bytes()).unwrap();
            c.recv(&mut [0.0; 4], 1).unwrap_err()
        });
        assert!(matches!(&err, CommError::Io { peer: 1, message } if message.contains("corrupt frame length")), "header {header}: {err}");
    }
    // A well-formed header for 4 GiB where 4 values are expected: a mismatch naming both.
    let err = with_raw_rank_one(t, |c, raw| {
        raw.write_all(&(1u64 << 32).to_le_bytes()).unwrap();
        c.recv(&mut [0.0; 4], 1).unwrap_err()
    });
    assert!(matches!(err, CommError::LengthMismatch { op: "recv", local: 4, peer: 1, remote } if remote == 1 << 30), "{err}");
    // An all-gather cannot know its peer's length: 4 GiB announced, 3 MiB sent, then silence.
    let err = with_raw_rank_one(t, |c, raw| {
        raw.write_all(&(1u64 << 32).to_le_bytes()).unwrap();
        raw.write_all(&vec![0u8; 3 * MIB]).unwrap();
        c.all_gather(&[1.0]).unwrap_err()
    });
    assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
    // Random bytes where an all-reduce's frame should be (a fixed xorshift stream).
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let noise: Vec<u8> = (0..4096)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let res = with_raw_rank_one(t, |c, raw| {
        raw.write_all(&noise).unwrap();
        c.all_reduce_sum(&mut [1.0; 8])
    });
    assert!(res.is_err(), "random bytes passed for an all-reduce frame");
    let largest = LARGEST.load(Ordering::Relaxed);
    assert!(largest < 64 * MIB, "a single allocation of {} MiB", largest / MIB);
}
