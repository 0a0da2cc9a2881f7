//! The durable write of the page: a temporary file beside the target,
//! written and fsynced, renamed onto the target, then the directory
//! fsynced. Without `force` an existing target is never replaced, not even
//! by a race: the rename is `RENAME_NOREPLACE`. With `force` only a regular
//! file (or a link to one) is replaced; a directory, socket or device is
//! refused.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Why the page was not written.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The target exists and `--force` was not given.
    #[error("{0} exists: give --force to replace it")]
    Exists(PathBuf),
    /// The target is not a regular file: not replaced even with force.
    #[error("{0} exists and is not a regular file: not replaced")]
    NotAFile(PathBuf),
    /// What should be the target's folder is not one.
    #[error("{0} is not a folder")]
    NoFolder(PathBuf),
    /// The target has no file name (`/`, `..`).
    #[error("{0} names no file")]
    NoFileName(PathBuf),
    /// An I/O step failed.
    #[error("{what} {path}: {source}")]
    Io {
        /// The step.
        what: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> WriteError + 'a {
    move |source| WriteError::Io {
        what,
        path: path.to_path_buf(),
        source,
    }
}

/// Removes the temporary file unless the rename took it.
struct Temp(Option<PathBuf>);

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// The folder `path` is in.
fn folder(path: &Path) -> PathBuf {
    match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// Whether `path` may be written: it does not exist, or `force` is given
/// and it is a regular file. `main` asks before reading its inputs (a
/// live one may take minutes), and [`write_durably`] again (the rename
/// itself refuses to replace without `force`).
pub fn check_target(path: &Path, force: bool) -> Result<(), WriteError> {
    let dir = folder(path);
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(WriteError::NoFolder(dir)),
        Err(e) => return Err(io("the folder", &dir)(e)),
    }
    match std::fs::metadata(path) {
        Ok(_) if !force => Err(WriteError::Exists(path.to_path_buf())),
        Ok(m) if !m.is_file() => Err(WriteError::NotAFile(path.to_path_buf())),
        Ok(_) => Ok(()),
        // A dangling link: something is there, and it is not ours.
        Err(_) if std::fs::symlink_metadata(path).is_ok() => {
            Err(WriteError::NotAFile(path.to_path_buf()))
        }
        Err(_) => Ok(()),
    }
}

/// Writes `bytes` to `path` durably; see the module doc.
pub fn write_durably(path: &Path, bytes: &[u8], force: bool) -> Result<(), WriteError> {
    let name = path
        .file_name()
        .ok_or_else(|| WriteError::NoFileName(path.to_path_buf()))?;
    let dir = folder(path);
    check_target(path, force)?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = dir.join(tmp_name);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    let mut guard = Temp(Some(tmp.clone()));
    file.write_all(bytes).map_err(io("writing", &tmp))?;
    file.sync_all().map_err(io("syncing", &tmp))?;
    drop(file);

    if force {
        std::fs::rename(&tmp, path).map_err(io("renaming onto", path))?;
    } else {
        rename_noreplace(&tmp, path)?;
    }
    guard.0 = None;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(io("syncing the directory", &dir))
}

/// `renameat2(RENAME_NOREPLACE)`: fails if `to` exists. On a file system
/// without it (EINVAL), a hard link does the same (it fails if `to`
/// exists), then the temporary name goes.
fn rename_noreplace(from: &Path, to: &Path) -> Result<(), WriteError> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes()).map_err(|_| WriteError::NoFileName(p.to_path_buf()))
    };
    let (cf, ct) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated paths that outlive the call; the
    // call reads them only.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            cf.as_ptr(),
            libc::AT_FDCWD,
            ct.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EEXIST) => Err(WriteError::Exists(to.to_path_buf())),
        Some(libc::EINVAL | libc::ENOSYS) => match std::fs::hard_link(from, to) {
            Ok(()) => std::fs::remove_file(from).map_err(io("removing", from)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(WriteError::Exists(to.to_path_buf()))
            }
            Err(e) => Err(io("linking", to)(e)),
        },
        _ => Err(io("renaming onto", to)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("specgraph-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a temp dir");
        d
    }

    fn entries(d: &Path) -> Vec<String> {
        let mut v: Vec<_> = std::fs::read_dir(d)
            .expect("listing")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn writes_refuses_and_replaces_with_force() {
        let d = tmpdir("write");
        let out = d.join("g.html");
        write_durably(&out, b"one", false).expect("first write");
        assert_eq!(std::fs::read(&out).expect("read"), b"one");
        let e = write_durably(&out, b"two", false).expect_err("exists");
        assert!(matches!(e, WriteError::Exists(_)), "{e}");
        assert!(e.to_string().contains("--force"));
        assert_eq!(std::fs::read(&out).expect("read"), b"one");
        write_durably(&out, b"two", true).expect("forced");
        assert_eq!(std::fs::read(&out).expect("read"), b"two");
        // No temporary file is left behind.
        assert_eq!(entries(&d), ["g.html"]);

        let sub = d.join("sub");
        std::fs::create_dir(&sub).expect("mkdir");
        let e = write_durably(&sub, b"x", true).expect_err("a directory");
        assert!(matches!(e, WriteError::NotAFile(_)), "{e}");
        let e = write_durably(&d.join("missing/g.html"), b"x", false).expect_err("no dir");
        assert!(e.to_string().starts_with("the folder"), "{e}");
        let e = write_durably(&d.join("g.html/x"), b"x", false).expect_err("a file");
        assert!(matches!(e, WriteError::NoFolder(_)), "{e}");
        assert_eq!(entries(&d), ["g.html", "sub"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rename_noreplace_keeps_what_is_there() {
        let d = tmpdir("link");
        let (a, b) = (d.join("a"), d.join("b"));
        std::fs::write(&a, b"new").expect("a");
        std::fs::write(&b, b"old").expect("b");
        let e = rename_noreplace(&a, &b).expect_err("b exists");
        assert!(matches!(e, WriteError::Exists(_)), "{e}");
        assert_eq!(std::fs::read(&b).expect("read"), b"old");
        let _ = std::fs::remove_dir_all(&d);
    }
}
