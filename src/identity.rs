//! Stream identity: how the key of a response's stream is made, as (owner, stream). The
//! public items are re-exported at the crate root, where their docs say how.

use std::fmt;
use std::sync::Arc;

use http::{Extensions, HeaderMap, HeaderName};

use crate::key::{Owner, SessionId};

type ExtensionFn = Arc<dyn Fn(&Extensions) -> Option<Owner> + Send + Sync>;

/// Where the owner of a stream comes from: the first half of its key (see [`StreamKey`](crate::StreamKey)).
///
/// The owner is who the stream belongs to: by default the session id of the `mcp-session-id`
/// header (MCP 2025-11-25 and earlier), and no one for a request without a session (a
/// browser's `EventSource`, MCP 2026-07-28): its `GET` reads its route's feed; or another
/// header, or a value that an authentication layer put in the request extensions (the
/// principal), for streams that belong to a user. The second half is the stream
/// ([`StreamSource`]).
///
/// # Trust
///
/// The layer does not authenticate anyone. A key is made of what the request says: with the
/// default owner, any client that sends another client's session id in `mcp-session-id` writes
/// into that session's streams. When that matters, take the owner from an authenticated
/// principal that an authentication layer (outside this one) put in the request extensions,
/// with [`OwnerSource::extension`]: then a forged header changes nothing.
///
/// ```
/// use tower_sse_tracker::{IdStream, OwnerSource, SseTracker, StreamSource};
///
/// /// What an authentication layer puts in the request extensions.
/// #[derive(Clone)]
/// struct Principal(String);
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() {
/// let tracker = SseTracker::builder()
///     .owner(OwnerSource::extension(|p: &Principal| Some(p.0.as_str())))
///     .stream(StreamSource::event_id(IdStream::RMCP))
///     .build()
///     .unwrap();
/// # let _ = tracker;
/// # }
/// ```
#[derive(Clone)]
pub struct OwnerSource(pub(crate) OwnerRule);

impl fmt::Debug for OwnerSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for OwnerRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OwnerRule::SessionHeader(h) => write!(f, "OwnerSource::session_header({h})"),
            OwnerRule::Header(h) => write!(f, "OwnerSource::header({h})"),
            OwnerRule::Extension(_) => f.write_str("OwnerSource::extension(..)"),
            OwnerRule::None => f.write_str("OwnerSource::none()"),
        }
    }
}

/// The MCP session header, the default owner source's.
const MCP_SESSION_ID: HeaderName = HeaderName::from_static("mcp-session-id");

impl Default for OwnerSource {
    /// [`session_header`](Self::session_header)`(mcp-session-id)`.
    fn default() -> Self {
        Self::session_header(MCP_SESSION_ID)
    }
}

impl OwnerSource {
    /// A session header (the default: `mcp-session-id`), read on the request and, when the
    /// request has no valid one, on the response, where MCP servers assign it. A valid value
    /// (1 to 128 bytes of visible ASCII) is also put in the request extensions as
    /// [`SessionId`].
    ///
    /// A request with no valid session id on it or on its response (a browser's
    /// `EventSource`, `curl`) is anonymous: with the route as stream source, a `GET` reads its
    /// route's **feed**, one stream that every anonymous reader of the route shares, whose
    /// latest id is the newest event any of them was sent; the layer puts its key,
    /// `(no owner, "GET /path")`, in the request extensions. An anonymous request of another
    /// method (a `POST` streaming an answer) has a stream that no later request can address:
    /// it is not tracked (`reason="anonymous"`, logged at `WARN` once; `not_resumable`, at
    /// `INFO`, for MCP 2026-07-28 requests, which carry no ids), but still gets heartbeats, a
    /// span and drains. Streams that belong to a user need an owner from authentication
    /// ([`extension`](Self::extension)).
    ///
    /// A feed's latest id is the id most recently sent to any of its readers: a handler that
    /// replays older events to one reconnecting reader moves it back to them until the next
    /// live event, so replay through a stream of its own (a [`StreamName`](crate::StreamName)
    /// in the response extensions), and give each topic its own name too (`GET /events?room=1`
    /// and `?room=2` are one route).
    pub fn session_header(name: HeaderName) -> Self {
        Self(OwnerRule::SessionHeader(name))
    }

    /// Any request header, for example one an API gateway sets after authenticating the
    /// client. A stream whose request lacks a valid value is not tracked.
    pub fn header(name: HeaderName) -> Self {
        Self(OwnerRule::Header(name))
    }

    /// A value of type `T` in the request extensions, such as the principal an authentication
    /// layer put there (that layer must run before this one: add it after this layer with
    /// `Router::layer`, or before it with `ServiceBuilder`). `owner` returns the owner's name
    /// (1 to 256 bytes, no control characters). A stream whose request lacks the value is not
    /// tracked.
    ///
    /// ```
    /// use tower_sse_tracker::OwnerSource;
    ///
    /// #[derive(Clone)]
    /// struct Principal {
    ///     user_id: String,
    /// }
    ///
    /// let source = OwnerSource::extension(|p: &Principal| Some(p.user_id.as_str()));
    /// # let _ = source;
    /// ```
    pub fn extension<T: Send + Sync + 'static>(owner: fn(&T) -> Option<&str>) -> Self {
        Self(OwnerRule::Extension(Arc::new(
            move |extensions: &Extensions| {
                extensions
                    .get::<T>()
                    .and_then(owner)
                    .and_then(|name| Owner::new(name).ok())
            },
        )))
    }

    /// No owner: every stream is anonymous, as a request without a session is with
    /// [`session_header`](Self::session_header) (a `GET` reads its route's feed), and no
    /// session header is read at all. Keys are told apart by their stream alone: pair this
    /// with a stream source that names each stream, such as [`StreamSource::event_id`], for
    /// streams of single clients.
    pub fn none() -> Self {
        Self(OwnerRule::None)
    }
}

/// Where the owner comes from.
#[derive(Clone)]
pub(crate) enum OwnerRule {
    SessionHeader(HeaderName),
    Header(HeaderName),
    Extension(ExtensionFn),
    None,
}

/// What the request says of the owner.
#[derive(Debug, Clone)]
pub(crate) enum RequestOwner {
    /// Known: this owner (or none, for a sessionless source).
    Known(Option<Owner>),
    /// Not on the request; the response's session header may name it, else the request is
    /// anonymous.
    FromResponse,
    /// Required, and not there.
    Missing,
}

impl OwnerRule {
    /// The owner a request names, and the session id to put in its extensions.
    pub(crate) fn of_request(
        &self,
        headers: &HeaderMap,
        extensions: &Extensions,
    ) -> (RequestOwner, Option<SessionId>) {
        match self {
            OwnerRule::SessionHeader(name) => {
                match headers
                    .get(name)
                    .and_then(|v| SessionId::from_bytes(v.as_bytes()).ok())
                {
                    Some(session) => (
                        RequestOwner::Known(Some(session.clone().into())),
                        Some(session),
                    ),
                    None => (RequestOwner::FromResponse, None),
                }
            }
            OwnerRule::Header(name) => {
                let owner = headers
                    .get(name)
                    .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .and_then(|v| Owner::new(v).ok());
                (
                    owner.map_or(RequestOwner::Missing, |o| RequestOwner::Known(Some(o))),
                    None,
                )
            }
            OwnerRule::Extension(f) => (
                f(extensions).map_or(RequestOwner::Missing, |o| RequestOwner::Known(Some(o))),
                None,
            ),
            OwnerRule::None => (RequestOwner::Known(None), None),
        }
    }

    /// The owner a response names, when the request named none.
    pub(crate) fn of_response(&self, headers: &HeaderMap) -> Option<Owner> {
        match self {
            OwnerRule::SessionHeader(name) => headers
                .get(name)
                .and_then(|v| SessionId::from_bytes(v.as_bytes()).ok())
                .map(Owner::from),
            _ => None,
        }
    }
}

/// Which stream of its owner a response is: the second half of its key (see [`StreamKey`](crate::StreamKey)).
///
/// By default the route (`"{METHOD} {path}"`, or a [`StreamName`](crate::StreamName) the
/// handler puts in the response extensions), with concurrent responses on one route kept
/// apart; or, for servers whose event ids name their stream (MCP servers do), the stream part
/// of each committed id ([`IdStream`]), so that a POST response stream and the GET that
/// resumes it with `Last-Event-ID` share a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamSource(pub(crate) StreamKind);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StreamKind {
    Route { shared: bool },
    EventId(IdStream),
}

impl Default for StreamSource {
    fn default() -> Self {
        Self::route()
    }
}

impl StreamSource {
    /// The route (the default): the name a handler puts in the response extensions as a
    /// [`StreamName`](crate::StreamName), else `"{METHOD} {path}"` as the layer sees it (the
    /// path without its query). A response on a route whose stream already has an open body of
    /// the same owner gets a stream of its own, named `"{name} #2"`, `"{name} #3"`… (at most
    /// [`MAX_CONCURRENT_STREAMS`](crate::MAX_CONCURRENT_STREAMS) at once; beyond, the response is not tracked and counted with
    /// `reason="concurrent"`), so two concurrent responses of one owner never share a key.
    /// Without an owner, a `GET` reads the route's feed, shared by every anonymous reader, and
    /// other methods are not tracked (see [`OwnerSource::session_header`]). A name the handler
    /// chose is its call: responses with the same `StreamName` share it. Which of a route's streams a request addresses (the
    /// [`StreamKey`](crate::StreamKey) in its extensions, and the stream its response takes)
    /// is described at [`SseTrackerService`](crate::SseTrackerService); ids that name their
    /// stream ([`event_id`](Self::event_id)) tell it without guessing.
    pub fn route() -> Self {
        Self(StreamKind::Route { shared: false })
    }

    /// The route, shared: concurrent responses on one route of one owner are one stream, whose
    /// latest id is the newest of all of them.
    pub fn shared_route() -> Self {
        Self(StreamKind::Route { shared: true })
    }

    /// The stream part of each committed id, through `format`: every id goes to the stream its
    /// id names, and a `Last-Event-ID` resolves to the stream it names (the layer puts that key
    /// in the request extensions). Ids that name no stream go to the route's stream, as with
    /// [`route`](Self::route).
    pub fn event_id(format: IdStream) -> Self {
        Self(StreamKind::EventId(format))
    }
}

/// How an event id names its stream: a function from an id to the part that names its stream.
///
/// ```
/// use tower_sse_tracker::IdStream;
///
/// assert_eq!(IdStream::RMCP.stream_of("3/17"), Some("17"));
/// assert_eq!(IdStream::RMCP.stream_of("3"), None); // rmcp's standalone GET stream
/// assert_eq!(IdStream::MCP_TYPESCRIPT.stream_of("a1b2_1700000000_x9"), Some("a1b2"));
///
/// let custom = IdStream::new("before-dot", |id| id.split_once('.').map(|(s, _)| s));
/// assert_eq!(custom.stream_of("orders.42"), Some("orders"));
/// ```
#[derive(Clone, Copy)]
pub struct IdStream {
    name: &'static str,
    stream_of: fn(&str) -> Option<&str>,
}

impl fmt::Debug for IdStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdStream({})", self.name)
    }
}

impl PartialEq for IdStream {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
    }
}

impl Eq for IdStream {}

fn rmcp(id: &str) -> Option<&str> {
    let (index, request) = id.split_once('/')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(index) && digits(request)).then_some(request)
}

fn mcp_typescript(id: &str) -> Option<&str> {
    let (stream, _) = id.split_once('_')?;
    (!stream.is_empty()).then_some(stream)
}

impl IdStream {
    /// rmcp (the official Rust SDK): a POST response stream's ids are
    /// `"{index}/{http_request_id}"`; the stream is the request id. The ids of the standalone
    /// GET stream, `"{index}"`, name no stream (they go to the route's stream).
    pub const RMCP: IdStream = IdStream {
        name: "rmcp",
        stream_of: rmcp,
    };

    /// The MCP TypeScript SDK's event stores: `"{streamId}_{…}"`; the stream is the part
    /// before the first `_`.
    pub const MCP_TYPESCRIPT: IdStream = IdStream {
        name: "mcp-typescript",
        stream_of: mcp_typescript,
    };

    /// A format of your own: `stream_of` returns the part of an id that names its stream, or
    /// `None` when the id names none.
    pub const fn new(name: &'static str, stream_of: fn(&str) -> Option<&str>) -> Self {
        Self { name, stream_of }
    }

    /// The part of `id` that names its stream, if any.
    pub fn stream_of<'a>(&self, id: &'a str) -> Option<&'a str> {
        (self.stream_of)(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_presets_take_the_stream_part_and_refuse_other_shapes() {
        for (id, stream) in [
            ("0/0", Some("0")),
            ("12/345", Some("345")),
            ("12", None),
            ("/3", None),
            ("a/3", None),
            ("3/", None),
            ("1/2/3", None),
        ] {
            assert_eq!(IdStream::RMCP.stream_of(id), stream, "{id}");
        }
        assert_eq!(IdStream::MCP_TYPESCRIPT.stream_of("s_1_2"), Some("s"));
        assert_eq!(IdStream::MCP_TYPESCRIPT.stream_of("_1"), None);
        assert_eq!(IdStream::MCP_TYPESCRIPT.stream_of("plain"), None);
    }

    #[test]
    fn owners_come_from_their_source() {
        let mut headers = HeaderMap::new();
        headers.insert("mcp-session-id", "s1".parse().unwrap());
        headers.insert("x-user", "alice".parse().unwrap());
        let mut extensions = Extensions::new();
        #[derive(Clone)]
        struct Principal(String);
        extensions.insert(Principal("bob".into()));
        let rule = |source: OwnerSource| source.0;
        let owner = |source| match rule(source).of_request(&headers, &extensions).0 {
            RequestOwner::Known(owner) => owner.map(|o| o.to_string()),
            other => panic!("{other:?}"),
        };
        assert_eq!(owner(OwnerSource::default()).as_deref(), Some("s1"));
        assert_eq!(
            owner(OwnerSource::header(HeaderName::from_static("x-user"))).as_deref(),
            Some("alice")
        );
        assert_eq!(
            owner(OwnerSource::extension(|p: &Principal| Some(p.0.as_str()))).as_deref(),
            Some("bob")
        );
        assert_eq!(owner(OwnerSource::none()), None);
        let missing = rule(OwnerSource::header(HeaderName::from_static("x-other")))
            .of_request(&headers, &extensions);
        assert!(matches!(missing.0, RequestOwner::Missing));
    }
}
