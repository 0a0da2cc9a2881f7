//! Garbage hypercalls get error results, never crash the VMM, and never
//! corrupt a checkpoint.
//!
//! - unknown operations (0, 7, 0x106, 0xffffffff, 0xdeadbeef, ...) return BAD_OP;
//! - ENTRY past the end (up to u64::MAX) returns BAD_ARG;
//! - COMMIT and ABORT with no speculation return NO_SPECULATION;
//! - every operation is also issued with random garbage in every other
//!   general register (and the upper halves of RAX and RDX): the results
//!   must be the true ones, and every register that is not a result must
//!   come back unchanged, across rollbacks too;
//! - 1- and 2-byte writes to the hypercall port, and writes of every size
//!   to 0x5e1..0x5e3 (and straddling it), are ignored;
//! - then the same inside a speculation, with nested garbage speculate,
//!   commit and abort; the final abort must restore memory exactly.
//!
//! Exit status 0 on success; the failing check's number otherwise.
#![no_std]
#![no_main]

#[path = "../rt/mod.rs"]
mod rt;

use guest_agent::abi::reason::ABORTED_BY_GUEST;
use guest_agent::abi::{err, op, HYPERCALL_PORT};
use guest_agent::hypercall::{abort, commit, entry, raw, status, Error};
use guest_agent::pio::{inb, outb, outl};

/// Prints the failed check and returns its code from the enclosing function.
macro_rules! check {
    ($cond:expr, $code:expr, $($msg:tt)*) => {
        if !$cond {
            rt::println!("spec_hostile: check {} failed: {}", $code, format_args!($($msg)*));
            return Err($code);
        }
    };
}

const PAGE: u64 = 4096;
/// Pages of patterned memory the final rollback must restore.
const DATA_PAGES: u64 = 64;
/// Garbage calls per operation per sweep.
const ROUNDS: usize = 16;

/// Operation numbers no VMM knows. 0x101 and 0x1_0001 end in a valid
/// operation's low byte or word, so a VMM that decoded only part of EAX
/// would take them for SPECULATE.
const BAD_OPS: [u32; 10] = [
    0,
    7,
    0x106,
    0xff,
    0x101,
    0x1_0001,
    0x8000_0000,
    0xdead_beef,
    0xffff_fffe,
    0xffff_ffff,
];
/// Operations that only read state, at any depth.
const READ_OPS: [u32; 2] = [op::STATUS, op::ENTRY];
/// Arguments worth trying besides random ones.
const SPECIAL_ARGS: [u64; 7] = [0, 1, 63, 64, 1 << 32, 1 << 63, u64::MAX];

/// Register slots of a [`Frame`], in the order the assembly loads them.
const NREGS: usize = 15;
const RAX: usize = 0;
const RDX: usize = 3;
const RSI: usize = 4;
const RDI: usize = 5;
const NAMES: [&str; NREGS] = [
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14",
    "r15",
];

/// Every general register (but RSP) before a hypercall and after it.
#[repr(C)]
struct Frame {
    inp: [u64; NREGS],
    out: [u64; NREGS],
}

/// Issues the hypercall `f.inp` describes: loads every register from
/// `f.inp` (EAX is the operation, DX must be the port), runs `out dx, eax`,
/// and stores every register into `f.out`.
#[inline(never)]
fn call_frame(f: &mut Frame) {
    // SAFETY: RBX and RBP, which cannot be operands, are saved on the
    // stack and restored; every other register written is declared
    // clobbered. The block reads and writes only `*f` (through the pointer
    // kept on the stack) and its own pushes. The `out` is a hypercall,
    // which changes only RAX, RDX and RSI and returns after the
    // instruction, or rolls the VM back to an earlier return of this same
    // instruction, with that moment's stack and registers.
    unsafe {
        core::arch::asm!(
            "push rbx", "push rbp", "push rax",
            "mov rbx, [rax + 8]", "mov rcx, [rax + 16]", "mov rdx, [rax + 24]",
            "mov rsi, [rax + 32]", "mov rdi, [rax + 40]", "mov rbp, [rax + 48]",
            "mov r8, [rax + 56]", "mov r9, [rax + 64]", "mov r10, [rax + 72]",
            "mov r11, [rax + 80]", "mov r12, [rax + 88]", "mov r13, [rax + 96]",
            "mov r14, [rax + 104]", "mov r15, [rax + 112]",
            "movq xmm0, rcx", "movq xmm1, rsi",
            "mov rax, [rax]",
            "out dx, eax",
            "push rax",
            "mov rax, [rsp + 8]",
            "mov [rax + 128], rbx", "mov [rax + 136], rcx", "mov [rax + 144], rdx",
            "mov [rax + 152], rsi", "mov [rax + 160], rdi", "mov [rax + 168], rbp",
            "mov [rax + 176], r8", "mov [rax + 184], r9", "mov [rax + 192], r10",
            "mov [rax + 200], r11", "mov [rax + 208], r12", "mov [rax + 216], r13",
            "mov [rax + 224], r14", "mov [rax + 232], r15",
            "pop rcx",
            "mov [rax + 120], rcx",
            "pop rax", "pop rbp", "pop rbx",
            inout("rax") f as *mut Frame => _,
            out("rcx") _, out("rdx") _, out("rsi") _, out("rdi") _,
            out("r8") _, out("r9") _, out("r10") _, out("r11") _,
            out("r12") _, out("r13") _, out("r14") _, out("r15") _,
            out("xmm0") _, out("xmm1") _,
        );
    }
}

/// xorshift64*: reproducible garbage.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// A frame for `op` with garbage in every register, the upper half of RAX
/// and the upper bytes of RDX included.
fn garbage(rng: &mut Rng, op: u32) -> Frame {
    let mut f = Frame {
        inp: [0; NREGS],
        out: [0; NREGS],
    };
    for r in f.inp.iter_mut() {
        *r = rng.next();
    }
    f.inp[RAX] = (f.inp[RAX] & !0xffff_ffff) | u64::from(op);
    f.inp[RDX] = (f.inp[RDX] & !0xffff) | u64::from(HYPERCALL_PORT);
    f
}

/// Checks that every register but RAX, RDX and RSI came back unchanged.
fn expect_preserved(f: &Frame, code: u32) -> Result<(), u32> {
    for i in (0..NREGS).filter(|&i| i != RAX && i != RDX && i != RSI) {
        check!(
            f.out[i] == f.inp[i],
            code,
            "op {:#x}: {} was {:#x}, came back {:#x}",
            f.inp[RAX] as u32,
            NAMES[i],
            f.inp[i],
            f.out[i]
        );
    }
    Ok(())
}

/// Checks the results of a call that must not change anything, at `depth`
/// own speculations.
fn expect_result(f: &Frame, depth: u64, code: u32) -> Result<(), u32> {
    let (op, arg) = (f.inp[RAX] as u32, f.inp[RDI]);
    let (rax, rdx, rsi) = (f.out[RAX], f.out[RDX], f.out[RSI]);
    let ok = match op {
        op::STATUS => rax == depth && rdx == depth && rsi == depth,
        op::ENTRY if arg < depth => (rax as i64) >= 0 && rdx == 1,
        op::ENTRY => rax == err::BAD_ARG,
        op::COMMIT | op::ABORT => depth == 0 && rax == err::NO_SPECULATION,
        _ => rax == err::BAD_OP,
    };
    check!(
        ok,
        code,
        "op {op:#x} arg {arg:#x} at depth {depth}: rax {rax:#x} rdx {rdx:#x} rsi {rsi:#x}"
    );
    expect_preserved(f, code)
}

/// One garbage call of `op` (with `arg`, if given, in RDI), checked.
fn garbage_call(
    rng: &mut Rng,
    op: u32,
    arg: Option<u64>,
    depth: u64,
    code: u32,
) -> Result<(), u32> {
    let mut f = garbage(rng, op);
    if let Some(a) = arg {
        f.inp[RDI] = a;
    }
    call_frame(&mut f);
    expect_result(&f, depth, code)
}

/// Every operation without an effect at `depth`, with garbage everywhere.
fn sweep(rng: &mut Rng, depth: u64, code: u32) -> Result<(), u32> {
    let mut ops = [0u32; BAD_OPS.len() + READ_OPS.len() + 2];
    ops[..BAD_OPS.len()].copy_from_slice(&BAD_OPS);
    ops[BAD_OPS.len()..BAD_OPS.len() + 2].copy_from_slice(&READ_OPS);
    let n = if depth == 0 {
        // Without a speculation, COMMIT and ABORT only fail.
        ops[ops.len() - 2] = op::COMMIT;
        ops[ops.len() - 1] = op::ABORT;
        ops.len()
    } else {
        ops.len() - 2
    };
    for &op in &ops[..n] {
        for _ in 0..ROUNDS {
            garbage_call(rng, op, None, depth, code)?;
        }
        for a in SPECIAL_ARGS {
            garbage_call(rng, op, Some(a), depth, code)?;
        }
    }
    Ok(())
}

/// The plain-ABI error checks (RDI set, other registers as the compiler
/// left them).
fn plain_errors(depth: u64) -> Result<(), u32> {
    for op in BAD_OPS {
        let r = raw(op, u64::MAX).rax;
        check!(
            r == err::BAD_OP,
            10,
            "op {op:#x} returned {r:#x}, expected BAD_OP"
        );
    }
    for i in [depth, depth + 1, 1 << 31, 1 << 32, 1 << 63, u64::MAX] {
        let e = entry(i);
        check!(
            e == Err(Error::BadArg),
            11,
            "entry({i:#x}) at depth {depth} returned {e:?}"
        );
    }
    if depth == 0 {
        check!(
            commit() == Err(Error::NoSpeculation),
            12,
            "commit without a speculation"
        );
        check!(
            abort() == Error::NoSpeculation,
            13,
            "abort without a speculation"
        );
    }
    let s = status();
    check!(
        s.depth == depth && s.own == depth,
        14,
        "status {s:?} at depth {depth}"
    );
    Ok(())
}

/// Writes a 2-byte value to a port.
fn outw(port: u16, val: u16) {
    // SAFETY: port I/O has no memory-safety effect on this program; the
    // VMM grants every port to a bare guest.
    unsafe {
        core::arch::asm!("out dx, ax", in("dx") port, in("ax") val, options(nomem, nostack, preserves_flags))
    }
}

/// Reads 2 and 4 bytes from a port.
fn inw_inl(port: u16) -> (u16, u32) {
    let (w, l): (u16, u32);
    // SAFETY: as in `outw`.
    unsafe {
        core::arch::asm!("in ax, dx", in("dx") port, out("ax") w, options(nomem, nostack, preserves_flags));
        core::arch::asm!("in eax, dx", in("dx") port, out("eax") l, options(nomem, nostack, preserves_flags));
    }
    (w, l)
}

/// Odd-sized and misplaced accesses to the hypercall ports: all ignored.
fn port_junk(depth: u64, code: u32) -> Result<(), u32> {
    let base = HYPERCALL_PORT;
    for v in [
        op::SPECULATE,
        op::COMMIT,
        op::ABORT,
        op::STATUS,
        op::ENTRY,
        0xff,
        0xffff_ffff,
    ] {
        outb(base, v as u8);
        outw(base, v as u16);
        for port in base + 1..base + 4 {
            outb(port, v as u8);
            outw(port, v as u16);
            outl(port, v);
        }
        // Straddling the start of the range.
        outl(base - 2, v);
        outl(base - 1, v);
        let s = status();
        check!(
            s.depth == depth && s.own == depth,
            code,
            "after junk writes of {v:#x}: {s:?}"
        );
    }
    for port in base - 1..base + 4 {
        let _ = inb(port);
        let _ = inw_inl(port);
    }
    let s = status();
    check!(
        s.depth == depth && s.own == depth,
        code,
        "after junk reads: {s:?}"
    );
    Ok(())
}

/// Garbage SPECULATE then garbage COMMIT, from `depth` own speculations.
fn garbage_speculate_commit(rng: &mut Rng, depth: u64, code: u32) -> Result<(), u32> {
    let mut f = garbage(rng, op::SPECULATE);
    call_frame(&mut f);
    check!(
        f.out[RAX] == 0,
        code,
        "garbage speculate at depth {depth}: rax {:#x}",
        f.out[RAX]
    );
    expect_preserved(&f, code)?;
    check!(
        status().depth == depth + 1,
        code,
        "depth after garbage speculate: {:?}",
        status()
    );
    let mut c = garbage(rng, op::COMMIT);
    call_frame(&mut c);
    check!(
        c.out[RAX] == 0,
        code,
        "garbage commit: rax {:#x}",
        c.out[RAX]
    );
    expect_preserved(&c, code)?;
    check!(
        status().depth == depth,
        code,
        "depth after garbage commit: {:?}",
        status()
    );
    Ok(())
}

/// Prints a failure and returns its code.
fn fail(code: u32, what: core::fmt::Arguments<'_>) -> u32 {
    rt::println!("spec_hostile: check {code} failed: {what}");
    code
}

/// Garbage SPECULATE then garbage ABORT, from `depth` own speculations:
/// the rollback must bring back every register the SPECULATE was issued
/// with, and the depth.
fn garbage_speculate_abort(rng: &mut Rng, depth: u64, code: u32) -> Result<(), u32> {
    let mut f = garbage(rng, op::SPECULATE);
    call_frame(&mut f);
    match f.out[RAX] {
        0 => {
            expect_preserved(&f, code)?;
            let mut a = garbage(rng, op::ABORT);
            call_frame(&mut a);
            let rax = a.out[RAX];
            return Err(fail(
                code,
                format_args!("garbage abort returned rax {rax:#x}"),
            ));
        }
        ABORTED_BY_GUEST => {}
        r => {
            return Err(fail(
                code,
                format_args!("garbage speculate returned {r:#x}"),
            ))
        }
    }
    expect_preserved(&f, code)?;
    let s = status();
    check!(
        s.depth == depth,
        code,
        "after a garbage abort from depth {}: {s:?}",
        depth + 1
    );
    Ok(())
}

/// The content of word `i` of the data pages, from `seed`.
fn data_word(seed: u64, i: u64) -> u64 {
    (seed ^ i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 3)
}

fn fill_data(base: u64, seed: u64) {
    for i in 0..DATA_PAGES * PAGE / 8 {
        // SAFETY: `main` checked that the data pages lie in free RAM.
        unsafe { ((base + i * 8) as *mut u64).write_volatile(data_word(seed, i)) };
    }
}

/// The first data word that does not hold `fill_data(base, seed)`'s value.
fn first_bad_data(base: u64, seed: u64) -> Option<u64> {
    (0..DATA_PAGES * PAGE / 8).find(|&i| {
        // SAFETY: as in `fill_data`.
        let v = unsafe { ((base + i * 8) as *const u64).read_volatile() };
        v != data_word(seed, i)
    })
}

/// The data pages' content outside the speculation, and inside it.
const ORIGINAL: u64 = 0x0123_4567_89ab_cdef;
const SCRIBBLE: u64 = 0xfeed_face_cafe_f00d;

/// Everything with no speculation: errors, garbage, junk, and garbage
/// speculate/commit and speculate/abort pairs.
fn idle_phase(rng: &mut Rng) -> Result<(), u32> {
    plain_errors(0)?;
    sweep(rng, 0, 20)?;
    port_junk(0, 21)?;
    garbage_speculate_commit(rng, 0, 22)?;
    garbage_speculate_abort(rng, 0, 23)?;
    plain_errors(0)?;
    sweep(rng, 0, 24)
}

/// Everything again inside a speculation, and one level deeper.
fn inside(rng: &mut Rng, base: u64) -> Result<(), u32> {
    fill_data(base, SCRIBBLE);
    plain_errors(1)?;
    sweep(rng, 1, 31)?;
    port_junk(1, 32)?;
    garbage_speculate_commit(rng, 1, 33)?;
    garbage_speculate_abort(rng, 1, 34)?;
    if let Some(i) = first_bad_data(base, SCRIBBLE) {
        return Err(fail(
            35,
            format_args!("word {i}: a nested rollback lost the outer writes"),
        ));
    }
    match raw(op::SPECULATE, rng.next()).rax {
        0 => {}
        r => return Err(fail(36, format_args!("nested speculate returned {r:#x}"))),
    }
    plain_errors(2)?;
    sweep(rng, 2, 37)?;
    port_junk(2, 38)?;
    let mut c = garbage(rng, op::COMMIT);
    call_frame(&mut c);
    check!(
        c.out[RAX] == 0,
        39,
        "garbage commit of the nested one: {:#x}",
        c.out[RAX]
    );
    plain_errors(1)
}

/// Speculates with garbage registers, runs [`inside`], aborts with garbage
/// registers, and checks memory and registers came back exactly.
fn speculative_phase(rng: &mut Rng, base: u64) -> Result<(), u32> {
    fill_data(base, ORIGINAL);
    let mut f = garbage(rng, op::SPECULATE);
    call_frame(&mut f);
    match f.out[RAX] {
        0 => {
            expect_preserved(&f, 30)?;
            inside(rng, base)?;
            let mut a = garbage(rng, op::ABORT);
            call_frame(&mut a);
            let rax = a.out[RAX];
            return Err(fail(
                40,
                format_args!("the final garbage abort returned {rax:#x}"),
            ));
        }
        ABORTED_BY_GUEST => {}
        r => {
            return Err(fail(
                41,
                format_args!("the outer speculate returned {r:#x}"),
            ))
        }
    }
    expect_preserved(&f, 42)?;
    if let Some(i) = first_bad_data(base, ORIGINAL) {
        let page = i * 8 / PAGE;
        return Err(fail(
            43,
            format_args!("word {i} (page {page}) not restored"),
        ));
    }
    plain_errors(0)?;
    sweep(rng, 0, 44)
}

fn main(mem_size: u64, free_base: u64, arg: u64) -> u32 {
    if free_base + DATA_PAGES * PAGE > mem_size {
        rt::println!("spec_hostile: {DATA_PAGES} pages do not fit");
        return 2;
    }
    let seed = 0x5bec_a11e_u64 ^ arg.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    rt::println!("spec_hostile: seed {seed:#x}");
    let mut rng = Rng(seed | 1);
    let result = idle_phase(&mut rng)
        .inspect(|()| rt::println!("spec_hostile: garbage without a speculation: ok"))
        .and_then(|()| speculative_phase(&mut rng, free_base));
    match result {
        Ok(()) => {
            rt::println!("spec_hostile: garbage inside a speculation, memory restored: ok");
            rt::println!("spec_hostile: ok");
            0
        }
        Err(code) => code,
    }
}
