//! Property tests: the scanner commits the same ids as the reference parser, however the stream
//! is split into frames.

#[path = "common/reference.rs"]
mod reference;

use proptest::prelude::*;
use tower_sse_tracker::scan::Scanner;

const MAX_ID: usize = 6;

/// Pieces that make streams full of the cases that matter: ids of every shape, line ends of
/// every kind, comments, BOMs, NUL, multi-byte and invalid UTF-8, other fields.
fn piece() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"id".to_vec()),
        Just(b"id:".to_vec()),
        Just(b"id: ".to_vec()),
        Just(b"i".to_vec()),
        Just(b"d".to_vec()),
        Just(b"data: ".to_vec()),
        Just(b"event: e".to_vec()),
        Just(b":".to_vec()),
        Just(b" ".to_vec()),
        Just(b"\n".to_vec()),
        Just(b"\r".to_vec()),
        Just(b"\r\n".to_vec()),
        Just(b"\n\n".to_vec()),
        Just(b"\xEF\xBB\xBF".to_vec()),
        Just(b"\xEF\xBB".to_vec()),
        Just(b"\0".to_vec()),
        Just("é".as_bytes().to_vec()),
        Just(b"\xff".to_vec()),
        "[a-z0-9]{1,4}".prop_map(String::into_bytes),
        "[0-9]{5,9}".prop_map(String::into_bytes),
    ]
}

fn stream_and_cuts() -> impl Strategy<Value = (Vec<u8>, Vec<usize>)> {
    prop::collection::vec(piece(), 0..80)
        .prop_map(|pieces| pieces.concat())
        .prop_flat_map(|stream| {
            let len = stream.len();
            (Just(stream), prop::collection::vec(0..=len, 0..12))
        })
}

fn scan_in_frames(stream: &[u8], cuts: &[usize]) -> (Vec<String>, usize, usize) {
    let mut cuts = cuts.to_vec();
    cuts.sort_unstable();
    let mut scanner = Scanner::with_max_id_len(MAX_ID);
    let mut commits = Vec::new();
    let (mut events, mut rejected) = (0, 0);
    let mut start = 0;
    for end in cuts.into_iter().chain([stream.len()]) {
        let feed = scanner.feed_with(&stream[start..end], |id| {
            commits.push(String::from_utf8_lossy(id).into_owned())
        });
        events += feed.events;
        rejected += feed.ids_rejected;
        start = end;
    }
    // The last committed id the scanner reports is the last of the commits.
    assert_eq!(
        scanner
            .last_committed()
            .map(|id| String::from_utf8_lossy(id).into_owned()),
        commits.last().cloned()
    );
    (commits, events, rejected)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn commits_match_the_reference_parser_for_every_split((stream, cuts) in stream_and_cuts()) {
        let expected = reference::parse(&stream, MAX_ID);
        let (commits, events, rejected) = scan_in_frames(&stream, &cuts);
        prop_assert_eq!(&commits, &expected.commits);
        prop_assert_eq!(events, expected.dispatches);
        prop_assert_eq!(rejected, expected.rejected);
    }

    #[test]
    fn one_byte_frames_give_the_same_commits_as_one_frame(
        pieces in prop::collection::vec(piece(), 0..60)
    ) {
        let stream = pieces.concat();
        let whole = scan_in_frames(&stream, &[]);
        let cuts: Vec<usize> = (1..stream.len()).collect();
        prop_assert_eq!(scan_in_frames(&stream, &cuts), whole);
    }
}
