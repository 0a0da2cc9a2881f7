//! The TAP uplink: the bridge's port to the host's network stack
//! (`netbridge --uplink tap=NAME`).
//!
//! The uplink is a port with no VM behind it ([`Shared::add_uplink`]):
//! - the host cannot roll back, so a tagged frame bound for it is held
//!   until every id in its tag commits, then written untagged, and dropped
//!   if any id aborts (output commit, rule 11; the bridge does this for
//!   every non-speculative port);
//! - the host speculates on nothing, so a frame read from the TAP that
//!   carries IPOPT_SPEC is forged: the tag is stripped, counted in the
//!   port's `forged` counter, and the frame is switched untagged (rule 12).
//!   Stripping rather than dropping keeps the host's real traffic flowing
//!   and still lets no one make a VM join a speculation from the host.
//!
//! The TAP is opened by [`specwire::tap::open_tap`], as the VMM's TAP
//! backend does: by hand with libc (`open` and the `TUNSETIFF` ioctl), in
//! twenty lines. The crates were weighed: `tun-tap` is passively
//! maintained, its async side is futures 0.1 and tokio-core, and it cannot
//! attach to an existing interface; `tun` is a cross-platform layer whose
//! async feature brings tokio-util, futures and a codec, and which sets
//! addresses and MTUs the bridge leaves to the operator. Neither saves more
//! than the one ioctl, and tokio's [`AsyncFd`] already drives any
//! descriptor. The descriptor is non-blocking; each `read` on it is one frame and each
//! `write` sends one (`IFF_NO_PI`: no packet-information header, no
//! virtio-net header).

use std::fs::File;
use std::io::{self, Read, Write};
use std::str::FromStr;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::Notify;

use specwire::tap::{check_name, open_tap, TapError};

use crate::protocol::MAX_MESSAGE;
use crate::registry::PortId;
use crate::server::Shared;

/// Longest interface name: IFNAMSIZ less the NUL.
pub use specwire::tap::MAX_TAP_NAME;

/// Errors of the uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    /// `--uplink` is not of the form `KIND=VALUE`.
    #[error("--uplink {0:?} is not of the form tap=NAME")]
    Syntax(String),
    /// An uplink kind other than `tap`.
    #[error("unknown uplink kind {0:?} in --uplink (only tap=NAME exists)")]
    Kind(String),
    /// The TAP's name is not valid, or it could not be opened.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// Reading from the TAP failed: the interface is gone or broken.
    #[error("reading from TAP {name:?}: {err}")]
    Read {
        /// The interface name.
        name: String,
        /// What the kernel said.
        err: io::Error,
    },
    /// The descriptor could not be registered with the runtime.
    #[error("registering TAP {name:?} with the runtime: {err}")]
    Register {
        /// The interface name.
        name: String,
        /// What failed.
        err: io::Error,
    },
}

/// What `--uplink` names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UplinkSpec {
    /// A TAP interface, attached if it exists and created if not.
    Tap(String),
}

impl FromStr for UplinkSpec {
    type Err = UplinkError;

    /// Parses `tap=NAME`.
    fn from_str(s: &str) -> Result<Self, UplinkError> {
        let (kind, value) = s
            .split_once('=')
            .ok_or_else(|| UplinkError::Syntax(s.into()))?;
        match kind {
            "tap" => match check_name(value) {
                Ok(()) => Ok(Self::Tap(value.into())),
                Err(e) => Err(e.into()),
            },
            _ => Err(UplinkError::Kind(kind.into())),
        }
    }
}

/// An open TAP interface: one frame per `read`, one per `write`.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the TAP interface `name`, creating it if it does not
    /// exist. A TAP this creates lives as long as the descriptor: it goes
    /// away when the bridge exits. One made persistent beforehand (`ip
    /// tuntap add`) stays.
    pub fn open(name: &str) -> Result<Self, UplinkError> {
        let file = open_tap(name)?;
        Ok(Self::from_file(file, name))
    }

    /// A TAP from a descriptor that keeps frame boundaries and is
    /// non-blocking (tests use one end of a datagram socket pair).
    fn from_file(file: File, name: &str) -> Self {
        Self {
            file,
            name: name.into(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// A TAP attached to the bridge as its uplink port.
pub struct Uplink {
    port: PortId,
    fd: AsyncFd<File>,
    frames: Arc<Notify>,
    shared: Arc<Shared>,
    name: String,
}

impl Uplink {
    /// Adds `tap` to the bridge as a port with no VM behind it (see the
    /// module doc). Needs a tokio runtime.
    pub fn attach(tap: Tap, shared: Arc<Shared>) -> Result<Self, UplinkError> {
        let Tap { file, name } = tap;
        // SAFETY: the File owns its descriptor, which stays open and the
        // same until the AsyncFd, which owns the File, is dropped.
        let fd = unsafe { AsyncFd::register(file) }.map_err(|e| UplinkError::Register {
            name: name.clone(),
            err: e.into_parts().1,
        })?;
        let (port, frames) = shared.add_uplink();
        tracing::info!(port, "uplink: TAP {name} attached");
        Ok(Self {
            port,
            fd,
            frames,
            shared,
            name,
        })
    }

    /// The uplink's port number.
    pub fn port(&self) -> PortId {
        self.port
    }

    /// Carries frames: those read from the TAP enter the bridge as the
    /// port's ingress, and those the bridge queues for the port are written
    /// to the TAP. Runs until reading fails (the interface was deleted,
    /// say); then the port is removed and the error returned. Dropping the
    /// future (at shutdown) leaves the port to go away with the bridge.
    pub async fn run(self) -> UplinkError {
        let err = tokio::select! {
            err = read_frames(self.port, &self.fd, &self.shared) => err,
            never = write_frames(self.port, &self.fd, &self.frames, &self.shared, &self.name) => {
                match never {}
            }
        };
        self.shared.remove_port(self.port);
        UplinkError::Read {
            name: self.name,
            err,
        }
    }
}

/// Reads frames from the TAP into the bridge until a read fails.
async fn read_frames(port: PortId, fd: &AsyncFd<File>, shared: &Shared) -> io::Error {
    // A TAP frame is at most its MTU (65,535 at most) plus link headers:
    // always less than this, so a read never cuts a frame.
    let mut buf = vec![0u8; MAX_MESSAGE];
    loop {
        // ERROR too: a TAP whose interface was deleted polls as EPOLLERR
        // alone, which is not readable, and its reads fail from then on.
        let mut ready = match fd.ready(Interest::READABLE | Interest::ERROR).await {
            Ok(r) => r,
            Err(e) => return e,
        };
        let state = ready.ready();
        match ready.try_io(|f| f.get_ref().read(&mut buf)) {
            // A TAP never reads empty; other descriptors do at their end.
            Ok(Ok(0)) => return io::ErrorKind::UnexpectedEof.into(),
            Ok(Ok(n)) => shared.ingress(port, buf[..n].to_vec()),
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return e,
            // Closed for reading (tokio never clears that state) or in
            // error, and nothing to read: nothing will come any more.
            Err(_would_block) if state.is_read_closed() || state.is_error() => {
                return io::Error::other("the descriptor was closed for reading");
            }
            // Drained: try_io cleared the readiness; wait for more.
            Err(_would_block) => {}
        }
    }
}

/// Writes the frames the bridge queues for the port onto the TAP. A frame
/// the kernel refuses (the interface is down, say) is dropped, as a NIC
/// would; the next one is tried.
async fn write_frames(
    port: PortId,
    fd: &AsyncFd<File>,
    frames: &Notify,
    shared: &Shared,
    name: &str,
) -> std::convert::Infallible {
    loop {
        frames.notified().await;
        while let Some(frame) = shared.pop(port) {
            if let Err(e) = write_frame(fd, &frame).await {
                tracing::debug!(port, "uplink: TAP {name} refused a frame: {e}");
            }
        }
    }
}

async fn write_frame(fd: &AsyncFd<File>, frame: &[u8]) -> io::Result<()> {
    loop {
        let mut ready = fd.writable().await?;
        let state = ready.ready();
        match ready.try_io(|f| f.get_ref().write(frame)) {
            Ok(Ok(n)) if n == frame.len() => return Ok(()),
            Ok(Ok(n)) => {
                return Err(io::Error::other(format!(
                    "wrote {n} of {} bytes",
                    frame.len()
                )))
            }
            Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
            Ok(Err(e)) => return Err(e),
            // As in read_frames: a state tokio keeps would wake us at once.
            Err(_would_block) if state.is_write_closed() || state.is_error() => {
                return Err(io::Error::other("the descriptor was closed for writing"));
            }
            Err(_would_block) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::OwnedFd;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::time::Duration;

    use super::*;
    use crate::bridge::Bridge;
    use crate::codec::{self, SpecId};
    use crate::protocol::{
        decode, encode_control, encode_frame, read_message, write_message, Control, Message,
        Outcome,
    };
    use crate::server;

    #[test]
    fn parses_tap_names() {
        assert_eq!(
            "tap=up0".parse::<UplinkSpec>().unwrap(),
            UplinkSpec::Tap("up0".into())
        );
        let longest = "t".repeat(MAX_TAP_NAME);
        assert_eq!(
            format!("tap={longest}").parse::<UplinkSpec>().unwrap(),
            UplinkSpec::Tap(longest)
        );
        assert_eq!(
            "tap=a=b".parse::<UplinkSpec>().unwrap(),
            UplinkSpec::Tap("a=b".into()),
            "only the first '=' splits"
        );
    }

    #[test]
    fn refuses_bad_uplinks() {
        for s in ["", "up0", "tap"] {
            let e = s.parse::<UplinkSpec>().unwrap_err();
            assert!(matches!(e, UplinkError::Syntax(_)), "{s:?}: {e}");
        }
        for s in ["tun=up0", "=up0", "TAP=up0"] {
            let e = s.parse::<UplinkSpec>().unwrap_err();
            assert!(matches!(e, UplinkError::Kind(_)), "{s:?}: {e}");
        }
        let long = format!("tap={}", "t".repeat(MAX_TAP_NAME + 1));
        for s in [
            "tap=",
            &long,
            "tap=a/b",
            "tap=a:1",
            "tap=sp ace",
            "tap=.",
            "tap=..",
            "tap=é",
            "tap=t%d",
        ] {
            let e = s.parse::<UplinkSpec>().unwrap_err();
            assert!(
                matches!(e, UplinkError::Tap(TapError::Name(_))),
                "{s:?}: {e}"
            );
        }
        let e = long.parse::<UplinkSpec>().unwrap_err().to_string();
        assert!(e.contains("1 to 15 printable"), "{e}");
        // Tap::open checks the name before touching /dev/net/tun.
        assert!(matches!(
            Tap::open("a/b"),
            Err(UplinkError::Tap(TapError::Name(_)))
        ));
    }

    const HOST: [u8; 6] = [2, 0, 0, 0, 0, 0xfe];
    const VM: [u8; 6] = [2, 0, 0, 0, 0, 1];

    fn udp(src: [u8; 6], dst: [u8; 6], tags: &[SpecId]) -> Vec<u8> {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2(src, dst)
            .ipv4([10, 0, 0, src[5]], [10, 0, 0, dst[5]], 64)
            .udp(1000, 2000)
            .write(&mut f, b"over the uplink")
            .unwrap();
        codec::retag(&f, tags).unwrap()
    }

    /// The test's directory, removed on drop, also when the test fails.
    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new() -> Self {
            let dir = std::env::temp_dir().join(format!("netbridge-uplink-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A fake VMM port on the bridge's socket.
    struct Port(UnixStream);

    impl Port {
        fn send(&mut self, msg: &[u8]) {
            write_message(&mut self.0, msg).unwrap();
        }
        fn recv(&mut self) -> Option<Message> {
            let buf = read_message(&mut self.0).ok()?;
            Some(decode(&buf).unwrap())
        }
        fn resolve(&mut self, id: SpecId, outcome: Outcome) {
            self.send(&encode_control(&Control::Resolved { id, outcome }));
        }
    }

    /// The uplink over a datagram socket pair standing in for the TAP: the
    /// host end is the test's. Frames both ways, forged tags stripped,
    /// output commit, and the uplink port's counters.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn carries_frames_both_ways_with_output_commit() {
        let dir = TempDir::new();
        let sock = dir.0.join("br.sock");
        let shared = Shared::new(Bridge::new(crate::tags::read, crate::tags::strip));
        let listener = server::bind(&sock).unwrap();
        tokio::spawn(server::serve(listener, shared.clone()));
        let (host, tap_end) = UnixDatagram::pair().unwrap();
        tap_end.set_nonblocking(true).unwrap();
        let tap_end_too = tap_end.try_clone().unwrap();
        host.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        let tap = Tap::from_file(File::from(OwnedFd::from(tap_end)), "pair0");
        let uplink = Uplink::attach(tap, shared.clone()).unwrap();
        let up = uplink.port();
        let running = tokio::spawn(uplink.run());

        // The rest blocks: it runs on this thread while the workers serve.
        let mut vm = Port(UnixStream::connect(&sock).unwrap());
        vm.0.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        vm.send(&encode_control(&Control::Hello {
            vm: 1,
            speculative: true,
        }));
        assert!(matches!(
            vm.recv(),
            Some(Message::Control(Control::Welcome { .. }))
        ));
        let mut got = vec![0u8; 2048];
        let mut host_recv = || host.recv(&mut got).ok().map(|n| got[..n].to_vec());

        // Host to VM; a forged tag from the host is stripped (rule 12).
        host.send(&udp(HOST, VM, &[])).unwrap();
        assert_eq!(vm.recv(), Some(Message::Frame(udp(HOST, VM, &[]))));
        let s = SpecId::new(1, 1);
        host.send(&udp(HOST, VM, &[s])).unwrap();
        assert_eq!(
            vm.recv(),
            Some(Message::Frame(udp(HOST, VM, &[]))),
            "stripped"
        );

        // VM to host: untagged at once, tagged only after commit (rule 11).
        vm.send(&encode_frame(&udp(VM, HOST, &[])));
        assert_eq!(host_recv(), Some(udp(VM, HOST, &[])));
        vm.send(&encode_control(&Control::Started { id: s }));
        vm.send(&encode_frame(&udp(VM, HOST, &[s])));
        assert_eq!(host_recv(), None, "held while 1:1 is open");
        vm.resolve(s, Outcome::Commit);
        assert_eq!(host_recv(), Some(udp(VM, HOST, &[])), "released untagged");
        let s2 = SpecId::new(1, 2);
        vm.send(&encode_control(&Control::Started { id: s2 }));
        vm.send(&encode_frame(&udp(VM, HOST, &[s2])));
        vm.resolve(s2, Outcome::Abort);
        assert_eq!(host_recv(), None, "dropped on abort");

        let c = shared.counters(up).unwrap();
        assert_eq!((c.rx, c.forged, c.tx), (2, 1, 2), "{c:?}");
        assert_eq!((c.held, c.released, c.dropped_aborted), (2, 1, 1), "{c:?}");

        // A read that fails ends the uplink and removes its port.
        tap_end_too.shutdown(std::net::Shutdown::Read).unwrap();
        let err = running.await.unwrap();
        assert!(
            err.to_string().starts_with("reading from TAP \"pair0\""),
            "{err}"
        );
        assert_eq!(shared.counters(up), None);
    }
}
