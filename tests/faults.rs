//! Faults under load: a store that fails at random and goes down for a while, a flood of
//! distinct session ids, shutdown while streams flow, clients that leave mid-event.
//! `FAULT_OUTAGE_SECS` (default 2) and `FLOOD_SESSIONS` (default 200 000) size the long ones;
//! `FLOOD_SESSIONS=1000000 FAULT_OUTAGE_SECS=5` is the full size.
//! (A store taking 1 s per write is `a_slow_store_never_delays_frames_more_than_the_send_timeout`
//! in `tests/persistence.rs`.)

mod common;
#[path = "common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use std::sync::Arc;
use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::direct::{drive, frames_service};
use common::load::{client, serve_load};
use common::names::{
    EVENTS_TOTAL, REASON_LRU, RETRIES_EXHAUSTED_TOTAL, STORE_ERRORS_TOTAL, STREAMS_ACTIVE,
    STREAMS_EVICTED_TOTAL,
};
use common::stores::ScriptedStore;
use common::{Harness, build_recorded, key};
use tower_sse_tracker::SseTracker;
use tower_sse_tracker::store::InMemoryStore;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_failing_30_percent_with_an_outage_under_load_loses_no_latest_id() {
    let outage = Duration::from_secs(env_or("FAULT_OUTAGE_SECS", 2));
    let store = Arc::new(ScriptedStore::failing_first(0).with_random_failures(0.3));
    let (tracker, recorded) = build_recorded(SseTracker::builder().store(store.clone()));
    let addr = serve_load(&tracker).await;
    const CLIENTS: u64 = 50;
    const RATE: u64 = 20;
    // Streams run through a second of normal (flaky) service, the outage, and a second after.
    let events_each = RATE * (outage.as_secs() + 2);
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/load?events={events_each}&per_second={RATE}");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(http.clone(), url.clone(), format!("fault-{c:02}"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    store.set_failing(true);
    tokio::time::sleep(outage).await;
    store.set_failing(false);
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    let report = tracker.shutdown(Duration::from_secs(30)).await;
    println!(
        "{} events, {} store errors, {} keys given up during the outage; shutdown: {report:?}",
        recorded.value(EVENTS_TOTAL, &[]),
        recorded.sum(STORE_ERRORS_TOTAL),
        recorded.value(RETRIES_EXHAUSTED_TOTAL, &[]),
    );
    assert!(report.is_complete(), "{report:?}");
    for r in &results {
        assert_eq!(r.received as u64, events_each, "{}", r.session);
        let persisted = store
            .get(&key(&r.session, "GET /load"))
            .map(|s| s.id.to_string());
        assert_eq!(persisted, r.last_id, "{}", r.session);
    }
    assert!(recorded.sum(STORE_ERRORS_TOTAL) > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_under_load_accounts_for_every_stream() {
    let store = Arc::new(ScriptedStore::slow(Duration::from_millis(50)).with_random_failures(0.3));
    let tracker = SseTracker::builder().store(store.clone()).build().unwrap();
    let addr = serve_load(&tracker).await;
    const CLIENTS: u64 = 50;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/load?events=60&per_second=20");
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(http.clone(), url.clone(), format!("shut-{c:02}"))))
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    // What each stream had published when shutdown began.
    let at_shutdown: Vec<(String, u64)> = (0..CLIENTS)
        .map(|c| {
            let s = format!("shut-{c:02}");
            let id = tracker
                .last_event_id(&key(&s, "GET /load"))
                .map_or(0, |id| id.as_str().parse().unwrap());
            (s, id)
        })
        .collect();
    let report = tracker.shutdown(Duration::from_secs(20)).await;
    println!(
        "shutdown under load: {} persisted, {} pending, {} given up",
        report.persisted,
        report.pending.len(),
        report.given_up.len()
    );
    assert!(report.given_up.is_empty(), "{report:?}");
    // `persisted` counts streams, not entries written.
    assert!(
        report.persisted > 0 && report.persisted as u64 <= CLIENTS,
        "{report:?}"
    );
    // Every id committed before the shutdown began is in the store.
    for (session, published) in &at_shutdown {
        let stored = store
            .get(&key(session, "GET /load"))
            .map_or(0, |s| s.id.as_str().parse::<u64>().unwrap());
        assert!(
            stored >= *published,
            "{session}: stored {stored} < {published}"
        );
    }
    // The streams go on after shutdown; their later ids stay in memory.
    for c in clients {
        assert_eq!(c.await.unwrap().received, 60);
    }
    // Now that the streams have ended, a second report is exact, stream by stream: a stream is
    // listed pending exactly when its latest id is not the one in the store. (They kept
    // publishing after the shutdown began, and nothing is written after it.)
    let again = tracker.shutdown(Duration::from_secs(1)).await;
    assert_eq!(again.persisted, 0);
    assert!(!again.is_complete());
    for c in 0..CLIENTS {
        let session = format!("shut-{c:02}");
        let latest = tracker.last_event_id(&key(&session, "GET /load")).unwrap();
        let stored = store.get(&key(&session, "GET /load")).map(|s| s.id);
        let listed = again.pending.contains(&key(&session, "GET /load"));
        assert_eq!(listed, stored.as_ref() != Some(&latest), "{session}");
        assert!(listed, "{session} published after the shutdown began");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_leaving_mid_event_commit_nothing_and_the_gauge_returns_to_zero() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let h = Harness::start(tracker).await;
    const CLIENTS: usize = 20;
    const SENT: &[u8] = b"id: 1\ndata: whole\n\nid: 2\ndata: ha";
    let mut open = Vec::new();
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let name = format!("cut{c}");
        let tx = h.feed(&name);
        let mut client = h
            .get(&format!("/sse/{name}"), Some(&name), HeaderMap::new())
            .await;
        tx.send(Bytes::from_static(SENT)).unwrap();
        client.read_until_len(SENT.len()).await;
        open.push((name, tx));
        clients.push(client);
    }
    assert_eq!(recorded.value(STREAMS_ACTIVE, &[]), CLIENTS as f64);
    // Every client leaves in the middle of event 2.
    drop(clients);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while recorded.value(STREAMS_ACTIVE, &[]) != 0.0 {
        assert!(tokio::time::Instant::now() < deadline, "gauge stuck");
        for (_, tx) in &open {
            // The server notices a closed connection when it next writes.
            let _ = tx.send(Bytes::from_static(b"x"));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for (name, _) in &open {
        assert_eq!(
            h.tracker
                .last_event_id(&key(name, &format!("GET /sse/{name}")))
                .unwrap(),
            "1",
            "{name}: the cut event must not count"
        );
    }
}

#[test]
fn a_flood_of_distinct_sessions_stays_within_max_streams_and_bounded_memory() {
    let sessions = env_or("FLOOD_SESSIONS", 200_000) as usize;
    const MAX_STREAMS: usize = 10_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let store = Arc::new(InMemoryStore::with_max_keys(MAX_STREAMS));
        let (tracker, recorded) = build_recorded(
            SseTracker::builder()
                .store(store.clone())
                .heartbeat_interval(None)
                .max_streams(common::nz(MAX_STREAMS)),
        );
        let mut svc = frames_service(&tracker);
        let frame = Bytes::from_static(b"id: 1\ndata: x\n\n");
        // Fill to the bound, then measure while the rest of the flood passes.
        let mut name = String::new();
        for i in 0..MAX_STREAMS {
            name.clear();
            std::fmt::Write::write_fmt(&mut name, format_args!("flood-{i:08}")).unwrap();
            drive(&mut svc, &name, vec![frame.clone()]).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (bytes_full, _) = counting_alloc::live();
        let mut peak = bytes_full;
        for i in MAX_STREAMS..sessions {
            name.clear();
            std::fmt::Write::write_fmt(&mut name, format_args!("flood-{i:08}")).unwrap();
            drive(&mut svc, &name, vec![frame.clone()]).await;
            if i % 10_000 == 0 {
                // Let the worker drain, as it would between requests on a real server.
                tokio::time::sleep(Duration::from_millis(1)).await;
                peak = peak.max(counting_alloc::live().0);
                assert!(tracker.tracked_streams() <= MAX_STREAMS);
            }
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (bytes_end, _) = counting_alloc::live();
        println!(
            "flood of {sessions} sessions: registry {} streams (max {MAX_STREAMS}), {} evicted; \
             heap at the bound {} KiB, peak {} KiB, end {} KiB",
            tracker.tracked_streams(),
            recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_LRU)]),
            bytes_full / 1024,
            peak / 1024,
            bytes_end / 1024
        );
        assert_eq!(tracker.tracked_streams(), MAX_STREAMS);
        assert_eq!(
            recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_LRU)]),
            (sessions - MAX_STREAMS) as f64
        );
        // Memory is bounded: the flood after the bound adds little (a few KiB of churn), not
        // ~700 bytes per session.
        let growth = (peak - bytes_full).max(0) as usize;
        assert!(
            growth < 8 * 1024 * 1024,
            "heap grew by {growth} bytes over {} sessions",
            sessions - MAX_STREAMS
        );
        assert!(store.len() <= MAX_STREAMS);
    });
}

fn flood_name(name: &mut String, prefix: &str, i: usize) {
    name.clear();
    std::fmt::Write::write_fmt(name, format_args!("{prefix}-{i:08}")).unwrap();
}

/// While the store fails or hangs, a flood of new sessions evicts streams whose latest id is
/// not in the store yet. They wait in a bounded set; beyond it the oldest is dropped, counted
/// and reported, so memory stays bounded whatever the store does.
#[test]
fn a_flood_while_the_store_fails_or_hangs_keeps_memory_bounded_and_counts_what_it_drops() {
    use common::names::{IDS_DROPPED_TOTAL, REASON_EVICTED_OVERFLOW};
    use common::stores::{Calls, Fault, FaultStore};

    let sessions = env_or("FLOOD_SESSIONS", 200_000) as usize;
    const MAX_STREAMS: usize = 10_000;
    const MAX_PENDING_EVICTED: usize = 1_000;
    const CHANNEL_CAPACITY: usize = 1_024;
    for fault in [Fault::FailAtOnce, Fault::Hang] {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let store = Arc::new(FaultStore::default());
            store.set(Calls::Both, fault);
            let (tracker, recorded) = build_recorded(
                SseTracker::builder()
                    .store(store.clone())
                    .heartbeat_interval(None)
                    .max_streams(common::nz(MAX_STREAMS))
                    .max_pending_evicted(MAX_PENDING_EVICTED)
                    .channel_capacity(CHANNEL_CAPACITY)
                    .store_timeout(Duration::from_millis(200)),
            );
            let mut svc = frames_service(&tracker);
            let frame = Bytes::from_static(b"id: 1\ndata: x\n\n");
            let mut name = String::new();
            for i in 0..MAX_STREAMS {
                flood_name(&mut name, "fill", i);
                drive(&mut svc, &name, vec![frame.clone()]).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (at_bound, _) = counting_alloc::live();
            let mut peak = at_bound;
            for i in 0..sessions {
                flood_name(&mut name, "flood", i);
                drive(&mut svc, &name, vec![frame.clone()]).await;
                if i % 10_000 == 0 {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                    peak = peak.max(counting_alloc::live().0);
                }
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            peak = peak.max(counting_alloc::live().0);
            let dropped = recorded.value(IDS_DROPPED_TOTAL, &[("reason", REASON_EVICTED_OVERFLOW)]);
            let growth = (peak - at_bound).max(0) as usize;
            println!(
                "flood of {sessions} sessions with the store {fault:?}: heap at the bound {} KiB, \
                 peak {} KiB (+{} KiB, {:.1} B per evicted session); {dropped} ids dropped",
                at_bound / 1024,
                peak / 1024,
                growth / 1024,
                growth as f64 / sessions as f64,
            );
            // Every evicted stream beyond the bound is dropped, and counted.
            assert_eq!(dropped, (sessions - MAX_PENDING_EVICTED) as f64);
            // Unbounded, this would be some 300 bytes per session (60 MB). Bounded, a stream
            // outlives its eviction only in the lists on its way to the store: the hand-off's
            // list of changed streams (when the channel is full) and the worker's own, each
            // purged of evicted streams beyond `max_streams + max_pending_evicted` entries (both
            // may be full at once); the channel (its capacity); the FIFO of
            // evicted streams (`max_pending_evicted`). Each costs at most what a resident
            // stream does (the heap at the bound per stream): about 10 MB here. Runs reached
            // 4.8 MB with a hanging store, above a bound of 12 000 streams of 400 bytes.
            let per_stream = at_bound as usize / MAX_STREAMS;
            let list = MAX_STREAMS + MAX_PENDING_EVICTED;
            let bound = (2 * list + CHANNEL_CAPACITY + MAX_PENDING_EVICTED) * per_stream;
            assert!(
                growth < bound,
                "heap grew by {growth} bytes (bound {bound}, {per_stream} bytes per stream)"
            );

            // The store recovers: what was kept reaches it; the report counts what was dropped.
            store.set(Calls::Both, Fault::Ok);
            let report = tracker.shutdown(Duration::from_secs(10)).await;
            assert_eq!(report.dropped, dropped as u64);
            assert!(
                report.pending.is_empty(),
                "{} pending (deadline reached: {}), first {:?}",
                report.pending.len(),
                report.deadline_reached,
                report.pending.iter().take(3).collect::<Vec<_>>()
            );
            assert!(report.given_up.is_empty());
            assert!(!report.is_complete(), "ids were dropped");
            assert_eq!(store.inner.len(), MAX_STREAMS + MAX_PENDING_EVICTED);
        });
    }
}

/// After `shutdown()` the layer keeps serving, and a flood of new sessions grows nothing but
/// the registry, within its bound.
#[test]
fn after_shutdown_the_layer_serves_with_bounded_memory() {
    let sessions = (env_or("FLOOD_SESSIONS", 200_000) as usize).min(200_000);
    const MAX_STREAMS: usize = 10_000;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let tracker = SseTracker::builder()
            .heartbeat_interval(None)
            .max_streams(common::nz(MAX_STREAMS))
            .build()
            .unwrap();
        let mut svc = frames_service(&tracker);
        let frame = Bytes::from_static(b"id: 1\ndata: x\n\n");
        let mut name = String::new();
        assert!(tracker.shutdown(Duration::from_secs(1)).await.is_complete());
        for i in 0..MAX_STREAMS {
            flood_name(&mut name, "fill", i);
            drive(&mut svc, &name, vec![frame.clone()]).await;
        }
        let (at_bound, _) = counting_alloc::live();
        let mut peak = at_bound;
        for i in 0..sessions {
            flood_name(&mut name, "after", i);
            drive(&mut svc, &name, vec![frame.clone()]).await;
            if i % 10_000 == 0 {
                peak = peak.max(counting_alloc::live().0);
            }
        }
        let growth = (peak - at_bound).max(0) as usize;
        println!(
            "{sessions} sessions after shutdown: heap +{} KiB ({:.2} B per session)",
            growth / 1024,
            growth as f64 / sessions as f64
        );
        assert_eq!(tracker.tracked_streams(), MAX_STREAMS);
        assert!(growth < 1024 * 1024, "heap grew by {growth} bytes");
    });
}

/// Streams with an open body are never evicted: through a flood of new sessions larger than
/// `max_streams`, ten live streams keep their exact latest ids and their subscriptions.
#[test]
fn a_flood_of_new_sessions_never_evicts_live_streams_or_their_subscribers() {
    use common::direct::{fed_request, fed_service, respond};
    use futures_util::FutureExt;
    use http_body_util::BodyExt;

    let sessions = env_or("FLOOD_SESSIONS", 200_000) as usize;
    const MAX_STREAMS: usize = 10_000;
    const LIVE: usize = 10;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        // The store keeps as many keys as the registry, so that only the tracker's memory is
        // measured.
        let store = Arc::new(InMemoryStore::with_max_keys(MAX_STREAMS));
        let (tracker, recorded) = build_recorded(
            SseTracker::builder()
                .store(store)
                .heartbeat_interval(None)
                .max_streams(common::nz(MAX_STREAMS)),
        );
        let mut fed = fed_service(&tracker);
        let mut live = Vec::new();
        for l in 0..LIVE {
            let session = format!("live-{l}");
            let (tx, req) = fed_request(&session);
            let body = respond(&mut fed, req).await.into_body();
            let rx = tracker.subscribe(&key(&session, "GET /mcp")).unwrap();
            live.push((session, tx, body, rx));
        }
        let mut published = 0;
        let mut publish = |live: &mut Vec<(String, _, _, _)>| {
            published += 1;
            for (_, tx, body, _) in live.iter_mut() {
                let tx: &tokio::sync::mpsc::UnboundedSender<Bytes> = tx;
                tx.send(Bytes::from(format!("id: {published}\n\n")))
                    .unwrap();
                let body: &mut _ = body;
                let frame = BodyExt::frame(body).now_or_never();
                assert!(
                    matches!(frame, Some(Some(Ok(_)))),
                    "the live body yields its frame"
                );
            }
            published
        };
        publish(&mut live);

        let mut svc = frames_service(&tracker);
        let frame = Bytes::from_static(b"id: 1\n\n");
        let mut name = String::new();
        for i in 0..MAX_STREAMS {
            flood_name(&mut name, "fill", i);
            drive(&mut svc, &name, vec![frame.clone()]).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (before, _) = counting_alloc::live();
        let mut peak = before;
        for i in 0..sessions {
            flood_name(&mut name, "flood", i);
            drive(&mut svc, &name, vec![frame.clone()]).await;
            if i % 1_000 == 0 {
                publish(&mut live);
            }
            if i % 10_000 == 0 {
                tokio::time::sleep(Duration::from_millis(1)).await;
                peak = peak.max(counting_alloc::live().0);
            }
        }
        let last = publish(&mut live).to_string();
        let evicted = recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_LRU)]);
        println!(
            "flood of {sessions} sessions in a full registry (max_streams {MAX_STREAMS}): \
             {evicted} evicted, {LIVE} live streams kept with exact ids; heap peak +{} KiB",
            (peak - before).max(0) / 1024
        );
        assert_eq!(evicted as usize, sessions + LIVE);
        let mut made_after = Vec::new();
        for (session, tx, _, rx) in &mut live {
            assert_eq!(
                tracker.last_event_id(&key(session, "GET /mcp")).unwrap(),
                last.as_str(),
                "{session}"
            );
            assert!(
                rx.has_changed().unwrap(),
                "{session}: the subscription is alive"
            );
            assert_eq!(rx.borrow_and_update().as_ref().unwrap(), last.as_str());
            // A subscription made after the flood starts at the current id and sees the next.
            let mut again = tracker.subscribe(&key(session, "GET /mcp")).unwrap();
            assert_eq!(again.borrow_and_update().as_ref().unwrap(), last.as_str());
            tx.send(Bytes::from_static(b"id: next\n\n")).unwrap();
            assert!(!again.has_changed().unwrap(), "not before the frame passes");
            made_after.push(again);
        }
        for (_, _, body, _) in &mut live {
            assert!(BodyExt::frame(body).now_or_never().is_some());
        }
        for ((session, _, _, rx), again) in live.iter_mut().zip(&mut made_after) {
            assert_eq!(
                rx.borrow_and_update().as_ref().unwrap(),
                "next",
                "{session}"
            );
            assert!(again.has_changed().unwrap(), "{session}");
            assert_eq!(
                again.borrow_and_update().as_ref().unwrap(),
                "next",
                "{session}"
            );
        }
        assert!(((peak - before).max(0) as usize) < 8 * 1024 * 1024);
    });
}

/// When every tracked stream has an open body, a new stream is served untracked, and counted;
/// a subscription to a new stream is refused.
#[tokio::test]
async fn a_registry_full_of_live_streams_serves_new_ones_untracked() {
    use common::direct::{fed_request, fed_service, respond};
    use common::names::{REASON_REGISTRY_FULL, UNTRACKED_STREAMS_TOTAL};
    use tower_sse_tracker::SubscribeError;

    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .max_streams(common::nz(3)),
    );
    let mut svc = fed_service(&tracker);
    let mut open = Vec::new();
    for s in ["a", "b", "c"] {
        let (tx, req) = fed_request(s);
        let response = respond(&mut svc, req).await;
        assert!(response.body().is_tracked());
        open.push((tx, response));
    }
    let (_tx, req) = fed_request("d");
    let response = respond(&mut svc, req).await;
    assert!(!response.body().is_tracked());
    assert_eq!(
        recorded.value(UNTRACKED_STREAMS_TOTAL, &[("reason", REASON_REGISTRY_FULL)]),
        1.0
    );
    assert_eq!(
        tracker.subscribe(&key("e", "GET /mcp")).unwrap_err(),
        SubscribeError::RegistryFull
    );
    // One body ends: its stream can be evicted for a new one.
    drop(open.pop());
    let (_tx, req) = fed_request("d");
    assert!(respond(&mut svc, req).await.body().is_tracked());
    assert_eq!(tracker.last_event_id(&key("c", "GET /mcp")), None);
}
