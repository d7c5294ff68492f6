//! The crate layering of ARCHITECTURE.md, checked against `cargo metadata` so it cannot rot:
//! each crate may depend directly only on the tpserve crates listed for it, and some crates
//! must not reach others even through a third one (the coordinator does no tensor math,
//! whichever crate would bring the kernels in).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use serde_json::Value;

/// Which tpserve crates each crate may depend on directly (normal and build dependencies;
/// tests may use any crate).
fn allowed() -> BTreeMap<&'static str, &'static [&'static str]> {
    BTreeMap::from([
        // Plain data and pure functions.
        ("tpserve-types", &[][..]),
        // The file format: nothing of tpserve.
        ("tpserve-gguf", &[][..]),
        // Tokens and chat templates from the file's metadata; no tensor math.
        ("tpserve-tokenizer", &["tpserve-gguf"][..]),
        // Downloading the default model.
        ("tpserve-fetch", &[][..]),
        ("tpserve-proto", &["tpserve-types"][..]),
        ("tpserve-comm", &[][..]),
        // The forward pass: it reads tensors from the file and talks through a collective.
        ("tpserve-model", &["tpserve-types", "tpserve-comm", "tpserve-gguf"][..]),
        ("tpserve-worker", &["tpserve-types", "tpserve-proto", "tpserve-comm", "tpserve-model", "tpserve-gguf", "tpserve-fetch"][..]),
        // The coordinator does no tensor math: the tokenizer, and neither the model, the
        // worker nor the collective.
        ("tpserve-coordinator", &["tpserve-types", "tpserve-proto", "tpserve-tokenizer", "tpserve-scheduler"][..]),
        // The scheduler is pure bookkeeping: plain types only.
        ("tpserve-scheduler", &["tpserve-types"][..]),
        // The HTTP server talks to the engine, never to workers or tensors.
        ("tpserve-server", &["tpserve-types", "tpserve-tokenizer", "tpserve-coordinator", "tpserve-scheduler"][..]),
        // The load tester talks only HTTP: no tpserve crate at all.
        ("tpserve-bench", &[][..]),
        // The binary turns flags into calls on the crates: never wire types, never the
        // collective (the worker crate owns both).
        (
            "tpserve",
            &[
                "tpserve-types",
                "tpserve-gguf",
                "tpserve-tokenizer",
                "tpserve-fetch",
                "tpserve-model",
                "tpserve-worker",
                "tpserve-coordinator",
                "tpserve-scheduler",
                "tpserve-server",
                "tpserve-bench",
            ][..],
        ),
    ])
}

/// Crates that must not be reached at all, through any chain of normal dependencies.
fn forbidden_anywhere() -> BTreeMap<&'static str, &'static [&'static str]> {
    let no_tensors: &[&str] = &["tpserve-model", "tpserve-comm", "tpserve-worker"];
    BTreeMap::from([
        ("tpserve-coordinator", no_tensors),
        ("tpserve-server", no_tensors),
        ("tpserve-scheduler", no_tensors),
        ("tpserve-tokenizer", no_tensors),
        ("tpserve-types", no_tensors),
    ])
}

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // Resolve for this host only, so no other platform's crates need to be downloaded.
    let host = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into())).arg("-vV").output().expect("run rustc -vV");
    let host = String::from_utf8_lossy(&host.stdout).lines().find_map(|l| l.strip_prefix("host: ").map(str::to_string)).expect("rustc names its host");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--filter-platform", &host])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn every_crate_depends_directly_only_on_the_crates_the_architecture_allows() {
    let meta = metadata();
    let allowed = allowed();
    let members: BTreeSet<&str> = meta["workspace_members"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let mut seen = BTreeSet::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let name = pkg["name"].as_str().unwrap();
        if !members.contains(pkg["id"].as_str().unwrap()) {
            continue;
        }
        let ok = allowed.get(name).unwrap_or_else(|| panic!("crate {name} is not in the layering of tests/layering.rs (and ARCHITECTURE.md): add it"));
        seen.insert(name);
        for dep in pkg["dependencies"].as_array().unwrap() {
            let (d, kind) = (dep["name"].as_str().unwrap(), dep["kind"].as_str());
            if d.starts_with("tpserve") && kind != Some("dev") {
                assert!(ok.contains(&d), "{name} depends on {d}, which ARCHITECTURE.md does not allow");
            }
        }
    }
    assert_eq!(seen.len(), allowed.len(), "some crates were not found: {seen:?}");
}

#[test]
fn no_crate_reaches_what_it_must_not_through_any_other_crate() {
    let meta = metadata();
    // Package id -> (name, normal dependency ids).
    let mut graph: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let names: BTreeMap<&str, &str> = meta["packages"].as_array().unwrap().iter().map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap())).collect();
    for node in meta["resolve"]["nodes"].as_array().unwrap() {
        let id = node["id"].as_str().unwrap();
        let deps = node["deps"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|d| d["dep_kinds"].as_array().unwrap().iter().any(|k| k["kind"].as_str() != Some("dev")))
            .map(|d| d["pkg"].as_str().unwrap().to_string())
            .collect();
        graph.insert(id.to_string(), (names[id].to_string(), deps));
    }
    for (krate, banned) in forbidden_anywhere() {
        let start = graph.iter().find(|(_, (n, _))| n == krate).map(|(id, _)| id.clone()).unwrap_or_else(|| panic!("{krate} not found"));
        // Walk every normal dependency, remembering the path to report it.
        let mut paths: BTreeMap<String, Vec<String>> = BTreeMap::from([(start.clone(), vec![krate.to_string()])]);
        let mut todo = vec![start];
        while let Some(id) = todo.pop() {
            let path = paths[&id].clone();
            for dep in &graph[&id].1 {
                if paths.contains_key(dep) {
                    continue;
                }
                let mut p = path.clone();
                p.push(graph[dep].0.clone());
                assert!(!banned.contains(&graph[dep].0.as_str()), "{krate} reaches {} through {}, which ARCHITECTURE.md forbids", graph[dep].0, p.join(" -> "));
                paths.insert(dep.clone(), p);
                todo.push(dep.clone());
            }
        }
    }
}

#[test]
fn the_default_build_reaches_no_cuda_crate() {
    // `cargo metadata` resolves the default features: the CPU build. CUDA comes only with
    // the `cuda` feature (candle-core's CUDA device, cudarc), so a CPU machine never needs it.
    let meta = metadata();
    let names: BTreeMap<&str, &str> = meta["packages"].as_array().unwrap().iter().map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap())).collect();
    let nodes: BTreeMap<&str, Vec<&str>> = meta["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| (n["id"].as_str().unwrap(), n["deps"].as_array().unwrap().iter().map(|d| d["pkg"].as_str().unwrap()).collect()))
        .collect();
    let root = meta["resolve"]["nodes"].as_array().unwrap().iter().map(|n| n["id"].as_str().unwrap()).find(|id| names[id] == "tpserve").unwrap();
    let mut seen = BTreeSet::from([root]);
    let mut todo = vec![root];
    while let Some(id) = todo.pop() {
        for &d in &nodes[id] {
            if seen.insert(d) {
                todo.push(d);
            }
        }
    }
    let cuda: Vec<&str> = seen.iter().map(|id| names[id]).filter(|n| ["candle-core", "candle-kernels", "cudarc", "cudaforge"].contains(n)).collect();
    assert!(cuda.is_empty(), "the default build depends on {cuda:?}: put it behind the `cuda` feature");
    // The feature itself must bring them (or this test would pass for the wrong reason).
    let features = meta["packages"].as_array().unwrap().iter().find(|p| p["name"] == "tpserve-model").unwrap()["features"]["cuda"].clone();
    assert!(features.to_string().contains("candle-core/cuda"), "tpserve-model's `cuda` feature: {features}");
}
