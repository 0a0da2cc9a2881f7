//! A `net_node` bare guest (guests/src/bin/net_node.rs) driven through
//! its console and its API socket: the VM of the bridge, peering,
//! registry and graph tests.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{bare_guest, run_specvm, spawn_specvm, Spawned};

/// How long a console line, an API answer or a stack depth is waited for.
pub const TIMEOUT: Duration = Duration::from_secs(60);

/// Polls `f` every 2 ms (the tests time rollbacks with it) until it
/// holds or `timeout` passes.
pub fn poll(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The `depth` of a `status` answer.
pub fn depth_of(status: &str) -> Option<usize> {
    let rest = &status[status.find(r#""depth":"#)? + r#""depth":"#.len()..];
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

/// The raw `status` answer of the API at `sock` (empty if it does not
/// answer).
pub fn api_status(sock: &Path) -> String {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(TIMEOUT));
    if s.write_all(b"{\"op\":\"status\"}\n").is_err() {
        return String::new();
    }
    let mut line = String::new();
    let _ = BufReader::new(s).read_line(&mut line);
    line
}

/// A running `net_node` VM. Console lines read while waiting for another
/// are kept for later `expect`s.
pub struct NetNode {
    vm: Option<Spawned>,
    sock: PathBuf,
    pending: VecDeque<String>,
}

impl NetNode {
    /// Starts VM `id` on the card `net` (a `--net` value), with its API
    /// socket `vm<id>.sock` in `dir`, and waits until it is ready.
    pub fn start(dir: &Path, id: u32, net: &str) -> Self {
        let sock = dir.join(format!("vm{id}.sock"));
        let guest = bare_guest("net_node");
        let vm = spawn_specvm(&[
            "run",
            "--bare",
            guest.to_str().expect("UTF-8 path"),
            "--id",
            &id.to_string(),
            "--net",
            net,
            "--api-sock",
            sock.to_str().expect("UTF-8 path"),
        ]);
        let mut n = Self {
            vm: Some(vm),
            sock,
            pending: VecDeque::new(),
        };
        n.expect("net_node: ready");
        assert!(poll(TIMEOUT, || n.sock.exists()), "no API socket");
        n
    }

    /// The VM's process.
    pub fn vm(&mut self) -> &mut Spawned {
        self.vm.as_mut().expect("running")
    }

    /// The VM's process, for the test to end itself.
    pub fn into_vm(mut self) -> Spawned {
        self.vm.take().expect("running")
    }

    /// The VMM's PID.
    pub fn pid(&self) -> u32 {
        self.vm.as_ref().expect("running").pid()
    }

    /// The API socket.
    pub fn sock(&self) -> &Path {
        &self.sock
    }

    /// Waits for a console line that `matches`.
    fn expect_by(&mut self, what: &str, matches: impl Fn(&str) -> bool) {
        if let Some(i) = self.pending.iter().position(|l| matches(l)) {
            self.pending.remove(i);
            return;
        }
        loop {
            match self.vm().wait_for_line("", TIMEOUT).map(unglue) {
                Ok(l) if matches(&l) => return,
                Ok(l) => self.pending.push_back(l),
                Err(e) => panic!("waiting for {what}: {e}"),
            }
        }
    }

    /// Waits for the console line `line`.
    pub fn expect(&mut self, line: &str) {
        self.expect_by(&format!("{line:?}"), |l| l == line);
    }

    /// Waits for a console line that ends with `end`.
    pub fn expect_end(&mut self, end: &str) {
        self.expect_by(&format!("a line ending {end:?}"), |l| l.ends_with(end));
    }

    /// Types `line` on the console.
    pub fn type_line(&mut self, line: &str) {
        self.vm()
            .send(format!("{line}\n").as_bytes())
            .expect("writing the console");
    }

    /// Sends `text` to the other VMs (`s TEXT`).
    pub fn say(&mut self, text: &str) {
        self.type_line(&format!("s {text}"));
        self.expect(&format!("net_node: sent {text}"));
    }

    /// What the guest has received (`p`).
    pub fn log(&mut self) -> String {
        const MARK: &str = "net_node: log ";
        self.type_line("p");
        loop {
            let l = unglue(self.vm().wait_for_line("", TIMEOUT).expect("a log line"));
            if let Some(log) = l.strip_prefix(MARK) {
                return log.to_string();
            }
            self.pending.push_back(l);
        }
    }

    /// `specvm ctl OP`, which must answer with success within `within`.
    pub fn ctl_within(&self, op: &str, within: Duration) -> String {
        let sock = self.sock.to_str().expect("UTF-8 path");
        let r = run_specvm(&["ctl", "--api-sock", sock, op], within);
        assert!(!r.timed_out, "ctl {op} hung: {r}");
        assert_eq!(r.status, 0, "ctl {op}: {r}");
        r.stdout.trim_end().to_string()
    }

    /// `specvm ctl OP` within [`TIMEOUT`].
    pub fn ctl(&self, op: &str) -> String {
        self.ctl_within(op, TIMEOUT)
    }

    /// The stack depth the API reports.
    pub fn depth(&self) -> Option<usize> {
        depth_of(&api_status(&self.sock))
    }

    /// Waits (up to `timeout`) for `depth` stack entries; the time since
    /// `since`, or `None`.
    pub fn depth_within(
        &self,
        depth: usize,
        since: Instant,
        timeout: Duration,
    ) -> Option<Duration> {
        poll(timeout, || self.depth() == Some(depth)).then(|| since.elapsed())
    }

    /// Waits for `depth` stack entries; the time since `since`.
    pub fn wait_depth(&self, depth: usize, since: Instant) -> Duration {
        self.depth_within(depth, since, TIMEOUT)
            .unwrap_or_else(|| panic!("depth never {depth}: {}", api_status(&self.sock)))
    }

    /// SIGKILL of the VMM, as a crash.
    pub fn kill(&mut self) {
        if let Some(vm) = self.vm.take() {
            signal(vm.pid(), libc::SIGKILL);
            let _ = vm.finish(TIMEOUT);
        }
    }

    /// Ends the guest (`q`), which must exit with 0.
    pub fn quit(mut self) {
        self.type_line("q");
        self.expect("net_node: bye");
        let r = self.vm.take().expect("running").finish(TIMEOUT);
        assert_eq!(r.status, 0, "{r}");
    }
}

impl Drop for NetNode {
    /// A VM a test stopped (SIGSTOP) is let go on, so that its end is
    /// seen.
    fn drop(&mut self) {
        if let Some(vm) = &self.vm {
            signal(vm.pid(), libc::SIGCONT);
        }
    }
}

/// Sends `sig` to `pid` (a process the test started).
pub fn signal(pid: u32, sig: libc::c_int) {
    // SAFETY: kill(2) on a PID this test spawned; no memory is shared.
    let rc = unsafe { libc::kill(pid as libc::pid_t, sig) };
    assert!(
        rc == 0 || std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH),
        "kill {pid}: {}",
        std::io::Error::last_os_error()
    );
}

/// A console line as the guest wrote it. The console is output the VMM
/// does not take back, so a guest rolled back in the middle of
/// `net_node: got b4` leaves `net_node: got` without its end of line, and
/// the next line follows it on the same line: that one starts at the last
/// `net_node: `.
fn unglue(line: String) -> String {
    match line.rfind("net_node: ") {
        Some(at) if at > 0 => line[at..].to_string(),
        _ => line,
    }
}

#[cfg(test)]
mod tests {
    use super::unglue;

    #[test]
    fn a_line_a_rollback_cut_short_gives_way_to_the_next() {
        assert_eq!(
            unglue("net_node: gotnet_node: log a1 b2".into()),
            "net_node: log a1 b2"
        );
        assert_eq!(unglue("net_node: got b4".into()), "net_node: got b4");
        assert_eq!(unglue("[    1.0] boot".into()), "[    1.0] boot");
    }
}
