//! The output side of the stdout and socket consoles: an [`Outbox`] that
//! the vCPU fills without waiting on the reader (see the parent module's
//! doc), and the writer threads that empty it.

use std::collections::VecDeque;
use std::io::{self, IsTerminal, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once, Weak};
use std::time::{Duration, Instant};

use crate::progress;

/// Console output held for a reader that is slow or absent (a socket with
/// no client yet). Past this, the oldest bytes are dropped and counted.
pub const OUT_BUFFER: usize = 1 << 20;
/// Most bytes the writer takes from the buffer at a time.
pub const CHUNK: usize = 64 << 10;
/// Most bytes in one write to the reader: a reader that takes this much
/// now and then is alive, however slow (see [`STDOUT_STALL`]).
const SLICE: usize = 4096;
/// How long stdout's reader may take nothing, with the buffer full, before
/// the vCPU stops waiting for it and drops bytes instead.
pub const STDOUT_STALL: Duration = Duration::from_secs(2);
/// A socket client that takes nothing for this long is disconnected.
pub const CLIENT_STALL: Duration = Duration::from_secs(30);
/// The longest the end of a run waits for a reader to take what is
/// buffered; it stops sooner when the reader takes nothing for
/// [`STDOUT_STALL`].
pub const DRAIN_LIMIT: Duration = Duration::from_secs(5);

/// Who reads an [`Outbox`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reader {
    /// The VMM's stdout: waited for while it takes bytes.
    Stdout,
    /// A Unix-socket client, one at a time: never waited for.
    Socket,
}

/// Console output on its way to a reader: the vCPU puts bytes in, a writer
/// thread takes them out (see the module doc).
pub struct Outbox {
    state: Mutex<OutState>,
    /// Signalled when bytes arrive or leave and when a client comes or goes.
    changed: Condvar,
    reader: Reader,
    /// [`STDOUT_STALL`], shorter in tests.
    stall: Duration,
}

#[derive(Default)]
struct OutState {
    buf: VecDeque<u8>,
    /// Bytes dropped since the reader was last told.
    gap: u64,
    /// Bytes dropped in all.
    dropped: u64,
    /// While the writer writes: when it started, or last got bytes through.
    busy_since: Option<Instant>,
    /// The socket client being written to, and its number.
    client: Option<(u64, Arc<UnixStream>)>,
    clients: u64,
    /// Stdout failed: everything is dropped from then on.
    lost: bool,
    /// The writer waits for bytes.
    idle: bool,
    /// The run is ending: the writer stops once the buffer is empty.
    closed: bool,
    /// The first drop has been logged.
    warned: bool,
    /// The count of dropped bytes has been logged.
    summarised: bool,
}

/// What the writer took to write: a marker for a gap, then bytes.
struct Chunk {
    data: Vec<u8>,
    /// Length of the marker at the start of `data`.
    marker: usize,
    /// The gap the marker tells of.
    gap: u64,
    client: Option<(u64, Arc<UnixStream>)>,
}

/// Every outbox alive, for the exit hook.
static OUTBOXES: Mutex<Vec<Weak<Outbox>>> = Mutex::new(Vec::new());

fn outboxes() -> MutexGuard<'static, Vec<Weak<Outbox>>> {
    crate::sync::lock(&OUTBOXES)
}

/// At process exit, also a `std::process::exit` that skips destructors,
/// buffered output still gets its chance and drops are still told.
extern "C" fn finish_at_exit() {
    let live: Vec<Arc<Outbox>> = outboxes().iter().filter_map(Weak::upgrade).collect();
    for o in live {
        o.finish();
    }
}

impl Outbox {
    /// An empty outbox for `reader`, whose vCPU side waits at most
    /// `stall` for a stdout reader that takes nothing.
    pub fn new(reader: Reader, stall: Duration) -> Arc<Self> {
        static HOOK: Once = Once::new();
        HOOK.call_once(|| {
            // SAFETY: registers a plain function that takes no arguments;
            // it only locks this module's mutexes and does not unwind.
            unsafe { libc::atexit(finish_at_exit) };
        });
        let o = Arc::new(Self {
            state: Mutex::default(),
            changed: Condvar::new(),
            reader,
            stall,
        });
        let mut all = outboxes();
        all.retain(|w| w.strong_count() > 0);
        all.push(Arc::downgrade(&o));
        o
    }

    fn lock(&self) -> MutexGuard<'_, OutState> {
        crate::sync::lock(&self.state)
    }

    fn has_reader(&self, s: &OutState) -> bool {
        match self.reader {
            Reader::Stdout => !s.lost,
            Reader::Socket => s.client.is_some(),
        }
    }

    /// Why bytes are dropped now, for the first drop's log line.
    fn why(&self, s: &OutState) -> &'static str {
        match (self.reader, s.client.is_some()) {
            (Reader::Stdout, _) => "stdout is not read",
            (Reader::Socket, true) => "the socket client does not read",
            (Reader::Socket, false) => "no client is connected to the socket",
        }
    }

    /// Whether the writer has been in one write, taking nothing, so long
    /// that its reader counts as gone.
    fn stalled(&self, s: &OutState) -> bool {
        s.busy_since.is_some_and(|t| t.elapsed() >= self.stall)
    }

    /// The vCPU's side: queues `bytes`, dropping the oldest past
    /// [`OUT_BUFFER`]. Waits for room only for stdout, and only while it
    /// takes bytes.
    pub fn push(&self, bytes: &[u8]) {
        let mut s = self.lock();
        if s.lost {
            s.dropped += bytes.len() as u64;
            return;
        }
        if self.reader == Reader::Stdout {
            while s.buf.len() + bytes.len() > OUT_BUFFER && !s.closed && !self.stalled(&s) {
                let waited = s.busy_since.map_or(Duration::ZERO, |t| t.elapsed());
                let wait = self
                    .stall
                    .saturating_sub(waited)
                    .max(Duration::from_millis(1));
                s = crate::sync::wait_timeout(&self.changed, s, wait);
            }
        }
        s.buf.extend(bytes);
        let excess = s.buf.len().saturating_sub(OUT_BUFFER);
        let first_drop = excess > 0 && !s.warned;
        if excess > 0 {
            s.buf.drain(..excess);
            s.gap += excess as u64;
            s.dropped += excess as u64;
            s.warned = true;
        }
        // The writer waits for bytes only with a reader to give them to.
        if s.idle && self.has_reader(&s) {
            self.changed.notify_all();
        }
        let why = self.why(&s);
        // Never log with the state locked: the log may wait on the
        // terminal, which the stdout writer may hold while it waits on us.
        drop(s);
        if first_drop {
            tracing::warn!(
                "serial: console output is dropped, oldest first, while {why} \
                 (the count is logged at exit)"
            );
        }
    }

    /// The writer's side: waits for bytes and a reader, and takes up to
    /// [`CHUNK`] of them, after a marker if some were dropped. None once
    /// the run ends with nothing left for a reader.
    fn take(&self) -> Option<Chunk> {
        let mut s = self.lock();
        loop {
            let pending = !s.buf.is_empty() || s.gap > 0;
            if pending && self.has_reader(&s) {
                break;
            }
            if s.closed || s.lost {
                return None;
            }
            s.idle = true;
            s = crate::sync::wait(&self.changed, s);
            s.idle = false;
        }
        let gap = std::mem::take(&mut s.gap);
        let mut data = Vec::new();
        if gap > 0 {
            data = format!("[specvm: {gap} bytes of console output were dropped]\n").into_bytes();
        }
        let marker = data.len();
        let n = s.buf.len().min(CHUNK);
        data.extend(s.buf.drain(..n));
        s.busy_since = Some(Instant::now());
        Some(Chunk {
            data,
            marker,
            gap,
            client: s.client.clone(),
        })
    }

    /// The writer got some bytes through.
    fn progress(&self) {
        self.lock().busy_since = Some(Instant::now());
        self.changed.notify_all();
    }

    /// The writer wrote its whole chunk.
    fn written(&self) {
        self.lock().busy_since = None;
        self.changed.notify_all();
    }

    /// Writing `c` to its reader failed after `sent` bytes. A socket
    /// client is disconnected, and what it did not get goes back to the
    /// buffer for the next one; stdout is lost for good.
    fn failed(&self, c: Chunk, sent: usize, e: &io::Error) {
        let mut s = self.lock();
        s.busy_since = None;
        let (gap, rest) = match sent < c.marker {
            true => (c.gap, &c.data[c.marker..]),
            false => (0, &c.data[sent..]),
        };
        let current = match (self.reader, &s.client, &c.client) {
            (Reader::Stdout, ..) => {
                s.lost = true;
                let left = (s.buf.len() + rest.len()) as u64;
                s.dropped += gap + left;
                s.buf.clear();
                true
            }
            (Reader::Socket, Some((now, _)), Some((was, _))) if now == was => true,
            (Reader::Socket, ..) => false,
        };
        if self.reader == Reader::Socket {
            s.gap += gap;
            for &b in rest.iter().rev() {
                s.buf.push_front(b);
            }
            let excess = s.buf.len().saturating_sub(OUT_BUFFER);
            s.buf.drain(..excess);
            s.gap += excess as u64;
            s.dropped += excess as u64;
            if current {
                if let Some((_, old)) = s.client.take() {
                    let _ = old.shutdown(Shutdown::Both);
                }
            }
        }
        self.changed.notify_all();
        drop(s);
        match self.reader {
            Reader::Stdout => tracing::warn!(
                "serial: writing the console to stdout: {e}; its output is dropped from now on"
            ),
            Reader::Socket if current && is_timeout(e) => tracing::warn!(
                "serial: the console client took nothing for {CLIENT_STALL:?}; disconnected"
            ),
            Reader::Socket => tracing::debug!("serial: the console client is gone: {e}"),
        }
    }

    /// A new socket client gets the output from now on (the buffer first).
    pub fn attach(&self, stream: UnixStream) -> io::Result<()> {
        stream.set_write_timeout(Some(CLIENT_STALL))?;
        let mut s = self.lock();
        s.clients += 1;
        let id = s.clients;
        if let Some((_, old)) = s.client.replace((id, Arc::new(stream))) {
            let _ = old.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        Ok(())
    }

    /// The run is ending: gives the reader up to [`DRAIN_LIMIT`] to take
    /// what is buffered (less if it takes nothing for the stall time), ends
    /// the writer, and logs how many bytes were dropped in all, once.
    pub fn finish(&self) {
        let mut s = self.lock();
        if s.summarised {
            return;
        }
        s.closed = true;
        self.changed.notify_all();
        let deadline = Instant::now() + DRAIN_LIMIT;
        while (!s.buf.is_empty() || s.gap > 0 || s.busy_since.is_some())
            && self.has_reader(&s)
            && !self.stalled(&s)
            && Instant::now() < deadline
        {
            s = crate::sync::wait_timeout(&self.changed, s, Duration::from_millis(20));
        }
        let left = s.buf.len() as u64;
        s.dropped += left;
        s.buf.clear();
        s.summarised = true;
        if let Some((_, c)) = s.client.take() {
            let _ = c.shutdown(Shutdown::Both);
        }
        self.changed.notify_all();
        let dropped = s.dropped;
        drop(s);
        let reader = match self.reader {
            Reader::Stdout => "stdout did not take them in time",
            Reader::Socket => "no socket client took them in time",
        };
        if dropped > 0 {
            tracing::warn!(
                "serial: {dropped} bytes of console output were dropped in all: {reader}"
            );
        }
    }

    /// Bytes dropped so far.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

fn is_timeout(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Writes to stdout, telling `outbox` whenever bytes get through.
struct Tracked<'a> {
    out: io::Stdout,
    outbox: &'a Outbox,
}

impl Write for Tracked<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        loop {
            match self.out.write(buf) {
                // A stdout that another program made non-blocking: wait
                // until it takes bytes (the stall clock runs meanwhile).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    let mut fd = libc::pollfd {
                        fd: libc::STDOUT_FILENO,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: `fd` is one valid pollfd, alive for the call.
                    unsafe { libc::poll(&mut fd, 1, 100) };
                }
                Err(e) => return Err(e),
                Ok(n) => {
                    self.outbox.progress();
                    return Ok(n);
                }
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()?;
        self.outbox.progress();
        Ok(())
    }
}

/// The stdout writer thread.
pub fn write_stdout(outbox: Arc<Outbox>) {
    // On a terminal the console shares the screen with the progress bar
    // and the log, through one lock (progress::write_console), whole
    // lines at a time. A pipe or a file has no bar: it is written directly,
    // so a pipe nobody reads never holds that lock, and the log goes on.
    let terminal = io::stdout().is_terminal();
    let mut out = Tracked {
        out: io::stdout(),
        outbox: &outbox,
    };
    while let Some(chunk) = outbox.take() {
        // Not locked across the write: write_console takes the screen's
        // lock first, and so does whatever else writes stdout under it.
        let r = chunk
            .data
            .chunks(SLICE)
            .try_for_each(|piece| match terminal {
                true => progress::write_console(&mut out, piece),
                false => out.write_all(piece).and_then(|()| out.flush()),
            });
        match r {
            Ok(()) => outbox.written(),
            Err(e) => {
                // How much got out is unknown here: all of it counts as
                // dropped.
                outbox.failed(chunk, 0, &e);
                return;
            }
        }
    }
}

/// The socket writer thread: writes to whichever client is connected.
pub fn write_clients(outbox: Arc<Outbox>) {
    while let Some(chunk) = outbox.take() {
        let Some((_, stream)) = chunk.client.clone() else {
            outbox.written();
            continue;
        };
        let mut sent = 0;
        let r = loop {
            if sent == chunk.data.len() {
                break Ok(());
            }
            let end = chunk.data.len().min(sent + SLICE);
            match (&*stream).write(&chunk.data[sent..end]) {
                Ok(0) => break Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    sent += n;
                    outbox.progress();
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(e),
            }
        };
        match r {
            Ok(()) => outbox.written(),
            Err(e) => outbox.failed(chunk, sent, &e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn stdout_is_waited_for_while_it_reads_and_not_once_it_stalls() {
        let stall = Duration::from_millis(200);
        let o = Outbox::new(Reader::Stdout, stall);
        // A reader that takes a chunk every 5 ms: slow, but alive. The
        // vCPU waits for it; nothing is lost.
        let writer = thread::spawn({
            let o = o.clone();
            move || {
                let mut got = 0;
                while let Some(c) = o.take() {
                    got += c.data.len();
                    thread::sleep(Duration::from_millis(5));
                    o.written();
                }
                got
            }
        });
        for _ in 0..3 * OUT_BUFFER / 4096 {
            o.push(&[b'x'; 4096]);
        }
        assert_eq!(o.dropped(), 0);
        o.finish();
        assert_eq!(writer.join().unwrap(), 3 * OUT_BUFFER);
        // A reader stuck in one write: the vCPU waits the stall time once,
        // then drops without waiting.
        let o = Outbox::new(Reader::Stdout, stall);
        o.push(&[b'x'; 10]);
        let stuck = o.take().unwrap();
        o.push(&vec![b'y'; OUT_BUFFER]);
        let t = Instant::now();
        o.push(b"z");
        assert!(t.elapsed() >= stall / 2, "{:?}", t.elapsed());
        assert_eq!(o.dropped(), 1);
        let t = Instant::now();
        o.push(b"z");
        assert!(t.elapsed() < stall / 2, "{:?}", t.elapsed());
        assert_eq!(o.dropped(), 2);
        drop(stuck);
    }
}
