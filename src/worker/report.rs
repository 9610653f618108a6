//! What a shutdown reports: every stream whose latest id the store lacks, checked stream by
//! stream against the registry (and the hand-off's evicted slots).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::key::StreamKey;
use crate::registry::{Registry, Slot};

/// What [`SseTracker::shutdown`](crate::SseTracker::shutdown) reports: which streams' latest
/// ids are in the store, checked stream by stream when the shutdown ends.
///
/// Every stream whose latest id is not in the store at that moment is listed, in `given_up` or
/// in `pending`: ids waiting for a flush, a retry, a write in flight, a hand-off to the worker,
/// and those of evicted streams still waiting for a write. Ids committed after the shutdown
/// began are not written (the worker stops taking new ones), so a stream still publishing then
/// is listed too: drain open streams first.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Streams whose latest id this shutdown wrote (each stream counted once).
    pub persisted: usize,
    /// Streams whose write failed more often than the retry policy allows, during the shutdown
    /// too (a shutdown tries given-up streams again, so after a short shutdown against a store
    /// that stays down they are in `pending`).
    pub given_up: Vec<StreamKey>,
    /// Streams whose latest id is not in the store for another reason (not written before the
    /// deadline, or committed after the shutdown began).
    pub pending: Vec<StreamKey>,
    /// Latest ids dropped before they reached the store since the tracker was built (evicted
    /// streams beyond the `max_pending_evicted` bound, or evicted after the worker stopped);
    /// each was counted in `sse_tracker_ids_dropped_total` and logged.
    pub dropped: u64,
    /// Whether the deadline cut the shutdown short.
    pub deadline_reached: bool,
    /// Whether the worker task ended without finishing (its runtime shut down under it): then
    /// nothing was written during this shutdown.
    pub worker_lost: bool,
    /// Whether the worker was still running when this report was made: the report of a second
    /// `shutdown` that stopped waiting for the first at its own deadline, or of a worker that
    /// did not answer by the deadline (its runtime blocked). Its lists are what the store
    /// lacked at that moment, and writes may still land after it; such a report is never
    /// complete.
    pub worker_running: bool,
}

impl ShutdownReport {
    /// Whether every latest id reached the store, none was dropped, and the worker ran to the
    /// end and had finished when the report was made.
    pub fn is_complete(&self) -> bool {
        self.given_up.is_empty()
            && self.pending.is_empty()
            && self.dropped == 0
            && !self.worker_lost
            && !self.worker_running
    }
}

/// Lists every stream whose latest id the store does not have. An evicted slot of a key whose
/// slot in the registry has an id of its own in the store is covered by it: that id is newer.
pub(super) fn report(
    registry: &Registry,
    persisted: usize,
    deadline_reached: bool,
    worker_lost: bool,
    worker_running: bool,
) -> ShutdownReport {
    let mut covered: BTreeSet<StreamKey> = BTreeSet::new();
    let mut owed: Vec<Arc<Slot>> = Vec::new();
    for slot in registry.all_slots() {
        if slot.is_evicted() || slot.unpersisted() {
            owed.push(slot);
        } else if slot.latest().is_some() {
            covered.insert(slot.key().clone());
        }
    }
    let mut pending = BTreeSet::new();
    let mut given_up = BTreeSet::new();
    for slot in owed {
        if !slot.unpersisted() || (slot.is_evicted() && covered.contains(slot.key())) {
            continue;
        }
        if slot.marks().is_given_up() {
            given_up.insert(slot.key().clone());
        } else {
            pending.insert(slot.key().clone());
        }
    }
    pending.retain(|key| !given_up.contains(key));
    ShutdownReport {
        persisted,
        given_up: given_up.into_iter().collect(),
        pending: pending.into_iter().collect(),
        dropped: registry.handoff().dropped(),
        deadline_reached,
        worker_lost,
        worker_running,
    }
}
