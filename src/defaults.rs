//! The default of every setting of [`SseTrackerBuilder`](crate::SseTrackerBuilder), in one
//! place (the builder's table lists them with their settings).

use std::time::Duration;

/// Default request/response header that carries the session id (MCP Streamable HTTP's).
pub const SESSION_HEADER: &str = "mcp-session-id";
/// Default idle time after which a heartbeat comment is sent: 15 seconds.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(15);
/// Default time a draining body may take to reach an event boundary before it is ended
/// anyway (see [`SseTrackerBuilder::drain_timeout`](crate::SseTrackerBuilder::drain_timeout)):
/// 10 seconds.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// Default text of the heartbeat comment; the line sent is `: keep-alive`.
pub const HEARTBEAT_COMMENT: &str = "keep-alive";
/// Default maximum number of tracked streams.
pub const MAX_STREAMS: usize = 100_000;
/// Default capacity of the worker's channel, in records.
pub const CHANNEL_CAPACITY: usize = 1024;
/// Default longest wait of a body for room in the worker's channel: 100 ms.
pub const SEND_TIMEOUT: Duration = Duration::from_millis(100);
/// Default most streams per store write.
pub const MAX_BATCH: usize = 256;
/// Default time between two flushes of the worker: 100 ms.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Default idle time after which a stream leaves the registry: 5 minutes.
pub const IDLE_TTL: Duration = Duration::from_secs(300);
/// Default size of the stream-name intern table.
pub const MAX_STREAM_NAMES: usize = 10_000;
/// Default deadline of one store call: 5 seconds.
pub const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// Default most evicted streams whose latest id waits for a write.
pub const MAX_PENDING_EVICTED: usize = 10_000;

/// The retry policy: 100 ms doubling to 10 s, 5 retries.
pub const RETRY: crate::RetryPolicy = crate::worker::retry::DEFAULT_RETRY;

/// Ids longer than this many bytes are ignored: 1 KiB.
pub const MAX_ID_LEN: usize = crate::scan::DEFAULT_MAX_ID_LEN;
