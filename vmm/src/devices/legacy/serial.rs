//! The COM1 serial console: vm-superio's 8250 model on the bus, with its
//! output and input connected to a backend (stdout/stdin, a file, a Unix
//! socket, or nothing). During a Linux boot, the transmitted bytes also go
//! to a [`ConsoleWatch`], which recognises the boot's milestones.
//!
//! The vCPU that writes the transmit register never waits on a console
//! reader that does not read. Output for stdout and for a socket client goes
//! into an [`Outbox`] of at most [`OUT_BUFFER`] bytes, which a writer thread
//! empties into the reader:
//! - a socket client that reads slowly or not at all, or no client, never
//!   holds the vCPU: past the buffer the oldest bytes are dropped, counted,
//!   and the client is told how many where the gap is; a client that takes
//!   nothing for [`CLIENT_STALL`] is disconnected, so the next one can have
//!   the console;
//! - stdout keeps every byte as long as its reader takes some: with the
//!   buffer full the vCPU waits for room, but once the reader has taken
//!   nothing for [`STDOUT_STALL`] it counts as gone, and bytes are dropped
//!   (counted, with a marker) until it reads again;
//! - a file is written at once; a failing file is said once, and its lost
//!   bytes counted.
//!
//! When the device goes (and, as a backstop, at process exit) the writer
//! gets up to [`DRAIN_LIMIT`] to hand over what is buffered, and a count of
//! everything dropped is logged once.

mod outbox;
mod persist;

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use specwire::sock::{self, SockError, SocketFile};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::devices::BusDevice;
use crate::progress::ConsoleWatch;
use crate::sync::{lock, wait};

use outbox::{write_clients, write_stdout, Reader};
pub use outbox::{Outbox, CLIENT_STALL, DRAIN_LIMIT, OUT_BUFFER, STDOUT_STALL};

/// Errors setting up a serial backend.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file could not be opened.
    #[error("opening serial output file {0}: {1}")]
    File(PathBuf, io::Error),
    /// The socket's path is taken, or cannot be used (see
    /// [`specwire::sock`]).
    #[error("serial console: {0}")]
    SocketPath(#[from] SockError),
    /// The interrupt eventfd could not be created.
    #[error("creating the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
    /// A console thread could not be started.
    #[error("starting the serial console's {0} thread: {1}")]
    Thread(&'static str, io::Error),
}

/// Raises the serial interrupt by writing to an eventfd that KVM routes to
/// the UART's interrupt line (an irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// A file backend: written at once; a failure is logged once, and the
/// bytes lost are counted and logged when the device goes.
pub struct FileOut {
    file: File,
    path: PathBuf,
    failed: u64,
}

impl FileOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let e = match self.file.write(buf) {
            Ok(0) => io::ErrorKind::WriteZero.into(),
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return Err(e),
            Err(e) => e,
        };
        if self.failed == 0 {
            tracing::warn!(
                "serial: writing {}: {e}; console output that cannot be written is dropped \
                 (the count is logged at exit)",
                self.path.display()
            );
        }
        self.failed += buf.len() as u64;
        Ok(buf.len())
    }
}

impl Drop for FileOut {
    fn drop(&mut self) {
        if self.failed > 0 {
            tracing::warn!(
                "serial: {} bytes of console output could not be written to {}",
                self.failed,
                self.path.display()
            );
        }
    }
}

/// Where the UART's transmitted bytes go.
pub enum SerialOut {
    /// The VMM's stdout, through a writer thread.
    Stdout(Arc<Outbox>),
    /// Nowhere.
    Null,
    /// A file.
    File(FileOut),
    /// A Unix-socket client, through a writer thread.
    Socket(Arc<Outbox>),
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(o) | Self::Socket(o) => {
                o.push(buf);
                Ok(buf.len())
            }
            Self::Null => Ok(buf.len()),
            Self::File(f) => f.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        // The writer threads write as soon as bytes arrive; a file is not
        // buffered.
        Ok(())
    }
}

/// What the UART writes to: the backend, and the boot's console watcher.
pub struct ConsoleOut {
    backend: SerialOut,
    watch: Option<ConsoleWatch>,
}

impl ConsoleOut {
    fn new(backend: SerialOut, watch: Option<ConsoleWatch>) -> Self {
        Self { backend, watch }
    }
}

impl Write for ConsoleOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.backend.write(buf);
        if let Some(w) = self.watch.as_mut() {
            // The guest sent what the backend took; after an error the
            // UART does not send again (but does after an interruption).
            match &r {
                Ok(n) => w.feed(&buf[..*n]),
                Err(e) if e.kind() != io::ErrorKind::Interrupted => w.feed(buf),
                Err(_) => {}
            }
        }
        r
    }

    fn flush(&mut self) -> io::Result<()> {
        self.backend.flush()
    }
}

/// The 8250 model with its backend.
pub type Uart = Serial<IrqTrigger, NoEvents, ConsoleOut>;

/// The serial device as the bus sees it.
pub struct SerialDevice {
    uart: Arc<Mutex<Uart>>,
    gate: InputGate,
    /// The buffer of a stdout or socket console, finished when the device
    /// goes.
    outbox: Option<Arc<Outbox>>,
    /// The console socket's file: removed with the device, if still ours.
    _socket: Option<SocketFile>,
}

/// Holds console input back until the VM is ready for it: a restore
/// replaces the UART's receive FIFO with the snapshot's, so a byte queued
/// before it would be lost. The input thread reads its source, then waits
/// here before the first byte goes into the FIFO.
#[derive(Clone, Default)]
pub struct InputGate(Arc<(Mutex<bool>, std::sync::Condvar)>);

impl InputGate {
    /// Lets input through from now on.
    pub fn open(&self) {
        let (open, cv) = &*self.0;
        *lock(open) = true;
        cv.notify_all();
    }

    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut g = lock(open);
        while !*g {
            g = wait(cv, g);
        }
    }
}

impl SerialDevice {
    /// Creates the UART for `config`, and starts the threads that write its
    /// output and feed it input, as the backend needs. Input reaches the
    /// UART once [`SerialDevice::input_gate`] is opened. What the guest
    /// transmits also goes to `watch`, if any.
    pub fn new(config: &SerialConfig, watch: Option<ConsoleWatch>) -> Result<Self, SerialError> {
        Self::with_stall(config, watch, STDOUT_STALL)
    }

    fn with_stall(
        config: &SerialConfig,
        watch: Option<ConsoleWatch>,
        stall: Duration,
    ) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let (mut outbox, mut socket) = (None, None);
        let (out, input) = match config {
            SerialConfig::Stdout => {
                let o = Outbox::new(Reader::Stdout, stall);
                spawn("stdout", {
                    let o = o.clone();
                    move || write_stdout(o)
                })?;
                outbox = Some(o.clone());
                (SerialOut::Stdout(o), Input::Stdin)
            }
            SerialConfig::Null => (SerialOut::Null, Input::None),
            SerialConfig::File(p) => {
                let file = File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| SerialError::File(p.clone(), e))?;
                let path = p.clone();
                let f = FileOut {
                    file,
                    path,
                    failed: 0,
                };
                (SerialOut::File(f), Input::None)
            }
            SerialConfig::Socket(p) => {
                let (listener, file) = sock::listen(p, &sock::Access::default())?;
                socket = Some(file);
                let o = Outbox::new(Reader::Socket, stall);
                spawn("socket writer", {
                    let o = o.clone();
                    move || write_clients(o)
                })?;
                outbox = Some(o.clone());
                (SerialOut::Socket(o.clone()), Input::Socket(listener, o))
            }
        };
        let out = ConsoleOut::new(out, watch);
        let uart = Arc::new(Mutex::new(Serial::new(IrqTrigger(evt), out)));
        let gate = InputGate::default();
        input.spawn(uart.clone(), gate.clone())?;
        Ok(Self {
            uart,
            gate,
            outbox,
            _socket: socket,
        })
    }

    /// The gate to open when the VM is built (and restored) and runs.
    pub fn input_gate(&self) -> InputGate {
        self.gate.clone()
    }

    /// The eventfd that signals the UART's interrupt.
    pub fn interrupt_evt(&self) -> io::Result<EventFd> {
        lock(&self.uart).interrupt_evt().0.try_clone()
    }
}

impl Drop for SerialDevice {
    /// Lets the reader take what is buffered, for a while, and tells the
    /// count of dropped bytes; then the socket file goes.
    fn drop(&mut self) {
        if let Some(o) = &self.outbox {
            o.finish();
        }
    }
}

fn spawn(name: &'static str, f: impl FnOnce() + Send + 'static) -> Result<(), SerialError> {
    thread::Builder::new()
        .name(format!("serial-{}", name.replace(' ', "-")))
        .spawn(f)
        .map(drop)
        .map_err(|e| SerialError::Thread(name, e))
}

enum Input {
    None,
    Stdin,
    Socket(UnixListener, Arc<Outbox>),
}

impl Input {
    fn spawn(self, uart: Arc<Mutex<Uart>>, gate: InputGate) -> Result<(), SerialError> {
        match self {
            Input::None => Ok(()),
            Input::Stdin => spawn("stdin", move || pump(io::stdin(), &uart, &gate)),
            Input::Socket(listener, outbox) => spawn("socket", move || {
                accept_clients(&listener, &outbox, &uart, &gate)
            }),
        }
    }
}

/// The first wait after a failed accept; it doubles up to a second.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(10);

/// Serves socket clients one after another: each gets the output (what is
/// buffered first), and its input goes to the UART until it closes its
/// side. Accept errors (out of descriptors) are waited out, not spun on.
fn accept_clients(listener: &UnixListener, outbox: &Outbox, uart: &Mutex<Uart>, gate: &InputGate) {
    let mut delay = ACCEPT_BACKOFF;
    loop {
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {
                continue
            }
            Err(e) => {
                if delay == ACCEPT_BACKOFF {
                    tracing::warn!("serial: accepting a console client: {e}; trying again");
                }
                thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        delay = ACCEPT_BACKOFF;
        let reader = match stream
            .try_clone()
            .and_then(|r| outbox.attach(stream).map(|()| r))
        {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!("serial: a console client: {e}");
                continue;
            }
        };
        pump(reader, uart, gate);
    }
}

/// Copies input bytes into the UART's receive FIFO until the source ends.
/// When the FIFO is full the guest has not read it yet: wait and retry, so
/// no input byte is lost.
fn pump(mut src: impl Read, uart: &Mutex<Uart>, gate: &InputGate) {
    let mut buf = [0u8; 256];
    loop {
        let n = match src.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        gate.wait();
        let mut pending = &buf[..n];
        while !pending.is_empty() {
            let taken = lock(uart).enqueue_raw_bytes(pending).unwrap_or(0);
            pending = &pending[taken..];
            if !pending.is_empty() {
                thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The 8250 has byte-wide registers; wider accesses read one byte.
        if let (Ok(off), Some(first)) = (u8::try_from(offset), data.first_mut()) {
            *first = lock(&self.uart).read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = lock(&self.uart).write(off, v) {
                tracing::warn!("serial: write to register {off}: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::outbox::CHUNK;
    use super::*;
    use crate::persist::Persist;
    use std::os::unix::net::UnixStream;

    #[test]
    fn file_backend_receives_transmitted_bytes() {
        let dir = std::env::temp_dir().join(format!("specvm-serial-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("out.txt");
        let _ = std::fs::remove_file(&path);
        let mut dev = SerialDevice::new(&SerialConfig::File(path.clone()), None).unwrap();
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        drop(dev);
        assert_eq!(std::fs::read(&path).unwrap(), b"hi\n");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn state_round_trips_and_keeps_the_backend() {
        let mut dev = SerialDevice::new(&SerialConfig::Null, None).unwrap();
        dev.write(3, &[0x83]); // LCR: DLAB on, 8 bits
        let saved = dev.save().unwrap();
        dev.write(3, &[0x03]);
        dev.restore(&saved).unwrap();
        let mut lcr = [0u8];
        dev.read(3, &mut lcr);
        assert_eq!(lcr[0], 0x83);
    }

    #[test]
    fn transmitted_bytes_reach_the_console_watch() {
        let p = crate::progress::Progress::booting(1);
        let mut dev = SerialDevice::new(&SerialConfig::Null, p.console_watch()).unwrap();
        let send = |dev: &mut SerialDevice, s: &[u8]| {
            for b in s {
                dev.write(0, &[*b]);
            }
        };
        let reached = |p: &crate::progress::Progress| -> Vec<String> {
            p.boot_times().milestones.into_iter().map(|m| m.0).collect()
        };
        send(&mut dev, b"[    0.000000] Linux version 6.1.0\r\n");
        assert_eq!(reached(&p), ["kernel started"]);
        // With the divisor latch on, offset 0 is the divisor, not THR.
        dev.write(3, &[0x83]);
        send(&mut dev, b"smp: Brought up 1 node, 2 CPUs\n");
        dev.write(3, &[0x03]);
        // In loopback mode (MCR bit 4) nothing is transmitted.
        dev.write(4, &[0x10]);
        send(&mut dev, b"PCI: x\n");
        dev.write(4, &[0x00]);
        assert_eq!(reached(&p), ["kernel started"]);
        // A restore (as a speculation's abort does) keeps the watcher.
        let saved = dev.save().unwrap();
        dev.restore(&saved).unwrap();
        send(&mut dev, b"SPECVM-READY\r\n");
        assert_eq!(reached(&p), ["kernel started", "ready"]);
        assert!(p.boot_times().total_secs.is_some());
    }

    #[test]
    fn missing_directory_is_a_clear_error() {
        let p = PathBuf::from("/nonexistent-dir/serial.txt");
        let e = SerialDevice::new(&SerialConfig::File(p), None)
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent-dir/serial.txt"));
    }

    #[test]
    fn socket_client_gets_backlog_and_sends_input() {
        let dir = std::env::temp_dir().join(format!("specvm-sock-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("console.sock");
        let mut dev = SerialDevice::new(&SerialConfig::Socket(path.clone()), None).unwrap();
        for b in b"early" {
            dev.write(0, &[*b]);
        }
        let mut client = UnixStream::connect(&path).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut got = [0u8; 5];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"early");
        // Input sent before the VM is ready (here: before a restore puts
        // the UART's state back) is held, not lost to the restore.
        let saved = dev.save().unwrap();
        client.write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(100));
        // Line status register bit 0: data ready.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "input must wait for the gate");
        dev.restore(&saved).unwrap();
        dev.input_gate().open();
        for _ in 0..500 {
            dev.read(5, &mut lsr);
            if lsr[0] & 1 == 1 {
                break;
            }
            thread::sleep(Duration::from_millis(10));
        }
        let mut rx = [0u8];
        dev.read(0, &mut rx);
        assert_eq!(rx, *b"x");
        let _ = std::fs::remove_dir_all(&dir);
    }

    use crate::test_util::TempDir;

    fn send(dev: &mut SerialDevice, bytes: impl IntoIterator<Item = u8>) {
        for b in bytes {
            dev.write(0, &[b]);
        }
    }

    /// Reads `client` until `end` ends what it got.
    fn read_until(client: &mut UnixStream, end: &[u8]) -> Vec<u8> {
        client
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 65536];
        while !got.ends_with(end) {
            let n = client.read(&mut buf).unwrap();
            assert!(n > 0, "closed after {} bytes", got.len());
            got.extend_from_slice(&buf[..n]);
        }
        got
    }

    #[test]
    fn a_socket_client_that_never_reads_does_not_hold_the_vcpu() {
        let dir = TempDir::new("serial-noread");
        let path = dir.join("console.sock");
        let mut dev = SerialDevice::new(&SerialConfig::Socket(path.clone()), None).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        // The vCPU's writes, on a thread of their own so that a hang fails
        // the test instead of stopping it.
        let total = 3 * OUT_BUFFER;
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = thread::spawn(move || {
            send(&mut dev, (0..total).map(|i| b'a' + (i % 26) as u8));
            send(&mut dev, *b"END\n");
            let _ = tx.send(());
            dev
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the vCPU was held by a client that does not read");
        let dev = vcpu.join().unwrap();
        let dropped = dev.outbox.as_ref().unwrap().dropped();
        // What was not dropped is in the outbox (at most OUT_BUFFER), in
        // the chunk being written, or in the socket, which holds up to the
        // server end's send buffer while the client does not read (it
        // took about 200 KiB here when the writer thread ran often).
        let sndbuf = std::fs::read_to_string("/proc/sys/net/core/wmem_default")
            .ok()
            .and_then(|s| s.trim().parse::<usize>().ok())
            .unwrap_or(256 << 10);
        let kept = (OUT_BUFFER + CHUNK + sndbuf) as u64;
        assert!(dropped + kept >= total as u64, "{dropped} dropped");
        // The client reads at last: what the socket took, where the gap is
        // a marker with its size, and the newest megabyte.
        let got = read_until(&mut client, b"END\n");
        let text = String::from_utf8(got).unwrap();
        let (before, after) = text.split_once("[specvm: ").expect("a marker");
        let (n, after) = after
            .split_once(" bytes of console output were dropped]\n")
            .unwrap();
        assert_eq!(n.parse::<u64>().unwrap(), dropped);
        assert_eq!(before.len() + after.len() + dropped as usize, total + 4);
        assert!(after.len() >= OUT_BUFFER, "the newest bytes are kept");
        drop(dev);
        assert!(!path.exists(), "the socket file goes with the device");
    }

    #[test]
    fn buffered_output_reaches_a_reading_client_when_the_device_goes() {
        let dir = TempDir::new("serial-drain");
        let path = dir.join("console.sock");
        let mut dev = SerialDevice::new(&SerialConfig::Socket(path.clone()), None).unwrap();
        let mut client = UnixStream::connect(&path).unwrap();
        let reader = thread::spawn(move || read_until(&mut client, b"END\n"));
        let total = OUT_BUFFER / 2;
        send(&mut dev, (0..total).map(|i| b'a' + (i % 26) as u8));
        send(&mut dev, *b"END\n");
        drop(dev);
        assert_eq!(reader.join().unwrap().len(), total + 4, "nothing lost");
        assert!(!path.exists());
    }

    #[test]
    fn a_regular_file_at_the_socket_path_is_refused_and_kept() {
        let dir = TempDir::new("serial-file");
        let notes = dir.join("notes.txt");
        std::fs::write(&notes, "my notes").unwrap();
        let e = SerialDevice::new(&SerialConfig::Socket(notes.clone()), None)
            .err()
            .expect("refused");
        let want = format!("{} exists and is a regular file", notes.display());
        assert!(e.to_string().contains(&want), "{e}");
        assert_eq!(std::fs::read_to_string(&notes).unwrap(), "my notes");
    }

    #[test]
    fn a_failing_file_counts_its_lost_bytes() {
        let mut dev = SerialDevice::new(&SerialConfig::File("/dev/full".into()), None).unwrap();
        send(&mut dev, [b'x'; 100]);
        let uart = lock(&dev.uart);
        let SerialOut::File(f) = &uart.writer().backend else {
            panic!("a file backend");
        };
        assert_eq!(f.failed, 100);
    }
}
