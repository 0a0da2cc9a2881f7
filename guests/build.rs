//! Link settings of the bare guests: a fixed layout from `link.ld` and no C
//! runtime or library.

use std::path::PathBuf;

fn main() {
    let dir = PathBuf::from(
        std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"),
    );
    let script = dir.join("link.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!("cargo:rerun-if-changed=build.rs");

    // The code must be built for absolute addresses (see .cargo/config.toml);
    // with PIC code rustc would ask for a PIE, which nothing here relocates.
    let flags = std::env::var("CARGO_ENCODED_RUSTFLAGS").unwrap_or_default();
    if !flags
        .split('\x1f')
        .any(|f| f.ends_with("relocation-model=static"))
    {
        panic!(
            "bare guests need `-C relocation-model=static`, which guests/.cargo/config.toml \
             supplies: run cargo from inside {} (RUSTFLAGS, if set, replaces that config)",
            dir.display()
        );
    }

    for arg in [
        "-nostartfiles",
        "-nostdlib",
        "-static",
        "-Wl,--build-id=none",
    ] {
        println!("cargo:rustc-link-arg-bins={arg}");
    }
    println!("cargo:rustc-link-arg-bins=-T{}", script.display());
}
