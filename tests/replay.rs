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
    let (_feed, client) = stream(&h, "tabs", Some("s1"), with_last_id("1"), "").await;
    assert_eq!(replay_header(&client), Some("gap; reason=no_history"));
    assert_eq!(
        h.seen("tabs").replay,
        Some(Replay::Gap(GapReason::NoHistory))
    );
    // An id only one of them logged is replayed from that one.
    let (_feed, client) = stream(&h, "tabs", Some("s1"), with_last_id("2"), "").await;
    assert_eq!(replay_header(&client), Some("complete; events=1"));
}
