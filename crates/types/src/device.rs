//! Where a worker computes: `--device cpu|cuda[:N]`, and which collective a group of ranks
//! talks through given their devices.

use std::fmt;
use std::str::FromStr;

/// A worker's compute device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Device {
    /// The host CPU (the default).
    #[default]
    Cpu,
    /// CUDA device `N` (ordinal among the GPUs the process sees).
    Cuda(u32),
}

impl fmt::Display for Device {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Device::Cpu => f.write_str("cpu"),
            Device::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

impl FromStr for Device {
    type Err = String;

    /// `cpu`, `cuda` (device 0) or `cuda:N`.
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("device {s:?}: expected cpu, cuda or cuda:N (N a GPU ordinal such as 0)");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Device::Cpu),
            "cuda" => Ok(Device::Cuda(0)),
            d => d.strip_prefix("cuda:").and_then(|n| n.parse().ok()).map(Device::Cuda).ok_or_else(bad),
        }
    }
}

/// How a group of ranks (a stage's tensor-parallel ranks, or one rank of every stage)
/// exchanges activations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CollectiveKind {
    /// TCP between the hosts' memories (CPU ranks, or GPU ranks through device↔host copies).
    Tcp,
    /// NCCL between GPUs' memories.
    Nccl,
}

impl fmt::Display for CollectiveKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CollectiveKind::Tcp => "tcp",
            CollectiveKind::Nccl => "nccl",
        })
    }
}

/// What the user asked for with `--collective`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CollectiveChoice {
    /// NCCL where every rank is on a GPU of its own, TCP otherwise.
    #[default]
    Auto,
    /// TCP everywhere.
    Tcp,
    /// NCCL everywhere (refused unless every rank is on a GPU of its own).
    Nccl,
}

impl FromStr for CollectiveChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "tcp" => Ok(Self::Tcp),
            "nccl" => Ok(Self::Nccl),
            _ => Err(format!("collective {s:?}: expected auto, tcp or nccl")),
        }
    }
}

/// One rank's device as the coordinator sees it: the kind, and for a GPU an identity that
/// two processes on the same GPU share (its UUID), since NCCL refuses two ranks on one GPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankDevice {
    /// `--device` of the worker.
    pub device: Device,
    /// The GPU's UUID (empty for the CPU), as the worker reported it.
    pub gpu_id: String,
    /// Whether the worker's binary can make NCCL communicators.
    pub nccl: bool,
}

/// The collective the whole cluster uses, from every rank's device (world-rank order) and
/// the user's choice, or why none works with what would.
///
/// All ranks must be on the same kind of device: a plan that mixes CPU and GPU ranks is
/// refused (a GPU rank would wait on a CPU one every layer). NCCL needs every rank on a GPU
/// of its own and a binary with NCCL; ranks sharing a GPU talk over TCP through host copies.
pub fn choose_collective(ranks: &[RankDevice], choice: CollectiveChoice) -> Result<CollectiveKind, String> {
    let gpus = ranks.iter().filter(|r| r.device != Device::Cpu).count();
    if gpus != 0 && gpus != ranks.len() {
        let list = ranks.iter().enumerate().map(|(i, r)| format!("rank {i}: {}", r.device)).collect::<Vec<_>>().join(", ");
        return Err(format!("the workers mix CPU and GPU devices ({list}); start every worker with --device cpu, or every one with --device cuda[:N]"));
    }
    let mut ids: Vec<&str> = ranks.iter().map(|r| r.gpu_id.as_str()).collect();
    ids.sort_unstable();
    let shared_gpu = gpus > 0 && ids.windows(2).any(|w| w[0] == w[1]);
    let why_not_nccl = if gpus == 0 {
        Some("the workers run on the CPU".to_string())
    } else if shared_gpu {
        Some("two ranks share a GPU (NCCL needs one GPU per rank)".to_string())
    } else {
        ranks.iter().position(|r| !r.nccl).map(|i| format!("rank {i}'s binary was built without NCCL"))
    };
    match (choice, why_not_nccl) {
        (CollectiveChoice::Tcp, _) => Ok(CollectiveKind::Tcp),
        (CollectiveChoice::Auto, None) | (CollectiveChoice::Nccl, None) => Ok(CollectiveKind::Nccl),
        (CollectiveChoice::Auto, Some(_)) => Ok(CollectiveKind::Tcp),
        (CollectiveChoice::Nccl, Some(why)) => Err(format!("--collective nccl is impossible: {why}; use --collective tcp (or auto)")),
    }
}

/// Bytes of an NCCL unique id (`ncclUniqueId`), as the control plane carries it. The same as
/// `tpserve_comm::NCCL_ID_BYTES` (the worker, which sees both crates, checks it when it builds).
pub const NCCL_ID_BYTES: usize = 128;

/// How many NCCL communicators a load of tp × pp ranks makes: one per stage's
/// tensor-parallel group, and one per pipeline group (a tensor-parallel rank of every stage)
/// when pp > 1. Rank 0's worker makes that many ids; [`nccl_ids_of`] says which are whose.
pub fn nccl_communicators(tp: usize, pp: usize) -> usize {
    pp + if pp > 1 { tp } else { 0 }
}

/// Which of the [`nccl_communicators`] ids world rank `rank` (stage `rank / tp`,
/// tensor-parallel rank `rank % tp`) joins: its tensor-parallel group's, and its pipeline
/// group's when pp > 1. Every member of a group gets the same id, and no two groups share one.
pub fn nccl_ids_of(tp: usize, pp: usize, rank: usize) -> (usize, Option<usize>) {
    let (stage, tp_rank) = (rank / tp, rank % tp);
    (stage, (pp > 1).then_some(pp + tp_rank))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpu() -> RankDevice {
        RankDevice { device: Device::Cpu, gpu_id: String::new(), nccl: false }
    }
    fn gpu(id: &str) -> RankDevice {
        RankDevice { device: Device::Cuda(0), gpu_id: id.into(), nccl: true }
    }

    #[test]
    fn every_group_shares_one_nccl_id_and_no_two_groups_do() {
        for (tp, pp) in [(1, 1), (2, 1), (1, 3), (2, 2), (4, 3)] {
            let n = nccl_communicators(tp, pp);
            let mut members: Vec<Vec<usize>> = vec![Vec::new(); n];
            for rank in 0..tp * pp {
                let (t, p) = nccl_ids_of(tp, pp, rank);
                members[t].push(rank);
                if let Some(p) = p {
                    members[p].push(rank);
                }
                assert_eq!(p.is_some(), pp > 1);
            }
            // Ids 0..pp: the stages' tensor-parallel groups; then the pipeline groups.
            for (id, m) in members.iter().enumerate() {
                let want: Vec<usize> = if id < pp { (id * tp..(id + 1) * tp).collect() } else { (0..pp).map(|s| s * tp + id - pp).collect() };
                assert_eq!(m, &want, "tp {tp} pp {pp} id {id}");
            }
        }
    }

    #[test]
    fn devices_parse_and_print_as_the_flag_spells_them() {
        assert_eq!("cpu".parse::<Device>(), Ok(Device::Cpu));
        assert_eq!("cuda".parse::<Device>(), Ok(Device::Cuda(0)));
        assert_eq!("CUDA:3".parse::<Device>(), Ok(Device::Cuda(3)));
        assert_eq!(Device::Cuda(3).to_string(), "cuda:3");
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let e = bad.parse::<Device>().unwrap_err();
            assert!(e.contains(&format!("{bad:?}")) && e.contains("cuda:N"), "{e}");
        }
    }

    #[test]
    fn nccl_only_between_gpus_of_their_own_and_mixed_devices_are_refused() {
        use CollectiveChoice::*;
        assert_eq!(choose_collective(&[cpu(), cpu()], Auto), Ok(CollectiveKind::Tcp));
        assert_eq!(choose_collective(&[gpu("a"), gpu("b")], Auto), Ok(CollectiveKind::Nccl));
        assert_eq!(choose_collective(&[gpu("a")], Nccl), Ok(CollectiveKind::Nccl));
        assert_eq!(choose_collective(&[gpu("a"), gpu("b")], Tcp), Ok(CollectiveKind::Tcp));
        // Two processes on one GPU: TCP through the host, or a clear refusal of NCCL.
        assert_eq!(choose_collective(&[gpu("a"), gpu("a")], Auto), Ok(CollectiveKind::Tcp));
        let e = choose_collective(&[gpu("a"), gpu("a")], Nccl).unwrap_err();
        assert!(e.contains("share a GPU") && e.contains("--collective tcp"), "{e}");
        let e = choose_collective(&[cpu(), cpu()], Nccl).unwrap_err();
        assert!(e.contains("CPU"), "{e}");
        let e = choose_collective(&[gpu("a"), RankDevice { nccl: false, ..gpu("b") }], Nccl).unwrap_err();
        assert!(e.contains("rank 1") && e.contains("without NCCL"), "{e}");
        let e = choose_collective(&[gpu("a"), cpu()], Auto).unwrap_err();
        assert!(e.contains("rank 0: cuda:0, rank 1: cpu") && e.contains("--device cpu"), "{e}");
    }
}
