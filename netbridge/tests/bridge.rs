//! The `netbridge` binary end to end, with fake VMM ports on its socket.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, encode_frame, framed, read_message, write_message, Control, Message,
    Outcome,
};

/// The bridge process and its directory, cleaned up on drop.
struct Bridge {
    child: Child,
    dir: PathBuf,
}

impl Bridge {
    fn start(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("netbridge-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_netbridge"))
            .arg("--listen")
            .arg(dir.join("bridge.sock"))
            .arg("--quiet")
            // Raw test ports do not renew a lease.
            .args(["--lease-ms", "600000"])
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if dir.join("bridge.sock").exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, dir }
    }

    fn connect(&self, vm: u32, speculative: bool) -> Port {
        let s = UnixStream::connect(self.dir.join("bridge.sock")).unwrap();
        s.set_read_timeout(Some(EXPECT)).unwrap();
        let mut p = Port(s);
        p.control(&Control::Hello { vm, speculative });
        assert!(
            matches!(p.recv(), Some(Message::Control(Control::Welcome { .. }))),
            "no welcome"
        );
        p
    }
}

impl Drop for Bridge {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How long a test waits for a message it expects: long, since a loaded
/// host can be slow (a 500 ms wait failed there).
const EXPECT: Duration = Duration::from_secs(20);
/// How long it listens for a message that must not come.
const QUIET: Duration = Duration::from_millis(500);

struct Port(UnixStream);

impl Port {
    fn send(&mut self, msg: &[u8]) {
        write_message(&mut self.0, msg).unwrap();
    }
    fn control(&mut self, c: &Control) {
        self.send(&encode_control(c));
    }
    fn frame(&mut self, f: &[u8]) {
        self.send(&encode_frame(f));
    }
    /// The next message, or None after [`EXPECT`].
    fn recv(&mut self) -> Option<Message> {
        let buf = read_message(&mut self.0).ok()?;
        Some(decode(&buf).unwrap())
    }
    /// The next message if one comes within [`QUIET`]: for what must not
    /// come.
    fn recv_quiet(&mut self) -> Option<Message> {
        self.0.set_read_timeout(Some(QUIET)).unwrap();
        let m = self.recv();
        self.0.set_read_timeout(Some(EXPECT)).unwrap();
        m
    }
}

fn mac(n: u8) -> [u8; 6] {
    [2, 0, 0, 0, 0, n]
}

/// A UDP/IPv4 frame from host `src` to host `dst`, tagged with `tags`.
fn udp(src: u8, dst: u8, tags: &[SpecId]) -> Vec<u8> {
    let b = etherparse::PacketBuilder::ethernet2(mac(src), mac(dst))
        .ipv4([10, 0, 0, src], [10, 0, 0, dst], 64)
        .udp(1000, 2000);
    let payload = b"speculative hello";
    let mut f = Vec::new();
    b.write(&mut f, payload).unwrap();
    codec::retag(&f, tags).unwrap()
}

const S: SpecId = SpecId { vm: 1, seq: 1 };

fn settle() {
    std::thread::sleep(Duration::from_millis(100));
}

#[test]
fn forwards_learns_and_carries_outcomes() {
    let bridge = Bridge::start("outcomes");
    let mut a = bridge.connect(1, true);
    let mut b = bridge.connect(2, true);
    a.control(&Control::Started { id: S });
    settle();
    // Unknown destination: flooded to b, tagged as a sent it.
    let f = udp(1, 2, &[S]);
    a.frame(&f);
    assert_eq!(b.recv(), Some(Message::Frame(f.clone())));
    // b joins S; a (the owner) aborts; b hears it and acknowledges.
    b.control(&Control::Joined { ids: vec![S] });
    settle();
    a.control(&Control::Resolved {
        id: S,
        outcome: Outcome::Abort,
    });
    let Some(Message::Control(Control::Decided {
        id, outcome, seq, ..
    })) = b.recv()
    else {
        panic!("b was not told");
    };
    assert_eq!((id, outcome), (S, Outcome::Abort));
    b.control(&Control::Ack { seq });
    // Anti-messages: frames tagged with the aborted id go nowhere now.
    a.frame(&udp(1, 2, &[S]));
    assert_eq!(b.recv_quiet(), None);
    // Untagged traffic still flows, both ways (b's MAC was learned).
    a.frame(&udp(1, 2, &[]));
    assert!(matches!(b.recv(), Some(Message::Frame(_))));
    b.frame(&udp(2, 1, &[]));
    assert!(matches!(a.recv(), Some(Message::Frame(_))));
}

#[test]
fn output_commit_holds_tagged_frames_for_a_port_that_cannot_roll_back() {
    let bridge = Bridge::start("hold");
    let mut a = bridge.connect(1, true);
    let mut up = bridge.connect(9, false);
    a.control(&Control::Started { id: S });
    settle();
    let tagged = udp(1, 9, &[S]);
    a.frame(&tagged);
    assert_eq!(up.recv_quiet(), None, "held while S is open");
    a.control(&Control::Resolved {
        id: S,
        outcome: Outcome::Commit,
    });
    let Some(Message::Frame(got)) = up.recv() else {
        panic!("not released on commit")
    };
    assert_eq!(
        got,
        codec::strip(&tagged).unwrap(),
        "released without its tag"
    );
    // A second speculation that aborts: its held frame is dropped.
    let s2 = SpecId { vm: 1, seq: 2 };
    a.control(&Control::Started { id: s2 });
    a.frame(&udp(1, 9, &[s2]));
    a.control(&Control::Resolved {
        id: s2,
        outcome: Outcome::Abort,
    });
    assert_eq!(up.recv_quiet(), None, "dropped on abort");
}

#[test]
fn owner_disconnect_aborts_its_speculations() {
    let bridge = Bridge::start("failure");
    let mut a = bridge.connect(1, true);
    let mut b = bridge.connect(2, true);
    let mut c = bridge.connect(3, true);
    // b joins a speculation of a and one of c, each sent to it in a frame.
    let c_spec = SpecId { vm: 3, seq: 1 };
    a.control(&Control::Started { id: S });
    c.control(&Control::Started { id: c_spec });
    settle();
    a.frame(&udp(1, 2, &[S]));
    c.frame(&udp(3, 2, &[c_spec]));
    for _ in 0..2 {
        assert!(matches!(b.recv(), Some(Message::Frame(_))));
    }
    assert!(matches!(c.recv(), Some(Message::Frame(_))), "a's flood");
    b.control(&Control::Joined {
        ids: vec![S, c_spec],
    });
    settle();
    drop(a); // the owner's VMM dies
    let Some(Message::Control(Control::Decided { id, outcome, .. })) = b.recv() else {
        panic!("member not told of the owner's death");
    };
    assert_eq!((id, outcome), (S, Outcome::Abort));
    // A member's death aborts nothing: c's speculation lives on.
    drop(b);
    settle();
    c.control(&Control::Resolved {
        id: c_spec,
        outcome: Outcome::Commit,
    });
    assert_eq!(
        c.recv_quiet(),
        None,
        "nobody left to tell, nothing sent back"
    );
}

#[test]
fn a_second_port_with_a_taken_vm_id_is_refused_and_ids_continue() {
    let bridge = Bridge::start("dupid");
    let mut a = bridge.connect(1, true);
    a.control(&Control::Started { id: S });
    settle();
    let s = UnixStream::connect(bridge.dir.join("bridge.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut dup = Port(s);
    dup.control(&Control::Hello {
        vm: 1,
        speculative: true,
    });
    assert_eq!(dup.recv_quiet(), None, "refused: closed without a welcome");
    drop(a);
    settle();
    // VM 1 again, after the first one left: its ids continue past 1:1.
    let s = UnixStream::connect(bridge.dir.join("bridge.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut again = Port(s);
    again.control(&Control::Hello {
        vm: 1,
        speculative: true,
    });
    assert_eq!(
        again.recv(),
        Some(Message::Control(Control::Welcome {
            next_seq: 2,
            lease_ms: 600_000
        }))
    );
}

#[test]
fn a_port_that_skips_hello_is_closed() {
    let bridge = Bridge::start("nohello");
    let mut s = UnixStream::connect(bridge.dir.join("bridge.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(&framed(&encode_frame(&udp(1, 2, &[]))))
        .unwrap();
    let mut buf = [0u8; 1];
    assert_eq!(s.read(&mut buf).unwrap(), 0, "closed by the bridge");
}

/// Issue 12, findings 2 and 5, through the socket: a port's tag keeps only
/// the ids its VM started or joined; an id of a VM that is not connected
/// counts as aborted; only VM 7 moves VM 7's sequence numbers.
#[test]
fn forged_ids_are_stripped_and_refused_through_the_socket() {
    let bridge = Bridge::start("forged");
    let mut forger = bridge.connect(77, true);
    let mut owner = bridge.connect(99, true);
    let mut victim = bridge.connect(5, true);
    let theirs = SpecId { vm: 99, seq: 1 };
    owner.control(&Control::Started { id: theirs });
    settle();
    // VM 77 tags a frame to VM 5 with VM 99's id: it arrives untagged.
    let f = udp(77, 5, &[theirs]);
    forger.frame(&f);
    assert_eq!(
        victim.recv(),
        Some(Message::Frame(codec::strip(&f).unwrap())),
        "the forged id reached VM 5"
    );
    assert!(matches!(owner.recv(), Some(Message::Frame(_))), "flooded");
    // VM 5 joins an id of no connected VM: told at once that it aborted.
    let ghost = SpecId { vm: 4242, seq: 1 };
    victim.control(&Control::Joined { ids: vec![ghost] });
    let Some(Message::Control(Control::Decided {
        id, outcome, seq, ..
    })) = victim.recv()
    else {
        panic!("VM 5 was not told that 4242:1 aborted");
    };
    assert_eq!((id, outcome), (ghost, Outcome::Abort));
    victim.control(&Control::Ack { seq });
    // VM 77 cannot move VM 7's numbers; VM 7 starts at 1.
    let last = SpecId {
        vm: 7,
        seq: u32::MAX,
    };
    forger.control(&Control::Started { id: last });
    forger.control(&Control::Joined { ids: vec![last] });
    settle();
    let s = UnixStream::connect(bridge.dir.join("bridge.sock")).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut seven = Port(s);
    seven.control(&Control::Hello {
        vm: 7,
        speculative: true,
    });
    assert_eq!(
        seven.recv(),
        Some(Message::Control(Control::Welcome {
            next_seq: 1,
            lease_ms: 600_000
        }))
    );
    // VM 99's abort is not VM 5's business: it never joined 99:1.
    owner.control(&Control::Resolved {
        id: theirs,
        outcome: Outcome::Abort,
    });
    assert_eq!(victim.recv_quiet(), None, "VM 5 was told of 99:1");
}
