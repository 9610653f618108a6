//! Stream identity over real HTTP: concurrent responses on one route, owners from headers and
//! authenticated principals, sessionless streams named by their event ids, the key in the
//! request extensions, and SSE responses that cannot be scanned.

mod common;

use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use common::names::{REASON_ENCODED, UNTRACKED_STREAMS_TOTAL};
use common::{Harness, build_recorded, key, no_heartbeat};
use tower_sse_tracker::{
    EventId, IdStream, OwnerSource, Resume, SseTracker, StreamKey, StreamSource,
};

fn id(s: &str) -> EventId {
    EventId::new(s).unwrap()
}

#[tokio::test]
async fn two_concurrent_streams_on_one_route_in_one_session_keep_separate_exact_ids() {
    let h = Harness::start(no_heartbeat()).await;
    let first = h.feed("events");
    let second = h.feed("events");
    let mut a = h.get("/sse/events", Some("s1"), HeaderMap::new()).await;
    let mut b = h.get("/sse/events", Some("s1"), HeaderMap::new()).await;
    // Interleaved, as the demo's two streams were: 3, 102, 6, 103...
    for (n, m) in [(1, 101), (2, 102), (3, 103)] {
        first.send(Bytes::from(format!("id: {n}\n\n"))).unwrap();
        a.read_until_suffix(format!("id: {n}\n\n").as_bytes()).await;
        second.send(Bytes::from(format!("id: {m}\n\n"))).unwrap();
        b.read_until_suffix(format!("id: {m}\n\n").as_bytes()).await;
    }
    let route = key("s1", "GET /sse/events");
    let concurrent = key("s1", "GET /sse/events #2");
    assert_eq!(h.tracker.last_event_id(&route).unwrap(), "3");
    assert_eq!(h.tracker.last_event_id(&concurrent).unwrap(), "103");
    // A client reconnecting at 3 is current on its stream, not behind the other one.
    assert_eq!(
        h.tracker.resume(&route, Some(&id("3"))).await.unwrap(),
        Resume::Current(id("3"))
    );
    // Once the first ends, the route's name is free again for the next response.
    drop(first);
    a.read_to_end().await;
    let third = h.feed("events");
    let mut c = h.get("/sse/events", Some("s1"), HeaderMap::new()).await;
    third.send(Bytes::from_static(b"id: 4\n\n")).unwrap();
    c.read_until_suffix(b"id: 4\n\n").await;
    assert_eq!(h.tracker.last_event_id(&route).unwrap(), "4");
    assert_eq!(h.tracker.last_event_id(&concurrent).unwrap(), "103");
}

#[tokio::test]
async fn a_shared_route_is_one_stream_when_configured_so() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .stream(StreamSource::shared_route())
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    let first = h.feed("events");
    let second = h.feed("events");
    let mut a = h.get("/sse/events", Some("s1"), HeaderMap::new()).await;
    let mut b = h.get("/sse/events", Some("s1"), HeaderMap::new()).await;
    first.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    a.read_until_suffix(b"id: 1\n\n").await;
    second.send(Bytes::from_static(b"id: 2\n\n")).unwrap();
    b.read_until_suffix(b"id: 2\n\n").await;
    assert_eq!(
        h.tracker
            .last_event_id(&key("s1", "GET /sse/events"))
            .unwrap(),
        "2"
    );
    assert_eq!(h.tracker.tracked_streams(), 1);
}

#[tokio::test]
async fn sessionless_streams_named_by_their_ids_resume_by_last_event_id() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .owner(OwnerSource::none())
        .stream(StreamSource::event_id(IdStream::MCP_TYPESCRIPT))
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    // Two concurrent response streams (as two POSTs would be), no session anywhere.
    let post_a = h.feed("post");
    let post_b = h.feed("post");
    let mut a = h.get("/sse/post", None, HeaderMap::new()).await;
    let mut b = h.get("/sse/post", None, HeaderMap::new()).await;
    post_a
        .send(Bytes::from_static(b"id: alpha_1\ndata: x\n\n"))
        .unwrap();
    post_b
        .send(Bytes::from_static(b"id: beta_1\ndata: y\n\n"))
        .unwrap();
    post_a
        .send(Bytes::from_static(b"id: alpha_2\ndata: x\n\n"))
        .unwrap();
    a.read_until_suffix(b"alpha_2\ndata: x\n\n").await;
    b.read_until_suffix(b"beta_1\ndata: y\n\n").await;
    let alpha = StreamKey::try_unowned("alpha").unwrap();
    let beta = StreamKey::try_unowned("beta").unwrap();
    assert_eq!(h.tracker.last_event_id(&alpha).unwrap(), "alpha_2");
    assert_eq!(h.tracker.last_event_id(&beta).unwrap(), "beta_1");
    // Stream A drops; the client resumes it with a GET carrying its Last-Event-ID.
    drop(post_a);
    drop(a);
    let resumed = h.feed("resume");
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_static("alpha_2"));
    let mut r = h.get("/sse/resume", None, headers).await;
    let seen = h.seen("resume");
    assert_eq!(
        seen.key,
        Some(alpha.clone()),
        "the Last-Event-ID names the stream"
    );
    assert_eq!(
        h.tracker
            .resume(seen.key.as_ref().unwrap(), Some(&id("alpha_2")))
            .await
            .unwrap(),
        Resume::Current(id("alpha_2"))
    );
    resumed
        .send(Bytes::from_static(b"id: alpha_3\ndata: x\n\n"))
        .unwrap();
    r.read_until_suffix(b"alpha_3\ndata: x\n\n").await;
    assert_eq!(h.tracker.last_event_id(&alpha).unwrap(), "alpha_3");
    assert_eq!(h.tracker.last_event_id(&beta).unwrap(), "beta_1");
    // Ids that name no stream go to the route's stream.
    resumed.send(Bytes::from_static(b"id: plain\n\n")).unwrap();
    r.read_until_suffix(b"id: plain\n\n").await;
    let route = StreamKey::try_unowned("GET /sse/resume").unwrap();
    assert_eq!(h.tracker.last_event_id(&route).unwrap(), "plain");
}

#[tokio::test]
async fn the_owner_can_come_from_any_header() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .owner(OwnerSource::header(http::HeaderName::from_static("x-user")))
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    let tx = h.feed("h");
    let mut headers = HeaderMap::new();
    headers.insert("x-user", HeaderValue::from_static("alice@example.com"));
    let mut client = h.get("/sse/h", Some("ignored"), headers).await;
    tx.send(Bytes::from_static(b"id: 9\n\n")).unwrap();
    client.read_until_suffix(b"id: 9\n\n").await;
    assert_eq!(
        h.seen("h").key,
        Some(key("alice@example.com", "GET /sse/h"))
    );
    assert_eq!(
        h.tracker
            .last_event_id(&key("alice@example.com", "GET /sse/h"))
            .unwrap(),
        "9"
    );
    assert_eq!(h.tracker.last_event_id(&key("ignored", "GET /sse/h")), None);
}

/// What a (stand-in) authentication layer puts in the request extensions.
#[derive(Clone)]
struct Principal(String);

/// Authenticates by a `x-test-token: user:<name>` header (a stand-in for a real scheme).
fn authenticate(router: axum::Router) -> axum::Router {
    router.layer(axum::middleware::from_fn(
        |mut req: axum::extract::Request, next: axum::middleware::Next| async move {
            let user = req
                .headers()
                .get("x-test-token")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("user:"))
                .map(str::to_owned);
            if let Some(user) = user {
                req.extensions_mut().insert(Principal(user));
            }
            next.run(req).await
        },
    ))
}

/// Another client sends alice's session id: with the default owner (the header) it writes into
/// alice's stream; with the owner taken from the authenticated principal it cannot.
#[tokio::test]
async fn a_forged_session_header_cannot_write_into_another_principals_stream() {
    async fn forge(tracker: SseTracker) -> (Harness, StreamKey, StreamKey) {
        let h = Harness::start_with(tracker, authenticate).await;
        let as_user = |user: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "x-test-token",
                HeaderValue::from_str(&format!("user:{user}")).unwrap(),
            );
            headers
        };
        let alice_feed = h.feed("chat");
        let mut alice = h.get("/sse/chat", Some("sess-A"), as_user("alice")).await;
        alice_feed.send(Bytes::from_static(b"id: a1\n\n")).unwrap();
        alice.read_until_suffix(b"id: a1\n\n").await;
        let alice_key = h.seen("chat").key.unwrap();
        drop(alice_feed);
        alice.read_to_end().await;
        // Mallory, authenticated as herself, forges alice's session header.
        let mallory_feed = h.feed("chat");
        let mut mallory = h.get("/sse/chat", Some("sess-A"), as_user("mallory")).await;
        mallory_feed
            .send(Bytes::from_static(b"id: forged-999\n\n"))
            .unwrap();
        mallory.read_until_suffix(b"id: forged-999\n\n").await;
        let mallory_key = h.seen("chat").key.unwrap();
        (h, alice_key, mallory_key)
    }

    // Default owner: the header. The layer does not authenticate: the forgery lands.
    let (h, alice, mallory) = forge(no_heartbeat()).await;
    assert_eq!(alice, mallory);
    assert_eq!(h.tracker.last_event_id(&alice).unwrap(), "forged-999");

    // The owner from the principal: the forged header changes nothing.
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .owner(OwnerSource::extension(|p: &Principal| Some(p.0.as_str())))
        .build()
        .unwrap();
    let (h, alice, mallory) = forge(tracker).await;
    assert_eq!(alice, key("alice", "GET /sse/chat"));
    assert_eq!(mallory, key("mallory", "GET /sse/chat"));
    assert_eq!(h.tracker.last_event_id(&alice).unwrap(), "a1");
    assert_eq!(h.tracker.last_event_id(&mallory).unwrap(), "forged-999");
    assert_eq!(
        h.tracker.resume(&alice, Some(&id("a1"))).await.unwrap(),
        Resume::Current(id("a1"))
    );
}

#[tokio::test]
async fn a_request_without_a_principal_is_not_tracked() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .owner(OwnerSource::extension(|p: &Principal| Some(p.0.as_str())))
        .build()
        .unwrap();
    let h = Harness::start_with(tracker, authenticate).await;
    let tx = h.feed("anon");
    let mut client = h.get("/sse/anon", Some("s1"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    client.read_until_suffix(b"id: 1\n\n").await;
    assert_eq!(h.seen("anon").key, None);
    assert_eq!(h.tracker.tracked_streams(), 0);
}

#[tokio::test(start_paused = true)]
async fn an_encoded_sse_response_passes_through_untracked_counted_and_without_heartbeats() {
    use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};

    let (tracker, recorded) = build_recorded(SseTracker::builder());
    let app = axum::Router::new()
        .route(
            "/gz",
            axum::routing::get(|| async {
                let stream = futures_util::stream::iter([Ok::<_, std::io::Error>(
                    Bytes::from_static(b"\x1f\x8b compressed"),
                )])
                .chain(futures_util::stream::pending());
                let mut response = axum::response::Response::new(axum::body::Body::from_stream(
                    futures_util::StreamExt::boxed(stream),
                ));
                response
                    .headers_mut()
                    .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
                response
                    .headers_mut()
                    .insert(CONTENT_ENCODING, HeaderValue::from_static("gzip"));
                response
            }),
        )
        .layer(tracker.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let response = http
        .get(format!("http://{addr}/gz"))
        .header("mcp-session-id", "s1")
        .send()
        .await
        .unwrap();
    assert!(!response.headers().contains_key("x-accel-buffering"));
    let mut body = futures_util::StreamExt::boxed(response.bytes_stream());
    let first = futures_util::StreamExt::next(&mut body)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&first[..], b"\x1f\x8b compressed");
    // Three heartbeat intervals: nothing is added to the compressed bytes.
    let more = tokio::time::timeout(
        Duration::from_secs(45),
        futures_util::StreamExt::next(&mut body),
    )
    .await;
    assert!(more.is_err(), "nothing may be inserted: {more:?}");
    assert_eq!(
        recorded.value(UNTRACKED_STREAMS_TOTAL, &[("reason", REASON_ENCODED)]),
        1.0
    );
    assert_eq!(tracker.tracked_streams(), 0);
}

use futures_util::StreamExt as _;

#[cfg(feature = "axum")]
#[tokio::test]
async fn the_extractors_give_the_key_the_session_and_the_last_event_id_or_a_clear_rejection() {
    use axum::routing::get;
    use tower_sse_tracker::{LastEventId, SessionId};

    async fn resume(key: StreamKey, session: SessionId, last: Option<LastEventId>) -> String {
        format!(
            "{key} | {session} | {:?}",
            last.map(|LastEventId(id)| id.to_string())
        )
    }
    async fn needs_id(LastEventId(id): LastEventId) -> String {
        id.to_string()
    }
    let tracker = no_heartbeat();
    let tracked = axum::Router::new()
        .route("/resume", get(resume))
        .route("/needs-id", get(needs_id))
        .layer(tracker.layer());
    // A route the layer does not wrap: a bug the rejection names.
    let app = tracked.route("/outside", get(needs_id));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |path: &str, last: Option<&str>| {
        let mut req = http
            .get(format!("http://{addr}{path}"))
            .header("mcp-session-id", "s1");
        if let Some(last) = last {
            req = req.header("last-event-id", last);
        }
        req.send()
    };
    let ok = get("/resume", Some("41")).await.unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.text().await.unwrap(),
        "s1 / GET /resume | s1 | Some(\"41\")"
    );
    let none = get("/resume", None).await.unwrap().text().await.unwrap();
    assert_eq!(none, "s1 / GET /resume | s1 | None");
    let missing = get("/needs-id", None).await.unwrap();
    assert_eq!(missing.status(), 400);
    assert_eq!(
        missing.text().await.unwrap(),
        "the request has no valid Last-Event-ID"
    );
    let outside = get("/outside", Some("1")).await.unwrap();
    assert_eq!(outside.status(), 500);
    assert!(
        outside
            .text()
            .await
            .unwrap()
            .contains("not behind the SSE tracker's layer")
    );
}

/// One tab of session `s1` reading `/sse/events`: the feed its handler streams, and its client.
struct Tab {
    feed: tokio::sync::mpsc::UnboundedSender<Bytes>,
    client: common::Client,
}

impl Tab {
    /// Opens a tab, with the `Last-Event-ID` a reconnecting `EventSource` sends; returns it with
    /// the key its handler was given.
    async fn open(h: &Harness, last_event_id: Option<&'static str>) -> (Tab, Option<StreamKey>) {
        let feed = h.feed("events");
        let mut headers = HeaderMap::new();
        if let Some(id) = last_event_id {
            headers.insert("last-event-id", HeaderValue::from_static(id));
        }
        let client = h.get("/sse/events", Some("s1"), headers).await;
        (Tab { feed, client }, h.seen("events").key)
    }

    /// Streams `frame` and waits until the client has read it.
    async fn send(&mut self, frame: &'static [u8]) {
        self.feed.send(Bytes::from_static(frame)).unwrap();
        self.client.read_until_suffix(frame).await;
    }

    /// The tab goes: its response ends and its client reads to the end.
    async fn close(mut self) {
        drop(self.feed);
        self.client.read_to_end().await;
    }
}

/// Two concurrent tabs of `s1`, A then B, having read `a` and `b`.
async fn two_tabs(h: &Harness, a: &'static [u8], b: &'static [u8]) -> (Tab, Tab) {
    let (mut tab_a, _) = Tab::open(h, None).await;
    let (mut tab_b, _) = Tab::open(h, None).await;
    tab_a.send(a).await;
    tab_b.send(b).await;
    (tab_a, tab_b)
}

const ROUTE: &str = "GET /sse/events";
const SECOND: &str = "GET /sse/events #2";

#[tokio::test]
async fn a_reconnect_finds_its_own_concurrent_stream_by_its_last_event_id() {
    let h = Harness::start(no_heartbeat()).await;
    let (_a, b) = two_tabs(&h, b"id: a5\n\n", b"id: b9\n\n").await;
    // Tab B drops and reconnects with its Last-Event-ID: the key names B's stream, not A's.
    b.close().await;
    let (_b, addressed) = Tab::open(&h, Some("b9")).await;
    let addressed = addressed.unwrap();
    assert_eq!(addressed, key("s1", SECOND));
    assert_eq!(
        h.tracker.resume(&addressed, Some(&id("b9"))).await.unwrap(),
        Resume::Current(id("b9"))
    );
}

#[tokio::test]
async fn each_concurrent_response_tells_its_handler_the_key_its_body_is_tracked_under() {
    let h = Harness::start(no_heartbeat()).await;
    let (mut a, a_key) = Tab::open(&h, None).await;
    assert_eq!(a_key.unwrap(), key("s1", ROUTE));
    let (mut b, b_key) = Tab::open(&h, None).await;
    let b_key = b_key.unwrap();
    assert_eq!(b_key, key("s1", SECOND));
    a.send(b"id: a1\n\n").await;
    b.send(b"id: b1\n\n").await;
    // The key the second handler was given is the one its ids go to.
    assert_eq!(h.tracker.last_event_id(&b_key).unwrap(), "b1");
    assert_eq!(h.tracker.last_event_id(&key("s1", ROUTE)).unwrap(), "a1");
}

#[tokio::test]
async fn a_lagging_reconnect_resumes_its_own_closed_stream_not_a_live_sibling() {
    let h = Harness::start(no_heartbeat()).await;
    let (_a, b) = two_tabs(&h, b"id: a5\n\n", b"id: b9\n\nid: b10\n\n").await;
    // Tab B drops; the network ate b10, so it comes back with b9, which is no stream's
    // latest id. Tab A is still open: B's stream is the route's one closed stream.
    b.close().await;
    let (mut b, addressed) = Tab::open(&h, Some("b9")).await;
    let addressed = addressed.unwrap();
    assert_eq!(addressed, key("s1", SECOND));
    assert_eq!(
        h.tracker.resume(&addressed, Some(&id("b9"))).await.unwrap(),
        Resume::Behind {
            client: Some(id("b9")),
            latest: id("b10")
        }
    );
    // The new body streams into the stream it addressed.
    b.send(b"id: b11\n\n").await;
    assert_eq!(h.tracker.last_event_id(&addressed).unwrap(), "b11");
}

#[tokio::test]
async fn a_reconnect_gets_its_own_stream_back_even_when_the_first_one_is_free() {
    let h = Harness::start(no_heartbeat()).await;
    let (a, b) = two_tabs(&h, b"id: a5\n\n", b"id: b9\n\n").await;
    // Both tabs drop; B comes back first. The route's first stream is free, but B's is #2.
    a.close().await;
    b.close().await;
    let (mut b, addressed) = Tab::open(&h, Some("b9")).await;
    let addressed = addressed.unwrap();
    assert_eq!(addressed, key("s1", SECOND));
    b.send(b"id: b10\n\n").await;
    assert_eq!(h.tracker.last_event_id(&addressed).unwrap(), "b10");
    // A's stream is untouched.
    assert_eq!(h.tracker.last_event_id(&key("s1", ROUTE)).unwrap(), "a5");
}

#[tokio::test]
async fn an_id_both_a_live_and_a_closed_stream_hold_addresses_the_closed_one() {
    let h = Harness::start(no_heartbeat()).await;
    // Both tabs read one feed: their streams end at the same id.
    let (_a, b) = two_tabs(&h, b"id: 7\n\n", b"id: 7\n\n").await;
    b.close().await;
    let (mut b, addressed) = Tab::open(&h, Some("7")).await;
    let addressed = addressed.unwrap();
    assert_eq!(addressed, key("s1", SECOND));
    b.send(b"id: 8\n\n").await;
    assert_eq!(h.tracker.last_event_id(&addressed).unwrap(), "8");
}

#[tokio::test]
async fn an_id_this_instance_never_saw_addresses_the_stream_the_response_gets() {
    // A rolling deploy: tab A reconnected first and took the route's stream; tab B comes with
    // an id from the old instance. Its key must not be A's stream.
    let h = Harness::start(no_heartbeat()).await;
    let (_a, _) = Tab::open(&h, None).await;
    let (mut b, addressed) = Tab::open(&h, Some("b9")).await;
    let addressed = addressed.unwrap();
    assert_eq!(addressed, key("s1", SECOND));
    b.send(b"id: b10\n\n").await;
    assert_eq!(h.tracker.last_event_id(&addressed).unwrap(), "b10");
}

#[tokio::test]
async fn a_last_event_id_that_could_be_either_of_two_closed_streams_gets_no_key() {
    let h = Harness::start(no_heartbeat()).await;
    let (a, b) = two_tabs(&h, b"id: 4\n\nid: 5\n\n", b"id: 8\n\nid: 9\n\n").await;
    a.close().await;
    b.close().await;
    // "3" is neither stream's latest id, and both streams are closed: the layer cannot tell
    // which one the client read, so it names none rather than the wrong one.
    let (_c, addressed) = Tab::open(&h, Some("3")).await;
    assert_eq!(addressed, None);
    assert_eq!(h.seen("events").last_event_id.unwrap().0, "3");
}

#[tokio::test]
async fn with_ids_that_name_streams_concurrent_responses_of_unnamed_ids_keep_separate_keys() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .stream(StreamSource::event_id(IdStream::RMCP))
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    let first = h.feed("mcp");
    let second = h.feed("mcp");
    let mut a = h.get("/sse/mcp", Some("s1"), HeaderMap::new()).await;
    let mut b = h.get("/sse/mcp", Some("s1"), HeaderMap::new()).await;
    // Ids like those of rmcp's standalone stream name no stream.
    first.send(Bytes::from_static(b"id: 3\n\n")).unwrap();
    a.read_until_suffix(b"id: 3\n\n").await;
    second.send(Bytes::from_static(b"id: 40\n\n")).unwrap();
    b.read_until_suffix(b"id: 40\n\n").await;
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/mcp")).unwrap(),
        "3"
    );
    assert_eq!(
        h.tracker
            .last_event_id(&key("s1", "GET /sse/mcp #2"))
            .unwrap(),
        "40"
    );
}

#[tokio::test]
async fn one_frame_carrying_ids_of_two_streams_updates_both() {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .stream(StreamSource::event_id(IdStream::RMCP))
        .build()
        .unwrap();
    let h = Harness::start(tracker).await;
    // A replay of stream 17's end, then the standalone stream, in one frame.
    common::run_frames(
        &h,
        "mix",
        Some("s1"),
        &[b"id: 4/17\n\nid: 5/17\n\nid: 0\n\n"],
    )
    .await;
    assert_eq!(h.tracker.last_event_id(&key("s1", "17")).unwrap(), "5/17");
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/mix")).unwrap(),
        "0"
    );
}

type SeenKeys = std::sync::Arc<std::sync::Mutex<Vec<Option<StreamKey>>>>;

/// The layer over an SSE service that reports the key it found in its request extensions and
/// yields `frames`.
fn key_reporting_service(
    tracker: &SseTracker,
    frames: &'static [&'static [u8]],
) -> (
    impl tower::Service<
        http::Request<()>,
        Response = http::Response<
            impl http_body::Body<Data = Bytes, Error = std::convert::Infallible> + Unpin + use<>,
        >,
        Error = std::convert::Infallible,
    > + use<>,
    SeenKeys,
) {
    let seen = SeenKeys::default();
    let report = seen.clone();
    let service = tower::ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(move |req: http::Request<()>| {
            report
                .lock()
                .unwrap()
                .push(req.extensions().get::<StreamKey>().cloned());
            let frames = frames
                .iter()
                .map(|f| Ok(hyper::body::Frame::data(Bytes::from_static(f))));
            let body = http_body_util::StreamBody::new(futures_util::stream::iter(frames));
            let mut response = http::Response::new(body);
            response.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("text/event-stream"),
            );
            async move { Ok::<_, std::convert::Infallible>(response) }
        });
    (service, seen)
}

/// Sends a `method` request for `/mcp` with no session through `svc`, and reads its body.
async fn send<S, B>(svc: &mut S, method: &str, last_event_id: Option<&str>)
where
    S: tower::Service<http::Request<()>, Response = http::Response<B>>,
    S::Error: std::fmt::Debug,
    B: http_body::Body + Unpin,
    B::Error: std::fmt::Debug,
{
    use http_body_util::BodyExt;
    use tower::ServiceExt;
    let mut req = http::Request::builder().method(method).uri("/mcp");
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(req.body(()).unwrap())
        .await
        .unwrap();
    let mut body = response.into_body();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}

/// From review: anonymous requests get the key their body is tracked under, or none. A POST
/// without a session gets none (its response may name a session, as MCP's `initialize`
/// does, and an anonymous POST's stream is its own), with any stream source; an anonymous GET
/// gets its route's feed.
#[tokio::test]
async fn anonymous_requests_get_the_key_their_body_is_tracked_under_or_none() {
    let feed = StreamKey::unowned(tower_sse_tracker::StreamName::new("GET /mcp").unwrap());
    for source in [
        StreamSource::route(),
        StreamSource::shared_route(),
        StreamSource::event_id(IdStream::MCP_TYPESCRIPT),
    ] {
        let tracker = SseTracker::builder()
            .heartbeat_interval(None)
            .stream(source)
            .build()
            .unwrap();
        let (mut svc, seen) = key_reporting_service(&tracker, &[b"id: 7\n\n"]);
        send(&mut svc, "POST", None).await;
        send(&mut svc, "GET", None).await;
        let seen = seen.lock().unwrap().clone();
        assert_eq!(seen, [None, Some(feed.clone())], "{source:?}");
        assert_eq!(tracker.last_event_id(&feed).unwrap(), "7", "{source:?}");
    }
}

/// From review: with ids that name their stream, anonymous readers whose ids name none share
/// their route's feed (not a `#n` stream each), and an anonymous POST's such ids are not
/// tracked, as with the route source.
#[tokio::test]
async fn anonymous_ids_that_name_no_stream_go_to_the_feed_of_a_get_only() {
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .stream(StreamSource::event_id(IdStream::MCP_TYPESCRIPT)),
    );
    let (mut svc, _) = key_reporting_service(&tracker, &[b"id: plain-1\n\n"]);
    for _ in 0..3 {
        send(&mut svc, "GET", None).await;
    }
    send(&mut svc, "POST", None).await;
    assert_eq!(tracker.tracked_streams(), 1, "one feed");
    assert_eq!(
        recorded.value(UNTRACKED_STREAMS_TOTAL, &[("reason", "anonymous")]),
        1.0
    );
}
