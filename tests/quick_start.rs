//! The README's quick start, as a new user runs it: the same code (`examples/quick_start.rs`,
//! which the README shows verbatim) with the same defaults, read over loopback by clients that
//! send only what a browser's `EventSource` sends (`Accept: text/event-stream`,
//! `Cache-Control: no-cache`, and `Last-Event-ID` on reconnect).

#[path = "../examples/quick_start.rs"]
#[allow(dead_code)]
mod quick_start;

use std::time::Duration;

use futures_util::StreamExt;
use tokio::time::timeout;
use tower_sse_tracker::{EventId, Resume, SseTracker, StreamKey, StreamName};

#[test]
fn the_readme_shows_the_quick_start_example_verbatim() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/quick_start.rs");
    assert!(
        readme.contains(&format!("```rust,no_run\n{example}```")),
        "README.md's quick start differs from examples/quick_start.rs"
    );
}

/// A reader that sends what `EventSource` sends, and reads event ids as they come.
struct Reader {
    events: std::pin::Pin<Box<dyn futures_util::Stream<Item = reqwest::Result<bytes::Bytes>>>>,
    buf: String,
    last: Option<u64>,
}

impl Reader {
    async fn open(url: &str, last_event_id: Option<u64>) -> Self {
        let http = reqwest::Client::builder().no_proxy().build().unwrap();
        let mut request = http
            .get(url)
            .header("accept", "text/event-stream")
            .header("cache-control", "no-cache");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.unwrap();
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "an SSE response"
        );
        Self {
            events: Box::pin(response.bytes_stream()),
            buf: String::new(),
            last: last_event_id,
        }
    }

    /// Reads until an event with an id at least `n` has come; returns the last id read.
    async fn read_until(&mut self, n: u64) -> u64 {
        timeout(Duration::from_secs(10), async {
            while self.last.is_none_or(|last| last < n) {
                let chunk = self.events.next().await.expect("the feed goes on").unwrap();
                self.buf.push_str(std::str::from_utf8(&chunk).unwrap());
                while let Some(end) = self.buf.find("\n\n") {
                    let event: String = self.buf.drain(..end + 2).collect();
                    for line in event.lines() {
                        if let Some(id) = line.strip_prefix("id:") {
                            self.last = Some(id.trim().parse().unwrap());
                        }
                    }
                }
            }
        })
        .await
        .expect("ticks keep coming");
        self.last.unwrap()
    }
}

fn id(n: u64) -> EventId {
    EventId::new(&n.to_string()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_browsers_read_the_quick_starts_feed_and_one_resumes_as_the_readme_says() {
    let tracker = SseTracker::builder().build().unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/ticks", listener.local_addr().unwrap());
    let app = quick_start::app(&tracker);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let mut readers = Vec::new();
    for _ in 0..3 {
        readers.push(Reader::open(&url, None).await);
    }
    let start = readers[0].read_until(1).await;
    for reader in &mut readers {
        reader.read_until(start + 1).await;
    }
    // All three read one feed, under the key the README names.
    let feed = StreamKey::unowned(StreamName::new("GET /ticks").unwrap());
    assert_eq!(tracker.tracked_streams(), 1);
    let away = readers.remove(0);
    let left_at = away.last.unwrap();
    drop(away);
    // The others read on while the first is away.
    let now = readers[0].read_until(left_at + 3).await;
    readers[1].read_until(now).await;
    // The feed's latest id is the newest tick any reader was sent (the next is 500 ms away).
    assert_eq!(tracker.last_event_id(&feed), Some(id(now)));
    assert_eq!(
        tracker.resume(&feed, Some(&id(now))).await.unwrap(),
        Resume::Current(id(now))
    );
    assert_eq!(
        tracker.resume(&feed, Some(&id(left_at))).await.unwrap(),
        Resume::Behind {
            client: Some(id(left_at)),
            latest: id(now),
        }
    );
    // It comes back with `Last-Event-ID`, as EventSource does, and reads on.
    let mut back = Reader::open(&url, Some(left_at)).await;
    let caught_up = back.read_until(now + 1).await;
    assert_eq!(
        tracker.resume(&feed, Some(&id(caught_up))).await.unwrap(),
        Resume::Current(id(caught_up))
    );
    assert_eq!(tracker.tracked_streams(), 1, "still one feed");
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    assert!(report.is_complete(), "{report:?}");
}
