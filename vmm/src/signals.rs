//! SIGINT and SIGTERM end `specvm run` cleanly: the vCPU threads are
//! stopped and the sockets removed, instead of the process dying where it
//! stands.
//!
//! [`install`] blocks the signals in every thread (the mask is inherited,
//! so it must run before any thread starts) and starts one thread that
//! waits for them with `sigwait`:
//! - until the VM runs, a signal ends the process at once, after removing
//!   the socket files it made ([`specwire::sock::remove_owned`]): nothing
//!   runs that needs stopping, and the start may be waiting (on a bridge's
//!   answer, a snapshot's files, the boot cache);
//! - once [`spawn_waiter`] has handed over the controller's channel, the
//!   first signal asks the controller to stop the VM
//!   ([`VmEvent::Terminate`]); a second one, or one after the controller
//!   has gone, ends the process at once, in case stopping hangs.
//!
//! `specvm ctl` installs nothing: the signals' default action ends it.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Mutex;

use crate::event::{EventSender, VmEvent};
use crate::sync::lock;

/// The controller's channel, once the VM runs.
static CONTROLLER: Mutex<Option<EventSender>> = Mutex::new(None);
/// Whether the waiting thread runs.
static WAITING: AtomicBool = AtomicBool::new(false);
/// Signals received so far.
static RECEIVED: AtomicU32 = AtomicU32::new(0);

fn termination_set() -> libc::sigset_t {
    // SAFETY: sigemptyset and sigaddset only write the set we own.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        set
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread and every thread it
/// starts afterwards.
pub fn block_termination() -> io::Result<()> {
    let set = termination_set();
    // SAFETY: `set` is a valid signal set; the old mask is not needed.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Blocks SIGINT and SIGTERM ([`block_termination`]) and starts the thread
/// that handles them (see the module doc). Call it first thing, before
/// any other thread starts.
pub fn install() -> io::Result<()> {
    block_termination()?;
    start_waiting()
}

/// Hands the signals to the controller: from now on the first SIGINT or
/// SIGTERM becomes a [`VmEvent::Terminate`]. Starts the waiting thread if
/// [`install`] did not.
pub fn spawn_waiter(events: EventSender) -> io::Result<()> {
    *controller() = Some(events);
    start_waiting()
}

fn controller() -> std::sync::MutexGuard<'static, Option<EventSender>> {
    lock(&CONTROLLER)
}

fn start_waiting() -> io::Result<()> {
    if WAITING.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    let spawned = std::thread::Builder::new()
        .name("signals".into())
        .spawn(|| {
            let set = termination_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            while unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                on_signal(sig);
            }
        });
    if let Err(e) = spawned {
        WAITING.store(false, Ordering::SeqCst);
        return Err(e);
    }
    Ok(())
}

fn on_signal(sig: libc::c_int) {
    let first = RECEIVED.fetch_add(1, Ordering::SeqCst) == 0;
    let told = first
        && controller()
            .as_ref()
            .is_some_and(|tx| tx.send(VmEvent::Terminate(sig)).is_ok());
    if !told {
        exit_now(sig);
    }
}

/// Ends the process for signal `sig` as `main` would: its one line, the
/// socket files it made removed, status 128 + `sig`.
fn exit_now(sig: libc::c_int) -> ! {
    eprintln!("specvm: stopped by signal {sig}");
    specwire::sock::remove_owned();
    std::process::exit(128 + sig)
}
