//! The reconciler decision for a one-shot job (a service of mode `job`):
//! one attempt at a time until one succeeds, the retries run out or the
//! deadline passes. Ended attempts are counted when their agent reports
//! them (`state/job.rs`); here only what runs is decided.

use super::decide::Decision;
use crate::scheduler::Request;
use crate::state::{retry_delay_ms, AllocState, Allocation, JobStatus, ServiceSpec};

/// Decides for job `spec` with progress `job` and live (wanted, not
/// ended) replicas `live` at `now_ms`.
pub(super) fn job(
    spec: &ServiceSpec,
    job: Option<&JobStatus>,
    live: &[&Allocation],
    now_ms: u64,
    decision: &mut Decision,
) {
    let status = job.cloned().unwrap_or_default();
    if status.state.is_done() {
        for alloc in live {
            decision.stop(alloc, &format!("job {}", status.state.as_str()));
        }
        return;
    }
    if let Some(secs) = spec.deadline_secs {
        let deadline = status.created_ms.saturating_add(secs.saturating_mul(1000));
        if status.created_ms != 0 && now_ms >= deadline {
            let reason = format!("deadline of {}s passed", secs);
            for alloc in live {
                decision.stop(alloc, &reason);
            }
            decision.fail_job = Some(reason);
            return;
        }
    }
    // An attempt whose node is down is placed again without counting as a
    // failed attempt (the program did not fail): a job runs at least once,
    // and may run twice if the node was only cut off.
    let (down, live): (Vec<&Allocation>, Vec<&Allocation>) =
        live.iter().partition(|a| a.state == AllocState::Unknown);
    for alloc in down {
        decision.stop(alloc, "its node is down; the attempt runs again elsewhere");
    }
    let retry_at = match status.attempts {
        0 => 0,
        n => status.last_ended_ms.saturating_add(retry_delay_ms(n)),
    };
    if live.is_empty() && now_ms >= retry_at {
        decision.place.push(Request::new(spec.name.clone(), 1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{DesiredState, JobState, ServiceMode};

    fn job_spec(deadline_secs: Option<u64>) -> ServiceSpec {
        ServiceSpec {
            name: "j".into(),
            mode: ServiceMode::Job,
            replicas: 1,
            command: vec!["true".into()],
            max_retries: 2,
            deadline_secs,
            ..ServiceSpec::default()
        }
    }

    fn running(spec: &ServiceSpec) -> Allocation {
        Allocation {
            id: "a1".into(),
            service: "j".into(),
            node: "n1".into(),
            spec: spec.clone(),
            host_port: 0,
            desired: DesiredState::Run,
            state: AllocState::Running,
            restarts: 0,
            pid: 1,
            message: String::new(),
            create_index: 1,
            modify_index: 1,
            version: 1,
            created_ms: 1,
            serving_since_ms: 0,
            held: false,
            slot: 0,
            health_checked: false,
            exit_code: None,
        }
    }

    fn status(state: JobState, attempts: u32) -> JobStatus {
        JobStatus {
            state,
            attempts,
            created_ms: 1_000,
            ..JobStatus::default()
        }
    }

    #[test]
    fn a_job_without_a_running_attempt_places_one() {
        let mut d = Decision::default();
        job(
            &job_spec(None),
            Some(&status(JobState::Pending, 0)),
            &[],
            2_000,
            &mut d,
        );
        assert_eq!(d.place, vec![Request::new("j", 1)]);
    }

    #[test]
    fn a_failed_attempt_with_retries_left_is_replaced_after_the_backoff() {
        let mut s = status(JobState::Running, 2);
        s.last_ended_ms = 10_000;
        let mut early = Decision::default();
        job(&job_spec(None), Some(&s), &[], 11_999, &mut early);
        assert!(early.place.is_empty(), "the second retry waits 2s");
        let mut d = Decision::default();
        job(&job_spec(None), Some(&s), &[], 12_000, &mut d);
        assert_eq!(d.place.len(), 1);
    }

    #[test]
    fn a_running_attempt_is_left_alone() {
        let spec = job_spec(None);
        let alloc = running(&spec);
        let mut d = Decision::default();
        job(
            &spec,
            Some(&status(JobState::Running, 0)),
            &[&alloc],
            2_000,
            &mut d,
        );
        assert_eq!(d, Decision::default());
    }

    #[test]
    fn an_attempt_on_a_down_node_is_placed_again_without_waiting() {
        let spec = job_spec(None);
        let mut alloc = running(&spec);
        alloc.state = AllocState::Unknown;
        let mut d = Decision::default();
        job(
            &spec,
            Some(&status(JobState::Running, 0)),
            &[&alloc],
            2_000,
            &mut d,
        );
        assert_eq!(d.stop.len(), 1);
        assert_eq!(d.place, vec![Request::new("j", 1)]);
    }

    #[test]
    fn a_succeeded_or_failed_job_places_nothing() {
        for state in [JobState::Succeeded, JobState::Failed] {
            let mut d = Decision::default();
            job(&job_spec(None), Some(&status(state, 3)), &[], 2_000, &mut d);
            assert!(d.place.is_empty(), "{state:?}");
        }
    }

    #[test]
    fn a_passed_deadline_fails_the_job_and_stops_its_attempt() {
        let spec = job_spec(Some(5));
        let alloc = running(&spec);
        let mut d = Decision::default();
        job(
            &spec,
            Some(&status(JobState::Running, 0)),
            &[&alloc],
            6_000,
            &mut d,
        );
        assert_eq!(d.fail_job.as_deref(), Some("deadline of 5s passed"));
        assert_eq!(d.stop.len(), 1);
        assert!(d.place.is_empty());
        let mut before = Decision::default();
        job(
            &spec,
            Some(&status(JobState::Running, 0)),
            &[&alloc],
            5_999,
            &mut before,
        );
        assert_eq!(before, Decision::default());
    }
}
