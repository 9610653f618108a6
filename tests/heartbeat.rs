//! `test_sse_heartbeat*`: heartbeats over a real socket, with tokio's clock paused so that
//! 15-second idle periods take no real time.

mod common;

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::names::HEARTBEATS_TOTAL;
use common::{Client, Harness, build_recorded, key, no_heartbeat, reference};
use tokio::sync::mpsc::UnboundedSender;
use tokio::time::{Instant, timeout};
use tower_sse_tracker::SseTracker;

const EVENT_HB: &[u8] = b": keep-alive\n\n";
const LINE_HB: &[u8] = b": keep-alive\n";
const INTERVAL: Duration = Duration::from_secs(15);

async fn open(h: &Harness, name: &str) -> (UnboundedSender<Bytes>, Client) {
    let tx = h.feed(name);
    let client = h
        .get(&format!("/sse/{name}"), Some("s1"), HeaderMap::new())
        .await;
    (tx, client)
}

async fn send(tx: &UnboundedSender<Bytes>, client: &mut Client, bytes: &'static [u8]) {
    let before = client.received.len();
    tx.send(Bytes::from_static(bytes)).unwrap();
    client.read_until_len(before + bytes.len()).await;
    assert_eq!(&client.received[before..], bytes);
}

/// Asserts that nothing arrives for `d`.
async fn quiet_for(client: &mut Client, d: Duration) {
    let before = client.received.len();
    assert!(
        timeout(d, client.read_chunk()).await.is_err(),
        "expected silence, got {:?}",
        String::from_utf8_lossy(&client.received[before..])
    );
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_after_each_idle_interval() {
    let (tracker, recorded) = build_recorded(SseTracker::builder());
    let h = Harness::start(tracker).await;
    let t0 = Instant::now();
    let (_tx, mut client) = open(&h, "idle").await;
    client.read_until_suffix(EVENT_HB).await;
    let first = t0.elapsed();
    assert!(
        first >= INTERVAL && first < INTERVAL + Duration::from_secs(1),
        "{first:?}"
    );
    client.read_until_len(2 * EVENT_HB.len()).await;
    let second = t0.elapsed();
    assert!(
        second >= 2 * INTERVAL && second < 2 * INTERVAL + Duration::from_secs(1),
        "{second:?}"
    );
    assert_eq!(client.received, [EVENT_HB, EVENT_HB].concat());
    assert_eq!(recorded.value(HEARTBEATS_TOTAL, &[]), 2.0);
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_never_inside_a_half_written_line() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let (tx, mut client) = open(&h, "mid").await;
    send(&tx, &mut client, b"id: 1\ndata: hal").await;
    // Four intervals of silence in the middle of a line: no heartbeat.
    quiet_for(&mut client, 4 * INTERVAL).await;
    send(&tx, &mut client, b"f\n\n").await;
    assert_eq!(client.received, b"id: 1\ndata: half\n\n");
    // At the boundary the heartbeats resume.
    client.read_until_suffix(EVENT_HB).await;
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/mid")).unwrap(),
        "1"
    );
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_is_a_comment_line_only_inside_an_event() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let (tx, mut client) = open(&h, "line").await;
    send(&tx, &mut client, b"id: 7\ndata: a\n").await;
    client.read_until_suffix(LINE_HB).await;
    // A blank line here would have dispatched the event early; the next data line must still
    // belong to the same event.
    send(&tx, &mut client, b"data: b\n\n").await;
    client.read_until_suffix(EVENT_HB).await;
    let expected: &[u8] = b"id: 7\ndata: a\n: keep-alive\ndata: b\n\n: keep-alive\n\n";
    assert_eq!(client.received, expected);
    let parsed = reference::parse(&client.received, 1024);
    assert_eq!(parsed.events, [("7".to_owned(), "a\nb".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_after_a_trailing_cr_keeps_the_crlf_pair() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let (tx, mut client) = open(&h, "cr").await;
    send(&tx, &mut client, b"id: 1\r\ndata: x\r").await;
    client.read_until_suffix(b": keep-alive\r").await;
    // The LF that completes the inner CRLF now pairs with the heartbeat's CR.
    send(&tx, &mut client, b"\n\r\n").await;
    let inner: &[u8] = b"id: 1\r\ndata: x\r\n\r\n";
    assert_eq!(
        reference::parse(&client.received, 1024),
        reference::parse(inner, 1024)
    );
    assert_eq!(reference::parse(&client.received, 1024).events.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_timer_is_reset_by_every_frame() {
    let (tracker, recorded) = build_recorded(SseTracker::builder());
    let h = Harness::start(tracker).await;
    let (tx, mut client) = open(&h, "reset").await;
    // A frame every 10 s, four times: never 15 s of silence, so no heartbeat.
    for _ in 0..4 {
        send(&tx, &mut client, b"data: tick\n\n").await;
        quiet_for(&mut client, Duration::from_secs(10)).await;
    }
    assert_eq!(client.received, b"data: tick\n\n".repeat(4));
    assert_eq!(recorded.value(HEARTBEATS_TOTAL, &[]), 0.0);
    // 5 s more makes 15 s since the last frame.
    let t = Instant::now();
    client.read_until_suffix(EVENT_HB).await;
    assert!(t.elapsed() <= Duration::from_secs(6), "{:?}", t.elapsed());
    assert_eq!(recorded.value(HEARTBEATS_TOTAL, &[]), 1.0);
}

#[tokio::test(start_paused = true)]
async fn test_sse_heartbeat_uses_the_configured_interval_and_text_or_none() {
    let h = Harness::start(
        SseTracker::builder()
            .heartbeat_interval(Some(Duration::from_secs(2)))
            .heartbeat_comment("ping")
            .build()
            .unwrap(),
    )
    .await;
    let (_tx, mut client) = open(&h, "cfg").await;
    let t = Instant::now();
    client.read_until_suffix(b": ping\n\n").await;
    assert!(t.elapsed() < Duration::from_secs(3));

    let h = Harness::start(no_heartbeat()).await;
    let (_tx, mut client) = open(&h, "off").await;
    quiet_for(&mut client, 10 * INTERVAL).await;
    assert!(client.received.is_empty());
}
