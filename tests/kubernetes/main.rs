//! Kubernetes, simulated with the real binary: `kubectl kustomize` renders the manifests in
//! deploy/kubernetes, and each pod of a LeaderWorkerSet group (or of the StatefulSet
//! variant) runs here with exactly the command, arguments and environment its template
//! gives: the LWS_* variables the controller adds, the pod IP from the downward API, the
//! ConfigMap's settings, the cluster token from a Secret volume, the init container that
//! fetches the model. The pods form a cluster and serve the text `tpserve generate` gives.
//! What the simulation changes to fit on one machine (loopback pod IPs, mapped ports,
//! folders for volumes) is in `sim.rs`'s header. The default model stands in for the
//! download: the cache volume starts with a hard link to it, so the init container's
//! `tpserve model fetch` runs for real and finds it verified. Offline validation of the same
//! renders is deploy/kubernetes/check.sh.

#[path = "../common/mod.rs"]
mod common;
mod sim;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::json;
use serde_yaml::Value as Yaml;
use tempfile::TempDir;

use common::*;
use sim::{object, render, str_of, Cluster};

/// The Secret the user creates (deploy/kubernetes/README.md); a fresh token per test.
const TOKEN_SECRET: &str = "tpserve-cluster-token";

fn deploy(dir: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/kubernetes").join(dir)
}

fn token() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    format!("{:032x}", nanos ^ (u128::from(std::process::id()) << 64))
}

/// A cluster for `docs` with the token Secret created.
fn cluster(docs: &[Yaml], dir: &TempDir) -> Cluster {
    let mut c = Cluster::new(docs, dir.path());
    c.secrets.insert(TOKEN_SECRET.into(), [("token".to_string(), token())].into());
    c
}

/// What the cache volume starts with: the default model and its verified marker, at
/// `models/` under the volume that the init container mounts at $TPSERVE_HOME.
fn seed<'a>(docs: &[Yaml], template: &Yaml, model: &'a Path, marker: &'a Path) -> Vec<(String, &'static str, &'a Path)> {
    let init = &template["spec"]["initContainers"][0];
    let cm = str_of(&init["envFrom"][0]["configMapRef"]["name"]);
    let home = str_of(&object(docs, "ConfigMap", Some(&cm))["data"]["TPSERVE_HOME"]);
    let volume = init["volumeMounts"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|m| str_of(&m["mountPath"]) == home)
        .map(|m| str_of(&m["name"]))
        .unwrap_or_else(|| panic!("the init container mounts nothing at TPSERVE_HOME {home}"));
    vec![(volume.clone(), "models/gemma-3-270m-q4_k_m.gguf", model), (volume, "models/gemma-3-270m-q4_k_m.gguf.sha256", marker)]
}

fn add(c: &mut Cluster, name: &str, template: &Yaml, env: Vec<(String, String)>, seed: &[(String, &str, &Path)]) -> usize {
    let seed: Vec<(&str, &str, &Path)> = seed.iter().map(|(v, r, p)| (v.as_str(), *r, *p)).collect();
    c.add_pod(name, template, env, &seed)
}

/// The default model and its marker, or None when TPSERVE_SKIP_MODEL=1.
fn model() -> Option<(PathBuf, PathBuf)> {
    let m = default_model()?;
    let marker = m.with_extension("gguf.sha256");
    assert!(marker.is_file(), "the fetched default model has no marker {}", marker.display());
    Some((m, marker))
}

/// `tpserve generate`'s greedy text for `prompt`, in this process (tp 1).
fn generate(model: &Path, prompt: &str, n: usize) -> String {
    let mut c = bin();
    c.args(["generate", "--json", "--temperature", "0", "--max-tokens", &n.to_string(), "--prompt", prompt, "--model"]).arg(model);
    let out = run_to_end(c, None, false);
    out.assert_success();
    serde_json::from_str::<serde_json::Value>(&out.stdout).unwrap()["text"].as_str().unwrap().to_string()
}

/// The pods are up and Ready (startup probes within their window, then readiness), the
/// workers joined with the addresses their pods advertise, and the coordinator's Service
/// port serves greedy text equal to `generate`'s, with /metrics where the ServiceMonitor
/// scrapes.
fn check_serving(docs: &[Yaml], c: &Cluster, coordinator: usize, coord: &mut Proc, model: &Path) {
    for pod in 0..c.pods.len() {
        let w = c.startup_window(pod);
        assert!(c.wait_probes(pod, "startupProbe", w), "pod {}: startup probes did not pass within {w:?}\n{}", c.pods[pod].name, coord.log());
    }
    for pod in 0..c.pods.len() {
        assert!(c.wait_probes(pod, "readinessProbe", DEADLINE), "pod {} not Ready within {DEADLINE:?}; coordinator:\n{}", c.pods[pod].name, coord.log());
    }
    // Each worker container registered with its own pod's IP and (mapped) gRPC port.
    let joined: BTreeSet<String> =
        coord.log().lines().filter_map(|l| l.split_once(" joined: ").filter(|(w, _)| w.starts_with("worker ")).map(|(_, a)| a.trim().to_string())).collect();
    let advertised: BTreeSet<String> = c.pods.iter().filter(|p| p.ports.contains_key(&50051)).map(|p| format!("{}:{}", p.ip, p.ports[&50051])).collect();
    assert_eq!(joined, advertised, "the ranks that joined are not the pods' advertised addresses\n{}", coord.log());

    let service = object(docs, "Service", Some("tpserve-api"));
    let port = str_of(&service["spec"]["ports"][0]["targetPort"]);
    let http = Http { url: c.url(coordinator, &port), agent: ureq::AgentBuilder::new().timeout(DEADLINE).build() };
    let prompt = &shared_prompts(1)[0];
    let want = generate(model, prompt, 16);
    let got = http.text(&json!({"prompt": prompt, "max_tokens": 16, "temperature": 0}));
    assert_eq!(got, want, "the cluster's greedy text differs from tpserve generate's");

    let endpoint = &object(docs, "ServiceMonitor", None)["spec"]["endpoints"][0];
    let metrics = Http { url: c.url(coordinator, &str_of(&endpoint["port"])), agent: http.agent.clone() };
    let (code, body) = metrics.get(&str_of(&endpoint["path"]));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("tpserve_requests") || body.contains("tpserve_"), "no tpserve metrics at the ServiceMonitor's path:\n{body}");
}

/// Group 0 of the rendered LeaderWorkerSet: the leader pod and size - 1 worker pods, with
/// the variables the LWS controller gives each (its DNS name for the leader resolves here).
fn lws_group(docs: &[Yaml], c: &mut Cluster, model: &Path, marker: &Path, pods: usize) -> Vec<usize> {
    let lws = object(docs, "LeaderWorkerSet", None);
    let name = str_of(&lws["metadata"]["name"]);
    let lwt = &lws["spec"]["leaderWorkerTemplate"];
    let size = lwt["size"].as_u64().expect("size is a number") as usize;
    let leader_address = format!("{name}-0.{name}.{}", c.namespace);
    let env = |index: usize| {
        vec![
            ("LWS_LEADER_ADDRESS".to_string(), leader_address.clone()),
            ("LWS_GROUP_SIZE".into(), size.to_string()),
            ("LWS_WORKER_INDEX".into(), index.to_string()),
        ]
    };
    let mut out = Vec::new();
    for index in 0..size.min(pods) {
        let (pod_name, template) =
            if index == 0 { (format!("{name}-0"), &lwt["leaderTemplate"]) } else { (format!("{name}-0-{index}"), &lwt["workerTemplate"]) };
        let s = seed(docs, template, model, marker);
        out.push(add(c, &pod_name, template, env(index), &s));
    }
    c.hosts.insert(leader_address, out[0]);
    out
}

fn container(procs: &mut Vec<(String, Proc)>, name: &str) -> Proc {
    let i = procs.iter().position(|(n, _)| n == name).unwrap_or_else(|| panic!("no container {name}"));
    procs.remove(i).1
}

#[test]
fn the_rendered_leaderworkerset_forms_a_cluster_and_serves_the_text_generate_gives() {
    let Some((m, marker)) = model() else { return };
    let docs = render(&deploy("overlays/cpu"));
    let lws = object(&docs, "LeaderWorkerSet", None);
    assert_eq!(lws["spec"]["leaderWorkerTemplate"]["restartPolicy"].as_str(), Some("RecreateGroupOnPodRestart"));
    let dir = TempDir::new().unwrap();
    let mut c = cluster(&docs, &dir);
    let pods = lws_group(&docs, &mut c, &m, &marker, usize::MAX);
    assert!(pods.len() >= 2, "the group has one pod: nothing is distributed");

    // startupPolicy as the LWS controller applies it: LeaderReady creates the worker pods
    // only once the leader pod is Ready.
    let mut leader = c.start(pods[0]);
    let mut coord = container(&mut leader, "coordinator");
    if lws["spec"]["startupPolicy"].as_str() == Some("LeaderReady") {
        assert!(
            c.wait_probes(pods[0], "readinessProbe", Duration::from_secs(30)),
            "startupPolicy LeaderReady: the leader pod is not Ready without its workers, so they would never be created\n{}",
            coord.log()
        );
    }
    let _workers: Vec<_> = pods[1..].iter().map(|&p| c.start(p)).collect();
    check_serving(&docs, &c, pods[0], &mut coord, &m);
}

#[test]
fn a_leader_pod_alone_is_never_ready_which_is_why_the_startup_policy_is_not_leader_ready() {
    let Some((m, marker)) = model() else { return };
    let docs = render(&deploy("overlays/cpu"));
    let dir = TempDir::new().unwrap();
    let mut c = cluster(&docs, &dir);
    // Only the leader pod, as LeaderReady would leave it until it is Ready.
    let pods = lws_group(&docs, &mut c, &m, &marker, 1);
    let mut leader = c.start(pods[0]);
    let coord = container(&mut leader, "coordinator");
    let w = c.startup_window(pods[0]);
    assert!(c.wait_probes(pods[0], "startupProbe", w), "the leader's startup probes did not pass\n{}", coord.log());
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        assert!(!c.wait_probes(pods[0], "readinessProbe", Duration::ZERO), "the leader became Ready without its workers\n{}", coord.log());
        std::thread::sleep(Duration::from_millis(500));
    }
    let (code, body) = Http { url: c.url(pods[0], "http"), agent: ureq::agent() }.get("/ready");
    assert_eq!(code, 503, "{body}");
    let lws = object(&docs, "LeaderWorkerSet", None);
    assert_ne!(lws["spec"]["startupPolicy"].as_str(), Some("LeaderReady"), "with readiness on /ready, LeaderReady never creates the workers");
}

#[test]
fn the_rendered_statefulset_variant_forms_a_cluster_through_the_headless_service_and_serves() {
    let Some((m, marker)) = model() else { return };
    let docs = render(&deploy("overlays/statefulset"));
    let dir = TempDir::new().unwrap();
    let mut c = cluster(&docs, &dir);
    let coord_sts = object(&docs, "StatefulSet", Some("tpserve-coordinator"));
    let worker_sts = object(&docs, "StatefulSet", Some("tpserve-worker"));
    let s = seed(&docs, &coord_sts["spec"]["template"], &m, &marker);
    let coordinator = add(&mut c, "tpserve-coordinator-0", &coord_sts["spec"]["template"], vec![], &s);
    // The workers' --join names the coordinator's headless Service: its DNS name reaches
    // the coordinator pod.
    let svc = str_of(&coord_sts["spec"]["serviceName"]);
    for host in [svc.clone(), format!("{svc}.{}", c.namespace), format!("{svc}.{}.svc.cluster.local", c.namespace)] {
        c.hosts.insert(host, coordinator);
    }
    let replicas = worker_sts["spec"]["replicas"].as_u64().unwrap() as usize;
    let s = seed(&docs, &worker_sts["spec"]["template"], &m, &marker);
    let workers: Vec<usize> = (0..replicas).map(|i| add(&mut c, &format!("tpserve-worker-{i}"), &worker_sts["spec"]["template"], vec![], &s)).collect();

    let mut pod = c.start(coordinator);
    let mut coord = container(&mut pod, "coordinator");
    let _workers: Vec<_> = workers.iter().map(|&p| c.start(p)).collect();
    check_serving(&docs, &c, coordinator, &mut coord, &m);
}
