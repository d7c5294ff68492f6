//! The NCCL rendezvous through the control plane, on the CPU: workers that report GPUs of
//! their own get a load whose collective is NCCL, rank 0 is asked for exactly one id per
//! communicator, and every rank's Load carries the id of each of its groups (the stage's
//! tensor-parallel ranks; one tensor-parallel rank of every stage). Workers that share a GPU,
//! or mix CPU and GPU, get TCP or a refusal. The workers are gRPC servers of the test that
//! answer Info, NcclIds and Load as a GPU worker would (they compute nothing: the
//! collective's choice and the ids are all the coordinator decides).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use tpserve_coordinator::{cluster, Cluster, ClusterError, ClusterSpec, Timeouts};
use tpserve_proto::{v1, Worker, WorkerServer};
use tpserve_types::device::CollectiveChoice;
use tpserve_types::kv::KvSizing;
use tpserve_types::plan::Plan;

/// What a test worker was asked.
#[derive(Default)]
struct Seen {
    loads: Vec<v1::LoadRequest>,
    nccl_id_requests: Vec<u32>,
}

struct GpuWorker {
    device: String,
    gpu_id: String,
    plan: Plan,
    seen: Arc<Mutex<Seen>>,
}

#[tonic::async_trait]
impl Worker for GpuWorker {
    async fn info(&self, _: Request<v1::InfoRequest>) -> Result<Response<v1::InfoResponse>, Status> {
        Ok(Response::new(v1::InfoResponse {
            version: env!("CARGO_PKG_VERSION").into(),
            threads: 1,
            comm_port: 1,
            comm_addr: "127.0.0.1:1".into(),
            shard: None,
            peak_rss_bytes: 0,
            device: self.device.clone(),
            gpu_id: self.gpu_id.clone(),
            nccl: true,
        }))
    }

    type LoadStream = ReceiverStream<Result<v1::LoadProgress, Status>>;

    async fn load(&self, req: Request<v1::LoadRequest>) -> Result<Response<Self::LoadStream>, Status> {
        let req = req.into_inner();
        let shard = self.plan.shard(req.rank as usize);
        self.seen.lock().unwrap().loads.push(req.clone());
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let done = v1::LoadProgress {
            phase: "ready".into(),
            done: true,
            shard: Some(v1::Shard::from(&shard)),
            device: format!("{} (test)", self.device),
            collective: req.collective,
            ..Default::default()
        };
        tx.send(Ok(done)).await.unwrap();
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn nccl_ids(&self, req: Request<v1::NcclIdsRequest>) -> Result<Response<v1::NcclIdsResponse>, Status> {
        let count = req.into_inner().count;
        self.seen.lock().unwrap().nccl_id_requests.push(count);
        // Distinct 128-byte ids: byte 0 numbers them.
        Ok(Response::new(v1::NcclIdsResponse { ids: (0..count).map(|i| [vec![i as u8 + 1], vec![7; 127]].concat()).collect() }))
    }

    async fn step(&self, _: Request<v1::StepRequest>) -> Result<Response<v1::StepResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn health(&self, _: Request<v1::HealthRequest>) -> Result<Response<v1::HealthResponse>, Status> {
        Ok(Response::new(v1::HealthResponse { ready: true, reason: String::new() }))
    }

    async fn shutdown(&self, _: Request<v1::ShutdownRequest>) -> Result<Response<v1::ShutdownResponse>, Status> {
        Ok(Response::new(v1::ShutdownResponse {}))
    }
}

/// A plan of the tiny shardable Gemma at tp × pp.
fn plan(tp: usize, pp: usize) -> (Plan, tpserve_model::config::ModelConfig) {
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), tpserve_model::testing::tiny_gguf(&tpserve_model::testing::TinySpec::gemma3_shardable())).unwrap();
    let g = tpserve_gguf::Gguf::open(f.path()).unwrap();
    let cfg = tpserve_model::config::ModelConfig::from_gguf(&g).unwrap();
    (Plan::new(tpserve_model::model::model_shape(&g).unwrap(), tp, pp).unwrap(), cfg)
}

/// Starts one worker per `(device, gpu_id)` and loads a tp × pp plan onto them.
async fn load(tp: usize, pp: usize, devices: &[(&str, &str)], choice: CollectiveChoice) -> (Result<Cluster, ClusterError>, Vec<Arc<Mutex<Seen>>>) {
    let (plan, cfg) = plan(tp, pp);
    let mut addrs = Vec::new();
    let mut seen = Vec::new();
    for (device, gpu_id) in devices {
        let s = Arc::new(Mutex::new(Seen::default()));
        let w = GpuWorker { device: device.to_string(), gpu_id: gpu_id.to_string(), plan: plan.clone(), seen: s.clone() };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        tokio::spawn(
            tonic::transport::Server::builder().add_service(WorkerServer::new(w)).serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        seen.push(s);
    }
    let timeouts = Timeouts { connect: Duration::from_secs(5), ..Timeouts::default() };
    let workers = cluster::connect_all(&addrs, timeouts.connect, None, None).await.unwrap();
    let kv = cfg.kv_layout(KvSizing { block_size: 16, tokens: 64, max_seqs: 4, max_chunk: 16 });
    let spec =
        ClusterSpec { plan, context_len: cfg.context_len, kv, model_path: String::new(), model_bytes: 0, timeouts, token: None, tls: None, collective: choice };
    (Cluster::load(workers, spec, |_, _| {}).await, seen)
}

#[tokio::test]
async fn ranks_with_gpus_of_their_own_get_nccl_and_each_group_one_id_made_by_rank_0() {
    let gpus = [("cuda:0", "a"), ("cuda:1", "b"), ("cuda:0", "c"), ("cuda:1", "d")];
    let (cluster, seen) = load(2, 2, &gpus, CollectiveChoice::Auto).await;
    let cluster = cluster.expect("the load succeeds");
    assert!(cluster.loaded.iter().all(|l| l.collective == "nccl"), "{:?}", cluster.loaded.iter().map(|l| &l.collective).collect::<Vec<_>>());
    // Rank 0 alone makes the ids: 2 tensor-parallel groups + 2 pipeline groups.
    let asked: Vec<Vec<u32>> = seen.iter().map(|s| s.lock().unwrap().nccl_id_requests.clone()).collect();
    assert_eq!(asked, vec![vec![4], vec![], vec![], vec![]]);
    let loads: Vec<v1::LoadRequest> = seen.iter().map(|s| s.lock().unwrap().loads[0].clone()).collect();
    for (rank, l) in loads.iter().enumerate() {
        assert_eq!((l.rank as usize, l.collective.as_str()), (rank, "nccl"));
        assert_eq!((l.nccl_tp_id.len(), l.nccl_pp_id.len()), (128, 128));
    }
    let tp_id = |r: usize| loads[r].nccl_tp_id[0];
    let pp_id = |r: usize| loads[r].nccl_pp_id[0];
    // Stage 0 is ranks 0, 1; stage 1 ranks 2, 3; tp rank 0 is ranks 0, 2; tp rank 1 ranks 1, 3.
    assert!(tp_id(0) == tp_id(1) && tp_id(2) == tp_id(3) && tp_id(0) != tp_id(2));
    assert!(pp_id(0) == pp_id(2) && pp_id(1) == pp_id(3) && pp_id(0) != pp_id(1));
    let all: std::collections::HashSet<u8> = (0..4).flat_map(|r| [tp_id(r), pp_id(r)]).collect();
    assert_eq!(all.len(), 4, "no two groups share an id");
}

#[tokio::test]
async fn ranks_sharing_a_gpu_talk_tcp_and_mixed_devices_or_impossible_nccl_are_refused() {
    let (cluster, seen) = load(2, 1, &[("cuda:0", "same"), ("cuda:0", "same")], CollectiveChoice::Auto).await;
    let cluster = cluster.expect("the load succeeds");
    assert!(cluster.loaded.iter().all(|l| l.collective == "tcp"));
    assert!(seen.iter().all(|s| s.lock().unwrap().nccl_id_requests.is_empty()), "no NCCL ids for a TCP load");
    assert!(seen.iter().all(|s| s.lock().unwrap().loads[0].nccl_tp_id.is_empty()));

    let (cluster, seen) = load(2, 1, &[("cuda:0", "same"), ("cuda:0", "same")], CollectiveChoice::Nccl).await;
    let e = cluster.err().expect("refused").to_string();
    assert!(e.contains("share a GPU") && e.contains("--collective tcp"), "{e}");
    assert!(seen.iter().all(|s| s.lock().unwrap().loads.is_empty()), "nothing is loaded");

    let (cluster, seen) = load(2, 1, &[("cuda:0", "a"), ("cpu", "")], CollectiveChoice::Auto).await;
    let e = cluster.err().expect("refused").to_string();
    assert!(e.contains("mix CPU and GPU") && e.contains("rank 1: cpu"), "{e}");
    assert!(seen.iter().all(|s| s.lock().unwrap().loads.is_empty()), "nothing is loaded");
}
