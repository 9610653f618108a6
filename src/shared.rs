//! What the HTTP side of one tracker (its layers, services and bodies) and its handle share:
//! the validated settings, the registry, the metrics, the worker's handle and the drain.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use crate::identity::{OwnerRule, StreamKind};
use crate::metrics::{Handles, ReplayMetrics};
use crate::registry::{Limits, Registry};
use crate::replay::{ReplayPolicy, Replayer};
use crate::store::DynStore;
use crate::worker::{
    LogsToStore, WorkerConfig, WorkerHandle, WorkerTask, instant_after, lease_ttl,
};

/// What every layer, service and body of one tracker shares.
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) registry: Arc<Registry>,
    pub(crate) metrics: Handles,
    pub(crate) worker: WorkerHandle,
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) store_timeout: Duration,
    /// The worker's flush interval: how often a reconnect following the store's log of a
    /// stream reads it (the producer appends at that rate).
    pub(crate) flush_interval: Duration,
    pub(crate) drain: Drain,
    /// The replay logs, when replay is on.
    pub(crate) replay: Option<Replayer>,
}

/// The drain of open SSE bodies (see [`SseTracker::drain`]).
#[derive(Debug, Default)]
pub(crate) struct Drain {
    pub(crate) notify: Arc<tokio::sync::Notify>,
    /// Set by the first drain: the tracker is draining from then on.
    plan: std::sync::OnceLock<DrainPlan>,
}

#[derive(Debug, Clone, Copy)]
struct DrainPlan {
    /// The `retry` to send before ending.
    retry: Option<Duration>,
    /// When a body still inside an event ends anyway.
    deadline: Instant,
}

impl Drain {
    #[inline]
    pub(crate) fn is_draining(&self) -> bool {
        self.plan.get().is_some()
    }

    pub(crate) fn retry(&self) -> Option<Duration> {
        self.plan.get().and_then(|plan| plan.retry)
    }

    /// When a body still inside an event ends anyway.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        self.plan.get().map(|plan| plan.deadline)
    }

    pub(crate) fn start(&self, retry: Option<Duration>, timeout: Duration) {
        let deadline = instant_after(timeout);
        let _ = self.plan.set(DrainPlan { retry, deadline });
        self.notify.notify_waiters();
    }
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("config", &self.config)
            .field("registry", &self.registry)
            .finish_non_exhaustive()
    }
}

impl Shared {
    pub(crate) fn new(
        config: Config,
        limits: Limits,
        store: Arc<dyn DynStore>,
        channel_capacity: usize,
        worker: WorkerConfig,
        replay: Option<ReplayPolicy>,
    ) -> (Self, WorkerTask) {
        let metrics = Handles::register();
        let registry = Arc::new(Registry::new(limits, metrics.registry(), channel_capacity));
        // The worker holds the registry, the store and the metrics, never `Shared`: when the
        // last tracker, layer and body are gone, so is the worker's handle, whose control
        // channel then closes, and the worker writes what it holds and finishes.
        let store_timeout = worker.store_timeout;
        let flush_interval = worker.flush_interval;
        let replay = replay.map(|policy| {
            let queue = registry.handoff().log_queue().clone();
            // A durable event waits for the next flush and its append (retried once).
            let durable_wait = flush_interval.saturating_add(store_timeout.saturating_mul(2));
            Replayer::new(policy, ReplayMetrics::register(), queue, durable_wait)
        });
        let to_store = replay
            .as_ref()
            .filter(|replayer| replayer.budget.policy.across_instances)
            .map(|replayer| LogsToStore {
                producer: instance_id(),
                events: replayer.budget.metrics.store_events.clone(),
                refused: replayer.budget.metrics.store_refused.clone(),
                lease_ttl: lease_ttl(flush_interval, store_timeout),
            });
        let (worker, task) = WorkerHandle::new(
            worker,
            registry.clone(),
            store.clone(),
            metrics.clone(),
            to_store,
        );
        let shared = Self {
            config,
            registry,
            metrics,
            worker,
            store,
            store_timeout,
            flush_interval,
            drain: Drain::default(),
            replay,
        };
        (shared, task)
    }
}

/// A name for this tracker in a shared store, unique to it: its producer name for replay
/// logs, whose lease says whether it lives. Random (a restarted process must not take over
/// the lease of the one that died), with the process id for people reading the store.
fn instance_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::hash::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    let high = hasher.finish();
    let low = std::hash::RandomState::new().hash_one(high);
    format!("{}-{high:016x}{low:016x}", std::process::id())
}

/// The heartbeat settings, with the bytes to send precomputed for each position.
#[derive(Debug, Clone)]
pub(crate) struct Heartbeat {
    pub(crate) interval: Duration,
    /// A whole comment event, for an event boundary: `: text\n\n`.
    pub(crate) event: Bytes,
    /// A comment line, for a line boundary inside an event: `: text\n`.
    pub(crate) line: Bytes,
    /// The same two, ending lines with CR, for when the stream's last byte was a CR.
    pub(crate) event_cr: Bytes,
    pub(crate) line_cr: Bytes,
}

impl Heartbeat {
    pub(crate) fn new(interval: Duration, comment: &str) -> Self {
        let line = if comment.is_empty() {
            ":".to_owned()
        } else {
            format!(": {comment}")
        };
        Self {
            interval,
            event: Bytes::from(format!("{line}\n\n")),
            line: Bytes::from(format!("{line}\n")),
            event_cr: Bytes::from(format!("{line}\r\r")),
            line_cr: Bytes::from(format!("{line}\r")),
        }
    }
}

/// Validated settings shared by every layer of a tracker.
#[derive(Debug)]
pub(crate) struct Config {
    pub(crate) owner: OwnerRule,
    pub(crate) stream: StreamKind,
    pub(crate) heartbeat: Option<Heartbeat>,
    pub(crate) max_id_len: usize,
    pub(crate) accel_buffering_off: bool,
    pub(crate) send_timeout: Duration,
    pub(crate) drain_timeout: Duration,
}
