//! Sets up the virtio-net device in the first virtio-mmio slot, prints its
//! MAC address and MTU, then echoes N = `--guest-arg` received frames back
//! with the Ethernet source and destination addresses swapped, and exits.
//!
//! Output: `net_echo: mac 02:00:00:00:00:01 mtu 1460`, then
//! `net_echo: echoed N frames`. The driver polls: with no frame coming the
//! program waits forever.
//!
//! Exit status: 0 after N echoes (at once for N = 0); 2 when there is no
//! usable virtio-net device (the reason is printed); 3 when a send fails;
//! 4 when the driver's memory does not fit in guest RAM.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::virtio_net::{Dma, PhysMmio, VirtioNet, DMA_SIZE, FIRST_SLOT_BASE, MAX_FRAME};

const PAGE: u64 = 4096;

/// The largest frame echoed; the buffer lives in .bss, not on the stack.
static mut FRAME: [u8; MAX_FRAME] = [0; MAX_FRAME];

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    let dma_base = free_base.next_multiple_of(PAGE);
    if dma_base + DMA_SIZE as u64 > mem_size {
        rt::println!("net_echo: {DMA_SIZE} bytes from {dma_base:#x} do not fit in RAM");
        return 4;
    }
    // SAFETY: bare guests identity-map the MMIO hole, where the first
    // virtio slot lives; an access with no device behind it reads all ones.
    let mmio = unsafe { PhysMmio::new(FIRST_SLOT_BASE) };
    // SAFETY: dma_base..dma_base + DMA_SIZE is free, identity-mapped guest
    // RAM (checked above) that nothing else in this program uses.
    let dma = unsafe { Dma::identity(dma_base) };
    let mut net = match VirtioNet::new(mmio, dma) {
        Ok(net) => net,
        Err(e) => {
            rt::println!("net_echo: {e}");
            return 2;
        }
    };
    let m = net.mac();
    rt::println!(
        "net_echo: mac {:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} mtu {}",
        m[0],
        m[1],
        m[2],
        m[3],
        m[4],
        m[5],
        net.mtu().unwrap_or(1500)
    );
    // SAFETY: the program is single-threaded and this is the only
    // reference to FRAME.
    let buf = unsafe { &mut *core::ptr::addr_of_mut!(FRAME) };
    for _ in 0..arg {
        let len = loop {
            if let Some(len) = net.recv(buf) {
                break len;
            }
            core::hint::spin_loop();
        };
        let frame = &mut buf[..len];
        if len >= 12 {
            let (dst, src) = frame.split_at_mut(6);
            dst.swap_with_slice(&mut src[..6]);
        }
        if let Err(e) = net.send(frame) {
            rt::println!("net_echo: send: {e}");
            return 3;
        }
    }
    rt::println!("net_echo: echoed {arg} frames");
    0
}
