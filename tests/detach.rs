//! Detached streams over real HTTP on loopback: a response marked `Detach` goes on when its
//! client leaves, into its stream's log; a reconnect gets what it missed, then the live tail,
//! once each, from the layer (the application is not called again); and the bounds hold.

mod common;

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::header::CONTENT_TYPE;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use common::{Recorded, build_recorded, names, nz};
use tokio::sync::mpsc;
use tower_sse_tracker::{Detach, REPLAY_HEADER, Replay, ReplayPolicy, SseTracker};

fn event(n: u32) -> String {
    format!("id: {n}\ndata: token {n}\n\n")
}

fn events(range: std::ops::RangeInclusive<u32>) -> String {
    range.map(event).collect()
}

/// The application: each request to `/answer` streams the frames of the next feed the test
/// made, marked `Detach`; it counts its calls and keeps the replay it was told of.
#[derive(Clone, Default)]
struct App {
    feeds: Arc<Mutex<VecDeque<mpsc::UnboundedReceiver<Bytes>>>>,
    calls: Arc<AtomicUsize>,
    replays: Arc<Mutex<Vec<Option<Replay>>>>,
}

async fn answer(State(app): State<App>, replay: Option<axum::Extension<Replay>>) -> Response {
    app.calls.fetch_add(1, Ordering::SeqCst);
    app.replays.lock().unwrap().push(replay.map(|r| r.0));
    let rx = app
        .feeds
        .lock()
        .unwrap()
        .pop_front()
        .expect("a feed for each call");
    let frames = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
    });
    let mut response = (
        [(CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(frames),
    )
        .into_response();
    response.extensions_mut().insert(Detach);
    response
}

struct Server {
    addr: std::net::SocketAddr,
    app: App,
    http: reqwest::Client,
    metrics: Recorded,
    _tracker: SseTracker,
}

impl Server {
    async fn start(policy: ReplayPolicy) -> Self {
        let (tracker, metrics) = build_recorded(
            SseTracker::builder()
                .heartbeat_interval(None)
                .replay(policy),
        );
        let app = App::default();
        let router = axum::Router::new()
            .route("/answer", axum::routing::get(answer))
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
            _tracker: tracker,
        }
    }

    /// The sender of the next response's frames.
    fn next_feed(&self) -> mpsc::UnboundedSender<Bytes> {
        let (tx, rx) = mpsc::unbounded_channel();
        self.app.feeds.lock().unwrap().push_back(rx);
        tx
    }

    async fn get(&self, last_event_id: Option<&str>) -> common::Client {
        let mut req = self
            .http
            .get(format!("http://{}/answer", self.addr))
            .header("mcp-session-id", "s1");
        if let Some(id) = last_event_id {
            req = req.header("last-event-id", id);
        }
        common::Client::new(req.send().await.unwrap())
    }

    fn detached(&self, outcome: &str) -> f64 {
        self.metrics
            .value(names::REPLAY_DETACHED_TOTAL, &[("outcome", outcome)])
    }

    /// After its client left: sends events from `n` on, one each 5 ms, until the layer has
    /// seen the client go (the server notices when it writes to the closed connection) and
    /// answered `outcome` (or the feed is closed); returns the next event's number.
    async fn send_until(
        &self,
        feed: &mpsc::UnboundedSender<Bytes>,
        mut n: u32,
        outcome: &str,
    ) -> u32 {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.detached(outcome) == 0.0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the client's departure went unseen"
            );
            if feed.send(Bytes::from(event(n))).is_ok() {
                n += 1;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        n
    }
}

fn header(client: &common::Client) -> Option<&str> {
    client
        .headers
        .get(REPLAY_HEADER)
        .map(|v| v.to_str().unwrap())
}

#[tokio::test]
async fn a_detached_answer_goes_on_without_its_client_and_a_reconnect_gets_the_rest_then_the_live_tail_once_each()
 {
    let server = Server::start(ReplayPolicy::new()).await;
    let feed = server.next_feed();
    let mut client = server.get(None).await;
    feed.send(Bytes::from(events(1..=3))).unwrap();
    client.read_until_suffix(events(1..=3).as_bytes()).await;
    // The client leaves mid-answer (a phone changing networks).
    drop(client);
    let mut next = server.send_until(&feed, 4, "started").await;
    // The answer goes on while nobody reads it.
    for _ in 0..3 {
        feed.send(Bytes::from(event(next))).unwrap();
        next += 1;
    }
    let produced = next - 1;
    // The client comes back with the last id it saw: the layer answers, with what it missed.
    let mut client = server.get(Some("3")).await;
    assert_eq!(client.status, 200);
    assert_eq!(
        header(&client),
        Some(format!("complete; events={}; tail", produced - 3).as_str())
    );
    client
        .read_until_suffix(events(4..=produced).as_bytes())
        .await;
    // Then the live tail, as the application produces it, and the end with the answer's.
    feed.send(Bytes::from(event(produced + 1))).unwrap();
    client
        .read_until_suffix(event(produced + 1).as_bytes())
        .await;
    drop(feed);
    client.read_to_end().await;
    assert_eq!(
        client.received,
        events(4..=produced + 1).as_bytes(),
        "nothing missing, nothing twice"
    );
    assert_eq!(
        server.app.calls.load(Ordering::SeqCst),
        1,
        "the application produced the answer once"
    );
    let last = produced + 1;
    // Once it has ended: a client that missed the end gets it, and a clean end.
    let mut client = server.get(Some(&(last - 2).to_string())).await;
    assert_eq!(
        client.read_to_end().await,
        events(last - 1..=last).as_bytes()
    );
    // One that missed nothing gets 204 No Content: an EventSource stops reconnecting.
    let client = server.get(Some(&last.to_string())).await;
    assert_eq!(client.status, 204);
    assert_eq!(header(&client), Some("complete; events=0; tail"));
    assert_eq!(server.app.calls.load(Ordering::SeqCst), 1);
    common::eventually("the detached stream to be counted as finished", || {
        server.detached("finished") == 1.0
    })
    .await;
    assert_eq!(
        server.metrics.value(names::REPLAY_DETACHED_STREAMS, &[]),
        0.0
    );
}

#[tokio::test]
async fn a_reconnect_while_the_detached_stream_still_runs_follows_it_live_until_its_end() {
    let server = Server::start(ReplayPolicy::new()).await;
    let feed = server.next_feed();
    let mut client = server.get(None).await;
    feed.send(Bytes::from(event(1))).unwrap();
    client.read_until_suffix(event(1).as_bytes()).await;
    drop(client);
    let next = server.send_until(&feed, 2, "started").await;
    let mut client = server.get(Some("1")).await;
    client
        .read_until_suffix(events(2..=next - 1).as_bytes())
        .await;
    // Two readers follow it at once: a second reconnect too.
    let mut second = server.get(Some("1")).await;
    for n in next..next + 20 {
        feed.send(Bytes::from(event(n))).unwrap();
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    drop(feed);
    let all = events(2..=next + 19);
    assert_eq!(client.read_to_end().await, all.as_bytes());
    assert_eq!(second.read_to_end().await, all.as_bytes());
    assert_eq!(server.app.calls.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn beyond_max_detached_a_departed_clients_body_is_dropped_and_counted_and_its_reconnect_goes_to_the_application()
 {
    let server = Server::start(ReplayPolicy::new().max_detached(0)).await;
    let feed = server.next_feed();
    let mut client = server.get(None).await;
    feed.send(Bytes::from(events(1..=2))).unwrap();
    client.read_until_suffix(events(1..=2).as_bytes()).await;
    drop(client);
    let next = server.send_until(&feed, 3, "refused").await;
    // The body was dropped, as without `Detach`: the application's feed is closed.
    common::eventually("the body to be dropped", || feed.is_closed()).await;
    assert_eq!(server.detached("started"), 0.0);
    // The reconnect goes to the application, told what the layer replays.
    let _again = server.next_feed();
    let client = server.get(Some("1")).await;
    assert_eq!(server.app.calls.load(Ordering::SeqCst), 2);
    assert!(
        header(&client).is_some_and(|h| h.starts_with("complete; events=") && !h.ends_with("tail")),
        "{:?}",
        header(&client)
    );
    let replays = server.app.replays.lock().unwrap().clone();
    assert!(
        matches!(replays[1], Some(Replay::Complete { events, .. }) if events as u32 <= next - 2),
        "{replays:?}"
    );
}

#[tokio::test]
async fn a_detached_stream_ends_at_its_byte_bound_and_keeps_what_it_logged() {
    let policy = ReplayPolicy::new().detached_max_bytes(nz(200));
    let server = Server::start(policy).await;
    let feed = server.next_feed();
    let mut client = server.get(None).await;
    feed.send(Bytes::from(event(1))).unwrap();
    client.read_until_suffix(event(1).as_bytes()).await;
    drop(client);
    server.send_until(&feed, 2, "bound").await;
    common::eventually("the body to be dropped at its bound", || feed.is_closed()).await;
    assert_eq!(server.detached("started"), 1.0);
    assert_eq!(
        server.metrics.value(names::REPLAY_DETACHED_STREAMS, &[]),
        0.0
    );
    // What it logged is replayed by the application's next response (the stream did not
    // finish: the application decides what follows).
    let _again = server.next_feed();
    let client = server.get(Some("1")).await;
    assert_eq!(server.app.calls.load(Ordering::SeqCst), 2);
    assert!(!header(&client).unwrap().ends_with("tail"));
}
