//! The receive thread: waits for frames on the backend, queues them in the
//! device and lets the device deliver what the guest has buffers for.
//!
//! It holds the device only weakly and the device lock only while handing
//! over a batch, so vCPUs are never kept waiting on the backend. It ends
//! when its stop eventfd is written (the [`super::NetHandle`] is dropped),
//! when the device is gone, or when the backend hangs up or fails.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};

use vmm_sys_util::eventfd::EventFd;

use super::backend::Backend;
use super::Net;
use crate::devices::virtio::MmioTransport;
use crate::sync::lock;

/// The transport around a net device, shared by the bus and the handle.
pub type NetTransport = Arc<Mutex<MmioTransport<Net>>>;

/// The largest frame read from a backend; larger ones are cut and dropped.
const RECV_BUFFER: usize = 65536;
/// Frames read per lock of the device.
const BATCH: usize = 64;

enum Wake {
    Stop,
    Readable { hangup: bool },
}

/// Starts the receive thread.
pub(super) fn spawn(
    device: Weak<Mutex<MmioTransport<Net>>>,
    backend: Arc<Backend>,
    stop: EventFd,
) -> io::Result<JoinHandle<()>> {
    thread::Builder::new()
        .name("virtio-net-rx".into())
        .spawn(move || run(&device, &backend, &stop))
}

fn run(device: &Weak<Mutex<MmioTransport<Net>>>, backend: &Backend, stop: &EventFd) {
    let mut buf = vec![0u8; RECV_BUFFER];
    loop {
        let hangup = match wait(backend, stop) {
            Ok(Wake::Stop) => return,
            Ok(Wake::Readable { hangup }) => hangup,
            Err(e) => {
                tracing::warn!("virtio-net: waiting on {}: {e}", backend.name());
                return;
            }
        };
        let (frames, cut, failed) = drain(backend, &mut buf);
        if !frames.is_empty() || cut > 0 {
            let Some(dev) = device.upgrade() else {
                return;
            };
            let mut t = lock(&dev);
            for f in frames {
                t.device_mut().enqueue_rx(f);
            }
            (0..cut).for_each(|_| t.device_mut().count_truncated_rx());
            t.process_backend_event();
        }
        if let Some(e) = failed {
            tracing::warn!("virtio-net: receiving from {}: {e}", backend.name());
            return;
        }
        if hangup {
            tracing::warn!("virtio-net: {} hung up; receive stops", backend.name());
            return;
        }
    }
}

/// Reads up to [`BATCH`] frames: (frames, frames cut for size, error).
fn drain(backend: &Backend, buf: &mut [u8]) -> (Vec<Vec<u8>>, usize, Option<io::Error>) {
    let mut frames = Vec::new();
    let mut cut = 0;
    while frames.len() + cut < BATCH {
        match backend.recv(buf) {
            Ok(None) => break,
            Ok(Some(n)) if n >= buf.len() => cut += 1,
            // An empty message (or the end of a closed socket) is no frame.
            Ok(Some(0)) => break,
            Ok(Some(n)) => frames.push(buf[..n].to_vec()),
            Err(e) => return (frames, cut, Some(e)),
        }
    }
    (frames, cut, None)
}

/// Blocks until the backend is readable or hung up, or `stop` is written.
fn wait(backend: &Backend, stop: &EventFd) -> io::Result<Wake> {
    let mut fds = [
        libc::pollfd {
            fd: backend.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is an array of two initialised pollfd structures,
        // which poll reads and whose revents it writes.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    if fds[1].revents != 0 {
        return Ok(Wake::Stop);
    }
    let hangup = fds[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0;
    Ok(Wake::Readable { hangup })
}
