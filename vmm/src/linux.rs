//! Linux guests: the platform devices they need beyond the console, and
//! the boot path, one step per function in `arch::x86_64`:
//! load kernel → initrd → command line → ACPI tables → boot parameters
//! with e820 → page tables and GDT → boot CPU registers.

use std::path::Path;
use std::sync::{Arc, Mutex};

use guest_agent::abi::SERIAL_PORT;
use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::acpi::{self, AcpiError, Machine, VirtioMmioDesc, S5_SLEEP_TYPE};
use crate::arch::x86_64::boot::{self, BootError, BootInfo, LoadedKernel};
use crate::arch::x86_64::gdt::gdt_words;
use crate::arch::x86_64::lapic::setup_lints;
use crate::arch::x86_64::layout::{BOOT_STACK_TOP, GDT_ADDR, MMIO_GAP_END, TSS_ADDR};
use crate::arch::x86_64::paging::{setup_identity_map, PagingError};
use crate::arch::x86_64::regs::{default_fpu, kernel_mode_sregs, linux_boot_regs};
use crate::devices::legacy::{power, PowerDevice, I8042};
use crate::devices::{Bus, BusError};
use crate::event::EventSender;
use crate::host_compat::HostCompat;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::Vcpu;

/// The i8042 controller's ports: data at 0x60, command/status at 0x64.
pub const I8042_PORT: u64 = 0x60;
/// Ports the i8042 covers (0x60..=0x64).
pub const I8042_PORTS: u64 = 5;
/// First port of the ACPI power device (sleep control, status, reset).
pub const POWER_PORT: u16 = 0x600;
/// COM1's interrupt line.
pub const COM1_IRQ: u32 = 4;

/// The default kernel command line. Beyond the console and the clean
/// endings, every option shortens a boot whose kernel code is emulated
/// (`HOST-KVM.md`: together, the tuning options brought the probe's end of
/// initcalls from 1,094 s to 950 s; single options are not measured yet):
/// - `console=ttyS0`: the console on COM1;
/// - `reboot=k`: reboot through the i8042, which ends the VMM;
/// - `panic=-1`: reboot at once on a panic, so the VMM ends;
/// - `pci=off`: there is no PCI bus; skips probing configuration space;
/// - `8250.nr_uarts=1`: probe one UART, not four;
/// - `tsc=reliable no_timer_check`: skip clocksource watchdog and the
///   IO-APIC timer check, both slow under emulation;
/// - `nowatchdog nosoftlockup`: no lockup detectors (the emulated ftrace
///   record check runs for minutes and trips them);
/// - `mitigations=off`: no speculative-execution mitigations to patch in;
/// - `ipv6.disable=1 audit=0 security=none`: less initialization;
/// - `init_on_alloc=0 page_alloc.shuffle=0`: no zeroing or shuffling of
///   pages at allocation;
/// - `cryptomgr.notests`: no crypto self-tests;
/// - `rodata=off`: no remapping of kernel text read-only.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 pci=off 8250.nr_uarts=1 \
    tsc=reliable no_timer_check nowatchdog nosoftlockup mitigations=off ipv6.disable=1 \
    audit=0 security=none init_on_alloc=0 page_alloc.shuffle=0 cryptomgr.notests rodata=off";

/// Errors preparing a Linux boot.
#[derive(Debug, thiserror::Error)]
pub enum LinuxError {
    /// Loading the kernel or initrd, or writing boot data, failed.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The ACPI tables could not be built.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
    /// The boot page tables could not be written.
    #[error("boot page tables: {0}")]
    Paging(#[from] PagingError),
    /// A device could not be placed on a bus.
    #[error("placing a Linux platform device: {0}")]
    Bus(#[from] BusError),
    /// The GDT could not be written.
    #[error("writing the boot GDT at {GDT_ADDR:#x}: {0}")]
    Gdt(vm_memory::GuestMemoryError),
    /// A vCPU ioctl failed.
    #[error("setting up vCPU {0} for Linux: {1}: {2}")]
    Vcpu(u8, &'static str, kvm_ioctls::Error),
}

/// What to boot.
#[derive(Debug, Clone, Copy)]
pub struct LinuxSpec<'a> {
    /// The kernel file.
    pub kernel: &'a Path,
    /// The initrd file, if any.
    pub initrd: Option<&'a Path>,
    /// The command line; `None` for [`DEFAULT_CMDLINE`].
    pub cmdline: Option<&'a str>,
    /// Guest memory size.
    pub mem_size: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The virtio-mmio devices, for the DSDT.
    pub virtio: &'a [VirtioMmioDesc],
}

/// Where the boot CPU starts.
#[derive(Debug, Clone, Copy)]
pub struct LinuxEntry {
    /// The kernel's 64-bit entry.
    pub entry: u64,
    /// The boot parameters.
    pub zero_page: u64,
    /// CR3 of the boot identity map.
    pub cr3: u64,
}

/// Places the i8042 (reset) and the ACPI power device on the port bus.
pub fn add_devices(pio: &mut Bus, events: &EventSender) -> Result<(), LinuxError> {
    pio.insert(
        Arc::new(Mutex::new(I8042::new(events.clone()))),
        I8042_PORT,
        I8042_PORTS,
    )?;
    pio.insert(
        Arc::new(Mutex::new(PowerDevice::new(events.clone(), S5_SLEEP_TYPE))),
        POWER_PORT.into(),
        power::PORTS,
    )?;
    Ok(())
}

/// The command line the guest gets: the given or default one, plus what
/// the host-compat layer adds when active.
pub fn cmdline(spec: &LinuxSpec, compat: Option<&HostCompat>) -> String {
    let base = spec.cmdline.unwrap_or(DEFAULT_CMDLINE);
    match compat {
        Some(c) => c.linux_cmdline(base),
        None => base.to_string(),
    }
}

/// Loads everything the kernel needs into guest memory.
pub fn load(
    mem: &GuestMemoryMmap,
    spec: &LinuxSpec,
    compat: Option<&HostCompat>,
) -> Result<LinuxEntry, LinuxError> {
    let kernel = boot::load_kernel(mem, spec.kernel)?;
    tracing::info!(
        entry = format_args!("{:#x}", kernel.entry),
        end = format_args!("{:#x}", kernel.end),
        format = if kernel.header.is_some() {
            "bzImage"
        } else {
            "ELF"
        },
        "loaded kernel {}",
        spec.kernel.display()
    );
    let initrd = match spec.initrd {
        Some(p) => Some(load_initrd(mem, p, &kernel, spec.mem_size)?),
        None => None,
    };
    let line = cmdline(spec, compat);
    tracing::info!("kernel command line: {line}");
    let cmdline_len = boot::write_cmdline(mem, &line)?;
    let rsdp = acpi::write_tables(mem, &machine(spec.vcpus, spec.virtio))?;
    tracing::info!(
        rsdp = format_args!("{rsdp:#x}"),
        cpus = spec.vcpus,
        "ACPI tables written"
    );
    let info = BootInfo {
        kernel: &kernel,
        initrd,
        cmdline_len,
        rsdp,
        mem_size: spec.mem_size,
    };
    let zero_page = boot::write_zero_page(mem, &info)?;
    write_gdt(mem)?;
    // The kernel builds its own page tables at once; it needs ours only
    // for its first instructions, the boot data and the command line.
    let cr3 = setup_identity_map(mem, MMIO_GAP_END, false)?;
    Ok(LinuxEntry {
        entry: kernel.entry,
        zero_page,
        cr3,
    })
}

fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<boot::Initrd, LinuxError> {
    let rd = boot::load_initrd(mem, path, kernel, mem_size)?;
    tracing::info!(
        addr = format_args!("{:#x}", rd.addr),
        size = rd.size,
        "loaded initrd {}",
        path.display()
    );
    Ok(rd)
}

/// The machine the ACPI tables describe.
fn machine(vcpus: u8, virtio: &[VirtioMmioDesc]) -> Machine {
    Machine {
        vcpus,
        com1: (SERIAL_PORT, COM1_IRQ),
        sleep_port: POWER_PORT,
        reset: (POWER_PORT + power::RESET as u16, power::RESET_VALUE),
        virtio: virtio.to_vec(),
    }
}

fn write_gdt(mem: &GuestMemoryMmap) -> Result<(), LinuxError> {
    // The TSS is only there because VM entry wants a usable TR; its limit
    // covers the fixed fields.
    for (i, w) in gdt_words(TSS_ADDR, 0x67).iter().enumerate() {
        mem.write_obj(*w, GuestAddress(GDT_ADDR + 8 * i as u64))
            .map_err(LinuxError::Gdt)?;
    }
    Ok(())
}

/// Puts the boot CPU at the kernel's 64-bit entry. The other vCPUs wait
/// for INIT and SIPI from the guest in KVM's local APIC.
pub fn setup_boot_cpu(vcpu: &Vcpu, e: &LinuxEntry) -> Result<(), LinuxError> {
    let err = |what| move |x| LinuxError::Vcpu(vcpu.index, what, x);
    let sregs = vcpu.fd.get_sregs().map_err(err("KVM_GET_SREGS"))?;
    let mut s = kernel_mode_sregs(&sregs, e.cr3);
    s.tr.limit = 0x67;
    vcpu.fd.set_sregs(&s).map_err(err("KVM_SET_SREGS"))?;
    vcpu.fd
        .set_fpu(&default_fpu())
        .map_err(err("KVM_SET_FPU"))?;
    let regs = linux_boot_regs(e.entry, e.zero_page, BOOT_STACK_TOP);
    vcpu.fd.set_regs(&regs).map_err(err("KVM_SET_REGS"))?;
    setup_lints(&vcpu.fd).map_err(err("KVM_SET_LAPIC"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_adds_compat_options_only_when_active() {
        let spec = LinuxSpec {
            kernel: Path::new("k"),
            initrd: None,
            cmdline: None,
            mem_size: 256 << 20,
            vcpus: 1,
            virtio: &[],
        };
        assert_eq!(cmdline(&spec, None), DEFAULT_CMDLINE);
        let c = cmdline(&spec, Some(&HostCompat::new()));
        assert!(c.starts_with(DEFAULT_CMDLINE));
        assert!(c.contains(" nokaslr") && c.contains(" clearcpuid="));
        let own = LinuxSpec {
            cmdline: Some("console=ttyS0"),
            ..spec
        };
        assert_eq!(cmdline(&own, None), "console=ttyS0");
    }
}
