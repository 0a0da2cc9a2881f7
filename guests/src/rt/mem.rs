//! `memcpy`, `memmove`, `memset`, `memcmp` and `bcmp`.
//!
//! The compiler emits calls to these for copies and comparisons, and on
//! x86_64-unknown-linux-gnu it expects the C library to provide them;
//! compiler_builtins does not, and the guests link no C library. The copies
//! use `rep movsb`/`rep stosb`, and the comparisons volatile reads, so the
//! optimiser cannot turn a body back into a call to the function itself.

/// Copies `n` bytes from `src` to `dst`; the ranges must not overlap.
///
/// # Safety
/// `src` must be valid for `n` bytes of reads and `dst` for `n` bytes of
/// writes.
#[no_mangle]
pub unsafe extern "C" fn memcpy(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller's guarantees, passed on.
    unsafe { copy_up(dst, src, n) };
    dst
}

/// Copies `n` bytes upwards, from the first byte to the last.
///
/// # Safety
/// As [`memcpy`]; overlap is allowed when `dst` is not inside `src`'s range.
#[inline(always)]
unsafe fn copy_up(dst: *mut u8, src: *const u8, n: usize) {
    // SAFETY: the caller guarantees both ranges; DF is clear (the System V
    // ABI requires it on function entry and exit, and the VMM starts the
    // guest with it clear), so `rep movsb` copies upwards.
    unsafe {
        core::arch::asm!(
            "rep movsb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            inout("rsi") src => _,
            options(nostack, preserves_flags),
        );
    }
}

/// Copies `n` bytes from `src` to `dst`; the ranges may overlap.
///
/// # Safety
/// As [`memcpy`].
#[no_mangle]
pub unsafe extern "C" fn memmove(dst: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dst as usize).wrapping_sub(src as usize) >= n {
        // dst is below src or past the end of it: an upward copy never
        // overwrites a byte before reading it.
        // SAFETY: the caller's guarantees, passed on.
        unsafe { copy_up(dst, src, n) };
        return dst;
    }
    // dst lies inside src's range: copy downwards, from the last byte.
    // SAFETY: the caller guarantees both ranges, so the last bytes at
    // offset n - 1 (n > 0 here, as dst - src < n) are in them. DF is set
    // only for the copy and cleared again before anything else runs.
    unsafe {
        core::arch::asm!(
            "std",
            "rep movsb",
            "cld",
            inout("rcx") n => _,
            inout("rdi") dst.add(n - 1) => _,
            inout("rsi") src.add(n - 1) => _,
            options(nostack),
        );
    }
    dst
}

/// Sets `n` bytes at `dst` to the low byte of `c`.
///
/// # Safety
/// `dst` must be valid for `n` bytes of writes.
#[no_mangle]
pub unsafe extern "C" fn memset(dst: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range; DF is clear (see memcpy).
    unsafe {
        core::arch::asm!(
            "rep stosb",
            inout("rcx") n => _,
            inout("rdi") dst => _,
            in("al") c as u8,
            options(nostack, preserves_flags),
        );
    }
    dst
}

/// Compares `n` bytes; returns the difference of the first unequal pair.
///
/// # Safety
/// `a` and `b` must be valid for `n` bytes of reads.
#[no_mangle]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: i < n, and the caller guarantees n readable bytes at each.
        // Volatile keeps this a loop rather than a call to memcmp.
        let (x, y) = unsafe { (a.add(i).read_volatile(), b.add(i).read_volatile()) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// Compares `n` bytes for equality only: zero if equal.
///
/// # Safety
/// As [`memcmp`].
#[no_mangle]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: the caller's guarantees, passed on.
    unsafe { memcmp(a, b, n) }
}
