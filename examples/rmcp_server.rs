//! An MCP server made with rmcp 3.x (the official Rust SDK) behind the tracker's layer.
//!
//! `cargo run --example rmcp_server [addr]` serves on 127.0.0.1:3002:
//!
//! - `POST/GET /mcp`: rmcp's `StreamableHttpService` (sessions, as in MCP 2025-11-25 and
//!   earlier), with one tool, `progress` (`{steps: integer}`, listed by `tools/list`), that
//!   streams progress notifications. The server's code knows nothing of the tracker.
//! - `GET /streams/{session}`: each stream of an MCP session with its latest id, as JSON.
//!
//! The tracker names each stream by its event ids (`StreamSource::event_id(IdStream::RMCP)`):
//! a tool call's POST response stream and the GET that resumes it with `Last-Event-ID` share a
//! key, and two concurrent calls have two. There is exactly one heartbeat source: rmcp's own
//! keep-alive is off, and the layer sends `: keep-alive` comments where they cannot corrupt an
//! event. MCP 2026-07-28 removed `Last-Event-ID` resumption: for such clients the layer still
//! sends heartbeats and never cuts a request stream on a drain (see `SseTracker::drain`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::routing::get;
use axum::{Json, Router};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ProgressNotificationParam, ServerCapabilities, ServerConfig, Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler};
use serde_json::json;
use tower_sse_tracker::{IdStream, Owner, SseTracker, StreamSource};

/// A tool server as any rmcp application writes it (public for `tests/rmcp.rs`, which lists
/// and calls its tool with rmcp's client).
#[derive(Clone)]
pub struct Tools;

impl ServerHandler for Tools {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        let schema = json!({
            "type": "object",
            "properties": {
                "steps": {
                    "type": "integer",
                    "minimum": 1,
                    "maximum": 1000,
                    "description": "progress notifications to send, 500 ms apart (default 5)"
                }
            }
        });
        let tool = Tool::new(
            "progress",
            "Streams one progress notification per step (send _meta.progressToken), then a result",
            schema.as_object().cloned().unwrap_or_default(),
        );
        Ok(ListToolsResult::with_all_items(vec![tool]))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let steps = request
            .arguments
            .as_ref()
            .and_then(|a| a.get("steps"))
            .and_then(|v| v.as_u64())
            .unwrap_or(5)
            .min(1_000);
        let Some(token) = context.meta.get_progress_token() else {
            return Err(ErrorData::invalid_params(
                "send _meta.progressToken to receive progress",
                None,
            ));
        };
        for step in 1..=steps {
            tokio::time::sleep(Duration::from_millis(500)).await;
            let progress =
                ProgressNotificationParam::new(token.clone(), step as f64).with_total(steps as f64);
            if context.peer.notify_progress(progress).await.is_err() {
                break;
            }
        }
        Ok(CallToolResult::success(vec![ContentBlock::text(format!("{steps} steps done"))]).into())
    }
}

async fn streams(
    State(tracker): State<SseTracker>,
    Path(session): Path<String>,
) -> Json<serde_json::Value> {
    let Ok(owner) = Owner::new(&session) else {
        return Json(json!({ "error": "invalid session id" }));
    };
    let streams: Vec<_> = tracker
        .owner_streams(&owner)
        .into_iter()
        .map(|(stream, latest)| json!({ "stream": stream.as_str(), "latest_id": latest.map(|id| id.to_string()) }))
        .collect();
    Json(json!({ "session": session, "streams": streams }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tower_sse_tracker=debug".into()),
        )
        .init();
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3002".to_owned())
        .parse()?;

    let tracker = SseTracker::builder()
        .heartbeat_interval(Some(Duration::from_secs(5)))
        .stream(StreamSource::event_id(IdStream::RMCP))
        .build()?;
    // Cancelled at exit, so that rmcp ends its sessions' tasks.
    let sessions_done = tokio_util::sync::CancellationToken::new();
    let mcp = StreamableHttpService::new(
        || Ok(Tools),
        Arc::new(LocalSessionManager::default()),
        // One heartbeat source: the layer's.
        StreamableHttpServerConfig::default()
            .with_sse_keep_alive(None)
            .with_cancellation_token(sessions_done.clone()),
    );
    let app = Router::new()
        .nest_service("/mcp", mcp)
        .route("/streams/{session}", get(streams))
        .with_state(tracker.clone())
        .layer(tracker.layer());

    let listener = tokio::net::TcpListener::bind(addr).await?;
    let base = format!("http://{}", listener.local_addr()?);
    println!(
        r#"rmcp server behind tower-sse-tracker on {base}

Try it (copy the mcp-session-id the first command prints into S):

  curl -si {base}/mcp -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d '{{"jsonrpc":"2.0","id":1,"method":"initialize","params":{{"protocolVersion":"2025-06-18","capabilities":{{}},"clientInfo":{{"name":"curl","version":"1"}}}}}}' | grep -i mcp-session-id
  S=<session id>
  curl -s {base}/mcp -H "mcp-session-id: $S" -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d '{{"jsonrpc":"2.0","method":"notifications/initialized"}}'
  curl -sN {base}/mcp -H "mcp-session-id: $S" -H 'content-type: application/json' -H 'accept: application/json, text/event-stream' \
    -d '{{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{{"name":"progress","arguments":{{"steps":5}},"_meta":{{"progressToken":"p1"}}}}}}'

The last one streams events with ids like 1/0, 2/0… Then:

  curl -s {base}/streams/$S       # each stream of the session and its latest id
"#
    );
    let draining = tracker.clone();
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = tokio::signal::ctrl_c().await;
            // Open streams (the standalone GET stream stays open for ever) end at their next
            // event boundary, telling clients to come back in a second; then the server stops.
            draining.drain(Some(Duration::from_secs(1)));
        })
        .await?;
    sessions_done.cancel();
    let report = tracker.shutdown(Duration::from_secs(5)).await;
    println!("shutdown: {report:?}");
    Ok(())
}
