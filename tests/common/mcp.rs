//! An rmcp 3.x server behind the tracker's layer, driven by rmcp's own client, with a TCP proxy
//! in between that can cut every connection (a network drop).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock,
    ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::{
    EventStore, EventStoreError, EventStream, ServerSseMessage,
};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use tokio::task::JoinHandle;
use tower_sse_tracker::StreamKey;

/// A tool server, as an application would write it: `progress` sends `steps` progress
/// notifications, `delay_ms` apart, then answers. Nothing in it knows about the tracker.
#[derive(Clone, Default)]
pub struct ProgressServer;

fn number(request: &CallToolRequestParams, name: &str, default: u64) -> u64 {
    request
        .arguments
        .as_ref()
        .and_then(|a| a.get(name))
        .and_then(|v| v.as_u64())
        .unwrap_or(default)
}

impl ServerHandler for ProgressServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<rmcp::model::PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<rmcp::model::ListToolsResult, ErrorData> {
        let schema = serde_json::json!({
            "type": "object",
            "properties": {
                "steps": { "type": "integer" },
                "delay_ms": { "type": "integer" }
            }
        });
        let tool = rmcp::model::Tool::new(
            "progress",
            "Streams one progress notification per step",
            schema.as_object().cloned().unwrap_or_default(),
        );
        Ok(rmcp::model::ListToolsResult::with_all_items(vec![tool]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let steps = number(&request, "steps", 3);
        let delay = Duration::from_millis(number(&request, "delay_ms", 50));
        let token = context
            .meta
            .get_progress_token()
            .ok_or_else(|| ErrorData::invalid_params("a progress token is required", None))?;
        for step in 1..=steps {
            tokio::time::sleep(delay).await;
            context
                .peer
                .notify_progress(
                    ProgressNotificationParam::new(token.clone(), step as f64)
                        .with_total(steps as f64),
                )
                .await
                .map_err(|e| ErrorData::internal_error(e.to_string(), None))?;
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("done after {steps}"))]).into())
    }
}

/// An event store whose ids name their stream the MCP TypeScript SDK's way,
/// `"{stream}_{n}"`, and which replays what it holds after an id (a finite replay: the client
/// polls until the stream ends).
#[derive(Clone, Default)]
pub struct NamingEventStore {
    events: Arc<Mutex<Vec<(String, ServerSseMessage)>>>,
    next: Arc<AtomicU64>,
}

impl NamingEventStore {
    /// The id of the last event stored on each stream, in the order the streams started.
    pub fn last_ids(&self) -> Vec<(String, String)> {
        let events = self.events.lock().unwrap();
        let mut last: Vec<(String, String)> = Vec::new();
        for (stream, event) in events.iter() {
            let id = event.event_id.clone().unwrap_or_default();
            match last.iter_mut().find(|(s, _)| s == stream) {
                Some(entry) => entry.1 = id,
                None => last.push((stream.clone(), id)),
            }
        }
        last
    }
}

#[async_trait::async_trait]
impl EventStore for NamingEventStore {
    async fn store_event(
        &self,
        stream_id: &str,
        event: &ServerSseMessage,
    ) -> Result<String, EventStoreError> {
        let id = format!(
            "{stream_id}_{}",
            self.next.fetch_add(1, Ordering::Relaxed) + 1
        );
        let mut event = event.clone();
        event.event_id = Some(id.clone());
        self.events
            .lock()
            .unwrap()
            .push((stream_id.to_owned(), event));
        Ok(id)
    }

    async fn replay_events_after(
        &self,
        last_event_id: &str,
    ) -> Result<EventStream, EventStoreError> {
        let events = self.events.lock().unwrap();
        let at = events
            .iter()
            .position(|(_, e)| e.event_id.as_deref() == Some(last_event_id))
            .ok_or_else(|| std::io::Error::other("unknown event id"))?;
        let stream = events[at].0.clone();
        let after: Vec<ServerSseMessage> = events[at + 1..]
            .iter()
            .filter(|(s, _)| *s == stream)
            .map(|(_, e)| e.clone())
            .collect();
        Ok(Box::pin(futures_util::stream::iter(after)))
    }
}

/// A GET that resumed a stream: its `Last-Event-ID`, and the key the layer put in its
/// extensions.
#[derive(Clone, Debug)]
pub struct Resumption {
    pub last_event_id: String,
    pub key: Option<StreamKey>,
}

/// Serves `router` on 127.0.0.1.
pub async fn serve(router: Router) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    addr
}

/// Wraps the rmcp service so that every GET carrying a `Last-Event-ID` is recorded as the
/// handler sees it (inside the tracker's layer).
pub fn record_resumptions<S>(
    service: S,
    seen: Arc<Mutex<Vec<Resumption>>>,
) -> impl tower::Service<
    axum::extract::Request,
    Response = S::Response,
    Error = S::Error,
    Future = S::Future,
> + Clone
where
    S: tower::Service<axum::extract::Request> + Clone,
{
    let record = move |req: axum::extract::Request| {
        if req.method() == http::Method::GET
            && let Some(last) = req.headers().get("last-event-id")
        {
            seen.lock().unwrap().push(Resumption {
                last_event_id: last.to_str().unwrap_or_default().to_owned(),
                key: req.extensions().get::<StreamKey>().cloned(),
            });
        }
        req
    };
    tower::Layer::layer(&tower::util::MapRequestLayer::new(record), service)
}

/// A TCP proxy on 127.0.0.1 whose connections can all be cut at once.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// New connections wait until then before they reach the server.
    held_until: Arc<Mutex<Option<tokio::time::Instant>>>,
}

impl Proxy {
    pub async fn start(upstream: SocketAddr) -> Self {
        Self::start_splitting(upstream, None).await
    }

    /// A proxy to `upstream`, except that a connection whose first request is a GET carrying
    /// `Last-Event-ID` (a client resuming a stream) goes to `resumes` when it is set: a load
    /// balancer sending the resumption to another instance.
    pub async fn start_splitting(upstream: SocketAddr, resumes: Option<SocketAddr>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let held_until: Arc<Mutex<Option<tokio::time::Instant>>> = Arc::default();
        let accepted = connections.clone();
        let hold = held_until.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                let until = *hold.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Some(until) = until {
                        tokio::time::sleep_until(until).await;
                    }
                    let (target, head) = match resumes {
                        None => (upstream, Vec::new()),
                        Some(resumes) => {
                            let head = read_head(&mut client).await;
                            let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                            let resuming =
                                text.starts_with("get ") && text.contains("\r\nlast-event-id:");
                            (if resuming { resumes } else { upstream }, head)
                        }
                    };
                    if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                        use tokio::io::AsyncWriteExt;
                        if server.write_all(&head).await.is_ok() {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    }
                });
                accepted.lock().unwrap().push(task);
            }
        });
        Self {
            addr,
            connections,
            held_until,
        }
    }

    /// Connections made in the next `duration` reach the server only when it has passed: a
    /// client that is away for that long.
    pub fn hold(&self, duration: Duration) {
        *self.held_until.lock().unwrap() = Some(tokio::time::Instant::now() + duration);
    }

    /// Drops every open connection, both ways, as a network failure would.
    pub fn cut(&self) -> usize {
        let open: Vec<JoinHandle<()>> = std::mem::take(&mut *self.connections.lock().unwrap());
        let n = open.iter().filter(|t| !t.is_finished()).count();
        for task in open {
            task.abort();
        }
        n
    }
}

/// The bytes a client sends first, up to the end of its first request's head (or of what it
/// sent, when it closes or sends 64 KiB first).
async fn read_head(client: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut buf = [0u8; 4096];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 64 << 10 {
        match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    head
}
