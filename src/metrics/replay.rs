//! The replay metrics: events logged and dropped from logs by cause, replays by outcome, and
//! the heap the logs hold.

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, gauge};

use crate::replay::GapReason;

/// Counter: events written to replay logs.
pub(crate) const REPLAY_EVENTS_LOGGED_TOTAL: &str = "sse_tracker_replay_events_logged_total";
/// Counter: events dropped from replay logs, labelled by `cause`.
pub(crate) const REPLAY_EVICTIONS_TOTAL: &str = "sse_tracker_replay_evictions_total";
/// Gauge: heap bytes held by all replay logs (their chunks and indexes).
pub(crate) const REPLAY_LOG_BYTES: &str = "sse_tracker_replay_log_bytes";
/// Counter: replays sent, labelled by `outcome`.
pub(crate) const REPLAYS_TOTAL: &str = "sse_tracker_replays_total";
/// Counter: events replayed.
pub(crate) const REPLAYED_EVENTS_TOTAL: &str = "sse_tracker_replayed_events_total";
/// Counter: bytes replayed.
pub(crate) const REPLAYED_BYTES_TOTAL: &str = "sse_tracker_replayed_bytes_total";
/// Counter: tracked SSE bodies not logged because another body of the same stream writes its
/// log.
pub(crate) const REPLAY_STREAMS_UNLOGGED_TOTAL: &str = "sse_tracker_replay_streams_unlogged_total";
/// Gauge: detached streams being read (their clients gone).
pub(crate) const REPLAY_DETACHED_STREAMS: &str = "sse_tracker_replay_detached_streams";
/// Counter: detached streams, labelled by `outcome`: `started`, `refused` (the bound of
/// detached streams, or no runtime), and how each ended: `finished` (its body's end),
/// `bound` (its time or byte bound), `failed` (its body's error), `drained` (a drain ended
/// it), `replaced` (another body took its stream's log over).
pub(crate) const REPLAY_DETACHED_TOTAL: &str = "sse_tracker_replay_detached_total";

/// Counter: events sent to the store's replay logs in append calls that succeeded (replay
/// across instances; a store skips those of a history it refused).
pub(crate) const REPLAY_STORE_EVENTS_TOTAL: &str = "sse_tracker_replay_store_events_total";
/// Counter: replay logs whose events were not queued for the store, labelled by `reason`
/// (`queue`: the worker's log queue was full, or the worker had stopped).
pub(crate) const REPLAY_STORE_DROPPED_TOTAL: &str = "sse_tracker_replay_store_dropped_total";

/// Counter: responses ended before events that the store did not confirm in time, or that the
/// log dropped before the store got them (durable replay).
pub(crate) const REPLAY_DURABLE_CUT_TOTAL: &str = "sse_tracker_replay_durable_cut_total";

/// Counter: replay-log appends the store refused, a newer history holding the stream's log
/// (replay across instances).
pub(crate) const REPLAY_STORE_REFUSED_TOTAL: &str = "sse_tracker_replay_store_refused_total";

/// What became of a detached stream: the `outcome` label of `sse_tracker_replay_detached_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Detached {
    Started,
    Refused,
    Finished,
    Bound,
    Failed,
    Drained,
    Replaced,
}

impl Detached {
    const ALL: [Detached; 7] = [
        Detached::Started,
        Detached::Refused,
        Detached::Finished,
        Detached::Bound,
        Detached::Failed,
        Detached::Drained,
        Detached::Replaced,
    ];

    fn label(self) -> &'static str {
        match self {
            Detached::Started => "started",
            Detached::Refused => "refused",
            Detached::Finished => "finished",
            Detached::Bound => "bound",
            Detached::Failed => "failed",
            Detached::Drained => "drained",
            Detached::Replaced => "replaced",
        }
    }
}

/// Why events left a replay log: the `cause` label of `sse_tracker_replay_evictions_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Trim {
    /// The stream's event bound.
    Events,
    /// The stream's byte bound.
    Bytes,
    /// The tracker's budget for all logs.
    Budget,
    /// An event larger than the stream's byte bound (it and the history before it).
    TooLarge,
    /// A response that did not continue the stream's history restarted it.
    Restart,
}

impl Trim {
    pub(crate) const ALL: [Trim; 5] = [
        Trim::Events,
        Trim::Bytes,
        Trim::Budget,
        Trim::TooLarge,
        Trim::Restart,
    ];

    fn label(self) -> &'static str {
        match self {
            Trim::Events => "events",
            Trim::Bytes => "bytes",
            Trim::Budget => "budget",
            Trim::TooLarge => "too_large",
            Trim::Restart => "restart",
        }
    }
}

/// The replay metric handles, taken once when the tracker is built.
#[derive(Clone)]
pub(crate) struct ReplayMetrics {
    logged: Counter,
    trimmed: [Counter; Trim::ALL.len()],
    pub(crate) log_bytes: Gauge,
    /// `sse_tracker_replays_total`: `complete`, then each [`GapReason`].
    replays: [Counter; 1 + GapReason::ALL.len()],
    replayed_events: Counter,
    replayed_bytes: Counter,
    pub(crate) unlogged: Counter,
    pub(crate) detached_open: Gauge,
    detached: [Counter; Detached::ALL.len()],
    pub(crate) store_events: Counter,
    pub(crate) durable_cut: Counter,
    pub(crate) store_refused: Counter,
}

impl ReplayMetrics {
    /// A response ended before events held for the store (durable replay): counted in
    /// `sse_tracker_replay_durable_cut_total` and logged, with `why`.
    pub(crate) fn durable_cut(&self, why: &'static str) {
        self.durable_cut.increment(1);
        tracing::warn!(
            why,
            "SSE events held for the store (durable replay) did not reach it: the response ends \
             before them"
        );
    }

    pub(crate) fn register() -> Self {
        let outcome = |label: &'static str| counter!(REPLAYS_TOTAL, "outcome" => label);
        Self {
            logged: counter!(REPLAY_EVENTS_LOGGED_TOTAL),
            trimmed: Trim::ALL
                .map(|cause| counter!(REPLAY_EVICTIONS_TOTAL, "cause" => cause.label())),
            log_bytes: gauge!(REPLAY_LOG_BYTES),
            replays: std::array::from_fn(|i| match i {
                0 => outcome("complete"),
                _ => outcome(GapReason::ALL[i - 1].as_str()),
            }),
            replayed_events: counter!(REPLAYED_EVENTS_TOTAL),
            replayed_bytes: counter!(REPLAYED_BYTES_TOTAL),
            unlogged: counter!(REPLAY_STREAMS_UNLOGGED_TOTAL),
            detached_open: gauge!(REPLAY_DETACHED_STREAMS),
            detached: Detached::ALL
                .map(|outcome| counter!(REPLAY_DETACHED_TOTAL, "outcome" => outcome.label())),
            store_events: counter!(REPLAY_STORE_EVENTS_TOTAL),
            durable_cut: counter!(REPLAY_DURABLE_CUT_TOTAL),
            store_refused: counter!(REPLAY_STORE_REFUSED_TOTAL),
        }
    }

    pub(crate) fn detached(&self, outcome: Detached) {
        self.detached[outcome as usize].increment(1);
    }

    pub(crate) fn logged(&self, events: usize) {
        if events > 0 {
            self.logged.increment(events as u64);
        }
    }

    pub(crate) fn trimmed(&self, cause: Trim, events: usize) {
        if events > 0 {
            self.trimmed[cause as usize].increment(events as u64);
        }
    }

    pub(crate) fn replayed(&self, events: usize, bytes: usize) {
        self.replays[0].increment(1);
        self.replayed_events.increment(events as u64);
        self.replayed_bytes.increment(bytes as u64);
    }

    pub(crate) fn gap(&self, reason: GapReason) {
        let index = 1 + GapReason::ALL
            .iter()
            .position(|r| *r == reason)
            .expect("every reason is listed");
        self.replays[index].increment(1);
    }
}

impl std::fmt::Debug for ReplayMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReplayMetrics")
    }
}

pub(super) fn describe() {
    describe_counter!(
        REPLAY_EVENTS_LOGGED_TOTAL,
        Unit::Count,
        "Events written to replay logs"
    );
    describe_counter!(
        REPLAY_EVICTIONS_TOTAL,
        Unit::Count,
        "Events dropped from replay logs, by cause"
    );
    describe_gauge!(
        REPLAY_LOG_BYTES,
        Unit::Bytes,
        "Heap bytes held by all replay logs"
    );
    describe_counter!(REPLAYS_TOTAL, Unit::Count, "Replays sent, by outcome");
    describe_counter!(REPLAYED_EVENTS_TOTAL, Unit::Count, "Events replayed");
    describe_counter!(REPLAYED_BYTES_TOTAL, Unit::Bytes, "Bytes replayed");
    describe_counter!(
        REPLAY_STREAMS_UNLOGGED_TOTAL,
        Unit::Count,
        "Tracked SSE bodies not logged: another body of the stream writes its log"
    );
    describe_gauge!(
        REPLAY_DETACHED_STREAMS,
        Unit::Count,
        "Detached SSE streams being read, their clients gone"
    );
    describe_counter!(
        REPLAY_DETACHED_TOTAL,
        Unit::Count,
        "Detached SSE streams, by outcome: started, refused, finished, bound, failed, drained, \
         replaced"
    );
    describe_counter!(
        REPLAY_STORE_EVENTS_TOTAL,
        Unit::Count,
        "Events appended to the store's replay logs"
    );
    describe_counter!(
        REPLAY_STORE_DROPPED_TOTAL,
        Unit::Count,
        "Replay logs whose events were not queued for the store, by reason"
    );
    describe_counter!(
        REPLAY_DURABLE_CUT_TOTAL,
        Unit::Count,
        "Responses ended before events the store did not confirm in time, or lost"
    );
    describe_counter!(
        REPLAY_STORE_REFUSED_TOTAL,
        Unit::Count,
        "Replay-log appends the store refused: a newer history holds the stream's log"
    );
}
