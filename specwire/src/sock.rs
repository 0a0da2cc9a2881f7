//! Listening Unix sockets that replace nothing but a stale socket, appear
//! only once they accept, are private by default, and are removed at exit
//! only while they are still the ones we made.
//!
//! Shared by `netbridge --listen`/`--events` and by specvm's `--api-sock`
//! and `--serial socket=`; [`accept`], for tokio listeners, needs the
//! `tokio` feature.
//!
//! [`listen`] does, in order:
//! 1. looks at what is at the path ([`check`]): nothing, or a *stale*
//!    socket (a socket file whose connect is refused: its listener is gone)
//!    may be replaced; a live socket (connect succeeds, or its queue is
//!    full) is "in use"; a regular file, a directory, a symbolic link or
//!    anything else is refused, and left alone;
//! 2. binds and listens in a fresh private directory (mode 0700) beside the
//!    path, so nobody can connect before the mode is set, whatever the
//!    umask; sets the mode (0600, or 0660 with a group) and the group;
//! 3. links the listening socket to the path with `link(2)`, which never
//!    replaces an existing name: a socket that another process put there
//!    since step 1 makes it fail, and the path is looked at again. So the
//!    socket appears already accepting (a client that sees the file can
//!    connect), and a racing VMM's live socket is never replaced;
//! 4. records the file's device and inode in a [`SocketFile`], which
//!    removes the path on drop only if it still names that file.

use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The mode of a socket without a group: only its owner may connect.
pub const PRIVATE_MODE: u32 = 0o600;
/// The mode of a socket with a group: its owner and that group.
pub const GROUP_MODE: u32 = 0o660;
/// The longest path a Unix socket address holds, in bytes.
pub const MAX_PATH: usize = 107;
/// How many times [`listen`] looks again when another process put a socket
/// at the path between its look and its link.
const ATTEMPTS: usize = 5;

/// Who may connect to a socket.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Access {
    /// The group that may connect too, besides the owner.
    pub group: Option<u32>,
}

impl Access {
    /// The socket file's mode.
    pub fn mode(&self) -> u32 {
        match self.group {
            Some(_) => GROUP_MODE,
            None => PRIVATE_MODE,
        }
    }
}

/// Errors making a listening socket.
#[derive(Debug, thiserror::Error)]
pub enum SockError {
    /// A live socket is at the path.
    #[error("{0} is in use: a running program accepts connections on it")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("{0} exists and is {1}, not a socket; refusing to replace it")]
    NotASocket(PathBuf, &'static str),
    /// A socket is at the path, and connecting to it failed in a way that
    /// does not say it is stale.
    #[error("{0} is a socket that cannot be checked ({1}); refusing to replace it")]
    Unchecked(PathBuf, io::Error),
    /// The path cannot name a Unix socket.
    #[error("socket path {0}: {1}")]
    BadPath(PathBuf, String),
    /// A step failed.
    #[error("{0} {1}: {2}")]
    Io(&'static str, PathBuf, io::Error),
}

/// What [`check`] found at a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Existing {
    /// Nothing.
    Absent,
    /// A socket nobody listens on (connect was refused): its device and
    /// inode.
    Stale {
        /// The file's device.
        dev: u64,
        /// The file's inode.
        ino: u64,
    },
}

/// Looks at `path`: nothing, a stale socket (which may be replaced), or an
/// error saying why it must not be replaced.
pub fn check(path: &Path) -> Result<Existing, SockError> {
    let md = match fs::symlink_metadata(path) {
        Ok(md) => md,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Existing::Absent),
        Err(e) => return Err(SockError::Io("looking at", path.into(), e)),
    };
    let ft = md.file_type();
    if !ft.is_socket() {
        let kind = if ft.is_file() {
            "a regular file"
        } else if ft.is_dir() {
            "a directory"
        } else if ft.is_symlink() {
            "a symbolic link"
        } else if ft.is_fifo() {
            "a FIFO"
        } else if ft.is_char_device() || ft.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(SockError::NotASocket(path.into(), kind));
    }
    match try_connect(path) {
        Ok(_) => Err(SockError::InUse(path.into())),
        // A full listen queue: someone listens, and is busy.
        Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => Err(SockError::InUse(path.into())),
        Err(e) if e.raw_os_error() == Some(libc::ECONNREFUSED) => Ok(Existing::Stale {
            dev: md.dev(),
            ino: md.ino(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Existing::Absent),
        Err(e) => Err(SockError::Unchecked(path.into(), e)),
    }
}

/// A socket file this process made. Dropping it removes the file, if the
/// path still names the very file made (same device and inode): a file
/// that someone put there since is left alone.
///
/// It holds a duplicate of the listener's descriptor. A bound socket keeps
/// its file's inode alive, so while the guard lives the inode number cannot
/// be reused by a file made after ours was removed, and the comparison is
/// exact.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
    _hold: UnixListener,
}

impl SocketFile {
    /// The path (absolute).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the path still names the file made.
    pub fn is_ours(&self) -> bool {
        is_file(&self.path, self.dev, self.ino)
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if self.is_ours() {
            let _ = fs::remove_file(&self.path);
        }
        let mut owned = owned();
        owned.retain(|(_, d, i)| (*d, *i) != (self.dev, self.ino));
    }
}

fn is_file(path: &Path, dev: u64, ino: u64) -> bool {
    fs::symlink_metadata(path)
        .is_ok_and(|m| m.file_type().is_socket() && (m.dev(), m.ino()) == (dev, ino))
}

/// Every socket file alive in this process, for [`remove_owned`].
static OWNED: Mutex<Vec<(PathBuf, u64, u64)>> = Mutex::new(Vec::new());

fn owned() -> std::sync::MutexGuard<'static, Vec<(PathBuf, u64, u64)>> {
    OWNED.lock().unwrap_or_else(|e| e.into_inner())
}

/// Removes every socket file of this process that is still its own. For
/// exits that skip destructors (`std::process::exit`).
pub fn remove_owned() {
    for (path, dev, ino) in owned().drain(..) {
        if is_file(&path, dev, ino) {
            let _ = fs::remove_file(&path);
        }
    }
}

/// Makes a listening socket at `path` (see the module doc): the listener,
/// blocking, and the file's guard.
pub fn listen(path: &Path, access: &Access) -> Result<(UnixListener, SocketFile), SockError> {
    let len = path.as_os_str().len();
    if len == 0 || len > MAX_PATH {
        return Err(SockError::BadPath(
            path.into(),
            format!("{len} bytes; a Unix socket path has 1 to {MAX_PATH}"),
        ));
    }
    let abs = std::path::absolute(path).map_err(|e| SockError::Io("resolving", path.into(), e))?;
    check(path)?;
    let staged = Staged::new(path, access)?;
    let (dev, ino) = (staged.dev, staged.ino);
    let hold = staged
        .listener
        .as_ref()
        .map(UnixListener::try_clone)
        .expect("a staged socket has its listener")
        .map_err(|e| SockError::Io("holding", path.into(), e))?;
    for _ in 0..ATTEMPTS {
        if let Existing::Stale {
            dev: old_dev,
            ino: old_ino,
        } = check(path)?
        {
            // Only the very stale file looked at: if another process put
            // its socket there since, it is looked at again.
            if is_file(path, old_dev, old_ino) {
                if let Err(e) = fs::remove_file(path) {
                    if e.kind() != io::ErrorKind::NotFound {
                        return Err(SockError::Io("removing the stale socket", path.into(), e));
                    }
                }
            }
        }
        match fs::hard_link(&staged.sock, path) {
            Ok(()) => {
                owned().push((abs.clone(), dev, ino));
                let file = SocketFile {
                    path: abs,
                    dev,
                    ino,
                    _hold: hold,
                };
                return Ok((staged.take(), file));
            }
            // Someone put a file there since the look: look again.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(SockError::Io("linking the socket to", path.into(), e)),
        }
    }
    Err(SockError::InUse(path.into()))
}

/// A socket bound and listening in a private directory beside its final
/// path. Dropping it removes the directory and its name there.
struct Staged {
    dir: PathBuf,
    sock: PathBuf,
    listener: Option<UnixListener>,
    dev: u64,
    ino: u64,
}

impl Staged {
    fn new(path: &Path, access: &Access) -> Result<Self, SockError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let name = path
            .file_name()
            .ok_or_else(|| SockError::BadPath(path.into(), "no file name".into()))?;
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let mut dir_name = std::ffi::OsString::from(".");
        dir_name.push(name);
        dir_name.push(format!(".{}.{n}.tmp", std::process::id()));
        let dir = parent.join(dir_name);
        // 0700: nobody else may even reach the socket until it has its mode.
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(|e| SockError::Io("creating", dir.clone(), e))?;
        let mut staged = Self {
            sock: dir.join("s"),
            dir,
            listener: None,
            dev: 0,
            ino: 0,
        };
        staged.bind(access)?;
        Ok(staged)
    }

    fn bind(&mut self, access: &Access) -> Result<(), SockError> {
        let sock = self.sock.clone();
        let listener = if sock.as_os_str().len() <= MAX_PATH {
            UnixListener::bind(&sock)
        } else {
            // The final path fits, the staging one does not: bind through
            // the directory's descriptor, a short name for the same place.
            let dir = fs::File::open(&self.dir)
                .map_err(|e| SockError::Io("opening", self.dir.clone(), e))?;
            UnixListener::bind(format!("/proc/self/fd/{}/s", dir.as_raw_fd()))
        }
        .map_err(|e| SockError::Io("binding", sock.clone(), e))?;
        self.listener = Some(listener);
        if let Some(gid) = access.group {
            std::os::unix::fs::chown(&sock, None, Some(gid))
                .map_err(|e| SockError::Io("setting the group of", sock.clone(), e))?;
        }
        fs::set_permissions(&sock, fs::Permissions::from_mode(access.mode()))
            .map_err(|e| SockError::Io("setting the mode of", sock.clone(), e))?;
        let md = fs::symlink_metadata(&sock)
            .map_err(|e| SockError::Io("looking at", sock.clone(), e))?;
        (self.dev, self.ino) = (md.dev(), md.ino());
        Ok(())
    }

    fn take(mut self) -> UnixListener {
        self.listener
            .take()
            .expect("a staged socket has its listener")
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.sock);
        let _ = fs::remove_dir(&self.dir);
    }
}

/// The group id of `group`: a number, or a name in the group database.
pub fn group_id(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let name =
        std::ffi::CString::new(group).map_err(|_| format!("group {group:?}: contains NUL"))?;
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `group` is a plain C struct; all-zero is a valid value.
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: every pointer is valid for the call: the name is
    // NUL-terminated, `buf` has the length passed, `grp` and `found` are
    // ours to write.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    match (r, found.is_null()) {
        (0, false) => Ok(grp.gr_gid),
        (0, true) => Err(format!("no group named {group:?}")),
        (e, _) => Err(format!(
            "looking up group {group:?}: {}",
            io::Error::from_raw_os_error(e)
        )),
    }
}

/// Connects to the Unix socket `path` without blocking: a listener whose
/// queue is full gives `EAGAIN` instead of a wait. The stream is
/// non-blocking.
fn try_connect(path: &Path) -> io::Result<UnixStream> {
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: `sockaddr_un` is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.is_empty() || bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} cannot be a Unix socket address", path.display()),
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1;
    // SAFETY: socket() takes no pointers; its result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid `sockaddr_un` of at least `len` bytes,
    // alive for the call.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            len as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(fd))
}

/// Connects to the Unix socket `path`, waiting at most `timeout` (forever
/// with `None`) while its listen queue is full. The stream is blocking.
pub fn connect(path: &Path, timeout: Option<Duration>) -> io::Result<UnixStream> {
    let deadline = timeout.map(|t| Instant::now() + t);
    loop {
        match try_connect(path) {
            Ok(s) => {
                s.set_nonblocking(false)?;
                return Ok(s);
            }
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "its listen queue stayed full",
                    ));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(feature = "tokio")]
/// The first wait after a failed accept; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(10);
#[cfg(feature = "tokio")]
/// The longest wait between accepts that fail.
const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Accepts the next connection on `listener`. Accept errors never end it:
/// out of descriptors (`EMFILE`, `ENFILE`) or memory, it waits and tries
/// again, the waits doubling up to a second, so it neither gives up nor
/// spins on a listener that stays ready.
#[cfg(feature = "tokio")]
pub async fn accept(listener: &tokio::net::UnixListener) -> tokio::net::UnixStream {
    let mut delay = MIN_BACKOFF;
    loop {
        match listener.accept().await {
            Ok((s, _)) => return s,
            // The client left before it was accepted: nothing to wait for.
            Err(e) if matches!(e.raw_os_error(), Some(libc::ECONNABORTED | libc::EINTR)) => {}
            Err(e) => {
                // One warning per spell of failures, not one per retry.
                match delay == MIN_BACKOFF {
                    true => tracing::warn!(
                        "accepting a connection: {e}; trying again, waiting longer each time"
                    ),
                    false => {
                        tracing::debug!("accepting a connection: {e}; trying again in {delay:?}")
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private directory, removed on drop, also when the test fails.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> Self {
            let d = std::env::temp_dir().join(format!("nb-sock-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Self(d)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn entries(dir: &Path) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn makes_a_private_socket_and_removes_it_on_drop() {
        let d = TempDir::new("fresh");
        let p = d.0.join("s.sock");
        let (l, file) = listen(&p, &Access::default()).unwrap();
        let md = fs::symlink_metadata(&p).unwrap();
        assert!(md.file_type().is_socket());
        assert_eq!(md.mode() & 0o777, 0o600, "private whatever the umask");
        assert_eq!(entries(&d.0), ["s.sock"], "no staging left behind");
        UnixStream::connect(&p).unwrap();
        assert!(l.accept().is_ok());
        assert!(file.is_ours());
        drop(file);
        assert!(!p.exists());
    }

    #[test]
    fn refuses_files_directories_and_links_and_leaves_them() {
        let d = TempDir::new("refuse");
        let f = d.0.join("notes.txt");
        fs::write(&f, "keep me").unwrap();
        let e = listen(&f, &Access::default()).unwrap_err();
        assert!(
            matches!(e, SockError::NotASocket(_, "a regular file")),
            "{e}"
        );
        assert!(e.to_string().contains("notes.txt"), "{e}");
        assert_eq!(fs::read_to_string(&f).unwrap(), "keep me");
        let sub = d.0.join("dir");
        fs::create_dir(&sub).unwrap();
        let e = listen(&sub, &Access::default()).unwrap_err();
        assert!(matches!(e, SockError::NotASocket(_, "a directory")), "{e}");
        // A link to a stale socket is refused too: the link is not ours.
        let stale = d.0.join("stale.sock");
        drop(UnixListener::bind(&stale).unwrap());
        let link = d.0.join("link.sock");
        std::os::unix::fs::symlink(&stale, &link).unwrap();
        let e = listen(&link, &Access::default()).unwrap_err();
        assert!(
            matches!(e, SockError::NotASocket(_, "a symbolic link")),
            "{e}"
        );
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(
            entries(&d.0),
            ["dir", "link.sock", "notes.txt", "stale.sock"]
        );
    }

    #[test]
    fn a_live_socket_is_in_use_and_a_stale_one_is_replaced() {
        let d = TempDir::new("live");
        let p = d.0.join("s.sock");
        let (_l, first) = listen(&p, &Access::default()).unwrap();
        let e = listen(&p, &Access::default()).unwrap_err();
        assert!(matches!(e, SockError::InUse(_)), "{e}");
        assert!(e.to_string().contains("in use"), "{e}");
        assert!(first.is_ours(), "the live socket is untouched");
        // A socket left by a process that died: connect is refused.
        let q = d.0.join("stale.sock");
        drop(UnixListener::bind(&q).unwrap());
        assert!(matches!(check(&q).unwrap(), Existing::Stale { .. }));
        let (_l2, second) = listen(&q, &Access::default()).unwrap();
        UnixStream::connect(&q).unwrap();
        assert!(second.is_ours());
    }

    #[test]
    fn drop_leaves_a_file_that_replaced_ours() {
        let d = TempDir::new("replaced");
        let p = d.0.join("s.sock");
        let (l, file) = listen(&p, &Access::default()).unwrap();
        drop(l);
        fs::remove_file(&p).unwrap();
        let (_l, other) = listen(&p, &Access::default()).unwrap();
        assert!(!file.is_ours());
        drop(file);
        assert!(other.is_ours(), "the other socket is still there");
        UnixStream::connect(&p).unwrap();
    }

    #[test]
    fn remove_owned_removes_only_files_still_ours() {
        let d = TempDir::new("owned");
        let p = d.0.join("s.sock");
        let (_l, file) = listen(&p, &Access::default()).unwrap();
        let q = d.0.join("t.sock");
        let (_m, other) = listen(&q, &Access::default()).unwrap();
        std::mem::forget(other);
        fs::remove_file(&q).unwrap();
        fs::write(&q, "someone else's").unwrap();
        // Only this test's entries: other tests run in parallel.
        owned().retain(|(path, _, _)| path.starts_with(&d.0));
        remove_owned();
        assert!(!p.exists());
        assert_eq!(fs::read_to_string(&q).unwrap(), "someone else's");
        drop(file);
    }

    /// A client that sees the file can connect: never `ECONNREFUSED`
    /// between bind and listen. (A plain `bind` here was refused about once
    /// in a hundred runs.)
    #[test]
    fn the_socket_accepts_as_soon_as_it_appears() {
        let d = TempDir::new("appear");
        for i in 0..300 {
            let p = d.0.join(format!("{i}.sock"));
            let q = p.clone();
            let watcher = std::thread::spawn(move || loop {
                if fs::symlink_metadata(&q).is_ok() {
                    return UnixStream::connect(&q).map(drop);
                }
                std::hint::spin_loop();
            });
            let (_l, _f) = listen(&p, &Access::default()).unwrap();
            watcher.join().unwrap().unwrap();
        }
    }

    #[test]
    fn a_group_makes_the_socket_group_writable() {
        let d = TempDir::new("group");
        let p = d.0.join("s.sock");
        // SAFETY: getegid takes no arguments and cannot fail.
        let gid = unsafe { libc::getegid() };
        let (_l, _f) = listen(&p, &Access { group: Some(gid) }).unwrap();
        let md = fs::symlink_metadata(&p).unwrap();
        assert_eq!((md.mode() & 0o777, md.gid()), (0o660, gid));
    }

    #[test]
    fn long_paths_bind_through_the_directory() {
        let d = TempDir::new("long");
        // The final path fits; the staging path beside it does not.
        let room = MAX_PATH - d.0.as_os_str().len() - 1;
        let p = d.0.join("x".repeat(room));
        assert_eq!(p.as_os_str().len(), MAX_PATH);
        let (_l, _f) = listen(&p, &Access::default()).unwrap();
        UnixStream::connect(&p).unwrap();
        let e = listen(&d.0.join("y".repeat(room + 1)), &Access::default()).unwrap_err();
        assert!(matches!(e, SockError::BadPath(..)), "{e}");
    }

    #[test]
    fn groups_by_name_or_number() {
        assert_eq!(group_id("0"), Ok(0));
        assert_eq!(group_id("root"), Ok(0));
        assert!(group_id("no-such-group-here")
            .unwrap_err()
            .contains("no group"));
    }

    #[cfg(feature = "tokio")]
    #[tokio::test]
    async fn accept_returns_the_next_connection() {
        let d = TempDir::new("accept");
        let p = d.0.join("s.sock");
        let (l, _f) = listen(&p, &Access::default()).unwrap();
        l.set_nonblocking(true).unwrap();
        let l = tokio::net::UnixListener::from_std(l).unwrap();
        let _c = UnixStream::connect(&p).unwrap();
        let s = tokio::time::timeout(Duration::from_secs(5), accept(&l)).await;
        assert!(s.is_ok());
    }
}
