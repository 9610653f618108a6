//! Replay under chaos, in one instance: many streams whose clients drop at random points (in
//! the middle of a frame, of an event, between events, before the first event) and reconnect
//! with their last id, again and again, while per-stream bounds and the tracker's budget evict
//! history. For every client, the events it received over all its connections are the
//! producer's, in order, with none twice and none missing, except where a response carried the
//! gap signal (header and extension), after which none is twice either.
//!
//! The application produces lazily, as most do: an event exists once its body hands it to the
//! layer, and one body at a time produces a stream's events (a new connection's body takes the
//! producer over). Events a body handed to the layer that its client did not receive are the
//! ones the replay must give back.
//!
//! Sizes: `REPLAY_CHAOS_STREAMS` (default 40) and `REPLAY_CHAOS_ROUNDS` (default 1500) for the
//! chaos test; the property test runs 64 cases. `REPLAY_CHAOS_TRACE=1` prints each connection.

mod common;

use std::collections::HashMap;
use std::convert::Infallible;
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use common::chaos::{Rng, data_of, event};
use common::reference;
use http::{Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use proptest::prelude::*;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::{GapReason, REPLAY_HEADER, Replay, ReplayPolicy, SseTracker};

/// The producer of one stream: events are made as its body is polled.
#[derive(Default)]
struct Producer {
    /// Events handed to the layer in full.
    next: u64,
    /// The body that produces now: a new one takes over.
    owner: u64,
}

type Producers = Arc<Mutex<HashMap<usize, Producer>>>;

/// What the application learned from the layer, by stream.
type Learned = Arc<Mutex<HashMap<usize, Option<Replay>>>>;

/// The layer over a handler whose SSE body hands out the stream's events in frames of random
/// sizes, made lazily; a body stops producing when a newer body of its stream took over.
fn service(
    tracker: &SseTracker,
    producers: Producers,
    learned: Learned,
) -> impl Service<
    Request<()>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>>,
    Error = Infallible,
> + Clone
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(move |req: Request<()>| {
            let producers = producers.clone();
            let learned = learned.clone();
            async move {
                let stream: usize = req.headers()["mcp-session-id"]
                    .to_str()
                    .unwrap()
                    .trim_start_matches('s')
                    .parse()
                    .unwrap();
                let seed: u64 = req.headers()["x-seed"].to_str().unwrap().parse().unwrap();
                learned
                    .lock()
                    .unwrap()
                    .insert(stream, req.extensions().get::<Replay>().cloned());
                let me = {
                    let mut producers = producers.lock().unwrap();
                    let producer = producers.entry(stream).or_default();
                    producer.owner += 1;
                    producer.owner
                };
                // The bytes of the events this body has begun to hand out, and how many.
                let state = (producers, Rng(seed), Vec::<u8>::new(), 0usize, None::<u64>);
                let frames = futures_util::stream::unfold(
                    state,
                    move |(producers, mut rng, mut pending, mut sent, mut first)| async move {
                        let mut guard = producers.lock().unwrap();
                        let producer = guard.get_mut(&stream).unwrap();
                        if producer.owner != me {
                            return None;
                        }
                        // Refill: the next events, from the first not handed out in full.
                        let base = *first.get_or_insert(producer.next);
                        while pending.len() < sent + 600 {
                            let n = base + count_events(&pending, stream, base);
                            pending.extend_from_slice(&event(stream, n));
                        }
                        let len = 1 + rng.below(400) as usize;
                        let frame = pending[sent..sent + len].to_vec();
                        sent += len;
                        // Events now dispatched advance the producer: an event is
                        // dispatched at its blank line's line end, which is its CR when it
                        // ends in CRLF (the LF after it then belongs to no event).
                        let mut done = 0;
                        let mut at = 0;
                        loop {
                            let e = event(stream, base + done);
                            let dispatched = e.len() - usize::from(e.ends_with(b"\r\n"));
                            if at + dispatched > sent {
                                break;
                            }
                            at += e.len();
                            done += 1;
                        }
                        producer.next = base + done;
                        drop(guard);
                        Some((
                            Ok::<_, Infallible>(Frame::data(Bytes::from(frame))),
                            (producers, rng, pending, sent, first),
                        ))
                    },
                );
                let mut response = Response::new(StreamBody::new(Box::pin(frames)));
                response.headers_mut().insert(
                    header::CONTENT_TYPE,
                    header::HeaderValue::from_static("text/event-stream"),
                );
                Ok::<_, Infallible>(response)
            }
        })
}

/// How many whole events of `stream` from `base` on `pending` holds.
fn count_events(pending: &[u8], stream: usize, base: u64) -> u64 {
    let (mut at, mut n) = (0, 0);
    while at < pending.len() {
        at += event(stream, base + n).len();
        n += 1;
    }
    n
}

/// One client: what it received, event by event, and its last id.
#[derive(Default)]
struct Client {
    /// The event numbers received, over all connections.
    received: Vec<u64>,
    last_id: Option<String>,
    /// The event expected next, once the client has an id to resume from.
    want: Option<u64>,
}

#[derive(Default, Debug)]
struct Tally {
    connections: u64,
    reconnects: u64,
    complete: u64,
    gaps: HashMap<&'static str, u64>,
    silent_gaps: u64,
    duplicates: u64,
    corrupted: u64,
    events: u64,
}

struct Chaos {
    streams: usize,
    rounds: usize,
    policy: ReplayPolicy,
    seed: u64,
}

async fn run(chaos: Chaos) -> Tally {
    let tracker = SseTracker::builder()
        .heartbeat_interval(None)
        .replay(chaos.policy)
        .build()
        .unwrap();
    let producers = Producers::default();
    let learned = Learned::default();
    let mut svc = service(&tracker, producers.clone(), learned.clone());
    let mut rng = Rng(chaos.seed);
    let mut clients: Vec<Client> = (0..chaos.streams).map(|_| Client::default()).collect();
    // Bodies whose client is gone and whose end the server has not seen yet.
    let mut lingering = Vec::new();
    let mut tally = Tally::default();
    for _ in 0..chaos.rounds {
        let stream = rng.below(chaos.streams as u64) as usize;
        let client = &mut clients[stream];
        let mut request = Request::builder()
            .uri("/events")
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
        let extension = learned.lock().unwrap().remove(&stream).flatten();
        let gap = match (&header, &extension) {
            (Some(h), Some(Replay::Gap(reason))) => {
                assert_eq!(h, &format!("gap; reason={reason}"));
                let reason: &'static str = match reason {
                    GapReason::NoHistory => "no_history",
                    GapReason::Evicted => "evicted",
                    GapReason::UnknownId => "unknown_id",
                    GapReason::Encoded => "encoded",
                    _ => "other",
                };
                *tally.gaps.entry(reason).or_default() += 1;
                true
            }
            (Some(h), Some(Replay::Complete { events, .. })) => {
                assert!(h.starts_with("complete; events="), "{h}");
                let _ = events;
                tally.complete += 1;
                false
            }
            (None, None) => false,
            other => panic!("header and extension disagree: {other:?}"),
        };
        // The client reads a random number of bytes, then drops: mid-frame, mid-event,
        // between events or before the first byte.
        let budget = match rng.below(4) {
            0 => rng.below(40) as usize,
            1 => rng.below(600) as usize,
            _ => rng.below(4000) as usize,
        };
        let mut body = response.into_body();
        let mut received = Vec::new();
        while received.len() < budget {
            let Some(frame) = body.frame().await else {
                break;
            };
            let data = frame.unwrap().into_data().unwrap();
            let take = data.len().min(budget - received.len());
            received.extend_from_slice(&data[..take]);
        }
        // Sometimes the server does not see the client go before it reconnects.
        if rng.below(4) == 0 {
            lingering.push(body);
        } else {
            drop(body);
        }
        if lingering.len() > 8 || rng.below(3) == 0 {
            lingering.clear();
        }
        // What the client's parser makes of it.
        let parsed = reference::parse(&received, 1024);
        let mut first_after_gap = gap;
        if std::env::var("REPLAY_CHAOS_TRACE").is_ok() {
            let ids: Vec<&String> = parsed.events.iter().map(|(id, _)| id).collect();
            eprintln!(
                "stream {stream} last_id {:?} header {header:?} want {:?} got {ids:?} ({} bytes)",
                client.last_id,
                client.want,
                received.len()
            );
        }
        for (id, data) in parsed.events {
            let n: u64 = id.parse().expect("every event has an id");
            tally.events += 1;
            if data != data_of(stream, n) {
                tally.corrupted += 1;
            }
            match client.want {
                Some(want) if n == want => {}
                Some(want) if n > want && first_after_gap => {}
                Some(want) if n < want => tally.duplicates += 1,
                Some(_) => tally.silent_gaps += 1,
                None => {}
            }
            first_after_gap = false;
            client.want = Some(n + 1);
            client.received.push(n);
            client.last_id = Some(id);
        }
    }
    drop(lingering);
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
async fn chaos_every_client_gets_every_event_once_or_the_gap_signal() {
    let streams = env("REPLAY_CHAOS_STREAMS", 40);
    let rounds = env("REPLAY_CHAOS_ROUNDS", 1500);
    let tally = run(Chaos {
        streams,
        rounds,
        // Small bounds, so that evictions by each cause happen.
        policy: ReplayPolicy::new()
            .max_events(nz(24))
            .max_stream_bytes(nz(4 << 10))
            .max_total_bytes(nz((streams * 3) << 10)),
        seed: 7,
    })
    .await;
    println!(
        "replay chaos: {streams} streams, {} connections, {} reconnects, {} events received, \
         replays complete {}, impossible {:?}, silent gaps: {}, duplicates: {}, corrupted: {}",
        tally.connections,
        tally.reconnects,
        tally.events,
        tally.complete,
        tally.gaps,
        tally.silent_gaps,
        tally.duplicates,
        tally.corrupted
    );
    assert_eq!(tally.silent_gaps, 0);
    assert_eq!(tally.duplicates, 0);
    assert_eq!(tally.corrupted, 0);
    assert!(tally.complete > 0, "replays happened");
    assert!(
        tally.gaps.get("evicted").copied().unwrap_or(0) > 0,
        "the bounds evicted history"
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn any_drop_points_lose_nothing_silently_and_repeat_nothing(
        seed in any::<u64>(),
        streams in 1usize..4,
        events in 2usize..40,
        total in 2usize..64,
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let tally = runtime.block_on(run(Chaos {
            streams,
            rounds: 30,
            policy: ReplayPolicy::new()
                .max_events(nz(events))
                .max_stream_bytes(nz((8 << 10).min(total << 10)))
                .max_total_bytes(nz(total << 10)),
            seed,
        }));
        prop_assert_eq!(tally.silent_gaps, 0);
        prop_assert_eq!(tally.duplicates, 0);
        prop_assert_eq!(tally.corrupted, 0);
    }
}
