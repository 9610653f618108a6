//! [`RedisStore`]: a store shared by several server instances, on a standalone Redis or a
//! Redis Cluster (feature `redis`).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use futures_util::StreamExt;
use redis::aio::ConnectionManager;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{Cmd, ErrorKind, Pipeline, Script, ServerErrorKind};

mod connection;

use connection::{Client, Conn, Connection, Current, TIMEOUT};

use super::{
    AppendReport, LogAppend, LogEnd, LogEvent, SaveEntry, SessionActivity, Store, StoreError,
    StoredId, StoredLog, check_appends,
};
use crate::key::{EventId, Owner, StreamKey};
use crate::sync::lock;

/// Default key prefix of [`RedisStore`].
pub(crate) const DEFAULT_PREFIX: &str = "sse-tracker";
/// Default time to live of the keys written by [`RedisStore`]: 24 hours.
pub(crate) const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Sorted sets the owners' activity is spread over (each its own hash tag, so on a cluster they
/// land on different slots).
pub(crate) const ACTIVITY_SHARDS: usize = 16;
/// Calls a [`RedisStore`] on a cluster has in flight at once for one batch (one per primary,
/// or, for a node whose slots are moving, one per slot of its keys).
const MAX_CONCURRENT_CALLS: usize = 32;

/// The save script, with `$records`: the loop header that gives each record's `key` and
/// `value` (the value to store, `time:sequence:id` with the time in 16 digits and the sequence
/// in 20, zero-padded: see [`write_value`]).
///
/// `SET … NX GET` writes a new key in one call, and returns an existing key's value without
/// touching it; the value is then replaced (a second `SET`) only when the entry is newer. A
/// refused entry writes nothing and leaves the key's expiry as it was.
/// A value in the fixed-width layout compares by its first 37 bytes, all digits but the `:`
/// at the same place in both, so their string order is their `(time, sequence)` order (also
/// under a locale's collation, which Lua's `<` uses). A value in the layout of earlier
/// versions (numbers not padded) is compared as numbers.
macro_rules! save_script {
    ($records:literal) => {
        concat!(
            "local ttl = ARGV[1]
local call, find, match, sub = redis.call, string.find, string.match, string.sub
local written = 0
",
            $records,
            "
  local current = call('SET', key, value, 'NX', 'PX', ttl, 'GET')
  local newer = true
  if current then
    if find(current, '^%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d:%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d%d:') then
      newer = sub(current, 1, 37) < sub(value, 1, 37)
    else
      local ct, cs = match(current, '^(%d+):(%d+):')
      ct, cs = tonumber(ct), tonumber(cs)
      local nt, ns = tonumber(sub(value, 1, 16)), tonumber(sub(value, 18, 37))
      newer = not (ct and (ct > nt or (ct == nt and cs >= ns)))
    end
    if newer then
      call('SET', key, value, 'PX', ttl)
    end
  end
  if newer then
    written = written + 1
  end
end
return written
"
        )
    };
}

/// Saves a batch atomically (on a cluster, the keys of one slot): `KEYS` are the keys, `ARGV`
/// the time to live in ms, then each key's value. A key's value is replaced only by one with a
/// higher `(time, sequence)`, so neither a late retry nor another instance's older id can
/// overwrite a newer one.
const SAVE_SCRIPT: &str = save_script!(
    "for i, key in ipairs(KEYS) do
  local value = ARGV[i + 1]"
);

/// [`SAVE_SCRIPT`] for the keys of one cluster node, whatever their slots: it declares no key
/// (it is sent to the node by its address), and the keys are in `ARGV` (`ttl`, then `key,
/// value` for each). A script without flags may touch keys of any slot that its node serves
/// now; a key it does not (a slot moved, or a key already moved out of a slot being moved)
/// stops the script with an error before that key is read or written.
const SAVE_NODE_SCRIPT: &str = save_script!(
    "for base = 2, #ARGV, 2 do
  local key, value = ARGV[base], ARGV[base + 1]"
);

/// Appends events to replay logs (Redis Streams), for the keys of one cluster node whatever
/// their slots, or of a standalone Redis: the keys are in `ARGV`, and a call may declare the
/// keys of its one stream only to be routed by them. `ARGV`: the time to live in ms, the
/// log's length bound, then for each stream its log key, its meta key (a hash: `epoch`,
/// `next`, `ended`, `producer`), its epoch, producer, end mark (`0` none, `1` finished, `2`
/// stopped), number of events, and
/// for each event its offset, its id field (`-` for none, `+` and the id) and its bytes.
///
/// A stream's entries have the ids `<offset>-1`, so that a read after an offset is a range.
/// Epochs compare as numbers (as strings of one width: a longer one is higher). A higher
/// epoch than the stored one (or no stored one) starts the log again; a lower one, or the same
/// one from another producer, is refused; events at offsets below the stored `next` (a retry),
/// or after the end mark, are skipped. Offsets are below 2^53, exact as Lua numbers. Returns
/// the places (from 1) of the streams refused.
const APPEND_SCRIPT: &str = "local ttl, maxlen = ARGV[1], ARGV[2]
local call = redis.call
local i = 3
local k = 0
local refused = {}
while i <= #ARGV do
  local log, meta, epoch, producer, ended = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local n = tonumber(ARGV[i + 5])
  i = i + 6
  k = k + 1
  local stored = call('HMGET', meta, 'epoch', 'next', 'producer', 'ended')
  local se = stored[1]
  local nxt, closed, stale = 0, false, false
  if se and (#se > #epoch or (#se == #epoch and se > epoch)) then
    stale = true
  elseif se == epoch then
    stale = stored[3] ~= producer
    nxt = tonumber(stored[2]) or 0
    closed = (stored[4] or '0') ~= '0'
  else
    call('DEL', log, meta)
  end
  if stale then
    refused[#refused + 1] = k
    i = i + 3 * n
  else
    for _ = 1, n do
      local o = tonumber(ARGV[i])
      if not closed and o >= nxt then
        call('XADD', log, 'MAXLEN', maxlen, ARGV[i] .. '-1', 'i', ARGV[i + 1], 'b', ARGV[i + 2])
        nxt = o + 1
      end
      i = i + 3
    end
    call('HSET', meta, 'epoch', epoch, 'next', nxt, 'producer', producer)
    if ended ~= '0' and not closed then
      call('HSET', meta, 'ended', ended)
    end
    call('PEXPIRE', log, ttl)
    call('PEXPIRE', meta, ttl)
  end
end
return refused
";

/// Reads a replay log: `KEYS` its log and meta keys, `ARGV` where to start (`-`, or `(` and the
/// id of the last event not wanted) and how many events at most. `false` when there is no
/// log; else its epoch, next offset, ended flag, producer and entries.
const READ_LOG_SCRIPT: &str =
    "local meta = redis.call('HMGET', KEYS[2], 'epoch', 'next', 'ended', 'producer')
if not meta[1] then
  return false
end
local entries = {}
if tonumber(ARGV[2]) > 0 then
  entries = redis.call('XRANGE', KEYS[1], ARGV[1], '+', 'COUNT', ARGV[2])
end
return {meta[1], meta[2] or '0', meta[3] or '0', meta[4] or '', entries}
";

/// An append and its place in its batch.
type Placed<'a> = (usize, &'a LogAppend);

/// The longest a Redis replay log grows, in events, by default.
const DEFAULT_LOG_MAX_EVENTS: usize = 1024;
/// Events one append script call carries at most (unless one stream has more).
const MAX_EVENTS_PER_CALL: usize = 1024;

/// The largest time a stored value holds, in Unix microseconds (16 digits: the year 2286).
const MAX_STORED_TIME: u64 = 9_999_999_999_999_999;

/// Appends the stored value of `entry` to `out`: `time:sequence:id`, the time in Unix
/// microseconds in 16 digits and the sequence in 20, zero-padded, so that values compare as
/// strings. Earlier versions wrote the numbers unpadded; they read these values as the same
/// numbers, and the save script reads theirs.
fn write_value(out: &mut Vec<u8>, entry: &SaveEntry) {
    fn digits(out: &mut Vec<u8>, mut n: u64, width: usize) {
        let start = out.len();
        out.resize(start + width, b'0');
        for at in (start..start + width).rev() {
            out[at] = b'0' + (n % 10) as u8;
            n /= 10;
        }
    }
    digits(out, unix_us(entry.published_at).min(MAX_STORED_TIME), 16);
    out.push(b':');
    digits(out, entry.sequence, 20);
    out.push(b':');
    out.extend_from_slice(entry.id.as_str().as_bytes());
}

/// A Lua script: its text, and its hash (for `EVALSHA`).
#[derive(Clone)]
struct Lua {
    text: &'static str,
    hash: Arc<str>,
}

impl Lua {
    fn new(text: &'static str) -> Self {
        Self {
            text,
            hash: Script::new(text).get_hash().into(),
        }
    }
}

/// A cluster's slots, as ranges with the primary that serves each, sorted.
type SlotMap = Vec<(u16, u16, Primary)>;

/// A primary in a slot map: its node id, and its address when the cluster gives one that can
/// be reached (not `?`, empty, or a wildcard).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Primary {
    id: String,
    address: Option<(String, u16)>,
}

/// The cluster slot of `key`: CRC16 (XMODEM) of its hash tag, or of the whole key without
/// one, modulo 16 384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    let mut crc: u16 = 0;
    for &b in tagged {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// Whether a script failed on a key that its node does not serve now (its slot moved, or is
/// moving).
fn slot_elsewhere(error: &redis::RedisError) -> bool {
    let text = error.to_string();
    text.contains("non local key") || text.contains("do not hash to the same slot")
}

/// The primary of `slot` in `map`.
fn node_of(map: &SlotMap, slot: u16) -> Option<&Primary> {
    let at = map.partition_point(|(_, end, _)| *end < slot);
    map.get(at)
        .filter(|(start, _, _)| *start <= slot)
        .map(|(_, _, node)| node)
}

/// The slot map of a `CLUSTER SLOTS` reply.
fn parse_slots(reply: &redis::Value) -> Option<SlotMap> {
    use redis::Value;
    let int = |v: &Value| match v {
        Value::Int(n) => u16::try_from(*n).ok(),
        _ => None,
    };
    let text = |v: &Value| match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    };
    let reachable =
        |host: Option<String>| host.filter(|h| !matches!(h.as_str(), "" | "?" | "0.0.0.0" | "::"));
    let Value::Array(ranges) = reply else {
        return None;
    };
    let mut map = SlotMap::with_capacity(ranges.len());
    for range in ranges {
        let Value::Array(fields) = range else {
            return None;
        };
        let (start, end) = (int(fields.first()?)?, int(fields.get(1)?)?);
        let Value::Array(primary) = fields.get(2)? else {
            return None;
        };
        let port = match primary.get(1)? {
            Value::Int(n) => u16::try_from(*n).ok(),
            _ => None,
        };
        let id = text(primary.get(2)?)?;
        let address = reachable(primary.first().and_then(text)).zip(port);
        map.push((start, end, Primary { id, address }));
    }
    map.sort_unstable();
    Some(map)
}

/// A [`Store`] on Redis, standalone or Redis Cluster, for several server instances behind one
/// load balancer: a client that reconnects to another instance with `Last-Event-ID` can be
/// resumed there, because [`SseTracker::resolve`](crate::SseTracker::resolve) asks this store.
///
/// - **Standalone or cluster.** [`RedisStore::new`] for one Redis, [`RedisStore::cluster`] for
///   a Redis Cluster:
///   choose a cluster when one Redis is not enough memory or throughput, or must not be a single
///   point of failure. Both use the same keys and pass the same tests.
/// - **Round trips.** On a standalone Redis a batch is saved in one round trip (a Lua script, sent
///   by its hash, and with its text only when Redis answers that it lacks it: after a restart or a
///   failover), activity in one pipeline. On a cluster a batch is split by the primary that serves
///   each key, from the cluster's slot map (`CLUSTER SLOTS`, read at the first save and again after
///   any failed one), and each primary gets one script call, sent concurrently: as many round trips
///   as primaries, however many slots the batch touches. Such a call is sent to the primary's
///   address and declares no key (so no `ASK` can send it, whole, where one of its slots is moving
///   to); its keys are arguments, which a script may touch when its node serves them now. While
///   slots move (a reshard), a call that reaches a key its node does not serve stops there, before
///   touching it, and that node's keys go one call per slot instead (as before this grouping), each
///   redirected by the cluster client (`MOVED`, `ASK`, `TRYAGAIN`); the map is read again at the
///   next save, and the keys the first call wrote are refused as not newer. After a failover the
///   map is read again at the first failed save. A primary the cluster gives no address for (`?`,
///   empty, a wildcard) gets one call per slot. What this gives up: a proxy that admits only
///   scripts whose keys are all declared (some managed services) refuses these calls. Activity goes
///   the same way: the activity shards of each primary in one pipeline sent to its address, or
///   command by command while slots move. While no slot moves, every primary has an address and
///   holds the script, a flush thus takes one save call and one activity pipeline per primary at
///   most.
/// - **Atomic, newest wins.** The script compares each key's stored `(time, sequence)` with the
///   entry's and writes only newer ones, so two instances writing one key, or a late retry,
///   never replace a newer id with an older one. A new key takes one Redis call inside the
///   script (`SET … NX GET`), an existing one a second (`SET`) when the entry is newer.
/// - **Key layout.** `{prefix}:id:{<owner>}:<stream>` holds `time:sequence:id`: the time in
///   Unix microseconds in 16 digits and the sequence in 20, zero-padded, so that the script
///   compares values as strings. The braces make the owner the key's hash tag, so all streams
///   of an owner share a slot; a sessionless stream is `{prefix}:id:~:{<stream>}`. Owners and
///   stream names are percent-encoded (every byte but `A-Z a-z 0-9 - _ .`), so no value can
///   reach outside its place in the key, form another key or another hash tag. Activity is
///   spread over 16 sorted sets, `{prefix}:activity:{<n>}`, owner ids scored by last
///   activity (Unix ms); an owner's shard is a fixed hash of its name.
/// - **From the last version (0.1).** The keys are the same; only the values' numbers were
///   unpadded (`1765000000000123:5:id`). Nothing needs migrating, and both versions can write
///   one store during a rolling deploy: this version compares an unpadded value as numbers,
///   and the last version reads a padded one as the same numbers (`tests/redis.rs` runs the
///   last version's script against this one's values, and the other way round). An
///   unpadded value is replaced at the stream's next write, or expires.
/// - **Replay logs** ([`Store::append_logs`], [`Store::read_log`]: replay across instances,
///   see [`ReplayPolicy::across_instances`](crate::ReplayPolicy::across_instances)). A stream's log is a Redis
///   Stream, `{prefix}:log:{<owner>}:<stream>`, on its latest id's slot, with a hash beside it
///   (`{prefix}:logmeta:…`: the epoch, the next offset, the end mark, the producer). Each event is
///   an entry with the id `<offset>-1` and two fields, its `id` field and its bytes; a log keeps
///   its newest [`with_log_max_events`](RedisStore::with_log_max_events) events (`XADD … MAXLEN`)
///   and expires `ttl` after its last append. An event costs Redis its bytes and about 33 more
///   (`tests/redis.rs`, 1 000 events of 75 bytes). Appends go like saves: one script call per
///   primary on a cluster (of at most 1 024 events, so that no call holds Redis long). A producer's
///   lease is `{prefix}:lease:{<producer>}`, with a time to live. Run Redis with `maxmemory-policy
///   noeviction` (its default) when it holds logs: a policy that evicts keys could drop a log's
///   meta without its events.
/// - **Expiry.** Id keys expire `ttl` after their last write (a refused, older id is not a
///   write); activity older than `ttl` is removed from its set at each activity write, and a
///   set expires `ttl` after the last one.
/// - **Start-up and reconnects.** [`RedisStore::new`] and [`RedisStore::cluster`] do not
///   connect: the first call does, so an application starts and serves while Redis is down
///   (its writes fail and the tracker's worker retries them with back-off until Redis is up).
///   Connecting and requests time out after 2 s, a whole connect after 5 s. A standalone
///   connection is a redis-rs `ConnectionManager`, which reconnects when the connection drops;
///   on a cluster, redis-rs follows `MOVED` and `ASK` redirections and refreshes the topology.
///   [`RedisStore::connect`] and [`RedisStore::connect_cluster`] wait for a first connection
///   instead.
/// - **A connection that stops answering is replaced.** Two cases need it.
///   `ConnectionManager` reconnects when a connection drops, not when calls time out, so a
///   connection whose peer vanished without a reset (a host powered off, a middlebox that
///   dropped the flow) times out until the kernel gives up on it, about 15 minutes later on
///   Linux. And redis-rs's cluster client can stop answering every call, on every shard,
///   after a primary is killed (about one run in ten to fifteen of the failover test in
///   `tests/redis.rs`, before this change).
///   - Every call is watched. A value or an error reply (`OOM`, `READONLY`, `CLUSTERDOWN`,
///     also inside a pipeline) is an answer. A timeout, an I/O error, or a call that the
///     tracker's `store_timeout` cancelled after 50 ms or more is not. On a standalone Redis,
///     a refused or dropped connection counts neither way: `ConnectionManager` repairs those.
///   - When calls have gone unanswered for 5 s (from the first to the latest,
///     none answered between, however far apart: a silently dropped connection with sparse
///     calls, such as long retry delays, is replaced too), a new connection is made in the
///     background, on a task of its own (5 s at most, one at a time, none for a second after
///     a failed one); calls stay on the old connection until the new one is in. It then
///     replaces the old one (unless Redis answered on the old one meanwhile): a `warn` event,
///     [`connections_replaced`](RedisStore::connections_replaced) and
///     `sse_tracker_store_connections_replaced_total` (through the global recorder) count it.
///   - A Redis that answers connects but nothing else for 5 s (writes paused, overloaded)
///     gets a new connection too; `tests/redis.rs` pauses writes on both topologies and checks
///     that no latest id is lost. A new connection that gets no answer either is given twice
///     as long before the next replacement, up to 5 minutes. One that cannot even connect
///     (`CLIENT PAUSE ALL`, a frozen process) keeps the old connection.
///   - On a cluster the whole client is watched, not each node: a single node that goes
///     silent while the others answer is left to redis-rs's own retries and timeouts.
///   - A store made with [`from_manager`](RedisStore::from_manager) keeps the connection it
///     was given.
/// - **Failover.** While a cluster promotes a replica, writes to the failed primary's slots
///   fail (`CLUSTERDOWN`, `TRYAGAIN`, `READONLY`, timeouts): the tracker counts each failed call,
///   retries with back-off and catches up once the cluster answers; `tests/redis.rs` kills a
///   primary under load and checks that no latest id is lost. What matters then: the tracker's
///   `store_timeout` (5 s) and `retry` policy (how long writes keep being retried; given-up
///   streams are probed once per longest retry delay), and the cluster's `cluster-node-timeout`
///   (how long the failover takes).
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), Box<dyn std::error::Error>> {
/// use std::time::Duration;
/// use tower_sse_tracker::{SseTracker, store::RedisStore};
///
/// // No connection yet: this works whether or not Redis is up.
/// let store = RedisStore::new("redis://127.0.0.1:6379")?
///     .with_prefix("my-app")
///     .with_ttl(Duration::from_secs(3600));
/// let tracker = SseTracker::builder().store(store).build()?;
///
/// // A cluster: any of its nodes will do, the client finds the rest.
/// let cluster = RedisStore::cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"])?;
/// # let _ = (tracker, cluster);
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    connection: Arc<Connection>,
    prefix: String,
    ttl: Duration,
    save: Lua,
    save_node: Lua,
    append: Lua,
    read_log: Lua,
    log_max_events: usize,
    /// On a cluster: its slots and their primaries, as last read (`None`: to be read, at the
    /// next save).
    slots: Arc<std::sync::Mutex<Option<Arc<SlotMap>>>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("cluster", &self.is_cluster())
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &str, error: redis::RedisError) -> StoreError {
    StoreError::with_source(what.to_owned(), error)
}

/// Percent-encodes every byte but `A-Z a-z 0-9 - _ .`, so that `:` (the separator), `{` and
/// `}` (hash tags), `*`, `?`, `[` (glob characters), spaces and newlines never appear raw in a
/// key.
fn encode(out: &mut String, value: &str) {
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.') {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

/// The activity shard of `owner`: FNV-1a, fixed across processes and instances.
fn activity_shard(owner: &str) -> usize {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for b in owner.bytes() {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (hash % ACTIVITY_SHARDS as u64) as usize
}

impl RedisStore {
    fn with_client(client: Client, conn: Option<Conn>) -> Self {
        Self {
            connection: Arc::new(Connection::new(client, conn)),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            save: Lua::new(SAVE_SCRIPT),
            save_node: Lua::new(SAVE_NODE_SCRIPT),
            append: Lua::new(APPEND_SCRIPT),
            read_log: Lua::new(READ_LOG_SCRIPT),
            log_max_events: DEFAULT_LOG_MAX_EVENTS,
            slots: Arc::default(),
        }
    }

    /// A store for the standalone Redis at `url` (e.g. `redis://127.0.0.1:6379`), with prefix
    /// `sse-tracker` and time to live 24 hours. It does not connect (only a URL that
    /// cannot be parsed is an error): the first store call does, and calls fail until Redis
    /// answers.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| redis_error("invalid Redis URL", e))?;
        Ok(Self::with_client(Client::Standalone(client), None))
    }

    /// A store for the Redis Cluster that `urls` (one or more of its nodes) belong to. It does
    /// not connect (only URLs that cannot be parsed are an error): the first store call does.
    pub fn cluster<I, U>(urls: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let urls: Vec<String> = urls.into_iter().map(|u| u.as_ref().to_owned()).collect();
        let client = redis::cluster::ClusterClientBuilder::new(urls)
            .connection_timeout(TIMEOUT)
            .response_timeout(TIMEOUT)
            .retries(2)
            .build()
            .map_err(|e| redis_error("invalid Redis Cluster URLs", e))?;
        Ok(Self::with_client(Client::Cluster(Box::new(client)), None))
    }

    /// Like [`new`](Self::new), then waits for a first connection: an error when Redis cannot
    /// be reached now.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::new(url)?;
        store.connection.get().await?;
        Ok(store)
    }

    /// Like [`cluster`](Self::cluster), then waits for a first connection to the cluster.
    pub async fn connect_cluster<I, U>(urls: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = U>,
        U: AsRef<str>,
    {
        let store = Self::cluster(urls)?;
        store.connection.get().await?;
        Ok(store)
    }

    /// A store on an existing connection manager (standalone Redis).
    pub fn from_manager(conn: ConnectionManager) -> Self {
        Self::with_client(Client::Given, Some(Conn::Standalone(conn)))
    }

    /// Whether this store talks to a Redis Cluster.
    pub fn is_cluster(&self) -> bool {
        self.connection.is_cluster()
    }

    /// How many times this store (and its clones) replaced a connection on which Redis had
    /// stopped answering: calls unanswered for 5 s, none answered between.
    ///
    /// ```
    /// let store = tower_sse_tracker::store::RedisStore::new("redis://127.0.0.1:6379")?;
    /// assert_eq!(store.connections_replaced(), 0);
    /// # Ok::<(), tower_sse_tracker::store::StoreError>(())
    /// ```
    pub fn connections_replaced(&self) -> u64 {
        self.connection.replaced()
    }

    /// Namespaces every key under `prefix` (instances that share ids must share the prefix).
    /// `{` and `}` are replaced by `(` and `)`, so that the prefix never holds a hash tag.
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into().replace('{', "(").replace('}', ")");
        self
    }

    /// How long keys live after their last write (at least 1 ms).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// How many events a stream's replay log keeps at most, the oldest going first (at least
    /// 1; 1 024 by default). Its bytes are bounded by this times the tracker's bound on an
    /// event.
    pub fn with_log_max_events(mut self, max_events: usize) -> Self {
        self.log_max_events = max_events.max(1);
        self
    }

    /// The Redis key of a stream's latest id.
    pub fn key_of(&self, key: &StreamKey) -> String {
        self.stream_key(key, "id")
    }

    /// The Redis key of a stream's replay log (a Redis Stream, on the slot of the stream's
    /// latest id).
    pub fn log_key_of(&self, key: &StreamKey) -> String {
        self.stream_key(key, "log")
    }

    /// The key of `key`'s `kind` (`id`, `log`, `logmeta`): the owner is its hash tag.
    fn stream_key(&self, key: &StreamKey, kind: &str) -> String {
        let mut out = String::with_capacity(self.prefix.len() + kind.len() + 8 + 64);
        out.push_str(&self.prefix);
        out.push(':');
        out.push_str(kind);
        out.push(':');
        match &key.owner {
            Some(owner) => {
                out.push('{');
                encode(&mut out, owner.as_str());
                out.push_str("}:");
                encode(&mut out, key.stream.as_str());
            }
            // `~` is never left raw by `encode`: no owner's name can make it.
            None => {
                out.push_str("~:{");
                encode(&mut out, key.stream.as_str());
                out.push('}');
            }
        }
        out
    }

    /// The Redis key of `producer`'s lease.
    fn lease_key(&self, producer: &str) -> String {
        let mut out = format!("{}:lease:{{", self.prefix);
        encode(&mut out, producer);
        out.push('}');
        out
    }

    /// The Redis key of an activity shard (`0..ACTIVITY_SHARDS`).
    pub fn activity_key(&self, shard: usize) -> String {
        format!("{}:activity:{{{shard}}}", self.prefix)
    }

    /// The Redis key of the activity shard that holds `owner`.
    pub fn activity_key_of(&self, owner: &str) -> String {
        self.activity_key(activity_shard(owner))
    }

    /// Owners (sessions, with the default owner source) whose last activity is older than
    /// `idle_for`, oldest first (at most `limit`), across all activity shards.
    pub async fn idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> Result<Vec<Owner>, StoreError> {
        let before = unix_ms(SystemTime::now()).saturating_sub(idle_for.as_millis() as u64);
        let current = self.connection.get().await?;
        let shards: Vec<Vec<(String, f64)>> = futures_util::stream::iter(0..ACTIVITY_SHARDS)
            .map(|shard| {
                let key = self.activity_key(shard);
                let current = &current;
                async move {
                    current
                        .run(|mut conn| async move {
                            redis::cmd("ZRANGE")
                                .arg(key)
                                .arg("-inf")
                                .arg(before)
                                .arg("BYSCORE")
                                .arg("LIMIT")
                                .arg(0)
                                .arg(limit)
                                .arg("WITHSCORES")
                                .query_async::<Vec<(String, f64)>>(&mut conn)
                                .await
                        })
                        .await
                        .map_err(|e| redis_error("listing idle sessions", e))
                }
            })
            .buffer_unordered(ACTIVITY_SHARDS)
            // Every shard to its end (see `bounded`), then the first error.
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .collect::<Result<_, _>>()?;
        let mut all: Vec<(String, f64)> = shards.into_iter().flatten().collect();
        all.sort_by(|a, b| a.1.total_cmp(&b.1));
        Ok(all
            .into_iter()
            .take(limit)
            .filter_map(|(member, _)| Owner::new(&member).ok())
            .collect())
    }

    /// When `owner` was last active, if its activity shard still has it.
    pub async fn last_active(&self, owner: &str) -> Result<Option<SystemTime>, StoreError> {
        let key = self.activity_key_of(owner);
        let score: Option<f64> = self
            .connection
            .get()
            .await?
            .run(|mut conn| async move {
                redis::cmd("ZSCORE")
                    .arg(key)
                    .arg(owner)
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| redis_error("reading session activity", e))?;
        Ok(score.map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64)))
    }

    /// Writes the arguments that save `records` (keys with their entries) with [`SAVE_SCRIPT`]
    /// (the keys declared), or, for a call sent to a cluster node by its address, with
    /// [`SAVE_NODE_SCRIPT`] (the keys in `ARGV`).
    fn save_args(&self, cmd: &mut Cmd, records: &[(String, &SaveEntry)], node: bool) {
        let ttl = self.ttl.as_millis() as u64;
        let mut value = Vec::with_capacity(128);
        let mut value_arg = |cmd: &mut Cmd, entry: &SaveEntry| {
            value.clear();
            write_value(&mut value, entry);
            cmd.arg(&value[..]);
        };
        if node {
            cmd.arg(0).arg(ttl);
            for (key, entry) in records {
                cmd.arg(key.as_str());
                value_arg(cmd, entry);
            }
        } else {
            cmd.arg(records.len());
            for (key, _) in records {
                cmd.arg(key.as_str());
            }
            cmd.arg(ttl);
            for (_, entry) in records {
                value_arg(cmd, entry);
            }
        }
    }

    /// Runs `lua` with the arguments `args` writes (`numkeys`, the keys, the rest), sent by
    /// `routing` (`None`: by its keys, or to the standalone Redis): by the script's hash, and
    /// again with its text when Redis answers that it does not have the script (a restarted
    /// Redis, a new primary). `size` is the command's expected arguments and bytes. The
    /// arguments are written into the command, once per send.
    async fn eval<T: redis::FromRedisValue + Send>(
        &self,
        current: &Current,
        lua: &Lua,
        routing: Option<RoutingInfo>,
        size: (usize, usize),
        args: impl Fn(&mut Cmd),
    ) -> redis::RedisResult<T> {
        let mut text = false;
        loop {
            let mut cmd = Cmd::with_capacity(size.0 + 2, size.1 + 64);
            if text {
                cmd.arg("EVAL").arg(lua.text);
            } else {
                cmd.arg("EVALSHA").arg(&*lua.hash);
            }
            args(&mut cmd);
            let routing = routing.clone();
            let result = current
                .run(|conn| async move {
                    match (conn, routing) {
                        (Conn::Cluster(mut conn), Some(routing)) => {
                            // An error reply comes back as a value: made an error here.
                            let value = conn.route_command(cmd, routing).await?.extract_error()?;
                            redis::from_redis_value(value).map_err(Into::into)
                        }
                        (mut conn, _) => cmd.query_async(&mut conn).await,
                    }
                })
                .await;
            match result {
                Err(error)
                    if !text && error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) =>
                {
                    text = true;
                }
                result => return result,
            }
        }
    }

    /// Writes the arguments that append `appends` with [`APPEND_SCRIPT`], declaring the keys
    /// of the first stream when `declared` (to be routed by them).
    fn append_args(&self, cmd: &mut Cmd, appends: &[&LogAppend], declared: bool) {
        let keys = |append: &LogAppend| {
            (
                self.log_key_of(&append.key),
                self.stream_key(&append.key, "logmeta"),
            )
        };
        match appends.first() {
            Some(first) if declared => {
                let (log, meta) = keys(first);
                cmd.arg(2).arg(log).arg(meta);
            }
            _ => {
                cmd.arg(0);
            }
        }
        cmd.arg(self.ttl.as_millis() as u64)
            .arg(self.log_max_events);
        let mut id = Vec::with_capacity(64);
        for append in appends {
            let (log, meta) = keys(append);
            cmd.arg(log)
                .arg(meta)
                .arg(append.epoch)
                .arg(append.producer.as_str())
                .arg(match append.end {
                    None => "0",
                    Some(LogEnd::Finished) => "1",
                    Some(LogEnd::Stopped) => "2",
                });
            let kept = &append.events[append.events.len().saturating_sub(self.log_max_events)..];
            cmd.arg(kept.len());
            for event in kept {
                id.clear();
                match &event.id {
                    Some(event_id) => {
                        id.push(b'+');
                        id.extend_from_slice(event_id.as_str().as_bytes());
                    }
                    None => id.push(b'-'),
                }
                cmd.arg(event.offset).arg(&id[..]).arg(&event.bytes[..]);
            }
        }
    }

    /// `appends` split into script calls of at most [`MAX_EVENTS_PER_CALL`] events (a stream
    /// with more is a call of its own), so that no call holds Redis long. A stream's events
    /// beyond the log's bound are left out: the log would drop them at once (its next offset
    /// still moves past them, and a reader sees they are gone).
    fn append_calls<'a>(&self, appends: Vec<Placed<'a>>) -> Vec<Vec<Placed<'a>>> {
        let mut calls: Vec<Vec<Placed>> = Vec::new();
        let mut events = 0;
        for append in appends {
            let n = append.1.events.len().min(self.log_max_events);
            match calls.last_mut() {
                Some(call) if events + n <= MAX_EVENTS_PER_CALL => {
                    call.push(append);
                    events += n;
                }
                _ => {
                    calls.push(vec![append]);
                    events = n;
                }
            }
        }
        calls
    }

    /// Appends `appends` with one script call sent by `routing` (see [`eval`](Self::eval));
    /// notes the places in the batch of those refused in `refused`.
    async fn send_append(
        &self,
        current: &Current,
        placed: &[Placed<'_>],
        routing: Option<RoutingInfo>,
        refused: &Mutex<Vec<usize>>,
    ) -> redis::RedisResult<()> {
        let appends: Vec<&LogAppend> = placed.iter().map(|&(_, append)| append).collect();
        let appends = &appends[..];
        let events: usize = appends.iter().map(|a| a.events.len()).sum();
        let bytes: usize = appends
            .iter()
            .flat_map(|a| &a.events)
            .map(|e| e.bytes.len() + 48)
            .sum::<usize>()
            + appends.len() * 160;
        let size = (4 + 6 * appends.len() + 3 * events, bytes);
        let declared = routing.is_none() && matches!(current.conn, Conn::Cluster(_));
        let stale: Vec<usize> = self
            .eval(current, &self.append, routing, size, |cmd| {
                self.append_args(cmd, appends, declared)
            })
            .await?;
        let places = stale
            .into_iter()
            .filter_map(|k| Some(placed.get(k.checked_sub(1)?)?.0));
        lock(refused).extend(places);
        Ok(())
    }

    /// Appends `appends` in the calls of [`append_calls`](Self::append_calls), sent by
    /// `routing` concurrently. A call that reaches a key its node does not serve now (slots
    /// moving) sets `moved` rather than failing.
    async fn append_in_calls(
        &self,
        current: &Current,
        appends: Vec<Placed<'_>>,
        routing: Option<RoutingInfo>,
        moved: &AtomicBool,
        refused: &Mutex<Vec<usize>>,
    ) -> Result<(), StoreError> {
        let calls = self
            .append_calls(appends)
            .into_iter()
            .map(|chunk| {
                let routing = routing.clone();
                async move {
                    match self.send_append(current, &chunk, routing, refused).await {
                        Ok(()) => Ok(()),
                        Err(error) if slot_elsewhere(&error) => {
                            moved.store(true, Ordering::Relaxed);
                            Ok(())
                        }
                        Err(error) => Err(redis_error("appending to replay logs", error)),
                    }
                }
            })
            .collect();
        bounded(calls, MAX_CONCURRENT_CALLS).await
    }

    /// Appends `appends`, the streams of the cluster node at `address`, with one script call
    /// sent to it; while slots move (see [`save_node`](Self::save_node)), one call per stream,
    /// routed by its keys.
    async fn append_node(
        &self,
        current: &Current,
        address: Option<(String, u16)>,
        appends: Vec<Placed<'_>>,
        refused: &Mutex<Vec<usize>>,
    ) -> Result<(), StoreError> {
        if let Some((host, port)) = address {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            let moved = AtomicBool::new(false);
            self.append_in_calls(current, appends.clone(), Some(routing), &moved, refused)
                .await?;
            if !moved.load(Ordering::Relaxed) {
                return Ok(());
            }
            *lock(&self.slots) = None;
        }
        let calls = appends
            .iter()
            .map(|append| async move {
                self.send_append(current, &[*append], None, refused)
                    .await
                    .map_err(|e| redis_error("appending to replay logs", e))
            })
            .collect();
        bounded(calls, MAX_CONCURRENT_CALLS).await
    }

    /// Saves `records` with one call of the save script, sent by `routing` (see
    /// [`eval`](Self::eval)).
    async fn send_save(
        &self,
        current: &Current,
        records: &[(String, &SaveEntry)],
        routing: Option<RoutingInfo>,
    ) -> redis::RedisResult<u64> {
        let node = routing.is_some();
        let lua = if node { &self.save_node } else { &self.save };
        let bytes: usize = records
            .iter()
            .map(|(key, entry)| key.len() + entry.id.as_str().len() + 40)
            .sum();
        let size = (2 + 2 * records.len(), bytes);
        self.eval(current, lua, routing, size, |cmd| {
            self.save_args(cmd, records, node)
        })
        .await
    }

    /// Saves `batch` (keys of one slot on a cluster) with one script call.
    async fn save_one(
        &self,
        current: &Current,
        batch: &[(String, &SaveEntry)],
    ) -> Result<(), StoreError> {
        self.send_save(current, batch, None)
            .await
            .map_err(|e| redis_error("saving a batch of latest ids", e))?;
        Ok(())
    }

    /// Runs `call` once for each primary of the cluster, concurrently, with the items (each
    /// given with its slot) of the slots it serves and its address (`None`: a slot no primary
    /// serves, or a primary without an address). Should a call fail, the slot map is read
    /// again at the next one: the whole batch is then retried, and what the calls that
    /// succeeded wrote is refused or skipped as already there.
    async fn by_primary<T, F, Fut>(
        &self,
        current: &Current,
        items: impl IntoIterator<Item = (u16, T)>,
        call: F,
    ) -> Result<(), StoreError>
    where
        F: Fn(Option<(String, u16)>, Vec<T>) -> Fut,
        Fut: std::future::Future<Output = Result<(), StoreError>>,
    {
        let slots = self.slot_map(current).await?;
        let mut by_node: HashMap<Option<&Primary>, Vec<T>> = HashMap::new();
        for (slot, item) in items {
            by_node.entry(node_of(&slots, slot)).or_default().push(item);
        }
        let calls = by_node
            .into_iter()
            .map(|(node, items)| call(node.and_then(|node| node.address.clone()), items))
            .collect();
        let result = bounded(calls, MAX_CONCURRENT_CALLS).await;
        if result.is_err() {
            *lock(&self.slots) = None;
        }
        result
    }

    /// The cluster's slot map, read with `CLUSTER SLOTS` when the store has none.
    async fn slot_map(&self, current: &Current) -> Result<Arc<SlotMap>, StoreError> {
        if let Some(map) = lock(&self.slots).clone() {
            return Ok(map);
        }
        let reply: redis::Value = current
            .run(|mut conn| async move {
                redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut conn)
                    .await
            })
            .await
            .map_err(|e| redis_error("reading the cluster's slots", e))?;
        let map =
            Arc::new(parse_slots(&reply).ok_or_else(|| {
                StoreError::new("reading the cluster's slots: an unexpected reply")
            })?);
        *lock(&self.slots) = Some(map.clone());
        Ok(map)
    }

    /// Saves `batch`, keys of the cluster node at `address`, with one script call sent to that
    /// node. It declares no key, so no redirection applies to the call as a whole (one would
    /// make the script run where the first key is going, for keys that are not). When a key
    /// lies in a slot the node does not serve now (a reshard moved it, or is moving it), the
    /// script stops at that key, and the batch's keys go one call per slot instead, each
    /// redirected by the cluster client as its slot's keys tell it (`MOVED`, `ASK`,
    /// `TRYAGAIN`); the slot map is read again at the next save. Keys the first call wrote
    /// are then refused as not newer.
    async fn save_node(
        &self,
        current: &Current,
        address: Option<(String, u16)>,
        batch: Vec<(String, &SaveEntry)>,
    ) -> Result<(), StoreError> {
        if let Some((host, port)) = address {
            let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
            match self.send_save(current, &batch, Some(routing)).await {
                Ok(_written) => return Ok(()),
                Err(error) if slot_elsewhere(&error) => *lock(&self.slots) = None,
                Err(error) => return Err(redis_error("saving a batch of latest ids", error)),
            }
        }
        let mut by_slot: HashMap<u16, Vec<(String, &SaveEntry)>> = HashMap::new();
        for (key, entry) in batch {
            by_slot
                .entry(key_slot(key.as_bytes()))
                .or_default()
                .push((key, entry));
        }
        let calls = by_slot
            .values()
            .map(|records| self.save_one(current, records))
            .collect();
        bounded(calls, MAX_CONCURRENT_CALLS).await
    }

    /// Writes the activity of `shards`, whose keys the cluster node at `address` serves, in
    /// one pipeline sent to that node. When the node answers that a key is served elsewhere
    /// or moving (a reshard), the shards' commands go one by one instead, routed by the
    /// cluster client, which follows the redirections; the slot map is read again at the next write.
    /// The commands can run twice: `ZADD GT` keeps the latest activity, and the others
    /// expire.
    async fn touch_node(
        &self,
        current: &Current,
        address: Option<(String, u16)>,
        shards: Vec<(usize, Vec<&SessionActivity>)>,
    ) -> Result<(), StoreError> {
        let moved = if let Some((host, port)) = address {
            let mut pipe = redis::pipe();
            for (shard, sessions) in &shards {
                self.activity_commands(&mut pipe, *shard, sessions);
            }
            let count = pipe.len();
            let route = SingleNodeRoutingInfo::ByAddress { host, port };
            let result = current
                .run(|conn| async move {
                    match conn {
                        Conn::Cluster(mut conn) => {
                            // Error replies come back as values: made errors here.
                            for value in conn.route_pipeline(pipe, 0, count, route).await? {
                                value.extract_error()?;
                            }
                            Ok(())
                        }
                        Conn::Standalone(mut conn) => pipe.query_async::<()>(&mut conn).await,
                    }
                })
                .await;
            match result {
                Ok(()) => return Ok(()),
                Err(error) if redirected(&error) => {
                    *lock(&self.slots) = None;
                    Some(error)
                }
                Err(error) => return Err(redis_error("writing session activity", error)),
            }
        } else {
            None
        };
        let Some(moved) = moved else {
            // No address: one pipeline per shard (its keys share a slot), routed by the
            // cluster client.
            let calls = shards
                .into_iter()
                .map(|(shard, sessions)| {
                    let mut pipe = redis::pipe();
                    self.activity_commands(&mut pipe, shard, &sessions);
                    run_pipeline(current, pipe)
                })
                .collect();
            return bounded(calls, MAX_CONCURRENT_CALLS).await;
        };
        tracing::debug!(error = %moved, "activity keys moved: command by command");
        // Command by command: the cluster client follows `ASK` for a command, not inside a
        // pipeline. A shard's commands in order (its set exists before it is given a time to
        // live), the shards concurrently.
        let calls = shards
            .into_iter()
            .map(|(shard, sessions)| {
                let mut pipe = redis::pipe();
                self.activity_commands(&mut pipe, shard, &sessions);
                async move {
                    for cmd in pipe.cmd_iter() {
                        current
                            .run(|mut conn| async move { cmd.query_async::<()>(&mut conn).await })
                            .await
                            .map_err(|e| redis_error("writing session activity", e))?;
                    }
                    Ok(())
                }
            })
            .collect();
        bounded(calls, MAX_CONCURRENT_CALLS).await
    }

    /// Adds the activity commands of one shard to `pipe`.
    fn activity_commands(&self, pipe: &mut Pipeline, shard: usize, sessions: &[&SessionActivity]) {
        let key = self.activity_key(shard);
        let ttl_ms = self.ttl.as_millis() as u64;
        let zadd = pipe.cmd("ZADD").arg(&key).arg("GT");
        for activity in sessions {
            zadd.arg(unix_ms(activity.last_active))
                .arg(activity.owner.as_str());
        }
        pipe.ignore();
        let expired_before = unix_ms(SystemTime::now()).saturating_sub(ttl_ms);
        pipe.cmd("ZREMRANGEBYSCORE")
            .arg(&key)
            .arg("-inf")
            .arg(format!("({expired_before}"))
            .ignore();
        pipe.cmd("PEXPIRE").arg(&key).arg(ttl_ms).ignore();
    }
}

async fn run_pipeline(current: &Current, pipe: Pipeline) -> Result<(), StoreError> {
    current
        .run(|mut conn| async move { pipe.query_async::<()>(&mut conn).await })
        .await
        .map_err(|e| redis_error("writing session activity", e))
}

/// Whether a cluster node answered that a key is served elsewhere (`MOVED`, `ASK`) or is
/// moving (`TRYAGAIN`).
fn redirected(error: &redis::RedisError) -> bool {
    matches!(
        error.kind(),
        ErrorKind::Server(
            ServerErrorKind::Moved | ServerErrorKind::Ask | ServerErrorKind::TryAgain
        )
    )
}

/// Runs `calls` with at most `limit` in flight and returns the first error. After an error no
/// new call starts, but the running ones go on to their end rather than being cancelled: their
/// answers count for the connection's health (a cluster node that fails at once must not hide
/// the others' answers), and what they write is then refused as not newer when the batch is
/// retried.
async fn bounded<F>(calls: Vec<F>, limit: usize) -> Result<(), StoreError>
where
    F: std::future::Future<Output = Result<(), StoreError>>,
{
    let mut calls = calls.into_iter();
    let mut running = futures_util::stream::FuturesUnordered::new();
    running.extend(calls.by_ref().take(limit));
    let mut first_error = None;
    while let Some(result) = running.next().await {
        match result {
            Err(error) => {
                first_error.get_or_insert(error);
            }
            Ok(()) if first_error.is_none() => running.extend(calls.next()),
            Ok(()) => {}
        }
    }
    first_error.map_or(Ok(()), Err)
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_micros() as u64
}

fn parse_stored(value: &str) -> Option<StoredId> {
    let (time, rest) = value.split_once(':')?;
    let (sequence, id) = rest.split_once(':')?;
    Some(StoredId {
        id: EventId::new(id).ok()?,
        sequence: sequence.parse().ok()?,
        published_at: UNIX_EPOCH + Duration::from_micros(time.parse().ok()?),
    })
}

/// A replay log from the reply of [`READ_LOG_SCRIPT`]; `Err` names what was unexpected.
fn parse_log(reply: redis::Value) -> Result<Option<StoredLog>, &'static str> {
    use redis::Value;
    let bytes = |v: &Value| match v {
        Value::BulkString(b) => Some(b.clone()),
        Value::SimpleString(s) => Some(s.clone().into_bytes()),
        _ => None,
    };
    let number = |v: &Value| -> Option<u64> {
        match v {
            Value::Int(n) => u64::try_from(*n).ok(),
            _ => std::str::from_utf8(&bytes(v)?).ok()?.parse().ok(),
        }
    };
    let fields = match reply {
        Value::Nil | Value::Boolean(false) => return Ok(None),
        Value::Array(fields) if fields.len() == 5 => fields,
        _ => return Err("not a log"),
    };
    let epoch = number(&fields[0]).ok_or("an epoch that is not a number")?;
    let next = number(&fields[1]).ok_or("a next offset that is not a number")?;
    let end = match bytes(&fields[2]).as_deref() {
        Some(b"1") => Some(LogEnd::Finished),
        Some(b"2") => Some(LogEnd::Stopped),
        _ => None,
    };
    let producer = String::from_utf8(bytes(&fields[3]).ok_or("no producer")?)
        .map_err(|_| "a producer that is not UTF-8")?;
    let Value::Array(entries) = &fields[4] else {
        return Err("entries that are not a list");
    };
    let mut events = Vec::with_capacity(entries.len());
    for entry in entries {
        let Value::Array(parts) = entry else {
            return Err("an entry that is not a list");
        };
        let (Some(id), Some(Value::Array(pairs))) = (parts.first().and_then(&bytes), parts.get(1))
        else {
            return Err("an entry without an id or fields");
        };
        let offset = std::str::from_utf8(&id)
            .ok()
            .and_then(|id| id.strip_suffix("-1"))
            .and_then(|offset| offset.parse().ok())
            .ok_or("an entry id that is not an offset")?;
        let (mut event_id, mut body) = (None, None);
        for pair in pairs.chunks(2) {
            match (
                pair.first().and_then(&bytes).as_deref(),
                pair.get(1).and_then(&bytes),
            ) {
                (Some(b"i"), Some(value)) => event_id = Some(value),
                (Some(b"b"), Some(value)) => body = Some(value),
                _ => {}
            }
        }
        let id = match event_id.as_deref() {
            Some([b'-']) => None,
            Some([b'+', id @ ..]) => Some(
                std::str::from_utf8(id)
                    .ok()
                    .and_then(|id| EventId::new(id).ok())
                    .ok_or("an event id that is not valid")?,
            ),
            _ => return Err("an entry without its id field"),
        };
        let body = body.ok_or("an entry without its bytes")?;
        events.push(LogEvent::new(offset, id, Bytes::from(body)));
    }
    Ok(Some(StoredLog::new(epoch, producer, events, next, end)))
}

impl Store for RedisStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let current = self.connection.get().await?;
        if let Conn::Standalone(_) = current.conn {
            let records: Vec<_> = batch.iter().map(|e| (self.key_of(&e.key), e)).collect();
            return self.save_one(&current, &records).await;
        }
        // A cluster: one script call per primary, sent concurrently. Should one fail, the
        // whole batch is retried, on a map read again; the keys already written are then
        // refused as not newer.
        let records = batch.iter().map(|entry| {
            let key = self.key_of(&entry.key);
            (key_slot(key.as_bytes()), (key, entry))
        });
        // A slot no primary serves, or a primary with no address to reach it by: one call per
        // slot, routed by the cluster client.
        self.by_primary(&current, records, |address, records| {
            self.save_node(&current, address, records)
        })
        .await
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        let key = self.key_of(key);
        let value: Option<String> = self
            .connection
            .get()
            .await?
            .run(|mut conn| async move { redis::cmd("GET").arg(key).query_async(&mut conn).await })
            .await
            .map_err(|e| redis_error("loading a latest id", e))?;
        Ok(value.as_deref().and_then(parse_stored))
    }

    async fn touch_sessions(&self, sessions: &[SessionActivity]) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let mut by_shard: HashMap<usize, Vec<&SessionActivity>> = HashMap::new();
        for activity in sessions {
            by_shard
                .entry(activity_shard(activity.owner.as_str()))
                .or_default()
                .push(activity);
        }
        let current = self.connection.get().await?;
        if let Conn::Standalone(_) = current.conn {
            // One pipeline, one round trip.
            let mut pipe = redis::pipe();
            for (shard, sessions) in &by_shard {
                self.activity_commands(&mut pipe, *shard, sessions);
            }
            return run_pipeline(&current, pipe).await;
        }
        // A cluster: the shards of each primary in one pipeline, sent concurrently.
        let shards = by_shard.into_iter().map(|(shard, sessions)| {
            (
                key_slot(self.activity_key(shard).as_bytes()),
                (shard, sessions),
            )
        });
        self.by_primary(&current, shards, |address, shards| {
            self.touch_node(&current, address, shards)
        })
        .await
    }

    async fn append_logs(&self, batch: &[LogAppend]) -> Result<AppendReport, StoreError> {
        check_appends(batch)?;
        if batch.is_empty() {
            return Ok(AppendReport::new());
        }
        let current = self.connection.get().await?;
        let refused = Mutex::new(Vec::new());
        if let Conn::Standalone(_) = current.conn {
            let moved = AtomicBool::new(false);
            let placed = batch.iter().enumerate().collect();
            self.append_in_calls(&current, placed, None, &moved, &refused)
                .await?;
        } else {
            // A cluster: one script call per primary, as for saves.
            let appends = batch.iter().enumerate().map(|(at, append)| {
                (
                    key_slot(self.log_key_of(&append.key).as_bytes()),
                    (at, append),
                )
            });
            self.by_primary(&current, appends, |address, appends| {
                self.append_node(&current, address, appends, &refused)
            })
            .await?;
        }
        // A stream sent again (slots moving) may be named twice.
        let mut refused = refused.into_inner().unwrap_or_else(|e| e.into_inner());
        refused.sort_unstable();
        refused.dedup();
        Ok(AppendReport::refusing(refused))
    }

    async fn read_log(
        &self,
        key: &StreamKey,
        after: Option<u64>,
        limit: usize,
    ) -> Result<Option<StoredLog>, StoreError> {
        let (log, meta) = (self.log_key_of(key), self.stream_key(key, "logmeta"));
        let from = after.map_or_else(|| "-".to_owned(), |after| format!("({after}-1"));
        let current = self.connection.get().await?;
        let reply: redis::Value = self
            .eval(&current, &self.read_log, None, (6, 256), |cmd| {
                cmd.arg(2)
                    .arg(&log)
                    .arg(&meta)
                    .arg(&from)
                    .arg(limit.min(self.log_max_events));
            })
            .await
            .map_err(|e| redis_error("reading a replay log", e))?;
        parse_log(reply).map_err(|what| StoreError::new(format!("reading a replay log: {what}")))
    }

    async fn renew_lease(&self, producer: &str, ttl: Duration) -> Result<(), StoreError> {
        let key = self.lease_key(producer);
        // At least 1 ms, at most ten years (Redis refuses times past its range).
        let ttl = ttl.clamp(
            Duration::from_millis(1),
            Duration::from_secs(10 * 365 * 24 * 3600),
        );
        let ttl = ttl.as_millis() as u64;
        self.connection
            .get()
            .await?
            .run(|mut conn| async move {
                redis::cmd("SET")
                    .arg(key)
                    .arg(1)
                    .arg("PX")
                    .arg(ttl)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await
            .map_err(|e| redis_error("renewing a lease", e))
    }

    async fn lease_alive(&self, producer: &str) -> Result<bool, StoreError> {
        let key = self.lease_key(producer);
        self.connection
            .get()
            .await?
            .run(|mut conn| async move {
                redis::cmd("EXISTS")
                    .arg(key)
                    .query_async::<bool>(&mut conn)
                    .await
            })
            .await
            .map_err(|e| redis_error("reading a lease", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::cluster_routing::Slot;

    #[test]
    fn a_keys_slot_is_the_one_redis_computes() {
        for key in [
            "plain",
            "sse:id:{owner-1}:GET%20%2F",
            "{}empty-tag",
            "a{b}c{d}",
            "{unclosed",
            "x}{y}",
            "",
        ] {
            assert_eq!(
                Slot::new(key_slot(key.as_bytes())),
                Some(Slot::for_key(key)),
                "{key}"
            );
        }
        assert_eq!(key_slot(b"123456789"), 0x31C3, "CRC16/XMODEM check value");
    }

    #[test]
    fn a_slot_map_names_the_primary_of_each_slot() {
        use redis::Value;
        let range = |start, end, port| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                Value::Array(vec![
                    Value::BulkString(b"127.0.0.1".to_vec()),
                    Value::Int(port),
                    Value::BulkString(b"id".to_vec()),
                ]),
            ])
        };
        let map = parse_slots(&Value::Array(vec![
            range(5461, 10922, 7001),
            range(0, 5460, 7000),
            range(10923, 16383, 7002),
        ]))
        .unwrap();
        let address = |slot| node_of(&map, slot).and_then(|p| p.address.clone());
        assert_eq!(address(0), Some(("127.0.0.1".to_owned(), 7000)));
        assert_eq!(address(5461), Some(("127.0.0.1".to_owned(), 7001)));
        assert_eq!(address(16383), Some(("127.0.0.1".to_owned(), 7002)));
        let unknown = parse_slots(&Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(16383),
            Value::Array(vec![
                Value::Nil,
                Value::Int(6379),
                Value::BulkString(b"n1".to_vec()),
            ]),
        ])]))
        .unwrap();
        assert_eq!(
            node_of(&unknown, 7).unwrap().address,
            None,
            "an endpoint the cluster does not give: no address, calls per slot"
        );
        let partial = parse_slots(&Value::Array(vec![range(0, 99, 7000)])).unwrap();
        assert_eq!(node_of(&partial, 100), None, "a slot no primary serves");
        assert!(parse_slots(&Value::Int(1)).is_none());
    }

    #[test]
    fn keys_escape_everything_that_could_reach_outside_their_place() {
        let mut out = String::new();
        encode(&mut out, "a:b*c d\né[x]?{t}");
        assert_eq!(out, "a%3Ab%2Ac%20d%0A%C3%A9%5Bx%5D%3F%7Bt%7D");
        let mut plain = String::new();
        encode(&mut plain, "Session-1_2.3");
        assert_eq!(plain, "Session-1_2.3");
    }

    #[test]
    fn an_owners_streams_share_a_slot_and_sessionless_streams_are_spread() {
        let store = RedisStore::new("redis://127.0.0.1:1")
            .unwrap()
            .with_prefix("p{x}");
        let k = |o: &str, s: &str| store.key_of(&StreamKey::try_new(o, s).unwrap());
        assert_eq!(k("s{1}", "GET /a"), "p(x):id:{s%7B1%7D}:GET%20%2Fa");
        assert_eq!(
            Slot::for_key(k("s1", "GET /a")),
            Slot::for_key(k("s1", "POST /b"))
        );
        let unowned = |s: &str| store.key_of(&StreamKey::try_unowned(s).unwrap());
        assert_eq!(unowned("abc"), "p(x):id:~:{abc}");
        let slots: std::collections::HashSet<Slot> = (0..100)
            .map(|i| Slot::for_key(unowned(&format!("stream-{i}"))))
            .collect();
        assert!(slots.len() > 90, "sessionless streams spread over slots");
        let shards: std::collections::HashSet<Slot> = (0..ACTIVITY_SHARDS)
            .map(|n| Slot::for_key(store.activity_key(n)))
            .collect();
        assert_eq!(
            shards.len(),
            ACTIVITY_SHARDS,
            "activity shards on distinct slots"
        );
        assert_eq!(activity_shard("s1"), activity_shard("s1"));
    }

    #[test]
    fn stored_values_parse_back() {
        let stored = parse_stored("1732790000000123:42:id:with:colons").unwrap();
        assert_eq!(stored.sequence, 42);
        assert_eq!(stored.id, "id:with:colons");
        assert_eq!(unix_us(stored.published_at), 1_732_790_000_000_123);
        assert!(parse_stored("garbage").is_none());
    }
}
