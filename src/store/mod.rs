//! Where the latest ids are persisted: the [`Store`] trait and its implementations.
//!
//! The tracker's one background worker calls the store with whole batches: one
//! [`save`](Store::save) per flush, carrying the latest id of every stream that changed since
//! the last flush. Nothing on the request or frame path ever waits for a store.

use std::error::Error;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use std::time::SystemTime;

use crate::key::{EventId, SessionId, StreamKey};

mod memory;
#[cfg(feature = "redis")]
mod redis;

pub use memory::{DEFAULT_MAX_KEYS, InMemoryStore};
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{DEFAULT_PREFIX, DEFAULT_TTL, RedisStore};

/// One entry of a batch: the latest id of a stream and its sequence number.
///
/// Sequence numbers grow with every id a tracker publishes (they come from one counter per
/// tracker), so a store keeps, for each key, the entry with the highest sequence and refuses an
/// older one: a late retry can never overwrite a newer id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SaveEntry {
    /// The stream.
    pub key: StreamKey,
    /// Its latest id.
    pub id: EventId,
    /// The id's sequence number; higher is newer within one tracker.
    pub sequence: u64,
    /// When the tracker published the id (to its worker's clock resolution, about one flush
    /// interval). Stores shared by several trackers order entries by `(published_at,
    /// sequence)`, since each tracker counts its own sequence.
    pub published_at: SystemTime,
}

/// When a session was last active: its last request or frame on a tracked stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionActivity {
    /// The session.
    pub session: SessionId,
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
/// Implementations must be safe for concurrent use and must never replace a key's entry with one
/// of a lower `sequence`.
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
///             let newer = map.get(&e.key).is_none_or(|old| old.sequence < e.sequence);
///             if newer {
///                 map.insert(e.key.clone(), StoredId { id: e.id.clone(), sequence: e.sequence });
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
    /// Saves every entry of `batch` whose sequence is higher than the stored one. A batch
    /// usually holds one entry per key; should it hold several, the highest sequence must win.
    /// An error means the whole batch may be retried.
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
}
