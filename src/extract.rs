//! axum extractors (feature `axum`): [`LastEventId`], [`SessionId`] and [`StreamKey`] straight
//! from the handler's arguments, as the layer put them in the request extensions.
//!
//! Each has two forms. `Option<T>` is `None` when the request carries no such value (no
//! `Last-Event-ID` header, say). `T` rejects such a request with `400 Bad Request`. Both reject
//! with `500 Internal Server Error`, and log an error, when the tracker's layer did not see the
//! request: a route outside the layer is a bug to fix, not a client's fault.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower_sse_tracker::{LastEventId, SseTracker, StreamKey};
//!
//! async fn events(key: StreamKey, last: Option<LastEventId>) -> String {
//!     match last {
//!         Some(LastEventId(id)) => format!("resume {key} after {id}"),
//!         None => format!("start {key}"),
//!     }
//! }
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() {
//! let tracker = SseTracker::builder().build().unwrap();
//! let app: Router = Router::new().route("/events", get(events)).layer(tracker.layer());
//! # let _ = app;
//! # }
//! ```

use std::fmt;

use axum_core::extract::{FromRequestParts, OptionalFromRequestParts};
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::key::{LastEventId, SessionId, StreamKey};
use crate::service::LayerMarker;

/// Why an extractor of this crate refused a request.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExtractRejection {
    /// The tracker's layer did not see the request: the route is not behind
    /// [`SseTracker::layer`](crate::SseTracker::layer). `500 Internal Server Error`.
    LayerMissing(&'static str),
    /// The request carries no such value (for `T`; `Option<T>` gives `None`). `400 Bad
    /// Request`.
    Missing(&'static str),
}

impl fmt::Display for ExtractRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExtractRejection::LayerMissing(what) => write!(
                f,
                "{what} is not available: the route is not behind the SSE tracker's layer"
            ),
            ExtractRejection::Missing(what) => write!(f, "the request has no valid {what}"),
        }
    }
}

impl std::error::Error for ExtractRejection {}

impl IntoResponse for ExtractRejection {
    fn into_response(self) -> Response {
        let status = match self {
            ExtractRejection::LayerMissing(_) => {
                tracing::error!(error = %self, "extractor used on a route outside the tracker's layer");
                StatusCode::INTERNAL_SERVER_ERROR
            }
            ExtractRejection::Missing(_) => StatusCode::BAD_REQUEST,
        };
        (status, self.to_string()).into_response()
    }
}

/// The value of type `T` the layer put in the extensions, `None` when it put none, an error
/// when the layer did not see the request.
fn optional<T: Clone + Send + Sync + 'static>(
    parts: &Parts,
    what: &'static str,
) -> Result<Option<T>, ExtractRejection> {
    if parts.extensions.get::<LayerMarker>().is_none() {
        return Err(ExtractRejection::LayerMissing(what));
    }
    Ok(parts.extensions.get::<T>().cloned())
}

macro_rules! extractor {
    ($ty:ty, $what:literal) => {
        impl<S: Send + Sync> FromRequestParts<S> for $ty {
            type Rejection = ExtractRejection;

            async fn from_request_parts(
                parts: &mut Parts,
                _state: &S,
            ) -> Result<Self, Self::Rejection> {
                optional::<$ty>(parts, $what)?.ok_or(ExtractRejection::Missing($what))
            }
        }

        impl<S: Send + Sync> OptionalFromRequestParts<S> for $ty {
            type Rejection = ExtractRejection;

            async fn from_request_parts(
                parts: &mut Parts,
                _state: &S,
            ) -> Result<Option<Self>, Self::Rejection> {
                optional::<$ty>(parts, $what)
            }
        }
    };
}

extractor!(LastEventId, "Last-Event-ID");
extractor!(SessionId, "session id");
extractor!(
    StreamKey,
    "stream key (no owner on the request, or none of the route's concurrent streams it could name)"
);
