//! Detached streams: a body marked [`Detach`](crate::Detach) whose client left before its end
//! is read on by a task of its own, into its stream's log, within the policy's bounds.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http_body::Body;

use super::{Detacher, Inner, SseState, TrackedBody};
use crate::metrics::Detached;
use crate::shared::Shared;

impl SseState {
    /// The inner body reached its end: its stream's log says so (a reconnect then gets the
    /// rest and a clean end).
    pub(super) fn finish(self: Pin<&mut Self>) {
        let this = self.project();
        *this.finished = true;
        if let Some(writer) = this.tracked.as_ref().and_then(|t| t.tracking.log.as_ref()) {
            writer.finish();
        }
    }

    /// Whether a body dropped now is worth reading on: it has not ended (nor failed), it
    /// still writes its stream's log, and no drain is ending streams.
    pub(super) fn worth_detaching(&self) -> bool {
        !self.ended && !self.shared.drain.is_draining() && self.writes_its_log()
    }

    /// Bytes of the inner body its log's writer has written.
    fn written(&self) -> u64 {
        self.tracked
            .as_ref()
            .and_then(|t| t.tracking.log.as_ref())
            .map_or(0, |writer| writer.written())
    }

    /// Whether this body writes its stream's log (no other body took it over).
    fn writes_its_log(&self) -> bool {
        self.tracked
            .as_ref()
            .and_then(|t| t.tracking.log.as_ref())
            .is_some_and(|writer| writer.is_current())
    }
}

/// The [`Detacher`] of bodies of type `B`.
pub(crate) fn detacher<B>() -> Detacher<B>
where
    B: Body + Send + 'static,
{
    detach::<B>
}

/// Counts a detached stream for as long as it is read.
struct Permit(Arc<Shared>);

impl Permit {
    fn take(shared: &Arc<Shared>) -> Option<Self> {
        let replayer = shared.replay.as_ref()?;
        let max = replayer.budget.policy.max_detached;
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

fn detach<B>(body: Pin<Box<B>>, sse: Pin<Box<SseState>>)
where
    B: Body + Send + 'static,
{
    let shared = sse.shared.clone();
    let Some(replayer) = &shared.replay else {
        return;
    };
    let metrics = &replayer.budget.metrics;
    let span = sse.span.clone();
    let runtime = tokio::runtime::Handle::try_current();
    let (Ok(runtime), Some(permit)) = (runtime, Permit::take(&shared)) else {
        metrics.detached(Detached::Refused);
        tracing::debug!(
            parent: &span,
            max_detached = replayer.budget.policy.max_detached,
            "client left a detachable stream, which is dropped: as many detached streams as \
             ReplayPolicy::max_detached allows are read already (or no runtime runs)"
        );
        return;
    };
    metrics.detached(Detached::Started);
    tracing::debug!(parent: &span, "client left: the stream is read on, detached");
    let policy = &replayer.budget.policy;
    let (timeout, max_bytes) = (policy.detached_timeout, policy.detached_max_bytes);
    let body = TrackedBody {
        inner: Inner::Body { body },
        sse: Some(sse),
    };
    runtime.spawn(async move {
        let outcome = tokio::time::timeout(timeout, read_to_end(body, max_bytes))
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
async fn read_to_end<B: Body>(mut body: TrackedBody<Pin<Box<B>>>, max_bytes: usize) -> Detached {
    let written =
        |body: &TrackedBody<Pin<Box<B>>>| body.sse.as_ref().map_or(0, |sse| sse.written());
    let start = written(&body);
    loop {
        match std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await {
            None if body.sse.as_ref().is_some_and(|sse| sse.finished) => {
                return Detached::Finished;
            }
            None => return Detached::Drained,
            Some(Err(_)) => return Detached::Failed,
            Some(Ok(_)) => {
                if written(&body) - start > max_bytes as u64 {
                    return Detached::Bound;
                }
                if !body.sse.as_ref().is_some_and(|sse| sse.writes_its_log()) {
                    return Detached::Replaced;
                }
            }
        }
    }
}
