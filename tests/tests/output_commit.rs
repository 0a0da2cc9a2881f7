//! Output commit on cards that leave the speculation domain (`--net
//! socket=`; `tap=` takes the same hook): what a speculating guest sends
//! reaches the outside only once its speculations commit, and never when
//! one aborts (SPECULATIONS.md, rule 11). The guest is `net_node`, driven
//! from its serial console; the outside is a SOCK_SEQPACKET listener.

use std::path::{Path, PathBuf};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use specvm_tests::{
    bare_guest, skip_without_kvm, spawn_specvm, FrameListener, Frames, Spawned, TempDir as Dir,
};

const TIMEOUT: Duration = Duration::from_secs(60);
/// Frames the VMM holds for output commit (`spec::link::HELD_MAX_FRAMES`).
const HELD: usize = 1024;
/// How long a frame that must not arrive is waited for.
const QUIET: Duration = Duration::from_millis(800);

/// `net_node` on a `socket=` card with an API socket, and the frames that
/// reach the far end.
fn start(dir: &Dir) -> (Spawned, PathBuf, Frames) {
    let sock = dir.join("net.sock");
    let frames = FrameListener::bind(&sock).collect();
    let api = dir.join("api.sock");
    let g = bare_guest("net_node");
    let mut vm = spawn_specvm(&[
        "run",
        "--bare",
        g.to_str().unwrap(),
        "--memory",
        "64M",
        "--net",
        &format!("socket={}", sock.display()),
        "--api-sock",
        api.to_str().unwrap(),
    ]);
    vm.wait_for_line("net_node: ready", TIMEOUT).unwrap();
    (vm, api, frames)
}

fn ctl(api: &Path, op: &str) {
    let r = specvm_tests::run_specvm(&["ctl", "--api-sock", api.to_str().unwrap(), op], TIMEOUT);
    r.assert_status(0);
    assert!(r.stdout.contains(r#""ok":true"#), "{op}: {r}");
}

/// Has the guest send `text` and waits for its word that it did.
fn send(vm: &mut Spawned, text: &str) {
    vm.send(format!("s {text}\n").as_bytes()).unwrap();
    vm.wait_for_line(&format!("net_node: sent {text}"), TIMEOUT)
        .unwrap();
}

/// The next frame that arrives within `wait` and carries a payload, as
/// text: `None` if none does.
fn next_payload(frames: &Receiver<Vec<u8>>, wait: Duration) -> Option<String> {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let f = frames.recv_timeout(left).ok()?;
        // net_node's UDP: Ethernet (14) + IPv4 (20, no options once the
        // VMM stripped them) + UDP (8), then the text.
        if f.len() > 42 && f[12..14] == [0x08, 0x00] {
            return Some(String::from_utf8_lossy(&f[42..]).into_owned());
        }
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn speculative_output_waits_for_commit_and_dies_with_abort() {
    skip_without_kvm!();
    let dir = Dir::new("oc-socket");
    let (mut vm, api, frames) = start(&dir);

    // Outside any speculation a frame goes out at once.
    send(&mut vm, "pre");
    assert_eq!(next_payload(&frames, TIMEOUT).as_deref(), Some("pre"));

    // Speculative output is held, and dropped by the abort.
    ctl(&api, "speculate");
    send(&mut vm, "spec");
    assert_eq!(
        next_payload(&frames, QUIET),
        None,
        "speculative output leaked"
    );
    ctl(&api, "abort");
    assert_eq!(
        next_payload(&frames, QUIET),
        None,
        "aborted output went out"
    );
    send(&mut vm, "post");
    assert_eq!(next_payload(&frames, TIMEOUT).as_deref(), Some("post"));

    // Held until the commit, then sent, in order.
    ctl(&api, "speculate");
    send(&mut vm, "kept1");
    send(&mut vm, "kept2");
    assert_eq!(
        next_payload(&frames, QUIET),
        None,
        "speculative output leaked"
    );
    ctl(&api, "commit");
    assert_eq!(next_payload(&frames, TIMEOUT).as_deref(), Some("kept1"));
    assert_eq!(next_payload(&frames, TIMEOUT).as_deref(), Some("kept2"));

    // Nested: the inner abort drops only the inner output; the outer
    // commit sends the rest.
    ctl(&api, "speculate");
    send(&mut vm, "outer");
    ctl(&api, "speculate");
    send(&mut vm, "inner");
    ctl(&api, "abort");
    assert_eq!(next_payload(&frames, QUIET), None, "output leaked");
    ctl(&api, "commit");
    assert_eq!(next_payload(&frames, TIMEOUT).as_deref(), Some("outer"));
    assert_eq!(
        next_payload(&frames, QUIET),
        None,
        "the inner output went out"
    );

    vm.send(b"q\n").unwrap();
    vm.finish(TIMEOUT).assert_status(0);
}

/// More output than the hold takes: the guest's transmit queue waits
/// (back-pressure) instead of losing frames, and everything goes out, in
/// order, at the commit.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_full_hold_stalls_the_guest_and_loses_nothing() {
    skip_without_kvm!();
    let dir = Dir::new("oc-full");
    let (mut vm, api, frames) = start(&dir);
    ctl(&api, "speculate");
    // 1,024 frames fill the hold; the 16 after them wait in the guest's
    // transmit ring (net_node's queue holds 16), which the device stops
    // taking: a hook that dropped frames when full would lose them.
    const N: usize = HELD + 16;
    let mut script = String::new();
    for i in 0..N {
        script.push_str(&format!("s m{i}\n"));
    }
    vm.send(script.as_bytes()).unwrap();
    vm.wait_for_line(&format!("net_node: sent m{}", N - 1), TIMEOUT)
        .unwrap();
    assert_eq!(
        next_payload(&frames, QUIET),
        None,
        "speculative output leaked"
    );
    ctl(&api, "commit");
    for i in 0..N {
        let want = format!("m{i}");
        assert_eq!(
            next_payload(&frames, TIMEOUT).as_deref(),
            Some(want.as_str()),
            "frame {i}"
        );
    }
    vm.send(b"q\n").unwrap();
    vm.finish(TIMEOUT).assert_status(0);
}
