//! `RedisStore` batch saves, standalone against Redis Cluster, side by side in one run.
//!
//! Batches of 256 latest ids, each of another owner (so a batch is spread over the cluster's
//! slots), saved by one `RedisStore` into a standalone `redis-server` and into a local cluster
//! of three primaries and three replicas, both started by the bench on 127.0.0.1. It prints,
//! for each, the records per second, the round trips per batch (script calls counted by the
//! servers' `INFO commandstats`) and the servers' own CPU time per record (`used_cpu_user` and
//! `used_cpu_sys` of `INFO cpu`, summed over every server, replicas included: all a server
//! does for a record, the request, the reply and the append-only file too, where a script's
//! `usec` in `INFO commandstats` counts its run only). Then replay logs: flushes of 4 events
//! for each of 256 streams, appended, with the events per second, the script calls per flush
//! and the servers' CPU per event. Then criterion's timing of one batch. The batches are made
//! before the clock starts.
//!
//! The servers write an append-only file flushed at every write (`appendfsync always`, as in
//! the tests); `REDIS_TEST_APPENDFSYNC=everysec` runs them with Redis's default flush policy
//! for that file instead. The busiest server's CPU per record bounds what the topology can do
//! when every server has a core of its own (this machine's 2 cores run the client and all six
//! cluster servers at once).
//!
//! Run: `cargo bench --features redis --bench redis_store` (needs `redis-server` and
//! `redis-cli` on PATH). `REDIS_STORE_BENCH_QUICK=1` makes it short.

#[path = "../tests/common/redis_cluster.rs"]
#[allow(dead_code)]
mod redis_cluster;
#[path = "../tests/common/redis_server.rs"]
#[allow(dead_code)]
mod redis_server;

use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use redis_cluster::RedisCluster;
use redis_server::RedisServer;
use tower_sse_tracker::store::{LogAppend, LogEvent, RedisStore, SaveEntry, Store};
use tower_sse_tracker::{EventId, StreamKey};

const BATCH: usize = 256;

/// The `version`th id of the streams of batch `round` (owners `owner-{round}-0..256`).
fn batch_of(round: usize, version: u64) -> Vec<SaveEntry> {
    (0..BATCH)
        .map(|i| SaveEntry {
            key: StreamKey::try_new(&format!("owner-{round}-{i}"), "POST /mcp").unwrap(),
            id: EventId::new(&format!("{round}/{i}/{version}")).unwrap(),
            sequence: version,
            published_at: SystemTime::now(),
        })
        .collect()
}

fn batch(round: usize) -> Vec<SaveEntry> {
    batch_of(round, 1)
}

/// Events each stream of a log batch appends per flush.
const EVENTS_PER_STREAM: u64 = 4;

/// A flush of replay logs: `EVENTS_PER_STREAM` events of about 80 bytes (an LLM token) for
/// each of `BATCH` streams, the `round`th of each.
fn log_batch(round: u64) -> Vec<LogAppend> {
    (0..BATCH)
        .map(|i| {
            let key = StreamKey::try_new(&format!("owner-{i}"), "GET /answer").unwrap();
            (0..EVENTS_PER_STREAM).fold(LogAppend::new(key, 1, "bench"), |append, n| {
                let offset = round * EVENTS_PER_STREAM + n;
                let bytes = format!(
                    "id: {offset}\ndata: {{\"delta\":{{\"content\":\" token{offset:06}\"}},\"index\":{i}}}\n\n"
                );
                append.event(LogEvent::new(
                    offset,
                    Some(EventId::new(&offset.to_string()).unwrap()),
                    Bytes::from(bytes),
                ))
            })
        })
        .collect()
}

/// Script calls the servers at `urls` have run so far, and the CPU seconds each has used.
fn server_stats(urls: &[String]) -> (u64, Vec<f64>) {
    let mut calls = 0;
    let mut cpu = Vec::with_capacity(urls.len());
    for url in urls {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .arg("cpu")
            .query(&mut conn)
            .unwrap();
        let mut seconds = 0.0;
        for line in info.lines() {
            if let Some(stats) = line
                .strip_prefix("cmdstat_evalsha:")
                .or_else(|| line.strip_prefix("cmdstat_eval:"))
            {
                calls += stats
                    .split(',')
                    .find_map(|kv| kv.strip_prefix("calls=")?.parse::<u64>().ok())
                    .unwrap_or(0);
            }
            if let Some(used) = line
                .strip_prefix("used_cpu_user:")
                .or_else(|| line.strip_prefix("used_cpu_sys:"))
            {
                seconds += used.trim().parse::<f64>().unwrap_or(0.0);
            }
        }
        cpu.push(seconds);
    }
    (calls, cpu)
}

fn bench(c: &mut Criterion) {
    let quick = std::env::var_os("REDIS_STORE_BENCH_QUICK").is_some();
    let rounds = if quick { 40 } else { 400 };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = RedisServer::new();
    let cluster = RedisCluster::new();
    let standalone_urls = vec![server.url.clone()];
    let cluster_urls = cluster.urls();
    let stores = [
        (
            "standalone",
            RedisStore::new(&server.url).unwrap(),
            standalone_urls,
        ),
        (
            "cluster",
            RedisStore::cluster(cluster.urls()).unwrap(),
            cluster_urls,
        ),
    ];
    for (name, store, urls) in &stores {
        let store = store.clone().with_prefix(format!("bench-{name}"));
        // Connect and load the script first.
        rt.block_on(store.save(&batch(usize::MAX - 1))).unwrap();
        // New streams, then a newer id of each of them: keys written for the first time, then
        // keys whose stored id is replaced.
        for (what, version) in [("new keys", 1), ("updates", 2)] {
            let batches: Vec<_> = (0..rounds).map(|round| batch_of(round, version)).collect();
            let (calls_before, cpu_before) = server_stats(urls);
            let started = Instant::now();
            for batch in &batches {
                rt.block_on(store.save(batch)).unwrap();
            }
            let took = started.elapsed();
            let (calls, cpu) = server_stats(urls);
            let records = (rounds * BATCH) as f64;
            let used: Vec<f64> = cpu.iter().zip(&cpu_before).map(|(a, b)| a - b).collect();
            let busiest = used.iter().copied().fold(0.0, f64::max);
            println!(
                "{name}, {what}: {} records in batches of {BATCH} spread over all slots in \
                 {took:?}: {:.0} records/s, {:.1} round trips (script calls) per batch, {:.2} µs \
                 of Redis CPU per record (all servers), {:.2} µs on the busiest server: at most \
                 {:.0} records/s with a core per server",
                rounds * BATCH,
                records / took.as_secs_f64(),
                (calls - calls_before) as f64 / rounds as f64,
                used.iter().sum::<f64>() * 1e6 / records,
                busiest * 1e6 / records,
                records / busiest
            );
        }
    }

    // Replay logs: every event counts, nothing coalesces.
    for (name, store, urls) in &stores {
        let store = store.clone().with_prefix(format!("bench-log-{name}"));
        rt.block_on(store.append_logs(&log_batch(0))).unwrap();
        let batches: Vec<_> = (1..=rounds as u64).map(log_batch).collect();
        let (calls_before, cpu_before) = server_stats(urls);
        let started = Instant::now();
        for batch in &batches {
            rt.block_on(store.append_logs(batch)).unwrap();
        }
        let took = started.elapsed();
        let (calls, cpu) = server_stats(urls);
        let events = (rounds * BATCH) as f64 * EVENTS_PER_STREAM as f64;
        let used: f64 = cpu.iter().zip(&cpu_before).map(|(a, b)| a - b).sum();
        println!(
            "{name}, log appends: {events} events ({EVENTS_PER_STREAM} for each of {BATCH} \
             streams per flush) in {took:?}: {:.0} events/s, {:.1} round trips (script calls) \
             per flush, {:.2} µs of Redis CPU per event (all servers)",
            events / took.as_secs_f64(),
            (calls - calls_before) as f64 / rounds as f64,
            used * 1e6 / events
        );
    }

    let mut group = c.benchmark_group("redis_store/save_batch_of_256");
    group.throughput(Throughput::Elements(BATCH as u64));
    group.sample_size(10);
    if quick {
        group.warm_up_time(Duration::from_millis(200));
        group.measurement_time(Duration::from_secs(1));
    }
    for (name, store, _) in &stores {
        let store = store.clone().with_prefix(format!("bench-{name}"));
        let mut round = rounds;
        group.bench_function(*name, |b| {
            b.iter(|| {
                round += 1;
                rt.block_on(store.save(&batch(round))).unwrap()
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
