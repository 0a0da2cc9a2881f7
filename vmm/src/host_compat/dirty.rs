//! Which dirty tracking a VM gets on this host (`crate::vstate::dirty`).
//!
//! A Linux guest here uses the whole-bitmap method, not the dirty ring.
//! Measured on 2026-12-03 with the same bzImage and 256 MiB: with the ring,
//! the kernel's own decompressor (guest kernel code, which this host
//! emulates) had not printed the kernel's banner after 15 minutes; with
//! the bitmap, started 9 minutes later beside it, the banner came within
//! 6 minutes and the boot went on. Bare guests run at CPL3, natively, and
//! keep the ring (`tests/tests/spec.rs` checks every method with
//! `SPECVM_VERIFY_MEMORY`). `SPECVM_DIRTY_TRACKING` still overrides.

/// The method to ask for when `SPECVM_DIRTY_TRACKING` does not name one:
/// `Some("bitmap")` for a Linux guest when the host-compat layer is
/// active, else `None` (the VMM's own order).
pub fn default_method(compat_active: bool, linux: bool) -> Option<&'static str> {
    (compat_active && linux).then_some("bitmap")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_linux_guests_on_this_host_leave_the_ring() {
        assert_eq!(default_method(true, true), Some("bitmap"));
        assert_eq!(default_method(true, false), None);
        assert_eq!(default_method(false, true), None);
        assert_eq!(default_method(false, false), None);
    }
}
