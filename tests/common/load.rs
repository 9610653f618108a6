//! A paced SSE load: a server route that emits numbered events at a set rate, and a client
//! that reads them, noting the last id and each event's delivery latency.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::Query;
use axum::response::sse::{Event, Sse};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use tower_sse_tracker::{SessionId, SseTracker};

pub fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

#[derive(serde::Deserialize)]
pub struct LoadQuery {
    events: u64,
    per_second: u64,
}

/// `events` events at `per_second`, ids 1..=events, data = the send time in µs.
pub fn paced(
    events: u64,
    per_second: u64,
) -> impl Stream<Item = Result<Event, std::convert::Infallible>> {
    let mut ticks = tokio::time::interval(Duration::from_micros(1_000_000 / per_second));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    stream::unfold((1, ticks), move |(n, mut ticks)| async move {
        if n > events {
            return None;
        }
        ticks.tick().await;
        let event = Event::default()
            .id(n.to_string())
            .data(now_micros().to_string());
        Some((Ok(event), (n + 1, ticks)))
    })
}

pub async fn load(
    Extension(_session): Extension<SessionId>,
    Query(q): Query<LoadQuery>,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    Sse::new(paced(q.events, q.per_second))
}

pub struct ClientResult {
    pub session: String,
    pub last_id: Option<String>,
    pub received: usize,
    pub latencies_us: Vec<u64>,
}

pub async fn client(http: reqwest::Client, url: String, session: String) -> ClientResult {
    let response = http
        .get(&url)
        .header("mcp-session-id", &session)
        .send()
        .await
        .unwrap();
    let mut body = response.bytes_stream();
    let mut buf = String::new();
    let mut result = ClientResult {
        session,
        last_id: None,
        received: 0,
        latencies_us: Vec::new(),
    };
    while let Some(chunk) = body.next().await {
        buf.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            let mut sent = None;
            for line in event.lines() {
                if let Some(id) = line.strip_prefix("id:") {
                    result.last_id = Some(id.trim().to_owned());
                    result.received += 1;
                } else if let Some(data) = line.strip_prefix("data:") {
                    sent = data.trim().parse::<u64>().ok();
                }
            }
            if let Some(sent) = sent {
                result.latencies_us.push(now_micros().saturating_sub(sent));
            }
        }
    }
    result
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Serves `GET /load?events=N&per_second=R` behind the tracker's layer on 127.0.0.1.
pub async fn serve_load(tracker: &SseTracker) -> std::net::SocketAddr {
    let app = Router::new()
        .route("/load", get(load))
        .layer(tracker.layer());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    // Without TCP_NODELAY, the last small frame of a short stream can wait for the client's
    // delayed ACK (40 ms on Linux), which would show as frame delay.
    let listener = axum::serve::ListenerExt::tap_io(listener, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}
