//! The guest side of specvm: the hypercall ABI and the library that programs
//! inside a guest use to reach the VMM.
//!
//! The core is `no_std`, so the freestanding bare test guests link the very
//! same code as Linux user programs. The ABI itself (port numbers, entry
//! registers of a bare guest) is defined in [`abi`] and shared with the VMM,
//! so host and guest can never disagree on a number. On x86_64, [`pio`] has
//! the port I/O primitives, [`serial`] a polling writer for the console UART,
//! and [`exit`] ends the VM with a status code. [`virtio_net`] and
//! [`virtio_blk`] are polling virtio-mmio drivers for bare guests, on the
//! transport they share, [`virtio_mmio`] (where a new driver starts).
#![cfg_attr(not(feature = "std"), no_std)]

pub mod abi;
#[cfg(target_arch = "x86_64")]
pub mod dma;
#[cfg(target_arch = "x86_64")]
pub mod exit;
#[cfg(target_arch = "x86_64")]
pub mod hypercall;
#[cfg(all(feature = "std", target_arch = "x86_64"))]
pub mod linux;
#[cfg(target_arch = "x86_64")]
pub mod pio;
#[cfg(target_arch = "x86_64")]
pub mod serial;
#[cfg(target_arch = "x86_64")]
pub mod virtio_blk;
#[cfg(target_arch = "x86_64")]
pub mod virtio_mmio;
#[cfg(target_arch = "x86_64")]
pub mod virtio_net;
