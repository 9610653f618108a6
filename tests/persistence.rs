//! The persistence worker end to end: real SSE streams over 127.0.0.1, the layer, the worker
//! and a store. Timing tests run with tokio's clock paused, so a 1 s store write or a 100 ms
//! send timeout takes no real time and the measured gaps are exact.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::stores::ScriptedStore;
use common::{Harness, build_recorded, run_frames};
use tokio::time::{Instant, sleep, timeout};
use tower_sse_tracker::metrics::{
    BACKPRESSURE_TIMEOUTS_TOTAL, DUPLICATES_SKIPPED_TOTAL, RECORDS_ENQUEUED_TOTAL,
    RETRIES_EXHAUSTED_TOTAL, RETRIES_TOTAL, STORE_ERRORS_TOTAL, STORE_WRITES_TOTAL,
};
use tower_sse_tracker::store::InMemoryStore;
use tower_sse_tracker::{RetryPolicy, SessionId, SseTracker, StreamKey, StreamName};

fn key(session: &str, stream: &str) -> StreamKey {
    StreamKey {
        session: SessionId::new(session).unwrap(),
        stream: StreamName::new(stream).unwrap(),
    }
}

/// Waits (up to 60 s of tokio time) until `done` holds.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    timeout(Duration::from_secs(60), async {
        while !done() {
            sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

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
    assert_eq!(recorded.value(RECORDS_ENQUEUED_TOTAL, &[]), 3.0);
    assert!(recorded.value(STORE_WRITES_TOTAL, &[]) >= 1.0);

    // Another tracker on the same store (a restart, or another instance) resolves from it.
    let other = SseTracker::builder().store(store.clone()).build().unwrap();
    assert_eq!(other.last_event_id("s1", "GET /sse/p"), None);
    assert_eq!(
        other.resolve("s1", "GET /sse/p").await.unwrap().unwrap(),
        "3"
    );
    assert_eq!(other.resolve("s1", "GET /sse/unknown").await.unwrap(), None);
}

#[tokio::test(start_paused = true)]
async fn test_event_tracker_channel_backpressure() {
    let store = Arc::new(ScriptedStore::gated());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .channel_capacity(1)
            .max_batch(1),
    );
    let h = Harness::start(tracker).await;
    let settle = || sleep(Duration::from_millis(1));
    timeout(Duration::from_secs(30), async {
        // Fill the pipeline: A's write is stuck in the store, B waits in the worker's batch
        // (max_batch 1, so the worker stops receiving), C fills the channel (capacity 1).
        let mut open = Vec::new();
        for name in ["a", "b", "c"] {
            let tx = h.feed(name);
            let mut client = h
                .get(&format!("/sse/{name}"), Some(name), HeaderMap::new())
                .await;
            tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
            client.read_until_len(7).await;
            settle().await;
            open.push((tx, client));
        }
        assert_eq!(store.calls(), 0, "A's save is still waiting at the gate");

        // The channel is full. D commits id 7; the frame is delivered at once, then the body
        // waits for room before it pulls the next frame.
        let (tx, pulls) = h.feed_logged("d");
        let mut client = h.get("/sse/d", Some("d"), HeaderMap::new()).await;
        tx.send(Bytes::from_static(b"id: 7\n\n")).unwrap();
        tx.send(Bytes::from_static(b"data: next\n\n")).unwrap();
        client.read_until_len(7).await;
        assert_eq!(h.tracker.last_event_id("d", "GET /sse/d").unwrap(), "7");
        assert_eq!(pulls.lock().unwrap().len(), 1, "the next frame must wait");
        client.read_until_len(7 + 12).await;
        let pulls = pulls.lock().unwrap().clone();
        let waited = pulls[1] - pulls[0];
        println!("next frame pulled {waited:?} after the id frame");
        assert!(waited >= Duration::from_millis(90), "{waited:?}");
        assert!(waited <= Duration::from_millis(500), "{waited:?}");
        assert_eq!(recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]), 1.0);

        // D is dirty: once the worker drains, the store holds its latest id, read from memory.
        store.open();
        eventually("the store holds every stream's latest id", || {
            ["a", "b", "c"]
                .iter()
                .all(|s| store.get(&key(s, &format!("GET /sse/{s}"))).is_some())
                && store
                    .get(&key("d", "GET /sse/d"))
                    .is_some_and(|s| s.id == "7")
        })
        .await;
        drop(open);
    })
    .await
    .expect("the backpressure test hung");
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
    assert_eq!(recorded.value(STORE_ERRORS_TOTAL, &[]), 3.0);
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
    assert_eq!(recorded.value(STORE_ERRORS_TOTAL, &[]), (4 + probes) as f64);
    assert!(store.get(&key("s1", "GET /sse/x")).is_none());

    // The store recovers; the next successful write catches the given-up key up.
    store.set_failing(false);
    run_frames(&h, "y", Some("s2"), &[b"id: 5\n\n"]).await;
    eventually("the given-up key is caught up", || {
        store.get(&key("s1", "GET /sse/x")).is_some()
    })
    .await;
    assert_eq!(store.get(&key("s2", "GET /sse/y")).unwrap().id, "5");
    let report = h.tracker.shutdown(Duration::from_secs(1)).await;
    assert!(report.is_complete(), "{report:?}");
}

#[tokio::test(start_paused = true)]
async fn a_retry_of_an_old_id_never_overwrites_a_newer_one() {
    let store = Arc::new(ScriptedStore::failing_first(1));
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            // The retry of id 1 comes due long after id 2 has been written.
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
    eventually("id 2 is written", || {
        store
            .get(&key("s1", "GET /sse/o"))
            .is_some_and(|s| s.id == "2")
    })
    .await;
    // Let the retry of id 1 come due.
    sleep(Duration::from_secs(3)).await;
    assert_eq!(store.get(&key("s1", "GET /sse/o")).unwrap().id, "2");
    assert!(recorded.value(DUPLICATES_SKIPPED_TOTAL, &[]) >= 1.0);
    assert_eq!(store.calls(), 2, "the stale retry must not even be written");
}

#[tokio::test(start_paused = true)]
async fn a_slow_store_never_delays_frames_more_than_the_send_timeout() {
    let store = Arc::new(ScriptedStore::slow(Duration::from_secs(1)));
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .channel_capacity(2)
            .max_batch(2),
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
    assert!(
        recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]) >= 1.0,
        "no backpressure happened"
    );
    assert!(worst <= Duration::from_millis(101), "{worst:?}");
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
    assert_eq!(h.tracker.last_event_id("s1", "GET /sse/s1").unwrap(), "3");
    sleep(Duration::from_secs(1)).await;
    assert_eq!(stored(&store, "s1", "GET /sse/s1").as_deref(), Some("2"));
    assert_eq!(
        recorded.value(RECORDS_ENQUEUED_TOTAL, &[]),
        enqueued,
        "the channel is closed"
    );
    assert_eq!(
        h.tracker.shutdown(Duration::from_secs(1)).await,
        Default::default()
    );
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
