//! Replay across instances, for any store that keeps replay logs: trackers sharing one store,
//! each behind its own loopback server. The worker appends detached streams' events to the
//! store's logs at each flush; a reconnect that lands on an instance that never saw the stream
//! is answered from the store. `tests/across_instances.rs` runs these on the in-memory store,
//! `tests/redis.rs` on Redis, standalone and Cluster.
#![allow(dead_code)]

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use tokio::sync::mpsc;
use tower_sse_tracker::store::{Store, StoredLog};
use tower_sse_tracker::{REPLAY_HEADER, ReplayPolicy, SseTracker, SseTrackerBuilder, StreamKey};

use crate::common::{Recorded, build_recorded, detached_sse};

pub const FLUSH: Duration = Duration::from_millis(20);

pub fn event(n: u32) -> String {
    format!("id: {n}\ndata: token {n}\n\n")
}

pub fn events(range: std::ops::RangeInclusive<u32>) -> String {
    range.map(event).collect()
}

/// The application: each request to `/answer` streams the frames of the next feed the test
/// made, marked `Detach`, and counts its calls.
#[derive(Clone, Default)]
pub struct App {
    feeds: Arc<Mutex<VecDeque<mpsc::UnboundedReceiver<Bytes>>>>,
    pub calls: Arc<AtomicUsize>,
}

async fn answer(State(app): State<App>) -> Response {
    app.calls.fetch_add(1, Ordering::SeqCst);
    let rx = app.feeds.lock().unwrap().pop_front();
    let Some(rx) = rx else {
        // No answer to give: a plain (untracked) refusal.
        return (axum::http::StatusCode::NOT_FOUND, "no answer").into_response();
    };
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    detached_sse(frames)
}

/// `GET /gen?n=N&every_ms=M`: an answer of its own, `N` events (`id: k`, data naming the
/// session and `k`) one each `M` ms, marked `Detach`.
async fn generate(
    headers: axum::http::HeaderMap,
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, u64>>,
) -> Response {
    let session = headers
        .get("mcp-session-id")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
        .to_owned();
    let n = q.get("n").copied().unwrap_or(10) as u32;
    let every = Duration::from_millis(q.get("every_ms").copied().unwrap_or(2));
    let frames = futures_util::stream::unfold(1u32, move |k| {
        let session = session.clone();
        async move {
            if k > n {
                return None;
            }
            tokio::time::sleep(every).await;
            let frame = Bytes::from(format!("id: {k}\ndata: {session} {k}\n\n"));
            Some((Ok::<_, Infallible>(frame), k + 1))
        }
    });
    detached_sse(frames)
}

/// `GET /burst?n=N`: an answer of its own, `N` events (`id: k`) all ready at once (its body
/// never waits), marked `Detach`.
async fn burst(
    axum::extract::Query(q): axum::extract::Query<std::collections::HashMap<String, u32>>,
) -> Response {
    let n = q.get("n").copied().unwrap_or(3);
    let frames =
        futures_util::stream::iter((1..=n).map(|k| Ok::<_, Infallible>(Bytes::from(event(k)))));
    detached_sse(frames)
}

/// One instance: a tracker on the shared store, and its server.
pub struct Instance {
    pub addr: std::net::SocketAddr,
    pub app: App,
    pub http: reqwest::Client,
    pub metrics: Recorded,
    pub tracker: SseTracker,
}

impl Instance {
    pub async fn start<S: Store + Clone>(store: S) -> Self {
        Self::start_with(store, ReplayPolicy::new().across_instances(true)).await
    }

    pub async fn start_with<S: Store + Clone>(store: S, policy: ReplayPolicy) -> Self {
        Self::start_built(store, policy, |builder| builder).await
    }

    /// An instance whose builder `tweak` sets more.
    pub async fn start_built<S: Store + Clone>(
        store: S,
        policy: ReplayPolicy,
        tweak: impl FnOnce(SseTrackerBuilder) -> SseTrackerBuilder,
    ) -> Self {
        let (tracker, metrics) = build_recorded(tweak(
            SseTracker::builder()
                .heartbeat_interval(None)
                .flush_interval(FLUSH)
                .store(store)
                .replay(policy),
        ));
        let app = App::default();
        let router = axum::Router::new()
            .route("/answer", axum::routing::get(answer))
            .route("/gen", axum::routing::get(generate))
            .route("/burst", axum::routing::get(burst))
            .with_state(app.clone())
            .layer(tracker.layer());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
        Self {
            addr,
            app,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
            metrics,
            tracker,
        }
    }

    /// A new answer, its client, and events 1 to `n` sent and read.
    pub async fn answer_read(
        &self,
        n: u32,
    ) -> (mpsc::UnboundedSender<Bytes>, crate::common::Client) {
        let feed = self.next_feed();
        let mut client = self.get(None).await;
        feed.send(Bytes::from(events(1..=n))).unwrap();
        client.read_until_suffix(events(1..=n).as_bytes()).await;
        (feed, client)
    }

    /// The sender of the next response's frames.
    pub fn next_feed(&self) -> mpsc::UnboundedSender<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.app.feeds.lock().unwrap().push_back(rx);
        tx
    }

    pub async fn get(&self, last_event_id: Option<&str>) -> crate::common::Client {
        let mut req = self
            .http
            .get(format!("http://{}/answer", self.addr))
            .header("mcp-session-id", "s1");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        crate::common::Client::new(req.send().await.unwrap())
    }
}

pub fn answer_key() -> StreamKey {
    crate::common::key("s1", "GET /answer")
}

/// The store's log of the answer once `done` holds of it (within 5 s).
pub async fn stored_log<S: Store>(store: &S, done: impl Fn(&StoredLog) -> bool) -> StoredLog {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let log = store.read_log(&answer_key(), None, 10_000).await.unwrap();
        match log {
            Some(log) if done(&log) => return log,
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "the store's log never got there: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub fn joined(log: &StoredLog) -> Vec<u8> {
    log.events.iter().flat_map(|e| e.bytes.to_vec()).collect()
}

pub async fn a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end<
    S: Store + Clone,
>(
    store: S,
) {
    let a = Instance::start(store.clone()).await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    // Events split across frames anywhere, a comment between two of them: the store gets
    // each event's bytes as the client got them, the comment left out.
    let all = events(1..=40);
    let first = events(1..=20);
    let (head, tail) = all[first.len()..].split_at(7);
    feed.send(Bytes::from(first)).unwrap();
    feed.send(Bytes::from(": a comment\n\n")).unwrap();
    feed.send(Bytes::from(head.to_owned())).unwrap();
    feed.send(Bytes::from(tail.to_owned())).unwrap();
    client.read_until_suffix(event(40).as_bytes()).await;
    // The flush goes by: the log has the events, not the end yet.
    let log = stored_log(&store, |log| log.next_offset == 40).await;
    assert_eq!(log.end, None, "the body has not ended");
    drop(feed);
    client.read_to_end().await;
    let log = stored_log(&store, |log| log.end.is_some()).await;
    assert_eq!(String::from_utf8(joined(&log)).unwrap(), all);
    assert_eq!(
        log.events.iter().map(|e| e.offset).collect::<Vec<_>>(),
        (0..40).collect::<Vec<_>>()
    );
    assert_eq!(log.events[39].id.as_ref().unwrap().as_str(), "40");
    assert!(log.complete_after(None));
    assert!(
        store.lease_alive(&log.producer).await.unwrap(),
        "the producing instance keeps its lease"
    );
    assert!(
        a.tracker
            .shutdown(Duration::from_secs(1))
            .await
            .is_complete()
    );
}

pub fn header(client: &crate::common::Client) -> Option<&str> {
    client
        .headers
        .get(REPLAY_HEADER)
        .map(|v| v.to_str().unwrap())
}

pub async fn a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end<
    S: Store + Clone,
>(
    store: S,
) {
    let a = Instance::start(store.clone()).await;
    let b = Instance::start(store.clone()).await;
    let (feed, client) = a.answer_read(3).await;
    // The client's connection breaks; the answer goes on on A.
    drop(client);
    feed.send(Bytes::from(events(4..=6))).unwrap();
    stored_log(&store, |log| log.next_offset == 6).await;
    // The load balancer sends the reconnect to B, which never saw the stream.
    let mut client = b.get(Some("3")).await;
    assert_eq!(client.status, 200);
    assert_eq!(header(&client), Some("complete; events=3; tail"));
    client.read_until_suffix(events(4..=6).as_bytes()).await;
    // The live tail, as A produces it, through the store.
    feed.send(Bytes::from(events(7..=9))).unwrap();
    client.read_until_suffix(event(9).as_bytes()).await;
    drop(feed);
    client.read_to_end().await;
    assert_eq!(
        client.received,
        events(4..=9).as_bytes(),
        "nothing missing, nothing twice"
    );
    assert_eq!(
        b.app.calls.load(Ordering::SeqCst),
        0,
        "B's application is not called"
    );
    // Once it has ended: a client that missed the end gets it from B, and a clean end; one
    // that missed nothing gets 204 No Content.
    let mut client = b.get(Some("7")).await;
    assert_eq!(header(&client), Some("complete; events=2; tail"));
    assert_eq!(client.read_to_end().await, events(8..=9).as_bytes());
    let client = b.get(Some("9")).await;
    assert_eq!(client.status, 204);
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 0);
}

pub async fn a_reconnect_whose_id_the_store_does_not_hold_goes_to_the_application<
    S: Store + Clone,
>(
    store: S,
) {
    let a = Instance::start(store.clone()).await;
    let b = Instance::start(store.clone()).await;
    let (feed, _client) = a.answer_read(3).await;
    stored_log(&store, |log| log.next_offset == 3).await;
    // An id the stream never sent: B cannot replay, and its application answers.
    let b_feed = b.next_feed();
    let mut other = b.get(Some("77")).await;
    assert_eq!(header(&other), Some("gap; reason=no_history"));
    b_feed.send(Bytes::from(event(100))).unwrap();
    other.read_until_suffix(event(100).as_bytes()).await;
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 1);
    drop(feed);
}

/// An instance on a thread and runtime of its own: [`kill`](Self::kill) drops the runtime
/// with everything on it (its server, its bodies, its worker), with no shutdown and no end
/// written.
pub struct Doomed {
    kill: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    instance: Instance,
}

impl Doomed {
    async fn start<S: Store + Clone>(store: S, policy: ReplayPolicy) -> Self {
        let (started, instance) = tokio::sync::oneshot::channel();
        let (kill, killed) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                // A short store timeout: its lease runs 5 s (see `lease_ttl`).
                let quick = |b: SseTrackerBuilder| b.store_timeout(Duration::from_secs(1));
                let _ = started.send(Instance::start_built(store, policy, quick).await);
                let _ = killed.await;
            });
            // The runtime goes here, its tasks dropped where they stood.
        });
        Self {
            kill: Some(kill),
            thread: Some(thread),
            instance: instance.await.unwrap(),
        }
    }

    fn kill(&mut self) {
        let _ = self.kill.take().unwrap().send(());
        self.thread.take().unwrap().join().unwrap();
    }
}

pub async fn when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal<
    S: Store + Clone,
>(
    store: S,
) {
    let policy = ReplayPolicy::new()
        .across_instances(true)
        .gap_event("replay-gap");
    // The reqwest client of an instance lives on the test's runtime.
    let mut a = Doomed::start(store.clone(), policy.clone()).await;
    let b = Instance::start_with(store.clone(), policy).await;
    // A's client made on the test's runtime, which reads its responses.
    a.instance.http = b.http.clone();
    let (feed, client) = a.instance.answer_read(5).await;
    drop(client);
    stored_log(&store, |log| log.next_offset == 5).await;
    let mut client = b.get(Some("3")).await;
    assert_eq!(header(&client), Some("complete; events=2; tail"));
    client.read_until_suffix(events(4..=5).as_bytes()).await;
    // A dies mid-answer: its lease runs out (5 s), and B's reader says so.
    tokio::task::spawn_blocking(move || a.kill()).await.unwrap();
    drop(feed);
    let gap = "event: replay-gap\ndata: producer_lost\n\n";
    tokio::time::timeout(Duration::from_secs(15), client.read_to_end())
        .await
        .expect("the reader ends once the lease has run out");
    assert_eq!(
        String::from_utf8(client.received.clone()).unwrap(),
        events(4..=5) + gap,
        "what the store held, then the gap signal: no silent end"
    );
    // A reconnect now: what the store holds after the client's event, with the gap signal.
    let mut client = b.get(Some("4")).await;
    assert_eq!(header(&client), Some("gap; reason=producer_lost; events=1"));
    assert_eq!(
        String::from_utf8(client.read_to_end().await.to_vec()).unwrap(),
        event(5) + gap
    );
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 0);
    // One that has all the store held: not a `204` (an EventSource would take the stream for
    // complete): the application answers, and the header says why nothing was replayed.
    let b_feed = b.next_feed();
    let mut client = b.get(Some("5")).await;
    assert_eq!(header(&client), Some("gap; reason=producer_lost; events=0"));
    b_feed.send(Bytes::from(event(1))).unwrap();
    client.read_until_suffix(event(1).as_bytes()).await;
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 1);
}

/// The producer appends once per flush, after its client got the events: a client that
/// reconnects elsewhere at once names an event the store does not hold yet, and the look-up
/// waits for it (up to three of the reader's flush intervals).
pub async fn a_reconnect_arriving_before_the_producers_flush_waits_for_its_events<
    S: Store + Clone,
>(
    store: S,
) {
    let policy = ReplayPolicy::new().across_instances(true);
    let slow = |builder: SseTrackerBuilder| builder.flush_interval(Duration::from_millis(250));
    let a = Instance::start_built(store.clone(), policy.clone(), slow).await;
    let b = Instance::start_built(store.clone(), policy, |builder| {
        builder.flush_interval(Duration::from_millis(150))
    })
    .await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    // A first flush, so that the log exists; then events the store lacks for a while.
    feed.send(Bytes::from(event(1))).unwrap();
    client.read_until_suffix(event(1).as_bytes()).await;
    stored_log(&store, |log| log.next_offset == 1).await;
    feed.send(Bytes::from(events(2..=3))).unwrap();
    client.read_until_suffix(events(1..=3).as_bytes()).await;
    drop(client);
    let mut client = b.get(Some("3")).await;
    assert_eq!(client.status, 200, "B's application is not asked");
    assert_eq!(header(&client), Some("complete; events=0; tail"));
    feed.send(Bytes::from(event(4))).unwrap();
    drop(feed);
    assert_eq!(client.read_to_end().await, event(4).as_bytes());
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 0);
}

/// The producer stops a stream before its end (a drain for a deploy, here; a bound or the
/// body's error alike): a reader following it elsewhere gets the gap signal at once rather
/// than waiting on a log that will not grow, and so does a reconnect.
pub async fn a_stream_its_producer_stops_gives_readers_elsewhere_the_gap_signal<
    S: Store + Clone,
>(
    store: S,
) {
    let policy = ReplayPolicy::new()
        .across_instances(true)
        .gap_event("replay-gap");
    let a = Instance::start_with(store.clone(), policy.clone()).await;
    let b = Instance::start_with(store.clone(), policy).await;
    let (feed, client) = a.answer_read(3).await;
    drop(client);
    stored_log(&store, |log| log.next_offset == 3).await;
    let mut client = b.get(Some("3")).await;
    assert_eq!(header(&client), Some("complete; events=0; tail"));
    // A drains for a deploy: the answer stops at an event boundary, unfinished.
    a.tracker.drain(None);
    let gap = "event: replay-gap\ndata: producer_lost\n\n";
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end())
        .await
        .expect("the reader is told within a few flushes, not when a lease runs out");
    assert_eq!(String::from_utf8(client.received.clone()).unwrap(), gap);
    let b_feed = b.next_feed();
    let mut client = b.get(Some("3")).await;
    assert_eq!(client.status, 200);
    assert_eq!(header(&client), Some("gap; reason=producer_lost; events=0"));
    b_feed.send(Bytes::from(event(1))).unwrap();
    client.read_until_suffix(event(1).as_bytes()).await;
    drop(feed);
}

/// An instance that served an earlier answer of the stream holds a log of it, which lacks the
/// client's event of the current answer: the store's log, which holds it, answers.
pub async fn a_stale_local_log_does_not_hide_the_stores<S: Store + Clone>(store: S) {
    let a = Instance::start(store.clone()).await;
    let b = Instance::start(store.clone()).await;
    let tagged = |tag: &str, n: u32| format!("id: {tag}-{n}\ndata: {tag} {n}\n\n");
    // A first answer on B, to its end.
    let feed = b.next_feed();
    let mut client = b.get(None).await;
    feed.send(Bytes::from(tagged("a", 1) + &tagged("a", 2)))
        .unwrap();
    drop(feed);
    client.read_to_end().await;
    // The next answer on A; the client moves to B mid-answer.
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    feed.send(Bytes::from(tagged("b", 1) + &tagged("b", 2)))
        .unwrap();
    client.read_until_suffix(tagged("b", 2).as_bytes()).await;
    drop(client);
    // The first answer's log has two events too: the store's log is the second answer's.
    let second = |log: &StoredLog| {
        log.events
            .last()
            .and_then(|e| e.id.as_ref())
            .map(|id| id.as_str())
            == Some("b-2")
    };
    stored_log(&store, second).await;
    let mut client = b.get(Some("b-1")).await;
    assert_eq!(header(&client), Some("complete; events=1; tail"));
    feed.send(Bytes::from(tagged("b", 3))).unwrap();
    drop(feed);
    assert_eq!(
        String::from_utf8(client.read_to_end().await.to_vec()).unwrap(),
        tagged("b", 2) + &tagged("b", 3)
    );
    assert_eq!(
        b.app.calls.load(Ordering::SeqCst),
        1,
        "only for the first answer"
    );
}

/// What a chaos run saw.
#[derive(Debug, Default)]
pub struct ChaosReport {
    pub streams: usize,
    pub connections: usize,
    /// Reconnects answered by an instance other than the stream's producer, from the store.
    pub cross_instance_replays: usize,
    pub complete: usize,
    pub gaps: std::collections::BTreeMap<String, usize>,
    pub silent_gaps: usize,
    pub duplicates: usize,
    pub corrupted: usize,
}

impl ChaosReport {
    /// No silent gap, no duplicate, no corrupted event, and every client ended with its whole
    /// answer or was told of a gap.
    pub fn assert_honest(&self) {
        assert_eq!(
            (self.silent_gaps, self.duplicates, self.corrupted),
            (0, 0, 0),
            "{self:?}"
        );
        assert_eq!(
            self.complete + self.gaps.values().sum::<usize>(),
            self.streams,
            "every client ends whole or told: {self:?}"
        );
    }

    /// [`assert_honest`](Self::assert_honest), and every gap is the tail a killed producer
    /// never sent: no client lost history it had (durable replay).
    pub fn assert_no_history_lost(&self) {
        self.assert_honest();
        assert!(
            self.gaps.keys().all(|reason| reason == "producer_lost"),
            "{self:?}"
        );
    }
}

/// `streams` answers of `events` events each, produced by the instance their first request
/// lands on, read by clients that drop after a few events and reconnect to a random live
/// instance with their last id; one instance is killed (its runtime dropped) once a third of
/// the streams have started, and `disrupt` runs (on a blocking thread) once half have (a
/// Redis primary killed, say). Every client ends with its whole answer, each event once, or
/// at a response that carried the gap signal. `durable`: with durable replay.
pub async fn chaos<S: Store + Clone>(
    store: S,
    streams: usize,
    events: u32,
    durable: bool,
    disrupt: impl FnOnce() + Send + 'static,
) -> ChaosReport {
    let mut disrupt = Some(disrupt);
    use crate::common::chaos::Rng;
    let policy = ReplayPolicy::new()
        .across_instances(true)
        .durable(durable)
        .gap_event("replay-gap")
        .max_detached(4 * streams);
    let quick = |builder: SseTrackerBuilder| builder.store_timeout(Duration::from_secs(1));
    let mut doomed = Doomed::start(store.clone(), policy.clone()).await;
    let others = [
        Instance::start_built(store.clone(), policy.clone(), quick).await,
        Instance::start_built(store.clone(), policy, quick).await,
    ];
    let http = others[0].http.clone();
    let addrs = [doomed.instance.addr, others[0].addr, others[1].addr];
    let alive = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let report = Arc::new(Mutex::new(ChaosReport {
        streams,
        ..ChaosReport::default()
    }));
    let started = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for i in 0..streams {
        let (http, up, report, started) =
            (http.clone(), alive.clone(), report.clone(), started.clone());
        clients.push(tokio::spawn(async move {
            let alive = up;
            let mut rng = Rng(i as u64 * 7919 + 1);
            let session = format!("chaos-{i}");
            let mut last: u32 = 0;
            let mut producer: Option<usize> = None;
            let mut first = true;
            loop {
                let pick = loop {
                    let pick = rng.below(addrs.len() as u64) as usize;
                    if pick != 0 || alive.load(Ordering::SeqCst) {
                        break pick;
                    }
                };
                let mut request = http
                    .get(format!("http://{}/gen?n={events}&every_ms=3", addrs[pick]))
                    .header("mcp-session-id", &session);
                if last > 0 {
                    request = request.header("last-event-id", last.to_string());
                }
                let Ok(response) = request.send().await else {
                    continue;
                };
                report.lock().unwrap().connections += 1;
                if first {
                    first = false;
                    producer = Some(pick);
                    started.fetch_add(1, Ordering::SeqCst);
                }
                let replay = response
                    .headers()
                    .get(REPLAY_HEADER)
                    .map(|v| v.to_str().unwrap().to_owned());
                let status = response.status().as_u16();
                if let Some(replay) = &replay
                    && replay.starts_with("complete")
                    && Some(pick) != producer
                {
                    report.lock().unwrap().cross_instance_replays += 1;
                }
                let gap = replay.as_deref().filter(|r| r.starts_with("gap")).map(|r| {
                    r.split("reason=")
                        .nth(1)
                        .unwrap()
                        .split(';')
                        .next()
                        .unwrap()
                        .to_owned()
                });
                if status == 204 {
                    let mut r = report.lock().unwrap();
                    match gap {
                        Some(reason) => *r.gaps.entry(reason).or_default() += 1,
                        None if last == events => r.complete += 1,
                        None => r.silent_gaps += 1,
                    }
                    return;
                }
                // Reads a few events, or to the end; a gap response to its end.
                let keep = if gap.is_some() {
                    u32::MAX
                } else {
                    1 + rng.below(8) as u32
                };
                let mut body = response.bytes_stream();
                let mut text = Vec::new();
                let mut read = 0;
                let mut gap_event = false;
                let mut ended = false;
                'read: while read < keep {
                    match futures_util::StreamExt::next(&mut body).await {
                        Some(Ok(chunk)) => text.extend_from_slice(&chunk),
                        Some(Err(_)) => break,
                        None => {
                            ended = true;
                            break;
                        }
                    }
                    while let Some(end) = text.windows(2).position(|w| w == b"\n\n") {
                        let event: Vec<u8> = text.drain(..end + 2).collect();
                        let event = String::from_utf8(event).unwrap();
                        if event.starts_with("event: replay-gap") {
                            gap_event = true;
                            continue;
                        }
                        let Some(k) = event
                            .strip_prefix("id: ")
                            .and_then(|rest| rest.split('\n').next())
                            .and_then(|k| k.parse::<u32>().ok())
                        else {
                            continue;
                        };
                        let mut r = report.lock().unwrap();
                        if event != format!("id: {k}\ndata: {session} {k}\n\n") {
                            r.corrupted += 1;
                        }
                        if gap.is_some() && k == 1 && last > 0 {
                            // The application restarted the answer after the gap.
                            break 'read;
                        }
                        if k <= last {
                            r.duplicates += 1;
                        } else if k > last + 1 {
                            r.silent_gaps += 1;
                        }
                        last = last.max(k);
                        read += 1;
                    }
                }
                if let Some(reason) = gap.or(gap_event.then(|| "producer_lost".to_owned())) {
                    *report.lock().unwrap().gaps.entry(reason).or_default() += 1;
                    return;
                }
                if ended && last == events {
                    report.lock().unwrap().complete += 1;
                    return;
                }
            }
        }));
        tokio::time::sleep(Duration::from_millis(5)).await;
        if i == streams / 3 {
            // One instance dies mid-run: its runtime dropped, no shutdown.
            alive.store(false, Ordering::SeqCst);
            tokio::task::spawn_blocking(move || doomed.kill())
                .await
                .unwrap();
            doomed = Doomed::start(store.clone(), ReplayPolicy::new()).await;
        }
        if i == streams / 2
            && let Some(disrupt) = disrupt.take()
        {
            // While the clients go on.
            tokio::task::spawn_blocking(disrupt);
        }
    }
    drop(doomed);
    for client in clients {
        tokio::time::timeout(Duration::from_secs(60), client)
            .await
            .expect("every client finishes")
            .unwrap();
    }
    std::mem::take(&mut *report.lock().unwrap())
}

/// Time to the first replayed byte of a reconnect on an instance that never saw the stream,
/// replaying `events` events from the store: one answer of `events + 1` events produced on A
/// to its end, then `reconnects` reconnects to B naming its first event. Returns the times,
/// sorted, each checked to carry every event.
pub async fn first_replayed_byte<S: Store + Clone>(
    store: S,
    events: u32,
    reconnects: usize,
) -> Vec<Duration> {
    let a = Instance::start(store.clone()).await;
    let b = Instance::start(store.clone()).await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    feed.send(Bytes::from(events_of(1..=events + 1))).unwrap();
    drop(feed);
    client.read_to_end().await;
    stored_log(&store, |log| log.end.is_some()).await;
    let expected = events_of(2..=events + 1);
    let mut times = Vec::with_capacity(reconnects);
    for _ in 0..reconnects {
        let started = std::time::Instant::now();
        let response = b
            .http
            .get(format!("http://{}/answer", b.addr))
            .header("mcp-session-id", "s1")
            .header("last-event-id", "1")
            .send()
            .await
            .unwrap();
        let mut client = crate::common::Client::new(response);
        assert!(client.read_chunk().await, "a replay");
        times.push(started.elapsed());
        client.read_to_end().await;
        assert_eq!(client.received, expected.as_bytes());
    }
    assert_eq!(b.app.calls.load(Ordering::SeqCst), 0);
    times.sort();
    times
}

fn events_of(range: std::ops::RangeInclusive<u32>) -> String {
    events(range)
}

/// The `q` quantile of sorted `times`.
pub fn quantile(times: &[Duration], q: f64) -> Duration {
    times[((times.len() - 1) as f64 * q).round() as usize]
}

/// With durable replay, a frame reaches its client only once the store holds its events: at
/// every point, the store holds every event the client has, so no instance's death can lose
/// one a client got; and the response's clean end comes once the store holds the end mark.
pub async fn with_durable_replay_the_store_holds_every_event_a_client_has_and_its_end<
    S: Store + Clone,
>(
    store: S,
) {
    let policy = ReplayPolicy::new().across_instances(true).durable(true);
    let a = Instance::start_with(store.clone(), policy).await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    for n in 1..=20 {
        feed.send(Bytes::from(event(n))).unwrap();
        client.read_until_suffix(event(n).as_bytes()).await;
        let log = store.read_log(&answer_key(), None, 100).await.unwrap();
        assert!(
            log.is_some_and(|log| log.next_offset >= u64::from(n)),
            "event {n} reached the client before the store"
        );
    }
    drop(feed);
    client.read_to_end().await;
    assert_eq!(client.received, events(1..=20).as_bytes());
    let log = store.read_log(&answer_key(), None, 100).await.unwrap();
    assert!(
        log.is_some_and(|log| log.end.is_some()),
        "the response ended before the store held its end mark"
    );
}

/// The time from the application's frame to its client, with and without durable replay
/// (`flush` the flush interval): each sorted, over `n` events sent one at a time, each at a
/// random point of the flush interval.
pub async fn frame_latency<S: Store + Clone>(
    store: S,
    durable: bool,
    flush: Duration,
    n: u32,
) -> Vec<Duration> {
    let policy = ReplayPolicy::new().across_instances(true).durable(durable);
    let a = Instance::start_built(store, policy, |b| b.flush_interval(flush)).await;
    let feed = a.next_feed();
    let mut client = a.get(None).await;
    let mut times = Vec::with_capacity(n as usize);
    let mut rng = crate::common::chaos::Rng(u64::from(n));
    for k in 1..=n {
        let pause = rng.below(flush.as_micros() as u64);
        tokio::time::sleep(Duration::from_micros(pause)).await;
        let sent = std::time::Instant::now();
        feed.send(Bytes::from(event(k))).unwrap();
        client.read_until_suffix(event(k).as_bytes()).await;
        times.push(sent.elapsed());
    }
    times.sort();
    times
}
