//! Driving the layer without sockets: a service whose SSE body yields the frames found in the
//! request extensions, always ready, so driving it involves no I/O and no timer.

use std::convert::Infallible;

use bytes::Bytes;
use http::{Request, Response, header};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_sse_tracker::SseTracker;

pub type Frames = Vec<Bytes>;

/// The layer over an always-ready SSE body of the request's [`Frames`].
pub fn frames_service(
    tracker: &SseTracker,
) -> impl Service<
    Request<()>,
    Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>>,
    Error = Infallible,
> + Clone
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(|mut req: Request<()>| async move {
            let frames: Frames = req.extensions_mut().remove().unwrap_or_default();
            let body = StreamBody::new(futures_util::stream::iter(
                frames
                    .into_iter()
                    .map(|f| Ok::<_, Infallible>(Frame::data(f))),
            ));
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, Infallible>(response)
        })
}

/// `GET /mcp` for `session`, with the frames its body will yield.
pub fn request(session: &str, frames: Frames) -> Request<()> {
    let mut req = Request::builder()
        .uri("/mcp")
        .header("mcp-session-id", session)
        .body(())
        .unwrap();
    req.extensions_mut().insert(frames);
    req
}

/// `n` frames, one event with an id each.
pub fn id_frames(n: usize) -> Frames {
    (1..=n)
        .map(|i| Bytes::from(format!("id: {i}\n\n")))
        .collect()
}

/// Sends one request through `svc` and returns its response.
pub async fn respond<S>(svc: &mut S, req: Request<()>) -> S::Response
where
    S: Service<Request<()>>,
    S::Error: std::fmt::Debug,
{
    svc.ready().await.unwrap().call(req).await.unwrap()
}

/// Sends one request and reads its body to the end.
pub async fn drive(
    svc: &mut (
             impl Service<
        Request<()>,
        Response = Response<impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin>,
        Error = Infallible,
    > + Clone
         ),
    session: &str,
    frames: Frames,
) {
    let mut body = respond(svc, request(session, frames)).await.into_body();
    while let Some(frame) = body.frame().await {
        frame.unwrap();
    }
}
