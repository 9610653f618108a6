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
//! - `GET /answer`: a long answer streamed word by word, as an LLM would (`?interval_ms=`,
//!   default 100), one event with an id per word, for the session in the `mcp-session-id`
//!   header. Replay is on and the answer is marked `Detach`: a client that disconnects
//!   mid-answer and reconnects with `Last-Event-ID` gets every word it missed, including those
//!   produced while it was away, then the rest live; with an id the log no longer holds (it
//!   keeps 150 of the answer's 160 here, so a reconnect after id 20 gets the rest however
//!   long the client was away), the `sse-replay: gap` header and a `gap` event.
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
use tower_sse_tracker::{
    Detach, LastEventId, Owner, Replay, ReplayPolicy, Resume, SessionId, SseTracker, StreamKey,
};

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
    replay: Option<Extension<Replay>>,
    Query(q): Query<EventsQuery>,
) -> Response {
    let mut client = last.map(|Extension(LastEventId(id))| id);
    // With replay on, the layer sends first what the client missed that it logged: continue
    // after the last of those.
    if let Some(Extension(Replay::Complete { last_event_id, .. })) = replay {
        client = Some(last_event_id);
    }
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

/// The answer `GET /answer` streams, one word per event.
const ANSWER: &str = "Server-Sent Events are a one-way channel from server to client over plain \
HTTP. Each event may carry an id, and a client that loses its connection reconnects with the \
last id it saw in the Last-Event-ID header. Most servers cannot do anything with that header: \
the events produced while the client was away are gone, and an answer generated token by \
token is cut in the middle. This layer keeps a bounded log of each stream's events, as they \
were sent, byte for byte. When a client comes back, it sends the events it missed before \
anything else, once each. A stream marked Detach goes on while its client is away, so the \
end of this answer is still here when you reconnect, even if you were gone for all of it. \
When the history a client asks for is gone, the response says so in a header and an event, \
and never pretends that a partial replay is complete.";

#[derive(serde::Deserialize)]
struct AnswerQuery {
    interval_ms: Option<u64>,
}

/// `GET /answer`: a long answer, one word per event, that goes on without its client.
///
/// A reconnect to an answer still being produced (or produced to its end) is answered by the
/// layer from its log; this handler sees only new questions, and reconnects the log cannot
/// serve.
async fn answer(replay: Option<Extension<Replay>>, Query(q): Query<AnswerQuery>) -> Response {
    let start = match replay {
        // The answer's history is gone: the layer's gap event says so; nothing follows.
        Some(Extension(Replay::Gap(reason))) => {
            tracing::info!(%reason, "cannot resume the answer");
            let none = stream::empty::<Result<Event, Infallible>>();
            return Sse::new(none).into_response();
        }
        // The log holds the client's id but the answer was cut (a bound, a drain): go on
        // after what the layer replays.
        Some(Extension(Replay::Complete { last_event_id, .. })) => {
            last_event_id.as_str().parse::<usize>().unwrap_or(0)
        }
        _ => 0,
    };
    let every = Duration::from_millis(q.interval_ms.unwrap_or(100).max(1));
    let words: Vec<&'static str> = ANSWER.split(' ').collect();
    let tokens = stream::unfold(
        (start, tokio::time::interval(every)),
        move |(n, mut ticks)| {
            let word = words.get(n).copied();
            async move {
                ticks.tick().await;
                let word = word?;
                let event = Event::default().id((n + 1).to_string()).data(word);
                Some((Ok::<_, Infallible>(event), (n + 1, ticks)))
            }
        },
    );
    let mut response = Sse::new(tokens).into_response();
    response.extensions_mut().insert(Detach);
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
        .replay(
            ReplayPolicy::new()
                .max_events(std::num::NonZeroUsize::new(150).expect("not zero"))
                .gap_event("gap"),
        )
        .build()?;

    let shutdown_tracker = tracker.clone();
    let app = Router::new()
        .route("/events", get(events))
        .route("/answer", get(answer))
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
    println!(
        "Resume after event 5, as an MCP client does (a browser's EventSource sends the same \
         Last-Event-ID but no session header: see the README's quick start):"
    );
    println!("  curl -N -H 'mcp-session-id: demo-1' -H 'Last-Event-ID: 5' http://{addr}/events");
    println!("See heartbeats (an event every 12 s, a heartbeat after 5 s of silence):");
    println!("  curl -N -H 'mcp-session-id: demo-2' 'http://{addr}/events?interval_ms=12000'");
    println!("An answer streamed word by word; press Ctrl-C mid-answer:");
    println!("  curl -N -H 'mcp-session-id: chat-1' http://{addr}/answer");
    println!("Come back after the last id you saw (say 20): the words you missed, then the rest:");
    println!("  curl -N -H 'mcp-session-id: chat-1' -H 'Last-Event-ID: 20' http://{addr}/answer");
    println!("An id older than the 150 events kept: the gap header and event, nothing replayed:");
    println!("  curl -N -i -H 'mcp-session-id: chat-1' -H 'Last-Event-ID: 1' http://{addr}/answer");
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
