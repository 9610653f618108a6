//! Test harness: an axum server on 127.0.0.1 whose SSE bodies are fed frame by frame by the
//! test, and a real HTTP client (reqwest) reading them.
#![allow(dead_code)]

pub mod chaos;
pub mod direct;
pub mod load;
pub mod names;
pub mod reference;
pub mod stores;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, Response, header};
use axum::routing::get;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tower_sse_tracker::{LastEventId, SessionId, SseTracker, StreamName};

pub const SESSION_HEADER: &str = "mcp-session-id";

/// An SSE response of `frames`, marked `Detach`.
pub fn detached_sse<S>(frames: S) -> axum::response::Response
where
    S: futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send + 'static,
{
    use axum::response::IntoResponse;
    let mut response = (
        [(header::CONTENT_TYPE, "text/event-stream")],
        Body::from_stream(frames),
    )
        .into_response();
    response.extensions_mut().insert(tower_sse_tracker::Detach);
    response
}

/// The key of `stream` of `owner`.
pub fn key(owner: &str, stream: &str) -> tower_sse_tracker::StreamKey {
    tower_sse_tracker::StreamKey::try_new(owner, stream).unwrap()
}

/// When the server's body pulled each frame of a feed.
pub type PullLog = Arc<Mutex<Vec<tokio::time::Instant>>>;

/// The feeds of each path, taken by its requests in order.
type Feeds = Arc<
    Mutex<HashMap<String, std::collections::VecDeque<(mpsc::UnboundedReceiver<Bytes>, PullLog)>>>,
>;

/// What the handler saw of the request extensions, by feed name.
type Seen = Arc<Mutex<HashMap<String, Extensions>>>;

/// What the layer put in a request's extensions.
#[derive(Clone, Debug, Default)]
pub struct Extensions {
    pub session: Option<SessionId>,
    pub last_event_id: Option<LastEventId>,
    pub key: Option<tower_sse_tracker::StreamKey>,
    pub replay: Option<tower_sse_tracker::Replay>,
}

#[derive(Clone, Default)]
struct AppState {
    feeds: Feeds,
    seen: Seen,
}

pub struct Harness {
    pub addr: SocketAddr,
    pub tracker: SseTracker,
    pub client: reqwest::Client,
    state: AppState,
}

/// Query options of the test endpoints.
#[derive(Debug, Default)]
struct Opts {
    stream_name: Option<String>,
    assign_session: Option<String>,
    content_type: Option<String>,
}

fn opts(q: &HashMap<String, String>) -> Opts {
    Opts {
        stream_name: q.get("stream").cloned(),
        assign_session: q.get("assign").cloned(),
        content_type: q.get("ct").cloned(),
    }
}

async fn feed_handler(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    req: axum::extract::Request,
) -> Response<Body> {
    let ext = req.extensions();
    state.seen.lock().unwrap().insert(
        name.clone(),
        Extensions {
            session: ext.get::<SessionId>().cloned(),
            last_event_id: ext.get::<LastEventId>().cloned(),
            key: ext.get::<tower_sse_tracker::StreamKey>().cloned(),
            replay: ext.get::<tower_sse_tracker::Replay>().cloned(),
        },
    );
    let o = opts(&q);
    let (rx, log) = state
        .feeds
        .lock()
        .unwrap()
        .get_mut(&name)
        .and_then(|feeds| feeds.pop_front())
        .unwrap_or_else(|| panic!("no feed registered for {name}"));
    let frames = UnboundedReceiverStream::new(rx).map(move |frame| {
        log.lock().unwrap().push(tokio::time::Instant::now());
        Ok::<_, std::io::Error>(frame)
    });
    let body = Body::from_stream(frames);
    let mut response = Response::new(body);
    let ct = o.content_type.as_deref().unwrap_or("text/event-stream");
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_str(ct).unwrap());
    if let Some(s) = o.assign_session {
        response
            .headers_mut()
            .insert(SESSION_HEADER, HeaderValue::from_str(&s).unwrap());
    }
    if let Some(name) = o.stream_name {
        response
            .extensions_mut()
            .insert(StreamName::new(&name).unwrap());
    }
    response
}

/// A fixed, non-streaming body with a content length.
async fn plain_handler() -> Response<Body> {
    let mut response = Response::new(Body::from("id: 1\n\nnot an event stream"));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

impl Harness {
    pub async fn start(tracker: SseTracker) -> Self {
        Self::start_with(tracker, |router| router).await
    }

    /// Like [`start`](Self::start), with `outer` adding layers outside the tracker's (they see
    /// requests first), such as an authentication layer.
    pub async fn start_with(tracker: SseTracker, outer: impl FnOnce(Router) -> Router) -> Self {
        let state = AppState::default();
        let app = Router::new()
            .route("/sse/{name}", get(feed_handler))
            .route("/plain", get(plain_handler))
            .with_state(state.clone())
            .layer(tracker.layer());
        let app = outer(app);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let client = reqwest::Client::builder().no_proxy().build().unwrap();
        Self {
            addr,
            tracker,
            client,
            state,
        }
    }

    /// Registers the frames of `/sse/{name}`; each send is one body frame.
    pub fn feed(&self, name: &str) -> mpsc::UnboundedSender<Bytes> {
        self.feed_logged(name).0
    }

    /// Like [`feed`](Self::feed), with the times at which the server pulled each frame.
    pub fn feed_logged(&self, name: &str) -> (mpsc::UnboundedSender<Bytes>, PullLog) {
        let (tx, rx) = mpsc::unbounded_channel();
        let log = PullLog::default();
        self.state
            .feeds
            .lock()
            .unwrap()
            .entry(name.to_owned())
            .or_default()
            .push_back((rx, log.clone()));
        (tx, log)
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("http://{}{}", self.addr, path_and_query)
    }

    /// GET with an optional session header and extra headers.
    pub async fn get(&self, path: &str, session: Option<&str>, headers: HeaderMap) -> Client {
        let mut req = self.client.get(self.url(path)).headers(headers);
        if let Some(s) = session {
            req = req.header(SESSION_HEADER, s);
        }
        let response = req.send().await.expect("request failed");
        Client::new(response)
    }

    /// What the handler of feed `name` (its last request) found in its extensions.
    pub fn seen(&self, name: &str) -> Extensions {
        self.state.seen.lock().unwrap().get(name).cloned().unwrap()
    }
}

/// The client side of one response.
pub struct Client {
    pub headers: HeaderMap,
    pub status: u16,
    stream: futures_util::stream::BoxStream<'static, reqwest::Result<Bytes>>,
    pub received: Vec<u8>,
    pub ended: bool,
}

impl Client {
    pub fn new(response: reqwest::Response) -> Self {
        let headers = response.headers().clone();
        let status = response.status().as_u16();
        Self {
            headers,
            status,
            stream: response.bytes_stream().boxed(),
            received: Vec::new(),
            ended: false,
        }
    }

    /// Reads one chunk; `false` at the end of the body.
    pub async fn read_chunk(&mut self) -> bool {
        match self.stream.next().await {
            Some(chunk) => {
                self.received
                    .extend_from_slice(&chunk.expect("body read failed"));
                true
            }
            None => {
                self.ended = true;
                false
            }
        }
    }

    /// Reads until at least `n` bytes in total have been received.
    pub async fn read_until_len(&mut self, n: usize) {
        while self.received.len() < n {
            assert!(
                self.read_chunk().await,
                "body ended after {} bytes, wanted {n}",
                self.received.len()
            );
        }
    }

    /// Reads until the received bytes end with `suffix`.
    pub async fn read_until_suffix(&mut self, suffix: &[u8]) {
        while !self.received.ends_with(suffix) {
            assert!(
                self.read_chunk().await,
                "body ended before {:?}; got {:?}",
                String::from_utf8_lossy(suffix),
                String::from_utf8_lossy(&self.received)
            );
        }
    }

    /// Reads to the end of the body.
    pub async fn read_to_end(&mut self) -> &[u8] {
        while self.read_chunk().await {}
        &self.received
    }
}

/// Metrics captured by a debugging recorder local to one tracker.
///
/// The debugging recorder resets every value it reports, so this keeps running totals; that is
/// exact for counters and for gauges that only move by increments and decrements.
pub struct Recorded {
    snapshotter: metrics_util::debugging::Snapshotter,
    totals: Mutex<HashMap<String, f64>>,
    histograms: Mutex<HashMap<String, Vec<f64>>>,
}

fn metric_key(name: &str, labels: &[(&str, &str)]) -> String {
    let mut labels: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    format!("{name}{{{}}}", labels.join(","))
}

impl Recorded {
    /// The current total of metric `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.refresh();
        let totals = self.totals.lock().unwrap();
        totals
            .get(&metric_key(name, labels))
            .copied()
            .unwrap_or(0.0)
    }

    /// The total of metric `name` over all its label sets.
    pub fn sum(&self, name: &str) -> f64 {
        self.refresh();
        let prefix = format!("{name}{{");
        let totals = self.totals.lock().unwrap();
        totals
            .iter()
            .filter(|(k, _)| k.starts_with(&prefix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Every value recorded so far in histogram `name` (no labels).
    pub fn histogram(&self, name: &str) -> Vec<f64> {
        self.refresh();
        let histograms = self.histograms.lock().unwrap();
        histograms
            .get(&metric_key(name, &[]))
            .cloned()
            .unwrap_or_default()
    }

    fn refresh(&self) {
        use metrics_util::debugging::DebugValue;
        let mut totals = self.totals.lock().unwrap();
        let mut histograms = self.histograms.lock().unwrap();
        for (key, _, _, value) in self.snapshotter.snapshot().into_vec() {
            let k = key.key();
            let labels: Vec<(&str, &str)> = k.labels().map(|l| (l.key(), l.value())).collect();
            let name = metric_key(k.name(), &labels);
            let delta = match value {
                DebugValue::Counter(n) => n as f64,
                DebugValue::Gauge(g) => g.into_inner(),
                DebugValue::Histogram(v) => {
                    let len = v.len() as f64;
                    histograms
                        .entry(name.clone())
                        .or_default()
                        .extend(v.into_iter().map(|x| x.into_inner()));
                    len
                }
            };
            *totals.entry(name).or_default() += delta;
        }
    }
}

/// A tracker with heartbeats off, for tests where a heartbeat would only be noise.
pub fn no_heartbeat() -> SseTracker {
    SseTracker::builder()
        .heartbeat_interval(None)
        .build()
        .unwrap()
}

/// Builds a tracker whose metrics go to a recorder of its own.
pub fn build_recorded(builder: tower_sse_tracker::SseTrackerBuilder) -> (SseTracker, Recorded) {
    let recorder = metrics_util::debugging::DebuggingRecorder::new();
    let snapshotter = recorder.snapshotter();
    let tracker = metrics::with_local_recorder(&recorder, || builder.build().unwrap());
    (
        tracker,
        Recorded {
            snapshotter,
            totals: Mutex::default(),
            histograms: Mutex::default(),
        },
    )
}

/// A recorder installed as the process's global one (once), for metrics emitted outside a
/// tracker's build, such as a `RedisStore`'s.
pub fn global_recorded() -> &'static Recorded {
    static GLOBAL: std::sync::OnceLock<Recorded> = std::sync::OnceLock::new();
    GLOBAL.get_or_init(|| {
        let recorder = metrics_util::debugging::DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder.install().expect("no other global recorder");
        Recorded {
            snapshotter,
            totals: Mutex::default(),
            histograms: Mutex::default(),
        }
    })
}

/// Sends `frames` as the body of `/sse/{name}` for `session`, and reads the whole response.
pub async fn run_frames(
    h: &Harness,
    name: &str,
    session: Option<&str>,
    frames: &[&[u8]],
) -> Client {
    let tx = h.feed(name);
    let mut client = h
        .get(&format!("/sse/{name}"), session, HeaderMap::new())
        .await;
    for frame in frames {
        tx.send(Bytes::copy_from_slice(frame)).unwrap();
    }
    drop(tx);
    client.read_to_end().await;
    client
}

/// Log lines written through a `tracing` subscriber, captured for a test to read.
#[derive(Clone, Default)]
pub struct CapturedLogs(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for CapturedLogs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl CapturedLogs {
    /// Captures what is logged at `level` and above on this thread (and the close of each
    /// span, with its fields) until the guard is dropped.
    pub fn capture(level: tracing::Level) -> (Self, tracing::subscriber::DefaultGuard) {
        let logs = Self::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(level)
            .with_ansi(false)
            .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
            .with_writer(move || writer.clone())
            .finish();
        (logs, tracing::subscriber::set_default(subscriber))
    }

    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

/// Waits (up to 60 s of Tokio time: no real time with the clock paused) until `done` holds.
pub async fn eventually(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(std::time::Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting until {what}"));
}

/// `n` as a count that cannot be zero, for the builder's settings.
pub fn nz(n: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(n).expect("not zero")
}
