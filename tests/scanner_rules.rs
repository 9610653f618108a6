//! Every scanner rule, checked end to end: the frames are the body of a real axum response
//! behind the layer, read by a real client over 127.0.0.1, and the tracker's latest id is
//! compared with what a WHATWG-conforming client would hold as its last event id.

mod common;

use common::names::IDS_REJECTED_TOTAL;
use common::{Harness, build_recorded, key, run_frames};
use tower_sse_tracker::SseTracker;

const SESSION: &str = "rules-session";

/// Runs `frames` through the layer and returns the tracker's latest id for the stream.
async fn latest_after(frames: &[&[u8]]) -> Option<String> {
    let h = Harness::start(SseTracker::builder().build().unwrap()).await;
    let client = run_frames(&h, "s", Some(SESSION), frames).await;
    let sent: Vec<u8> = frames.concat();
    assert_eq!(client.received, sent, "bytes must pass through unchanged");
    h.tracker
        .last_event_id(&key(SESSION, "GET /sse/s"))
        .map(|id| id.as_str().to_owned())
}

#[tokio::test]
async fn lf_crlf_and_lone_cr_all_end_lines() {
    assert_eq!(latest_after(&[b"id: lf\n\n"]).await.as_deref(), Some("lf"));
    assert_eq!(
        latest_after(&[b"id: crlf\r\n\r\n"]).await.as_deref(),
        Some("crlf")
    );
    assert_eq!(latest_after(&[b"id: cr\r\r"]).await.as_deref(), Some("cr"));
    assert_eq!(
        latest_after(&[b"id: mixed\r\n\r"]).await.as_deref(),
        Some("mixed")
    );
}

#[tokio::test]
async fn cr_and_lf_split_across_frames_are_one_line_end() {
    // If "\r" + "\n" counted as two line ends, the "\n" would be a blank line and commit "1".
    assert_eq!(latest_after(&[b"id: 1\r", b"\n", b"id: 2\r\n"]).await, None);
    assert_eq!(
        latest_after(&[b"id: 1\r", b"\n", b"\r", b"\n"])
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn every_line_end_may_be_split_across_frames() {
    for frames in [
        &[&b"id: a"[..], b"\n", b"\n"][..],
        &[b"id: a\r", b"\r"],
        &[b"id: a\r", b"\n\r", b"\n"],
        &[b"i", b"d", b":", b" ", b"a", b"\n", b"\n"],
    ] {
        assert_eq!(
            latest_after(frames).await.as_deref(),
            Some("a"),
            "{frames:?}"
        );
    }
}

#[tokio::test]
async fn one_leading_bom_is_dropped_even_when_split() {
    assert_eq!(
        latest_after(&[b"\xEF\xBB\xBFid: 1\n\n"]).await.as_deref(),
        Some("1")
    );
    assert_eq!(
        latest_after(&[b"\xEF", b"\xBB", b"\xBFid: 1\n\n"])
            .await
            .as_deref(),
        Some("1")
    );
    // Only one: a second BOM makes the field name "\u{feff}id", which is not "id".
    assert_eq!(
        latest_after(&[b"\xEF\xBB\xBF\xEF\xBB\xBFid: 1\n\n"]).await,
        None
    );
    // Not at the start: part of the field name.
    assert_eq!(latest_after(&[b"\n\xEF\xBB\xBFid: 1\n\n"]).await, None);
}

#[tokio::test]
async fn comments_are_not_fields_and_do_not_dispatch() {
    assert_eq!(latest_after(&[b": id: 9\n\n"]).await, None);
    assert_eq!(latest_after(&[b":id: 9\n\n"]).await, None);
    // A comment inside an event neither ends nor dispatches it.
    assert_eq!(latest_after(&[b"id: 1\n: note\n"]).await, None);
    assert_eq!(
        latest_after(&[b"id: 1\n: note\n\n"]).await.as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn a_line_without_colon_is_a_field_with_an_empty_value() {
    // A bare "id" line sets the id to empty.
    assert_eq!(
        latest_after(&[b"id: 5\n\nid\n\n"]).await.as_deref(),
        Some("")
    );
    // "idx" is another field, not "id".
    assert_eq!(
        latest_after(&[b"id: 5\n\nidx\n\n"]).await.as_deref(),
        Some("5")
    );
}

#[tokio::test]
async fn one_leading_space_after_the_colon_is_dropped() {
    assert_eq!(latest_after(&[b"id:7\n\n"]).await.as_deref(), Some("7"));
    assert_eq!(latest_after(&[b"id: 7\n\n"]).await.as_deref(), Some("7"));
    assert_eq!(latest_after(&[b"id:  7\n\n"]).await.as_deref(), Some(" 7"));
    assert_eq!(
        latest_after(&[b"id:", b" 7 \n\n"]).await.as_deref(),
        Some("7 ")
    );
}

#[tokio::test]
async fn an_id_that_is_not_valid_utf8_is_ignored_whole_or_split() {
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: a\xffb\n\n"]).await.as_deref(),
        Some("1")
    );
    // Split inside a multi-byte sequence: valid once whole.
    assert_eq!(
        latest_after(&[b"id: caf\xc3", b"\xa9\n\n"])
            .await
            .as_deref(),
        Some("caf\u{e9}")
    );
    // A sequence cut by the line end is invalid.
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: caf\xc3", b"\n\n"])
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn an_id_containing_nul_is_ignored() {
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: 2\x003\n\n"]).await.as_deref(),
        Some("1")
    );
    // Ignored, not reset: the event still dispatches with the previous id.
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: \x00\ndata: x\n\n"])
            .await
            .as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn an_empty_id_resets_the_id_to_empty() {
    assert_eq!(
        latest_after(&[b"id: 1\n\nid:\n\n"]).await.as_deref(),
        Some("")
    );
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: \n\n"]).await.as_deref(),
        Some("")
    );
}

#[tokio::test]
async fn an_id_is_committed_at_dispatch_even_without_data() {
    assert_eq!(latest_after(&[b"id: 3\n\n"]).await.as_deref(), Some("3"));
    assert_eq!(latest_after(&[b"id: 3\n"]).await, None);
    // The last id field of an event wins.
    assert_eq!(
        latest_after(&[b"id: 3\nid: 4\ndata: x\n\n"])
            .await
            .as_deref(),
        Some("4")
    );
}

#[tokio::test]
async fn an_event_cut_off_by_the_end_of_the_stream_is_not_committed() {
    assert_eq!(
        latest_after(&[b"id: 1\ndata: a\n\n", b"id: 2\ndata: b\n"])
            .await
            .as_deref(),
        Some("1")
    );
    assert_eq!(
        latest_after(&[b"id: 1\n\nid: 2"]).await.as_deref(),
        Some("1")
    );
}

#[tokio::test]
async fn other_fields_values_are_skipped_whatever_their_size() {
    // A 4 MiB data line in many frames: passed through, and the id after it is found.
    let big = vec![b'x'; 64 * 1024];
    let mut frames: Vec<&[u8]> = vec![b"data: "];
    frames.extend(std::iter::repeat_n(&big[..], 64));
    frames.push(b"\nid: after\n\n");
    assert_eq!(latest_after(&frames).await.as_deref(), Some("after"));
}

#[tokio::test]
async fn an_id_longer_than_the_limit_is_ignored_and_counted() {
    let (tracker, recorded) = build_recorded(SseTracker::builder().max_id_len(16));
    let h = Harness::start(tracker).await;
    let long = format!("id: {}\n\n", "a".repeat(17));
    let at_limit = format!("id: {}\n\n", "b".repeat(16));
    run_frames(
        &h,
        "s",
        Some(SESSION),
        &[at_limit.as_bytes(), long.as_bytes()],
    )
    .await;
    let latest = h
        .tracker
        .last_event_id(&key(SESSION, "GET /sse/s"))
        .unwrap();
    assert_eq!(latest, "b".repeat(16).as_str());
    assert_eq!(recorded.value(IDS_REJECTED_TOTAL, &[]), 1.0);
}
