//! Where a virtio-net device's frames go: one Ethernet frame per message,
//! over a Unix `SOCK_SEQPACKET` socket or a TAP device.

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

/// Errors opening a backend.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The socket could not be created or connected.
    #[error("net backend: connecting SOCK_SEQPACKET socket {0}: {1}")]
    Socket(String, io::Error),
    /// The TAP device could not be opened.
    #[error("net backend: opening TAP device {0}: {1}")]
    Tap(String, io::Error),
}

/// A frame backend. Both calls may run on different threads at once.
pub trait Backend: Send + Sync {
    /// Sends one frame.
    fn send(&self, frame: &[u8]) -> io::Result<()>;
    /// Receives one frame into `buf`, waiting at most `timeout`; `None`
    /// if none came.
    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>>;
}

/// A file descriptor that carries one frame per read and write.
#[derive(Debug)]
pub struct FrameFd {
    fd: OwnedFd,
    what: String,
}

impl FrameFd {
    /// What it is connected to, for logs.
    pub fn describe(&self) -> &str {
        &self.what
    }
}

fn cvt(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

impl Backend for FrameFd {
    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: `frame` is valid for reads of its length; the fd is ours.
        let n =
            cvt(unsafe { libc::write(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len()) })?;
        if n != frame.len() {
            return Err(io::Error::other(format!(
                "short write: {n} of {} bytes",
                frame.len()
            )));
        }
        Ok(())
    }

    fn recv(&self, buf: &mut [u8], timeout: Duration) -> io::Result<Option<usize>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: `pfd` is one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            };
        }
        if r == 0 {
            return Ok(None);
        }
        if pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0 && pfd.revents & libc::POLLIN == 0 {
            return Err(io::Error::new(io::ErrorKind::BrokenPipe, "peer closed"));
        }
        // SAFETY: `buf` is valid for writes of its length; the fd is ours.
        let n =
            cvt(unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })?;
        Ok(Some(n))
    }
}

/// Connects a `SOCK_SEQPACKET` Unix socket to `path`.
pub fn connect_socket(path: &Path) -> Result<FrameFd, BackendError> {
    let name = path.display().to_string();
    let err = |e| BackendError::Socket(name.clone(), e);
    let bytes = path.as_os_str().as_encoded_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "path too long",
        )));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: plain socket creation; the result is checked.
    let raw = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len,
        )
    };
    if r < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(FrameFd {
        fd,
        what: format!("socket {name}"),
    })
}

/// TUNSETIFF: attach the descriptor to a TUN/TAP interface.
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

/// `struct ifreq` as TUNSETIFF reads it: the name, then the flags.
#[repr(C)]
struct IfReq {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// Opens (or creates) the TAP interface `name`, without packet info.
pub fn open_tap(name: &str) -> Result<FrameFd, BackendError> {
    let err = |e| BackendError::Tap(name.to_string(), e);
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        )));
    }
    let dev = CString::new("/dev/net/tun").map_err(|e| err(io::Error::other(e)))?;
    // SAFETY: `dev` is a valid NUL-terminated path; the result is checked.
    let raw = unsafe { libc::open(dev.as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) };
    if raw < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    // SAFETY: `raw` is a new descriptor that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: IFF_TAP | IFF_NO_PI,
        _pad: [0; 22],
    };
    for (d, s) in req.name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    // SAFETY: TUNSETIFF reads an ifreq, which `req` is laid out as.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF as _, &mut req) };
    if r < 0 {
        return Err(err(io::Error::last_os_error()));
    }
    Ok(FrameFd {
        fd,
        what: format!("tap {name}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A listening SOCK_SEQPACKET socket (std has none).
    fn listen(path: &Path) -> OwnedFd {
        let _ = std::fs::remove_file(path);
        // SAFETY: plain socket calls, results checked.
        unsafe {
            let raw = libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET, 0);
            assert!(raw >= 0);
            let mut addr: libc::sockaddr_un = std::mem::zeroed();
            addr.sun_family = libc::AF_UNIX as _;
            for (d, s) in addr
                .sun_path
                .iter_mut()
                .zip(path.as_os_str().as_encoded_bytes())
            {
                *d = *s as libc::c_char;
            }
            let len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            assert_eq!(
                libc::bind(raw, (&addr as *const libc::sockaddr_un).cast(), len),
                0
            );
            assert_eq!(libc::listen(raw, 1), 0);
            OwnedFd::from_raw_fd(raw)
        }
    }

    #[test]
    fn seqpacket_keeps_frame_boundaries() {
        let path = std::env::temp_dir().join(format!("specvm-net-{}.sock", std::process::id()));
        let l = listen(&path);
        let c = connect_socket(&path).unwrap();
        // SAFETY: accept on our listening socket.
        let raw =
            unsafe { libc::accept(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut()) };
        assert!(raw >= 0);
        // SAFETY: `raw` is the accepted descriptor, owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let peer = FrameFd {
            fd,
            what: "peer".into(),
        };
        c.send(&[1, 2, 3]).unwrap();
        c.send(&[4; 60]).unwrap();
        let mut buf = [0u8; 2048];
        assert_eq!(
            peer.recv(&mut buf, Duration::from_secs(5)).unwrap(),
            Some(3)
        );
        assert_eq!(
            peer.recv(&mut buf, Duration::from_secs(5)).unwrap(),
            Some(60)
        );
        assert_eq!(
            peer.recv(&mut buf, Duration::from_millis(10)).unwrap(),
            None
        );
        assert!(connect_socket(Path::new("/nonexistent/x.sock")).is_err());
        let _ = std::fs::remove_file(&path);
    }
}
