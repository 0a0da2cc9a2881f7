//! SIGINT and SIGTERM end the VM cleanly: the vCPU threads are stopped and
//! the sockets removed, instead of the process dying where it stands.
//!
//! The signals are blocked in every thread (the mask is inherited, so
//! [`block_termination`] must run before any thread starts), and one thread
//! waits for them with `sigwait` and tells the controller.

use std::io;

use crate::event::{EventSender, VmEvent};

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

/// Starts the thread that turns SIGINT and SIGTERM into a
/// [`VmEvent::Terminate`] for the controller.
pub fn spawn_waiter(events: EventSender) -> io::Result<()> {
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let set = termination_set();
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` and `sig` are valid for the call.
            while unsafe { libc::sigwait(&set, &mut sig) } == 0 {
                if events.send(VmEvent::Terminate(sig)).is_err() {
                    return;
                }
            }
        })?;
    Ok(())
}
