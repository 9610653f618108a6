use std::{convert::Infallible, time::Duration};

use axum::response::sse::{Event, Sse};
use axum::{Extension, Router, extract::State, routing::get};
use futures_util::stream::{self, Stream};
use tokio::time::{Instant, sleep_until};
use tower_sse_tracker::{LastEventId, Resume, SseTracker, StreamKey};

const TICK: Duration = Duration::from_millis(500);

/// One feed for every reader: tick `n` goes out `n` ticks after the start.
async fn ticks(
    State((tracker, start)): State<(SseTracker, Instant)>,
    key: Option<Extension<StreamKey>>,
    last: Option<Extension<LastEventId>>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    // A reconnecting browser sends Last-Event-ID; the layer gives the feed's key.
    if let (Some(Extension(key)), Some(Extension(LastEventId(id)))) = (key, last)
        && let Ok(Resume::Behind { latest, .. }) = tracker.resume(&key, Some(&id)).await
    {
        println!("{key}: the client's last id is {id}, the feed is at {latest}");
    }
    let next = (start.elapsed().as_millis() / TICK.as_millis()) as u32 + 1;
    Sse::new(stream::unfold(next, move |n| async move {
        sleep_until(start + TICK * n).await;
        let event = Event::default().id(n.to_string()).data(format!("tick {n}"));
        Some((Ok(event), n + 1))
    }))
}

pub fn app(tracker: &SseTracker) -> Router {
    let state = (tracker.clone(), Instant::now());
    Router::new()
        .route("/ticks", get(ticks))
        .with_state(state)
        .layer(tracker.layer())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tracker = SseTracker::builder().build()?; // spawns the worker
    let listener = tokio::net::TcpListener::bind("127.0.0.1:3001").await?;
    let draining = tracker.clone();
    axum::serve(listener, app(&tracker))
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            draining.drain(Some(Duration::from_secs(1))); // feeds end at an event boundary
        })
        .await?;
    let report = tracker.shutdown(Duration::from_secs(5)).await; // writes what is pending
    assert!(report.is_complete(), "{report:?}");
    Ok(())
}
