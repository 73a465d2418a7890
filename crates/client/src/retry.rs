//! The one retry policy of reads, sends and logins: a failed attempt goes in, a decision comes
//! out (retry after a delay, try the leader a node named, or give up with an error). No
//! sockets and no clock; the drivers in `client.rs` sleep and redial.

use std::time::Duration;

use proto::ApiError;

use crate::config::ClientConfig;
use crate::error::Error;

/// First backoff delay; doubles per attempt up to the cap.
const BACKOFF_MIN: Duration = Duration::from_millis(25);
/// Longest backoff (rate limits excepted: they say how long).
pub(crate) const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Longest backoff while the cluster is between leaders or the leader tried is gone: an
/// election takes 360-480 ms by default, so waiting up to a second would add most of a second
/// to every failover.
const ELECTION_BACKOFF_MAX: Duration = Duration::from_millis(100);

/// Why one attempt on one node failed.
#[derive(Debug, Clone, thiserror::Error)]
pub(crate) enum Failure {
    /// The node is unreachable or the connection broke.
    #[error("{0}")]
    Transport(String),
    /// The node answered with an error.
    #[error("{0}")]
    Api(ApiError),
}

impl From<Failure> for Error {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Api(e) => Error::Api(e),
            Failure::Transport(reason) => Error::Unreachable { node: None, reason },
        }
    }
}

/// Where the retried operation goes, which decides what a transport failure means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Target {
    /// Sends and logins: only the leader will do, so a broken node means an election is likely
    /// under way; poll at the election pace.
    Leader,
    /// Reads: any node will do; the failed one is marked down, so try the next one at once.
    Nearest,
}

/// What to do after a failed attempt.
#[derive(Debug)]
pub(crate) enum Decision {
    /// Try again after this long.
    Retry(Duration),
    /// A node named `leader`: try it after `after` (zero unless nodes keep naming it).
    Redirect { leader: u64, after: Duration },
    /// Stop with this error.
    GiveUp(Error),
}

/// The retry state of one operation: bounded by `send_attempts_max` attempts and by
/// `send_retry_budget` of time, so every operation ends.
#[derive(Debug)]
pub(crate) struct Retry {
    target: Target,
    attempts: u32,
    attempts_max: u32,
    budget: Duration,
    /// The leader the previous NotLeader named: a hint naming another node is news (an
    /// election ended), worth trying at once.
    last_hint: Option<u64>,
}

impl Retry {
    pub(crate) fn new(target: Target, config: &ClientConfig) -> Self {
        Self {
            target,
            attempts: 0,
            attempts_max: config.send_attempts_max,
            budget: config.send_retry_budget,
            last_hint: None,
        }
    }

    /// Decides after one more failed attempt; `elapsed` is the time since the first attempt
    /// began and `jitter` (0.5 to 1, see [`jitter`]) scales backoff delays.
    pub(crate) fn decide(&mut self, failure: Failure, elapsed: Duration, jitter: f64) -> Decision {
        self.attempts += 1;
        let attempts = self.attempts;
        let (after, redirect) = match &failure {
            Failure::Api(ApiError::RateLimited { retry_after_ms }) => {
                (Duration::from_millis(*retry_after_ms), None)
            }
            Failure::Api(ApiError::NotLeader { leader: Some(hint) }) => {
                let news = self.last_hint.replace(hint.id) != Some(hint.id);
                // Go to the named leader at once, but not in a tight loop (two nodes naming
                // each other must not spin); the same hint again and again means nodes still
                // name a leader that is gone, so poll as during an election.
                if attempts <= 3 || (news && attempts <= 10) {
                    (Duration::ZERO, Some(hint.id))
                } else {
                    (
                        backoff(attempts, ELECTION_BACKOFF_MAX, jitter),
                        Some(hint.id),
                    )
                }
            }
            Failure::Api(e) if !e.is_retryable() => return Decision::GiveUp(Error::Api(e.clone())),
            Failure::Transport(_) if self.target == Target::Nearest => (Duration::ZERO, None),
            Failure::Transport(_) | Failure::Api(ApiError::NotLeader { leader: None }) => {
                (backoff(attempts, ELECTION_BACKOFF_MAX, jitter), None)
            }
            Failure::Api(_) => (backoff(attempts, BACKOFF_MAX, jitter), None),
        };
        if attempts >= self.attempts_max || elapsed + after > self.budget {
            return Decision::GiveUp(Error::RetriesExhausted {
                attempts,
                elapsed_ms: elapsed.as_millis() as u64,
                last: failure.to_string(),
            });
        }
        match redirect {
            Some(leader) => Decision::Redirect { leader, after },
            None => Decision::Retry(after),
        }
    }
}

/// Exponential backoff: 25 ms doubling per attempt up to `cap`, times `jitter`.
pub(crate) fn backoff(attempts: u32, cap: Duration, jitter: f64) -> Duration {
    let exp = BACKOFF_MIN.saturating_mul(1u32 << attempts.saturating_sub(1).min(10));
    exp.min(cap).mul_f64(jitter)
}

/// A random factor of 0.5 to 1 for [`backoff`], so many clients do not retry in step.
pub(crate) fn jitter() -> f64 {
    0.5 + rand::random::<f64>() * 0.5
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::{LeaderHint, RejectReason};
    use test_case::test_case;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    fn hint(id: u64) -> Failure {
        Failure::Api(ApiError::NotLeader {
            leader: Some(LeaderHint {
                id,
                client_addr: ([127, 0, 0, 1], 9).into(),
            }),
        })
    }

    fn transport() -> Failure {
        Failure::Transport("connection refused".into())
    }

    /// Runs `earlier` failures through a fresh policy, then returns the decision on `failure`.
    fn decide(target: Target, earlier: Vec<Failure>, failure: Failure, elapsed: u64) -> Decision {
        let mut retry = Retry::new(target, &ClientConfig::default());
        for f in earlier {
            retry.decide(f, Duration::ZERO, 1.0);
        }
        retry.decide(failure, MS(elapsed), 1.0)
    }

    fn gave_up_exhausted(decision: &Decision) -> bool {
        matches!(decision, Decision::GiveUp(Error::RetriesExhausted { .. }))
    }

    #[test_case(Target::Leader, vec![], Failure::Api(ApiError::RateLimited { retry_after_ms: 700 }), Decision::Retry(MS(700)); "rate limit waits what the node asks")]
    #[test_case(Target::Leader, vec![], hint(2), Decision::Redirect { leader: 2, after: MS(0) }; "a hint is tried at once")]
    #[test_case(Target::Leader, vec![hint(2), hint(2), hint(2)], hint(2), Decision::Redirect { leader: 2, after: MS(100) }; "a hint repeated past three attempts polls at the election pace")]
    #[test_case(Target::Leader, vec![hint(2), hint(2), hint(2)], hint(3), Decision::Redirect { leader: 3, after: MS(0) }; "a hint naming a new leader is tried at once")]
    #[test_case(Target::Leader, vec![], transport(), Decision::Retry(MS(25)); "a broken leader backs off from 25 ms")]
    #[test_case(Target::Leader, vec![transport(); 3], transport(), Decision::Retry(MS(100)); "a broken leader backs off at most 100 ms")]
    #[test_case(Target::Leader, vec![], Failure::Api(ApiError::NotLeader { leader: None }), Decision::Retry(MS(25)); "no leader polls at the election pace")]
    #[test_case(Target::Nearest, vec![], transport(), Decision::Retry(MS(0)); "a broken reader moves to the next node at once")]
    #[test_case(Target::Nearest, vec![transport(); 4], Failure::Api(ApiError::Aborted), Decision::Retry(MS(400)); "other retryable errors back off exponentially")]
    #[test_case(Target::Leader, vec![transport(); 20], Failure::Api(ApiError::Aborted), Decision::Retry(MS(1000)); "exponential backoff is capped at 1 s")]
    #[test_case(Target::Leader, vec![], Failure::Api(ApiError::Rejected(RejectReason::NameTaken)), Decision::GiveUp(Error::Api(ApiError::Rejected(RejectReason::NameTaken))); "a rejection gives up at once")]
    fn decision(target: Target, earlier: Vec<Failure>, failure: Failure, expected: Decision) {
        let decision = decide(target, earlier, failure, 0);
        assert_eq!(format!("{decision:?}"), format!("{expected:?}"));
    }

    #[test_case(Target::Leader, 30_000, transport(); "a wait past the time budget")]
    #[test_case(Target::Nearest, 29_000, Failure::Api(ApiError::RateLimited { retry_after_ms: 1_001 }); "a rate limit past the time budget")]
    fn budget_exhausted(target: Target, elapsed_ms: u64, failure: Failure) {
        assert!(gave_up_exhausted(&decide(
            target,
            vec![],
            failure,
            elapsed_ms
        )));
    }

    #[test]
    fn attempts_are_bounded() {
        let config = ClientConfig::default();
        let earlier = (1..config.send_attempts_max).map(|_| transport()).collect();
        assert!(gave_up_exhausted(&decide(
            Target::Nearest,
            earlier,
            transport(),
            0
        )));
    }

    #[test]
    fn jittered_backoff_stays_within_half_and_full_delay() {
        for attempts in 1..40 {
            let d = backoff(attempts, BACKOFF_MAX, jitter());
            assert!(
                d <= BACKOFF_MAX && d >= BACKOFF_MIN / 2,
                "{attempts}: {d:?}"
            );
        }
    }
}
