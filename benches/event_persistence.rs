//! Records per second from many producers through the worker into the in-memory store, and the
//! write amplification under bursts.
//!
//! Run: `cargo bench --bench event_persistence`. It prints figures before criterion's timing:
//! the throughput of one large run, and the store entries written per dispatched event under
//! bursts of 10 events per stream per flush interval at 100, 1 000 and 10 000 active streams
//! (the flush interval is the coalescing window whatever the number of streams: at most one
//! entry per stream per flush, so 0.1 here).
//! `EVENT_PERSISTENCE_QUICK=1` makes the runs small (what CI builds).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::SseTracker;
use tower_sse_tracker::store::InMemoryStore;

fn quick() -> bool {
    std::env::var_os("EVENT_PERSISTENCE_QUICK").is_some()
}

type FrameBody =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

/// One SSE response per producer, its frames given in the request extensions.
fn service(
    tracker: &SseTracker,
) -> impl Service<
    Request<()>,
    Response = Response<tower_sse_tracker::TrackedBody<FrameBody>>,
    Error = Infallible,
    Future: Send,
> + Clone
+ Send
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(|mut req: Request<()>| async move {
            let frames: Vec<Bytes> = req.extensions_mut().remove().unwrap();
            let body = StreamBody::new(futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok(Frame::data(f)))
                    .collect::<Vec<_>>(),
            ));
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, Infallible>(response)
        })
}

fn frames(events: usize) -> Vec<Bytes> {
    (1..=events)
        .map(|n| Bytes::from(format!("id: {n}\n\n")))
        .collect()
}

/// Runs `producers` streams of `frames_each` frames (one id each) through the layer, then shuts
/// the worker down, which drains and flushes. Returns the time from the first frame to the last
/// write.
async fn run(producers: usize, frames_each: &[Bytes], store: Arc<InMemoryStore>) -> Duration {
    let tracker = SseTracker::builder()
        .store(store.clone())
        .heartbeat_interval(None)
        .build()
        .unwrap();
    let svc = service(&tracker);
    let requests: Vec<Request<()>> = (0..producers)
        .map(|p| {
            let mut req = Request::builder()
                .uri("/bench")
                .header("mcp-session-id", format!("producer-{p}"))
                .body(())
                .unwrap();
            req.extensions_mut().insert(frames_each.to_vec());
            req
        })
        .collect();
    let started = Instant::now();
    let tasks: Vec<_> = requests
        .into_iter()
        .map(|req| {
            let mut svc = svc.clone();
            tokio::spawn(async move {
                let response = svc.ready().await.unwrap().call(req).await.unwrap();
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    frame.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let report = tracker.shutdown(Duration::from_secs(60)).await;
    let took = started.elapsed();
    assert!(report.is_complete(), "{report:?}");
    assert_eq!(store.len(), producers);
    took
}

/// Bursts of 10 events per stream, one burst per flush interval.
async fn write_amplification(streams: usize, rounds: usize) -> (f64, f64, f64) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let flush = Duration::from_millis(100);
    let tracker = metrics::with_local_recorder(&recorder, || {
        SseTracker::builder()
            .heartbeat_interval(None)
            .flush_interval(flush)
            .build()
            .unwrap()
    });
    let svc = service(&tracker);
    // One response per stream per round, each a burst of 10 ids in 10 frames.
    let mut events = 0usize;
    for round in 0..rounds {
        let mut tasks = Vec::new();
        for s in 0..streams {
            let burst: Vec<Bytes> = (0..10)
                .map(|i| Bytes::from(format!("id: {}\n\n", round * 10 + i + 1)))
                .collect();
            events += burst.len();
            let mut req = Request::builder()
                .uri("/burst")
                .header("mcp-session-id", format!("stream-{s}"))
                .body(())
                .unwrap();
            req.extensions_mut().insert(burst);
            let mut svc = svc.clone();
            tasks.push(tokio::spawn(async move {
                let response = svc.ready().await.unwrap().call(req).await.unwrap();
                let mut body = response.into_body();
                while let Some(frame) = body.frame().await {
                    frame.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        tokio::time::sleep(flush).await;
    }
    tracker.shutdown(Duration::from_secs(10)).await;
    let mut writes = 0.0;
    let mut enqueued = 0.0;
    for (key, _, _, value) in snapshotter.snapshot().into_vec() {
        if let metrics_util::debugging::DebugValue::Counter(n) = value {
            match key.key().name() {
                "sse_tracker_store_writes_total" => writes += n as f64,
                "sse_tracker_records_enqueued_total" => enqueued += n as f64,
                _ => {}
            }
        }
    }
    (events as f64, enqueued, writes)
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (producers, frames_each) = if quick() { (16, 1_000) } else { (64, 16_384) };
    let frames = frames(frames_each);
    let records = (producers * frames_each) as f64;

    let took = rt.block_on(run(producers, &frames, Arc::new(InMemoryStore::new())));
    println!(
        "throughput: {records} records from {producers} producers through the worker into the \
         in-memory store in {took:?}: {:.0} records/s",
        records / took.as_secs_f64()
    );
    let rounds = if quick() { 3 } else { 5 };
    for streams in [100, 1_000, 10_000] {
        let (events, enqueued, writes) = rt.block_on(write_amplification(streams, rounds));
        println!(
            "coalescing at {streams} active streams: {events} events ({enqueued} records to the \
             worker) in bursts of 10 per stream per flush x {rounds} flushes -> {writes} store \
             entries = {:.3} entries per event (1 per {:.1} events)",
            writes / events,
            events / writes
        );
    }

    let mut group = c.benchmark_group("event_persistence");
    group.throughput(Throughput::Elements(records as u64));
    group.sample_size(10);
    if quick() {
        group.warm_up_time(Duration::from_millis(100));
        group.measurement_time(Duration::from_secs(1));
    }
    group.bench_function(format!("{producers}_producers_x_{frames_each}_ids"), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                total += rt.block_on(run(producers, &frames, Arc::new(InMemoryStore::new())));
            }
            total
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
