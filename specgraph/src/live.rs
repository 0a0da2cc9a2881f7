//! Live inputs: a bridge's `--events` socket, stdin, a FIFO. Each is read
//! by a thread of its own until it ends or until the user stops the
//! reading (Ctrl-C or SIGTERM, see `main.rs`); the page is then drawn from
//! what came. A socket is read from the moment we connect: the bridge does
//! not replay what it announced before.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex};

/// The most bytes kept of one live input; past it the bytes are read
/// (so the bridge does not drop us as a slow reader) and counted, not
/// kept.
pub const KEEP_MAX: usize = 256 << 20;

/// Where a live input comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Live {
    /// A Unix stream socket to connect to.
    Socket(PathBuf),
    /// Standard input.
    Stdin,
    /// Anything else that is read until it ends (a FIFO, a device).
    Other(PathBuf),
}

/// What one live input gave.
#[derive(Debug, Default)]
pub struct Captured {
    /// The bytes kept.
    pub bytes: Vec<u8>,
    /// Bytes read past [`KEEP_MAX`], not kept.
    pub cut: u64,
    /// The read error that ended it, if one did.
    pub error: Option<String>,
}

/// Why reading stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Input `i` ended.
    Ended(usize),
    /// The user asked to stop.
    Stop,
}

/// Opens the live inputs (connects the sockets): every one must open
/// before anything is read.
pub fn open(inputs: &[Live]) -> Result<Vec<Box<dyn Read + Send>>, String> {
    inputs
        .iter()
        .map(|l| -> Result<Box<dyn Read + Send>, String> {
            match l {
                Live::Socket(p) => std::os::unix::net::UnixStream::connect(p)
                    .map(|s| Box::new(s) as Box<dyn Read + Send>)
                    .map_err(|e| format!("connecting to {}: {e}", p.display())),
                Live::Stdin => Ok(Box::new(std::io::stdin())),
                Live::Other(p) => std::fs::File::open(p)
                    .map(|f| Box::new(f) as Box<dyn Read + Send>)
                    .map_err(|e| format!("opening {}: {e}", p.display())),
            }
        })
        .collect()
}

/// Reads `readers` until each ends, or until a [`Wake::Stop`] comes on
/// `wake` (whose sender, `tx`, the caller may hand to a signal thread).
/// Returns what each gave so far.
pub fn read_all(
    readers: Vec<Box<dyn Read + Send>>,
    tx: &Sender<Wake>,
    wake: &Receiver<Wake>,
) -> Vec<Captured> {
    let shared: Vec<_> = readers
        .iter()
        .map(|_| Arc::new(Mutex::new(Captured::default())))
        .collect();
    let mut open = readers.len();
    for (i, mut r) in readers.into_iter().enumerate() {
        let store = Arc::clone(&shared[i]);
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match r.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let Ok(mut c) = store.lock() else { break };
                        let room = KEEP_MAX.saturating_sub(c.bytes.len()).min(n);
                        c.bytes.extend_from_slice(&buf[..room]);
                        c.cut += (n - room) as u64;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if let Ok(mut c) = store.lock() {
                            c.error = Some(e.to_string());
                        }
                        break;
                    }
                }
            }
            let _ = tx.send(Wake::Ended(i));
        });
    }
    while open > 0 {
        match wake.recv() {
            Ok(Wake::Ended(_)) => open -= 1,
            Ok(Wake::Stop) | Err(_) => break,
        }
    }
    // The threads still reading keep running until the process ends; what
    // they got so far is taken now.
    shared
        .iter()
        .map(|s| match s.lock() {
            Ok(mut c) => std::mem::take(&mut *c),
            Err(_) => Captured::default(),
        })
        .collect()
}

/// Whether `path` is read live (not a regular file), and how.
pub fn classify(path: &Path) -> Option<Live> {
    use std::os::unix::fs::FileTypeExt;
    if path.as_os_str() == "-" {
        return Some(Live::Stdin);
    }
    let t = std::fs::metadata(path).ok()?.file_type();
    if t.is_socket() {
        Some(Live::Socket(path.to_path_buf()))
    } else if t.is_fifo() || t.is_char_device() {
        Some(Live::Other(path.to_path_buf()))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixListener;

    #[test]
    fn sockets_are_read_until_they_close_or_the_stop() {
        let dir = std::env::temp_dir().join(format!("specgraph-live-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let (p1, p2) = (dir.join("one.sock"), dir.join("two.sock"));
        let (l1, l2) = (
            UnixListener::bind(&p1).expect("bind"),
            UnixListener::bind(&p2).expect("bind"),
        );
        assert_eq!(classify(&p1), Some(Live::Socket(p1.clone())));
        assert_eq!(classify(Path::new("-")), Some(Live::Stdin));
        assert_eq!(classify(&dir), None);
        let readers = open(&[Live::Socket(p1.clone()), Live::Socket(p2.clone())]).expect("open");
        let (mut s1, _) = l1.accept().expect("accept");
        let (mut s2, _) = l2.accept().expect("accept");
        s1.write_all(b"{\"event\":\"port-up\",\"port\":1}\n")
            .expect("write");
        drop(s1);
        s2.write_all(b"{\"event\":\"port-up\",\"port\":2}\n")
            .expect("write");
        // The second stays open: a stop ends the reading.
        let (tx, rx) = std::sync::mpsc::channel();
        let stopper = tx.clone();
        let t = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(200));
            let _ = stopper.send(Wake::Stop);
        });
        let got = read_all(readers, &tx, &rx);
        t.join().expect("stopper");
        assert_eq!(got[0].bytes, b"{\"event\":\"port-up\",\"port\":1}\n");
        assert_eq!(got[1].bytes, b"{\"event\":\"port-up\",\"port\":2}\n");
        assert_eq!((got[0].cut, got[1].cut), (0, 0));
        drop(s2);
        let missing = open(&[Live::Socket(dir.join("none.sock"))]).err();
        assert!(missing.is_some_and(|e| e.contains("connecting to")));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
