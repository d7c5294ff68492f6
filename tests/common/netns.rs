//! Separate hosts as far as the network is concerned: one network namespace per process,
//! each with its own veth pair on a bridge and its own address in the RFC 2544 benchmarking
//! range (198.18.0.0/15), and a delaying TCP relay to put in front of a host's ports (the
//! kernel here has no `netem` qdisc). Needs root and `ip` (iproute2); [`Net::new`] says so.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Prefix of every namespace and interface these tests make (so stale ones can be found).
const PREFIX: &str = "tpsn";

/// A bridge with namespaces hanging off it; everything is deleted on drop, also when the
/// test panics.
pub struct Net {
    id: String,
    /// The third octet of this net's /24 in 198.18.0.0/16.
    subnet: u8,
    hosts: Vec<String>,
}

/// Runs `ip args`, failing with its stderr.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("ip {args:?}: {e}"));
    assert!(out.status.success(), "ip {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
}

/// Whether namespaces can be made here (root, iproute2), and why not.
pub fn unavailable() -> Option<String> {
    let euid = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:")?.split_whitespace().nth(1)?.parse::<u32>().ok()));
    if euid != Some(0) {
        return Some("network namespaces need root".into());
    }
    match Command::new("ip").args(["netns", "list"]).output() {
        Ok(o) if o.status.success() => None,
        Ok(o) => Some(format!("`ip netns list` failed: {}", String::from_utf8_lossy(&o.stderr))),
        Err(e) => Some(format!("no `ip` command (iproute2): {e}")),
    }
}

/// Whether a test that needs namespaces should run: it panics (fails) where they are
/// unavailable and `TPSERVE_REQUIRE_NETNS` is set (as CI does), else it says why it skips.
pub fn should_run(test: &str) -> bool {
    match unavailable() {
        None => true,
        Some(why) if std::env::var_os("TPSERVE_REQUIRE_NETNS").is_some() => panic!("{test}: {why} (TPSERVE_REQUIRE_NETNS is set)"),
        Some(why) => {
            eprintln!("skipping {test}: {why}");
            false
        }
    }
}

impl Net {
    /// A bridge `tpsn<id>` with address 198.18.S.1/24 in this (the test's) namespace, so the
    /// test reaches every host as a client on the same link would.
    pub fn new() -> Net {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        // Short enough for interface names (15 bytes): "tpsn" + pid in hex + "x" + seq + "o12".
        let id = format!("{pid:x}x{seq}");
        // Distinct /24s for the nets of one process, and likely distinct between processes.
        let subnet = ((pid as u64 * 7 + seq as u64 * 31) % 250 + 2) as u8;
        let net = Net { id, subnet, hosts: Vec::new() };
        let br = net.bridge();
        ip(&["link", "add", &br, "type", "bridge"]);
        ip(&["addr", "add", &format!("{}/24", net.addr(1)), "dev", &br]);
        ip(&["link", "set", &br, "up"]);
        net
    }

    fn bridge(&self) -> String {
        format!("{PREFIX}{}", self.id)
    }

    /// 198.18.S.`host`.
    pub fn addr(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, self.subnet, host)
    }

    /// A new namespace (a host) at 198.18.S.`host`, its loopback up, linked to the bridge by
    /// a veth pair. Returns its name.
    pub fn host(&mut self, host: u8) -> String {
        let ns = format!("{PREFIX}{}-{host}", self.id);
        let (outside, inside) = (format!("{PREFIX}{}o{host}", self.id), format!("{PREFIX}{}i{host}", self.id));
        ip(&["netns", "add", &ns]);
        self.hosts.push(ns.clone());
        ip(&["link", "add", &outside, "type", "veth", "peer", "name", &inside]);
        ip(&["link", "set", &inside, "netns", &ns]);
        ip(&["link", "set", &outside, "master", &self.bridge()]);
        ip(&["link", "set", &outside, "up"]);
        ip(&["-n", &ns, "addr", "add", &format!("{}/24", self.addr(host)), "dev", &inside]);
        ip(&["-n", &ns, "link", "set", &inside, "up"]);
        ip(&["-n", &ns, "link", "set", "lo", "up"]);
        ns
    }

    /// One more address of the test's own namespace (on the bridge), for a relay to listen on.
    pub fn local_addr(&self, host: u8) -> Ipv4Addr {
        ip(&["addr", "add", &format!("{}/24", self.addr(host)), "dev", &self.bridge()]);
        self.addr(host)
    }
}

/// `cmd` (a program and its arguments) run inside namespace `ns`: `ip netns exec` execs it,
/// so the child's pid is the program's.
pub fn in_ns(ns: &str, cmd: Command) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(cmd.get_program()).args(cmd.get_args());
    for (k, v) in cmd.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    c
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in &self.hosts {
            // Deleting a namespace deletes the veth end inside it, and so the pair.
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
        }
        let _ = Command::new("ip").args(["link", "del", &self.bridge()]).stderr(Stdio::null()).status();
    }
}

/// Deletes namespaces and bridges left by earlier test processes that no longer run (a
/// SIGKILLed test cannot clean up after itself).
fn remove_stale() {
    let alive = |id: &str| id.split_once('x').and_then(|(p, _)| u32::from_str_radix(p, 16).ok()).is_some_and(|p| Path::new(&format!("/proc/{p}")).exists());
    let list = Command::new("ip").args(["netns", "list"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for ns in list.lines().filter_map(|l| l.split_whitespace().next()).filter_map(|n| n.strip_prefix(PREFIX)) {
        if !alive(ns.split('-').next().unwrap_or("")) {
            let _ = Command::new("ip").args(["netns", "del", &format!("{PREFIX}{ns}")]).status();
        }
    }
    let links =
        Command::new("ip").args(["-o", "link", "show", "type", "bridge"]).output().map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
    for l in links.lines() {
        let Some(name) = l.split(':').nth(1).map(str::trim) else { continue };
        if let Some(id) = name.strip_prefix(PREFIX) {
            if !alive(id) {
                let _ = Command::new("ip").args(["link", "del", name]).status();
            }
        }
    }
}

/// How a [`Relay`] shapes the link: every byte arrives `delay` after it was sent (in each
/// direction), and no faster than `bytes_per_s` (0: unlimited).
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub delay: Duration,
    pub bytes_per_s: u64,
}

/// A TCP relay: connections to `listen` are forwarded to `target`, each direction through
/// a queue that releases a chunk `delay` after it was read (and after the previous chunk
/// has been paced out at the link's rate). Stops accepting when dropped.
pub struct Relay {
    stop: Arc<AtomicBool>,
    pub addr: SocketAddr,
}

impl Relay {
    pub fn start(listen: SocketAddr, target: SocketAddr, link: Link) -> Relay {
        Relay::start_shared(listen, target, Arc::new(Mutex::new(link)))
    }

    /// A relay whose shaping follows `link` as it changes (read for every chunk).
    pub fn start_shared(listen: SocketAddr, target: SocketAddr, link: Arc<Mutex<Link>>) -> Relay {
        let listener = TcpListener::bind(listen).unwrap_or_else(|e| panic!("relay on {listen}: {e}"));
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        std::thread::spawn(move || {
            while !stopped.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((down, _)) => {
                        let Ok(up) = TcpStream::connect_timeout(&target, Duration::from_secs(5)) else {
                            let _ = down.shutdown(Shutdown::Both);
                            continue;
                        };
                        down.set_nonblocking(false).unwrap();
                        for s in [&down, &up] {
                            s.set_nodelay(true).unwrap();
                        }
                        pump(down.try_clone().unwrap(), up.try_clone().unwrap(), link.clone(), stopped.clone());
                        pump(up, down, link.clone(), stopped.clone());
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::thread::sleep(Duration::from_millis(5)),
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Relay { stop, addr }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Moves bytes from `from` to `to` through a delay line: a reader thread stamps each chunk
/// with the time it may leave, a writer thread sleeps until then and writes it.
fn pump(mut from: TcpStream, mut to: TcpStream, link: Arc<Mutex<Link>>, stop: Arc<AtomicBool>) {
    let (tx, rx) = channel::<(Instant, Vec<u8>)>();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut free_at = Instant::now();
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let link = *link.lock().unwrap();
                    let now = Instant::now();
                    // Pacing: the link is busy with earlier bytes until `free_at`.
                    let wire = if link.bytes_per_s == 0 { Duration::ZERO } else { Duration::from_secs_f64(n as f64 / link.bytes_per_s as f64) };
                    free_at = free_at.max(now) + wire;
                    if tx.send((free_at + link.delay, buf[..n].to_vec())).is_err() {
                        break;
                    }
                }
            }
        }
        // Dropping tx ends the writer once it has delivered what was read.
    });
    std::thread::spawn(move || {
        loop {
            match rx.recv_timeout(Duration::from_millis(200)) {
                Ok((due, bytes)) => {
                    let now = Instant::now();
                    if due > now {
                        std::thread::sleep(due - now);
                    }
                    if to.write_all(&bytes).is_err() {
                        break;
                    }
                }
                Err(RecvTimeoutError::Timeout) if !stop.load(Ordering::Relaxed) => {}
                Err(_) => break,
            }
        }
        let _ = to.shutdown(Shutdown::Write);
    });
}
