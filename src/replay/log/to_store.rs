//! A replay log's way to the store (replay across instances): what the store holds of it, and
//! the events it lacks, which the worker reads from the log itself at each flush (there is no
//! second copy of them waiting for the store).

use std::sync::Arc;

use tokio::sync::Notify;

use bytes::Bytes;

use super::{LogInner, StreamLog};
use crate::key::StreamKey;
use crate::registry::LogQueue;
use crate::store::{LogAppend, LogEnd, LogEvent};
use crate::sync::lock;

/// Where a log's detached histories go: its stream's key in the store, and the worker's queue
/// of logs owing the store events.
#[derive(Debug)]
pub(crate) struct StoreBound {
    pub(crate) key: StreamKey,
    pub(crate) queue: Arc<LogQueue>,
}

/// What the store holds of a log's history.
#[derive(Debug, Default)]
pub(super) struct Stored {
    /// The history the figures below are of (another one: the store holds nothing of the
    /// log's current history); 0 before the first append.
    epoch: u64,
    /// The offset after the last event appended.
    next: u64,
    /// The end mark is appended.
    ended: bool,
    /// The offsets the holes in what the store holds lie within (from the first one's start
    /// to the last one's end; `(0, 0)`: none): events trimmed from the log before they were
    /// appended, which the store never gets.
    holes: (u64, u64),
    /// In the worker's queue (cleared when the worker reads the log).
    queued: bool,
    /// The store refused history `epoch` (a newer one holds the stream's log): nothing of it
    /// is owed any more.
    refused: bool,
}

impl Stored {
    /// Whether the store refused history `epoch`.
    pub(super) fn refused(&self, epoch: u64) -> bool {
        self.refused && self.epoch == epoch
    }

    /// The offset after the last event of `epoch` appended, and whether its end is.
    pub(super) fn of(&self, epoch: u64) -> (u64, bool) {
        if self.epoch == epoch {
            (self.next, self.ended)
        } else {
            (0, false)
        }
    }
}

/// What the store lacks of a log: the events of `epoch` from offset `from` on (none when
/// `from` is `None`), and its end.
struct Owed {
    epoch: u64,
    from: Option<u64>,
    end: Option<LogEnd>,
}

impl LogInner {
    /// What the store lacks of this log, if anything: the events and end of its history when
    /// it is detachable; else, when the store holds an earlier detachable history that has no
    /// end, that history's end (it stopped: this one replaced it).
    fn owed(&self) -> Option<Owed> {
        if self.detachable {
            if self.stored.refused(self.epoch) {
                return None;
            }
            let (next, ended) = self.stored.of(self.epoch);
            let end = if ended {
                None
            } else if self.finished {
                Some(LogEnd::Finished)
            } else if !self.writes_history() {
                Some(LogEnd::Stopped)
            } else {
                None
            };
            // Events trimmed before they reached the store can never be written: only those
            // the log still holds are owed (readers see the hole).
            return (self.held() > next.max(self.first) || end.is_some()).then_some(Owed {
                epoch: self.epoch,
                from: Some(next),
                end,
            });
        }
        let open = self.stored.epoch != 0 && !self.stored.ended && !self.stored.refused;
        (open && self.stored.epoch != self.epoch).then_some(Owed {
            epoch: self.stored.epoch,
            from: None,
            end: Some(LogEnd::Stopped),
        })
    }

    /// The offset after the newest record.
    pub(super) fn held(&self) -> u64 {
        self.first + self.records.len() as u64
    }

    /// The events from offset `from` on (at least the first record's), as the store takes
    /// them: each its own bytes, with its own id.
    fn log_events_from(&self, from: u64) -> Vec<LogEvent> {
        let from = from.max(self.first);
        let skip = (from - self.first) as usize;
        let mut start = self.record_start(skip);
        let mut events = Vec::with_capacity(self.records.len() - skip);
        for (n, &len) in self.records.iter().enumerate().skip(skip) {
            let len = len as usize;
            let (event_end, id) = self.parts(start, len);
            let mut bytes = Vec::with_capacity(event_end - start);
            self.ring.copy_into(start, event_end, &mut bytes);
            let id = id.map(|range| self.id_in(range));
            events.push(LogEvent::new(self.first + n as u64, id, Bytes::from(bytes)));
            start += len;
        }
        events
    }
}

impl StreamLog {
    /// Whether the log must be offered to the store's queue now (called with it locked, after
    /// a change): it goes to the store, the store lacks something of it, and it is not queued
    /// yet (it then is).
    pub(super) fn owes_store(&self, inner: &mut LogInner) -> bool {
        if self.store.is_none() || inner.stored.queued {
            return false;
        }
        let owes = inner.owed().is_some();
        inner.stored.queued = owes;
        owes
    }

    /// Puts the log in the worker's queue (the caller set its queued flag), or clears the
    /// flag when the queue takes nothing.
    pub(super) fn offer_to_store(self: &Arc<Self>) {
        let Some(store) = &self.store else { return };
        if !store.queue.offer(self.clone()) {
            lock(&self.inner).stored.queued = false;
        }
    }

    /// For the worker: the append that brings the store up to date with this log (the
    /// events of its history after those appended, and its end), by `producer`; `None` when
    /// the store lacks nothing. The log leaves the queue: a change from now on offers it
    /// again.
    pub(crate) fn unstored(&self, producer: &str) -> Option<LogAppend> {
        let mut inner = lock(&self.inner);
        inner.stored.queued = false;
        let store = self.store.as_ref()?;
        let owed = inner.owed()?;
        let mut append = LogAppend::new(store.key.clone(), owed.epoch, producer);
        if let Some(from) = owed.from {
            append.events = inner.log_events_from(from);
        }
        append.end = owed.end;
        Some(append)
    }

    /// For the worker: the store holds `append` now.
    pub(crate) fn appended(&self, append: &LogAppend) {
        let mut inner = lock(&self.inner);
        if inner.stored.epoch != append.epoch {
            inner.stored.epoch = append.epoch;
            inner.stored.next = 0;
            inner.stored.ended = false;
            inner.stored.holes = (0, 0);
            inner.stored.refused = false;
        }
        if let Some(first) = append.events.first()
            && first.offset > inner.stored.next
        {
            let (start, end) = inner.stored.holes;
            let start = if end == 0 { inner.stored.next } else { start };
            inner.stored.holes = (start, first.offset);
        }
        if let Some(last) = append.events.last() {
            inner.stored.next = inner.stored.next.max(last.offset + 1);
        }
        inner.stored.ended |= append.end.is_some();
        drop(inner);
        if self.budget.durable.is_some() {
            // Readers and bodies waiting for the store to hold events (durable replay).
            self.tell_all();
        }
    }

    /// For the worker: the store refused `append` (a newer history holds the stream's log).
    /// That history is owed nothing more; with durable replay, what waits for the store ends.
    pub(crate) fn refused(&self, append: &LogAppend) {
        let mut inner = lock(&self.inner);
        inner.stored = Stored {
            epoch: append.epoch,
            refused: true,
            queued: inner.stored.queued,
            ..Stored::default()
        };
        drop(inner);
        self.tell_all();
    }

    /// For the worker, after an append of this log (failed, or done while the log changed):
    /// the log goes back to the queue if the store still lacks something of it, to be read
    /// again (with what it logged since) at the next round.
    pub(crate) fn offer_if_owed(self: &Arc<Self>) {
        let offer = {
            let mut inner = lock(&self.inner);
            self.owes_store(&mut inner)
        };
        if offer {
            self.offer_to_store();
        }
    }
}

/// Where the store must be before a durable body's frame goes out: the offset after the
/// events the writer had logged of history `epoch` when the frame was read (see
/// [`ReplayPolicy::durable`](crate::ReplayPolicy::durable)).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct StorePoint {
    epoch: u64,
    offset: u64,
}

/// What the store holds of a [`StorePoint`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// Every event up to it (and with `end`, the end mark).
    Reached,
    /// Not yet.
    Waiting,
    /// Never will: the log dropped events before the store got them, or its history
    /// restarted.
    Lost,
}

/// What durable replay asks of a body's frame, as [`Writer::store_point`] finds it.
///
/// [`Writer::store_point`]: super::Writer::store_point
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Durable {
    /// Nothing: the log's current history does not go to the store.
    Off,
    /// The point the store must reach before the frame goes out, and how many logged events
    /// the store lacks.
    At(StorePoint, u64),
    /// The frame must never go out: another body took the log over (this one's events are
    /// not logged), or the log dropped an event of it unlogged (too large, or taken by the
    /// budget while open).
    Gone,
}

impl super::Writer {
    /// With durable replay: what the store must hold before what this writer has written
    /// so far may go to a client.
    pub(crate) fn store_point(&self) -> Durable {
        if self.log.budget.durable.is_none() || self.log.store.is_none() {
            return Durable::Off;
        }
        let inner = lock(&self.log.inner);
        if inner.writing != Some(self.number) || inner.unlogged != self.unlogged {
            return Durable::Gone;
        }
        if !inner.detachable || inner.restart_pending {
            return Durable::Off;
        }
        let (stored, _) = inner.stored.of(inner.epoch);
        let point = StorePoint {
            epoch: inner.epoch,
            offset: inner.held(),
        };
        Durable::At(point, point.offset.saturating_sub(stored.max(inner.first)))
    }

    /// What the store holds of `point`; with `end`, its end mark counts too.
    pub(crate) fn store_reach(&self, point: StorePoint, end: bool) -> Reach {
        let inner = lock(&self.log.inner);
        if inner.stored.refused(point.epoch) {
            return Reach::Lost;
        }
        let (stored, ended) = inner.stored.of(point.epoch);
        // Holes among this writer's events before the point.
        let (hole_start, hole_end) = inner.stored.holes;
        if inner.stored.epoch == point.epoch && hole_end > self.start && hole_start < point.offset {
            // Events of this writer's before the point were trimmed before the store got
            // them.
            return Reach::Lost;
        }
        if stored >= point.offset && (ended || !end || inner.epoch != point.epoch) {
            return Reach::Reached;
        }
        if stored < point.offset && (inner.epoch != point.epoch || inner.first > stored) {
            return Reach::Lost;
        }
        Reach::Waiting
    }

    /// What wakes a body waiting for the store (an append of this log, or a trim of it).
    pub(crate) fn changed(&self) -> Arc<Notify> {
        self.log
            .changed
            .get_or_init(|| Arc::new(Notify::new()))
            .clone()
    }

    /// The most unconfirmed events and bytes a durable body holds before it stops reading:
    /// half the stream's log bounds, so that the log keeps what the store lacks.
    pub(crate) fn hold_bounds(&self) -> (u64, usize) {
        let policy = &self.log.budget.policy;
        (
            (policy.max_events as u64 / 2).max(1),
            (policy.max_stream_bytes / 2).max(1),
        )
    }
}
