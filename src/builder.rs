//! [`SseTrackerBuilder`]: every setting of a tracker, validated, with its default.

use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Duration;

use crate::identity::{OwnerSource, StreamSource};
use crate::registry::Limits;
use crate::replay::ReplayPolicy;
use crate::shared::{Config, Heartbeat, Shared};
use crate::store::{DynStore, InMemoryStore, Store};
use crate::tracker::SseTracker;
use crate::worker::retry::RetryPolicy;
use crate::worker::{WorkerConfig, WorkerTask};

/// The largest `channel_capacity`: a larger channel would need more than the bodies can ever
/// put in it (each stream is in it at most once).
const MAX_CHANNEL_CAPACITY: usize = 1 << 24;
/// The shortest heartbeat interval.
const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// The longest heartbeat comment, in bytes.
const MAX_HEARTBEAT_COMMENT_LEN: usize = 256;
/// The largest `max_id_len`: 64 KiB.
const MAX_ID_LEN_LIMIT: usize = 64 * 1024;
/// The longest heartbeat interval, send timeout, flush interval, store timeout, drain timeout
/// and retry delay: one day.
const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// The longest idle TTL: one year.
const MAX_IDLE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);

// The defaults, stated on each setter.
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
const HEARTBEAT_COMMENT: &str = "keep-alive";
const MAX_ID_LEN: usize = crate::scan::DEFAULT_MAX_ID_LEN;
const MAX_STREAMS: NonZeroUsize = NonZeroUsize::new(100_000).unwrap();
const CHANNEL_CAPACITY: usize = 1024;
const SEND_TIMEOUT: Duration = Duration::from_millis(100);
const MAX_BATCH: NonZeroUsize = NonZeroUsize::new(256).unwrap();
const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
const IDLE_TTL: Duration = Duration::from_secs(300);
const MAX_STREAM_NAMES: NonZeroUsize = NonZeroUsize::new(10_000).unwrap();
const STORE_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_PENDING_EVICTED: usize = 10_000;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// A setting refused by [`SseTrackerBuilder::build`]: each variant holds the refused value,
/// and its message says the accepted range. The `Debug` form is the variant's name and the
/// message, which is what `fn main() -> Result<(), Box<dyn Error>>` prints:
///
/// ```
/// use std::time::Duration;
/// use tower_sse_tracker::SseTracker;
///
/// let error = SseTracker::builder()
///     .flush_interval(Duration::ZERO)
///     .build_with_worker()
///     .unwrap_err();
/// assert_eq!(
///     format!("{error:?}"),
///     r#"FlushInterval("flush_interval 0ns must be longer than zero and at most one day")"#
/// );
/// ```
#[derive(Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// `heartbeat_interval` is below 10 ms or above one day.
    HeartbeatInterval(Duration),
    /// `heartbeat_comment` is longer than 256 bytes or holds CR, LF or NUL.
    HeartbeatComment(String),
    /// `max_id_len` is 0 or above 64 KiB.
    MaxIdLen(usize),
    /// `channel_capacity` is 0 or above 2^24.
    ChannelCapacity(usize),
    /// `send_timeout` is zero or above one day.
    SendTimeout(Duration),
    /// `flush_interval` is zero or above one day.
    FlushInterval(Duration),
    /// `store_timeout` is zero or above one day.
    StoreTimeout(Duration),
    /// `idle_ttl` is zero or above one year.
    IdleTtl(Duration),
    /// `drain_timeout` is above one day.
    DrainTimeout(Duration),
    /// The retry policy has a zero base delay, a maximum below its base, or a maximum above
    /// one day.
    Retry(RetryPolicy),
    /// The replay policy's `max_stream_bytes` is above 1 GiB or above its `max_total_bytes`,
    /// its gap event's name is empty, longer than 64 bytes, or holds CR, LF or NUL, or it is
    /// `durable` without `across_instances`.
    Replay(ReplayPolicy),
}

impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            ConfigError::HeartbeatInterval(_) => "HeartbeatInterval",
            ConfigError::HeartbeatComment(_) => "HeartbeatComment",
            ConfigError::MaxIdLen(_) => "MaxIdLen",
            ConfigError::ChannelCapacity(_) => "ChannelCapacity",
            ConfigError::SendTimeout(_) => "SendTimeout",
            ConfigError::FlushInterval(_) => "FlushInterval",
            ConfigError::StoreTimeout(_) => "StoreTimeout",
            ConfigError::IdleTtl(_) => "IdleTtl",
            ConfigError::DrainTimeout(_) => "DrainTimeout",
            ConfigError::Retry(_) => "Retry",
            ConfigError::Replay(_) => "Replay",
        };
        f.debug_tuple(name).field(&self.to_string()).finish()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let duration = |f: &mut fmt::Formatter<'_>, setting: &str, d: &Duration, range: &str| {
            write!(f, "{setting} {d:?} must be {range}")
        };
        match self {
            ConfigError::HeartbeatInterval(d) => write!(
                f,
                "heartbeat_interval {d:?} must be between {MIN_HEARTBEAT_INTERVAL:?} and \
                 {MAX_DURATION:?}; use heartbeat_interval(None) to disable heartbeats"
            ),
            ConfigError::HeartbeatComment(text) => write!(
                f,
                "heartbeat_comment {text:?} must be at most {MAX_HEARTBEAT_COMMENT_LEN} bytes \
                 with no CR, LF or NUL"
            ),
            ConfigError::MaxIdLen(n) => {
                write!(f, "max_id_len {n} must be between 1 and {MAX_ID_LEN_LIMIT}")
            }
            ConfigError::ChannelCapacity(n) => write!(
                f,
                "channel_capacity {n} must be between 1 and {MAX_CHANNEL_CAPACITY}"
            ),
            ConfigError::SendTimeout(d) => {
                duration(f, "send_timeout", d, "longer than zero and at most one day")
            }
            ConfigError::FlushInterval(d) => duration(
                f,
                "flush_interval",
                d,
                "longer than zero and at most one day",
            ),
            ConfigError::StoreTimeout(d) => duration(
                f,
                "store_timeout",
                d,
                "longer than zero and at most one day",
            ),
            ConfigError::IdleTtl(d) => duration(
                f,
                "idle_ttl",
                d,
                "longer than zero and at most a year; use idle_ttl(None) to keep streams",
            ),
            ConfigError::DrainTimeout(d) => duration(f, "drain_timeout", d, "at most one day"),
            ConfigError::Retry(p) => write!(
                f,
                "retry policy base {:?} must be longer than zero and at most its max {:?}, \
                 itself at most one day",
                p.base(),
                p.max()
            ),
            ConfigError::Replay(p) => match p.check() {
                Err(why) => f.write_str(&why),
                Ok(()) => f.write_str("replay policy refused"),
            },
        }
    }
}

impl std::error::Error for ConfigError {}

/// The store given to the builder.
#[derive(Clone)]
struct StoreChoice(Arc<dyn DynStore>);

impl fmt::Debug for StoreChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Store")
    }
}

/// Builds an [`SseTracker`]. Every method takes and returns the builder and states its
/// default; [`build`](Self::build) checks all the settings and names the first one it refuses
/// ([`ConfigError`]).
///
/// ```
/// use std::num::NonZeroUsize;
/// use std::time::Duration;
/// use tower_sse_tracker::{OwnerSource, RetryPolicy, SseTracker, store::InMemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder()
///     .store(InMemoryStore::new())
///     .retry(RetryPolicy::exponential(Duration::from_millis(50), Duration::from_secs(5), 8))
///     .owner(OwnerSource::session_header(http::HeaderName::from_static("x-session")))
///     .heartbeat_interval(Some(Duration::from_secs(20)))
///     .heartbeat_comment("ping")
///     .max_streams(NonZeroUsize::new(10_000).unwrap())
///     .build()
///     .expect("valid settings");
///
/// let err = SseTracker::builder().flush_interval(Duration::ZERO).build().unwrap_err();
/// assert_eq!(err.to_string(), "flush_interval 0ns must be longer than zero and at most one day");
/// # }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until build() is called"]
pub struct SseTrackerBuilder {
    owner: OwnerSource,
    stream: StreamSource,
    heartbeat_interval: Option<Duration>,
    heartbeat_comment: String,
    max_id_len: usize,
    max_streams: NonZeroUsize,
    proxy_buffering: bool,
    store: Option<StoreChoice>,
    channel_capacity: usize,
    send_timeout: Duration,
    max_batch: NonZeroUsize,
    flush_interval: Duration,
    retry: RetryPolicy,
    idle_ttl: Option<Duration>,
    max_stream_names: NonZeroUsize,
    store_timeout: Duration,
    max_pending_evicted: usize,
    drain_timeout: Duration,
    replay: Option<ReplayPolicy>,
}

impl Default for SseTrackerBuilder {
    fn default() -> Self {
        Self {
            owner: OwnerSource::default(),
            stream: StreamSource::default(),
            heartbeat_interval: Some(HEARTBEAT_INTERVAL),
            heartbeat_comment: HEARTBEAT_COMMENT.to_owned(),
            max_id_len: MAX_ID_LEN,
            max_streams: MAX_STREAMS,
            proxy_buffering: false,
            store: None,
            channel_capacity: CHANNEL_CAPACITY,
            send_timeout: SEND_TIMEOUT,
            max_batch: MAX_BATCH,
            flush_interval: FLUSH_INTERVAL,
            retry: RetryPolicy::default(),
            idle_ttl: Some(IDLE_TTL),
            max_stream_names: MAX_STREAM_NAMES,
            store_timeout: STORE_TIMEOUT,
            max_pending_evicted: MAX_PENDING_EVICTED,
            drain_timeout: DRAIN_TIMEOUT,
            replay: None,
        }
    }
}

impl SseTrackerBuilder {
    /// Who a stream belongs to: the first half of its key. Default:
    /// [`OwnerSource::session_header`] of `mcp-session-id` (a request without one is
    /// anonymous: its `GET` reads its route's feed).
    pub fn owner(mut self, source: OwnerSource) -> Self {
        self.owner = source;
        self
    }

    /// Which stream of its owner a response is: the second half of its key. Default:
    /// [`StreamSource::route`].
    pub fn stream(mut self, source: StreamSource) -> Self {
        self.stream = source;
        self
    }

    /// How long the inner body may stay silent before a heartbeat comment is sent; `None`
    /// disables heartbeats. 10 ms to one day. Default: 15 s.
    pub fn heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The text of the heartbeat comment: the line sent is `: {text}` (just `:` when empty).
    /// At most 256 bytes, without CR, LF or NUL. Default: `keep-alive`.
    pub fn heartbeat_comment(mut self, text: impl Into<String>) -> Self {
        self.heartbeat_comment = text.into();
        self
    }

    /// Ids longer than this many bytes are ignored (and counted in
    /// `sse_tracker_ids_rejected_total`), which bounds the memory each stream can make the
    /// tracker hold. Also the limit for the `Last-Event-ID` request header. 1 byte to 64 KiB.
    /// Default: 1024.
    pub fn max_id_len(mut self, bytes: usize) -> Self {
        self.max_id_len = bytes;
        self
    }

    /// The most streams tracked at once, with or without an open body. A stream with an open
    /// body (live) is never evicted. A new stream in a full registry evicts the least recently
    /// used stream without one (counted in `sse_tracker_streams_evicted_total{reason="lru"}`);
    /// an evicted stream's latest id still reaches the store (see
    /// [`max_pending_evicted`](Self::max_pending_evicted)). When every tracked stream is live, a
    /// new stream is served untracked (the bytes pass through and heartbeats are sent, but its
    /// ids are not recorded) and counted in
    /// `sse_tracker_untracked_streams_total{reason="registry_full"}`. About 400 bytes a
    /// stream. Default: 100 000.
    pub fn max_streams(mut self, streams: NonZeroUsize) -> Self {
        self.max_streams = streams;
        self
    }

    /// Whether proxies may buffer SSE responses. When not (the default), SSE responses get
    /// `X-Accel-Buffering: no` unless they set it, which stops nginx from buffering a stream.
    pub fn proxy_buffering(mut self, allowed: bool) -> Self {
        self.proxy_buffering = allowed;
        self
    }

    /// Where the worker persists latest ids. Pass an `Arc` to keep a handle on the store.
    /// Default: an [`InMemoryStore`].
    pub fn store<S: Store>(mut self, store: S) -> Self {
        self.store = Some(StoreChoice(Arc::new(store)));
        self
    }

    /// Capacity of the bounded channel from the bodies to the worker, in records: 1 to 2^24.
    /// Its memory grows with what it holds, not with its capacity. Default: 1024.
    pub fn channel_capacity(mut self, records: usize) -> Self {
        self.channel_capacity = records;
        self
    }

    /// The longest a body waits for room in a full channel before it pulls its next frame
    /// (the stream's slot reaches the worker at once either way: the wait only paces a body
    /// whose worker cannot run). Longer than zero, at most one day. Default: 100 ms.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The most streams per store call. A flush writes every stream that changed since the
    /// last one, in as many calls as it needs: this bounds the size of one call, not how much
    /// a flush coalesces. Default: 256.
    pub fn max_batch(mut self, streams: NonZeroUsize) -> Self {
        self.max_batch = streams;
        self
    }

    /// How often the worker writes what it has gathered: the coalescing window. A stream that
    /// commits many ids within one interval is written once, with its latest id. Longer than
    /// zero, at most one day. Default: 100 ms.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// How long a stream with no open body and no activity stays in the registry; `None`
    /// keeps streams until the registry is full. The worker sweeps idle streams on its ticks.
    /// Longer than zero, at most a year. Default: 5 minutes.
    pub fn idle_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// Size of the table that interns stream names (least recently used names leave first):
    /// streams with one name share one allocation. It grows with the names it holds.
    /// Default: 10 000.
    pub fn max_stream_names(mut self, names: NonZeroUsize) -> Self {
        self.max_stream_names = names;
        self
    }

    /// How failed store writes are retried, and how long the worker waits before it calls a
    /// store again after a failed call (the policy's delay, doubling with each failure in a
    /// row, up to its maximum, at most one day). Default: [`RetryPolicy::default`] (100 ms
    /// doubling to 10 s, 5 retries).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The deadline of one store call (`save`, `touch_sessions`, and the `load` of
    /// [`SseTracker::resolve`]). A call past it is dropped and counts as a failed call:
    /// `sse_tracker_store_errors_total{reason="timeout"}`, a log, a retry. Longer than zero,
    /// at most one day. Default: 5 s.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// The most evicted streams whose latest id is not in the store yet that the tracker keeps
    /// for a later write (while the store is failing or slow and new streams keep evicting old
    /// ones). When more are evicted, the oldest is dropped: counted in
    /// `sse_tracker_ids_dropped_total{reason="evicted_overflow"}`, logged with the count, and
    /// counted in the [`ShutdownReport`](crate::ShutdownReport). About 250 bytes each.
    /// Default: 10 000.
    pub fn max_pending_evicted(mut self, streams: usize) -> Self {
        self.max_pending_evicted = streams;
        self
    }

    /// How long, after [`SseTracker::drain`](crate::SseTracker::drain), a body may stay open:
    /// one in the middle of an event, or one its client cannot resume (which the drain lets
    /// run to its end). Then it ends there: its client discards an incomplete event (an
    /// `EventSource` never dispatches one), the tracker never committed its id, and a client
    /// that resumes with `Last-Event-ID` is sent it again. Counted in
    /// `sse_tracker_streams_drained_total{reason="deadline"}` and logged. At most one day;
    /// zero ends such bodies at once. Default: 10 s.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_sse_tracker::SseTracker;
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let tracker = SseTracker::builder()
    ///     .drain_timeout(Duration::from_secs(3))
    ///     .build()
    ///     .expect("valid settings");
    /// # }
    /// ```
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    /// Keeps a replay log per tracked stream, bounded by `policy`, and sends a client that
    /// reconnects with `Last-Event-ID` the events it missed before anything else: each event
    /// after the client's, once, byte for byte as it was first sent (heartbeats excepted). When
    /// they are gone, nothing is replayed and the response says so. Off by default.
    ///
    /// - Which events: those of a tracked stream with [`StreamSource::route`] (the default),
    ///   route feeds and [`StreamName`](crate::StreamName) extensions included, written by one
    ///   body at a time (a second body streaming into the same stream at once is not logged,
    ///   and counted in `sse_tracker_replay_streams_unlogged_total`). With
    ///   [`StreamSource::event_id`], only responses marked [`Detach`](crate::Detach) are
    ///   logged, into the log of the stream their first id names, and the layer answers only
    ///   reconnects to them (a GET whose `Last-Event-ID` names a POST's stream, as MCP
    ///   2025-11-25 clients send); other reconnects go to the application untouched, whose
    ///   SDK replays from its own event store: one of the two answers, never both.
    /// - A position is the client's `Last-Event-ID`: the newest logged event whose own `id`
    ///   field is that id (with ids that repeat, the newest counts). An event without an `id`
    ///   follows the id before it: it is replayed to a client whose last id is that one, which
    ///   may have received it already; give every event an id for an exact replay. An empty id
    ///   resets a client's last id, and it then reconnects without one: nothing is replayed.
    /// - The request learns the outcome in its [`Replay`](crate::Replay) extension; the SSE
    ///   response carries the [`REPLAY_HEADER`](crate::REPLAY_HEADER) header (`complete;
    ///   events=N`, or `gap; reason=R`), and the gap event if the policy has one.
    /// - History restarts (a new epoch): when a response of the stream does not continue the
    ///   replayed history (a new client, or a replay that was impossible), when the stream is
    ///   evicted from the registry, and after an event larger than the stream's bound.
    /// - A response marked [`Detach`](crate::Detach) goes on without its client, and a
    ///   reconnect follows it from the log, answered by the layer.
    ///
    /// ```
    /// use tower_sse_tracker::{ReplayPolicy, SseTracker};
    ///
    /// # #[tokio::main(flavor = "current_thread")]
    /// # async fn main() {
    /// let tracker = SseTracker::builder()
    ///     .replay(ReplayPolicy::new())
    ///     .build()
    ///     .expect("valid settings");
    /// # }
    /// ```
    pub fn replay(mut self, policy: ReplayPolicy) -> Self {
        self.replay = Some(policy);
        self
    }

    /// Checks every setting, builds the tracker, and spawns its worker on the current Tokio
    /// runtime.
    ///
    /// # Panics
    ///
    /// Outside a Tokio runtime, as `tokio::spawn` does: use
    /// [`build_with_worker`](Self::build_with_worker) there.
    #[track_caller]
    pub fn build(self) -> Result<SseTracker, ConfigError> {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            panic!(
                "SseTrackerBuilder::build must be called within a Tokio runtime: it spawns the \
                 persistence worker (build_with_worker returns it for you to spawn instead)"
            );
        };
        let (tracker, worker) = self.build_with_worker()?;
        runtime.spawn(worker);
        Ok(tracker)
    }

    /// Checks every setting and builds the tracker and its worker, for the caller to spawn on
    /// the runtime of its choice (as tower's `Buffer::pair` does): no runtime is needed to
    /// build. Nothing is persisted until the worker runs.
    ///
    /// ```
    /// use tower_sse_tracker::SseTracker;
    ///
    /// // Outside any runtime.
    /// let (tracker, worker) = SseTracker::builder().build_with_worker().unwrap();
    /// let runtime = tokio::runtime::Runtime::new().unwrap();
    /// runtime.spawn(worker);
    /// # let _ = tracker;
    /// ```
    pub fn build_with_worker(self) -> Result<(SseTracker, WorkerTask), ConfigError> {
        let long = |d: Duration| d.is_zero() || d > MAX_DURATION;
        let heartbeat = match self.heartbeat_interval {
            None => None,
            Some(interval) if interval < MIN_HEARTBEAT_INTERVAL || interval > MAX_DURATION => {
                return Err(ConfigError::HeartbeatInterval(interval));
            }
            Some(interval) => {
                let text = &self.heartbeat_comment;
                if text.len() > MAX_HEARTBEAT_COMMENT_LEN
                    || text.bytes().any(|b| matches!(b, b'\r' | b'\n' | 0))
                {
                    return Err(ConfigError::HeartbeatComment(text.clone()));
                }
                Some(Heartbeat::new(interval, text))
            }
        };
        if self.max_id_len == 0 || self.max_id_len > MAX_ID_LEN_LIMIT {
            return Err(ConfigError::MaxIdLen(self.max_id_len));
        }
        if self.channel_capacity == 0 || self.channel_capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::ChannelCapacity(self.channel_capacity));
        }
        if long(self.send_timeout) {
            return Err(ConfigError::SendTimeout(self.send_timeout));
        }
        if long(self.flush_interval) {
            return Err(ConfigError::FlushInterval(self.flush_interval));
        }
        if long(self.store_timeout) {
            return Err(ConfigError::StoreTimeout(self.store_timeout));
        }
        if let Some(ttl) = self
            .idle_ttl
            .filter(|ttl| ttl.is_zero() || *ttl > MAX_IDLE_TTL)
        {
            return Err(ConfigError::IdleTtl(ttl));
        }
        if self.drain_timeout > MAX_DURATION {
            return Err(ConfigError::DrainTimeout(self.drain_timeout));
        }
        if !self.retry.is_valid() || self.retry.max() > MAX_DURATION {
            return Err(ConfigError::Retry(self.retry));
        }
        let config = Config {
            owner: self.owner.0,
            stream: self.stream.0,
            heartbeat,
            max_id_len: self.max_id_len,
            accel_buffering_off: !self.proxy_buffering,
            send_timeout: self.send_timeout,
            drain_timeout: self.drain_timeout,
        };
        let store = match self.store {
            Some(StoreChoice(store)) => store,
            None => Arc::new(InMemoryStore::new()),
        };
        let worker = WorkerConfig {
            max_batch: self.max_batch.get(),
            flush_interval: self.flush_interval,
            retry: self.retry,
            store_timeout: self.store_timeout,
        };
        let limits = Limits {
            max_streams: self.max_streams.get(),
            idle_ttl: self.idle_ttl,
            max_names: self.max_stream_names.get(),
            max_pending_evicted: self.max_pending_evicted,
        };
        if let Some(policy) = &self.replay {
            policy
                .check()
                .map_err(|_| ConfigError::Replay(policy.clone()))?;
        }
        let (shared, task) = Shared::new(
            config,
            limits,
            store,
            self.channel_capacity,
            worker,
            self.replay,
        );
        Ok((SseTracker::from_shared(shared), task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_bad_setting_is_named_with_its_value() {
        let b = SseTrackerBuilder::default;
        let err = |builder: SseTrackerBuilder| builder.build().unwrap_err();
        assert_eq!(
            err(b().heartbeat_interval(Some(Duration::ZERO))),
            ConfigError::HeartbeatInterval(Duration::ZERO)
        );
        assert_eq!(
            err(b().heartbeat_interval(Some(Duration::MAX))),
            ConfigError::HeartbeatInterval(Duration::MAX)
        );
        assert!(matches!(
            err(b().heartbeat_comment("a\nb")),
            ConfigError::HeartbeatComment(_)
        ));
        assert_eq!(err(b().max_id_len(0)), ConfigError::MaxIdLen(0));
        assert_eq!(
            err(b().channel_capacity(0)),
            ConfigError::ChannelCapacity(0)
        );
        assert_eq!(
            err(b().send_timeout(Duration::ZERO)),
            ConfigError::SendTimeout(Duration::ZERO)
        );
        assert_eq!(
            err(b().send_timeout(Duration::MAX)),
            ConfigError::SendTimeout(Duration::MAX)
        );
        assert_eq!(
            err(b().store_timeout(Duration::ZERO)),
            ConfigError::StoreTimeout(Duration::ZERO)
        );
        assert_eq!(
            err(b().flush_interval(Duration::ZERO)),
            ConfigError::FlushInterval(Duration::ZERO)
        );
        assert_eq!(
            err(b().idle_ttl(Some(Duration::ZERO))),
            ConfigError::IdleTtl(Duration::ZERO)
        );
        assert_eq!(
            err(b().drain_timeout(Duration::MAX)),
            ConfigError::DrainTimeout(Duration::MAX)
        );
        let forever = RetryPolicy::exponential(Duration::from_secs(1), Duration::MAX, 3);
        assert_eq!(err(b().retry(forever)), ConfigError::Retry(forever));
        let backwards = RetryPolicy::exponential(Duration::from_secs(2), Duration::from_secs(1), 3);
        assert_eq!(err(b().retry(backwards)), ConfigError::Retry(backwards));
        let durable_alone = ReplayPolicy::new().durable(true);
        assert_eq!(
            err(b().replay(durable_alone.clone())),
            ConfigError::Replay(durable_alone)
        );
        // A bad comment does not matter when heartbeats are off.
        assert!(
            b().heartbeat_interval(None)
                .heartbeat_comment("a\nb")
                .build()
                .is_ok()
        );
    }

    /// `fn main() -> Result<(), Box<dyn Error>>` prints an error's `Debug` form: a refused
    /// setting says there what is wrong, as its message does, not only the refused value.
    #[test]
    fn a_config_errors_debug_form_says_what_is_wrong() {
        let durable_alone = SseTrackerBuilder::default()
            .replay(ReplayPolicy::new().durable(true))
            .build_with_worker()
            .unwrap_err();
        let zero_flush = SseTrackerBuilder::default()
            .flush_interval(Duration::ZERO)
            .build_with_worker()
            .unwrap_err();
        for error in [durable_alone, zero_flush] {
            let message = error.to_string();
            let debug = format!("{error:?}");
            assert!(debug.contains(&message), "{debug} lacks {message}");
        }
        assert_eq!(
            format!("{:?}", ConfigError::MaxIdLen(0)),
            format!("MaxIdLen({:?})", ConfigError::MaxIdLen(0).to_string())
        );
    }

    #[test]
    #[should_panic(expected = "within a Tokio runtime")]
    fn building_outside_a_runtime_panics_with_a_clear_message() {
        let _ = SseTrackerBuilder::default().build();
    }

    #[test]
    fn heartbeat_bytes_for_each_position() {
        let hb = Heartbeat::new(HEARTBEAT_INTERVAL, "keep-alive");
        assert_eq!(&hb.event[..], b": keep-alive\n\n");
        assert_eq!(&hb.line[..], b": keep-alive\n");
        assert_eq!(&hb.event_cr[..], b": keep-alive\r\r");
        assert_eq!(&hb.line_cr[..], b": keep-alive\r");
        assert_eq!(&Heartbeat::new(HEARTBEAT_INTERVAL, "").line[..], b":\n");
    }
}
