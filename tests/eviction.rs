//! Latest ids of evicted streams: never lost, hidden or misreported while the worker writes
//! them, whatever the store does meanwhile. Driven without sockets and with Tokio's clock
//! paused, so that what the worker has done at each step is exact.

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::direct::{drive, frames_service, id_frames, request, respond};
use common::stores::{Calls, Fault, FaultStore, OneEntryPerKeyStore};
use common::{eventually, key};
use http_body_util::BodyExt;
use tokio::time::{Instant, sleep};
use tower_sse_tracker::{EventId, Resume, RetryPolicy, SseTracker};

fn stored(store: &FaultStore, session: &str) -> Option<String> {
    store
        .get(&key(session, "GET /mcp"))
        .map(|s| s.id.to_string())
}

/// A tracker of one stream on `store`, with heartbeats off.
fn one_stream_tracker(store: Arc<FaultStore>) -> SseTracker {
    SseTracker::builder()
        .store(store)
        .heartbeat_interval(None)
        .max_streams(common::nz(1))
        .store_timeout(Duration::from_secs(5))
        .build()
        .unwrap()
}

/// `s1` commits `7`, then a subscription to `s2` evicts it with its id not yet in the store.
async fn evict_s1_unwritten(tracker: &SseTracker) {
    let mut svc = frames_service(tracker);
    drive(
        &mut svc,
        "s1",
        vec![bytes::Bytes::from_static(b"id: 7\n\n")],
    )
    .await;
    let _ = tracker.subscribe(&key("s2", "GET /mcp")).unwrap();
    assert_eq!(tracker.tracked_streams(), 1);
    assert_eq!(tracker.last_event_id(&key("s1", "GET /mcp")).unwrap(), "7");
}

/// Failed on `ecccf3c`: the shutdown returned after the first failed save (100 ms) with
/// `s1` pending, and `s1` never reached the store.
#[tokio::test(start_paused = true)]
async fn shutdown_retries_an_evicted_id_until_the_store_works() {
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Save, Fault::FailAfter(Duration::from_millis(100)));
    let tracker = one_stream_tracker(store.clone());
    evict_s1_unwritten(&tracker).await;
    let started = Instant::now();
    let shutdown = tokio::spawn({
        let tracker = tracker.clone();
        async move { tracker.shutdown(Duration::from_secs(60)).await }
    });
    eventually("the first save is called", || store.calls().0 >= 1).await;
    // That save fails after 100 ms; every later one works.
    store.set(Calls::Save, Fault::Ok);
    let report = shutdown.await.unwrap();
    println!("{report:?} after {:?}", started.elapsed());
    assert!(report.is_complete(), "{report:?}");
    assert!(!report.deadline_reached);
    assert_eq!(stored(&store, "s1").as_deref(), Some("7"));
    assert!(store.calls().0 >= 2, "the failed save was retried");
}

/// Failed on `ecccf3c`: while the save of an evicted stream hung, `last_event_id` and
/// `resolve` answered `None` and `resume` `Unknown`.
#[tokio::test(start_paused = true)]
async fn an_evicted_id_stays_visible_while_its_write_is_in_flight() {
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Save, Fault::Hang);
    let tracker = one_stream_tracker(store.clone());
    evict_s1_unwritten(&tracker).await;
    eventually("the save of s1 is in flight", || store.calls().0 >= 1).await;
    sleep(Duration::from_millis(500)).await;
    let k = key("s1", "GET /mcp");
    assert_eq!(
        tracker.last_event_id(&k).as_ref().map(EventId::as_str),
        Some("7")
    );
    assert_eq!(
        tracker
            .resolve(&k)
            .await
            .unwrap()
            .as_ref()
            .map(EventId::as_str),
        Some("7")
    );
    let seven = EventId::new("7").unwrap();
    assert_eq!(
        tracker.resume(&k, Some(&seven)).await.unwrap(),
        Resume::Current(seven)
    );
    // Still visible after the hung call timed out and failed (5 s), until it is written.
    sleep(Duration::from_secs(6)).await;
    assert_eq!(
        tracker.last_event_id(&k).as_ref().map(EventId::as_str),
        Some("7")
    );
    store.set(Calls::Save, Fault::Ok);
    eventually("s1 is stored", || stored(&store, "s1").is_some()).await;
    assert_eq!(stored(&store, "s1").as_deref(), Some("7"));
    assert_eq!(
        tracker.last_event_id(&k).as_ref().map(EventId::as_str),
        Some("7")
    );
}

/// Failed on `ecccf3c`: a second shutdown, made while the first still ran, reported
/// `pending: []` and `is_complete()` with `s1` unwritten.
#[tokio::test(start_paused = true)]
async fn a_report_made_while_the_worker_still_runs_is_never_complete() {
    let store = Arc::new(FaultStore::default());
    store.set(Calls::Save, Fault::Hang);
    let tracker = one_stream_tracker(store.clone());
    evict_s1_unwritten(&tracker).await;
    let first = tokio::spawn({
        let tracker = tracker.clone();
        async move { tracker.shutdown(Duration::from_secs(60)).await }
    });
    eventually("the save of s1 is in flight", || store.calls().0 >= 1).await;
    let second = tracker.shutdown(Duration::from_millis(500)).await;
    println!("second: {second:?}");
    assert!(!second.is_complete(), "{second:?}");
    assert_eq!(second.pending, [key("s1", "GET /mcp")], "{second:?}");
    assert!(second.deadline_reached);
    // The first one writes it once the store works, and then reports complete; a shutdown
    // asked after that reports complete too.
    store.set(Calls::Save, Fault::Ok);
    let first = first.await.unwrap();
    assert!(first.is_complete(), "{first:?}");
    assert_eq!(stored(&store, "s1").as_deref(), Some("7"));
    let third = tracker.shutdown(Duration::from_millis(500)).await;
    assert!(third.is_complete(), "{third:?}");
}

/// Failed on `ecccf3c`: with the worker's channel full, body `b` waited inside itself to hand
/// its stream over; no longer polled (its client stopped reading), it never did, and the
/// shutdown ended at once with `b` unwritten.
#[tokio::test(start_paused = true)]
async fn a_stream_whose_body_is_no_longer_polled_still_reaches_the_worker() {
    let store = Arc::new(FaultStore::default());
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .channel_capacity(1)
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    // `a` fills the channel (the worker has not run yet: nothing here yields to it).
    drive(&mut svc, "a", id_frames(1)).await;
    // `b` commits an id and finds the channel full; its body is then never polled again.
    let mut b = respond(&mut svc, request("b", id_frames(3)))
        .await
        .into_body();
    let frame = b.frame().await.unwrap().unwrap();
    assert_eq!(frame.into_data().unwrap(), "id: 1\n\n");
    assert_eq!(tracker.last_event_id(&key("b", "GET /mcp")).unwrap(), "1");
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(stored(&store, "b").as_deref(), Some("1"));
    assert_eq!(stored(&store, "a").as_deref(), Some("1"));
    drop(b);
}

/// Failed on `ecccf3c`: the batch held `s1` twice (its evicted id `1` and its new id `2`),
/// which a store refusing such batches (a SQL multi-row upsert) refused with the other
/// stream in it.
#[tokio::test(start_paused = true)]
async fn a_batch_holds_one_entry_per_key_when_an_evicted_stream_comes_back() {
    let store = Arc::new(OneEntryPerKeyStore::default());
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .max_streams(common::nz(2))
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    drive(&mut svc, "other", id_frames(4)).await;
    drive(&mut svc, "s1", id_frames(1)).await;
    // Evicts `other`... then `s1` (least recently used first); `s1` comes back at once, before
    // any flush, and commits `2`.
    let _ = tracker.subscribe(&key("s2", "GET /mcp")).unwrap();
    let _ = tracker.subscribe(&key("s3", "GET /mcp")).unwrap();
    drive(
        &mut svc,
        "s1",
        vec![bytes::Bytes::from_static(b"id: 2\n\n")],
    )
    .await;
    // The next flush tick writes both streams.
    sleep(Duration::from_millis(300)).await;
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    let batches = store.batches.lock().unwrap().clone();
    println!("{batches:?}");
    assert_eq!(store.refused.load(Ordering::SeqCst), 0, "{batches:?}");
    assert!(report.is_complete(), "{report:?}");
    let id = |s: &str| {
        store
            .inner
            .get(&key(s, "GET /mcp"))
            .map(|s| s.id.to_string())
    };
    assert_eq!(id("s1").as_deref(), Some("2"));
    assert_eq!(id("other").as_deref(), Some("4"));
}

/// Many short streams through a registry far smaller than them, clients that come back to
/// their stream at random, and a store that fails one save in three: no batch ever names a
/// key twice, and once the store works every stream's latest id is the one it holds.
#[tokio::test(start_paused = true)]
async fn no_batch_names_a_key_twice_under_eviction_churn() {
    let store = Arc::new(OneEntryPerKeyStore::default());
    store.fail_one_in.store(3, Ordering::SeqCst);
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .max_streams(common::nz(8))
        .max_batch(common::nz(16))
        .flush_interval(Duration::from_millis(10))
        .retry(RetryPolicy::exponential(
            Duration::from_millis(10),
            Duration::from_millis(40),
            100,
        ))
        .build()
        .unwrap();
    let mut svc = frames_service(&tracker);
    let mut rng = 0x2545_f491_4f6c_dd1d_u64;
    let mut next = move |n: u64| {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % n
    };
    const SESSIONS: u64 = 40;
    let mut latest = vec![0u64; SESSIONS as usize];
    for _ in 0..2_000 {
        let s = next(SESSIONS) as usize;
        latest[s] += 1;
        let frame = bytes::Bytes::from(format!("id: {}\n\n", latest[s]));
        drive(&mut svc, &format!("c{s}"), vec![frame]).await;
        if next(4) == 0 {
            sleep(Duration::from_millis(next(15))).await;
        }
    }
    store.fail_one_in.store(0, Ordering::SeqCst);
    let report = tracker.shutdown(Duration::from_secs(30)).await;
    let batches = store.batches.lock().unwrap().len();
    let refused = store.refused.load(Ordering::SeqCst);
    println!(
        "{batches} batches, {refused} refused for a key named twice; report complete: {}, dropped {}",
        report.is_complete(),
        report.dropped
    );
    assert_eq!(refused, 0);
    assert!(report.is_complete(), "{report:?}");
    for (s, n) in latest.iter().enumerate() {
        if *n > 0 {
            let stored = store.inner.get(&key(&format!("c{s}"), "GET /mcp"));
            assert_eq!(
                stored.map(|s| s.id.to_string()),
                Some(n.to_string()),
                "c{s}"
            );
        }
    }
}
