//! The serial console's readers cannot stop the guest: a socket client that
//! never reads, a stdout nobody reads, a file that fails; and the console
//! socket's file (what it may replace, its removal at exit).
//!
//! The `chatter` guest prints 64-byte lines as fast as the console takes
//! them. Every process a test starts is ended by its PID (on drop too, when
//! the test fails), and every test's files live in a directory of its own,
//! removed on drop.

use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, specvm_bin};

const TIMEOUT: Duration = Duration::from_secs(60);
/// How long `ctl pause` may take on a guest whose console is not read.
const ANSWER_WITHIN: Duration = Duration::from_secs(3);
/// How long the VMM may take to end on SIGTERM.
const END_WITHIN: Duration = Duration::from_secs(10);

/// A private directory for one test, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-serial-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A VMM this test started; dropping it kills it (by its PID) if it runs.
struct Vmm {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Vmm {
    /// `specvm run --bare chatter --guest-arg LINES ARGS`, with `stdout`
    /// as its stdout and stderr collected.
    fn start(lines: u64, args: &[&str], stdout: Stdio) -> Self {
        let g = bare_guest("chatter");
        let mut child = Command::new(specvm_bin())
            .args(["run", "--memory", "64M", "--bare"])
            .arg(&g)
            .args(["--guest-arg", &lines.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting specvm");
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        });
        Self {
            child,
            stderr: Some(stderr),
        }
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends SIGTERM, by PID.
    fn terminate(&self) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success());
    }

    /// Waits up to `timeout` for the end: the status (128 + N for signal
    /// N) and stderr; None if it still runs.
    fn wait(&mut self, timeout: Duration) -> Option<(i32, String)> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("waiting") {
                Some(s) => break s,
                None if Instant::now() >= deadline => return None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let code = status
            .code()
            .or(status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        Some((code, stderr.unwrap_or_default()))
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

/// Waits until `path` is a socket, while `vmm` runs.
fn wait_for_socket(vmm: &mut Vmm, path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !is_socket(path) {
        assert!(vmm.running(), "the VMM ended before {path:?} appeared");
        assert!(Instant::now() < deadline, "{path:?} never appeared");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes waiting to be read on `fd` (FIONREAD).
fn unread(fd: &impl AsRawFd) -> usize {
    let mut n: libc::c_int = 0;
    // SAFETY: FIONREAD writes one int, to `n`, which lives for the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::FIONREAD, &mut n) };
    assert_eq!(r, 0, "FIONREAD: {}", std::io::Error::last_os_error());
    n as usize
}

/// Waits until what waits unread on `fd` stops growing for a second: the
/// VMM's writes to that reader no longer go through.
fn wait_until_full(vmm: &mut Vmm, fd: &impl AsRawFd) -> usize {
    let deadline = Instant::now() + TIMEOUT;
    let (mut last, mut since) = (0, Instant::now());
    loop {
        assert!(vmm.running(), "the VMM ended");
        assert!(Instant::now() < deadline, "the reader never filled up");
        let n = unread(fd);
        if n != last {
            (last, since) = (n, Instant::now());
        } else if n > 0 && since.elapsed() >= Duration::from_secs(1) {
            return n;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `specvm ctl --api-sock API OP`: whether it said ok, within
/// [`ANSWER_WITHIN`].
fn ctl_answers(api: &Path, op: &str) -> Result<(), String> {
    let api = api.to_str().expect("a UTF-8 path");
    let t = Instant::now();
    let r = run_specvm(&["ctl", "--api-sock", api, "--timeout", "10", op], TIMEOUT);
    let took = t.elapsed();
    if r.status != 0 || took > ANSWER_WITHIN {
        return Err(format!("ctl {op} took {took:?}: {r}"));
    }
    Ok(())
}

/// The VMM with a console reader that reads nothing: `ctl pause` and
/// `resume` answer at once, SIGTERM ends it promptly, its sockets go, and
/// the bytes it dropped are counted once.
fn check_unread_console(vmm: &mut Vmm, api: &Path) -> String {
    ctl_answers(api, "pause").unwrap();
    ctl_answers(api, "status").unwrap();
    ctl_answers(api, "resume").unwrap();
    vmm.terminate();
    let (status, stderr) = vmm.wait(END_WITHIN).expect("SIGTERM ended the VMM");
    assert_eq!(status, 128 + 15, "{stderr}");
    assert!(!api.exists(), "the API socket is removed at exit");
    let summary: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("bytes of console output were dropped in all"))
        .collect();
    assert_eq!(summary.len(), 1, "{stderr}");
    stderr
}

// Finding 9: a serial socket client that never reads froze the guest.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_socket_client_that_never_reads_does_not_freeze_the_guest() {
    skip_without_kvm!();
    let dir = Dir::new("noread");
    let (console, api) = (dir.path("console.sock"), dir.path("api.sock"));
    let serial = format!("socket={}", console.display());
    let api_arg = api.to_str().expect("UTF-8");
    let mut vmm = Vmm::start(
        0,
        &["--serial", &serial, "--api-sock", api_arg],
        Stdio::null(),
    );
    wait_for_socket(&mut vmm, &console);
    wait_for_socket(&mut vmm, &api);
    let client = UnixStream::connect(&console).expect("connecting to the console");
    let held = wait_until_full(&mut vmm, &client);
    eprintln!("the console socket holds {held} unread bytes");
    check_unread_console(&mut vmm, &api);
    assert!(!console.exists(), "the console socket is removed at exit");
}

// The same for stdout: a pipe nobody reads no longer stops the guest.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_stdout_nobody_reads_does_not_freeze_the_guest() {
    skip_without_kvm!();
    let dir = Dir::new("stdout");
    let api = dir.path("api.sock");
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into `fds`.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are new and owned by nothing else.
    let (rd, wr) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The smallest pipe, so that it fills in well under a second.
    // SAFETY: F_SETPIPE_SZ takes an int; `rd` is a pipe.
    unsafe { libc::fcntl(rd.as_raw_fd(), libc::F_SETPIPE_SZ, 4096) };
    let api_arg = api.to_str().expect("UTF-8");
    let mut vmm = Vmm::start(0, &["--api-sock", api_arg], Stdio::from(wr));
    wait_for_socket(&mut vmm, &api);
    let held = wait_until_full(&mut vmm, &rd);
    eprintln!("the stdout pipe holds {held} unread bytes");
    check_unread_console(&mut vmm, &api);
}

// `--serial socket=` files were never removed; a reader also gets every
// line written before the VMM ends.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_console_socket_is_removed_at_exit_after_its_reader_got_everything() {
    skip_without_kvm!();
    let dir = Dir::new("removed");
    let console = dir.path("console.sock");
    let serial = format!("socket={}", console.display());
    let lines = 300;
    let mut vmm = Vmm::start(lines, &["--serial", &serial], Stdio::null());
    wait_for_socket(&mut vmm, &console);
    let mut client = UnixStream::connect(&console).expect("connecting to the console");
    client.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
    let mut got = String::new();
    client
        .read_to_string(&mut got)
        .expect("the console to its end");
    let (status, stderr) = vmm.wait(TIMEOUT).expect("the guest ends");
    assert_eq!(status, 0, "{stderr}");
    assert_eq!(got.lines().count() as u64, lines, "{got}");
    assert!(got.ends_with(&format!(
        "chatter {lines:012} abcdefghijklmnopqrstuvwxyzabcdefghijklmnop\n"
    )));
    assert!(!console.exists(), "the console socket is removed at exit");
}

// A regular file at the --serial socket= path was replaced.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_regular_file_at_the_console_socket_path_is_refused_and_kept() {
    skip_without_kvm!();
    let dir = Dir::new("file");
    let notes = dir.path("notes.txt");
    std::fs::write(&notes, "my notes").expect("writing");
    let serial = format!("socket={}", notes.display());
    let mut vmm = Vmm::start(1, &["--serial", &serial], Stdio::null());
    let (status, stderr) = vmm.wait(TIMEOUT).expect("the VMM ends");
    assert_eq!(status, 1, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].starts_with("specvm: error:"), "{stderr}");
    let want = format!("{} exists and is a regular file", notes.display());
    assert!(lines[0].contains(&want), "{stderr}");
    assert_eq!(std::fs::read_to_string(&notes).expect("a file"), "my notes");
}

// A failing serial file logged one warning per byte.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_failing_serial_file_warns_once_with_a_count() {
    skip_without_kvm!();
    let mut vmm = Vmm::start(50, &["--serial", "file=/dev/full"], Stdio::null());
    let (status, stderr) = vmm.wait(TIMEOUT).expect("the guest ends");
    assert_eq!(status, 0, "{stderr}");
    let serial: Vec<&str> = stderr.lines().filter(|l| l.contains("serial")).collect();
    assert_eq!(serial.len(), 2, "{stderr}");
    assert!(serial[0].contains("/dev/full"), "{stderr}");
    assert!(
        serial[1].contains("3200 bytes of console output could not be written to /dev/full"),
        "{stderr}"
    );
}
