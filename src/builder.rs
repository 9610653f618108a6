//! [`SseTrackerBuilder`]: every setting of a tracker, validated, with its default.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderName;

use crate::identity::{OwnerKind, OwnerRule, OwnerSource, StreamSource};
use crate::registry::Limits;
use crate::shared::{Config, Heartbeat, Shared};
use crate::store::{DynStore, InMemoryStore, Store};
use crate::tracker::SseTracker;
use crate::worker::retry::RetryPolicy;
use crate::worker::{WorkerConfig, WorkerTask};

use crate::defaults::*;
use crate::limits::*;

/// The largest `channel_capacity`.
const MAX_CHANNEL_CAPACITY: usize = 1 << 24;

/// A setting was refused by [`SseTrackerBuilder::build`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ConfigError {
    /// The owner's header (`session_header`, or [`OwnerSource::header`]) is not a valid HTTP
    /// header name.
    SessionHeader(String),
    /// `heartbeat_interval` is below [`crate::limits::MIN_HEARTBEAT_INTERVAL`].
    HeartbeatInterval(Duration),
    /// `heartbeat_comment` is longer than [`crate::limits::MAX_HEARTBEAT_COMMENT_LEN`] or holds CR, LF or NUL.
    HeartbeatComment(String),
    /// `max_id_len` is 0 or above [`crate::limits::MAX_ID_LEN_LIMIT`].
    MaxIdLen(usize),
    /// `max_streams` is 0.
    MaxStreams,
    /// `channel_capacity` is 0 or above 16 777 216 (2^24; a larger channel would need more
    /// than the bodies can ever put in it: each stream is in it at most once).
    ChannelCapacity,
    /// `send_timeout` is zero.
    SendTimeout,
    /// `max_batch` is 0.
    MaxBatch,
    /// `flush_interval` is zero.
    FlushInterval,
    /// The retry policy has a zero base delay or a maximum below its base.
    Retry(RetryPolicy),
    /// `build()` was called outside a Tokio runtime, where the worker cannot be spawned (use
    /// [`SseTrackerBuilder::build_with_worker`] there).
    NoRuntime,
    /// `idle_ttl` is zero.
    IdleTtl,
    /// `max_stream_names` is 0.
    MaxStreamNames,
    /// `store_timeout` is zero.
    StoreTimeout,
    /// A duration setting (named) is longer than its limit ([`crate::limits::MAX_DURATION`], or
    /// [`crate::limits::MAX_IDLE_TTL`] for `idle_ttl`).
    TooLong(&'static str, Duration),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::SessionHeader(name) => {
                write!(f, "owner header {name:?} is not a valid HTTP header name")
            }
            ConfigError::HeartbeatInterval(d) => write!(
                f,
                "heartbeat_interval {d:?} is shorter than the minimum of {MIN_HEARTBEAT_INTERVAL:?}; \
                 use heartbeat_interval(None) to disable heartbeats"
            ),
            ConfigError::HeartbeatComment(text) => write!(
                f,
                "heartbeat_comment {text:?} must be at most {MAX_HEARTBEAT_COMMENT_LEN} bytes \
                 with no CR, LF or NUL"
            ),
            ConfigError::MaxIdLen(n) => {
                write!(f, "max_id_len {n} must be between 1 and {MAX_ID_LEN_LIMIT}")
            }
            ConfigError::MaxStreams => f.write_str("max_streams must be at least 1"),
            ConfigError::ChannelCapacity => write!(
                f,
                "channel_capacity must be between 1 and {MAX_CHANNEL_CAPACITY}"
            ),
            ConfigError::SendTimeout => f.write_str("send_timeout must be longer than zero"),
            ConfigError::MaxBatch => f.write_str("max_batch must be at least 1"),
            ConfigError::FlushInterval => f.write_str("flush_interval must be longer than zero"),
            ConfigError::Retry(p) => write!(
                f,
                "retry policy base {:?} must be longer than zero and at most its max {:?}",
                p.base(),
                p.max()
            ),
            ConfigError::IdleTtl => {
                f.write_str("idle_ttl must be longer than zero; use idle_ttl(None) to keep streams")
            }
            ConfigError::MaxStreamNames => f.write_str("max_stream_names must be at least 1"),
            ConfigError::StoreTimeout => f.write_str("store_timeout must be longer than zero"),
            ConfigError::TooLong(setting, d) => {
                let limit = if *setting == "idle_ttl" {
                    MAX_IDLE_TTL
                } else {
                    MAX_DURATION
                };
                write!(f, "{setting} {d:?} is longer than the limit of {limit:?}")
            }
            ConfigError::NoRuntime => f.write_str(
                "build() must be called within a Tokio runtime: it spawns the persistence worker \
                 (build_with_worker() returns it for you to spawn instead)",
            ),
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

/// Builds an [`SseTracker`]. Every method takes and returns the builder; [`build`](Self::build)
/// checks all the settings and names the first one it refuses.
///
/// | setting | default |
/// |---|---|
/// | [`owner`](Self::owner) | [`OwnerSource::session_header`]`(`[`crate::defaults::SESSION_HEADER`]`)` (`mcp-session-id`) |
/// | [`stream`](Self::stream) | [`StreamSource::route`] |
/// | [`heartbeat_interval`](Self::heartbeat_interval) | [`crate::defaults::HEARTBEAT_INTERVAL`] (15 s) |
/// | [`heartbeat_comment`](Self::heartbeat_comment) | [`crate::defaults::HEARTBEAT_COMMENT`] (`keep-alive`) |
/// | [`max_id_len`](Self::max_id_len) | [`crate::defaults::MAX_ID_LEN`] (1024 bytes) |
/// | [`max_streams`](Self::max_streams) | [`crate::defaults::MAX_STREAMS`] (100 000) |
/// | [`disable_proxy_buffering`](Self::disable_proxy_buffering) | `true` |
/// | [`store`](Self::store) | [`InMemoryStore::new`] |
/// | [`channel_capacity`](Self::channel_capacity) | [`crate::defaults::CHANNEL_CAPACITY`] (1024) |
/// | [`send_timeout`](Self::send_timeout) | [`crate::defaults::SEND_TIMEOUT`] (100 ms) |
/// | [`max_batch`](Self::max_batch) | [`crate::defaults::MAX_BATCH`] (256) |
/// | [`flush_interval`](Self::flush_interval) | [`crate::defaults::FLUSH_INTERVAL`] (100 ms) |
/// | [`retry`](Self::retry) | 100 ms doubling to 10 s, 5 retries |
/// | [`idle_ttl`](Self::idle_ttl) | [`crate::defaults::IDLE_TTL`] (5 minutes) |
/// | [`max_stream_names`](Self::max_stream_names) | [`crate::defaults::MAX_STREAM_NAMES`] (10 000) |
/// | [`store_timeout`](Self::store_timeout) | [`crate::defaults::STORE_TIMEOUT`] (5 s) |
/// | [`max_pending_evicted`](Self::max_pending_evicted) | [`crate::defaults::MAX_PENDING_EVICTED`] (10 000) |
/// | [`drain_timeout`](Self::drain_timeout) | [`crate::defaults::DRAIN_TIMEOUT`] (10 s) |
///
/// `build()` spawns the tracker's one background worker, so it must run within a Tokio
/// runtime.
///
/// ```
/// use std::time::Duration;
/// use tower_sse_tracker::{RetryPolicy, SseTracker, store::InMemoryStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder()
///     .store(InMemoryStore::new())
///     .retry(RetryPolicy::exponential(Duration::from_millis(50), Duration::from_secs(5), 8))
///     .session_header("x-session")
///     .heartbeat_interval(Some(Duration::from_secs(20)))
///     .heartbeat_comment("ping")
///     .max_streams(10_000)
///     .build()
///     .expect("valid settings");
///
/// let err = SseTracker::builder().max_streams(0).build().unwrap_err();
/// assert_eq!(err.to_string(), "max_streams must be at least 1");
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
    max_streams: usize,
    accel_buffering_off: bool,
    store: Option<StoreChoice>,
    channel_capacity: usize,
    send_timeout: Duration,
    max_batch: usize,
    flush_interval: Duration,
    retry: RetryPolicy,
    idle_ttl: Option<Duration>,
    max_stream_names: usize,
    store_timeout: Duration,
    max_pending_evicted: usize,
    drain_timeout: Duration,
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
            accel_buffering_off: true,
            store: None,
            channel_capacity: CHANNEL_CAPACITY,
            send_timeout: SEND_TIMEOUT,
            max_batch: MAX_BATCH,
            flush_interval: FLUSH_INTERVAL,
            retry: RETRY,
            idle_ttl: Some(IDLE_TTL),
            max_stream_names: MAX_STREAM_NAMES,
            store_timeout: STORE_TIMEOUT,
            max_pending_evicted: MAX_PENDING_EVICTED,
            drain_timeout: DRAIN_TIMEOUT,
        }
    }
}

impl SseTrackerBuilder {
    /// Shorthand for [`owner`](Self::owner)`(`[`OwnerSource::session_header`]`(name))`: the
    /// header that carries the session id, read on the request and, when the request has no
    /// valid one, on the response (MCP servers assign the session id there). Header names are
    /// case-insensitive.
    pub fn session_header(mut self, name: impl Into<String>) -> Self {
        self.owner = OwnerSource::session_header(name);
        self
    }

    /// Who a stream belongs to: the first half of its key (see [`crate::identity`]).
    pub fn owner(mut self, source: OwnerSource) -> Self {
        self.owner = source;
        self
    }

    /// Which stream of its owner a response is: the second half of its key (see
    /// [`crate::identity`]).
    pub fn stream(mut self, source: StreamSource) -> Self {
        self.stream = source;
        self
    }

    /// How long the inner body may stay silent before a heartbeat comment is sent; `None`
    /// disables heartbeats. At least [`crate::limits::MIN_HEARTBEAT_INTERVAL`].
    pub fn heartbeat_interval(mut self, interval: Option<Duration>) -> Self {
        self.heartbeat_interval = interval;
        self
    }

    /// The text of the heartbeat comment: the line sent is `: {text}` (just `:` when empty).
    /// At most [`crate::limits::MAX_HEARTBEAT_COMMENT_LEN`] bytes, without CR, LF or NUL.
    pub fn heartbeat_comment(mut self, text: impl Into<String>) -> Self {
        self.heartbeat_comment = text.into();
        self
    }

    /// Ids longer than this many bytes are ignored (and counted in
    /// `sse_tracker_ids_rejected_total`), which bounds the memory each stream can make the
    /// tracker hold. Also the limit for the `Last-Event-ID` request header.
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
    /// `sse_tracker_untracked_streams_total{reason="registry_full"}`.
    pub fn max_streams(mut self, streams: usize) -> Self {
        self.max_streams = streams;
        self
    }

    /// Whether SSE responses get `X-Accel-Buffering: no` (when they do not set it), which stops
    /// nginx from buffering the stream.
    pub fn disable_proxy_buffering(mut self, enabled: bool) -> Self {
        self.accel_buffering_off = enabled;
        self
    }

    /// Where the worker persists latest ids. Pass an `Arc` to keep a handle on the store.
    pub fn store<S: Store>(mut self, store: S) -> Self {
        self.store = Some(StoreChoice(Arc::new(store)));
        self
    }

    /// Capacity of the bounded channel from the bodies to the worker, in records: 1 to
    /// 16 777 216 (2^24). Its memory grows with what it holds, not with its capacity.
    pub fn channel_capacity(mut self, records: usize) -> Self {
        self.channel_capacity = records;
        self
    }

    /// The longest a body waits for room in a full channel before it pulls its next frame.
    /// After that the stream's key is marked dirty (the worker persists its latest id from
    /// memory later) and the stream is not made to wait again until the worker catches up.
    pub fn send_timeout(mut self, timeout: Duration) -> Self {
        self.send_timeout = timeout;
        self
    }

    /// The most streams per store call. A flush writes every stream that changed since the
    /// last one, in as many calls as it needs: this bounds the size of one call, not how much
    /// a flush coalesces.
    pub fn max_batch(mut self, streams: usize) -> Self {
        self.max_batch = streams;
        self
    }

    /// How often the worker writes what it has gathered: the coalescing window. A stream that
    /// commits many ids within one interval is written once, with its latest id.
    pub fn flush_interval(mut self, interval: Duration) -> Self {
        self.flush_interval = interval;
        self
    }

    /// How long a stream with no open body and no activity stays in the registry; `None`
    /// keeps streams until the registry is full. The worker sweeps idle streams on its ticks.
    pub fn idle_ttl(mut self, ttl: Option<Duration>) -> Self {
        self.idle_ttl = ttl;
        self
    }

    /// Size of the table that interns stream names (least recently used names leave first):
    /// streams with one name share one allocation.
    pub fn max_stream_names(mut self, names: usize) -> Self {
        self.max_stream_names = names;
        self
    }

    /// How failed store writes are retried, and how long the worker waits before it calls a
    /// store again after a failed call (the policy's delay, doubling with each failure in a
    /// row, up to its maximum).
    pub fn retry(mut self, policy: RetryPolicy) -> Self {
        self.retry = policy;
        self
    }

    /// The deadline of one store call (`save`, `touch_sessions`, and the `load` of
    /// [`SseTracker::resolve`]). A call past it is dropped and counts as a failed call:
    /// `sse_tracker_store_errors_total{reason="timeout"}`, a log, a retry.
    pub fn store_timeout(mut self, timeout: Duration) -> Self {
        self.store_timeout = timeout;
        self
    }

    /// The most evicted streams whose latest id is not in the store yet that the tracker keeps
    /// for a later write (while the store is failing or slow and new streams keep evicting old
    /// ones). When more are evicted, the oldest is dropped: counted in
    /// `sse_tracker_ids_dropped_total{reason="evicted_overflow"}`, logged with the count, and
    /// listed in the [`ShutdownReport`](crate::ShutdownReport). About 300 bytes each.
    pub fn max_pending_evicted(mut self, streams: usize) -> Self {
        self.max_pending_evicted = streams;
        self
    }

    /// How long, after [`SseTracker::drain`](crate::SseTracker::drain), a body in the middle of
    /// an event may take to complete it. A body still inside an event then ends there: its
    /// client discards the incomplete event (an `EventSource` never dispatches one), the
    /// tracker never committed its id, and a client that resumes with `Last-Event-ID` is sent
    /// it again. Counted in `sse_tracker_streams_drained_total{reason="deadline"}` and logged.
    /// Zero ends such bodies at once.
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

    /// Checks every setting, builds the tracker, and spawns its worker on the current Tokio
    /// runtime (an error outside one: use [`build_with_worker`](Self::build_with_worker) then).
    pub fn build(self) -> Result<SseTracker, ConfigError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| ConfigError::NoRuntime)?;
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
        let header = |name: &str| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| ConfigError::SessionHeader(name.to_owned()))
        };
        let owner = match &self.owner.0 {
            OwnerKind::SessionHeader(name) => OwnerRule::SessionHeader(header(name)?),
            OwnerKind::Header(name) => OwnerRule::Header(header(name)?),
            OwnerKind::Extension(f) => OwnerRule::Extension(f.clone()),
            OwnerKind::None => OwnerRule::None,
        };
        let heartbeat = match self.heartbeat_interval {
            None => None,
            Some(interval) if interval < MIN_HEARTBEAT_INTERVAL => {
                return Err(ConfigError::HeartbeatInterval(interval));
            }
            Some(interval) if interval > MAX_DURATION => {
                return Err(ConfigError::TooLong("heartbeat_interval", interval));
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
        if self.max_streams == 0 {
            return Err(ConfigError::MaxStreams);
        }
        if self.channel_capacity == 0 || self.channel_capacity > MAX_CHANNEL_CAPACITY {
            return Err(ConfigError::ChannelCapacity);
        }
        if self.send_timeout.is_zero() {
            return Err(ConfigError::SendTimeout);
        }
        if self.max_batch == 0 {
            return Err(ConfigError::MaxBatch);
        }
        if self.flush_interval.is_zero() {
            return Err(ConfigError::FlushInterval);
        }
        if !self.retry.is_valid() {
            return Err(ConfigError::Retry(self.retry));
        }
        if self.idle_ttl.is_some_and(|ttl| ttl.is_zero()) {
            return Err(ConfigError::IdleTtl);
        }
        if self.max_stream_names == 0 {
            return Err(ConfigError::MaxStreamNames);
        }
        if self.store_timeout.is_zero() {
            return Err(ConfigError::StoreTimeout);
        }
        for (setting, d) in [
            ("send_timeout", self.send_timeout),
            ("flush_interval", self.flush_interval),
            ("store_timeout", self.store_timeout),
            ("retry max", self.retry.max()),
            ("drain_timeout", self.drain_timeout),
        ] {
            if d > MAX_DURATION {
                return Err(ConfigError::TooLong(setting, d));
            }
        }
        if let Some(ttl) = self.idle_ttl.filter(|ttl| *ttl > MAX_IDLE_TTL) {
            return Err(ConfigError::TooLong("idle_ttl", ttl));
        }
        let config = Config {
            owner,
            stream: self.stream.0,
            heartbeat,
            max_id_len: self.max_id_len,
            accel_buffering_off: self.accel_buffering_off,
            send_timeout: self.send_timeout,
            drain_timeout: self.drain_timeout,
        };
        let store = match self.store {
            Some(StoreChoice(store)) => store,
            None => Arc::new(InMemoryStore::new()),
        };
        let worker = WorkerConfig {
            max_batch: self.max_batch,
            flush_interval: self.flush_interval,
            retry: self.retry,
            store_timeout: self.store_timeout,
        };
        let limits = Limits {
            max_streams: self.max_streams,
            idle_ttl: self.idle_ttl,
            max_names: self.max_stream_names,
            max_pending_evicted: self.max_pending_evicted,
        };
        let (shared, task) = Shared::new(config, limits, store, self.channel_capacity, worker);
        Ok((SseTracker::from_shared(shared), task))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_bad_setting_is_named() {
        let b = SseTrackerBuilder::default;
        assert_eq!(
            b().session_header("bad header").build().unwrap_err(),
            ConfigError::SessionHeader("bad header".into())
        );
        assert!(matches!(
            b().heartbeat_interval(Some(Duration::ZERO))
                .build()
                .unwrap_err(),
            ConfigError::HeartbeatInterval(_)
        ));
        assert!(matches!(
            b().heartbeat_comment("a\nb").build().unwrap_err(),
            ConfigError::HeartbeatComment(_)
        ));
        assert_eq!(
            b().max_id_len(0).build().unwrap_err(),
            ConfigError::MaxIdLen(0)
        );
        assert_eq!(
            b().max_streams(0).build().unwrap_err(),
            ConfigError::MaxStreams
        );
        assert_eq!(
            b().channel_capacity(0).build().unwrap_err(),
            ConfigError::ChannelCapacity
        );
        assert_eq!(
            b().send_timeout(Duration::ZERO).build().unwrap_err(),
            ConfigError::SendTimeout
        );
        assert_eq!(b().max_batch(0).build().unwrap_err(), ConfigError::MaxBatch);
        assert_eq!(
            b().store_timeout(Duration::ZERO).build().unwrap_err(),
            ConfigError::StoreTimeout
        );
        assert_eq!(
            b().send_timeout(Duration::MAX).build().unwrap_err(),
            ConfigError::TooLong("send_timeout", Duration::MAX)
        );
        assert!(matches!(
            b().heartbeat_interval(Some(Duration::MAX))
                .build()
                .unwrap_err(),
            ConfigError::TooLong("heartbeat_interval", _)
        ));
        let forever = RetryPolicy::exponential(Duration::from_secs(1), Duration::MAX, 3);
        assert!(matches!(
            b().retry(forever).build().unwrap_err(),
            ConfigError::TooLong("retry max", _)
        ));
        assert_eq!(
            b().flush_interval(Duration::ZERO).build().unwrap_err(),
            ConfigError::FlushInterval
        );
        let backwards = RetryPolicy::exponential(Duration::from_secs(2), Duration::from_secs(1), 3);
        assert_eq!(
            b().retry(backwards).build().unwrap_err(),
            ConfigError::Retry(backwards)
        );
        // A bad comment does not matter when heartbeats are off.
        assert!(
            b().heartbeat_interval(None)
                .heartbeat_comment("a\nb")
                .build()
                .is_ok()
        );
    }

    #[test]
    fn building_outside_a_runtime_is_a_clear_error() {
        let err = SseTrackerBuilder::default().build().unwrap_err();
        assert_eq!(err, ConfigError::NoRuntime);
        assert!(err.to_string().contains("Tokio runtime"));
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
