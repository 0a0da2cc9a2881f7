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
//! - `nosmap`: SMAP's `clac`/`stac` cannot be emulated (they are still
//!   patched in, and completed by [`super::emulate`]); this keeps the
//!   kernel from relying on SMAP.
//! - `nokaslr`: the system-call trampoline ([`super::trampoline`]) takes a
//!   fixed hole of the kernel's address space (PGD slot 401); with KASLR
//!   the vmalloc, vmemmap and direct-map bases move.
//! - `nopti`: with page-table isolation, user mode runs on a second top
//!   table that lacks the trampoline's slot.

/// Feature names hidden through `clearcpuid=`: every extension the
/// emulator cannot run, or that leads the kernel to one it cannot.
pub const CLEARED_FEATURES: &[&str] = &[
    "avx",
    "avx2",
    "avx512f",
    "popcnt",
    "ssse3",
    "sse4_1",
    "sse4_2",
    "movbe",
    "aes",
    "pclmulqdq",
    "fma",
    "f16c",
    "rdrand",
    "rdseed",
    "bmi1",
    "bmi2",
    "adx",
    "sha_ni",
    "fsgsbase",
    "invpcid",
    "xsave",
    "xsaveopt",
    "xsavec",
    "xsaves",
    "rdpid",
    "gfni",
    "vaes",
    "vpclmulqdq",
    "cx16",
];

/// Options added as they are.
pub const FLAGS: &[&str] = &["noxsave", "nokaslr", "nosmap", "nopti"];

/// The options to add to `cmdline`: those of [`FLAGS`] it lacks, and a
/// `clearcpuid=` unless it has one (the user's then wins).
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
        assert!(c.starts_with("console=ttyS0 nokaslr noxsave nosmap nopti clearcpuid=avx,"));
        assert_eq!(c.matches("nokaslr").count(), 1);
        assert!(c.contains(",cx16"));
    }

    #[test]
    fn keeps_a_users_clearcpuid_and_init_args() {
        let c = apply("clearcpuid=avx -- single");
        assert_eq!(c, "clearcpuid=avx noxsave nokaslr nosmap nopti -- single");
        assert!(apply("").starts_with("noxsave"));
    }
}
