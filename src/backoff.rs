//! Capped exponential backoff with jitter, for work that must eventually succeed (a first
//! certificate, a cluster connection) without hammering what failed.

use std::time::Duration;

pub const DEFAULT_MIN: Duration = Duration::from_secs(1);
pub const DEFAULT_MAX: Duration = Duration::from_secs(60);

#[derive(Clone, Debug)]
pub struct Backoff {
    next: Duration,
    min: Duration,
    max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(DEFAULT_MIN, DEFAULT_MAX)
    }
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self {
            next: min,
            min,
            max: max.max(min),
        }
    }

    /// The delay before the next attempt (doubling up to the cap, plus up to 20% jitter so
    /// replicas do not retry in lockstep).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        jitter(delay)
    }

    /// After a success: the next failure starts from the minimum again.
    pub fn reset(&mut self) {
        self.next = self.min;
    }
}

fn jitter(delay: Duration) -> Duration {
    delay + delay.mul_f64(random_fraction() * 0.2)
}

/// A random number in [0, 1], in 256 steps: enough to spread retries apart.
pub fn random_fraction() -> f64 {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    f64::from(byte[0]) / 255.0
}

/// Runs `attempt` until it succeeds, logging each failure as `what failed`.
pub async fn retry_forever<T, F, Fut>(what: &str, mut attempt: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let mut backoff = Backoff::default();
    loop {
        match attempt().await {
            Ok(value) => return value,
            Err(error) => {
                let delay = backoff.next_delay();
                tracing::error!(error = %format!("{error:#}"), retry_in = ?delay, "{what} failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_the_cap_with_bounded_jitter_and_resets() {
        let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        let bases = [1, 2, 4, 5, 5];
        for base in bases {
            let delay = backoff.next_delay();
            let base = Duration::from_secs(base);
            assert!(
                delay >= base && delay <= base.mul_f64(1.2),
                "{delay:?} vs {base:?}"
            );
        }
        backoff.reset();
        assert!(backoff.next_delay() < Duration::from_millis(1201));
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_the_attempt_succeeds() {
        let mut calls = 0;
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
    }
}
