//! The connection of a [`RedisStore`](super::RedisStore): made on first use, watched on every
//! call, and replaced when Redis has stopped answering on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, Pipeline, RedisFuture, Value};
use tokio::sync::oneshot;

use crate::store::StoreError;
use crate::sync::lock;

/// Connecting and each request time out after this long.
pub(super) const TIMEOUT: Duration = Duration::from_secs(2);
/// A whole connect (on a cluster: the seed nodes, the slot map and every node) times out after
/// this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// After a failed connect, no other starts before this long.
const CONNECT_BACKOFF: Duration = Duration::from_secs(1);
/// A connection on which calls have kept going unanswered for this long (the first and the
/// latest unanswered call this far apart, and no call answered between them, however far
/// apart they came) is replaced by a new one.
pub(crate) const STUCK_AFTER: Duration = Duration::from_secs(5);
/// A call dropped by its caller sooner than this says nothing about Redis (an HTTP client that
/// went away): it counts neither way. A `store_timeout` must be longer for a stuck connection
/// to be noticed.
const DROPPED_FLOOR: Duration = Duration::from_millis(50);
/// A connection that replaced a stuck one and never got an answer either is given twice as
/// long before it is replaced in turn, up to this (a Redis that answers connects but no
/// writes, paused for minutes, is not reconnected to every 5 s).
const MAX_STUCK_AFTER: Duration = Duration::from_secs(300);

pub(super) enum Client {
    Standalone(redis::Client),
    Cluster(Box<ClusterClient>),
    /// A connection given ready-made.
    Given,
}

/// A connection to either topology.
#[derive(Clone)]
pub(super) enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

fn manager_config() -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT))
        .set_number_of_retries(2)
        .set_max_delay(Duration::from_secs(1))
}

/// How to reach Redis, and the connection in use.
pub(super) struct Connection {
    client: Client,
    /// A std mutex: held only to read or swap, never across an `.await`.
    state: Mutex<State>,
    /// Connections replaced because Redis had stopped answering on them.
    replaced: AtomicU64,
}

#[derive(Default)]
struct State {
    /// `None` until the first connect succeeds.
    current: Option<Current>,
    /// A connect in progress. It runs as a task of its own, so that no caller's cancellation
    /// (the tracker's `store_timeout`) stops it, and every caller waiting for it gets its one
    /// result.
    connecting: Option<Connecting>,
    /// The last connect failed: no new one before the instant, and its error.
    failed: Option<(Instant, Arc<StoreError>)>,
}

type Connecting = Shared<BoxFuture<'static, ConnectResult>>;

/// The connection in use, and whether Redis still answers on it.
#[derive(Clone)]
pub(super) struct Current {
    pub(super) conn: Conn,
    health: Arc<Health>,
}

impl Connection {
    pub(super) fn new(client: Client, conn: Option<Conn>) -> Self {
        Self {
            client,
            state: Mutex::new(State {
                current: conn.map(|conn| Current::new(conn, STUCK_AFTER)),
                ..State::default()
            }),
            replaced: AtomicU64::new(0),
        }
    }

    pub(super) fn is_cluster(&self) -> bool {
        // A connection given ready-made is always a standalone `ConnectionManager`.
        matches!(self.client, Client::Cluster(_))
    }

    pub(super) fn replaced(&self) -> u64 {
        self.replaced.load(Ordering::Relaxed)
    }

    /// The connection for the next call.
    ///
    /// - The current one while Redis answers on it (or when it was given ready-made).
    /// - None yet: waits for a connect (started here unless one is running; an error at once
    ///   during [`CONNECT_BACKOFF`] after a failed one).
    /// - Stuck ([`STUCK_AFTER`]): starts a connect in the background (unless one is running
    ///   or the last failed less than [`CONNECT_BACKOFF`] ago) and stays on the stuck one
    ///   meanwhile: Redis may yet answer on it, and no call waits for a connect.
    pub(super) async fn get(self: &Arc<Self>) -> Result<Current, StoreError> {
        let (connecting, start) = {
            let mut state = lock(&self.state);
            let replaceable = !matches!(self.client, Client::Given);
            if let Some(current) = &state.current
                && (!replaceable || current.health.stuck_for().is_none())
            {
                return Ok(current.clone());
            }
            let (connecting, start) = match &state.connecting {
                Some(running) => (running.clone(), None),
                None => {
                    if let Some((next_attempt, error)) = &state.failed
                        && Instant::now() < *next_attempt
                    {
                        return match &state.current {
                            Some(stuck) => Ok(stuck.clone()),
                            None => Err(not_connected(error.clone())),
                        };
                    }
                    let (result, connecting) = connect_result();
                    state.connecting = Some(connecting.clone());
                    (connecting, Some(result))
                }
            };
            match &state.current {
                Some(stuck) => (Err(stuck.clone()), start),
                None => (Ok(connecting), start),
            }
        };
        // Spawned with the lock released: a runtime that has shut down drops the task inside
        // `spawn`, and the task's drop installs an error, which takes the lock.
        if let Some(result) = start {
            self.spawn_connect(result);
        }
        match connecting {
            // Stuck: the calls stay on it while the new connection is made.
            Err(stuck) => Ok(stuck),
            Ok(connecting) => connecting.await.map_err(not_connected),
        }
    }

    /// Starts a connect on a task of its own, which installs its result and sends it to
    /// `result`, also when the task is dropped before its end (its runtime shut down, or
    /// refused to run it) or the connect panics.
    fn spawn_connect(self: &Arc<Self>, result: oneshot::Sender<ConnectResult>) {
        let mut installer = Installer {
            connection: self.clone(),
            result: Some(result),
        };
        tokio::spawn(async move {
            let connected = tokio::time::timeout(CONNECT_TIMEOUT, installer.connection.connect())
                .await
                .unwrap_or_else(|_| {
                    Err(StoreError::new(format!(
                        "connecting to Redis took longer than {CONNECT_TIMEOUT:?}"
                    )))
                });
            installer.install(connected);
        });
    }

    async fn connect(&self) -> Result<Conn, StoreError> {
        match &self.client {
            Client::Standalone(client) => {
                ConnectionManager::new_with_config(client.clone(), manager_config())
                    .await
                    .map(Conn::Standalone)
                    .map_err(|e| StoreError::with_source("connecting to Redis", e))
            }
            Client::Cluster(client) => client
                .get_async_connection()
                .await
                .map(Conn::Cluster)
                .map_err(|e| StoreError::with_source("connecting to the Redis Cluster", e)),
            Client::Given => Err(StoreError::new("no Redis client")),
        }
    }

    /// Installs the result of a connect. A new connection replaces a stuck one, unless Redis
    /// answered on the stuck one meanwhile (then the new one is dropped).
    fn install(&self, result: Result<Conn, StoreError>) -> Result<Current, Arc<StoreError>> {
        let mut replaced = None;
        let installed = {
            let mut state = lock(&self.state);
            state.connecting = None;
            match result {
                Ok(conn) => {
                    state.failed = None;
                    match &state.current {
                        Some(old) if old.health.stuck_for().is_none() => Ok(old.clone()),
                        old => {
                            let stuck_after = old
                                .as_ref()
                                .map_or(STUCK_AFTER, |old| old.health.next_stuck_after());
                            replaced = old
                                .as_ref()
                                .map(|old| (old.health.unanswered_for(), stuck_after));
                            let current = Current::new(conn, stuck_after);
                            state.current = Some(current.clone());
                            Ok(current)
                        }
                    }
                }
                Err(error) => {
                    let error = Arc::new(error);
                    state.failed = Some((Instant::now() + CONNECT_BACKOFF, error.clone()));
                    Err(error)
                }
            }
        };
        // Outside the lock: subscribers and recorders are the application's code.
        if let Some((unanswered_for, stuck_after)) = replaced {
            self.replaced.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::STORE_CONNECTIONS_REPLACED_TOTAL).increment(1);
            tracing::warn!(
                ?unanswered_for,
                next_stuck_after = ?stuck_after,
                "replaced a Redis connection on which calls had gone unanswered"
            );
        }
        if let Err(error) = &installed {
            tracing::debug!(%error, "connecting to Redis failed");
        }
        installed
    }
}

type ConnectResult = Result<Current, Arc<StoreError>>;

/// The two ends of one connect: where the connect task sends its result, and the shared
/// future every waiting caller awaits (an error if the task ends without sending).
fn connect_result() -> (oneshot::Sender<ConnectResult>, Connecting) {
    let (tx, rx) = oneshot::channel();
    let connecting = async move {
        rx.await.unwrap_or_else(|_| {
            Err(Arc::new(StoreError::new(
                "the task connecting to Redis ended without a result",
            )))
        })
    }
    .boxed()
    .shared();
    (tx, connecting)
}

/// Installs the result of the connect task, or an error if the task ends without one.
struct Installer {
    connection: Arc<Connection>,
    result: Option<oneshot::Sender<ConnectResult>>,
}

impl Installer {
    fn install(&mut self, connected: Result<Conn, StoreError>) {
        let installed = self.connection.install(connected);
        if let Some(result) = self.result.take() {
            let _ = result.send(installed);
        }
    }
}

impl Drop for Installer {
    fn drop(&mut self) {
        if self.result.is_some() {
            self.install(Err(StoreError::new(
                "the connect to Redis ended before it finished (its runtime shut down?)",
            )));
        }
    }
}

fn not_connected(error: Arc<StoreError>) -> StoreError {
    StoreError::with_source("not connected to Redis", error)
}

impl Current {
    fn new(conn: Conn, stuck_after: Duration) -> Self {
        Self {
            conn,
            health: Arc::new(Health::new(stuck_after)),
        }
    }

    /// Runs one call on this connection, and records whether Redis answered it.
    pub(super) async fn run<T, F>(&self, call: impl FnOnce(Conn) -> F) -> redis::RedisResult<T>
    where
        F: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let watch = CallWatch::new(&self.health);
        let result = call(self.conn.clone()).await;
        let cluster = matches!(self.conn, Conn::Cluster(_));
        watch.settle(result.as_ref().err().map(|e| outcome(e, cluster)));
        result
    }
}

/// What a call says about its connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    /// Redis answered: with a value, or with an error reply.
    Answered,
    /// No answer: a timeout, or a failure to reach Redis that the client does not repair.
    Unanswered,
    /// Nothing either way.
    Neither,
}

/// The outcome of a call that failed with `error`.
///
/// - Error replies (`OOM`, `READONLY`, `CLUSTERDOWN`, to a command or inside a pipeline) and
///   replies of an unexpected type are answers.
/// - On a standalone Redis, a refused or dropped connection is neither: `ConnectionManager`
///   reconnects on those by itself, and a Redis that is down is not a stuck connection.
/// - Anything else (a timeout, an I/O error, no connection to a cluster node) is no answer.
fn outcome(error: &redis::RedisError, cluster: bool) -> Outcome {
    // `code` is `None` for a pipeline's errors: those are replies too.
    if error.code().is_some()
        || error.clone().into_server_errors().is_some()
        || matches!(
            error.kind(),
            redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse
        )
    {
        Outcome::Answered
    } else if !cluster && (error.is_connection_refusal() || error.is_connection_dropped()) {
        Outcome::Neither
    } else {
        Outcome::Unanswered
    }
}

/// Whether calls on one connection still get answers from Redis.
struct Health {
    born: Instant,
    /// Milliseconds after `born` at which the first call since the last answer ended
    /// unanswered; [`ANSWERED`] while the last call that ended was answered.
    unanswered_since: AtomicU64,
    /// Milliseconds after `born` at which the latest unanswered call ended.
    last_unanswered: AtomicU64,
    /// How long calls may go unanswered before the connection is stuck, in milliseconds:
    /// [`STUCK_AFTER`], or more for a connection that replaced one that never answered.
    stuck_after_ms: AtomicU64,
    /// Whether any call on this connection was answered.
    ever_answered: AtomicBool,
}

const ANSWERED: u64 = u64::MAX;

impl Health {
    fn new(stuck_after: Duration) -> Self {
        Self {
            born: Instant::now(),
            unanswered_since: AtomicU64::new(ANSWERED),
            last_unanswered: AtomicU64::new(0),
            stuck_after_ms: AtomicU64::new(stuck_after.as_millis() as u64),
            ever_answered: AtomicBool::new(false),
        }
    }

    fn answered(&self) {
        self.unanswered_since.store(ANSWERED, Ordering::Relaxed);
        self.stuck_after_ms
            .store(STUCK_AFTER.as_millis() as u64, Ordering::Relaxed);
        self.ever_answered.store(true, Ordering::Relaxed);
    }

    fn unanswered(&self) {
        self.unanswered_at(self.born.elapsed().as_millis() as u64);
    }

    fn unanswered_at(&self, now_ms: u64) {
        self.last_unanswered.fetch_max(now_ms, Ordering::Relaxed);
        // Only the first unanswered call since the last answer sets the start. Only an answer
        // ends the count, not a quiet spell between calls: a connection that a firewall
        // dropped silently overnight answers no call however sparse the calls are (a retry
        // policy with delays of minutes, no activity writes). The price: two unanswered calls
        // hours apart, none answered between, replace a connection that may have been fine,
        // which costs one reconnect in the background.
        let _ = self.unanswered_since.compare_exchange(
            ANSWERED,
            now_ms,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// From the first to the latest unanswered call, no answer between; zero when the last
    /// call that ended was answered.
    fn unanswered_for(&self) -> Duration {
        let since = self.unanswered_since.load(Ordering::Relaxed);
        if since == ANSWERED {
            return Duration::ZERO;
        }
        let last = self.last_unanswered.load(Ordering::Relaxed);
        Duration::from_millis(last.saturating_sub(since))
    }

    /// [`unanswered_for`](Self::unanswered_for), if that is long enough to call this
    /// connection stuck.
    fn stuck_for(&self) -> Option<Duration> {
        let stuck_after = Duration::from_millis(self.stuck_after_ms.load(Ordering::Relaxed));
        Some(self.unanswered_for()).filter(|d| *d >= stuck_after)
    }

    /// How long the connection that replaces this one may go unanswered: [`STUCK_AFTER`] if
    /// this one was ever answered, else twice this one's, up to [`MAX_STUCK_AFTER`].
    fn next_stuck_after(&self) -> Duration {
        if self.ever_answered.load(Ordering::Relaxed) {
            return STUCK_AFTER;
        }
        let ms = self
            .stuck_after_ms
            .load(Ordering::Relaxed)
            .saturating_mul(2);
        Duration::from_millis(ms).min(MAX_STUCK_AFTER)
    }
}

/// Watches one call. A call dropped before its end (the tracker's `store_timeout`) counts as
/// unanswered once it has waited [`DROPPED_FLOOR`].
struct CallWatch<'a> {
    health: &'a Health,
    started: Instant,
    settled: bool,
}

impl<'a> CallWatch<'a> {
    fn new(health: &'a Health) -> Self {
        Self {
            health,
            started: Instant::now(),
            settled: false,
        }
    }

    /// The call ended: `None` when it succeeded, else what its error says.
    fn settle(mut self, error: Option<Outcome>) {
        self.settled = true;
        match error.unwrap_or(Outcome::Answered) {
            Outcome::Answered => self.health.answered(),
            Outcome::Unanswered => self.health.unanswered(),
            Outcome::Neither => {}
        }
    }
}

impl Drop for CallWatch<'_> {
    fn drop(&mut self) {
        if !self.settled && self.started.elapsed() >= DROPPED_FLOOR {
            self.health.unanswered();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redis::{ErrorKind, RedisError, ServerErrorKind};

    fn io(kind: std::io::ErrorKind) -> RedisError {
        RedisError::from(std::io::Error::from(kind))
    }

    #[test]
    fn error_replies_are_answers_and_failures_to_reach_redis_are_not() {
        let oom = redis::make_extension_error("OOM".into(), Some("maxmemory".into()));
        let read_only = RedisError::from((ErrorKind::Server(ServerErrorKind::ReadOnly), "ro"));
        let down = RedisError::from((ErrorKind::Server(ServerErrorKind::ClusterDown), "down"));
        for cluster in [false, true] {
            for reply in [&oom, &read_only, &down] {
                assert_eq!(outcome(reply, cluster), Outcome::Answered, "{reply}");
            }
            assert_eq!(
                outcome(&io(std::io::ErrorKind::TimedOut), cluster),
                Outcome::Unanswered
            );
        }
        let no_node = RedisError::from((ErrorKind::ClusterConnectionNotFound, "no node"));
        assert_eq!(outcome(&no_node, true), Outcome::Unanswered);
        // ConnectionManager reconnects on these by itself; a cluster client may not.
        for kind in [
            std::io::ErrorKind::ConnectionRefused,
            std::io::ErrorKind::BrokenPipe,
        ] {
            assert_eq!(outcome(&io(kind), false), Outcome::Neither);
            assert_eq!(outcome(&io(kind), true), Outcome::Unanswered);
        }
    }

    #[test]
    fn a_connection_is_stuck_once_calls_went_unanswered_for_stuck_after() {
        let stuck_ms = STUCK_AFTER.as_millis() as u64;
        let health = Health::new(STUCK_AFTER);
        assert_eq!(health.stuck_for(), None, "never unanswered");
        health.unanswered_at(1_000);
        health.unanswered_at(3_000);
        assert_eq!(health.stuck_for(), None);
        health.unanswered_at(1_000 + stuck_ms - 1);
        assert_eq!(health.stuck_for(), None);
        health.unanswered_at(1_000 + stuck_ms);
        assert_eq!(health.stuck_for(), Some(STUCK_AFTER));
        // One answer, even an error reply, and the count starts again.
        health.answered();
        assert_eq!(health.stuck_for(), None);
        health.unanswered_at(20_000);
        assert_eq!(health.stuck_for(), None);
        health.unanswered_at(20_000 + stuck_ms);
        assert_eq!(health.stuck_for(), Some(STUCK_AFTER));
    }

    /// Failed on `ecccf3c`: unanswered calls more than 30 s apart (a retry policy whose
    /// longest delay is over 30 s, no activity writes) started a new count each time, so a
    /// connection gone silent was never replaced. Only an answer ends a run of unanswered
    /// calls, however far apart they come.
    #[test]
    fn unanswered_calls_however_far_apart_add_up() {
        let health = Health::new(STUCK_AFTER);
        health.unanswered_at(1_000);
        health.unanswered_at(61_000);
        assert_eq!(health.stuck_for(), Some(Duration::from_secs(60)));
        // An answer in between, and the count starts again.
        health.answered();
        health.unanswered_at(200_000);
        assert_eq!(health.stuck_for(), None);
        health.unanswered_at(260_000);
        assert_eq!(health.stuck_for(), Some(Duration::from_secs(60)));
    }

    #[test]
    fn a_connection_that_never_answered_gives_its_successor_twice_as_long() {
        let stuck_ms = STUCK_AFTER.as_millis() as u64;
        let never = Health::new(STUCK_AFTER);
        assert_eq!(never.next_stuck_after(), STUCK_AFTER * 2);
        let successor = Health::new(never.next_stuck_after());
        successor.unanswered_at(1_000);
        successor.unanswered_at(1_000 + stuck_ms);
        assert_eq!(
            successor.stuck_for(),
            None,
            "not stuck after only STUCK_AFTER"
        );
        successor.unanswered_at(1_000 + 2 * stuck_ms);
        assert_eq!(successor.stuck_for(), Some(STUCK_AFTER * 2));
        assert_eq!(successor.next_stuck_after(), STUCK_AFTER * 4);
        assert_eq!(
            Health::new(MAX_STUCK_AFTER).next_stuck_after(),
            MAX_STUCK_AFTER,
            "bounded"
        );
        // One answer, and the connection and its successor are back to STUCK_AFTER.
        successor.answered();
        assert_eq!(successor.next_stuck_after(), STUCK_AFTER);
        successor.unanswered_at(100_000);
        successor.unanswered_at(100_000 + stuck_ms);
        assert_eq!(successor.stuck_for(), Some(STUCK_AFTER));
    }

    #[test]
    fn a_call_dropped_before_its_answer_counts_only_after_a_wait() {
        let health = Health::new(STUCK_AFTER);
        drop(CallWatch::new(&health));
        assert_eq!(health.unanswered_for(), Duration::ZERO);
        assert_eq!(
            health.unanswered_since.load(Ordering::Relaxed),
            ANSWERED,
            "dropped at once: no count"
        );
        let mut waited = CallWatch::new(&health);
        waited.started -= DROPPED_FLOOR;
        drop(waited);
        assert_ne!(health.unanswered_since.load(Ordering::Relaxed), ANSWERED);
        CallWatch::new(&health).settle(None);
        assert_eq!(health.unanswered_since.load(Ordering::Relaxed), ANSWERED);
        CallWatch::new(&health).settle(Some(Outcome::Unanswered));
        assert_ne!(health.unanswered_since.load(Ordering::Relaxed), ANSWERED);
        CallWatch::new(&health).settle(Some(Outcome::Neither));
        assert_ne!(health.unanswered_since.load(Ordering::Relaxed), ANSWERED);
    }
}
