//! The VMM's port on `netbridge`, and the frame hook that makes the
//! network carry speculations (SPECULATIONS.md, rules 2, 7 and 12).
//!
//! [`BridgeLink`] connects to the bridge's socket, says hello, and joins it
//! to the net device through a socket pair: frames flow between the device
//! and the bridge unchanged, control messages (`decided`) go to the
//! controller as [`VmEvent::Bridge`], and the controller sends its own
//! (`started`, `joined`, `resolved`, `ack`) with [`BridgeLink::send`].
//!
//! [`SpecHook`] sits in the net device:
//! - on every frame the guest sends, it writes the VM's whole dependency
//!   set as IPOPT_SPEC, replacing whatever tag the guest forged (rules 7,
//!   12); a set too large for the IPv4 options is never sent untagged: the
//!   frame is dropped and counted;
//! - on every tagged frame for the guest, it checks the tag against the
//!   dependency set: ids the VM does not hold yet make it ask the
//!   controller to join them, and the frame waits until the checkpoint is
//!   taken (rule 2). The tag is stripped before the guest sees the frame.

use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use netbridge::codec::{self, CodecError, SpecId as WireId};
use netbridge::protocol::{
    decode, encode_control, encode_frame, framed, Control, Message, MAX_MESSAGE,
};

use crate::devices::virtio::net::{Backend, FrameHook, RxVerdict};
use crate::event::{EventSender, VmEvent};

/// Errors connecting to the bridge.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The bridge's socket could not be reached.
    #[error("connecting to the bridge at {0}: {1}")]
    Connect(PathBuf, io::Error),
    /// The bridge did not accept the VM.
    #[error("the bridge at {0} did not accept this VM: {1}")]
    Refused(PathBuf, io::Error),
    /// The socket pair or a thread could not be set up.
    #[error("setting up the bridge link: {0}")]
    Setup(io::Error),
}

/// Something the bridge told the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BridgeEvent {
    /// A speculation the VM joined ended; acknowledge `seq` once acted on.
    Decided {
        /// The speculation, `(vm << 32) | seq`.
        id: u64,
        /// Its outcome.
        outcome: netbridge::protocol::Outcome,
        /// What to acknowledge.
        seq: u64,
    },
    /// The connection to the bridge ended.
    Gone,
}

/// The VMM's end of the bridge connection.
pub struct BridgeLink {
    writer: Arc<Mutex<UnixStream>>,
    first_seq: u32,
}

impl BridgeLink {
    /// Connects to the bridge at `path` as VM `vm`, and returns the link
    /// and the backend to give the net device.
    pub fn connect(
        path: &Path,
        vm: u32,
        events: EventSender,
    ) -> Result<(Self, Backend), LinkError> {
        let mut stream =
            UnixStream::connect(path).map_err(|e| LinkError::Connect(path.into(), e))?;
        let writer = Arc::new(Mutex::new(stream.try_clone().map_err(LinkError::Setup)?));
        let mut link = Self {
            writer,
            first_seq: 1,
        };
        link.send(&Control::Hello {
            vm,
            speculative: true,
        })
        .map_err(LinkError::Setup)?;
        link.first_seq = welcome(&mut stream).map_err(|e| LinkError::Refused(path.into(), e))?;
        let (device_end, our_end) = seqpacket_pair().map_err(LinkError::Setup)?;
        let backend = Backend::from_socket(device_end, &format!("bridge={}", path.display()))
            .map_err(|e| LinkError::Setup(io::Error::other(e.to_string())))?;
        let ours = UnixDatagram::from(our_end);
        let ours_rx = ours.try_clone().map_err(LinkError::Setup)?;
        let w = link.writer.clone();
        std::thread::Builder::new()
            .name("bridge-tx".into())
            .spawn(move || forward_to_bridge(&ours, &w))
            .map_err(LinkError::Setup)?;
        std::thread::Builder::new()
            .name("bridge-rx".into())
            .spawn(move || forward_from_bridge(stream, &ours_rx, &events))
            .map_err(LinkError::Setup)?;
        Ok((link, backend))
    }

    /// The first sequence number the bridge lets this VM use.
    pub fn first_seq(&self) -> u32 {
        self.first_seq
    }

    /// Sends a control message to the bridge.
    pub fn send(&self, c: &Control) -> io::Result<()> {
        let mut w = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        w.write_all(&framed(&encode_control(c)))
    }
}

/// A connected `SOCK_SEQPACKET` pair: one end for the device, one for us.
fn seqpacket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two descriptors into the array we own.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and belong to no one else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Frames the device sent, to the bridge.
fn forward_to_bridge(ours: &UnixDatagram, writer: &Mutex<UnixStream>) {
    let mut buf = vec![0u8; MAX_MESSAGE];
    while let Ok(n) = ours.recv(&mut buf) {
        let msg = framed(&encode_frame(&buf[..n]));
        let mut w = writer.lock().unwrap_or_else(|e| e.into_inner());
        if w.write_all(&msg).is_err() {
            return;
        }
    }
}

/// Frames from the bridge, to the device; control messages, to the
/// controller. Ends, telling the controller, when the bridge goes away.
fn forward_from_bridge(mut stream: UnixStream, ours: &UnixDatagram, events: &EventSender) {
    loop {
        let msg = match read_message(&mut stream) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!("bridge link closed: {e}");
                break;
            }
        };
        match decode(&msg) {
            Ok(Message::Frame(f)) => {
                // A blocking send: when the guest does not take frames, the
                // bridge's queue for this port fills instead of this one.
                if ours.send(&f).is_err() {
                    break;
                }
            }
            Ok(Message::Control(Control::Decided { id, outcome, seq })) => {
                if events
                    .send(VmEvent::Bridge(BridgeEvent::Decided { id, outcome, seq }))
                    .is_err()
                {
                    return;
                }
            }
            Ok(Message::Control(c)) => tracing::warn!("unexpected message from the bridge: {c:?}"),
            Err(e) => {
                tracing::warn!("bad message from the bridge, link closed: {e}");
                break;
            }
        }
    }
    let _ = events.send(VmEvent::Bridge(BridgeEvent::Gone));
}

/// Waits for the bridge's answer to hello: the first sequence number. A
/// bridge that refuses the VM (its id is taken) closes the connection.
fn welcome(s: &mut UnixStream) -> io::Result<u32> {
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    let msg = read_message(s).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("no answer to hello ({e}); is this VM id already connected?"),
        )
    })?;
    s.set_read_timeout(None)?;
    match decode(&msg) {
        Ok(Message::Control(Control::Welcome { next_seq })) => Ok(next_seq),
        other => Err(io::Error::other(format!(
            "expected a welcome, got {other:?}"
        ))),
    }
}

fn read_message(s: &mut UnixStream) -> io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(io::Error::other(format!("message of {len} bytes")));
    }
    let mut buf = vec![0u8; len];
    s.read_exact(&mut buf)?;
    Ok(buf)
}

/// The dependency set as the hook reads it, kept by the controller.
#[derive(Debug, Default)]
pub struct SharedDeps {
    /// Every id the VM's state depends on, as `(vm << 32) | seq`.
    pub ids: Vec<u64>,
    /// Ids the VM could not join (its checkpoint stack was full): frames
    /// tagged with them are dropped, never delivered unprotected.
    pub refused: Vec<u64>,
}

/// Counters of the hook.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct HookStats {
    /// Frames dropped on send: the set did not fit in the IPv4 options.
    pub tx_too_many_ids: u64,
    /// Frames dropped on send: the guest's IPv4 header was malformed.
    pub tx_malformed: u64,
    /// Frames dropped on receive: malformed tag, or a refused id.
    pub rx_dropped: u64,
    /// Joins asked of the controller.
    pub joins: u64,
}

/// The frame hook of a speculating VM's net device.
pub struct SpecHook {
    deps: Arc<Mutex<SharedDeps>>,
    events: EventSender,
    /// The ids of the last join asked for, so a waiting frame asks once.
    asked: Vec<u64>,
    stats: Arc<Mutex<HookStats>>,
}

impl SpecHook {
    /// A hook reading the dependency set from `deps` and asking joins of
    /// the controller through `events`.
    pub fn new(
        deps: Arc<Mutex<SharedDeps>>,
        events: EventSender,
        stats: Arc<Mutex<HookStats>>,
    ) -> Self {
        Self {
            deps,
            events,
            asked: Vec::new(),
            stats,
        }
    }

    fn count(&self, f: impl FnOnce(&mut HookStats)) {
        f(&mut self.stats.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

impl FrameHook for SpecHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        let ids: Vec<WireId> = {
            let d = self.deps.lock().unwrap_or_else(|e| e.into_inner());
            d.ids.iter().map(|&id| WireId::from_u64(id)).collect()
        };
        match codec::retag(&frame, &ids) {
            Ok(f) => Some(f),
            Err(CodecError::TooManyIds { have, room }) => {
                tracing::warn!(
                    have,
                    room,
                    "frame dropped: its tag set does not fit in the IPv4 options"
                );
                self.count(|s| s.tx_too_many_ids += 1);
                None
            }
            Err(e) => {
                tracing::debug!("frame dropped: {e}");
                self.count(|s| s.tx_malformed += 1);
                None
            }
        }
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        let tags: Vec<u64> = match codec::parse_tags(frame) {
            Ok(None) => return RxVerdict::Deliver,
            Ok(Some(t)) => t.into_iter().map(WireId::to_u64).collect(),
            Err(_) => {
                self.count(|s| s.rx_dropped += 1);
                return RxVerdict::Drop;
            }
        };
        let missing: Vec<u64> = {
            let d = self.deps.lock().unwrap_or_else(|e| e.into_inner());
            if tags.iter().any(|t| d.refused.contains(t)) {
                drop(d);
                self.count(|s| s.rx_dropped += 1);
                return RxVerdict::Drop;
            }
            tags.iter()
                .copied()
                .filter(|t| !d.ids.contains(t))
                .collect()
        };
        if missing.is_empty() {
            self.asked.clear();
            return match codec::strip(frame) {
                Ok(f) => {
                    *frame = f;
                    RxVerdict::Deliver
                }
                Err(_) => RxVerdict::Drop,
            };
        }
        if missing != self.asked {
            self.count(|s| s.joins += 1);
            let _ = self.events.send(VmEvent::Join {
                ids: missing.clone(),
            });
            self.asked = missing;
        }
        RxVerdict::DeferUntilCheckpoint
    }
}

/// The frame hook of a net device that is not on the bridge (`socket=`,
/// `tap=`): the VMM still owns the tag (rule 12), so it strips any
/// IPOPT_SPEC the guest wrote before the frame leaves, and, since a tag is
/// trusted only from the bridge, strips it from what arrives too. Frames
/// whose IPv4 header is malformed are dropped.
#[derive(Debug, Default)]
pub struct StripHook;

impl FrameHook for StripHook {
    fn on_tx(&mut self, frame: Vec<u8>) -> Option<Vec<u8>> {
        codec::strip(&frame).ok()
    }

    fn on_rx(&mut self, frame: &mut Vec<u8>) -> RxVerdict {
        match codec::strip(frame) {
            Ok(f) => {
                *frame = f;
                RxVerdict::Deliver
            }
            Err(_) => RxVerdict::Drop,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp(tags: &[WireId]) -> Vec<u8> {
        let b = etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .udp(1, 2);
        let mut f = Vec::new();
        b.write(&mut f, b"x").unwrap();
        codec::retag(&f, tags).unwrap()
    }

    #[test]
    fn strip_hook_removes_forged_tags_both_ways() {
        let forged = udp(&[WireId { vm: 99, seq: 7 }]);
        let mut h = StripHook;
        let out = h.on_tx(forged.clone()).unwrap();
        assert_eq!(codec::parse_tags(&out).unwrap(), None);
        let mut inbound = forged;
        assert_eq!(h.on_rx(&mut inbound), RxVerdict::Deliver);
        assert_eq!(codec::parse_tags(&inbound).unwrap(), None);
    }

    #[test]
    fn spec_hook_tags_with_the_whole_set_and_asks_to_join() {
        let deps = Arc::new(Mutex::new(SharedDeps {
            ids: vec![(1 << 32) | 5],
            refused: vec![],
        }));
        let (tx, rx) = crate::event::channel();
        let mut h = SpecHook::new(deps.clone(), tx, Arc::default());
        // A forged tag is replaced by the true set.
        let out = h.on_tx(udp(&[WireId { vm: 99, seq: 7 }])).unwrap();
        assert_eq!(
            codec::parse_tags(&out).unwrap(),
            Some(vec![WireId { vm: 1, seq: 5 }])
        );
        // A frame tagged with an id the VM does not hold waits for a join.
        let mut f = udp(&[WireId { vm: 3, seq: 1 }]);
        assert_eq!(h.on_rx(&mut f), RxVerdict::DeferUntilCheckpoint);
        assert!(matches!(rx.try_recv(), Ok(VmEvent::Join { ids }) if ids == vec![(3 << 32) | 1]));
        assert_eq!(h.on_rx(&mut f), RxVerdict::DeferUntilCheckpoint);
        assert!(rx.try_recv().is_err(), "asks once per set");
        deps.lock().unwrap().ids.push((3 << 32) | 1);
        assert_eq!(h.on_rx(&mut f), RxVerdict::Deliver);
        assert_eq!(
            codec::parse_tags(&f).unwrap(),
            None,
            "delivered without its tag"
        );
        // Too many ids: dropped, never sent untagged.
        deps.lock().unwrap().ids = (1..=5).map(|s| (1 << 32) | s).collect();
        assert_eq!(h.on_tx(udp(&[])), None);
    }
}
