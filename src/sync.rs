//! The one way the crate takes a lock.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, whether or not a thread panicked while holding it: every change under the
/// crate's locks leaves the data consistent before anything can panic (a value is replaced
/// whole, or pushed), so a poisoned lock holds nothing half-written.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}
