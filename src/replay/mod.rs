//! Replay: a bounded log per tracked stream of the exact bytes of its events, and the missed
//! events sent again, before anything else, to a client that reconnects with `Last-Event-ID`;
//! or, when they are gone, a signal saying so.
//!
//! - this module: the policy, what a request learns ([`Replay`]), and the tracker's logs;
//! - `log`: one stream's log, and the budget shared by all;
//! - `ring`: a log's storage.
//!
//! Positions: each log has an epoch, a number that changes whenever its history restarts (a new
//! stream, a log evicted with its stream, an event too large to keep, a response that does not
//! continue the replayed history), and each event in it an offset, counted from 0 in its epoch.
//! A client names a position by its `Last-Event-ID`: the newest event of the log whose own
//! `id` field is that id.

mod from_store;
mod log;
mod ring;

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue};

use crate::key::EventId;
use crate::key::StreamKey;
use crate::metrics::ReplayMetrics;
use crate::registry::{LogQueue, Slot};
pub(crate) use from_store::{Looked, StoreReader, StoreTail, TailPermit, lookup};
pub(crate) use log::{
    AlsoCommit, Budget, Durable, FrameEvents, LocalTail, Peeked, Reach, ReadOnHandle, StoreBound,
    StorePoint, StreamLog, Writer,
};

/// The response header that says what the layer replayed, on an SSE response to a request
/// that carried a `Last-Event-ID`, with replay on (see
/// [`SseTrackerBuilder::replay`](crate::SseTrackerBuilder::replay)):
///
/// - `complete; events=N`: the response starts with the `N` events the client missed (`N` may
///   be 0), once each, byte for byte as they were first sent; then the application's events;
/// - `complete; events=N; tail`: the same, from a [detached](Detach) stream, answered by the
///   layer: then the stream's events as it produces them, until it ends (on a
///   `204 No Content`, with `events=0`: the stream has ended and the client missed nothing);
/// - `gap; reason=R`: the events after the client's id cannot be replayed, and none are; `R` is
///   `no_history`, `evicted`, `unknown_id` or `encoded` (see [`GapReason`]);
/// - `gap; reason=producer_lost; events=N`: with replay
///   [across instances](ReplayPolicy::across_instances), the instance producing a detached
///   stream died before its end reached the store: the `N` events the store holds after the
///   client's, then the end (a `204 No Content` when `N` is 0); what followed may be lost.
pub const REPLAY_HEADER: HeaderName = HeaderName::from_static("sse-replay");

/// Marks an SSE response whose stream goes on without its client: put it in the response's
/// extensions, with replay on. When the client disconnects before the body ends, the layer
/// keeps reading the body into the stream's log (in a task of its own, within
/// [`ReplayPolicy::max_detached`], [`detached_timeout`](ReplayPolicy::detached_timeout) and
/// [`detached_max_bytes`](ReplayPolicy::detached_max_bytes)), so that nothing the application
/// produces meanwhile is lost: an LLM answer, a tool call's progress.
///
/// A reconnect whose `Last-Event-ID` is in the log of such a stream is answered by the layer,
/// without calling the application: the events it missed, then the live ones as the body
/// produces them, until the body ends (the response then ends too). Once the body has ended,
/// its log is kept while its stream is tracked; a reconnect then gets the rest and a clean
/// end, and a reconnect that missed nothing gets `204 No Content`, which tells an
/// `EventSource` to stop reconnecting. The [`REPLAY_HEADER`] header of such a response says
/// `complete; events=N; tail` (`N` replayed before the live tail).
///
/// With [`StreamSource::event_id`](crate::StreamSource::event_id) (the MCP SDKs), the body is
/// logged into the first stream its ids name, and a GET whose `Last-Event-ID` names that
/// stream is answered from it: a POST stream resumed, as MCP 2025-11-25 clients do. With rmcp,
/// mark its responses (`tests/rmcp.rs` does): a call that outruns rmcp's 16-message cache
/// while its client is away then reaches the client whole.
///
/// ```
/// use axum::response::{IntoResponse, Response, sse::{Event, Sse}};
/// use futures_util::stream;
/// use tower_sse_tracker::Detach;
///
/// async fn answer() -> Response {
///     let tokens = stream::iter(["It", " depends", "."].into_iter().enumerate().map(|(n, t)| {
///         Ok::<_, std::convert::Infallible>(Event::default().id(n.to_string()).data(t))
///     }));
///     let mut response = Sse::new(tokens).into_response();
///     response.extensions_mut().insert(Detach);
///     response
/// }
/// # let _ = answer;
/// ```
///
/// For every response of a route, add it with a response mapping on that route (in axum,
/// `axum::middleware::map_response`).
///
/// Limits, in this version:
///
/// - the application is not asked about such a reconnect: the layer answers it for the
///   stream's owner (the session, or the owner your [`OwnerSource`](crate::OwnerSource)
///   reads), after the layers outside it (authentication) have let it through;
/// - the layer learns that a client left when the server drops its body (hyper does when a
///   write to the connection fails), or when its client reconnects first (a stream of one
///   owner): the body then leaves its old connection for a task of its own, so that a
///   connection nobody reads (a phone that changed networks, unseen until TCP gives up)
///   does not hold the stream; the old response ends when the server next polls it. Without
///   a free detached stream ([`max_detached`](ReplayPolicy::max_detached)) at that
///   reconnect, the body stays on the old connection, which hyper polls only while it takes
///   bytes; a feed's writer stays with its own client whoever reconnects;
/// - [`detached_max_bytes`](ReplayPolicy::detached_max_bytes) is checked after each frame:
///   a stream may pass it by one frame;
/// - a drain ends detached streams at their next event boundary, as it does attached ones;
/// - two answers of one owner on one route at once are two streams (`"GET /answer #2"`); when
///   their ids repeat (each counting from 1), a reconnect cannot tell which it resumes, and
///   gets the gap signal: give each answer ids of its own.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Detach;

/// How much history the replay logs keep (see
/// [`SseTrackerBuilder::replay`](crate::SseTrackerBuilder::replay)).
///
/// Each tracked stream's log keeps its newest events, at most [`max_events`](Self::max_events)
/// of them and [`max_stream_bytes`](Self::max_stream_bytes) bytes; all logs of a tracker
/// together hold at most [`max_total_bytes`](Self::max_total_bytes) of heap, the oldest
/// history of any stream going first when they would hold more.
///
/// ```
/// use std::num::NonZeroUsize;
/// use tower_sse_tracker::ReplayPolicy;
///
/// let policy = ReplayPolicy::new()
///     .max_events(NonZeroUsize::new(256).unwrap())
///     .max_total_bytes(NonZeroUsize::new(256 << 20).unwrap())
///     .gap_event("replay-gap");
/// # let _ = policy;
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplayPolicy {
    pub(crate) max_events: usize,
    pub(crate) max_stream_bytes: usize,
    pub(crate) max_total_bytes: usize,
    pub(crate) gap_event: Option<String>,
    pub(crate) max_detached: usize,
    pub(crate) detached_timeout: Duration,
    pub(crate) detached_max_bytes: usize,
    pub(crate) across_instances: bool,
    pub(crate) durable: bool,
}

impl Default for ReplayPolicy {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayPolicy {
    /// The default policy: 1024 events and 1 MiB per stream, 64 MiB in all, no gap event; at
    /// most 64 [detached](Detach) streams, each read for at most 10 minutes and 16 MiB.
    pub fn new() -> Self {
        Self {
            max_events: 1024,
            max_stream_bytes: 1 << 20,
            max_total_bytes: 64 << 20,
            gap_event: None,
            max_detached: 64,
            detached_timeout: Duration::from_secs(600),
            detached_max_bytes: 16 << 20,
            across_instances: false,
            durable: false,
        }
    }

    /// The most [detached](Detach) streams read at once (default 64; 0: none is). A client
    /// that leaves a stream marked [`Detach`] while this many are read has its body dropped,
    /// as without the mark (counted in `sse_tracker_replay_detached_total{outcome="refused"}`).
    pub fn max_detached(mut self, streams: usize) -> Self {
        self.max_detached = streams;
        self
    }

    /// How long a [detached](Detach) stream is read at most, from its client's departure
    /// (default 10 minutes); then its body is dropped, and its log keeps what it logged.
    pub fn detached_timeout(mut self, timeout: Duration) -> Self {
        self.detached_timeout = timeout;
        self
    }

    /// How many bytes of a [detached](Detach) stream are read at most, from its client's
    /// departure (default 16 MiB): what the application sends, not the layer's heartbeats;
    /// then its body is dropped, and its log keeps what it logged (its newest events, within
    /// [`max_stream_bytes`](Self::max_stream_bytes)).
    pub fn detached_max_bytes(mut self, bytes: NonZeroUsize) -> Self {
        self.detached_max_bytes = bytes.get();
        self
    }

    /// Replays [detached](Detach) streams from any instance that shares the tracker's store
    /// (default off).
    ///
    /// - **Writes.** At each flush, the worker appends the events of every detached stream
    ///   that has an owner to the store's log of the stream (one call per flush and per
    ///   `max_batch` streams, in the background, with its own back-off: a stream never waits
    ///   for the store), then its end mark when its body ends or stops (a drain, a bound, an
    ///   error). It renews this instance's lease in the store each second (each flush, when
    ///   that is longer), in a call of its own; a lease runs two renewals and two store
    ///   timeouts (12 s by default).
    /// - **Reconnects.** A reconnect this instance cannot replay (it holds no log of the
    ///   stream, or its log lacks the client's event) is looked up in the store first, under
    ///   the store timeout; the application's future is made, and dropped unpolled when the
    ///   store answers. A client may name an event its producer has not appended yet: the
    ///   look-up waits up to three flush intervals for it; a read that fails (a Redis
    ///   Cluster failing over) is tried again each flush interval for up to the store timeout
    ///   (a store that hangs: one timeout). The layer then answers as for a
    ///   detached stream here: the events missed, the stream followed in the store (one read
    ///   per flush interval) until its end, `204` once the client has it all. At most
    ///   [`max_detached`](Self::max_detached) reconnects follow the store at once; beyond,
    ///   the application answers.
    /// - **The window.** An instance that dies takes with it the events its clients may have
    ///   received that are not in the store yet: those of its last flush interval, and more
    ///   while its appends were failing. A reader elsewhere gets what the store holds, then
    ///   the gap signal ([`GapReason::ProducerLost`]) once the lease has run out (or at once
    ///   for a stream its producer stopped): the gap event, when the policy names one, ends
    ///   the response, and the reconnect that follows carries `gap; reason=producer_lost` (the
    ///   application answers it). A client that reconnects elsewhere within a stream's first
    ///   flush finds nothing in the store: `gap; reason=no_history`. [`durable`](Self::durable)
    ///   closes the window: no client gets an event before the store holds it.
    /// - **Limits.** Epochs come from each instance's clock: the instances' clocks must agree
    ///   to within the time between two histories of one stream. Else the store refuses the
    ///   appends of the newer history from the instance whose clock is behind (it keeps the
    ///   highest epoch): counted in `sse_tracker_replay_store_refused_total` and logged, and
    ///   that history is not replayable elsewhere. Give each answer ids of its
    ///   own: an instance holding an older history with the client's id replays from it. A
    ///   look-up reads at most [`max_events`](Self::max_events) events of the store's log
    ///   (keep `RedisStore::with_log_max_events` at most that).
    ///
    /// Needs a store that keeps replay logs ([`InMemoryStore`](crate::store::InMemoryStore)
    /// shared by the trackers of one process, or `RedisStore`); with one that does not,
    /// every append fails and is counted in
    /// `sse_tracker_store_errors_total{op="append"}`.
    ///
    /// ```
    /// use tower_sse_tracker::ReplayPolicy;
    ///
    /// let policy = ReplayPolicy::new().across_instances(true);
    /// # let _ = policy;
    /// ```
    pub fn across_instances(mut self, on: bool) -> Self {
        self.across_instances = on;
        self
    }

    /// With replay [across instances](Self::across_instances): an event of a
    /// [detached](Detach) stream reaches any client only once the store holds it (default
    /// off). Then no instance's death loses an event that a client has: whatever a client
    /// got, every instance can replay. This holds for the response that streams the body, and
    /// for replays and tails of its log on this instance.
    ///
    /// The cost is latency: the worker appends once per flush, for every stream at once (a
    /// group commit), so an event waits about half a [flush
    /// interval](crate::SseTrackerBuilder::flush_interval) and one store call
    /// (`BENCHMARKS.md` has the figures). The response keeps reading its body meanwhile, up to
    /// half the stream's log bounds ahead of the store. When the store has not confirmed an
    /// event within a flush interval and twice the [store
    /// timeout](crate::SseTrackerBuilder::store_timeout), or the log dropped it before the store
    /// got it, or another response took the stream's log over, the response ends before it
    /// (counted in `sse_tracker_replay_durable_cut_total`); the client's reconnect gets what
    /// the store holds. A reconnect to a history whose body stopped (a bound, a drain) before
    /// the store had all of it follows the log until the store has the rest, then ends; the
    /// next reconnect continues the history. The clean end of a stream waits for the store's
    /// end mark. Streams that do not go to the store (feeds, streams not marked [`Detach`])
    /// are not held.
    ///
    /// What the store confirms is an append it took. One it refuses (a newer history holds the
    /// stream's log: see the limits of [`across_instances`](Self::across_instances)) ends the
    /// response before the events refused, and a reconnect to that history gets
    /// `gap; reason=no_history`. While an instance's clock runs behind the one that wrote the
    /// stream's newest history, each new history of that stream from it is refused in turn:
    /// its responses end after their first flush, until the clocks agree or the store's log
    /// of the newer history expires.
    ///
    /// [`build`](crate::SseTrackerBuilder::build) fails when it is on without
    /// `across_instances`.
    ///
    /// ```
    /// use tower_sse_tracker::ReplayPolicy;
    ///
    /// let policy = ReplayPolicy::new().across_instances(true).durable(true);
    /// # let _ = policy;
    /// ```
    pub fn durable(mut self, on: bool) -> Self {
        self.durable = on;
        self
    }

    /// The most events one stream's log keeps (default 1024).
    pub fn max_events(mut self, events: NonZeroUsize) -> Self {
        self.max_events = events.get();
        self
    }

    /// The most bytes one stream's log keeps: its events' bytes, with their ids (default
    /// 1 MiB, at most 1 GiB and at most [`max_total_bytes`](Self::max_total_bytes), else
    /// [`build`](crate::SseTrackerBuilder::build) fails). An event larger than this is not
    /// kept, and the stream's history restarts after it.
    pub fn max_stream_bytes(mut self, bytes: NonZeroUsize) -> Self {
        self.max_stream_bytes = bytes.get();
        self
    }

    /// The most heap all logs of the tracker hold together (default 64 MiB): their bytes, in
    /// chunks of 1 KiB, and an index of 4 bytes per event. Beyond it, the oldest history of
    /// any stream goes first (to within a chunk). Each stream's log also costs about 150 bytes
    /// of its own, counted with the stream (see
    /// [`SseTracker::estimated_memory_bytes`](crate::SseTracker::estimated_memory_bytes)).
    pub fn max_total_bytes(mut self, bytes: NonZeroUsize) -> Self {
        self.max_total_bytes = bytes.get();
        self
    }

    /// When a replay is impossible, the response also starts with one event of this type
    /// (`event: {name}`), whose data is the reason (`no_history`, `evicted` or `unknown_id`;
    /// `producer_lost` ends a response, after the events the store held)
    /// and which has no `id` field (it leaves the client's last event id as it was). Off by
    /// default: the [`REPLAY_HEADER`] header says it in any case. The name must be 1 to 64
    /// bytes, none of them CR, LF or NUL.
    pub fn gap_event(mut self, name: impl Into<String>) -> Self {
        self.gap_event = Some(name.into());
        self
    }

    /// Why the policy cannot be used, if it cannot.
    pub(crate) fn check(&self) -> Result<(), String> {
        if self.durable && !self.across_instances {
            return Err("replay durable needs across_instances: it waits for the store".into());
        }
        if self.max_stream_bytes > MAX_STREAM_BYTES {
            return Err(format!(
                "replay max_stream_bytes {} is above {MAX_STREAM_BYTES}",
                self.max_stream_bytes
            ));
        }
        if self.max_stream_bytes > self.max_total_bytes {
            return Err(format!(
                "replay max_stream_bytes {} is above max_total_bytes {}",
                self.max_stream_bytes, self.max_total_bytes
            ));
        }
        if let Some(name) = &self.gap_event
            && (name.is_empty()
                || name.len() > 64
                || name.bytes().any(|b| matches!(b, 0 | b'\r' | b'\n')))
        {
            return Err(format!(
                "replay gap_event {name:?} must be 1 to 64 bytes without CR, LF or NUL"
            ));
        }
        Ok(())
    }
}

/// The largest `max_stream_bytes`: 1 GiB.
const MAX_STREAM_BYTES: usize = 1 << 30;

/// Where an event lies in its stream's log: the log's epoch (a new one whenever the stream's
/// history restarts) and the event's offset in it, counted from 0.
///
/// ```
/// use tower_sse_tracker::{Position, Replay};
///
/// fn continue_after(replay: &Replay) -> Option<Position> {
///     match replay {
///         Replay::Complete { position, .. } => Some(*position),
///         _ => None,
///     }
/// }
/// # let _ = continue_after;
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct Position {
    /// The epoch of the stream's history.
    pub epoch: u64,
    /// The event's offset in the epoch.
    pub offset: u64,
}

/// Why the layer could not replay what a client missed. In every case it replays nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GapReason {
    /// The layer holds no history of the stream the request addresses: it never logged one
    /// here, or the stream was evicted with its log, or the layer cannot tell which of an
    /// owner's streams the request resumes.
    NoHistory,
    /// The client's event is older than the history kept: the stream's bounds or the
    /// tracker's budget dropped it. (Once a log has dropped events, it cannot tell an id it
    /// dropped from one it never held: both are this.)
    Evicted,
    /// The stream's history does not hold the client's id: the id is from an earlier history
    /// of the stream (a response that did not continue it restarted it), or was never sent on
    /// it.
    UnknownId,
    /// The response has a `Content-Encoding`: the layer cannot put events into compressed
    /// bytes (add the tracker inside the compression layer).
    Encoded,
    /// With replay [across instances](ReplayPolicy::across_instances): the instance that
    /// produced the stream stopped before the stream's end reached the store: its lease in
    /// the store ran out (it died, or could not renew it), or it stopped the stream (a drain,
    /// a bound, an error). The events the store holds after the client's are replayed (the
    /// one case where a gap comes with events), then nothing: the stream's tail may be lost.
    ProducerLost,
}

impl GapReason {
    /// The reason as the [`REPLAY_HEADER`] header and the metrics write it.
    pub fn as_str(self) -> &'static str {
        match self {
            GapReason::NoHistory => "no_history",
            GapReason::Evicted => "evicted",
            GapReason::UnknownId => "unknown_id",
            GapReason::Encoded => "encoded",
            GapReason::ProducerLost => "producer_lost",
        }
    }

    pub(crate) const ALL: [GapReason; 5] = [
        GapReason::NoHistory,
        GapReason::Evicted,
        GapReason::UnknownId,
        GapReason::Encoded,
        GapReason::ProducerLost,
    ];
}

impl fmt::Display for GapReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the layer replays to a request that carries a `Last-Event-ID`, with replay on: put in
/// the request extensions, so that the application knows where its response continues.
///
/// On [`Complete`](Replay::Complete), the response's body starts with the missed events; an
/// application that can resume by itself continues after
/// [`last_event_id`](Replay::Complete::last_event_id), and does not send them again. On
/// [`Gap`](Replay::Gap), nothing was replayed: the application resumes from its own history
/// if it has one, or starts afresh; the client is told by the [`REPLAY_HEADER`] header (and
/// the gap event, if the policy has one).
///
/// ```
/// # #[cfg(feature = "axum")] {
/// use axum::Extension;
/// use tower_sse_tracker::Replay;
///
/// async fn handler(replay: Option<Extension<Replay>>) -> String {
///     match replay.map(|Extension(r)| r) {
///         Some(Replay::Complete { last_event_id, .. }) => format!("continue after {last_event_id}"),
///         Some(Replay::Gap(reason)) => format!("history gone ({reason}): start afresh"),
///         _ => "a new client".to_owned(),
///     }
/// }
/// # let _ = handler;
/// # }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Replay {
    /// The layer replays every event after the client's, once each, in order.
    Complete {
        /// How many events it replays (0 when the client missed none).
        events: usize,
        /// The client's last event id once they are sent: the newest id among them, or the
        /// request's `Last-Event-ID` when none of them carries one.
        last_event_id: EventId,
        /// The position of the last event replayed (of the client's own event when none is).
        position: Position,
    },
    /// The layer cannot replay, and replays nothing.
    Gap(GapReason),
}

/// A replay as the layer prepares it for a request: what the application learns, the bytes to
/// send first, and the writer of the log they came from, taken for the response's body, which
/// continues that history (a stream of one owner; for a stream that several bodies read at
/// once, the body that writes its log goes on writing it).
#[derive(Debug)]
pub(crate) struct Prepared {
    pub(crate) replay: Replay,
    pub(crate) bytes: Bytes,
    /// The events among `bytes` (those of a [`Replay::Complete`], or those held before a
    /// [`GapReason::ProducerLost`]).
    pub(crate) events: usize,
    writer: Option<Writer>,
    /// The stream is [detached](Detach) (or was, and has ended): the layer answers the
    /// request itself, following its log after the replay.
    pub(crate) tail: Option<Tail>,
}

/// A reader following a detached stream after a replay: in this instance's log, or in the
/// store's (replay across instances).
#[derive(Debug)]
pub(crate) enum Tail {
    Local(LocalTail),
    /// Boxed: it holds the store's handles, and most tails are local.
    Store(Box<StoreTail>),
}

impl Tail {
    /// See [`LocalTail::take_from_old_connection`]; a stream followed in the store has its
    /// body on another instance.
    pub(crate) fn take_from_old_connection(&mut self) {
        if let Tail::Local(tail) = self {
            tail.take_from_old_connection();
        }
    }

    /// Whether the stream ended and the reader has read all of it: nothing will follow.
    pub(crate) fn is_finished(&self) -> bool {
        match self {
            Tail::Local(tail) => tail.is_finished(),
            Tail::Store(tail) => tail.is_finished(),
        }
    }

    /// The next events, or `None` once nothing more will come.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        match self {
            Tail::Local(tail) => tail.poll_next(cx),
            Tail::Store(tail) => tail.poll_next(cx),
        }
    }
}

/// The replay state of one tracker: the policy, the budget of its logs, and the gap event.
#[derive(Debug)]
pub(crate) struct Replayer {
    pub(crate) budget: Arc<Budget>,
    /// The worker's queue of logs owing the store events, with replay across instances.
    to_store: Option<Arc<LogQueue>>,
    gap_event: Option<Box<str>>,
    /// Detached streams being read.
    pub(crate) detached: AtomicUsize,
    /// Reconnects following the store's log of a stream (replay across instances).
    store_tails: Arc<AtomicUsize>,
}

impl Replayer {
    /// The replay state for `policy`; `durable_wait` bounds the wait of a durable event for
    /// the store (see [`ReplayPolicy::durable`]).
    pub(crate) fn new(
        policy: ReplayPolicy,
        metrics: ReplayMetrics,
        queue: Arc<LogQueue>,
        durable_wait: Duration,
    ) -> Self {
        let gap_event = policy.gap_event.clone().map(String::into_boxed_str);
        let durable = (policy.durable && policy.across_instances).then_some(durable_wait);
        Self {
            to_store: policy.across_instances.then_some(queue),
            budget: Arc::new(Budget::new(policy, metrics).durable(durable)),
            gap_event,
            detached: AtomicUsize::new(0),
            store_tails: Arc::default(),
        }
    }

    /// A new log, for the slot of the stream `key`: its detached histories go to the store
    /// with replay across instances, when the stream has an owner (a feed, produced by every
    /// instance, has a log in each).
    pub(crate) fn new_log(&self, key: &StreamKey) -> Arc<StreamLog> {
        let store = self
            .to_store
            .as_ref()
            .filter(|_| key.owner.is_some())
            .map(|queue| StoreBound {
                key: key.clone(),
                queue: queue.clone(),
            });
        Arc::new(StreamLog::new(self.budget.clone(), store))
    }

    /// What a request whose `Last-Event-ID` is `id` gets from `log`, the log of the stream it
    /// addresses (`None`: none, or the layer cannot tell which). The response to it takes the
    /// log's writer now, from a body that writes it too with `take_over` (a stream of one
    /// owner), and, when the response follows a detached stream of one owner (`one_owner`),
    /// the body writing it from its old connection: see [`StreamLog::after`].
    pub(crate) fn prepare(
        &self,
        log: Option<&Arc<StreamLog>>,
        id: &EventId,
        take_over: bool,
        one_owner: bool,
    ) -> Prepared {
        let Some(log) = log else {
            return self.gap(GapReason::NoHistory);
        };
        match log.after(id.as_str().as_bytes(), take_over, one_owner) {
            log::Lookup::Found(found) => Prepared {
                replay: Replay::Complete {
                    events: found.events,
                    last_event_id: found.last_id.unwrap_or_else(|| id.clone()),
                    position: found.position,
                },
                bytes: found.bytes,
                events: found.events,
                writer: found.writer,
                tail: found.tail.map(Tail::Local),
            },
            log::Lookup::Gap(reason) => self.gap(reason),
        }
    }

    /// The replay cannot go out as prepared (`reason`): nothing of it is sent, and the log's
    /// writer it took is let go. (Also: the reason a gap already prepared is given, when a
    /// later look-up knows better.)
    pub(crate) fn cancel(&self, prepared: &mut Prepared, reason: GapReason) {
        *prepared = self.gap(reason);
    }

    /// The writer of the log that the body of a response streaming into `slot` writes, if any:
    /// the one its replay took (it continues that history, whichever of the owner's streams
    /// the body streams into), else the slot's, whose history then restarts (see
    /// [`StreamLog::writer`]). `None` (counted) when another body writes the slot's log.
    pub(crate) fn writer_for(
        &self,
        slot: &Slot,
        prepared: Option<&mut Prepared>,
        span: &tracing::Span,
    ) -> Option<Writer> {
        if let Some(writer) = prepared.and_then(|prepared| prepared.writer.take()) {
            return Some(writer);
        }
        let writer = slot.replay_log(|| self.new_log(slot.key())).writer();
        if writer.is_none() {
            self.budget.metrics.unlogged.increment(1);
            tracing::debug!(
                parent: span,
                "SSE stream not logged for replay: another body of the stream writes its log"
            );
        }
        writer
    }

    fn gap(&self, reason: GapReason) -> Prepared {
        Prepared {
            replay: Replay::Gap(reason),
            bytes: self.gap_bytes(reason),
            events: 0,
            writer: None,
            tail: None,
        }
    }

    /// The gap event for `reason`, if the policy names one.
    fn gap_bytes(&self, reason: GapReason) -> Bytes {
        match &self.gap_event {
            Some(name) => Bytes::from(format!("event: {name}\ndata: {reason}\n\n")),
            None => Bytes::new(),
        }
    }

    /// Whether reconnects this instance holds no log for are looked up in the store.
    pub(crate) fn across_instances(&self) -> bool {
        self.to_store.is_some()
    }

    /// A place among the reconnects that follow the store (counted when there is none).
    pub(crate) fn store_permit(&self) -> Option<TailPermit> {
        let permit = TailPermit::try_take(&self.store_tails, self.budget.policy.max_detached);
        if permit.is_none() {
            tracing::debug!(
                bound = self.budget.policy.max_detached,
                "reconnect not looked up in the store: as many follow it as max_detached allows"
            );
        }
        permit
    }

    /// The replay of a reconnect whose client's last id is `id` from what the store holds
    /// (`looked`): the events after the client's, then the stream followed in the store until
    /// its end; or, when its producer is lost, those events and the gap signal. `Err` when
    /// the layer does not answer (the application does), with the reason to give the client
    /// when there is one: a lost producer with nothing more to replay (a `204` would tell an
    /// `EventSource` the stream is complete).
    pub(crate) fn prepare_from_store(
        &self,
        looked: Looked,
        id: &EventId,
        reader: StoreReader,
        every: std::time::Duration,
        permit: TailPermit,
    ) -> Result<Prepared, Option<GapReason>> {
        let timing = (every, self.budget.policy.detached_timeout);
        let Looked::Found { log, after, lost } = looked else {
            return Err(None);
        };
        let missed = &log.events[after..];
        if lost && missed.is_empty() {
            return Err(Some(GapReason::ProducerLost));
        }
        let mut bytes = Vec::with_capacity(missed.iter().map(|e| e.bytes.len()).sum());
        for event in missed {
            bytes.extend_from_slice(&event.bytes);
        }
        let events = missed.len();
        if lost {
            let mut prepared = self.gap(GapReason::ProducerLost);
            bytes.extend_from_slice(&prepared.bytes);
            prepared.bytes = Bytes::from(bytes);
            prepared.events = events;
            let tail = StoreTail::new(reader, &log, true, Bytes::new(), timing, permit);
            prepared.tail = Some(Tail::Store(Box::new(tail)));
            return Ok(prepared);
        }
        let last_id = missed.iter().rev().find_map(|e| e.id.clone());
        let offset = missed
            .last()
            .map_or(log.events[after - 1].offset, |e| e.offset);
        let gap = self.gap_bytes(GapReason::ProducerLost);
        let finished = log.end == Some(crate::store::LogEnd::Finished);
        let tail = StoreTail::new(reader, &log, finished, gap, timing, permit);
        Ok(Prepared {
            replay: Replay::Complete {
                events,
                last_event_id: last_id.unwrap_or_else(|| id.clone()),
                position: Position {
                    epoch: log.epoch,
                    offset,
                },
            },
            bytes: Bytes::from(bytes),
            events,
            writer: None,
            tail: Some(Tail::Store(Box::new(tail))),
        })
    }

    /// Counts a replay sent, and gives the value of its [`REPLAY_HEADER`] header.
    pub(crate) fn sent(&self, prepared: &Prepared) -> HeaderValue {
        let metrics = &self.budget.metrics;
        match prepared.replay {
            Replay::Complete { events, .. } => {
                metrics.replayed(events, prepared.bytes.len());
                let tail = if prepared.tail.is_some() {
                    "; tail"
                } else {
                    ""
                };
                HeaderValue::from_str(&format!("complete; events={events}{tail}"))
                    .expect("ASCII digits")
            }
            Replay::Gap(GapReason::ProducerLost) => {
                metrics.gap(GapReason::ProducerLost);
                HeaderValue::from_str(&format!(
                    "gap; reason=producer_lost; events={}",
                    prepared.events
                ))
                .expect("ASCII digits")
            }
            Replay::Gap(reason) => {
                metrics.gap(reason);
                HeaderValue::from_str(&format!("gap; reason={reason}")).expect("ASCII")
            }
        }
    }
}
