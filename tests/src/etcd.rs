//! etcd servers for the registry tests (issue 15): Debian's `etcd-server`,
//! fetched by `tests/tools/fetch-etcd.sh` into `<target>/tools/etcd`, run
//! on loopback with free ports and temporary data folders, one process or
//! a cluster of several. Dropping an [`EtcdCluster`] kills every member by
//! its PID and removes their folders, also when the test fails.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::TempDir;

/// The etcd binary, fetched (once per test process) by
/// `tests/tools/fetch-etcd.sh`, or why it cannot be had: the caller
/// records the test as skipped with that reason.
pub fn etcd_bin() -> Result<PathBuf, String> {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BIN.get_or_init(|| {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/fetch-etcd.sh");
        let out = Command::new("sh")
            .arg(&script)
            .env("CARGO_TARGET_DIR", crate::TARGET_DIR)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            let why = String::from_utf8_lossy(&out.stderr);
            return Err(format!("no etcd server: {}", why.trim()));
        }
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        match path.is_file() {
            true => Ok(path),
            false => Err(format!(
                "fetch-etcd.sh named {}, which is not a file",
                path.display()
            )),
        }
    })
    .clone()
}

/// A free TCP port on loopback (bound and released: another process may
/// take it meanwhile, which the caller sees as a start that fails).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free loopback port")
}

struct Member {
    name: String,
    client: u16,
    peer: u16,
    dir: TempDir,
    child: Option<Child>,
}

/// One or more etcd processes forming one cluster, on loopback or on an
/// address in a network namespace.
pub struct EtcdCluster {
    bin: PathBuf,
    members: Vec<Member>,
    token: String,
    /// The address the members listen on.
    host: String,
    /// The namespace they run in (its name), if not this one.
    netns: Option<String>,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers (a leader is
    /// elected). Heartbeat 50 ms, election 500 ms: etcd's shortest lease is
    /// then under a second, so a 1 s lease is granted as asked.
    pub fn start(name: &str, n: usize) -> Result<Self, String> {
        Self::start_at(name, n, None, "127.0.0.1")
    }

    /// As [`EtcdCluster::start`], run in the namespace `ns` and listening
    /// on its address `ip` (for bridges in other namespaces to reach).
    pub fn start_in(name: &str, n: usize, ns: &crate::Netns, ip: &str) -> Result<Self, String> {
        Self::start_at(name, n, Some(ns.name()), ip)
    }

    fn start_at(name: &str, n: usize, netns: Option<&str>, host: &str) -> Result<Self, String> {
        let bin = etcd_bin()?;
        let members = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client: free_port(),
                peer: free_port(),
                dir: TempDir::new(&format!("etcd-{name}-m{i}")),
                child: None,
            })
            .collect();
        let mut c = Self {
            bin,
            members,
            token: format!("specvm-{name}-{}", std::process::id()),
            host: host.to_string(),
            netns: netns.map(str::to_string),
        };
        for i in 0..n {
            c.spawn(i)?;
        }
        c.wait_healthy(Duration::from_secs(30))?;
        Ok(c)
    }

    fn spawn(&mut self, i: usize) -> Result<(), String> {
        let cluster: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{}", m.name, self.host, m.peer))
            .collect();
        let m = &mut self.members[i];
        let log = std::fs::File::create(m.dir.join("etcd.log")).map_err(|e| e.to_string())?;
        let client = format!("http://{}:{}", self.host, m.client);
        let peer = format!("http://{}:{}", self.host, m.peer);
        // `ip netns exec` execs etcd: the child's PID is etcd's.
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.bin);
                c
            }
            None => Command::new(&self.bin),
        };
        let child = cmd
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(m.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
            ])
            .args(["--initial-cluster", &cluster.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .map_err(|e| format!("starting {}: {e}", self.bin.display()))?;
        m.child = Some(child);
        Ok(())
    }

    /// `etcd://HOST:C1,...` of every member, for `--registry`.
    pub fn url(&self) -> String {
        let eps: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}:{}", self.host, m.client))
            .collect();
        format!("etcd://{}", eps.join(","))
    }

    /// `http://HOST:C` of every member, for `etcd-client`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://{}:{}", self.host, m.client))
            .collect()
    }

    /// Whether member `port`'s `/health` says so (asked from the members'
    /// namespace).
    fn healthy(&self, port: u16) -> bool {
        let host = self.host.clone();
        let ask = move || Self::health(&host, port);
        match &self.netns {
            Some(ns) => {
                let entry = crate::EnterNetns(format!("/run/netns/{ns}"));
                std::thread::spawn(move || {
                    entry.enter();
                    ask()
                })
                .join()
                .unwrap_or(false)
            }
            None => ask(),
        }
    }

    fn health(host: &str, port: u16) -> bool {
        let Ok(addr) = format!("{host}:{port}").parse::<std::net::SocketAddr>() else {
            return false;
        };
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let req = format!("GET /health HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n");
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Waits until every running member says it is healthy.
    pub fn wait_healthy(&self, within: Duration) -> Result<(), String> {
        let deadline = Instant::now() + within;
        loop {
            let running: Vec<&Member> = self.members.iter().filter(|m| m.child.is_some()).collect();
            if running.iter().all(|m| self.healthy(m.client)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = running
                    .iter()
                    .map(|m| {
                        let log =
                            std::fs::read_to_string(m.dir.join("etcd.log")).unwrap_or_default();
                        let tail: Vec<&str> = log.lines().rev().take(5).collect();
                        format!("{}: {}", m.name, tail.join(" | "))
                    })
                    .collect();
                return Err(format!(
                    "etcd not healthy within {within:?}: {}",
                    logs.join("; ")
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills member `i` (SIGKILL, by its PID); its data stays for
    /// [`EtcdCluster::restart`].
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts member `i` again on its data, and waits until it is healthy.
    pub fn restart(&mut self, i: usize) -> Result<(), String> {
        self.spawn(i)?;
        self.wait_healthy(Duration::from_secs(30))
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}
