//! An incremental Server-Sent Events scanner that finds dispatched event ids.
//!
//! [`Scanner`] is fed the bytes of a `text/event-stream` body one frame at a time, in whatever
//! pieces the network or the application produced, and follows the WHATWG rules for
//! [interpreting an event stream](https://html.spec.whatwg.org/multipage/server-sent-events.html#event-stream-interpretation)
//! as far as ids are concerned:
//!
//! - lines end with CRLF, LF or a lone CR, and any line end may be split across frames (a CR at
//!   the end of one frame and a LF at the start of the next are one line end);
//! - one leading byte order mark is dropped, even when it is split across frames;
//! - a line starting with `:` is a comment; a line without a colon is a field with an empty
//!   value; one space after the colon is dropped;
//! - an `id` field whose value contains NUL is ignored; an `id` field with an empty value resets
//!   the id to empty;
//! - an `id` field whose value is not valid UTF-8 is ignored too (a departure from browsers,
//!   which decode such an id lossily: the lossy id could not be matched when a client echoes it
//!   in `Last-Event-ID`, and it could be three times as long);
//! - the id is *committed* when its event is dispatched by a blank line, also for an event that
//!   has an id and no data; an event cut off by the end of the stream is never committed.
//!
//! A commit happens at each blank line that follows at least one accepted `id` field since the
//! previous blank line; its value is the last accepted id. Line ends are found 64 bytes at a time
//! (SIMD compares on x86-64) and only the start of each line is looked at, so values of all
//! other fields are skipped, never copied, and the scanner's memory is bounded by the id limit
//! whatever the input: an id longer than the limit (1 KiB by default) is ignored and counted in
//! [`Feed::ids_rejected`]. Feeding a frame never allocates once the id buffers have grown to the
//! size of the ids in use.
//!
//! ```
//! use tower_sse_tracker::scan::Scanner;
//!
//! let mut scanner = Scanner::new();
//! let feed = scanner.feed(b"id: 7\ndata: hel");
//! assert_eq!(feed.ids, 0); // the event has not been dispatched yet
//! let feed = scanner.feed(b"lo\n\n");
//! assert_eq!((feed.events, feed.ids), (1, 1));
//! assert_eq!(scanner.last_committed(), Some(&b"7"[..]));
//! ```

use std::mem;

/// Default limit on the length of an event id, in bytes.
pub(crate) const DEFAULT_MAX_ID_LEN: usize = 1024;

pub(crate) const BOM: [u8; 3] = [0xEF, 0xBB, 0xBF];
/// `bom` value once the byte order mark window is closed (matched, refused or never possible).
const BOM_CLOSED: u8 = 3;

/// What one call to [`Scanner::feed`] found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Feed {
    /// Events dispatched: blank lines that ended a block with at least one field line.
    pub events: usize,
    /// Ids committed (see the [module docs](self)).
    pub ids: usize,
    /// `id` fields ignored because they hold NUL, are not valid UTF-8, or are longer than the
    /// limit.
    pub ids_rejected: usize,
}

/// Where the scanner stands between two frames: what can be inserted there without changing
/// the meaning of the stream for a client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Boundary {
    /// Between events: no field line since the last blank line. A whole comment event
    /// (`: text\n\n`) can be inserted.
    Event,
    /// At the start of a line inside an event. Only a comment line (`: text\n`) can be
    /// inserted; a blank line would dispatch the event early.
    Line,
    /// In the middle of a line (or of a byte order mark): nothing can be inserted.
    Inside,
}

/// The line ends (CR and LF) of a buffer, in order, found 64 bytes at a time.
///
/// Each 64-byte block is turned into a bit mask of its CR and LF bytes, 16 bytes per SIMD
/// compare (SSE2, part of x86-64), and line ends are then read off the mask with a
/// bit scan. An SSE frame holds a few short lines, so one pass over the frame is cheaper than a
/// search per line, which pays its set-up cost per line.
struct LineEnds<'a> {
    buf: &'a [u8],
    /// Start of the block `mask` covers.
    block: usize,
    /// Line ends of the block not yet returned: bit `i` is byte `block + i`.
    mask: u64,
}

impl<'a> LineEnds<'a> {
    /// The line ends of `buf` at or after `from`.
    #[inline]
    fn new(buf: &'a [u8], from: usize) -> Self {
        let block = from.min(buf.len());
        Self {
            buf,
            block,
            mask: block_mask(buf, block),
        }
    }
}

impl Iterator for LineEnds<'_> {
    type Item = usize;

    #[inline]
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.mask != 0 {
                let bit = self.mask.trailing_zeros() as usize;
                self.mask &= self.mask - 1;
                return Some(self.block + bit);
            }
            self.block += 64;
            if self.block >= self.buf.len() {
                return None;
            }
            self.mask = block_mask(self.buf, self.block);
        }
    }
}

/// The CR and LF bytes of `buf[start..start + 64]` (or to its end) as a bit mask.
#[inline]
fn block_mask(buf: &[u8], start: usize) -> u64 {
    let rest = &buf[start..];
    if let Some(block) = rest.first_chunk::<64>() {
        let mut mask = 0;
        for (i, chunk) in block.chunks_exact(16).enumerate() {
            let chunk: &[u8; 16] = chunk.try_into().expect("16 bytes");
            mask |= u64::from(chunk_mask(chunk)) << (16 * i);
        }
        return mask;
    }
    let mut mask = 0;
    let mut i = 0;
    while let Some(chunk) = rest[i..].first_chunk::<16>() {
        mask |= u64::from(chunk_mask(chunk)) << i;
        i += 16;
    }
    let left = rest.len() - i;
    if left == 0 {
        return mask;
    }
    match buf.last_chunk::<16>() {
        // The last 16 bytes of `buf`, which end with the `left` bytes still to do: the bits of
        // the bytes before them (done already, or before `start`) are shifted out.
        Some(last) => mask | (u64::from(chunk_mask(last)) >> (16 - left)) << i,
        // A buffer shorter than 16 bytes.
        None => rest[i..]
            .iter()
            .enumerate()
            .filter(|(_, b)| is_line_end(**b))
            .fold(mask, |mask, (j, _)| mask | 1 << (i + j)),
    }
}

fn is_line_end(b: u8) -> bool {
    b == b'\r' || b == b'\n'
}

/// The CR and LF bytes of 16 bytes as a bit mask.
#[inline]
fn chunk_mask(chunk: &[u8; 16]) -> u16 {
    #[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
    {
        sse2::chunk_mask(chunk)
    }
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse2")))]
    {
        chunk_mask_portable(chunk)
    }
}

/// [`chunk_mask`] without SIMD: one compare per byte.
#[cfg_attr(all(target_arch = "x86_64", target_feature = "sse2"), allow(dead_code))]
fn chunk_mask_portable(chunk: &[u8; 16]) -> u16 {
    let mut mask = 0;
    for (i, &b) in chunk.iter().enumerate() {
        mask |= u16::from(is_line_end(b)) << i;
    }
    mask
}

/// The crate's only `unsafe` code: an unaligned 16-byte load, two byte compares, an or and a
/// byte mask move (SSE2).
///
/// Safe Rust has no way to say "compare 16 bytes at once and give me a bit per byte": the
/// compiler turns the byte loop of [`chunk_mask_portable`] into a long run of shuffles
/// instead of `pmovmskb`, and `std::arch` intrinsics need `unsafe` outside a
/// `#[target_feature]` function even when the feature is always there. Scanning is most of the
/// layer's cost on small frames, so this one function is allowed its `unsafe`.
#[cfg(all(target_arch = "x86_64", target_feature = "sse2"))]
#[allow(unsafe_code)]
mod sse2 {
    use std::arch::x86_64::{
        __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
    };

    #[inline]
    pub(super) fn chunk_mask(chunk: &[u8; 16]) -> u16 {
        // SAFETY: this module is compiled only when SSE2 is enabled for the target (it is part
        // of the x86-64 baseline), so the instructions exist on every CPU the code runs on;
        // `_mm_loadu_si128` has no alignment requirement and reads exactly the 16 bytes that
        // `chunk` borrows.
        unsafe {
            let v = _mm_loadu_si128(chunk.as_ptr().cast::<__m128i>());
            let cr = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\r' as i8));
            let lf = _mm_cmpeq_epi8(v, _mm_set1_epi8(b'\n' as i8));
            _mm_movemask_epi8(_mm_or_si128(cr, lf)) as u16
        }
    }
}

/// Whether an `id` value is kept: no NUL (clients ignore those), and valid UTF-8 (a client
/// decodes the stream lossily, so such an id could never be echoed back byte for byte).
#[inline]
fn acceptable_id(value: &[u8]) -> bool {
    // Ids are nearly always short ASCII: checked byte by byte without the UTF-8 decoder.
    if value.iter().all(|&b| b != 0 && b < 0x80) {
        return true;
    }
    !value.contains(&0) && std::str::from_utf8(value).is_ok()
}

/// The state of the line being read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Line {
    /// Nothing of the line seen yet.
    Start,
    /// The field name so far is `i`.
    NameI,
    /// The field name so far is `id`.
    NameId,
    /// The rest of the line does not matter (a comment, another field, a longer name).
    Skip,
    /// Right after `id:`; a single space here is dropped.
    IdValueStart,
    /// Reading the value of an `id` field.
    IdValue,
}

/// What a scan tells its caller as it goes: each committed id, and where each blank line
/// ends, with whether it dispatched an event. A closure over ids is one (it ignores blank
/// lines).
pub(crate) trait Sink {
    /// An id was committed (its event is being dispatched: [`blank_line`](Self::blank_line)
    /// follows).
    fn commit(&mut self, id: &[u8]);
    /// Whether the sink is told where ids lie ([`commit_at`](Self::commit_at)); the scan for
    /// others does not look.
    const POSITIONS: bool = false;
    /// [`commit`](Self::commit), for an id whose value lies at `at` in the chunk given to
    /// [`Scanner::feed_sink`] (its `id` line lay whole in that chunk).
    #[inline]
    fn commit_at(&mut self, id: &[u8], at: usize) {
        let _ = at;
        self.commit(id);
    }
    /// A blank line ends at `end` in the chunk given to [`Scanner::feed_sink`] (just after its
    /// line end): it dispatched an event (`event`), or ended only comments or nothing.
    #[inline]
    fn blank_line(&mut self, end: usize, event: bool) {
        let _ = (end, event);
    }
}

impl<F: FnMut(&[u8])> Sink for F {
    #[inline]
    fn commit(&mut self, id: &[u8]) {
        self(id)
    }
}

/// `Scanner::pending_at` when the pending id's line did not lie whole in the chunk.
const NOT_IN_CHUNK: usize = usize::MAX;

/// Incremental SSE scanner: bytes in, dispatched events and committed ids out.
///
/// See the [module documentation](self) for the rules it follows.
#[derive(Clone, Debug)]
pub struct Scanner {
    max_id_len: usize,
    /// Bytes of the leading byte order mark matched so far, or `BOM_CLOSED`.
    bom: u8,
    line: Line,
    /// The previous byte was a CR: a LF right after it belongs to the same line end.
    after_cr: bool,
    /// A field line has been seen since the last blank line.
    in_event: bool,
    /// An `id` field was accepted since the last blank line.
    id_dirty: bool,
    /// The value of the `id` line being read exceeded `max_id_len`.
    id_overflow: bool,
    /// The value of the `id` line being read.
    value: Vec<u8>,
    /// The last accepted id (the "last event ID buffer" of the spec).
    pending: Vec<u8>,
    /// Where `pending` lies in the chunk being fed, when its line lay whole in it
    /// (`NOT_IN_CHUNK` otherwise).
    pending_at: usize,
    /// The last committed id.
    committed: Vec<u8>,
    has_committed: bool,
}

impl Default for Scanner {
    fn default() -> Self {
        Self::new()
    }
}

impl Scanner {
    /// A scanner with the default id limit (1024 bytes).
    pub fn new() -> Self {
        Self::with_max_id_len(DEFAULT_MAX_ID_LEN)
    }

    /// A scanner that ignores ids longer than `max_id_len` bytes.
    pub fn with_max_id_len(max_id_len: usize) -> Self {
        Self {
            max_id_len,
            bom: 0,
            line: Line::Start,
            after_cr: false,
            in_event: false,
            id_dirty: false,
            id_overflow: false,
            value: Vec::new(),
            pending: Vec::new(),
            pending_at: NOT_IN_CHUNK,
            committed: Vec::new(),
            has_committed: false,
        }
    }

    /// Scans the next piece of the stream.
    #[inline]
    pub fn feed(&mut self, chunk: &[u8]) -> Feed {
        self.feed_with(chunk, |_| {})
    }

    /// Scans the next piece of the stream, calling `on_commit` with every id committed in it,
    /// in order. [`feed`](Self::feed) keeps only the last one.
    #[inline]
    pub fn feed_with(&mut self, chunk: &[u8], mut on_commit: impl FnMut(&[u8])) -> Feed {
        self.feed_sink(chunk, &mut on_commit)
    }

    /// Scans the next piece of the stream, telling `sink` of every id committed and every blank
    /// line in it, in order.
    #[inline]
    pub(crate) fn feed_sink<S: Sink>(&mut self, mut chunk: &[u8], sink: &mut S) -> Feed {
        let mut out = Feed::default();
        let mut base = 0;
        if S::POSITIONS {
            self.pending_at = NOT_IN_CHUNK;
        }
        if self.bom < BOM_CLOSED {
            while let Some((&b, rest)) = chunk.split_first() {
                if b == BOM[usize::from(self.bom)] {
                    chunk = rest;
                    base += 1;
                    self.bom += 1;
                    if self.bom == BOM_CLOSED {
                        break;
                    }
                } else {
                    // Not a byte order mark: what matched of it is ordinary content (it holds
                    // no line end, so nothing in it is dispatched).
                    let matched = usize::from(self.bom);
                    self.bom = BOM_CLOSED;
                    self.scan(&BOM[..matched], 0, &mut out, sink);
                    break;
                }
            }
            if self.bom < BOM_CLOSED {
                return out;
            }
        }
        self.scan(chunk, base, &mut out, sink);
        out
    }

    /// The last committed id, if any id has been committed.
    #[inline]
    pub fn last_committed(&self) -> Option<&[u8]> {
        self.has_committed.then_some(&self.committed[..])
    }

    /// Where the stream stands now; see [`Boundary`].
    #[inline]
    pub(crate) fn boundary(&self) -> Boundary {
        if self.bom > 0 && self.bom < BOM_CLOSED || self.line != Line::Start {
            Boundary::Inside
        } else if self.in_event {
            Boundary::Line
        } else {
            Boundary::Event
        }
    }

    /// Whether the last byte seen was a CR. A LF coming next would end the same line, so text
    /// inserted here must end its own lines with CR to keep that LF swallowed.
    pub(crate) fn after_cr(&self) -> bool {
        self.after_cr
    }

    /// Tells the scanner that a comment was inserted at the current [`Boundary`] by someone
    /// else. Only the byte order mark window can change: it closes, because the client has now
    /// seen bytes before anything the scanner will be fed.
    pub(crate) fn comment_inserted(&mut self) {
        self.bom = BOM_CLOSED;
    }

    /// Scans `buf`, which starts at `base` in the caller's chunk (for the ends of blank lines).
    fn scan(&mut self, buf: &[u8], base: usize, out: &mut Feed, sink: &mut impl Sink) {
        // Line ends are found with one pass over the buffer (`LineEnds`); each line is then
        // looked at only at its start (is it `id`?), so the cost per line is a few branches
        // whatever its length.
        let mut start = 0;
        if let Some(&first) = buf.first()
            && mem::take(&mut self.after_cr)
            && first == b'\n'
        {
            start = 1;
        }
        for end in LineEnds::new(buf, start) {
            if end < start {
                // The LF of a CRLF, taken with its CR.
                continue;
            }
            let line = &buf[start..end];
            let next = self.after_line_end(buf, end);
            if self.line == Line::Start {
                self.whole_line(line, base + start, base + next, out, sink);
            } else {
                // The end of a line begun in an earlier frame.
                self.segment(line);
                self.line_end(base + next, out, sink);
            }
            start = next;
        }
        if start < buf.len() {
            self.segment(&buf[start..]);
        }
    }

    /// Handles a line that lies entirely in the current frame: the common case, with no state
    /// machine and no copy but that of an accepted id.
    #[inline]
    fn whole_line<S: Sink>(
        &mut self,
        line: &[u8],
        at: usize,
        next: usize,
        out: &mut Feed,
        sink: &mut S,
    ) {
        match line {
            [] => self.dispatch(next, out, sink),
            [b':', ..] => {}
            [b'i', b'd'] => {
                self.in_event = true;
                self.pending.clear();
                self.pending_at = NOT_IN_CHUNK;
                self.id_dirty = true;
            }
            [b'i', b'd', b':', value @ ..] => {
                self.in_event = true;
                let value = value.strip_prefix(b" ").unwrap_or(value);
                if value.len() > self.max_id_len || !acceptable_id(value) {
                    out.ids_rejected += 1;
                } else {
                    self.pending.clear();
                    self.pending.extend_from_slice(value);
                    if S::POSITIONS {
                        self.pending_at = at + line.len() - value.len();
                    }
                    self.id_dirty = true;
                }
            }
            _ => self.in_event = true,
        }
    }

    /// Where the next line starts after the line end at `end`: a CRLF is one line end, also
    /// when its LF comes in the next frame.
    #[inline]
    fn after_line_end(&mut self, buf: &[u8], end: usize) -> usize {
        if buf[end] == b'\r' {
            match buf.get(end + 1) {
                Some(b'\n') => return end + 2,
                Some(_) => {}
                None => self.after_cr = true,
            }
        }
        end + 1
    }

    /// Advances the line state over `seg`, a piece of a line that holds no CR or LF.
    fn segment(&mut self, mut seg: &[u8]) {
        while let Some(&b) = seg.first() {
            match self.line {
                Line::Start => {
                    if b == b':' {
                        self.line = Line::Skip;
                        return;
                    }
                    self.in_event = true;
                    if b != b'i' {
                        self.line = Line::Skip;
                        return;
                    }
                    self.line = Line::NameI;
                }
                Line::NameI => {
                    if b != b'd' {
                        self.line = Line::Skip;
                        return;
                    }
                    self.line = Line::NameId;
                }
                Line::NameId => {
                    if b != b':' {
                        self.line = Line::Skip;
                        return;
                    }
                    self.line = Line::IdValueStart;
                }
                Line::IdValueStart => {
                    self.line = Line::IdValue;
                    if b != b' ' {
                        continue;
                    }
                }
                Line::IdValue => {
                    if !self.id_overflow {
                        if self.value.len() + seg.len() > self.max_id_len {
                            self.id_overflow = true;
                        } else {
                            self.value.extend_from_slice(seg);
                        }
                    }
                    return;
                }
                Line::Skip => return,
            }
            seg = &seg[1..];
        }
    }

    /// Ends the current line; the next line starts at `next`.
    fn line_end(&mut self, next: usize, out: &mut Feed, sink: &mut impl Sink) {
        match self.line {
            Line::Start => self.dispatch(next, out, sink),
            // `id` with no colon, or `id:` with nothing after it: the id becomes empty.
            Line::NameId | Line::IdValueStart => {
                self.pending.clear();
                self.pending_at = NOT_IN_CHUNK;
                self.id_dirty = true;
            }
            Line::IdValue => {
                if self.id_overflow || !acceptable_id(&self.value) {
                    out.ids_rejected += 1;
                } else {
                    mem::swap(&mut self.value, &mut self.pending);
                    self.pending_at = NOT_IN_CHUNK;
                    self.id_dirty = true;
                }
                self.value.clear();
                self.id_overflow = false;
            }
            Line::NameI | Line::Skip => {}
        }
        self.line = Line::Start;
    }

    /// A blank line, which ends at `end`: dispatches the event, if one was begun.
    #[inline]
    fn dispatch<S: Sink>(&mut self, end: usize, out: &mut Feed, sink: &mut S) {
        let event = self.in_event;
        if event {
            out.events += 1;
            self.in_event = false;
        }
        if self.id_dirty {
            self.id_dirty = false;
            // No copy: the next commit needs a new accepted `id` line, which overwrites
            // `pending` anyway, so its old content is dead after a dispatch.
            mem::swap(&mut self.committed, &mut self.pending);
            self.has_committed = true;
            out.ids += 1;
            if !S::POSITIONS || self.pending_at == NOT_IN_CHUNK {
                sink.commit(&self.committed);
            } else {
                sink.commit_at(&self.committed, self.pending_at);
            }
        }
        sink.blank_line(end, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commits(frames: &[&[u8]]) -> (Vec<String>, Feed) {
        let mut scanner = Scanner::with_max_id_len(8);
        let mut ids = Vec::new();
        let mut total = Feed::default();
        for frame in frames {
            let feed = scanner.feed_with(frame, |id| {
                ids.push(String::from_utf8_lossy(id).into_owned())
            });
            total.events += feed.events;
            total.ids += feed.ids;
            total.ids_rejected += feed.ids_rejected;
        }
        (ids, total)
    }

    #[test]
    fn crlf_split_between_frames_is_one_line_end() {
        // "id: 1\r" + "\n" + "\r\n": if the split CRLF counted twice the event would be
        // dispatched one line early, and the final blank line would dispatch nothing.
        let (ids, feed) = commits(&[b"id: 1\r", b"\n", b"data: x\r", b"\n\r\n"]);
        assert_eq!(ids, ["1"]);
        assert_eq!(feed.events, 1);
    }

    #[test]
    fn lone_cr_ends_lines() {
        let (ids, _) = commits(&[b"id: a\r\rid: b\rdata\r\r"]);
        assert_eq!(ids, ["a", "b"]);
    }

    #[test]
    fn split_bom_is_dropped_once() {
        let (ids, _) = commits(&[b"\xEF", b"\xBB", b"\xBFid: 1\n\n"]);
        assert_eq!(ids, ["1"]);
        // A second BOM is part of the field name, which is then not `id`.
        let (ids, _) = commits(&[b"\xEF\xBB\xBF\xEF\xBB\xBFid: 1\n\n"]);
        assert!(ids.is_empty());
    }

    #[test]
    fn partial_bom_is_content() {
        // EF BB then 'x': not a BOM; the line "\xEF\xBBx" is an unknown field, so the block
        // is an event.
        let (ids, feed) = commits(&[b"\xEF\xBB", b"x\nid: 2\n\n"]);
        assert_eq!(ids, ["2"]);
        assert_eq!(feed.events, 1);
    }

    #[test]
    fn boundary_tracks_line_and_event_positions() {
        let mut s = Scanner::new();
        assert_eq!(s.boundary(), Boundary::Event);
        s.feed(b"\xEF");
        assert_eq!(s.boundary(), Boundary::Inside);
        s.feed(b"\xBB\xBF: hi\n");
        assert_eq!(s.boundary(), Boundary::Event);
        s.feed(b"data: x");
        assert_eq!(s.boundary(), Boundary::Inside);
        s.feed(b"\r");
        assert_eq!(s.boundary(), Boundary::Line);
        assert!(s.after_cr());
        s.feed(b"\n\n");
        assert_eq!(s.boundary(), Boundary::Event);
        assert!(!s.after_cr());
    }

    #[test]
    fn after_an_inserted_comment_a_bom_is_content() {
        // The client saw the comment first, so it will not drop a BOM that comes later.
        let mut s = Scanner::new();
        s.comment_inserted();
        let feed = s.feed(b"\xEF\xBB\xBFid: 1\n\n");
        assert_eq!((feed.events, feed.ids), (1, 0));
    }

    #[test]
    fn overlong_and_nul_ids_are_rejected_and_keep_the_previous_id() {
        let (ids, feed) = commits(&[b"id: ok\n\nid: 123456789\n\nid: a\0b\n\n"]);
        assert_eq!(ids, ["ok"]);
        assert_eq!(feed.ids_rejected, 2);
        assert_eq!(feed.events, 3);
    }

    #[test]
    fn overlong_id_split_across_frames_is_rejected() {
        let (ids, feed) = commits(&[b"id: 1234", b"5678", b"9\n\n"]);
        assert!(ids.is_empty());
        assert_eq!(feed.ids_rejected, 1);
        let (ids, _) = commits(&[b"id: 1234", b"5678", b"\n\n"]);
        assert_eq!(ids, ["12345678"]);
    }

    #[test]
    fn line_ends_are_found_at_every_offset_and_length() {
        // Every length up to three blocks, every start, line ends at pseudo-random places:
        // the block masks (whole blocks, 16-byte chunks, the overlapping last chunk and the
        // short-buffer loop) must give exactly the positions a byte-by-byte search gives.
        let mut seed = 0x9E37_79B9_u32;
        for len in 0..200 {
            let buf: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 17;
                    seed ^= seed << 5;
                    match seed % 7 {
                        0 => b'\n',
                        1 => b'\r',
                        _ => b'a' + (seed % 26) as u8,
                    }
                })
                .collect();
            for from in 0..=len {
                let found: Vec<usize> = LineEnds::new(&buf, from).collect();
                let expected: Vec<usize> = (from..len).filter(|&i| is_line_end(buf[i])).collect();
                assert_eq!(found, expected, "len {len}, from {from}");
            }
        }
    }

    #[test]
    fn the_portable_chunk_mask_agrees_with_the_simd_one() {
        for b in 0..=255u8 {
            let mut chunk = [b'x'; 16];
            chunk[usize::from(b) % 16] = b;
            chunk[15 - usize::from(b) % 16] = b'\n';
            assert_eq!(chunk_mask(&chunk), chunk_mask_portable(&chunk), "byte {b}");
        }
    }

    #[test]
    fn ids_are_accepted_by_the_ascii_fast_path_and_the_utf8_check_alike() {
        assert!(acceptable_id(b"abc-123"));
        assert!(acceptable_id("caf\u{e9}/1".as_bytes()));
        assert!(!acceptable_id(b"a\0b"));
        assert!(!acceptable_id(b"caf\xe9"));
        assert!(!acceptable_id("caf\u{e9}\0".as_bytes()));
    }
}
