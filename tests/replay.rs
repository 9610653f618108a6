//! Replay over real HTTP on loopback: a client that reconnects with `Last-Event-ID` gets the
//! events it missed, byte for byte and once each, before the application's; or, when they are
//! gone, the gap signal, and the application learns which.

mod common;

use std::num::NonZeroUsize;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use common::{Harness, build_recorded, names};
use tower_sse_tracker::{GapReason, REPLAY_HEADER, Replay, ReplayPolicy, SseTracker};

fn event(n: u32) -> String {
    format!("id: {n}\ndata: message {n}\n\n")
}

fn events(range: std::ops::RangeInclusive<u32>) -> String {
    range.map(event).collect()
}

fn with_last_id(id: &str) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_str(id).unwrap());
    headers
}

fn replay_header(client: &common::Client) -> Option<&str> {
    client
        .headers
        .get(REPLAY_HEADER)
        .map(|v| v.to_str().unwrap())
}

/// Waits (at most 5 s) until `done`.
async fn wait_for(done: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(tokio::time::Instant::now() < deadline, "timed out");
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
}

fn replaying(policy: ReplayPolicy) -> tower_sse_tracker::SseTrackerBuilder {
    SseTracker::builder()
        .heartbeat_interval(None)
        .replay(policy)
}

/// Streams `events` on a new response of `/sse/{name}` and reads them all; the body stays
/// open (its feed is returned).
async fn stream(
    h: &Harness,
    name: &str,
    session: Option<&str>,
    headers: HeaderMap,
    sent: &str,
) -> (tokio::sync::mpsc::UnboundedSender<Bytes>, common::Client) {
    let feed = h.feed(name);
    let mut client = h.get(&format!("/sse/{name}"), session, headers).await;
    if !sent.is_empty() {
        feed.send(Bytes::from(sent.to_owned())).unwrap();
        client.read_until_suffix(sent.as_bytes()).await;
    }
    (feed, client)
}

#[tokio::test]
async fn a_feed_reader_that_reconnects_gets_the_events_it_missed_once_each_then_the_live_ones() {
    let (tracker, metrics) = build_recorded(replaying(ReplayPolicy::new()));
    let h = Harness::start(tracker).await;
    // A browser reads the feed: events 1 to 5 reach its connection, which breaks after 3 (4
    // and 5 were in flight).
    let (feed, client) = stream(&h, "news", None, HeaderMap::new(), &events(1..=5)).await;
    assert_eq!(replay_header(&client), None, "no Last-Event-ID, no replay");
    drop((feed, client));
    // It reconnects with the last id it saw.
    let (feed, mut client) = stream(&h, "news", None, with_last_id("3"), "").await;
    assert_eq!(replay_header(&client), Some("complete; events=2"));
    let Some(Replay::Complete {
        events: 2,
        last_event_id,
        position,
    }) = h.seen("news").replay
    else {
        panic!("{:?}", h.seen("news").replay);
    };
    assert_eq!(
        last_event_id.as_str(),
        "5",
        "the application continues after 5"
    );
    assert_eq!(position.offset, 4);
    client.read_until_suffix(events(4..=5).as_bytes()).await;
    // Then the application's events, after the replay.
    feed.send(Bytes::from(event(6))).unwrap();
    client.read_until_suffix(event(6).as_bytes()).await;
    assert_eq!(
        client.received,
        events(4..=6).as_bytes(),
        "nothing twice, nothing missing"
    );
    // The response continued the history: a reader that saw 1 gets 2 to 6.
    drop((feed, client));
    let (_feed, mut client) = stream(&h, "news", None, with_last_id("1"), "").await;
    client.read_until_len(events(2..=6).len()).await;
    assert_eq!(client.received, events(2..=6).as_bytes());
    assert_eq!(
        metrics.value(names::REPLAYS_TOTAL, &[("outcome", "complete")]),
        2.0
    );
    assert_eq!(metrics.value(names::REPLAYED_EVENTS_TOTAL, &[]), 7.0);
}

#[tokio::test]
async fn a_replay_is_byte_exact_whatever_the_line_ends_and_frames_and_leaves_out_comments_between_events()
 {
    let tracker = replaying(ReplayPolicy::new()).build().unwrap();
    let h = Harness::start(tracker).await;
    let feed = h.feed("raw");
    let mut client = h.get("/sse/raw", Some("s1"), HeaderMap::new()).await;
    let frames: [&[u8]; 6] = [
        b"id: a\r\nda",
        b"ta: 1\r\n\r\n: app ping\n\n",
        b"event: x\rid: b\rdata: 2\r",
        b"\rdata: no id, follows b\n\nid: c\n",
        b"data: multi\ndata: line\n\n",
        b"retry: 10\n\n",
    ];
    for frame in frames {
        feed.send(Bytes::from_static(frame)).unwrap();
    }
    client.read_until_suffix(b"retry: 10\n\n").await;
    drop((feed, client));
    let (_feed, mut client) = stream(&h, "raw", Some("s1"), with_last_id("a"), "").await;
    let expected: &[u8] =
        b"event: x\rid: b\rdata: 2\r\rdata: no id, follows b\n\nid: c\ndata: multi\ndata: line\n\nretry: 10\n\n";
    client.read_until_len(expected.len()).await;
    assert_eq!(
        String::from_utf8_lossy(&client.received),
        String::from_utf8_lossy(expected)
    );
    assert_eq!(replay_header(&client), Some("complete; events=4"));
}

#[tokio::test]
async fn history_gone_is_said_in_the_header_the_gap_event_and_the_extension_never_replayed_in_part()
{
    let policy = ReplayPolicy::new()
        .max_events(NonZeroUsize::new(3).unwrap())
        .gap_event("replay-gap");
    let (tracker, metrics) = build_recorded(replaying(policy));
    let h = Harness::start(tracker).await;
    let (feed, client) = stream(&h, "chat", Some("s1"), HeaderMap::new(), &events(1..=6)).await;
    drop((feed, client));
    // Event 2 was dropped by the stream's bound (it keeps 4 to 6).
    let (feed, mut client) = stream(&h, "chat", Some("s1"), with_last_id("2"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=evicted"));
    assert_eq!(h.seen("chat").replay, Some(Replay::Gap(GapReason::Evicted)));
    feed.send(Bytes::from(event(7))).unwrap();
    let expected = format!("event: replay-gap\ndata: evicted\n\n{}", event(7));
    client.read_until_len(expected.len()).await;
    assert_eq!(String::from_utf8_lossy(&client.received), expected);
    drop((feed, client));
    // That response did not continue the history: it restarted it, and 5 is from before.
    let (feed, client) = stream(&h, "chat", Some("s1"), with_last_id("5"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=unknown_id"));
    drop((feed, client));
    // A stream never seen here.
    let (_feed, client) = stream(&h, "other", Some("s2"), with_last_id("5"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=no_history"));
    assert_eq!(
        h.seen("other").replay,
        Some(Replay::Gap(GapReason::NoHistory))
    );
    for reason in ["evicted", "unknown_id", "no_history"] {
        assert_eq!(
            metrics.value(names::REPLAYS_TOTAL, &[("outcome", reason)]),
            1.0,
            "{reason}"
        );
    }
    assert_eq!(
        metrics.value(names::REPLAY_EVICTIONS_TOTAL, &[("cause", "events")]),
        3.0
    );
}

#[tokio::test]
async fn without_replay_or_last_event_id_responses_carry_no_replay_and_no_header() {
    let h = Harness::start(common::no_heartbeat()).await;
    let (_feed, client) = stream(&h, "plain", None, with_last_id("3"), &event(1)).await;
    assert_eq!(replay_header(&client), None);
    assert_eq!(h.seen("plain").replay, None);
    assert_eq!(client.received, event(1).as_bytes());
}

#[tokio::test]
async fn an_id_that_two_streams_of_the_owner_logged_is_never_replayed_from_either() {
    let h = Harness::start(replaying(ReplayPolicy::new()).build().unwrap()).await;
    // Two tabs of one owner read the route at once (streams "GET /sse/tabs" and "… #2"), and
    // number their events the same way.
    let (a, ca) = stream(&h, "tabs", Some("s1"), HeaderMap::new(), &events(1..=2)).await;
    let (b, cb) = stream(&h, "tabs", Some("s1"), HeaderMap::new(), &events(1..=3)).await;
    drop((a, ca, b, cb));
    // `resume` says what the layer does: nothing replayed (failed before: it answered
    // `Replayed` from the first stream's log).
    let key = common::key("s1", "GET /sse/tabs");
    let one = tower_sse_tracker::EventId::new("1").unwrap();
    assert!(
        matches!(
            h.tracker.resume(&key, Some(&one)).await.unwrap(),
            tower_sse_tracker::Resume::Gap {
                reason: GapReason::NoHistory,
                ..
            }
        ),
        "{:?}",
        h.tracker.resume(&key, Some(&one)).await
    );
    let (_feed, client) = stream(&h, "tabs", Some("s1"), with_last_id("1"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=no_history"));
    assert_eq!(
        h.seen("tabs").replay,
        Some(Replay::Gap(GapReason::NoHistory))
    );
    // An id only one of them logged is replayed from that one (the empty answer to the gap
    // above wrote nothing, so it replaced no history).
    let (_feed, client) = stream(&h, "tabs", Some("s1"), with_last_id("3"), "").await;
    assert_eq!(replay_header(&client), Some("complete; events=0"));
}

#[tokio::test]
async fn a_shared_feed_whose_logging_reader_left_replays_nothing_as_complete() {
    let (tracker, metrics) = build_recorded(replaying(ReplayPolicy::new()));
    let h = Harness::start(tracker).await;
    // Readers A and B of one feed: A's body writes the log, B's goes unlogged.
    let (a, ca) = stream(&h, "feed", None, HeaderMap::new(), &events(1..=3)).await;
    let (b, mut cb) = stream(&h, "feed", None, HeaderMap::new(), &events(1..=3)).await;
    // A leaves; the feed goes on for B alone: 4 and 5 reach B's connection, which breaks.
    drop((a, ca));
    wait_for(|| metrics.sum(names::STREAMS_ENDED_TOTAL) >= 1.0).await;
    b.send(Bytes::from(events(4..=5))).unwrap();
    cb.read_until_suffix(event(5).as_bytes()).await;
    drop((b, cb));
    // B reconnects with 3: 4 and 5 were never logged, so no replay can be complete.
    let (_feed, client) = stream(&h, "feed", None, with_last_id("3"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=no_history"));
}

/// An application whose response depends on `?kind=`: `events` (1 to 5), `empty` (an SSE body
/// with nothing in it, known empty), `bom` (event 6 after a byte order mark), `gzip` (an SSE
/// body with a `Content-Encoding`).
async fn kinds_app(tracker: &SseTracker) -> std::net::SocketAddr {
    use axum::body::Body;
    use axum::extract::Query;
    use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
    use axum::response::{IntoResponse, Response};
    async fn handler(Query(q): Query<std::collections::HashMap<String, String>>) -> Response {
        let sse = [(CONTENT_TYPE, "text/event-stream")];
        match q.get("kind").map(String::as_str) {
            Some("events") => (sse, events(1..=5)).into_response(),
            Some("empty") => (sse, Body::empty()).into_response(),
            Some("bom") => (sse, "\u{FEFF}id: 6\ndata: x\n\n").into_response(),
            Some("gzip") => (sse, [(CONTENT_ENCODING, "gzip")], "not really gzip").into_response(),
            _ => unreachable!(),
        }
    }
    let app = axum::Router::new()
        .route("/stream", axum::routing::get(handler))
        .layer(tracker.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

#[tokio::test]
async fn a_replay_goes_out_before_an_empty_body_without_a_leading_bom_and_never_into_compressed_bytes()
 {
    let tracker = replaying(ReplayPolicy::new()).build().unwrap();
    let addr = kinds_app(&tracker).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let get = |kind: &str, last: Option<&str>| {
        let mut req = http
            .get(format!("http://{addr}/stream?kind={kind}"))
            .header("mcp-session-id", "s1");
        if let Some(id) = last {
            req = req.header("last-event-id", id);
        }
        async move {
            let response = req.send().await.unwrap();
            let header = response
                .headers()
                .get(REPLAY_HEADER)
                .map(|v| v.to_str().unwrap().to_owned());
            (header, response.bytes().await.unwrap())
        }
    };
    let (_, body) = get("events", None).await;
    assert_eq!(body, events(1..=5).as_bytes());
    // The application has nothing more: its body is empty, and says so.
    let (header, body) = get("empty", Some("3")).await;
    assert_eq!(header.as_deref(), Some("complete; events=2"));
    assert_eq!(
        body,
        events(4..=5).as_bytes(),
        "the replay is sent all the same"
    );
    // The application's next body starts with a byte order mark: mid-stream, it is dropped,
    // from what the client reads and from the log.
    let (header, body) = get("bom", Some("5")).await;
    assert_eq!(header.as_deref(), Some("complete; events=0"));
    assert_eq!(body, "id: 6\ndata: x\n\n".as_bytes());
    let (_, body) = get("empty", Some("5")).await;
    assert_eq!(
        body,
        "id: 6\ndata: x\n\n".as_bytes(),
        "replayed without the mark"
    );
    // Compressed: no replay can go in, and the client is told.
    let (header, body) = get("gzip", Some("5")).await;
    assert_eq!(header.as_deref(), Some("gap; reason=encoded"));
    assert_eq!(body, "not really gzip".as_bytes());
}

#[tokio::test]
async fn resume_answers_what_the_layer_replays_or_why_it_cannot() {
    use tower_sse_tracker::{EventId, Resume, StreamKey, StreamName};
    let tracker = replaying(ReplayPolicy::new().max_events(NonZeroUsize::new(3).unwrap()))
        .build()
        .unwrap();
    let h = Harness::start(tracker.clone()).await;
    let (_feed, _client) = stream(&h, "news", None, HeaderMap::new(), &events(1..=5)).await;
    let key = StreamKey::unowned(StreamName::new("GET /sse/news").unwrap());
    let id = |s: &str| EventId::new(s).unwrap();
    // 4 and 5 are in the log after 3: the layer replays them.
    let Ok(Resume::Replayed {
        events: 2,
        last_event_id,
        position,
        ..
    }) = tracker.resume(&key, Some(&id("3"))).await
    else {
        panic!("{:?}", tracker.resume(&key, Some(&id("3"))).await);
    };
    assert_eq!(last_event_id.as_str(), "5");
    assert_eq!(position.offset, 4);
    // 1 was evicted by the bound of 3 events: nothing is replayed, and the latest id is 5.
    assert_eq!(
        tracker.resume(&key, Some(&id("1"))).await.unwrap(),
        Resume::Gap {
            client: id("1"),
            reason: GapReason::Evicted,
            latest: Some(id("5")),
        }
    );
    // A client that missed nothing is current, as without replay.
    assert_eq!(
        tracker.resume(&key, Some(&id("5"))).await.unwrap(),
        Resume::Current(id("5"))
    );
}
