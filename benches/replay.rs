//! What replay costs, side by side in one run:
//!
//! - `replay/{off,on}/*`: a body of 2 000 one-event frames (64 bytes, 1 KiB) polled to the end
//!   through the layer, with replay off and on (each event's bytes copied into the stream's
//!   log); the ratios are printed first;
//! - heap per stream: 100 streams, each with a log of 256 events of 100 bytes, measured with a
//!   counting allocator (with replay on minus with it off), against the bytes the logs hold;
//! - time to the first replayed byte: a reconnect whose `Last-Event-ID` is 300 events behind,
//!   from the request to its first frame, in process; p50 and p99 of 2 000.
//!
//! Run: `cargo bench --bench replay`; `REPLAY_BENCH_QUICK=1` shortens it.

#[path = "../tests/common/counting_alloc.rs"]
mod counting_alloc;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use std::convert::Infallible;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::{ReplayPolicy, SseTracker};

const FRAMES: usize = 2_000;

/// `n` events of `len` bytes each, one per frame: `id: {i:06}\ndata: xxx…\n\n`.
fn corpus(n: usize, len: usize) -> Vec<Bytes> {
    let data = "x".repeat(len - "id: 000000\ndata: \n\n".len());
    (1..=n)
        .map(|i| Bytes::from(format!("id: {i:06}\ndata: {data}\n\n")))
        .collect()
}

type Frames =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn sse_response(frames: Vec<Bytes>) -> Response<Frames> {
    let items: Vec<_> = frames.into_iter().map(|f| Ok(Frame::data(f))).collect();
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(items)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// The layer of `tracker` over a handler whose SSE body is the request's frames.
fn service(
    tracker: &SseTracker,
) -> impl Service<
    Request<Vec<Bytes>>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>>,
    Error = Infallible,
> + Clone
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(|req: Request<Vec<Bytes>>| async move {
            Ok::<_, Infallible>(sse_response(req.into_body()))
        })
}

fn request(session: &str, last_event_id: Option<&str>, frames: Vec<Bytes>) -> Request<Vec<Bytes>> {
    let mut req = Request::builder().header("mcp-session-id", session);
    if let Some(id) = last_event_id {
        req = req.header("last-event-id", id);
    }
    req.body(frames).unwrap()
}

async fn drain<B: http_body::Body + Unpin>(mut body: B) -> usize
where
    B::Error: std::fmt::Debug,
{
    let mut bytes = 0;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            bytes += bytes::Buf::remaining(&data);
        }
    }
    bytes
}

fn times<F: std::future::Future<Output = usize>>(
    rt: &tokio::runtime::Runtime,
    runs: usize,
    mut f: impl FnMut() -> F,
) -> Vec<Duration> {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = Instant::now();
            std::hint::black_box(rt.block_on(f()));
            started.elapsed()
        })
        .collect();
    times.sort();
    times
}

fn tracker(replay: bool) -> SseTracker {
    let builder = SseTracker::builder().heartbeat_interval(None);
    let builder = if replay {
        builder.replay(ReplayPolicy::new())
    } else {
        builder
    };
    builder.build().unwrap()
}

/// Heap bytes (this thread's) that 100 streams with 256 events of 100 bytes each leave.
fn heap_of_streams(rt: &tokio::runtime::Runtime, replay: bool) -> isize {
    let frames = corpus(256, 100);
    rt.block_on(async {
        let tracker = tracker(replay);
        let mut svc = service(&tracker);
        let before = counting_alloc::live().0;
        for s in 0..100 {
            let req = request(&format!("heap-{s}"), None, frames.clone());
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            drain(response.into_body()).await;
        }
        let after = counting_alloc::live().0;
        drop(tracker);
        after - before
    })
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("REPLAY_BENCH_QUICK").is_some();
    // As in `body_overhead`: one large block freed first keeps the runs' allocations below
    // glibc's dynamic mmap threshold.
    drop(std::hint::black_box(vec![1u8; 8 << 20]));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();

    // Heap per stream.
    let on = heap_of_streams(&rt, true);
    let off = heap_of_streams(&rt, false);
    let per_stream = (on - off) as f64 / 100.0;
    let held = 256.0 * 100.0;
    println!(
        "heap per stream with a log of 256 events of 100 bytes: {per_stream:.0} bytes for \
         {held:.0} bytes held: {:.3}x",
        per_stream / held
    );

    // Replay off and on, side by side.
    let (off, on) = rt.block_on(async { (tracker(false), tracker(true)) });
    let (svc_off, svc_on) = (service(&off), service(&on));
    let runs = if quick { 101 } else { 1001 };
    for (name, len) in [("64-byte", 64), ("1 KiB", 1024)] {
        let frames = corpus(FRAMES, len);
        let t_off = times(&rt, runs, || {
            let mut svc = svc_off.clone();
            let req = request("bench", None, frames.clone());
            async move {
                let response = svc.ready().await.unwrap().call(req).await.unwrap();
                drain(response.into_body()).await
            }
        })[runs / 2];
        let t_on = times(&rt, runs, || {
            let mut svc = svc_on.clone();
            let req = request("bench", None, frames.clone());
            async move {
                let response = svc.ready().await.unwrap().call(req).await.unwrap();
                drain(response.into_body()).await
            }
        })[runs / 2];
        let per = |d: Duration| d.as_nanos() as f64 / FRAMES as f64;
        println!(
            "{name} events: replay off {:.0} ns/event, on {:.0} ns/event: {:.2}x (medians of {runs})",
            per(t_off),
            per(t_on),
            t_on.as_secs_f64() / t_off.as_secs_f64()
        );
    }

    // Time to the first replayed byte, 300 events behind.
    let ttfb_runs = if quick { 201 } else { 2001 };
    let mut svc = svc_on.clone();
    rt.block_on(async {
        let req = request("ttfb", None, corpus(301, 100));
        let response = svc.ready().await.unwrap().call(req).await.unwrap();
        drain(response.into_body()).await;
    });
    let first = times(&rt, ttfb_runs, || {
        let mut svc = svc_on.clone();
        let req = request("ttfb", Some("000001"), Vec::new());
        async move {
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            let mut body = response.into_body();
            let frame = body.frame().await.unwrap().unwrap();
            let bytes = frame.into_data().map_or(0, |d| d.len());
            assert_eq!(bytes, 300 * 100, "the whole replay in the first frame");
            bytes
        }
    });
    let pct = |p: f64| first[((ttfb_runs - 1) as f64 * p) as usize];
    println!(
        "time to the first replayed byte, 300 events of 100 bytes: p50 {:?}, p99 {:?} ({ttfb_runs} reconnects)",
        pct(0.5),
        pct(0.99)
    );

    let mut group = c.benchmark_group("replay");
    group.measurement_time(Duration::from_secs(if quick { 1 } else { 3 }));
    for len in [64, 1024] {
        let frames = corpus(FRAMES, len);
        group.throughput(Throughput::Elements(FRAMES as u64));
        for (variant, svc) in [("off", &svc_off), ("on", &svc_on)] {
            group.bench_with_input(BenchmarkId::new(variant, len), &frames, |b, frames| {
                b.to_async(&rt).iter(|| {
                    let mut svc = svc.clone();
                    let req = request("bench", None, frames.clone());
                    async move {
                        let response = svc.ready().await.unwrap().call(req).await.unwrap();
                        drain(response.into_body()).await
                    }
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
