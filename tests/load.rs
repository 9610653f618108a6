//! `test_load_1000_events_per_second` (run with `-- --nocapture` to see its figures): 100 SSE
//! clients with their own sessions on a real axum server behind the layer, 1000 events/s in
//! total. `LOAD_SECONDS` sets the duration (default 5).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::load::{client, percentile, serve_load};
use common::names::{
    BACKPRESSURE_TIMEOUTS_TOTAL, EVENTS_TOTAL, RECORDS_COALESCED_TOTAL, STORE_WRITES_TOTAL,
};
use tower_sse_tracker::store::InMemoryStore;
use tower_sse_tracker::{SseTracker, StreamKey};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_load_1000_events_per_second() {
    const CLIENTS: u64 = 100;
    const TOTAL_RATE: u64 = 1_000;
    let seconds: u64 = std::env::var("LOAD_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let per_client_rate = TOTAL_RATE / CLIENTS;
    let events_each = per_client_rate * seconds;

    let store = Arc::new(InMemoryStore::new());
    let (tracker, recorded) = common::build_recorded(
        SseTracker::builder()
            .store(store.clone())
            // Several events per stream per flush, so that coalescing has something to do.
            .flush_interval(Duration::from_millis(500)),
    );
    let addr = serve_load(&tracker).await;

    let http = reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = format!("http://{addr}/load?events={events_each}&per_second={per_client_rate}");
    let started = std::time::Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| tokio::spawn(client(http.clone(), url.clone(), format!("load-{c:03}"))))
        .collect();

    // Warm-up: every client connected and streaming. Then the alive task count must not grow.
    let runtime = tokio::runtime::Handle::current().metrics();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let warm = runtime.num_alive_tasks();
    let mut samples = Vec::new();
    while started.elapsed() < Duration::from_secs(seconds.saturating_sub(1).max(1)) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        samples.push(runtime.num_alive_tasks());
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    let elapsed = started.elapsed();
    let report = tracker.shutdown(Duration::from_secs(10)).await;
    assert!(report.is_complete(), "{report:?}");

    let received: usize = results.iter().map(|r| r.received).sum();
    let sent = (CLIENTS * events_each) as usize;
    let events = recorded.value(EVENTS_TOTAL, &[]);
    let writes = recorded.value(STORE_WRITES_TOTAL, &[]);
    let coalesced = recorded.value(RECORDS_COALESCED_TOTAL, &[]);
    let mut latencies: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_us.clone())
        .collect();
    latencies.sort_unstable();
    println!("load: {CLIENTS} clients, {TOTAL_RATE} events/s for {seconds} s ({elapsed:.1?})");
    println!("  events sent {sent}, received {received}, dispatched by the layer {events}");
    println!(
        "  store writes {writes} (records coalesced {coalesced}): {:.1}x fewer writes than events",
        events / writes
    );
    println!(
        "  alive tasks after warm-up {warm}, while streaming max {:?}",
        samples.iter().max()
    );
    println!(
        "  delivery latency p50 {} µs, p99 {} µs, max {} µs",
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().unwrap()
    );

    assert_eq!(received, sent, "every event reached its client");
    assert_eq!(events as usize, sent);
    for r in &results {
        let key = StreamKey::try_new(&r.session, "GET /load").unwrap();
        let persisted = store.get(&key).map(|s| s.id.to_string());
        assert_eq!(persisted, r.last_id, "{}", r.session);
    }
    assert!(
        samples.iter().all(|&n| n <= warm),
        "tasks grew: {warm} -> {samples:?}"
    );
    assert_eq!(recorded.value(BACKPRESSURE_TIMEOUTS_TOTAL, &[]), 0.0);
    assert!(
        events / writes >= 2.0,
        "coalescing: {events} events, {writes} writes"
    );
}
