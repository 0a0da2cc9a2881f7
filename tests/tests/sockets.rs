//! The listening sockets of `specvm run --api-sock`, `netbridge --listen`
//! and `netbridge --events`: what they may replace, who may connect, when
//! they appear, and how the servers behind them bear clients that misbehave;
//! and `specvm ctl`'s timeout and Ctrl-C.
//!
//! Each test names the finding of the socket review it checks. Every
//! process a test starts is ended by its PID (on drop, also when the test
//! fails), and every test's files live in a directory of its own that is
//! removed on drop.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specvm_tests::{
    bare_guest, netbridge_bin, run_specvm, skip_without_kvm, specvm_bin, vm_rss_kib,
};
use specwire::protocol::{decode, encode_control, read_message, write_message, Control, Message};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A private directory for one test, removed on drop.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specvm-sockets-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("creating a temp dir");
        Self(d)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// The group id this test's files get.
    fn gid(&self) -> u32 {
        std::fs::metadata(&self.0).expect("the temp dir").gid()
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A process this test started; dropping it kills it (by its PID) if it
/// still runs.
struct Proc {
    child: Child,
    stderr: Option<std::thread::JoinHandle<String>>,
}

/// How a [`Proc`] ended.
#[derive(Debug)]
struct Ended {
    /// The exit code, or 128 + the signal that killed it.
    status: i32,
    stderr: String,
}

impl Proc {
    /// Starts `program args...` through `sh -c 'PREFIX; exec "$0" "$@"'`
    /// (for a umask or a ulimit), in `cwd` if given, with stdout and stdin
    /// closed and stderr collected.
    fn start(prefix: &str, cwd: Option<&Path>, program: &Path, args: &[&OsStr]) -> Self {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("{prefix}; exec \"$0\" \"$@\""))
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(d) = cwd {
            cmd.current_dir(d);
        }
        // Ctrl-C as a terminal delivers it: the tests send SIGINT, which a
        // test run started in the background by a shell would otherwise
        // pass down ignored (POSIX shells ignore it for `&` jobs).
        // SAFETY: signal(2) is async-signal-safe, as pre_exec requires.
        unsafe {
            cmd.pre_exec(|| {
                libc::signal(libc::SIGINT, libc::SIG_DFL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("starting a process");
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

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Sends signal `sig` to this process, by its PID.
    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success(), "kill -{sig} {}", self.pid());
    }

    /// Waits up to `timeout` for the process to end.
    fn wait(&mut self, timeout: Duration) -> Option<Ended> {
        use std::os::unix::process::ExitStatusExt;
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait().expect("waiting") {
                Some(s) => break s,
                None if Instant::now() >= deadline => return None,
                None => std::thread::sleep(Duration::from_millis(10)),
            }
        };
        let status = status
            .code()
            .or(status.signal().map(|s| 128 + s))
            .unwrap_or(-1);
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        Some(Ended {
            status,
            stderr: stderr.unwrap_or_default(),
        })
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn os<S: AsRef<OsStr> + ?Sized>(s: &S) -> &OsStr {
    s.as_ref()
}

/// Starts a VMM running the `spin` guest with its API on `sock`.
fn start_vm(prefix: &str, cwd: Option<&Path>, sock: &Path, extra: &[&str]) -> Proc {
    let g = bare_guest("spin");
    let mut args = vec![
        os("run"),
        os("--bare"),
        g.as_os_str(),
        os("--memory"),
        os("64M"),
        os("--serial"),
        os("null"),
        os("--api-sock"),
        sock.as_os_str(),
    ];
    args.extend(extra.iter().map(os));
    Proc::start(prefix, cwd, &specvm_bin(), &args)
}

/// Starts a bridge listening on `sock`, with `extra` flags.
fn start_bridge(prefix: &str, sock: &Path, extra: &[&OsStr]) -> Proc {
    // Raw test ports do not renew a lease.
    let mut args = vec![
        os("--listen"),
        sock.as_os_str(),
        os("--quiet"),
        os("--lease-ms"),
        os("600000"),
    ];
    args.extend_from_slice(extra);
    Proc::start(prefix, None, &netbridge_bin(), &args)
}

/// Waits until `path` is a socket, while `p` runs.
fn wait_for_socket(p: &mut Proc, path: &Path) {
    let deadline = Instant::now() + TIMEOUT;
    while !is_socket(path) {
        if !p.running() {
            let e = p.wait(TIMEOUT).expect("ended");
            panic!("ended before {} appeared: {e:?}", path.display());
        }
        assert!(
            Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn is_socket(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket())
}

fn mode(path: &Path) -> u32 {
    std::fs::symlink_metadata(path).expect("the socket").mode() & 0o777
}

/// `specvm ctl --api-sock SOCK --timeout 10 ARGS...`: (status, stdout).
fn ctl(sock: &Path, args: &[&str]) -> (i32, String) {
    let sock = sock.to_str().expect("UTF-8 path");
    let mut argv = vec!["ctl", "--api-sock", sock, "--timeout", "10"];
    argv.extend_from_slice(args);
    let r = run_specvm(&argv, TIMEOUT);
    (r.status, r.stdout + &r.stderr)
}

/// Says hello to the bridge at `sock` as VM `vm`; returns whether it
/// welcomed the port.
fn bridge_welcomes(sock: &Path, vm: u32) -> bool {
    let mut s = UnixStream::connect(sock).expect("connecting to the bridge");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let hello = Control::Hello {
        vm,
        speculative: true,
    };
    write_message(&mut s, &encode_control(&hello)).expect("hello");
    let Ok(msg) = read_message(&mut s) else {
        return false;
    };
    matches!(decode(&msg), Ok(Message::Control(Control::Welcome { .. })))
}

/// User and system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("/proc/PID/stat");
    let after = stat.rsplit_once(')').expect("a stat line").1;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    // USER_HZ is 100 on Linux.
    ticks as f64 / 100.0
}

// Finding 3: socket paths replaced existing files.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn api_sock_refuses_a_regular_file_and_leaves_it() {
    skip_without_kvm!();
    let dir = Dir::new("api-file");
    let notes = dir.path("notes.txt");
    std::fs::write(&notes, "my notes").expect("writing");
    let mut vm = start_vm("true", None, &notes, &[]);
    let e = vm.wait(TIMEOUT).expect("the VMM ends");
    assert_eq!(e.status, 1, "{e:?}");
    let lines: Vec<&str> = e.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "{e:?}");
    assert!(lines[0].starts_with("specvm: error:"), "{e:?}");
    assert!(
        lines[0].contains(&format!("{} exists and is a regular file", notes.display())),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).expect("still a file"),
        "my notes"
    );
}

#[test]
fn bridge_refuses_regular_files_for_listen_and_events() {
    let dir = Dir::new("bridge-file");
    let notes = dir.path("notes.txt");
    std::fs::write(&notes, "my notes").expect("writing");
    let mut b = start_bridge("true", &notes, &[]);
    let e = b.wait(TIMEOUT).expect("the bridge ends");
    assert_eq!(e.status, 1, "{e:?}");
    assert!(
        e.stderr.contains("notes.txt exists and is a regular file"),
        "{e:?}"
    );
    let sock = dir.path("br.sock");
    let mut b = start_bridge("true", &sock, &[os("--events"), notes.as_os_str()]);
    let e = b.wait(TIMEOUT).expect("the bridge ends");
    assert_eq!(e.status, 1, "{e:?}");
    assert!(
        e.stderr.contains("notes.txt exists and is a regular file"),
        "{e:?}"
    );
    assert_eq!(
        std::fs::read_to_string(&notes).expect("still a file"),
        "my notes"
    );
    assert!(!sock.exists(), "the failed bridge removed its own socket");
}

// Finding 6: a second VMM or bridge took over, or removed, the first one's
// socket.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_second_vmm_is_refused_and_the_first_stays_reachable() {
    skip_without_kvm!();
    let dir = Dir::new("api-twice");
    let sock = dir.path("api.sock");
    let mut first = start_vm("true", None, &sock, &["--id", "1"]);
    wait_for_socket(&mut first, &sock);
    let mut second = start_vm("true", None, &sock, &["--id", "2"]);
    let e = second.wait(TIMEOUT).expect("the second VMM ends");
    assert_eq!(e.status, 1, "{e:?}");
    assert!(e.stderr.contains("is in use"), "{e:?}");
    assert!(is_socket(&sock), "the first VMM's socket is still there");
    let (st, out) = ctl(&sock, &["status"]);
    assert_eq!(st, 0, "{out}");
    assert!(out.contains(r#""vm_id":1"#), "the first VMM answers: {out}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_vmm_removes_only_its_own_socket_and_replaces_a_stale_one() {
    skip_without_kvm!();
    let dir = Dir::new("api-own");
    let sock = dir.path("api.sock");
    // A socket left by a VMM that died: nobody listens.
    drop(UnixListener::bind(&sock).expect("a stale socket"));
    let mut a = start_vm("true", None, &sock, &["--id", "1"]);
    let deadline = Instant::now() + TIMEOUT;
    while ctl(&sock, &["status"]).0 != 0 {
        assert!(a.running(), "the VMM did not take the stale socket");
        assert!(Instant::now() < deadline, "VM 1 never answered");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Someone removes A's socket and B takes the path.
    std::fs::remove_file(&sock).expect("removing");
    let mut b = start_vm("true", None, &sock, &["--id", "2"]);
    wait_for_socket(&mut b, &sock);
    a.signal("TERM");
    let e = a.wait(TIMEOUT).expect("A ends");
    assert_eq!(e.status, 128 + 15, "{e:?}");
    assert!(is_socket(&sock), "A removed B's socket");
    let (st, out) = ctl(&sock, &["status"]);
    assert!(st == 0 && out.contains(r#""vm_id":2"#), "{out}");
    b.signal("TERM");
    b.wait(TIMEOUT).expect("B ends");
    assert!(!sock.exists(), "B removed its own socket");
}

#[test]
fn a_second_bridge_that_fails_leaves_the_first_ones_sockets() {
    let dir = Dir::new("bridge-twice");
    let (sock, events) = (dir.path("br.sock"), dir.path("ev.sock"));
    let mut first = start_bridge("true", &sock, &[os("--events"), events.as_os_str()]);
    wait_for_socket(&mut first, &events);
    let mut second = start_bridge("true", &sock, &[]);
    let e = second.wait(TIMEOUT).expect("the second bridge ends");
    assert_eq!(e.status, 1, "{e:?}");
    assert!(e.stderr.contains("br.sock is in use"), "{e:?}");
    let other = dir.path("other.sock");
    let mut third = start_bridge("true", &other, &[os("--events"), events.as_os_str()]);
    let e = third.wait(TIMEOUT).expect("the third bridge ends");
    assert!(e.stderr.contains("ev.sock is in use"), "{e:?}");
    assert!(!other.exists(), "the third bridge removed its own socket");
    assert!(is_socket(&sock) && is_socket(&events));
    assert!(
        bridge_welcomes(&sock, 7),
        "a new VM can join the running bridge"
    );
    first.signal("TERM");
    first.wait(TIMEOUT).expect("the bridge ends");
    assert!(!sock.exists() && !events.exists(), "removed at exit");
}

// Finding 7: the sockets' mode followed the umask.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_api_socket_is_private_under_umask_000() {
    skip_without_kvm!();
    let dir = Dir::new("api-mode");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("umask 000", None, &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    assert_eq!(mode(&sock), 0o600);
    drop(vm);
    let sock = dir.path("group.sock");
    let gid = dir.gid().to_string();
    let mut vm = start_vm("umask 000", None, &sock, &["--api-sock-group", &gid]);
    wait_for_socket(&mut vm, &sock);
    let md = std::fs::symlink_metadata(&sock).expect("the socket");
    assert_eq!((md.mode() & 0o777, md.gid().to_string()), (0o660, gid));
}

/// The snapshot folder the VMM makes holds all of guest memory: private
/// whatever the umask.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_snapshot_folder_is_private_under_umask_000() {
    skip_without_kvm!();
    let dir = Dir::new("snap-mode");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("umask 000", None, &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    let snap = dir.path("snap/inner");
    let r = specvm_tests::run_specvm(
        &[
            "ctl",
            "--api-sock",
            sock.to_str().unwrap(),
            "snapshot",
            "--path",
            snap.to_str().unwrap(),
        ],
        TIMEOUT,
    );
    assert!(r.stdout.contains(r#""ok":true"#), "{r}");
    assert_eq!(mode(&snap), 0o700);
    assert_eq!(mode(&dir.path("snap")), 0o700);
}

#[test]
fn the_bridge_sockets_are_private_under_umask_000() {
    let dir = Dir::new("bridge-mode");
    let (sock, events) = (dir.path("br.sock"), dir.path("ev.sock"));
    let mut b = start_bridge("umask 000", &sock, &[os("--events"), events.as_os_str()]);
    wait_for_socket(&mut b, &events);
    assert_eq!((mode(&sock), mode(&events)), (0o600, 0o600));
    drop(b);
    let sock = dir.path("group.sock");
    let gid = dir.gid().to_string();
    let mut b = start_bridge("umask 000", &sock, &[os("--group"), os(&gid)]);
    wait_for_socket(&mut b, &sock);
    assert_eq!(mode(&sock), 0o660);
}

// Finding 8: a relative snapshot path resolved against the VMM's
// directory.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_relative_snapshot_path_is_the_callers() {
    skip_without_kvm!();
    let dir = Dir::new("relative");
    let (vmm_cwd, caller) = (dir.path("vmm"), dir.path("caller"));
    std::fs::create_dir_all(&vmm_cwd).expect("mkdir");
    std::fs::create_dir_all(&caller).expect("mkdir");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("true", Some(&vmm_cwd), &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    // A raw request with a relative path is refused.
    let mut s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(TIMEOUT)).expect("timeout");
    s.write_all(b"{\"op\":\"snapshot\",\"path\":\"snap\"}\n")
        .expect("write");
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("read");
    assert!(line.contains("snap is relative"), "{line}");
    // `specvm ctl` sends it resolved against its own directory.
    let mut cmd = Command::new(specvm_bin());
    cmd.current_dir(&caller)
        .args(["ctl", "--api-sock"])
        .arg(&sock)
        .args(["snapshot", "--path", "snap"]);
    let r = specvm_tests::run_command(cmd, TIMEOUT);
    r.assert_status(0);
    assert!(caller.join("snap/state").is_file(), "{r}");
    assert!(!vmm_cwd.join("snap").exists());
}

// Finding 10: Ctrl-C did nothing to `specvm ctl`, nor to `specvm run`
// before the VM started; `ctl` had no timeout.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn ctl_events_dies_on_ctrl_c() {
    skip_without_kvm!();
    let dir = Dir::new("events-int");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("true", None, &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    let args = [os("ctl"), os("--api-sock"), sock.as_os_str(), os("events")];
    let mut events = Proc::start("true", None, &specvm_bin(), &args);
    std::thread::sleep(Duration::from_millis(500));
    assert!(events.running(), "events streams until stopped");
    events.signal("INT");
    let e = events
        .wait(Duration::from_secs(5))
        .expect("ctl ended on SIGINT");
    assert_eq!(e.status, 128 + 2, "{e:?}");
}

/// A server that accepts and never answers, standing in for a stuck VMM
/// or bridge. Returns the accepted connections as they come.
fn silent_server(path: &Path) -> std::sync::mpsc::Receiver<UnixStream> {
    let listener = UnixListener::bind(path).expect("binding");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        while let Ok((s, _)) = listener.accept() {
            if tx.send(s).is_err() {
                return;
            }
        }
    });
    rx
}

#[test]
fn ctl_gives_up_on_a_stuck_vmm_and_dies_on_ctrl_c() {
    let dir = Dir::new("stuck");
    let sock = dir.path("api.sock");
    let _conns = silent_server(&sock);
    let t = Instant::now();
    let r = run_specvm(
        &[
            "ctl",
            "--api-sock",
            sock.to_str().expect("UTF-8"),
            "--timeout",
            "1",
            "status",
        ],
        TIMEOUT,
    );
    r.assert_status(1);
    r.assert_stderr_contains("no answer within 1s");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    let args = [os("ctl"), os("--api-sock"), sock.as_os_str(), os("status")];
    let mut c = Proc::start("true", None, &specvm_bin(), &args);
    std::thread::sleep(Duration::from_millis(300));
    c.signal("INT");
    let e = c.wait(Duration::from_secs(5)).expect("ctl ended on SIGINT");
    assert_eq!(e.status, 128 + 2, "{e:?}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn run_dies_on_ctrl_c_before_the_vm_starts() {
    skip_without_kvm!();
    let dir = Dir::new("run-int");
    // A bridge that never answers the VMM's hello: the start waits.
    let bridge = dir.path("br.sock");
    let conns = silent_server(&bridge);
    let sock = dir.path("api.sock");
    let net = format!("bridge={}", bridge.display());
    let mut vm = start_vm("true", None, &sock, &["--net", &net]);
    let _held = conns.recv_timeout(TIMEOUT).expect("the VMM connected");
    std::thread::sleep(Duration::from_millis(200));
    vm.signal("INT");
    let e = vm
        .wait(Duration::from_secs(5))
        .expect("the VMM ended on SIGINT");
    assert_eq!(e.status, 128 + 2, "{e:?}");
    assert!(e.stderr.contains("stopped by signal 2"), "{e:?}");
}

// Finding 12: the API's line limit was checked after buffering.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_long_api_line_is_refused_without_buffering_it() {
    skip_without_kvm!();
    let dir = Dir::new("long-line");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("true", None, &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    let before = vm_rss_kib(vm.pid()).expect("RSS");
    let s = UnixStream::connect(&sock).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut w = s.try_clone().expect("clone");
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        // 64 MiB and no newline; the server closes long before.
        let mut sent = 0;
        while sent < 64 && w.write_all(&chunk).is_ok() {
            sent += 1;
        }
        sent
    });
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).expect("an answer");
    assert!(line.contains("longer than 4096 bytes"), "{line}");
    let sent = writer.join().expect("writer");
    assert!(sent < 64, "the server read all {sent} MiB");
    let after = vm_rss_kib(vm.pid()).expect("RSS");
    assert!(
        after < before + 8 * 1024,
        "RSS grew from {before} to {after} KiB"
    );
    assert_eq!(ctl(&sock, &["status"]).0, 0);
}

// Finding 13: descriptor exhaustion ended the API's accept loop, and spun
// the bridge's; the bridge had no hello timeout.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_api_survives_descriptor_exhaustion() {
    skip_without_kvm!();
    let dir = Dir::new("api-emfile");
    let sock = dir.path("api.sock");
    let mut vm = start_vm("ulimit -n 40", None, &sock, &[]);
    wait_for_socket(&mut vm, &sock);
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    // Long enough for the VMM to run out of descriptors accepting them.
    std::thread::sleep(Duration::from_millis(500));
    drop(idle);
    let (st, out) = ctl(&sock, &["status"]);
    if st != 0 || !vm.running() {
        vm.signal("KILL");
        let end = vm.wait(Duration::from_secs(10));
        panic!("status: {out}; the VMM: {end:?}");
    }
}

#[test]
fn the_bridge_survives_descriptor_exhaustion_without_spinning() {
    let dir = Dir::new("bridge-emfile");
    let sock = dir.path("br.sock");
    let mut b = start_bridge("ulimit -n 30", &sock, &[]);
    wait_for_socket(&mut b, &sock);
    let idle: Vec<UnixStream> = (0..40)
        .map(|_| UnixStream::connect(&sock).expect("connect"))
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let cpu = cpu_seconds(b.pid());
    std::thread::sleep(Duration::from_secs(2));
    let spent = cpu_seconds(b.pid()) - cpu;
    assert!(spent < 0.5, "the bridge spent {spent} s of CPU in 2 s");
    // A client that never says hello is closed.
    let mut first = &idle[0];
    first
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let t = Instant::now();
    assert_eq!(first.read(&mut [0u8; 1]).expect("EOF"), 0);
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    drop(idle);
    std::thread::sleep(Duration::from_millis(1500));
    assert!(bridge_welcomes(&sock, 9), "a new port after the exhaustion");
}

// Finding 15: the socket appeared before it accepted.

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_api_socket_accepts_as_soon_as_it_appears() {
    skip_without_kvm!();
    let dir = Dir::new("api-appear");
    for i in 0..5 {
        let sock = dir.path(&format!("{i}.sock"));
        let mut vm = start_vm("true", None, &sock, &[]);
        let deadline = Instant::now() + TIMEOUT;
        while std::fs::symlink_metadata(&sock).is_err() {
            assert!(vm.running() && Instant::now() < deadline, "no socket");
            std::hint::spin_loop();
        }
        UnixStream::connect(&sock).expect("the socket accepts once it is there");
    }
}

#[test]
fn the_bridge_socket_accepts_as_soon_as_it_appears() {
    let dir = Dir::new("bridge-appear");
    for i in 0..20 {
        let sock = dir.path(&format!("{i}.sock"));
        let mut b = start_bridge("true", &sock, &[]);
        let deadline = Instant::now() + TIMEOUT;
        while std::fs::symlink_metadata(&sock).is_err() {
            assert!(b.running() && Instant::now() < deadline, "no socket");
            std::hint::spin_loop();
        }
        UnixStream::connect(&sock).expect("the socket accepts once it is there");
    }
}
