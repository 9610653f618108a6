//! Memory per tracked stream, measured with a counting allocator, and the cost of a registry
//! look-up and insert.
//!
//! Run: `cargo bench --bench memory_overhead`. It prints the bytes per tracked stream for 1k,
//! 10k and 100k streams, then criterion times a look-up of a known stream and an insert of a
//! new one into a full registry (which evicts the least recently used).

#[path = "../tests/common/counting_alloc.rs"]
mod counting_alloc;
#[path = "../tests/common/memory_probe.rs"]
mod memory_probe;

#[global_allocator]
static ALLOC: counting_alloc::Counting = counting_alloc::Counting;

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use memory_probe::{NullStore, bytes_per_stream};
use tower_sse_tracker::{SseTracker, StreamKey};

fn key(owner: &str, stream: &str) -> StreamKey {
    StreamKey::try_new(owner, stream).unwrap()
}

fn bench(c: &mut Criterion) {
    println!(
        "| tracked streams | heap bytes per stream | allocations per stream | memory gauge per stream |"
    );
    println!("|---|---|---|---|");
    for n in [1_000, 10_000, 100_000] {
        let m = bytes_per_stream(n);
        println!(
            "| {n} | {:.0} | {:.1} | {:.0} |",
            m.bytes, m.blocks, m.estimated
        );
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const STREAMS: usize = 100_000;
    let tracker = rt.block_on(async {
        let tracker = SseTracker::builder()
            .store(NullStore)
            .heartbeat_interval(None)
            .max_streams(std::num::NonZeroUsize::new(STREAMS).unwrap())
            .build()
            .unwrap();
        for i in 0..STREAMS {
            tracker
                .subscribe(&key(&format!("session-{i:08}"), "GET /mcp"))
                .unwrap();
        }
        tracker
    });
    let sessions: Vec<String> = (0..STREAMS).map(|i| format!("session-{i:08}")).collect();
    let mut group = c.benchmark_group("registry");
    group.measurement_time(Duration::from_secs(3));
    let mut i = 0;
    group.bench_function("lookup_known_stream_of_100k", |b| {
        b.iter(|| {
            i = (i + 7919) % STREAMS;
            tracker.last_event_id(&key(&sessions[i], "GET /mcp"))
        })
    });
    let _guard = rt.enter();
    let mut next = STREAMS;
    group.bench_function("insert_new_stream_into_full_100k", |b| {
        b.iter_batched(
            || {
                next += 1;
                format!("session-{next:08}")
            },
            |session| tracker.subscribe(&key(&session, "GET /mcp")).unwrap(),
            criterion::BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
