//! specvm's virtual machine monitor, as a library.
//!
//! The layout follows the concerns of a KVM VMM:
//! - [`arch`]: x86-64 boot state (memory layout, GDT, page tables, registers);
//! - [`vstate`]: the KVM objects (guest memory, VM, vCPUs);
//! - [`devices`]: the device bus and the device models;
//! - [`host_compat`]: the one module that carries guests over the gaps of
//!   hosts whose KVM is not hardware virtualization (see `HOST-KVM.md`);
//! - [`linux`]: the Linux boot path and its platform devices;
//! - [`progress`]: signs of life during long runs;
//! - [`snapshot`]: a VM saved to disk and restored;
//! - [`boot_cache`]: the ready guest saved once per image, restored after;
//! - [`builder`] puts a VM together from a [`config::VmConfig`] and
//!   [`builder::Vmm::run`] drives it to its end.
//!
//! The `specvm` binary (`src/main.rs`) is a thin command-line front end.

pub mod api;
pub mod arch;
pub mod bare;
pub mod boot_cache;
pub mod builder;
pub mod cli;
pub mod config;
pub mod controller;
pub mod device_manager;
pub mod devices;
pub mod durable;
pub mod event;
pub mod host_compat;
pub mod linux;
pub mod machine;
pub mod persist;
pub mod progress;
pub mod signals;
pub mod snapshot;
pub mod spec;
pub mod sync;
#[cfg(test)]
mod test_util;
pub mod vstate;
