//! A log's storage: bytes in chunks of [`CHUNK`] bytes, written at the back and dropped from
//! the front. Its heap is the bytes it holds, at most two partly used chunks (the front one
//! and the back one) whatever their size, and one spare: the last chunk emptied at the front,
//! kept for the back, so that a log at its bounds (dropping at the front what it writes at the
//! back) allocates nothing. Each byte is copied in once, and a chunk's bytes are written only
//! by that copy (a new chunk is not zeroed first). Each chunk keeps the age the log's budget
//! gave it when it was taken, so that the budget can drop the oldest history first.

use std::collections::VecDeque;

/// Bytes per chunk.
pub(crate) const CHUNK: usize = 1024;

#[derive(Debug, Default)]
pub(crate) struct Ring {
    /// The chunks, oldest first, each with its age. Each is allocated for [`CHUNK`] bytes and
    /// is as long as what was written into it: all of it but for the back one.
    chunks: VecDeque<(u64, Vec<u8>)>,
    /// Where the first byte lies in the front chunk.
    head: usize,
    len: usize,
    /// A chunk emptied at the front, to be taken at the back.
    spare: Option<Vec<u8>>,
}

impl Ring {
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Heap bytes held: the chunks and their list.
    pub(crate) fn heap_bytes(&self) -> usize {
        (self.chunks.len() + usize::from(self.spare.is_some())) * CHUNK
            + self.chunks.capacity() * size_of::<(u64, Vec<u8>)>()
    }

    /// The age of the front chunk, the oldest bytes held.
    pub(crate) fn front_age(&self) -> Option<u64> {
        self.chunks.front().map(|(age, _)| *age)
    }

    /// Appends the first `n` (at most 8) bytes of `word`, little-endian.
    #[inline(always)]
    pub(crate) fn push_word(&mut self, word: u64, n: usize, age: &mut impl FnMut() -> u64) {
        debug_assert!(n <= 8);
        let bytes = word.to_le_bytes();
        if let Some((_, back)) = self.chunks.back_mut()
            && CHUNK - back.len() >= bytes.len()
        {
            // Eight bytes copied as one word, the ones past `n` taken back: no call to copy
            // a few bytes.
            back.extend_from_slice(&bytes);
            back.truncate(back.len() - (8 - n));
            self.len += n;
            return;
        }
        self.push_across(&bytes[..n], age);
    }

    /// Appends `bytes`; `age` gives each chunk taken its age.
    #[inline(always)]
    pub(crate) fn push(&mut self, bytes: &[u8], age: &mut impl FnMut() -> u64) {
        if let Some((_, back)) = self.chunks.back_mut()
            && CHUNK - back.len() >= bytes.len()
        {
            back.extend_from_slice(bytes);
            self.len += bytes.len();
            return;
        }
        self.push_across(bytes, age);
    }

    /// [`push`](Self::push), when `bytes` need a new chunk.
    fn push_across(&mut self, mut bytes: &[u8], age: &mut impl FnMut() -> u64) {
        while !bytes.is_empty() {
            let room = self.chunks.back().map_or(0, |(_, back)| CHUNK - back.len());
            if room == 0 {
                let chunk = self
                    .spare
                    .take()
                    .unwrap_or_else(|| Vec::with_capacity(CHUNK));
                self.chunks.push_back((age(), chunk));
                continue;
            }
            let n = bytes.len().min(room);
            if let Some((_, back)) = self.chunks.back_mut() {
                back.extend_from_slice(&bytes[..n]);
            }
            self.len += n;
            bytes = &bytes[n..];
        }
    }

    /// Drops the first `n` bytes (all, when `n` is more); the chunks emptied are freed.
    pub(crate) fn drop_front(&mut self, n: usize) {
        if n >= self.len {
            self.clear();
            return;
        }
        self.head += n;
        self.len -= n;
        while self.head >= CHUNK {
            let emptied = self.chunks.pop_front().map(|(_, mut chunk)| {
                chunk.clear();
                chunk
            });
            self.spare = self.spare.take().or(emptied);
            self.head -= CHUNK;
        }
    }

    /// Frees the spare chunk.
    pub(crate) fn release_spare(&mut self) {
        self.spare = None;
    }

    /// Keeps the first `len` bytes; the chunks emptied are freed.
    pub(crate) fn truncate(&mut self, len: usize) {
        if len >= self.len {
            return;
        }
        if len == 0 {
            self.clear();
            return;
        }
        self.len = len;
        let end = self.head + len;
        let chunks = end.div_ceil(CHUNK);
        self.chunks.truncate(chunks);
        if let Some((_, back)) = self.chunks.back_mut() {
            back.truncate(end - (chunks - 1) * CHUNK);
        }
    }

    /// Drops everything, the list of chunks included: an empty ring holds no heap.
    pub(crate) fn clear(&mut self) {
        *self = Self::default();
    }

    /// The bytes from `from` to `to` (both within the ring), one slice per chunk.
    pub(crate) fn slices(&self, from: usize, to: usize) -> impl Iterator<Item = &[u8]> {
        debug_assert!(from <= to && to <= self.len);
        let (mut at, end) = (self.head + from, self.head + to);
        std::iter::from_fn(move || {
            if at >= end {
                return None;
            }
            let (index, offset) = (at / CHUNK, at % CHUNK);
            let n = (end - at).min(CHUNK - offset);
            at += n;
            Some(&self.chunks[index].1[offset..offset + n])
        })
    }

    /// The byte at `at`.
    pub(crate) fn byte(&self, at: usize) -> u8 {
        let at = self.head + at;
        self.chunks[at / CHUNK].1[at % CHUNK]
    }

    /// Whether the bytes from `at` are `bytes`.
    pub(crate) fn holds_at(&self, at: usize, bytes: &[u8]) -> bool {
        let mut rest = bytes;
        for slice in self.slices(at, at + bytes.len()) {
            let Some(after) = rest.strip_prefix(slice) else {
                return false;
            };
            rest = after;
        }
        rest.is_empty()
    }

    /// Appends the bytes from `from` to `to` to `out`.
    pub(crate) fn copy_into(&self, from: usize, to: usize, out: &mut Vec<u8>) {
        for slice in self.slices(from, to) {
            out.extend_from_slice(slice);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn contents(ring: &Ring) -> Vec<u8> {
        let mut out = Vec::new();
        ring.copy_into(0, ring.len(), &mut out);
        out
    }

    #[test]
    fn a_ring_holds_what_was_pushed_across_chunks_and_frees_what_it_drops() {
        let mut ring = Ring::default();
        let mut ages = 0..;
        let mut age = || ages.next().unwrap();
        let bytes: Vec<u8> = (0..3000u32).map(|n| n as u8).collect();
        ring.push(&bytes[..10], &mut age);
        ring.push(&bytes[10..], &mut age);
        assert_eq!(contents(&ring), bytes);
        assert_eq!(ring.heap_bytes() / CHUNK, 3, "3000 bytes in three chunks");
        assert!(
            ring.holds_at(1020, &bytes[1020..1030]),
            "across a chunk end"
        );
        assert!(!ring.holds_at(1020, &bytes[1021..1031]));
        assert_eq!(ring.byte(2047), bytes[2047]);
        ring.drop_front(2000);
        assert_eq!(contents(&ring), &bytes[2000..]);
        assert_eq!(ring.front_age(), Some(1), "the first chunk is gone");
        assert_eq!(ring.heap_bytes() / CHUNK, 3, "two chunks held, one spare");
        ring.release_spare();
        assert_eq!(ring.heap_bytes() / CHUNK, 2);
        ring.truncate(10);
        assert_eq!(contents(&ring), &bytes[2000..2010]);
        ring.drop_front(10);
        assert_eq!(ring.heap_bytes(), 0, "an empty ring holds no heap");
        ring.push(b"again", &mut age);
        assert_eq!(contents(&ring), b"again");
        assert_eq!(ring.front_age(), Some(3));
    }

    #[test]
    fn bytes_pushed_after_a_truncation_follow_the_bytes_kept() {
        let mut ring = Ring::default();
        let mut age = || 0;
        let bytes: Vec<u8> = (0..2500u32).map(|n| (n % 251) as u8).collect();
        ring.push(&bytes, &mut age);
        ring.truncate(1500);
        ring.push(b"tail", &mut age);
        let mut expected = bytes[..1500].to_vec();
        expected.extend_from_slice(b"tail");
        assert_eq!(contents(&ring), expected);
        ring.truncate(1024);
        ring.push(&bytes[..1100], &mut age);
        let mut expected = bytes[..1024].to_vec();
        expected.extend_from_slice(&bytes[..1100]);
        assert_eq!(contents(&ring), expected, "at a chunk's end");
        assert_eq!(ring.heap_bytes() / CHUNK, 3);
    }
}
