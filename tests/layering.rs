//! The crate layering of ARCHITECTURE.md, checked against `cargo metadata` so it cannot rot:
//! each crate may depend only on the tpserve crates listed for it.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

#[test]
fn every_crate_depends_only_on_the_crates_the_architecture_allows() {
    let allowed: BTreeMap<&str, &[&str]> = BTreeMap::from([
        ("tpserve-types", &[][..]),
        ("tpserve-proto", &["tpserve-types"][..]),
        ("tpserve-comm", &[][..]),
        ("tpserve-model", &["tpserve-types", "tpserve-comm"][..]),
        ("tpserve-worker", &["tpserve-types", "tpserve-proto", "tpserve-comm", "tpserve-model"][..]),
        // The coordinator does no tensor math: the model crate only for its tokenizer, and
        // neither the worker nor the collective.
        ("tpserve-coordinator", &["tpserve-types", "tpserve-proto", "tpserve-model", "tpserve-scheduler"][..]),
        // The scheduler is pure bookkeeping: plain types only.
        ("tpserve-scheduler", &["tpserve-types"][..]),
        // The HTTP server talks to the engine, never to workers or tensors.
        ("tpserve-server", &["tpserve-types", "tpserve-model", "tpserve-coordinator", "tpserve-scheduler"][..]),
        // The load tester talks only HTTP: no tpserve crate at all.
        ("tpserve-bench", &[][..]),
    ]);
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo metadata");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut seen = BTreeSet::new();
    for pkg in meta["packages"].as_array().unwrap() {
        let name = pkg["name"].as_str().unwrap();
        let Some(ok) = allowed.get(name) else { continue };
        seen.insert(name);
        for dep in pkg["dependencies"].as_array().unwrap() {
            let (d, kind) = (dep["name"].as_str().unwrap(), dep["kind"].as_str());
            // Tests may use any crate.
            if d.starts_with("tpserve") && kind != Some("dev") {
                assert!(ok.contains(&d), "{name} depends on {d}, which ARCHITECTURE.md does not allow");
            }
        }
    }
    assert_eq!(seen.len(), allowed.len(), "some crates were not found: {seen:?}");
}
