//! Detached streams under chaos, in one instance: each stream is one answer of a known number
//! of events, marked `Detach`, produced lazily as its body is polled (by its client's
//! connection, or by the layer's task once the client has gone), with yields that interleave
//! producers and readers. Clients drop at random points (mid-frame, mid-event, between events,
//! before the first byte) and reconnect with their last id, while per-stream bounds and the
//! budget evict history. Every client ends with the whole answer, each event once and in
//! order, or with the gap signal, after which nothing was repeated either; none is left
//! unfinished.
//!
//! Sizes: `DETACH_CHAOS_STREAMS` (default 150) and `DETACH_CHAOS_ROUNDS` (default 3000).

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::chaos::{Rng, data_of, event};
use common::reference;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::{Detach, REPLAY_HEADER, Replay, ReplayPolicy, SseTracker};

/// The number of events of stream `stream`'s answer.
fn answer_len(stream: usize) -> u64 {
    40 + Rng(stream as u64 ^ 0xA5A5).below(200)
}

/// Calls of the application, by stream, with the replay each was told of.
type Calls = Arc<Mutex<HashMap<usize, Vec<Option<Replay>>>>>;

/// The layer over the application: the answer of the stream from the event after the one the
/// layer replayed up to (a new question starts at 0), in frames of random sizes made as the
/// body is polled, marked `Detach`; after a gap, an empty body (the answer cannot go on).
fn service(
    tracker: &SseTracker,
    calls: Calls,
) -> impl Service<
    Request<()>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>>,
    Error = Infallible,
> + Clone
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(move |req: Request<()>| {
            let calls = calls.clone();
            async move {
                let stream: usize = req.headers()["mcp-session-id"]
                    .to_str()
                    .unwrap()
                    .trim_start_matches('s')
                    .parse()
                    .unwrap();
                let seed: u64 = req.headers()["x-seed"].to_str().unwrap().parse().unwrap();
                let replay = req.extensions().get::<Replay>().cloned();
                calls
                    .lock()
                    .unwrap()
                    .entry(stream)
                    .or_default()
                    .push(replay.clone());
                let (first, end) = match &replay {
                    None => (0, answer_len(stream)),
                    Some(Replay::Complete { last_event_id, .. }) => (
                        last_event_id.as_str().parse::<u64>().unwrap() + 1,
                        answer_len(stream),
                    ),
                    Some(_) => (0, 0),
                };
                let bytes: Vec<u8> = (first..end).flat_map(|n| event(stream, n)).collect();
                let frames = futures_util::stream::unfold(
                    (bytes, 0usize, Rng(seed)),
                    |(bytes, at, mut rng)| async move {
                        if at >= bytes.len() {
                            return None;
                        }
                        if rng.below(3) == 0 {
                            tokio::task::yield_now().await;
                        }
                        let len = (1 + rng.below(300) as usize).min(bytes.len() - at);
                        let frame = Bytes::copy_from_slice(&bytes[at..at + len]);
                        Some((
                            Ok::<_, Infallible>(Frame::data(frame)),
                            (bytes, at + len, rng),
                        ))
                    },
                );
                let mut response = Response::new(StreamBody::new(Box::pin(frames)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/event-stream"),
                );
                response.extensions_mut().insert(Detach);
                Ok::<_, Infallible>(response)
            }
        })
}

#[derive(Default)]
struct Client {
    received: Vec<u64>,
    last_id: Option<String>,
    want: u64,
    /// Finished: the whole answer, or the gap signal.
    done: bool,
    gap: bool,
}

#[derive(Default, Debug)]
struct Tally {
    connections: u64,
    reconnects: u64,
    tails: u64,
    no_content: u64,
    complete_to_application: u64,
    gaps: HashMap<String, u64>,
    silent_gaps: u64,
    duplicates: u64,
    corrupted: u64,
    events: u64,
}

/// One connection of `stream`'s client, reading `budget` bytes (all, with `None`).
async fn connect<S, B>(
    svc: &mut S,
    rng: &mut Rng,
    stream: usize,
    client: &mut Client,
    tally: &mut Tally,
    budget: Option<usize>,
) where
    S: Service<Request<()>, Response = Response<B>, Error = Infallible>,
    B: http_body::Body<Data = Bytes, Error = Infallible> + Unpin,
{
    let mut request = Request::builder()
        .uri("/answer")
        .header("mcp-session-id", format!("s{stream}"))
        .header("x-seed", rng.next().to_string());
    if let Some(id) = &client.last_id {
        request = request.header("last-event-id", id);
        tally.reconnects += 1;
    }
    tally.connections += 1;
    let response = svc
        .ready()
        .await
        .unwrap()
        .call(request.body(()).unwrap())
        .await
        .unwrap();
    let header = response
        .headers()
        .get(REPLAY_HEADER)
        .map(|v| v.to_str().unwrap().to_owned());
    if response.status() == StatusCode::NO_CONTENT {
        tally.no_content += 1;
        // The answer ended, and the client missed nothing.
        assert_eq!(client.want, answer_len(stream), "204 before the end");
        client.done = true;
        return;
    }
    match header.as_deref() {
        Some(h) if h.ends_with("; tail") => tally.tails += 1,
        Some(h) if h.starts_with("gap; reason=") => {
            *tally.gaps.entry(h[12..].to_owned()).or_default() += 1;
            client.gap = true;
            client.done = true;
        }
        Some(_) => tally.complete_to_application += 1,
        None => {}
    }
    let mut body = response.into_body();
    let mut received = Vec::new();
    let mut ended = false;
    while budget.is_none_or(|budget| received.len() < budget) {
        let Some(frame) = body.frame().await else {
            ended = true;
            break;
        };
        let data = frame.unwrap().into_data().unwrap();
        let take = budget.map_or(data.len(), |b| data.len().min(b - received.len()));
        received.extend_from_slice(&data[..take]);
    }
    drop(body);
    for (id, data) in reference::parse(&received, 1024).events {
        let n: u64 = id.parse().expect("every event has an id");
        tally.events += 1;
        if data != data_of(stream, n) {
            tally.corrupted += 1;
        }
        if n < client.want {
            tally.duplicates += 1;
        } else if n > client.want {
            tally.silent_gaps += 1;
        }
        client.want = n + 1;
        client.received.push(n);
        client.last_id = Some(id);
    }
    // Sometimes the client goes with the last event before it reads the end: it comes back.
    if ended && client.want == answer_len(stream) && rng.below(3) != 0 {
        client.done = true;
    }
}

async fn run(streams: usize, rounds: usize, policy: ReplayPolicy, seed: u64) -> Tally {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .replay(policy)
        .build()
        .unwrap();
    let calls = Calls::default();
    let mut svc = service(&tracker, calls.clone());
    let mut rng = Rng(seed);
    let mut clients: Vec<Client> = (0..streams).map(|_| Client::default()).collect();
    let mut tally = Tally::default();
    for _ in 0..rounds {
        let open: Vec<usize> = (0..streams).filter(|&s| !clients[s].done).collect();
        if open.is_empty() {
            break;
        }
        let stream = open[rng.below(open.len() as u64) as usize];
        // Mid-frame, mid-event, between events, before the first byte; sometimes to the end.
        let budget = match rng.below(5) {
            0 => Some(rng.below(40) as usize),
            1 => Some(rng.below(600) as usize),
            2 => None,
            _ => Some(rng.below(3000) as usize),
        };
        connect(
            &mut svc,
            &mut rng,
            stream,
            &mut clients[stream],
            &mut tally,
            budget,
        )
        .await;
        // The detached bodies and the producers run meanwhile.
        for _ in 0..rng.below(4) {
            tokio::task::yield_now().await;
        }
    }
    // Every client comes back until it has the whole answer or the gap signal.
    for (stream, client) in clients.iter_mut().enumerate() {
        for _ in 0..100 {
            if client.done {
                break;
            }
            connect(&mut svc, &mut rng, stream, client, &mut tally, None).await;
        }
        assert!(client.done, "stream {stream} never finished");
        if !client.gap {
            let all: Vec<u64> = (0..answer_len(stream)).collect();
            assert_eq!(client.received, all, "stream {stream}");
        }
    }
    tally
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn nz(n: usize) -> NonZeroUsize {
    NonZeroUsize::new(n).unwrap()
}

#[tokio::test]
async fn chaos_detached_answers_reach_every_client_whole_once_each_or_with_the_gap_signal() {
    let streams = env("DETACH_CHAOS_STREAMS", 150);
    let rounds = env("DETACH_CHAOS_ROUNDS", 3000);
    let tally = run(
        streams,
        rounds,
        // Small bounds, so that logs are evicted under readers and reconnects.
        ReplayPolicy::new()
            .max_events(nz(64))
            .max_stream_bytes(nz(12 << 10))
            .max_total_bytes(nz((streams * 8) << 10)),
        11,
    )
    .await;
    println!(
        "detach chaos: {streams} streams, {} connections, {} reconnects, {} events received, \
         followed from the log {}, 204 {}, replays to the application {}, impossible {:?}, \
         silent gaps: {}, duplicates: {}, corrupted: {}",
        tally.connections,
        tally.reconnects,
        tally.events,
        tally.tails,
        tally.no_content,
        tally.complete_to_application,
        tally.gaps,
        tally.silent_gaps,
        tally.duplicates,
        tally.corrupted
    );
    assert_eq!(tally.silent_gaps, 0);
    assert_eq!(tally.duplicates, 0);
    assert_eq!(tally.corrupted, 0);
    assert!(tally.tails > 0, "reconnects followed detached streams");
}

#[tokio::test]
async fn with_room_for_every_answer_every_client_gets_its_whole_answer() {
    let tally = run(20, 800, ReplayPolicy::new(), 5).await;
    println!("detach chaos, no eviction: {tally:?}");
    assert!(tally.gaps.is_empty(), "{:?}", tally.gaps);
    assert_eq!(tally.silent_gaps + tally.duplicates + tally.corrupted, 0);
    assert!(tally.tails > 0 && tally.no_content > 0);
}
