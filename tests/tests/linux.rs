//! `specvm run --kernel`: Debian's kernel and the project's initramfs
//! (`images/build.sh`), booted once, driven through the serial console.
//!
//! On a `kvm_pvm` host the boot takes about 20 minutes, so the test is
//! `#[ignore]`d by default; run it with
//! `cargo test -p specvm-tests --test linux -- --ignored --nocapture`.
//! Without the image or without KVM it records itself as skipped.

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use specvm_tests::{record_skip, skip_without_kvm, specvm_bin};

/// Time to the init script's ready line; ~21 min measured here.
const BOOT_TIMEOUT: Duration = Duration::from_secs(45 * 60);
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
}

impl Console {
    fn start(args: &[&str]) -> Self {
        let mut child = Command::new(specvm_bin())
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start specvm");
        let stdin = child.stdin.take().expect("stdin is piped");
        let mut out = child.stdout.take().expect("stdout is piped");
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
        }
    }

    /// Waits until the console output since the last match satisfies
    /// `found`; panics with the output on timeout.
    fn wait_for(&mut self, what: &str, timeout: Duration, found: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !found(&self.seen) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(c) => self.seen.push_str(&String::from_utf8_lossy(&c)),
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

#[test]
#[ignore = "boots Debian's kernel: ~20 minutes on this project's hosts; run with --ignored"]
fn debian_boots_to_ready_counts_cpus_and_reboots_cleanly() {
    skip_without_kvm!();
    let (Some(kernel), Some(initrd)) = (image("vmlinux"), image("initramfs.cpio")) else {
        record_skip(
            "linux::debian_boots_to_ready_counts_cpus_and_reboots_cleanly",
            "images/out/{vmlinux,initramfs.cpio} missing: run images/build.sh",
        );
        return;
    };
    let (kernel, initrd) = (kernel.display().to_string(), initrd.display().to_string());
    let started = Instant::now();
    let mut c = Console::start(&[
        "--log-level",
        "info",
        "run",
        "--kernel",
        &kernel,
        "--initrd",
        &initrd,
        "--memory",
        "512M",
        "--cpus",
        "2",
    ]);
    c.wait_for("SPECVM-READY", BOOT_TIMEOUT, |s| s.contains("SPECVM-READY"));
    eprintln!("SPECVM-READY after {:?}", started.elapsed());
    c.send("echo CPUS=$(grep -c ^processor /proc/cpuinfo)");
    c.wait_for("the CPU count", COMMAND_TIMEOUT, |s| {
        s.contains("CPUS=2\n") || s.contains("CPUS=2\r")
    });
    c.send("reboot -f");
    let deadline = Instant::now() + COMMAND_TIMEOUT;
    let status = loop {
        if let Some(st) = c.child.try_wait().expect("wait for specvm") {
            break st;
        }
        assert!(Instant::now() < deadline, "no clean exit after reboot -f");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        status.success(),
        "specvm ended with {status} after reboot -f"
    );
    eprintln!("clean exit after {:?}", started.elapsed());
}
