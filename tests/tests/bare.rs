//! `specvm run --bare`: the bare test guests end to end, and the errors of
//! the command line around them.

use std::time::Duration;

use specvm_tests::{bare_guest, run_specvm, skip_without_kvm, RunResult};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Runs `specvm run --bare <guest>` followed by `extra`.
fn run_bare(guest: &str, extra: &[&str]) -> RunResult {
    let path = bare_guest(guest);
    let path = path.to_str().expect("target path is UTF-8");
    let mut args = vec!["run", "--bare", path];
    args.extend_from_slice(extra);
    run_specvm(&args, TIMEOUT)
}

/// Panics unless stderr has a line starting `specvm: error:`.
fn assert_error_line(r: &RunResult) {
    assert!(
        r.stderr.lines().any(|l| l.starts_with("specvm: error:")),
        "expected a `specvm: error:` line, got {r}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn hello_prints_its_line_and_exits_zero() {
    skip_without_kvm!();
    let r = run_bare("hello", &[]);
    r.assert_status(0);
    assert_eq!(r.stdout, "hello from a bare specvm guest\n", "{r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn memwrite_checks_1000_pages() {
    skip_without_kvm!();
    let r = run_bare("memwrite", &["--memory", "64M", "--guest-arg", "1000"]);
    r.assert_status(0);
    assert!(r.stdout.contains("memwrite: wrote 1000 pages, ok\n"), "{r}");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn memwrite_refuses_more_pages_than_ram() {
    skip_without_kvm!();
    // 32 MiB of RAM leaves 16 MiB (4096 pages) above the free base.
    let r = run_bare("memwrite", &["--memory", "32M", "--guest-arg", "5000"]);
    r.assert_status(2);
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn badinsn_is_reported_as_an_emulation_failure() {
    skip_without_kvm!();
    let r = run_bare("badinsn", &[]);
    r.assert_failed();
    assert!(r.stdout.contains("badinsn: about to fault\n"), "{r}");
    assert_ne!(r.status, 4, "the instruction completed: {r}");
    assert_error_line(&r);
    r.assert_stderr_contains("emulation");
    // popcnt rax, [rax] is f3 48 0f b8 00.
    r.assert_stderr_contains("f3");
    r.assert_stderr_contains("rip");
}

#[test]
fn missing_program_is_an_error_naming_it() {
    let missing = bare_guest("hello").with_file_name("no-such-guest");
    let missing = missing.to_str().expect("target path is UTF-8");
    let r = run_specvm(&["run", "--bare", missing], TIMEOUT);
    r.assert_status(1);
    assert_error_line(&r);
    r.assert_stderr_contains(missing);
}

#[test]
fn bad_memory_size_is_refused_with_the_value() {
    let r = run_bare("hello", &["--memory", "12Q"]);
    r.assert_failed();
    r.assert_stderr_contains("12Q");
}

#[test]
fn zero_memory_is_refused() {
    let r = run_bare("hello", &["--memory", "0"]);
    r.assert_failed();
    r.assert_stderr_contains("memory");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn triple_fault_is_reported_with_the_rip() {
    skip_without_kvm!();
    let r = run_bare("tripfault", &[]);
    r.assert_status(1);
    assert!(r.stdout.contains("tripfault: about to fault\n"), "{r}");
    assert_error_line(&r);
    r.assert_stderr_contains("triple fault");
    r.assert_stderr_contains("rip 0x4");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn idle_application_processors_do_not_keep_the_vm_alive() {
    skip_without_kvm!();
    // vCPU 1 waits for a startup IPI that never comes; the VMM must still
    // end when vCPU 0's guest exits.
    let r = run_bare("hello", &["--cpus", "2"]);
    r.assert_status(0);
    assert_eq!(r.stdout, "hello from a bare specvm guest\n", "{r}");
}

#[test]
fn bad_cpu_count_is_refused() {
    let r = run_bare("hello", &["--cpus", "0"]);
    r.assert_failed();
    r.assert_stderr_contains("vCPU count 0");
}

/// A copy of the `hello` guest with `patch` applied to its bytes, in a
/// temporary file that the returned guard removes.
struct Patched(std::path::PathBuf);

impl Patched {
    fn new(name: &str, patch: impl FnOnce(&mut Vec<u8>)) -> Self {
        let mut bytes = std::fs::read(bare_guest("hello")).unwrap();
        patch(&mut bytes);
        let p = std::env::temp_dir().join(format!("specvm-elf-{name}-{}", std::process::id()));
        std::fs::write(&p, bytes).unwrap();
        Self(p)
    }
    fn run(&self, extra: &[&str]) -> RunResult {
        let mut args = vec!["run", "--bare", self.0.to_str().unwrap()];
        args.extend_from_slice(extra);
        run_specvm(&args, TIMEOUT)
    }
}

impl Drop for Patched {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The offset of the first PT_LOAD program header in an ELF-64 file.
fn first_load(b: &[u8]) -> usize {
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let size = usize::from(u16::from_le_bytes([b[54], b[55]]));
    let n = usize::from(u16::from_le_bytes([b[56], b[57]]));
    (0..n)
        .map(|i| phoff + i * size)
        .find(|&o| u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) == 1)
        .expect("a PT_LOAD")
}

#[test]
fn programs_outside_the_bare_contract_are_refused_with_the_reason() {
    let cases: Vec<(&str, Patched)> = vec![
        ("32-bit", Patched::new("class", |b| b[4] = 1)),
        (
            "not x86-64",
            Patched::new("machine", |b| {
                b[18..20].copy_from_slice(&3u16.to_le_bytes())
            }),
        ),
        (
            "not a static executable",
            Patched::new("dyn", |b| b[16..18].copy_from_slice(&3u16.to_le_bytes())),
        ),
        (
            "below 0x400000",
            Patched::new("low", |b| {
                let o = first_load(b);
                b[o + 24..o + 32].copy_from_slice(&0x1000u64.to_le_bytes());
            }),
        ),
        (
            "past the guest's low RAM",
            Patched::new("big", |b| {
                let o = first_load(b);
                b[o + 40..o + 48].copy_from_slice(&(1u64 << 40).to_le_bytes());
            }),
        ),
        ("not an ELF", Patched::new("magic", |b| b[1] = b'X')),
    ];
    for (why, p) in &cases {
        let r = p.run(&["--memory", "64M"]);
        r.assert_failed();
        assert_error_line(&r);
        r.assert_stderr_contains(why);
    }
}

/// The documented maximum, 64 GiB, runs a bare guest (its identity map
/// covers the RAM above the MMIO gap).
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn the_largest_memory_runs_a_bare_guest() {
    skip_without_kvm!();
    let r = run_bare("hello", &["--memory", "64G"]);
    r.assert_status(0);
}
