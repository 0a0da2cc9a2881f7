//! Integration tests of specvm, and the harness they share.
//!
//! The tests in `tests/` run the real `specvm` binary against real KVM with
//! small guests. They need:
//! - the bare test guests, which `build.rs` builds from `../guests` and puts
//!   in `<target>/bare-guests/<name>` ([`bare_guest`]);
//! - the `specvm` binary of the same profile. An integration test only gets
//!   the binaries of its own package built, so the harness runs
//!   `cargo build -p vmm --bin specvm` itself, once per test process, before
//!   the first use ([`specvm_bin`]); `netbridge` likewise
//!   ([`netbridge_bin`]). Cargo makes that a no-op when the binary is up to
//!   date, and it never runs a stale one. Set `SPECVM_BIN` to use a
//!   given binary instead (then nothing is built).
//!
//! So `cargo test --workspace` (or `cargo test -p specvm-tests`) is all it
//! takes.
//!
//! Where `/dev/kvm` is missing or not usable, a KVM test returns early
//! through [`skip_without_kvm!`]: libtest has no runtime "skipped" state, so
//! the test prints `SKIPPED: <test>: <reason>` to stderr and appends the same
//! line to `<target>/test-skips.txt`, which CI prints and counts. A skipped
//! test is never a silent pass.

pub mod etcd;
pub mod net_node;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// Where `build.rs` put the bare guests.
const BARE_GUESTS_DIR: &str = env!("BARE_GUESTS_DIR");
/// The cargo target directory the guests and the skip list live in.
const TARGET_DIR: &str = env!("SPECVM_TARGET_DIR");
/// Name of the file, in the target directory, that lists skipped tests.
pub const SKIPS_FILE: &str = "test-skips.txt";

/// The path of the bare guest program `name` (a file in `guests/src/bin/`).
pub fn bare_guest(name: &str) -> PathBuf {
    let path = Path::new(BARE_GUESTS_DIR).join(name);
    assert!(
        path.is_file(),
        "bare guest {} is missing: is there a guests/src/bin/{name}.rs? \
         (tests/build.rs builds them all)",
        path.display()
    );
    path
}

/// The `specvm` binary to test; see the crate doc for how it is found.
pub fn specvm_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    match BIN.get_or_init(find_or_build_specvm) {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

fn find_or_build_specvm() -> Result<PathBuf, String> {
    if let Some(bin) = std::env::var_os("SPECVM_BIN") {
        let bin = PathBuf::from(bin);
        return match bin.is_file() {
            true => Ok(bin),
            false => Err(format!("SPECVM_BIN={} is not a file", bin.display())),
        };
    }
    build_bin("vmm", "specvm")
}

/// The `netbridge` binary: beside `SPECVM_BIN` when that is set, else the
/// one of the tests' profile, which cargo builds (once per test process,
/// a no-op when up to date) as it does `specvm`.
pub fn netbridge_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| match std::env::var_os("SPECVM_BIN") {
        Some(specvm) => Ok(PathBuf::from(specvm).with_file_name("netbridge")),
        None => build_bin("netbridge", "netbridge"),
    });
    match found {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// The `specvm-graph` binary (`specgraph/`): beside `SPECVM_BIN` when
/// that is set, else the one of the tests' profile, built as `netbridge`
/// is.
pub fn specgraph_bin() -> PathBuf {
    static BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    let found = BIN.get_or_init(|| match std::env::var_os("SPECVM_BIN") {
        Some(specvm) => Ok(PathBuf::from(specvm).with_file_name("specvm-graph")),
        None => build_bin("specgraph", "specvm-graph"),
    });
    match found {
        Ok(path) => path.clone(),
        Err(e) => panic!("{e}"),
    }
}

/// Builds binary `bin` of package `package` in the tests' own profile and
/// target folder, and returns its path.
fn build_bin(package: &str, bin: &str) -> Result<PathBuf, String> {
    // The test executable is <target>/[<triple>/]<profile>/deps/<test>-<hash>.
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the test executable: {e}"))?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| format!("unexpected test executable path {}", exe.display()))?;
    let path = profile_dir.join(bin);
    cargo_build(profile_dir, package, bin).map_err(|e| {
        format!(
            "{e}\nthe tests need the {bin} binary at {}: build it with \
             `cargo build -p {package} --bin {bin}` (same profile as the tests), \
             or point SPECVM_BIN at specvm",
            path.display()
        )
    })?;
    match path.is_file() {
        true => Ok(path),
        false => Err(format!(
            "cargo built {package}, but {} does not exist; build it with \
             `cargo build -p {package} --bin {bin}`, or point SPECVM_BIN at specvm",
            path.display()
        )),
    }
}

/// Runs `cargo build -p PACKAGE --bin BIN` for the profile whose output
/// folder is `profile_dir`. Cargo releases its build lock before it runs
/// tests, so this does not wait on the `cargo test` that started us.
fn cargo_build(profile_dir: &Path, package: &str, bin: &str) -> Result<(), String> {
    let profile_name = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| format!("unexpected profile folder {}", profile_dir.display()))?;
    // "debug" is the folder of the dev and test profiles; any other folder is
    // named after its profile.
    let profile = if profile_name == "debug" {
        "dev"
    } else {
        profile_name
    };
    let parent = profile_dir
        .parent()
        .ok_or_else(|| format!("unexpected profile folder {}", profile_dir.display()))?;
    let mut cmd = Command::new(option_env!("CARGO").unwrap_or("cargo"));
    cmd.args([
        "build",
        "--quiet",
        "-p",
        package,
        "--bin",
        bin,
        "--profile",
        profile,
    ])
    .arg("--manifest-path")
    .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.toml"));
    let (target, root) = target_layout(parent, BUILD_TRIPLE);
    if let Some(triple) = target {
        cmd.args(["--target", triple]);
    }
    cmd.arg("--target-dir").arg(root);
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    match output.status.success() {
        true => Ok(()),
        false => Err(format!(
            "`cargo build -p {package} --bin {bin}` failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )),
    }
}

/// The triple the tests were compiled for (`TARGET` of `build.rs`).
const BUILD_TRIPLE: &str = env!("SPECVM_BUILD_TRIPLE");

/// Where cargo put the test executable's profile folder, whose parent is
/// `parent`: either the target root (`<root>/<profile>`), or, for a
/// `--target TRIPLE` build, the triple's folder inside it
/// (`<root>/<triple>/<profile>`). Cargo names that folder after the triple
/// the code was compiled for, which the build script knows, so the layout is
/// read from the name, not guessed from the folder's contents (an earlier
/// guess looked for cargo's `CACHEDIR.TAG`, which is missing when something
/// else created `target/` first, as `images/build.sh` does on a fresh
/// clone). Returns the `--target` to pass, if any, and the target root.
pub fn target_layout<'a>(parent: &'a Path, triple: &'a str) -> (Option<&'a str>, &'a Path) {
    match (parent.file_name(), parent.parent()) {
        (Some(name), Some(root)) if name == triple => (Some(triple), root),
        _ => (None, parent),
    }
}

/// A listening Unix SOCK_SEQPACKET socket: the far end of a `--net
/// socket=PATH` card. It gathers the frames the guest sends.
pub struct FrameListener {
    fd: OwnedFd,
    path: PathBuf,
}

/// The frames a [`FrameListener`] gathers. Dropping it removes the
/// socket's file, also when the test fails.
pub struct Frames {
    rx: Receiver<Vec<u8>>,
    path: PathBuf,
}

impl std::ops::Deref for Frames {
    type Target = Receiver<Vec<u8>>;
    fn deref(&self) -> &Receiver<Vec<u8>> {
        &self.rx
    }
}

impl Drop for Frames {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl FrameListener {
    /// Binds `path` (removing a file a crashed run left there).
    pub fn bind(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        // SAFETY: plain socket calls on a new descriptor; results checked.
        unsafe {
            let raw = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0);
            assert!(raw >= 0, "socket: {}", std::io::Error::last_os_error());
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
            for (d, s) in addr
                .sun_path
                .iter_mut()
                .zip(path.as_os_str().as_encoded_bytes())
            {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            let a = (&addr as *const libc::sockaddr_un).cast();
            assert_eq!(
                libc::bind(fd.as_raw_fd(), a, len),
                0,
                "bind {}",
                path.display()
            );
            assert_eq!(libc::listen(fd.as_raw_fd(), 1), 0);
            Self {
                fd,
                path: path.to_path_buf(),
            }
        }
    }

    /// Accepts the VMM's connection and collects its frames on a thread.
    pub fn collect(self) -> Frames {
        let (tx, rx) = channel();
        let path = self.path.clone();
        std::thread::spawn(move || {
            // SAFETY: accept on our listening socket.
            let raw = unsafe {
                libc::accept(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
            if raw < 0 {
                return;
            }
            // SAFETY: `raw` is the accepted descriptor, owned here.
            let conn = unsafe { OwnedFd::from_raw_fd(raw) };
            let mut buf = [0u8; 2048];
            loop {
                // SAFETY: `buf` is valid for writes of its length.
                let n = unsafe { libc::read(conn.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 || tx.send(buf[..n as usize].to_vec()).is_err() {
                    return;
                }
            }
        });
        Frames { rx, path }
    }
}

/// A private temporary folder for one test, removed when it is dropped,
/// also when the test fails.
pub struct TempDir(PathBuf);

impl TempDir {
    /// `<tmp>/specvm-<name>-<pid>`, empty.
    pub fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }

    /// The folder.
    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The folder as a string (test paths are UTF-8).
    pub fn str(&self) -> &str {
        self.0.to_str().expect("UTF-8 path")
    }

    /// `name` inside the folder.
    pub fn join(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Checks that `/dev/kvm` can be opened for reading and writing.
pub fn kvm_available() -> Result<(), String> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| format!("cannot open /dev/kvm read-write: {e}"))
}

/// Records that `test` was skipped: a `SKIPPED:` line on stderr, and a line
/// in `<target>/test-skips.txt`.
pub fn record_skip(test: &str, reason: &str) {
    eprintln!("SKIPPED: {test}: {reason}");
    let path = Path::new(TARGET_DIR).join(SKIPS_FILE);
    let line = format!("{test}: {reason}\n");
    // One write of one line in append mode, so lines from tests running in
    // parallel do not interleave.
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()));
    if let Err(e) = written {
        eprintln!("cannot record the skip in {}: {e}", path.display());
    }
}

/// Returns from the calling test, recording it as skipped, when KVM is not
/// usable here. Use it as the first statement of every test that needs KVM.
#[macro_export]
macro_rules! skip_without_kvm {
    () => {
        if let Err(reason) = $crate::kvm_available() {
            fn here() {}
            let name = ::std::any::type_name_of_val(&here);
            $crate::record_skip(name.strip_suffix("::here").unwrap_or(name), &reason);
            return;
        }
    };
}

/// The outcome of one `specvm` run.
#[derive(Debug)]
pub struct RunResult {
    /// The exit code; 128 + N if killed by signal N; -1 if it timed out.
    pub status: i32,
    /// Whether the run was killed for exceeding its timeout.
    pub timed_out: bool,
    /// Everything written to stdout (the guest's serial console by default).
    pub stdout: String,
    /// Everything written to stderr.
    pub stderr: String,
}

impl RunResult {
    /// Panics, showing the run's output, unless it exited with `code`.
    pub fn assert_status(&self, code: i32) {
        assert!(
            !self.timed_out && self.status == code,
            "expected exit status {code}, got {self}"
        );
    }

    /// Panics, showing the run's output, unless it exited with a non-zero
    /// status of its own (no timeout, no signal).
    pub fn assert_failed(&self) {
        assert!(
            !self.timed_out && self.status > 0 && self.status < 128,
            "expected a failure exit status, got {self}"
        );
    }

    /// Panics, showing the run's output, unless stderr contains `needle`,
    /// ignoring ASCII case.
    pub fn assert_stderr_contains(&self, needle: &str) {
        assert!(
            self.stderr
                .to_ascii_lowercase()
                .contains(&needle.to_ascii_lowercase()),
            "expected stderr to mention {needle:?}, got {self}"
        );
    }
}

impl std::fmt::Display for RunResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.timed_out {
            true => write!(f, "a timeout")?,
            false => write!(f, "status {}", self.status)?,
        }
        write!(
            f,
            "\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout, self.stderr
        )
    }
}

/// Runs `specvm` with `args`; see [`run_command`].
pub fn run_specvm(args: &[&str], timeout: Duration) -> RunResult {
    let mut cmd = Command::new(specvm_bin());
    cmd.args(args);
    run_command(cmd, timeout)
}

/// Runs `cmd` with stdin closed, collecting its output; kills it after
/// `timeout`. The child is always reaped. Its output is complete when its
/// pipes close, so a grandchild that inherited them delays the return until
/// it exits too.
pub fn run_command(mut cmd: Command, timeout: Duration) -> RunResult {
    let bin = cmd.get_program().to_owned();
    let bin = Path::new(&bin);
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    // Drain both pipes on threads, so a chatty child never blocks on a full
    // pipe while we wait for it.
    let stdout = drain(child.stdout.take().expect("stdout is piped"));
    let stderr = drain(child.stderr.take().expect("stderr is piped"));

    let deadline = Instant::now() + timeout;
    let (status, timed_out) = loop {
        match child.try_wait() {
            Ok(Some(status)) => break (status, false),
            Ok(None) if Instant::now() >= deadline => {
                // Kills this child by its PID (SIGKILL), then reaps it.
                let _ = child.kill();
                break (child.wait().expect("wait for the killed specvm"), true);
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(10)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("cannot wait for {}: {e}", bin.display());
            }
        }
    };
    RunResult {
        status: if timed_out { -1 } else { exit_code(status) },
        timed_out,
        stdout: join(stdout),
        stderr: join(stderr),
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        // A read error ends the output; what was read so far is kept.
        let _ = pipe.read_to_end(&mut buf);
        buf
    })
}

fn join(reader: std::thread::JoinHandle<Vec<u8>>) -> String {
    String::from_utf8_lossy(&reader.join().expect("pipe reader thread")).into_owned()
}

fn exit_code(status: ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => code,
        (None, Some(signal)) => 128 + signal,
        (None, None) => -1,
    }
}

/// A `specvm` running in the background with its stdin piped, for tests
/// that talk to the guest's console or watch the process while it runs.
/// Dropping it kills the process (by its PID) if it is still running.
pub struct Spawned {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
}

/// Starts `specvm` with `args`, stdin, stdout and stderr piped.
pub fn spawn_specvm(args: &[&str]) -> Spawned {
    let mut cmd = Command::new(specvm_bin());
    cmd.args(args);
    spawn_command(cmd)
}

/// Starts `cmd` (a `specvm` run, perhaps through a wrapper that execs it,
/// such as `ip netns exec`) with stdin, stdout and stderr piped.
pub fn spawn_command(mut cmd: Command) -> Spawned {
    let bin = cmd.get_program().to_owned();
    let bin = Path::new(&bin);
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
    let stdout = child.stdout.take().expect("stdout is piped");
    let (tx, lines) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stdout);
        let mut line = Vec::new();
        // A read error ends the output, as in `drain`.
        while reader.read_until(b'\n', &mut line).unwrap_or(0) > 0 {
            let text = String::from_utf8_lossy(&line);
            if tx.send(text.trim_end_matches('\n').to_owned()).is_err() {
                return;
            }
            line.clear();
        }
    });
    Spawned {
        stdin: child.stdin.take(),
        stderr: Some(drain(child.stderr.take().expect("stderr is piped"))),
        child,
        lines,
        seen: Vec::new(),
    }
}

impl Spawned {
    /// The process id of the running `specvm`.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for a stdout line containing `needle` and
    /// returns it; on a timeout or the end of the output, an error with
    /// the output so far.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if line.contains(needle) {
                        return Ok(line);
                    }
                }
                Err(e) => {
                    return Err(format!(
                        "no line with {needle:?} ({e}); stdout so far:\n{}",
                        self.seen.join("\n")
                    ))
                }
            }
        }
    }

    /// Writes `bytes` to the process's stdin (the guest's serial input).
    pub fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        let stdin = self.stdin.as_mut().ok_or(std::io::ErrorKind::BrokenPipe)?;
        stdin.write_all(bytes)?;
        stdin.flush()
    }

    /// Closes stdin, waits up to `timeout` for the process to end (killing
    /// it after that), and returns the whole run's outcome.
    pub fn finish(mut self, timeout: Duration) -> RunResult {
        drop(self.stdin.take());
        let deadline = Instant::now() + timeout;
        let (status, timed_out) = loop {
            match self.child.try_wait().expect("wait for specvm") {
                Some(status) => break (status, false),
                None if Instant::now() >= deadline => {
                    let _ = self.child.kill();
                    break (self.child.wait().expect("wait for the killed specvm"), true);
                }
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        // The pipe closed with the process, so the reader ends.
        self.seen.extend(self.lines.iter());
        let mut stdout = self.seen.join("\n");
        if !stdout.is_empty() {
            stdout.push('\n');
        }
        RunResult {
            status: if timed_out { -1 } else { exit_code(status) },
            timed_out,
            stdout,
            stderr: join(self.stderr.take().expect("stderr is drained once")),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The resident set size of process `pid` in KiB (`VmRSS` in
/// `/proc/<pid>/status`).
pub fn vm_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// The number of open file descriptors of process `pid` (entries of
/// `/proc/<pid>/fd`).
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A `netbridge` of a test's own, in a private directory (its socket
/// `br.sock`, its event log `events.log`, and whatever else the test puts
/// there). Dropping it kills the bridge (by its PID) and removes the
/// directory, also when the test fails.
pub struct NetBridge {
    child: Child,
    /// The private directory.
    pub dir: PathBuf,
}

impl NetBridge {
    /// Starts a bridge in a new directory named after `name`.
    pub fn start(name: &str) -> Self {
        Self::start_with(name, &[])
    }

    /// Starts a bridge as [`NetBridge::start`] does, with `extra` flags.
    pub fn start_with(name: &str, extra: &[&std::ffi::OsStr]) -> Self {
        let dir = std::env::temp_dir().join(format!("specvm-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the bridge's directory");
        let bin = netbridge_bin();
        let events = std::fs::File::create(dir.join("events.log")).expect("creating the event log");
        let child = Command::new(bin)
            .arg("--listen")
            .arg(dir.join("br.sock"))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::from(events))
            .spawn()
            .expect("starting netbridge");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !dir.join("br.sock").exists() {
            assert!(
                Instant::now() < deadline,
                "the bridge socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        Self { child, dir }
    }

    /// The `--net` argument for a VM on this bridge.
    pub fn net_arg(&self) -> String {
        format!("bridge={}", self.dir.join("br.sock").display())
    }

    /// The bridge's events so far, one JSON object a line.
    pub fn events(&self) -> String {
        std::fs::read_to_string(self.dir.join("events.log")).unwrap_or_default()
    }
}

impl Drop for NetBridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A network namespace made for a test; deleted on drop, which also
/// deletes every interface left in it (a TAP made there goes with it).
pub struct Netns(String);

impl Netns {
    /// Makes the namespace `<prefix>-<pid>`, or says why it cannot be made
    /// here (no `ip`, not root).
    pub fn add(prefix: &str) -> Result<Self, String> {
        let name = format!("{prefix}-{}", std::process::id());
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .map_err(|e| format!("cannot run `ip` (iproute2): {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`ip netns add {name}` failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Self(name))
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.0
    }

    /// Runs `ip -n NS ARGS` and returns its stdout; the error says what
    /// `ip` said.
    pub fn try_ip(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .arg("-n")
            .arg(&self.0)
            .args(args)
            .output()
            .map_err(|e| format!("running ip: {e}"))?;
        match out.status.success() {
            true => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
            false => Err(format!(
                "`ip -n {} {}` failed: {}",
                self.0,
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            )),
        }
    }

    /// Like [`Netns::try_ip`], but panics if it fails.
    pub fn ip(&self, args: &[&str]) -> String {
        self.try_ip(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Something that moves the calling thread into the namespace, for a
    /// thread of its own (see [`EnterNetns::enter`]).
    pub fn entry(&self) -> EnterNetns {
        EnterNetns(format!("/run/netns/{}", self.0))
    }

    /// Runs `f` on a thread that entered the namespace, so that the
    /// sockets it opens live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let entry = self.entry();
        std::thread::spawn(move || {
            entry.enter();
            f()
        })
        .join()
        .expect("the thread in the namespace panicked")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A namespace's path, to enter from a thread that lives in it.
pub struct EnterNetns(String);

impl EnterNetns {
    /// Moves the calling thread (only it) into the namespace; panics if it
    /// cannot. Call it on a thread that ends with its use of the namespace.
    pub fn enter(&self) {
        let path = &self.0;
        let ns = std::fs::File::open(path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
        // SAFETY: setns with a namespace descriptor we own; it moves only
        // the calling thread.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(r, 0, "setns {path}: {}", std::io::Error::last_os_error());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh(script: &str) -> Command {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", script]);
        cmd
    }

    #[test]
    fn collects_output_and_status() {
        let r = run_command(
            sh("echo out; echo err >&2; exit 3"),
            Duration::from_secs(30),
        );
        assert!(!r.timed_out);
        assert_eq!(r.status, 3);
        assert_eq!(r.stdout, "out\n");
        assert_eq!(r.stderr, "err\n");
        r.assert_failed();
        r.assert_stderr_contains("ERR");
    }

    #[test]
    fn kills_on_timeout() {
        let start = Instant::now();
        let r = run_command(
            sh("echo started; exec sleep 30"),
            Duration::from_millis(200),
        );
        assert!(r.timed_out, "{r}");
        assert_eq!(r.status, -1);
        assert_eq!(r.stdout, "started\n");
        assert!(start.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn reports_death_by_signal() {
        let r = run_command(sh("kill -9 $$"), Duration::from_secs(30));
        assert_eq!(r.status, 128 + 9, "{r}");
    }

    #[test]
    fn finds_built_guests() {
        assert!(bare_guest("hello").is_file());
    }

    /// The fresh-clone case: `images/build.sh` made `target/` (for the
    /// guest agent) before cargo did, so it holds no `CACHEDIR.TAG`; the
    /// profile folder's parent is still the target root, and no `--target`
    /// may be passed (cargo read `--target target` as a triple and failed).
    #[test]
    fn target_root_made_by_someone_else_is_the_root() {
        let tmp = std::env::temp_dir().join(format!("specvm-layout-{}", std::process::id()));
        let target = tmp.join("target");
        std::fs::create_dir_all(target.join("guest-agent")).unwrap();
        std::fs::create_dir_all(target.join("debug/deps")).unwrap();
        let triple = "x86_64-unknown-linux-gnu";
        let r = target_layout(&target, triple);
        let cross = target.join(triple);
        let c = target_layout(&cross, triple);
        std::fs::remove_dir_all(&tmp).unwrap();
        assert!(!target.join("CACHEDIR.TAG").exists());
        assert_eq!(r, (None, target.as_path()));
        // A `--target` build: <root>/<triple>/<profile>.
        assert_eq!(c, (Some(triple), target.as_path()));
    }

    /// The layout this very test binary was built in resolves to the
    /// target folder that `build.rs` computed (when no `--target-dir` was
    /// given on the command line, which `build.rs` cannot see).
    #[test]
    fn this_build_resolves_to_its_target_folder() {
        let exe = std::env::current_exe().unwrap();
        let parent = exe
            .parent()
            .and_then(Path::parent)
            .and_then(Path::parent)
            .unwrap();
        let (_, root) = target_layout(parent, BUILD_TRIPLE);
        let want = Path::new(TARGET_DIR);
        if want.canonicalize().ok() != root.canonicalize().ok() {
            record_skip(
                "tests::this_build_resolves_to_its_target_folder",
                "built with a --target-dir that build.rs cannot see",
            );
            return;
        }
        assert!(root.join("bare-guests").is_dir(), "{}", root.display());
    }
}
