//! The first virtio-blk device of a bare guest, found and started: shared by
//! the guests that drive a `--disk` (`#[path = "../blk_open.rs"] mod
//! blk_open;`).

use guest_agent::virtio_blk::{find_slot, slot_base, Dma, PhysMmio, VirtioBlk, DMA_SIZE};

use super::rt;

/// The driver over the first virtio-blk slot, its memory at the first page
/// boundary from `free_base`; `name` prefixes the messages. The error is
/// the guest's exit status: 5 no room for the driver's memory, 2 no
/// virtio-blk device, 3 the driver did not start.
pub fn open(name: &str, mem_size: u64, free_base: u64) -> Result<VirtioBlk<PhysMmio>, u32> {
    let dma_base = free_base.next_multiple_of(4096);
    if dma_base + DMA_SIZE as u64 > mem_size {
        rt::println!("{name}: no room for the driver's memory");
        return Err(5);
    }
    // SAFETY: the slots are identity-mapped MMIO (an empty one reads all
    // ones); probing reads only identification registers.
    let Some(slot) = find_slot(|i| unsafe { PhysMmio::new(slot_base(i)) }, 0) else {
        rt::println!("{name}: no virtio-blk device");
        return Err(2);
    };
    // SAFETY: the slot holds a virtio-blk device; dma_base is free
    // identity-mapped RAM (checked above), used for nothing else.
    let dev = unsafe { VirtioBlk::new(PhysMmio::new(slot_base(slot)), Dma::identity(dma_base)) };
    let d = match dev {
        Ok(d) => d,
        Err(e) => {
            rt::println!("{name}: virtio-blk in slot {slot}: {e}");
            return Err(3);
        }
    };
    rt::println!(
        "{name}: virtio-blk in slot {slot}, {} sectors{}",
        d.capacity(),
        if d.read_only() { ", read-only" } else { "" }
    );
    Ok(d)
}
