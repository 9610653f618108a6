//! Where the latest ids are persisted: the [`Store`] trait and its implementations.
//!
//! The tracker's one background worker calls the store with whole batches: at each flush, the
//! latest id of every stream that changed since the last flush, in [`save`](Store::save) calls
//! of at most `max_batch` entries, and the activity of the sessions active since, in
//! [`touch_sessions`](Store::touch_sessions) calls: one call of each kind at a time, the two
//! kinds side by side (a store must accept a `save` and a `touch_sessions` at once). Nothing
//! on the request or frame path ever waits for a store.
//!
//! # When the store misbehaves
//!
//! Every store call runs under a deadline ([`store_timeout`], 5 s by default) with its panics
//! caught. An error, a call past the deadline and a panic are each one failed call: counted in
//! `sse_tracker_store_errors_total{op,reason}`, logged, and followed by back-off: no call of
//! that kind (save or touch) starts again before the retry policy's delay, which doubles with
//! each failure in a row. Streams never wait for any of it. What each row of the table below
//! rests on: `tests/store_faults.rs` (a store that fails at once, after a delay, hangs or
//! panics, for `save` and `touch_sessions` apart and together, under load over real HTTP, with
//! and without evictions), `tests/redis.rs` (Redis down at start, killed, paused, out of
//! memory), `tests/persistence.rs` (given up and probed; a store that blocks its thread) and
//! `tests/faults.rs` (floods of new streams while the store fails or hangs); `TESTING.md` says
//! which test proves which.
//!
//! | the store… | streams | persistence | alert on |
//! |---|---|---|---|
//! | fails at once (Redis `OOM` at `maxmemory`, `READONLY` after a failover) | unaffected | ids coalesce in memory; retried with back-off (a few calls per second); all written once it works | `sse_tracker_store_errors_total{reason="error"}` rate |
//! | fails after a delay | unaffected | as above; the worker keeps draining its channel while a call runs | same |
//! | never returns | unaffected | the call is dropped at the deadline, then as above | `sse_tracker_store_errors_total{reason="timeout"}` |
//! | panics | unaffected | the panic is caught and logged with its message, then as above | `sse_tracker_store_errors_total{reason="panic"}` |
//! | is down when the application starts | unaffected | [`RedisStore::new`] does not connect; writes fail until Redis is up | `sse_tracker_store_errors_total` |
//! | stays down past the retry policy | unaffected | the streams are given up (still in memory), probed once per longest retry delay, caught up after the next successful write | `sse_tracker_retries_exhausted_total` |
//! | stays down while new streams evict old ones | unaffected | evicted streams' unpersisted ids wait in a bounded set (`max_pending_evicted`); beyond it the oldest is dropped | `sse_tracker_ids_dropped_total` |
//! | blocks its thread (blocking I/O in `async`) | the worker cannot drain its channel: a stream whose id finds it full hands its slot over through the registry at once, then waits at most the send timeout (100 ms) before its next frame | as above once it returns | `sse_tracker_backpressure_timeouts_total` |
//!
//! A panic inside the worker itself (not the store: a metrics recorder, a bug) restarts it from
//! the registry's state (`sse_tracker_worker_failures_total{reason="panic"}`); a worker task
//! dropped with its runtime is reported by [`shutdown`] (`worker_lost`).
//!
//! [`store_timeout`]: crate::SseTrackerBuilder::store_timeout
//! [`shutdown`]: crate::SseTracker::shutdown
//! [`RedisStore::new`]: https://docs.rs/tower-sse-tracker/latest/tower_sse_tracker/store/struct.RedisStore.html#method.new

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use std::time::{Duration, SystemTime};

use crate::key::{EventId, Owner, StreamKey};

mod log;
mod memory;
#[cfg(feature = "redis")]
mod redis;

pub(crate) use log::holds_all;
pub use log::{AppendReport, LogAppend, LogEnd, LogEvent, StoredLog};
pub use memory::InMemoryStore;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::RedisStore;

/// One entry of a batch: the latest id of a stream, its sequence number and when it was
/// published.
///
/// Within one tracker, a key's sequence numbers only grow. Trackers (server instances) sharing a
/// store count their own sequences, so a store orders the entries of a key by
/// `(published_at, sequence)` and keeps the newest ([`SaveEntry::supersedes`]): neither a late
/// retry nor another instance's older id can overwrite a newer one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveEntry {
    /// The stream.
    pub key: StreamKey,
    /// Its latest id.
    pub id: EventId,
    /// The id's sequence number; higher is newer within one tracker.
    pub sequence: u64,
    /// When the tracker published the id: the time of the request that opened the stream or
    /// later, to the resolution of the tracker's clock (its flush interval at worst). Stores
    /// shared by several trackers order entries by `(published_at, sequence)`, since each
    /// tracker counts its own sequence.
    pub published_at: SystemTime,
}

impl SaveEntry {
    /// Whether this entry is newer than `stored` by `(published_at, sequence)`, and so must
    /// replace it.
    ///
    /// ```
    /// use std::time::{Duration, UNIX_EPOCH};
    /// use tower_sse_tracker::store::{SaveEntry, StoredId};
    /// use tower_sse_tracker::{EventId, SessionId, StreamKey, StreamName};
    ///
    /// let key = StreamKey::new(SessionId::new("s").unwrap(), StreamName::new("GET /mcp").unwrap());
    /// let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
    /// let stored = StoredId { id: EventId::new("7").unwrap(), sequence: 9, published_at: t };
    /// let entry = |sequence, published_at| SaveEntry {
    ///     key: key.clone(), id: EventId::new("8").unwrap(), sequence, published_at,
    /// };
    /// assert!(entry(10, t).supersedes(&stored));
    /// assert!(!entry(9, t).supersedes(&stored));
    /// // Another instance, later, with a lower sequence of its own: newer.
    /// assert!(entry(1, t + Duration::from_millis(1)).supersedes(&stored));
    /// ```
    pub fn supersedes(&self, stored: &StoredId) -> bool {
        (self.published_at, self.sequence) > (stored.published_at, stored.sequence)
    }

    /// What a store holds once it has saved this entry.
    pub fn to_stored(&self) -> StoredId {
        StoredId {
            id: self.id.clone(),
            sequence: self.sequence,
            published_at: self.published_at,
        }
    }
}

/// When an owner (a session, with the default owner source) was last active: its last request
/// or frame on a tracked stream. Sessionless streams have no activity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionActivity {
    /// The owner.
    pub owner: Owner,
    /// Its last activity (to the worker's clock resolution, about one flush interval).
    pub last_active: SystemTime,
}

/// What a store holds for one stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredId {
    /// The latest persisted id.
    pub id: EventId,
    /// Its sequence number.
    pub sequence: u64,
    /// When it was published (see [`SaveEntry::published_at`]).
    pub published_at: SystemTime,
}

/// A store operation failed. The worker retries failed saves (see
/// [`RetryPolicy`](crate::RetryPolicy)); every failure is counted and logged.
#[derive(Debug)]
pub struct StoreError {
    message: String,
    source: Option<Box<dyn Error + Send + Sync + 'static>>,
}

impl StoreError {
    /// An error with a message only.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
            source: None,
        }
    }

    /// An error with a message and the error that caused it.
    ///
    /// ```
    /// use tower_sse_tracker::store::StoreError;
    ///
    /// let io = std::io::Error::other("connection reset");
    /// let err = StoreError::with_source("saving a batch", io);
    /// assert_eq!(err.to_string(), "store error: saving a batch");
    /// assert!(std::error::Error::source(&err).is_some());
    /// ```
    pub fn with_source(
        message: impl Into<String>,
        source: impl Into<Box<dyn Error + Send + Sync + 'static>>,
    ) -> Self {
        Self {
            message: message.into(),
            source: Some(source.into()),
        }
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "store error: {}", self.message)
    }
}

impl Error for StoreError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().map(|e| e as &(dyn Error + 'static))
    }
}

/// Persists the latest id of each stream. Batch-oriented and async; called only by the
/// tracker's background worker (and by [`SseTracker::resolve`](crate::SseTracker::resolve)).
///
/// Implementations must be safe for concurrent use and must never replace a key's entry with an
/// older one: compare with [`SaveEntry::supersedes`].
///
/// The tracker calls a store only from its worker (and from [`SseTracker::resolve`]), each call
/// under a deadline ([`SseTrackerBuilder::store_timeout`]): a call that errs, panics or does not
/// finish in time is one failed write, counted, logged and retried with back-off. A store does
/// not need its own timeout to keep streams flowing, but one that cancels its work when its
/// future is dropped is kinder to its backend.
///
/// [`SseTracker::resolve`]: crate::SseTracker::resolve
/// [`SseTrackerBuilder::store_timeout`]: crate::SseTrackerBuilder::store_timeout
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Mutex;
/// use tower_sse_tracker::store::{SaveEntry, Store, StoreError, StoredId};
/// use tower_sse_tracker::StreamKey;
///
/// /// Keeps everything forever: fine for a test, not for production.
/// #[derive(Default)]
/// struct MapStore(Mutex<HashMap<StreamKey, StoredId>>);
///
/// impl Store for MapStore {
///     async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
///         let mut map = self.0.lock().unwrap();
///         for e in batch {
///             if map.get(&e.key).is_none_or(|old| e.supersedes(old)) {
///                 map.insert(e.key.clone(), e.to_stored());
///             }
///         }
///         Ok(())
///     }
///
///     async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
///         Ok(self.0.lock().unwrap().get(key).cloned())
///     }
/// }
/// ```
pub trait Store: Send + Sync + 'static {
    /// Saves every entry of `batch` that [supersedes](SaveEntry::supersedes) the stored one.
    /// An error means the whole batch may be retried.
    ///
    /// The batch contract, which a store may rely on (a SQL multi-row upsert refuses a row
    /// affected twice):
    ///
    /// - at most [`max_batch`](crate::SseTrackerBuilder::max_batch) entries, at least one;
    /// - **one entry per key**, the newest the tracker holds: also when a stream was evicted
    ///   with its id unwritten and made again before the next flush (the older id is then left
    ///   out, as the newer one supersedes it);
    /// - one `save` call in flight at a time per tracker (and one
    ///   [`touch_sessions`](Self::touch_sessions) beside it).
    ///
    /// `tests/eviction.rs` checks the contract under eviction churn with a store that refuses
    /// any batch naming a key twice.
    fn save(&self, batch: &[SaveEntry]) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// The stored entry of `key`, if any.
    fn load(
        &self,
        key: &StreamKey,
    ) -> impl Future<Output = Result<Option<StoredId>, StoreError>> + Send;

    /// Records when each session of `sessions` was last active (one batch per flush, each
    /// session at most once). A store that keeps no activity can leave the default, which does
    /// nothing.
    fn touch_sessions(
        &self,
        sessions: &[SessionActivity],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = sessions;
        async { Ok(()) }
    }

    /// Appends to each stream's log the events of its [`LogAppend`], as that type says: the
    /// history of the highest epoch wins, events already appended are skipped, nothing is
    /// appended after the end mark. A log holds a bounded number of events, the oldest going
    /// first, and a store may expire it ([`RedisStore`](https://docs.rs/tower-sse-tracker/latest/tower_sse_tracker/store/struct.RedisStore.html):
    /// its time to live after the last append). An error means the whole batch may be
    /// retried. The [`AppendReport`] names the appends refused (a newer history holds the
    /// log): nothing of them was appended, and the tracker stops offering their history. A
    /// store that keeps no logs can leave the default, which answers with an error.
    ///
    /// The batch contract: each stream at most once; offsets rising, below 2^53 (the stores
    /// here answer anything else with an error).
    ///
    /// The tracker's worker calls it at each flush with replay
    /// [across instances](crate::ReplayPolicy::across_instances) (one call at a time, beside
    /// a `save` and a `touch_sessions`); a reconnect on another instance then reads the log
    /// with [`read_log`](Self::read_log). [`InMemoryStore`] (shared by the trackers of one
    /// process) and `RedisStore` keep logs.
    fn append_logs(
        &self,
        batch: &[LogAppend],
    ) -> impl Future<Output = Result<AppendReport, StoreError>> + Send {
        let _ = batch;
        async { Err(StoreError::new("this store keeps no replay logs")) }
    }

    /// The log of `key`: its events after offset `after` (from the oldest it holds, for
    /// `None`), at most `limit` of them (and at most the store's bound on a log: one read gets
    /// all it holds), and what the store knows of the rest; `None` when it holds no log of
    /// `key`. The default holds none. The events are of the log's epoch, whatever the reader
    /// expected: see [`StoredLog::complete_after`].
    fn read_log(
        &self,
        key: &StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Option<StoredLog>, StoreError>> + Send {
        let _ = (key, after, limit);
        async { Ok(None) }
    }

    /// Says that the instance `producer` lives, for `ttl` from now: while its lease runs, the
    /// streams it produces may still grow; once it has run out, a log that was not marked
    /// ended has lost its tail. The default does nothing.
    fn renew_lease(
        &self,
        producer: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        let _ = (producer, ttl);
        async { Ok(()) }
    }

    /// Whether the lease of `producer` runs now. The default: never.
    fn lease_alive(&self, producer: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        let _ = producer;
        async { Ok(false) }
    }
}

/// A shared store is a store: pass `Arc<S>` to the builder to keep a handle on `S`.
impl<S: Store> Store for std::sync::Arc<S> {
    fn save(&self, batch: &[SaveEntry]) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::save(self, batch)
    }

    fn load(
        &self,
        key: &StreamKey,
    ) -> impl Future<Output = Result<Option<StoredId>, StoreError>> + Send {
        S::load(self, key)
    }

    fn touch_sessions(
        &self,
        sessions: &[SessionActivity],
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::touch_sessions(self, sessions)
    }

    fn append_logs(
        &self,
        batch: &[LogAppend],
    ) -> impl Future<Output = Result<AppendReport, StoreError>> + Send {
        S::append_logs(self, batch)
    }

    fn read_log(
        &self,
        key: &StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> impl Future<Output = Result<Option<StoredLog>, StoreError>> + Send {
        S::read_log(self, key, after, limit)
    }

    fn renew_lease(
        &self,
        producer: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<(), StoreError>> + Send {
        S::renew_lease(self, producer, ttl)
    }

    fn lease_alive(&self, producer: &str) -> impl Future<Output = Result<bool, StoreError>> + Send {
        S::lease_alive(self, producer)
    }
}

/// The largest offset a log holds: 2^53 - 1 (the largest integer a Lua number, which Redis
/// scripts use, holds exactly).
pub(crate) const MAX_LOG_OFFSET: u64 = (1 << 53) - 1;

/// Checks a batch of appends against what every store needs: each stream once, offsets that
/// rise and stay below [`MAX_LOG_OFFSET`].
pub(crate) fn check_appends(batch: &[LogAppend]) -> Result<(), StoreError> {
    let mut keys = std::collections::HashSet::with_capacity(batch.len());
    for append in batch {
        if !keys.insert(&append.key) {
            return Err(StoreError::new(format!(
                "appending to replay logs: {} appears twice in one batch",
                append.key
            )));
        }
        let mut last = None;
        for event in &append.events {
            if event.offset > MAX_LOG_OFFSET || last.is_some_and(|last| event.offset <= last) {
                return Err(StoreError::new(format!(
                    "appending to replay logs: offset {} of {} is out of order or above 2^53",
                    event.offset, append.key
                )));
            }
            last = Some(event.offset);
        }
    }
    Ok(())
}

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The object-safe face of [`Store`] that the tracker keeps (one boxed future per batch, never
/// per frame).
pub(crate) trait DynStore: Send + Sync + 'static {
    fn save<'a>(&'a self, batch: &'a [SaveEntry]) -> BoxFuture<'a, Result<(), StoreError>>;
    fn load<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StoredId>, StoreError>>;
    fn touch_sessions<'a>(
        &'a self,
        sessions: &'a [SessionActivity],
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn append_logs<'a>(
        &'a self,
        batch: &'a [LogAppend],
    ) -> BoxFuture<'a, Result<AppendReport, StoreError>>;
    fn read_log<'a>(
        &'a self,
        key: &'a StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<StoredLog>, StoreError>>;
    fn renew_lease<'a>(
        &'a self,
        producer: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>>;
    fn lease_alive<'a>(&'a self, producer: &'a str) -> BoxFuture<'a, Result<bool, StoreError>>;
}

impl<S: Store> DynStore for S {
    fn save<'a>(&'a self, batch: &'a [SaveEntry]) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::save(self, batch))
    }

    fn load<'a>(
        &'a self,
        key: &'a StreamKey,
    ) -> BoxFuture<'a, Result<Option<StoredId>, StoreError>> {
        Box::pin(Store::load(self, key))
    }

    fn touch_sessions<'a>(
        &'a self,
        sessions: &'a [SessionActivity],
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::touch_sessions(self, sessions))
    }

    fn append_logs<'a>(
        &'a self,
        batch: &'a [LogAppend],
    ) -> BoxFuture<'a, Result<AppendReport, StoreError>> {
        Box::pin(Store::append_logs(self, batch))
    }

    fn read_log<'a>(
        &'a self,
        key: &'a StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> BoxFuture<'a, Result<Option<StoredLog>, StoreError>> {
        Box::pin(Store::read_log(self, key, after, limit))
    }

    fn renew_lease<'a>(
        &'a self,
        producer: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), StoreError>> {
        Box::pin(Store::renew_lease(self, producer, ttl))
    }

    fn lease_alive<'a>(&'a self, producer: &'a str) -> BoxFuture<'a, Result<bool, StoreError>> {
        Box::pin(Store::lease_alive(self, producer))
    }
}
