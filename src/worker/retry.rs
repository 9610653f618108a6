//! Retries: the backoff policy and the time-ordered retry queue.

use std::cmp::{Ordering, Reverse};
use std::collections::BinaryHeap;
use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use tokio::time::Instant;

/// How the worker retries a failed store write: exponential backoff with jitter, capped, for at
/// most a number of retries. After the last retry fails the write is given up: counted in
/// `sse_tracker_retries_exhausted_total` and logged at error level. A given-up stream's latest
/// id stays in memory (and in the shutdown report's `given_up`): it is written again after the
/// next successful write to the store, or by a probe once per longest retry delay.
///
/// The delay before retry `n` (1-based) is drawn uniformly from `[d/2, d]`, where
/// `d = min(max, base * 2^(n-1))`.
///
/// ```
/// use std::time::Duration;
/// use tower_sse_tracker::RetryPolicy;
///
/// let policy = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(10), 5);
/// assert_eq!(policy.max_retries(), 5);
/// assert!(policy.delay(3, 0.99) <= Duration::from_millis(400));
/// assert!(policy.delay(3, 0.0) >= Duration::from_millis(200));
/// assert_eq!(policy.delay(20, 0.999_999).as_secs(), 9); // capped at 10 s
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryPolicy {
    base: Duration,
    max: Duration,
    max_retries: u32,
}

/// The default: 100 ms doubling up to 10 s, 5 retries.
pub(crate) const DEFAULT_RETRY: RetryPolicy = RetryPolicy {
    base: Duration::from_millis(100),
    max: Duration::from_secs(10),
    max_retries: 5,
};

impl Default for RetryPolicy {
    fn default() -> Self {
        DEFAULT_RETRY
    }
}

impl RetryPolicy {
    /// Backoff from `base`, doubling per retry up to `max`, for at most `max_retries` retries.
    /// [`SseTrackerBuilder::build`](crate::SseTrackerBuilder::build) refuses a zero `base` and a
    /// `max` below `base`.
    pub const fn exponential(base: Duration, max: Duration, max_retries: u32) -> Self {
        Self {
            base,
            max,
            max_retries,
        }
    }

    /// No retries: a failed write is given up at once (then caught up as above).
    pub const fn never() -> Self {
        Self {
            base: Duration::from_millis(1),
            max: Duration::from_millis(1),
            max_retries: 0,
        }
    }

    /// The first delay.
    pub fn base(&self) -> Duration {
        self.base
    }

    /// The longest delay.
    pub fn max(&self) -> Duration {
        self.max
    }

    /// How many times a failed write is retried.
    pub fn max_retries(&self) -> u32 {
        self.max_retries
    }

    /// The delay before retry `retry` (1-based), for a `jitter` in `[0, 1)`.
    pub fn delay(&self, retry: u32, jitter: f64) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        let full = self.base.saturating_mul(1 << doublings).min(self.max);
        full.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }

    pub(crate) fn is_valid(&self) -> bool {
        !self.base.is_zero() && self.max >= self.base
    }
}

/// A small xorshift generator for jitter: no need for a cryptographic source here.
#[derive(Debug)]
pub(crate) struct Jitter(u64);

impl Jitter {
    pub(crate) fn new() -> Self {
        Self(RandomState::new().hash_one(0x5eed_u64) | 1)
    }

    /// A number in `[0, 1)`.
    pub(crate) fn next(&mut self) -> f64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[derive(Debug)]
struct Due<T> {
    at: Instant,
    /// Insertion order, so that entries due at the same instant leave in the order they came.
    order: u64,
    item: T,
}

impl<T> PartialEq for Due<T> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.order) == (other.at, other.order)
    }
}

impl<T> Eq for Due<T> {}

impl<T> PartialOrd for Due<T> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl<T> Ord for Due<T> {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.at, self.order).cmp(&(other.at, other.order))
    }
}

/// Entries ordered by due time, earliest first (a min-heap).
#[derive(Debug)]
pub(crate) struct RetryQueue<T> {
    heap: BinaryHeap<Reverse<Due<T>>>,
    order: u64,
}

impl<T> Default for RetryQueue<T> {
    fn default() -> Self {
        Self {
            heap: BinaryHeap::new(),
            order: 0,
        }
    }
}

impl<T> RetryQueue<T> {
    pub(crate) fn push(&mut self, at: Instant, item: T) {
        self.order += 1;
        self.heap.push(Reverse(Due {
            at,
            order: self.order,
            item,
        }));
    }

    /// When the earliest entry is due.
    pub(crate) fn next_due(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse(d)| d.at)
    }

    /// The earliest entry, if it is due at `now`.
    pub(crate) fn pop_due(&mut self, now: Instant) -> Option<T> {
        if self.next_due()? <= now {
            self.heap.pop().map(|Reverse(d)| d.item)
        } else {
            None
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.heap.len()
    }

    /// Makes every entry due at `at`, in the order they were due.
    pub(crate) fn reschedule_all(&mut self, at: Instant) {
        let mut entries: Vec<Due<T>> = self.heap.drain().map(|Reverse(d)| d).collect();
        entries.sort_by_key(|d| (d.at, d.order));
        for d in entries {
            self.push(at, d.item);
        }
    }

    /// Keeps only the entries for which `keep` holds (O(n)).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        self.heap.retain(|Reverse(d)| keep(&d.item));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn test_retry_heap_ordering() {
        let start = Instant::now();
        let mut queue = RetryQueue::default();
        queue.push(start + Duration::from_secs(3), "+3s");
        queue.push(start + Duration::from_secs(1), "+1s");
        queue.push(start + Duration::from_secs(2), "+2s");
        let mut out = Vec::new();
        while let Some(due) = queue.next_due() {
            tokio::time::sleep_until(due).await;
            while let Some(item) = queue.pop_due(Instant::now()) {
                out.push((item, Instant::now() - start));
            }
        }
        assert_eq!(
            out,
            [
                ("+1s", Duration::from_secs(1)),
                ("+2s", Duration::from_secs(2)),
                ("+3s", Duration::from_secs(3))
            ]
        );
    }

    #[test]
    fn test_retry_heap_ordering_keeps_insertion_order_at_equal_times() {
        let now = Instant::now();
        let mut queue = RetryQueue::default();
        for i in 0..5 {
            queue.push(now, i);
        }
        let out: Vec<_> = std::iter::from_fn(|| queue.pop_due(now)).collect();
        assert_eq!(out, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn nothing_is_popped_before_it_is_due() {
        let now = Instant::now();
        let mut queue = RetryQueue::default();
        queue.push(now + Duration::from_millis(5), ());
        assert_eq!(queue.pop_due(now), None);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn delays_grow_and_are_capped() {
        let p = RetryPolicy::exponential(Duration::from_millis(100), Duration::from_secs(1), 10);
        let full: Vec<Duration> = (1..=6).map(|n| p.delay(n, 1.0)).collect();
        assert_eq!(
            full,
            [100, 200, 400, 800, 1000, 1000].map(Duration::from_millis)
        );
        assert_eq!(p.delay(1, 0.0), Duration::from_millis(50));
    }

    #[test]
    fn jitter_stays_in_unit_interval() {
        let mut j = Jitter::new();
        for _ in 0..10_000 {
            let x = j.next();
            assert!((0.0..1.0).contains(&x));
        }
    }
}
