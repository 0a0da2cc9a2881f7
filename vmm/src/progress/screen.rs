//! The terminal shared by the progress bar, the log and the serial
//! console: one lock ([`SCREEN`]) so lines stay whole while a bar shows.

use std::io::{self, Write};
use std::sync::Mutex;

use indicatif::ProgressBar;

use super::MAX_HELD;

use crate::sync::lock;

/// The terminal while a bar may show on it. There is one stderr and one
/// stdout per process, so there is one of these ([`SCREEN`]).
pub(super) struct Screen {
    pub(super) bar: Option<ProgressBar>,
    /// Whether console output shares the bar's terminal: then it is held
    /// back to whole lines, each written with the bar off the screen.
    hold_console: bool,
    held: Vec<u8>,
}

pub(super) static SCREEN: Mutex<Screen> = Mutex::new(Screen::new());

impl Screen {
    pub(super) const fn new() -> Self {
        Self {
            bar: None,
            hold_console: false,
            held: Vec::new(),
        }
    }

    /// Writes log output, with the bar off the screen meanwhile.
    pub(super) fn log(&self, out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
        match &self.bar {
            Some(bar) => bar.suspend(|| out.write_all(buf).and_then(|()| out.flush())),
            None => out.write_all(buf),
        }
    }

    /// Writes console output: straight through, or, while a bar shares the
    /// terminal, whole lines with the bar off the screen.
    pub(super) fn console(&mut self, out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
        let Some(bar) = self.bar.as_ref().filter(|_| self.hold_console) else {
            self.release(out)?;
            out.write_all(buf)?;
            return out.flush();
        };
        self.held.extend_from_slice(buf);
        let end = if buf.contains(&b'\n') {
            self.held.iter().rposition(|&b| b == b'\n').map(|i| i + 1)
        } else {
            None
        };
        let (end, broken) = match end {
            Some(e) => (e, false),
            None if self.held.len() >= MAX_HELD => (self.held.len(), true),
            None => return Ok(()),
        };
        let held = &self.held[..end];
        let r = bar.suspend(|| {
            out.write_all(held)?;
            if broken {
                out.write_all(b"\n")?;
            }
            out.flush()
        });
        self.held.drain(..end);
        r
    }

    fn release(&mut self, out: &mut dyn Write) -> io::Result<()> {
        if self.held.is_empty() {
            return Ok(());
        }
        let r = out.write_all(&self.held).and_then(|()| out.flush());
        self.held.clear();
        r
    }

    pub(super) fn show(&mut self, bar: ProgressBar, hold_console: bool) {
        self.bar = Some(bar);
        self.hold_console = hold_console;
    }

    /// Takes the bar off the screen for good, and writes what was held.
    pub(super) fn clear(&mut self, out: &mut dyn Write) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        let _ = self.release(out);
    }
}

/// The log's writer (for `tracing_subscriber`'s `with_writer`): stderr,
/// with the progress bar taken off the screen while a line is written.
pub fn log_writer() -> LogWriter {
    LogWriter
}

/// Stderr for the log; see [`log_writer`].
pub struct LogWriter;

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        lock(&SCREEN).log(&mut io::stderr().lock(), buf)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

/// Writes the guest's console output to `out` (the VMM's stdout), in whole
/// lines while a progress bar shares the terminal.
pub fn write_console(out: &mut dyn Write, buf: &[u8]) -> io::Result<()> {
    lock(&SCREEN).console(out, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_writer_fits_tracing_subscriber() {
        // What `main` would install; built, not made the global default.
        let _ = tracing_subscriber::fmt().with_writer(log_writer).finish();
        assert_eq!(LogWriter.write(b"").unwrap(), 0);
    }
}
