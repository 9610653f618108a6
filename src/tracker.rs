//! [`SseTracker`]: the handle an application keeps to build layers and read latest ids.

use std::sync::Arc;

use tokio::sync::watch;

use std::time::Duration;

use crate::builder::{Config, SseTrackerBuilder};
use crate::key::{EventId, SessionId, StreamKey, StreamName};
use crate::layer::SseTrackerLayer;
use crate::metrics::Handles;
use crate::registry::{Limits, Registry};
use crate::store::{DynStore, StoreError, StoredId};
use crate::worker::guard::guarded;
use crate::worker::{ShutdownReport, WorkerConfig, WorkerHandle};

/// What every layer, service and body of one tracker shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Handles,
    pub(crate) worker: WorkerHandle,
    store: Arc<dyn DynStore>,
    store_timeout: Duration,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        runtime: &tokio::runtime::Handle,
        config: Config,
        limits: Limits,
        store: Arc<dyn DynStore>,
        channel_capacity: usize,
        worker: WorkerConfig,
    ) -> Self {
        let metrics = Handles::register();
        let registry = Arc::new(Registry::new(limits, metrics.registry()));
        // The worker holds the registry, the store and the metrics, never `Shared`: when the
        // last tracker, layer and body are gone, its channel closes and it finishes.
        let store_timeout = worker.store_timeout;
        let worker = WorkerHandle::spawn(
            runtime,
            channel_capacity,
            worker,
            registry.clone(),
            store.clone(),
            metrics.clone(),
        );
        Self {
            config,
            registry,
            metrics,
            worker,
            store,
            store_timeout,
        }
    }
}

/// Tracks the SSE streams of every layer built from it and tells the latest event id of each.
///
/// Cheap to clone: clones share one registry. Build one with [`SseTracker::builder`], add
/// [`layer`](Self::layer) to as many routers or services as you like, and ask it for the latest
/// id of a (session, stream) when a client reconnects.
///
/// "Latest id" means the id of the newest event the layer has *handed to the HTTP stack* on
/// that stream: the client may not have received it yet, and nothing acknowledges it.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_sse_tracker::SseTracker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder().build().unwrap();
/// let app: Router = Router::new()
///     .route("/mcp", get(|| async { "..." }))
///     .layer(tracker.layer());
///
/// // Later, e.g. in a handler:
/// assert_eq!(tracker.last_event_id("session-1", "GET /mcp"), None);
/// # let _ = app;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SseTracker {
    shared: Arc<Shared>,
}

impl SseTracker {
    /// A builder with every setting at its default.
    pub fn builder() -> SseTrackerBuilder {
        SseTrackerBuilder::default()
    }

    pub(crate) fn from_shared(shared: Shared) -> Self {
        Self {
            shared: Arc::new(shared),
        }
    }

    /// A layer that tracks the SSE responses of the service it wraps into this tracker.
    pub fn layer(&self) -> SseTrackerLayer {
        SseTrackerLayer::new(self.shared.clone())
    }

    /// The latest id committed on `stream` of `session`, from memory. `None` when the stream is
    /// not tracked or has committed no id. `Some` of an empty id means the server reset the id.
    pub fn last_event_id(&self, session: &str, stream: &str) -> Option<EventId> {
        self.shared.registry.get(session, stream)?.latest()
    }

    /// A receiver that sees every new latest id of `stream` of `session` (latest only: a slow
    /// reader skips intermediate ids). The stream is registered if it is not yet, so that a
    /// subscriber can wait for a stream that has not started.
    ///
    /// Registering a stream in a full registry evicts the least recently used stream without
    /// an open body, as a new response would; a stream without an open body can itself be
    /// evicted later, and then its receiver sees no more ids. Fails for an invalid session id
    /// or stream name, and when every tracked stream has an open body.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_sse_tracker::SseTracker;
    ///
    /// let tracker = SseTracker::builder().build().unwrap();
    /// let mut rx = tracker.subscribe("session-1", "GET /mcp").unwrap();
    /// assert_eq!(*rx.borrow_and_update(), None);
    /// // rx.changed().await resolves when the layer commits the next id of that stream.
    /// # }
    /// ```
    pub fn subscribe(
        &self,
        session: &str,
        stream: &str,
    ) -> Result<watch::Receiver<Option<EventId>>, SubscribeError> {
        let session = SessionId::new(session).map_err(SubscribeError::Session)?;
        let stream = StreamName::new(stream).map_err(SubscribeError::Stream)?;
        let (slot, evicted) = self
            .shared
            .registry
            .get_or_insert(&session, &stream, false)
            .map_err(|_| SubscribeError::RegistryFull)?;
        if evicted.is_some() {
            self.shared.metrics.evicted_lru.increment(1);
        }
        Ok(slot.subscribe())
    }

    /// Every stream of `session` that the tracker knows, with its latest id.
    pub fn session_streams(&self, session: &str) -> Vec<(StreamName, Option<EventId>)> {
        self.shared.registry.session_streams(session)
    }

    /// How many streams are tracked now.
    pub fn tracked_streams(&self) -> usize {
        self.shared.registry.len()
    }

    /// The registry's estimated heap size in bytes, from its counts of streams, sessions and
    /// interned names and their measured sizes (see the README's memory table). Also exported
    /// as the `sse_tracker_memory_bytes` gauge.
    pub fn estimated_memory_bytes(&self) -> usize {
        self.shared.registry.counts().estimated_bytes()
    }

    /// The latest id of `stream` of `session`, from memory and from the store, whichever is
    /// newer by `(published_at, sequence)`: after a restart, or when another instance sharing
    /// the store (Redis) has served the stream since, the store's is the newer one.
    ///
    /// The store is asked under the store timeout. When it fails and memory has an id, that id
    /// is returned (the failure is counted in `sse_tracker_store_errors_total{op="load"}` and
    /// logged); when memory has none, the error is returned.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_sse_tracker::SseTracker;
    ///
    /// let tracker = SseTracker::builder().build()?;
    /// assert_eq!(tracker.resolve("session-1", "GET /mcp").await?, None);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resolve(
        &self,
        session: &str,
        stream: &str,
    ) -> Result<Option<EventId>, StoreError> {
        let memory = self
            .shared
            .registry
            .get(session, stream)
            .and_then(|slot| slot.latest_entry());
        let stored = match self.load(session, stream).await {
            Ok(stored) => stored,
            Err(error) => match memory {
                Some((id, _)) => {
                    tracing::warn!(
                        %error,
                        session,
                        stream,
                        "SSE tracker store load failed; answering from memory only"
                    );
                    return Ok(Some(id));
                }
                None => return Err(error),
            },
        };
        Ok(match (memory, stored) {
            (None, None) => None,
            (Some((id, _)), None) => Some(id),
            (None, Some(stored)) => Some(stored.id),
            (Some((id, version)), Some(stored)) => {
                let published_at = self.shared.registry.wall_time(version.at_us);
                if (published_at, version.sequence) >= (stored.published_at, stored.sequence) {
                    Some(id)
                } else {
                    Some(stored.id)
                }
            }
        })
    }

    /// Where a reconnecting client stands on `stream` of `session`, given the `Last-Event-ID`
    /// it sent (the layer puts it in the request extensions as
    /// [`LastEventId`](crate::LastEventId)). The latest id is [`resolve`](Self::resolve)'s:
    /// the newer of memory and the store, so instances sharing the store agree.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_sse_tracker::{LastEventId, Resume, SessionId, SseTracker};
    ///
    /// async fn decide(
    ///     tracker: &SseTracker,
    ///     session: &SessionId,
    ///     last: Option<&LastEventId>,
    /// ) -> String {
    ///     let client = last.map(|LastEventId(id)| id);
    ///     match tracker.resume(session.as_str(), "GET /mcp", client).await {
    ///         Ok(Resume::Current(id)) => format!("client has everything up to {id}"),
    ///         Ok(Resume::Behind { client, latest }) => {
    ///             format!("replay after {client:?} up to {latest}")
    ///         }
    ///         Ok(Resume::Unknown) => "no such stream: start a new one".to_owned(),
    ///         Ok(other) => format!("{other:?}"),
    ///         Err(error) => format!("store unavailable: {error}"),
    ///     }
    /// }
    ///
    /// let tracker = SseTracker::builder().build()?;
    /// let session = SessionId::new("s1")?;
    /// assert_eq!(decide(&tracker, &session, None).await, "no such stream: start a new one");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resume(
        &self,
        session: &str,
        stream: &str,
        client: Option<&EventId>,
    ) -> Result<Resume, StoreError> {
        Ok(match (self.resolve(session, stream).await?, client) {
            (None, _) => Resume::Unknown,
            (Some(latest), Some(client)) if latest == *client => Resume::Current(latest),
            (Some(latest), client) => Resume::Behind {
                client: client.cloned(),
                latest,
            },
        })
    }

    /// The id the store holds for `stream` of `session`, not looking at memory. `Ok(None)`
    /// for an invalid session id or stream name. Asked under the store timeout.
    pub async fn stored_event_id(
        &self,
        session: &str,
        stream: &str,
    ) -> Result<Option<EventId>, StoreError> {
        Ok(self.load(session, stream).await?.map(|stored| stored.id))
    }

    /// Loads a key from the store under the store timeout, with panics caught and failures
    /// counted.
    async fn load(&self, session: &str, stream: &str) -> Result<Option<StoredId>, StoreError> {
        let (Ok(session), Ok(stream)) = (SessionId::new(session), StreamName::new(stream)) else {
            return Ok(None);
        };
        let key = StreamKey::new(session, stream);
        let store = &self.shared.store;
        guarded(self.shared.store_timeout, async { store.load(&key).await })
            .await
            .map_err(|failure| {
                self.shared
                    .metrics
                    .store_errors
                    .get(2, failure.reason_index())
                    .increment(1);
                failure.into_error()
            })
    }

    /// Stops the worker: it takes no more ids (open streams keep flowing; ids they commit from
    /// now on stay in memory), drains its channel, writes everything pending and retries until
    /// `timeout`, then reports, stream by stream, which latest ids are not in the store (see
    /// [`ShutdownReport`]). Call it after the server has stopped serving, or after
    /// draining open streams, so that no id comes after it.
    ///
    /// A second call writes nothing and reports what the store still lacks; so does a call
    /// after the worker task was lost (its runtime shut down), with
    /// [`worker_lost`](ShutdownReport::worker_lost) set.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use std::time::Duration;
    /// use tower_sse_tracker::SseTracker;
    ///
    /// let tracker = SseTracker::builder().build().unwrap();
    /// let report = tracker.shutdown(Duration::from_secs(5)).await;
    /// assert!(report.is_complete());
    /// # }
    /// ```
    pub async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.shared.worker.shutdown(timeout).await
    }
}

/// Where a reconnecting client stands, from [`SseTracker::resume`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Resume {
    /// Neither memory nor the store knows the stream (never seen, evicted and expired, or
    /// another instance has not flushed it yet).
    Unknown,
    /// The client's `Last-Event-ID` is the stream's latest id: it missed nothing.
    Current(EventId),
    /// The client sent no id, or one other than the latest: it missed the events after its
    /// id, up to `latest`. (When another instance has not flushed yet, the store may also lag
    /// behind the client.)
    Behind {
        /// The client's `Last-Event-ID`, if it sent one.
        client: Option<EventId>,
        /// The stream's latest id.
        latest: EventId,
    },
}

/// Why [`SseTracker::subscribe`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The session id is not valid.
    Session(crate::key::InvalidKey),
    /// The stream name is not valid.
    Stream(crate::key::InvalidKey),
    /// The registry holds `max_streams` streams and every one has an open body.
    RegistryFull,
}

impl std::fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscribeError::Session(_) => f.write_str("invalid session id"),
            SubscribeError::Stream(_) => f.write_str("invalid stream name"),
            SubscribeError::RegistryFull => {
                f.write_str("the registry is full of streams with open bodies")
            }
        }
    }
}

impl std::error::Error for SubscribeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SubscribeError::Session(e) | SubscribeError::Stream(e) => Some(e),
            SubscribeError::RegistryFull => None,
        }
    }
}
