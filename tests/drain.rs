//! Draining open streams for a deploy, and heartbeats before a leading byte order mark.

mod common;

use std::time::Duration;

use axum::http::HeaderMap;
use bytes::Bytes;
use common::names::STREAMS_DRAINED_TOTAL;
use common::{Harness, build_recorded, key, no_heartbeat, reference};
use tokio::time::timeout;
use tower_sse_tracker::SseTracker;
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
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None).owner(
        tower_sse_tracker::OwnerSource::header(http::HeaderName::from_static("x-user")),
    ));
    let h = Harness::start(tracker).await;
    let feed = h.feed("anon");
    // No owner header: not tracked (reason no_owner), still an SSE body of the layer.
    let mut client = h.get("/sse/anon", None, HeaderMap::new()).await;
    feed.send(Bytes::from_static(b"id: 1\ndata: a\n\n"))
        .unwrap();
    client.read_until_suffix(b"data: a\n\n").await;
    assert_eq!(
        recorded.value(
            common::names::UNTRACKED_STREAMS_TOTAL,
            &[("reason", "no_owner")]
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

/// Streams as servers send them, none of them knowing of the tracker:
///
/// - `POST /mcp` with MCP 2026-07-28 headers: `Mcp-Method: tools/call` streams progress
///   (no ids, as 2026-07-28 has none) every 250 ms for 2.5 s, then the result, and ends;
///   `Mcp-Method: subscriptions/listen` sends a notification every 2 s, for ever;
/// - `POST /chat`: an answer streamed token by token (no ids) for 1.5 s, then `[DONE]`;
/// - `GET /feed`: a feed with ids every 200 ms, for ever.
mod protocols {
    use std::convert::Infallible;
    use std::time::Duration;

    use axum::Router;
    use axum::http::HeaderMap;
    use axum::response::sse::{Event, Sse};
    use axum::routing::{get, post};
    use futures_util::stream::{self, BoxStream, StreamExt};
    use tokio::time::{Instant, sleep};
    use tower_sse_tracker::SseTracker;

    type Events = Sse<BoxStream<'static, Result<Event, Infallible>>>;

    /// `n` events `every` apart, made by `event(i)`, then `last` if any.
    fn paced(
        n: u32,
        every: Duration,
        event: fn(u32) -> Event,
        last: Option<Event>,
    ) -> BoxStream<'static, Result<Event, Infallible>> {
        let events = stream::unfold(0, move |i| async move {
            if i == n {
                return None;
            }
            sleep(every).await;
            Some((Ok(event(i)), i + 1))
        });
        events.chain(stream::iter(last.map(Ok))).boxed()
    }

    async fn mcp(headers: HeaderMap) -> Events {
        let method = headers
            .get("mcp-method")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        let stream = if method == "subscriptions/listen" {
            paced(
                u32::MAX,
                Duration::from_secs(2),
                |_| Event::default().data(r#"{"method":"notifications/resources/updated"}"#),
                None,
            )
        } else {
            paced(
                10,
                Duration::from_millis(250),
                |i| {
                    Event::default().data(format!(
                        r#"{{"method":"notifications/progress","params":{{"progress":{i}}}}}"#
                    ))
                },
                Some(Event::default().data(r#"{"id":1,"result":{"content":[]}}"#)),
            )
        };
        Sse::new(stream)
    }

    async fn chat() -> Events {
        Sse::new(paced(
            15,
            Duration::from_millis(100),
            |i| Event::default().data(format!("token {i}")),
            Some(Event::default().data("[DONE]")),
        ))
    }

    async fn feed() -> Events {
        Sse::new(paced(
            u32::MAX,
            Duration::from_millis(200),
            |i| Event::default().id(i.to_string()).data("tick"),
            None,
        ))
    }

    /// A server with graceful shutdown: `stop` starts it, with `tracker.drain(retry 500 ms)`;
    /// the handle answers when the server has exited.
    pub async fn serve(
        tracker: &SseTracker,
    ) -> (
        String,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<Instant>,
    ) {
        let app = Router::new()
            .route("/mcp", post(mcp))
            .route("/chat", post(chat))
            .route("/feed", get(feed))
            .layer(tracker.layer());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let draining = tracker.clone();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                    draining.drain(Some(Duration::from_millis(500)));
                })
                .await
                .unwrap();
            Instant::now()
        });
        (base, stop, server)
    }

    /// A client reading one response to its end, noting when it ended.
    pub struct Read {
        pub body: String,
        pub ended: Instant,
    }

    pub async fn open(
        request: reqwest::RequestBuilder,
    ) -> (
        tokio::sync::mpsc::UnboundedReceiver<String>,
        tokio::task::JoinHandle<Read>,
    ) {
        let response = request
            .header("accept", "application/json, text/event-stream")
            .send()
            .await
            .unwrap();
        assert_eq!(response.headers()["content-type"], "text/event-stream");
        let (chunks, rx) = tokio::sync::mpsc::unbounded_channel();
        let reader = tokio::spawn(async move {
            let mut body = String::new();
            let mut bytes = response.bytes_stream();
            while let Some(chunk) = bytes.next().await {
                let chunk = String::from_utf8(chunk.unwrap().to_vec()).unwrap();
                body.push_str(&chunk);
                let _ = chunks.send(chunk);
            }
            Read {
                body,
                ended: Instant::now(),
            }
        });
        (rx, reader)
    }

    /// An MCP 2026-07-28 POST with `Mcp-Method: method`.
    pub fn mcp_post(http: &reqwest::Client, base: &str, method: &str) -> reqwest::RequestBuilder {
        http.post(format!("{base}/mcp"))
            .header("content-type", "application/json")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", method)
            .header("mcp-name", "progress")
            .body(format!(r#"{{"jsonrpc":"2.0","id":1,"method":"{method}"}}"#))
    }
}

/// A drain of an MCP 2026-07-28 server: the tool call in flight completes and its client gets
/// the result (closing its stream would cancel the request); the `subscriptions/listen`
/// stream ends at an event boundary at once (its client re-issues the listen); a stream with
/// ids ends at its next boundary with `retry:`. The server exits when the tool call's stream
/// ends, well before the drain timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_completes_a_2026_07_28_tool_call_and_ends_its_listen_stream_at_a_boundary() {
    use common::names::REASON_COMPLETED;
    use protocols::{mcp_post, open, serve};

    let (tracker, recorded) = build_recorded(SseTracker::builder());
    let (base, stop, server) = serve(&tracker).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let started = tokio::time::Instant::now();
    let (mut call_chunks, call) = open(mcp_post(&http, &base, "tools/call")).await;
    let (_, listen) = open(mcp_post(&http, &base, "subscriptions/listen")).await;
    let (mut feed_chunks, feed) = open(http.get(format!("{base}/feed"))).await;
    // The tool call is under way, and the feed has sent ids.
    call_chunks.recv().await.unwrap();
    feed_chunks.recv().await.unwrap();
    feed_chunks.recv().await.unwrap();

    let drained_at = tokio::time::Instant::now();
    stop.send(()).unwrap();
    let listen = listen.await.unwrap();
    let feed = feed.await.unwrap();
    let call = call.await.unwrap();
    let exited = server.await.unwrap();
    println!(
        "drain at {:?}: listen ended {:?} later, feed {:?}, tool call {:?} (started {:?} before \
         the drain), server exited {:?} after the drain",
        drained_at - started,
        listen.ended - drained_at,
        feed.ended - drained_at,
        call.ended - drained_at,
        drained_at - started,
        exited - drained_at,
    );
    // The listen stream: idle between notifications, so it ends at once, with nothing cut.
    assert!(listen.ended - drained_at < Duration::from_secs(1));
    assert!(!listen.body.contains("notifications"), "{:?}", listen.body);
    assert!(listen.body.ends_with("retry: 500\n\n"), "{:?}", listen.body);
    // The feed: at its next boundary, after a whole event.
    assert!(
        feed.body.ends_with("data: tick\n\nretry: 500\n\n"),
        "{:?}",
        feed.body
    );
    // The tool call: every progress notification and the result.
    assert_eq!(call.body.matches("notifications/progress").count(), 10);
    assert!(
        call.body
            .ends_with("data: {\"id\":1,\"result\":{\"content\":[]}}\n\n")
    );
    assert!(call.ended - started >= Duration::from_millis(2500));
    // The server waited for the tool call, and no longer.
    assert!(exited >= call.ended - Duration::from_millis(50));
    assert!(
        exited - drained_at < Duration::from_secs(10),
        "before the drain timeout"
    );
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "boundary")]),
        2.0
    );
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", REASON_COMPLETED)]),
        1.0
    );
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", "deadline")]),
        0.0
    );
}

/// A drain of a plain SSE app: an answer streamed on a POST without ids (its client cannot
/// resume it) finishes; a GET feed with ids ends at an event boundary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_lets_an_id_less_post_answer_finish_and_ends_a_feed_with_ids_at_a_boundary() {
    use common::names::{REASON_COMPLETED, STREAMS_ENDED_TOTAL};
    use protocols::{open, serve};

    let (tracker, recorded) = build_recorded(SseTracker::builder());
    let (base, stop, server) = serve(&tracker).await;
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let (mut chat_chunks, chat) = open(http.post(format!("{base}/chat"))).await;
    let (mut feed_chunks, feed) = open(http.get(format!("{base}/feed"))).await;
    chat_chunks.recv().await.unwrap();
    feed_chunks.recv().await.unwrap();
    let drained_at = tokio::time::Instant::now();
    stop.send(()).unwrap();
    let feed = feed.await.unwrap();
    let chat = chat.await.unwrap();
    let exited = server.await.unwrap();
    println!(
        "feed ended {:?} after the drain, the answer {:?}, the server exited {:?}",
        feed.ended - drained_at,
        chat.ended - drained_at,
        exited - drained_at
    );
    assert!(
        feed.body.ends_with("data: tick\n\nretry: 500\n\n"),
        "{:?}",
        feed.body
    );
    assert_eq!(chat.body.matches("data: token").count(), 15);
    assert!(chat.body.ends_with("data: [DONE]\n\n"), "{:?}", chat.body);
    assert_eq!(
        recorded.value(STREAMS_DRAINED_TOTAL, &[("reason", REASON_COMPLETED)]),
        1.0
    );
    // One of each kind ended: the feed resumable, the answer not.
    assert_eq!(
        recorded.value(STREAMS_ENDED_TOTAL, &[("resumable", "true")]),
        1.0
    );
    assert_eq!(
        recorded.value(STREAMS_ENDED_TOTAL, &[("resumable", "false")]),
        1.0
    );
}

/// With Tokio's clock paused: an MCP 2026-07-28 `subscriptions/listen` stream idle at an event
/// boundary ends the moment a drain starts (no time passes), while a `tools/call` stream idle
/// at a boundary stays open until its own end, which may come long after.
#[tokio::test(start_paused = true)]
async fn a_listen_stream_ends_the_moment_a_drain_starts_and_a_request_stream_waits_for_its_end() {
    use common::direct::{fed_request, fed_service, respond};
    use http_body_util::BodyExt;

    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .drain_timeout(Duration::from_secs(60))
        .build()
        .unwrap();
    let mut svc = fed_service(&tracker);
    let open = |method: &'static str| {
        let (tx, mut req) = fed_request("s1");
        req.headers_mut()
            .insert("mcp-protocol-version", "2026-07-28".parse().unwrap());
        req.headers_mut()
            .insert("mcp-method", method.parse().unwrap());
        (tx, req)
    };
    let (listen_tx, req) = open("subscriptions/listen");
    let mut listen = respond(&mut svc, req).await.into_body();
    let (call_tx, req) = open("tools/call");
    let mut call = respond(&mut svc, req).await.into_body();
    for (tx, body) in [(&listen_tx, &mut listen), (&call_tx, &mut call)] {
        tx.send(Bytes::from_static(b"data: {}\n\n")).unwrap();
        body.frame().await.unwrap().unwrap();
    }
    assert!(!listen.is_resumable() && !call.is_resumable());

    let drained_at = tokio::time::Instant::now();
    tracker.drain(None);
    assert!(listen.frame().await.is_none(), "the listen stream ended");
    assert_eq!(tokio::time::Instant::now(), drained_at, "at once");
    // The request stream is still open 30 s later, and delivers what comes.
    assert!(
        timeout(Duration::from_secs(30), call.frame())
            .await
            .is_err()
    );
    call_tx
        .send(Bytes::from_static(b"data: {\"result\":{}}\n\n"))
        .unwrap();
    let last = call.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(last, "data: {\"result\":{}}\n\n");
    drop(call_tx);
    assert!(call.frame().await.is_none(), "it ends with its inner body");
    drop(listen_tx);
}

/// From review: a stream whose first id comes during a drain, in a frame that holds more
/// events, is cut after that event: its client will resume from that id, and must not have
/// been sent what follows it.
#[tokio::test(start_paused = true)]
async fn a_stream_whose_first_id_comes_during_a_drain_is_cut_right_after_that_event() {
    use common::direct::{fed_request, fed_service, respond};
    use http_body_util::BodyExt;

    let tracker = no_heartbeat();
    let mut svc = fed_service(&tracker);
    let (tx, req) = fed_request("s1");
    let mut body = respond(&mut svc, req).await.into_body();
    tx.send(Bytes::from_static(b"data: no id yet\n\n")).unwrap();
    body.frame().await.unwrap().unwrap();
    assert!(!body.is_resumable());
    tracker.drain(None);
    // Not resumable: the drain lets it run.
    assert!(timeout(Duration::from_secs(1), body.frame()).await.is_err());
    tx.send(Bytes::from_static(b"id: 5\ndata: a\n\ndata: b\n\n"))
        .unwrap();
    let sent = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(sent, "id: 5\ndata: a\n\n");
    assert!(body.is_resumable());
    assert!(body.frame().await.is_none(), "ended at that boundary");
    assert_eq!(tracker.last_event_id(&key("s1", "GET /mcp")).unwrap(), "5");
}

/// From review: an empty id resets the client's last event id, so that it reconnects without
/// one: the stream is not resumable until the next non-empty id.
#[tokio::test(start_paused = true)]
async fn an_empty_id_makes_a_stream_not_resumable_until_the_next_id() {
    use common::direct::{fed_request, fed_service, respond};
    use http_body_util::BodyExt;

    let tracker = no_heartbeat();
    let mut svc = fed_service(&tracker);
    let (tx, req) = fed_request("s1");
    let mut body = respond(&mut svc, req).await.into_body();
    for (frame, resumable) in [
        (&b"id: 3\n\n"[..], true),
        (b"id\n\n", false),
        (b"data: x\n\n", false),
        (b"id: 4\n\n", true),
    ] {
        tx.send(Bytes::from_static(frame)).unwrap();
        body.frame().await.unwrap().unwrap();
        assert_eq!(body.is_resumable(), resumable, "{frame:?}");
    }
}

/// From review: every SSE body has a span, tracked or not: an MCP 2026-07-28 `tools/call` POST
/// without a session (not tracked: nothing to track) still has one, with its `Mcp-Method` and
/// `resumable=false`, and the reason it is not tracked is logged once at `INFO`.
#[tokio::test(flavor = "current_thread")]
async fn an_untracked_mcp_2026_07_28_stream_has_a_span_with_its_method() {
    use common::direct::{Frames, frames_service, respond};
    use http_body_util::BodyExt;

    let (logs, _guard) = common::CapturedLogs::capture(tracing::Level::DEBUG);
    let (tracker, recorded) = build_recorded(SseTracker::builder().heartbeat_interval(None));
    let mut svc = frames_service(&tracker);
    for _ in 0..2 {
        let mut req = http::Request::builder()
            .method("POST")
            .uri("/mcp")
            .header("mcp-protocol-version", "2026-07-28")
            .header("mcp-method", "tools/call")
            .body(())
            .unwrap();
        req.extensions_mut()
            .insert::<Frames>(vec![Bytes::from_static(b"data: {}\n\n")]);
        let mut body = respond(&mut svc, req).await.into_body();
        while let Some(frame) = body.frame().await {
            frame.unwrap();
        }
    }
    let logs = logs.text();
    let closed: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("sse_stream") && l.contains("close"))
        .collect();
    assert_eq!(closed.len(), 2, "{logs}");
    assert!(
        closed
            .iter()
            .all(|l| l.contains("mcp_method=\"tools/call\"") && l.contains("resumable=false")),
        "{logs}"
    );
    let told = logs
        .lines()
        .filter(|l| l.contains(" INFO ") && l.contains("reason=\"not_resumable\""))
        .count();
    assert_eq!(told, 1, "{logs}");
    assert!(!logs.contains(" WARN "), "{logs}");
    assert_eq!(
        recorded.value(
            common::names::UNTRACKED_STREAMS_TOTAL,
            &[("reason", "not_resumable")]
        ),
        2.0
    );
}
