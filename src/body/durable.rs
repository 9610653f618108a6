//! Durable replay ([`ReplayPolicy::durable`](crate::ReplayPolicy::durable)): the frames of a
//! body whose log goes to the store reach its client only once the store holds the events
//! they complete.
//!
//! The body reads on while frames wait (up to half its log's bounds ahead of the store), so
//! that one append, once per flush, releases every frame it covers. Frames go out in the
//! order they were read, heartbeats and a drain's cut with them. A frame the store has not
//! confirmed within the wait, or whose events the log dropped before the store got them,
//! ends the response before it: the body stays where a task can read it on (its client
//! reconnects, and gets what the store holds).

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame};
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use super::{Src, SseState, poll_frames};
use crate::replay::{Durable, Reach, StorePoint, Writer};
use crate::shared::Shared;

/// The frames of a durable body waiting for the store.
pub(super) struct Hold {
    frames: VecDeque<Waiting>,
    /// Bytes of the data frames held.
    bytes: usize,
    /// Events the store lacked when the last frame was read.
    unstored: u64,
    /// The inner body will send nothing more (its end, a drain's, or a cut).
    done: bool,
    /// The body finished: its response ends once the store holds the end mark too (so that a
    /// reconnect anywhere learns the stream is complete), from when it began to wait.
    end: Option<(StorePoint, Instant)>,
    /// How long a frame waits for the store.
    limit: Duration,
    /// Registered before the store's state is read: an append after the read wakes it.
    wait: Option<Pin<Box<OwnedNotified>>>,
    /// The deadline of the oldest frame waiting, and the instant it was armed for.
    deadline: Option<(Pin<Box<Sleep>>, Instant)>,
}

struct Waiting {
    frame: Frame<Bytes>,
    /// `None`: it completes no event the store lacks (it goes out after those before it).
    point: Option<StorePoint>,
    since: Instant,
}

/// What the oldest frame held can do now.
enum Front {
    Out(Frame<Bytes>),
    /// Nothing held goes out, for this reason.
    Cut(&'static str),
    Wait,
    Empty,
}

impl Hold {
    pub(super) fn new(limit: Duration) -> Box<Self> {
        Box::new(Self {
            frames: VecDeque::new(),
            bytes: 0,
            unstored: 0,
            done: false,
            end: None,
            limit,
            wait: None,
            deadline: None,
        })
    }

    /// Whether nothing is held (frames, or the end).
    pub(super) fn is_idle(&self) -> bool {
        self.frames.is_empty() && self.end.is_none()
    }

    fn push(&mut self, frame: Frame<Bytes>, point: Option<StorePoint>) {
        self.bytes += frame.data_ref().map_or(0, Bytes::len);
        self.frames.push_back(Waiting {
            frame,
            point,
            since: Instant::now(),
        });
    }

    /// Whether the body must stop reading until the store catches up (`writer` refreshes the
    /// count of events it lacks).
    fn full(&mut self, writer: Option<&Writer>) -> bool {
        let Some(writer) = writer.filter(|_| !self.frames.is_empty()) else {
            return false;
        };
        let (events, bytes) = writer.hold_bounds();
        if self.bytes >= bytes {
            return true;
        }
        if self.unstored >= events {
            self.unstored = match writer.store_point() {
                Durable::At(_, unstored) => unstored,
                Durable::Off | Durable::Gone => 0,
            };
        }
        self.unstored >= events
    }

    /// The oldest frame, once the store holds its events; the end, once it holds the end
    /// mark; registers the wakes (an append, the deadline) when they must wait.
    fn front(&mut self, writer: Option<&Writer>, cx: &mut Context<'_>) -> Front {
        loop {
            let (point, since, end) = match (self.frames.front(), self.end) {
                (Some(front), _) => (front.point, front.since, false),
                (None, Some((point, since))) => (Some(point), since, true),
                (None, None) => return Front::Empty,
            };
            let (Some(point), Some(writer)) = (point, writer) else {
                return self.pop();
            };
            if self.wait.is_none() {
                let mut wait = Box::pin(writer.changed().notified_owned());
                wait.as_mut().enable();
                self.wait = Some(wait);
            }
            match writer.store_reach(point, end) {
                Reach::Reached => return self.pop(),
                Reach::Lost if end => return self.pop(),
                Reach::Lost => return self.cut("dropped before the store got them"),
                Reach::Waiting => {}
            }
            let deadline = match &mut self.deadline {
                Some((sleep, armed)) if *armed == since => sleep,
                slot => {
                    let sleep = Box::pin(tokio::time::sleep_until(since + self.limit));
                    &mut slot.insert((sleep, since)).0
                }
            };
            if deadline.as_mut().poll(cx).is_ready() {
                if end {
                    // Every event went out: only the end mark is late.
                    return self.pop();
                }
                return self.cut("not confirmed by the store in time");
            }
            match self.wait.as_mut().map(|wait| wait.as_mut().poll(cx)) {
                Some(Poll::Ready(())) => self.wait = None,
                _ => return Front::Wait,
            }
        }
    }

    fn pop(&mut self) -> Front {
        match self.frames.pop_front() {
            Some(front) => {
                self.bytes -= front.frame.data_ref().map_or(0, Bytes::len);
                Front::Out(front.frame)
            }
            None => {
                self.end = None;
                Front::Empty
            }
        }
    }

    /// Drops what is held: nothing more goes out.
    fn clear(&mut self) {
        self.frames.clear();
        self.bytes = 0;
        self.end = None;
        self.done = true;
    }

    fn cut(&mut self, why: &'static str) -> Front {
        self.clear();
        Front::Cut(why)
    }
}

impl SseState {
    /// The body leaves its client's connection (detached): nothing is held any more, since
    /// its frames go nowhere.
    pub(super) fn stop_holding(self: Pin<&mut Self>) {
        *self.project().hold = None;
    }
}

/// [`poll_frames`] for a durable body: its frames in order, each once the store holds the
/// events it completes.
pub(super) fn poll_durable<B: Body>(
    mut src: Src<'_, B>,
    sse: &mut Pin<Box<SseState>>,
    cx: &mut Context<'_>,
) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
    loop {
        if sse.hold.as_ref().is_some_and(|hold| !hold.is_idle())
            && sse.as_mut().poll_drain(cx)
            && sse.as_mut().drain_overdue(Some(cx))
        {
            // The drain timeout holds for held frames too: they never go out.
            if let Some(hold) = sse.as_mut().project().hold.as_deref_mut() {
                hold.clear();
            }
            if sse.ended {
                // The drain or the body ended the body already (counted then).
                tracing::warn!(
                    parent: &sse.span,
                    "SSE frames held for the store (durable replay) at the drain timeout: the \
                     response ends before them"
                );
            } else {
                sse.as_mut().end_overdue();
            }
            return Poll::Ready(None);
        }
        let state = sse.as_mut().project();
        let Some(hold) = state.hold.as_deref_mut() else {
            return poll_frames(src, sse, cx);
        };
        let writer = state.tracked.as_ref().and_then(|t| t.tracking.log.as_ref());
        match hold.front(writer, cx) {
            Front::Out(frame) => return Poll::Ready(Some(Ok(frame))),
            Front::Cut(why) => {
                cut(state.shared, why);
                return Poll::Ready(None);
            }
            Front::Wait if hold.done || hold.full(writer) => return Poll::Pending,
            Front::Empty if hold.done => return Poll::Ready(None),
            Front::Wait | Front::Empty => {}
        }
        // The inner body waits: so do the frames held, if any (their wakes are set).
        let Poll::Ready(polled) = poll_frames(src.reborrow(), sse, cx) else {
            return Poll::Pending;
        };
        let durable = sse.writer().map_or(Durable::Off, Writer::store_point);
        let state = sse.as_mut().project();
        let Some(hold) = state.hold.as_deref_mut() else {
            return Poll::Ready(polled);
        };
        if durable == Durable::Gone {
            hold.clear();
            cut(
                state.shared,
                "dropped from the log, or not logged (another body took the log over)",
            );
            // An error of the inner body goes out as it would have.
            return Poll::Ready(polled.filter(Result::is_err));
        }
        let at = match durable {
            Durable::At(point, unstored) => Some((point, unstored)),
            Durable::Off | Durable::Gone => None,
        };
        match polled {
            Some(Ok(frame)) => {
                let point = at.and_then(|(point, unstored)| {
                    hold.unstored = unstored;
                    (unstored > 0).then_some(point)
                });
                if hold.frames.is_empty() && point.is_none() {
                    return Poll::Ready(Some(Ok(frame)));
                }
                hold.push(frame, point);
            }
            None => {
                hold.done = true;
                if *state.finished {
                    hold.end = at.map(|(point, _)| (point, Instant::now()));
                }
            }
            // An error goes out at once: what is held never does.
            Some(Err(error)) => return Poll::Ready(Some(Err(error))),
        }
    }
}

/// Counts and logs a response cut before frames held for the store.
fn cut(shared: &Shared, why: &'static str) {
    if let Some(replayer) = &shared.replay {
        replayer.budget.metrics.durable_cut(why);
    }
}
