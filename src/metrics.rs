//! Metric names and their registration.
//!
//! Every metric is emitted through the [`metrics`] facade, so any recorder works (Prometheus,
//! StatsD, a test's debugging recorder). The tracker takes its metric handles from the recorder
//! that is installed when [`SseTrackerBuilder::build`](crate::SseTrackerBuilder::build) runs:
//! install your recorder first. [`describe`] registers the descriptions below with the current
//! recorder.
//!
//! | name | kind | meaning |
//! |---|---|---|
//! | `sse_tracker_events_total` | counter | events dispatched on tracked streams |
//! | `sse_tracker_heartbeats_total` | counter | heartbeat comments injected |
//! | `sse_tracker_streams_active` | gauge | tracked SSE response bodies open now |
//! | `sse_tracker_untracked_streams_total` | counter | SSE responses passed through untracked, by `reason` |
//! | `sse_tracker_ids_rejected_total` | counter | `id` fields ignored (NUL, or longer than the limit) |
//!
//! The `reason` label of `sse_tracker_untracked_streams_total` is one of
//! [`REASON_NO_SESSION`], [`REASON_BAD_STREAM_NAME`], [`REASON_REGISTRY_FULL`].
//!
//! ```
//! // With the Prometheus exporter installed first:
//! tower_sse_tracker::metrics::describe();
//! ```

use metrics::{Counter, Gauge, Unit, counter, describe_counter, describe_gauge, gauge};

/// Counter: events dispatched on tracked streams.
pub const EVENTS_TOTAL: &str = "sse_tracker_events_total";
/// Counter: heartbeat comments injected into idle streams.
pub const HEARTBEATS_TOTAL: &str = "sse_tracker_heartbeats_total";
/// Gauge: tracked SSE response bodies open now.
pub const STREAMS_ACTIVE: &str = "sse_tracker_streams_active";
/// Counter: SSE responses passed through without tracking, labelled by `reason`.
pub const UNTRACKED_STREAMS_TOTAL: &str = "sse_tracker_untracked_streams_total";
/// Counter: `id` fields ignored because they hold NUL or exceed the id length limit.
pub const IDS_REJECTED_TOTAL: &str = "sse_tracker_ids_rejected_total";

/// Every metric name, for checking exporters and dashboards.
pub const ALL: &[&str] = &[
    EVENTS_TOTAL,
    HEARTBEATS_TOTAL,
    STREAMS_ACTIVE,
    UNTRACKED_STREAMS_TOTAL,
    IDS_REJECTED_TOTAL,
];

/// `reason` label: no valid session id in the request or response header.
pub const REASON_NO_SESSION: &str = "no_session";
/// `reason` label: the stream name (default or from the handler) is invalid.
pub const REASON_BAD_STREAM_NAME: &str = "bad_stream_name";
/// `reason` label: the registry already tracks `max_streams` streams.
pub const REASON_REGISTRY_FULL: &str = "registry_full";

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
        "SSE id fields ignored (NUL or longer than the limit)"
    );
}

/// Handles taken once at build time, so the frame path does no recorder look-up.
#[derive(Clone)]
pub(crate) struct Handles {
    pub(crate) events: Counter,
    pub(crate) heartbeats: Counter,
    pub(crate) streams_active: Gauge,
    pub(crate) untracked_no_session: Counter,
    pub(crate) untracked_bad_stream_name: Counter,
    pub(crate) untracked_registry_full: Counter,
    pub(crate) ids_rejected: Counter,
}

impl Handles {
    pub(crate) fn register() -> Self {
        let untracked =
            |reason: &'static str| counter!(UNTRACKED_STREAMS_TOTAL, "reason" => reason);
        Self {
            events: counter!(EVENTS_TOTAL),
            heartbeats: counter!(HEARTBEATS_TOTAL),
            streams_active: gauge!(STREAMS_ACTIVE),
            untracked_no_session: untracked(REASON_NO_SESSION),
            untracked_bad_stream_name: untracked(REASON_BAD_STREAM_NAME),
            untracked_registry_full: untracked(REASON_REGISTRY_FULL),
            ids_rejected: counter!(IDS_REJECTED_TOTAL),
        }
    }
}

impl std::fmt::Debug for Handles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Handles")
    }
}
