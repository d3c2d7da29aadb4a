//! Retries of work that must eventually succeed (a first certificate, a cluster connection, a
//! leader task) without hammering what failed: backon's exponential backoff, from 1 s doubling
//! to 60 s, with jitter so that replicas do not retry in lockstep.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder, Retryable};

pub const MIN_DELAY: Duration = Duration::from_secs(1);
pub const MAX_DELAY: Duration = Duration::from_secs(60);

/// The one retry policy: never gives up.
pub fn policy() -> ExponentialBuilder {
    ExponentialBuilder::new()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_jitter()
        .without_max_times()
}

/// The policy's delays, for loops that cannot be one `retry` call (a watch that restarts, a
/// leader task, a reconcile judged again later) and start over after a success.
pub struct Delays(ExponentialBackoff);

impl Default for Delays {
    fn default() -> Self {
        Self(policy().build())
    }
}

impl Delays {
    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        // `without_max_times`: the iterator never ends; the cap is the fallback anyway.
        self.0.next().unwrap_or(MAX_DELAY)
    }

    /// After a success: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        *self = Self::default();
    }
}

/// Runs `attempt` until it succeeds, logging each failure as `what failed`.
pub async fn retry_forever<T, F, Fut>(what: &str, attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut attempt = attempt;
    loop {
        let result = (&mut attempt)
            .retry(policy())
            .sleep(tokio::time::sleep)
            .notify(|error: &anyhow::Error, delay: Duration| {
                tracing::error!(error = %format!("{error:#}"), retry_in = ?delay, "{what} failed");
            })
            .await;
        match result {
            Ok(value) => return value,
            // Only if the policy ever gave up: start it over.
            Err(error) => tracing::error!(error = %format!("{error:#}"), "{what} failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter_and_resets() {
        let mut delays = Delays::default();
        // backon's jitter adds up to one more delay: [d, 2d).
        for base in [1, 2, 4, 8, 16, 32, 60, 60] {
            let delay = delays.next_delay();
            let base = Duration::from_secs(base);
            assert!(delay >= base && delay < base * 2, "{delay:?} vs {base:?}");
        }
        delays.reset();
        assert!(delays.next_delay() < MIN_DELAY * 2);
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempt_succeeds() {
        let mut calls = 0;
        let started = tokio::time::Instant::now();
        let value = retry_forever("test", || {
            calls += 1;
            let n = calls;
            async move {
                if n < 4 {
                    anyhow::bail!("not yet")
                }
                Ok(n)
            }
        })
        .await;
        assert_eq!(value, 4);
        // Three failures: at least 1 + 2 + 4 s of backoff, less than twice that.
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_secs(7) && waited < Duration::from_secs(14),
            "{waited:?}"
        );
    }
}
