//! Replay across instances: a reconnect for a stream this instance holds no log of is answered
//! from the store's log of the stream (see
//! [`ReplayPolicy::across_instances`](super::ReplayPolicy::across_instances)): looked up once
//! ([`lookup`]), then followed ([`StoreTail`]) by reading the store once per flush interval,
//! the rate at which the producing instance appends.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::{Instant, Sleep};

use crate::key::{EventId, StreamKey};
use crate::metrics::{StoreErrors, StoreOp};
use crate::store::{BoxFuture, DynStore, LogEnd, StoredLog, holds_all};
use crate::worker::LEASE_EVERY;
use crate::worker::guard::{StoreFailure, guarded};

/// What a reader of the store needs: the store, the stream's key, and the bounds of a read.
#[derive(Clone)]
pub(crate) struct StoreReader {
    pub(crate) store: Arc<dyn DynStore>,
    pub(crate) key: StreamKey,
    /// Each store call's deadline.
    pub(crate) timeout: Duration,
    /// The most events a read asks for.
    pub(crate) limit: usize,
    pub(crate) errors: StoreErrors,
}

impl StoreReader {
    /// Reads the log after `after`, under the deadline; `None` (counted, logged) when the call
    /// fails.
    async fn read(&self, after: Option<u64>) -> Option<Option<StoredLog>> {
        self.read_logged(after, true).await
    }

    /// [`read`](Self::read); a failure is logged only with `log` (it is counted in any case).
    async fn read_logged(&self, after: Option<u64>, log: bool) -> Option<Option<StoredLog>> {
        let read = guarded(
            self.timeout,
            self.store.read_log(&self.key, after, self.limit),
        )
        .await;
        self.ok(read, log)
    }

    /// Whether `producer`'s lease runs; `None` when the call fails.
    async fn lease_alive(&self, producer: &str) -> Option<bool> {
        let alive = guarded(self.timeout, self.store.lease_alive(producer)).await;
        self.ok(alive, true)
    }

    /// The value of a read, or `None` with the failure counted (`op="read_log"`) and, with
    /// `log`, logged.
    fn ok<T>(&self, result: Result<T, StoreFailure>, log: bool) -> Option<T> {
        match result {
            Ok(value) => Some(value),
            Err(failure) => {
                self.errors.count(StoreOp::ReadLog, failure.reason());
                if !log {
                    return None;
                }
                tracing::warn!(
                    error = %failure,
                    key = %self.key,
                    "reading a replay log from the store failed"
                );
                None
            }
        }
    }
}

/// What the store holds for a reconnect.
#[derive(Debug)]
pub(crate) enum Looked {
    /// The stream's log holds the client's event and every event after it that its producer
    /// appended: the events after it are `log.events[after..]`. `lost`: nothing more will
    /// reach the log, and the stream did not finish (its producer stopped the history, or its
    /// lease ran out).
    Found {
        log: StoredLog,
        after: usize,
        lost: bool,
    },
    /// The store cannot answer: no log, the client's id not in it, events missing after it,
    /// or the store failed.
    Missing,
}

/// Looks `id` up in the store's log of `reader.key`: the newest event whose own id it is.
///
/// The producer appends once per flush interval, after its client got the events: a client
/// that reconnects at once may name an event the store does not hold yet. While the log is
/// not ended, the look-up reads it again every `every`, for up to `wait`. A read that fails
/// (a Redis Cluster failing over, say) is tried again every `every` for up to the store
/// timeout, counted from the look-up's start.
pub(crate) fn lookup(
    reader: StoreReader,
    id: EventId,
    every: Duration,
    wait: Duration,
) -> BoxFuture<'static, Looked> {
    Box::pin(async move {
        let started = Instant::now();
        let give_up = started + wait;
        let mut lease_checked = false;
        let mut failed = false;
        let (log, at) = loop {
            // The first failure is logged; those of the tries after it are counted only.
            let log = match reader.read_logged(None, !failed).await {
                Some(Some(log)) => log,
                Some(None) => return Looked::Missing,
                None if Instant::now() + every < started + reader.timeout => {
                    failed = true;
                    tokio::time::sleep(every).await;
                    continue;
                }
                None => return Looked::Missing,
            };
            let found = log
                .events
                .iter()
                .rposition(|event| event.id.as_ref() == Some(&id));
            match found {
                Some(at) => break (log, at),
                None if log.end.is_some() || Instant::now() + every > give_up => {
                    return Looked::Missing;
                }
                None => {
                    // Worth waiting for only while its producer lives.
                    if !lease_checked {
                        lease_checked = true;
                        if reader.lease_alive(&log.producer).await == Some(false) {
                            return Looked::Missing;
                        }
                    }
                    tokio::time::sleep(every).await;
                }
            }
        };
        // Every event after the client's, none missing, up to the last appended.
        if !holds_all(
            &log.events[at + 1..],
            log.events[at].offset + 1,
            log.next_offset,
        ) {
            return Looked::Missing;
        }
        let lost = match log.end {
            Some(LogEnd::Finished) => false,
            Some(LogEnd::Stopped) => true,
            // A failed check counts as alive: the tail checks again.
            None => !reader.lease_alive(&log.producer).await.unwrap_or(true),
        };
        Looked::Found {
            log,
            after: at + 1,
            lost,
        }
    })
}

/// A place among the reconnects that follow the store, at most
/// [`max_detached`](super::ReplayPolicy::max_detached) at once per tracker; given back on drop.
#[derive(Debug)]
pub(crate) struct TailPermit(Arc<AtomicUsize>);

impl TailPermit {
    /// A place, if one is free.
    pub(crate) fn try_take(count: &Arc<AtomicUsize>, max: usize) -> Option<Self> {
        count
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(count.clone()))
    }
}

impl Drop for TailPermit {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What one read of the store gives a [`StoreTail`].
enum Step {
    /// Events (possibly none) up to `next`, and whether the stream ended after them.
    Events {
        bytes: Bytes,
        next: u64,
        ended: bool,
    },
    /// The producer's lease ran out before its end reached the store.
    Lost,
    /// The tail cannot go on: another history, events missing, the log gone, the store
    /// failing. The client's reconnect is told what the store holds then.
    End,
}

/// A reader following the store's log of a stream that another instance produces: its events
/// from an offset on, read once per interval, until the log's end mark; the gap signal when
/// the producer's lease runs out first.
pub(crate) struct StoreTail {
    reader: StoreReader,
    epoch: u64,
    producer: String,
    /// The offset of the next event to send.
    next: u64,
    /// Nothing more will come: the stream ended (`finished`), or the tail stopped.
    done: bool,
    finished: bool,
    /// The bytes that end the response when the producer is lost (the gap event, if the
    /// policy has one).
    gap: Bytes,
    every: Duration,
    /// When the last events came: a log still for `idle_limit` (the bound on a detached
    /// stream's life) is given up, with the gap signal.
    still_since: Instant,
    idle_limit: Duration,
    /// When the producer's lease is checked next, while the log is still.
    lease_at: Instant,
    read: Option<BoxFuture<'static, Step>>,
    sleep: Option<Pin<Box<Sleep>>>,
    _permit: TailPermit,
}

impl std::fmt::Debug for StoreTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreTail")
            .field("key", &self.reader.key)
            .field("epoch", &self.epoch)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

impl StoreTail {
    /// Follows `log` (as [`lookup`] found it) after its last event, reading every `every`, for
    /// at most `idle_limit` without an event; `done` when nothing more may follow (the log
    /// ended, or its producer is lost).
    pub(crate) fn new(
        reader: StoreReader,
        log: &StoredLog,
        done: bool,
        gap: Bytes,
        (every, idle_limit): (Duration, Duration),
        permit: TailPermit,
    ) -> Self {
        let now = Instant::now();
        Self {
            reader,
            epoch: log.epoch,
            producer: log.producer.clone(),
            next: log.next_offset,
            done,
            finished: done && log.end == Some(LogEnd::Finished),
            gap,
            every,
            still_since: now,
            idle_limit,
            lease_at: now + LEASE_EVERY,
            read: None,
            sleep: None,
            _permit: permit,
        }
    }

    /// Whether the stream ended and every event of it is sent.
    pub(crate) fn is_finished(&self) -> bool {
        self.finished
    }

    /// The next events, or `None` once nothing more will come.
    pub(crate) fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if self.done {
                return Poll::Ready(None);
            }
            if let Some(read) = &mut self.read {
                let step = ready!(read.as_mut().poll(cx));
                self.read = None;
                match step {
                    Step::Events { bytes, next, ended } => {
                        self.next = next;
                        if ended {
                            self.done = true;
                            self.finished = true;
                        }
                        if !bytes.is_empty() {
                            self.still_since = Instant::now();
                            self.lease_at = self.still_since + LEASE_EVERY;
                            return Poll::Ready(Some(bytes));
                        }
                        if self.done {
                            return Poll::Ready(None);
                        }
                    }
                    Step::Lost => {
                        self.done = true;
                        let gap = std::mem::take(&mut self.gap);
                        return Poll::Ready(Some(gap).filter(|gap| !gap.is_empty()));
                    }
                    Step::End => {
                        self.done = true;
                        return Poll::Ready(None);
                    }
                }
                let at = Instant::now() + self.every;
                match &mut self.sleep {
                    Some(sleep) => sleep.as_mut().reset(at),
                    None => self.sleep = Some(Box::pin(tokio::time::sleep_until(at))),
                }
            }
            if let Some(sleep) = &mut self.sleep {
                ready!(sleep.as_mut().poll(cx));
            }
            if self.still_since.elapsed() >= self.idle_limit {
                // As long as a detached stream may live, and nothing came.
                tracing::debug!(key = %self.reader.key, "gave up following a still replay log");
                self.read = Some(Box::pin(async { Step::Lost }));
                continue;
            }
            let check_lease = Instant::now() >= self.lease_at;
            if check_lease {
                self.lease_at = Instant::now() + LEASE_EVERY;
            }
            self.read = Some(self.step(check_lease));
        }
    }

    /// The next read: the events after those sent, and, when the log has been still for a
    /// lease renewal interval, the producer's lease.
    fn step(&self, check_lease: bool) -> BoxFuture<'static, Step> {
        let reader = self.reader.clone();
        let (epoch, next) = (self.epoch, self.next);
        let producer = check_lease.then(|| self.producer.clone());
        Box::pin(async move {
            let Some(Some(log)) = reader.read(next.checked_sub(1)).await else {
                return Step::End;
            };
            if log.epoch != epoch {
                return Step::End;
            }
            let mut bytes = Vec::new();
            let mut upto = next;
            for event in log.events.iter().filter(|event| event.offset >= next) {
                if event.offset != upto {
                    // Events missing: what came before them goes out, the next read ends.
                    break;
                }
                bytes.extend_from_slice(&event.bytes);
                upto += 1;
            }
            if upto == next && log.next_offset > next {
                // The producer appended past events the store does not hold.
                return Step::End;
            }
            let all = upto >= log.next_offset;
            let ended = all && log.end == Some(LogEnd::Finished);
            let stopped = all && log.end == Some(LogEnd::Stopped);
            if upto == next && stopped {
                return Step::Lost;
            }
            if upto == next
                && !ended
                && let Some(producer) = producer
                && reader.lease_alive(&producer).await == Some(false)
            {
                return Step::Lost;
            }
            Step::Events {
                bytes: Bytes::from(bytes),
                next: upto,
                ended,
            }
        })
    }
}
