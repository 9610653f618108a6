//! Replay across instances on the in-memory store, shared by trackers in one process (the
//! scenarios are in `tests/common/across.rs`; `tests/redis.rs` runs them on Redis).

#[path = "common/across.rs"]
mod across;
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use across::{Instance, answer_key, event, events, joined, stored_log};
use bytes::Bytes;
use common::names::{
    OP_APPEND, REASON_ERROR, REASON_PANIC, REASON_TIMEOUT, REPLAY_DURABLE_CUT_TOTAL,
    REPLAY_STORE_EVENTS_TOTAL, REPLAY_STORE_REFUSED_TOTAL, STORE_ERRORS_TOTAL,
    STREAMS_DRAINED_TOTAL,
};
use tower_sse_tracker::store::{
    AppendReport, InMemoryStore, LogAppend, SaveEntry, Store, StoreError, StoredId, StoredLog,
};
use tower_sse_tracker::{ReplayPolicy, RetryPolicy, StreamKey};

fn store() -> Arc<InMemoryStore> {
    Arc::new(InMemoryStore::new())
}

#[tokio::test]
async fn a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end() {
    across::a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end(store())
        .await;
}

#[tokio::test]
async fn a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end()
{
    across::a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end(store()).await;
}

#[tokio::test]
async fn a_reconnect_whose_id_the_store_does_not_hold_goes_to_the_application() {
    across::a_reconnect_whose_id_the_store_does_not_hold_goes_to_the_application(store()).await;
}

#[tokio::test]
async fn when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal()
 {
    across::when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal(store()).await;
}

#[tokio::test]
async fn a_reconnect_arriving_before_the_producers_flush_waits_for_its_events() {
    across::a_reconnect_arriving_before_the_producers_flush_waits_for_its_events(store()).await;
}

#[tokio::test]
async fn a_stream_its_producer_stops_gives_readers_elsewhere_the_gap_signal() {
    across::a_stream_its_producer_stops_gives_readers_elsewhere_the_gap_signal(store()).await;
}

#[tokio::test]
async fn a_stale_local_log_does_not_hide_the_stores() {
    across::a_stale_local_log_does_not_hide_the_stores(store()).await;
}

#[tokio::test]
async fn with_durable_replay_the_store_holds_every_event_a_client_has_and_its_end() {
    across::with_durable_replay_the_store_holds_every_event_a_client_has_and_its_end(store()).await;
}

/// What durable replay adds to each frame's way to its client, at a flush interval of
/// 100 ms, on the in-memory store: printed, side by side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_latency_durable_replay_adds_is_printed() {
    let flush = Duration::from_millis(100);
    let plain = across::frame_latency(store(), false, flush, 100).await;
    let durable = across::frame_latency(store(), true, flush, 100).await;
    let q = across::quantile;
    println!(
        "frame to client, flush 100 ms, 100 events, in-memory store: not durable p50 {:?} p99 \
         {:?}; durable p50 {:?} p99 {:?}",
        q(&plain, 0.5),
        q(&plain, 0.99),
        q(&durable, 0.5),
        q(&durable, 0.99)
    );
}

/// The in-memory store, whose appends fail at once, hang or panic while a fault is set.
#[derive(Clone, Default)]
struct FaultyAppends {
    inner: Arc<InMemoryStore>,
    fault: Arc<Mutex<Option<Fault>>>,
    /// Append calls made.
    appends: Arc<AtomicUsize>,
    /// The next reads of a log that fail at once.
    failing_reads: Arc<AtomicUsize>,
}

#[derive(Clone, Copy, Debug)]
enum Fault {
    Fail,
    Hang,
    Panic,
}

impl Store for FaultyAppends {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        self.inner.save(batch).await
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        self.inner.load(key).await
    }

    async fn append_logs(&self, batch: &[LogAppend]) -> Result<AppendReport, StoreError> {
        self.appends.fetch_add(1, Ordering::SeqCst);
        let fault = *self.fault.lock().unwrap();
        match fault {
            Some(Fault::Fail) => Err(StoreError::new("appends refused")),
            Some(Fault::Hang) => std::future::pending().await,
            Some(Fault::Panic) => panic!("append bug"),
            None => self.inner.append_logs(batch).await,
        }
    }

    async fn read_log(
        &self,
        key: &StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Option<StoredLog>, StoreError> {
        let failing = self
            .failing_reads
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::new("reads refused"));
        }
        self.inner.read_log(key, after, limit).await
    }

    async fn renew_lease(&self, producer: &str, ttl: Duration) -> Result<(), StoreError> {
        self.inner.renew_lease(producer, ttl).await
    }

    async fn lease_alive(&self, producer: &str) -> Result<bool, StoreError> {
        self.inner.lease_alive(producer).await
    }
}

#[tokio::test]
async fn appends_that_fail_hang_or_panic_cost_the_stream_nothing_and_reach_the_store_once_each_when_it_recovers()
 {
    for fault in [Fault::Fail, Fault::Hang, Fault::Panic] {
        let store = FaultyAppends::default();
        let a = Instance::start_built(
            store.clone(),
            ReplayPolicy::new().across_instances(true),
            |builder| {
                builder
                    .store_timeout(Duration::from_millis(200))
                    .retry(RetryPolicy::exponential(
                        Duration::from_millis(20),
                        Duration::from_millis(100),
                        3,
                    ))
            },
        )
        .await;
        *store.fault.lock().unwrap() = Some(fault);
        let feed = a.next_feed();
        let mut client = a.get(None).await;
        for n in 1..=20 {
            feed.send(Bytes::from(event(n))).unwrap();
            // The client gets each event while the store refuses: nothing waits for it.
            tokio::time::timeout(
                Duration::from_secs(2),
                client.read_until_suffix(event(n).as_bytes()),
            )
            .await
            .unwrap_or_else(|_| panic!("{fault:?}: event {n} held up by the store"));
        }
        drop(feed);
        client.read_to_end().await;
        let failed = || {
            a.metrics.value(
                STORE_ERRORS_TOTAL,
                &[("op", OP_APPEND), ("reason", reason(fault))],
            )
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while failed() < 2.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{fault:?}: failed appends not counted"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            store
                .inner
                .read_log(&answer_key(), None, 100)
                .await
                .unwrap()
                .is_none(),
            "{fault:?}: nothing stored yet"
        );
        *store.fault.lock().unwrap() = None;
        let log = stored_log(&*store.inner, |log| log.end.is_some()).await;
        assert_eq!(joined(&log), events(1..=20).into_bytes(), "{fault:?}");
        assert!(log.complete_after(None), "{fault:?}: no event missing");
        assert_eq!(
            a.metrics.value(REPLAY_STORE_EVENTS_TOTAL, &[]),
            20.0,
            "{fault:?}: each event appended once"
        );
    }
}

fn reason(fault: Fault) -> &'static str {
    match fault {
        Fault::Fail => REASON_ERROR,
        Fault::Hang => REASON_TIMEOUT,
        Fault::Panic => REASON_PANIC,
    }
}

/// `ACROSS_CHAOS_STREAMS` (default 40) answers of `ACROSS_CHAOS_EVENTS` (default 60) events
/// over three instances sharing the in-memory store, one killed mid-run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_across_three_instances_one_killed_gives_no_silent_gap_and_no_duplicate() {
    let env = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let streams = env("ACROSS_CHAOS_STREAMS", 40) as usize;
    let events = env("ACROSS_CHAOS_EVENTS", 60) as u32;
    let report = across::chaos(store(), streams, events, false, || {}).await;
    println!("replay across instances, in-memory store: {report:?}");
    report.assert_honest();
    assert!(report.cross_instance_replays > 0, "{report:?}");
}

/// The same chaos with durable replay: no client ever has an event the store lacks, so a
/// reconnect anywhere always finds its place; the one gap left is the tail a killed producer
/// never sent (`producer_lost`), never lost history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_durable_replay_loses_no_history_a_client_had() {
    let report = across::chaos(store(), 40, 60, true, || {}).await;
    println!("replay across instances, durable, in-memory store: {report:?}");
    report.assert_no_history_lost();
}

/// Time to the first replayed byte of a cross-instance reconnect replaying 300 events, on the
/// in-memory store; printed (`tests/redis.rs` prints it for Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_byte_of_a_300_event_replay_from_another_instance_is_timed() {
    let times = across::first_replayed_byte(store(), 300, 200).await;
    println!(
        "first replayed byte, 300 events from the in-memory store, {} reconnects: p50 {:?}, p99 {:?}, max {:?}",
        times.len(),
        across::quantile(&times, 0.5),
        across::quantile(&times, 0.99),
        times[times.len() - 1]
    );
}

fn durable() -> ReplayPolicy {
    ReplayPolicy::new().across_instances(true).durable(true)
}

#[tokio::test]
async fn with_durable_replay_a_store_that_hangs_ends_the_response_before_an_unconfirmed_frame() {
    let store = FaultyAppends::default();
    let a = Instance::start_built(store.clone(), durable(), |builder| {
        builder.store_timeout(Duration::from_millis(200))
    })
    .await;
    let (feed, mut client) = a.answer_read(1).await;
    *store.fault.lock().unwrap() = Some(Fault::Hang);
    feed.send(Bytes::from(event(2))).unwrap();
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end())
        .await
        .expect("the response ends at twice the store timeout");
    assert_eq!(
        client.received,
        event(1).as_bytes(),
        "the unconfirmed frame is not sent"
    );
    assert_eq!(a.metrics.value(REPLAY_DURABLE_CUT_TOTAL, &[]), 1.0);
}

/// The body reads on while its frames wait for the store: a burst of 100 frames goes out
/// after one or two appends, not one append (one flush) per frame.
#[tokio::test]
async fn with_durable_replay_a_burst_of_frames_goes_out_in_a_few_appends_not_one_per_frame() {
    let store = FaultyAppends::default();
    let a = Instance::start_built(store.clone(), durable(), |builder| {
        builder.flush_interval(Duration::from_millis(100))
    })
    .await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    for n in 1..=100 {
        feed.send(Bytes::from(event(n))).unwrap();
    }
    client.read_until_suffix(event(100).as_bytes()).await;
    assert_eq!(client.received, events(1..=100).as_bytes());
    let appends = store.appends.load(Ordering::SeqCst);
    assert!(
        appends <= 3,
        "100 frames took {appends} appends to reach the client"
    );
}

/// A reconnect to the instance that holds the stream's log gets, with durable replay, only
/// the events the store holds: the rest follows once the store has it.
#[tokio::test]
async fn with_durable_replay_a_reconnect_to_the_same_instance_gets_only_what_the_store_holds() {
    let store = FaultyAppends::default();
    let a = Instance::start_built(store.clone(), durable(), |builder| {
        builder
            .store_timeout(Duration::from_secs(1))
            .retry(RetryPolicy::exponential(
                Duration::from_millis(20),
                Duration::from_millis(50),
                1000,
            ))
    })
    .await;
    let (feed, client) = a.answer_read(1).await;
    // The client leaves; the stream is read on, detached.
    drop(client);
    *store.fault.lock().unwrap() = Some(Fault::Fail);
    feed.send(Bytes::from(event(2))).unwrap();
    // Event 2 is in the local log, not in the store.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut back = a.get(Some("1")).await;
    let early = tokio::time::timeout(Duration::from_millis(300), back.read_chunk()).await;
    assert!(
        early.is_err() || back.received.is_empty(),
        "event 2 went to a client before the store held it: {:?}",
        String::from_utf8_lossy(&back.received)
    );
    *store.fault.lock().unwrap() = None;
    back.read_until_suffix(event(2).as_bytes()).await;
    assert_eq!(back.received, event(2).as_bytes());
    drop(feed);
    back.read_to_end().await;
    assert_eq!(back.received, event(2).as_bytes());
    assert_eq!(a.app.calls.load(Ordering::SeqCst), 1);
}

/// Events the log drops before the store got them (here, the tracker's byte budget taking
/// the oldest history for another stream) can never be confirmed: the response waiting for
/// them ends at once, not at the store's deadline.
#[tokio::test]
async fn with_durable_replay_events_dropped_before_the_store_got_them_end_the_response_at_once() {
    let store = FaultyAppends::default();
    let policy = durable()
        .max_stream_bytes(std::num::NonZeroUsize::new(1536).unwrap())
        .max_total_bytes(std::num::NonZeroUsize::new(1536).unwrap());
    let a = Instance::start_built(store.clone(), policy, |builder| {
        // The deadline of a held frame: 10 s.
        builder.store_timeout(Duration::from_secs(5))
    })
    .await;
    let (feed, mut client) = a.answer_read(1).await;
    *store.fault.lock().unwrap() = Some(Fault::Fail);
    feed.send(Bytes::from(event(2))).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Another stream fills the budget: the answer's log loses its oldest events.
    let other = a
        .http
        .get(format!("http://{}/gen?n=60&every_ms=1", a.addr))
        .header("mcp-session-id", "s2")
        .send()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end())
        .await
        .expect("the response ends once its held events are dropped, before the deadline");
    println!(
        "held response ended {:?} after the budget filled",
        started.elapsed()
    );
    assert_eq!(client.received, event(1).as_bytes());
    assert!(a.metrics.value(REPLAY_DURABLE_CUT_TOTAL, &[]) >= 1.0);
    drop(other);
}

/// An event larger than the stream's log bound is not logged (the history restarts after
/// it): with durable replay no store can ever hold it, so it never reaches the client, and
/// the response ends before it.
#[tokio::test]
async fn with_durable_replay_an_event_the_log_cannot_keep_never_reaches_the_client() {
    let store = FaultyAppends::default();
    let policy = durable().max_stream_bytes(std::num::NonZeroUsize::new(1024).unwrap());
    let a = Instance::start_with(store.clone(), policy).await;
    let (feed, mut client) = a.answer_read(1).await;
    let large = format!("id: 2\ndata: {}\n\n", "x".repeat(2048));
    feed.send(Bytes::from(large)).unwrap();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end())
        .await
        .expect("the response ends");
    assert_eq!(client.received, event(1).as_bytes());
    assert_eq!(a.metrics.value(REPLAY_DURABLE_CUT_TOTAL, &[]), 1.0);
}

/// A look-up whose first reads fail (a Redis Cluster failing over, say) tries again within
/// the store timeout: the reconnect is replayed from the store, not sent to the application.
#[tokio::test]
async fn a_look_up_whose_first_reads_fail_tries_again_and_replays() {
    let store = FaultyAppends::default();
    let policy = ReplayPolicy::new().across_instances(true);
    let a = Instance::start_with(store.clone(), policy.clone()).await;
    let b = Instance::start_with(store.clone(), policy).await;
    let (feed, _client) = a.answer_read(5).await;
    stored_log(&store.inner, |log| log.next_offset == 5).await;
    store.failing_reads.store(3, Ordering::SeqCst);
    let mut back = b.get(Some("2")).await;
    back.read_until_suffix(event(5).as_bytes()).await;
    assert_eq!(back.received, events(3..=5).as_bytes());
    assert_eq!(
        b.app.calls.load(Ordering::SeqCst),
        0,
        "the application was called"
    );
    assert_eq!(store.failing_reads.load(Ordering::SeqCst), 0);
    drop(feed);
}

/// A drain's timeout holds for a durable response whose frames wait for a store that hangs:
/// it ends at the drain timeout, not at the durable wait (10 s here).
#[tokio::test]
async fn with_durable_replay_a_drain_ends_a_held_response_at_the_drain_timeout() {
    let store = FaultyAppends::default();
    let a = Instance::start_built(store.clone(), durable(), |builder| {
        builder
            .store_timeout(Duration::from_secs(5))
            .drain_timeout(Duration::from_millis(300))
    })
    .await;
    let (feed, mut client) = a.answer_read(1).await;
    *store.fault.lock().unwrap() = Some(Fault::Hang);
    feed.send(Bytes::from(event(2))).unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    a.tracker.drain(None);
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end())
        .await
        .expect("the response ends at the drain timeout");
    assert_eq!(client.received, event(1).as_bytes());
    // The drain ended the body at a boundary (its client resumes): counted once, so.
    let drained = |reason| {
        a.metrics
            .value(STREAMS_DRAINED_TOTAL, &[("reason", reason)])
    };
    assert_eq!((drained("boundary"), drained("deadline")), (1.0, 0.0));
}

/// The same, for a body whose frames were all ready at once (it never waited, so nothing
/// but the drain itself can wake it) and that ended while they wait for the store: it ends at
/// the drain timeout.
#[tokio::test]
async fn with_durable_replay_a_drain_wakes_and_ends_a_finished_held_response_at_the_drain_timeout()
{
    let store = FaultyAppends::default();
    let a = Instance::start_built(store.clone(), durable(), |builder| {
        builder
            .store_timeout(Duration::from_secs(5))
            .drain_timeout(Duration::from_millis(300))
    })
    .await;
    *store.fault.lock().unwrap() = Some(Fault::Hang);
    let response = a
        .http
        .get(format!("http://{}/burst?n=3", a.addr))
        .header("mcp-session-id", "s1")
        .send()
        .await
        .unwrap();
    let mut client = common::Client::new(response);
    tokio::time::sleep(Duration::from_millis(100)).await;
    a.tracker.drain(None);
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end())
        .await
        .expect("the response ends at the drain timeout");
    assert!(
        client.received.is_empty(),
        "nothing confirmed, nothing sent"
    );
}

/// A store holding a newer history of the stream (an instance whose clock is ahead wrote it)
/// refuses this instance's appends: counted, and with durable replay the response ends
/// before the events the store refused, at once.
#[tokio::test]
async fn a_history_the_store_refuses_is_counted_and_with_durable_replay_never_reaches_the_client() {
    for durable_on in [false, true] {
        let store = FaultyAppends::default();
        let ahead = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros() as u64
            + 3_600_000_000;
        store
            .inner
            .append_logs(&[LogAppend::new(answer_key(), ahead, "instance-ahead")])
            .await
            .unwrap();
        let policy = ReplayPolicy::new()
            .across_instances(true)
            .durable(durable_on);
        let a = Instance::start_with(store.clone(), policy).await;
        let feed = a.next_feed();
        let mut client = a.get(None).await;
        feed.send(Bytes::from(event(1))).unwrap();
        if durable_on {
            tokio::time::timeout(Duration::from_secs(3), client.read_to_end())
                .await
                .expect("the response ends once the store refuses");
            assert!(client.received.is_empty(), "durable: {:?}", client.received);
            assert_eq!(a.metrics.value(REPLAY_DURABLE_CUT_TOTAL, &[]), 1.0);
        } else {
            client.read_until_suffix(event(1).as_bytes()).await;
        }
        common::eventually("the refusal is counted", || {
            a.metrics.value(REPLAY_STORE_REFUSED_TOTAL, &[]) >= 1.0
        })
        .await;
        drop(feed);
    }
}
