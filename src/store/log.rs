//! Replay logs in a store: what a tracker appends to a stream's log ([`LogAppend`]), and what a
//! store gives back ([`StoredLog`]), so that an instance that never saw a stream can replay it.

use bytes::Bytes;

use crate::key::{EventId, StreamKey};

/// One event of a stream's log: the exact bytes its client got, blank line included, its
/// offset in its history, and its own `id` field.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse_tracker::EventId;
/// use tower_sse_tracker::store::LogEvent;
///
/// let bytes = Bytes::from_static(b"id: 1\ndata: hi\n\n");
/// let event = LogEvent::new(0, Some(EventId::new("1").unwrap()), bytes);
/// assert_eq!(event.offset, 0);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogEvent {
    /// The event's offset in its history (its epoch), counted from 0.
    pub offset: u64,
    /// The event's own `id` field (`Some("")` for an empty one), if it has one.
    pub id: Option<EventId>,
    /// The event's bytes, as sent.
    pub bytes: Bytes,
}

impl LogEvent {
    /// An event at `offset`, with its `id` and its `bytes`.
    pub fn new(offset: u64, id: Option<EventId>, bytes: Bytes) -> Self {
        Self { offset, id, bytes }
    }
}

/// How a stream's history ended, as its producer marked it in the store.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LogEnd {
    /// The stream's body reached its end: nothing follows, and a reader that has every event
    /// has the whole stream.
    Finished,
    /// The producer stopped writing this history before its body's end (a drain, a bound, the
    /// body's error, another history replacing it): what the stream produced after it, if
    /// anything, is not in this log.
    Stopped,
}

/// What a store did with a batch of [`LogAppend`]s ([`Store::append_logs`]): the appends it
/// refused, by their place in the batch (from 0). A store refuses an append when the stream's
/// log holds a newer history (a higher epoch, or the same epoch from another producer):
/// nothing of it is appended. Instances whose clocks disagree can see this: the tracker
/// counts it (`sse_tracker_replay_store_refused_total`) and stops offering that history.
///
/// ```
/// use tower_sse_tracker::store::AppendReport;
///
/// let report = AppendReport::refusing(vec![2]);
/// assert_eq!(report.refused(), &[2]);
/// assert!(AppendReport::new().refused().is_empty());
/// ```
///
/// [`Store::append_logs`]: super::Store::append_logs
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AppendReport {
    refused: Vec<usize>,
}

impl AppendReport {
    /// Every append taken.
    pub fn new() -> Self {
        Self::default()
    }

    /// The appends at these places of the batch refused.
    pub fn refusing(refused: Vec<usize>) -> Self {
        Self { refused }
    }

    /// The places in the batch of the appends refused, in any order.
    pub fn refused(&self) -> &[usize] {
        &self.refused
    }
}

/// What a tracker appends to one stream's log at a flush: the events since its last append,
/// and whether the stream has ended.
///
/// A store keeps one history per stream, the one of the highest epoch it was given: an append
/// of a higher epoch than the stored one starts the log again, one of a lower epoch, or of the
/// same epoch from another producer, is refused (a late retry of a history that was replaced),
/// and, within an epoch, events at offsets already appended are skipped, so that a batch
/// retried after a partial write appends each event once, and events after the end mark are
/// skipped. Events are appended in offset order; an offset that skips some (events the
/// tracker could not write) leaves a hole that a reader sees.
///
/// ```
/// use bytes::Bytes;
/// use tower_sse_tracker::StreamKey;
/// use tower_sse_tracker::store::{LogAppend, LogEnd, LogEvent};
///
/// let key = StreamKey::try_new("session-1", "POST /mcp").unwrap();
/// let append = LogAppend::new(key, 1_700_000_000_000_000, "instance-a")
///     .event(LogEvent::new(0, None, Bytes::from_static(b"data: hi\n\n")))
///     .ended();
/// assert_eq!(append.end, Some(LogEnd::Finished));
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LogAppend {
    /// The stream.
    pub key: StreamKey,
    /// The history the events belong to.
    pub epoch: u64,
    /// The instance that produces the stream: its lease (see
    /// [`Store::renew_lease`](super::Store::renew_lease)) says whether it still can.
    pub producer: String,
    /// The events, by ascending offset.
    pub events: Vec<LogEvent>,
    /// Whether, and how, the history ended after the last of them (the first end a store is
    /// given stays).
    pub end: Option<LogEnd>,
}

impl LogAppend {
    /// An append of no event to the log of `key`'s history `epoch`, produced by `producer`.
    pub fn new(key: StreamKey, epoch: u64, producer: impl Into<String>) -> Self {
        Self {
            key,
            epoch,
            producer: producer.into(),
            events: Vec::new(),
            end: None,
        }
    }

    /// Adds `event` (its offset above the previous one's).
    pub fn event(mut self, event: LogEvent) -> Self {
        self.events.push(event);
        self
    }

    /// Marks the stream finished after these events ([`LogEnd::Finished`]).
    pub fn ended(mut self) -> Self {
        self.end = Some(LogEnd::Finished);
        self
    }

    /// Marks the history stopped after these events ([`LogEnd::Stopped`]).
    pub fn stopped(mut self) -> Self {
        self.end = Some(LogEnd::Stopped);
        self
    }
}

/// A stream's log as a store holds it, from [`Store::read_log`](super::Store::read_log).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredLog {
    /// The history the log holds.
    pub epoch: u64,
    /// The instance that last appended to it.
    pub producer: String,
    /// The events asked for, by ascending offset. Offsets that are not consecutive, or a first
    /// one above the offset asked after, mark events the store does not hold (trimmed by its
    /// length bound, or never written).
    pub events: Vec<LogEvent>,
    /// The offset after the last event appended: the events before it are all that the
    /// producer has written so far.
    pub next_offset: u64,
    /// Whether, and how, the producer marked the history's end (after the event at
    /// `next_offset - 1`).
    pub end: Option<LogEnd>,
}

impl StoredLog {
    /// Whether `events` holds every event after the position `after` (every event of the
    /// log's history, for `None`) up to [`next_offset`](Self::next_offset), none missing: for
    /// `Some((epoch, offset))`, the log must be of that epoch, and hold every event after
    /// `offset`.
    ///
    /// ```
    /// use bytes::Bytes;
    /// use tower_sse_tracker::store::{LogEvent, StoredLog};
    ///
    /// let event = |offset| LogEvent::new(offset, None, Bytes::from_static(b"data: x\n\n"));
    /// let log = StoredLog::new(7, "instance-a", vec![event(3), event(4)], 5, None);
    /// assert!(log.complete_after(Some((7, 2))));
    /// assert!(!log.complete_after(Some((7, 1))), "offset 2 is not held");
    /// assert!(!log.complete_after(Some((6, 2))), "another history");
    /// assert!(!log.complete_after(None), "offsets 0 to 2 are not held");
    /// ```
    pub fn complete_after(&self, after: Option<(u64, u64)>) -> bool {
        let from = match after {
            Some((epoch, _)) if epoch != self.epoch => return false,
            Some((_, offset)) => offset.saturating_add(1),
            None => 0,
        };
        holds_all(&self.events, from, self.next_offset)
    }

    /// A log of `epoch` written by `producer`.
    pub fn new(
        epoch: u64,
        producer: impl Into<String>,
        events: Vec<LogEvent>,
        next_offset: u64,
        end: Option<LogEnd>,
    ) -> Self {
        Self {
            epoch,
            producer: producer.into(),
            events,
            next_offset,
            end,
        }
    }
}

/// Whether `events` are every event from offset `from` up to `next_offset`, none missing.
pub(crate) fn holds_all(events: &[LogEvent], from: u64, next_offset: u64) -> bool {
    let mut expected = from;
    for event in events {
        if event.offset != expected {
            return false;
        }
        expected = expected.saturating_add(1);
    }
    expected >= next_offset
}
