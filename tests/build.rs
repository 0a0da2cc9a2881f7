//! Builds the bare test guests and puts them where the tests find them.
//!
//! The guests are a separate cargo workspace (`../guests`) with their own
//! profile and link flags, so this runs a nested `cargo build --release` on
//! it, in its own target directory `<target>/bare-guests/build` (the outer
//! cargo holds the lock on `<target>`'s own profile folders, not on that
//! one). Every program then lands at `<target>/bare-guests/<name>`, and the
//! test harness learns that folder from `BARE_GUESTS_DIR`.
//!
//! `<target>` is `CARGO_TARGET_DIR` when set (relative to the workspace root
//! if relative), else `<workspace root>/target`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Variables the outer cargo (or the user) sets that would change or break
/// the nested build: flags meant for this workspace, a jobserver whose file
/// descriptors the child does not get, wrappers, and settings of the outer
/// invocation.
const REMOVED_VARS: &[&str] = &[
    "RUSTFLAGS",
    "CARGO_ENCODED_RUSTFLAGS",
    "RUSTDOCFLAGS",
    "CARGO_ENCODED_RUSTDOCFLAGS",
    "CARGO_TARGET_DIR",
    "CARGO_BUILD_TARGET",
    "CARGO_MAKEFLAGS",
    "MAKEFLAGS",
    "MFLAGS",
    "CARGO_PRIMARY_PACKAGE",
    "RUSTC_WRAPPER",
    "RUSTC_WORKSPACE_WRAPPER",
    "OUT_DIR",
    "TARGET",
    "HOST",
    "PROFILE",
    "OPT_LEVEL",
    "DEBUG",
    "NUM_JOBS",
];

/// Prefixes of further variables removed for the same reason: the outer
/// package's metadata and cfg, and cargo config given through the
/// environment (`CARGO_BUILD_RUSTFLAGS`, `CARGO_PROFILE_RELEASE_PANIC`,
/// `CARGO_TARGET_<triple>_RUSTFLAGS` and the like would override the
/// guests' own config and profile).
const REMOVED_PREFIXES: &[&str] = &[
    "CARGO_CFG_",
    "CARGO_FEATURE_",
    "CARGO_PKG_",
    "CARGO_MANIFEST_",
    "CARGO_BUILD_",
    "CARGO_PROFILE_",
    "CARGO_TARGET_",
    "DEP_",
    "__CARGO",
];

/// Marks the build with `cfg(no_kvm)` when `/dev/kvm` cannot be opened
/// read-write here, so tests that need KVM are compiled as `#[ignore]`d
/// with the reason: the test runner then counts them as skipped, never as
/// passed.
fn detect_kvm() {
    println!("cargo:rustc-check-cfg=cfg(no_kvm)");
    println!("cargo:rerun-if-changed=/dev/kvm");
    let usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !usable {
        println!(
            "cargo:warning=/dev/kvm is not usable here: tests that need KVM are marked ignored"
        );
        println!("cargo:rustc-cfg=no_kvm");
    }
}

/// Marks the build with `cfg(no_linux_image)` when the Linux guest image
/// (`images/build.sh`) is not built, or when `SPECVM_SKIP_LINUX` is set:
/// the Linux boot test (about 20 minutes on a `kvm_pvm` host) is then
/// compiled as `#[ignore]`d with the reason, and counted as skipped.
fn detect_linux_image(root: &Path) {
    println!("cargo:rustc-check-cfg=cfg(no_linux_image)");
    println!("cargo:rerun-if-env-changed=SPECVM_SKIP_LINUX");
    let out = root.join("images/out");
    for f in ["vmlinux", "initramfs.cpio"] {
        println!("cargo:rerun-if-changed={}", out.join(f).display());
    }
    let built = out.join("vmlinux").is_file() && out.join("initramfs.cpio").is_file();
    if !built || std::env::var_os("SPECVM_SKIP_LINUX").is_some() {
        println!("cargo:rustc-cfg=no_linux_image");
    }
}

fn main() {
    detect_kvm();
    let manifest_dir = PathBuf::from(env("CARGO_MANIFEST_DIR"));
    let root = manifest_dir
        .parent()
        .expect("tests/ lies inside the workspace root")
        .to_path_buf();
    detect_linux_image(&root);
    let guests = root.join("guests");
    for watched in [
        guests.join("src"),
        guests.join("Cargo.toml"),
        guests.join("link.ld"),
        guests.join("build.rs"),
        guests.join(".cargo/config.toml"),
        root.join("guest-agent/src"),
        root.join("guest-agent/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", watched.display());
    }
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");

    let target = match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) => root.join(dir),
        None => root.join("target"),
    };
    let out = target.join("bare-guests");
    let build_dir = out.join("build");

    build_guests(&guests, &build_dir);
    for name in guest_names(&guests.join("src/bin")) {
        install(&build_dir.join("release").join(&name), &out.join(&name));
    }
    println!("cargo:rustc-env=BARE_GUESTS_DIR={}", out.display());
    println!("cargo:rustc-env=SPECVM_TARGET_DIR={}", target.display());
    // The triple compiled for: the name of cargo's per-triple folder in a
    // `--target` build, which the harness needs to find the target root.
    println!(
        "cargo:rustc-env=SPECVM_BUILD_TRIPLE={}",
        env("TARGET").to_string_lossy()
    );
}

fn env(name: &str) -> OsString {
    std::env::var_os(name).unwrap_or_else(|| panic!("cargo sets {name} for build scripts"))
}

/// Runs the nested build, failing this build with its output if it fails.
fn build_guests(guests: &Path, build_dir: &Path) {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Cargo reads `.cargo/config.toml` from the working directory (not from
    // --manifest-path), and the guests' config supplies their rustflags.
    cmd.current_dir(guests)
        .arg("build")
        .arg("--release")
        .arg("--manifest-path")
        .arg(guests.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(build_dir);
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if REMOVED_VARS.contains(&key) || REMOVED_PREFIXES.iter().any(|p| key.starts_with(p)) {
            cmd.env_remove(key);
        }
    }
    let output = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo to build the bare guests: {e}"));
    if !output.status.success() {
        eprintln!("{}", String::from_utf8_lossy(&output.stdout));
        eprintln!("{}", String::from_utf8_lossy(&output.stderr));
        panic!(
            "building the bare guests in {} failed ({}); its output is above",
            guests.display(),
            output.status
        );
    }
}

/// The programs: one per `src/bin/<name>.rs`.
fn guest_names(bin_dir: &Path) -> Vec<String> {
    let entries = std::fs::read_dir(bin_dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", bin_dir.display()));
    let mut names: Vec<String> = entries
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            if path.extension()? != "rs" {
                return None;
            }
            Some(path.file_stem()?.to_str()?.to_owned())
        })
        .collect();
    names.sort();
    assert!(
        !names.is_empty(),
        "no guest programs in {}",
        bin_dir.display()
    );
    names
}

/// Copies `from` to `to` through a temporary file, so a reader never sees a
/// half-written program.
fn install(from: &Path, to: &Path) {
    let tmp = to.with_extension("tmp");
    std::fs::copy(from, &tmp)
        .unwrap_or_else(|e| panic!("cannot copy {} to {}: {e}", from.display(), tmp.display()));
    std::fs::rename(&tmp, to)
        .unwrap_or_else(|e| panic!("cannot rename {} to {}: {e}", tmp.display(), to.display()));
}
