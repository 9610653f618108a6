//! The Redis store against real `redis-server`s (feature `redis`), every test twice: on a
//! standalone Redis (`standalone::*`) and on a Redis Cluster of three primaries and three
//! replicas (`cluster::*`; `cargo test --all-features cluster`). The standalone tests use
//! `REDIS_URL` when set, else start their own server on a free port of 127.0.0.1; each cluster
//! test starts its own six nodes (`redis-server` and `redis-cli` on PATH: `apt-get install
//! redis-server`). `cluster::a_primary_killed_under_load_loses_no_latest_id` kills a primary
//! and waits for its replica to take over.
#![cfg(feature = "redis")]

#[path = "common/across.rs"]
mod across;
mod common;
#[path = "common/redis_cluster.rs"]
mod redis_cluster;
#[path = "common/redis_server.rs"]
mod redis_server;
#[path = "common/silent_proxy.rs"]
mod silent_proxy;
#[path = "common/store_log.rs"]
mod store_log;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::{HeaderMap, HeaderValue};
use bytes::Bytes;
use common::names::{STORE_CONNECTIONS_REPLACED_TOTAL, STORE_ERRORS_TOTAL};
use common::{Harness, build_recorded, key, run_frames};
use redis_cluster::RedisCluster;
use redis_server::{RedisServer, unique_prefix};
use silent_proxy::SilentProxy;
use tokio::time::{sleep, timeout};
use tower_sse_tracker::store::{RedisStore, SaveEntry, SessionActivity, Store};
use tower_sse_tracker::{EventId, Owner, Resume, RetryPolicy, SseTracker, StreamKey};

/// How long `RedisStore` lets calls go unanswered before it replaces its connection (5 s, as
/// its docs say).
const STUCK_AFTER: Duration = Duration::from_secs(5);

fn entry(k: &StreamKey, id: &str, sequence: u64, at_ms: u64) -> SaveEntry {
    SaveEntry {
        key: k.clone(),
        id: EventId::new(id).unwrap(),
        sequence,
        published_at: UNIX_EPOCH + Duration::from_millis(at_ms),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Topology {
    Standalone,
    Cluster,
}

/// A standalone Redis or a Redis Cluster, behind one interface.
enum Redis {
    Standalone(RedisServer),
    Cluster(RedisCluster),
}

impl Redis {
    /// A server the test may share (`REDIS_URL`), or a cluster of its own.
    fn shared(topology: Topology) -> Self {
        match topology {
            Topology::Standalone => Redis::Standalone(RedisServer::shared_or_new()),
            Topology::Cluster => Redis::Cluster(RedisCluster::new()),
        }
    }

    /// Servers of the test's own (it kills them).
    fn own(topology: Topology) -> Self {
        match topology {
            Topology::Standalone => Redis::Standalone(RedisServer::new()),
            Topology::Cluster => Redis::Cluster(RedisCluster::new()),
        }
    }

    /// Servers of the test's own, down (started by [`restart`](Self::restart)).
    fn down(topology: Topology) -> Self {
        match topology {
            Topology::Standalone => Redis::Standalone(RedisServer::not_started()),
            Topology::Cluster => {
                let mut cluster = RedisCluster::new();
                cluster.kill_all();
                Redis::Cluster(cluster)
            }
        }
    }

    /// Every node's URL.
    fn urls(&self) -> Vec<String> {
        match self {
            Redis::Standalone(server) => vec![server.url.clone()],
            Redis::Cluster(cluster) => cluster.urls(),
        }
    }

    /// A store that connects on first use.
    fn lazy_store(&self, prefix: &str) -> RedisStore {
        match self {
            Redis::Standalone(server) => RedisStore::new(&server.url),
            Redis::Cluster(cluster) => RedisStore::cluster(cluster.urls()),
        }
        .unwrap()
        .with_prefix(prefix)
    }

    fn kill(&mut self) {
        match self {
            Redis::Standalone(server) => server.kill(),
            Redis::Cluster(cluster) => cluster.kill_all(),
        }
    }

    fn restart(&mut self) {
        match self {
            Redis::Standalone(server) => server.restart(),
            Redis::Cluster(cluster) => cluster.restart_all(),
        }
    }

    /// Every key matching `pattern`, on every primary.
    async fn keys(&self, pattern: &str) -> Vec<String> {
        match self {
            Redis::Standalone(server) => {
                let client = redis::Client::open(server.url.as_str()).unwrap();
                let mut conn = client.get_multiplexed_async_connection().await.unwrap();
                redis::cmd("KEYS")
                    .arg(pattern)
                    .query_async(&mut conn)
                    .await
                    .unwrap()
            }
            Redis::Cluster(cluster) => cluster.keys(pattern),
        }
    }

    /// Runs a command on the server, or on every primary of the cluster.
    async fn command(&self, args: &[&str]) {
        match self {
            Redis::Standalone(server) => {
                server.command(args).await.unwrap();
            }
            Redis::Cluster(cluster) => cluster.on_primaries(args),
        }
    }
}

async fn store(server: &Redis, prefix: &str) -> RedisStore {
    let store = server.lazy_store(prefix);
    // Connect now, so that a test fails here rather than in its first write.
    store.load(&key("connect", "probe")).await.unwrap();
    store
}

/// Waits (30 s at most) until the store holds the last id each load client received.
async fn all_latest_ids_stored(
    store: &RedisStore,
    results: &[common::load::ClientResult],
    place: &str,
) {
    let expected: Vec<_> = results
        .iter()
        .map(|r| (key(&r.session, "GET /load"), r.last_id.clone()))
        .collect();
    ids_stored(store, &expected, place).await;
}

/// Waits (30 s at most) until the store holds each key's expected id.
async fn ids_stored(store: &RedisStore, expected: &[(StreamKey, Option<String>)], place: &str) {
    timeout(Duration::from_secs(30), async {
        loop {
            let mut all = true;
            for (k, id) in expected {
                all &= store.load(k).await.ok().flatten().map(|v| v.id.to_string()) == *id;
            }
            if all {
                break;
            }
            sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("some latest ids never reached {place}"));
}

async fn loaded(store: &RedisStore, k: &StreamKey) -> Option<String> {
    store.load(k).await.unwrap().map(|s| s.id.to_string())
}

async fn a_batch_round_trips(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("round-trip")).await;
    let keys = [
        key("s1", "GET /a"),
        key("s1", "GET /b"),
        key("s2", "GET /a"),
    ];
    let batch: Vec<SaveEntry> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| entry(k, &format!("id-{i}"), i as u64 + 1, 1_000))
        .collect();
    store.save(&batch).await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        let stored = store.load(k).await.unwrap().unwrap();
        assert_eq!(stored.id, format!("id-{i}").as_str());
        assert_eq!(stored.sequence, i as u64 + 1);
    }
    assert_eq!(loaded(&store, &key("s3", "GET /a")).await, None);
}

async fn a_stale_write_is_refused_across_two_stores(topology: Topology) {
    let server = Redis::shared(topology);
    let prefix = unique_prefix("stale");
    let a = store(&server, &prefix).await;
    let b = store(&server, &prefix).await;
    let k = key("s1", "GET /mcp");
    // Instance A publishes later than instance B, whatever their sequence counters say.
    a.save(&[entry(&k, "from-a", 1, 2_000)]).await.unwrap();
    b.save(&[entry(&k, "from-b-older", 99, 1_000)])
        .await
        .unwrap();
    assert_eq!(loaded(&b, &k).await.as_deref(), Some("from-a"));
    // Same time: the sequence decides; equal is not newer.
    a.save(&[entry(&k, "same-time-lower", 0, 2_000)])
        .await
        .unwrap();
    a.save(&[entry(&k, "same-version", 1, 2_000)])
        .await
        .unwrap();
    assert_eq!(loaded(&a, &k).await.as_deref(), Some("from-a"));
    b.save(&[entry(&k, "from-b-newer", 1, 3_000)])
        .await
        .unwrap();
    assert_eq!(loaded(&a, &k).await.as_deref(), Some("from-b-newer"));
}

/// The save script of the versions before the fixed-width values (0.1), as it ran then: an
/// instance of that version still writes with it during a rolling deploy.
const LAST_VERSIONS_SAVE_SCRIPT: &str = "local ttl = ARGV[1]
local written = 0
for i, key in ipairs(KEYS) do
  local base = 1 + (i - 1) * 3
  local t, s, id = ARGV[base + 1], ARGV[base + 2], ARGV[base + 3]
  local newer = true
  local current = redis.call('GET', key)
  if current then
    local ct, cs = string.match(current, '^(%d+):(%d+):')
    ct, cs = tonumber(ct), tonumber(cs)
    local nt, ns = tonumber(t), tonumber(s)
    if ct and (ct > nt or (ct == nt and cs >= ns)) then
      newer = false
    end
  end
  if newer then
    redis.call('SET', key, t .. ':' .. s .. ':' .. id, 'PX', ttl)
    written = written + 1
  end
end
return written
";

/// A plain connection to the server, or to the cluster (redirections followed).
enum Raw {
    One(redis::aio::MultiplexedConnection),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl Raw {
    async fn new(server: &Redis) -> Self {
        match server {
            Redis::Standalone(server) => Raw::One(
                redis::Client::open(server.url.as_str())
                    .unwrap()
                    .get_multiplexed_async_connection()
                    .await
                    .unwrap(),
            ),
            Redis::Cluster(cluster) => Raw::Cluster(
                redis::cluster::ClusterClient::new(cluster.urls())
                    .unwrap()
                    .get_async_connection()
                    .await
                    .unwrap(),
            ),
        }
    }

    async fn query<T: redis::FromRedisValue>(&mut self, cmd: &redis::Cmd) -> T {
        match self {
            Raw::One(conn) => cmd.query_async(conn).await.unwrap(),
            Raw::Cluster(conn) => cmd.query_async(conn).await.unwrap(),
        }
    }

    /// What the last version's script does with the entry (`time` in µs): whether it wrote
    /// it.
    async fn last_version_saves(
        &mut self,
        key: &str,
        id: &str,
        sequence: u64,
        time_us: u64,
    ) -> bool {
        let mut cmd = redis::cmd("EVAL");
        cmd.arg(LAST_VERSIONS_SAVE_SCRIPT)
            .arg(1)
            .arg(key)
            .arg(60_000)
            .arg(time_us)
            .arg(sequence)
            .arg(id);
        self.query::<u64>(&cmd).await == 1
    }
}

async fn this_and_the_last_versions_layout_agree_on_the_newest_id(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("layouts")).await;
    let mut raw = Raw::new(&server).await;

    // A value the last version wrote, numbers unpadded (time 2 s in µs, sequence 7): this
    // version reads it, and compares with it as numbers.
    let old = key("s1", "GET /old");
    let old_key = store.key_of(&old);
    let () = raw
        .query(
            redis::cmd("SET")
                .arg(&old_key)
                .arg("2000000:7:written-by-0.1"),
        )
        .await;
    assert_eq!(
        loaded(&store, &old).await.as_deref(),
        Some("written-by-0.1")
    );
    for (id, sequence, at_ms) in [
        ("lower-sequence", 6, 2_000),
        ("same", 7, 2_000),
        ("earlier", 99, 1_999),
    ] {
        store
            .save(&[entry(&old, id, sequence, at_ms)])
            .await
            .unwrap();
        assert_eq!(
            loaded(&store, &old).await.as_deref(),
            Some("written-by-0.1"),
            "{id}"
        );
    }
    store.save(&[entry(&old, "newer", 8, 2_000)]).await.unwrap();
    assert_eq!(loaded(&store, &old).await.as_deref(), Some("newer"));

    // A value this version wrote (fixed width): the last version's script compares with it
    // as numbers too, refusing older ids and taking newer ones; this version then reads
    // what it wrote, and goes on comparing.
    let new = key("s2", "GET /new");
    let new_key = store.key_of(&new);
    store
        .save(&[entry(&new, "from-this-version", 5, 3_000)])
        .await
        .unwrap();
    let value: String = raw.query(redis::cmd("GET").arg(&new_key)).await;
    assert_eq!(
        value,
        "0000000003000000:00000000000000000005:from-this-version"
    );
    assert!(
        !raw.last_version_saves(&new_key, "older", 4, 3_000_000)
            .await
    );
    assert!(!raw.last_version_saves(&new_key, "same", 5, 3_000_000).await);
    assert!(
        raw.last_version_saves(&new_key, "from-0.1", 6, 3_000_000)
            .await
    );
    assert_eq!(loaded(&store, &new).await.as_deref(), Some("from-0.1"));
    store
        .save(&[entry(&new, "older-again", 6, 2_999)])
        .await
        .unwrap();
    assert_eq!(loaded(&store, &new).await.as_deref(), Some("from-0.1"));
    store
        .save(&[entry(&new, "newest", 1, 3_001)])
        .await
        .unwrap();
    assert_eq!(loaded(&store, &new).await.as_deref(), Some("newest"));
}

async fn a_save_after_redis_lost_its_scripts_loads_the_script_again(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("noscript")).await;
    // Keys of many owners: on a cluster, every primary gets a call.
    let keys: Vec<StreamKey> = (0..64).map(|i| key(&format!("s{i}"), "GET /a")).collect();
    let batch = |id: &str, sequence| -> Vec<SaveEntry> {
        keys.iter().map(|k| entry(k, id, sequence, 1_000)).collect()
    };
    store.save(&batch("first", 1)).await.unwrap();
    // What a restarted Redis or a promoted replica has: no script.
    server.command(&["SCRIPT", "FLUSH"]).await;
    store.save(&batch("second", 2)).await.unwrap();
    for k in &keys {
        assert_eq!(loaded(&store, k).await.as_deref(), Some("second"), "{k}");
    }
}

async fn replay_logs_keep_the_exact_events_once_each(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("logs"))
        .await
        .with_log_max_events(store_log::LOG_MAX_EVENTS);
    store_log::logs_keep_the_exact_events_once_each(&store, "owner").await;
    // The log shares its stream's slot, and expires with the store's time to live.
    let key = key("owner", "POST /mcp");
    assert_eq!(
        redis::cluster_routing::Slot::for_key(store.log_key_of(&key)),
        redis::cluster_routing::Slot::for_key(store.key_of(&key))
    );
}

async fn a_replay_log_expires_after_the_ttl(topology: Topology) {
    use tower_sse_tracker::store::{LogAppend, LogEvent};
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("log-ttl"))
        .await
        .with_ttl(Duration::from_millis(300));
    let k = key("s1", "GET /feed");
    let append = LogAppend::new(k.clone(), 1, "a").event(LogEvent::new(
        0,
        None,
        Bytes::from_static(b"data: x\n\n"),
    ));
    store.append_logs(&[append]).await.unwrap();
    assert!(store.read_log(&k, None, 10).await.unwrap().is_some());
    sleep(Duration::from_millis(600)).await;
    assert_eq!(store.read_log(&k, None, 10).await.unwrap(), None);
    assert!(
        server
            .keys(&format!("{}*", store.log_key_of(&k)))
            .await
            .is_empty()
    );
}

/// Redis's memory per logged event (`MEMORY USAGE` of the log and its meta, all samples),
/// printed; the bound asserted is the event's bytes and 64 bytes.
async fn a_replay_log_costs_redis_little_more_than_its_events(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("log-memory")).await;
    let (per_event, event) = log_memory(&server, &store).await;
    println!(
        "{topology:?}: a log of events of {event:.1} bytes takes {per_event:.1} bytes per event in \
         Redis, {:.1} more than its bytes",
        per_event - event
    );
    assert!(per_event < event + 64.0, "{per_event} bytes per event");
}

/// A log of 1 000 LLM token events appended: Redis's memory per event (`MEMORY USAGE` of the
/// log and its meta, all samples), and the event's own bytes.
async fn log_memory(server: &Redis, store: &RedisStore) -> (f64, f64) {
    use tower_sse_tracker::store::{LogAppend, LogEvent};
    let k = key("s1", "GET /answer");
    const EVENTS: u64 = 1000;
    let mut event_bytes = 0;
    let mut append = LogAppend::new(k.clone(), 1, "instance-a");
    for offset in 0..EVENTS {
        let bytes = token_event(offset);
        event_bytes += bytes.len();
        append = append.event(LogEvent::new(
            offset,
            Some(EventId::new(&offset.to_string()).unwrap()),
            bytes,
        ));
    }
    store.append_logs(&[append]).await.unwrap();
    let mut raw = Raw::new(server).await;
    let mut usage = 0;
    for redis_key in [
        store.log_key_of(&k),
        store.log_key_of(&k).replacen(":log:", ":logmeta:", 1),
    ] {
        let bytes: u64 = raw
            .query(
                redis::cmd("MEMORY")
                    .arg("USAGE")
                    .arg(&redis_key)
                    .arg("SAMPLES")
                    .arg(0),
            )
            .await;
        usage += bytes;
    }
    (
        usage as f64 / EVENTS as f64,
        event_bytes as f64 / EVENTS as f64,
    )
}

async fn a_lease_runs_out_unless_renewed(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("lease")).await;
    store_log::a_lease_runs_out_unless_renewed(&store, "instance:a{1}").await;
}

async fn keys_cannot_escape_their_namespace(topology: Topology) {
    let server = Redis::shared(topology);
    let prefix = unique_prefix("inject");
    let store = store(&server, &prefix).await;
    // Pairs that would collide if `:` were not escaped, and glob characters.
    let tricky = [
        key("a:b", "c"),
        key("a", "b:c"),
        key("*", "*"),
        key("x?[y]", "GET /with space"),
        key("%3A", "c"),
        key("s", "line\u{2028}sep and ünïcode"),
    ];
    let batch: Vec<SaveEntry> = tricky
        .iter()
        .enumerate()
        .map(|(i, k)| entry(k, &i.to_string(), 1, 1_000))
        .collect();
    store.save(&batch).await.unwrap();
    for (i, k) in tricky.iter().enumerate() {
        assert_eq!(loaded(&store, k).await, Some(i.to_string()), "{k}");
    }
    let all = server.keys(&format!("{prefix}:*")).await;
    assert_eq!(all.len(), tricky.len(), "{all:?}");
    for k in &all {
        let rest = k.strip_prefix(&format!("{prefix}:id:")).unwrap();
        assert_eq!(rest.matches(':').count(), 1, "{k}");
        assert!(!rest.contains(['*', '?', '[', ' ', '\n']), "{k}");
        // The owner is the hash tag: the first `{...}` of the key, and only braces there.
        let (owner_tag, stream) = rest.split_once(':').unwrap();
        assert!(
            owner_tag.starts_with('{') && owner_tag.ends_with('}'),
            "{k}"
        );
        assert!(
            !owner_tag[1..owner_tag.len() - 1].contains(['{', '}']),
            "{k}"
        );
        assert!(!stream.contains(['{', '}']), "{k}");
    }
}

async fn keys_and_activity_expire_after_the_ttl(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("ttl"))
        .await
        .with_ttl(Duration::from_millis(300));
    let k = key("s1", "GET /mcp");
    store.save(&[entry(&k, "1", 1, 1_000)]).await.unwrap();
    let now = SystemTime::now();
    store
        .touch_sessions(&[
            SessionActivity {
                owner: Owner::new("s1").unwrap(),
                last_active: now,
            },
            SessionActivity {
                owner: Owner::new("s2").unwrap(),
                last_active: now - Duration::from_millis(200),
            },
        ])
        .await
        .unwrap();
    assert_eq!(loaded(&store, &k).await.as_deref(), Some("1"));
    let idle = store
        .idle_sessions(Duration::from_millis(100), 10)
        .await
        .unwrap();
    assert_eq!(idle, [Owner::new("s2").unwrap()]);
    assert!(store.last_active("s1").await.unwrap().is_some());
    sleep(Duration::from_millis(600)).await;
    assert_eq!(loaded(&store, &k).await, None);
    assert_eq!(store.last_active("s1").await.unwrap(), None);
}

/// Instance A streams to a client; the client reconnects to instance B with `Last-Event-ID`;
/// B finds the stream in Redis and tells "current" from "behind" from "unknown".
async fn a_client_resumes_on_a_second_instance(topology: Topology) {
    let server = Redis::shared(topology);
    let prefix = unique_prefix("two");
    let tracker_a = SseTracker::builder()
        .store(store(&server, &prefix).await)
        .heartbeat_interval(None)
        .build()
        .unwrap();
    let tracker_b = SseTracker::builder()
        .store(store(&server, &prefix).await)
        .heartbeat_interval(None)
        .build()
        .unwrap();
    let a = Harness::start(tracker_a).await;
    let b = Harness::start(tracker_b).await;
    let frames: Vec<String> = (1..=5).map(|n| format!("id: {n}\ndata: {n}\n\n")).collect();
    let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
    run_frames(&a, "events", Some("s1"), &refs).await;
    // A's worker writes within a flush interval.
    timeout(Duration::from_secs(10), async {
        while b
            .tracker
            .resolve(&key("s1", "GET /sse/events"))
            .await
            .unwrap()
            .is_none()
        {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("instance A never persisted the stream");

    // The client reconnects to B with the last id it saw.
    let mut headers = HeaderMap::new();
    headers.insert("last-event-id", HeaderValue::from_static("5"));
    let tx = b.feed("events");
    drop(tx);
    b.get("/sse/events", Some("s1"), headers)
        .await
        .read_to_end()
        .await;
    let last = b.seen("events").last_event_id;
    let client = last.unwrap().0;
    assert_eq!(
        b.tracker
            .resume(&key("s1", "GET /sse/events"), Some(&client))
            .await
            .unwrap(),
        Resume::Current(EventId::new("5").unwrap())
    );
    let behind = EventId::new("3").unwrap();
    assert_eq!(
        b.tracker
            .resume(&key("s1", "GET /sse/events"), Some(&behind))
            .await
            .unwrap(),
        // B never served the stream: the answer comes from the store alone.
        Resume::Unconfirmed {
            client: behind.clone(),
            stored: EventId::new("5").unwrap()
        }
    );
    assert_eq!(
        b.tracker
            .resume(&key("s9", "GET /sse/events"), None)
            .await
            .unwrap(),
        Resume::Unknown
    );
}

/// Redis is killed and restarted while streams flow: the worker's retries carry the ids
/// through, and afterwards the store holds every stream's latest id.
async fn redis_killed_and_restarted_mid_stream_loses_no_latest_id(topology: Topology) {
    let mut server = Redis::own(topology);
    let prefix = unique_prefix("restart");
    let store = store(&server, &prefix).await;
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(50),
                Duration::from_millis(400),
                50,
            )),
    );
    let h = Harness::start(tracker).await;
    const STREAMS: u32 = 5;
    let every = Duration::from_millis(20);
    let mut streams = QuietStreams::open(&h, "r", STREAMS as usize, every).await;
    streams.send_through(10).await;
    server.kill();
    streams.send_through(60).await;
    server.restart();
    let last = 70;
    streams.send_through(last).await;
    // Every client got every frame.
    streams.all_frames_delivered(last).await;
    assert!(
        recorded.sum(STORE_ERRORS_TOTAL) >= 1.0,
        "the outage was never noticed"
    );
    let check = server.lazy_store(&prefix);
    ids_stored(&check, &streams.expected(last), "Redis after the restart").await;
    println!(
        "{} ids sent across a Redis restart; store errors seen: {}",
        last * STREAMS,
        recorded.sum(STORE_ERRORS_TOTAL)
    );
}

/// Seconds of CPU this process has used (user + system), from `/proc/self/stat`.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces) start after its ')'.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// The application starts and serves while Redis is down: `RedisStore::new` does not connect,
/// writes fail (counted) and are retried, and once Redis is up every stream's latest id lands.
async fn the_app_starts_while_redis_is_down_and_persists_once_it_is_up(topology: Topology) {
    let mut server = Redis::down(topology);
    let prefix = unique_prefix("down-at-start");
    // A valid URL is enough: nothing connects yet.
    let store = server.lazy_store(&prefix);
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .retry(RetryPolicy::exponential(
                Duration::from_millis(50),
                Duration::from_millis(300),
                5,
            )),
    );
    let h = Harness::start(tracker).await;
    for s in ["d1", "d2", "d3"] {
        let client = run_frames(&h, s, Some(s), &[b"id: 1\n\n", b"id: 2\n\n"]).await;
        assert_eq!(client.received, b"id: 1\n\nid: 2\n\n", "{s}");
    }
    timeout(Duration::from_secs(10), async {
        while recorded.sum(STORE_ERRORS_TOTAL) < 1.0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the failed writes were never counted");
    server.restart();
    let expected: Vec<_> = ["d1", "d2", "d3"]
        .map(|s| (key(s, &format!("GET /sse/{s}")), Some("2".to_owned())))
        .into();
    ids_stored(&store, &expected, "Redis after it came up").await;
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// Redis answering errors at once (`maxmemory` reached with `noeviction`), then Redis paused
/// (`CLIENT PAUSE`): streams keep flowing, the store is called at a bounded rate, and every
/// stream's latest id is in Redis once the fault clears.
async fn redis_out_of_memory_then_paused_never_stalls_streams_and_loses_no_id(topology: Topology) {
    use common::load::{client, percentile, serve_load};

    let server = Redis::own(topology);
    let prefix = unique_prefix("oom-pause");
    let store = store(&server, &prefix).await;
    let flush = Duration::from_millis(100);
    let retry = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1), 5);
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .flush_interval(flush)
            .store_timeout(Duration::from_millis(500))
            .retry(retry),
    );
    let addr = serve_load(&tracker).await;
    const STREAMS: usize = 20;
    const RATE: u64 = 50;
    const EVENTS: u64 = 250; // 5 s at 50 events/s: 1 000 events/s in all
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/load?events={EVENTS}&per_second={RATE}");
    let clients: Vec<_> = (0..STREAMS)
        .map(|c| tokio::spawn(client(http.clone(), url.clone(), format!("oom-{c:02}"))))
        .collect();

    sleep(Duration::from_millis(500)).await;
    let healthy_cpu = cpu_seconds();
    let healthy_at = tokio::time::Instant::now();
    sleep(Duration::from_secs(1)).await;
    let healthy_cpu = (cpu_seconds() - healthy_cpu) / healthy_at.elapsed().as_secs_f64();

    // Out of memory: every write is refused at once.
    server
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    server.command(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let errors_before = recorded.sum(STORE_ERRORS_TOTAL);
    let cpu_before = cpu_seconds();
    let fault_at = tokio::time::Instant::now();
    sleep(Duration::from_millis(1500)).await;
    let oom_errors = recorded.sum(STORE_ERRORS_TOTAL) - errors_before;
    let oom_secs = fault_at.elapsed().as_secs_f64();
    let oom_cpu = (cpu_seconds() - cpu_before) / oom_secs;
    server.command(&["CONFIG", "SET", "maxmemory", "0"]).await;

    // Paused: calls hang until the store timeout.
    sleep(Duration::from_millis(300)).await;
    let errors_before = recorded.sum(STORE_ERRORS_TOTAL);
    server.command(&["CLIENT", "PAUSE", "1500", "ALL"]).await;
    let pause_at = tokio::time::Instant::now();
    sleep(Duration::from_millis(1500)).await;
    let pause_errors = recorded.sum(STORE_ERRORS_TOTAL) - errors_before;
    let pause_secs = pause_at.elapsed().as_secs_f64();

    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    let mut latencies: Vec<u64> = results
        .iter()
        .flat_map(|r| r.latencies_us.iter().copied())
        .collect();
    latencies.sort_unstable();
    let received: usize = results.iter().map(|r| r.received).sum();
    all_latest_ids_stored(&store, &results, "Redis after the faults cleared").await;
    // Per call kind (save, touch): one call per flush plus one per retry wake-up at most.
    let bound = 2.0 * (1.0 / flush.as_secs_f64() + 2.0 / retry.base().as_secs_f64());
    println!(
        "redis faults: delivered {received}/{}, frame delay p99 {:.1} ms; OOM: {:.1} failed calls/s \
         (bound {bound:.0}), CPU {:.0}% vs {:.0}% healthy; paused: {:.1} failed calls/s",
        STREAMS as u64 * EVENTS,
        percentile(&latencies, 0.99) as f64 / 1000.0,
        oom_errors / oom_secs,
        oom_cpu * 100.0,
        healthy_cpu * 100.0,
        pause_errors / pause_secs,
    );
    assert_eq!(received as u64, STREAMS as u64 * EVENTS);
    assert!(oom_errors >= 1.0, "the OOM errors were never seen");
    assert!(oom_errors / oom_secs <= bound);
    // Paused for 1.5 s, calls time out after 0.5 s: at least one fails.
    assert!(pause_errors >= 1.0, "the pause was never felt");
    assert!(pause_errors / pause_secs <= bound);
    // Redis answered (OOM) or answered late (paused for less than STUCK_AFTER): the
    // connection was never taken for stuck.
    assert_eq!(store.connections_replaced(), 0);
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// Redis refuses every write (`OOM`) for longer than `STUCK_AFTER`: an error reply is an
/// answer, so the connection is never taken for stuck, whether the refusals come from scripts
/// (saves) or from pipelines (activity), which redis-rs reports differently.
async fn error_replies_for_longer_than_stuck_after_replace_no_connection(topology: Topology) {
    let server = Redis::own(topology);
    let store = store(&server, &unique_prefix("oom-long")).await;
    server
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"])
        .await;
    server.command(&["CONFIG", "SET", "maxmemory", "1"]).await;
    let k = key("s1", "GET /a");
    let activity = [SessionActivity {
        owner: Owner::new("s1").unwrap(),
        last_active: SystemTime::now(),
    }];
    let phase = STUCK_AFTER + Duration::from_millis(500);
    // Activity pipelines only, then saves only: neither may hide the other's answers.
    for (what, saves) in [("activity", false), ("saves", true)] {
        let started = tokio::time::Instant::now();
        let mut refused = 0;
        while started.elapsed() < phase {
            let result = if saves {
                store.save(&[entry(&k, "id-1", 1, 1_000)]).await
            } else {
                store.touch_sessions(&activity).await
            };
            let source = format!("{:?}", result.expect_err("Redis is out of memory"));
            assert!(source.contains("OOM"), "{what}: {source}");
            refused += 1;
            sleep(Duration::from_millis(100)).await;
        }
        println!("{topology:?}: {refused} {what} refused with OOM over {phase:?}");
        // The stuck check runs when a call asks for the connection: one more.
        let _ = store.load(&k).await;
        assert_eq!(store.connections_replaced(), 0, "{what}");
    }
    server.command(&["CONFIG", "SET", "maxmemory", "0"]).await;
}

/// Redis answers no write for longer than `STUCK_AFTER` (`CLIENT PAUSE ... WRITE`; reads,
/// connects and `CLUSTER SLOTS` still work): the store makes a new connection, not before
/// `STUCK_AFTER`, on a standalone Redis and on a cluster alike, and once writes are answered
/// again no latest id is lost. This is the path a connection that stops answering for good
/// takes (`silent` below, and redis-rs's cluster client in
/// `a_primary_killed_under_load_loses_no_latest_id`), made deterministic.
async fn writes_unanswered_for_longer_than_stuck_after_get_a_new_connection(topology: Topology) {
    let server = Redis::own(topology);
    let prefix = unique_prefix("paused-writes");
    let store = store(&server, &prefix).await;
    let (tracker, recorded) = quick_retrying_tracker(&store);
    let h = Harness::start(tracker).await;
    let mut streams = QuietStreams::open(&h, "w", 3, Duration::from_millis(100)).await;
    streams.send_through(5).await;
    let check = server.lazy_store(&prefix);
    ids_stored(&check, &streams.expected(5), "Redis before the pause").await;
    let errors_before = recorded.sum(STORE_ERRORS_TOTAL);

    // Paused until the replacement is seen (a minute at most).
    server.command(&["CLIENT", "PAUSE", "60000", "WRITE"]).await;
    let paused_at = tokio::time::Instant::now();
    streams.send_through(10).await;
    timeout(Duration::from_secs(30), async {
        while store.connections_replaced() == 0 {
            sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the connection was never replaced");
    let replaced_after = paused_at.elapsed();
    server.command(&["CLIENT", "UNPAUSE"]).await;
    ids_stored(&check, &streams.expected(10), "Redis after the pause").await;
    let stored_after = paused_at.elapsed();
    streams.all_frames_delivered(10).await;
    let failed = recorded.sum(STORE_ERRORS_TOTAL) - errors_before;
    println!(
        "writes paused ({topology:?}): {failed} failed store calls, connection replaced \
         {replaced_after:?} after the pause began, writes unpaused then, every latest id in \
         Redis {stored_after:?} after the pause began"
    );
    assert!(failed >= 1.0, "the pause was never felt");
    assert!(replaced_after >= STUCK_AFTER, "{replaced_after:?}");
    drop(streams);
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// A tracker on `store`, heartbeats off, whose store calls time out after 500 ms and are
/// retried from 50 ms to 500 ms apart, 100 times: a fault shows within a second, and no id is
/// given up while a test waits for the store to recover.
fn quick_retrying_tracker(store: &RedisStore) -> (SseTracker, common::Recorded) {
    build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .heartbeat_interval(None)
            .store_timeout(Duration::from_millis(500))
            .retry(RetryPolicy::exponential(
                Duration::from_millis(50),
                Duration::from_millis(500),
                100,
            )),
    )
}

/// Streams of the test harness that send `id: n` events on demand, one stream per owner.
struct QuietStreams {
    prefix: &'static str,
    streams: Vec<(
        String,
        tokio::sync::mpsc::UnboundedSender<Bytes>,
        common::Client,
    )>,
    sent: u32,
    /// The pause after each round of events.
    every: Duration,
}

impl QuietStreams {
    async fn open(h: &Harness, prefix: &'static str, count: usize, every: Duration) -> Self {
        let mut streams = Vec::new();
        for s in 0..count {
            let name = format!("{prefix}{s}");
            let tx = h.feed(&name);
            let client = h
                .get(&format!("/sse/{name}"), Some(&name), HeaderMap::new())
                .await;
            streams.push((name, tx, client));
        }
        Self {
            prefix,
            streams,
            sent: 0,
            every,
        }
    }

    /// Sends `id: n` for every `n` up to `last` on every stream, `every` apart.
    async fn send_through(&mut self, last: u32) {
        while self.sent < last {
            self.sent += 1;
            for (_, tx, _) in &self.streams {
                tx.send(Bytes::from(format!("id: {}\n\n", self.sent)))
                    .unwrap();
            }
            sleep(self.every).await;
        }
    }

    /// Every stream's key, with `id` as its latest id.
    fn expected(&self, id: u32) -> Vec<(StreamKey, Option<String>)> {
        (0..self.streams.len())
            .map(|s| {
                let name = format!("{}{s}", self.prefix);
                (
                    key(&name, &format!("GET /sse/{name}")),
                    Some(id.to_string()),
                )
            })
            .collect()
    }

    /// Every client received every event up to `last`.
    async fn all_frames_delivered(&mut self, last: u32) {
        let expected: String = (1..=last).map(|i| format!("id: {i}\n\n")).collect();
        for (name, _, client) in &mut self.streams {
            client.read_until_len(expected.len()).await;
            assert_eq!(client.received, expected.as_bytes(), "{name}");
        }
    }
}

/// Two instances on one Redis, a client bouncing A → B → A → B with its `Last-Event-ID`: each
/// instance answers with the newer of its memory and Redis, so every answer is right even when
/// the instance's own memory holds an older id of the stream.
async fn instances_agree_while_a_client_bounces_between_them(topology: Topology) {
    let server = Redis::shared(topology);
    let prefix = unique_prefix("bounce");
    let mut instances = Vec::new();
    for _ in 0..2 {
        let tracker = SseTracker::builder()
            .store(store(&server, &prefix).await)
            .heartbeat_interval(None)
            .build()
            .unwrap();
        instances.push(Harness::start(tracker).await);
    }
    const STREAM: &str = "GET /sse/events";
    let mut last: Option<u32> = None;
    let mut next = 1;
    for (hop, instance) in [0, 1, 0, 1].into_iter().enumerate() {
        let h = &instances[instance];
        let other = &instances[1 - instance];
        let name = ["A", "B"][instance];
        // The client (re)connects here with the last id it saw.
        let mut headers = HeaderMap::new();
        if let Some(id) = last {
            headers.insert("last-event-id", HeaderValue::from(id));
        }
        let client_id = last.map(|id| EventId::new(&id.to_string()).unwrap());
        let answer = h
            .tracker
            .resume(&key("s1", STREAM), client_id.as_ref())
            .await
            .unwrap();
        let expected = match &client_id {
            None => Resume::Unknown,
            Some(id) => Resume::Current(id.clone()),
        };
        assert_eq!(answer, expected, "hop {hop} to {name}");
        if let Some(id) = last.filter(|&id| id > 1) {
            let older = EventId::new(&(id - 1).to_string()).unwrap();
            assert_eq!(
                h.tracker
                    .resume(&key("s1", STREAM), Some(&older))
                    .await
                    .unwrap(),
                // The other instance served the stream last: the answer is the store's.
                Resume::Unconfirmed {
                    client: older.clone(),
                    stored: client_id.clone().unwrap()
                },
                "hop {hop} to {name}, a client one event behind"
            );
        }
        // The instance streams three more events, then the connection drops.
        let frames: Vec<String> = (next..next + 3).map(|n| format!("id: {n}\n\n")).collect();
        let refs: Vec<&[u8]> = frames.iter().map(|f| f.as_bytes()).collect();
        let tx = h.feed("events");
        let mut client = h.get("/sse/events", Some("s1"), headers).await;
        for frame in &refs {
            tx.send(Bytes::copy_from_slice(frame)).unwrap();
        }
        drop(tx);
        client.read_to_end().await;
        next += 3;
        last = Some(next - 1);
        let latest = (next - 1).to_string();
        // Once it is in Redis, both instances resolve the stream to it.
        timeout(Duration::from_secs(10), async {
            while h
                .tracker
                .stored_event_id(&key("s1", STREAM))
                .await
                .unwrap()
                .as_ref()
                != Some(&EventId::new(&latest).unwrap())
            {
                sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the instance never persisted its latest id");
        for (who, t) in [
            (name, &h.tracker),
            (["A", "B"][1 - instance], &other.tracker),
        ] {
            assert_eq!(
                t.resolve(&key("s1", STREAM)).await.unwrap().unwrap(),
                latest.as_str(),
                "hop {hop}: {who} resolves to the newest id"
            );
        }
    }
}

/// Kills a primary of the cluster (SIGKILL) while streams flow, waits for its replica to take
/// over, and checks that every stream's latest id ends up in the cluster.
async fn a_primary_killed_under_load_loses_no_latest_id(topology: Topology) {
    use common::load::{client, serve_load};

    let mut server = Redis::own(topology);
    let prefix = unique_prefix("failover");
    let store = store(&server, &prefix).await;
    let (tracker, recorded) = build_recorded(
        SseTracker::builder()
            .store(store.clone())
            .store_timeout(Duration::from_millis(500))
            .retry(RetryPolicy::exponential(
                Duration::from_millis(50),
                Duration::from_millis(500),
                50,
            )),
    );
    let addr = serve_load(&tracker).await;
    const STREAMS: usize = 30;
    const RATE: u64 = 20;
    const EVENTS: u64 = 120; // 6 s
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let url = format!("http://{addr}/load?events={EVENTS}&per_second={RATE}");
    let clients: Vec<_> = (0..STREAMS)
        .map(|c| tokio::spawn(client(http.clone(), url.clone(), format!("fo-{c:02}"))))
        .collect();
    sleep(Duration::from_secs(1)).await;
    let recorded = Arc::new(recorded);
    let errors_before = recorded.sum(STORE_ERRORS_TOTAL);
    let killed_at = tokio::time::Instant::now();
    // When the failed store calls stopped growing: writes fail until then.
    let last_error_at = Arc::new(std::sync::Mutex::new(None::<Duration>));
    let watch = {
        let (recorded, last_error_at) = (recorded.clone(), last_error_at.clone());
        tokio::spawn(async move {
            let mut seen = errors_before;
            loop {
                let now = recorded.sum(STORE_ERRORS_TOTAL);
                if now > seen {
                    seen = now;
                    *last_error_at.lock().unwrap() = Some(killed_at.elapsed());
                }
                sleep(Duration::from_millis(20)).await;
            }
        })
    };
    if let Redis::Cluster(cluster) = &mut server {
        let primary = cluster.primaries()[0];
        cluster.kill(primary);
        tokio::task::block_in_place(|| cluster.wait_failover(primary, Duration::from_secs(30)));
        println!(
            "a replica took over {:?} after the kill",
            killed_at.elapsed()
        );
    } else {
        server.kill();
        sleep(Duration::from_secs(2)).await;
        server.restart();
    }
    let mut results = Vec::new();
    for c in clients {
        results.push(c.await.unwrap());
    }
    all_latest_ids_stored(&store, &results, "the cluster").await;
    watch.abort();
    let failed = recorded.sum(STORE_ERRORS_TOTAL) - errors_before;
    let failing_for = last_error_at.lock().unwrap().unwrap_or_default();
    let lost = results
        .iter()
        .filter(|r| r.received as u64 != EVENTS)
        .count();
    println!(
        "failover ({topology:?}): {} streams, 0 lost latest ids, {lost} streams short of events; \
         {failed} failed store calls, the last {failing_for:?} after the kill; {} connection(s) \
         replaced; every latest id in the store {:?} after the kill",
        results.len(),
        store.connections_replaced(),
        killed_at.elapsed()
    );
    assert_eq!(lost, 0);
    assert!(failed >= 1.0, "the kill was never felt by the store");
    let report = tracker.shutdown(Duration::from_secs(10)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// The connection to Redis goes silent (its peer vanished without a reset, as when a host is
/// powered off or a middlebox drops the flow): requests are written and no answer ever comes,
/// and redis-rs's `ConnectionManager` does not reconnect on timeouts. The store replaces the
/// connection once no call has been answered for `STUCK_AFTER`, and every latest id reaches
/// Redis. (Standalone only: a cluster's nodes announce their own addresses, which a proxy
/// cannot stand in for.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_a_connection_gone_silent_is_replaced_and_no_id_is_lost() {
    let global = common::global_recorded();
    let replaced_before = global.sum(STORE_CONNECTIONS_REPLACED_TOTAL);
    let server = RedisServer::new();
    let proxy = SilentProxy::start(server.url.trim_start_matches("redis://")).await;
    let prefix = unique_prefix("silent");
    let store = RedisStore::new(&proxy.redis_url())
        .unwrap()
        .with_prefix(&prefix);
    store.load(&key("connect", "probe")).await.unwrap();
    let (tracker, recorded) = quick_retrying_tracker(&store);
    let h = Harness::start(tracker).await;
    // Checked past the proxy, on a connection of its own.
    let check = RedisStore::new(&server.url).unwrap().with_prefix(&prefix);
    let mut streams = QuietStreams::open(&h, "q", 3, Duration::from_millis(100)).await;
    streams.send_through(5).await;
    ids_stored(&check, &streams.expected(5), "Redis before the silence").await;
    let errors_before = recorded.sum(STORE_ERRORS_TOTAL);

    proxy.silence();
    let silenced_at = tokio::time::Instant::now();
    streams.send_through(10).await;
    ids_stored(&check, &streams.expected(10), "Redis after the silence").await;
    let stored_after = silenced_at.elapsed();
    streams.all_frames_delivered(10).await;
    let failed = recorded.sum(STORE_ERRORS_TOTAL) - errors_before;
    println!(
        "silent connection: {failed} failed store calls, {} connection replaced, every latest id \
         in Redis {stored_after:?} after the silence (STUCK_AFTER {:?})",
        store.connections_replaced(),
        STUCK_AFTER,
    );
    assert!(failed >= 1.0, "the silence was never felt");
    assert_eq!(store.connections_replaced(), 1);
    // Only a new connection could write them.
    assert!(stored_after >= STUCK_AFTER);
    // The metric goes to the recorder installed when the replacement happens (other tests
    // may replace connections of their own meanwhile).
    assert!(global.sum(STORE_CONNECTIONS_REPLACED_TOTAL) - replaced_before >= 1.0);
    drop(streams);
    let report = h.tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}

/// Many calls at once on a store whose Redis accepts connections and closes them at once: one
/// connect (with redis-rs's own retries) serves them all, and for a second after it failed the
/// calls fail at once without connecting again. Without that, each call would connect on its
/// own, and every call of a busy server would hammer a Redis that cannot take them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_calls_share_one_connect_and_a_failed_one_is_not_retried_within_a_second() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("redis://{}", listener.local_addr().unwrap());
    let accepted = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = accepted.clone();
    let server = tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(socket);
        }
    });
    let accepted = move || accepted.load(std::sync::atomic::Ordering::Relaxed);
    let store = RedisStore::new(&url).unwrap();
    let k = key("s1", "GET /a");
    let calls = |n| {
        let store = store.clone();
        let k = k.clone();
        async move {
            let calls: Vec<_> = (0..n)
                .map(|_| {
                    let (store, k) = (store.clone(), k.clone());
                    tokio::spawn(async move { store.load(&k).await })
                })
                .collect();
            for call in calls {
                assert!(
                    call.await.unwrap().is_err(),
                    "Redis closes every connection"
                );
            }
        }
    };
    calls(50).await;
    let first = accepted();
    calls(50).await;
    let during_back_off = accepted() - first;
    sleep(Duration::from_millis(1100)).await;
    calls(1).await;
    let after_back_off = accepted() - first - during_back_off;
    println!(
        "50 calls: {first} connections accepted; 50 more within the second: {during_back_off}; \
         one call a second later: {after_back_off}"
    );
    // One connect, which redis-rs tries up to three times.
    assert!((1..=3).contains(&first), "{first}");
    assert_eq!(during_back_off, 0);
    assert!(after_back_off >= 1);
    server.abort();
}

/// Failed on `ecccf3c` (hung for ever): a call made through the handle of a runtime that has
/// shut down, as a blocking thread finishing during shutdown does. The connect it starts is
/// refused by the runtime, and the store answers with an error. Needs no Redis: the connect
/// never starts.
#[test]
fn a_store_call_after_its_runtime_shut_down_is_an_error_not_a_hang() {
    for cluster in [false, true] {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .unwrap();
            let handle = rt.handle().clone();
            let store = if cluster {
                RedisStore::cluster(["redis://127.0.0.1:1"]).unwrap()
            } else {
                RedisStore::new("redis://127.0.0.1:1").unwrap()
            };
            drop(rt);
            let k = key("s", "GET /mcp");
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                handle
                    .block_on(store.load(&k))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }));
            let _ = tx.send(outcome.map_err(|_| "the call panicked"));
        });
        let outcome = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("cluster: {cluster}: the call hung"));
        println!("cluster: {cluster}: {outcome:?}");
        assert!(
            matches!(outcome, Ok(Err(_))),
            "cluster: {cluster}: {outcome:?}"
        );
    }
}

/// Script calls the nodes at `urls` have run so far (`INFO commandstats`).
fn script_calls(urls: &[String]) -> u64 {
    urls.iter()
        .map(|url| {
            let client = redis::Client::open(url.as_str()).unwrap();
            let mut conn = client.get_connection().unwrap();
            let info: String = redis::cmd("INFO")
                .arg("commandstats")
                .query(&mut conn)
                .unwrap();
            info.lines()
                .filter_map(|l| {
                    l.strip_prefix("cmdstat_evalsha:")
                        .or_else(|| l.strip_prefix("cmdstat_eval:"))
                })
                .filter_map(|stats| {
                    stats
                        .split(',')
                        .find_map(|kv| kv.strip_prefix("calls=")?.parse::<u64>().ok())
                })
                .sum::<u64>()
        })
        .sum()
}

/// A batch whose keys lie in nearly every slot takes one script call per primary (the bound
/// is two per primary), counted by the servers, and stores every id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_over_every_slot_takes_at_most_two_script_calls_per_primary() {
    let cluster = RedisCluster::new();
    let store = RedisStore::cluster(cluster.urls())
        .unwrap()
        .with_prefix(unique_prefix("round-trips"));
    store.load(&key("connect", "probe")).await.unwrap();
    let keys: Vec<StreamKey> = (0..4096)
        .map(|i| key(&format!("owner-{i}"), "POST /mcp"))
        .collect();
    let slots: std::collections::HashSet<_> = keys
        .iter()
        .map(|k| redis::cluster_routing::Slot::for_key(store.key_of(k)))
        .collect();
    let batch: Vec<SaveEntry> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| entry(k, &format!("id-{i}"), 1, 1_000))
        .collect();
    let before = script_calls(&cluster.urls());
    store.save(&batch).await.unwrap();
    let calls = script_calls(&cluster.urls()) - before;
    let primaries = cluster.primaries().len() as u64;
    println!(
        "a batch of {} keys in {} slots: {calls} script calls, {primaries} primaries",
        keys.len(),
        slots.len()
    );
    assert!(slots.len() > 3000, "the batch is spread over the slots");
    assert!(
        calls >= 1 && calls <= 2 * primaries,
        "{calls} script calls for {primaries} primaries"
    );
    for (i, k) in keys.iter().enumerate().step_by(97) {
        assert_eq!(loaded(&store, k).await, Some(format!("id-{i}")));
    }
}

/// Slots moved after the store read the cluster's slot map: the batch is stored whole (a
/// node's call that reaches a key its node no longer serves goes again one call per slot; a
/// failed save would be retried, as the tracker does, within five tries); nothing older
/// replaces anything newer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_after_a_reshard_is_stored_whole_by_its_retry() {
    let cluster = RedisCluster::new();
    let store = RedisStore::cluster(cluster.urls())
        .unwrap()
        .with_prefix(unique_prefix("reshard"));
    let keys: Vec<StreamKey> = (0..2048)
        .map(|i| key(&format!("owner-{i}"), "POST /mcp"))
        .collect();
    let batch = |sequence: u64| -> Vec<SaveEntry> {
        keys.iter()
            .enumerate()
            .map(|(i, k)| entry(k, &format!("id-{i}-{sequence}"), sequence, 1_000))
            .collect()
    };
    store.save(&batch(1)).await.unwrap();
    let primaries = cluster.primaries();
    cluster.reshard(primaries[0], primaries[1], 2000);
    let mut failed = 0;
    while let Err(error) = store.save(&batch(2)).await {
        failed += 1;
        assert!(failed < 5, "still failing after {failed} tries: {error}");
    }
    println!("after moving 2000 slots: {failed} failed save(s) before the batch was stored");
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(loaded(&store, k).await, Some(format!("id-{i}-2")));
    }
    // An older batch is refused everywhere, on the new map.
    store.save(&batch(1)).await.unwrap();
    for (i, k) in keys.iter().enumerate().step_by(101) {
        assert_eq!(loaded(&store, k).await, Some(format!("id-{i}-2")));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_activity_write_touching_a_slot_being_moved_is_stored() {
    let cluster = RedisCluster::new();
    let store = RedisStore::cluster(cluster.urls())
        .unwrap()
        .with_prefix(unique_prefix("activity-moving"));
    // Owners in every activity shard; shard 0's set does not exist yet, and its slot is being
    // moved, so its primary answers `ASK` for it.
    let _moving = start_moving(&cluster, &store.activity_key(0));
    let now = SystemTime::now();
    let activity: Vec<SessionActivity> = (0..256)
        .map(|i| SessionActivity {
            owner: Owner::new(&format!("owner-{i}")).unwrap(),
            last_active: now,
        })
        .collect();
    // The node's pipeline is redirected, and its shards then go command by command: the
    // first write stores everything.
    store.touch_sessions(&activity).await.unwrap();
    for a in &activity {
        let owner = a.owner.as_str();
        assert!(store.last_active(owner).await.unwrap().is_some(), "{owner}");
    }
}

/// A slot being moved, as `redis-cli --cluster reshard` leaves it mid-way: `IMPORTING` on
/// `target`, `MIGRATING` on `source` (node indexes), no key moved yet.
struct Moving {
    slot: String,
    source: usize,
    target: usize,
    target_id: String,
}

/// Starts moving the slot of `redis_key` from its primary to another one.
fn start_moving(cluster: &RedisCluster, redis_key: &str) -> Moving {
    let slot = redis::cluster_routing::Slot::for_key(redis_key);
    let slot_number: u16 = (0..16_384u16)
        .find(|&n| redis::cluster_routing::Slot::new(n) == Some(slot))
        .unwrap();
    let mut source = None;
    let mut ids = Vec::new();
    for i in cluster.primaries() {
        let nodes = cluster.command_on(i, &["CLUSTER", "NODES"]);
        let me = nodes
            .lines()
            .find(|l| l.contains("myself"))
            .expect("a myself line");
        let fields: Vec<&str> = me.split_whitespace().collect();
        ids.push((i, fields[0].to_owned()));
        for range in &fields[8..] {
            let (start, end) = range.split_once('-').unwrap_or((range, range));
            if let (Ok(start), Ok(end)) = (start.parse::<u16>(), end.parse::<u16>())
                && (start..=end).contains(&slot_number)
            {
                source = Some(i);
            }
        }
    }
    let source = source.expect("a primary serves the slot");
    let id_of = |i: usize| ids.iter().find(|(n, _)| *n == i).unwrap().1.clone();
    let target = ids.iter().map(|(n, _)| *n).find(|&n| n != source).unwrap();
    let slot = slot_number.to_string();
    cluster.command_on(
        target,
        &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &id_of(source)],
    );
    cluster.command_on(
        source,
        &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &id_of(target)],
    );
    Moving {
        slot,
        source,
        target,
        target_id: id_of(target),
    }
}

/// A slot in the middle of a move (`MIGRATING` on its primary, `IMPORTING` on another): a
/// batch with a new key in it, among keys of other slots of that primary, is stored whole at
/// its first save: the primary's script cannot touch that key, and the batch's keys then go
/// one call per slot, the moving slot's through the cluster client's `ASK` redirection.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_touching_a_slot_being_moved_is_stored_at_its_first_save() {
    let cluster = RedisCluster::new();
    let store = RedisStore::cluster(cluster.urls())
        .unwrap()
        .with_prefix(unique_prefix("migrating"));
    store
        .save(&[entry(&key("warm", "GET /"), "w", 1, 1_000)])
        .await
        .unwrap();
    let keys: Vec<StreamKey> = (0..2048)
        .map(|i| key(&format!("owner-{i}"), "POST /mcp"))
        .collect();
    start_moving(&cluster, &store.key_of(&keys[0]));
    let batch: Vec<SaveEntry> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| entry(k, &format!("id-{i}"), 1, 1_000))
        .collect();
    store.save(&batch).await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        assert_eq!(loaded(&store, k).await, Some(format!("id-{i}")), "{k:?}");
    }
}

/// Found by review: a batch whose first key is new and lies in a slot being moved, and
/// whose second key of that slot is still on the slot's primary, must not write that second
/// key on the node the slot is moving to (the newest id would then be unreadable, and the
/// move would fail on it). Nothing is written outside the slot's primary; once the move
/// ends, the batch is stored and the newest id is the one read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_batch_never_writes_a_key_where_its_slot_is_moving_to() {
    let cluster = RedisCluster::new();
    let store = RedisStore::cluster(cluster.urls())
        .unwrap()
        .with_prefix(unique_prefix("moving-to"));
    let (new, old) = (key("owner-x", "POST /mcp"), key("owner-x", "GET /"));
    store.save(&[entry(&old, "old-1", 1, 1_000)]).await.unwrap();
    let old_key = store.key_of(&old);
    let moving = start_moving(&cluster, &old_key);
    let mut batch = vec![
        entry(&new, "new-2", 2, 2_000),
        entry(&old, "old-2", 2, 2_000),
    ];
    batch.extend((0..256).map(|i| entry(&key(&format!("other-{i}"), "GET /"), "o", 2, 2_000)));
    // The slot's keys are split between the nodes for now: the save may fail (`TRYAGAIN`).
    let _ = store.save(&batch).await;
    assert_eq!(
        cluster.command_on(moving.target, &["CLUSTER", "COUNTKEYSINSLOT", &moving.slot]),
        "0",
        "a key was written where its slot is moving to"
    );
    // The move ends: the key goes over, and the slot is the target's.
    let port = |i: usize| cluster.urls()[i].rsplit(':').next().unwrap().to_owned();
    cluster.command_on(
        moving.source,
        &[
            "MIGRATE",
            "127.0.0.1",
            &port(moving.target),
            "",
            "0",
            "5000",
            "KEYS",
            &old_key,
        ],
    );
    for node in [moving.target, moving.source] {
        cluster.command_on(
            node,
            &[
                "CLUSTER",
                "SETSLOT",
                &moving.slot,
                "NODE",
                &moving.target_id,
            ],
        );
    }
    let mut failed = 0;
    while store.save(&batch).await.is_err() {
        failed += 1;
        assert!(failed < 5, "the batch is never stored");
        sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(loaded(&store, &old).await.as_deref(), Some("old-2"));
    assert_eq!(loaded(&store, &new).await.as_deref(), Some("new-2"));
}

/// Replay across instances through Redis (`tests/common/across.rs`): a reconnect on another
/// instance replays from the store's log and follows it; a producer's death is signalled.
async fn detached_events_reach_redis_once_each_with_their_end(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("across")).await;
    across::a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end(store)
        .await;
}

async fn a_reconnect_on_another_instance_replays_from_redis_then_follows_it(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("across")).await;
    across::a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end(store).await;
}

async fn a_reconnect_before_the_producers_flush_waits_for_redis(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("across")).await;
    across::a_reconnect_arriving_before_the_producers_flush_waits_for_its_events(store).await;
}

async fn a_stream_stopped_by_its_producer_gives_redis_readers_the_gap_signal(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("across")).await;
    across::a_stream_its_producer_stops_gives_readers_elsewhere_the_gap_signal(store).await;
}

/// Chaos through Redis: 30 answers over three instances, one killed mid-run; on a cluster,
/// a primary is killed too, once half the answers have started, and its replica takes over
/// while instances append and read (`tests/common/across.rs`).
async fn chaos_across_instances_through_redis_gives_no_silent_gap(topology: Topology) {
    let server = match topology {
        Topology::Standalone => Redis::shared(topology),
        Topology::Cluster => Redis::own(topology),
    };
    let store = store(&server, &unique_prefix("chaos")).await;
    let server = Arc::new(std::sync::Mutex::new(server));
    let kill = {
        let server = server.clone();
        move || {
            if let Redis::Cluster(cluster) = &mut *server.lock().unwrap() {
                let primary = cluster.primaries()[0];
                let killed_at = std::time::Instant::now();
                cluster.kill(primary);
                cluster.wait_failover(primary, Duration::from_secs(30));
                println!(
                    "chaos: a primary killed, its replica took over {:?} later",
                    killed_at.elapsed()
                );
            }
        }
    };
    let report = across::chaos(store, 30, 40, false, kill).await;
    println!("replay across instances, {topology:?}: {report:?}");
    report.assert_honest();
}

/// Chaos across instances through a standalone Redis with durable replay: the one gap left
/// is the tail a killed producer never sent (`producer_lost`), never history a client had.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_chaos_with_durable_replay_loses_no_history_a_client_had() {
    let server = Redis::shared(Topology::Standalone);
    let store = store(&server, &unique_prefix("chaos-durable")).await;
    let report = across::chaos(store, 30, 40, true, || {}).await;
    println!("replay across instances, durable, Standalone: {report:?}");
    report.assert_no_history_lost();
}

/// A size from the environment variable `name`, or `default`.
fn size_from_env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// An LLM token event of about 75 bytes: an id, and a delta of JSON.
fn token_event(offset: u64) -> Bytes {
    Bytes::from(format!(
        "id: {offset}\ndata: {{\"choices\":[{{\"delta\":{{\"content\":\" token{offset:05}\"}},\"index\":0}}]}}\n\n"
    ))
}

/// Appends as the worker makes them, one call per flush: 4 new events for each of 256
/// streams (of as many owners, spread over the slots), `flushes` times. Returns the events
/// per second and the script calls (round trips to a node) per flush.
async fn append_rate(server: &Redis, store: &RedisStore, flushes: usize) -> (f64, f64) {
    use tower_sse_tracker::store::{LogAppend, LogEvent};
    const STREAMS: usize = 256;
    const EVENTS: u64 = 4;
    let flush = |round: u64| -> Vec<LogAppend> {
        (0..STREAMS)
            .map(|s| {
                let mut append =
                    LogAppend::new(key(&format!("owner-{s}"), "GET /answer"), 1, "instance-a");
                for offset in round * EVENTS..(round + 1) * EVENTS {
                    append = append.event(LogEvent::new(
                        offset,
                        Some(EventId::new(&offset.to_string()).unwrap()),
                        token_event(offset),
                    ));
                }
                append
            })
            .collect()
    };
    // Connect and load the script first; the batches are made before the clock starts.
    store.append_logs(&flush(0)).await.unwrap();
    let batches: Vec<_> = (1..=flushes as u64).map(flush).collect();
    let calls = script_calls(&server.urls());
    let started = std::time::Instant::now();
    for batch in &batches {
        store.append_logs(batch).await.unwrap();
    }
    let took = started.elapsed();
    let calls = script_calls(&server.urls()) - calls;
    let events = (flushes * STREAMS) as f64 * EVENTS as f64;
    (events / took.as_secs_f64(), calls as f64 / flushes as f64)
}

/// Every figure of replay across instances on Redis, standalone and Cluster, in one run:
/// append throughput and round trips per flush, Redis memory per event, the time to the first
/// replayed byte of a reconnect on another instance replaying 300 events, and the latency
/// durable replay adds to each event (flush interval 100 ms). Sizes:
/// `ACROSS_FIGURES_FLUSHES` (default 20 flushes of 1 024 events), `REPLAY_FIRST_BYTE_RECONNECTS`
/// (default 100), `ACROSS_FIGURES_DURABLE_EVENTS` (default 40).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_across_instances_figures_in_one_run() {
    let flushes = size_from_env("ACROSS_FIGURES_FLUSHES", 20);
    let reconnects = size_from_env("REPLAY_FIRST_BYTE_RECONNECTS", 100);
    let durable_events = size_from_env("ACROSS_FIGURES_DURABLE_EVENTS", 40) as u32;
    let flush = Duration::from_millis(100);
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let mut rows = Vec::new();
    for topology in [Topology::Standalone, Topology::Cluster] {
        let server = Redis::shared(topology);
        let prefix = unique_prefix("figures");
        let (rate, calls) = append_rate(&server, &store(&server, &prefix).await, flushes).await;
        let (per_event, event) = log_memory(&server, &store(&server, &prefix).await).await;
        let times = across::first_replayed_byte(
            store(&server, &format!("{prefix}-fb")).await,
            300,
            reconnects,
        )
        .await;
        let plain = across::frame_latency(
            store(&server, &format!("{prefix}-plain")).await,
            false,
            flush,
            durable_events,
        )
        .await;
        let durable = across::frame_latency(
            store(&server, &format!("{prefix}-durable")).await,
            true,
            flush,
            durable_events,
        )
        .await;
        let q = across::quantile;
        rows.push(format!(
            "| {topology:?} | {rate:.0} | {calls:.1} | {per_event:.1} ({event:.1}) | {:.2} / {:.2} | \
             {:.2} / {:.2} | {:.1} / {:.1} |",
            ms(q(&times, 0.5)),
            ms(q(&times, 0.99)),
            ms(q(&plain, 0.5)),
            ms(q(&plain, 0.99)),
            ms(q(&durable, 0.5)),
            ms(q(&durable, 0.99)),
        ));
    }
    println!(
        "replay across instances, {flushes} flushes of 4 events for each of 256 streams, {reconnects} \
         reconnects replaying 300 events, {durable_events} events at a flush interval of 100 ms:\n\
         | Redis | appends, events/s | round trips per flush | bytes per event in Redis (event) | \
         first replayed byte p50 / p99, ms | event to client p50 / p99, ms | durable p50 / p99, ms |\n\
         |---|---|---|---|---|---|---|\n{}",
        rows.join("\n")
    );
}

async fn with_durable_replay_redis_holds_every_event_a_client_has_and_its_end(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("durable")).await;
    across::with_durable_replay_the_store_holds_every_event_a_client_has_and_its_end(store).await;
}

async fn a_producer_dead_in_redis_gets_the_gap_signal(topology: Topology) {
    let server = Redis::shared(topology);
    let store = store(&server, &unique_prefix("across")).await;
    across::when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal(store).await;
}

macro_rules! on_both_topologies {
    ($($test:ident),* $(,)?) => {
        mod standalone {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Topology::Standalone).await
                }
            )*
        }
        mod cluster {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Topology::Cluster).await
                }
            )*
        }
    };
}

on_both_topologies!(
    detached_events_reach_redis_once_each_with_their_end,
    a_reconnect_on_another_instance_replays_from_redis_then_follows_it,
    a_producer_dead_in_redis_gets_the_gap_signal,
    a_reconnect_before_the_producers_flush_waits_for_redis,
    a_stream_stopped_by_its_producer_gives_redis_readers_the_gap_signal,
    chaos_across_instances_through_redis_gives_no_silent_gap,
    with_durable_replay_redis_holds_every_event_a_client_has_and_its_end,
    a_batch_round_trips,
    a_stale_write_is_refused_across_two_stores,
    this_and_the_last_versions_layout_agree_on_the_newest_id,
    a_save_after_redis_lost_its_scripts_loads_the_script_again,
    replay_logs_keep_the_exact_events_once_each,
    a_replay_log_expires_after_the_ttl,
    a_replay_log_costs_redis_little_more_than_its_events,
    a_lease_runs_out_unless_renewed,
    keys_cannot_escape_their_namespace,
    keys_and_activity_expire_after_the_ttl,
    a_client_resumes_on_a_second_instance,
    redis_killed_and_restarted_mid_stream_loses_no_latest_id,
    the_app_starts_while_redis_is_down_and_persists_once_it_is_up,
    redis_out_of_memory_then_paused_never_stalls_streams_and_loses_no_id,
    error_replies_for_longer_than_stuck_after_replace_no_connection,
    writes_unanswered_for_longer_than_stuck_after_get_a_new_connection,
    instances_agree_while_a_client_bounces_between_them,
    a_primary_killed_under_load_loses_no_latest_id,
);
