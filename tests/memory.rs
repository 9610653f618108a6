//! Activity tracking and memory: `cargo test session::activity_batching` and
//! `cargo test session::memory_usage -- --nocapture` (which prints its figures).

mod common;

#[path = "common/counting_alloc.rs"]
mod counting_alloc;
#[path = "common/memory_probe.rs"]
mod memory_probe;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tower::ServiceBuilder;

use memory_probe::{NullStore, bytes_per_stream};
use tower_sse_tracker::SseTracker;

mod session {
    use super::*;
    use crate::common::direct::{drive, frames_service, id_frames, request, respond};
    use crate::common::{Harness, build_recorded, key, no_heartbeat};
    use axum::http::HeaderMap;
    use common::names::{
        ACTIVITY_BATCH_SIZE, ACTIVITY_UPDATES_TOTAL, REASON_IDLE, STREAMS_EVICTED_TOTAL,
    };
    use tower_sse_tracker::store::InMemoryStore;

    /// Failed on `ecccf3c`: a large legal `max_stream_names` allocated its whole intern
    /// table at build (about 1.8 GiB for 50 million names), which the memory gauge did not
    /// count. Now the table grows with the names it holds.
    #[tokio::test]
    async fn a_large_bound_allocates_nothing_until_it_is_used() {
        let before = counting_alloc::live().0;
        let tracker = SseTracker::builder()
            .max_stream_names(common::nz(50_000_000))
            .max_streams(common::nz(50_000_000))
            .max_pending_evicted(50_000_000)
            .channel_capacity(1 << 20)
            .build()
            .unwrap();
        let grown = counting_alloc::live().0 - before;
        println!("a tracker with bounds of 50 million allocated {grown} bytes at build");
        assert!(grown < 64 * 1024, "{grown} bytes");
        assert!(tracker.estimated_memory_bytes() < 64 * 1024);
    }

    #[tokio::test(start_paused = true)]
    async fn activity_batching_writes_a_session_once_per_flush_however_many_frames() {
        let store = std::sync::Arc::new(InMemoryStore::new());
        let flush = Duration::from_millis(100);
        let (tracker, recorded) = build_recorded(
            SseTracker::builder()
                .store(store.clone())
                .heartbeat_interval(None)
                .flush_interval(flush),
        );
        let mut svc = frames_service(&tracker);
        // Let the worker's first (immediate) tick pass.
        tokio::time::sleep(flush / 2).await;

        // 1,000 frames from one session within one flush: one activity write.
        drive(&mut svc, "one", id_frames(1_000)).await;
        tokio::time::sleep(flush).await;
        assert_eq!(recorded.value(ACTIVITY_UPDATES_TOTAL, &[]), 1.0);
        assert_eq!(recorded.histogram(ACTIVITY_BATCH_SIZE), [1.0]);
        assert!(store.last_active("one").is_some());

        // 100 sessions, 10 frames each, within one flush: one batch of 100.
        for s in 0..100 {
            drive(&mut svc, &format!("many-{s}"), id_frames(10)).await;
        }
        tokio::time::sleep(flush).await;
        assert_eq!(recorded.histogram(ACTIVITY_BATCH_SIZE), [1.0, 100.0]);
        assert_eq!(recorded.value(ACTIVITY_UPDATES_TOTAL, &[]), 101.0);
        assert_eq!(store.sessions(), 101);

        // Nothing active, nothing written.
        tokio::time::sleep(flush * 5).await;
        assert_eq!(recorded.value(ACTIVITY_UPDATES_TOTAL, &[]), 101.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn activity_batching_spawns_no_task_while_10000_frames_flow() {
        let h = Harness::start(no_heartbeat()).await;
        let tx = h.feed("tasks");
        let mut client = h.get("/sse/tasks", Some("s1"), HeaderMap::new()).await;
        tx.send(Bytes::from_static(b"id: 0\n\n")).unwrap();
        client.read_until_len(7).await;
        let metrics = tokio::runtime::Handle::current().metrics();
        let baseline = metrics.num_alive_tasks();
        let mut samples = Vec::new();
        let mut expected = 7;
        for chunk in 0..10 {
            for i in 0..1_000 {
                let frame = format!("id: {}\ndata: x\n\n", chunk * 1_000 + i + 1);
                expected += frame.len();
                tx.send(Bytes::from(frame)).unwrap();
            }
            client.read_until_len(expected).await;
            samples.push(metrics.num_alive_tasks());
        }
        println!("alive tasks: baseline {baseline}, while streaming {samples:?}");
        assert!(
            samples.iter().all(|&n| n <= baseline),
            "{samples:?} > {baseline}"
        );
        assert_eq!(
            h.tracker
                .last_event_id(&key("s1", "GET /sse/tasks"))
                .unwrap(),
            "10000"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn idle_streams_leave_the_registry_after_the_ttl_and_keep_their_id_in_the_store() {
        let store = std::sync::Arc::new(InMemoryStore::new());
        let (tracker, recorded) = build_recorded(
            SseTracker::builder()
                .store(store.clone())
                .heartbeat_interval(None)
                .idle_ttl(Some(Duration::from_secs(300))),
        );
        let mut svc = frames_service(&tracker);
        drive(&mut svc, "idle", id_frames(3)).await;
        drive(&mut svc, "busy", id_frames(1)).await;
        tokio::time::sleep(Duration::from_secs(240)).await;
        drive(&mut svc, "busy", id_frames(2)).await;
        assert_eq!(tracker.tracked_streams(), 2, "4 minutes is not idle enough");
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(tracker.tracked_streams(), 1);
        assert_eq!(tracker.last_event_id(&key("idle", "GET /mcp")), None);
        assert_eq!(
            tracker.last_event_id(&key("busy", "GET /mcp")).unwrap(),
            "2"
        );
        assert_eq!(
            recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_IDLE)]),
            1.0
        );
        assert_eq!(
            tracker
                .resolve(&key("idle", "GET /mcp"))
                .await
                .unwrap()
                .unwrap(),
            "3"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_with_an_open_body_is_never_idle() {
        let (tracker, recorded) = build_recorded(
            SseTracker::builder()
                .heartbeat_interval(None)
                .idle_ttl(Some(Duration::from_secs(60))),
        );
        let mut svc = frames_service(&tracker);
        let mut body = respond(&mut svc, request("open", id_frames(1)))
            .await
            .into_body();
        body.frame().await.unwrap().unwrap();
        tokio::time::sleep(Duration::from_secs(600)).await;
        assert_eq!(tracker.tracked_streams(), 1);
        drop(body);
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert_eq!(tracker.tracked_streams(), 0);
        assert_eq!(
            recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_IDLE)]),
            1.0
        );
    }

    #[test]
    fn memory_usage() {
        for n in [10_000, 100_000] {
            let measured = bytes_per_stream(n);
            let (bytes, blocks, estimated) = (measured.bytes, measured.blocks, measured.estimated);
            println!(
                "{n} tracked streams: {bytes:.0} bytes and {blocks:.1} allocations per stream; \
                 the memory gauge estimates {estimated:.0} bytes"
            );
            // The bound the crate promises (see the README): at most 400 bytes per stream.
            assert!(bytes <= 400.0, "{bytes} bytes per stream");
            // The gauge (`sse_tracker_memory_bytes`, `estimated_memory_bytes`) within 10 %.
            assert!(
                (estimated - bytes).abs() <= bytes * 0.10,
                "the gauge says {estimated} bytes per stream, the allocator {bytes}"
            );
        }

        // The extra heap of one open tracked body over the bare body (one stream shared).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            const BODIES: usize = 1_000;
            let tracker = SseTracker::builder().store(NullStore).build().unwrap();
            let mut layered = frames_service(&tracker);
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut bare = ServiceBuilder::new().service_fn(|_req: Request<()>| async {
                let body = StreamBody::new(futures_util::stream::pending::<
                    Result<Frame<Bytes>, Infallible>,
                >());
                Ok::<_, Infallible>(Response::new(body))
            });
            // One stream first, so that the slot is not counted per body.
            let _first = respond(&mut layered, request("one", Vec::new())).await;
            let (b0, _) = counting_alloc::live();
            let mut bare_bodies = Vec::with_capacity(BODIES);
            for _ in 0..BODIES {
                bare_bodies.push(respond(&mut bare, Request::new(())).await.into_body());
            }
            let (b1, _) = counting_alloc::live();
            let mut tracked = Vec::with_capacity(BODIES);
            for _ in 0..BODIES {
                tracked.push(
                    respond(&mut layered, request("one", Vec::new()))
                        .await
                        .into_body(),
                );
            }
            let (b2, _) = counting_alloc::live();
            let bare_each = (b1 - b0) as f64 / BODIES as f64;
            let tracked_each = (b2 - b1) as f64 / BODIES as f64;
            println!(
                "one open body: bare {bare_each:.0} bytes, tracked {tracked_each:.0} bytes, \
                 extra {:.0} bytes (plus {} bytes inline in the body value vs {})",
                tracked_each - bare_each,
                std::mem::size_of_val(&tracked[0]),
                std::mem::size_of_val(&bare_bodies[0]),
            );
        });
    }
}

mod replay {
    use super::*;
    use crate::common::direct::{frames_service, request, respond};
    use crate::common::nz;
    use tower_sse_tracker::ReplayPolicy;

    const STREAMS: usize = 2_000;
    const EVENTS: usize = 40;
    const EVENT_BYTES: usize = 256;
    const BUDGET: usize = 1 << 20;

    /// `STREAMS` bodies open at once, each sending `EVENTS` events of `EVENT_BYTES` bytes
    /// (20 MiB together), read one event per body per round; returns the most heap this
    /// thread held above where it started, sampled after each round, and what it holds once
    /// every body has ended (the logs stay with their streams).
    async fn flood(replay: bool) -> (isize, isize) {
        let builder = SseTracker::builder()
            .store(NullStore)
            .heartbeat_interval(None)
            .max_streams(nz(STREAMS));
        let builder = if replay {
            builder.replay(
                ReplayPolicy::new()
                    .max_stream_bytes(nz(64 << 10))
                    .max_total_bytes(nz(BUDGET)),
            )
        } else {
            builder
        };
        // The worker is held, not run: when it flushes would change what it holds (its batch)
        // from one run to the next, and nothing here needs it (no store, no replay across
        // instances).
        let (tracker, worker) = builder.build_with_worker().unwrap();
        let mut svc = frames_service(&tracker);
        let data = "x".repeat(EVENT_BYTES - "id: 00\ndata: \n\n".len());
        let frames: Vec<Bytes> = (0..EVENTS)
            .map(|i| Bytes::from(format!("id: {i:02}\ndata: {data}\n\n")))
            .collect();
        assert_eq!(frames[0].len(), EVENT_BYTES);
        let start = counting_alloc::live().0;
        let mut bodies = Vec::with_capacity(STREAMS);
        for s in 0..STREAMS {
            let req = request(&format!("flood-{s}"), frames.clone());
            bodies.push(respond(&mut svc, req).await.into_body());
        }
        let mut peak = counting_alloc::live().0 - start;
        for _ in 0..EVENTS {
            for body in &mut bodies {
                body.frame().await.unwrap().unwrap();
            }
            peak = peak.max(counting_alloc::live().0 - start);
        }
        for body in &mut bodies {
            assert!(body.frame().await.is_none());
        }
        drop(bodies);
        let end = counting_alloc::live().0 - start;
        drop(tracker);
        drop(worker);
        (peak, end)
    }

    /// The history a flood of streams logs stays within the tracker's byte budget, at its
    /// peak and after: what replay adds to the heap is the budget plus a fixed cost per
    /// stream (its log's header, and the scan's lists of an open body), however many bytes
    /// the streams send.
    #[tokio::test]
    async fn a_flood_of_streams_with_replay_on_holds_no_more_history_than_the_budget() {
        let (peak_off, end_off) = flood(false).await;
        let (peak_on, end_on) = flood(true).await;
        let (peak, end) = (peak_on - peak_off, end_on - end_off);
        let sent = STREAMS * EVENTS * EVENT_BYTES;
        println!(
            "{STREAMS} streams sent {sent} bytes with a budget of {BUDGET}: replay added \
             {peak} bytes at the peak ({:.0} per stream over the budget), {end} bytes after \
             ({:.0} per stream over the budget)",
            (peak - BUDGET as isize) as f64 / STREAMS as f64,
            (end - BUDGET as isize) as f64 / STREAMS as f64,
        );
        const FIXED: isize = 512;
        let bound = BUDGET as isize + STREAMS as isize * FIXED;
        assert!(peak <= bound, "peak {peak} above {bound}");
        assert!(end <= bound, "after {end} above {bound}");
        // The logs filled the budget: history was kept, not refused.
        assert!(peak >= BUDGET as isize, "only {peak} bytes at the peak");
        assert!(end > 0, "no history kept");
    }
}
