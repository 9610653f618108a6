//! Detached streams: a body marked [`Detach`](crate::Detach) whose client left before its end
//! is read on by a task of its own, into its stream's log, within the policy's bounds.
//!
//! Such a body and its state are [`Held`] where both its connection's response and a
//! reconnect can reach them: the response polls them; when it is dropped before the end (its
//! client left), or when a reconnect follows the stream's log first (the server has not seen
//! the old client leave), a task takes them and reads on.

use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http_body::{Body, Frame};

use super::{Src, SseState, poll_sse};
use crate::metrics::Detached;
use crate::replay::ReadOnHandle;
use crate::shared::Shared;
use crate::sync::lock;

impl SseState {
    /// The inner body reached its end: its stream's log says so (a reconnect then gets the
    /// rest and a clean end).
    pub(super) fn finish(mut self: Pin<&mut Self>) {
        *self.as_mut().project().finished = true;
        if let Some(writer) = self.writer() {
            writer.finish();
        }
    }

    /// The body is [`Held`] where a reconnect can move it off its connection: its log's
    /// writer learns how.
    fn set_read_on(self: Pin<&mut Self>, handle: ReadOnHandle) {
        if let Some(tracked) = self.project().tracked {
            tracked.tracking.set_read_on(handle);
        }
    }

    /// Whether a body dropped now is worth reading on: it has not ended (nor failed), it
    /// still writes its stream's log, and no drain is ending streams.
    pub(super) fn worth_detaching(&self) -> bool {
        !self.ended && !self.shared.drain.is_draining() && self.writes_its_log()
    }

    /// Bytes of the inner body its log's writer has written.
    fn written(&self) -> u64 {
        self.writer().map_or(0, |writer| writer.written())
    }

    /// Whether this body writes its stream's log (no other body took it over).
    fn writes_its_log(&self) -> bool {
        self.writer().is_some_and(|writer| writer.is_current())
    }
}

/// A body marked [`Detach`](crate::Detach) and its state, polled by its response until a task
/// takes them to read on.
pub(crate) struct Held<B> {
    state: Mutex<HeldState<B>>,
    /// Sends the parts to a task (made where `B` is known to be `Send + 'static`).
    read_on: fn(Parts<B>, Permit),
}

struct HeldState<B> {
    /// `None` once a task took them.
    parts: Option<Parts<B>>,
    /// The task that polled the response last: woken when a task takes the parts, so that
    /// the response ends.
    waker: Option<Waker>,
}

pub(crate) struct Parts<B> {
    body: Pin<Box<B>>,
    sse: Pin<Box<SseState>>,
}

/// A body that can leave its connection for a task of its own (see
/// [`LocalTail::take_from_old_connection`](crate::replay::LocalTail::take_from_old_connection)).
pub(crate) trait ReadOn: Send + Sync {
    /// Moves the body to a task of its own now, if it has not ended, still writes its log,
    /// and a detached stream may start; its response then ends.
    fn read_on_now(&self);
}

/// Makes [`Held`] bodies of type `B`.
pub(crate) type Detacher<B> = fn(B, Pin<Box<SseState>>) -> Arc<Held<B>>;

/// The [`Detacher`] of bodies of type `B`.
pub(crate) fn detacher<B>() -> Detacher<B>
where
    B: Body + Send + 'static,
{
    hold::<B>
}

fn hold<B>(body: B, mut sse: Pin<Box<SseState>>) -> Arc<Held<B>>
where
    B: Body + Send + 'static,
{
    Arc::new_cyclic(|weak: &Weak<Held<B>>| {
        let handle: Weak<dyn ReadOn> = weak.clone();
        sse.as_mut().set_read_on(ReadOnHandle(handle));
        Held {
            state: Mutex::new(HeldState {
                parts: Some(Parts {
                    body: Box::pin(body),
                    sse,
                }),
                waker: None,
            }),
            read_on: read_on::<B>,
        }
    })
}

impl<B> Held<B> {
    /// Polls the body, through the layer, as its response's.
    pub(super) fn poll_frame(
        &self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>>
    where
        B: Body,
    {
        let mut state = lock(&self.state);
        let HeldState { parts, waker } = &mut *state;
        let Some(parts) = parts else {
            // A reconnect took the stream to a task: this response ends.
            return Poll::Ready(None);
        };
        if !waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *waker = Some(cx.waker().clone());
        }
        poll_sse(Src::Body(parts.body.as_mut()), &mut parts.sse, cx)
    }

    /// What `f` says of the body's state, while its response holds it.
    pub(super) fn state<R>(&self, f: impl FnOnce(&SseState, &B) -> R) -> Option<R> {
        lock(&self.state)
            .parts
            .as_ref()
            .map(|parts| f(&parts.sse, &parts.body))
    }

    /// The response was dropped: its client left. A body worth it is read on.
    pub(super) fn client_left(&self) {
        let parts = lock(&self.state).parts.take();
        let Some(parts) = parts else {
            return;
        };
        if !parts.sse.worth_detaching() {
            return;
        }
        let shared = parts.sse.shared.clone();
        match Permit::take(&shared) {
            Some(permit) => {
                tracing::debug!(parent: &parts.sse.span, "client left: the stream is read on, detached");
                (self.read_on)(parts, permit);
            }
            None => refused(&shared, &parts.sse.span),
        }
    }
}

impl<B: Body + Send + 'static> ReadOn for Held<B> {
    fn read_on_now(&self) {
        let mut state = lock(&self.state);
        let Some(parts) = &state.parts else {
            return;
        };
        if !parts.sse.worth_detaching() {
            return;
        }
        // Without a free detached stream, the body stays where it is.
        let Some(permit) = Permit::take(&parts.sse.shared) else {
            return;
        };
        let parts = state.parts.take().expect("checked above");
        let waker = state.waker.take();
        drop(state);
        tracing::debug!(
            parent: &parts.sse.span,
            "its client came back on a new connection: the stream leaves the old one, and is \
             read on, detached"
        );
        (self.read_on)(parts, permit);
        if let Some(waker) = waker {
            waker.wake();
        }
    }
}

/// Counts a detached stream for as long as it is read.
pub(crate) struct Permit(Arc<Shared>);

impl Permit {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let replayer = shared.replay.as_ref()?;
        let max = replayer.budget.policy.max_detached;
        tokio::runtime::Handle::try_current().ok()?;
        replayer
            .detached
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()?;
        replayer.budget.metrics.detached_open.increment(1.0);
        Some(Self(shared.clone()))
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(replayer) = &self.0.replay {
            replayer.detached.fetch_sub(1, Ordering::AcqRel);
            replayer.budget.metrics.detached_open.decrement(1.0);
        }
    }
}

/// A body worth reading on is dropped: no detached stream was free.
fn refused(shared: &Shared, span: &tracing::Span) {
    let Some(replayer) = &shared.replay else {
        return;
    };
    replayer.budget.metrics.detached(Detached::Refused);
    tracing::debug!(
        parent: span,
        max_detached = replayer.budget.policy.max_detached,
        "client left a detachable stream, which is dropped: as many detached streams as \
         ReplayPolicy::max_detached allows are read already (or no runtime runs)"
    );
}

/// Reads `parts` on in a task of its own, within the policy's bounds.
fn read_on<B>(mut parts: Parts<B>, permit: Permit)
where
    B: Body + Send + 'static,
{
    let Some(replayer) = &permit.0.replay else {
        return;
    };
    replayer.budget.metrics.detached(Detached::Started);
    // Its frames go nowhere now: none waits for the store.
    parts.sse.as_mut().stop_holding();
    let policy = &replayer.budget.policy;
    let (timeout, max_bytes) = (policy.detached_timeout, policy.detached_max_bytes);
    let span = parts.sse.span.clone();
    tokio::spawn(async move {
        let outcome = tokio::time::timeout(timeout, read_to_end(parts, max_bytes))
            .await
            .unwrap_or(Detached::Bound);
        if let Some(replayer) = &permit.0.replay {
            replayer.budget.metrics.detached(outcome);
        }
        tracing::debug!(parent: &span, ?outcome, "detached stream ended");
        drop(permit);
    });
}

/// Reads a detached body to its end, or until the application has sent `max_bytes` more,
/// or until another body took its stream's log over; its frames go nowhere but its stream's
/// log.
async fn read_to_end<B: Body>(mut parts: Parts<B>, max_bytes: usize) -> Detached {
    let start = parts.sse.written();
    loop {
        let Parts { body, sse } = &mut parts;
        match std::future::poll_fn(|cx| poll_sse(Src::Body(body.as_mut()), sse, cx)).await {
            None if parts.sse.finished => return Detached::Finished,
            None => return Detached::Drained,
            Some(Err(_)) => return Detached::Failed,
            Some(Ok(_)) => {
                if parts.sse.written() - start > max_bytes as u64 {
                    return Detached::Bound;
                }
                if !parts.sse.writes_its_log() {
                    return Detached::Replaced;
                }
            }
        }
    }
}
