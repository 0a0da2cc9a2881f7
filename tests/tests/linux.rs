//! `specvm run --kernel`: Debian's kernel and the project's initramfs
//! (`images/build.sh`), booted once, driven through the serial console,
//! saved to a snapshot at its ready line, and restored for every scenario.
//!
//! On a `kvm_pvm` host the boot takes about 15-20 minutes; a restore takes
//! milliseconds. The first test to need the guest boots it (the others
//! wait), checks it, snapshots it into `<target>/tmp/linux-snapshot`,
//! then makes it ping and reboot; every scenario restores the snapshot
//! into a new VM of its own. The tests run when the image is built
//! (`images/build.sh`, as CI does) and are compiled as ignored, with the
//! reason, when it is not, or when `SPECVM_SKIP_LINUX` is set at build
//! time. Watch them with
//! `cargo test --release -p specvm-tests --test linux -- --nocapture`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use specvm_tests::{record_skip, skip_without_kvm, specvm_bin, FrameListener};

/// Time to the init script's ready line: 16-21 min measured on a quiet
/// machine, 39 min with other builds and VMs sharing its two cores.
const BOOT_TIMEOUT: Duration = Duration::from_secs(65 * 60);
/// Time for one shell command: each exec goes through the emulated kernel.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// The built image file `name`, if it exists.
fn image(name: &str) -> Option<PathBuf> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../images/out")
        .join(name);
    p.is_file().then_some(p)
}

/// A running specvm whose console we read and type into.
struct Console {
    child: Child,
    stdin: ChildStdin,
    chunks: Receiver<Vec<u8>>,
    seen: String,
    /// Everything read from the console, never cleared.
    all: String,
    /// The VMM's own lines on stderr (also echoed to ours).
    errs: Receiver<String>,
}

impl Console {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(specvm_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start specvm");
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut out = child.stdout.take().expect("stdout is piped");
        let err = child.stderr.take().expect("stderr is piped");
        let (etx, errs) = channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                // Straight to stderr, past the test harness's capture (as
                // the console goes to stdout), so a person watching sees
                // the VMM's progress as it comes.
                let _ = writeln!(std::io::stderr(), "{line}");
                let _ = etx.send(line);
            }
        });
        let (tx, chunks) = channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = out.read(&mut buf) {
                if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
                // Echo the console, so a person running with --nocapture
                // watches the boot.
                let _ = std::io::stdout().write_all(&buf[..n]);
            }
        });
        Self {
            child,
            stdin,
            chunks,
            seen: String::new(),
            all: String::new(),
            errs,
        }
    }

    /// Waits for the VMM's first stderr line that contains `needle`, and
    /// returns it; panics on timeout or when the VMM ends first.
    fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.errs.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(e) => panic!("no stderr line with {needle:?} ({e:?})"),
            }
        }
    }

    /// Waits until the console output since the last match satisfies
    /// `found`; panics with the output on timeout.
    fn wait_for(&mut self, what: &str, timeout: Duration, found: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !found(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(c) => {
                    let text = String::from_utf8_lossy(&c);
                    self.seen.push_str(&text);
                    self.all.push_str(&text);
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = self.child.kill();
                    panic!("no {what} within {timeout:?}; console:\n{}", self.seen)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("specvm ended before {what}; console:\n{}", self.seen)
                }
            }
        }
    }

    /// Waits for specvm to end after the guest ran `what`, and checks that
    /// it ended with status 0.
    fn wait_clean_exit(&mut self, what: &str) {
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        let status = loop {
            if let Some(st) = self.child.try_wait().expect("wait for specvm") {
                break st;
            }
            assert!(Instant::now() < deadline, "no clean exit after {what}");
            std::thread::sleep(Duration::from_millis(200));
        };
        assert!(status.success(), "specvm ended with {status} after {what}");
    }

    fn send(&mut self, line: &str) {
        self.seen.clear();
        self.stdin
            .write_all(format!("{line}\n").as_bytes())
            .expect("write to the console");
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        // Only our own child, by its PID; a no-op when it has exited.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `specvm ctl --api-sock SOCK OP [EXTRA...]`; returns its output.
fn ctl(sock: &Path, op: &str, extra: &[&str]) -> String {
    let out = Command::new(specvm_bin())
        .args(["ctl", "--api-sock"])
        .arg(sock)
        .arg(op)
        .args(extra)
        .output()
        .expect("run specvm ctl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first complete line (ended by a newline: the console arrives byte
/// by byte) of `s` that contains `marker`.
fn full_line(s: &str, marker: &str) -> Option<String> {
    let start = s.find(marker)?;
    let line_start = s[..start].rfind('\n').map_or(0, |i| i + 1);
    let end = start + s[start..].find('\n')?;
    Some(s[line_start..end].trim_end_matches('\r').to_string())
}

/// Sends `line` and waits for the whole output line that holds `marker`.
/// Markers are built with shell arithmetic (`X$((1+1))` prints `X2`), so
/// the console's echo of the command never matches them.
///
/// A guard, not a cure: on this project's `kvm_pvm` hosts new busybox
/// processes used to die in glibc's start-up code, before `main`, when
/// glibc used AVX registers that the guest kernel cannot save. The
/// host-compat layer's glibc tunable ended that (docs/speculation.md,
/// "User-space faults on this host"), but a process that dies there has
/// done nothing yet, so the command line is sent again, at most
/// [`RETRIES`] more times, and each retry is reported on stderr. Every
/// command given here may run more than once: set-up that is idempotent,
/// or queries.
fn run(c: &mut Console, line: &str, marker: &str) -> String {
    let mut attempt = 0;
    loop {
        c.send(line);
        c.wait_for(marker, COMMAND_TIMEOUT, |s| full_line(s, marker).is_some());
        if !c.seen.contains("Segmentation fault") || attempt == RETRIES {
            return full_line(&c.seen, marker).unwrap_or_default();
        }
        attempt += 1;
        eprintln!(
            "a guest process died at start-up (segfault; docs/speculation.md, \
             \"User-space faults on this host\"); sending `{line}` again"
        );
    }
}

/// How many times [`run`] sends a command line again after a guest process
/// died at start-up.
const RETRIES: usize = 3;

/// The files in the guest's /tmp, listed by the shell itself.
///
/// A shell glob rather than `ls`: no new process. On this project's
/// `kvm_pvm` hosts a new `ls` in a pipeline used to print `ls: %s%s%s: No
/// such file or directory` now and then, one face of the AVX-register
/// fault the host-compat layer's glibc tunable fixed (docs/speculation.md,
/// "User-space faults on this host"). The scenarios test rollback.
const LIST_TMP: &str = "echo FILES$((3+4))= /tmp/*";

/// Issue 4's Linux test, by the guest: a shell script speculates with the
/// `spec` command, changes tmpfs, and aborts; after the rollback the first
/// file is back, the second gone, and the script took the else branch.
fn guest_speculation(c: &mut Console) {
    let line = run(
        c,
        &format!(
            "echo first > /tmp/one; if spec speculate; then rm /tmp/one; echo second > /tmp/two; \
             spec abort; echo ABORT$((1+1))RETURNED; else echo ELSE$((2+3))=$?; fi; {LIST_TMP}"
        ),
        "FILES7=",
    );
    assert!(
        c.seen.contains("ELSE5=1"),
        "the else branch with status 1:\n{}",
        c.seen
    );
    assert!(
        !c.seen.contains("ABORT2RETURNED"),
        "abort returned:\n{}",
        c.seen
    );
    assert!(
        line.contains("/tmp/one") && !line.contains("/tmp/two"),
        "{line}"
    );
}

/// The same, driven from the host through the control API: the host
/// speculates, the guest writes a file, the host aborts, the file is gone.
fn host_speculation(c: &mut Console, api: &Path) {
    let r = ctl(api, "speculate", &[]);
    assert!(r.contains(r#""ok":true"#), "{r}");
    run(c, "echo host > /tmp/three; echo MADE$((4+4))", "MADE8");
    let r = ctl(api, "abort", &[]);
    assert!(r.contains(r#""ok":true"#), "{r}");
    let line = run(c, LIST_TMP, "FILES7=");
    assert!(
        line.contains("/tmp/one") && !line.contains("/tmp/three"),
        "{line}"
    );
    let r = ctl(api, "status", &[]);
    assert!(r.contains(r#""depth":0"#), "{r}");
}

/// What the one boot leaves for the scenarios.
struct Booted {
    /// The snapshot taken at the ready line.
    snapshot: PathBuf,
    /// The last sequence number the guest's background `ping` had printed
    /// just before the snapshot (`None` for a given snapshot, which may
    /// have no such ping).
    seq_before: Option<u64>,
    /// The boot cache's entry for this boot (`None` for a given snapshot).
    entry: Option<PathBuf>,
    /// The vCPU count booted.
    cpus: String,
}

/// The one boot, shared by every test of this binary: `Err` (with the
/// reason) if it failed, so every test fails with it rather than booting
/// again.
static BOOTED: OnceLock<Result<Booted, String>> = OnceLock::new();

/// One scenario at a time after the boot: every guest emulates its kernel
/// on the host's two cores, so the scenarios do not pile 2-vCPU VMs onto
/// them (a busier host made the start-up faults of docs/speculation.md,
/// "User-space faults on this host", more frequent before their fix).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the scenario lock (a failed scenario does not block the others).
fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// For a scenario on a restored guest: the shared boot, and the scenario
/// lock held; `None` (after recording `test` as skipped) without the
/// images.
fn scenario(test: &str) -> Option<(&'static Booted, std::sync::MutexGuard<'static, ()>)> {
    let (kernel, initrd) = images(test)?;
    let b = booted(&kernel, &initrd);
    Some((b, one_at_a_time()))
}

/// The kernel and initramfs, or `None` after recording `test` as skipped.
fn images(test: &str) -> Option<(String, String)> {
    match (
        image("vmlinux"),
        image("initramfs.cpio"),
        image("disk.ext4"),
    ) {
        (Some(k), Some(i), Some(_)) => Some((k.display().to_string(), i.display().to_string())),
        _ => {
            record_skip(
                test,
                "images/out/{vmlinux,initramfs.cpio,disk.ext4} missing: run images/build.sh",
            );
            None
        }
    }
}

/// A snapshot to use instead of booting (`SPECVM_LINUX_SNAPSHOT=DIR`, for
/// working on the scenarios: a snapshot that an earlier run left in
/// `<target>/tmp/linux-snapshot`, or one taken by hand with `specvm ctl
/// snapshot`). With it the boot test reports itself skipped.
fn given_snapshot() -> Option<PathBuf> {
    std::env::var_os("SPECVM_LINUX_SNAPSHOT").map(PathBuf::from)
}

/// The booted guest's snapshot, booting it if no test has yet.
fn booted(kernel: &str, initrd: &str) -> &'static Booted {
    let r = BOOTED.get_or_init(|| {
        if let Some(snapshot) = given_snapshot() {
            return Ok(Booted {
                snapshot,
                seq_before: None,
                entry: None,
                cpus: linux_cpus(),
            });
        }
        std::panic::catch_unwind(|| boot_and_snapshot(kernel, initrd)).map_err(|e| {
            e.downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "the boot panicked".into())
        })
    });
    match r {
        Ok(b) => b,
        Err(e) => panic!("the shared Linux boot failed:\n{e}"),
    }
}

/// The log filter for specvm: `SPECVM_TEST_LOG=info,vmm::host_compat::emulate=trace`
/// shows every completed instruction.
fn log_filter() -> String {
    std::env::var("SPECVM_TEST_LOG").unwrap_or_else(|_| "info".into())
}

/// The vCPU count of the boot: two, so the boot checks SMP bring-up
/// through ACPI and every restored scenario runs an SMP guest;
/// SPECVM_LINUX_CPUS=1 boots a uniprocessor guest instead
/// (docs/linux-boot.md has the history of two-vCPU boots here).
fn linux_cpus() -> String {
    std::env::var("SPECVM_LINUX_CPUS").unwrap_or_else(|_| "2".into())
}

/// The MAC of the boot's network card. It is part of the boot cache's key,
/// so `scripts/demo` uses the same one and shares the entry.
const BOOT_MAC: &str = "52:54:00:00:00:01";

/// `specvm run` arguments for the boot's configuration: the boot cache
/// keys on them (with the files' contents), and `extra` may change them.
fn boot_args(kernel: &str, initrd: &str, cpus: &str, net: &str, api: &str) -> Vec<String> {
    [
        "--log-level",
        &log_filter(),
        "run",
        "--kernel",
        kernel,
        "--initrd",
        initrd,
        "--memory",
        "512M",
        "--cpus",
        cpus,
        "--net",
        net,
        "--api-sock",
        api,
        "--disk",
        &disk_arg(),
        "--boot-cache",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// The `--disk` of the boot and of every restore: the ext4 image that
/// images/build.sh makes, which the guest's init mounts on /mnt. The boot
/// cache runs it private (and keys on its content), so no VM of these
/// tests writes it.
fn disk_arg() -> String {
    let disk = image("disk.ext4").expect("images() checked images/out/disk.ext4");
    format!("path={}", disk.display())
}

/// The entry folder that the VMM's boot-cache line names.
fn entry_of(line: &str) -> PathBuf {
    let path = if let Some(rest) = line.split("saving the ready guest to ").nth(1) {
        rest.trim()
    } else if let Some(rest) = line.split("restoring the ready guest from ").nth(1) {
        rest.split(" (")
            .next()
            .unwrap_or(rest)
            .trim_end_matches("/snapshot")
    } else {
        panic!("no entry in the boot-cache line {line:?}")
    };
    PathBuf::from(path)
}

/// Boots Debian through the boot cache (a cold cache boots and saves the
/// ready guest; a warm one restores it), checks the CPUs and the network
/// card, snapshots it at the shell prompt, then sends a frame and reboots
/// it: a clean exit.
fn boot_and_snapshot(kernel: &str, initrd: &str) -> Booted {
    let tmp = std::env::temp_dir();
    let sock = tmp.join(format!("specvm-linux-test-{}.sock", std::process::id()));
    let frames = FrameListener::bind(&sock).collect();
    let net = format!("socket={},mac={BOOT_MAC}", sock.display());
    let api = tmp.join(format!("specvm-linux-api-{}.sock", std::process::id()));
    let api_arg = api.display().to_string();
    let snapshot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("linux-snapshot");
    let _ = std::fs::remove_dir_all(&snapshot);
    let cpus = linux_cpus();
    let started = Instant::now();
    let args = boot_args(kernel, initrd, &cpus, &net, &api_arg);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut c = Console::start(&args);
    let line = c.wait_stderr("specvm: boot cache:", Duration::from_secs(120));
    let cold = line.contains("saving the ready guest to");
    let entry = entry_of(&line);
    c.wait_for("SPECVM-READY", BOOT_TIMEOUT, |s| s.contains("SPECVM-READY"));
    eprintln!(
        "SPECVM-READY after {:?} ({})",
        started.elapsed(),
        if cold {
            "booted"
        } else {
            "restored from the boot cache"
        }
    );
    if cold {
        // The guest's `spec ready` made the VMM save it before the ready line.
        c.wait_stderr("boot cache: saved the ready guest", Duration::from_secs(60));
        assert!(entry.join("entry.json").is_file(), "{}", entry.display());
    }
    let want = format!("NCPU2={cpus}");
    let line = run(
        &mut c,
        "echo NCPU$((1+1))=$(grep -c ^processor /proc/cpuinfo)",
        "NCPU2=",
    );
    assert_eq!(line, want, "the guest's CPU count");
    let line = run(&mut c, "echo NET$((1+1))= /sys/class/net/*", "NET2=");
    assert!(line.contains("/sys/class/net/eth0"), "{line}");
    // The host-compat layer's glibc tunable reached the shell through the
    // kernel command line and init's environment, so guest processes keep
    // off AVX, whose registers this host's guest kernel cannot save
    // (vmm/src/host_compat/cmdline.rs).
    let line = run(&mut c, "echo TUNE$((1+1))=$GLIBC_TUNABLES", "TUNE2=");
    assert!(
        line.contains("glibc.cpu.hwcaps=") && line.contains("-AVX2,"),
        "{line}"
    );
    // A process that runs across the snapshot: a ping of the loopback
    // every second, whose sequence numbers each restored VM must carry on.
    run(
        &mut c,
        "ip link set lo up; ping -i 1 127.0.0.1 > /tmp/pings & echo PINGER$((1+1))",
        "PINGER2",
    );
    std::thread::sleep(Duration::from_secs(3));
    let seq_before = ping_seq(&mut c);
    assert!(seq_before > 0, "the background ping does not run");
    let r = ctl(
        &api,
        "snapshot",
        &["--path", &snapshot.display().to_string()],
    );
    assert!(r.contains(r#""ok":true"#), "snapshot: {r}");
    eprintln!("snapshot at {:?}: {r}", started.elapsed());
    // An ARP request for the gateway is the first frame the guest sends.
    run(
        &mut c,
        "ip addr replace 10.0.2.15/24 dev eth0; ip link set eth0 up; ping -c 1 -W 2 10.0.2.2; echo PING$((6*7))",
        "PING42",
    );
    let arp = frames
        .try_iter()
        .find(|f| f.len() >= 14 && f[12..14] == [0x08, 0x06]);
    assert!(
        arp.is_some(),
        "no ARP frame from the guest reached the socket"
    );
    c.send("reboot -f");
    c.wait_clean_exit("reboot -f");
    eprintln!("clean exit after {:?}", started.elapsed());
    Booted {
        snapshot,
        seq_before: Some(seq_before),
        entry: Some(entry),
        cpus,
    }
}

/// The last `seq=N` the guest's background ping wrote to /tmp/pings.
fn ping_seq(c: &mut Console) -> u64 {
    // `tail`, one process, rather than the shell's `read` over the whole
    // file: the guest kernel is emulated, a `read` builtin costs a system
    // call (about 20 ms here) per byte, and a loop that reads ping's ~60
    // bytes a second more slowly than ping writes them never reaches the
    // end of the file (it hung a restored VM for ten minutes).
    let line = run(c, "echo SEQ$((1+1))= $(tail -n 1 /tmp/pings)", "SEQ2=");
    line.split("seq=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no sequence number in {line:?}"))
}

/// A VM restored from the boot's snapshot, with its console and API socket.
struct Restored {
    console: Console,
    api: PathBuf,
}

impl Restored {
    fn start(b: &Booted, name: &str, id: u32, net: &str) -> Self {
        let api =
            std::env::temp_dir().join(format!("specvm-linux-{name}-{}.sock", std::process::id()));
        let started = Instant::now();
        let log = log_filter();
        let console = Console::start(&[
            "--log-level",
            &log,
            "run",
            "--restore",
            &b.snapshot.display().to_string(),
            "--net",
            net,
            "--id",
            &id.to_string(),
            "--disk",
            &disk_arg(),
            "--api-sock",
            &api.display().to_string(),
        ]);
        let mut r = Self { console, api };
        // The restored shell is waiting at its prompt.
        run(&mut r.console, "echo UP$((2*21))", "UP42");
        eprintln!(
            "{name}: restored and answering after {:?}",
            started.elapsed()
        );
        // The ping started before the snapshot goes on counting in every
        // restored VM, from where it was.
        if let Some(before) = b.seq_before {
            let first = ping_seq(&mut r.console);
            assert!(
                first >= before,
                "{name}: ping at seq {first}, before the snapshot's {before}"
            );
            std::thread::sleep(Duration::from_secs(3));
            let later = ping_seq(&mut r.console);
            assert!(later > first, "{name}: the ping stopped at seq {first}");
        }
        r
    }

    fn status(&self) -> String {
        ctl(&self.api, "status", &[])
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.api);
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn debian_boots_snapshots_and_reboots_cleanly() {
    skip_without_kvm!();
    let Some((kernel, initrd)) = images("linux::debian_boots_snapshots_and_reboots_cleanly") else {
        return;
    };
    if let Some(dir) = given_snapshot() {
        record_skip(
            "linux::debian_boots_snapshots_and_reboots_cleanly",
            &format!("SPECVM_LINUX_SNAPSHOT={} given: no boot", dir.display()),
        );
        return;
    }
    let b = booted(&kernel, &initrd);
    assert!(b.snapshot.join("state").is_file());
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn a_restored_linux_guest_speculates_and_rolls_back() {
    skip_without_kvm!();
    let Some((kernel, initrd)) = images("linux::a_restored_linux_guest_speculates_and_rolls_back")
    else {
        return;
    };
    let b = booted(&kernel, &initrd);
    let _one = one_at_a_time();
    // Not `specvm-linux-spec-*.sock`: that is the API socket of the VM
    // named "spec" (Restored::start), which must not take the card's path.
    let sock =
        std::env::temp_dir().join(format!("specvm-linux-spec-net-{}.sock", std::process::id()));
    let _frames = FrameListener::bind(&sock).collect();
    let net = format!("socket={}", sock.display());
    let mut vm = Restored::start(b, "spec", 21, &net);
    guest_speculation(&mut vm.console);
    host_speculation(&mut vm.console, &vm.api);
    // Many rollbacks: the guest's clock and shell stay sane.
    let line = run(
        &mut vm.console,
        "n=0; for i in 1 2 3 4 5; do if spec speculate; then echo x > /tmp/r$i; spec abort; else n=$((n+1)); fi; done; echo ROLLED$((1+1))=$n",
        "ROLLED2=",
    );
    assert_eq!(line, "ROLLED2=5");
    let line = run(&mut vm.console, LIST_TMP, "FILES7=");
    assert!(
        line.contains("/tmp/one") && !line.contains("/tmp/r"),
        "{line}"
    );
    // The ACPI power-off path ends the VMM cleanly (the boot test checks
    // the i8042 reset).
    vm.console.send("poweroff -f");
    vm.console.wait_clean_exit("poweroff -f");
}

/// A snapshot restored long after it was taken: the guest's clocks jump
/// by that time (the restore moves them on), which Linux's RCU stall
/// detector took for a stall of every CPU (21 s on Debian's kernel): a
/// page of `rcu: INFO: rcu_preempt detected stalls` and backtraces on the
/// console at every such restore. The VMM now tells the guest's kvmclock
/// that the host stopped it (`KVM_KVMCLOCK_CTRL`), and the guest prints
/// nothing. The test waits until the snapshot is 30 s old (at most that
/// long, once: the other scenarios have often aged it already).
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn a_snapshot_restored_long_after_reports_no_stall() {
    skip_without_kvm!();
    let Some((b, _one)) = scenario("linux::a_snapshot_restored_long_after_reports_no_stall") else {
        return;
    };
    let taken = std::fs::metadata(b.snapshot.join("state"))
        .and_then(|m| m.modified())
        .expect("the snapshot's state file");
    let age = taken.elapsed().unwrap_or_default();
    let wait = Duration::from_secs(30).saturating_sub(age);
    eprintln!("the snapshot is {age:?} old; waiting {wait:?} more");
    std::thread::sleep(wait);
    let sock =
        std::env::temp_dir().join(format!("specvm-linux-late-net-{}.sock", std::process::id()));
    let _frames = FrameListener::bind(&sock).collect();
    let net = format!("socket={}", sock.display());
    let mut vm = Restored::start(b, "late", 25, &net);
    // Stall reports come from the first ticks after the jump; by now the
    // guest has answered several commands (Restored::start).
    let line = run(&mut vm.console, "echo LATE$((2+3))", "LATE5");
    assert_eq!(line, "LATE5");
    no_stall_report(&vm.console, "after the restore");
    vm.console.send("poweroff -f");
    vm.console.wait_clean_exit("poweroff -f");
}

/// Fails if the guest's console so far holds a stall report.
fn no_stall_report(c: &Console, when: &str) {
    for report in ["detected stall", "soft lockup", "stalls on CPUs"] {
        assert!(
            !c.all.contains(report),
            "{when}, the guest reported {report:?}; console:\n{}",
            c.all
        );
    }
}

/// The bzImage path: the same kernel as a bzImage, which decompresses
/// itself in the guest (about 90 s here) and starts. It stops at the
/// kernel's first console line.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn a_bzimage_decompresses_and_starts() {
    skip_without_kvm!();
    const NAME: &str = "linux::a_bzimage_decompresses_and_starts";
    let Some((kernel, initrd)) = images(NAME) else {
        return;
    };
    let Some(bz) = image("bzImage") else {
        record_skip(NAME, "images/out/bzImage missing: run images/build.sh");
        return;
    };
    // After the shared boot, and alone (see `ONE_AT_A_TIME`).
    booted(&kernel, &initrd);
    let _one = one_at_a_time();
    let started = Instant::now();
    let mut c = Console::start(&[
        "--log-level",
        "info",
        "run",
        "--kernel",
        &bz.display().to_string(),
        "--memory",
        "256M",
    ]);
    c.wait_for("the kernel's banner", BOOT_TIMEOUT, |s| {
        s.contains("Linux version")
    });
    eprintln!("bzImage: \"Linux version\" after {:?}", started.elapsed());
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn two_linux_guests_ping_and_a_receiver_rolls_back_with_the_sender() {
    skip_without_kvm!();
    let Some((kernel, initrd)) =
        images("linux::two_linux_guests_ping_and_a_receiver_rolls_back_with_the_sender")
    else {
        return;
    };
    let b = booted(&kernel, &initrd);
    let _one = one_at_a_time();
    let bridge = specvm_tests::NetBridge::start("linux-pair");
    let net = bridge.net_arg();
    let mut a = Restored::start(b, "a", 11, &net);
    let mut bb = Restored::start(b, "b", 12, &net);
    // Both come from one snapshot: give each its own MAC and address.
    for (vm, n) in [(&mut a, 1), (&mut bb, 2)] {
        run(
            &mut vm.console,
            &format!(
                "ip link set eth0 address 52:54:00:00:00:1{n}; ip addr replace 10.0.0.{n}/24 dev eth0; \
                 ip link set eth0 up; echo IF$((1+1))=$?"
            ),
            "IF2=",
        );
    }
    let ping = "if ping -c 1 -W 20 10.0.0.2 > /dev/null; then echo PING$((1+1))=ok; else echo PING$((1+1))=lost; fi";
    assert_eq!(run(&mut a.console, ping, "PING2="), "PING2=ok");

    // B listens with busybox nc (TCP), writing what it receives to a file.
    // (TCP's handshake through two emulated kernels takes ~10 s here, hence
    // nc's 60 s timeout.)
    run(
        &mut bb.console,
        "nc -l -p 9000 > /tmp/got & echo LISTEN$((1+1))",
        "LISTEN2",
    );
    let got = "g=; read -r g < /tmp/got; echo GOT$((1+1))= $g";
    // A speculates and sends to B: B joins A's speculation when the first
    // tagged packet arrives (rules 2, 7), and its nc writes the file.
    assert_eq!(
        run(
            &mut a.console,
            "spec speculate; echo SPEC$((1+1))=$?",
            "SPEC2="
        ),
        "SPEC2=0"
    );
    assert_eq!(
        run(
            &mut a.console,
            "echo hello | nc -w 60 10.0.0.2 9000; echo SENT$((1+1))=$?",
            "SENT2="
        ),
        "SENT2=0"
    );
    let st = bb.status();
    assert!(
        st.contains(r#""depth":1"#)
            && st.contains(r#""id":"11:"#)
            && st.contains(r#""explicit":false"#),
        "B did not join A's speculation: {st}"
    );
    assert_eq!(run(&mut bb.console, got, "GOT2="), "GOT2= hello");
    // A aborts: A's shell is back at `spec speculate`, now with status 1,
    // and B rolls back to just before the first packet (rule 4): its file
    // is empty again and its nc listens again.
    a.console.send("spec abort");
    a.console.wait_for("the rollback", COMMAND_TIMEOUT, |s| {
        full_line(s, "SPEC2=").is_some()
    });
    assert_eq!(
        full_line(&a.console.seen, "SPEC2=").as_deref(),
        Some("SPEC2=1")
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let st = bb.status();
        if st.contains(r#""depth":0"#) {
            break;
        }
        assert!(Instant::now() < deadline, "B did not roll back: {st}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(run(&mut bb.console, got, "GOT2="), "GOT2=");
    // Outside any speculation the same send lands for good.
    assert_eq!(
        run(
            &mut a.console,
            "echo again | nc -w 60 10.0.0.2 9000; echo SENT$((1+1))=$?",
            "SENT2="
        ),
        "SENT2=0"
    );
    assert_eq!(run(&mut bb.console, got, "GOT2="), "GOT2= again");
    assert!(bb.status().contains(r#""depth":0"#));
    let events = bridge.events();
    assert!(events.contains(r#""event":"aborted""#), "{events}");
    // Both go on: the rolled-back pair still talks.
    assert_eq!(run(&mut a.console, ping, "PING2="), "PING2=ok");
}

/// The cache folder that holds `entry` (`<root>/boot/<digest>`).
fn cache_root_of(entry: &Path) -> PathBuf {
    entry
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("{} is not in a cache", entry.display()))
        .to_path_buf()
}

/// The image, the shared boot and its cache entry; `None` after recording
/// `test` as skipped.
fn booted_entry(test: &str) -> Option<(String, String, &'static Booted, PathBuf)> {
    let (kernel, initrd) = images(test)?;
    let b = booted(&kernel, &initrd);
    let Some(entry) = b.entry.clone() else {
        record_skip(
            test,
            "SPECVM_LINUX_SNAPSHOT given: no boot, so no cache entry",
        );
        return None;
    };
    Some((kernel, initrd, b, entry))
}

/// The warm path: a second start of the same image and configuration
/// restores the ready guest that the boot saved (or that an earlier run
/// saved, on a warm cache), and it answers at its prompt.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn the_boot_cache_restores_the_ready_guest() {
    skip_without_kvm!();
    const NAME: &str = "linux::the_boot_cache_restores_the_ready_guest";
    let Some((kernel, initrd, b, entry)) = booted_entry(NAME) else {
        return;
    };
    let _one = one_at_a_time();
    let tmp = std::env::temp_dir();
    let sock = tmp.join(format!("specvm-linux-warm-{}.sock", std::process::id()));
    let _frames = FrameListener::bind(&sock).collect();
    let net = format!("socket={},mac={BOOT_MAC}", sock.display());
    let api = tmp.join(format!("specvm-linux-warm-api-{}.sock", std::process::id()));
    let mut args = boot_args(&kernel, &initrd, &b.cpus, &net, &api.display().to_string());
    args.push("--boot-cache-dir".into());
    args.push(cache_root_of(&entry).display().to_string());
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let started = Instant::now();
    let mut c = Console::start(&args);
    let line = c.wait_stderr("specvm: boot cache:", Duration::from_secs(120));
    assert!(
        line.contains("restoring the ready guest from")
            && entry_of(&line).canonicalize().ok() == entry.canonicalize().ok(),
        "not a restore of {}: {line}",
        entry.display()
    );
    c.wait_for("SPECVM-READY", COMMAND_TIMEOUT, |s| {
        s.contains("SPECVM-READY")
    });
    run(&mut c, "echo UP$((2*21))", "UP42");
    eprintln!("warm start: answering after {:?}", started.elapsed());
    let line = run(
        &mut c,
        "echo NCPU$((1+1))=$(grep -c ^processor /proc/cpuinfo)",
        "NCPU2=",
    );
    assert_eq!(line, format!("NCPU2={}", b.cpus));
    c.send("poweroff -f");
    c.wait_clean_exit("poweroff -f");
    let _ = std::fs::remove_file(&api);
}

/// A private copy of cache entry `entry` under `root`: hard links to its
/// snapshot files (a copy where linking fails), a copy of its record.
fn copy_entry(entry: &Path, root: &Path) -> PathBuf {
    let dest = root
        .join("boot")
        .join(entry.file_name().expect("an entry name"));
    std::fs::create_dir_all(dest.join("snapshot")).unwrap();
    std::fs::copy(entry.join("entry.json"), dest.join("entry.json")).unwrap();
    for f in std::fs::read_dir(entry.join("snapshot")).unwrap().flatten() {
        let to = dest.join("snapshot").join(f.file_name());
        if std::fs::hard_link(f.path(), &to).is_err() {
            std::fs::copy(f.path(), &to).unwrap();
        }
    }
    dest
}

/// A changed initramfs (one byte), a changed command line, another memory
/// size and a damaged entry each make the VMM boot instead of restoring,
/// with the reason on one line. Each VMM is stopped as soon as it has
/// started booting; the entries are private copies (hard links) of the
/// boot's, never the user's cache.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn a_changed_image_or_configuration_boots_again_and_says_why() {
    skip_without_kvm!();
    const NAME: &str = "linux::a_changed_image_or_configuration_boots_again_and_says_why";
    let Some((kernel, initrd, b, entry)) = booted_entry(NAME) else {
        return;
    };
    let _one = one_at_a_time();
    let tmp = std::env::temp_dir().join(format!("specvm-linux-bc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    struct Cleanup(PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _cleanup = Cleanup(tmp.clone());
    let root = tmp.join("cache");
    let copy = copy_entry(&entry, &root);
    let sock = tmp.join("net.sock");
    let _frames = FrameListener::bind(&sock).collect();
    let net = format!("socket={},mac={BOOT_MAC}", sock.display());
    let api = tmp.join("api.sock").display().to_string();

    // The files are the same: the copy is a hit, which the VMM restores.
    // (Checked first, so every miss below is a miss of a good entry.)
    let attempt = |initrd: &str, extra: &[&str], want: &[&str]| {
        let mut args = boot_args(&kernel, initrd, &b.cpus, &net, &api);
        args.push("--boot-cache-dir".into());
        args.push(root.display().to_string());
        // `extra` is flag/value pairs, replacing the boot's own.
        for pair in extra.chunks(2) {
            match args.iter().position(|a| a == pair[0]) {
                Some(i) => args[i + 1] = pair[1].to_string(),
                None => args.extend(pair.iter().map(|s| s.to_string())),
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut c = Console::start(&args);
        let line = c.wait_stderr("specvm: boot cache:", Duration::from_secs(120));
        for w in want {
            assert!(line.contains(w), "expected {w:?} in: {line}");
        }
        line
        // Dropping `c` kills this VMM, by its PID.
    };
    attempt(&initrd, &[], &["restoring the ready guest from"]);

    let changed = tmp.join("initramfs.cpio");
    let mut bytes = std::fs::read(&initrd).unwrap();
    bytes.push(0);
    std::fs::write(&changed, &bytes).unwrap();
    attempt(
        &changed.display().to_string(),
        &[],
        &["differs in: initrd (its content changed)", "booting"],
    );
    attempt(
        &initrd,
        &["--cmdline", "console=ttyS0 reboot=k panic=-1 quiet"],
        &["differs in: command line", "booting"],
    );
    attempt(
        &initrd,
        &["--memory", "256M"],
        &[
            "differs in: memory (268435456 now, 536870912 saved)",
            "booting",
        ],
    );

    // Damage: one byte of the saved state file (a copy, not a link).
    let state = copy.join("snapshot/state");
    let mut bytes = std::fs::read(&state).unwrap();
    std::fs::remove_file(&state).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&state, &bytes).unwrap();
    attempt(
        &initrd,
        &[],
        &[
            "damaged entry",
            "state changed since it was saved",
            "booting",
        ],
    );
}

/// `images/out/tools/NAME` (the pinned e2fsprogs that made the disk) on
/// `args`: (exit status, stdout and stderr).
fn e2fs_tool(name: &str, args: &[&str]) -> (i32, String) {
    let tool = image(&format!("tools/{name}"))
        .unwrap_or_else(|| panic!("images/out/tools/{name} missing: run images/build.sh"));
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// A file's bytes (the 64 MiB disk image).
fn file_bytes(p: &Path) -> Vec<u8> {
    std::fs::read(p).expect("read the image")
}

/// Issue 14's Linux scenario: a restored Debian guest writes its ext4 disk
/// (/dev/vda on /mnt) under speculations. An aborted write is gone, a
/// committed one stays, and the host's own e2fsck finds the exported disk
/// clean; the image file itself is never written.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn a_linux_guest_s_disk_writes_follow_its_speculations() {
    skip_without_kvm!();
    let Some((b, _one)) = scenario("linux::a_linux_guest_s_disk_writes_follow_its_speculations")
    else {
        return;
    };
    let disk = image("disk.ext4").expect("checked by images()");
    let before = file_bytes(&disk);
    let sock =
        std::env::temp_dir().join(format!("specvm-linux-disk-net-{}.sock", std::process::id()));
    let _frames = FrameListener::bind(&sock).collect();
    let mut vm = Restored::start(b, "disk", 22, &format!("socket={}", sock.display()));
    let line = run(
        &mut vm.console,
        "echo MNT$((1+1))= $(grep -c '^/dev/vda /mnt ext4' /proc/mounts) $(cat /mnt/hello)",
        "MNT2=",
    );
    assert_eq!(line, "MNT2= 1 hello from the specvm disk image");
    // Abort: the file was written and synced to the disk, and is gone
    // with the rollback (the shell is back at `spec speculate`, which now
    // returns non-zero, so the `then` part is not run again).
    let line = run(
        &mut vm.console,
        "if spec speculate; then echo x > /mnt/f; sync; spec abort; fi; echo DISKA$((1+1))= /mnt/*",
        "DISKA2=",
    );
    assert!(
        line.contains("/mnt/hello") && !line.contains("/mnt/f"),
        "after the abort: {line}"
    );
    // Commit: the file stays.
    let line = run(
        &mut vm.console,
        "if spec speculate; then echo y > /mnt/g; sync; spec commit; fi; echo DISKC$((1+1))= /mnt/* $(cat /mnt/g)",
        "DISKC2=",
    );
    assert!(
        line.contains("/mnt/g") && !line.contains("/mnt/f") && line.ends_with(" y"),
        "after the commit: {line}"
    );
    // Unmounted, the disk is a clean file system: exported, the host's
    // e2fsck (-f: check even if marked clean, -n: change nothing) passes,
    // and debugfs sees g with its content and no f.
    let line = run(
        &mut vm.console,
        "umount /mnt; echo UMOUNT$((1+1))=$?",
        "UMOUNT2=",
    );
    assert_eq!(line, "UMOUNT2=0");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("linux-disk-export-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&out);
    let r = ctl(
        &vm.api,
        "disk-export",
        &["--path", &out.display().to_string()],
    );
    assert!(r.contains(r#""ok":true"#), "disk-export: {r}");
    let outs = out.display().to_string();
    let (st, text) = e2fs_tool("e2fsck", &["-fn", &outs]);
    assert_eq!(st, 0, "e2fsck of the exported disk:\n{text}");
    let (_, text) = e2fs_tool("debugfs", &["-R", "ls -p /", &outs]);
    assert!(
        text.contains("/g/") && !text.contains("/f/"),
        "debugfs ls of the exported disk:\n{text}"
    );
    let (_, text) = e2fs_tool("debugfs", &["-R", "cat /g", &outs]);
    assert!(text.lines().any(|l| l == "y"), "debugfs cat /g:\n{text}");
    let _ = std::fs::remove_file(&out);
    vm.console.send("poweroff -f");
    vm.console.wait_clean_exit("poweroff -f");
    assert!(file_bytes(&disk) == before, "the image file was written");
}

/// Two VMs restored from one snapshot write "the same" disk: each sees its
/// own files and never the other's, and the image file is not written.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
#[cfg_attr(
    all(not(no_kvm), no_linux_image),
    ignore = "no Linux guest image (run images/build.sh), or SPECVM_SKIP_LINUX set"
)]
fn two_restored_linux_guests_each_have_their_own_disk() {
    skip_without_kvm!();
    let Some((b, _one)) = scenario("linux::two_restored_linux_guests_each_have_their_own_disk")
    else {
        return;
    };
    let disk = image("disk.ext4").expect("checked by images()");
    let before = file_bytes(&disk);
    let sock = |n: &str| {
        std::env::temp_dir().join(format!(
            "specvm-linux-clone{n}-net-{}.sock",
            std::process::id()
        ))
    };
    let (sa, sb) = (sock("a"), sock("b"));
    let _fa = FrameListener::bind(&sa).collect();
    let _fb = FrameListener::bind(&sb).collect();
    let mut a = Restored::start(b, "clonea", 23, &format!("socket={}", sa.display()));
    let mut bb = Restored::start(b, "cloneb", 24, &format!("socket={}", sb.display()));
    for (vm, n) in [(&mut a, "a"), (&mut bb, "b")] {
        let line = run(
            &mut vm.console,
            &format!("echo {n} > /mnt/from-{n}; sync; echo WROTE$((1+1))=$?"),
            "WROTE2=",
        );
        assert_eq!(line, "WROTE2=0", "clone {n}");
    }
    for (vm, mine, theirs) in [(&mut a, "a", "b"), (&mut bb, "b", "a")] {
        let line = run(&mut vm.console, "echo LS$((1+1))= /mnt/*", "LS2=");
        assert!(
            line.contains(&format!("/mnt/from-{mine}"))
                && !line.contains(&format!("/mnt/from-{theirs}")),
            "clone {mine} sees: {line}"
        );
    }
    for vm in [&mut a, &mut bb] {
        vm.console.send("poweroff -f");
        vm.console.wait_clean_exit("poweroff -f");
    }
    assert!(file_bytes(&disk) == before, "the image file was written");
}
