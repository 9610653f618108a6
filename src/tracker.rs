//! [`SseTracker`]: the handle an application keeps to build layers and read latest ids.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::builder::SseTrackerBuilder;
use crate::identity::StreamKind;
use crate::key::{EventId, Owner, StreamKey, StreamName};
use crate::layer::SseTrackerLayer;
use crate::metrics::StoreOp;
use crate::registry::{self, Open};
use crate::replay::{GapReason, Peeked, Position};
use crate::shared::Shared;
use crate::store::{StoreError, StoredId};
use crate::worker::ShutdownReport;
use crate::worker::guard::guarded;

/// Tracks the SSE streams of every layer built from it and tells the latest event id of each.
///
/// Cheap to clone: clones share one registry. Build one with [`SseTracker::builder`], add
/// [`layer`](Self::layer) to as many routers or services as you like, and ask it for the latest
/// id of a stream, by its [`StreamKey`], when a client reconnects. The layer puts the key of the
/// stream a request addresses in the request extensions.
///
/// "Latest id" means the id of the newest event the layer has *handed to the HTTP stack* on
/// that stream: the client may not have received it yet, and nothing acknowledges it.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_sse_tracker::{SseTracker, StreamKey};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder().build().unwrap();
/// let app: Router = Router::new()
///     .route("/mcp", get(|| async { "..." }))
///     .layer(tracker.layer());
///
/// // Later, e.g. in a handler, with the key from the request extensions:
/// let key = StreamKey::try_new("session-1", "GET /mcp").unwrap();
/// assert_eq!(tracker.last_event_id(&key), None);
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

    /// The slot of `key` in the registry, else an evicted one whose id waits for its write.
    fn slot(&self, key: &StreamKey) -> Option<Arc<crate::registry::Slot>> {
        self.shared
            .registry
            .get_or_evicted(key.owner.as_ref().map(Owner::as_str), key.stream.as_str())
    }

    /// The latest id committed on the stream of `key`, from memory. `None` when the stream is
    /// not tracked or has committed no id. `Some` of an empty id means the server reset the id.
    pub fn last_event_id(&self, key: &StreamKey) -> Option<EventId> {
        self.slot(key)?.latest()
    }

    /// A receiver that sees every new latest id of the stream of `key` (latest only: a slow
    /// reader skips intermediate ids). The stream is registered if it is not yet, so that a
    /// subscriber can wait for a stream that has not started.
    ///
    /// Registering a stream in a full registry evicts the least recently used stream without
    /// an open body, as a new response would; a stream without an open body can itself be
    /// evicted later, and then its receiver sees no more ids. Fails when every tracked stream
    /// has an open body.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// use tower_sse_tracker::{SseTracker, StreamKey};
    ///
    /// let tracker = SseTracker::builder().build().unwrap();
    /// let key = StreamKey::try_new("session-1", "GET /mcp").unwrap();
    /// let mut rx = tracker.subscribe(&key).unwrap();
    /// assert_eq!(*rx.borrow_and_update(), None);
    /// // rx.changed().await resolves when the layer commits the next id of that stream.
    /// # }
    /// ```
    pub fn subscribe(
        &self,
        key: &StreamKey,
    ) -> Result<watch::Receiver<Option<EventId>>, SubscribeError> {
        let (slot, _evicted) = self
            .shared
            .registry
            .get_or_insert(key.owner.as_ref(), &key.stream, Open::No)
            .map_err(|_| SubscribeError::RegistryFull)?;
        Ok(slot.subscribe())
    }

    /// Every stream of `owner` that the tracker knows, with its latest id.
    pub fn owner_streams(&self, owner: &Owner) -> Vec<(StreamName, Option<EventId>)> {
        self.shared.registry.owner_streams(owner.as_str())
    }

    /// How many streams are tracked now.
    pub fn tracked_streams(&self) -> usize {
        self.shared.registry.len()
    }

    /// The registry's estimated heap size in bytes, from its counts of streams, owners and
    /// interned names and their measured sizes. Also exported as the `sse_tracker_memory_bytes`
    /// gauge.
    pub fn estimated_memory_bytes(&self) -> usize {
        self.shared.registry.counts().estimated_bytes()
    }

    /// The latest id of the stream of `key`, from memory and from the store, whichever is newer
    /// by `(published_at, sequence)`: after a restart, or when another instance sharing the
    /// store (Redis) has served the stream since, the store's is the newer one.
    ///
    /// The store is asked under the store timeout. When it fails and memory has an id, that id
    /// is returned (the failure is counted in `sse_tracker_store_errors_total{op="load"}` and
    /// logged); when memory has none, the error is returned.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_sse_tracker::{SseTracker, StreamKey};
    ///
    /// let tracker = SseTracker::builder().build()?;
    /// let key = StreamKey::try_new("session-1", "GET /mcp")?;
    /// assert_eq!(tracker.resolve(&key).await?, None);
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resolve(&self, key: &StreamKey) -> Result<Option<EventId>, StoreError> {
        Ok(self.resolve_from(key).await?.map(|(id, _)| id))
    }

    /// [`resolve`](Self::resolve), with where the answer came from.
    async fn resolve_from(&self, key: &StreamKey) -> Result<Option<(EventId, Source)>, StoreError> {
        let memory = self.slot(key).and_then(|slot| slot.latest_entry());
        let stored = match self.load(key).await {
            Ok(stored) => stored,
            Err(error) => match memory {
                Some((id, _)) => {
                    tracing::warn!(
                        %error,
                        %key,
                        "SSE tracker store load failed; answering from memory only"
                    );
                    return Ok(Some((id, Source::Memory)));
                }
                None => return Err(error),
            },
        };
        Ok(match (memory, stored) {
            (None, None) => None,
            (Some((id, _)), None) => Some((id, Source::Memory)),
            (None, Some(stored)) => Some((stored.id, Source::Store)),
            (Some((id, version)), Some(stored)) => {
                let published_at = self.shared.registry.wall_time(version.at_us);
                if (published_at, version.sequence) >= (stored.published_at, stored.sequence) {
                    Some((id, Source::Memory))
                } else {
                    Some((stored.id, Source::Store))
                }
            }
        })
    }

    /// Where a reconnecting client stands on the stream of `key`, given the `Last-Event-ID` it
    /// sent (the layer puts it in the request extensions as [`LastEventId`](crate::LastEventId),
    /// and the key as [`StreamKey`]). The latest id is [`resolve`](Self::resolve)'s: the newer
    /// of memory and the store, so instances sharing the store agree.
    ///
    /// With [replay](crate::SseTrackerBuilder::replay) on, and a log of the stream here, it
    /// answers what the layer replays, as the request's [`Replay`](crate::Replay) extension
    /// says: [`Resume::Replayed`] when the log holds events after the client's id (the layer
    /// sends them: continue after `last_event_id`), [`Resume::Gap`] when the log cannot replay
    /// what the client missed (the layer sent nothing of it).
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_sse_tracker::{LastEventId, Resume, SseTracker, StreamKey};
    ///
    /// async fn decide(tracker: &SseTracker, key: &StreamKey, last: Option<&LastEventId>) -> String {
    ///     let client = last.map(|LastEventId(id)| id);
    ///     match tracker.resume(key, client).await {
    ///         Ok(Resume::Current(id)) => format!("client has everything up to {id}"),
    ///         Ok(Resume::Behind { client, latest }) => {
    ///             format!("replay after {client:?} up to {latest}")
    ///         }
    ///         Ok(Resume::Unconfirmed { client, stored }) => {
    ///             format!("the store says {stored}, the client {client}: which is newer?")
    ///         }
    ///         Ok(Resume::Unknown) => "no such stream: start a new one".to_owned(),
    ///         Ok(other) => format!("{other:?}"),
    ///         Err(error) => format!("store unavailable: {error}"),
    ///     }
    /// }
    ///
    /// let tracker = SseTracker::builder().build()?;
    /// let key = StreamKey::try_new("s1", "GET /mcp")?;
    /// assert_eq!(decide(&tracker, &key, None).await, "no such stream: start a new one");
    /// # Ok(())
    /// # }
    /// ```
    pub async fn resume(
        &self,
        key: &StreamKey,
        client: Option<&EventId>,
    ) -> Result<Resume, StoreError> {
        let per_id = matches!(self.shared.config.stream, StreamKind::EventId(_));
        let logged = match (client, &self.shared.replay) {
            (Some(client), Some(_)) => self.logged(key, client, per_id),
            _ => None,
        };
        match (logged, client) {
            (Some(Ok((events, last_id, position))), Some(client)) if events > 0 => {
                return Ok(Resume::Replayed {
                    client: client.clone(),
                    events,
                    last_event_id: last_id.unwrap_or_else(|| client.clone()),
                    position,
                });
            }
            // With a stream per id, a reconnect the layer does not answer goes to the
            // application as without replay.
            (Some(Err(reason)), Some(client)) if !per_id => {
                return Ok(Resume::Gap {
                    client: client.clone(),
                    reason,
                    latest: self.resolve_from(key).await?.map(|(latest, _)| latest),
                });
            }
            _ => {}
        }
        Ok(match (self.resolve_from(key).await?, client) {
            (None, _) => Resume::Unknown,
            (Some((latest, _)), Some(client)) if latest == *client => Resume::Current(latest),
            (Some((latest, Source::Store)), Some(client)) => Resume::Unconfirmed {
                client: client.clone(),
                stored: latest,
            },
            (Some((latest, _)), client) => Resume::Behind {
                client: client.cloned(),
                latest,
            },
        })
    }

    /// What the layer replays for a client whose last id is `client` on the stream of `key`,
    /// as the service looks it up: `None` when it does not look (no log here; with a stream
    /// per id, a log it does not follow).
    fn logged(&self, key: &StreamKey, client: &EventId, per_id: bool) -> Option<Peeked> {
        let registry = &self.shared.registry;
        let owner = key.owner.as_ref();
        // An id that logs of several of the owner's streams of the route hold: nothing is
        // replayed from either.
        if let (StreamKind::Route { shared: false }, Some(owner)) =
            (self.shared.config.stream, owner)
            && let Ok(route) = StreamName::new(registry::route_of(&key.stream))
            && registry.logged_route_stream(owner, &route, client).is_err()
        {
            return Some(Err(GapReason::NoHistory));
        }
        let slot = registry.get(owner.map(Owner::as_str), key.stream.as_str())?;
        let log = slot.existing_replay_log()?;
        if per_id && !log.follows() {
            return None;
        }
        Some(log.peek(client.as_str().as_bytes()))
    }

    /// The id the store holds for the stream of `key`, not looking at memory. Asked under the
    /// store timeout.
    pub async fn stored_event_id(&self, key: &StreamKey) -> Result<Option<EventId>, StoreError> {
        Ok(self.load(key).await?.map(|stored| stored.id))
    }

    /// Loads a key from the store under the store timeout, with panics caught and failures
    /// counted.
    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        let store = &self.shared.store;
        guarded(self.shared.store_timeout, async { store.load(key).await })
            .await
            .map_err(|failure| {
                self.shared
                    .metrics
                    .store_errors
                    .count(StoreOp::Load, failure.reason());
                failure.into_error()
            })
    }

    /// Drains every open SSE body of this tracker's layers without cancelling a request:
    ///
    /// - A stream its client can resume (its events carry ids, and its request does not say
    ///   MCP 2026-07-28 or later) ends at its next event boundary (never inside an event),
    ///   after a `retry: <ms>` field when `retry` is given, so that its client reconnects with
    ///   `Last-Event-ID` after that long. An idle body ends at once; a body in the middle of an
    ///   event ends when the event is complete, even inside a frame (the frame is cut after
    ///   the event). So does an MCP 2026-07-28 `subscriptions/listen` stream (its request
    ///   carries `Mcp-Method: subscriptions/listen`): its client re-issues the listen.
    /// - A stream its client cannot resume (no event with an id so far, or an MCP 2026-07-28
    ///   request stream, whose end cancels its request) is never ended early: it runs to its
    ///   own end, so an LLM answer or a tool call in flight completes.
    /// - Either is ended at the builder's
    ///   [`drain_timeout`](crate::SseTrackerBuilder::drain_timeout) (10 s) if still open:
    ///   inside an event, its client discards the incomplete event, whose id the tracker never
    ///   committed.
    ///
    /// Which one a body is: [`TrackedBody::is_resumable`](crate::TrackedBody::is_resumable).
    /// SSE responses that start afterwards follow the same rules. Every SSE response the layer
    /// wraps is drained, tracked or not, except one with a `Content-Encoding` (its bytes
    /// cannot be read: it keeps the server waiting; put the tracker's layer inside the
    /// compression layer).
    ///
    /// Later calls change nothing: the first call's `retry` and deadline hold.
    ///
    /// Call it when the server starts its graceful shutdown: open event streams otherwise keep
    /// it waiting for ever; the server then exits as soon as the last stream has ended. Each
    /// body's latest id is the last id its client received, so a client that reconnects (to
    /// another instance) with `Last-Event-ID` resumes exactly there; call
    /// [`shutdown`](Self::shutdown) afterwards to persist the final ids. Counted in
    /// `sse_tracker_streams_drained_total`, by `reason`: `boundary`, `completed` (ran to its
    /// end) or `deadline`.
    ///
    /// ```no_run
    /// # async fn run(app: axum::Router, tracker: tower_sse_tracker::SseTracker) -> std::io::Result<()> {
    /// use std::time::Duration;
    ///
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// let draining = tracker.clone();
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async move {
    ///         let _ = tokio::signal::ctrl_c().await;
    ///         draining.drain(Some(Duration::from_secs(1)));
    ///     })
    ///     .await?;
    /// let report = tracker.shutdown(Duration::from_secs(5)).await;
    /// # let _ = report;
    /// # Ok(())
    /// # }
    /// ```
    pub fn drain(&self, retry: Option<Duration>) {
        tracing::info!(?retry, "draining open SSE streams");
        self.shared
            .drain
            .start(retry, self.shared.config.drain_timeout);
    }

    /// Whether [`drain`](Self::drain) was called.
    pub fn is_draining(&self) -> bool {
        self.shared.drain.is_draining()
    }

    /// Stops the worker: it takes no more ids (open streams keep flowing; ids they commit from
    /// now on stay in memory), drains its channel, writes everything pending and retries until
    /// `timeout`, then reports, stream by stream, which latest ids are not in the store (see
    /// [`ShutdownReport`]). Call it after the server has stopped serving, or after
    /// draining open streams, so that no id comes after it. It waits for no back-off of the
    /// failures before it, a write already in flight that fails included: streams given up
    /// or waiting for a retry are written at once.
    ///
    /// A second call writes nothing: it waits for the first to end (up to its own `timeout`)
    /// and reports what the store still lacks; if the first is still running then, its report
    /// has [`worker_running`](ShutdownReport::worker_running) set and is never complete. A
    /// call after the worker task was lost (its runtime shut down) reports the same way, with
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
    /// The latest id is this tracker's own (its memory is at least as new as the store, or
    /// the store could not be read) and is not the client's, or the client sent no id. With
    /// one instance, or when a client always comes back to the instance that served it, the
    /// client missed the events after its id up to `latest`. With instances sharing a store,
    /// another instance may have served the client since and not written yet (within a flush
    /// interval, or while its store writes fail): the client is then ahead of `latest`; ids
    /// that can be ordered (counters) tell which.
    Behind {
        /// The client's `Last-Event-ID`, if it sent one.
        client: Option<EventId>,
        /// The stream's latest id.
        latest: EventId,
    },
    /// The latest id comes from the store alone (another instance served the stream last) and
    /// is not the client's. Either the client missed the events after its id up to `stored`,
    /// or the store lags behind the client: the instance that served it has not flushed yet
    /// (within a flush interval), or could not write. Ids that can be ordered (counters) tell
    /// which; otherwise replaying after the client's id is the safe answer.
    Unconfirmed {
        /// The client's `Last-Event-ID`.
        client: EventId,
        /// The id the store holds.
        stored: EventId,
    },
    /// With replay on: the stream's log holds events after the client's id, and the layer
    /// sends them, before the application's events (or, for a [detached](crate::Detach)
    /// stream, in its own answer). Continue after `last_event_id`.
    Replayed {
        /// The client's `Last-Event-ID`.
        client: EventId,
        /// How many events the layer replays.
        events: usize,
        /// The newest id among them (the client's when none carries one).
        last_event_id: EventId,
        /// The position of the last of them.
        position: Position,
    },
    /// With replay on: the stream's log cannot replay what the client missed, and the layer
    /// sent nothing of it (see [`GapReason`]).
    Gap {
        /// The client's `Last-Event-ID`.
        client: EventId,
        /// Why nothing was replayed.
        reason: GapReason,
        /// The stream's latest id, if memory or the store knows it.
        latest: Option<EventId>,
    },
}

/// Where [`SseTracker::resolve`]'s answer came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    Memory,
    Store,
}

/// Why [`SseTracker::subscribe`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The registry holds `max_streams` streams and every one has an open body.
    RegistryFull,
}

impl std::fmt::Display for SubscribeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SubscribeError::RegistryFull => {
                f.write_str("the registry is full of streams with open bodies")
            }
        }
    }
}

impl std::error::Error for SubscribeError {}
