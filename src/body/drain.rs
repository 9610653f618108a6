//! Draining a body for a deploy: a stream its client can resume ends at its next event
//! boundary (after a `retry` field when one is set); one it cannot runs to its end; both end at
//! the drain timeout.

use std::pin::Pin;
use std::task::Context;

use bytes::Bytes;
use tokio::time::{Instant, sleep_until};

use super::SseState;
use crate::protocol::Resumption;
use crate::scan::Boundary;

impl SseState {
    /// Whether a drain ends this stream at its next event boundary: one its client resumes
    /// (ids), or an MCP `subscriptions/listen` stream (its client re-issues the listen). Any
    /// other stream runs to its end, and only the drain timeout cuts it: ending it early would
    /// lose its request.
    pub(super) fn cut_by_drain(&self) -> bool {
        match self.resumption {
            Resumption::ByIds => self.has_last_id,
            Resumption::Reissued => true,
            Resumption::Never => false,
        }
    }

    /// Whether the tracker is draining; registers the body to be woken when it starts.
    pub(super) fn poll_drain(self: Pin<&mut Self>, cx: &mut Context<'_>) -> bool {
        let mut this = self.project();
        let drain = &this.shared.drain;
        if drain.is_draining() {
            return true;
        }
        if this.drain_wait.is_none() {
            this.drain_wait
                .set(Some(drain.notify.clone().notified_owned()));
        }
        if let Some(wait) = this.drain_wait.as_mut().as_pin_mut()
            && wait.poll(cx).is_ready()
        {
            this.drain_wait.set(None);
        }
        // Checked again after registering, so that a drain that started in between is seen.
        drain.is_draining()
    }

    /// While draining, scans `data` up to the end of the first event after which the drain
    /// ends the stream, and returns that length (all of it when there is none): the body ends
    /// there. For a stream the drain cuts, that is the frame's first event; for one it lets run
    /// (no id yet), the first event after which it can be resumed, so that a client is never
    /// sent an event past the id it will resume from.
    pub(super) fn on_data_while_draining(mut self: Pin<&mut Self>, data: &[u8]) -> usize {
        let mut from = 0;
        while from < data.len() {
            // An event can only end right after a line end.
            let end =
                memchr::memchr2(b'\r', b'\n', &data[from..]).map_or(data.len(), |p| from + p + 1);
            self.as_mut().on_data(&data[from..end]);
            from = end;
            if self.scanner.boundary() == Boundary::Event && self.cut_by_drain() {
                break;
            }
        }
        from
    }

    /// While draining (a stream inside an event, or one the drain lets run): whether the drain
    /// timeout has passed. Polls (and makes, the first time) the deadline's timer when `cx` is
    /// given, so that an idle body is woken.
    pub(super) fn drain_overdue(self: Pin<&mut Self>, cx: Option<&mut Context<'_>>) -> bool {
        let this = self.project();
        let Some(deadline) = this.shared.drain.deadline() else {
            return false;
        };
        match cx {
            None => Instant::now() >= deadline,
            Some(cx) => this
                .drain_timer
                .get_or_insert_with(|| Box::pin(sleep_until(deadline)))
                .as_mut()
                .poll(cx)
                .is_ready(),
        }
    }

    /// Ends the body inside an event at the drain timeout.
    pub(super) fn end_overdue(self: Pin<&mut Self>) {
        let this = self.project();
        *this.ended = true;
        this.shared.metrics.streams_drained_late.increment(1);
        let parent = &*this.span;
        let timeout = this.shared.config.drain_timeout;
        if this.scanner.boundary() != Boundary::Event {
            tracing::warn!(
                parent: parent,
                ?timeout,
                "SSE stream still inside an event at the drain timeout: ended there (the \
                 client discards the incomplete event)"
            );
        } else {
            tracing::warn!(
                parent: parent,
                ?timeout,
                "SSE stream that its client cannot resume still open at the drain timeout: \
                 ended there (a request it answers is lost)"
            );
        }
    }

    /// While draining, at an event boundary: the `retry` frame (once, when configured), then the
    /// end of the body. `None` otherwise: the body goes on (to the next boundary).
    pub(super) fn drain_step(self: Pin<&mut Self>) -> Option<Option<Bytes>> {
        let this = self.project();
        let drain = &this.shared.drain;
        if !drain.is_draining() || this.scanner.boundary() != Boundary::Event {
            return None;
        }
        if !*this.retry_sent {
            *this.retry_sent = true;
            if let Some(retry) = drain.retry() {
                return Some(Some(Bytes::from(format!(
                    "retry: {}\n\n",
                    retry.as_millis()
                ))));
            }
        }
        *this.ended = true;
        this.shared.metrics.streams_drained.increment(1);
        if let Some(tracked) = this.tracked {
            tracing::debug!(parent: &tracked.tracking.span, "SSE stream drained");
        }
        Some(None)
    }
}
