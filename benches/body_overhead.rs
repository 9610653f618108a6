//! The cost of the layer: the same SSE stream with and without it, side by side in one run.
//!
//! - `in_process/*`: a body of N frames (one event with an id each) polled to the end, bare vs
//!   wrapped in `TrackedBody` (scan, publish to the watch, hand-off to the worker, activity).
//! - `hyper_loopback/*`: a plain hyper 1 server on 127.0.0.1 serving that stream to a hyper
//!   client, without and with the layer.
//!
//! Run: `cargo bench --bench body_overhead`; `BODY_OVERHEAD_QUICK=1` shortens it. The ratio
//! of the two times of a pair is the layer's overhead.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response, header};
use http_body_util::{BodyExt, Empty, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::TokioIo;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::SseTracker;

const FRAMES: usize = 2_000;

fn corpus(data_len: usize) -> Vec<Bytes> {
    let data = "x".repeat(data_len);
    (1..=FRAMES)
        .map(|n| Bytes::from(format!("id: {n}\ndata: {data}\n\n")))
        .collect()
}

type Frames =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn sse_response(frames: &[Bytes]) -> Response<Frames> {
    let items: Vec<_> = frames.iter().cloned().map(|f| Ok(Frame::data(f))).collect();
    let mut response = Response::new(StreamBody::new(futures_util::stream::iter(items)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

async fn drain<B: hyper::body::Body + Unpin>(mut body: B) -> usize
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

/// Serves `frames` on 127.0.0.1, through the layer when `tracker` is given.
async fn serve(frames: Vec<Bytes>, tracker: Option<SseTracker>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let frames = frames.clone();
            let tracker = tracker.clone();
            tokio::spawn(async move {
                let inner = tower::service_fn(move |_req: Request<hyper::body::Incoming>| {
                    let response = sse_response(&frames);
                    async move { Ok::<_, Infallible>(response) }
                });
                let io = TokioIo::new(stream);
                let http = hyper::server::conn::http1::Builder::new();
                let _ = match tracker {
                    Some(t) => {
                        let svc = ServiceBuilder::new().layer(t.layer()).service(inner);
                        http.serve_connection(
                            io,
                            hyper_util::service::TowerToHyperService::new(svc),
                        )
                        .await
                    }
                    None => {
                        http.serve_connection(
                            io,
                            hyper_util::service::TowerToHyperService::new(inner),
                        )
                        .await
                    }
                };
            });
        }
    });
    addr
}

/// One request over a new connection; returns the body bytes read.
async fn fetch(addr: SocketAddr, session: &str) -> usize {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::builder()
        .uri("/events")
        .header("host", "127.0.0.1")
        .header("mcp-session-id", session)
        .body(Empty::<Bytes>::new())
        .unwrap();
    let response = sender.send_request(req).await.unwrap();
    drain(response.into_body()).await
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("BODY_OVERHEAD_QUICK").is_some();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tracker = rt.block_on(async { SseTracker::builder().build().unwrap() });

    for (name, data_len) in [("small_events", 16), ("1kib_events", 1024)] {
        let frames = corpus(data_len);
        let bytes: u64 = frames.iter().map(|f| f.len() as u64).sum();
        let mut group = c.benchmark_group(format!("in_process/{name}"));
        group.throughput(Throughput::Bytes(bytes));
        if quick {
            group.warm_up_time(Duration::from_millis(200));
            group.measurement_time(Duration::from_secs(1));
            group.sample_size(10);
        }
        group.bench_function(BenchmarkId::from_parameter("bare"), |b| {
            b.to_async(&rt)
                .iter(|| async { drain(sse_response(&frames).into_body()).await })
        });
        let svc = ServiceBuilder::new().layer(tracker.layer()).service_fn(
            |req: Request<Vec<Bytes>>| async move { Ok::<_, Infallible>(sse_response(req.body())) },
        );
        group.bench_function(BenchmarkId::from_parameter("tracked"), |b| {
            b.to_async(&rt).iter(|| {
                let mut svc = svc.clone();
                let req = Request::builder()
                    .header("mcp-session-id", "bench")
                    .body(frames.clone())
                    .unwrap();
                async move {
                    let response = svc.ready().await.unwrap().call(req).await.unwrap();
                    drain(response.into_body()).await
                }
            })
        });
        group.finish();

        let (bare_addr, tracked_addr) = rt.block_on(async {
            (
                serve(frames.clone(), None).await,
                serve(frames.clone(), Some(tracker.clone())).await,
            )
        });
        let mut group = c.benchmark_group(format!("hyper_loopback/{name}"));
        group.throughput(Throughput::Bytes(bytes));
        if quick {
            group.warm_up_time(Duration::from_millis(200));
            group.measurement_time(Duration::from_secs(1));
            group.sample_size(10);
        }
        for (label, addr) in [("without_layer", bare_addr), ("with_layer", tracked_addr)] {
            group.bench_function(BenchmarkId::from_parameter(label), |b| {
                b.to_async(&rt).iter(|| fetch(addr, "bench"))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
