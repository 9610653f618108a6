//! The persistence worker end to end: real SSE streams over 127.0.0.1, the layer, the worker
//! and a store. Timing tests run with tokio's clock paused, so a 1 s store write or a 100 ms
//! send timeout takes no real time and the measured gaps are exact.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::names::{
    BACKPRESSURE_TIMEOUTS_TOTAL, RECORDS_ENQUEUED_TOTAL, RETRIES_EXHAUSTED_TOTAL, RETRIES_TOTAL,
    STORE_ERRORS_TOTAL, STORE_WRITES_TOTAL,
};
use common::stores::{Calls, Fault, FaultStore, ScriptedStore};
use common::{Harness, build_recorded, eventually, key, run_frames};
use tokio::time::{Instant, sleep};
use tower_sse_tracker::store::InMemoryStore;
use tower_sse_tracker::{RetryPolicy, SseTracker};

/// The latest id `store` holds for `stream` of `session` (the scripted and fault stores keep
/// theirs in `inner`).
fn stored(store: &InMemoryStore, session: &str, stream: &str) -> Option<String> {
    store.get(&key(session, stream)).map(|s| s.id.to_string())
}

#[tokio::test]
async fn test_persistence_worker_writes_the_latest_id_of_a_real_stream() {
    let store = Arc::new(InMemoryStore::new());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None),
    );
    let h = Harness::start(tracker).await;
    run_frames(
        &h,
        "p",
        Some("s1"),
        &[b"id: 1\ndata: a\n\n", b"id: 2\ndata: b\n\n", b"id: 3\n\n"],
    )
    .await;
    eventually("the store holds id 3", || {
        stored(&store, "s1", "GET /sse/p").as_deref() == Some("3")
    })
    .await;
    // At most one record per stream per flush: three ids sent at once make one or two.
    let enqueued = recorded.value(RECORDS_ENQUEUED_TOTAL, &[]);
    assert!((1.0..=2.0).contains(&enqueued), "{enqueued}");
    assert!(recorded.value(STORE_WRITES_TOTAL, &[]) >= 1.0);

    // Another tracker on the same store (a restart, or another instance) resolves from it.
    let other = SseTracker::builder().store(store.clone()).build().unwrap();
    assert_eq!(other.last_event_id(&key("s1", "GET /sse/p")), None);
    assert_eq!(
        other
            .resolve(&key("s1", "GET /sse/p"))
            .await
            .unwrap()
            .unwrap(),
        "3"
    );
    assert_eq!(
        other.resolve(&key("s1", "GET /sse/unknown")).await.unwrap(),
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_event_tracker_channel_backpressure() {
    // The worker drains its channel all the time, even while a store call is in flight, so the
    // channel fills only when the worker's task cannot run: here, a store whose future blocks
    // its thread (blocking I/O inside an async store) for 1.5 s.
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Save, Fault::BlockThread(Duration::from_millis(1500)));
    // The worker runs on a runtime of its own, so that the thread its store blocks is not one
    // the server needs (a blocked thread would also hold up tasks queued on it).
    let worker_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (tracker, recorded) = {
        let _enter = worker_rt.enter();
        build_recorded(
            SseTracker::builder()
                .store(store.clone())
                .heartbeat_interval(None)
                .channel_capacity(1),
        )
    };
    let h = Harness::start(tracker).await;
    let real = |what: &'static str, done: Box<dyn Fn() -> bool>| async move {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            sleep(Duration::from_millis(2)).await;
        }
    };
    let mut open = Vec::new();
    // A's id reaches the worker; its next flush calls the store, which blocks the worker.
    let tx = h.feed("a");
    let mut client = h.get("/sse/a", Some("a"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    client.read_until_len(7).await;
    open.push((tx, client));
    let calls = store.clone();
    real(
        "the store blocks the worker",
        Box::new(move || calls.calls().0 == 1),
    )
    .await;
    store.set(Calls::Save, Fault::Ok);
    // B's record fills the channel (capacity 1): nobody takes it while the worker is blocked.
    let tx = h.feed("b");
    let mut client = h.get("/sse/b", Some("b"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    client.read_until_len(7).await;
    open.push((tx, client));

    // C commits id 7: the frame is delivered at once, then the body waits for room before it
    // pulls the next frame, at most the send timeout.
    let (tx, pulls) = h.feed_logged("c");
    let mut client = h.get("/sse/c", Some("c"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 7\n\n")).unwrap();
    tx.send(Bytes::from_static(b"data: next\n\n")).unwrap();
    client.read_until_len(7 + 12).await;
    assert_eq!(
        h.tracker.last_event_id(&key("c", "GET /sse/c")).unwrap(),
        "7"
    );
    let waited = {
        let pulls = pulls.lock().unwrap();
        pulls[1] - pulls[0]
    };
    println!("next frame pulled {waited:?} after the id frame");
    assert!(waited >= Duration::from_millis(90), "{waited:?}");
    assert!(
        waited < Duration::from_millis(1000),
        "not cut at the send timeout: {waited:?}"
    );
    assert_eq!(recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]), 1.0);

    // C is now queued dirty: its later ids do not make it wait again before the worker has
    // read it.
    tx.send(Bytes::from_static(b"id: 8\n\nid: 9\n\n")).unwrap();
    client.read_until_len(7 + 12 + 14).await;
    assert_eq!(recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]), 1.0);

    // Once the worker runs again, the store holds every stream's latest id; C's is read from
    // memory.
    let check = store.clone();
    real(
        "the store holds every stream's latest id",
        Box::new(move || {
            ["a", "b"]
                .iter()
                .all(|s| check.get(&key(s, &format!("GET /sse/{s}"))).is_some())
                && check
                    .get(&key("c", "GET /sse/c"))
                    .is_some_and(|s| s.id == "9")
        }),
    )
    .await;
    drop(open);
    worker_rt.shutdown_background();
}

#[tokio::test(flavor = "current_thread")]
async fn a_body_dropped_while_waiting_for_channel_room_still_gets_its_id_persisted() {
    use common::direct::{frames_service, request, respond};
    use futures_util::FutureExt;
    use http_body_util::BodyExt;

    let store = Arc::new(InMemoryStore::new());
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .channel_capacity(1)
        .idle_ttl(None)
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    let id = |n: &str| {
        vec![
            Bytes::from(format!("id: {n}\n\n")),
            Bytes::from_static(b"data: more\n\n"),
        ]
    };
    // On this one thread the worker cannot run before this task yields: A's record fills the
    // channel, B's must wait for room.
    let mut a = respond(&mut svc, request("a", id("1"))).await.into_body();
    let mut b = respond(&mut svc, request("b", id("2"))).await.into_body();
    assert!(a.frame().now_or_never().is_some());
    assert!(
        b.frame().now_or_never().is_some(),
        "B's id frame is delivered at once"
    );
    assert!(
        b.frame().now_or_never().is_none(),
        "B's next frame waits for room in the channel"
    );
    // The client goes away: the body is dropped with its hand-off still waiting.
    drop(b);
    drop(a);
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(stored(&store, "a", "GET /mcp").as_deref(), Some("1"));
    assert_eq!(stored(&store, "b", "GET /mcp").as_deref(), Some("2"));
}

#[tokio::test(start_paused = true)]
async fn a_failing_store_is_retried_with_growing_delays_then_persisted() {
    let store = Arc::new(ScriptedStore::failing_first(3));
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(100),
                Duration::from_secs(10),
                5,
            )),
    );
    let h = Harness::start(tracker).await;
    run_frames(&h, "f", Some("s1"), &[b"id: 1\n\n"]).await;
    eventually("the id is persisted", || {
        store.get(&key("s1", "GET /sse/f")).is_some()
    })
    .await;
    let attempts = store.attempts();
    let outcomes: Vec<bool> = attempts.iter().map(|(_, ok)| *ok).collect();
    assert_eq!(outcomes, [false, false, false, true]);
    let gaps: Vec<Duration> = attempts.windows(2).map(|w| w[1].0 - w[0].0).collect();
    println!("delays between attempts: {gaps:?}");
    // Retry n waits between half and all of 100 ms * 2^(n-1).
    for (n, gap) in gaps.iter().enumerate() {
        let full = Duration::from_millis(100 << n);
        assert!(
            *gap >= full / 2 && *gap <= full + Duration::from_millis(1),
            "{gaps:?}"
        );
    }
    assert!(gaps.windows(2).all(|w| w[0] < w[1]), "{gaps:?}");
    assert_eq!(recorded.sum(STORE_ERRORS_TOTAL), 3.0);
    assert_eq!(recorded.value(RETRIES_TOTAL, &[]), 3.0);
    assert_eq!(recorded.value(RETRIES_EXHAUSTED_TOTAL, &[]), 0.0);
}

#[tokio::test(start_paused = true)]
async fn an_always_failing_store_is_given_up_counted_and_caught_up_after_recovery() {
    let store = Arc::new(ScriptedStore::always_failing());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(10),
                Duration::from_millis(100),
                3,
            )),
    );
    let h = Harness::start(tracker).await;
    run_frames(&h, "x", Some("s1"), &[b"id: 1\n\n"]).await;
    eventually("the write is given up", || {
        recorded.value(RETRIES_EXHAUSTED_TOTAL, &[]) == 1.0
    })
    .await;
    // One first attempt and three retries, growing from 10 ms.
    assert_eq!(store.calls(), 4);
    sleep(Duration::from_secs(5)).await;
    // While the store stays down: a single probe per longest retry delay (100 ms), no more.
    let probes = store.calls() - 4;
    println!("probes in 5 s of outage: {probes}");
    assert!((45..=50).contains(&probes), "{probes} probes");
    assert_eq!(recorded.sum(STORE_ERRORS_TOTAL), (4 + probes) as f64);
    assert!(store.get(&key("s1", "GET /sse/x")).is_none());

    // The store recovers; the next successful write catches the given-up key up.
    store.set_failing(false);
    run_frames(&h, "y", Some("s2"), &[b"id: 5\n\n"]).await;
    eventually(
        "the given-up key is caught up, and the new one written",
        || {
            store.get(&key("s1", "GET /sse/x")).is_some()
                && store.get(&key("s2", "GET /sse/y")).is_some()
        },
    )
    .await;
    assert_eq!(store.get(&key("s2", "GET /sse/y")).unwrap().id, "5");
    let report = h.tracker.shutdown(Duration::from_secs(1)).await;
    assert!(report.is_complete(), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_writes_the_latest_id_never_the_one_that_failed() {
    let store = Arc::new(ScriptedStore::failing_first(1));
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            // The retry of id 1 comes due long after id 2 has been committed.
            .retry(RetryPolicy::exponential(
                Duration::from_secs(2),
                Duration::from_secs(2),
                3,
            )),
    );
    let h = Harness::start(tracker).await;
    let tx = h.feed("o");
    let mut client = h.get("/sse/o", Some("s1"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    client.read_until_len(7).await;
    eventually("the first write failed", || store.calls() == 1).await;
    tx.send(Bytes::from_static(b"id: 2\n\n")).unwrap();
    client.read_until_len(14).await;
    // Id 2 waits for the stream's retry (the store is backing off); nothing is written before.
    sleep(Duration::from_millis(900)).await;
    assert_eq!(store.calls(), 1);
    eventually("id 2 is written", || {
        store
            .get(&key("s1", "GET /sse/o"))
            .is_some_and(|s| s.id == "2")
    })
    .await;
    // The retry read the slot when it came due: one write, of the latest id.
    assert_eq!(store.calls(), 2);
    assert_eq!(recorded.value(RETRIES_TOTAL, &[]), 1.0);
    sleep(Duration::from_secs(3)).await;
    assert_eq!(store.calls(), 2, "nothing is left to retry");
    assert_eq!(store.get(&key("s1", "GET /sse/o")).unwrap().id, "2");
}

#[tokio::test(start_paused = true)]
async fn a_slow_store_never_delays_frames_more_than_the_send_timeout() {
    let store = Arc::new(ScriptedStore::slow(Duration::from_secs(1)));
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .channel_capacity(2)
            .max_batch(common::nz(2)),
    );
    let h = Harness::start(tracker).await;
    const STREAMS: usize = 10;
    const FRAMES: usize = 30;
    let mut streams = Vec::new();
    for s in 0..STREAMS {
        let name = format!("slow{s}");
        let (tx, pulls) = h.feed_logged(&name);
        let client = h
            .get(&format!("/sse/{name}"), Some(&name), HeaderMap::new())
            .await;
        streams.push((name, tx, pulls, client));
    }
    let started = Instant::now();
    for (_, tx, _, _) in &streams {
        for n in 1..=FRAMES {
            tx.send(Bytes::from(format!("id: {n}\n\n"))).unwrap();
        }
    }
    let mut worst = Duration::ZERO;
    for (name, tx, pulls, client) in &mut streams {
        let expected: String = (1..=FRAMES).map(|n| format!("id: {n}\n\n")).collect();
        client.read_until_len(expected.len()).await;
        assert_eq!(client.received, expected.as_bytes(), "{name}");
        let pulls = pulls.lock().unwrap();
        let mut gaps: Vec<Duration> = pulls.windows(2).map(|w| w[1] - w[0]).collect();
        gaps.push(pulls[0] - started);
        worst = worst.max(gaps.into_iter().max().unwrap());
        drop(tx.clone());
    }
    println!(
        "worst wait between two frames: {worst:?}; backpressure timeouts: {}",
        recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[])
    );
    // The worker drains its channel while the slow write is in flight: no frame waits at all.
    assert_eq!(recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]), 0.0);
    assert!(worst <= Duration::from_millis(1), "{worst:?}");
    eventually("every stream's latest id is stored", || {
        streams.iter().all(|(name, _, _, _)| {
            store
                .get(&key(name, &format!("GET /sse/{name}")))
                .is_some_and(|s| s.id == FRAMES.to_string().as_str())
        })
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn shutdown_drains_everything_pending_and_closes_the_channel() {
    let store = Arc::new(InMemoryStore::new());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            // No flush before shutdown: everything is still pending when it starts.
            .flush_interval(Duration::from_secs(3600)),
    );
    let h = Harness::start(tracker).await;
    let mut open = Vec::new();
    for s in ["s1", "s2", "s3"] {
        let tx = h.feed(s);
        let mut client = h.get(&format!("/sse/{s}"), Some(s), HeaderMap::new()).await;
        tx.send(Bytes::from_static(b"id: 1\n\nid: 2\n\n")).unwrap();
        client.read_until_len(14).await;
        open.push((tx, client));
    }
    sleep(Duration::from_millis(1)).await;
    assert!(store.is_empty());

    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(report.persisted, 3);
    for s in ["s1", "s2", "s3"] {
        assert_eq!(
            stored(&store, s, &format!("GET /sse/{s}")).as_deref(),
            Some("2")
        );
    }

    // Streams keep flowing after shutdown; their new ids stay in memory only.
    let enqueued = recorded.value(RECORDS_ENQUEUED_TOTAL, &[]);
    let (tx, client) = &mut open[0];
    tx.send(Bytes::from_static(b"id: 3\n\n")).unwrap();
    client.read_until_len(21).await;
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/s1")).unwrap(),
        "3"
    );
    sleep(Duration::from_secs(1)).await;
    assert_eq!(stored(&store, "s1", "GET /sse/s1").as_deref(), Some("2"));
    assert_eq!(
        recorded.value(RECORDS_ENQUEUED_TOTAL, &[]),
        enqueued,
        "the channel is closed"
    );
    // A second shutdown writes nothing and says what the store lacks.
    let again = h.tracker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(again.persisted, 0);
    assert_eq!(again.pending, [key("s1", "GET /sse/s1")]);
    assert!(!again.is_complete());
}

#[tokio::test(start_paused = true)]
async fn shutdown_reports_what_its_deadline_left_unwritten() {
    let store = Arc::new(ScriptedStore::gated());
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    run_frames(&h, "g1", Some("s1"), &[b"id: 1\n\n"]).await;
    run_frames(&h, "g2", Some("s2"), &[b"id: 1\n\n"]).await;
    let started = Instant::now();
    let report = h.tracker.shutdown(Duration::from_secs(1)).await;
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert!(report.deadline_reached);
    assert_eq!(report.persisted, 0);
    assert_eq!(
        report.pending,
        [key("s1", "GET /sse/g1"), key("s2", "GET /sse/g2")]
    );
}

/// A metrics recorder whose `sse_tracker_batch_size` histogram panics the first time it records:
/// a bug outside the store, inside the worker's own loop.
struct PanickingRecorder {
    fired: Arc<std::sync::atomic::AtomicBool>,
}

struct PanicOnce(Arc<std::sync::atomic::AtomicBool>);

impl metrics::HistogramFn for PanicOnce {
    fn record(&self, _value: f64) {
        if !self.0.swap(true, std::sync::atomic::Ordering::SeqCst) {
            panic!("a recorder bug");
        }
    }
}

impl metrics::Recorder for PanickingRecorder {
    fn describe_counter(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_gauge(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn describe_histogram(
        &self,
        _: metrics::KeyName,
        _: Option<metrics::Unit>,
        _: metrics::SharedString,
    ) {
    }
    fn register_counter(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
        metrics::Counter::noop()
    }
    fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
        metrics::Gauge::noop()
    }
    fn register_histogram(
        &self,
        key: &metrics::Key,
        _: &metrics::Metadata<'_>,
    ) -> metrics::Histogram {
        if key.name() == common::names::BATCH_SIZE {
            metrics::Histogram::from_arc(Arc::new(PanicOnce(self.fired.clone())))
        } else {
            metrics::Histogram::noop()
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_inside_the_worker_restarts_it_and_loses_nothing() {
    let store = Arc::new(InMemoryStore::new());
    let fired = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let recorder = PanickingRecorder {
        fired: fired.clone(),
    };
    let tracker = metrics::with_local_recorder(&recorder, || {
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .build()
            .unwrap()
    });
    let h = Harness::start(tracker).await;
    run_frames(&h, "p1", Some("s1"), &[b"id: 1\n\n", b"id: 2\n\n"]).await;
    eventually("the worker panicked", || {
        fired.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    // The restarted worker takes its state from the registry, and new ids keep flowing.
    run_frames(&h, "p2", Some("s2"), &[b"id: 9\n\n"]).await;
    eventually("both streams are stored", || {
        stored(&store, "s1", "GET /sse/p1").as_deref() == Some("2")
            && stored(&store, "s2", "GET /sse/p2").as_deref() == Some("9")
    })
    .await;
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

#[test]
fn a_worker_lost_with_its_runtime_makes_shutdown_say_so() {
    use common::direct::{drive, frames_service, id_frames};

    let first = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let tracker = first.block_on(async {
        let tracker = SseTracker::builder()
            .heartbeat_interval(None)
            // No flush before the runtime goes: the id stays unwritten.
            .flush_interval(Duration::from_secs(3600))
            .build()
            .unwrap();
        let mut svc = frames_service(&tracker);
        drive(&mut svc, "lost", id_frames(3)).await;
        tracker
    });
    // The runtime that ran the worker shuts down under it.
    drop(first);
    let second = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let report = second.block_on(tracker.shutdown(Duration::from_secs(1)));
    assert!(report.worker_lost, "{report:?}");
    assert!(!report.is_complete());
    assert_eq!(report.pending, [key("lost", "GET /mcp")]);
    assert_eq!(
        tracker.last_event_id(&key("lost", "GET /mcp")).unwrap(),
        "3"
    );
}

#[tokio::test(flavor = "current_thread")]
async fn a_hand_off_waiting_when_shutdown_begins_is_still_written() {
    use common::direct::{frames_service, request, respond};
    use futures_util::FutureExt;
    use http_body_util::BodyExt;

    let store = Arc::new(InMemoryStore::new());
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .channel_capacity(1)
        // No flush before the shutdown.
        .flush_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    let frames = |n: &str| {
        vec![
            Bytes::from(format!("id: {n}\n\n")),
            Bytes::from_static(b"data: more\n\n"),
        ]
    };
    let mut a = respond(&mut svc, request("a", frames("1")))
        .await
        .into_body();
    let mut b = respond(&mut svc, request("b", frames("2")))
        .await
        .into_body();
    assert!(a.frame().now_or_never().is_some());
    assert!(b.frame().now_or_never().is_some());
    assert!(
        b.frame().now_or_never().is_none(),
        "B's hand-off waits for room"
    );
    // The shutdown begins while B waits; B's id was committed before, so it is owed.
    let drain_b = async {
        while let Some(frame) = b.frame().await {
            frame.unwrap();
        }
    };
    let (report, ()) = tokio::join!(tracker.shutdown(Duration::from_secs(5)), drain_b);
    assert!(report.is_complete(), "{report:?}");
    assert!(!report.deadline_reached);
    assert_eq!(stored(&store, "a", "GET /mcp").as_deref(), Some("1"));
    assert_eq!(stored(&store, "b", "GET /mcp").as_deref(), Some("2"));
    drop(a);
}

/// A retry policy whose first delay (15 to 30 s) is longer than the shutdown deadlines below.
const SLOW_RETRY: RetryPolicy =
    RetryPolicy::exponential(Duration::from_secs(30), Duration::from_secs(60), 5);

#[tokio::test(start_paused = true)]
async fn shutdown_does_not_wait_for_the_back_off_of_earlier_failures() {
    let store = Arc::new(ScriptedStore::failing_first(1));
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        // After the failure the stream's retry is due in 15 to 30 s.
        .retry(SLOW_RETRY)
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    run_frames(&h, "b", Some("s1"), &[b"id: 1\n\n"]).await;
    eventually("the first write failed", || store.calls() >= 1).await;
    // The store works again; the shutdown (5 s) writes at once instead of waiting 30 s.
    let started = Instant::now();
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        stored(&store.inner, "s1", "GET /sse/b").as_deref(),
        Some("1")
    );
}

/// A write already in flight when the shutdown begins belongs to the earlier failures: when it
/// fails (here it hangs until the store timeout), the shutdown retries its streams at once
/// instead of backing off for 15 to 30 s past its own deadline.
#[tokio::test(start_paused = true)]
async fn a_write_failing_after_shutdown_began_but_sent_before_does_not_delay_it() {
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Both, Fault::Hang);
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .store_timeout(Duration::from_secs(1))
        .retry(SLOW_RETRY)
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    run_frames(&h, "b", Some("s1"), &[b"id: 1\n\n"]).await;
    eventually("a write hangs", || store.calls().0 >= 1).await;
    // The store works again; the hanging write fails at its timeout, after the shutdown began.
    store.set(Calls::Both, Fault::Ok);
    let started = Instant::now();
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert!(!report.deadline_reached);
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        stored(&store.inner, "s1", "GET /sse/b").as_deref(),
        Some("1")
    );
}

/// An activity write that hangs does not hold up saves: one call of each kind can be in
/// flight, so an id committed while `touch_sessions` hangs (until the 5 s store timeout) is
/// written at the next flush. Driven without sockets, so that the paused clock only moves
/// when everything waits on it.
#[tokio::test(start_paused = true)]
async fn a_hung_activity_write_does_not_hold_up_saves() {
    use common::direct::{drive, frames_service, id_frames};

    let store = Arc::new(FaultStore::default());
    store.set(Calls::Touch, Fault::Hang);
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .flush_interval(Duration::from_millis(100))
        .store_timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    let k = key("s1", "GET /mcp");
    drive(&mut svc, "s1", id_frames(1)).await;
    eventually("an activity write hangs", || store.calls().1 >= 1).await;
    let started = Instant::now();
    drive(&mut svc, "s1", vec![Bytes::from_static(b"id: 2\n\n")]).await;
    eventually("id 2 is stored", || {
        store.get(&k).is_some_and(|s| s.id.as_str() == "2")
    })
    .await;
    let took = started.elapsed();
    println!("id 2 stored {took:?} after it was sent, while an activity write hung");
    // At the next flush (100 ms), not after the hung call's timeout (5 s).
    assert!(took <= Duration::from_millis(200), "{took:?}");
}

#[tokio::test(start_paused = true)]
async fn an_evicted_id_stays_in_the_report_when_its_key_is_made_again() {
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Both, Fault::FailAtOnce);
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .max_streams(common::nz(1))
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    run_frames(&h, "a", Some("s1"), &[b"id: 7\n\n"]).await;
    // Another stream evicts it (the store is down: its id waits), then the key is made again.
    run_frames(&h, "other", Some("s2"), &[b"id: 1\n\n"]).await;
    let _rx = h.tracker.subscribe(&key("s1", "GET /sse/a")).unwrap();
    let report = h.tracker.shutdown(Duration::from_secs(1)).await;
    assert!(
        report.pending.contains(&key("s1", "GET /sse/a")),
        "{report:?}"
    );
    assert!(!report.is_complete());
}

/// From review: once every tracker, layer and body is gone without a `shutdown()`, the worker
/// writes what it holds and finishes (it kept running for ever while the hand-off's channel
/// lived in the registry it holds).
#[tokio::test(start_paused = true)]
async fn a_worker_whose_tracker_layers_and_bodies_are_gone_writes_what_it_holds_and_finishes() {
    use common::direct::{drive, frames_service, id_frames};

    let store = Arc::new(InMemoryStore::new());
    let (tracker, worker) = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .flush_interval(Duration::from_secs(3600))
        .build_with_worker()
        .unwrap();
    let worker = tokio::spawn(worker);
    // The worker's first flush tick comes at once; the next is an hour away.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let mut svc = frames_service(&tracker);
    drive(&mut svc, "s1", id_frames(3)).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(store.get(&key("s1", "GET /mcp")).is_none());
    drop(svc);
    drop(tracker);
    tokio::time::timeout(Duration::from_secs(60), worker)
        .await
        .expect("the worker finishes")
        .unwrap();
    assert_eq!(
        stored(&store, "s1", "GET /mcp").as_deref(),
        Some("3"),
        "what it held was written"
    );
}
