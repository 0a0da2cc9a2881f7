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
