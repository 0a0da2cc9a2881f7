//! Linux command-line options this host needs, added only when the layer
//! is active.
//!
//! How each was found (HOST-KVM.md, measured with Debian's 6.1 kernel):
//! - `KVM_SET_CPUID2` is only partly honoured on `kvm_pvm`: leaf 7 and
//!   RDRAND came through unchanged. The kernel then patches in instructions
//!   the emulator cannot run. `clearcpuid=` (6.1 takes feature names) and
//!   `noxsave` hide them from the kernel itself: without `noxsave` and
//!   hidden XSAVE the boot died in FPU init on `xrstor`; without CX16 hidden
//!   it died in SLUB on `cmpxchg16b`.
//! - `clearcpuid=smap`: SMAP's `clac`/`stac` cannot be emulated, and with
//!   SMAP the kernel patches a `clac` into every interrupt and exception
//!   entry. A boot in this VMM with `nosmap` completed 14,965 `clac`s at
//!   one address (an interrupt entry) in its first three minutes, one exit
//!   each: Linux 6.1 no longer knows `nosmap` (it listed it among "Unknown
//!   kernel command line parameters"), so SMAP is cleared here instead.
//! - `nokaslr`: the system-call trampoline ([`super::trampoline`]) takes a
//!   fixed hole of the kernel's address space (PGD slot 401); with KASLR
//!   the vmalloc, vmemmap and direct-map bases move.
//! - `nopti`: with page-table isolation, user mode runs on a second top
//!   table that lacks the trampoline's slot.
//! - `nopcid`: with PCIDs, Linux switches address spaces without flushing
//!   when its own records say an ASID's TLB entries are current. After a
//!   speculation rollback those records are the checkpoint's, while the
//!   TLB (this host's shadow roots for the guest) may hold translations of
//!   the discarded timeline: a rolled-back guest ran `ls` on corrupted
//!   memory. Without PCIDs every address-space switch flushes.
//! - [`GLIBC_TUNABLES`], which the kernel hands to init as an environment
//!   variable, so every process inherits it: glibc in the guest must not
//!   use AVX. Guest user code runs natively here, so its `cpuid` and
//!   `xgetbv` see the host CPU as it is: AVX, AVX2, AVX-512 and XCR0 =
//!   0xe7 (a 1 KB static probe in a restored guest). glibc then picks its
//!   AVX2/EVEX string functions. But the kernel runs with `noxsave`, so a
//!   context switch saves only what FXSAVE holds, the low 128 bits of
//!   XMM0-15: the upper halves of the YMM registers pass from one process
//!   to the next (a probe holding a pattern in YMM registers across
//!   `sched_yield`, three copies at once, saw them change in its first
//!   round). A `memcpy` whose store faults on a fresh page and is
//!   preempted there stores another process's register contents, or zeros
//!   after its `vzeroupper`. That was the "busybox dies at start-up"
//!   fault: glibc's copy of the TLS image into the new heap lost a
//!   pointer, and `__ctype_init` read 0 through it (`segfault at 0 ip
//!   4a4d02`), more often the busier the host and mostly in pipelines,
//!   where new processes start side by side. On VMX or SVM the guest's
//!   CR4.OSXSAVE would be clear and AVX would raise #UD; `kvm_pvm` keeps
//!   the host's CR4 and XCR0 for guest user code (setting the guest's
//!   CR4.OSXSAVE and an XCR0 of 1 through KVM changed nothing the guest
//!   could see), so the hint has to reach glibc itself. Programs that use
//!   AVX without asking glibc are not covered.

/// Feature names hidden through `clearcpuid=`: every extension the
/// emulator cannot run, or that leads the kernel to one it cannot.
///
/// Linux 6.1 copies the value of `clearcpuid=` into a 128-byte buffer and
/// ignores the rest: a first boot in this VMM with the full list of 29
/// names printed "Clearing CPUID bits: ... invpcid (unknown: xs)". So the
/// list stays under [`CLEARCPUID_MAX`] bytes, most important first, and
/// leaves out what the kernel clears by itself through its feature
/// dependencies: `xsave` takes `xsaveopt`, `xsavec`, `xsaves` and `avx`
/// with it, and `avx` takes `avx2`, `avx512f`, `fma`; `vaes`,
/// `vpclmulqdq` and `gfni` are used only by AVX code; `rdpid` only with
/// `fsgsbase` in the kernel (user mode runs it natively).
pub const CLEARED_FEATURES: &[&str] = &[
    "xsave",
    "cx16",
    "smap",
    "popcnt",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "avx",
    "f16c",
    "movbe",
    "aes",
    "pclmulqdq",
    "rdrand",
    "rdseed",
    "bmi1",
    "bmi2",
    "adx",
    "sha_ni",
    "fsgsbase",
    "invpcid",
];

/// The longest `clearcpuid=` value Linux 6.1 reads (its buffer, less the
/// NUL).
pub const CLEARCPUID_MAX: usize = 127;

/// Options added as they are.
pub const FLAGS: &[&str] = &["noxsave", "nokaslr", "nopti", "nopcid"];

/// The glibc tunable that keeps guest processes off AVX (see the module
/// comment). Disabling AVX alone is not enough in glibc 2.36: its EVEX and
/// AVX2 string functions are chosen from the AVX2, AVX-512 and
/// `AVX_Fast_Unaligned_Load` bits, so each is turned off.
pub const GLIBC_TUNABLES: &str = "GLIBC_TUNABLES=glibc.cpu.hwcaps=-AVX,-AVX2,-AVX512F,-AVX512VL,\
-AVX512BW,-AVX512DQ,-AVX512CD,-AVX_Fast_Unaligned_Load";

/// The options to add to `cmdline`: those of [`FLAGS`] it lacks, a
/// `clearcpuid=` and a `GLIBC_TUNABLES=` unless it has its own (the user's
/// then wins).
pub fn additions(cmdline: &str) -> Vec<String> {
    let words: Vec<&str> = cmdline.split_whitespace().collect();
    let mut add: Vec<String> = FLAGS
        .iter()
        .filter(|f| !words.contains(f))
        .map(|f| f.to_string())
        .collect();
    if !words.iter().any(|w| w.starts_with("clearcpuid=")) {
        add.push(format!("clearcpuid={}", CLEARED_FEATURES.join(",")));
    }
    if !words.iter().any(|w| w.starts_with("GLIBC_TUNABLES=")) {
        add.push(GLIBC_TUNABLES.to_string());
    }
    add
}

/// `cmdline` with [`additions`] placed before any `--` (what follows it
/// goes to init, not to the kernel).
pub fn apply(cmdline: &str) -> String {
    let add = additions(cmdline).join(" ");
    if add.is_empty() {
        return cmdline.to_string();
    }
    match cmdline.find(" -- ") {
        Some(i) => format!("{} {add}{}", &cmdline[..i], &cmdline[i..]),
        None if cmdline.trim().is_empty() => add,
        None => format!("{} {add}", cmdline.trim_end()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adds_what_is_missing() {
        let c = apply("console=ttyS0 nokaslr");
        assert!(c.starts_with("console=ttyS0 nokaslr noxsave nopti nopcid clearcpuid="));
        assert_eq!(c.matches("nokaslr").count(), 1);
        assert!(c.contains("clearcpuid=xsave,cx16,smap,"));
    }

    #[test]
    fn clearcpuid_fits_the_kernels_buffer() {
        assert!(CLEARED_FEATURES.join(",").len() <= CLEARCPUID_MAX);
    }

    #[test]
    fn keeps_a_users_clearcpuid_and_init_args() {
        let c = apply("clearcpuid=avx GLIBC_TUNABLES=x -- single");
        assert_eq!(
            c,
            "clearcpuid=avx GLIBC_TUNABLES=x noxsave nokaslr nopti nopcid -- single"
        );
        assert!(apply("").starts_with("noxsave"));
    }

    #[test]
    fn the_glibc_tunable_reaches_init_as_one_word() {
        let c = apply("console=ttyS0");
        let w: Vec<&str> = c
            .split_whitespace()
            .filter(|w| w.starts_with("GLIBC_TUNABLES="))
            .collect();
        assert_eq!(w, [GLIBC_TUNABLES]);
        // Linux passes an unknown `name=value` to init's environment only
        // when the name has no dot (dotted names are module parameters).
        let name = GLIBC_TUNABLES.split('=').next().unwrap();
        assert!(!name.contains('.'));
        for f in [
            "-AVX,",
            "-AVX2,",
            "-AVX512F,",
            "-AVX512VL,",
            "-AVX_Fast_Unaligned_Load",
        ] {
            assert!(GLIBC_TUNABLES.contains(f), "{f}");
        }
    }
}
