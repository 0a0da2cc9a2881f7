//! Locks that a panicking thread does not take down with it.
//!
//! A `std::sync::Mutex` is poisoned when a thread panics while it holds
//! the lock, and every later `lock()` returns an error. specvm takes the
//! guard anyway, everywhere: the state behind its locks (device models,
//! queues of frames and outcomes, progress counters, copy jobs) keeps no
//! invariant that a panic can break halfway, and a panic on a vCPU or
//! device thread already ends the VMM through its own path. Turning a
//! poisoned lock into a second panic on another thread would only hide
//! the first one.
//!
//! These helpers say that once, instead of at each call site.

use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::Duration;

/// Locks `m`, poisoned or not.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard`, poisoned or not.
pub fn wait<'a, T>(cv: &Condvar, guard: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(guard).unwrap_or_else(|e| e.into_inner())
}

/// Waits on `cv` with `guard` for at most `timeout`, poisoned or not; the
/// caller looks at the state again to know whether it was woken.
pub fn wait_timeout<'a, T>(
    cv: &Condvar,
    guard: MutexGuard<'a, T>,
    timeout: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(guard, timeout)
        .unwrap_or_else(|e| e.into_inner())
        .0
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// A lock whose holder panicked still gives its guard, with the
    /// holder's last write.
    #[test]
    fn a_poisoned_lock_still_locks() {
        let m = Arc::new(Mutex::new(1));
        let m2 = Arc::clone(&m);
        let r = std::thread::spawn(move || {
            let mut g = m2.lock().unwrap();
            *g = 2;
            panic!("poison the lock");
        })
        .join();
        assert!(r.is_err());
        assert!(m.is_poisoned());
        assert_eq!(*lock(&m), 2);
    }

    /// A wait on a poisoned lock returns its guard too.
    #[test]
    fn waits_on_a_poisoned_lock_return() {
        let m = Arc::new(Mutex::new(0));
        let m2 = Arc::clone(&m);
        let _ = std::thread::spawn(move || {
            let _g = m2.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        let cv = Condvar::new();
        let g = wait_timeout(&cv, lock(&m), Duration::from_millis(1));
        assert_eq!(*g, 0);
    }
}
