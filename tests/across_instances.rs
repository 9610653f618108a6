//! Replay across instances on the in-memory store, shared by trackers in one process (the
//! scenarios are in `tests/common/across.rs`; `tests/redis.rs` runs them on Redis).

#[path = "common/across.rs"]
mod across;
mod common;

use std::sync::Arc;

use tower_sse_tracker::store::InMemoryStore;

fn store() -> Arc<InMemoryStore> {
    Arc::new(InMemoryStore::new())
}

#[tokio::test]
async fn a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end() {
    across::a_detached_streams_events_reach_the_store_byte_exact_once_each_with_its_end(store())
        .await;
}

#[tokio::test]
async fn a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end()
{
    across::a_reconnect_landing_on_another_instance_gets_what_it_missed_then_the_live_tail_to_the_end(store()).await;
}

#[tokio::test]
async fn a_reconnect_whose_id_the_store_does_not_hold_goes_to_the_application() {
    across::a_reconnect_whose_id_the_store_does_not_hold_goes_to_the_application(store()).await;
}

#[tokio::test]
async fn when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal()
 {
    across::when_the_producing_instance_dies_a_reader_elsewhere_gets_what_the_store_holds_then_the_gap_signal(store()).await;
}
