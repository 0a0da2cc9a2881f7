//! `netbridge-bench`: the measuring half of `benches/netbridge.py`.
//!
//! ```text
//! netbridge-bench codec [--iters N]
//! netbridge-bench pump-bridge --sock PATH [--rx-sock PATH] [--secs S] [--size B] [--tagged] [--max-frames N]
//! netbridge-bench pump-tap --tx TAP --rx TAP [--rx-netns NAME] [--secs S] [--size B] [--max-frames N]
//! ```
//!
//! - `codec` times the codec calls on the path of one packet (the VMM's
//!   `retag` on send, the bridge's tag read, the receiving VMM's
//!   `parse_tags` and `strip`) and prints one JSON line per operation with
//!   the median and the lowest nanoseconds per frame over 9 batches of N frames.
//! - `pump-bridge` connects to a running netbridge as two ports (VMs
//!   4001 and 4002), sends UDP/IPv4 frames from the first to the second as
//!   fast as it can for S seconds (at most N frames), untagged or tagged
//!   with one id of the sender's, and prints one JSON line: frames sent,
//!   frames received, and the received rate. With `--rx-sock` the
//!   receiver is a port of that other bridge (a peer of the first:
//!   `benches/peering.py`).
//! - `pump-tap` does the same through two existing TAP devices (the
//!   caller puts them on a Linux bridge, in a network namespace of its
//!   own): it writes frames into `--tx` and reads them from `--rx`. With
//!   `--rx-netns` the `--rx` TAP is opened in that namespace (the kernel's
//!   VXLAN between two namespaces: `benches/peering.py`).
//!
//! Every frame is an L2 unicast between two locally administered MACs; the
//! IPv4 addresses (10.99.0.1 → 10.99.0.2) are never routed anywhere.

use std::fs::File;
use std::hint::black_box;
use std::io::{BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use specwire::codec::{self, SpecId};
use specwire::protocol::{
    decode, encode_control, encode_frame, framed, read_message, write_message, Control, Message,
    KIND_FRAME,
};
use specwire::tap::open_tap;

const MAC_TX: [u8; 6] = [0x02, 0x6e, 0x62, 0x62, 0x00, 0x01];
const MAC_RX: [u8; 6] = [0x02, 0x6e, 0x62, 0x62, 0x00, 0x02];
const VM_TX: u32 = 4001;
const VM_RX: u32 = 4002;
/// How long the receiver waits for stragglers once the sender stopped.
const DRAIN: Duration = Duration::from_millis(300);

/// Benchmarks for netbridge (see benches/netbridge.py).
#[derive(Debug, Parser)]
#[command(name = "netbridge-bench")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Time the codec per frame.
    Codec {
        /// Frames per batch.
        #[arg(long, default_value_t = 200_000)]
        iters: u32,
    },
    /// Pump frames between two ports of a running netbridge.
    PumpBridge {
        /// The bridge's port socket.
        #[arg(long)]
        sock: PathBuf,
        /// The receiver's bridge, if not the sender's (a peer of it).
        #[arg(long)]
        rx_sock: Option<PathBuf>,
        #[command(flatten)]
        load: Load,
        /// Tag every frame with a speculation of the sender's.
        #[arg(long)]
        tagged: bool,
    },
    /// Pump frames from one TAP to another (through a Linux bridge).
    PumpTap {
        /// The TAP to write frames into.
        #[arg(long)]
        tx: String,
        /// The TAP to read them from.
        #[arg(long)]
        rx: String,
        /// The network namespace (a name under /run/netns) of `--rx`.
        #[arg(long)]
        rx_netns: Option<String>,
        #[command(flatten)]
        load: Load,
    },
}

#[derive(Debug, clap::Args)]
struct Load {
    /// How long to send, in seconds (at most 10).
    #[arg(long, default_value_t = 1.0)]
    secs: f64,
    /// Ethernet frame length in bytes, before any tag (60..=1500).
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// The most frames to send.
    #[arg(long, default_value_t = 20_000_000)]
    max_frames: u64,
}

fn main() -> ExitCode {
    let r = match Args::parse().cmd {
        Cmd::Codec { iters } => {
            codec_bench(iters.max(1));
            Ok(())
        }
        Cmd::PumpBridge {
            sock,
            rx_sock,
            load,
            tagged,
        } => pump_bridge(&sock, rx_sock.as_ref(), &load, tagged),
        Cmd::PumpTap {
            tx,
            rx,
            rx_netns,
            load,
        } => pump_tap(&tx, &rx, rx_netns.as_deref(), &load),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netbridge-bench: error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A UDP/IPv4 frame of `size` bytes from `src` to `dst`, no IP options.
fn udp_frame(size: usize, dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
    let size = size.clamp(60, 1500);
    let mut f = vec![0u8; size];
    f[0..6].copy_from_slice(&dst);
    f[6..12].copy_from_slice(&src);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&[10, 99, 0, src[5]]);
        ip[16..20].copy_from_slice(&[10, 99, 0, dst[5]]);
        let mut s: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while s > 0xffff {
            s = (s & 0xffff) + (s >> 16);
        }
        ip[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
    }
    f[34..36].copy_from_slice(&9999u16.to_be_bytes());
    f[36..38].copy_from_slice(&9999u16.to_be_bytes());
    f[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    f
}

/// Nanoseconds per call of `op`: the median and the fastest of 9 batches
/// of `iters` calls (the fastest is the least disturbed by other load).
fn time_op(iters: u32, mut op: impl FnMut()) -> (f64, f64) {
    for _ in 0..iters / 10 + 1 {
        op();
    }
    let mut batches: Vec<f64> = (0..9)
        .map(|_| {
            let t = Instant::now();
            for _ in 0..iters {
                op();
            }
            t.elapsed().as_nanos() as f64 / f64::from(iters)
        })
        .collect();
    batches.sort_by(f64::total_cmp);
    (batches[4], batches[0])
}

fn codec_bench(iters: u32) {
    let one = [SpecId::new(1, 7)];
    let four = [
        SpecId::new(1, 7),
        SpecId::new(2, 3),
        SpecId::new(3, 9),
        SpecId::new(4, 1),
    ];
    for size in [64usize, 1474] {
        let plain = udp_frame(size, MAC_RX, MAC_TX);
        let tagged1 = codec::retag(&plain, &one).expect("tagging a valid frame");
        let tagged4 = codec::retag(&plain, &four).expect("tagging a valid frame");
        let mut reused = Vec::with_capacity(size + codec::TAG_HEADROOM);
        let report = |op: &str, ids: usize, what: &str, (med, min): (f64, f64)| {
            println!(
                "{{\"op\":\"{op}\",\"size\":{size},\"ids\":{ids},\"ns_median\":{med:.1},\"ns_min\":{min:.1},\"what\":\"{what}\"}}"
            );
        };
        let ns = time_op(iters, || {
            black_box(black_box(&plain).to_vec());
        });
        report("copy", 0, "Vec copy of the frame (reference)", ns);
        for (ids, name) in [
            (&[][..], "retag"),
            (&one[..], "retag"),
            (&four[..], "retag"),
        ] {
            let ns = time_op(iters, || {
                black_box(codec::retag(black_box(&plain), black_box(ids)).ok());
            });
            report(
                name,
                ids.len(),
                "VMM send: retag an untagged guest frame",
                ns,
            );
        }
        let ns = time_op(iters, || {
            black_box(codec::retag_into(black_box(&plain), black_box(&one), &mut reused).ok());
        });
        report("retag_into", 1, "VMM send, reused buffer", ns);
        for (f, ids) in [(&plain, 0usize), (&tagged1, 1), (&tagged4, 4)] {
            let ns = time_op(iters, || {
                black_box(netbridge::tags::read(black_box(f)).ok());
            });
            report("bridge_read", ids, "bridge: tags::read on ingress", ns);
            let ns = time_op(iters, || {
                black_box(codec::parse_tags(black_box(f)).ok());
            });
            report("parse_tags", ids, "VMM receive: parse_tags", ns);
        }
        for (f, ids) in [(&tagged1, 1usize), (&tagged4, 4)] {
            let ns = time_op(iters, || {
                black_box(codec::strip(black_box(f)).ok());
            });
            report("strip", ids, "VMM receive: strip before delivery", ns);
        }
    }
}

/// The received rate and counts, as one JSON line.
fn print_result(kind: &str, load: &Load, frame_len: usize, sent: u64, rx: &RxCount, t0: Instant) {
    let span = rx
        .last
        .map_or(0.0, |l| l.duration_since(t0).as_secs_f64())
        .max(1e-9);
    println!(
        "{{\"kind\":\"{kind}\",\"size\":{},\"frame_len\":{frame_len},\"secs\":{},\"sent\":{sent},\"received\":{},\"span_s\":{span:.4},\"rx_fps\":{:.0}}}",
        load.size,
        load.secs,
        rx.frames,
        rx.frames as f64 / span
    );
}

#[derive(Debug, Default)]
struct RxCount {
    frames: u64,
    last: Option<Instant>,
}

fn is_ours(f: &[u8]) -> bool {
    f.len() >= 12 && f[0..6] == MAC_RX && f[6..12] == MAC_TX
}

fn deadline(load: &Load) -> Duration {
    Duration::from_secs_f64(load.secs.clamp(0.05, 10.0))
}

// ---------------------------------------------------------------- bridge

fn send_ctl(s: &mut UnixStream, c: &Control) -> Result<(), specwire::protocol::MessageError> {
    write_message(s, &encode_control(c))
}

/// Connects as VM `vm` and returns the stream and the welcome's next_seq.
fn port(sock: &PathBuf, vm: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(sock).map_err(|e| format!("{}: {e}", sock.display()))?;
    send_ctl(
        &mut s,
        &Control::Hello {
            vm,
            speculative: true,
        },
    )
    .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    match read_message(&mut s).map(|m| decode(&m)) {
        Ok(Ok(Message::Control(Control::Welcome { next_seq, .. }))) => Ok((s, next_seq)),
        other => Err(format!("VM {vm}: no welcome: {other:?}")),
    }
}

fn pump_bridge(
    sock: &PathBuf,
    rx_sock: Option<&PathBuf>,
    load: &Load,
    tagged: bool,
) -> Result<(), String> {
    let (mut tx, seq) = port(sock, VM_TX)?;
    let (mut rx, _) = port(rx_sock.unwrap_or(sock), VM_RX)?;
    let plain = udp_frame(load.size, MAC_RX, MAC_TX);
    let frame = if tagged {
        let id = SpecId::new(VM_TX, seq);
        send_ctl(&mut tx, &Control::Started { id }).map_err(|e| e.to_string())?;
        codec::retag(&plain, &[id]).map_err(|e| e.to_string())?
    } else {
        plain
    };
    // The receiver announces its MAC; the sender sees the flooded frame,
    // so the bridge has learned it before the load starts.
    let learn = udp_frame(60, [0xff; 6], MAC_RX);
    write_message(&mut rx, &encode_frame(&learn)).map_err(|e| e.to_string())?;
    loop {
        let m = read_message(&mut tx).map_err(|e| format!("waiting for the learn frame: {e}"))?;
        if m.first() == Some(&KIND_FRAME) && m[1..] == learn[..] {
            break;
        }
    }
    // The sender's port gets nothing more, but drain it anyway.
    let mut tx_drain = tx.try_clone().map_err(|e| e.to_string())?;
    tx_drain.set_read_timeout(None).map_err(|e| e.to_string())?;
    std::thread::spawn(move || {
        let mut sink = [0u8; 65536];
        while matches!(tx_drain.read(&mut sink), Ok(n) if n > 0) {}
    });
    rx.set_read_timeout(Some(DRAIN))
        .map_err(|e| e.to_string())?;
    let receiver = std::thread::spawn(move || {
        let mut r = BufReader::with_capacity(1 << 20, rx);
        let mut c = RxCount::default();
        while let Ok(m) = read_message(&mut r) {
            if m.first() == Some(&KIND_FRAME) && is_ours(&m[1..]) {
                c.frames += 1;
                c.last = Some(Instant::now());
            }
        }
        c
    });
    // Framed once, written many times: the loop measures the bridge.
    let msg = framed(&encode_frame(&frame));
    let t0 = Instant::now();
    let stop = t0 + deadline(load);
    let mut sent = 0u64;
    while sent < load.max_frames && (sent & 63 != 0 || Instant::now() < stop) {
        if tx.write_all(&msg).is_err() {
            break;
        }
        sent += 1;
    }
    let c = receiver.join().map_err(|_| "receiver panicked")?;
    let kind = match (rx_sock.is_some(), tagged) {
        (false, true) => "netbridge-tagged",
        (false, false) => "netbridge-untagged",
        (true, true) => "netbridge-peering-tagged",
        (true, false) => "netbridge-peering-untagged",
    };
    print_result(kind, load, frame.len(), sent, &c, t0);
    Ok(())
}

// ---------------------------------------------------------------- TAPs

#[repr(C)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

extern "C" {
    fn poll(fds: *mut PollFd, nfds: std::ffi::c_ulong, timeout: i32) -> i32;
}

const POLLIN: i16 = 0x1;

/// Waits up to `ms` for `f` to be readable.
fn readable(f: &File, ms: i32) -> bool {
    let mut p = PollFd {
        fd: f.as_raw_fd(),
        events: POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, owned here, for the length of the call.
    let r = unsafe { poll(&mut p, 1, ms) };
    r > 0 && p.revents & POLLIN != 0
}

/// Moves this thread (the only one yet) into the network namespace `name`.
fn enter_netns(name: &str) -> Result<(), String> {
    let path = format!("/run/netns/{name}");
    let ns = File::open(&path).map_err(|e| format!("{path}: {e}"))?;
    // SAFETY: setns with a namespace descriptor we own; it moves only the
    // calling thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns {path}: {}", std::io::Error::last_os_error()));
    }
    Ok(())
}

fn pump_tap(
    tx_name: &str,
    rx_name: &str,
    rx_netns: Option<&str>,
    load: &Load,
) -> Result<(), String> {
    // Both non-blocking: reads are polled for, and TAP writes do not wait.
    // A TAP's descriptor stays in the namespace it was opened in.
    let mut tx = open_tap(tx_name).map_err(|e| e.to_string())?;
    if let Some(ns) = rx_netns {
        enter_netns(ns)?;
    }
    let mut rx = open_tap(rx_name).map_err(|e| e.to_string())?;
    let frame = udp_frame(load.size, MAC_RX, MAC_TX);
    // Let the Linux bridge learn the receiver's MAC, as for netbridge; the
    // flooded copy comes out of the sender's TAP.
    let learn = udp_frame(60, [0xff; 6], MAC_RX);
    let mut buf = vec![0u8; 65536];
    let t_learn = Instant::now();
    let mut learned = false;
    while !learned && t_learn.elapsed() < Duration::from_secs(3) {
        rx.write_all(&learn)
            .map_err(|e| format!("{rx_name}: {e}"))?;
        while readable(&tx, 100) {
            let n = tx.read(&mut buf).map_err(|e| e.to_string())?;
            learned |= buf[..n] == learn[..];
        }
    }
    if !learned {
        return Err("the Linux bridge never forwarded the learn frame".into());
    }
    // One read per frame while frames come; poll only when there are none.
    let stop_rx = Arc::new(AtomicBool::new(false));
    let stop = stop_rx.clone();
    let receiver = std::thread::spawn(move || {
        let mut c = RxCount::default();
        let mut buf = vec![0u8; 65536];
        let mut idle_since: Option<Instant> = None;
        loop {
            match rx.read(&mut buf) {
                Ok(n) => {
                    idle_since = None;
                    if is_ours(&buf[..n]) {
                        c.frames += 1;
                        c.last = Some(Instant::now());
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if readable(&rx, 50) {
                        continue;
                    }
                    if stop.load(Ordering::Acquire) {
                        let since = *idle_since.get_or_insert_with(Instant::now);
                        if since.elapsed() >= DRAIN {
                            break;
                        }
                    }
                }
                Err(_) => break,
            }
        }
        c
    });
    // The sender's TAP gets nothing more; drain it in case.
    let mut tx_w = tx.try_clone().map_err(|e| e.to_string())?;
    let drain_stop = Arc::new(AtomicBool::new(false));
    let ds = drain_stop.clone();
    let drainer = std::thread::spawn(move || {
        let mut sink = vec![0u8; 65536];
        while !ds.load(Ordering::Acquire) {
            if readable(&tx, 50) && tx.read(&mut sink).is_err() {
                break;
            }
        }
        tx
    });
    let t0 = Instant::now();
    let stop_at = t0 + deadline(load);
    let mut sent = 0u64;
    while sent < load.max_frames && (sent & 63 != 0 || Instant::now() < stop_at) {
        if tx_w.write_all(&frame).is_err() {
            break;
        }
        sent += 1;
    }
    stop_rx.store(true, Ordering::Release);
    let c = receiver.join().map_err(|_| "receiver panicked")?;
    drain_stop.store(true, Ordering::Release);
    let _ = drainer.join();
    let kind = match rx_netns {
        Some(_) => "linux-vxlan-tap",
        None => "linux-bridge-tap",
    };
    print_result(kind, load, frame.len(), sent, &c, t0);
    Ok(())
}
