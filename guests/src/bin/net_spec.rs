//! Speculation across VMs, one program in two roles (`--guest-arg`):
//!
//! - 1, the sender: sends `hello-1`; speculates and sends `spec-2` (the VMM
//!   tags it with the speculation); waits, then aborts; after the rollback
//!   sends `final-3` and exits 0.
//! - 3, the committing sender: the same, but commits instead of aborting,
//!   so the receiver keeps `spec-2` (final log `hello-1 spec-2 final-3`).
//! - 2, the receiver: prints `net_spec: ready`, then logs every payload it
//!   receives in guest memory, printing the log each time; on `final-3` it
//!   prints `net_spec: final log ...` and exits 0. When the sender aborts,
//!   the receiver (which joined the speculation on receiving `spec-2`) rolls
//!   back to just before that frame, so the final log is `hello-1 final-3`.
//!
//! Frames are UDP/IPv4 broadcasts on port 7777. Exit 2: no device.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::hypercall::{abort, commit, speculate};
use guest_agent::virtio_net::{Dma, PhysMmio, VirtioNet, DMA_SIZE, FIRST_SLOT_BASE, MAX_FRAME};

const PORT: u16 = 7777;
const LOG_MAX: usize = 8;

static mut FRAME: [u8; MAX_FRAME] = [0; MAX_FRAME];
/// The receiver's log: payload numbers, in guest memory (rolled back).
static mut LOG: [u8; LOG_MAX] = [0; LOG_MAX];
static mut LOG_LEN: usize = 0;

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let dma_base = free_base.next_multiple_of(4096);
    if dma_base + DMA_SIZE as u64 > mem_size {
        return 4;
    }
    // SAFETY: the first virtio slot is identity-mapped MMIO; dma_base is
    // free identity-mapped RAM (checked above), used for nothing else.
    let mut net =
        match unsafe { VirtioNet::new(PhysMmio::new(FIRST_SLOT_BASE), Dma::identity(dma_base)) } {
            Ok(n) => n,
            Err(e) => {
                rt::println!("net_spec: {e}");
                return 2;
            }
        };
    match arg {
        1 => sender(&mut net, false),
        3 => sender(&mut net, true),
        2 => receiver(&mut net),
        _ => {
            rt::println!("net_spec: --guest-arg must be 1 (sender) or 2 (receiver)");
            1
        }
    }
}

fn wait_ms(ms: u64) {
    let t = rt::rdtsc();
    let ticks = rt::tsc_khz().max(1_000_000) * ms;
    while rt::rdtsc() - t < ticks {
        core::hint::spin_loop();
    }
}

fn sender(net: &mut VirtioNet<PhysMmio>, keep: bool) -> u32 {
    send(net, b"hello-1");
    match speculate() {
        Ok(0) => {
            send(net, b"spec-2");
            rt::println!("net_spec: sent spec-2 inside a speculation");
            wait_ms(500);
            if keep {
                let r = commit();
                rt::println!("net_spec: committed: {r:?}");
            } else {
                abort();
                return 5;
            }
        }
        Ok(r) => rt::println!("net_spec: rolled back (reason {r})"),
        Err(e) => {
            rt::println!("net_spec: speculate: {e:?}");
            return 6;
        }
    }
    wait_ms(200);
    send(net, b"final-3");
    rt::println!("net_spec: sender done");
    0
}

fn receiver(net: &mut VirtioNet<PhysMmio>) -> u32 {
    rt::println!("net_spec: ready");
    // SAFETY: single-threaded; the only references to these statics.
    let (buf, log, len) = unsafe {
        (
            &mut *core::ptr::addr_of_mut!(FRAME),
            &mut *core::ptr::addr_of_mut!(LOG),
            &mut *core::ptr::addr_of_mut!(LOG_LEN),
        )
    };
    loop {
        let Some(n) = net.recv(buf) else {
            core::hint::spin_loop();
            continue;
        };
        let Some(payload) = rt::udp::udp_payload(&buf[..n], PORT) else {
            continue;
        };
        let num = payload.last().map_or(0, |d| d.wrapping_sub(b'0'));
        if *len < LOG_MAX {
            log[*len] = num;
            *len += 1;
        }
        rt::print!(
            "net_spec: received {}, log",
            core::str::from_utf8(payload).unwrap_or("?")
        );
        for &x in &log[..*len] {
            rt::print!(" {x}");
        }
        rt::println!();
        if payload == b"final-3" {
            rt::print!("net_spec: final log");
            for &x in &log[..*len] {
                rt::print!(" {x}");
            }
            rt::println!();
            return 0;
        }
    }
}

/// A UDP/IPv4 broadcast to PORT carrying `payload`.
fn send(net: &mut VirtioNet<PhysMmio>, payload: &[u8]) {
    let mut f = [0u8; 128];
    let Some(len) = rt::udp::build_frame(&mut f, net.mac(), PORT, &[], payload) else {
        rt::println!("net_spec: payload too long");
        return;
    };
    if let Err(e) = net.send(&f[..len]) {
        rt::println!("net_spec: send: {e}");
    }
}
