//! The guest image's package lock, `images/packages.lock`: `images/build.sh`
//! refuses a `.deb` whose SHA-256 is not the lock's, and a pinned version
//! that apt no longer offers, naming the package, and builds nothing.
//!
//! Each test runs the real script on an edited copy of the lock, with a
//! cache and an output folder of its own (`SPECVM_IMAGES_LOCK`,
//! `SPECVM_IMAGES_CACHE`, `SPECVM_IMAGES_OUT`), so `images/out` and
//! `images/cache` are never written. The small `.deb`s already in
//! `images/cache` (lz4, cpio, e2fsprogs and its libraries, busybox-static)
//! are copied into the test's cache when present; whatever is missing, apt
//! downloads. The edited package is busybox-static, which the script
//! fetches before the kernel, so the kernel is never downloaded. A stand-in guest agent keeps cargo out.
//!
//! Needs root (the script may run `apt-get update`) and a Debian amd64 host
//! with apt and dpkg; elsewhere the tests are recorded as skipped.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;

use specvm_tests::record_skip;

/// `apt-get update` in one test while the other runs `apt-get download`
/// would race over apt's lists: one script at a time.
static APT: Mutex<()> = Mutex::new(());

/// The edited package; fetched before the kernel.
const PACKAGE: &str = "busybox-static";
/// What the script's outputs are called; none may appear after a refusal.
const OUTPUTS: [&str; 9] = [
    "bzImage",
    "vmlinux",
    "initramfs.cpio",
    "config",
    "manifest.txt",
    "stamp",
    "disk.ext4",
    "disk.stamp",
    "tools",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lies inside the repository")
        .to_path_buf()
}

/// Why the script cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("needs root (images/build.sh may run apt-get update)".into());
    }
    for tool in ["apt-get", "apt-cache", "dpkg", "dpkg-deb", "timeout"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .is_ok_and(|o| o.status.success());
        if !found {
            return Some(format!("no {tool}: not a Debian host"));
        }
    }
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if arch != "amd64" {
        return Some(format!("host architecture is {arch:?}, not amd64"));
    }
    None
}

/// One line of the lock: ROLE PACKAGE VERSION SHA256.
struct Pin {
    version: String,
    sha256: String,
}

/// The lock's text and its pin of [`PACKAGE`].
fn real_lock() -> (String, Pin) {
    let path = repo().join("images/packages.lock");
    let text =
        fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let pin = text
        .lines()
        .map(|l| {
            l.split('#')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .collect::<Vec<_>>()
        })
        .find(|f| f.len() == 4 && f[1] == PACKAGE)
        .map(|f| Pin {
            version: f[2].to_string(),
            sha256: f[3].to_string(),
        })
        .unwrap_or_else(|| panic!("{} pins no {PACKAGE}", path.display()));
    (text, pin)
}

/// Replaces the one line of [`PACKAGE`] in the lock's text.
fn edit_pin(text: &str, version: &str, sha256: &str) -> String {
    let mut found = 0;
    let out: Vec<String> = text
        .lines()
        .map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() == 4 && f[1] == PACKAGE && !line.starts_with('#') {
                found += 1;
                format!("{} {} {} {}", f[0], f[1], version, sha256)
            } else {
                line.to_string()
            }
        })
        .collect();
    assert_eq!(found, 1, "expected one {PACKAGE} line in the lock");
    out.join("\n") + "\n"
}

/// A scratch folder with the test's lock, cache, out folder and agent;
/// removed on drop, also when the test fails.
struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    fn new(test: &str, lock: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("specvm-images-{test}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("cache")).expect("create the scratch cache");
        fs::write(dir.join("packages.lock"), lock).expect("write the test's lock");
        // Not run: the script only copies it into the (never finished) image.
        fs::write(dir.join("spec"), b"stand-in guest agent\n").expect("write the agent");
        let scratch = Scratch { dir };
        // The small packages from a normal build's cache, so that only what
        // the test is about goes through apt. The kernel is left out: the
        // script stops before it.
        let real_cache = repo().join("images/cache");
        if let Ok(entries) = fs::read_dir(&real_cache) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let small = [
                    "lz4_",
                    "cpio_",
                    "e2fsprogs_",
                    "libext2fs2_",
                    "libcom-err2_",
                    "libss2_",
                    "busybox-static_",
                ]
                .iter()
                .any(|p| name.starts_with(p));
                if small && name.ends_with(".deb") {
                    fs::copy(e.path(), scratch.cache().join(&name)).expect("copy a cached .deb");
                }
            }
        }
        scratch
    }

    fn cache(&self) -> PathBuf {
        self.dir.join("cache")
    }

    fn out(&self) -> PathBuf {
        self.dir.join("out")
    }

    /// Runs `images/build.sh` on this folder's lock, cache and out folder.
    fn build(&self) -> Output {
        let _apt = APT.lock().unwrap_or_else(|e| e.into_inner());
        Command::new("timeout")
            .arg("600")
            .arg("bash")
            .arg(repo().join("images/build.sh"))
            .env("SPECVM_IMAGES_LOCK", self.dir.join("packages.lock"))
            .env("SPECVM_IMAGES_CACHE", self.cache())
            .env("SPECVM_IMAGES_OUT", self.out())
            .env("SPECVM_GUEST_AGENT", self.dir.join("spec"))
            .env_remove("SPECVM_KERNEL_VERSION")
            .env_remove("SPECVM_GUEST_MODULES")
            .output()
            .expect("run images/build.sh")
    }

    /// Panics unless the out folder holds none of the script's outputs.
    fn assert_no_image(&self, log: &str) {
        for f in OUTPUTS {
            let path = self.out().join(f);
            assert!(
                !path.exists(),
                "{} exists after a refused build\n{log}",
                path.display()
            );
        }
    }

    /// The `.deb`s of [`PACKAGE`] in the cache.
    fn cached_debs(&self) -> Vec<String> {
        fs::read_dir(self.cache())
            .expect("read the scratch cache")
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&format!("{PACKAGE}_")))
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The script's output, for assertion messages; and its one error line.
fn describe(out: &Output) -> (String, String) {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let error = stderr
        .lines()
        .find(|l| l.starts_with("images: error: "))
        .unwrap_or("")
        .to_string();
    let log = format!(
        "images/build.sh exited with {}\n--- stdout\n{stdout}--- stderr\n{stderr}",
        out.status
    );
    (log, error)
}

#[test]
fn a_wrong_sha256_in_the_lock_is_refused() {
    const TEST: &str = "images::a_wrong_sha256_in_the_lock_is_refused";
    if let Some(reason) = unsupported() {
        return record_skip(TEST, &reason);
    }
    let (text, pin) = real_lock();
    // One hex digit off: the download (or a cached copy) is the real
    // package, whose SHA-256 is the lock's original one.
    let mut wrong = pin.sha256.clone();
    let last = wrong.pop().expect("a SHA-256");
    wrong.push(if last == '0' { '1' } else { '0' });
    let scratch = Scratch::new("wrong-sha", &edit_pin(&text, &pin.version, &wrong));

    let out = scratch.build();
    let (log, error) = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert_eq!(
        error,
        format!(
            "images: error: {PACKAGE} {}: wrong sha256, refused: expected {wrong} ({}), got {}",
            pin.version,
            scratch.dir.join("packages.lock").display(),
            pin.sha256
        ),
        "{log}"
    );
    scratch.assert_no_image(&log);
    // The refused file is not kept, and nothing was unpacked.
    assert_eq!(scratch.cached_debs(), Vec::<String>::new(), "{log}");
    assert!(!stdout_has(&out, "extracting"), "{log}");
}

#[test]
fn a_version_apt_no_longer_offers_says_to_update() {
    const TEST: &str = "images::a_version_apt_no_longer_offers_says_to_update";
    if let Some(reason) = unsupported() {
        return record_skip(TEST, &reason);
    }
    let (text, pin) = real_lock();
    let gone = format!("{}+specvm.gone1", pin.version);
    let scratch = Scratch::new("gone-version", &edit_pin(&text, &gone, &pin.sha256));

    let out = scratch.build();
    let (log, error) = describe(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        error.starts_with(&format!(
            "images: error: {PACKAGE} {gone} cannot be fetched: "
        )),
        "{log}"
    );
    assert!(error.contains("run images/build.sh --update"), "{log}");
    scratch.assert_no_image(&log);
    assert!(!stdout_has(&out, "extracting"), "{log}");
}

fn stdout_has(out: &Output, word: &str) -> bool {
    String::from_utf8_lossy(&out.stdout).contains(word)
}
