//! [`SseTrackerLayer`]: applies [`SseTrackerService`] to a service.

use std::sync::Arc;

use tower::Layer;

use crate::service::SseTrackerService;
use crate::shared::Shared;

/// A [`Layer`] that tracks SSE responses into an [`SseTracker`](crate::SseTracker).
///
/// Made by [`SseTracker::layer`](crate::SseTracker::layer). Cheap to clone; every layer of one
/// tracker shares its registry, so the same tracker can serve several routers.
///
/// ```
/// use axum::{Router, routing::get};
/// use tower_sse_tracker::SseTracker;
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder().build().unwrap();
/// let api: Router = Router::new().route("/a", get(|| async { "a" })).layer(tracker.layer());
/// let mcp: Router = Router::new().route("/mcp", get(|| async { "b" })).layer(tracker.layer());
/// let app = api.merge(mcp);
/// # let _ = app;
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct SseTrackerLayer {
    shared: Arc<Shared>,
}

impl SseTrackerLayer {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl<S> Layer<S> for SseTrackerLayer {
    type Service = SseTrackerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        SseTrackerService::new(inner, self.shared.clone())
    }
}
