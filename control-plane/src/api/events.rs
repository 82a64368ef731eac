//! Which events an `Events` call returns: a pure choice over the event
//! ring, so that `--tail`, `--since` and the service and node filters are
//! tested without a cluster.

use skiff_proto::v1 as pb;

use crate::state::Event;

/// What an `EventsRequest` asks for, with `since` resolved against the
/// answering server's clock.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(super) struct EventFilter {
    pub service: String,
    pub node: String,
    /// Only events at or after this time (ms since the epoch); 0: any.
    pub since_ms: u64,
    /// Only events of this Raft index or later; 0: any.
    pub min_index: u64,
    /// Of the backlog, only the last this many; `None`: all.
    pub tail: Option<usize>,
}

impl EventFilter {
    pub fn new(request: &pb::EventsRequest, now_ms: u64) -> Self {
        Self {
            service: request.service.clone(),
            node: request.node.clone(),
            since_ms: if request.max_age_ms == 0 {
                0
            } else {
                now_ms.saturating_sub(request.max_age_ms)
            },
            min_index: request.min_index,
            tail: request
                .tail
                .map(|n| usize::try_from(n).unwrap_or(usize::MAX)),
        }
    }

    pub fn matches(&self, event: &Event) -> bool {
        (self.service.is_empty() || event.service == self.service)
            && (self.node.is_empty() || event.node == self.node)
            && event.time_ms >= self.since_ms
            && event.index >= self.min_index
    }

    /// The events of the ring (oldest first) to send before following: the
    /// matching ones, only the last `tail` of them if asked.
    pub fn backlog<'a>(&self, events: impl Iterator<Item = &'a Event>) -> Vec<&'a Event> {
        let mut chosen: Vec<&Event> = events.filter(|e| self.matches(e)).collect();
        if let Some(tail) = self.tail {
            chosen.drain(..chosen.len().saturating_sub(tail));
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::EventFilter;
    use crate::state::{Event, EventKind};
    use skiff_proto::v1 as pb;

    /// Events 1..=n, event i at Raft index 100 + i and time 1000 * i, of
    /// service "web" when i is even, else "db".
    fn ring(n: u64) -> Vec<Event> {
        (1..=n)
            .map(|i| Event {
                seq: i,
                index: 100 + i,
                time_ms: 1000 * i,
                kind: EventKind::ServiceUpdated,
                service: if i % 2 == 0 { "web" } else { "db" }.into(),
                node: String::new(),
                alloc: String::new(),
                message: String::new(),
                by: String::new(),
            })
            .collect()
    }

    fn seqs(events: &[&Event]) -> Vec<u64> {
        events.iter().map(|e| e.seq).collect()
    }

    #[test]
    fn tail_keeps_the_last_matching_events_oldest_first() {
        let ring = ring(30);
        let request = pb::EventsRequest {
            tail: Some(3),
            ..Default::default()
        };
        let filter = EventFilter::new(&request, 0);
        assert_eq!(seqs(&filter.backlog(ring.iter())), [28, 29, 30]);
        let web = EventFilter {
            service: "web".into(),
            ..filter
        };
        assert_eq!(seqs(&web.backlog(ring.iter())), [26, 28, 30]);
    }

    #[test]
    fn no_tail_or_one_larger_than_the_ring_keeps_everything_and_zero_nothing() {
        let ring = ring(5);
        for tail in [None, Some(5), Some(50)] {
            let request = pb::EventsRequest {
                tail,
                ..Default::default()
            };
            let filter = EventFilter::new(&request, 0);
            assert_eq!(seqs(&filter.backlog(ring.iter())), [1, 2, 3, 4, 5]);
        }
        let request = pb::EventsRequest {
            tail: Some(0),
            ..Default::default()
        };
        assert!(EventFilter::new(&request, 0)
            .backlog(ring.iter())
            .is_empty());
    }

    #[test]
    fn since_a_duration_keeps_events_no_older_than_it_by_the_servers_clock() {
        let ring = ring(10);
        let request = pb::EventsRequest {
            max_age_ms: 2500,
            ..Default::default()
        };
        // Now is 10.5 s: events at 8 s, 9 s and 10 s are within 2.5 s.
        let filter = EventFilter::new(&request, 10_500);
        assert_eq!(seqs(&filter.backlog(ring.iter())), [8, 9, 10]);
    }

    #[test]
    fn since_an_index_keeps_events_of_that_index_and_later() {
        let ring = ring(10);
        let request = pb::EventsRequest {
            min_index: 108,
            tail: Some(2),
            ..Default::default()
        };
        let filter = EventFilter::new(&request, 0);
        assert_eq!(seqs(&filter.backlog(ring.iter())), [9, 10]);
        let request = pb::EventsRequest {
            min_index: 108,
            ..Default::default()
        };
        let filter = EventFilter::new(&request, 0);
        assert_eq!(seqs(&filter.backlog(ring.iter())), [8, 9, 10]);
    }
}
