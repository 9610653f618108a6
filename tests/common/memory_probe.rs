//! Measures the registry's heap bytes per tracked stream with the counting allocator. Shared by
//! `tests/memory.rs` and `benches/memory_overhead.rs`; the including crate declares
//! `counting_alloc` (the `#[global_allocator]`) next to this module.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::store::{SaveEntry, Store, StoreError, StoredId};
use tower_sse_tracker::{SseTracker, StreamKey};

use crate::counting_alloc;

/// A store that keeps nothing, so that a measurement sees the registry alone.
pub struct NullStore;

impl Store for NullStore {
    async fn save(&self, _: &[SaveEntry]) -> Result<(), StoreError> {
        Ok(())
    }

    async fn load(&self, _: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        Ok(None)
    }
}

/// What one tracked stream costs, per stream: the heap bytes and allocations the counting
/// allocator saw, and what the tracker's memory gauge estimates.
pub struct PerStream {
    pub bytes: f64,
    pub blocks: f64,
    pub estimated: f64,
}

/// Heap bytes and allocations per tracked stream for `n` streams of distinct sessions on one
/// path, each registered by a real request through the layer (an SSE response whose body
/// commits one id, read to its end), measured on this thread (a current-thread runtime runs the
/// worker here too), and the memory gauge's estimate per stream.
pub fn bytes_per_stream(n: usize) -> PerStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let flush = Duration::from_millis(10);
        let tracker = SseTracker::builder()
            .store(NullStore)
            .heartbeat_interval(None)
            .flush_interval(flush)
            .max_streams(std::num::NonZeroUsize::new(n).unwrap())
            .build()
            .unwrap();
        // Let the worker start and allocate what it keeps.
        tokio::time::sleep(flush * 3).await;
        let mut svc =
            ServiceBuilder::new()
                .layer(tracker.layer())
                .service_fn(|_req: Request<()>| async {
                    let mut response =
                        Response::new(Full::new(Bytes::from_static(b"id: 1234\n\n")));
                    response.headers_mut().insert(
                        header::CONTENT_TYPE,
                        header::HeaderValue::from_static("text/event-stream"),
                    );
                    Ok::<_, Infallible>(response)
                });
        let mut session = String::new();
        let (bytes0, blocks0) = counting_alloc::live();
        for i in 0..n {
            session.clear();
            std::fmt::Write::write_fmt(&mut session, format_args!("session-{i:08}")).unwrap();
            let req = Request::builder()
                .uri("/mcp")
                .header("mcp-session-id", session.as_str())
                .body(())
                .unwrap();
            // The body is read to its end and dropped, as when a stream ends.
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            response.into_body().collect().await.unwrap();
        }
        // Let the worker take the activity marks (a transient list).
        tokio::time::sleep(flush * 3).await;
        let (bytes1, blocks1) = counting_alloc::live();
        assert_eq!(tracker.tracked_streams(), n);
        let per_stream = PerStream {
            bytes: (bytes1 - bytes0) as f64 / n as f64,
            blocks: (blocks1 - blocks0) as f64 / n as f64,
            estimated: tracker.estimated_memory_bytes() as f64 / n as f64,
        };
        drop(tracker);
        per_stream
    })
}
