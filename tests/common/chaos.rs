//! What the chaos tests share: a deterministic random number generator, and the events of
//! each stream, with varied lengths, line ends and comments.

use super::reference;

/// A small deterministic random number generator (SplitMix64).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The bytes of event `n` of stream `stream`: an id, data of varied length and line ends.
pub fn event(stream: usize, n: u64) -> Vec<u8> {
    let mut rng = Rng((stream as u64) << 32 | n);
    let eol: &[u8] = match rng.below(3) {
        0 => b"\n",
        1 => b"\r\n",
        _ => b"\r",
    };
    let mut bytes = Vec::new();
    if rng.below(4) == 0 {
        bytes.extend_from_slice(b": a comment");
        bytes.extend_from_slice(eol);
    }
    bytes.extend_from_slice(format!("id: {n}").as_bytes());
    bytes.extend_from_slice(eol);
    let lines = 1 + rng.below(3);
    for line in 0..lines {
        let len = rng.below(120) as usize;
        bytes
            .extend_from_slice(format!("data: {stream}/{n}/{line} {}", "x".repeat(len)).as_bytes());
        bytes.extend_from_slice(eol);
    }
    bytes.extend_from_slice(eol);
    bytes
}

/// The data a client's parser makes of event `n` of `stream`.
pub fn data_of(stream: usize, n: u64) -> String {
    reference::parse(&event(stream, n), 1024).events[0]
        .1
        .clone()
}
