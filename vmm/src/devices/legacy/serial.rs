//! The COM1 serial console: vm-superio's 8250 model on the bus, with its
//! output and input connected to a backend (stdout/stdin, a file, a Unix
//! socket, or nothing). During a Linux boot, the transmitted bytes also go
//! to a [`ConsoleWatch`], which recognises the boot's milestones.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::config::SerialConfig;
use crate::devices::bus::DeviceState;
use crate::devices::BusDevice;
use crate::progress::{self, ConsoleWatch};

/// Most console output kept for a socket client that has not connected yet.
/// Past this, the oldest bytes are dropped, and the client is told how many.
const SOCKET_BACKLOG: usize = 1 << 20;

/// Errors setting up a serial backend.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// The output file could not be opened.
    #[error("opening serial output file {0}: {1}")]
    File(PathBuf, io::Error),
    /// The socket could not be bound.
    #[error("binding serial socket {0}: {1}")]
    Socket(PathBuf, io::Error),
    /// The interrupt eventfd could not be created.
    #[error("creating the serial interrupt eventfd: {0}")]
    EventFd(io::Error),
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

/// A Unix-socket console: one client at a time; output queued while none is
/// connected.
#[derive(Default)]
pub struct SocketConsole {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
    dropped: usize,
}

/// Where the UART's transmitted bytes go.
pub enum SerialOut {
    /// The VMM's stdout.
    Stdout(io::Stdout),
    /// Nowhere.
    Null,
    /// A file.
    File(File),
    /// A Unix-socket client.
    Socket(Arc<Mutex<SocketConsole>>),
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::Stdout(s) => {
                // The console is line-oriented for a person watching; it is
                // flushed so a slow guest's progress shows at once (in
                // whole lines while a progress bar shares the terminal).
                progress::write_console(s, buf)?;
                Ok(buf.len())
            }
            Self::Null => Ok(buf.len()),
            Self::File(f) => f.write(buf),
            Self::Socket(c) => {
                let mut c = c.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(client) = c.client.as_mut() {
                    if client.write_all(buf).is_ok() {
                        return Ok(buf.len());
                    }
                    c.client = None;
                }
                c.backlog.extend(buf);
                let excess = c.backlog.len().saturating_sub(SOCKET_BACKLOG);
                c.backlog.drain(..excess);
                c.dropped += excess;
                Ok(buf.len())
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Stdout(s) => s.flush(),
            Self::File(f) => f.flush(),
            _ => Ok(()),
        }
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
        *open.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }

    fn wait(&self) {
        let (open, cv) = &*self.0;
        let mut g = open.lock().unwrap_or_else(|e| e.into_inner());
        while !*g {
            g = cv.wait(g).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl SerialDevice {
    /// Creates the UART for `config`, and starts the input thread that feeds
    /// it, if the backend has input. Input reaches the UART once
    /// [`SerialDevice::input_gate`] is opened. What the guest transmits
    /// also goes to `watch`, if any.
    pub fn new(config: &SerialConfig, watch: Option<ConsoleWatch>) -> Result<Self, SerialError> {
        let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?;
        let (out, input) = match config {
            SerialConfig::Stdout => (SerialOut::Stdout(io::stdout()), Input::Stdin),
            SerialConfig::Null => (SerialOut::Null, Input::None),
            SerialConfig::File(p) => {
                let f = File::options()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| SerialError::File(p.clone(), e))?;
                (SerialOut::File(f), Input::None)
            }
            SerialConfig::Socket(p) => {
                let console = Arc::new(Mutex::new(SocketConsole::default()));
                let listener = bind_socket(p)?;
                (
                    SerialOut::Socket(console.clone()),
                    Input::Socket(listener, console),
                )
            }
        };
        let out = ConsoleOut::new(out, watch);
        let uart = Arc::new(Mutex::new(Serial::new(IrqTrigger(evt), out)));
        let gate = InputGate::default();
        input.spawn(uart.clone(), gate.clone());
        Ok(Self { uart, gate })
    }

    /// The gate to open when the VM is built (and restored) and runs.
    pub fn input_gate(&self) -> InputGate {
        self.gate.clone()
    }

    /// The eventfd that signals the UART's interrupt.
    pub fn interrupt_evt(&self) -> io::Result<EventFd> {
        lock_uart(&self.uart).interrupt_evt().0.try_clone()
    }
}

fn bind_socket(p: &Path) -> Result<UnixListener, SerialError> {
    // A stale socket file from an earlier run would make bind fail.
    if p.exists() {
        let _ = std::fs::remove_file(p);
    }
    UnixListener::bind(p).map_err(|e| SerialError::Socket(p.to_path_buf(), e))
}

fn lock_uart(u: &Mutex<Uart>) -> std::sync::MutexGuard<'_, Uart> {
    u.lock().unwrap_or_else(|e| e.into_inner())
}

enum Input {
    None,
    Stdin,
    Socket(UnixListener, Arc<Mutex<SocketConsole>>),
}

impl Input {
    fn spawn(self, uart: Arc<Mutex<Uart>>, gate: InputGate) {
        match self {
            Input::None => {}
            Input::Stdin => {
                let _ = thread::Builder::new()
                    .name("serial-stdin".into())
                    .spawn(move || pump(io::stdin(), &uart, &gate));
            }
            Input::Socket(listener, console) => {
                let _ = thread::Builder::new()
                    .name("serial-socket".into())
                    .spawn(move || accept_clients(listener, console, uart, gate));
            }
        }
    }
}

/// Serves socket clients one after another: each gets the backlog, then the
/// live output, and its input goes to the UART.
fn accept_clients(
    listener: UnixListener,
    console: Arc<Mutex<SocketConsole>>,
    uart: Arc<Mutex<Uart>>,
    gate: InputGate,
) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let Ok(reader) = stream.try_clone() else {
            continue;
        };
        {
            let mut c = console.lock().unwrap_or_else(|e| e.into_inner());
            if c.dropped > 0 {
                let _ = writeln!(
                    stream,
                    "[specvm: {} bytes of console output were dropped]",
                    c.dropped
                );
                c.dropped = 0;
            }
            let backlog: Vec<u8> = c.backlog.drain(..).collect();
            if stream.write_all(&backlog).is_err() {
                continue;
            }
            c.client = Some(stream);
        }
        pump(reader, &uart, &gate);
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
            let taken = lock_uart(uart).enqueue_raw_bytes(pending).unwrap_or(0);
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
            *first = lock_uart(&self.uart).read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(off), Some(&v)) = (u8::try_from(offset), data.first()) {
            if let Err(e) = lock_uart(&self.uart).write(off, v) {
                tracing::warn!("serial: write to register {off}: {e:?}");
            }
        }
    }

    fn save_state(&self) -> DeviceState {
        DeviceState::Serial(lock_uart(&self.uart).state())
    }

    /// Restores the registers and the receive FIFO. The output backend
    /// (and the console watcher) stay as they are: bytes already sent to
    /// the console cannot be taken back.
    fn restore_state(&mut self, state: &DeviceState) -> Result<(), String> {
        let DeviceState::Serial(st) = state else {
            return Err(format!("serial: cannot restore from {state:?}"));
        };
        let mut g = lock_uart(&self.uart);
        let evt = || {
            g.interrupt_evt()
                .0
                .try_clone()
                .map_err(|e| format!("serial: {e}"))
        };
        let (placeholder, kept) = (evt()?, evt()?);
        let old = std::mem::replace(
            &mut *g,
            Serial::new(
                IrqTrigger(placeholder),
                ConsoleOut::new(SerialOut::Null, None),
            ),
        );
        let out = old.into_writer();
        *g = Serial::from_state(st, IrqTrigger(kept), NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let saved = dev.save_state();
        dev.write(3, &[0x03]);
        dev.restore_state(&saved).unwrap();
        let mut lcr = [0u8];
        dev.read(3, &mut lcr);
        assert_eq!(lcr[0], 0x83);
        assert!(dev.restore_state(&DeviceState::Stateless).is_err());
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
        let saved = dev.save_state();
        dev.restore_state(&saved).unwrap();
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
        let saved = dev.save_state();
        client.write_all(b"x").unwrap();
        thread::sleep(Duration::from_millis(100));
        // Line status register bit 0: data ready.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 0, "input must wait for the gate");
        dev.restore_state(&saved).unwrap();
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
}
