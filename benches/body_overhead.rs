//! The cost of the layer: the same SSE stream with and without it, side by side in one run.
//!
//! - `in_process/*`: a body of N frames (one event with an id each) polled to the end, bare vs
//!   wrapped in `TrackedBody` (scan, publish into the slot, hand-off to the worker, activity),
//!   and wrapped but untracked (no session: scan and heartbeat timer only). The bare body moves
//!   ready-made frames out of a `Vec`, about the least a body can do, so this is the harshest
//!   ratio; `axum_sse` is the same events made by axum's `Sse` from `Event`s, as an application
//!   makes them.
//! - `hyper_loopback/*`: a plain hyper 1 server on 127.0.0.1 serving that stream to a hyper
//!   client, without and with the layer.
//!
//! Before criterion's own output it prints, in one run, the in-process time ratios (layer /
//! bare) and the layer's cost per committed id, for 64-byte and 4 KiB one-event frames, and a
//! floor: a body wrapper that does the least any per-frame id tracker must do (see [`Floor`]).
//!
//! Run: `cargo bench --bench body_overhead`; `BODY_OVERHEAD_QUICK=1` shortens it.

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

/// One event per frame, each frame `frame_len` bytes: `id: {n:06}\ndata: xxx…\n\n`.
fn corpus(frame_len: usize) -> Vec<Bytes> {
    let data = "x".repeat(frame_len - "id: 000000\ndata: \n\n".len());
    (1..=FRAMES)
        .map(|n| Bytes::from(format!("id: {n:06}\ndata: {data}\n\n")))
        .collect()
}

/// The same events as axum's `Sse` makes them from `Event`s.
fn axum_sse(frame_len: usize) -> axum::response::Response {
    use axum::response::IntoResponse;
    use axum::response::sse::{Event, Sse};
    let data = "x".repeat(frame_len - "id: 000000\ndata: \n\n".len());
    let events = (1..=FRAMES).map(move |n| {
        Ok::<_, Infallible>(Event::default().id(format!("{n:06}")).data(data.as_str()))
    });
    Sse::new(futures_util::stream::iter(events)).into_response()
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

/// The least a body wrapper that tracks ids frame by frame can do, as a lower bound for the
/// layer: find each frame's line ends with SSE2 (16 bytes per compare), take the value of the
/// last `id:` line before a blank line, copy it into a fixed buffer, and make it visible with
/// one atomic read-modify-write (what a slot that several bodies may write needs at least).
/// No byte order mark, no CR, no line split across frames, no validation, no heartbeat, no
/// hand-off: not a scanner, only what one costs at the very least.
///
/// With `rmw: false` the id is made visible with a release store instead, which is only
/// enough when a single body ever writes the slot: what the read-modify-write costs.
struct Floor<B> {
    inner: B,
    slot: std::sync::Arc<std::sync::atomic::AtomicU64>,
    id: [u8; 64],
    rmw: bool,
}

impl<B> Floor<B> {
    fn new(inner: B, rmw: bool) -> Self {
        Self {
            inner,
            slot: Default::default(),
            id: [0; 64],
            rmw,
        }
    }

    fn scan(&mut self, frame: &[u8]) {
        let mut line_start = 0;
        let mut id = None;
        let mut committed = false;
        for (block_start, block) in (0..).step_by(64).zip(frame.chunks(64)) {
            let mut mask = block.chunks(16).enumerate().fold(0u64, |mask, (i, chunk)| {
                mask | u64::from(line_ends(chunk)) << (16 * i)
            });
            while mask != 0 {
                let end = block_start + mask.trailing_zeros() as usize;
                mask &= mask - 1;
                match &frame[line_start..end] {
                    [] => {
                        if let Some((a, b)) = id.take() {
                            let value: &[u8] = &frame[a..b];
                            self.id[..value.len()].copy_from_slice(value);
                            committed = true;
                        }
                    }
                    [b'i', b'd', b':', value @ ..] if value.len() <= 64 => {
                        id = Some((end - value.len(), end));
                    }
                    _ => {}
                }
                line_start = end + 1;
            }
        }
        if committed {
            use std::sync::atomic::Ordering;
            if self.rmw {
                self.slot.fetch_add(1, Ordering::AcqRel);
            } else {
                self.slot.store(line_start as u64, Ordering::Release);
            }
        }
    }
}

/// The CR and LF bytes of up to 16 bytes, as a bit mask.
#[inline]
fn line_ends(chunk: &[u8]) -> u16 {
    #[cfg(target_arch = "x86_64")]
    if let Ok(chunk) = <&[u8; 16]>::try_from(chunk) {
        use std::arch::x86_64::*;
        // SAFETY: SSE2 is part of x86-64; the unaligned load reads the 16 bytes of `chunk`.
        return unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let cr = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\r' as i8));
            let lf = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8));
            _mm_movemask_epi8(_mm_or_si128(cr, lf)) as u16
        };
    }
    chunk
        .iter()
        .enumerate()
        .filter(|(_, b)| matches!(b, b'\r' | b'\n'))
        .fold(0, |mask, (i, _)| mask | 1 << i)
}

impl<B: hyper::body::Body<Data = Bytes> + Unpin> hyper::body::Body for Floor<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        if let std::task::Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.scan(data);
        }
        polled
    }
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
                    let response = sse_response(frames.clone());
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

/// The median time of `runs` runs of `f`.
fn median<F: std::future::Future<Output = usize>>(
    rt: &tokio::runtime::Runtime,
    runs: usize,
    mut f: impl FnMut() -> F,
) -> Duration {
    let mut times: Vec<Duration> = (0..runs)
        .map(|_| {
            let started = std::time::Instant::now();
            std::hint::black_box(rt.block_on(f()));
            started.elapsed()
        })
        .collect();
    times.sort();
    times[runs / 2]
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("BODY_OVERHEAD_QUICK").is_some();
    // Each run allocates about 200 KiB (the frames' `Vec`s), above glibc's initial mmap
    // threshold: whether those allocations are fresh mappings, with a page fault per page,
    // depended on the allocator's history in the process, and doubled the bare body's time in
    // some runs. Freeing one larger mapped block first raises glibc's threshold above them
    // (its dynamic threshold), so every run of every variant allocates from the heap.
    drop(std::hint::black_box(vec![1u8; 8 << 20]));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let tracker = rt.block_on(async { SseTracker::builder().build().unwrap() });
    let layered = ServiceBuilder::new().layer(tracker.layer()).service_fn(
        |req: Request<Vec<Bytes>>| async move { Ok::<_, Infallible>(sse_response(req.into_body())) },
    );
    let layered_axum =
        ServiceBuilder::new()
            .layer(tracker.layer())
            .service_fn(
                |req: Request<usize>| async move { Ok::<_, Infallible>(axum_sse(*req.body())) },
            );
    let tracked = |frames: Vec<Bytes>, session: bool| {
        let mut svc = layered.clone();
        let mut req = Request::builder();
        if session {
            req = req.header("mcp-session-id", "bench");
        }
        let req = req.body(frames).unwrap();
        async move {
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            drain(response.into_body()).await
        }
    };
    let tracked_axum = |frame_len: usize| {
        let mut svc = layered_axum.clone();
        let req = Request::builder()
            .header("mcp-session-id", "bench-axum")
            .body(frame_len)
            .unwrap();
        async move {
            let response = svc.ready().await.unwrap().call(req).await.unwrap();
            drain(response.into_body()).await
        }
    };

    // The ratios, side by side in one run.
    let runs = if quick { 201 } else { 2001 };
    for (name, frame_len) in [("64-byte", 64), ("4 KiB", 4096)] {
        let frames = corpus(frame_len);
        let bare = median(&rt, runs, || {
            drain(sse_response(frames.clone()).into_body())
        });
        let layer = median(&rt, runs, || tracked(frames.clone(), true));
        let untracked = median(&rt, runs, || tracked(frames.clone(), false));
        let scanner = median(&rt, runs, || {
            let frames = frames.clone();
            async move {
                let mut scanner = tower_sse_tracker::scan::Scanner::new();
                let mut ids = 0;
                for frame in &frames {
                    ids += scanner.feed(frame).ids;
                }
                ids
            }
        });
        let floor = median(&rt, runs, || {
            drain(Floor::new(sse_response(frames.clone()).into_body(), true))
        });
        let floor_store = median(&rt, runs, || {
            drain(Floor::new(sse_response(frames.clone()).into_body(), false))
        });
        let axum_bare = median(&rt, runs, || drain(axum_sse(frame_len).into_body()));
        let axum_layer = median(&rt, runs, || tracked_axum(frame_len));
        let per = |d: Duration| d.as_nanos() as f64 / FRAMES as f64;
        println!(
            "in process, {name} one-event frames: bare {:.1} ns/frame, layer {:.1} ns/frame \
             ({:.2}x time; {:.1} ns per frame over bare), untracked layer {:.1} ns/frame \
             ({:.2}x); the scanner alone over a clone of the frames {:.1} ns/frame (layer / \
             (bare + scanner) {:.2}x); floor (line ends, id copy, one atomic operation) {:.1} \
             ns/frame ({:.2}x bare; layer / floor {:.2}x), the floor with a store instead of \
             the read-modify-write {:.1} ns/frame ({:.2}x bare); axum Sse body {:.1} ns/frame, \
             with the layer {:.1} ns/frame ({:.2}x)",
            per(bare),
            per(layer),
            layer.as_secs_f64() / bare.as_secs_f64(),
            per(layer) - per(bare),
            per(untracked),
            untracked.as_secs_f64() / bare.as_secs_f64(),
            per(scanner),
            layer.as_secs_f64() / (bare + scanner).as_secs_f64(),
            per(floor),
            floor.as_secs_f64() / bare.as_secs_f64(),
            layer.as_secs_f64() / floor.as_secs_f64(),
            per(floor_store),
            floor_store.as_secs_f64() / bare.as_secs_f64(),
            per(axum_bare),
            per(axum_layer),
            axum_layer.as_secs_f64() / axum_bare.as_secs_f64(),
        );
    }

    for (name, frame_len) in [("64b_events", 64), ("4kib_events", 4096)] {
        let frames = corpus(frame_len);
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
                .iter(|| drain(sse_response(frames.clone()).into_body()))
        });
        group.bench_function(BenchmarkId::from_parameter("tracked"), |b| {
            b.to_async(&rt).iter(|| tracked(frames.clone(), true))
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
