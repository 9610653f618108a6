//! The limits [`SseTrackerBuilder::build`](crate::SseTrackerBuilder::build) checks settings
//! against.

use std::time::Duration;

/// Longest heartbeat comment accepted, in bytes.
pub const MAX_HEARTBEAT_COMMENT_LEN: usize = 256;
/// Largest accepted [`max_id_len`](crate::SseTrackerBuilder::max_id_len): 64 KiB.
pub const MAX_ID_LEN_LIMIT: usize = 64 * 1024;
/// Shortest accepted heartbeat interval: 10 ms.
pub const MIN_HEARTBEAT_INTERVAL: Duration = Duration::from_millis(10);
/// Longest accepted heartbeat interval, send timeout, flush interval, store timeout and
/// retry delay: one day.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
/// Longest accepted idle TTL: one year.
pub const MAX_IDLE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
