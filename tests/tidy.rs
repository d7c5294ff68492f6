//! Repository hygiene that no compiler checks: a clone is self-contained, so no tracked file
//! points outside it at `../shared` (the workspace this project grew up in).

use std::path::Path;
use std::process::Command;

/// The tracked files of the checkout, or None (with a note) when this is not a git checkout.
fn tracked_files(root: &Path) -> Option<Vec<String>> {
    let out = match Command::new("git").arg("-C").arg(root).args(["ls-files", "-z"]).output() {
        Ok(o) if o.status.success() => o,
        Ok(o) => {
            eprintln!("skipping: {} is not a git checkout ({})", root.display(), String::from_utf8_lossy(&o.stderr).trim());
            return None;
        }
        Err(e) => {
            eprintln!("skipping: cannot run git ({e})");
            return None;
        }
    };
    Some(String::from_utf8_lossy(&out.stdout).split('\0').filter(|f| !f.is_empty()).map(str::to_string).collect())
}

#[test]
fn no_tracked_file_points_outside_the_repository_at_shared() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(files) = tracked_files(root) else { return };
    assert!(files.iter().any(|f| f == "Cargo.toml"), "git ls-files in {} lists no Cargo.toml: {files:?}", root.display());
    let needle = ["..", "shared"].join("/");
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| f.as_str() != "tests/tidy.rs")
        // A file deleted in the work tree but not yet in the index reads as absent: skip it.
        .filter_map(|f| std::fs::read(root.join(f)).ok().map(|bytes| (f, bytes)))
        .flat_map(|(f, bytes)| {
            let text = String::from_utf8_lossy(&bytes).into_owned();
            text.lines().enumerate().filter(|(_, l)| l.contains(&needle)).map(|(i, l)| format!("{f}:{}: {}", i + 1, l.trim())).collect::<Vec<_>>()
        })
        .collect();
    assert!(offenders.is_empty(), "tracked files point at {needle} (use tests/data or a path inside the repository):\n{}", offenders.join("\n"));
}
