//! The public metric names and label values, as a dashboard or an alert rule spells them: the
//! tests use these, so that renaming a metric breaks them (`tests/layer.rs` checks each name
//! against `tower_sse_tracker::metrics::ALL`).

pub const EVENTS_TOTAL: &str = "sse_tracker_events_total";
pub const HEARTBEATS_TOTAL: &str = "sse_tracker_heartbeats_total";
pub const STREAMS_ACTIVE: &str = "sse_tracker_streams_active";
pub const UNTRACKED_STREAMS_TOTAL: &str = "sse_tracker_untracked_streams_total";
pub const IDS_REJECTED_TOTAL: &str = "sse_tracker_ids_rejected_total";
pub const RECORDS_ENQUEUED_TOTAL: &str = "sse_tracker_records_enqueued_total";
pub const BACKPRESSURE_TIMEOUTS_TOTAL: &str = "sse_tracker_backpressure_timeouts_total";
pub const RECORDS_COALESCED_TOTAL: &str = "sse_tracker_records_coalesced_total";
pub const DUPLICATES_SKIPPED_TOTAL: &str = "sse_tracker_duplicates_skipped_total";
pub const STORE_WRITES_TOTAL: &str = "sse_tracker_store_writes_total";
pub const STORE_ERRORS_TOTAL: &str = "sse_tracker_store_errors_total";
pub const RETRIES_TOTAL: &str = "sse_tracker_retries_total";
pub const RETRIES_EXHAUSTED_TOTAL: &str = "sse_tracker_retries_exhausted_total";
pub const QUEUE_DEPTH: &str = "sse_tracker_queue_depth";
pub const RETRY_QUEUE_DEPTH: &str = "sse_tracker_retry_queue_depth";
pub const BATCH_SIZE: &str = "sse_tracker_batch_size";
pub const STORE_WRITE_SECONDS: &str = "sse_tracker_store_write_seconds";
pub const ACTIVITY_UPDATES_TOTAL: &str = "sse_tracker_activity_updates_total";
pub const ACTIVITY_BATCH_SIZE: &str = "sse_tracker_activity_batch_size";
pub const STREAMS_TRACKED: &str = "sse_tracker_streams_tracked";
pub const STREAMS_EVICTED_TOTAL: &str = "sse_tracker_streams_evicted_total";
pub const MEMORY_BYTES: &str = "sse_tracker_memory_bytes";
pub const EVICTED_PENDING: &str = "sse_tracker_evicted_pending";
pub const IDS_DROPPED_TOTAL: &str = "sse_tracker_ids_dropped_total";
pub const ACTIVITY_DROPPED_TOTAL: &str = "sse_tracker_activity_dropped_total";
pub const WORKER_FAILURES_TOTAL: &str = "sse_tracker_worker_failures_total";
pub const STREAMS_DRAINED_TOTAL: &str = "sse_tracker_streams_drained_total";
pub const STREAMS_ENDED_TOTAL: &str = "sse_tracker_streams_ended_total";
pub const STORE_CONNECTIONS_REPLACED_TOTAL: &str = "sse_tracker_store_connections_replaced_total";
pub const REPLAY_EVENTS_LOGGED_TOTAL: &str = "sse_tracker_replay_events_logged_total";
pub const REPLAY_EVICTIONS_TOTAL: &str = "sse_tracker_replay_evictions_total";
pub const REPLAY_LOG_BYTES: &str = "sse_tracker_replay_log_bytes";
pub const REPLAYS_TOTAL: &str = "sse_tracker_replays_total";
pub const REPLAYED_EVENTS_TOTAL: &str = "sse_tracker_replayed_events_total";
pub const REPLAYED_BYTES_TOTAL: &str = "sse_tracker_replayed_bytes_total";
pub const REPLAY_STREAMS_UNLOGGED_TOTAL: &str = "sse_tracker_replay_streams_unlogged_total";
pub const REPLAY_DETACHED_STREAMS: &str = "sse_tracker_replay_detached_streams";
pub const REPLAY_DETACHED_TOTAL: &str = "sse_tracker_replay_detached_total";
pub const REPLAY_STORE_EVENTS_TOTAL: &str = "sse_tracker_replay_store_events_total";
pub const REPLAY_STORE_DROPPED_TOTAL: &str = "sse_tracker_replay_store_dropped_total";
pub const REPLAY_DURABLE_CUT_TOTAL: &str = "sse_tracker_replay_durable_cut_total";
pub const REPLAY_STORE_REFUSED_TOTAL: &str = "sse_tracker_replay_store_refused_total";
pub const REASON_NO_OWNER: &str = "no_owner";
pub const REASON_ANONYMOUS: &str = "anonymous";
pub const REASON_NOT_RESUMABLE: &str = "not_resumable";
pub const REASON_BAD_STREAM_NAME: &str = "bad_stream_name";
pub const REASON_REGISTRY_FULL: &str = "registry_full";
pub const REASON_ENCODED: &str = "encoded";
pub const REASON_CONCURRENT: &str = "concurrent";
pub const OP_SAVE: &str = "save";
pub const OP_TOUCH: &str = "touch";
pub const OP_LOAD: &str = "load";
pub const OP_APPEND: &str = "append";
pub const OP_READ_LOG: &str = "read_log";
pub const REASON_ERROR: &str = "error";
pub const REASON_TIMEOUT: &str = "timeout";
pub const REASON_PANIC: &str = "panic";
pub const REASON_LOST: &str = "lost";
pub const REASON_EVICTED_OVERFLOW: &str = "evicted_overflow";
pub const REASON_STOPPED: &str = "stopped";
pub const REASON_LRU: &str = "lru";
pub const REASON_IDLE: &str = "idle";
pub const REASON_BOUNDARY: &str = "boundary";
pub const REASON_DEADLINE: &str = "deadline";
pub const REASON_COMPLETED: &str = "completed";

/// The metric names above (not the label values).
pub const NAMES: &[&str] = &[
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
    REPLAY_EVENTS_LOGGED_TOTAL,
    REPLAY_EVICTIONS_TOTAL,
    REPLAY_LOG_BYTES,
    REPLAYS_TOTAL,
    REPLAYED_EVENTS_TOTAL,
    REPLAYED_BYTES_TOTAL,
    REPLAY_STREAMS_UNLOGGED_TOTAL,
    REPLAY_DETACHED_STREAMS,
    REPLAY_DETACHED_TOTAL,
    REPLAY_STORE_EVENTS_TOTAL,
    REPLAY_STORE_DROPPED_TOTAL,
    REPLAY_DURABLE_CUT_TOTAL,
    REPLAY_STORE_REFUSED_TOTAL,
];
