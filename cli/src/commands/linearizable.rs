//! A linearizability checker for what `skiff bench chaos` records: each
//! variable is a register with put, get and compare-and-set. A history is
//! linearizable when every operation can be given one instant between its
//! call and its answer such that, in that order, each answer is what the
//! register would give (Herlihy & Wing).
//!
//! The search is Wing & Gong's with Lowe's memo of (operations done, state)
//! as Porcupine does it, per key (a history is linearizable iff each key's
//! is, P-compositionality). An operation whose answer never came (a timeout,
//! a lost connection, an "outcome unknown" error) may have happened at any
//! time after its call, or never: it gets no answer time and any outcome.
//! A read that failed has no effect and is left out by the recorder.

use std::collections::{BTreeMap, HashSet};

/// What a client asked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Call {
    Put(String),
    Get,
    Cas {
        expected: Option<String>,
        value: String,
    },
}

/// What it was answered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A put was acknowledged.
    Done,
    /// A get's value.
    Value(Option<String>),
    /// Whether a compare-and-set set the value.
    Swapped(bool),
    /// No answer: it may or may not have happened.
    Unknown,
}

/// One operation of a history; times in any unit, from one clock.
#[derive(Clone, Debug)]
pub struct Op {
    pub key: String,
    pub call: Call,
    pub answer: Answer,
    pub called: u64,
    /// Ignored for [`Answer::Unknown`] (it never returned).
    pub answered: u64,
}

/// The result of [`check`].
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    pub keys: usize,
    pub ops: usize,
    /// The keys whose history is not linearizable.
    pub violations: Vec<String>,
}

/// Checks every key's history.
pub fn check(ops: &[Op]) -> Verdict {
    let mut by_key: BTreeMap<&str, Vec<&Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.as_str()).or_default().push(op);
    }
    let violations = by_key
        .iter()
        .filter(|(_, ops)| !linearizable(ops))
        .map(|(key, _)| key.to_string())
        .collect();
    Verdict {
        keys: by_key.len(),
        ops: ops.len(),
        violations,
    }
}

/// The register after `op` on `state`, if `op`'s answer allows it there.
fn step(state: &Option<String>, op: &Op) -> Option<Option<String>> {
    match (&op.call, &op.answer) {
        (Call::Put(value), Answer::Done | Answer::Unknown) => Some(Some(value.clone())),
        (Call::Get, Answer::Value(seen)) => (seen == state).then(|| state.clone()),
        (Call::Get, Answer::Unknown) => Some(state.clone()),
        (Call::Cas { expected, value }, answer) => {
            let matches = state == expected;
            match answer {
                Answer::Swapped(true) => matches.then(|| Some(value.clone())),
                Answer::Swapped(false) => (!matches).then(|| state.clone()),
                Answer::Unknown => Some(if matches {
                    Some(value.clone())
                } else {
                    state.clone()
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

const NIL: usize = usize::MAX;

/// One key's history, by Wing & Gong's search over a list of call and
/// answer events: take the first call that the register allows next, or,
/// reaching an answer whose call is not taken yet, undo the last taken.
fn linearizable(ops: &[&Op]) -> bool {
    let n = ops.len();
    // Events: (time, 0 for a call / 1 for an answer, op). Calls sort before
    // answers at the same time: the more concurrency, the more orders.
    let mut events: Vec<(u64, u8, usize)> = Vec::with_capacity(2 * n);
    for (i, op) in ops.iter().enumerate() {
        events.push((op.called, 0, i));
        let answered = match op.answer {
            Answer::Unknown => u64::MAX,
            _ => op.answered.max(op.called),
        };
        events.push((answered, 1, i));
    }
    events.sort_unstable();
    let len = events.len();
    let head = len;
    let mut next: Vec<usize> = (1..=len).map(|i| if i == len { NIL } else { i }).collect();
    next.push(if len == 0 { NIL } else { 0 });
    let mut prev: Vec<usize> = (0..len)
        .map(|i| if i == 0 { head } else { i - 1 })
        .collect();
    prev.push(NIL);
    let mut answer_of = vec![0usize; n];
    for (at, &(_, kind, op)) in events.iter().enumerate() {
        if kind == 1 {
            answer_of[op] = at;
        }
    }
    let words = n.div_ceil(64).max(1);
    let mut done = vec![0u64; words];
    let mut state: Option<String> = None;
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    let mut taken: Vec<(usize, Option<String>)> = Vec::new();
    let unlink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        let (p, q) = (prev[at], next[at]);
        next[p] = q;
        if q != NIL {
            prev[q] = p;
        }
    };
    let relink = |next: &mut Vec<usize>, prev: &mut Vec<usize>, at: usize| {
        let (p, q) = (prev[at], next[at]);
        next[p] = at;
        if q != NIL {
            prev[q] = at;
        }
    };
    let mut at = next[head];
    while next[head] != NIL {
        // At an answer whose call is not taken yet (or past the end), this
        // order fails: undo the last call taken and try the next after it.
        if at == NIL || events[at].1 == 1 {
            let Some((call, before)) = taken.pop() else {
                return false;
            };
            let op = events[call].2;
            done[op / 64] &= !(1 << (op % 64));
            state = before;
            relink(&mut next, &mut prev, answer_of[op]);
            relink(&mut next, &mut prev, call);
            at = next[call];
            continue;
        }
        let op = events[at].2;
        if let Some(after) = step(&state, ops[op]) {
            let mut with = done.clone();
            with[op / 64] |= 1 << (op % 64);
            if seen.insert((with.clone(), after.clone())) {
                taken.push((at, std::mem::replace(&mut state, after)));
                done = with;
                unlink(&mut next, &mut prev, at);
                unlink(&mut next, &mut prev, answer_of[op]);
                at = next[head];
                continue;
            }
        }
        at = next[at];
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(call: Call, answer: Answer, called: u64, answered: u64) -> Op {
        Op {
            key: "k".into(),
            call,
            answer,
            called,
            answered,
        }
    }
    fn put(v: &str, a: u64, b: u64) -> Op {
        op(Call::Put(v.into()), Answer::Done, a, b)
    }
    fn get(v: Option<&str>, a: u64, b: u64) -> Op {
        op(Call::Get, Answer::Value(v.map(str::to_string)), a, b)
    }
    fn cas(expected: Option<&str>, value: &str, swapped: Option<bool>, a: u64, b: u64) -> Op {
        let call = Call::Cas {
            expected: expected.map(str::to_string),
            value: value.into(),
        };
        let answer = swapped.map_or(Answer::Unknown, Answer::Swapped);
        op(call, answer, a, b)
    }
    fn ok(ops: &[Op]) -> bool {
        check(ops).violations.is_empty()
    }

    #[test]
    fn sequential_and_overlapping_histories_that_a_register_allows_pass() {
        assert!(ok(&[
            put("a", 0, 1),
            get(Some("a"), 2, 3),
            put("b", 4, 5),
            get(Some("b"), 6, 7)
        ]));
        // A read concurrent with a write may see either value.
        assert!(ok(&[
            put("a", 0, 1),
            put("b", 2, 10),
            get(Some("a"), 3, 4),
            get(Some("b"), 5, 6)
        ]));
        assert!(ok(&[
            get(None, 0, 1),
            cas(None, "a", Some(true), 2, 3),
            cas(None, "b", Some(false), 4, 5)
        ]));
        assert!(ok(&[]));
    }

    #[test]
    fn a_stale_read_is_a_violation() {
        assert!(!ok(&[put("a", 0, 1), put("b", 2, 3), get(Some("a"), 4, 5)]));
        // b written concurrently with all reads: once seen, never unseen.
        assert!(!ok(&[
            put("b", 0, 10),
            get(None, 1, 2),
            get(Some("b"), 3, 4),
            get(None, 5, 6)
        ]));
        // A value nobody wrote.
        assert!(!ok(&[put("a", 0, 1), get(Some("z"), 2, 3)]));
    }

    #[test]
    fn two_swaps_from_the_same_value_are_a_violation() {
        assert!(!ok(&[
            cas(None, "a", Some(true), 0, 1),
            cas(None, "b", Some(true), 2, 3)
        ]));
        assert!(!ok(&[
            put("a", 0, 1),
            cas(Some("a"), "b", Some(false), 2, 3)
        ]));
    }

    #[test]
    fn an_unanswered_write_may_happen_later_or_never() {
        let lost = op(Call::Put("b".into()), Answer::Unknown, 0, 0);
        assert!(ok(&[lost.clone(), get(None, 5, 6), get(Some("b"), 7, 8)]));
        assert!(ok(&[lost.clone(), get(None, 5, 6)]));
        // But not before it was called.
        let late = op(Call::Put("b".into()), Answer::Unknown, 10, 0);
        assert!(!ok(&[late, get(Some("b"), 1, 2)]));
        // An unanswered swap either way.
        assert!(ok(&[
            put("a", 0, 1),
            cas(Some("a"), "c", None, 2, 0),
            get(Some("c"), 5, 6)
        ]));
        assert!(ok(&[
            put("a", 0, 1),
            cas(Some("a"), "c", None, 2, 0),
            get(Some("a"), 5, 6)
        ]));
    }

    #[test]
    fn keys_are_checked_apart() {
        let mut other = get(Some("a"), 2, 3);
        other.key = "other".into();
        let verdict = check(&[put("a", 0, 1), other]);
        assert_eq!(verdict.keys, 2);
        assert_eq!(verdict.violations, vec!["other".to_string()]);
    }
}
