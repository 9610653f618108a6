//! Stores that misbehave on purpose: fail, stall or crawl, recording every save attempt.

use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tower_sse_tracker::StreamKey;
use tower_sse_tracker::store::{InMemoryStore, SaveEntry, Store, StoreError, StoredId};

#[derive(Debug)]
pub struct ScriptedStore {
    pub inner: InMemoryStore,
    /// Saves that fail before the first success (`usize::MAX`: all of them).
    fail_next: AtomicUsize,
    delay: Duration,
    /// Saves wait until this is true.
    gate: watch::Sender<bool>,
    /// When each save was called, and whether it succeeded.
    pub attempts: Mutex<Vec<(Instant, bool)>>,
}

impl ScriptedStore {
    fn with(fail_next: usize, delay: Duration, open: bool) -> Self {
        Self {
            inner: InMemoryStore::new(),
            fail_next: AtomicUsize::new(fail_next),
            delay,
            gate: watch::Sender::new(open),
            attempts: Mutex::default(),
        }
    }

    /// Fails the first `n` saves, then works.
    pub fn failing_first(n: usize) -> Self {
        Self::with(n, Duration::ZERO, true)
    }

    /// Fails every save.
    pub fn always_failing() -> Self {
        Self::with(usize::MAX, Duration::ZERO, true)
    }

    /// Takes `delay` per save.
    pub fn slow(delay: Duration) -> Self {
        Self::with(0, delay, true)
    }

    /// Blocks every save until [`open`](Self::open).
    pub fn gated() -> Self {
        Self::with(0, Duration::ZERO, false)
    }

    pub fn open(&self) {
        self.gate.send_replace(true);
    }

    /// Makes every later save fail (`true`) or work (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.fail_next
            .store(if failing { usize::MAX } else { 0 }, Ordering::SeqCst);
    }

    pub fn attempts(&self) -> Vec<(Instant, bool)> {
        self.attempts.lock().unwrap().clone()
    }

    pub fn calls(&self) -> usize {
        self.attempts.lock().unwrap().len()
    }

    pub fn get(&self, key: &StreamKey) -> Option<StoredId> {
        self.inner.get(key)
    }
}

impl Store for ScriptedStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        let called = Instant::now();
        let mut gate = self.gate.subscribe();
        gate.wait_for(|open| *open).await.unwrap();
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let fail = self
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
                0 => None,
                usize::MAX => Some(usize::MAX),
                n => Some(n - 1),
            })
            .is_ok();
        self.attempts.lock().unwrap().push((called, !fail));
        if fail {
            return Err(StoreError::with_source(
                "scripted failure",
                std::io::Error::other("injected"),
            ));
        }
        self.inner.save(batch).await
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        self.inner.load(key).await
    }
}
