//! rmcp 3.x (the official MCP Rust SDK) end to end through the layer, driven by rmcp's own
//! client over real HTTP, in both protocol modes:
//!
//! - legacy sessions (before 2026-07-28): the owner is the `mcp-session-id` rmcp assigns, each
//!   POST response is a stream named by its ids (`"{index}/{http_request_id}"`);
//! - 2026-07-28, stateless (SEP-2567): no owner at all, ids from an event store that names
//!   their stream (`"{stream}_{n}"`).
//!
//! In each, two concurrent tool calls stream progress notifications; a TCP proxy cuts the
//! connections mid-stream; rmcp's client resumes each stream with a GET carrying its
//! `Last-Event-ID`. The tests check that each stream has its own key with its exact latest id,
//! that the GET resolves to the key of the stream it resumes, and what `resume` answers. The
//! server's code knows nothing of the tracker. `cargo test rmcp`.

mod common;
#[path = "common/mcp.rs"]
mod mcp;
#[path = "../examples/rmcp_server.rs"]
#[allow(dead_code)]
mod rmcp_example;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use mcp::{NamingEventStore, ProgressServer, Proxy, Resumption, record_resumptions, serve};
use rmcp::model::{CallToolRequestParams, ProtocolVersion};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::session::never::NeverSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ClientLifecycleMode, ClientServiceExt, ServiceExt};
use tower_sse_tracker::{
    EventId, IdStream, OwnerSource, Resume, SseTracker, StreamKey, StreamSource,
};

/// Two tool calls with different numbers of steps, so that their streams can be told apart.
const STEPS: [u64; 2] = [6, 9];
const DELAY_MS: u64 = 100;

fn call(steps: u64) -> CallToolRequestParams {
    let args = serde_json::json!({ "steps": steps, "delay_ms": DELAY_MS });
    CallToolRequestParams::new("progress").with_arguments(args.as_object().unwrap().clone())
}

fn id(s: &str) -> EventId {
    EventId::new(s).unwrap()
}

/// The rmcp server behind the tracker's layer, with rmcp's own keep-alive off: the layer's
/// heartbeat is the one heartbeat source.
async fn start(
    tracker: &SseTracker,
    config: StreamableHttpServerConfig,
    stateless_store: Option<NamingEventStore>,
) -> (Proxy, Arc<Mutex<Vec<Resumption>>>) {
    let config = config.with_sse_keep_alive(None);
    let seen: Arc<Mutex<Vec<Resumption>>> = Arc::default();
    let router = match stateless_store {
        None => {
            let service = StreamableHttpService::new(
                || Ok(ProgressServer),
                Arc::new(LocalSessionManager::default()),
                config,
            );
            Router::new().nest_service("/mcp", record_resumptions(service, seen.clone()))
        }
        Some(store) => {
            let manager = NeverSessionManager::default().with_event_store(Arc::new(store));
            let service =
                StreamableHttpService::new(|| Ok(ProgressServer), Arc::new(manager), config);
            Router::new().nest_service("/mcp", record_resumptions(service, seen.clone()))
        }
    };
    let addr = serve(router.layer(tracker.layer())).await;
    (Proxy::start(addr).await, seen)
}

/// Runs the two calls concurrently through `client`, cutting the connections once both
/// streams have sent a few events; returns how many connections were cut.
async fn two_calls_with_a_drop<C>(
    client: &rmcp::service::RunningService<rmcp::RoleClient, C>,
    proxy: &Proxy,
) -> usize
where
    C: rmcp::service::Service<rmcp::RoleClient>,
{
    let peer = client.peer().clone();
    // As clients do: list the tools, then call one.
    let tools = peer.list_all_tools().await.expect("tools/list answers");
    assert!(tools.iter().any(|t| t.name == "progress"), "{tools:?}");
    let calls = async {
        tokio::try_join!(
            peer.call_tool(call(STEPS[0])),
            peer.call_tool(call(STEPS[1]))
        )
    };
    let cut = async {
        // About a third of the shorter call.
        tokio::time::sleep(Duration::from_millis(2 * DELAY_MS + DELAY_MS / 2)).await;
        proxy.cut()
    };
    let (results, cut) = tokio::join!(tokio::time::timeout(Duration::from_secs(30), calls), cut);
    let (first, second) = results
        .expect("the calls finished")
        .expect("the calls succeeded");
    for (result, steps) in [(first, STEPS[0]), (second, STEPS[1])] {
        let text = serde_json::to_string(&result.content).unwrap();
        assert!(text.contains(&format!("done after {steps}")), "{text}");
    }
    cut
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_legacy_sessions_two_concurrent_streams_and_a_drop_keep_exact_ids_and_resume() {
    let tracker = SseTracker::builder()
        .stream(StreamSource::event_id(IdStream::RMCP))
        .build()
        .unwrap();
    let (proxy, seen) = start(&tracker, StreamableHttpServerConfig::default(), None).await;
    let url = format!("http://{}/mcp", proxy.addr);
    // rmcp's client in legacy mode: initialize, then a session.
    let client =
        ().serve(StreamableHttpClientTransport::from_uri(url))
            .await
            .expect("the client connects");
    let cut = two_calls_with_a_drop(&client, &proxy).await;
    assert!(
        cut >= 2,
        "the two streams were cut mid-stream ({cut} connections)"
    );

    // Every resuming GET named a stream of its session by its Last-Event-ID.
    let resumptions = seen.lock().unwrap().clone();
    assert!(resumptions.len() >= 2, "{resumptions:?}");
    let session = resumptions[0]
        .key
        .as_ref()
        .and_then(|k| k.owner.clone())
        .expect("the GET carried the session");
    for r in &resumptions {
        // A POST stream's id names its request; the standalone GET stream's ids ("0", "1"…)
        // name none, so they resume the route's stream.
        let stream = match r.last_event_id.split_once('/') {
            Some((_, request)) => request,
            None => "GET /mcp",
        };
        assert_eq!(
            r.key,
            Some(StreamKey::try_new(session.as_str(), stream).unwrap()),
            "{r:?}"
        );
    }
    let post_resumptions: Vec<&Resumption> = resumptions
        .iter()
        .filter(|r| r.last_event_id.contains('/'))
        .collect();
    assert!(post_resumptions.len() >= 2, "{resumptions:?}");

    // Each call's stream has its own key and its exact latest id: the final response, after
    // the priming event 0 and `steps` progress notifications. The tools/list before them has
    // a stream too: its priming event and the list (latest id `1/{request}`).
    let all: BTreeMap<String, String> = tracker
        .owner_streams(&session)
        .into_iter()
        .filter_map(|(name, latest)| Some((name.to_string(), latest?.to_string())))
        .filter(|(name, _)| name.bytes().all(|b| b.is_ascii_digit()))
        .collect();
    let listed = all
        .values()
        .filter(|latest| latest.starts_with("1/"))
        .count();
    assert_eq!(listed, 1, "the tools/list stream: {all:?}");
    let streams: BTreeMap<String, String> = all
        .into_iter()
        .filter(|(_, latest)| !latest.starts_with("1/"))
        .collect();
    assert_eq!(streams.len(), 2, "{streams:?}");
    let mut finals: Vec<u64> = Vec::new();
    for (request, latest) in &streams {
        let (index, of) = latest.split_once('/').unwrap();
        assert_eq!(of, request, "{streams:?}");
        finals.push(index.parse().unwrap());
    }
    finals.sort();
    assert_eq!(finals, [STEPS[0] + 1, STEPS[1] + 1], "{streams:?}");

    // What `resume` answers for a GET that resumed a call's stream: behind (the stream went on
    // after it), and current at the stream's latest id.
    for r in post_resumptions {
        let key = r.key.clone().unwrap();
        let latest = tracker.last_event_id(&key).unwrap();
        let answer = tracker
            .resume(&key, Some(&id(&r.last_event_id)))
            .await
            .unwrap();
        assert_eq!(
            answer,
            Resume::Behind {
                client: Some(id(&r.last_event_id)),
                latest: latest.clone()
            }
        );
        assert_eq!(
            tracker.resume(&key, Some(&latest)).await.unwrap(),
            Resume::Current(latest)
        );
    }
    println!(
        "legacy: session {session}, streams {streams:?}, {} resuming GETs after cutting {cut} \
         connections",
        resumptions.len()
    );
    client.cancel().await.unwrap();
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_stateless_2026_07_28_two_concurrent_streams_and_a_drop_keep_exact_ids_and_resume() {
    let tracker = SseTracker::builder()
        .owner(OwnerSource::none())
        .stream(StreamSource::event_id(IdStream::MCP_TYPESCRIPT))
        .build()
        .unwrap();
    let store = NamingEventStore::default();
    let config = StreamableHttpServerConfig::default()
        .with_legacy_session_mode(false)
        // The replay is finite: the client polls again after this long.
        .with_sse_retry(Some(Duration::from_millis(50)));
    let (proxy, seen) = start(&tracker, config, Some(store.clone())).await;
    let url = format!("http://{}/mcp", proxy.addr);
    let client = ()
        .serve_with_lifecycle(
            StreamableHttpClientTransport::from_config(
                StreamableHttpClientTransportConfig::with_uri(url),
            ),
            ClientLifecycleMode::Discover {
                preferred_versions: vec![ProtocolVersion::V_2026_07_28],
            },
        )
        .await
        .expect("the client connects");
    let cut = two_calls_with_a_drop(&client, &proxy).await;
    assert!(
        cut >= 2,
        "the two streams were cut mid-stream ({cut} connections)"
    );

    // No session anywhere; each GET resolved to the stream its Last-Event-ID names.
    let resumptions = seen.lock().unwrap().clone();
    assert!(resumptions.len() >= 2, "{resumptions:?}");
    for r in &resumptions {
        let (stream, _) = r.last_event_id.split_once('_').expect("a named id");
        assert_eq!(
            r.key,
            Some(StreamKey::try_unowned(stream).unwrap()),
            "{r:?}"
        );
    }

    // Each tool call's stream (those that reached their final event) has its own key, whose
    // latest id is exactly the last id the server stored on it.
    let mut tool_streams = 0;
    for (stream, last) in store.last_ids() {
        let key = StreamKey::try_unowned(&stream).unwrap();
        if let Some(latest) = tracker.last_event_id(&key) {
            assert_eq!(latest, last.as_str(), "{stream}");
            tool_streams += 1;
        }
    }
    assert!(tool_streams >= 2, "{tool_streams} streams tracked");
    for r in &resumptions {
        let key = r.key.clone().unwrap();
        let latest = tracker.last_event_id(&key).unwrap();
        if latest != r.last_event_id.as_str() {
            assert_eq!(
                tracker
                    .resume(&key, Some(&id(&r.last_event_id)))
                    .await
                    .unwrap(),
                Resume::Behind {
                    client: Some(id(&r.last_event_id)),
                    latest: latest.clone()
                }
            );
        }
        assert_eq!(
            tracker.resume(&key, Some(&latest)).await.unwrap(),
            Resume::Current(latest)
        );
    }
    println!(
        "stateless: {tool_streams} streams, {} resuming GETs after cutting {cut} connections",
        resumptions.len()
    );
    client.cancel().await.unwrap();
}

/// `examples/rmcp_server.rs` lists its tool with its input schema, as the official SDKs'
/// clients expect before they call one, and the call streams its progress through the layer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_examples_tool_is_listed_with_its_schema_and_called_through_the_layer() {
    let tracker = SseTracker::builder()
        .stream(StreamSource::event_id(IdStream::RMCP))
        .build()
        .unwrap();
    let service = StreamableHttpService::new(
        || Ok(rmcp_example::Tools),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    let router = Router::new()
        .nest_service("/mcp", service)
        .layer(tracker.layer());
    let addr = serve(router).await;
    let client = ()
        .serve(StreamableHttpClientTransport::from_uri(format!(
            "http://{addr}/mcp"
        )))
        .await
        .expect("the client connects");
    let tools = client.peer().list_all_tools().await.unwrap();
    assert_eq!(tools.len(), 1, "{tools:?}");
    assert_eq!(tools[0].name, "progress");
    let steps = &tools[0].input_schema["properties"]["steps"];
    assert_eq!(steps["type"], "integer", "{:?}", tools[0].input_schema);
    let args = serde_json::json!({ "steps": 2 });
    let result = client
        .peer()
        .call_tool(
            CallToolRequestParams::new("progress")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
        .unwrap();
    let text = serde_json::to_string(&result.content).unwrap();
    assert!(text.contains("2 steps done"), "{text}");
    client.cancel().await.unwrap();
}

/// A client that counts the progress notifications it receives.
#[derive(Clone, Default)]
struct CountingClient {
    progress: Arc<Mutex<Vec<f64>>>,
}

impl rmcp::ClientHandler for CountingClient {
    async fn on_progress(
        &self,
        params: rmcp::model::ProgressNotificationParam,
        _context: rmcp::service::NotificationContext<rmcp::RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params.progress);
    }
}

/// The progress server as rmcp serves it, behind nothing yet: the GETs carrying a
/// `Last-Event-ID` that reach rmcp go to `seen`; with `detach`, every rmcp response is marked
/// [`Detach`](tower_sse_tracker::Detach) (its stream goes on without its client).
fn progress_router(seen: Arc<Mutex<Vec<Resumption>>>, detach: bool) -> Router {
    let service = StreamableHttpService::new(
        || Ok(ProgressServer),
        Arc::new(LocalSessionManager::default()),
        StreamableHttpServerConfig::default().with_sse_keep_alive(None),
    );
    let router = Router::new().nest_service("/mcp", record_resumptions(service, seen));
    if !detach {
        return router;
    }
    router.layer(axum::middleware::map_response(
        |mut response: axum::response::Response| async move {
            response.extensions_mut().insert(tower_sse_tracker::Detach);
            response
        },
    ))
}

/// A call of 60 progress notifications, 20 ms apart.
const CALL_STEPS: u64 = 60;

/// One tool call of [`CALL_STEPS`] progress notifications through `proxy`, whose connections
/// are cut after 5 of them reached the client, and which holds the client's next connections
/// for 0.8 s (most of the call); rmcp's client then resumes, while the call went on. Checks
/// the call's result; returns the progress the client received, in order, and how many it had
/// at the cut.
async fn call_cut_and_resumed_through(proxy: &Proxy) -> (Vec<f64>, usize) {
    const DELAY_MS: u64 = 20;
    const CUT_AFTER: usize = 5;
    const AWAY: Duration = Duration::from_millis(800);
    let handler = CountingClient::default();
    let client = handler
        .clone()
        .serve(StreamableHttpClientTransport::from_uri(format!(
            "http://{}/mcp",
            proxy.addr
        )))
        .await
        .expect("the client connects");
    let peer = client.peer().clone();
    let args = serde_json::json!({ "steps": CALL_STEPS, "delay_ms": DELAY_MS });
    let call = tokio::spawn(async move {
        peer.call_tool(
            CallToolRequestParams::new("progress")
                .with_arguments(args.as_object().unwrap().clone()),
        )
        .await
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handler.progress.lock().unwrap().len() < CUT_AFTER {
        assert!(tokio::time::Instant::now() < deadline, "no progress");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let at_cut = handler.progress.lock().unwrap().len();
    proxy.hold(AWAY);
    proxy.cut();
    let result = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("the call finished")
        .unwrap()
        .expect("the call succeeded");
    let text = serde_json::to_string(&result.content).unwrap();
    assert!(text.contains(&format!("done after {CALL_STEPS}")), "{text}");
    // The session's end may reach an instance that does not know it: its answer is no matter.
    let _ = client.cancel().await;
    let progress = handler.progress.lock().unwrap().clone();
    (progress, at_cut)
}

/// [`call_cut_and_resumed_through`] one instance; also returns the GETs that reached rmcp,
/// and the events the layer replayed.
async fn call_cut_and_resumed(detach: bool) -> (Vec<f64>, usize, Vec<Resumption>, f64) {
    let (tracker, metrics) = common::build_recorded(
        SseTracker::builder()
            .stream(StreamSource::event_id(IdStream::RMCP))
            .replay(tower_sse_tracker::ReplayPolicy::new()),
    );
    let seen: Arc<Mutex<Vec<Resumption>>> = Arc::default();
    let router = progress_router(seen.clone(), detach);
    let proxy = Proxy::start(serve(router.layer(tracker.layer())).await).await;
    let (progress, at_cut) = call_cut_and_resumed_through(&proxy).await;
    let seen = seen.lock().unwrap().clone();
    let replayed = metrics.value(common::names::REPLAYED_EVENTS_TOTAL, &[]);
    (progress, at_cut, seen, replayed)
}

/// rmcp keeps the last 16 messages of a call for its resumption (its channel capacity): a call
/// that sends more while its client is away loses the oldest, and rmcp's resumption replays
/// what is left without saying so. With replay on and rmcp's responses marked `Detach`, the
/// layer reads the call's stream on while the client is away and answers the client's
/// resuming GET from the stream's log, before rmcp sees it: every progress notification
/// arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_a_call_that_outruns_rmcps_cache_while_its_client_is_away_loses_nothing_with_detach() {
    let (progress, at_cut, seen, replayed) = call_cut_and_resumed(true).await;
    let all: Vec<f64> = (1..=60).map(|n| n as f64).collect();
    // What the call sent while its client was away, the layer replayed: more than rmcp keeps.
    assert!(replayed > 16.0, "the layer replayed {replayed} events");
    // rmcp's client hands each notification to its handler in a task of its own: they reach
    // it in any order (the wire order is the chaos tests' to check).
    let mut sorted = progress.clone();
    sorted.sort_by(f64::total_cmp);
    assert_eq!(sorted, all, "every progress notification, once");
    assert!(
        seen.iter().all(|r| !r.last_event_id.contains('/')),
        "the layer answered the call's resumption, not rmcp: {seen:?}"
    );
    // For comparison, rmcp's own resumption alone (printed: it depends on rmcp's timing).
    let (alone, at_cut_alone, seen_alone, _) = call_cut_and_resumed(false).await;
    println!(
        "a call of 60 progress notifications cut after {at_cut}: with the layer's replay and \
         Detach the client got {} of 60 ({replayed} replayed by the layer); with rmcp's cache \
         alone (cut after {at_cut_alone}, {} resuming GETs to rmcp) it got {} of 60",
        progress.len(),
        seen_alone.len(),
        alone.len()
    );
}

/// An rmcp call resumed on another instance: two instances of the rmcp server, each behind
/// its own tracker, sharing one store with replay across instances; a load balancer that
/// sends a client's resuming GET to the second instance. The call's client is cut after 5 of
/// 60 progress notifications and held away 0.8 s while the call goes on, detached, on the
/// first; rmcp's client then resumes on the second, whose rmcp has never seen the session:
/// the second instance's layer answers from the store's log, with what the client missed and
/// then the call's live tail to its result. Every notification arrives once, and the second
/// instance's rmcp sees no resumption of the call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rmcp_a_call_resumed_on_another_instance_loses_nothing() {
    let store = Arc::new(tower_sse_tracker::store::InMemoryStore::new());
    let instance = |seen: Arc<Mutex<Vec<Resumption>>>| {
        let (tracker, metrics) = common::build_recorded(
            SseTracker::builder()
                .store(store.clone())
                .flush_interval(Duration::from_millis(20))
                .stream(StreamSource::event_id(IdStream::RMCP))
                .replay(tower_sse_tracker::ReplayPolicy::new().across_instances(true)),
        );
        let router = progress_router(seen, true).layer(tracker.layer());
        (router, tracker, metrics)
    };
    let seen_a: Arc<Mutex<Vec<Resumption>>> = Arc::default();
    let seen_b: Arc<Mutex<Vec<Resumption>>> = Arc::default();
    let (router_a, _tracker_a, _) = instance(seen_a.clone());
    let (router_b, _tracker_b, metrics_b) = instance(seen_b.clone());
    let a = serve(router_a).await;
    let b = serve(router_b).await;
    let proxy = Proxy::start_splitting(a, Some(b)).await;
    let (mut progress, at_cut) = call_cut_and_resumed_through(&proxy).await;
    progress.sort_by(f64::total_cmp);
    let all: Vec<f64> = (1..=CALL_STEPS).map(|n| n as f64).collect();
    assert_eq!(progress, all, "every progress notification, once");
    let replayed = metrics_b.value(common::names::REPLAYED_EVENTS_TOTAL, &[]);
    assert!(replayed > 0.0, "the second instance replayed nothing");
    let seen_b = seen_b.lock().unwrap().clone();
    assert!(
        seen_b.iter().all(|r| !r.last_event_id.contains('/')),
        "the second instance's rmcp saw the call's resumption: {seen_b:?}"
    );
    println!(
        "an rmcp call of {CALL_STEPS} progress notifications, cut after {at_cut} and resumed on \
         another instance: {} of {CALL_STEPS} arrived, {replayed} replayed by the second \
         instance's layer from the store; GETs that reached rmcp: first instance {}, second {}",
        progress.len(),
        seen_a.lock().unwrap().len(),
        seen_b.len()
    );
}
