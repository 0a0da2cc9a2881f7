//! Where the net device's frames go: a file descriptor on which every
//! message is exactly one Ethernet frame, with no header of any kind (no
//! virtio-net header, no length prefix, no packet information).
//!
//! - **Socket** (`socket=PATH`): a Unix `SOCK_SEQPACKET` client. The
//!   kernel keeps message boundaries, so one `send` is one frame and one
//!   `recv` returns one frame; PATH is the bridge's listening socket. A
//!   socket pair of the same type serves tests. (`netbridge` as committed
//!   speaks a length-prefixed stream protocol with control messages, see
//!   `docs/netbridge.md`; one of the two sides still has to adapt.)
//! - **Tap** (`tap=NAME`): `/dev/net/tun` attached with `IFF_TAP |
//!   IFF_NO_PI` ([`specwire::tap::open_tap`], shared with the bridge's
//!   uplink); each `read` is one frame and each `write` sends one.
//!
//! The descriptor is non-blocking. A frame that cannot be sent at once (the
//! peer is slow and its buffer full) is dropped, as a NIC with a full
//! transmit ring would, rather than stalling the vCPU that sent it.
//!
//! The socket setup is written by hand against libc: the crates this
//! project may use (vmm-sys-util, std) offer no `SOCK_SEQPACKET` clients,
//! and what it takes is a few calls.

use std::io;
use std::mem;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use specwire::tap::{open_tap, TapError};

/// Errors setting up a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The path does not fit in a Unix socket address (or holds a NUL).
    #[error("socket path {0} does not fit in a Unix socket address")]
    PathTooLong(PathBuf),
    /// A socket could not be created or inspected.
    #[error("creating a Unix socket: {0}")]
    Socket(io::Error),
    /// The socket exists but is not a message socket.
    #[error("a net backend socket must be SOCK_SEQPACKET or SOCK_DGRAM, not type {0}")]
    NotMessageSocket(i32),
    /// Connecting failed.
    #[error("connecting to {path}: {err}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// What connect said.
        err: io::Error,
    },
    /// The tap interface's name is not valid, or it could not be opened or
    /// attached.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// O_NONBLOCK could not be set.
    #[error("making the backend non-blocking: {0}")]
    Nonblock(io::Error),
}

/// What kind of descriptor a backend holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendKind {
    /// A Unix message socket (`SOCK_SEQPACKET`, or `SOCK_DGRAM` in tests).
    Socket,
    /// A TAP interface.
    Tap,
}

/// A frame-per-message descriptor. `send` and `recv` take `&self`, so one
/// backend serves the transmitting vCPU and the receiving thread at once.
#[derive(Debug)]
pub struct Backend {
    fd: OwnedFd,
    kind: BackendKind,
    name: String,
}

impl Backend {
    /// Connects a `SOCK_SEQPACKET` client to the Unix socket at `path`.
    pub fn connect(path: &Path) -> Result<Self, BackendError> {
        let bytes = path.as_os_str().as_bytes();
        // SAFETY: an all-zero sockaddr_un is a valid value (it is plain data).
        let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
        if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
            return Err(BackendError::PathTooLong(path.into()));
        }
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let fd = new_socket()?;
        let len = mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
        // SAFETY: `addr` is an initialised sockaddr_un and `len` does not
        // exceed its size; `fd` is a socket we own. connect only reads addr.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                (&raw const addr).cast::<libc::sockaddr>(),
                len as libc::socklen_t,
            )
        };
        if r < 0 {
            let err = io::Error::last_os_error();
            return Err(BackendError::Connect {
                path: path.into(),
                err,
            });
        }
        Self::from_socket(fd, &path.display().to_string())
    }

    /// Uses a connected Unix socket that keeps message boundaries
    /// (`SOCK_SEQPACKET` or `SOCK_DGRAM`); a stream socket is refused.
    pub fn from_socket(fd: OwnedFd, name: &str) -> Result<Self, BackendError> {
        let mut ty: libc::c_int = 0;
        let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: SO_TYPE writes one c_int into `ty`, whose size `len` holds.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TYPE,
                (&raw mut ty).cast(),
                &mut len,
            )
        };
        if r < 0 {
            return Err(BackendError::Socket(io::Error::last_os_error()));
        }
        if ty != libc::SOCK_SEQPACKET && ty != libc::SOCK_DGRAM {
            return Err(BackendError::NotMessageSocket(ty));
        }
        set_nonblocking(&fd)?;
        Ok(Self {
            fd,
            kind: BackendKind::Socket,
            name: format!("socket {name}"),
        })
    }

    /// Two connected `SOCK_SEQPACKET` backends: one for the device, one
    /// for a test (or an in-process peer) to play the network.
    pub fn pair() -> Result<(Self, Self), BackendError> {
        let mut fds = [0 as RawFd; 2];
        let ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
        // SAFETY: socketpair writes two descriptors into `fds`.
        let r = unsafe { libc::socketpair(libc::AF_UNIX, ty, 0, fds.as_mut_ptr()) };
        if r < 0 {
            return Err(BackendError::Socket(io::Error::last_os_error()));
        }
        // SAFETY: both descriptors were just created and nothing else owns them.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((
            Self::from_socket(a, "pair (device end)")?,
            Self::from_socket(b, "pair (peer end)")?,
        ))
    }

    /// Attaches to the TAP interface `name` (created if it does not exist
    /// and the process may create it), without packet information.
    pub fn open_tap(name: &str) -> Result<Self, BackendError> {
        let file = open_tap(name)?;
        Ok(Self {
            fd: file.into(),
            kind: BackendKind::Tap,
            name: format!("tap {name}"),
        })
    }

    /// What kind of descriptor this is.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// A name for log messages ("socket PATH", "tap NAME").
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends one frame without blocking. `WouldBlock` means the peer is
    /// not keeping up; the caller drops the frame.
    pub fn send(&self, frame: &[u8]) -> io::Result<()> {
        let fd = self.fd.as_raw_fd();
        let n = match self.kind {
            // SAFETY: `frame` is valid for reads of its length.
            BackendKind::Socket => unsafe {
                libc::send(
                    fd,
                    frame.as_ptr().cast(),
                    frame.len(),
                    libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                )
            },
            // SAFETY: as above; the tap descriptor is non-blocking.
            BackendKind::Tap => unsafe { libc::write(fd, frame.as_ptr().cast(), frame.len()) },
        };
        match usize::try_from(n) {
            Err(_) => Err(io::Error::last_os_error()),
            Ok(n) if n != frame.len() => Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{} took {n} of {} bytes", self.name, frame.len()),
            )),
            Ok(_) => Ok(()),
        }
    }

    /// Waits up to `timeout` until a [`Backend::send`] would not block;
    /// `Ok(false)` if it still would.
    pub fn wait_writable(&self, timeout: std::time::Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
        // SAFETY: one pollfd we own, for a descriptor we own.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        match n {
            n if n < 0 => Err(io::Error::last_os_error()),
            0 => Ok(false),
            _ => Ok(true),
        }
    }

    /// Receives one frame into `buf` without blocking. `Ok(None)`: nothing
    /// is waiting. `Ok(Some(n))` with `n > buf.len()` (sockets) or `n ==
    /// buf.len()` (tap) means the frame did not fit and was cut.
    pub fn recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        let fd = self.fd.as_raw_fd();
        let n = match self.kind {
            // SAFETY: `buf` is valid for writes of its length. MSG_TRUNC
            // makes the call return the whole message length, not just
            // what was copied.
            BackendKind::Socket => unsafe {
                libc::recv(
                    fd,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            },
            // SAFETY: as above.
            BackendKind::Tap => unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) },
        };
        match usize::try_from(n) {
            Ok(n) => Ok(Some(n)),
            Err(_) => match io::Error::last_os_error() {
                e if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                e => Err(e),
            },
        }
    }
}

impl AsFd for Backend {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

fn new_socket() -> Result<OwnedFd, BackendError> {
    let ty = libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC;
    // SAFETY: plain system call; it returns a new descriptor or -1.
    let fd = unsafe { libc::socket(libc::AF_UNIX, ty, 0) };
    if fd < 0 {
        return Err(BackendError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_nonblocking(fd: &OwnedFd) -> Result<(), BackendError> {
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory is passed.
    let r = unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if r < 0 {
        return Err(BackendError::Nonblock(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::net::{UnixDatagram, UnixStream};
    use std::time::{Duration, Instant};

    /// Waits up to `timeout` for a frame on `b`.
    pub(crate) fn recv_wait(b: &Backend, timeout: Duration) -> Option<Vec<u8>> {
        let end = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        while Instant::now() < end {
            if let Some(n) = b.recv(&mut buf).expect("recv") {
                buf.truncate(n);
                return Some(buf);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        None
    }

    /// A listening SOCK_SEQPACKET socket at `path`.
    fn listen(path: &Path) -> OwnedFd {
        let fd = new_socket().unwrap();
        // SAFETY: as in `Backend::connect`: zeroed plain data, then a
        // path shorter than sun_path.
        let mut addr: libc::sockaddr_un = unsafe { mem::zeroed() };
        addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
        let bytes = path.as_os_str().as_bytes();
        for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        let len = (mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
        // SAFETY: bind reads `len` bytes of `addr`; listen takes no memory.
        unsafe {
            let a = (&raw const addr).cast::<libc::sockaddr>();
            assert_eq!(libc::bind(fd.as_raw_fd(), a, len), 0);
            assert_eq!(libc::listen(fd.as_raw_fd(), 4), 0);
        }
        fd
    }

    #[test]
    fn pair_keeps_frame_boundaries_and_reports_truncation() {
        let (a, b) = Backend::pair().unwrap();
        a.send(&[1; 60]).unwrap();
        a.send(&[2; 1514]).unwrap();
        assert_eq!(recv_wait(&b, Duration::from_secs(1)).unwrap(), vec![1; 60]);
        let mut small = [0u8; 100];
        assert_eq!(b.recv(&mut small).unwrap(), Some(1514), "real length");
        assert_eq!(b.recv(&mut small).unwrap(), None);
    }

    #[test]
    fn a_full_peer_makes_send_fail_without_blocking() {
        let (a, _b) = Backend::pair().unwrap();
        let frame = [0u8; 1514];
        let err = (0..100_000).find_map(|_| a.send(&frame).err()).unwrap();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
    }

    #[test]
    fn connect_to_a_seqpacket_listener() {
        let dir = std::env::temp_dir().join(format!("specvm-net-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bridge.sock");
        let _ = std::fs::remove_file(&path);
        let listener = listen(&path);
        let client = Backend::connect(&path).unwrap();
        // SAFETY: accept with null address pointers returns a new descriptor.
        let peer = unsafe {
            libc::accept(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        };
        assert!(peer >= 0);
        // SAFETY: `peer` is a fresh descriptor that nothing else owns.
        let peer = Backend::from_socket(unsafe { OwnedFd::from_raw_fd(peer) }, "peer").unwrap();
        client.send(b"frame one").unwrap();
        assert_eq!(
            recv_wait(&peer, Duration::from_secs(1)).unwrap(),
            b"frame one"
        );
        std::fs::remove_dir_all(&dir).unwrap();
        let err = Backend::connect(&path).unwrap_err();
        assert!(matches!(err, BackendError::Connect { .. }), "{err}");
    }

    /// An ARP request from 192.0.2.2 (`mac`) for 192.0.2.1.
    fn arp_request(mac: [u8; 6]) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&[192, 0, 2, 2, 0, 0, 0, 0, 0, 0, 192, 0, 2, 1]);
        f.resize(60, 0);
        f
    }

    /// Needs root and a network namespace of its own, so it is ignored by
    /// default. Run it as:
    ///
    /// ```text
    /// ns=specvm-test-$$; ip netns add $ns
    /// ip netns exec $ns env SPECVM_TAP_TEST=1 target/debug/deps/vmm-<hash> \
    ///     --ignored tap_answers_arp
    /// ip netns del $ns
    /// ```
    #[test]
    #[ignore = "needs root inside a throwaway network namespace"]
    fn tap_answers_arp() {
        assert_eq!(
            std::env::var("SPECVM_TAP_TEST").as_deref(),
            Ok("1"),
            "run only inside a network namespace made for it (see the doc comment)"
        );
        let tap = Backend::open_tap("spectap0").unwrap();
        assert_eq!(tap.kind(), BackendKind::Tap);
        let ip = |args: &[&str]| {
            let ok = std::process::Command::new("ip")
                .args(args)
                .status()
                .unwrap();
            assert!(ok.success(), "ip {args:?}");
        };
        ip(&["link", "set", "spectap0", "up"]);
        ip(&["addr", "add", "192.0.2.1/24", "dev", "spectap0"]);
        let mac = [2, 0, 0, 0, 0, 2];
        tap.send(&arp_request(mac)).unwrap();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            let Some(f) = recv_wait(&tap, Duration::from_millis(100)) else {
                continue;
            };
            // Skip whatever else the kernel sends (IPv6 discovery, say).
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                assert_eq!(&f[..6], &mac);
                assert_eq!(&f[28..32], &[192, 0, 2, 1]);
                return;
            }
        }
        panic!("no ARP reply from the tap interface");
    }

    #[test]
    fn bad_paths_names_and_socket_types_are_refused() {
        let long = PathBuf::from("/".repeat(200));
        assert!(matches!(
            Backend::connect(&long),
            Err(BackendError::PathTooLong(_))
        ));
        for name in ["", "a/b", "sixteen-chars-xx", "sp ace"] {
            assert!(
                matches!(
                    Backend::open_tap(name),
                    Err(BackendError::Tap(TapError::Name(_)))
                ),
                "{name:?}"
            );
        }
        let (s, _t) = UnixStream::pair().unwrap();
        let err = Backend::from_socket(s.into(), "stream").unwrap_err();
        assert!(matches!(err, BackendError::NotMessageSocket(_)));
        let (d, _e) = UnixDatagram::pair().unwrap();
        assert_eq!(
            Backend::from_socket(d.into(), "dgram").unwrap().kind(),
            BackendKind::Socket
        );
    }
}
