//! Metric names and their registration: [`ALL`] lists every name, the table below says what
//! each counts, and the labels follow.
//!
//! Every metric is emitted through the [`metrics`] facade, so any recorder works (Prometheus,
//! StatsD, a test's debugging recorder). The tracker takes its metric handles from the recorder
//! that is installed when [`SseTrackerBuilder::build`](crate::SseTrackerBuilder::build) runs:
//! install your recorder first. The one exception is
//! `sse_tracker_store_connections_replaced_total`: a `RedisStore` emits it from a task of its
//! own when it replaces a connection, through the global recorder (a recorder set only with
//! `metrics::with_local_recorder` does not see it). [`describe`] registers the descriptions
//! below with the current recorder.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `sse_tracker_events_total` | counter | events dispatched on tracked streams |
//! | `sse_tracker_heartbeats_total` | counter | heartbeat comments injected |
//! | `sse_tracker_streams_active` | gauge | tracked SSE response bodies open now |
//! | `sse_tracker_untracked_streams_total` | counter | SSE responses passed through untracked, by `reason` |
//! | `sse_tracker_ids_rejected_total` | counter | `id` fields ignored (NUL, not UTF-8, or longer than the limit) |
//! | `sse_tracker_records_enqueued_total` | counter | records handed to the worker: "this stream changed", at most one per stream per flush |
//! | `sse_tracker_backpressure_timeouts_total` | counter | waits of a body for room in the worker's full channel that lasted the whole send timeout |
//! | `sse_tracker_records_coalesced_total` | counter | committed ids that needed no record of their own: the stream was already queued for the next flush, which writes its latest id |
//! | `sse_tracker_duplicates_skipped_total` | counter | records left out because the store already had them |
//! | `sse_tracker_store_writes_total` | counter | stream ids written to the store (one per stream per batch) |
//! | `sse_tracker_store_errors_total` | counter | failed store calls, by `op` (`save`, `touch`, `load`) and `reason` (`error`, `timeout`, `panic`) |
//! | `sse_tracker_retries_total` | counter | retries scheduled |
//! | `sse_tracker_retries_exhausted_total` | counter | stream ids given up after the last retry |
//! | `sse_tracker_queue_depth` | gauge | records waiting in the worker's channel |
//! | `sse_tracker_retry_queue_depth` | gauge | streams waiting for a retry |
//! | `sse_tracker_batch_size` | histogram | streams per store write |
//! | `sse_tracker_store_write_seconds` | histogram | duration of store writes |
//! | `sse_tracker_activity_updates_total` | counter | session activity times written to the store |
//! | `sse_tracker_activity_batch_size` | histogram | sessions per activity write |
//! | `sse_tracker_streams_tracked` | gauge | streams in the registry |
//! | `sse_tracker_streams_evicted_total` | counter | streams evicted from the registry, by `reason` |
//! | `sse_tracker_memory_bytes` | gauge | estimated heap bytes of the registry |
//! | `sse_tracker_evicted_pending` | gauge | evicted streams whose latest id waits for a write |
//! | `sse_tracker_ids_dropped_total` | counter | latest ids dropped before reaching the store, by `reason` |
//! | `sse_tracker_activity_dropped_total` | counter | session activity marks dropped before reaching the store |
//! | `sse_tracker_worker_failures_total` | counter | panics inside the worker (it restarts) and worker tasks lost, by `reason` |
//! | `sse_tracker_streams_drained_total` | counter | SSE bodies ended during [`SseTracker::drain`](crate::SseTracker::drain), by `reason` |
//! | `sse_tracker_streams_ended_total` | counter | SSE bodies ended, by whether their client could resume them (`resumable`) |
//! | `sse_tracker_store_connections_replaced_total` | counter | Redis connections replaced because Redis had stopped answering on them (`RedisStore`, through the global recorder at the time) |
//! | `sse_tracker_replay_events_logged_total` | counter | events written to replay logs |
//! | `sse_tracker_replay_evictions_total` | counter | events dropped from replay logs, by `cause` |
//! | `sse_tracker_replay_log_bytes` | gauge | heap bytes held by all replay logs (their chunks and indexes) |
//! | `sse_tracker_replays_total` | counter | replays sent on SSE responses, by `outcome` |
//! | `sse_tracker_replayed_events_total` | counter | events replayed |
//! | `sse_tracker_replayed_bytes_total` | counter | bytes replayed |
//! | `sse_tracker_replay_streams_unlogged_total` | counter | tracked SSE bodies not logged because another body of their stream writes its log |
//! | `sse_tracker_replay_store_events_total` | counter | events appended to the store's replay logs (replay across instances) |
//! | `sse_tracker_replay_store_dropped_total` | counter | replay logs whose events were not queued for the store, by `reason` |
//! | `sse_tracker_replay_durable_cut_total` | counter | responses ended before events the store did not confirm in time, or lost (durable replay) |
//! | `sse_tracker_replay_store_refused_total` | counter | replay-log appends the store refused: a newer history holds the stream's log (instances' clocks disagree) |
//!
//! Labels:
//! - `sse_tracker_untracked_streams_total{reason}`: `no_owner` (no valid owner from a header or
//!   extension owner source), `anonymous` (a request other than `GET` with no owner),
//!   `not_resumable` (the same, of MCP 2026-07-28: nothing to track), `bad_stream_name`,
//!   `registry_full`, `encoded` (a `Content-Encoding`) or `concurrent` (more than
//!   [`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS)); each reason is also logged
//!   the first time, with the setting that would track such streams;
//! - `sse_tracker_streams_evicted_total{reason}`: `lru` or `idle`;
//! - `sse_tracker_store_errors_total{op, reason}`: `save`, `touch` or `load`, and `error`,
//!   `timeout` or `panic`;
//! - `sse_tracker_ids_dropped_total{reason}`: `evicted_overflow` (the bound on evicted streams
//!   waiting for a write was full) or `stopped` (the worker no longer runs);
//! - `sse_tracker_worker_failures_total{reason}`: `panic` or `lost`;
//! - `sse_tracker_streams_drained_total{reason}`: `boundary` (ended by the drain at an event
//!   boundary), `completed` (ended by itself while the drain ran) or `deadline` (still open at
//!   the drain timeout);
//! - `sse_tracker_streams_ended_total{resumable}`: `true` or `false`;
//! - `sse_tracker_replay_evictions_total{cause}`: `events` or `bytes` (the stream's bounds),
//!   `budget` (the budget of all logs), `too_large` (an event larger than the stream's byte
//!   bound, and the history before it) or `restart` (a response that did not continue the
//!   replayed history restarted it);
//! - `sse_tracker_replays_total{outcome}`: `complete`, or the reason a replay was impossible:
//!   `no_history`, `evicted`, `unknown_id`, `encoded` or `producer_lost` (see
//!   [`GapReason`](crate::GapReason)).
//!
//! What to alert on: `sse_tracker_ids_dropped_total` and `sse_tracker_retries_exhausted_total`
//! (ids that may not be in the store), `sse_tracker_worker_failures_total`, and a
//! `sse_tracker_store_errors_total` rate that stays above zero.
//!
//! ```
//! // With the Prometheus exporter installed first:
//! tower_sse_tracker::metrics::describe();
//! ```

mod replay;
mod untracked;

pub(crate) use replay::{Detached, ReplayMetrics, Trim};
pub(crate) use untracked::Untracked;

use metrics::{
    Counter, Gauge, Histogram, Unit, counter, describe_counter, describe_gauge, describe_histogram,
    gauge, histogram,
};

/// Counter: events dispatched on tracked streams.
pub(crate) const EVENTS_TOTAL: &str = "sse_tracker_events_total";
/// Counter: heartbeat comments injected into idle streams.
pub(crate) const HEARTBEATS_TOTAL: &str = "sse_tracker_heartbeats_total";
/// Gauge: tracked SSE response bodies open now.
pub(crate) const STREAMS_ACTIVE: &str = "sse_tracker_streams_active";
/// Counter: SSE responses passed through without tracking, labelled by `reason`.
pub(crate) const UNTRACKED_STREAMS_TOTAL: &str = "sse_tracker_untracked_streams_total";
/// Counter: `id` fields ignored because they hold NUL, are not valid UTF-8, or exceed the id
/// length limit.
pub(crate) const IDS_REJECTED_TOTAL: &str = "sse_tracker_ids_rejected_total";

/// Counter: records handed to the worker.
pub(crate) const RECORDS_ENQUEUED_TOTAL: &str = "sse_tracker_records_enqueued_total";
/// Counter: waits of a body for room in the worker's full channel that lasted the whole send
/// timeout (the stream's slot was handed over through the registry at once; the wait only
/// paces the body).
pub(crate) const BACKPRESSURE_TIMEOUTS_TOTAL: &str = "sse_tracker_backpressure_timeouts_total";
/// Counter: committed ids that needed no record of their own (the stream was already queued
/// for the next flush, which writes its latest id).
pub(crate) const RECORDS_COALESCED_TOTAL: &str = "sse_tracker_records_coalesced_total";
/// Counter: records left out because the store already held their id or a newer one.
pub(crate) const DUPLICATES_SKIPPED_TOTAL: &str = "sse_tracker_duplicates_skipped_total";
/// Counter: stream ids written to the store (one per stream per batch).
pub(crate) const STORE_WRITES_TOTAL: &str = "sse_tracker_store_writes_total";
/// Counter: failed store calls (one per failed batch), labelled by `op` and `reason`.
pub(crate) const STORE_ERRORS_TOTAL: &str = "sse_tracker_store_errors_total";
/// Counter: retries scheduled.
pub(crate) const RETRIES_TOTAL: &str = "sse_tracker_retries_total";
/// Counter: stream ids given up after the last retry.
pub(crate) const RETRIES_EXHAUSTED_TOTAL: &str = "sse_tracker_retries_exhausted_total";
/// Gauge: records waiting in the worker's channel.
pub(crate) const QUEUE_DEPTH: &str = "sse_tracker_queue_depth";
/// Gauge: streams waiting for a retry.
pub(crate) const RETRY_QUEUE_DEPTH: &str = "sse_tracker_retry_queue_depth";
/// Histogram: streams per store write.
pub(crate) const BATCH_SIZE: &str = "sse_tracker_batch_size";
/// Histogram: duration of store writes, in seconds.
pub(crate) const STORE_WRITE_SECONDS: &str = "sse_tracker_store_write_seconds";

/// Counter: session activity times written to the store.
pub(crate) const ACTIVITY_UPDATES_TOTAL: &str = "sse_tracker_activity_updates_total";
/// Histogram: sessions per activity write.
pub(crate) const ACTIVITY_BATCH_SIZE: &str = "sse_tracker_activity_batch_size";
/// Gauge: streams in the registry.
pub(crate) const STREAMS_TRACKED: &str = "sse_tracker_streams_tracked";
/// Counter: streams evicted from the registry, labelled by `reason`.
pub(crate) const STREAMS_EVICTED_TOTAL: &str = "sse_tracker_streams_evicted_total";
/// Gauge: estimated heap bytes of the registry (from its counts; see
/// [`SseTracker::estimated_memory_bytes`](crate::SseTracker::estimated_memory_bytes)).
pub(crate) const MEMORY_BYTES: &str = "sse_tracker_memory_bytes";
/// Gauge: evicted streams whose latest id waits for a write.
pub(crate) const EVICTED_PENDING: &str = "sse_tracker_evicted_pending";
/// Counter: latest ids dropped before reaching the store, labelled by `reason`.
pub(crate) const IDS_DROPPED_TOTAL: &str = "sse_tracker_ids_dropped_total";
/// Counter: session activity marks dropped before reaching the store.
pub(crate) const ACTIVITY_DROPPED_TOTAL: &str = "sse_tracker_activity_dropped_total";
/// Counter: panics inside the worker (it restarts) and worker tasks lost, labelled by `reason`.
pub(crate) const WORKER_FAILURES_TOTAL: &str = "sse_tracker_worker_failures_total";
/// Counter: SSE bodies ended during a drain, labelled by `reason`: [`REASON_BOUNDARY`] (ended
/// by the drain at an event boundary: a resumable stream, or an MCP `subscriptions/listen`
/// one), [`REASON_COMPLETED`] (ended by itself while the drain ran: above all the streams it
/// lets run, whose clients cannot resume them) or [`REASON_DEADLINE`] (still open at the
/// drain timeout).
pub(crate) const STREAMS_DRAINED_TOTAL: &str = "sse_tracker_streams_drained_total";
/// Counter: SSE bodies (tracked or not) that ended, labelled `resumable="true"` when their
/// client could resume them (their events carried ids and their protocol has resumption) and
/// `"false"` otherwise.
pub(crate) const STREAMS_ENDED_TOTAL: &str = "sse_tracker_streams_ended_total";
/// Counter: connections a `RedisStore` replaced because calls on them had gone unanswered for
/// `STUCK_AFTER` (feature `redis`). Emitted through the global recorder when a replacement
/// happens, not through a handle taken at build time.
pub(crate) const STORE_CONNECTIONS_REPLACED_TOTAL: &str =
    "sse_tracker_store_connections_replaced_total";

/// Every metric name, for checking exporters and dashboards.
pub const ALL: &[&str] = &[
    EVENTS_TOTAL,
    HEARTBEATS_TOTAL,
    STREAMS_ACTIVE,
    UNTRACKED_STREAMS_TOTAL,
    IDS_REJECTED_TOTAL,
    RECORDS_ENQUEUED_TOTAL,
    BACKPRESSURE_TIMEOUTS_TOTAL,
    RECORDS_COALESCED_TOTAL,
    DUPLICATES_SKIPPED_TOTAL,
    STORE_WRITES_TOTAL,
    STORE_ERRORS_TOTAL,
    RETRIES_TOTAL,
    RETRIES_EXHAUSTED_TOTAL,
    QUEUE_DEPTH,
    RETRY_QUEUE_DEPTH,
    BATCH_SIZE,
    STORE_WRITE_SECONDS,
    ACTIVITY_UPDATES_TOTAL,
    ACTIVITY_BATCH_SIZE,
    STREAMS_TRACKED,
    STREAMS_EVICTED_TOTAL,
    MEMORY_BYTES,
    EVICTED_PENDING,
    IDS_DROPPED_TOTAL,
    ACTIVITY_DROPPED_TOTAL,
    WORKER_FAILURES_TOTAL,
    STREAMS_DRAINED_TOTAL,
    STREAMS_ENDED_TOTAL,
    STORE_CONNECTIONS_REPLACED_TOTAL,
    replay::REPLAY_EVENTS_LOGGED_TOTAL,
    replay::REPLAY_EVICTIONS_TOTAL,
    replay::REPLAY_LOG_BYTES,
    replay::REPLAYS_TOTAL,
    replay::REPLAYED_EVENTS_TOTAL,
    replay::REPLAYED_BYTES_TOTAL,
    replay::REPLAY_STREAMS_UNLOGGED_TOTAL,
    replay::REPLAY_DETACHED_STREAMS,
    replay::REPLAY_DETACHED_TOTAL,
    replay::REPLAY_STORE_EVENTS_TOTAL,
    replay::REPLAY_STORE_DROPPED_TOTAL,
    replay::REPLAY_DURABLE_CUT_TOTAL,
    replay::REPLAY_STORE_REFUSED_TOTAL,
];

/// `reason` label: no valid owner from the configured owner source (a header or a request
/// extension; the default session header never leaves a stream untracked for this).
pub(crate) const REASON_NO_OWNER: &str = "no_owner";
/// `reason` label: a request other than `GET` with no owner, on the route's stream source: a
/// stream of its own that no later request can address.
pub(crate) const REASON_ANONYMOUS: &str = "anonymous";
/// `reason` label: an anonymous request of MCP 2026-07-28 or later, a protocol without
/// resumption: nothing to track (logged once at `INFO`, not `WARN`).
pub(crate) const REASON_NOT_RESUMABLE: &str = "not_resumable";
/// `reason` label: the stream name (default or from the handler) is invalid.
pub(crate) const REASON_BAD_STREAM_NAME: &str = "bad_stream_name";
/// `reason` label: every tracked stream has an open body, so none could be evicted for this one.
pub(crate) const REASON_REGISTRY_FULL: &str = "registry_full";
/// `reason` label: the SSE response has a `Content-Encoding`; compressed bytes cannot be scanned.
pub(crate) const REASON_ENCODED: &str = "encoded";
/// `reason` label: more concurrent responses on one route of one owner than streams of their
/// own can be made for ([`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS)).
pub(crate) const REASON_CONCURRENT: &str = "concurrent";
/// `op` label of store errors: [`Store::save`](crate::store::Store::save).
pub(crate) const OP_SAVE: &str = "save";
/// `op` label of store errors: [`Store::touch_sessions`](crate::store::Store::touch_sessions).
pub(crate) const OP_TOUCH: &str = "touch";
/// `op` label of store errors: [`Store::load`](crate::store::Store::load).
pub(crate) const OP_LOAD: &str = "load";
/// `op` label: appending events to replay logs, and renewing the instance's lease.
pub(crate) const OP_APPEND: &str = "append";
/// `op` label: reading a replay log (a reconnect this instance holds no log for).
pub(crate) const OP_READ_LOG: &str = "read_log";
/// `reason` label: the store returned an error.
pub(crate) const REASON_ERROR: &str = "error";
/// `reason` label: the store call did not finish within the store timeout.
pub(crate) const REASON_TIMEOUT: &str = "timeout";
/// `reason` label: the store call (or the worker) panicked.
pub(crate) const REASON_PANIC: &str = "panic";
/// `reason` label: the worker task ended without finishing (its runtime shut down).
pub(crate) const REASON_LOST: &str = "lost";
/// `reason` label of dropped ids: the bound on evicted streams waiting for a write was full.
pub(crate) const REASON_EVICTED_OVERFLOW: &str = "evicted_overflow";
/// `reason` label of dropped ids: the worker no longer runs (after shutdown).
pub(crate) const REASON_STOPPED: &str = "stopped";
/// `reason` label of evictions: the registry was full and the stream was the least recently used.
pub(crate) const REASON_LRU: &str = "lru";
/// `reason` label of evictions: no open body and no activity for the idle TTL.
pub(crate) const REASON_IDLE: &str = "idle";
/// `reason` label of `sse_tracker_streams_drained_total`: the body ended at an event boundary.
pub(crate) const REASON_BOUNDARY: &str = "boundary";
/// `reason` label of `sse_tracker_streams_drained_total`: the body was still open at the drain
/// timeout (inside an event, or one its client cannot resume) and ended there.
pub(crate) const REASON_DEADLINE: &str = "deadline";
/// `reason` label of `sse_tracker_streams_drained_total`: a body ended by itself while the drain
/// ran (above all one its client cannot resume, which the drain lets run).
pub(crate) const REASON_COMPLETED: &str = "completed";

/// Registers the description and unit of every metric with the installed recorder.
pub fn describe() {
    describe_counter!(
        EVENTS_TOTAL,
        Unit::Count,
        "Events dispatched on tracked SSE streams"
    );
    describe_counter!(
        HEARTBEATS_TOTAL,
        Unit::Count,
        "Heartbeat comments injected into idle SSE streams"
    );
    describe_gauge!(
        STREAMS_ACTIVE,
        Unit::Count,
        "Tracked SSE response bodies open now"
    );
    describe_counter!(
        UNTRACKED_STREAMS_TOTAL,
        Unit::Count,
        "SSE responses passed through without tracking, by reason"
    );
    describe_counter!(
        IDS_REJECTED_TOTAL,
        Unit::Count,
        "SSE id fields ignored (NUL, not UTF-8, or longer than the limit)"
    );
    describe_counter!(
        RECORDS_ENQUEUED_TOTAL,
        Unit::Count,
        "Latest-id records handed to the persistence worker"
    );
    describe_counter!(
        BACKPRESSURE_TIMEOUTS_TOTAL,
        Unit::Count,
        "Hand-offs to the worker that hit the send timeout (key marked dirty)"
    );
    describe_counter!(
        RECORDS_COALESCED_TOTAL,
        Unit::Count,
        "Records merged into a newer record of the same stream before a write"
    );
    describe_counter!(
        DUPLICATES_SKIPPED_TOTAL,
        Unit::Count,
        "Records left out because the store already held them"
    );
    describe_counter!(
        STORE_WRITES_TOTAL,
        Unit::Count,
        "Stream ids written to the store"
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        Unit::Count,
        "Failed store calls, by op and reason"
    );
    describe_gauge!(
        EVICTED_PENDING,
        Unit::Count,
        "Evicted streams whose latest id waits for a write"
    );
    describe_counter!(
        IDS_DROPPED_TOTAL,
        Unit::Count,
        "Latest ids dropped before reaching the store, by reason"
    );
    describe_counter!(
        ACTIVITY_DROPPED_TOTAL,
        Unit::Count,
        "Session activity marks dropped before reaching the store"
    );
    describe_counter!(
        STREAMS_DRAINED_TOTAL,
        Unit::Count,
        "SSE bodies ended during a drain: at an event boundary, by themselves, or at the drain timeout"
    );
    describe_counter!(
        STREAMS_ENDED_TOTAL,
        Unit::Count,
        "SSE bodies ended, by whether their client could resume them"
    );
    describe_counter!(
        STORE_CONNECTIONS_REPLACED_TOTAL,
        Unit::Count,
        "Redis connections replaced because Redis had stopped answering on them"
    );
    describe_counter!(
        WORKER_FAILURES_TOTAL,
        Unit::Count,
        "Worker panics (restarted) and worker tasks lost, by reason"
    );
    describe_counter!(RETRIES_TOTAL, Unit::Count, "Store write retries scheduled");
    describe_counter!(
        RETRIES_EXHAUSTED_TOTAL,
        Unit::Count,
        "Stream ids given up after the last retry"
    );
    describe_gauge!(
        QUEUE_DEPTH,
        Unit::Count,
        "Records waiting in the worker's channel"
    );
    describe_gauge!(
        RETRY_QUEUE_DEPTH,
        Unit::Count,
        "Streams waiting for a store write retry"
    );
    describe_histogram!(BATCH_SIZE, Unit::Count, "Streams per store write");
    describe_counter!(
        ACTIVITY_UPDATES_TOTAL,
        Unit::Count,
        "Session activity times written to the store"
    );
    describe_histogram!(
        ACTIVITY_BATCH_SIZE,
        Unit::Count,
        "Sessions per activity write"
    );
    describe_gauge!(STREAMS_TRACKED, Unit::Count, "Streams in the registry");
    describe_counter!(
        STREAMS_EVICTED_TOTAL,
        Unit::Count,
        "Streams evicted from the registry, by reason"
    );
    describe_gauge!(
        MEMORY_BYTES,
        Unit::Bytes,
        "Estimated heap bytes of the registry"
    );
    describe_histogram!(
        STORE_WRITE_SECONDS,
        Unit::Seconds,
        "Duration of store writes"
    );
    replay::describe();
}

/// Handles taken once at build time, so the frame path does no recorder look-up.
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) events: Counter,
    pub(crate) heartbeats: Counter,
    pub(crate) streams_active: Gauge,
    /// `sse_tracker_untracked_streams_total` by [`Untracked`] reason, and whether each reason
    /// was logged at `WARN` yet (once per tracker).
    untracked: [Counter; Untracked::ALL.len()],
    untracked_warned: std::sync::Arc<[std::sync::atomic::AtomicBool; Untracked::ALL.len()]>,
    pub(crate) ids_rejected: Counter,
    pub(crate) records_enqueued: Counter,
    pub(crate) backpressure_timeouts: Counter,
    pub(crate) records_coalesced: Counter,
    pub(crate) duplicates_skipped: Counter,
    pub(crate) store_writes: Counter,
    pub(crate) store_errors: StoreErrors,
    pub(crate) retries: Counter,
    pub(crate) retries_exhausted: Counter,
    pub(crate) queue_depth: Gauge,
    pub(crate) retry_queue_depth: Gauge,
    pub(crate) batch_size: Histogram,
    pub(crate) store_write_seconds: Histogram,
    pub(crate) activity_updates: Counter,
    pub(crate) activity_batch_size: Histogram,
    pub(crate) streams_tracked: Gauge,
    pub(crate) evicted_lru: Counter,
    pub(crate) evicted_idle: Counter,
    pub(crate) memory_bytes: Gauge,
    pub(crate) evicted_pending: Gauge,
    pub(crate) worker_panics: Counter,
    pub(crate) streams_drained: Counter,
    pub(crate) streams_drained_late: Counter,
    pub(crate) streams_drained_completed: Counter,
    /// `sse_tracker_streams_ended_total` by `resumable`: false, true.
    streams_ended: [Counter; 2],
    pub(crate) worker_lost: Counter,
}

/// A store operation, as the `op` label of `sse_tracker_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreOp {
    Save,
    Touch,
    Load,
    Append,
    ReadLog,
}

/// Why a store call failed, as the `reason` label of `sse_tracker_store_errors_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StoreFailureReason {
    Error,
    Timeout,
    Panic,
}

/// `sse_tracker_store_errors_total` for each operation and reason.
#[derive(Clone)]
pub(crate) struct StoreErrors {
    by: [[Counter; 3]; 5],
}

impl StoreErrors {
    fn register() -> Self {
        let reasons = |op: &'static str| {
            [REASON_ERROR, REASON_TIMEOUT, REASON_PANIC]
                .map(|reason| counter!(STORE_ERRORS_TOTAL, "op" => op, "reason" => reason))
        };
        Self {
            by: [
                reasons(OP_SAVE),
                reasons(OP_TOUCH),
                reasons(OP_LOAD),
                reasons(OP_APPEND),
                reasons(OP_READ_LOG),
            ],
        }
    }

    /// Counts a failed call of `op`.
    pub(crate) fn count(&self, op: StoreOp, reason: StoreFailureReason) {
        self.by[op as usize][reason as usize].increment(1);
    }
}

impl Handles {
    pub(crate) fn register() -> Self {
        let untracked =
            |reason: &'static str| counter!(UNTRACKED_STREAMS_TOTAL, "reason" => reason);
        Self {
            events: counter!(EVENTS_TOTAL),
            heartbeats: counter!(HEARTBEATS_TOTAL),
            streams_active: gauge!(STREAMS_ACTIVE),
            untracked: Untracked::ALL.map(|why| untracked(why.label())),
            untracked_warned: Default::default(),
            ids_rejected: counter!(IDS_REJECTED_TOTAL),
            records_enqueued: counter!(RECORDS_ENQUEUED_TOTAL),
            backpressure_timeouts: counter!(BACKPRESSURE_TIMEOUTS_TOTAL),
            records_coalesced: counter!(RECORDS_COALESCED_TOTAL),
            duplicates_skipped: counter!(DUPLICATES_SKIPPED_TOTAL),
            store_writes: counter!(STORE_WRITES_TOTAL),
            store_errors: StoreErrors::register(),
            retries: counter!(RETRIES_TOTAL),
            retries_exhausted: counter!(RETRIES_EXHAUSTED_TOTAL),
            queue_depth: gauge!(QUEUE_DEPTH),
            retry_queue_depth: gauge!(RETRY_QUEUE_DEPTH),
            batch_size: histogram!(BATCH_SIZE),
            store_write_seconds: histogram!(STORE_WRITE_SECONDS),
            activity_updates: counter!(ACTIVITY_UPDATES_TOTAL),
            activity_batch_size: histogram!(ACTIVITY_BATCH_SIZE),
            streams_tracked: gauge!(STREAMS_TRACKED),
            evicted_lru: counter!(STREAMS_EVICTED_TOTAL, "reason" => REASON_LRU),
            evicted_idle: counter!(STREAMS_EVICTED_TOTAL, "reason" => REASON_IDLE),
            memory_bytes: gauge!(MEMORY_BYTES),
            evicted_pending: gauge!(EVICTED_PENDING),
            worker_panics: counter!(WORKER_FAILURES_TOTAL, "reason" => REASON_PANIC),
            streams_drained: counter!(STREAMS_DRAINED_TOTAL, "reason" => REASON_BOUNDARY),
            streams_drained_late: counter!(STREAMS_DRAINED_TOTAL, "reason" => REASON_DEADLINE),
            streams_drained_completed: counter!(STREAMS_DRAINED_TOTAL, "reason" => REASON_COMPLETED),
            streams_ended: ["false", "true"]
                .map(|resumable| counter!(STREAMS_ENDED_TOTAL, "resumable" => resumable)),
            worker_lost: counter!(WORKER_FAILURES_TOTAL, "reason" => REASON_LOST),
        }
    }

    /// The registry's counters.
    pub(crate) fn registry(&self) -> crate::registry::RegistryMetrics {
        crate::registry::RegistryMetrics {
            evicted_lru: self.evicted_lru.clone(),
            handoff: crate::registry::handoff::HandoffMetrics {
                enqueued: self.records_enqueued.clone(),
                dropped_overflow: counter!(IDS_DROPPED_TOTAL, "reason" => REASON_EVICTED_OVERFLOW),
                dropped_stopped: counter!(IDS_DROPPED_TOTAL, "reason" => REASON_STOPPED),
                activity_dropped: counter!(ACTIVITY_DROPPED_TOTAL),
                logs_dropped: counter!(
                    replay::REPLAY_STORE_DROPPED_TOTAL,
                    "reason" => "queue"
                ),
            },
        }
    }
}

impl Handles {
    /// Counts an SSE body that ended (tracked or not), by whether its client could resume it.
    pub(crate) fn stream_ended(&self, resumable: bool) {
        self.streams_ended[usize::from(resumable)].increment(1);
    }
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handles")
    }
}
