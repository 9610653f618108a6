//! The demo: an axum server with the tracker layer, on 127.0.0.1:3000 by default.
//!
//! ```text
//! cargo run --example axum_server            # or: cargo run --example axum_server -- 127.0.0.1:4000
//! ```
//!
//! Endpoints:
//! - `GET /events`: an SSE stream of numbered events with ids (`?interval_ms=`, default 1000),
//!   for the session in the `mcp-session-id` header; a request without one gets a new session
//!   id in the response header, as an MCP server would assign it. A client that reconnects with
//!   `Last-Event-ID: N` resumes at N + 1.
//! - `GET /sessions/{session}`: each stream of the session with its live latest id and the id
//!   persisted to the store (the in-memory store here), as JSON.
//! - `GET /metrics`: the tracker's metrics in the Prometheus text format.
//!
//! Heartbeats are sent after 5 s of silence here (15 s is the default) so that they show up
//! quickly: try `?interval_ms=12000`. `SSE_TRACKER=off` serves the same routes without the
//! layer (to measure its overhead with `examples/loadgen.rs`); `RUST_LOG` sets the log level.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Json, Router};
use futures_util::stream::{self, Stream};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;
use tower_sse_tracker::{LastEventId, Owner, Resume, SessionId, SseTracker, StreamKey};

#[derive(Clone)]
struct AppState {
    tracker: SseTracker,
    prometheus: PrometheusHandle,
}

#[derive(serde::Deserialize)]
struct EventsQuery {
    interval_ms: Option<u64>,
}

fn new_session_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    format!(
        "demo-{:x}-{}",
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

fn numbered_events(start: u64, every: Duration) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(
        (start, tokio::time::interval(every)),
        |(n, mut ticks)| async move {
            ticks.tick().await;
            // `ts` (server time in µs) lets the load generator measure delivery latency.
            let ts = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_micros() as u64;
            let event = Event::default()
                .id(n.to_string())
                .event("tick")
                .data(json!({ "n": n, "ts": ts }).to_string());
            Some((Ok(event), (n + 1, ticks)))
        },
    )
}

/// `GET /events`: numbered events, resumed after the client's `Last-Event-ID`.
///
/// The resumption recipe: the layer hands the handler the client's validated `Last-Event-ID`
/// and the key of the stream the request addresses; `tracker.resume` compares the id with the
/// stream's latest (the newer of memory and the store).
async fn events(
    State(state): State<AppState>,
    session: Option<Extension<SessionId>>,
    key: Option<Extension<StreamKey>>,
    last: Option<Extension<LastEventId>>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let client = last.map(|Extension(LastEventId(id))| id);
    let after = |id: Option<&tower_sse_tracker::EventId>| {
        id.and_then(|id| id.as_str().parse::<u64>().ok())
            .map_or(1, |n| n + 1)
    };
    let start = match &key {
        Some(Extension(key)) => match state.tracker.resume(key, client.as_ref()).await {
            Ok(Resume::Current(id)) => {
                tracing::info!(%key, %id, "client is current: continuing after its id");
                after(Some(&id))
            }
            Ok(Resume::Behind { client, latest }) => {
                tracing::info!(%key, ?client, %latest, "client is behind: replaying after its id");
                after(client.as_ref())
            }
            Ok(_) => after(client.as_ref()),
            Err(error) => {
                tracing::warn!(%error, "store unavailable: trusting the client's id");
                after(client.as_ref())
            }
        },
        None => after(client.as_ref()),
    };
    let every = Duration::from_millis(q.interval_ms.unwrap_or(1000).max(1));
    let mut response = Sse::new(numbered_events(start, every)).into_response();
    if session.is_none() {
        // Like an MCP server, assign a session on the response; the layer tracks it from there.
        let id = HeaderValue::from_str(&new_session_id()).expect("visible ASCII");
        response.headers_mut().insert("mcp-session-id", id);
    }
    response
}

/// `GET /sessions/{session}`: each stream of the session with its live latest id (memory) and
/// the id the worker has persisted to the store.
async fn session(State(state): State<AppState>, Path(session): Path<String>) -> Response {
    let Ok(owner) = Owner::new(&session) else {
        return (axum::http::StatusCode::BAD_REQUEST, "invalid session id").into_response();
    };
    let mut streams = Vec::new();
    for (stream, latest) in state.tracker.owner_streams(&owner) {
        let key = StreamKey::new(owner.clone(), stream.clone());
        let persisted = match state.tracker.stored_event_id(&key).await {
            Ok(id) => id,
            Err(error) => {
                let body = Json(json!({ "error": error.to_string() }));
                return (axum::http::StatusCode::SERVICE_UNAVAILABLE, body).into_response();
            }
        };
        streams.push(json!({
            "stream": stream.as_str(),
            "latest_id": latest.as_ref().map(|id| id.as_str()),
            "persisted_id": persisted.as_ref().map(|id| id.as_str()),
        }));
    }
    Json(json!({ "session": session, "streams": streams })).into_response()
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut headers = HeaderMap::new();
    headers.insert(
        "content-type",
        HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    (headers, state.prometheus.render())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_sse_tracker=debug".into()),
        )
        .init();
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3000".to_owned())
        .parse()?;

    // Install the recorder before building the tracker: it takes its metric handles at build.
    let prometheus = PrometheusBuilder::new().install_recorder()?;
    tower_sse_tracker::metrics::describe();
    let tracker = SseTracker::builder()
        .heartbeat_interval(Some(Duration::from_secs(5)))
        .build()?;

    let shutdown_tracker = tracker.clone();
    let app = Router::new()
        .route("/events", get(events))
        .route("/sessions/{session}", get(session))
        .route("/metrics", get(metrics));
    // `SSE_TRACKER=off` serves the same routes without the layer, to measure its overhead.
    let app = if std::env::var("SSE_TRACKER").is_ok_and(|v| v == "off") {
        println!("SSE_TRACKER=off: serving without the tracker layer");
        app
    } else {
        app.layer(tracker.layer())
    };
    let app = app.with_state(AppState {
        tracker,
        prometheus,
    });

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    println!("tower-sse-tracker demo listening on http://{addr}");
    println!();
    println!("Stream events for a session (Ctrl-C to stop):");
    println!("  curl -N -H 'mcp-session-id: demo-1' http://{addr}/events");
    println!("Resume after event 5 (what a reconnecting EventSource sends):");
    println!("  curl -N -H 'mcp-session-id: demo-1' -H 'Last-Event-ID: 5' http://{addr}/events");
    println!("See heartbeats (an event every 12 s, a heartbeat after 5 s of silence):");
    println!("  curl -N -H 'mcp-session-id: demo-2' 'http://{addr}/events?interval_ms=12000'");
    println!("Latest ids of a session's streams:");
    println!("  curl http://{addr}/sessions/demo-1");
    println!("Metrics:");
    println!("  curl http://{addr}/metrics");
    let draining = shutdown_tracker.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Open event streams end at their next event boundary, telling clients to come back
            // in a second (to another instance, in a rolling deploy); then the server can stop.
            println!("draining open streams...");
            draining.drain(Some(Duration::from_secs(1)));
        })
        .await?;
    let report = shutdown_tracker.shutdown(Duration::from_secs(5)).await;
    println!(
        "shut down: {} streams persisted at exit, {} given up, {} pending",
        report.persisted,
        report.given_up.len(),
        report.pending.len()
    );
    Ok(())
}
