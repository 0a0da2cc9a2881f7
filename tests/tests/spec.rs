//! Speculation from a bare guest's point of view: the `spec_*` guests end
//! to end (SPECULATIONS.md rules 1, 3 and 5, the stack limit, hostile
//! hypercalls, time across rollbacks), and a leak check of the VMM across
//! many rollbacks.

use std::time::{Duration, Instant};

use specvm_tests::{
    bare_guest, open_fds, run_command, run_specvm, skip_without_kvm, spawn_specvm, specvm_bin,
    vm_rss_kib, RunResult,
};

const TIMEOUT: Duration = Duration::from_secs(120);
/// Most a pause of `spec_cycles` may take to show up.
const PHASE_TIMEOUT: Duration = Duration::from_secs(100);
/// The RSS growth allowed between the leak check's two phases. 900 leaked
/// undo logs of 16 pages would be 56 MiB.
const LEAK_LIMIT_KIB: u64 = 4 * 1024;

/// `run --bare <path of guest>` followed by `extra`.
fn bare_args(guest: &str, extra: &[&str]) -> Vec<String> {
    let path = bare_guest(guest);
    let path = path.to_str().expect("target path is UTF-8").to_owned();
    let mut args = vec!["run".to_owned(), "--bare".to_owned(), path];
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    args
}

/// Runs `specvm run --bare <guest>` followed by `extra`, and prints how
/// long it took.
fn run_bare(guest: &str, extra: &[&str]) -> RunResult {
    let args = bare_args(guest, extra);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let start = Instant::now();
    let r = run_specvm(&args, TIMEOUT);
    eprintln!("{guest} {extra:?}: {:?}", start.elapsed());
    r
}

/// Panics, showing the run, unless stdout has the line `line`.
fn assert_line(r: &RunResult, line: &str) {
    assert!(
        r.stdout.lines().any(|l| l == line),
        "expected the line {line:?}, got {r}"
    );
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_basic_restores_1000_pages() {
    skip_without_kvm!();
    let r = run_bare("spec_basic", &["--memory", "64M", "--guest-arg", "1000"]);
    r.assert_status(0);
    assert_line(&r, "spec_basic: 1000 pages and registers restored, ok");
}

/// Runs a bare guest with dirty tracking `method` and
/// `SPECVM_VERIFY_MEMORY`, which compares every private page with the
/// memory file after each checkpoint and rollback.
fn run_verified(method: &str, guest: &str, extra: &[&str]) -> RunResult {
    let mut args = vec!["--log-level".to_owned(), "info".to_owned()];
    args.extend(bare_args(guest, extra));
    let mut cmd = std::process::Command::new(specvm_bin());
    cmd.args(&args)
        .env("SPECVM_DIRTY_TRACKING", method)
        .env("SPECVM_VERIFY_MEMORY", "1");
    run_command(cmd, TIMEOUT)
}

/// Each dirty-tracking method this host offers reports every page the
/// guest wrote (the verifier finds no page written without a report) and
/// rolls memory back exactly: the guests check their pages and their
/// translation after each abort. The ring is also made to fill (70,000
/// pages between two checkpoints, more than a ring holds), so its overflow
/// path runs too.
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn every_dirty_tracking_method_reports_every_write_and_rolls_back_exactly() {
    skip_without_kvm!();
    for method in ["ring", "manual-protect", "bitmap"] {
        let runs = [
            (
                run_verified(
                    method,
                    "spec_basic",
                    &["--memory", "64M", "--guest-arg", "1000"],
                ),
                "spec_basic: 1000 pages and registers restored, ok",
            ),
            (
                run_verified(method, "spec_pagetable", &["--memory", "128M"]),
                "spec_pagetable: translation rolled back, ok",
            ),
            (
                run_verified(
                    method,
                    "spec_bench",
                    &[
                        "--memory",
                        "512M",
                        "--serial",
                        "stdout",
                        "--guest-arg",
                        &(70_000u64 | 1 << 32).to_string(),
                    ],
                ),
                "spec_bench: 1 repetitions with 70000 dirty pages, ok",
            ),
        ];
        for (r, line) in runs {
            r.assert_status(0);
            assert_line(&r, line);
            let chosen = format!("dirty tracking: {method}");
            if !r.stderr.contains(&chosen) {
                // The host lacks this method: the VMM fell back, as it
                // must; the run above then tested the fallback.
                eprintln!("this host does not offer {method}: {r}");
                continue;
            }
            assert!(
                r.stderr.contains("every written page was reported dirty"),
                "{method}: the verifier did not run: {r}"
            );
            assert!(
                !r.stderr.contains("without being reported dirty"),
                "{method}: pages written without being reported: {r}"
            );
        }
    }
}

/// A page-table entry the guest rewrote while speculating is rolled back,
/// and so is the translation through it (on a shadow-paging KVM, only if
/// the VMM drops KVM's shadow pages; with `--host-compat off` on such a
/// host this guest reads the speculative frame: exit 7).
#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_rollback_restores_the_guests_address_translation() {
    skip_without_kvm!();
    let r = run_bare("spec_pagetable", &["--memory", "128M"]);
    r.assert_status(0);
    assert_line(&r, "spec_pagetable: translation rolled back, ok");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_basic_with_1g_of_memory() {
    skip_without_kvm!();
    let r = run_bare("spec_basic", &["--memory", "1G"]);
    r.assert_status(0);
    assert_line(&r, "spec_basic: 256 pages and registers restored, ok");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_basic_with_an_idle_second_vcpu() {
    skip_without_kvm!();
    // vCPU 1 idles, waiting for a startup IPI; every checkpoint must
    // include it, and every rollback restore it.
    let r = run_bare(
        "spec_basic",
        &["--cpus", "2", "--memory", "64M", "--guest-arg", "1000"],
    );
    r.assert_status(0);
    assert_line(&r, "spec_basic: 1000 pages and registers restored, ok");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_nested_all_orders_and_the_depth_limit() {
    skip_without_kvm!();
    let r = run_bare("spec_nested", &["--memory", "64M"]);
    r.assert_status(0);
    for scenario in [
        "(a) S1 S2 abort abort",
        "(b) S1 S2 commit abort",
        "(c) S1 S2 commit commit",
        "(d) S1 S2 abort commit",
        "(e) 10 levels aborted one by one",
        "(f) 64 levels, TOO_DEEP at 65, committed",
    ] {
        assert_line(&r, &format!("spec_nested: {scenario}: ok"));
    }
    for depth in 0..10 {
        assert_line(&r, &format!("spec_nested: (e) back at depth {depth}"));
    }
    assert_line(&r, "spec_nested: ok");
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_hostile_garbage_hypercalls_are_refused() {
    skip_without_kvm!();
    let r = run_bare("spec_hostile", &["--memory", "64M"]);
    r.assert_status(0);
    assert_line(
        &r,
        "spec_hostile: garbage inside a speculation, memory restored: ok",
    );
    assert_line(&r, "spec_hostile: ok");
    assert!(
        !r.stderr.lines().any(|l| l.starts_with("specvm: error:")),
        "{r}"
    );
}

/// The TSC values of `spec_time`'s `<round> in <tsc>` or `<round> out
/// <tsc>` lines, by round (`long`, `quick <i>`).
fn tsc_lines(stdout: &str, kind: &str) -> Vec<(String, u64)> {
    stdout
        .lines()
        .filter_map(|l| l.strip_prefix("spec_time: "))
        .filter_map(|l| {
            let (round, tsc) = l.split_once(&format!(" {kind} "))?;
            Some((round.to_owned(), tsc.parse().ok()?))
        })
        .collect()
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_time_never_runs_backwards() {
    skip_without_kvm!();
    let r = run_bare("spec_time", &[]);
    r.assert_status(0);
    assert_line(&r, "spec_time: ok");
    // The guest cannot keep what it read inside a speculation past the
    // rollback; it prints it, and each pair is compared here.
    let inside = tsc_lines(&r.stdout, "in");
    let after = tsc_lines(&r.stdout, "out");
    assert_eq!(after.len(), 201, "{r}");
    let mut compared = 0;
    for (round, tsc_in) in &inside {
        let (_, tsc_out) = after
            .iter()
            .find(|(r, _)| r == round)
            .unwrap_or_else(|| panic!("no `out` line for round {round}: {r}"));
        assert!(
            tsc_out > tsc_in,
            "round {round}: TSC {tsc_out} after the rollback, {tsc_in} inside the speculation"
        );
        compared += 1;
    }
    eprintln!("spec_time: compared {compared} inside/after TSC pairs");
    for l in r.stdout.lines().filter(|l| l.contains("round")) {
        eprintln!("{l}");
    }
}

/// The VMM's resident size and open descriptors at one pause.
fn measure(pid: u32, phase: &str) -> (u64, usize) {
    let rss = vm_rss_kib(pid).expect("read VmRSS of specvm");
    let fds = open_fds(pid).expect("count the fds of specvm");
    eprintln!("spec_cycles {phase}: VmRSS {rss} kB, {fds} fds");
    (rss, fds)
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn spec_cycles_leak_no_memory_or_fds() {
    skip_without_kvm!();
    let args = bare_args("spec_cycles", &["--memory", "64M", "--guest-arg", "1000"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut vm = spawn_specvm(&args);
    let pid = vm.pid();
    let start = Instant::now();
    vm.wait_for_line("spec_cycles: phase 1", PHASE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let (rss1, fds1) = measure(pid, "phase 1 (after 100 cycles)");
    vm.send(b"1").expect("write to specvm's stdin");
    vm.wait_for_line("spec_cycles: phase 2", PHASE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
    let (rss2, fds2) = measure(pid, "phase 2 (after 1000 cycles)");
    vm.send(b"2").expect("write to specvm's stdin");
    let r = vm.finish(TIMEOUT.saturating_sub(start.elapsed()));
    eprintln!(
        "spec_cycles: RSS grew {} kB over 900 cycles; fds {fds1} -> {fds2}",
        rss2 as i64 - rss1 as i64
    );
    for l in r.stdout.lines().filter(|l| l.contains("cycles,")) {
        eprintln!("{l}");
    }
    r.assert_status(0);
    assert_line(&r, "spec_cycles: 1000 rollbacks");
    assert_line(&r, "spec_cycles: ok");
    assert_eq!(
        fds1, fds2,
        "the VMM's open fds changed across 900 rollbacks"
    );
    assert!(
        rss2 < rss1 + LEAK_LIMIT_KIB,
        "the VMM's RSS grew from {rss1} kB to {rss2} kB across 900 rollbacks"
    );
}

/// The levels `spec_hog` reached and the refusal that stopped it.
fn hog(extra: &[&str]) -> (u64, String) {
    let mut args = vec!["--memory", "64M", "--serial", "stdout", "--guest-arg", "4"];
    args.extend_from_slice(extra);
    let r = run_bare("spec_hog", &args);
    assert!(!r.timed_out && r.status == 0, "{r}");
    assert_line(&r, "spec_hog: committed every level");
    let line = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("spec_hog: "))
        .filter(|l| l.contains(" levels, then "))
        .unwrap_or_else(|| panic!("no summary line: {r}"));
    let (n, why) = line.split_once(" levels, then ").expect("summary");
    (n.parse().expect("a level count"), why.to_owned())
}

/// Issue 12's nested-speculation memory hog: 4 MiB rewritten before each
/// nested `speculate()` in a 64 MiB VM. Each checkpoint's flush keeps the
/// previous level's copy, so after k levels the checkpoints hold
/// 4 MiB × (k - 1). The budget refuses the next level once they hold it:
/// with 16 MiB, the 6th; with the default (the guest's 64 MiB), the 18th.
/// Without a budget the guest reaches the stack's limit, holding 252 MiB
/// for a 64 MiB guest.
#[test]
fn a_nested_memory_hog_is_refused_at_the_budget() {
    skip_without_kvm!();
    assert_eq!(
        hog(&["--checkpoint-budget", "16M"]),
        (5, "NO_BUDGET".into())
    );
    assert_eq!(hog(&[]), (17, "NO_BUDGET".into()));
    assert_eq!(
        hog(&["--checkpoint-budget", "unlimited"]),
        (64, "TOO_DEEP".into())
    );
}
