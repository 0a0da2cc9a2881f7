//! ACPI tables: how a Linux guest finds its CPUs, its interrupt
//! controllers, its devices and its power-off switch.
//!
//! The guest's kernel parses no MP table and takes no virtio-mmio devices
//! from its command line, so these tables are the only description of the
//! machine it gets:
//! - RSDP → XSDT → FADT and MADT; the FADT points at the DSDT;
//! - FADT: a hardware-reduced ACPI platform (no PM timer, no GPE blocks,
//!   no SCI), whose sleep control register and reset register are ports of
//!   the VMM's power device ([`crate::devices::legacy::PowerDevice`]);
//! - MADT: one local APIC per vCPU, and the I/O APIC. KVM's default
//!   interrupt routing maps GSI n to I/O APIC pin n, and the PIT raises
//!   GSI 0, so the ISA IRQs need no source overrides;
//! - DSDT: COM1, the virtio-mmio devices, and the `_S5` sleep type that
//!   `poweroff` writes to the sleep control register.

use acpi_tables::aml::{
    Device, EISAName, Interrupt, Memory32Fixed, Name, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{ACPI_TABLES_ADDR, HIMEM_START, IOAPIC_ADDR, LAPIC_ADDR};
use crate::vstate::memory::GuestMemoryMmap;

/// The OEM id in every table.
const OEM_ID: [u8; 6] = *b"SPECVM";
/// The OEM revision in every table.
const OEM_REVISION: u32 = 1;
/// The sleep type `poweroff` writes for S5 (soft off); our own choice,
/// announced in the DSDT's `_S5` package.
pub const S5_SLEEP_TYPE: u8 = 5;
/// FADT boot-architecture flags: no VGA, no MSI, and (by omission) no
/// i8042, so the guest does not probe a keyboard it would wait on.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3);
/// MADT flag: the machine also has dual 8259 PICs (KVM's in-kernel ones).
const MADT_PCAT_COMPAT: u32 = 1;
/// Most vCPUs a MADT of 8-bit APIC IDs can describe here.
const MAX_APIC_ID: u8 = 254;

/// Errors building or writing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// The tables do not fit below 1 MiB.
    #[error("ACPI tables end at {0:#x}, past the BIOS area that ends at {HIMEM_START:#x}")]
    TooLarge(u64),
    /// More vCPUs than a MADT with 8-bit APIC IDs describes.
    #[error("{0} vCPUs: the MADT describes at most {MAX_APIC_ID}")]
    TooManyCpus(u8),
    /// Guest memory could not be written.
    #[error("writing ACPI table {0} at {1:#x}: {2}")]
    Write(&'static str, u64, vm_memory::GuestMemoryError),
}

/// A virtio-mmio device, as the DSDT describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMmioDesc {
    /// Guest-physical base of its register window.
    pub base: u32,
    /// Size of the window.
    pub size: u32,
    /// Its interrupt (GSI).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone)]
pub struct Machine {
    /// Number of vCPUs; APIC IDs are 0..vcpus.
    pub vcpus: u8,
    /// COM1's port and interrupt.
    pub com1: (u16, u32),
    /// Port of the sleep control register (the sleep status register is
    /// the next one).
    pub sleep_port: u16,
    /// Port of the reset register, and the value that resets.
    pub reset: (u16, u8),
    /// The virtio-mmio devices.
    pub virtio: Vec<VirtioMmioDesc>,
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn table_id(tag: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"SPECVM  ";
    id[4..].copy_from_slice(tag);
    id
}

/// The DSDT's AML: COM1 and the virtio-mmio devices under `\_SB`, and `_S5`.
pub fn dsdt(m: &Machine) -> Vec<u8> {
    let (port, irq) = m.com1;
    let (io, int) = (
        IO::new(port, port, 1, 8),
        Interrupt::new(true, true, false, false, irq),
    );
    let com1_crs = ResourceTemplate::new(vec![&io, &int]);
    let hid = Name::new("_HID".into(), &EISAName::new("PNP0501"));
    let uid = Name::new("_UID".into(), &0u8);
    let crs = Name::new("_CRS".into(), &com1_crs);
    let com1 = Device::new("COM1".into(), vec![&hid, &uid, &crs]);
    let virtio: Vec<Vec<u8>> = m.virtio.iter().enumerate().map(virtio_device).collect();
    let virtio: Vec<RawAml> = virtio.into_iter().map(RawAml).collect();
    let mut children: Vec<&dyn Aml> = vec![&com1];
    children.extend(virtio.iter().map(|v| v as &dyn Aml));
    let sb = Scope::new("\\_SB_".into(), children);
    let s5 = Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE]));
    let mut t = Sdt::new(*b"DSDT", 36, 6, OEM_ID, table_id(b"DSDT"), OEM_REVISION);
    t.append_slice(&bytes(&sb));
    t.append_slice(&bytes(&s5));
    t.as_slice().to_vec()
}

/// AML already turned into bytes.
struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// One virtio-mmio device: `_HID "LNRO0005"` is what Linux's virtio_mmio
/// driver binds to; `_CRS` gives its window and its edge interrupt.
fn virtio_device((i, d): (usize, &VirtioMmioDesc)) -> Vec<u8> {
    let (window, int) = (
        Memory32Fixed::new(true, d.base, d.size),
        Interrupt::new(true, true, false, false, d.gsi),
    );
    let resources = ResourceTemplate::new(vec![&window, &int]);
    let name = format!("V{:03X}", i % 0x1000);
    let hid = Name::new("_HID".into(), &"LNRO0005");
    let uid = Name::new("_UID".into(), &(i as u64));
    let crs = Name::new("_CRS".into(), &resources);
    bytes(&Device::new(Path::new(&name), vec![&hid, &uid, &crs]))
}

/// The FADT of a hardware-reduced platform, pointing at the DSDT.
pub fn fadt(m: &Machine, dsdt_addr: u64) -> Vec<u8> {
    let io_byte = |port: u16| {
        GAS::new(
            AddressSpace::SystemIo,
            8,
            0,
            AccessSize::ByteAccess,
            port.into(),
        )
    };
    let mut b = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    b.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    b.sleep_control_reg = io_byte(m.sleep_port);
    b.sleep_status_reg = io_byte(m.sleep_port + 1);
    b.reset_reg = io_byte(m.reset.0);
    b.reset_value = m.reset.1;
    bytes(&b.finalize())
}

/// The MADT: one enabled local APIC per vCPU, then the I/O APIC.
pub fn madt(m: &Machine) -> Result<Vec<u8>, AcpiError> {
    if m.vcpus > MAX_APIC_ID {
        return Err(AcpiError::TooManyCpus(m.vcpus));
    }
    let mut t = Sdt::new(*b"APIC", 44, 5, OEM_ID, table_id(b"APIC"), OEM_REVISION);
    t.write_bytes(36, &LAPIC_ADDR.to_le_bytes());
    t.write_bytes(40, &MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..m.vcpus {
        // Type 0, length 8, processor UID, APIC ID, flags (enabled).
        let mut e = vec![0u8, 8, id, id];
        e.extend_from_slice(&1u32.to_le_bytes());
        t.append_slice(&e);
    }
    // Type 1, length 12, I/O APIC ID (after the CPUs'), reserved,
    // address, GSI base.
    let mut e = vec![1u8, 12, m.vcpus, 0];
    e.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    e.extend_from_slice(&0u32.to_le_bytes());
    t.append_slice(&e);
    Ok(t.as_slice().to_vec())
}

/// Writes every table from [`ACPI_TABLES_ADDR`] on, RSDP first; returns
/// the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, m: &Machine) -> Result<u64, AcpiError> {
    let rsdp_addr = ACPI_TABLES_ADDR;
    let mut next = align(rsdp_addr + Rsdp::len() as u64);
    let mut put = |name: &'static str, data: &[u8]| -> Result<u64, AcpiError> {
        let at = next;
        let end = at + data.len() as u64;
        if end > HIMEM_START {
            return Err(AcpiError::TooLarge(end));
        }
        mem.write_slice(data, GuestAddress(at))
            .map_err(|e| AcpiError::Write(name, at, e))?;
        next = align(end);
        Ok(at)
    };
    let dsdt_addr = put("DSDT", &dsdt(m))?;
    let fadt_addr = put("FADT", &fadt(m, dsdt_addr))?;
    let madt_addr = put("MADT", &madt(m)?)?;
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = put("XSDT", &bytes(&xsdt))?;
    mem.write_slice(
        &bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
        GuestAddress(rsdp_addr),
    )
    .map_err(|e| AcpiError::Write("RSDP", rsdp_addr, e))?;
    Ok(rsdp_addr)
}

fn align(a: u64) -> u64 {
    a.next_multiple_of(16)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(vcpus: u8) -> Machine {
        Machine {
            vcpus,
            com1: (0x3f8, 4),
            sleep_port: 0x600,
            reset: (0x602, 1),
            virtio: vec![VirtioMmioDesc {
                base: 0xd000_0000,
                size: 0x1000,
                gsi: 5,
            }],
        }
    }

    fn checksum_ok(t: &[u8]) -> bool {
        t.iter().fold(0u8, |a, b| a.wrapping_add(*b)) == 0
    }

    fn find(hay: &[u8], needle: &[u8]) -> bool {
        hay.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn madt_lists_each_cpu_and_the_ioapic() {
        let t = madt(&machine(2)).unwrap();
        assert!(checksum_ok(&t));
        assert_eq!(&t[..4], b"APIC");
        assert_eq!(
            u32::from_le_bytes([t[4], t[5], t[6], t[7]]) as usize,
            t.len()
        );
        assert_eq!(t.len(), 44 + 2 * 8 + 12);
        assert_eq!(&t[44..48], &[0, 8, 0, 0]);
        assert_eq!(&t[52..56], &[0, 8, 1, 1]);
        assert_eq!(&t[60..64], &[1, 12, 2, 0]);
        assert!(madt(&machine(255)).is_err());
    }

    #[test]
    fn dsdt_describes_com1_virtio_and_s5() {
        let t = dsdt(&machine(1));
        assert!(checksum_ok(&t));
        assert!(find(&t, b"COM1"));
        assert!(find(&t, b"LNRO0005"));
        assert!(find(&t, b"_S5_"));
        // The COM1 I/O port descriptor: decode16, min, max, align, length.
        assert!(find(&t, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]));
    }

    #[test]
    fn fadt_is_hardware_reduced_with_a_sleep_register() {
        let t = fadt(&machine(1), 0xe_0040);
        assert!(checksum_ok(&t));
        assert_eq!(&t[..4], b"FACP");
        let flags = u32::from_le_bytes([t[112], t[113], t[114], t[115]]);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        // X_DSDT at offset 140; SLEEP_CONTROL_REG (a GAS) at 244.
        assert_eq!(
            u64::from_le_bytes(t[140..148].try_into().unwrap()),
            0xe_0040
        );
        assert_eq!(t[244], 1, "system I/O space");
        assert_eq!(u16::from_le_bytes([t[248], t[249]]), 0x600);
    }

    #[test]
    fn tables_land_below_1mib_with_a_valid_rsdp() {
        let mem = crate::vstate::memory::create_guest_memory(32 << 20)
            .unwrap()
            .mem;
        let at = write_tables(&mem, &machine(4)).unwrap();
        assert_eq!(at, ACPI_TABLES_ADDR);
        let mut r = [0u8; 36];
        mem.read_slice(&mut r, GuestAddress(at)).unwrap();
        assert_eq!(&r[..8], b"RSD PTR ");
        assert!(checksum_ok(&r[..20]) && checksum_ok(&r));
        let xsdt = u64::from_le_bytes(r[24..32].try_into().unwrap());
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(xsdt)).unwrap();
        assert_eq!(&sig, b"XSDT");
    }
}
