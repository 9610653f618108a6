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

/// The frames of a body fed while it streams: the receiving end, put in the request extensions
/// (which want `Clone`; the handler takes it out).
#[derive(Clone)]
pub struct Feed(
    std::sync::Arc<std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<Bytes>>>>,
);

/// The layer over an SSE body that yields what the request's [`Feed`] receives, until its
/// sender is dropped.
pub fn fed_service(
    tracker: &SseTracker,
) -> impl Service<
    Request<()>,
    Response = Response<
        tower_sse_tracker::TrackedBody<
            impl http_body::Body<Data = Bytes, Error = Infallible> + Unpin + use<>,
        >,
    >,
    Error = Infallible,
> + Clone
+ use<> {
    ServiceBuilder::new()
        .layer(tracker.layer())
        .service_fn(|mut req: Request<()>| async move {
            let Feed(rx) = req.extensions_mut().remove().expect("a Feed extension");
            let rx = rx.lock().unwrap().take().expect("an unused Feed");
            let frames = futures_util::stream::unfold(rx, |mut rx| async move {
                let frame = rx.recv().await?;
                Some((Ok::<_, Infallible>(Frame::data(frame)), rx))
            });
            let body = StreamBody::new(Box::pin(frames));
            let mut response = Response::new(body);
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, Infallible>(response)
        })
}

/// `GET /mcp` for `session`, whose body yields what is sent on the returned sender.
pub fn fed_request(session: &str) -> (tokio::sync::mpsc::UnboundedSender<Bytes>, Request<()>) {
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    let mut req = Request::builder()
        .uri("/mcp")
        .header("mcp-session-id", session)
        .body(())
        .unwrap();
    req.extensions_mut()
        .insert(Feed(std::sync::Arc::new(std::sync::Mutex::new(Some(rx)))));
    (tx, req)
}
