//! docs/CONFIGURATION.md against the binary: each `### \`tpserve SUB\`` section's table lists
//! exactly the flags `tpserve SUB --help` shows, with the same environment variable and
//! default, so the one page that documents every setting cannot drift from the code.

use std::collections::BTreeMap;
use std::process::Command;

/// A flag as documented: its environment variable and its default ("—" for none).
#[derive(Debug, PartialEq)]
struct Setting {
    env: String,
    default: String,
}

/// The flags of `tpserve SUB --help` (hidden ones are not shown, so not required).
fn help_flags(sub: &str) -> BTreeMap<String, Setting> {
    let out = Command::new(env!("CARGO_BIN_EXE_tpserve")).args(sub.split_whitespace()).arg("--help").output().expect("run tpserve --help");
    assert!(out.status.success(), "tpserve {sub} --help failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let mut flags = BTreeMap::new();
    let mut current: Option<(String, String)> = None;
    let finish = |cur: Option<(String, String)>, flags: &mut BTreeMap<String, Setting>| {
        if let Some((name, desc)) = cur {
            let tag = |t: &str| desc.split_once(&format!("[{t}: ")).and_then(|(_, r)| r.split_once(']')).map(|(v, _)| v.to_string());
            let env = tag("env").map_or("—".into(), |e| e.trim_end_matches('=').split('=').next().unwrap().to_string());
            flags.insert(name, Setting { env, default: tag("default").unwrap_or_else(|| "—".into()) });
        }
    };
    for line in text.lines() {
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        let flag = trimmed.strip_prefix("-h, ").unwrap_or(trimmed);
        let flag = flag.split_once(", ").filter(|(s, _)| s.starts_with('-') && s.len() == 2).map_or(flag, |(_, l)| l);
        if (2..=6).contains(&indent) && flag.starts_with("--") {
            finish(current.take(), &mut flags);
            let name = flag.split_whitespace().next().unwrap().to_string();
            current = Some((name, flag.to_string()));
        } else if let Some((_, desc)) = current.as_mut() {
            if indent > 6 {
                desc.push(' ');
                desc.push_str(trimmed);
            } else {
                finish(current.take(), &mut flags);
            }
        }
    }
    finish(current, &mut flags);
    flags.remove("--help");
    flags.remove("--version");
    flags
}

/// Each `### \`tpserve SUB\`` section of the page and the flags its table lists.
fn documented() -> BTreeMap<String, BTreeMap<String, Setting>> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/CONFIGURATION.md");
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut sections: BTreeMap<String, BTreeMap<String, Setting>> = BTreeMap::new();
    let mut current = None;
    for line in text.lines() {
        if let Some(sub) = line.strip_prefix("### `tpserve ").and_then(|r| r.strip_suffix('`')) {
            current = Some(sub.to_string());
            sections.entry(sub.to_string()).or_default();
        } else if line.starts_with("## ") {
            current = None;
        } else if let (Some(sub), Some(row)) = (&current, line.strip_prefix("| `--")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let name = format!("--{}", cells[0].trim_end_matches('`').split_whitespace().next().unwrap());
            let unquote = |c: &str| c.trim().trim_matches('`').to_string();
            let setting = Setting { env: unquote(cells[1]), default: unquote(cells[2]) };
            assert!(sections.get_mut(sub).unwrap().insert(name.clone(), setting).is_none(), "{path}: tpserve {sub}: {name} is listed twice");
        }
    }
    sections
}

#[test]
fn the_configuration_page_lists_every_flag_of_coordinator_worker_and_up_and_no_other() {
    let doc = documented();
    for sub in ["coordinator", "worker", "up"] {
        assert!(doc.contains_key(sub), "docs/CONFIGURATION.md has no section for tpserve {sub}");
    }
    let mut problems = Vec::new();
    for (sub, listed) in &doc {
        let real = help_flags(sub);
        for (flag, s) in &real {
            match listed.get(flag) {
                None => problems.push(format!("tpserve {sub} {flag} (env {}, default {}) is missing from the page", s.env, s.default)),
                Some(d) if d != s => problems.push(format!("tpserve {sub} {flag}: the page says {d:?}, --help says {s:?}")),
                Some(_) => {}
            }
        }
        for flag in listed.keys().filter(|f| !real.contains_key(*f)) {
            problems.push(format!("tpserve {sub} {flag} is on the page but `tpserve {sub} --help` has no such flag"));
        }
    }
    assert!(problems.is_empty(), "docs/CONFIGURATION.md and the binary disagree:\n{}", problems.join("\n"));
}

/// Every environment variable a command's `--help` names, over the page's sections.
fn binary_variables() -> std::collections::BTreeSet<String> {
    documented().keys().flat_map(|sub| help_flags(sub).into_values().map(|s| s.env)).filter(|e| e != "—").collect()
}

/// The `TPSERVE_*` names in `text`.
fn names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    let b = text.as_bytes();
    let mut i = 0;
    while let Some(at) = text[i..].find("TPSERVE_") {
        let start = i + at;
        let mut end = start + "TPSERVE_".len();
        while end < b.len() && (b[end].is_ascii_uppercase() || b[end].is_ascii_digit() || b[end] == b'_') {
            end += 1;
        }
        out.insert(text[start..end].to_string());
        i = end;
    }
    out
}

/// The same names in the CLI, the compose file and the manifests: every `TPSERVE_*` a
/// deployment file sets for a container is one the binary reads (a flag's variable, or one
/// of the page's environment-only settings), and every `TPSERVE_*` under deploy/ at all is
/// on this page.
#[test]
fn every_setting_the_deployment_files_name_is_a_real_one_and_documented() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let page = std::fs::read_to_string(root.join("docs/CONFIGURATION.md")).unwrap();
    let env_only = page.split("## Settings only the environment carries").nth(1).unwrap().split("\n## ").next().unwrap();
    let mut read_by_binary = binary_variables();
    read_by_binary.extend(env_only.lines().filter(|l| l.starts_with("| `")).flat_map(names));
    // The compose file's one-shot `model` service reads this one in its own shell script.
    let compose_script = ["TPSERVE_MODEL_FILE"];

    let mut files = Vec::new();
    let mut stack = vec![root.join("deploy")];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if !p.components().any(|c| c.as_os_str() == "crds") {
                files.push(p);
            }
        }
    }
    assert!(files.len() > 10, "found only {} files under deploy/", files.len());
    let mut problems = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap_or_default();
        let rel = f.strip_prefix(root).unwrap().display().to_string();
        for n in names(&text) {
            if !page.contains(&n) {
                problems.push(format!("{rel} names {n}, which docs/CONFIGURATION.md does not"));
            }
        }
        if f.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            // What a container gets: compose `KEY: value` lines, Kubernetes `name: KEY` env
            // entries and ConfigMap literals `KEY=value`.
            for line in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
                let set = if let Some(rest) = line.strip_prefix("- name: ").or_else(|| line.strip_prefix("name: ")) {
                    Some(rest.trim())
                } else {
                    line.trim_start_matches("- ").split_once([':', '=']).map(|(k, _)| k.trim())
                };
                if let Some(k) = set.filter(|k| k.starts_with("TPSERVE_") && names(k).len() == 1 && names(k).contains(*k)) {
                    if !read_by_binary.contains(k) && !compose_script.contains(&k) {
                        problems.push(format!("{rel} sets {k}, which tpserve does not read (no flag has it, nor the environment-only list)"));
                    }
                }
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
