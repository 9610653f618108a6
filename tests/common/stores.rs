//! Stores that misbehave on purpose: fail, stall or crawl, recording every save attempt.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
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
    /// Share of saves that fail at random, in thousandths.
    random_per_mille: AtomicU32,
    rng: AtomicU64,
}

impl ScriptedStore {
    fn with(fail_next: usize, delay: Duration, open: bool) -> Self {
        Self {
            inner: InMemoryStore::new(),
            fail_next: AtomicUsize::new(fail_next),
            delay,
            gate: watch::Sender::new(open),
            attempts: Mutex::default(),
            random_per_mille: AtomicU32::new(0),
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
        }
    }

    /// Also fails this share of saves at random (0.0 to 1.0).
    pub fn with_random_failures(self, share: f64) -> Self {
        self.random_per_mille
            .store((share * 1000.0) as u32, Ordering::SeqCst);
        self
    }

    fn random_failure(&self) -> bool {
        let per_mille = self.random_per_mille.load(Ordering::SeqCst);
        if per_mille == 0 {
            return false;
        }
        let mut x = self.rng.load(Ordering::SeqCst);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng.store(x, Ordering::SeqCst);
        (x % 1000) < u64::from(per_mille)
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
            .is_ok()
            || self.random_failure();
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

/// What a [`FaultStore`] call does while a fault is set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    /// Works.
    Ok,
    /// Fails at once (Redis at `maxmemory`, `READONLY` after a failover).
    FailAtOnce,
    /// Fails after a delay (a timeout inside the store's own client).
    FailAfter(Duration),
    /// Never returns.
    Hang,
    /// The first call never returns; later ones work.
    HangOnce,
    /// The first call panics; later ones work.
    PanicOnce,
    /// Every call panics.
    PanicAlways,
    /// Down for one period, up for the next, and so on.
    Flapping(Duration),
    /// Blocks the calling thread (a store doing blocking I/O inside its future), then works.
    BlockThread(Duration),
}

/// Which calls a fault applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Calls {
    Save,
    Touch,
    Both,
}

#[derive(Debug)]
struct KindState {
    fault: Mutex<Fault>,
    /// The one call of a `*Once` fault has happened.
    once_used: std::sync::atomic::AtomicBool,
    calls: AtomicU64,
    ok: AtomicU64,
}

impl KindState {
    fn new() -> Self {
        Self {
            fault: Mutex::new(Fault::Ok),
            once_used: std::sync::atomic::AtomicBool::new(false),
            calls: AtomicU64::new(0),
            ok: AtomicU64::new(0),
        }
    }
}

/// A store whose `save` and `touch_sessions` misbehave on demand, each on its own, in front of
/// an [`InMemoryStore`].
#[derive(Debug)]
pub struct FaultStore {
    pub inner: InMemoryStore,
    save: KindState,
    touch: KindState,
    epoch: Instant,
}

impl Default for FaultStore {
    fn default() -> Self {
        Self {
            inner: InMemoryStore::new(),
            save: KindState::new(),
            touch: KindState::new(),
            epoch: Instant::now(),
        }
    }
}

impl FaultStore {
    /// Sets the fault of the given calls (a `*Once` fault starts afresh).
    pub fn set(&self, calls: Calls, fault: Fault) {
        let kinds: &[&KindState] = match calls {
            Calls::Save => &[&self.save],
            Calls::Touch => &[&self.touch],
            Calls::Both => &[&self.save, &self.touch],
        };
        for kind in kinds {
            *kind.fault.lock().unwrap() = fault;
            kind.once_used.store(false, Ordering::SeqCst);
        }
    }

    /// Calls made so far: (save, touch).
    pub fn calls(&self) -> (u64, u64) {
        (
            self.save.calls.load(Ordering::SeqCst),
            self.touch.calls.load(Ordering::SeqCst),
        )
    }

    /// Calls that succeeded so far: (save, touch).
    pub fn successes(&self) -> (u64, u64) {
        (
            self.save.ok.load(Ordering::SeqCst),
            self.touch.ok.load(Ordering::SeqCst),
        )
    }

    pub fn get(&self, key: &StreamKey) -> Option<StoredId> {
        self.inner.get(key)
    }

    async fn apply(&self, kind: &KindState) -> Result<(), StoreError> {
        // The fault is read before the call is counted, so that a test that waits for the
        // count and then changes the fault cannot change this call's.
        let fault = *kind.fault.lock().unwrap();
        kind.calls.fetch_add(1, Ordering::SeqCst);
        let injected = || StoreError::with_source("injected fault", std::io::Error::other("down"));
        match fault {
            Fault::Ok => {}
            Fault::FailAtOnce => return Err(injected()),
            Fault::FailAfter(delay) => {
                tokio::time::sleep(delay).await;
                return Err(injected());
            }
            Fault::Hang => std::future::pending::<()>().await,
            Fault::HangOnce => {
                if !kind.once_used.swap(true, Ordering::SeqCst) {
                    std::future::pending::<()>().await;
                }
            }
            Fault::PanicOnce => {
                if !kind.once_used.swap(true, Ordering::SeqCst) {
                    panic!("injected store panic (once)");
                }
            }
            Fault::PanicAlways => panic!("injected store panic"),
            Fault::Flapping(period) => {
                let phase = self.epoch.elapsed().as_millis() / period.as_millis().max(1);
                if phase.is_multiple_of(2) {
                    return Err(injected());
                }
            }
            Fault::BlockThread(d) => std::thread::sleep(d),
        }
        kind.ok.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Store for FaultStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        self.apply(&self.save).await?;
        self.inner.save(batch).await
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        self.inner.load(key).await
    }

    async fn touch_sessions(
        &self,
        sessions: &[tower_sse_tracker::store::SessionActivity],
    ) -> Result<(), StoreError> {
        self.apply(&self.touch).await?;
        self.inner.touch_sessions(sessions).await
    }
}

/// A store that holds the tracker to the batch contract of `Store::save` the way a SQL
/// multi-row upsert does: a batch naming one key twice is refused whole (and counted), the
/// other streams in it too. Every batch's keys are recorded.
#[derive(Debug, Default)]
pub struct OneEntryPerKeyStore {
    pub inner: InMemoryStore,
    /// Batches refused because they named a key twice.
    pub refused: AtomicU64,
    /// Entries of every batch received, in order: (key, id, sequence).
    pub batches: Mutex<Vec<Vec<(StreamKey, String, u64)>>>,
    /// Also fails one save in this many (0: none), after checking the batch.
    pub fail_one_in: AtomicU64,
}

impl Store for OneEntryPerKeyStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        self.batches.lock().unwrap().push(
            batch
                .iter()
                .map(|e| (e.key.clone(), e.id.to_string(), e.sequence))
                .collect(),
        );
        let mut keys = std::collections::HashSet::new();
        if !batch.iter().all(|e| keys.insert(&e.key)) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(StoreError::new("a batch names one key twice"));
        }
        let every = self.fail_one_in.load(Ordering::SeqCst);
        let n = self.batches.lock().unwrap().len() as u64;
        if every > 0 && n.is_multiple_of(every) {
            return Err(StoreError::new("injected failure"));
        }
        self.inner.save(batch).await
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        self.inner.load(key).await
    }
}
