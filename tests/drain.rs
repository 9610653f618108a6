//! Draining open streams for a deploy, and heartbeats before a leading byte order mark.

mod common;

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::{Harness, build_recorded, key, no_heartbeat, reference};
use tokio::time::timeout;
use tower_sse_tracker::SseTracker;
use tower_sse_tracker::metrics::STREAMS_DRAINED_TOTAL;
use tower_sse_tracker::store::InMemoryStore;

/// The id of the last whole event a client read (as an `EventSource` would report it).
fn last_id(received: &[u8]) -> Option<String> {
    reference::parse(received, 1024).commits.last().cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_ends_idle_mid_event_and_busy_streams_at_event_boundaries() {
    let store = std::sync::Arc::new(InMemoryStore::new());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .store(store.clone()),
    );
    let h = Harness::start(tracker).await;
    // Idle between events.
    let idle_feed = h.feed("idle");
    let mut idle = h.get("/sse/idle", Some("idle"), HeaderMap::new()).await;
    idle_feed
        .send(Bytes::from_static(b"id: 1\ndata: a\n\n"))
        .unwrap();
    idle.read_until_suffix(b"data: a\n\n").await;
    // In the middle of an event.
    let mid_feed = h.feed("mid");
    let mut mid = h.get("/sse/mid", Some("mid"), HeaderMap::new()).await;
    mid_feed
        .send(Bytes::from_static(b"id: 1\n\nid: 2\ndata: ha"))
        .unwrap();
    mid.read_until_suffix(b"data: ha").await;
    // Busy: an event every 5 ms.
    let busy_feed = h.feed("busy");
    let mut busy = h.get("/sse/busy", Some("busy"), HeaderMap::new()).await;
    let sender = tokio::spawn(async move {
        for n in 1.. {
            if busy_feed
                .send(Bytes::from(format!("id: {n}\ndata: tick\n\n")))
                .is_err()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    busy.read_until_len(200).await;

    h.tracker.drain(Some(Duration::from_millis(1500)));
    const RETRY: &[u8] = b"retry: 1500\n\n";
    let within = Duration::from_secs(10);
    timeout(within, idle.read_to_end())
        .await
        .expect("the idle stream ends");
    assert!(
        idle.received.ends_with(RETRY),
        "{:?}",
        String::from_utf8_lossy(&idle.received)
    );
    timeout(within, busy.read_to_end())
        .await
        .expect("the busy stream ends");
    assert!(busy.received.ends_with(RETRY));
    // The stream in the middle of an event waits for the event to be complete.
    assert!(
        timeout(Duration::from_millis(300), mid.read_chunk())
            .await
            .is_err(),
        "nothing may end the event early"
    );
    mid_feed.send(Bytes::from_static(b"lf\n\n")).unwrap();
    timeout(within, mid.read_to_end())
        .await
        .expect("the mid-event stream ends after its event");
    assert!(mid.received.ends_with(b"data: half\n\nretry: 1500\n\n"));
    sender.abort();
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "boundary")]),
        3.0
    );

    // Every client's last id is the tracker's latest, and once shut down, the store's.
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    for (name, client) in [("idle", &idle), ("mid", &mid), ("busy", &busy)] {
        let seen = last_id(&client.received).expect("an id");
        let k = key(name, &format!("GET /sse/{name}"));
        assert_eq!(
            h.tracker.last_event_id(&k).unwrap(),
            seen.as_str(),
            "{name}"
        );
        assert_eq!(store.get(&k).unwrap().id, seen.as_str(), "{name}");
        // No event was cut: every event the client read is whole.
        assert!(
            client.received.ends_with(b"\n\n"),
            "{name}: {:?}",
            String::from_utf8_lossy(&client.received)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_stream_whose_frames_all_end_inside_events_is_cut_after_an_event() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let h = Harness::start(tracker).await;
    let feed = h.feed("relay");
    let mut client = h.get("/sse/relay", Some("relay"), HeaderMap::new()).await;
    // As a proxy relaying upstream reads: every frame completes one event and starts the
    // next, so no frame ever ends at an event boundary.
    let sender = tokio::spawn(async move {
        for n in 1u64.. {
            let frame = if n == 1 {
                "id: 1\ndata: sta".to_owned()
            } else {
                format!("rt\n\nid: {n}\ndata: sta")
            };
            if feed.send(Bytes::from(frame)).is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    client.read_until_len(200).await;
    h.tracker.drain(Some(Duration::from_millis(700)));
    timeout(Duration::from_secs(10), client.read_to_end())
        .await
        .expect("the relayed stream ends although none of its frames ends at a boundary");
    sender.abort();
    assert!(
        client.received.ends_with(b"data: start\n\nretry: 700\n\n"),
        "{:?}",
        String::from_utf8_lossy(&client.received)
    );
    let seen = last_id(&client.received).expect("an id");
    assert_eq!(
        h.tracker
            .last_event_id(&key("relay", "GET /sse/relay"))
            .unwrap(),
        seen.as_str()
    );
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "boundary")]),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_stuck_inside_an_event_ends_at_the_drain_timeout_without_its_id() {
    let store = std::sync::Arc::new(InMemoryStore::new());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .drain_timeout(Duration::from_millis(300))
            .store(store.clone()),
    );
    let h = Harness::start(tracker).await;
    let feed = h.feed("stuck");
    let mut client = h.get("/sse/stuck", Some("stuck"), HeaderMap::new()).await;
    feed.send(Bytes::from_static(b"id: 1\n\nid: 2\ndata: never fini"))
        .unwrap();
    client.read_until_suffix(b"never fini").await;
    let started = std::time::Instant::now();
    h.tracker.drain(Some(Duration::from_millis(700)));
    timeout(Duration::from_secs(10), client.read_to_end())
        .await
        .expect("the stuck stream ends at the drain timeout");
    // Not before the timeout: until then the event could still have been completed.
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The client discards the incomplete event; so did the tracker.
    assert!(client.received.ends_with(b"never fini"));
    assert_eq!(last_id(&client.received).as_deref(), Some("1"));
    let k = key("stuck", "GET /sse/stuck");
    assert_eq!(h.tracker.last_event_id(&k).unwrap(), "1");
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "deadline")]),
        1.0
    );
    assert!(
        h.tracker
            .shutdown(Duration::from_secs(5))
            .await
            .is_complete()
    );
    assert_eq!(store.get(&k).unwrap().id, "1");
    drop(feed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_untracked_stream_without_heartbeats_is_drained_too() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let h = Harness::start(tracker).await;
    let feed = h.feed("anon");
    // No session header: not tracked (reason no_session), still an SSE body of the layer.
    let mut client = h.get("/sse/anon", None, HeaderMap::new()).await;
    feed.send(Bytes::from_static(b"id: 1\ndata: a\n\n"))
        .unwrap();
    client.read_until_suffix(b"data: a\n\n").await;
    assert_eq!(
        recorded.value(
            tower_sse_tracker::metrics::UNTRACKED_STREAMS_TOTAL,
            &[("reason", "no_session")]
        ),
        1.0
    );
    h.tracker.drain(None);
    timeout(Duration::from_secs(10), client.read_to_end())
        .await
        .expect("the untracked stream ends");
    assert_eq!(client.received, b"id: 1\ndata: a\n\n");
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "boundary")]),
        1.0
    );
    drop(feed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_completes_once_the_streams_are_drained() {
    let tracker = no_heartbeat();
    let app = axum::Router::new()
        .route(
            "/events",
            axum::routing::get(|| async {
                // An endless stream, as most SSE endpoints are.
                let ticks = futures_util::stream::unfold(0u64, |n| async move {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Some((
                        Ok::<_, std::convert::Infallible>(
                            axum::response::sse::Event::default()
                                .id(n.to_string())
                                .data("tick"),
                        ),
                        n + 1,
                    ))
                });
                axum::response::sse::Sse::new(ticks)
            }),
        )
        .layer(tracker.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let draining = tracker.clone();
    let server = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
                draining.drain(None);
            })
            .await
            .unwrap();
    });
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut clients = Vec::new();
    for c in 0..3 {
        let response = http
            .get(format!("http://{addr}/events"))
            .header("mcp-session-id", format!("g{c}"))
            .send()
            .await
            .unwrap();
        clients.push(tokio::spawn(async move {
            let mut body = response.bytes_stream();
            let mut received = Vec::new();
            while let Some(Ok(chunk)) = futures_util::StreamExt::next(&mut body).await {
                received.extend_from_slice(&chunk);
            }
            received
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    timeout(Duration::from_secs(10), server)
        .await
        .expect("the server stopped once its streams were drained")
        .unwrap();
    for (c, client) in clients.into_iter().enumerate() {
        let received = client.await.unwrap();
        let seen = last_id(&received).expect("an id");
        let k = key(&format!("g{c}"), "GET /events");
        assert_eq!(tracker.last_event_id(&k).unwrap(), seen.as_str());
    }
    assert!(tracker.shutdown(Duration::from_secs(5)).await.is_complete());
}

#[tokio::test(start_paused = true)]
async fn a_heartbeat_before_a_leading_bom_drops_the_bom_so_the_client_reads_the_same() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    for (name, frames, inner) in [
        (
            "split",
            &[&b"\xEF\xBB"[..], &b"\xBFid:1\n\n"[..]][..],
            &b"\xEF\xBB\xBFid:1\n\n"[..],
        ),
        (
            "whole",
            &[&b"\xEF\xBB\xBFdata:x\n\n"[..]][..],
            &b"\xEF\xBB\xBFdata:x\n\n"[..],
        ),
        // Not a byte order mark: the bytes withheld while it looked like one are content.
        (
            "fake",
            &[&b"\xEF"[..], &b"Aid:2\n\n"[..]][..],
            &b"\xEFAid:2\n\n"[..],
        ),
    ] {
        let tx = h.feed(name);
        let mut client = h
            .get(&format!("/sse/{name}"), Some(name), HeaderMap::new())
            .await;
        // Idle before the first byte: a heartbeat goes out first.
        client.read_until_suffix(b": keep-alive\n\n").await;
        for frame in frames {
            tx.send(Bytes::copy_from_slice(frame)).unwrap();
        }
        drop(tx);
        client.read_to_end().await;
        // What the client reads is what it would have read with no heartbeat at all.
        let with = reference::parse(&client.received, 1024);
        let without = reference::parse(inner, 1024);
        assert_eq!(with.events, without.events, "{name}");
        assert_eq!(with.commits, without.commits, "{name}");
        if name == "fake" {
            assert!(
                client.received.ends_with(b"\xEFAid:2\n\n"),
                "{name}: bytes kept"
            );
        }
    }
    assert_eq!(
        h.tracker
            .last_event_id(&key("split", "GET /sse/split"))
            .unwrap(),
        "1"
    );
}

#[tokio::test(start_paused = true)]
async fn only_the_first_bom_is_dropped_however_many_heartbeats_come_before_the_next() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let tx = h.feed("twice");
    let mut client = h.get("/sse/twice", Some("twice"), HeaderMap::new()).await;
    const HEARTBEAT: &[u8] = b": keep-alive\n\n";
    client.read_until_len(HEARTBEAT.len()).await;
    // Exactly a BOM: dropped. Then idle again, a heartbeat, and a second BOM, which is
    // content (a client drops only the very first bytes' BOM).
    tx.send(Bytes::from_static(b"\xEF\xBB\xBF")).unwrap();
    client.read_until_len(2 * HEARTBEAT.len()).await;
    tx.send(Bytes::from_static(b"\xEF\xBB\xBFid:1\n\n"))
        .unwrap();
    drop(tx);
    client.read_to_end().await;
    let inner = b"\xEF\xBB\xBF\xEF\xBB\xBFid:1\n\n";
    let with = reference::parse(&client.received, 1024);
    let without = reference::parse(inner, 1024);
    assert_eq!(with.commits, without.commits);
    assert!(
        without.commits.is_empty(),
        "the second BOM makes the line no id"
    );
    assert!(client.received.ends_with(b"\xEF\xBB\xBFid:1\n\n"));
    assert_eq!(
        h.tracker.last_event_id(&key("twice", "GET /sse/twice")),
        None
    );
}

/// Withheld bytes of what looked like a BOM go out before the inner body's trailers; the
/// trailers follow, and the body ends.
#[tokio::test(start_paused = true)]
async fn bytes_withheld_as_a_possible_bom_are_sent_before_trailers() {
    use http_body_util::BodyExt;
    use tower::{Layer, ServiceExt};

    let tracker = SseTracker::builder().build().unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<http_body::Frame<Bytes>>();
    let rx = std::sync::Arc::new(std::sync::Mutex::new(Some(rx)));
    let inner = tower::service_fn(move |_req: http::Request<()>| {
        let frames = rx.lock().unwrap().take().expect("one request");
        async move {
            let frames = futures_util::StreamExt::map(
                tokio_stream::wrappers::UnboundedReceiverStream::new(frames),
                Ok::<_, std::convert::Infallible>,
            );
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .header("content-type", "text/event-stream")
                    .body(http_body_util::StreamBody::new(frames))
                    .unwrap(),
            )
        }
    });
    let service = tracker.layer().layer(inner);
    let response = service
        .oneshot(
            http::Request::builder()
                .uri("/t")
                .header("mcp-session-id", "t")
                .body(())
                .unwrap(),
        )
        .await
        .unwrap();
    let mut body = response.into_body();
    // Idle: a heartbeat first.
    let first = body.frame().await.unwrap().unwrap();
    assert_eq!(first.into_data().unwrap(), &b": keep-alive\n\n"[..]);
    tx.send(http_body::Frame::data(Bytes::from_static(b"\xEF\xBB")))
        .unwrap();
    let mut trailers = http::HeaderMap::new();
    trailers.insert("x-done", http::HeaderValue::from_static("1"));
    tx.send(http_body::Frame::trailers(trailers.clone()))
        .unwrap();
    drop(tx);
    let withheld = body.frame().await.unwrap().unwrap();
    assert_eq!(withheld.into_data().unwrap(), &b"\xEF\xBB"[..]);
    assert!(!http_body::Body::is_end_stream(&body));
    let last = body.frame().await.unwrap().unwrap();
    assert_eq!(last.into_trailers().unwrap(), trailers);
    assert!(body.frame().await.is_none());
}
