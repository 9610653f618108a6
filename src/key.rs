//! Identifiers: sessions, owners, stream names, stream keys and event ids.
//!
//! All of them are cheap to clone (`Arc<str>` inside) and are validated when they come from
//! outside the process, so that a client cannot make the tracker hold arbitrary bytes.

use std::borrow::Borrow;
use std::fmt;
use std::sync::Arc;

/// Longest session id accepted, in bytes.
pub(crate) const MAX_SESSION_ID_LEN: usize = 128;

/// Longest stream name accepted, in bytes.
pub(crate) const MAX_STREAM_NAME_LEN: usize = 512;

/// Longest owner accepted, in bytes.
pub(crate) const MAX_OWNER_LEN: usize = 256;

/// Why a session id, an owner or a stream name was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The value is empty.
    Empty,
    /// The value is longer than the limit (given) in bytes.
    TooLong(usize),
    /// The value holds a byte that is not allowed (given, with its offset).
    BadByte {
        /// Offset of the first refused byte.
        at: usize,
        /// The refused byte.
        byte: u8,
    },
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            InvalidKey::Empty => f.write_str("value is empty"),
            InvalidKey::TooLong(max) => write!(f, "value is longer than {max} bytes"),
            InvalidKey::BadByte { at, byte } => {
                write!(f, "byte 0x{byte:02x} at offset {at} is not allowed")
            }
        }
    }
}

impl std::error::Error for InvalidKey {}

fn check(value: &[u8], max: usize, allowed: impl Fn(u8) -> bool) -> Result<(), InvalidKey> {
    if value.is_empty() {
        return Err(InvalidKey::Empty);
    }
    if value.len() > max {
        return Err(InvalidKey::TooLong(max));
    }
    match value.iter().position(|&b| !allowed(b)) {
        Some(at) => Err(InvalidKey::BadByte {
            at,
            byte: value[at],
        }),
        None => Ok(()),
    }
}

macro_rules! str_newtype {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Arc<str>);

        impl $name {
            /// The value as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Borrow<str> for $name {
            fn borrow(&self) -> &str {
                &self.0
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                &*self.0 == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                &*self.0 == *other
            }
        }
    };
}

str_newtype!(
    /// A client's session id: 1 to 128 bytes of visible ASCII (`0x21..=0x7e`).
    ///
    /// It comes from a request or response header, so it is validated before the tracker keeps
    /// it; a value that fails validation is treated as absent.
    ///
    /// ```
    /// use tower_sse_tracker::SessionId;
    ///
    /// let id = SessionId::new("4f1c-a9").unwrap();
    /// assert_eq!(id.as_str(), "4f1c-a9");
    /// assert!(SessionId::new("has space").is_err());
    /// assert!(SessionId::new("").is_err());
    /// ```
    SessionId
);

impl SessionId {
    /// Validates `value` as a session id.
    pub fn new(value: &str) -> Result<Self, InvalidKey> {
        Self::from_bytes(value.as_bytes())
    }

    /// Validates raw header bytes as a session id.
    pub fn from_bytes(value: &[u8]) -> Result<Self, InvalidKey> {
        check(value, MAX_SESSION_ID_LEN, |b| b.is_ascii_graphic())?;
        // Visible ASCII is valid UTF-8.
        let s = std::str::from_utf8(value).expect("visible ASCII is UTF-8");
        Ok(Self(Arc::from(s)))
    }
}

str_newtype!(
    /// The name of one stream of a session, such as `"GET /mcp"`.
    ///
    /// The layer names a stream `"{METHOD} {path}"` by default. A handler can choose another name
    /// by putting a `StreamName` in the response extensions, for example to keep two streams that
    /// share a path apart:
    ///
    /// ```
    /// use tower_sse_tracker::StreamName;
    ///
    /// let mut response = http::Response::new(());
    /// response.extensions_mut().insert(StreamName::new("notifications").unwrap());
    /// ```
    ///
    /// A name is 1 to 512 bytes with no control characters.
    StreamName
);

impl StreamName {
    /// Validates `value` as a stream name.
    pub fn new(value: &str) -> Result<Self, InvalidKey> {
        check(value.as_bytes(), MAX_STREAM_NAME_LEN, |b| {
            !b.is_ascii_control()
        })?;
        Ok(Self(Arc::from(value)))
    }

    /// Whether `value` is a valid stream name (without making one).
    pub fn is_valid(value: &str) -> bool {
        check(value.as_bytes(), MAX_STREAM_NAME_LEN, |b| {
            !b.is_ascii_control()
        })
        .is_ok()
    }

    /// The default name of a request's stream: `"{METHOD} {path}"`.
    pub(crate) fn for_request(method: &http::Method, path: &str) -> Result<Self, InvalidKey> {
        let mut name = String::with_capacity(method.as_str().len() + 1 + path.len());
        name.push_str(method.as_str());
        name.push(' ');
        name.push_str(path);
        Self::new(&name)
    }
}

str_newtype!(
    /// Who a stream belongs to: the first half of a [`StreamKey`]. By default the session id of
    /// MCP's `mcp-session-id` header; or another header, or a value an authentication layer put
    /// in the request extensions (see [`OwnerSource`](crate::OwnerSource)).
    ///
    /// 1 to 256 bytes of UTF-8 with no control characters.
    ///
    /// ```
    /// use tower_sse_tracker::{Owner, SessionId};
    ///
    /// let owner = Owner::new("alice@example.com").unwrap();
    /// assert_eq!(owner.as_str(), "alice@example.com");
    /// assert!(Owner::new("a\nb").is_err());
    /// let from_session: Owner = SessionId::new("4f1c").unwrap().into();
    /// assert_eq!(from_session, "4f1c");
    /// ```
    Owner
);

impl Owner {
    /// Validates `value` as an owner.
    pub fn new(value: &str) -> Result<Self, InvalidKey> {
        check(value.as_bytes(), MAX_OWNER_LEN, |b| !b.is_ascii_control())?;
        Ok(Self(Arc::from(value)))
    }
}

impl From<SessionId> for Owner {
    fn from(session: SessionId) -> Self {
        // Visible ASCII of at most 128 bytes is a valid owner.
        Self(session.0)
    }
}

/// The key of one tracked stream: its owner (none for sessionless streams) and its name.
///
/// Two streams have the same key only when the configuration says they are one stream: by
/// default, two concurrent responses on one route of one owner get different names (see
/// [`StreamSource`](crate::StreamSource)).
///
/// ```
/// use tower_sse_tracker::StreamKey;
///
/// let key = StreamKey::try_new("session-1", "GET /mcp").unwrap();
/// assert_eq!(key.to_string(), "session-1 / GET /mcp");
/// let sessionless = StreamKey::try_unowned("3f2a-stream").unwrap();
/// assert_eq!(sessionless.owner, None);
/// assert_eq!(sessionless.to_string(), "- / 3f2a-stream");
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StreamKey {
    /// Who the stream belongs to; `None` for sessionless streams.
    pub owner: Option<Owner>,
    /// The stream's name.
    pub stream: StreamName,
}

impl StreamKey {
    /// The key of `stream` of `owner`.
    pub fn new(owner: impl Into<Owner>, stream: StreamName) -> Self {
        Self {
            owner: Some(owner.into()),
            stream,
        }
    }

    /// The key of a stream that belongs to no one (sessionless).
    pub fn unowned(stream: StreamName) -> Self {
        Self {
            owner: None,
            stream,
        }
    }

    /// Validates both parts and makes the key.
    pub fn try_new(owner: &str, stream: &str) -> Result<Self, InvalidKey> {
        Ok(Self::new(Owner::new(owner)?, StreamName::new(stream)?))
    }

    /// Validates the name and makes the key of a stream that belongs to no one.
    pub fn try_unowned(stream: &str) -> Result<Self, InvalidKey> {
        Ok(Self::unowned(StreamName::new(stream)?))
    }
}

impl fmt::Display for StreamKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.owner {
            Some(owner) => write!(f, "{owner} / {}", self.stream),
            None => write!(f, "- / {}", self.stream),
        }
    }
}

str_newtype!(
    /// The id of a dispatched SSE event, as a client's `EventSource` would report it.
    ///
    /// An empty id is meaningful: an `id` field with no value resets the client's last event id,
    /// after which it reconnects without a `Last-Event-ID` header.
    ///
    /// ```
    /// use tower_sse_tracker::EventId;
    ///
    /// let id = EventId::new("42").unwrap();
    /// assert_eq!(id, "42");
    /// assert!(EventId::new("a\0b").is_err()); // clients ignore ids with NUL
    /// ```
    EventId
);

impl EventId {
    /// Checks `value` as an event id: no NUL, CR or LF (an SSE `id` field cannot carry them).
    pub fn new(value: &str) -> Result<Self, InvalidKey> {
        if let Some(at) = value.bytes().position(|b| matches!(b, 0 | b'\r' | b'\n')) {
            return Err(InvalidKey::BadByte {
                at,
                byte: value.as_bytes()[at],
            });
        }
        Ok(Self(Arc::from(value)))
    }

    /// Builds an id from bytes the scanner has already checked (no NUL, valid UTF-8, which the
    /// scanner refuses otherwise; should it ever get another, U+FFFD replaces what is invalid).
    pub(crate) fn from_scanned(bytes: &[u8]) -> Self {
        match std::str::from_utf8(bytes) {
            Ok(s) => Self(Arc::from(s)),
            Err(_) => Self(Arc::from(String::from_utf8_lossy(bytes).as_ref())),
        }
    }

    /// Whether this is the empty id that resets a client's last event id.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The client's `Last-Event-ID` request header, validated, put in the request extensions by
/// the layer so that a handler can resume a stream without parsing headers.
///
/// It is present only when the header is present, valid UTF-8, no longer than the tracker's id
/// limit, and free of NUL.
///
/// ```
/// use axum::Extension;
/// use tower_sse_tracker::LastEventId;
///
/// async fn handler(last: Option<Extension<LastEventId>>) -> String {
///     match last {
///         Some(Extension(LastEventId(id))) => format!("resume after {id}"),
///         None => "start from the beginning".to_owned(),
///     }
/// }
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LastEventId(pub EventId);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_id_accepts_visible_ascii_up_to_128_bytes() {
        assert!(SessionId::new(&"a".repeat(128)).is_ok());
        assert_eq!(
            SessionId::new(&"a".repeat(129)),
            Err(InvalidKey::TooLong(128))
        );
        assert_eq!(
            SessionId::new("ab\tc"),
            Err(InvalidKey::BadByte { at: 2, byte: b'\t' })
        );
        assert!(SessionId::from_bytes(b"caf\xc3\xa9").is_err());
        assert_eq!(SessionId::new(""), Err(InvalidKey::Empty));
    }

    #[test]
    fn stream_name_refuses_control_characters() {
        assert!(StreamName::new("GET /mcp").is_ok());
        assert!(StreamName::new("GET /a\nb").is_err());
        assert_eq!(
            StreamName::for_request(&http::Method::POST, "/x").unwrap(),
            "POST /x"
        );
    }

    #[test]
    fn event_id_from_invalid_utf8_is_decoded_lossily() {
        assert_eq!(EventId::from_scanned(b"a\xffb"), "a\u{fffd}b");
    }
}
