//! The proxy's HTTP/1.1 message counter, over what clients and replicas
//! send.

use skiff_agent::proxy::http::{is_replayable, RequestCounter, ResponseCounter, Seen};

/// Byte 0 picks a piece size; the rest is the client's stream, then (after
/// a 0xFF byte) the replica's. Counting never panics and gives the same
/// totals however the streams are split into reads.
pub fn proxy_http_head(data: &[u8]) {
    let Some((&piece, rest)) = data.split_first() else {
        return;
    };
    let piece = usize::from(piece % 17) + 1;
    let (requests, responses) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let _ = is_replayable(requests);

    let mut whole = RequestCounter::default();
    let counted = whole.feed(requests);
    let mut split = RequestCounter::default();
    let counted_in_pieces: u64 = requests.chunks(piece).map(|p| split.feed(p)).sum();
    assert_eq!(
        counted, counted_in_pieces,
        "requests split every {piece} bytes"
    );
    assert!(counted as usize <= requests.len());

    let heads = *whole.heads();
    assert_eq!(heads, *split.heads());
    let mut heads_whole = heads;
    let seen = ResponseCounter::default().feed(responses, &mut heads_whole);
    check_seen(&seen);
    let mut counter = ResponseCounter::default();
    let mut heads_split = heads;
    let (mut messages, mut errors) = (0, 0);
    for p in responses.chunks(piece) {
        let s = counter.feed(p, &mut heads_split);
        check_seen(&s);
        messages += s.messages;
        errors += s.errors;
    }
    assert_eq!(
        (seen.messages, seen.errors),
        (messages, errors),
        "responses split every {piece} bytes"
    );
    assert_eq!(heads_whole, heads_split);
}

fn check_seen(seen: &Seen) {
    assert!(seen.errors <= seen.messages, "{seen:?}");
    let classes: Vec<u8> = seen.classes().collect();
    assert!(classes.len() <= Seen::CLASSES_KEPT);
    assert!(classes.iter().all(|c| (1..=5).contains(c)), "{seen:?}");
    let fives = classes.iter().filter(|c| **c == 5).count() as u64;
    assert!(fives <= seen.errors, "{seen:?}");
}
