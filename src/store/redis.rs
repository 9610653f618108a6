//! [`RedisStore`]: a store shared by several server instances (feature `redis`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::Script;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use tokio::sync::OnceCell;

use super::{SaveEntry, SessionActivity, Store, StoreError, StoredId};
use crate::key::{EventId, Owner, StreamKey};

/// Default key prefix of [`RedisStore`].
pub const DEFAULT_PREFIX: &str = "sse-tracker";
/// Default time to live of the keys written by [`RedisStore`]: 24 hours.
pub const DEFAULT_TTL: Duration = Duration::from_secs(24 * 3600);

/// Saves a batch in one round trip, atomically. A key's value is `time:sequence:id` (time in
/// Unix microseconds); an entry replaces it only when its `(time, sequence)` is higher, so
/// neither a late retry nor another instance's older id can overwrite a newer one. Numbers are
/// compared with `tonumber` (exact below 2^53) but written back as the strings they came as
/// (Lua would print large numbers in exponent form).
const SAVE_SCRIPT: &str = r#"
local ttl = ARGV[1]
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
"#;

/// A [`Store`] on Redis, for several server instances behind one load balancer: a client that
/// reconnects to another instance with `Last-Event-ID` can be resumed there, because
/// [`SseTracker::resolve`](crate::SseTracker::resolve) falls back to this store.
///
/// - **Round trips.** A batch is saved in one round trip (a Lua script); a batch of activity
///   marks in one pipeline.
/// - **Atomic, newest wins.** The script compares each key's stored `(time, sequence)` with the
///   entry's and writes only newer ones, so two instances writing one key, or a late retry,
///   never replace a newer id with an older one.
/// - **Key layout.** `{prefix}:id:{session}:{stream}` holds `time:sequence:id` (time in Unix
///   microseconds);
///   `{prefix}:activity` is a sorted set of session ids scored by last activity (Unix ms).
///   Session ids and stream names are percent-encoded (every byte but `A-Z a-z 0-9 - _ .`), so
///   no value can reach outside its place in the key or form another key.
/// - **Expiry.** Id keys expire `ttl` after their last write; activity older than `ttl` is
///   removed from the sorted set at each activity write, and the set itself expires `ttl`
///   after the last one.
/// - **Start-up and reconnects.** [`RedisStore::new`] does not connect: the first call does,
///   so an application starts and serves while Redis is down (its writes fail and the
///   tracker's worker retries them with back-off until Redis is up). The connection is a
///   redis-rs `ConnectionManager`, which reconnects by itself. [`RedisStore::connect`] waits
///   for a first connection instead, for applications that would rather not start without
///   Redis.
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
/// # let _ = tracker;
/// # Ok(())
/// # }
/// ```
#[derive(Clone)]
pub struct RedisStore {
    client: Option<redis::Client>,
    conn: Arc<OnceCell<ConnectionManager>>,
    prefix: String,
    ttl: Duration,
    save: Script,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn redis_error(what: &str, error: redis::RedisError) -> StoreError {
    StoreError::with_source(what.to_owned(), error)
}

/// Percent-encodes every byte but `A-Z a-z 0-9 - _ .`, so that `:` (the separator), `*`, `?`,
/// `[` (glob characters), spaces and newlines never appear raw in a key.
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

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(Some(Duration::from_secs(2)))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

impl RedisStore {
    /// A store for the Redis at `url` (e.g. `redis://127.0.0.1:6379`), with prefix
    /// [`DEFAULT_PREFIX`] and time to live [`DEFAULT_TTL`]. It does not connect (only a URL that
    /// cannot be parsed is an error): the first store call does, and calls fail until Redis
    /// answers. Connecting and requests time out after 2 s.
    pub fn new(url: &str) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| redis_error("invalid Redis URL", e))?;
        Ok(Self {
            client: Some(client),
            conn: Arc::new(OnceCell::new()),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            save: Script::new(SAVE_SCRIPT),
        })
    }

    /// Like [`new`](Self::new), then waits for a first connection: an error when Redis cannot
    /// be reached now.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        let store = Self::new(url)?;
        store.connection().await?;
        Ok(store)
    }

    /// A store on an existing connection manager.
    pub fn from_manager(conn: ConnectionManager) -> Self {
        Self {
            client: None,
            conn: Arc::new(OnceCell::new_with(Some(conn))),
            prefix: DEFAULT_PREFIX.to_owned(),
            ttl: DEFAULT_TTL,
            save: Script::new(SAVE_SCRIPT),
        }
    }

    /// The connection, made on first use. A failed attempt is an error; the next call tries
    /// again.
    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let conn = self
            .conn
            .get_or_try_init(|| async {
                let client = self
                    .client
                    .clone()
                    .ok_or_else(|| StoreError::new("no Redis client"))?;
                ConnectionManager::new_with_config(client, manager_config())
                    .await
                    .map_err(|e| redis_error("connecting to Redis", e))
            })
            .await?;
        Ok(conn.clone())
    }

    /// Namespaces every key under `prefix` (instances that share ids must share the prefix).
    pub fn with_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long keys live after their last write (at least 1 ms).
    pub fn with_ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl.max(Duration::from_millis(1));
        self
    }

    /// The Redis key of a stream's latest id.
    pub fn key_of(&self, key: &StreamKey) -> String {
        let mut out = String::with_capacity(self.prefix.len() + 8 + 64);
        out.push_str(&self.prefix);
        out.push_str(":id:");
        match &key.owner {
            Some(owner) => encode(&mut out, owner.as_str()),
            // `~` is never left raw by `encode`: no owner's name can make it.
            None => out.push('~'),
        }
        out.push(':');
        encode(&mut out, key.stream.as_str());
        out
    }

    /// The Redis key of the activity sorted set.
    pub fn activity_key(&self) -> String {
        format!("{}:activity", self.prefix)
    }

    /// Owners (sessions, with the default owner source) whose last activity is older than
    /// `idle_for`, oldest first (at most `limit`).
    pub async fn idle_sessions(
        &self,
        idle_for: Duration,
        limit: usize,
    ) -> Result<Vec<Owner>, StoreError> {
        let before = unix_ms(SystemTime::now()).saturating_sub(idle_for.as_millis() as u64);
        let mut conn = self.connection().await?;
        let members: Vec<String> = redis::cmd("ZRANGE")
            .arg(self.activity_key())
            .arg("-inf")
            .arg(before)
            .arg("BYSCORE")
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("listing idle sessions", e))?;
        Ok(members.iter().filter_map(|m| Owner::new(m).ok()).collect())
    }

    /// When `owner` was last active, if the activity set still has it.
    pub async fn last_active(&self, owner: &str) -> Result<Option<SystemTime>, StoreError> {
        let mut conn = self.connection().await?;
        let score: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.activity_key())
            .arg(owner)
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("reading session activity", e))?;
        Ok(score.map(|ms| UNIX_EPOCH + Duration::from_millis(ms as u64)))
    }
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

impl Store for RedisStore {
    async fn save(&self, batch: &[SaveEntry]) -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let mut invocation = self.save.prepare_invoke();
        invocation.arg(self.ttl.as_millis() as u64);
        for entry in batch {
            invocation
                .key(self.key_of(&entry.key))
                .arg(unix_us(entry.published_at))
                .arg(entry.sequence)
                .arg(entry.id.as_str());
        }
        let mut conn = self.connection().await?;
        let _written: u64 = invocation
            .invoke_async(&mut conn)
            .await
            .map_err(|e| redis_error("saving a batch of latest ids", e))?;
        Ok(())
    }

    async fn load(&self, key: &StreamKey) -> Result<Option<StoredId>, StoreError> {
        let mut conn = self.connection().await?;
        let value: Option<String> = redis::cmd("GET")
            .arg(self.key_of(key))
            .query_async(&mut conn)
            .await
            .map_err(|e| redis_error("loading a latest id", e))?;
        Ok(value.as_deref().and_then(parse_stored))
    }

    async fn touch_sessions(&self, sessions: &[SessionActivity]) -> Result<(), StoreError> {
        if sessions.is_empty() {
            return Ok(());
        }
        let key = self.activity_key();
        let ttl_ms = self.ttl.as_millis() as u64;
        let mut pipe = redis::pipe();
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
        let mut conn = self.connection().await?;
        pipe.query_async::<()>(&mut conn)
            .await
            .map_err(|e| redis_error("writing session activity", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_everything_that_could_reach_outside_their_place() {
        let mut out = String::new();
        encode(&mut out, "a:b*c d\né[x]?");
        assert_eq!(out, "a%3Ab%2Ac%20d%0A%C3%A9%5Bx%5D%3F");
        let mut plain = String::new();
        encode(&mut plain, "Session-1_2.3");
        assert_eq!(plain, "Session-1_2.3");
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
