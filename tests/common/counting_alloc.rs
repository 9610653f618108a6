//! A global allocator that counts the live heap bytes and allocations of the current thread,
//! for measuring memory per tracked stream. Shared by `tests/memory.rs` and
//! `benches/memory_overhead.rs` (each declares it as its `#[global_allocator]`).
//!
//! Counts are kept per thread, so that other threads (other tests, runtime workers) do not
//! disturb a measurement made on one thread, and for the whole process ([`live_process`]), for
//! measurements across a multi-threaded runtime. They are the sizes asked for, not counting the allocator's
//! own per-block overhead (typically 8 to 16 bytes a block), which is why allocations are
//! counted too.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicIsize, Ordering};

static PROCESS_BYTES: AtomicIsize = AtomicIsize::new(0);

pub struct Counting;

thread_local! {
    static BYTES: Cell<isize> = const { Cell::new(0) };
    static BLOCKS: Cell<isize> = const { Cell::new(0) };
}

fn add(bytes: isize, blocks: isize) {
    PROCESS_BYTES.fetch_add(bytes, Ordering::Relaxed);
    // `try_with`: during thread exit the counters may be gone; nothing to count then.
    let _ = BYTES.try_with(|c| c.set(c.get() + bytes));
    let _ = BLOCKS.try_with(|c| c.set(c.get() + blocks));
}

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, and only
// adds bookkeeping on thread-local counters (const-initialised, so touching them never
// allocates).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            add(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            add(layout.size() as isize, 1);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        add(-(layout.size() as isize), -1);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            add(new_size as isize - layout.size() as isize, 0);
        }
        p
    }
}

/// Live heap bytes and blocks allocated by this thread (and not freed).
#[allow(dead_code)] // Not every includer measures one thread.
pub fn live() -> (isize, isize) {
    (BYTES.with(Cell::get), BLOCKS.with(Cell::get))
}

/// Live heap bytes allocated by every thread of the process (and not freed).
#[allow(dead_code)] // Not every includer measures across threads.
pub fn live_process() -> isize {
    PROCESS_BYTES.load(Ordering::Relaxed)
}
