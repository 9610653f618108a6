//! Two server instances sharing one Redis, or one Redis Cluster:
//!
//! 1. a feed: a client reads some events from the first, disconnects, reconnects to the
//!    second with `Last-Event-ID`, and the second resumes where the first stopped (from the
//!    latest ids in Redis);
//! 2. an answer (a response marked `Detach`, with replay across instances): a client reads
//!    part of it from the first instance, its connection breaks, it reconnects to the second,
//!    which has never seen the answer: the second replays what the client missed from Redis
//!    and follows the answer to its end while the first produces it. Nothing missed, nothing
//!    twice.
//!
//! ```text
//! apt-get install -y redis-server && redis-server --daemonize yes   # if none is running
//! cargo run --example two_instances --features redis                # REDIS_URL overrides
//! # A Redis Cluster: the URLs of some of its nodes, separated by commas.
//! REDIS_CLUSTER_URLS=redis://127.0.0.1:7000,redis://127.0.0.1:7001 \
//!   cargo run --example two_instances --features redis
//! ```

use std::convert::Infallible;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use futures_util::StreamExt;
use futures_util::stream::{self, Stream};
use tower_sse_tracker::store::RedisStore;
use tower_sse_tracker::{Detach, LastEventId, ReplayPolicy, Resume, SseTracker, StreamKey};

const STREAM: &str = "GET /events";

#[derive(Clone)]
struct Instance {
    name: &'static str,
    tracker: SseTracker,
}

fn numbered(start: u64) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(
        (start, tokio::time::interval(Duration::from_millis(200))),
        |(n, mut ticks)| async move {
            ticks.tick().await;
            let event = Event::default()
                .id(n.to_string())
                .data(format!("event {n}"));
            Some((Ok(event), (n + 1, ticks)))
        },
    )
}

/// `GET /events`: resumes after the client's `Last-Event-ID`, checked against what the
/// instances have stored.
async fn events(
    State(instance): State<Instance>,
    key: Option<Extension<StreamKey>>,
    last: Option<Extension<LastEventId>>,
) -> Response {
    let Some(Extension(key)) = key else {
        return (
            axum::http::StatusCode::BAD_REQUEST,
            "mcp-session-id required",
        )
            .into_response();
    };
    let client = last.map(|Extension(LastEventId(id))| id);
    let decision = instance.tracker.resume(&key, client.as_ref()).await;
    let start = match &decision {
        Ok(Resume::Current(id)) => {
            println!(
                "[{}] client is current at {id}: continuing after it",
                instance.name
            );
            id.as_str().parse::<u64>().map_or(1, |n| n + 1)
        }
        Ok(Resume::Behind { client, latest }) => {
            println!(
                "[{}] client at {client:?}, stream at {latest}: replaying after the client's id",
                instance.name
            );
            client
                .as_ref()
                .and_then(|id| id.as_str().parse::<u64>().ok())
                .map_or(1, |n| n + 1)
        }
        Ok(Resume::Unconfirmed { client, stored }) => {
            println!(
                "[{}] client at {client}, the store at {stored} (served elsewhere): replaying after the client's id",
                instance.name
            );
            client.as_str().parse::<u64>().map_or(1, |n| n + 1)
        }
        Ok(Resume::Unknown) => {
            println!("[{}] unknown stream: starting at 1", instance.name);
            1
        }
        Ok(other) => {
            println!("[{}] {other:?}: starting at 1", instance.name);
            1
        }
        Err(error) => {
            println!(
                "[{}] store unavailable ({error}): trusting the client",
                instance.name
            );
            client
                .and_then(|id| id.as_str().parse::<u64>().ok())
                .map_or(1, |n| n + 1)
        }
    };
    Sse::new(numbered(start)).into_response()
}

/// `GET /answer`: an answer of 30 tokens, one each 100 ms, that goes on without its client.
async fn answer() -> Response {
    let tokens = stream::iter(1..=30u32).then(|n| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<_, Infallible>(
            Event::default()
                .id(n.to_string())
                .data(format!("token {n}")),
        )
    });
    let mut response = Sse::new(tokens).into_response();
    response.extensions_mut().insert(Detach);
    response
}

async fn start_instance(
    name: &'static str,
    store: RedisStore,
) -> Result<(Instance, String), Box<dyn std::error::Error>> {
    let store = store.with_prefix("two-instances-demo");
    let tracker = SseTracker::builder()
        .store(store)
        .replay(ReplayPolicy::new().across_instances(true))
        .build()?;
    let instance = Instance { name, tracker };
    let app = Router::new()
        .route("/events", get(events))
        .route("/answer", get(answer))
        .layer(instance.tracker.layer())
        .with_state(instance.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let base = format!("http://{}", listener.local_addr()?);
    tokio::spawn(async move { axum::serve(listener, app).await });
    println!("[{name}] listening on {base}");
    Ok((instance, base))
}

/// Reads `count` events, returning their ids.
async fn read_events(
    client: &reqwest::Client,
    url: &str,
    session: &str,
    last_event_id: Option<&str>,
    count: usize,
) -> Result<Vec<String>, Box<dyn std::error::Error>> {
    let mut request = client.get(url).header("mcp-session-id", session);
    if let Some(id) = last_event_id {
        request = request.header("last-event-id", id);
    }
    let mut body = request.send().await?.bytes_stream();
    let mut text = String::new();
    let mut ids = Vec::new();
    while ids.len() < count {
        let Some(chunk) = body.next().await else {
            break;
        };
        text.push_str(&String::from_utf8_lossy(&chunk?));
        while let Some(end) = text.find("\n\n") {
            let event: String = text.drain(..end + 2).collect();
            if let Some(id) = event.lines().find_map(|l| l.strip_prefix("id:")) {
                ids.push(id.trim().to_owned());
            }
        }
    }
    Ok(ids)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Each instance has a store (and connection) of its own, as two processes would.
    let cluster = std::env::var("REDIS_CLUSTER_URLS").ok();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let store = || match &cluster {
        Some(urls) => RedisStore::cluster(urls.split(',')),
        None => RedisStore::new(&url),
    };
    match &cluster {
        Some(urls) => println!("Redis Cluster: {urls}"),
        None => println!("Redis: {url}"),
    }
    let (a, url_a) = start_instance("A", store()?).await?;
    let (b, url_b) = start_instance("B", store()?).await?;
    let session = format!(
        "demo-{}",
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis()
    );
    let client = reqwest::Client::builder().no_proxy().build()?;

    println!("\nclient: reading 5 events from A as session {session}");
    let seen = read_events(&client, &format!("{url_a}/events"), &session, None, 5).await?;
    println!("client: got ids {seen:?} from A, then disconnects");
    let last = seen.last().cloned().ok_or("A sent no event")?;

    // A's worker writes the stream's latest id to Redis within a flush interval (100 ms). (A
    // may have handed one more event to its HTTP stack before it saw the client leave.)
    let last_n: u64 = last.parse()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while b
        .tracker
        .resolve(&StreamKey::try_new(&session, STREAM)?)
        .await?
        .and_then(|id| id.as_str().parse::<u64>().ok())
        .is_none_or(|n| n < last_n)
    {
        if tokio::time::Instant::now() > deadline {
            return Err("A never wrote the stream's latest id to Redis".into());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    println!(
        "B reads from Redis: latest id of ({session}, {STREAM}) = {:?}",
        b.tracker
            .resolve(&StreamKey::try_new(&session, STREAM)?)
            .await?
            .map(|id| id.to_string())
    );

    println!("\nclient: reconnecting to B with Last-Event-ID: {last}");
    let resumed = read_events(
        &client,
        &format!("{url_b}/events"),
        &session,
        Some(&last),
        3,
    )
    .await?;
    println!("client: got ids {resumed:?} from B");
    let expected: Vec<String> = (1..=3)
        .map(|i| (last.parse::<u64>().unwrap_or(0) + i).to_string())
        .collect();
    if resumed == expected {
        println!("\nresumed on the second instance exactly where the first stopped");
    } else {
        println!("\nunexpected: wanted {expected:?}");
    }

    println!("\nclient: asking A for an answer of 30 tokens as session {session}");
    let seen = read_events(&client, &format!("{url_a}/answer"), &session, None, 5).await?;
    println!("client: got ids {seen:?} from A, then its connection breaks");
    let last = seen.last().cloned().ok_or("A sent no token")?;
    println!("client: reconnecting to B, which never saw the answer, with Last-Event-ID: {last}");
    let rest = read_events(
        &client,
        &format!("{url_b}/answer"),
        &session,
        Some(&last),
        usize::MAX,
    )
    .await?;
    println!("client: got ids {rest:?} from B, to the end of the answer");
    let expected: Vec<String> = (last.parse::<u32>()? + 1..=30)
        .map(|n| n.to_string())
        .collect();
    if rest == expected {
        println!(
            "\nthe answer reached the client whole across the two instances: nothing missed, nothing twice"
        );
    } else {
        println!("\nunexpected: wanted {expected:?}");
    }
    let _ = a.tracker.shutdown(Duration::from_secs(2)).await;
    let _ = b.tracker.shutdown(Duration::from_secs(2)).await;
    Ok(())
}
