//! Heartbeats: a comment after the heartbeat interval without a frame, only where it cannot
//! change an event; and the byte order mark a client would misread after one.

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::time::{Instant, sleep_until};

use super::SseState;
use crate::scan::{BOM, Boundary};

impl SseState {
    /// The inner body has nothing now: a quiet period starts, unless one already runs.
    pub(super) fn went_quiet(self: Pin<&mut Self>) {
        let this = self.project();
        if std::mem::take(this.fresh) {
            *this.quiet_since = Instant::now();
        }
    }

    /// Ready with a heartbeat when the inner body has been quiet for the interval and the
    /// stream is at a boundary; pending otherwise (with the timer armed).
    pub(super) fn poll_heartbeat(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Bytes> {
        let mut this = self.project();
        let Some(heartbeat) = &this.shared.config.heartbeat else {
            return Poll::Pending;
        };
        loop {
            // The timer is never reset on the frame path: it may fire early (frames moved the
            // quiet period on), and is then pushed to the real due time here. That keeps the
            // per-frame cost to one clock read.
            let mut sleep = match this.sleep.as_mut().as_pin_mut() {
                Some(sleep) => sleep,
                None => {
                    this.sleep
                        .set(Some(sleep_until(*this.quiet_since + heartbeat.interval)));
                    this.sleep.as_mut().as_pin_mut().expect("just set")
                }
            };
            if sleep.as_mut().poll(cx).is_pending() {
                return Poll::Pending;
            }
            let now = Instant::now();
            let due = *this.quiet_since + heartbeat.interval;
            if now < due {
                sleep.reset(due);
                continue;
            }
            *this.quiet_since = now;
            let bytes = match (this.scanner.boundary(), this.scanner.after_cr()) {
                // Mid-line: inserting anything would corrupt the line. Wait another interval.
                (Boundary::Inside, _) => continue,
                (Boundary::Event, false) => heartbeat.event.clone(),
                (Boundary::Event, true) => heartbeat.event_cr.clone(),
                (Boundary::Line, false) => heartbeat.line.clone(),
                (Boundary::Line, true) => heartbeat.line_cr.clone(),
            };
            this.scanner.comment_inserted();
            if !*this.started && this.strip_bom.is_none() {
                *this.strip_bom = Some(0);
            }
            this.shared.metrics.heartbeats.increment(1);
            return Poll::Ready(bytes);
        }
    }

    /// Drops a leading byte order mark of the inner body after a heartbeat went out first
    /// (see `strip_bom`). `None`: nothing of the frame goes out now (all withheld so far, or
    /// exactly the mark).
    #[inline]
    pub(super) fn strip_bom(self: Pin<&mut Self>, data: Bytes) -> Option<Bytes> {
        if self.started && self.strip_bom.is_none() || data.is_empty() {
            // Once a byte went out and no byte order mark is watched for: nothing to do.
            return Some(data);
        }
        self.strip_bom_slow(data)
    }

    pub(super) fn strip_bom_slow(self: Pin<&mut Self>, data: Bytes) -> Option<Bytes> {
        let this = self.project();
        // Any byte of the inner body, withheld or not, ends the time before the first byte: a
        // later heartbeat must not start watching for a byte order mark again.
        *this.started = true;
        let Some(matched) = *this.strip_bom else {
            return Some(data);
        };
        let want = &BOM[usize::from(matched)..];
        let common = want.len().min(data.len());
        if data[..common] != want[..common] {
            // Not a byte order mark: what was withheld is content.
            *this.strip_bom = None;
            if matched == 0 {
                return Some(data);
            }
            let mut joined = Vec::with_capacity(usize::from(matched) + data.len());
            joined.extend_from_slice(&BOM[..usize::from(matched)]);
            joined.extend_from_slice(&data);
            return Some(Bytes::from(joined));
        }
        if common == want.len() {
            // The whole mark: dropped, as a client would have dropped it.
            *this.strip_bom = None;
            return Some(data.slice(common..)).filter(|rest| !rest.is_empty());
        }
        *this.strip_bom = Some(matched + common as u8);
        None
    }

    /// The BOM bytes withheld when the inner body ends (they were content after all).
    pub(super) fn take_withheld_bom(self: Pin<&mut Self>) -> Option<Bytes> {
        let this = self.project();
        match this.strip_bom.take() {
            Some(matched) if matched > 0 => {
                Some(Bytes::copy_from_slice(&BOM[..usize::from(matched)]))
            }
            _ => None,
        }
    }
}
