//! Restart policy, restart budget and backoff: the decisions every supervisor makes when
//! a child exits, kept apart from the actors so they are tested with a paused clock.

use std::collections::VecDeque;
use std::time::Duration;

use ractor::{ActorProcessingErr, SupervisionEvent};
use tokio::time::Instant;

use crate::config::SupervisionConfig;

/// How a child exited.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitStatus {
    /// Stopped on request (shutdown, or its work is done).
    Normal,
    /// Panicked or returned an error; carries the message.
    Failed(String),
    /// Killed from outside.
    Killed,
}

impl ExitStatus {
    /// The exit status a supervision event reports, if it is an exit.
    pub fn of(event: &SupervisionEvent) -> Option<Self> {
        match event {
            SupervisionEvent::ActorFailed(_, error) => Some(Self::Failed(describe(error))),
            SupervisionEvent::ActorTerminated(_, _, reason) => match reason.as_deref() {
                Some("killed") => Some(Self::Killed),
                _ => Some(Self::Normal),
            },
            _ => None,
        }
    }

    pub fn is_abnormal(&self) -> bool {
        !matches!(self, Self::Normal)
    }

    pub fn message(&self) -> &str {
        match self {
            Self::Normal => "stopped",
            Self::Failed(message) => message,
            Self::Killed => "killed",
        }
    }
}

fn describe(error: &ActorProcessingErr) -> String {
    error.to_string()
}

/// When a child is restarted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartPolicy {
    /// Always, however it exited (while the supervisor is not shutting down).
    Permanent,
    /// Only after an abnormal exit.
    Transient,
}

/// Restarts allowed in a sliding window and the backoff between them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartBudget {
    pub max_restarts: u32,
    pub window: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
}

impl RestartBudget {
    pub fn from_config(config: &SupervisionConfig) -> Self {
        Self {
            max_restarts: config.max_restarts,
            window: config.restart_window,
            backoff_initial: config.backoff_initial,
            backoff_max: config.backoff_max,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Restart after this delay.
    Restart { after: Duration, attempt: u32 },
    /// Leave it stopped.
    Ignore,
    /// The budget is spent: fail the supervisor so its parent decides.
    Escalate { restarts: usize, window: Duration },
}

/// The restart history of one child.
#[derive(Clone, Debug, Default)]
pub struct RestartTracker {
    recent: VecDeque<Instant>,
    total: u64,
}

impl RestartTracker {
    pub fn total_restarts(&self) -> u64 {
        self.total
    }

    /// The child made progress since it was last restarted: earlier failures no longer
    /// count toward the budget or the backoff.
    pub fn forgive(&mut self) {
        self.recent.clear();
    }

    pub fn decide(
        &mut self,
        now: Instant,
        status: &ExitStatus,
        policy: RestartPolicy,
        budget: &RestartBudget,
    ) -> Decision {
        if policy == RestartPolicy::Transient && !status.is_abnormal() {
            return Decision::Ignore;
        }
        while let Some(&oldest) = self.recent.front() {
            if now.duration_since(oldest) > budget.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() >= budget.max_restarts as usize {
            return Decision::Escalate { restarts: self.recent.len(), window: budget.window };
        }
        // Backoff doubles with each restart still inside the window: a child that failed
        // once long ago restarts at once-ish, one that keeps failing waits up to the cap.
        let attempt = self.recent.len() as u32;
        let after = budget
            .backoff_initial
            .checked_mul(1u32 << attempt.min(20))
            .unwrap_or(budget.backoff_max)
            .min(budget.backoff_max);
        self.recent.push_back(now);
        self.total += 1;
        Decision::Restart { after, attempt: attempt + 1 }
    }
}

/// What every supervisor does when a child exits, in one place: ask the child's
/// tracker, then count the restart (`tidemark_actor_restarts_total{actor=child}`) and
/// send `restart` to `myself` after the backoff, leave the child stopped, or fail the
/// supervisor with an error naming the child so its own parent decides.
pub fn on_child_exit<M: ractor::Message>(
    myself: &ractor::ActorRef<M>,
    child: &str,
    status: &ExitStatus,
    tracker: &mut RestartTracker,
    budget: &RestartBudget,
    metrics: &crate::metrics::Metrics,
    restart: impl FnOnce() -> M + Send + 'static,
) -> Result<(), ActorProcessingErr> {
    match tracker.decide(Instant::now(), status, RestartPolicy::Permanent, budget) {
        Decision::Restart { after, attempt } => {
            metrics.actor_restarts.get_or_create(&crate::metrics::ActorLabels { actor: child.to_string() }).inc();
            tracing::warn!(child, attempt, delay_ms = after.as_millis() as u64, "restarting");
            myself.send_after(after, restart);
            Ok(())
        }
        Decision::Ignore => Ok(()),
        Decision::Escalate { restarts, window } => Err(format!(
            "{child} failed {restarts} times within {}; escalating (last: {})",
            humantime::format_duration(window),
            status.message()
        )
        .into()),
    }
}

/// Exponential backoff with full jitter for retrying I/O (sinks, checkpoint loads).
#[derive(Clone, Debug)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl RetryBackoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max, attempt: 0 }
    }

    /// The next delay: uniform in [cap/2, cap], cap = min(max, initial · 2^attempt).
    pub fn next_delay(&mut self) -> Duration {
        let cap = self.initial.checked_mul(1u32 << self.attempt.min(20)).unwrap_or(self.max).min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = cap / 2;
        half + cap.mul_f64(rand::random::<f64>() * 0.5)
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BUDGET: RestartBudget = RestartBudget {
        max_restarts: 3,
        window: Duration::from_secs(10),
        backoff_initial: Duration::from_millis(100),
        backoff_max: Duration::from_millis(250),
    };

    #[tokio::test(start_paused = true)]
    async fn backoff_doubles_caps_and_budget_escalates() {
        let mut tracker = RestartTracker::default();
        let failed = ExitStatus::Failed("boom".into());
        let start = Instant::now();
        let delays: Vec<_> =
            (0..3).map(|_| tracker.decide(start, &failed, RestartPolicy::Permanent, &BUDGET)).collect();
        assert_eq!(
            delays,
            vec![
                Decision::Restart { after: Duration::from_millis(100), attempt: 1 },
                Decision::Restart { after: Duration::from_millis(200), attempt: 2 },
                Decision::Restart { after: Duration::from_millis(250), attempt: 3 },
            ]
        );
        assert!(matches!(
            tracker.decide(start, &failed, RestartPolicy::Permanent, &BUDGET),
            Decision::Escalate { restarts: 3, .. }
        ));
        // Outside the window the budget is available again.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(matches!(
            tracker.decide(Instant::now(), &failed, RestartPolicy::Permanent, &BUDGET),
            Decision::Restart { attempt: 1, .. }
        ));
        assert_eq!(tracker.total_restarts(), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn transient_children_stay_stopped_after_a_normal_exit() {
        let mut tracker = RestartTracker::default();
        assert_eq!(
            tracker.decide(Instant::now(), &ExitStatus::Normal, RestartPolicy::Transient, &BUDGET),
            Decision::Ignore
        );
        assert!(matches!(
            tracker.decide(Instant::now(), &ExitStatus::Killed, RestartPolicy::Transient, &BUDGET),
            Decision::Restart { .. }
        ));
    }

    #[test]
    fn retry_backoff_is_jittered_and_capped() {
        let mut backoff = RetryBackoff::new(Duration::from_millis(100), Duration::from_secs(1));
        for attempt in 0..10 {
            let delay = backoff.next_delay();
            let cap = Duration::from_millis(100 * (1 << attempt.min(20))).min(Duration::from_secs(1));
            assert!(delay >= cap / 2 && delay <= cap, "attempt {attempt}: {delay:?} vs cap {cap:?}");
        }
        backoff.reset();
        assert!(backoff.next_delay() <= Duration::from_millis(100));
    }

    /// A stand-in supervisor that forwards the restart messages it receives.
    struct Forward;

    impl ractor::Actor for Forward {
        type Msg = u32;
        type State = tokio::sync::mpsc::UnboundedSender<u32>;
        type Arguments = tokio::sync::mpsc::UnboundedSender<u32>;

        async fn pre_start(
            &self,
            _myself: ractor::ActorRef<u32>,
            sender: Self::Arguments,
        ) -> Result<Self::State, ActorProcessingErr> {
            Ok(sender)
        }

        async fn handle(
            &self,
            _myself: ractor::ActorRef<u32>,
            message: u32,
            sender: &mut Self::State,
        ) -> Result<(), ActorProcessingErr> {
            let _ = sender.send(message);
            Ok(())
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_child_exit_restarts_after_the_backoff_counts_it_and_escalates_when_spent() {
        let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
        let (myself, _) = ractor::Actor::spawn(None, Forward, sender).await.expect("actor");
        let metrics = crate::metrics::Metrics::new();
        let mut tracker = RestartTracker::default();
        let failed = ExitStatus::Failed("boom".into());
        for attempt in 1..=3u32 {
            on_child_exit(&myself, "sink-test", &failed, &mut tracker, &BUDGET, &metrics, move || attempt)
                .expect("restarts");
        }
        // Nothing arrives before the first backoff (100 ms), all three by the cap.
        tokio::time::advance(Duration::from_millis(99)).await;
        tokio::task::yield_now().await;
        assert!(received.try_recv().is_err());
        tokio::time::advance(Duration::from_millis(200)).await;
        let mut restarts = Vec::new();
        for _ in 0..3 {
            restarts.push(received.recv().await.expect("restart message"));
        }
        restarts.sort_unstable();
        assert_eq!(restarts, vec![1, 2, 3]);
        let counted =
            metrics.actor_restarts.get_or_create(&crate::metrics::ActorLabels { actor: "sink-test".into() }).get();
        assert_eq!(counted, 3);
        let error = on_child_exit(&myself, "sink-test", &failed, &mut tracker, &BUDGET, &metrics, || 4)
            .expect_err("the budget is spent");
        assert!(
            error.to_string().starts_with("sink-test failed 3 times within 10s; escalating (last: boom)"),
            "{error}"
        );
        myself.stop(None);
    }
}
