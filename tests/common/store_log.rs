//! What every store that keeps replay logs must do (`Store::append_logs`, `read_log`, the
//! leases), checked against `InMemoryStore` (`tests/store_log.rs`) and `RedisStore` on both
//! topologies (`tests/redis.rs`).

use std::time::Duration;

use bytes::Bytes;
use tower_sse_tracker::store::{LogAppend, LogEnd, LogEvent, Store, StoredLog};
use tower_sse_tracker::{EventId, StreamKey};

/// The events a store keeps per log, as both stores are set up in these tests.
pub const LOG_MAX_EVENTS: usize = 1024;

fn event(offset: u64, id: Option<&str>, bytes: &[u8]) -> LogEvent {
    LogEvent::new(
        offset,
        id.map(|id| EventId::new(id).unwrap()),
        Bytes::copy_from_slice(bytes),
    )
}

fn append(key: &StreamKey, epoch: u64, events: Vec<LogEvent>) -> LogAppend {
    events
        .into_iter()
        .fold(LogAppend::new(key.clone(), epoch, "instance-a"), |a, e| {
            a.event(e)
        })
}

async fn read(store: &impl Store, key: &StreamKey, after: Option<u64>) -> StoredLog {
    store
        .read_log(key, after, 10_000)
        .await
        .unwrap()
        .expect("a log")
}

fn offsets(log: &StoredLog) -> Vec<u64> {
    log.events.iter().map(|e| e.offset).collect()
}

/// Appends, reads after a position, retries, epochs, holes, the end mark, many streams in one
/// batch, and the length bound. `owner` makes the test's keys its own.
pub async fn logs_keep_the_exact_events_once_each(store: &impl Store, owner: &str) {
    let key = StreamKey::try_new(owner, "POST /mcp").unwrap();
    assert_eq!(store.read_log(&key, None, 10).await.unwrap(), None);

    // Bytes as sent: CRLF, a comment, bytes that are not UTF-8; ids absent, empty, present.
    let first = vec![
        event(0, Some("1"), b"id: 1\r\ndata: one\r\n\r\n"),
        event(1, None, b": note\ndata: \x00\xff\xfe\n\n"),
        event(2, Some(""), b"id\ndata: reset\n\n"),
    ];
    store
        .append_logs(&[append(&key, 7, first.clone())])
        .await
        .unwrap();
    let log = read(store, &key, None).await;
    assert_eq!((log.epoch, log.next_offset, log.end), (7, 3, None));
    assert_eq!(log.producer, "instance-a");
    assert_eq!(log.events, first, "byte-exact, ids as given");
    assert!(log.complete_after(None));
    assert_eq!(offsets(&read(store, &key, Some(0)).await), [1, 2]);
    assert!(read(store, &key, Some(2)).await.events.is_empty());
    assert!(
        read(store, &key, Some(2))
            .await
            .complete_after(Some((7, 2)))
    );
    assert!(
        !read(store, &key, Some(2))
            .await
            .complete_after(Some((6, 2))),
        "a position in another history"
    );
    let everything = store.read_log(&key, None, usize::MAX).await.unwrap();
    assert_eq!(everything.map(|log| log.events.len()), Some(3));
    let limited = store.read_log(&key, Some(0), 1).await.unwrap().unwrap();
    assert_eq!(offsets(&limited), [1]);

    // A retry of the same events with one more: each once.
    let mut retried = first.clone();
    retried.push(event(3, Some("4"), b"id: 4\ndata: four\n\n"));
    let report = store
        .append_logs(&[append(&key, 7, retried)])
        .await
        .unwrap();
    assert!(report.refused().is_empty(), "{report:?}");
    let log = read(store, &key, None).await;
    assert_eq!(offsets(&log), [0, 1, 2, 3]);
    assert_eq!(log.next_offset, 4);

    // A late append of an older history is refused, and said to be, in a batch whose other
    // streams (in other slots of a cluster) are taken.
    let others: Vec<StreamKey> = (0..4)
        .map(|n| StreamKey::try_new(&format!("refusal-{n}"), "GET /answer").unwrap())
        .collect();
    let mut batch: Vec<LogAppend> = others
        .iter()
        .map(|other| append(other, 1, vec![event(0, None, b"data: x\n\n")]))
        .collect();
    batch.insert(2, append(&key, 6, vec![event(0, None, b"data: old\n\n")]));
    let report = store.append_logs(&batch).await.unwrap();
    assert_eq!(report.refused(), &[2]);
    let log = read(store, &key, None).await;
    assert_eq!((log.epoch, offsets(&log).len()), (7, 4));
    for other in &others {
        assert_eq!(read(store, other, None).await.next_offset, 1);
    }

    // Events the tracker could not write leave a hole that a reader sees.
    store
        .append_logs(&[append(&key, 7, vec![event(6, None, b"data: six\n\n")])])
        .await
        .unwrap();
    let log = read(store, &key, Some(3)).await;
    assert_eq!(offsets(&log), [6]);
    assert_eq!(log.next_offset, 7);
    assert!(
        !log.complete_after(Some((7, 3))),
        "offsets 4 and 5 are missing"
    );
    assert!(log.complete_after(Some((7, 5))));

    // Another producer's history of the same epoch is refused.
    let other = LogAppend::new(key.clone(), 7, "instance-b")
        .event(event(7, None, b"data: b\n\n"))
        .ended();
    let report = store.append_logs(&[other]).await.unwrap();
    assert_eq!(report.refused(), &[0]);
    let log = read(store, &key, None).await;
    assert_eq!(
        (log.producer.as_str(), log.next_offset, log.end),
        ("instance-a", 7, None)
    );

    // The end mark, with no event; nothing is appended after it.
    store
        .append_logs(&[LogAppend::new(key.clone(), 7, "instance-a").ended()])
        .await
        .unwrap();
    store
        .append_logs(&[append(&key, 7, vec![event(7, None, b"data: late\n\n")])])
        .await
        .unwrap();
    // The first end stays: a later `stopped` does not turn a finished stream into a cut one.
    store
        .append_logs(&[LogAppend::new(key.clone(), 7, "instance-a").stopped()])
        .await
        .unwrap();
    let log = read(store, &key, None).await;
    assert_eq!(log.end, Some(LogEnd::Finished));
    assert_eq!((offsets(&log).last(), log.next_offset), (Some(&6), 7));

    // Batches that break the contract are refused whole.
    let twice = [append(&key, 9, vec![]), append(&key, 9, vec![])];
    assert!(store.append_logs(&twice).await.is_err());
    let falling = append(&key, 9, vec![event(2, None, b"\n"), event(1, None, b"\n")]);
    assert!(store.append_logs(&[falling]).await.is_err());
    let huge = append(&key, 9, vec![event(1 << 53, None, b"\n")]);
    assert!(store.append_logs(&[huge]).await.is_err());
    assert_eq!(read(store, &key, None).await.epoch, 7);

    // A newer history replaces the log.
    store
        .append_logs(&[append(&key, 8, vec![event(0, Some("a"), b"id: a\n\n")])])
        .await
        .unwrap();
    let log = read(store, &key, None).await;
    assert_eq!((log.epoch, offsets(&log), log.end), (8, vec![0], None));
    // A stopped history: nothing is appended after it either.
    store
        .append_logs(&[append(&key, 8, vec![event(1, None, b"data: x\n\n")]).stopped()])
        .await
        .unwrap();
    store
        .append_logs(&[append(&key, 8, vec![event(2, None, b"data: late\n\n")])])
        .await
        .unwrap();
    let log = read(store, &key, None).await;
    assert_eq!(
        (offsets(&log), log.end),
        (vec![0, 1], Some(LogEnd::Stopped))
    );

    // Many streams in one batch (on a cluster, of every primary).
    let keys: Vec<StreamKey> = (0..64)
        .map(|i| StreamKey::try_new(&format!("{owner}-{i}"), "GET /feed").unwrap())
        .collect();
    let batch: Vec<LogAppend> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| {
            let data = format!("data: {i}\n\n");
            append(
                k,
                1,
                vec![event(0, None, data.as_bytes()), event(1, None, b"\n")],
            )
            .ended()
        })
        .collect();
    store.append_logs(&batch).await.unwrap();
    for (i, k) in keys.iter().enumerate() {
        let log = read(store, k, None).await;
        assert_eq!(log.events[0].bytes, format!("data: {i}\n\n").as_bytes());
        assert!(
            log.end == Some(LogEnd::Finished) && log.complete_after(None),
            "{k}"
        );
    }

    // The length bound: the oldest go first, and the reader sees they are gone.
    let long = StreamKey::try_new(owner, "GET /long").unwrap();
    let total = LOG_MAX_EVENTS as u64 + 76;
    for chunk in (0..total).collect::<Vec<_>>().chunks(200) {
        let events = chunk
            .iter()
            .map(|&o| event(o, Some(&o.to_string()), b"data: x\n\n"))
            .collect();
        store
            .append_logs(&[append(&long, 1, events)])
            .await
            .unwrap();
    }
    let log = read(store, &long, None).await;
    assert_eq!(log.events.len(), LOG_MAX_EVENTS);
    assert_eq!(log.events[0].offset, 76);
    // One batch of more events than a log holds, over three streams (Redis splits it into
    // several script calls): each log holds its newest, and knows where it ends.
    let big: Vec<LogAppend> = (0..3)
        .map(|s| {
            let k = StreamKey::try_new(&format!("{owner}-big-{s}"), "GET /big").unwrap();
            let events = (0..1500)
                .map(|o| event(o, None, format!("data: {s}/{o}\n\n").as_bytes()))
                .collect();
            append(&k, 1, events)
        })
        .collect();
    store.append_logs(&big).await.unwrap();
    for s in 0..3 {
        let k = StreamKey::try_new(&format!("{owner}-big-{s}"), "GET /big").unwrap();
        let log = read(store, &k, None).await;
        assert_eq!((log.events.len(), log.next_offset), (LOG_MAX_EVENTS, 1500));
        assert_eq!(log.events[0].offset, 1500 - LOG_MAX_EVENTS as u64);
        assert_eq!(
            log.events.last().unwrap().bytes,
            format!("data: {s}/1499\n\n").as_bytes()
        );
        assert!(log.complete_after(Some((1, 1500 - LOG_MAX_EVENTS as u64 - 1))));
    }
    assert_eq!(log.events[0].id.as_ref().map(|id| id.as_str()), Some("76"));
    assert!(!log.complete_after(None) && log.complete_after(Some((1, 75))));
}

/// A lease runs for its time to live from its last renewal, and only for its producer.
pub async fn a_lease_runs_out_unless_renewed(store: &impl Store, producer: &str) {
    assert!(!store.lease_alive(producer).await.unwrap());
    store
        .renew_lease(producer, Duration::from_millis(400))
        .await
        .unwrap();
    assert!(store.lease_alive(producer).await.unwrap());
    assert!(
        !store
            .lease_alive(&format!("{producer}-other"))
            .await
            .unwrap()
    );
    tokio::time::sleep(Duration::from_millis(250)).await;
    store
        .renew_lease(producer, Duration::from_millis(400))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert!(
        store.lease_alive(producer).await.unwrap(),
        "renewed 250 ms ago for 400 ms"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!store.lease_alive(producer).await.unwrap());
}
