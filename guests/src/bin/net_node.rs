//! A network node driven from its serial console, for tests that script
//! speculation across several VMs from the host.
//!
//! It sets up the virtio-net device in the first slot, prints
//! `net_node: ready`, then serves one-line commands read from the serial
//! port (the VMM's stdin), each ended by `\n` (a `\r` before it is ignored):
//!
//! - `s TEXT`: sends a UDP/IPv4 broadcast to port 7777 carrying TEXT and
//!   prints `net_node: sent TEXT`;
//! - `p`: prints the log of received payloads, `net_node: log [a,b,c]`;
//! - `f`: sends a frame whose IPv4 header carries a forged IPOPT_SPEC (VM 99,
//!   sequence 7, in the format of `docs/wire-format.md`) and the payload
//!   `forged`, then prints `net_node: sent forged`;
//! - `S`: the guest calls `speculate()` and prints `net_node: speculate R`
//!   with what it returned: 0, and once more with the reason if the VM is
//!   rolled back there (1 guest abort, 2 host abort); or
//!   `net_node: speculate error E`;
//! - `q`: prints `net_node: bye` and exits 0.
//!
//! Anything else, or a line longer than [`LINE_MAX`] bytes, prints
//! `net_node: ?`; an empty line is ignored.
//!
//! Every UDP payload that arrives on port 7777 is appended to the log and
//! printed as `net_node: got TEXT`. The log lives in guest memory, so a
//! rollback takes back what arrived after its checkpoint; what was printed
//! stays printed. It holds [`LOG_MAX`] payloads of up to [`ENTRY_MAX`]
//! bytes each (longer ones are cut); past that new payloads are counted and
//! `p` appends ` dropped N`. Bytes outside printable ASCII print as `?`.
//!
//! The loop polls the device and the serial port in turn, and spins for a
//! few microseconds when neither had anything. Exit 2: no device; 4: no
//! room for the device's memory.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::serial::Serial;
use guest_agent::virtio_net::{Dma, PhysMmio, VirtioNet, DMA_SIZE, FIRST_SLOT_BASE, MAX_FRAME};

/// The UDP port payloads go to and are received on.
const PORT: u16 = 7777;
/// Payloads the log holds.
const LOG_MAX: usize = 32;
/// Bytes kept of each logged payload.
const ENTRY_MAX: usize = 64;
/// The longest command line.
const LINE_MAX: usize = 200;
/// Bytes of a frame this node builds: headers, options and a full line.
const TX_FRAME_MAX: usize = 320;
/// How long to spin when there was nothing to do, in microseconds.
const IDLE_US: u64 = 20;
/// The forged tag: VM 99, sequence 7.
const FORGED_VM: u32 = 99;
const FORGED_SEQ: u32 = 7;

/// The received payloads.
struct Log {
    entries: [[u8; ENTRY_MAX]; LOG_MAX],
    lens: [usize; LOG_MAX],
    len: usize,
    dropped: usize,
}

impl Log {
    fn push(&mut self, payload: &[u8]) {
        if self.len == LOG_MAX {
            self.dropped += 1;
            return;
        }
        let n = payload.len().min(ENTRY_MAX);
        self.entries[self.len][..n].copy_from_slice(&payload[..n]);
        self.lens[self.len] = n;
        self.len += 1;
    }

    fn print(&self, out: &Serial) {
        out.write_bytes(b"net_node: log [");
        for i in 0..self.len {
            if i > 0 {
                out.write_byte(b',');
            }
            put_text(out, &self.entries[i][..self.lens[i]]);
        }
        out.write_byte(b']');
        if self.dropped > 0 {
            rt::print!(" dropped {}", self.dropped);
        }
        out.write_byte(b'\n');
    }
}

/// What feeding one byte to the line buffer gave.
enum Fed {
    /// The line goes on.
    More,
    /// A line of this many bytes is complete, at the start of the buffer.
    Line(usize),
    /// The line was longer than [`LINE_MAX`]; it was discarded.
    TooLong,
}

/// The command line being read.
struct Line {
    buf: [u8; LINE_MAX],
    len: usize,
    overflow: bool,
}

impl Line {
    fn feed(&mut self, b: u8) -> Fed {
        if b == b'\n' {
            let (len, overflow) = (self.len, self.overflow);
            self.len = 0;
            self.overflow = false;
            return if overflow {
                Fed::TooLong
            } else {
                Fed::Line(len)
            };
        }
        if self.len == LINE_MAX {
            self.overflow = true;
        } else {
            self.buf[self.len] = b;
            self.len += 1;
        }
        Fed::More
    }
}

/// Everything the node keeps, in guest memory.
struct State {
    frame: [u8; MAX_FRAME],
    log: Log,
    line: Line,
}

static mut STATE: State = State {
    frame: [0; MAX_FRAME],
    log: Log {
        entries: [[0; ENTRY_MAX]; LOG_MAX],
        lens: [0; LOG_MAX],
        len: 0,
        dropped: 0,
    },
    line: Line {
        buf: [0; LINE_MAX],
        len: 0,
        overflow: false,
    },
};

type Net = VirtioNet<PhysMmio>;

fn main(mem_size: u64, free_base: u64, _arg: u64) -> u32 {
    let dma_base = free_base.next_multiple_of(4096);
    if dma_base + DMA_SIZE as u64 > mem_size {
        rt::println!("net_node: no room for the device's memory");
        return 4;
    }
    // SAFETY: the first virtio slot is identity-mapped MMIO; dma_base is
    // free identity-mapped RAM (checked above), used for nothing else.
    let mut net =
        match unsafe { VirtioNet::new(PhysMmio::new(FIRST_SLOT_BASE), Dma::identity(dma_base)) } {
            Ok(n) => n,
            Err(e) => {
                rt::println!("net_node: {e}");
                return 2;
            }
        };
    // SAFETY: single-threaded, and this is the only reference ever made to
    // STATE.
    let state = unsafe { &mut *core::ptr::addr_of_mut!(STATE) };
    rt::println!("net_node: ready");
    serve(&mut net, state)
}

/// Polls the device and the console until `q`; returns the exit status.
fn serve(net: &mut Net, st: &mut State) -> u32 {
    let console = rt::console();
    loop {
        let mut busy = false;
        while let Some(n) = net.recv(&mut st.frame) {
            busy = true;
            if let Some(payload) = rt::udp::udp_payload(&st.frame[..n], PORT) {
                st.log.push(payload);
                console.write_bytes(b"net_node: got ");
                put_text(&console, payload);
                console.write_byte(b'\n');
            }
        }
        // At most one command per round, so frames are not left waiting
        // behind a burst of input.
        while let Some(b) = console.try_read_byte() {
            busy = true;
            match st.line.feed(b) {
                Fed::More => continue,
                Fed::TooLong => rt::println!("net_node: ?"),
                Fed::Line(len) => {
                    if execute(&st.line.buf[..len], net, &st.log, &console) {
                        rt::println!("net_node: bye");
                        return 0;
                    }
                }
            }
            break;
        }
        if !busy {
            idle();
        }
    }
}

/// Runs one command line; true for `q`.
fn execute(line: &[u8], net: &mut Net, log: &Log, out: &Serial) -> bool {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    match line {
        [] => {}
        b"q" => return true,
        b"p" => log.print(out),
        b"S" => match guest_agent::hypercall::speculate() {
            // 0 now; after a rollback to this point, the reason.
            Ok(r) => rt::println!("net_node: speculate {r}"),
            Err(e) => rt::println!("net_node: speculate error {e:?}"),
        },
        b"f" => {
            let tag = forged_tag();
            if send(net, &tag, b"forged") {
                rt::println!("net_node: sent forged");
            }
        }
        [b's', b' ', text @ ..] if !text.is_empty() => {
            if send(net, &[], text) {
                out.write_bytes(b"net_node: sent ");
                put_text(out, text);
                out.write_byte(b'\n');
            }
        }
        _ => rt::println!("net_node: ?"),
    }
    false
}

/// Spins for [`IDLE_US`] microseconds.
fn idle() {
    let start = rt::rdtsc();
    let ticks = rt::tsc_khz().max(1_000_000) * IDLE_US / 1000;
    while rt::rdtsc().wrapping_sub(start) < ticks {
        core::hint::spin_loop();
    }
}

/// Writes `text`, with bytes outside printable ASCII as `?`.
fn put_text(out: &Serial, text: &[u8]) {
    for &b in text {
        out.write_byte(if b == b' ' || b.is_ascii_graphic() {
            b
        } else {
            b'?'
        });
    }
}

/// IPOPT_SPEC with one id, VM [`FORGED_VM`] sequence [`FORGED_SEQ`]: type
/// 0x9E, length 12, version 1, count 1, then the id, big-endian.
fn forged_tag() -> [u8; 12] {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&[0x9e, 12, 1, 1]);
    t[4..8].copy_from_slice(&FORGED_VM.to_be_bytes());
    t[8..12].copy_from_slice(&FORGED_SEQ.to_be_bytes());
    t
}

/// Sends a UDP/IPv4 broadcast to [`PORT`] carrying `payload`, with
/// `options` (a multiple of 4 bytes, at most 40) in the IPv4 header.
/// Prints the error and returns false if it cannot.
fn send(net: &mut Net, options: &[u8], payload: &[u8]) -> bool {
    let mut f = [0u8; TX_FRAME_MAX];
    let Some(len) = rt::udp::build_frame(&mut f, net.mac(), PORT, options, payload) else {
        rt::println!("net_node: ?");
        return false;
    };
    match net.send(&f[..len]) {
        Ok(()) => true,
        Err(e) => {
            rt::println!("net_node: send: {e}");
            false
        }
    }
}
