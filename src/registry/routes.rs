//! Route naming: the streams of one owner's route (`route`, `"{route} #2"`…), which of them a
//! request addresses, and what the registry remembers of routes whose streams it evicted.

use std::sync::Arc;

use super::slot::Slot;
use super::{Open, Refused, Registry};
use crate::key::{EventId, Owner, StreamName};
use crate::sync::lock;

/// The most responses of one owner on one route with streams of their own at once, with
/// [`StreamSource::route`](crate::StreamSource::route): the route's stream and `"{route} #2"`
/// to `"{route} #64"`. Beyond, a response is not tracked
/// (`sse_tracker_untracked_streams_total{reason="concurrent"}`).
pub const MAX_CONCURRENT: usize = 64;

/// The one rule of a route's stream names: its `n`-th stream is `route` for 1 and
/// `"{route} #n"` for 2 to [`MAX_CONCURRENT`]. Splits `name` by that rule into its route and
/// index (`(name, 1)` when it has no such suffix: no `#0`, `#007`, `#+5` or index past the
/// limit). Allocates nothing.
fn split_name(name: &str) -> (&str, usize) {
    if let Some((route, digits)) = name.rsplit_once(" #")
        && !digits.starts_with('0')
        && digits.bytes().all(|b| b.is_ascii_digit())
        && let Ok(n) = digits.parse::<usize>()
        && (2..=MAX_CONCURRENT).contains(&n)
    {
        return (route, n);
    }
    (name, 1)
}

/// The name of a route's `n`-th stream (see [`split_name`]), if `n` is within the limit.
fn concurrent_name(route: &StreamName, n: usize) -> Option<StreamName> {
    match n {
        1 => Some(route.clone()),
        2..=MAX_CONCURRENT => StreamName::new(&format!("{route} #{n}")).ok(),
        _ => None,
    }
}

/// The index of one of `route`'s streams, `None` when `name` is not one of them.
pub(super) fn concurrent_index(route: &StreamName, name: &StreamName) -> Option<usize> {
    if name == route {
        return Some(1);
    }
    match split_name(name.as_str()) {
        (of, n) if n > 1 && of == route.as_str() => Some(n),
        _ => None,
    }
}

/// The route a stream name belongs to: `name` without its `" #n"`.
pub(crate) fn route_of(name: &StreamName) -> &str {
    split_name(name.as_str()).0
}

/// The routes (see [`route_of`]) on which an owner lost one of several streams to eviction:
/// several clients of the owner read the route, and a reconnect whose id names no stream
/// here may be for the lost one, which this instance can no longer tell apart from the
/// others. Bounded; past the bound, it stands for every route.
#[derive(Debug, Default)]
pub(super) struct LostRoutes {
    routes: Vec<StreamName>,
    many: bool,
}

/// Routes an owner is remembered losing a stream of, at most.
const MAX_LOST_ROUTES: usize = 8;
/// Owners remembered losing one of several streams of a route, at most (the least recently
/// marked is forgotten first).
pub(super) const MAX_LOST_OWNERS: usize = 16_384;

impl LostRoutes {
    pub(super) fn contains(&self, route: &StreamName) -> bool {
        self.many || self.routes.iter().any(|r| r == route)
    }

    pub(super) fn add(&mut self, name: &StreamName) {
        let route = route_of(name);
        if self.many || self.routes.iter().any(|r| r.as_str() == route) {
            return;
        }
        match StreamName::new(route) {
            Ok(route) if self.routes.len() < MAX_LOST_ROUTES => self.routes.push(route),
            _ => self.many = true,
        }
    }
}

impl Registry {
    /// The slot of a route's stream for a new response: `route` itself, or, when another body
    /// streams into it and the stream is not shared, the first free of `"{route} #2"`,
    /// `"{route} #3"`… up to [`MAX_CONCURRENT`]; `Refused::Busy` when all are taken. A free
    /// `prefer` (the stream the request addressed, one of the route's) comes first.
    pub(crate) fn open_route(
        &self,
        owner: Option<&Owner>,
        route: &StreamName,
        share: bool,
        prefer: Option<&StreamName>,
    ) -> Result<(Arc<Slot>, Option<Arc<Slot>>), Refused> {
        if share {
            return self.get_or_insert(owner, route, Open::Shared);
        }
        if let Some(name) =
            prefer.filter(|name| concurrent_index(route, name).is_some_and(|n| n > 1))
        {
            match self.get_or_insert(owner, name, Open::Exclusive) {
                Err(Refused::Busy) => {}
                other => return other,
            }
        }
        match self.get_or_insert(owner, route, Open::Exclusive) {
            Err(Refused::Busy) => {}
            other => return other,
        }
        for n in 2..=MAX_CONCURRENT {
            let Some(name) = concurrent_name(route, n) else {
                break;
            };
            match self.get_or_insert(owner, &name, Open::Exclusive) {
                Err(Refused::Busy) => continue,
                other => return other,
            }
        }
        Err(Refused::Busy)
    }

    /// The stream of `route` of the owner whose replay log holds `id`: `Ok(None)` when no log
    /// does, `Err(())` when several do (ids that repeat across the owner's streams: which one
    /// the client read cannot be told). The logs are searched with the registry unlocked.
    pub(crate) fn logged_route_stream(
        &self,
        owner: &Owner,
        route: &StreamName,
        id: &EventId,
    ) -> Result<Option<StreamName>, ()> {
        let slots: Vec<Arc<Slot>> = {
            let map = lock(&self.map);
            let Some(entry) = map.sessions.get(owner.as_str()) else {
                return Ok(None);
            };
            entry
                .streams
                .iter()
                .filter(|slot| slot.existing_replay_log().is_some())
                .filter(|slot| concurrent_index(route, &slot.key.stream).is_some())
                .cloned()
                .collect()
        };
        let mut holding = slots.iter().filter(|slot| {
            slot.existing_replay_log()
                .is_some_and(|log| log.holds_id(id.as_str().as_bytes()))
        });
        match (holding.next(), holding.next()) {
            (Some(only), None) => Ok(Some(only.key.stream.clone())),
            (None, _) => Ok(None),
            (Some(_), Some(_)) => Err(()),
        }
    }

    /// The stream of a route that a request addresses, for the key the layer puts in its
    /// extensions (the response's body then prefers that stream: see
    /// [`open_route`](Self::open_route)). The route's streams are `route`, `"{route} #2"`…
    ///
    /// - With a `Last-Event-ID`: the stream whose latest id it is, a closed one first (an
    ///   evicted one whose id waits for the store counts, unless its name is taken again),
    ///   else an open one; `None` when several are. Failing that, with an owner: its only
    ///   stream without an open body (the client's, closed when it dropped); when all have
    ///   open bodies (this instance never served the client's stream), the stream the
    ///   response will get, as without an id. `None` when several closed streams could be the
    ///   client's; when the owner lost one of several streams of the route to eviction (the
    ///   client's could be that one, which nothing here tells apart from the others).
    /// - Without one: the first of the route's streams without an open body, the one the
    ///   response will get (unless another response of the route starts in between); `None`
    ///   when all [`MAX_CONCURRENT`] have one.
    pub(crate) fn address_route(
        &self,
        owner: &str,
        route: &StreamName,
        last_event_id: Option<&str>,
    ) -> Option<StreamName> {
        let map = lock(&self.map);
        // The route's streams that exist, in order of their index.
        let mut streams: Vec<&Arc<Slot>> = map
            .sessions
            .get(owner)
            .map(|entry| {
                entry
                    .streams
                    .iter()
                    .filter(|slot| concurrent_index(route, &slot.key.stream).is_some())
                    .collect()
            })
            .unwrap_or_default();
        streams.sort_by_key(|slot| concurrent_index(route, &slot.key.stream));
        let first_free = || {
            let mut n = 1;
            for slot in &streams {
                if concurrent_index(route, &slot.key.stream) != Some(n) || !slot.is_live() {
                    break;
                }
                n += 1;
            }
            concurrent_name(route, n)
        };
        let Some(id) = last_event_id else {
            return first_free();
        };
        let id = id.as_bytes();
        // The client's stream is one whose latest id it sent: a closed one first (the
        // client's connection ended), among them evicted ones whose id this instance still
        // holds; else an open one (its end not seen yet). Several: any could be the client's.
        // An evicted stream whose name a resident stream holds again is another client's
        // now: its id says only that the client's stream is gone.
        let mut evicted = self.handoff.evicted_with_latest(owner, route, id);
        evicted.retain(|gone| streams.iter().all(|s| s.key.stream != gone.key.stream));
        let mut named: Vec<&StreamName> = Vec::new();
        let closed = streams.iter().copied().filter(|slot| !slot.is_live());
        for slot in closed.chain(evicted.iter()) {
            if slot.latest_is(id) && !named.contains(&&slot.key.stream) {
                named.push(&slot.key.stream);
            }
        }
        if named.is_empty() {
            named = streams
                .iter()
                .filter(|slot| slot.is_live() && slot.latest_is(id))
                .map(|slot| &slot.key.stream)
                .collect();
        }
        match named.as_slice() {
            [only] => return Some((*only).clone()),
            [_, _, ..] => return None,
            [] => {}
        }
        // The id is the latest of no stream here: the client is behind its stream (events
        // were in flight when it dropped), or its stream is one this instance does not hold.
        // The owner's only closed stream of the route is taken for the client's, unless the
        // owner lost one of several streams of the route to eviction (the client's may be
        // that one); with none closed, the response gets a new stream. An owner with one
        // stream per route (an MCP session) is never in doubt, even after its streams were
        // evicted.
        let lost = map
            .lost
            .peek(owner)
            .is_some_and(|lost| lost.contains(route));
        let mut closed = streams.iter().filter(|slot| !slot.is_live());
        match (closed.next(), closed.next()) {
            _ if lost => None,
            (Some(only), None) => Some(only.key.stream.clone()),
            (None, _) => first_free(),
            (Some(_), Some(_)) => None,
        }
    }
}
