//! A work queue of namespace names, like client-go's: a name waits at most once, is never
//! reconciled by two workers at once (a change during its reconcile queues it again), and a
//! failed name comes back after a per-name exponential backoff.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tokio::sync::Notify;

const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(60);

#[derive(Default)]
struct Inner {
    order: VecDeque<String>,
    queued: HashSet<String>,
    active: HashSet<String>,
    /// Changed while active: queue again when done.
    dirty: HashSet<String>,
    failures: HashMap<String, u32>,
}

#[derive(Default)]
pub struct WorkQueue {
    inner: Mutex<Inner>,
    ready: Notify,
}

impl WorkQueue {
    pub fn add(&self, key: &str) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if inner.active.contains(key) {
            inner.dirty.insert(key.to_owned());
        } else if inner.queued.insert(key.to_owned()) {
            inner.order.push_back(key.to_owned());
            drop(inner);
            self.ready.notify_one();
        }
    }

    /// Waits for the next name; it is then active until `done`.
    pub async fn next(&self) -> String {
        loop {
            let ready = self.ready.notified();
            tokio::pin!(ready);
            ready.as_mut().enable();
            if let Ok(mut inner) = self.inner.lock()
                && let Some(key) = inner.order.pop_front()
            {
                inner.queued.remove(&key);
                inner.active.insert(key.clone());
                // Wake another worker if more is waiting.
                if !inner.order.is_empty() {
                    self.ready.notify_one();
                }
                return key;
            }
            ready.await;
        }
    }

    /// `key` succeeded (or needs nothing): its backoff resets.
    pub fn done(&self, key: &str) {
        self.finish(key, true);
    }

    /// `key` failed: it comes back after its backoff.
    pub fn retry_later(self: &Arc<Self>, key: &str) -> Duration {
        let failures = match self.inner.lock() {
            Ok(mut inner) => {
                let n = inner.failures.entry(key.to_owned()).or_insert(0);
                *n = n.saturating_add(1);
                *n
            }
            Err(_) => 1,
        };
        self.finish(key, false);
        let delay = RETRY_MIN
            .saturating_mul(1u32 << failures.saturating_sub(1).min(20))
            .min(RETRY_MAX);
        // Weak: a queue whose reconciler stopped (leadership lost) is not kept alive by retries.
        let queue: Weak<Self> = Arc::downgrade(self);
        let key = key.to_owned();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if let Some(queue) = queue.upgrade() {
                queue.add(&key);
            }
        });
        delay
    }

    fn finish(&self, key: &str, succeeded: bool) {
        let requeue = match self.inner.lock() {
            Ok(mut inner) => {
                inner.active.remove(key);
                if succeeded {
                    inner.failures.remove(key);
                }
                // A failed name comes back after its backoff, changed or not.
                inner.dirty.remove(key) && succeeded
            }
            Err(_) => false,
        };
        if requeue {
            self.add(key);
        }
    }

    /// Names waiting or being reconciled now.
    pub fn pending(&self) -> usize {
        self.inner
            .lock()
            .map_or(0, |i| i.queued.len() + i.active.len())
    }

    /// Names whose last reconcile failed.
    pub fn failing(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.failures.len())
    }

    /// Stops retrying names that no longer exist.
    pub fn forget(&self, key: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.failures.remove(key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_name_waits_once_and_a_change_while_active_queues_it_again() {
        let queue = WorkQueue::default();
        queue.add("a");
        queue.add("b");
        queue.add("a");
        assert_eq!(queue.pending(), 2);
        assert_eq!(queue.next().await, "a");
        queue.add("a"); // changed while being reconciled
        assert_eq!(queue.next().await, "b", "never two workers on one name");
        queue.done("a");
        assert_eq!(queue.next().await, "a");
        queue.done("a");
        queue.done("b");
        assert_eq!(queue.pending(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_change_during_a_failed_reconcile_waits_for_the_backoff() {
        let queue = Arc::new(WorkQueue::default());
        queue.add("a");
        let key = queue.next().await;
        queue.add("a"); // changed meanwhile
        queue.retry_later(&key);
        assert_eq!(queue.pending(), 0, "requeued at once despite the failure");
        let back = tokio::time::timeout(Duration::from_millis(49), queue.next()).await;
        assert!(back.is_err(), "came back before its backoff");
        assert_eq!(queue.next().await, "a");
    }

    #[tokio::test(start_paused = true)]
    async fn failures_come_back_with_growing_backoff_and_reset_on_success() {
        let queue = Arc::new(WorkQueue::default());
        queue.add("a");
        let key = queue.next().await;
        assert_eq!(queue.retry_later(&key), Duration::from_millis(50));
        assert_eq!(queue.failing(), 1);
        assert_eq!(queue.next().await, "a");
        assert_eq!(queue.retry_later("a"), Duration::from_millis(100));
        assert_eq!(queue.next().await, "a");
        assert_eq!(queue.retry_later("a"), Duration::from_millis(200));
        assert_eq!(queue.next().await, "a");
        queue.done("a");
        assert_eq!(queue.failing(), 0);
    }
}
