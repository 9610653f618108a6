//! Replay logs in the in-memory store: the contract every store that keeps logs meets
//! (`tests/common/store_log.rs`; `tests/redis.rs` runs it on Redis).

#[path = "common/store_log.rs"]
mod store_log;

use tower_sse_tracker::store::InMemoryStore;

#[tokio::test]
async fn logs_keep_the_exact_events_once_each() {
    store_log::logs_keep_the_exact_events_once_each(&InMemoryStore::new(), "owner").await;
}

#[tokio::test]
async fn a_lease_runs_out_unless_renewed() {
    store_log::a_lease_runs_out_unless_renewed(&InMemoryStore::new(), "instance-a").await;
}
