//! Tower middleware that makes Server-Sent Events streams trackable and resumable.
//!
//! Add [`SseTracker::layer`] to an axum `Router` or any tower/hyper service. For every response
//! with `Content-Type: text/event-stream` the layer passes every byte through in the same
//! frames, keeps the latest event id of the stream, sends heartbeat comments where they cannot
//! change an event, and hands changed streams to one background worker that writes their
//! latest ids to a store; a store that fails never reaches the streams.
//!
//! # How a frame travels
//!
//! [`SseTrackerLayer`] makes an [`SseTrackerService`], which reads each request's owner, the
//! [`StreamKey`] it addresses and its [`LastEventId`] (put in the request extensions) →
//! [`ResponseFuture`] decides whether the response is SSE and how to track it →
//! [`TrackedBody`] passes each frame on and feeds it to a [`scan::Scanner`] (the WHATWG rules)
//! → each dispatched id becomes the latest of the stream's slot in the registry
//! ([`SseTracker::last_event_id`], [`SseTracker::subscribe`]) → the first change since the
//! last flush hands the stream to the worker ([`WorkerTask`]) → the worker batches, coalesces
//! and retries in time order → [`store::Store`] ([`store::InMemoryStore`] by default).
//! [`SseTracker::resume`] answers where a reconnecting client stands, [`SseTracker::drain`]
//! ends streams for a deploy, [`SseTracker::shutdown`] writes what is pending. Inside, one
//! module does one job: `src/registry/` (slots, routes, the hand-off), `src/body/`,
//! `src/worker/`, `src/store/`.
//!
//! Each stream has a key, [`StreamKey`]: its owner ([`OwnerSource`]) and its name
//! ([`StreamSource`]). By default the owner is the session id of the `mcp-session-id` header (MCP Streamable HTTP), on the
//! request or else on the response, and the name is `"{METHOD} {path}"` (or a [`StreamName`]
//! the handler puts in the response extensions), concurrent responses on one route getting
//! names of their own. A `GET` with no session (a browser's `EventSource`) reads its route's
//! feed, one stream shared by every such reader; an anonymous request of another method is not
//! tracked (logged once). Owners taken from an authenticated principal, and streams named by
//! their event ids (MCP SDKs), are one builder setting away. The layer puts the key of the
//! stream a request addresses in its extensions.
//!
//! With [`SseTrackerBuilder::replay`], each tracked stream also keeps a bounded log of its
//! events' exact bytes (`src/replay/`): a request whose `Last-Event-ID` is in its stream's log
//! gets the events after it first, once each, and its handler a [`Replay`] extension saying so;
//! when they are gone, nothing is replayed and the response's [`REPLAY_HEADER`] says why. A
//! response marked [`Detach`] goes on without its client, and a reconnect follows it from
//! the log.
//!
//! Whether a client can resume a stream decides what a drain does to it: a stream whose events
//! carry ids ends at its next event boundary, one without (an answer streamed on a POST, an
//! MCP 2026-07-28 request) runs to its end; see [`SseTracker::drain`].
//!
//! # Quick start
//!
//! ```
//! use std::{convert::Infallible, time::Duration};
//! use axum::{Extension, Router, response::sse::{Event, Sse}, routing::get};
//! use futures_util::stream::{self, Stream};
//! use tower_sse_tracker::{LastEventId, SseTracker, StreamKey};
//!
//! async fn events(last: Option<Extension<LastEventId>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
//!     // Resume after the id the client last saw, if any.
//!     let start = last
//!         .and_then(|Extension(LastEventId(id))| id.as_str().parse::<u64>().ok())
//!         .map_or(0, |n| n + 1);
//!     Sse::new(stream::iter((start..start + 3).map(|n| {
//!         Ok(Event::default().id(n.to_string()).data(format!("event {n}")))
//!     })))
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tracker = SseTracker::builder()
//!     .heartbeat_interval(Some(Duration::from_secs(15)))
//!     .build()
//!     .expect("valid settings");
//! let app: Router = Router::new().route("/mcp", get(events)).layer(tracker.layer());
//!
//! // Serve `app` as usual; then, for a client with `mcp-session-id: s1` (a handler finds this
//! // key in its request extensions):
//! let key = StreamKey::try_new("s1", "GET /mcp").unwrap();
//! let latest = tracker.last_event_id(&key); // Option<EventId>
//! # let _ = (app, latest);
//! # }
//! ```
//!
//! # Feature flags
//!
//! | feature | default | what it adds |
//! |---|---|---|
//! | `redis` | no | `store::RedisStore`: a store shared by several instances, on a standalone Redis or a Redis Cluster (redis-rs) |
//! | `axum` | no | `extract`: axum extractors for [`LastEventId`], [`SessionId`] and [`StreamKey`] (axum-core) |
//!
//! # What "latest id" means
//!
//! The latest id of a stream is the id of the newest event that the layer has handed to the
//! HTTP stack on that stream: it may still be in a socket buffer, and no client acknowledges
//! it. An event cut off by the end of the stream never counts.

// `unsafe` is allowed in one place only: the scanner's 16-byte SSE2 compare (`scan::sse2`, which
// says why).
#![deny(unsafe_code, unreachable_pub, missing_docs)]
#![cfg_attr(docsrs, feature(doc_cfg))]

// The README's Rust code blocks are compiled as doc tests, so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

mod body;
mod builder;
#[cfg(feature = "axum")]
#[cfg_attr(docsrs, doc(cfg(feature = "axum")))]
pub mod extract;
mod future;
mod identity;
mod key;
mod layer;
pub mod metrics;
mod protocol;
mod registry;
mod replay;
pub mod scan;
mod service;
mod shared;
pub mod store;
mod sync;
mod tracker;
mod worker;

pub use body::TrackedBody;
pub use builder::{ConfigError, SseTrackerBuilder};
pub use future::ResponseFuture;
pub use identity::{IdStream, OwnerSource, StreamSource};
pub use key::{EventId, InvalidKey, LastEventId, Owner, SessionId, StreamKey, StreamName};
pub use layer::SseTrackerLayer;
pub use registry::routes::MAX_CONCURRENT as MAX_CONCURRENT_STREAMS;
pub use replay::{Detach, GapReason, Position, REPLAY_HEADER, Replay, ReplayPolicy};
pub use service::SseTrackerService;
pub use tracker::{Resume, SseTracker, SubscribeError};
pub use worker::retry::RetryPolicy;
pub use worker::{ShutdownReport, WorkerTask};
