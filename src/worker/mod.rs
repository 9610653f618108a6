//! The one background worker of a tracker: batches, coalesces, de-duplicates and retries the
//! latest ids on their way to the [`Store`](crate::store::Store).
//!
//! Its input is the registry's [hand-off](crate::registry::handoff): the streams that changed
//! (a stream's slot, at most once until the worker has read it), which it receives
//! continuously into its pending list, the evicted streams still owed a write, and the
//! sessions marked active; the slot itself holds the latest id. The worker's own files:
//! [`state`] (what it owes and its rounds), [`batch`] (one round's entries), [`retry`],
//! [`guard`] (each store call), [`report`] (what a shutdown reports). On every flush tick the
//! worker starts a *round*:
//! it reads the latest id of every pending stream (however many ids the stream committed since
//! the last round), leaves out what the store already has, adds the retries that are due and
//! the evicted streams still owed a write, and writes all of it in calls of at most `max_batch`
//! entries, one call at a time. Alongside, at each tick, it writes the activity of the sessions
//! active since the last tick the same way. One save and one activity write can be in flight
//! together, so that a hung call of one kind does not hold up the other.
//!
//! Every store call runs under the store timeout with its panics caught: an error, a hang and a
//! panic are each one failed call, counted (`sse_tracker_store_errors_total{op,reason}`),
//! logged, and followed by back-off. After a failed call the rest of the round's calls of that
//! kind wait, and no call of that kind starts again before the retry policy's delay (doubling
//! with each failure in a row): a store that fails at once for ever costs a few calls per
//! second, never a loop. The failed entries go to a time-ordered retry queue; a due retry
//! writes the stream's latest id at that moment, so it never overwrites a newer one.
//!
//! Everything the worker holds is bounded by the registry: each slot is at most once in its
//! pending list, its retry queue and its given-up list, and evicted slots are owned by the
//! hand-off's bounded FIFO. The worker runs under a supervisor that catches its panics and
//! restarts it from the registry's state, and notices when its task is dropped.

pub(crate) mod batch;
pub(crate) mod guard;
mod report;
pub(crate) mod retry;
mod state;

pub use report::ShutdownReport;
use report::report;
use state::{CallDone, Gate, Round, State};

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{oneshot, watch};
use tokio::time::{Instant, Interval, MissedTickBehavior, sleep_until};

use crate::metrics::Handles;
use crate::registry::Registry;
use crate::store::{BoxFuture, DynStore};
use crate::sync::lock;
use guard::{CatchUnwind, panic_message};
use retry::{Jitter, RetryPolicy, RetryQueue};

/// What the worker needs to append replay logs to the store (replay across instances).
#[derive(Debug, Clone)]
pub(crate) struct LogsToStore {
    /// This tracker's name in the store (see `LogAppend::producer`).
    pub(crate) producer: String,
    /// `sse_tracker_replay_store_events_total`.
    pub(crate) events: metrics::Counter,
    /// `sse_tracker_replay_store_refused_total`.
    pub(crate) refused: metrics::Counter,
    /// How long each renewal of the lease runs (see [`lease_ttl`]).
    pub(crate) lease_ttl: Duration,
}

/// How often the worker renews its lease in the store, with replay across instances (at each
/// flush when the flush interval is longer).
pub(crate) const LEASE_EVERY: Duration = Duration::from_secs(1);

/// How long a lease runs: two renewals, each of which may take the store's whole deadline,
/// and at least 5 s (12 s with the defaults). A reader knows an instance died at most this
/// long after it did.
pub(crate) fn lease_ttl(flush_interval: Duration, store_timeout: Duration) -> Duration {
    LEASE_EVERY
        .max(flush_interval)
        .saturating_add(store_timeout)
        .saturating_mul(2)
        .max(Duration::from_secs(5))
}

/// The worker's settings.
#[derive(Debug, Clone)]
pub(crate) struct WorkerConfig {
    pub(crate) max_batch: usize,
    pub(crate) flush_interval: Duration,
    pub(crate) retry: RetryPolicy,
    pub(crate) store_timeout: Duration,
}

struct ShutdownRequest {
    deadline: Instant,
    /// `None` when the worker shuts itself down: every tracker, layer and body is gone.
    reply: Option<oneshot::Sender<ShutdownReport>>,
}

/// `timeout` from now, or far in the future (100 years) when that is beyond what an instant
/// can hold.
pub(crate) fn instant_after(timeout: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(timeout)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

/// How long the worker keeps trying to write what it holds once every tracker, layer and body
/// is gone without a `shutdown()`.
const ABANDONED_DEADLINE: Duration = Duration::from_secs(10);

/// The tracker's background worker: a future to run on a Tokio runtime (spawn it), made by
/// [`SseTrackerBuilder::build_with_worker`](crate::SseTrackerBuilder::build_with_worker). It
/// runs until the tracker is shut down, or every tracker, layer and body is gone (then it
/// writes what it holds for up to 10 s, and stops).
#[must_use = "the worker does nothing until it is spawned"]
pub struct WorkerTask(BoxFuture<'static, ()>);

impl std::fmt::Debug for WorkerTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerTask")
    }
}

impl Future for WorkerTask {
    type Output = ();

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

/// What the tracker knows of its worker task.
#[derive(Debug)]
struct Status {
    /// True once the worker has stopped (normally or not).
    finished: watch::Sender<bool>,
    /// The task ended without finishing.
    lost: AtomicBool,
}

/// The tracker's side of the worker (bodies reach it through the registry's hand-off).
#[derive(Debug)]
pub(crate) struct WorkerHandle {
    control: Mutex<Option<oneshot::Sender<ShutdownRequest>>>,
    status: Arc<Status>,
    registry: Arc<Registry>,
}

impl std::fmt::Debug for ShutdownRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShutdownRequest")
            .field("deadline", &self.deadline)
            .finish()
    }
}

impl WorkerHandle {
    /// The handle and the worker's task (its supervisor), for the caller to spawn.
    pub(crate) fn new(
        config: WorkerConfig,
        registry: Arc<Registry>,
        store: Arc<dyn DynStore>,
        metrics: Handles,
        logs: Option<LogsToStore>,
    ) -> (Self, WorkerTask) {
        let (control, control_rx) = oneshot::channel();
        let status = Arc::new(Status {
            finished: watch::Sender::new(false),
            lost: AtomicBool::new(false),
        });
        let io = Io {
            control: Some(control_rx),
            saving: None,
            touching: None,
            appending: None,
            leasing: None,
            open: true,
        };
        let state = State {
            registry: registry.clone(),
            store,
            metrics,
            jitter: Jitter::new(),
            pending: Vec::new(),
            retries: RetryQueue::default(),
            given_up: Vec::new(),
            probe_at: None,
            save_gate: Gate::default(),
            touch_gate: Gate::default(),
            append_gate: Gate::default(),
            logs,
            append_due: false,
            lease_at: Instant::now(),
            appending: Vec::new(),
            round_no: 0,
            round: Round::default(),
            flush_due: false,
            touch_due: false,
            retry_round_due: false,
            shutdown: None,
            dropped_reported: 0,
            config,
        };
        // Made here and moved into the task, so that it notices the task being dropped even
        // before its first poll.
        let guard = LostGuard {
            status: status.clone(),
            registry: registry.clone(),
            metrics: state.metrics.clone(),
            armed: true,
        };
        let task = Box::pin(supervise(io, state, status.clone(), guard));
        (
            Self {
                control: Mutex::new(Some(control)),
                status,
                registry,
            },
            WorkerTask(task),
        )
    }

    /// Stops intake, flushes and retries until `timeout`, then reports. A second call (or a
    /// call after the worker was lost) writes nothing and reports what the store still lacks.
    pub(crate) async fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        let deadline = instant_after(timeout);
        let control = lock(&self.control).take();
        if let Some(control) = control {
            let (reply, report) = oneshot::channel();
            if control
                .send(ShutdownRequest {
                    deadline,
                    reply: Some(reply),
                })
                .is_ok()
            {
                // The worker answers by its deadline; this one only guards against a worker
                // that cannot run (its runtime blocked), a little later.
                let guard = deadline
                    .checked_add(Duration::from_secs(1))
                    .unwrap_or(deadline);
                if let Ok(Ok(report)) = tokio::time::timeout_at(guard, report).await {
                    return report;
                }
            }
        } else {
            // Another shutdown is running or done: wait for it (up to our own deadline).
            let mut finished = self.status.finished.subscribe();
            let _ = tokio::time::timeout_at(deadline, finished.wait_for(|done| *done)).await;
        }
        report(
            &self.registry,
            0,
            Instant::now() >= deadline,
            self.status.lost.load(Ordering::Acquire),
            !*self.status.finished.borrow(),
        )
    }
}

/// What the worker's loop waits on; survives a restart of the loop.
struct Io {
    control: Option<oneshot::Receiver<ShutdownRequest>>,
    /// The save call in flight, and the activity call in flight: one of each kind at most, so
    /// that a hung call of one kind does not hold up the other.
    saving: Option<BoxFuture<'static, CallDone>>,
    touching: Option<BoxFuture<'static, CallDone>>,
    /// The replay-log append in flight, and the lease renewal (replay across instances).
    appending: Option<BoxFuture<'static, CallDone>>,
    leasing: Option<BoxFuture<'static, CallDone>>,
    /// The hand-off's channel is open (not closed by a shutdown, asked for or abandoned).
    open: bool,
}

/// Records taken from the channel per receive, at most; the loop goes round between two.
const RECEIVE_LIMIT: usize = 1024;
/// Slots the idle sweep looks at per tick, at most.
const SWEEP_BUDGET: usize = 1024;

/// Waits for `f` when there is one; never completes otherwise.
async fn maybe<F: Future + Unpin>(f: &mut Option<F>) -> F::Output {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

/// Marks the worker lost when its task is dropped before it finished.
struct LostGuard {
    status: Arc<Status>,
    registry: Arc<Registry>,
    metrics: Handles,
    armed: bool,
}

impl Drop for LostGuard {
    fn drop(&mut self) {
        if self.armed {
            self.status.lost.store(true, Ordering::Release);
            self.metrics.worker_lost.increment(1);
            tracing::error!(
                "SSE tracker worker task ended before it finished (its runtime shut down?): \
                 latest ids are no longer persisted"
            );
            self.registry.handoff().close();
            self.status.finished.send_replace(true);
        }
    }
}

/// Runs the worker, restarting it after a panic (with back-off, so that a panic on every
/// round costs bounded CPU), until it finishes.
async fn supervise(mut io: Io, mut state: State, status: Arc<Status>, mut guard: LostGuard) {
    let mut panics = 0;
    loop {
        match CatchUnwind::new(AssertUnwindSafe(run(&mut io, &mut state))).await {
            Ok(()) => break,
            Err(payload) => {
                panics += 1;
                state.metrics.worker_panics.increment(1);
                tracing::error!(
                    panic = %panic_message(&*payload),
                    restarts = panics,
                    "SSE tracker worker panicked; restarting it from the registry's state"
                );
                io.saving = None;
                io.touching = None;
                io.appending = None;
                io.leasing = None;
                state.recover();
                let pause = state.config.retry.delay(panics, state.jitter.next());
                let resume = instant_after(pause);
                let until = match &state.shutdown {
                    Some(shutdown) => resume.min(shutdown.request.deadline),
                    None => resume,
                };
                tokio::time::sleep_until(until).await;
            }
        }
    }
    let report = state.shutdown.take().map(|shutdown| {
        let deadline_reached = Instant::now() >= shutdown.request.deadline;
        let report = report(
            &state.registry,
            shutdown.written.len(),
            deadline_reached,
            false,
            false,
        );
        (shutdown.request.reply, report)
    });
    state.registry.handoff().close();
    guard.armed = false;
    status.finished.send_replace(true);
    if let Some((reply, report)) = report {
        if !report.is_complete() {
            tracing::warn!(
                persisted = report.persisted,
                given_up = report.given_up.len(),
                pending = report.pending.len(),
                dropped = report.dropped,
                "SSE tracker shut down with latest ids not in the store"
            );
        }
        if let Some(reply) = reply {
            let _ = reply.send(report);
        }
    }
}

async fn run(io: &mut Io, state: &mut State) {
    let mut tick: Interval = tokio::time::interval(state.config.flush_interval);
    tick.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut buf = Vec::with_capacity(RECEIVE_LIMIT);
    // The worker's input, all of it: the slots bodies offer, and the lists beside them.
    let registry = state.registry.clone();
    let handoff = registry.handoff();
    loop {
        let now = Instant::now();
        if state.finished(io, now) {
            return;
        }
        if io.saving.is_none() && state.round.saves.is_empty() {
            if state.shutdown.is_some() && state.owes_writes() && state.save_gate.is_open(now) {
                // A shutdown writes what it owes as soon as it can, not at the next tick.
                state.flush_due = true;
            }
            if state.flush_due {
                state.flush_due = false;
                state.retry_round_due = false;
                state.assemble(now, true);
            } else if state.retry_round_due {
                state.retry_round_due = false;
                state.assemble(now, false);
            }
        }
        if io.touching.is_none() && state.round.touches.is_empty() && state.touch_due {
            state.touch_due = false;
            state.assemble_touches(now);
        }
        if io.appending.is_none() && state.round.appends.is_empty() && state.append_due {
            state.append_due = false;
            state.assemble_appends(now);
        }
        if io.saving.is_none() {
            io.saving = state.next_save(now);
        }
        if io.appending.is_none() {
            io.appending = state.next_append(now);
        }
        if io.leasing.is_none() {
            io.leasing = state.next_lease(now);
        }
        if io.touching.is_none() {
            io.touching = state.next_touch(now);
        }
        state.metrics.queue_depth.set(handoff.queued() as f64);
        state
            .metrics
            .retry_queue_depth
            .set(state.retries.len() as f64);

        // Retries, probes and the shutdown's writes are saves: they wait for the save in
        // flight, whose end wakes the loop. Activity writes start at the flush tick.
        let wake = if io.saving.is_none() && state.round.saves.is_empty() {
            state.next_wake()
        } else {
            None
        };
        let deadline = state.shutdown.as_ref().map(|s| s.request.deadline);
        tokio::select! {
            biased;
            request = maybe_control(&mut io.control) => {
                io.control = None;
                match request {
                    Ok(request) => state.begin_shutdown(request),
                    // The handle is gone with every tracker, layer and body (bodies keep it
                    // alive): write what is held, for a while, then stop.
                    Err(_) if state.shutdown.is_none() => {
                        state.begin_shutdown(ShutdownRequest {
                            deadline: instant_after(ABANDONED_DEADLINE),
                            reply: None,
                        });
                    }
                    Err(_) => {}
                }
                // Stop intake now, even though bodies may still offer; what is already in the
                // channel is still received.
                handoff.close_channel().await;
            }
            done = maybe(&mut io.saving) => {
                io.saving = None;
                state.finish_call(done);
                // A store that answers at once must not keep this task from yielding.
                tokio::task::yield_now().await;
            }
            done = maybe(&mut io.touching) => {
                io.touching = None;
                state.finish_call(done);
                tokio::task::yield_now().await;
            }
            done = maybe(&mut io.appending) => {
                io.appending = None;
                state.finish_call(done);
                tokio::task::yield_now().await;
            }
            done = maybe(&mut io.leasing) => {
                io.leasing = None;
                state.finish_call(done);
            }
            received = handoff.recv_many(&mut buf, RECEIVE_LIMIT), if io.open => {
                if received == 0 {
                    // Closed and emptied.
                    io.open = false;
                } else {
                    state.accept(&mut buf);
                }
            }
            _ = tick.tick() => {
                state.flush_due = true;
                state.touch_due = true;
                state.append_due = true;
                state.on_tick();
            }
            _ = sleep_until(wake.unwrap_or(now)), if wake.is_some() => {
                state.on_wake(Instant::now());
            }
            _ = sleep_until(deadline.unwrap_or(now)), if deadline.is_some() => {}
        }
    }
}

async fn maybe_control(
    control: &mut Option<oneshot::Receiver<ShutdownRequest>>,
) -> Result<ShutdownRequest, oneshot::error::RecvError> {
    match control {
        Some(rx) => rx.await,
        None => std::future::pending().await,
    }
}
