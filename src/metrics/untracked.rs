//! Why an SSE response is not tracked: a counter per reason, and one log line per reason with
//! the setting that would track such streams.

use super::{
    Handles, REASON_ANONYMOUS, REASON_BAD_STREAM_NAME, REASON_CONCURRENT, REASON_ENCODED,
    REASON_NO_OWNER, REASON_NOT_RESUMABLE, REASON_REGISTRY_FULL,
};

impl Handles {
    /// Counts an SSE stream (or the ids of one) left untracked, and logs the reason at `WARN`
    /// the first time it comes, with the setting that would track such streams (each stream
    /// is logged at `DEBUG` by the caller). Returns the `reason` label.
    pub(crate) fn untracked(&self, why: Untracked) -> &'static str {
        self.untracked[why as usize].increment(1);
        if !self.untracked_warned[why as usize].swap(true, std::sync::atomic::Ordering::Relaxed) {
            if why == Untracked::NotResumable {
                // Nothing to set: the protocol has nothing to track.
                tracing::info!(
                    reason = why.label(),
                    "SSE streams with nothing to track: {} (logged once; each one is counted \
                     in sse_tracker_untracked_streams_total)",
                    why.advice()
                );
            } else {
                tracing::warn!(
                    reason = why.label(),
                    "SSE streams left untracked: {} (logged once per reason; each one is \
                     counted in sse_tracker_untracked_streams_total and logged at DEBUG)",
                    why.advice()
                );
            }
        }
        why.label()
    }
}

/// Why an SSE response (or the ids of one) is not tracked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Untracked {
    NoOwner,
    Anonymous,
    NotResumable,
    BadStreamName,
    RegistryFull,
    Concurrent,
    Encoded,
}

impl Untracked {
    pub(super) const ALL: [Untracked; 7] = [
        Untracked::NoOwner,
        Untracked::Anonymous,
        Untracked::NotResumable,
        Untracked::BadStreamName,
        Untracked::RegistryFull,
        Untracked::Concurrent,
        Untracked::Encoded,
    ];

    pub(crate) fn label(self) -> &'static str {
        match self {
            Untracked::NoOwner => REASON_NO_OWNER,
            Untracked::Anonymous => REASON_ANONYMOUS,
            Untracked::NotResumable => REASON_NOT_RESUMABLE,
            Untracked::BadStreamName => REASON_BAD_STREAM_NAME,
            Untracked::RegistryFull => REASON_REGISTRY_FULL,
            Untracked::Concurrent => REASON_CONCURRENT,
            Untracked::Encoded => REASON_ENCODED,
        }
    }

    /// Why, and the setting that would track such streams.
    fn advice(self) -> &'static str {
        match self {
            Untracked::NoOwner => {
                "the request carries no owner from the configured OwnerSource (its header or \
                 request extension is missing or invalid); the default, \
                 OwnerSource::session_header, tracks requests without a session too (a GET as \
                 its route's feed)"
            }
            Untracked::Anonymous => {
                "a request other than GET with no owner has a stream of its own that no later \
                 request can address; take the owner from authentication \
                 (OwnerSource::extension) or use event ids that name their stream \
                 (StreamSource::event_id)"
            }
            Untracked::NotResumable => {
                "requests of MCP 2026-07-28 and later have no session and their streams no \
                 ids (the protocol removed resumption); they still get heartbeats, a span each \
                 and drains that never cut them"
            }
            Untracked::BadStreamName => {
                "the stream name (\"{METHOD} {path}\", or the StreamName the handler set) is \
                 invalid; set a valid StreamName in the response extensions"
            }
            Untracked::RegistryFull => {
                "every tracked stream has an open body, so none could make room; raise \
                 max_streams"
            }
            Untracked::Concurrent => {
                "more than MAX_CONCURRENT_STREAMS (64) concurrent responses of one owner on one route; use \
                 StreamSource::shared_route, or event ids that name their stream \
                 (StreamSource::event_id)"
            }
            Untracked::Encoded => {
                "the SSE response has a Content-Encoding, so it can be neither scanned nor \
                 given heartbeats; add the tracker's layer inside the compression layer, or \
                 leave text/event-stream uncompressed"
            }
        }
    }
}

impl From<crate::registry::Refused> for Untracked {
    fn from(refused: crate::registry::Refused) -> Self {
        match refused {
            crate::registry::Refused::Full => Untracked::RegistryFull,
            crate::registry::Refused::Busy => Untracked::Concurrent,
        }
    }
}
