//! Scanner throughput: ours against eventsource-stream 0.2, sse-stream 0.3 and sseer 0.3, on the
//! same corpora split into the same frames (one event per frame, as an SSE body produces them).
//!
//! Each contender must end with the id of the last event, so each does the work it needs to
//! track ids: the peers parse whole events (and allocate their fields), ours scans for ids only
//! and keeps the latest in place. `+id-per-frame` adds what the layer does on top of the
//! scanner: one owned id for every frame that commits one.
//!
//! Run: `cargo bench --bench scan`. `SCAN_BENCH_QUICK=1` shortens the measurement.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::{FutureExt, StreamExt, stream};
use tower_sse_tracker::scan::Scanner;

struct Corpus {
    name: &'static str,
    frames: Vec<Bytes>,
    last_id: String,
}

impl Corpus {
    fn new(name: &'static str, events: usize, event: impl Fn(usize) -> String) -> Self {
        let frames = (0..events).map(|n| Bytes::from(event(n))).collect();
        Self {
            name,
            frames,
            last_id: (events - 1).to_string(),
        }
    }

    fn bytes(&self) -> u64 {
        self.frames.iter().map(|f| f.len() as u64).sum()
    }

    fn stream(&self) -> impl futures_util::Stream<Item = Result<Bytes, Infallible>> + '_ {
        stream::iter(self.frames.iter().cloned().map(Ok))
    }
}

fn corpora() -> Vec<Corpus> {
    let kib = "x".repeat(1024);
    vec![
        Corpus::new("small_events", 10_000, |n| {
            format!("id: {n}\nevent: message\ndata: {{\"n\":{n},\"msg\":\"hello world\"}}\n\n")
        }),
        Corpus::new("1kib_data_events", 2_000, |n| {
            format!("id: {n}\ndata: {kib}\n\n")
        }),
        Corpus::new("llm_tokens", 20_000, |n| {
            format!("id: {n}\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\"tok\"}}}}]}}\n\n")
        }),
    ]
}

/// Our scanner: the latest id stays in the scanner; it is made an owned `String` at the end.
fn ours(c: &Corpus) -> String {
    let mut scanner = Scanner::new();
    for frame in &c.frames {
        scanner.feed(frame);
    }
    String::from_utf8_lossy(scanner.last_committed().unwrap()).into_owned()
}

/// Our scanner plus what the layer adds per frame with a commit: one owned id.
fn ours_owned_id_per_frame(c: &Corpus) -> String {
    let mut scanner = Scanner::new();
    let mut last = String::new();
    for frame in &c.frames {
        if scanner.feed(frame).ids > 0 {
            last = String::from_utf8_lossy(scanner.last_committed().unwrap()).into_owned();
        }
    }
    last
}

fn eventsource_stream(c: &Corpus) -> String {
    use eventsource_stream::Eventsource;
    let mut events = c.stream().eventsource();
    let mut last = String::new();
    async {
        while let Some(event) = events.next().await {
            last = event.unwrap().id;
        }
    }
    .now_or_never()
    .unwrap();
    last
}

fn sse_stream(c: &Corpus) -> String {
    let mut events = sse_stream::SseByteStream::new(c.stream());
    let mut last = String::new();
    async {
        while let Some(event) = events.next().await {
            if let Some(id) = event.unwrap().id {
                last = id;
            }
        }
    }
    .now_or_never()
    .unwrap();
    last
}

fn sseer(c: &Corpus) -> String {
    let mut events = sseer::EventStream::new(c.stream());
    let mut last = String::new();
    async {
        while let Some(event) = events.next().await {
            last = event.unwrap().id.to_string();
        }
    }
    .now_or_never()
    .unwrap();
    last
}

type Contender = (&'static str, fn(&Corpus) -> String);

const CONTENDERS: [Contender; 5] = [
    ("tower-sse-tracker", ours),
    ("tower-sse-tracker+id-per-frame", ours_owned_id_per_frame),
    ("sseer-0.3", sseer),
    ("sse-stream-0.3", sse_stream),
    ("eventsource-stream-0.2", eventsource_stream),
];

fn bench(c: &mut Criterion) {
    for corpus in corpora() {
        // Every contender must find the same last id, or the comparison means nothing.
        for (name, f) in CONTENDERS {
            assert_eq!(f(&corpus), corpus.last_id, "{name} on {}", corpus.name);
        }
        let mut group = c.benchmark_group(format!("scan/{}", corpus.name));
        group.throughput(Throughput::Bytes(corpus.bytes()));
        if std::env::var_os("SCAN_BENCH_QUICK").is_some() {
            group.warm_up_time(Duration::from_millis(200));
            group.measurement_time(Duration::from_secs(1));
            group.sample_size(10);
        }
        for (name, f) in CONTENDERS {
            group.bench_with_input(BenchmarkId::from_parameter(name), &corpus, |b, corpus| {
                b.iter(|| f(corpus))
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
