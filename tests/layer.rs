//! The layer end to end over 127.0.0.1: what it passes through, what it tracks, what it adds.

mod common;

use std::convert::Infallible;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use common::names::{
    EVENTS_TOTAL, REASON_LRU, STREAMS_ACTIVE, STREAMS_EVICTED_TOTAL, UNTRACKED_STREAMS_TOTAL,
};
use common::{Harness, build_recorded, key, no_heartbeat, run_frames};
use http_body_util::{BodyExt, Full};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::{SseTracker, StreamKey, StreamName};

#[tokio::test]
async fn sse_bytes_pass_through_unchanged_and_in_order() {
    let h = Harness::start(no_heartbeat()).await;
    // Frames that cut every kind of line end, a BOM, multi-byte UTF-8 and large data.
    let big = "é".repeat(40_000);
    let frames: Vec<Vec<u8>> = vec![
        b"\xEF\xBB".to_vec(),
        b"\xBFid: 1\r".to_vec(),
        b"\ndata: caf\xC3".to_vec(),
        b"\xA9\r\n\r".to_vec(),
        b"\n: comment\rid: 2\rdata: ".to_vec(),
        big.clone().into_bytes(),
        b"\r\r".to_vec(),
        vec![0, 1, 2, 255, b'\n', b'\n'],
    ];
    let refs: Vec<&[u8]> = frames.iter().map(Vec::as_slice).collect();
    let client = run_frames(&h, "exact", Some("s1"), &refs).await;
    assert_eq!(client.received, frames.concat());
    assert_eq!(
        h.tracker
            .last_event_id(&key("s1", "GET /sse/exact"))
            .unwrap(),
        "2"
    );
}

#[tokio::test]
async fn non_sse_response_passes_through_untouched() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let response = h
        .client
        .get(h.url("/plain"))
        .header("mcp-session-id", "s1")
        .send()
        .await
        .unwrap();
    let headers = response.headers().clone();
    let body = response.bytes().await.unwrap();
    assert_eq!(&body[..], b"id: 1\n\nnot an event stream");
    // The length survives (no wrapper hides it), and no SSE header is added.
    assert_eq!(headers["content-length"], "26");
    assert!(headers.get("transfer-encoding").is_none());
    assert!(headers.get("cache-control").is_none());
    assert!(headers.get("x-accel-buffering").is_none());
    assert_eq!(h.tracker.tracked_streams(), 0);
}

#[tokio::test]
async fn non_sse_body_is_not_wrapped() {
    let tracker = SseTracker::builder().build().unwrap();
    let mut svc =
        ServiceBuilder::new()
            .layer(tracker.layer())
            .service_fn(|_req: http::Request<()>| async {
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(b"hello"))))
            });
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(http::Request::new(()))
        .await
        .unwrap();
    let body = response.into_body();
    assert!(!body.is_scanned());
    assert_eq!(http_body::Body::size_hint(&body).exact(), Some(5));
    assert_eq!(&body.collect().await.unwrap().to_bytes()[..], b"hello");
}

#[tokio::test]
async fn sse_response_gets_no_cache_and_no_proxy_buffering_headers() {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let client = run_frames(&h, "h", Some("s1"), &[b"data: x\n\n"]).await;
    assert_eq!(client.headers["cache-control"], "no-cache");
    assert_eq!(client.headers["x-accel-buffering"], "no");

    let h = Harness::start(SseTracker::builder().proxy_buffering(true).build().unwrap()).await;
    let client = run_frames(&h, "h", Some("s1"), &[b"data: x\n\n"]).await;
    assert!(client.headers.get("x-accel-buffering").is_none());
}

#[tokio::test]
async fn two_streams_of_one_session_are_kept_apart() {
    let h = Harness::start(no_heartbeat()).await;
    let a = h.feed("a");
    let b = h.feed("b");
    let mut ca = h.get("/sse/a", Some("s1"), HeaderMap::new()).await;
    let mut cb = h.get("/sse/b", Some("s1"), HeaderMap::new()).await;
    a.send(Bytes::from_static(b"id: a1\n\n")).unwrap();
    ca.read_until_suffix(b"a1\n\n").await;
    b.send(Bytes::from_static(b"id: b1\n\n")).unwrap();
    cb.read_until_suffix(b"b1\n\n").await;
    a.send(Bytes::from_static(b"id: a2\n\n")).unwrap();
    ca.read_until_suffix(b"a2\n\n").await;
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/a")).unwrap(),
        "a2"
    );
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/b")).unwrap(),
        "b1"
    );
    let mut streams = h
        .tracker
        .owner_streams(&tower_sse_tracker::Owner::new("s1").unwrap());
    streams.sort();
    let streams: Vec<(String, String)> = streams
        .into_iter()
        .map(|(n, id)| (n.to_string(), id.unwrap().to_string()))
        .collect();
    assert_eq!(
        streams,
        [
            ("GET /sse/a".to_owned(), "a2".to_owned()),
            ("GET /sse/b".to_owned(), "b1".to_owned())
        ]
    );
}

#[tokio::test]
async fn streams_of_two_sessions_on_one_path_are_kept_apart() {
    let h = Harness::start(no_heartbeat()).await;
    run_frames(&h, "p1", Some("s1"), &[b"id: one\n\n"]).await;
    run_frames(&h, "p2", Some("s2"), &[b"id: two\n\n"]).await;
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/p1")).unwrap(),
        "one"
    );
    assert_eq!(
        h.tracker.last_event_id(&key("s2", "GET /sse/p2")).unwrap(),
        "two"
    );
    assert_eq!(h.tracker.last_event_id(&key("s1", "GET /sse/p2")), None);
}

/// A request whose session header is missing or invalid is anonymous: its GET reads the
/// route's feed, tracked with no owner, and the handler gets no session.
#[tokio::test]
async fn a_bad_or_missing_session_header_makes_a_get_read_its_routes_feed() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let h = Harness::start(tracker).await;
    let too_long = "x".repeat(129);
    for (name, session) in [
        ("space", Some("has space")),
        ("long", Some(too_long.as_str())),
        ("nonascii", None),
        ("absent", None),
    ] {
        let tx = h.feed(name);
        let mut headers = HeaderMap::new();
        if name == "nonascii" {
            headers.insert(
                "mcp-session-id",
                HeaderValue::from_bytes(b"caf\xe9").unwrap(),
            );
        }
        let mut client = h.get(&format!("/sse/{name}"), session, headers).await;
        tx.send(Bytes::from_static(b"id: 1\ndata: x\n\n")).unwrap();
        drop(tx);
        assert_eq!(client.read_to_end().await, b"id: 1\ndata: x\n\n");
        // The handler did not get a session extension, and got the feed's key.
        let seen = h.seen(name);
        assert_eq!(seen.session, None, "{name}");
        let feed = StreamKey::unowned(StreamName::new(&format!("GET /sse/{name}")).unwrap());
        assert_eq!(seen.key.as_ref(), Some(&feed), "{name}");
        assert_eq!(h.tracker.last_event_id(&feed).unwrap(), "1", "{name}");
    }
    assert_eq!(h.tracker.tracked_streams(), 4);
    assert_eq!(recorded.sum(UNTRACKED_STREAMS_TOTAL), 0.0);
    assert_eq!(recorded.value(EVENTS_TOTAL, &[]), 4.0);
}

#[tokio::test]
async fn the_session_assigned_on_the_response_is_tracked() {
    let h = Harness::start(no_heartbeat()).await;
    let tx = h.feed("init");
    let mut client = h
        .get("/sse/init?assign=server-made", None, HeaderMap::new())
        .await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    drop(tx);
    client.read_to_end().await;
    assert_eq!(client.headers["mcp-session-id"], "server-made");
    assert_eq!(
        h.tracker
            .last_event_id(&key("server-made", "GET /sse/init"))
            .unwrap(),
        "1"
    );
}

#[tokio::test]
async fn a_stream_name_extension_overrides_the_default_name() {
    let h = Harness::start(no_heartbeat()).await;
    let tx = h.feed("n");
    let mut client = h
        .get("/sse/n?stream=notifications", Some("s1"), HeaderMap::new())
        .await;
    tx.send(Bytes::from_static(b"id: 9\n\n")).unwrap();
    drop(tx);
    client.read_to_end().await;
    assert_eq!(
        h.tracker
            .last_event_id(&key("s1", "notifications"))
            .unwrap(),
        "9"
    );
    assert_eq!(h.tracker.last_event_id(&key("s1", "GET /sse/n")), None);
}

#[tokio::test]
async fn the_handler_gets_the_validated_last_event_id_and_session() {
    let h = Harness::start(no_heartbeat()).await;
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_static("41"));
    let tx = h.feed("r");
    drop(tx);
    h.get("/sse/r", Some("s1"), headers)
        .await
        .read_to_end()
        .await;
    let common::Extensions {
        session,
        last_event_id: last,
        ..
    } = h.seen("r");
    assert_eq!(session.unwrap(), "s1");
    assert_eq!(last.unwrap().0, "41");

    // Longer than max_id_len: not passed on.
    let h = Harness::start(SseTracker::builder().max_id_len(4).build().unwrap()).await;
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_static("12345"));
    drop(h.feed("r"));
    h.get("/sse/r", Some("s1"), headers)
        .await
        .read_to_end()
        .await;
    assert_eq!(h.seen("r").last_event_id, None);
}

#[tokio::test]
async fn subscribers_see_each_new_latest_id() {
    let h = Harness::start(no_heartbeat()).await;
    let mut rx = h.tracker.subscribe(&key("s1", "GET /sse/w")).unwrap();
    let tx = h.feed("w");
    let mut client = h.get("/sse/w", Some("s1"), HeaderMap::new()).await;
    for n in 1..=3 {
        tx.send(Bytes::from(format!("id: {n}\ndata: x\n\n")))
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.changed())
            .await
            .expect("no new id within 5 s")
            .unwrap();
        assert_eq!(rx.borrow_and_update().as_ref().unwrap(), &*n.to_string());
    }
    drop(tx);
    client.read_to_end().await;
}

#[tokio::test]
async fn the_active_gauge_follows_open_tracked_streams() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let h = Harness::start(tracker).await;
    let tx = h.feed("g");
    let mut client = h.get("/sse/g", Some("s1"), HeaderMap::new()).await;
    tx.send(Bytes::from_static(b"id: 1\n\n")).unwrap();
    client.read_until_suffix(b"1\n\n").await;
    assert_eq!(recorded.value(STREAMS_ACTIVE, &[]), 1.0);
    // The client goes away mid-event: the body is dropped, the cut event is not committed.
    tx.send(Bytes::from_static(b"id: 2\ndata: half")).unwrap();
    client.read_until_suffix(b"half").await;
    drop(client);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while recorded.value(STREAMS_ACTIVE, &[]) != 0.0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "gauge did not return to 0"
        );
        // The server notices the closed connection on its next write.
        let _ = tx.send(Bytes::from_static(b"x"));
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        h.tracker.last_event_id(&key("s1", "GET /sse/g")).unwrap(),
        "1"
    );
    // A body adds its events to the shared counter in batches, and the rest when it ends.
    assert_eq!(recorded.value(EVENTS_TOTAL, &[]), 1.0);
}

#[tokio::test]
async fn a_full_registry_evicts_the_least_recently_used_stream_and_counts_it() {
    let store = std::sync::Arc::new(tower_sse_tracker::store::InMemoryStore::new());
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .max_streams(common::nz(2))
            .store(store.clone()),
    );
    let h = Harness::start(tracker).await;
    run_frames(&h, "first", Some("s1"), &[b"id: 1\n\n"]).await;
    run_frames(&h, "second", Some("s2"), &[b"id: 2\n\n"]).await;
    run_frames(&h, "third", Some("s3"), &[b"id: 3\n\n"]).await;
    assert_eq!(h.tracker.tracked_streams(), 2);
    let s1 = tower_sse_tracker::Owner::new("s1").unwrap();
    assert!(h.tracker.owner_streams(&s1).is_empty(), "s1 was evicted");
    assert_eq!(
        h.tracker
            .last_event_id(&key("s3", "GET /sse/third"))
            .unwrap(),
        "3"
    );
    assert_eq!(
        recorded.value(STREAMS_EVICTED_TOTAL, &[("reason", REASON_LRU)]),
        1.0
    );
    // The evicted stream's latest id still reaches the store, and resolve finds it there.
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(
        h.tracker
            .resolve(&key("s1", "GET /sse/first"))
            .await
            .unwrap()
            .unwrap(),
        "1"
    );
}

/// Failed on `ecccf3c`: `max_pending_evicted(usize::MAX)` built, then panicked on the first
/// request (an overflowing list bound); `max_stream_names(usize::MAX)` and
/// `channel_capacity(usize::MAX)` panicked inside `build()`. Settings meaning "no bound" either
/// work, with bounds that saturate, or are a `ConfigError`.
#[tokio::test]
async fn settings_meaning_no_bound_work_or_are_refused_never_panic() {
    use common::direct::{drive, frames_service, id_frames};
    use tower_sse_tracker::ConfigError;

    for (name, builder) in [
        (
            "max_pending_evicted",
            SseTracker::builder().max_pending_evicted(usize::MAX),
        ),
        (
            "max_streams",
            SseTracker::builder().max_streams(common::nz(usize::MAX)),
        ),
        (
            "max_stream_names",
            SseTracker::builder().max_stream_names(common::nz(usize::MAX)),
        ),
        (
            "all three",
            SseTracker::builder()
                .max_pending_evicted(usize::MAX)
                .max_streams(common::nz(usize::MAX))
                .max_stream_names(common::nz(usize::MAX)),
        ),
    ] {
        let tracker = builder.heartbeat_interval(None).build().unwrap();
        let mut svc = frames_service(&tracker);
        for s in 0..3 {
            drive(&mut svc, &format!("s{s}"), id_frames(2)).await;
        }
        assert_eq!(
            tracker.last_event_id(&key("s2", "GET /mcp")).unwrap(),
            "2",
            "{name}"
        );
        assert!(tracker.shutdown(Duration::from_secs(5)).await.is_complete());
    }
    let refused = SseTracker::builder()
        .channel_capacity(usize::MAX)
        .build()
        .unwrap_err();
    assert!(
        matches!(refused, ConfigError::ChannelCapacity(usize::MAX)),
        "{refused:?}"
    );
    println!("{refused}");
}

/// Each reason a stream is left untracked is logged at `WARN` once, naming the setting that
/// would track such streams, however many streams it applies to (each one is counted).
#[tokio::test(flavor = "current_thread")]
async fn each_reason_a_stream_is_left_untracked_is_logged_once_at_warn() {
    use common::direct::{Frames, frames_service, id_frames, request, respond};
    use common::names::{REASON_ANONYMOUS, REASON_REGISTRY_FULL};

    let (logs, _guard) = common::CapturedLogs::capture(tracing::Level::INFO);

    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .heartbeat_interval(None)
            .max_streams(common::nz(1)),
    );
    let mut svc = frames_service(&tracker);
    // Three anonymous POSTs: streams of their own that nothing can address.
    for _ in 0..3 {
        let mut req = http::Request::builder()
            .method("POST")
            .uri("/chat")
            .body(())
            .unwrap();
        req.extensions_mut().insert::<Frames>(id_frames(2));
        let mut body = respond(&mut svc, req).await.into_body();
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
    }
    // A registry of one stream, held by an open body: two more sessions find it full.
    let _open = respond(&mut svc, request("s1", id_frames(1))).await;
    for s in ["s2", "s3"] {
        let mut body = respond(&mut svc, request(s, id_frames(1)))
            .await
            .into_body();
        while body.frame().await.is_some() {}
    }
    let logs = logs.text();
    println!("{logs}");
    let warned = |reason: &str| {
        logs.lines()
            .filter(|line| line.contains("WARN") && line.contains(&format!("reason=\"{reason}\"")))
            .count()
    };
    assert_eq!(warned(REASON_ANONYMOUS), 1);
    assert!(logs.contains("OwnerSource::extension"), "names the setting");
    assert_eq!(
        recorded.value(UNTRACKED_STREAMS_TOTAL, &[("reason", REASON_ANONYMOUS)]),
        3.0
    );
    assert_eq!(warned(REASON_REGISTRY_FULL), 1);
    assert!(logs.contains("raise max_streams"), "names the setting");
    assert_eq!(
        recorded.value(UNTRACKED_STREAMS_TOTAL, &[("reason", REASON_REGISTRY_FULL)]),
        2.0
    );
}

/// Every metric name the tests (and dashboards) use is one the crate lists as public.
#[test]
fn every_metric_name_the_tests_use_is_in_the_public_list() {
    for name in common::names::NAMES {
        assert!(
            tower_sse_tracker::metrics::ALL.contains(name),
            "{name} is not in metrics::ALL"
        );
    }
    assert_eq!(
        common::names::NAMES.len(),
        tower_sse_tracker::metrics::ALL.len()
    );
}
