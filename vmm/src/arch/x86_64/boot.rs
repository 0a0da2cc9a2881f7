//! Booting a Linux kernel the x86 64-bit way: load the kernel and initrd,
//! write the boot parameters ("zero page") with the e820 memory map and the
//! command line, and start the boot CPU at the 64-bit entry.
//!
//! The steps follow the kernel's boot protocol (`Documentation/arch/x86/
//! boot.rst`, "64-bit boot protocol"): the boot CPU starts in long mode with
//! an identity map covering the kernel, the zero page and the command line,
//! a GDT with flat 4 GiB code and data segments, interrupts off, and RSI
//! pointing at the zero page.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress};

use super::layout::{
    ram_ranges, CMDLINE_ADDR, CMDLINE_MAX, COMPAT_PAGES_ADDR, HIMEM_START, LOW_RESERVED_START,
    MMIO_GAP_START, ZERO_PAGE_ADDR,
};
use crate::vstate::memory::GuestMemoryMmap;

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// The boot-protocol magic "HdrS" in the setup header.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// The boot-sector signature in the setup header.
const BOOT_FLAG: u16 = 0xaa55;
/// "Undefined" boot loader type: the kernel accepts it from any loader.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment for a relocatable kernel (CONFIG_PHYSICAL_ALIGN).
const KERNEL_ALIGNMENT: u32 = 0x100_0000;
/// The boot-protocol version we speak when the kernel brings no header
/// (an ELF vmlinux): 2.15, the one with `acpi_rsdp_addr`.
const BOOT_PROTOCOL_VERSION: u16 = 0x020f;
/// Offset of the 64-bit entry point in a bzImage's protected-mode code.
const BZIMAGE_ENTRY_64: u64 = 0x200;
/// The highest address an initrd may end at when the kernel says nothing
/// (boot protocol: `initrd_addr_max` defaults to this for old kernels).
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;

/// Errors loading a kernel and preparing its boot.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// A file could not be opened or read.
    #[error("{what} {path}: {err}")]
    File {
        /// What the file is for.
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// Why it failed.
        err: std::io::Error,
    },
    /// The kernel is neither a loadable ELF nor a bzImage.
    #[error("kernel {0}: cannot load it as {1}: {2}")]
    Load(PathBuf, &'static str, linux_loader::loader::Error),
    /// The initrd does not fit in low RAM above the kernel.
    #[error("initrd of {size:#x} bytes does not fit between the kernel end {kernel_end:#x} and {limit:#x}")]
    InitrdTooLarge {
        /// Its size.
        size: u64,
        /// Where the kernel ends.
        kernel_end: u64,
        /// The highest address it may end at.
        limit: u64,
    },
    /// The command line is too long.
    #[error("kernel command line of {0} bytes is too long: at most {max} bytes", max = CMDLINE_MAX - 1)]
    CmdlineTooLong(usize),
    /// The command line contains a NUL byte.
    #[error("kernel command line contains a NUL byte")]
    CmdlineNul,
    /// Guest memory could not be written.
    #[error("writing {0} at {1:#x}: {2}")]
    Write(&'static str, u64, vm_memory::GuestMemoryError),
}

/// Where a loaded kernel starts and ends.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// The 64-bit entry point (guest-physical).
    pub entry: u64,
    /// The first address past the kernel image (with its BSS, for an ELF).
    pub end: u64,
    /// The bzImage's setup header, to be copied into the zero page.
    pub header: Option<setup_header>,
}

/// Where a loaded initrd lies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Initrd {
    /// Its guest-physical address.
    pub addr: u64,
    /// Its size in bytes.
    pub size: u64,
}

fn open(what: &'static str, path: &Path) -> Result<File, BootError> {
    File::open(path).map_err(|err| BootError::File {
        what,
        path: path.to_path_buf(),
        err,
    })
}

/// Loads the kernel at `path`: an ELF vmlinux by its segments' physical
/// addresses (its entry is `startup_64`), or a bzImage at its preferred
/// address (its 64-bit entry is 0x200 past the load address).
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut f = open("kernel", path)?;
    let mut magic = [0u8; 4];
    let is_elf = f.read_exact(&mut magic).is_ok() && magic == *b"\x7fELF";
    let himem = Some(GuestAddress(HIMEM_START));
    if is_elf {
        let r = Elf::load(mem, None, &mut f, himem)
            .map_err(|e| BootError::Load(path.into(), "an ELF vmlinux", e))?;
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value(),
            end: r.kernel_end,
            header: None,
        })
    } else {
        let r = BzImage::load(mem, None, &mut f, himem)
            .map_err(|e| BootError::Load(path.into(), "a bzImage", e))?;
        Ok(LoadedKernel {
            entry: r.kernel_load.raw_value() + BZIMAGE_ENTRY_64,
            end: r.kernel_end,
            header: r.setup_header,
        })
    }
}

/// The end of RAM below the MMIO gap.
fn low_ram_end(mem_size: u64) -> u64 {
    mem_size.min(MMIO_GAP_START)
}

/// Loads the initrd at `path` at the top of low RAM (page-aligned, below
/// the kernel's `initrd_addr_max`), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel: &LoadedKernel,
    mem_size: u64,
) -> Result<Initrd, BootError> {
    let mut f = open("initrd", path)?;
    let size = f
        .metadata()
        .map_err(|err| BootError::File {
            what: "initrd",
            path: path.into(),
            err,
        })?
        .len();
    let max = kernel
        .header
        .map_or(DEFAULT_INITRD_ADDR_MAX, |h| u64::from(h.initrd_addr_max));
    let limit = low_ram_end(mem_size).min(max.saturating_add(1));
    let too_large = || BootError::InitrdTooLarge {
        size,
        kernel_end: kernel.end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if addr < kernel.end {
        return Err(too_large());
    }
    let len = usize::try_from(size).map_err(|_| too_large())?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut f, len)
        .map_err(|e| BootError::Write("initrd", addr, e))?;
    Ok(Initrd { addr, size })
}

/// The e820 map for a guest of `mem_size` bytes: low RAM up to the
/// host-compat pages, the reserved BIOS area below 1 MiB, then the RAM
/// ranges of the layout from 1 MiB on.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let entry = |addr: u64, end: u64, kind: u32| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: kind,
    };
    let mut map = vec![
        entry(0, COMPAT_PAGES_ADDR, E820_RAM),
        entry(COMPAT_PAGES_ADDR, LOW_RESERVED_START, E820_RESERVED),
        entry(LOW_RESERVED_START, HIMEM_START, E820_RESERVED),
    ];
    for (base, size) in ram_ranges(mem_size) {
        let start = base.max(HIMEM_START);
        if base + size > start {
            map.push(entry(start, base + size, E820_RAM));
        }
    }
    map
}

/// Writes the command line at [`CMDLINE_ADDR`], NUL-terminated; returns its
/// length without the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<u32, BootError> {
    if cmdline.len() >= CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cmdline.contains('\0') {
        return Err(BootError::CmdlineNul);
    }
    let mut bytes = cmdline.as_bytes().to_vec();
    bytes.push(0);
    mem.write_slice(&bytes, GuestAddress(CMDLINE_ADDR))
        .map_err(|e| BootError::Write("the command line", CMDLINE_ADDR, e))?;
    Ok(cmdline.len() as u32)
}

/// Everything the zero page says.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo<'a> {
    /// The loaded kernel.
    pub kernel: &'a LoadedKernel,
    /// The initrd, if any.
    pub initrd: Option<Initrd>,
    /// Length of the command line at [`CMDLINE_ADDR`].
    pub cmdline_len: u32,
    /// Where the ACPI RSDP is.
    pub rsdp: u64,
    /// Guest memory size, for the e820 map.
    pub mem_size: u64,
}

/// The boot parameters: the kernel's own setup header (bzImage) or a
/// minimal one (ELF), with the loader's fields filled in, and the e820 map.
pub fn zero_page(info: &BootInfo) -> boot_params {
    let mut p = boot_params::default();
    match info.kernel.header {
        Some(h) => p.hdr = h,
        None => {
            p.hdr.header = HDRS_MAGIC;
            p.hdr.version = BOOT_PROTOCOL_VERSION;
            p.hdr.kernel_alignment = KERNEL_ALIGNMENT;
        }
    }
    p.hdr.boot_flag = BOOT_FLAG;
    p.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = info.cmdline_len;
    if let Some(rd) = info.initrd {
        p.hdr.ramdisk_image = rd.addr as u32;
        p.hdr.ramdisk_size = rd.size as u32;
    }
    p.acpi_rsdp_addr = info.rsdp;
    let map = e820_map(info.mem_size);
    for (slot, e) in p.e820_table.iter_mut().zip(&map) {
        *slot = *e;
    }
    p.e820_entries = map.len().min(p.e820_table.len()) as u8;
    p
}

/// Writes the zero page at [`ZERO_PAGE_ADDR`]; returns its address.
pub fn write_zero_page(mem: &GuestMemoryMmap, info: &BootInfo) -> Result<u64, BootError> {
    mem.write_obj(zero_page(info), GuestAddress(ZERO_PAGE_ADDR))
        .map_err(|e| BootError::Write("the boot parameters", ZERO_PAGE_ADDR, e))?;
    Ok(ZERO_PAGE_ADDR)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::MMIO_GAP_END;

    fn mem(size: u64) -> GuestMemoryMmap {
        crate::vstate::memory::create_guest_memory(size)
            .unwrap()
            .mem
    }

    #[test]
    fn e820_reserves_low_areas_and_skips_the_gap() {
        let m = e820_map(4 << 30);
        let ram: Vec<(u64, u64)> = m
            .iter()
            .filter(|e| e.r#type == E820_RAM)
            .map(|e| (e.addr, e.addr + e.size))
            .collect();
        assert_eq!(
            ram,
            vec![
                (0, COMPAT_PAGES_ADDR),
                (HIMEM_START, MMIO_GAP_START),
                (MMIO_GAP_END, MMIO_GAP_END + (1 << 30))
            ]
        );
        assert!(m
            .iter()
            .any(|e| e.r#type == E820_RESERVED && e.addr == LOW_RESERVED_START));
    }

    #[test]
    fn zero_page_for_an_elf_kernel() {
        let k = LoadedKernel {
            entry: 0x100_0000,
            end: 0x400_0000,
            header: None,
        };
        let p = zero_page(&BootInfo {
            kernel: &k,
            initrd: Some(Initrd {
                addr: 0x7000_0000,
                size: 0x1234,
            }),
            cmdline_len: 12,
            rsdp: 0xe_0000,
            mem_size: 256 << 20,
        });
        assert_eq!(
            ({ p.hdr.header }, { p.hdr.boot_flag }),
            (HDRS_MAGIC, BOOT_FLAG)
        );
        assert_eq!({ p.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ p.hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(p.e820_entries, 4);
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram() {
        let m = mem(64 << 20);
        let dir = std::env::temp_dir().join(format!("specvm-initrd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("rd");
        std::fs::write(&p, vec![7u8; 5000]).unwrap();
        let k = LoadedKernel {
            entry: 0x100_0000,
            end: 0x200_0000,
            header: None,
        };
        let rd = load_initrd(&m, &p, &k, 64 << 20).unwrap();
        assert_eq!(rd.addr, ((64 << 20) - 5000) & !0xfff);
        let big = LoadedKernel {
            end: 0x3ff_f000,
            ..k
        };
        assert!(matches!(
            load_initrd(&m, &p, &big, 64 << 20),
            Err(BootError::InitrdTooLarge { .. })
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn cmdline_limits() {
        let m = mem(32 << 20);
        assert_eq!(write_cmdline(&m, "console=ttyS0").unwrap(), 13);
        let s: String = m
            .read_obj::<[u8; 14]>(GuestAddress(CMDLINE_ADDR))
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap();
        assert_eq!(s, "console=ttyS0\0");
        assert!(write_cmdline(&m, &"x".repeat(CMDLINE_MAX)).is_err());
        assert!(write_cmdline(&m, "a\0b").is_err());
    }

    /// The built guest image file `name`, or `None` (with the reason
    /// printed) when `images/build.sh` has not run.
    fn image(name: &str) -> Option<PathBuf> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../images/out")
            .join(name);
        if !p.is_file() {
            eprintln!("SKIPPED: {} is missing (run images/build.sh)", p.display());
            return None;
        }
        Some(p)
    }

    #[test]
    fn debian_vmlinux_and_bzimage_load() {
        let m = mem(256 << 20);
        if let Some(p) = image("vmlinux") {
            let k = load_kernel(&m, &p).unwrap();
            assert_eq!(k.entry, 0x100_0000);
            assert!(k.header.is_none());
            assert!(k.end > k.entry);
        }
        if let Some(p) = image("bzImage") {
            let k = load_kernel(&m, &p).unwrap();
            let h = k.header.unwrap();
            assert_eq!({ h.header }, HDRS_MAGIC);
            assert_eq!(k.entry, u64::from(h.code32_start) + BZIMAGE_ENTRY_64);
            // 64-bit entry supported (XLF_KERNEL_64).
            assert_ne!({ h.xloadflags } & 1, 0);
        }
    }

    #[test]
    fn a_non_kernel_is_refused_with_its_name() {
        let m = mem(32 << 20);
        let junk = std::env::temp_dir().join(format!("specvm-junk-{}", std::process::id()));
        std::fs::write(&junk, b"not a kernel").unwrap();
        let e = load_kernel(&m, &junk).unwrap_err();
        assert!(e.to_string().contains("bzImage"), "{e}");
        let _ = std::fs::remove_file(&junk);
    }
}
