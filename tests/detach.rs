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
    common::detached_sse(frames)
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

/// A client that stops reading without closing its connection (a phone that left its
/// network: the server learns nothing until TCP gives up, minutes later) holds the stream's
/// body on that connection once the connection's buffers are full: hyper polls a body only
/// while its connection takes bytes. Its reconnect takes the body off the old connection: it
/// gets every event to the end, at once, and the old response ends.
#[tokio::test]
async fn a_reconnect_takes_the_stream_off_an_old_connection_that_stopped_reading() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const EVENTS: u32 = 12_000;
    let big = |n: u32| format!("id: {n}\ndata: {}\n\n", "x".repeat(1000));
    let policy = ReplayPolicy::new()
        .max_events(nz(1 << 20))
        .max_stream_bytes(nz(64 << 20))
        .max_total_bytes(nz(64 << 20))
        .detached_max_bytes(nz(64 << 20));
    let server = Server::start(policy).await;
    let feed = server.next_feed();
    // The old connection: a small receive buffer, read up to the first event, then never.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut old = socket.connect(server.addr).await.unwrap();
    old.write_all(b"GET /answer HTTP/1.1\r\nhost: test\r\nmcp-session-id: s1\r\n\r\n")
        .await
        .unwrap();
    feed.send(Bytes::from(big(1))).unwrap();
    let mut seen = Vec::new();
    let mut buf = vec![0; 8192];
    while !seen.windows(3).any(|w| w == b"\n\n\r") {
        let n = old.read(&mut buf).await.unwrap();
        assert!(n > 0, "the old response ended early");
        seen.extend_from_slice(&buf[..n]);
    }
    // The application sends 12 MB at once, more than the old connection's buffers hold.
    for n in 2..=EVENTS {
        feed.send(Bytes::from(big(n))).unwrap();
    }
    drop(feed);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut client = server.get(Some("1")).await;
    let got = tokio::time::timeout(Duration::from_secs(30), client.read_to_end())
        .await
        .expect("the reconnect waited on the old connection")
        .to_vec();
    let want: String = (2..=EVENTS).map(big).collect();
    assert!(
        got == want.as_bytes(),
        "the reconnect got {} bytes, want {}",
        got.len(),
        want.len()
    );
    assert_eq!(
        server.app.calls.load(Ordering::SeqCst),
        1,
        "the layer answered"
    );
    assert_eq!(server.detached("started"), 1.0);
    // The old response ends (its chunked body's last chunk), once what it had is read.
    tokio::time::timeout(Duration::from_secs(30), async {
        while !seen.ends_with(b"0\r\n\r\n") {
            let n = old.read(&mut buf).await.unwrap();
            assert!(n > 0, "the old connection closed before its response ended");
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .expect("the old response did not end");
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

/// In process, with the layer driven directly: the review's findings, each seen failing
/// before its fix.
mod in_process {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, StreamBody};
    use hyper::body::Frame;
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tower::{Service, ServiceBuilder, ServiceExt};

    type Item = Result<Frame<Bytes>, std::io::Error>;

    /// The application: each call streams what the next channel receives, marked `Detach`.
    #[derive(Clone, Default)]
    struct Bodies {
        next: Arc<Mutex<VecDeque<mpsc::UnboundedReceiver<Item>>>>,
        calls: Arc<AtomicUsize>,
    }

    impl Bodies {
        fn next(&self) -> mpsc::UnboundedSender<Item> {
            let (tx, rx) = mpsc::unbounded_channel();
            self.next.lock().unwrap().push_back(rx);
            tx
        }

        fn calls(&self) -> usize {
            self.calls.load(Ordering::SeqCst)
        }
    }

    fn tracker(policy: ReplayPolicy) -> SseTracker {
        SseTracker::builder()
            .heartbeat_interval(None)
            .replay(policy)
            .build()
            .unwrap()
    }

    fn service(
        tracker: &SseTracker,
        bodies: &Bodies,
    ) -> impl Service<
        Request<()>,
        Response = axum::http::Response<
            impl http_body::Body<Data = Bytes, Error = std::io::Error> + Unpin + use<>,
        >,
        Error = Infallible,
    > + Clone
    + use<> {
        let bodies = bodies.clone();
        ServiceBuilder::new()
            .layer(tracker.layer())
            .service_fn(move |_req: Request<()>| {
                bodies.calls.fetch_add(1, Ordering::SeqCst);
                let rx = bodies.next.lock().unwrap().pop_front().expect("a body");
                async move {
                    let mut response = axum::http::Response::new(StreamBody::new(
                        UnboundedReceiverStream::new(rx),
                    ));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        axum::http::HeaderValue::from_static("text/event-stream"),
                    );
                    response.extensions_mut().insert(Detach);
                    Ok::<_, Infallible>(response)
                }
            })
    }

    fn request(last_event_id: Option<&str>) -> Request<()> {
        let mut request = Request::builder()
            .uri("/answer")
            .header("mcp-session-id", "s1");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.body(()).unwrap()
    }

    fn data(s: &str) -> Item {
        Ok(Frame::data(Bytes::from(s.to_owned())))
    }

    /// Failed before the fix: the failed body was read on after its error, its end taken for
    /// a finish, and the reconnect told `204` (an `EventSource` stops for good).
    #[tokio::test]
    async fn a_body_that_failed_is_not_read_on_and_its_reconnect_goes_to_the_application() {
        let bodies = Bodies::default();
        let mut svc = service(&tracker(ReplayPolicy::new()), &bodies);
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\ndata: a\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        tx.send(Err(std::io::Error::other("upstream failed")))
            .unwrap();
        assert!(body.frame().await.unwrap().is_err());
        // hyper drops a body that failed.
        drop(body);
        drop(tx);
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _next = bodies.next();
        let again = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("1")))
            .await
            .unwrap();
        assert_eq!(again.status(), 200);
        assert_eq!(bodies.calls(), 2, "the application answers the reconnect");
    }

    /// Failed before the fix: an event larger than the stream's bound restarted the history
    /// and made the stream not detachable while its body went on, detached; a reconnect then
    /// took the log over and called the application again, and the detached body ran on into
    /// nothing.
    #[tokio::test]
    async fn a_detached_stream_whose_history_restarted_is_still_followed_not_taken_over() {
        let bodies = Bodies::default();
        let mut svc = service(
            &tracker(ReplayPolicy::new().max_stream_bytes(nz(200))),
            &bodies,
        );
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        let large = format!("id: 2\ndata: {}\n\n", "x".repeat(300));
        for event in ["id: 1\n\n", large.as_str(), "id: 3\n\n"] {
            tx.send(data(event)).unwrap();
            body.frame().await.unwrap().unwrap();
        }
        drop(body);
        tx.send(data("id: 4\n\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!tx.is_closed(), "read on, detached");
        let mut again = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("3")))
            .await
            .unwrap();
        assert_eq!(bodies.calls(), 1, "the layer follows the stream");
        assert_eq!(
            again.headers().get(REPLAY_HEADER).unwrap(),
            "complete; events=1; tail"
        );
        let body = again.body_mut();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "id: 4\n\n"
        );
        tx.send(data("id: 5\n\n")).unwrap();
        drop(tx);
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "id: 5\n\n"
        );
        assert!(body.frame().await.is_none());
    }

    /// Failed before the fix: a detached stream cut by its byte bound between a reconnect's
    /// look-up and its answer got `204`, as if it had finished.
    #[tokio::test]
    async fn a_stream_cut_by_its_bound_is_never_answered_204() {
        let bodies = Bodies::default();
        let mut svc = service(
            &tracker(ReplayPolicy::new().detached_max_bytes(nz(100))),
            &bodies,
        );
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        drop(body);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!tx.is_closed(), "read on, detached");
        let answer = svc.ready().await.unwrap().call(request(Some("1")));
        tx.send(data(&format!("data: {}", "x".repeat(200))))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(tx.is_closed(), "cut by its byte bound");
        let mut response = answer.await.unwrap();
        assert_eq!(
            response.status(),
            200,
            "not finished: the client comes back"
        );
        assert!(response.body_mut().frame().await.is_none());
    }

    /// Failed before the fix: the application's empty answer to a reconnect whose history
    /// was gone (a bogus id) restarted the stream's log, so the finished answer's clients got
    /// gaps instead of the rest and `204` (an `EventSource` then reconnects for ever).
    #[tokio::test]
    async fn an_empty_answer_to_a_gap_leaves_a_finished_answer_replayable() {
        let bodies = Bodies::default();
        let mut svc = service(&tracker(ReplayPolicy::new()), &bodies);
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\nid: 2\n\nid: 3\n\n")).unwrap();
        drop(tx);
        while body.frame().await.is_some() {}
        drop(body);
        // A client with an id the log never held: the application answers, with nothing.
        drop(bodies.next());
        let mut gap = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("bogus")))
            .await
            .unwrap();
        assert!(
            gap.headers()[REPLAY_HEADER]
                .to_str()
                .unwrap()
                .starts_with("gap;")
        );
        while gap.body_mut().frame().await.is_some() {}
        drop(gap);
        // The answer is still there for its own clients.
        let mut rest = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("2")))
            .await
            .unwrap();
        assert_eq!(rest.headers()[REPLAY_HEADER], "complete; events=1; tail");
        assert_eq!(
            rest.body_mut()
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "id: 3\n\n"
        );
        let done = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("3")))
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
    }

    /// Failed before the fix: a reconnect to a finished answer, while the client's next
    /// answer had written nothing yet, took that next answer off its connection (its client
    /// got an end and nothing else), and was not told `204`.
    #[tokio::test]
    async fn a_reconnect_to_a_finished_answer_leaves_the_next_answer_on_its_connection() {
        let bodies = Bodies::default();
        let mut svc = service(&tracker(ReplayPolicy::new()), &bodies);
        let tx = bodies.next();
        let mut first = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\nid: 2\n\n")).unwrap();
        drop(tx);
        while first.frame().await.is_some() {}
        drop(first);
        // The next answer starts, and has written nothing yet.
        let next = bodies.next();
        let mut second = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        // The first answer's client reconnects with its last id: it missed nothing.
        let done = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("2")))
            .await
            .unwrap();
        assert_eq!(done.status(), 204);
        drop(done);
        next.send(data("id: 1\ndata: again\n\n")).unwrap();
        assert_eq!(
            second.frame().await.unwrap().unwrap().into_data().unwrap(),
            "id: 1\ndata: again\n\n",
            "the next answer goes on to its client"
        );
        assert_eq!(bodies.calls(), 2);
    }

    /// Failed before the fix: on a feed that several clients read, one reader's reconnect
    /// took the body writing the feed off its own client's connection.
    #[tokio::test]
    async fn a_readers_reconnect_to_a_feed_leaves_the_writing_body_with_its_client() {
        let bodies = Bodies::default();
        let mut svc = service(&tracker(ReplayPolicy::new()), &bodies);
        let anonymous = |last_event_id: Option<&str>| {
            let mut request = Request::builder().uri("/answer");
            if let Some(id) = last_event_id {
                request = request.header("last-event-id", id);
            }
            request.body(()).unwrap()
        };
        let tx = bodies.next();
        let mut writer = svc
            .ready()
            .await
            .unwrap()
            .call(anonymous(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\n")).unwrap();
        writer.frame().await.unwrap().unwrap();
        let reader = svc
            .ready()
            .await
            .unwrap()
            .call(anonymous(Some("1")))
            .await
            .unwrap();
        assert!(
            reader.headers()[REPLAY_HEADER]
                .to_str()
                .unwrap()
                .ends_with("tail")
        );
        tx.send(data("id: 2\n\n")).unwrap();
        let frame = tokio::time::timeout(Duration::from_secs(5), writer.frame())
            .await
            .expect("the writing body answers");
        assert_eq!(
            frame
                .expect("the writing body did not end")
                .unwrap()
                .into_data()
                .unwrap(),
            "id: 2\n\n"
        );
    }

    /// Failed before the fix: the byte bound counted the layer's heartbeats, so an idle
    /// detached stream (an LLM thinking) ended at its bound without sending a byte.
    #[tokio::test(start_paused = true)]
    async fn heartbeats_do_not_count_toward_a_detached_streams_byte_bound() {
        let bodies = Bodies::default();
        let tracker = SseTracker::builder()
            .heartbeat_interval(Some(Duration::from_millis(10)))
            .replay(ReplayPolicy::new().detached_max_bytes(nz(100)))
            .build()
            .unwrap();
        let mut svc = service(&tracker, &bodies);
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        drop(body);
        // A second of silence: about a hundred heartbeats, far more than 100 bytes.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!tx.is_closed(), "still read on");
        // What the application sends counts.
        tx.send(data(&format!("data: {}\n\n", "x".repeat(200))))
            .unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(tx.is_closed(), "ended at its byte bound");
    }

    /// Failed before the fix: a body made from a log did not know its client's last id (the
    /// replay was not scanned), so a drain did not end it at a boundary with `retry`.
    #[tokio::test]
    async fn a_drain_ends_a_followed_stream_at_a_boundary_with_retry() {
        let bodies = Bodies::default();
        let tracker = tracker(ReplayPolicy::new());
        let mut svc = service(&tracker, &bodies);
        let tx = bodies.next();
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request(None))
            .await
            .unwrap()
            .into_body();
        tx.send(data("id: 1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        drop(body);
        tx.send(data("id: 2\n\n")).unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
        let mut again = svc
            .ready()
            .await
            .unwrap()
            .call(request(Some("1")))
            .await
            .unwrap();
        let body = again.body_mut();
        assert_eq!(
            body.frame().await.unwrap().unwrap().into_data().unwrap(),
            "id: 2\n\n"
        );
        tracker.drain(Some(Duration::from_secs(1)));
        let mut rest = Vec::new();
        while let Some(frame) = body.frame().await {
            rest.extend_from_slice(&frame.unwrap().into_data().unwrap());
        }
        assert_eq!(rest, b"retry: 1000\n\n", "told to come back, at a boundary");
        drop(tx);
    }
}

/// MCP 2025-11-25 style, with the TypeScript SDK's ids (`{stream}_{n}`): a tool call's answer
/// streams on a POST marked `Detach`; its client drops, and resumes with a GET whose
/// `Last-Event-ID` names the POST's stream. The layer answers the GET from that stream's log:
/// the rest of the answer, once each; the application's GET handler is not called. A POST
/// stream not marked `Detach` is left to the application's own resumption: its GET gets no
/// replay from the layer.
#[tokio::test]
async fn a_post_stream_resumed_by_a_get_naming_it_gets_the_rest_from_the_layer() {
    use tower_sse_tracker::{IdStream, StreamSource};
    /// A POST body to come: whether it is marked `Detach`, and its frames.
    type PostBody = (bool, mpsc::UnboundedReceiver<Bytes>);
    #[derive(Clone, Default)]
    struct Mcp {
        posts: Arc<Mutex<VecDeque<PostBody>>>,
        gets: Arc<Mutex<Vec<Option<Replay>>>>,
    }
    async fn post(State(app): State<Mcp>) -> Response {
        let (detach, rx) = app.posts.lock().unwrap().pop_front().expect("a POST body");
        let frames = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|b| (Ok::<_, Infallible>(b), rx))
        });
        let mut response = (
            [(CONTENT_TYPE, "text/event-stream")],
            Body::from_stream(frames),
        )
            .into_response();
        if detach {
            response.extensions_mut().insert(Detach);
        }
        response
    }
    async fn get(State(app): State<Mcp>, replay: Option<axum::Extension<Replay>>) -> Response {
        app.gets.lock().unwrap().push(replay.map(|r| r.0));
        // The SDK's own resumption would answer here; an empty stream stands for it.
        ([(CONTENT_TYPE, "text/event-stream")], "").into_response()
    }
    let (tracker, metrics) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .stream(StreamSource::event_id(IdStream::MCP_TYPESCRIPT))
            .replay(ReplayPolicy::new()),
    );
    let app = Mcp::default();
    let router = axum::Router::new()
        .route("/mcp", axum::routing::post(post).get(get))
        .with_state(app.clone())
        .layer(tracker.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let ev = |stream: &str, n: u32| format!("id: {stream}_{n}\ndata: progress {n}\n\n");
    for (stream, detach) in [("call1", true), ("call2", false)] {
        let (tx, rx) = mpsc::unbounded_channel();
        app.posts.lock().unwrap().push_back((detach, rx));
        let response = http
            .post(format!("http://{addr}/mcp"))
            .header("mcp-session-id", "s1")
            .send()
            .await
            .unwrap();
        let mut client = common::Client::new(response);
        let first: String = (1..=2).map(|n| ev(stream, n)).collect();
        tx.send(Bytes::from(first.clone())).unwrap();
        client.read_until_suffix(first.as_bytes()).await;
        drop(client);
        // The call goes on while its client is away; the server sees it gone when it writes.
        let mut n = 3;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let gone = |metrics: &Recorded| {
            metrics.value(names::REPLAY_DETACHED_TOTAL, &[("outcome", "started")])
                + metrics.value(names::REPLAY_DETACHED_TOTAL, &[("outcome", "refused")])
        };
        if detach {
            while gone(&metrics) == 0.0 {
                assert!(tokio::time::Instant::now() < deadline);
                tx.send(Bytes::from(ev(stream, n))).unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        let resume = http
            .get(format!("http://{addr}/mcp"))
            .header("mcp-session-id", "s1")
            .header("last-event-id", format!("{stream}_2"))
            .send()
            .await
            .unwrap();
        let mut client = common::Client::new(resume);
        if detach {
            assert_eq!(
                header(&client),
                Some(format!("complete; events={}; tail", n - 3).as_str())
            );
            tx.send(Bytes::from(ev(stream, n))).unwrap();
            drop(tx);
            let rest: String = (3..=n).map(|k| ev(stream, k)).collect();
            assert_eq!(client.read_to_end().await, rest.as_bytes());
            assert!(app.gets.lock().unwrap().is_empty(), "the layer answered");
        } else {
            assert_eq!(header(&client), None, "no replay from the layer");
            assert_eq!(client.read_to_end().await, b"");
            assert_eq!(
                *app.gets.lock().unwrap(),
                vec![None],
                "the application answered"
            );
        }
    }
}

/// With streams named by their ids (`{stream}_{n}`), in process: the review's findings on
/// logging, each seen failing before its fix.
mod per_id {
    use super::*;
    use http::Request;
    use http_body_util::{BodyExt, StreamBody};
    use tokio_stream::wrappers::UnboundedReceiverStream;
    use tower::{Service, ServiceBuilder, ServiceExt};
    use tower_sse_tracker::{IdStream, StreamKey, StreamSource};

    fn tracker() -> SseTracker {
        SseTracker::builder()
            .heartbeat_interval(None)
            .stream(StreamSource::event_id(IdStream::MCP_TYPESCRIPT))
            .replay(ReplayPolicy::new())
            .build()
            .unwrap()
    }

    /// The layer over a handler whose one `Detach` body yields what `rx` receives.
    fn service(
        tracker: &SseTracker,
        rx: mpsc::UnboundedReceiver<Bytes>,
    ) -> impl Service<
        Request<()>,
        Response = axum::http::Response<
            impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>,
        >,
        Error = Infallible,
    > + use<> {
        let rx = Arc::new(Mutex::new(Some(rx)));
        ServiceBuilder::new()
            .layer(tracker.layer())
            .service_fn(move |_req: Request<()>| {
                let rx = rx.lock().unwrap().take().expect("one body");
                async move {
                    let frames = UnboundedReceiverStream::new(rx)
                        .map(|b| Ok::<_, Infallible>(hyper::body::Frame::data(b)));
                    let mut response = axum::http::Response::new(StreamBody::new(frames));
                    response.headers_mut().insert(
                        CONTENT_TYPE,
                        axum::http::HeaderValue::from_static("text/event-stream"),
                    );
                    response.extensions_mut().insert(Detach);
                    Ok::<_, Infallible>(response)
                }
            })
    }

    fn request(method: &str, last_event_id: Option<&str>) -> Request<()> {
        let mut request = Request::builder()
            .method(method)
            .uri("/mcp")
            .header("mcp-session-id", "s1");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id);
        }
        request.body(()).unwrap()
    }

    use futures_util::StreamExt;

    /// Failed before the fix: once the body had a log, it published only the last id of each
    /// frame, so stream A kept `A_1` after a frame `A_2 … B_1`.
    #[tokio::test]
    async fn every_streams_latest_id_is_published_after_the_body_logs() {
        let tracker = tracker();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut svc = service(&tracker, rx);
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request("POST", None))
            .await
            .unwrap()
            .into_body();
        tx.send(Bytes::from("id: A_1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        tx.send(Bytes::from("id: A_2\n\nid: B_1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        let a = StreamKey::try_new("s1", "A").unwrap();
        assert_eq!(tracker.last_event_id(&a).unwrap().as_str(), "A_2");
    }

    /// Failed before the fix: the body's log was the stream of the last id of its first
    /// frame, so a reconnect naming the first stream was not answered from it.
    #[tokio::test]
    async fn the_log_is_the_first_named_streams_and_its_reconnect_is_answered_from_it() {
        let tracker = tracker();
        let (tx, rx) = mpsc::unbounded_channel();
        let mut svc = service(&tracker, rx);
        let mut body = svc
            .ready()
            .await
            .unwrap()
            .call(request("POST", None))
            .await
            .unwrap()
            .into_body();
        tx.send(Bytes::from("id: A_1\n\nid: B_1\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
        let mut again = svc
            .ready()
            .await
            .unwrap()
            .call(request("GET", Some("A_1")))
            .await
            .unwrap();
        assert_eq!(
            again.headers().get(REPLAY_HEADER).unwrap(),
            "complete; events=1; tail"
        );
        assert_eq!(
            again
                .body_mut()
                .frame()
                .await
                .unwrap()
                .unwrap()
                .into_data()
                .unwrap(),
            "id: B_1\n\n"
        );
        drop((tx, body));
    }
}
