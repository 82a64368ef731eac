//! A one-shot job's progress (a service of mode `job`): its state, the
//! attempts that ended and the last exit status. The control plane, not
//! the agent, counts attempts: the count survives agent restarts and a
//! replacement on another node, and `job ps` reads it from one place.

use serde::{Deserialize, Serialize};

use super::{EventKind, State};

/// Where a job is.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    /// No attempt has started yet.
    #[default]
    Pending,
    /// An attempt runs (or is being placed after a failed one).
    Running,
    /// An attempt exited with status 0.
    Succeeded,
    /// `max_retries + 1` attempts failed, or the deadline passed.
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Running => "running",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
        }
    }

    /// Succeeded or failed: nothing more runs.
    pub fn is_done(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed)
    }
}

/// A job's record beside its spec.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobStatus {
    pub state: JobState,
    /// Attempts that ended (succeeded or not).
    pub attempts: u32,
    /// The exit status of the last ended attempt.
    pub exit_code: Option<i32>,
    /// Why it failed or succeeded, for `job ps`.
    pub message: String,
    /// Proposer time of its creation: the deadline counts from here.
    pub created_ms: u64,
    /// Proposer time the last attempt's end was recorded: the next
    /// attempt waits [`retry_delay_ms`] from here.
    #[serde(default)]
    pub last_ended_ms: u64,
}

/// The first retry's delay; each next one doubles, up to [`RETRY_MAX_MS`]
/// (the agent's restart backoff, kept here because the control plane
/// places the retries).
pub const RETRY_BASE_MS: u64 = 1_000;
pub const RETRY_MAX_MS: u64 = 30_000;

/// How long after the end of attempt number `attempts` (1 for the first)
/// the next one is placed.
pub fn retry_delay_ms(attempts: u32) -> u64 {
    let doublings = attempts.saturating_sub(1).min(16);
    (RETRY_BASE_MS << doublings).min(RETRY_MAX_MS)
}

/// What one ended attempt means for a job that allows `max_retries`
/// retries and has seen `attempts` attempts end before it.
pub fn after_attempt(attempts: u32, max_retries: u32, exit_code: i32) -> JobState {
    if exit_code == 0 {
        JobState::Succeeded
    } else {
        after_failure(attempts, max_retries)
    }
}

/// What one failed attempt (an exit status other than 0, or an assignment
/// its agent refused) means, as [`after_attempt`].
fn after_failure(attempts: u32, max_retries: u32) -> JobState {
    if attempts.saturating_add(1) > max_retries {
        JobState::Failed
    } else {
        JobState::Running
    }
}

/// How an attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum AttemptEnd {
    /// Its program exited with this status.
    Exited(i32),
    /// Its agent refused the assignment (why): it never ran.
    Refused(String),
}

impl State {
    /// Records that job replica `alloc` of `service` ended (its state is
    /// terminal, or its agent refused it): counts the attempt and, when the
    /// job is done, says so. A refusal is kept as the job's message while
    /// the attempt is retried.
    pub(super) fn job_attempt_ended(
        &mut self,
        index: u64,
        service: &str,
        node: &str,
        alloc: &str,
        end: AttemptEnd,
    ) {
        let Some(s) = self.services.get_mut(service) else {
            return;
        };
        let max_retries = s.spec.max_retries;
        let job = s.job.get_or_insert_with(JobStatus::default);
        if job.state.is_done() {
            return;
        }
        let (next, exit_code, ended) = match &end {
            AttemptEnd::Exited(code) => (
                after_attempt(job.attempts, max_retries, *code),
                Some(*code),
                format!("exited with status {code}"),
            ),
            AttemptEnd::Refused(why) => (
                after_failure(job.attempts, max_retries),
                None,
                format!("was refused by node {node}: {why}"),
            ),
        };
        job.attempts = job.attempts.saturating_add(1);
        job.exit_code = exit_code;
        job.last_ended_ms = self.clock_ms;
        job.state = next;
        let attempts = job.attempts;
        let (kind, message) = match next {
            JobState::Succeeded => (
                EventKind::JobSucceeded,
                format!("attempt {attempts} {ended}"),
            ),
            JobState::Failed => (
                EventKind::JobFailed,
                format!("attempt {attempts} {ended}; no retries left (max {max_retries})"),
            ),
            _ => {
                if matches!(end, AttemptEnd::Refused(_)) {
                    job.message = format!("attempt {attempts} {ended}; retrying");
                }
                return;
            }
        };
        job.message = message.clone();
        self.event(index, kind, service, node, alloc, &message);
    }

    /// Fails an unfinished job (its deadline passed); its replica is
    /// stopped by the reconciler.
    pub(super) fn fail_job(&mut self, index: u64, service: &str, reason: &str) {
        let Some(job) = self.services.get_mut(service).and_then(|s| s.job.as_mut()) else {
            return;
        };
        if job.state.is_done() {
            return;
        }
        job.state = JobState::Failed;
        job.message = reason.to_string();
        self.event(index, EventKind::JobFailed, service, "", "", reason);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::fixtures::{node, place, spec};
    use crate::state::{AllocReport, AllocState, Command, DesiredState, Plan, ServiceMode};

    fn job_state(max_retries: u32) -> State {
        let mut s = State::default();
        s.apply(1, node("n1")).unwrap();
        let mut job = spec("j", 1);
        job.mode = ServiceMode::Job;
        job.max_retries = max_retries;
        s.apply(2, Command::CreateService { spec: job }).unwrap();
        s
    }

    fn attempt(s: &mut State, index: u64, id: &str, state: AllocState, code: i32) {
        let plan = Plan {
            place: vec![place(id, "j", 20000 + (index / 10) as u16)],
            ..Plan::default()
        };
        s.apply(index, Command::ApplyPlan { plan }).unwrap();
        let report = AllocReport {
            id: id.into(),
            state,
            restarts: 0,
            pid: 0,
            message: String::new(),
            port: 0,
            health_checked: false,
            exit_code: Some(code),
            refused: false,
        };
        s.apply(
            index + 1,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
    }

    fn events(s: &State, kind: EventKind) -> usize {
        s.events.iter().filter(|e| e.kind == kind).count()
    }

    #[test]
    fn a_job_failing_twice_then_succeeding_ends_succeeded_after_three_attempts() {
        let mut s = job_state(2);
        attempt(&mut s, 10, "a", AllocState::Exited, 1);
        attempt(&mut s, 20, "b", AllocState::Exited, 1);
        assert_eq!(
            s.services["j"].job.as_ref().unwrap().state,
            JobState::Running
        );
        attempt(&mut s, 30, "c", AllocState::Completed, 0);
        let job = s.services["j"].job.clone().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.exit_code),
            (JobState::Succeeded, 3, Some(0))
        );
        assert!(s.allocs.values().all(|a| a.desired == DesiredState::Stop));
        assert_eq!(events(&s, EventKind::JobSucceeded), 1);
    }

    #[test]
    fn a_job_out_of_retries_fails_with_the_last_exit_status() {
        let mut s = job_state(1);
        attempt(&mut s, 10, "a", AllocState::Exited, 3);
        attempt(&mut s, 20, "b", AllocState::Exited, 3);
        let job = s.services["j"].job.clone().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.exit_code),
            (JobState::Failed, 2, Some(3))
        );
        assert_eq!(events(&s, EventKind::JobFailed), 1);
    }

    #[test]
    fn a_repeated_report_of_an_ended_attempt_counts_once() {
        let mut s = job_state(2);
        attempt(&mut s, 10, "a", AllocState::Exited, 1);
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Exited,
            restarts: 0,
            pid: 0,
            message: String::new(),
            port: 0,
            health_checked: false,
            exit_code: Some(1),
            refused: false,
        };
        s.apply(
            12,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        assert_eq!(s.services["j"].job.as_ref().unwrap().attempts, 1);
    }

    fn refuse(s: &mut State, index: u64, id: &str) {
        let plan = Plan {
            place: vec![place(id, "j", 20000 + (index / 10) as u16)],
            ..Plan::default()
        };
        s.apply(index, Command::ApplyPlan { plan }).unwrap();
        let report = AllocReport {
            id: id.into(),
            state: AllocState::Failed,
            restarts: 0,
            pid: 0,
            message: "allocation a: process replicas are disabled on this node".into(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: true,
        };
        s.apply(
            index + 1,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
    }

    #[test]
    fn an_attempt_its_agent_refuses_fails_the_job_at_once_with_the_refusal() {
        let mut s = job_state(0);
        refuse(&mut s, 10, "a");
        let job = s.services["j"].job.clone().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.exit_code),
            (JobState::Failed, 1, None)
        );
        assert!(
            job.message.contains(
                "attempt 1 was refused by node n1: allocation a: process replicas are disabled"
            ),
            "{}",
            job.message
        );
        assert_eq!(s.allocs["a"].desired, DesiredState::Stop);
        assert_eq!(events(&s, EventKind::JobFailed), 1);
    }

    #[test]
    fn a_refused_attempt_counts_and_is_retried_while_retries_are_left() {
        let mut s = job_state(1);
        refuse(&mut s, 10, "a");
        let job = s.services["j"].job.clone().unwrap();
        assert_eq!((job.state, job.attempts), (JobState::Running, 1));
        assert!(
            job.message.contains("refused by node n1"),
            "{}",
            job.message
        );
        assert_eq!(s.allocs["a"].desired, DesiredState::Stop);
        // The retry runs and succeeds.
        attempt(&mut s, 20, "b", AllocState::Completed, 0);
        let job = s.services["j"].job.clone().unwrap();
        assert_eq!(
            (job.state, job.attempts, job.exit_code),
            (JobState::Succeeded, 2, Some(0))
        );
    }

    #[test]
    fn a_failed_report_that_is_no_refusal_leaves_the_attempt_to_its_agent() {
        // A pull that failed is retried by the agent: no attempt ended.
        let mut s = job_state(0);
        let plan = Plan {
            place: vec![place("a", "j", 20000)],
            ..Plan::default()
        };
        s.apply(10, Command::ApplyPlan { plan }).unwrap();
        let report = AllocReport {
            id: "a".into(),
            state: AllocState::Failed,
            restarts: 0,
            pid: 0,
            message: "failed to pull x: timeout; retrying in 1s".into(),
            port: 0,
            health_checked: false,
            exit_code: None,
            refused: false,
        };
        s.apply(
            11,
            Command::ReportAllocs {
                node: "n1".into(),
                reports: vec![report],
            },
        )
        .unwrap();
        assert_eq!(s.services["j"].job.as_ref().map_or(0, |j| j.attempts), 0);
        assert_eq!(s.allocs["a"].desired, DesiredState::Run);
    }

    #[test]
    fn a_failed_attempt_is_retried_while_retries_are_left() {
        assert_eq!(after_attempt(0, 2, 1), JobState::Running);
        assert_eq!(after_attempt(1, 2, 1), JobState::Running);
        assert_eq!(after_attempt(2, 2, 1), JobState::Failed);
    }

    #[test]
    fn exit_status_zero_succeeds_whatever_the_attempt() {
        assert_eq!(after_attempt(0, 0, 0), JobState::Succeeded);
        assert_eq!(after_attempt(2, 2, 0), JobState::Succeeded);
    }

    #[test]
    fn retries_wait_one_second_doubling_up_to_thirty() {
        let delays: Vec<u64> = (1..=7).map(retry_delay_ms).collect();
        assert_eq!(delays, [1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000]);
        assert_eq!(retry_delay_ms(u32::MAX), RETRY_MAX_MS);
    }

    #[test]
    fn no_retries_fails_on_the_first_failure() {
        assert_eq!(after_attempt(0, 0, 3), JobState::Failed);
    }
}
