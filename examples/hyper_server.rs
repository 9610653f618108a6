//! The tracker on plain hyper 1 + hyper-util, through `tower::ServiceBuilder`.
//!
//! ```text
//! cargo run --example hyper_server           # listens on 127.0.0.1:3001
//! curl -N -H 'mcp-session-id: s1' http://127.0.0.1:3001/events
//! curl 'http://127.0.0.1:3001/latest?session=s1&stream=GET%20/events'
//! ```

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tower::ServiceBuilder;
use tower_sse_tracker::{LastEventId, SseTracker, StreamKey};

type Body = BoxBody<Bytes, Infallible>;

fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
    *response.status_mut() = status;
    response
}

/// Numbered events, one per 500 ms, resumed after the client's `Last-Event-ID`.
fn events(req: &Request<Incoming>) -> Response<Body> {
    let start = req
        .extensions()
        .get::<LastEventId>()
        .and_then(|LastEventId(id)| id.as_str().parse::<u64>().ok())
        .map_or(1, |n| n + 1);
    let ticks = tokio_stream::wrappers::IntervalStream::new(tokio::time::interval(
        Duration::from_millis(500),
    ));
    let frames = ticks
        .zip(futures_util::stream::iter(start..))
        .map(|(_, n)| {
            Ok::<_, Infallible>(Frame::data(Bytes::from(format!(
                "id: {n}\ndata: event {n}\n\n"
            ))))
        });
    let mut response = Response::new(BodyExt::boxed(StreamBody::new(frames)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/event-stream"),
    );
    response
}

/// `GET /latest?session=..&stream=..`: the latest id the tracker holds for that stream.
fn latest(tracker: &SseTracker, req: &Request<Incoming>) -> Response<Body> {
    let query = req.uri().query().unwrap_or("");
    let param = |name: &str| {
        query
            .split('&')
            .filter_map(|kv| kv.split_once('='))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.replace("%20", " "))
    };
    match (param("session"), param("stream")) {
        (Some(session), Some(stream)) => match StreamKey::try_new(&session, &stream) {
            Ok(key) => match tracker.last_event_id(&key) {
                Some(id) => text(StatusCode::OK, format!("{id}\n")),
                None => text(StatusCode::NOT_FOUND, "no id yet\n".to_owned()),
            },
            Err(error) => text(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        _ => text(
            StatusCode::BAD_REQUEST,
            "query needs session= and stream=\n".to_owned(),
        ),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:3001".to_owned())
        .parse()?;
    let tracker = SseTracker::builder().build()?;

    let handler_tracker = tracker.clone();
    let service =
        ServiceBuilder::new()
            .layer(tracker.layer())
            .service_fn(move |req: Request<Incoming>| {
                let response = match req.uri().path() {
                    "/events" => events(&req),
                    "/latest" => latest(&handler_tracker, &req),
                    _ => text(StatusCode::NOT_FOUND, "not found\n".to_owned()),
                };
                async move { Ok::<_, Infallible>(response) }
            });

    let listener = tokio::net::TcpListener::bind(addr).await?;
    println!("hyper demo listening on http://{}", listener.local_addr()?);
    println!("  curl -N -H 'mcp-session-id: s1' http://{addr}/events");
    println!("  curl 'http://{addr}/latest?session=s1&stream=GET%20/events'");
    loop {
        let (stream, _) = listener.accept().await?;
        let service = TowerToHyperService::new(service.clone());
        tokio::spawn(async move {
            if let Err(error) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                eprintln!("connection error: {error}");
            }
        });
    }
}
