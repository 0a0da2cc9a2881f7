//! The `netbridge` binary against clients that misbehave: a port that
//! floods it with 64 KiB frames, a bad 64 KiB first message, a stdout that
//! closes (`netbridge ... | head -1`), and bad flags.
//!
//! Every bridge a test starts is ended by its PID (on drop too, when the
//! test fails), and its directory is removed.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, encode_frame, framed, read_message, write_message, Control, Message,
};

const TIMEOUT: Duration = Duration::from_secs(30);

/// A bridge process of this test, with its directory and stderr.
struct Bridge {
    child: Child,
    dir: PathBuf,
    stderr: Option<std::thread::JoinHandle<String>>,
}

impl Bridge {
    /// Starts `netbridge --listen DIR/br.sock ARGS`, its stdout piped when
    /// `stdout` (else gone), stderr collected.
    fn start(name: &str, args: &[&str], stdout: bool) -> Self {
        let dir = std::env::temp_dir().join(format!("netbridge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("creating the test's directory");
        let mut child = Command::new(env!("CARGO_BIN_EXE_netbridge"))
            .arg("--listen")
            .arg(dir.join("br.sock"))
            // Raw test ports do not renew a lease.
            .args(["--lease-ms", "600000"])
            .args(args)
            .stdin(Stdio::null())
            .stdout(if stdout {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting netbridge");
        let mut pipe = child.stderr.take().expect("stderr is piped");
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        });
        let b = Self {
            child,
            dir,
            stderr: Some(stderr),
        };
        let deadline = Instant::now() + TIMEOUT;
        while !b.sock().exists() {
            assert!(
                Instant::now() < deadline,
                "the bridge socket never appeared"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        b
    }

    fn sock(&self) -> PathBuf {
        self.dir.join("br.sock")
    }

    fn stdout(&mut self) -> ChildStdout {
        self.child.stdout.take().expect("stdout is piped")
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// A port for VM `vm`, welcomed.
    fn connect(&self, vm: u32, speculative: bool) -> Port {
        let s = UnixStream::connect(self.sock()).expect("connecting");
        s.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
        let mut p = Port(s);
        p.control(&Control::Hello { vm, speculative });
        assert!(
            matches!(p.recv(), Some(Message::Control(Control::Welcome { .. }))),
            "no welcome"
        );
        p
    }

    /// Ends the bridge with SIGTERM (by its PID): its status and stderr.
    fn stop(mut self) -> (i32, String) {
        let ok = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .expect("running kill");
        assert!(ok.success());
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("waiting") {
                break s;
            }
            assert!(
                Instant::now() < deadline,
                "the bridge did not end on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        let stderr = self.stderr.take().map(|h| h.join().unwrap_or_default());
        (status.code().unwrap_or(-1), stderr.unwrap_or_default())
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Port(UnixStream);

impl Port {
    fn send(&mut self, msg: &[u8]) {
        write_message(&mut self.0, msg).expect("sending");
    }

    fn control(&mut self, c: &Control) {
        self.send(&encode_control(c));
    }

    /// The next message, or None when the port is closed.
    fn recv(&mut self) -> Option<Message> {
        let buf = read_message(&mut self.0).ok()?;
        Some(decode(&buf).expect("a message the bridge sent"))
    }

    /// Waits until the bridge has handled everything this port sent: a
    /// late join of `decided` (an id of the port's own VM that it has
    /// resolved) gets its outcome back at once, after the rest.
    fn sync(&mut self, decided: SpecId) {
        self.control(&Control::Joined { ids: vec![decided] });
        loop {
            match self.recv() {
                Some(Message::Control(Control::Decided { id, .. })) if id == decided => return,
                Some(_) => {}
                None => panic!("the bridge closed the port"),
            }
        }
    }
}

/// A UDP/IPv4 broadcast frame of about `len` bytes from host `src`, tagged
/// with `tags`.
fn broadcast(src: u8, len: usize, tags: &[SpecId]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, src], [0xff; 6])
        .ipv4([10, 0, 0, src], [10, 0, 0, 255], 64)
        .udp(1000, 2000);
    let mut f = Vec::new();
    b.write(&mut f, &vec![0x5a; len - 42 - 16])
        .expect("building a frame");
    codec::retag(&f, tags).expect("tagging")
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .expect("a VmRSS line");
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in kB")
}

// Finding 14: the bridge had no byte limits; a port could make it hold
// 4,096 frames of 64 KiB for each port that cannot roll back, and 1,024 for
// each port that reads slowly.
#[test]
fn a_port_flooding_64k_frames_is_bounded_in_bytes() {
    let bridge = Bridge::start("flood", &["--quiet"], false);
    let mut a = bridge.connect(1, true);
    // Neither reads: b cannot roll back (tagged frames are held for it),
    // c reads nothing (frames queue for it).
    let b = bridge.connect(2, false);
    let c = bridge.connect(3, true);
    let (open, done) = (SpecId { vm: 1, seq: 1 }, SpecId { vm: 1, seq: 2 });
    a.control(&Control::Started { id: open });
    a.control(&Control::Started { id: done });
    a.control(&Control::Resolved {
        id: done,
        outcome: specwire::protocol::Outcome::Commit,
    });
    a.sync(done);
    let before = rss_kib(bridge.pid());
    let frame = broadcast(1, 65_000, &[open]);
    let msg = framed(&encode_frame(&frame));
    let frames = 4_500;
    for _ in 0..frames {
        a.0.write_all(&msg).expect("flooding");
    }
    a.sync(done);
    let after = rss_kib(bridge.pid());
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "bridge RSS {before} KiB before, {after} KiB after {frames} frames of {} bytes",
        frame.len()
    );
    // The budgets: 8 MiB held for b, 2 MiB queued for c (plus what c's
    // socket buffer took). Without them: 256 MiB and 64 MiB.
    assert!(grown_mib < 40, "the bridge grew by {grown_mib} MiB");
    // c hangs up; b is still connected when the bridge ends.
    drop(c);
    let (status, stderr) = bridge.stop();
    drop(b);
    assert_eq!(status, 0, "{stderr}");
    // b's and c's drops are counted and said once each, at their end or
    // the bridge's, whichever comes first (c's hang-up may not have been
    // seen before the signal).
    let drops: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("frames for the port were dropped"))
        .collect();
    assert_eq!(drops.len(), 2, "{stderr}");
}

// The bad first message of 64 KiB made about 164 KB of log.
#[test]
fn a_bad_64k_first_message_makes_a_short_log_line() {
    let bridge = Bridge::start("badhello", &["--quiet"], false);
    let mut s = UnixStream::connect(bridge.sock()).expect("connecting");
    s.set_read_timeout(Some(TIMEOUT)).expect("a timeout");
    s.write_all(&framed(&encode_frame(&vec![0xab; 65_535])))
        .expect("sending");
    let mut buf = [0u8; 1];
    assert_eq!(
        s.read(&mut buf).expect("reading"),
        0,
        "closed by the bridge"
    );
    // And a control message of 64 KiB that is not JSON, after a hello.
    let mut p = bridge.connect(1, true);
    let mut bad = vec![specwire::protocol::KIND_CONTROL];
    bad.extend(std::iter::repeat_n(b'[', 65_000));
    p.send(&bad);
    assert_eq!(p.recv(), None, "closed by the bridge");
    let (status, stderr) = bridge.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("a frame of 65535 bytes"), "{stderr}");
    assert!(stderr.len() < 4096, "{} bytes of log", stderr.len());
}

// `netbridge ... | head -1` panicked a worker on the broken pipe.
#[test]
fn a_closed_stdout_stops_the_printing_not_the_bridge() {
    let mut bridge = Bridge::start("head", &[], true);
    let mut out = BufReader::new(bridge.stdout());
    let _a = bridge.connect(1, true);
    let mut line = String::new();
    out.read_line(&mut line).expect("the first event");
    assert!(line.contains("port-up"), "{line}");
    drop(out); // as `head -1` does
               // Events keep coming; the bridge keeps serving.
    for vm in 2..6 {
        let p = bridge.connect(vm, true);
        drop(p);
    }
    std::thread::sleep(Duration::from_millis(200));
    assert!(bridge.running(), "the bridge ended");
    let _b = bridge.connect(9, true);
    let (status, stderr) = bridge.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        stderr.matches("events are no longer printed").count(),
        1,
        "{stderr}"
    );
}

// netbridge's parse errors were clap's multi-line text.
#[test]
fn bad_flags_are_one_error_line() {
    let run = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_netbridge"))
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running netbridge")
    };
    for args in [
        &["--bogus"][..],
        &[],
        &["--listen", "x", "--uplink", "nope"],
    ] {
        let o = run(args);
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.starts_with("netbridge: error: "), "{stderr}");
    }
    for flag in ["--help", "--version"] {
        let o = run(&[flag]);
        assert_eq!(o.status.code(), Some(0), "{flag}");
        assert!(!o.stdout.is_empty() && o.stderr.is_empty(), "{flag}");
    }
}

// Issue 12: the bridge queued control messages for a port without bound; a
// port that acknowledged its outcomes without reading them could grow it
// for ever (joined for ids of VMs not connected are each answered).
#[test]
fn a_port_that_acks_without_reading_is_closed() {
    let bridge = Bridge::start("noread", &["--quiet"], false);
    let mut p = bridge.connect(1, true);
    let (rounds, per_round) = (40u32, netbridge::bridge::UNACKED_MAX as u32);
    let mut seq = 0u64;
    let mut sent = 0u64;
    for r in 0..rounds {
        let ids = (0..per_round)
            .map(|i| SpecId::new(5000 + r, i + 1))
            .collect();
        let mut out = framed(&encode_control(&Control::Joined { ids }));
        for _ in 0..per_round {
            seq += 1;
            out.extend(framed(&encode_control(&Control::Ack { seq })));
        }
        if p.0.write_all(&out).is_err() {
            break; // closed by the bridge
        }
        sent += u64::from(per_round);
    }
    let mut got = 0u64;
    while p.recv().is_some() {
        got += 1;
    }
    assert!(
        got < sent,
        "the bridge kept all {sent} answers for a port that read none"
    );
    let (status, stderr) = bridge.stop();
    assert_eq!(status, 0, "{stderr}");
    assert!(stderr.contains("control messages wait for it"), "{stderr}");
}
