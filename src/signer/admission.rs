//! Seats of calls to a stage of the pipeline (authentication, issuance) with per-source
//! fairness, in the spirit of Kubernetes' API Priority and Fairness: a stage runs at most
//! `total` calls at once and at most `per_source` of one source address. A call that finds no
//! free seat waits in its source's queue, and freed seats go round-robin to the sources that
//! have callers waiting. A burst from one address (a node's ztunnel after a restart, an
//! east-west gateway) thus waits its turn while every other address keeps being served.
//! A call is refused only when its source's queue is full or it has waited `max_wait`.
//!
//! Written here rather than taken from a crate: tokio's and tower's semaphores and limiters
//! are first-come-first-served across all callers, and no maintained crate queues per key
//! with round-robin dispatch.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::oneshot;

/// The bounds of one stage.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SeatLimits {
    /// Calls running at once, all sources together.
    pub total: usize,
    /// Calls of one source running at once (0: no per-source bound).
    pub per_source: usize,
    /// Calls of one source waiting at once; beyond it a call is refused at once.
    pub queue_per_source: usize,
    /// How long a call may wait for its seat.
    pub max_wait: Duration,
}

/// Why a call was not admitted. Each has a bounded metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("too many calls from this source are waiting")]
    QueueFull,
    #[error("waited too long for a free seat")]
    WaitedTooLong,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::QueueFull => "queue-full",
            Refusal::WaitedTooLong => "queue-wait",
        }
    }
}

/// A stage's seats and queues. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Seats {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limits: SeatLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    sources: HashMap<Source, SourceState>,
    /// Sources with callers waiting, in the order they get the next free seats.
    turns: VecDeque<Source>,
    next_ticket: u64,
}

#[derive(Debug, Default)]
struct SourceState {
    running: usize,
    waiting: VecDeque<(u64, oneshot::Sender<()>)>,
}

/// `None`: no address known (in-process callers); they share one queue.
type Source = Option<IpAddr>;

/// One admitted call's seat, given back when dropped.
#[derive(Debug)]
pub struct Seat {
    inner: Arc<Inner>,
    source: Source,
}

impl Seats {
    pub fn new(limits: SeatLimits) -> Self {
        Self {
            inner: Arc::new(Inner {
                limits: SeatLimits {
                    total: limits.total.max(1),
                    ..limits
                },
                state: Mutex::new(State::default()),
            }),
        }
    }

    /// A seat for a call from `source`: at once if one is free and no caller of the same
    /// source is ahead, else after waiting in the source's queue.
    pub async fn admit(&self, source: Option<IpAddr>) -> Result<Seat, Refusal> {
        let source = source.map(crate::per_source::canonical);
        let (ticket, granted) = {
            let mut state = self.inner.lock();
            let limits = self.inner.limits;
            let free = state.running < limits.total;
            let entry = state.sources.entry(source).or_default();
            if free && entry.waiting.is_empty() && self.inner.under_source_bound(entry) {
                entry.running += 1;
                state.running += 1;
                return Ok(self.seat(source));
            }
            if entry.waiting.len() >= limits.queue_per_source {
                if entry.running == 0 && entry.waiting.is_empty() {
                    state.sources.remove(&source);
                }
                return Err(Refusal::QueueFull);
            }
            let (tx, rx) = oneshot::channel();
            let ticket = state.next_ticket;
            state.next_ticket += 1;
            let entry = state.sources.entry(source).or_default();
            entry.waiting.push_back((ticket, tx));
            if entry.waiting.len() == 1 {
                state.turns.push_back(source);
            }
            (ticket, rx)
        };
        let mut wait = Waiting {
            inner: &self.inner,
            source,
            ticket,
            granted,
            seated: false,
        };
        // The sender is only dropped unsent by this waiter itself (Waiting::drop): an error
        // here cannot happen, and is treated as having waited in vain.
        match tokio::time::timeout(self.inner.limits.max_wait, &mut wait.granted).await {
            Ok(Ok(())) => {
                wait.seated = true;
                Ok(self.seat(source))
            }
            Ok(Err(_)) | Err(_) => Err(Refusal::WaitedTooLong),
        }
    }

    fn seat(&self, source: Source) -> Seat {
        Seat {
            inner: self.inner.clone(),
            source,
        }
    }

    /// Calls running now, all sources together.
    #[cfg(test)]
    fn running(&self) -> usize {
        self.inner.lock().running
    }

    /// Calls waiting now, all sources together.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let state = self.inner.lock();
        state.sources.values().map(|s| s.waiting.len()).sum()
    }

    #[cfg(test)]
    fn tracked_sources(&self) -> usize {
        self.inner.lock().sources.len()
    }
}

impl Inner {
    /// A poisoned lock only means another caller panicked while holding it; the counters are
    /// updated in single steps that leave them consistent, so serving goes on.
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn under_source_bound(&self, source: &SourceState) -> bool {
        self.limits.per_source == 0 || source.running < self.limits.per_source
    }

    /// Gives free seats to waiting callers, one per source in turn.
    fn dispatch(&self, state: &mut State) {
        let mut passed = 0;
        while state.running < self.limits.total && passed < state.turns.len() {
            let Some(source) = state.turns.pop_front() else {
                return;
            };
            let Some(entry) = state.sources.get_mut(&source) else {
                continue;
            };
            if !self.under_source_bound(entry) {
                // Its turn comes again when one of its own calls ends.
                state.turns.push_back(source);
                passed += 1;
                continue;
            }
            let mut granted = false;
            while let Some((_, tx)) = entry.waiting.pop_front() {
                // A waiter that gave up has closed its receiver: skip it.
                if tx.send(()).is_ok() {
                    granted = true;
                    break;
                }
            }
            if granted {
                entry.running += 1;
                state.running += 1;
                passed = 0;
            }
            if !entry.waiting.is_empty() {
                state.turns.push_back(source);
            } else if entry.running == 0 {
                state.sources.remove(&source);
            }
        }
    }
}

/// A caller in a queue. Dropped without its seat (timed out, or the call was cancelled), it
/// leaves the queue; dropped with a seat granted but not taken, it gives the seat back.
struct Waiting<'a> {
    inner: &'a Arc<Inner>,
    source: Source,
    ticket: u64,
    granted: oneshot::Receiver<()>,
    /// The seat was received and handed to a [`Seat`], which gives it back.
    seated: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if self.seated {
            return;
        }
        // Closing first settles the race with `dispatch`: after it no seat can be sent.
        self.granted.close();
        let seat_sent = self.granted.try_recv().is_ok();
        let mut state = self.inner.lock();
        if seat_sent {
            release(self.inner, &mut state, self.source);
            return;
        }
        let Some(entry) = state.sources.get_mut(&self.source) else {
            return;
        };
        entry.waiting.retain(|(ticket, _)| *ticket != self.ticket);
        if entry.waiting.is_empty() {
            let idle = entry.running == 0;
            state.turns.retain(|s| *s != self.source);
            if idle {
                state.sources.remove(&self.source);
            }
        }
    }
}

fn release(inner: &Inner, state: &mut State, source: Source) {
    if let Some(entry) = state.sources.get_mut(&source) {
        entry.running = entry.running.saturating_sub(1);
        if entry.running == 0 && entry.waiting.is_empty() {
            state.sources.remove(&source);
        }
    }
    state.running = state.running.saturating_sub(1);
    inner.dispatch(state);
}

impl Drop for Seat {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        release(&self.inner, &mut state, self.source);
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;

    fn ip(last: u8) -> Option<IpAddr> {
        Some(IpAddr::from([10, 0, 0, last]))
    }

    fn limits(total: usize, per_source: usize, queue: usize) -> SeatLimits {
        SeatLimits {
            total,
            per_source,
            queue_per_source: queue,
            max_wait: Duration::from_secs(60),
        }
    }

    async fn until(condition: impl Fn() -> bool) {
        while !condition() {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_burst_from_one_source_waits_while_another_source_gets_the_next_seat() {
        let admission = Seats::new(limits(2, 2, 100));
        let first = admission.admit(ip(1)).await.unwrap();
        let second = admission.admit(ip(1)).await.unwrap();
        // Three more from the burst, then one from elsewhere: all wait, nothing is refused.
        let burst: Vec<_> = (0..3)
            .map(|_| {
                let admission = admission.clone();
                tokio::spawn(async move { admission.admit(ip(1)).await })
            })
            .collect();
        until(|| admission.waiting() == 3).await;
        let other = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(ip(2)).await })
        };
        until(|| admission.waiting() == 4).await;
        // One seat frees: the burst's source had the earlier turn and takes it ...
        drop(first);
        until(|| burst.iter().any(|b| b.is_finished())).await;
        assert_eq!(admission.waiting(), 3);
        assert!(!other.is_finished());
        // ... and the next free seat goes to the other source, not to the rest of the burst.
        drop(second);
        let other_seat = other.await.unwrap().unwrap();
        assert_eq!(other_seat.source, ip(2));
        assert_eq!(admission.waiting(), 2);
        assert_eq!(burst.iter().filter(|b| b.is_finished()).count(), 1);
    }

    #[tokio::test]
    async fn the_per_source_bound_leaves_seats_to_other_sources() {
        let admission = Seats::new(limits(10, 2, 100));
        let _a = admission.admit(ip(1)).await.unwrap();
        let _b = admission.admit(ip(1)).await.unwrap();
        assert!(
            admission.admit(ip(1)).now_or_never().is_none(),
            "a third call waits"
        );
        let other = admission.admit(ip(2)).now_or_never();
        assert!(
            matches!(other, Some(Ok(_))),
            "another source is admitted at once"
        );
    }

    #[tokio::test]
    async fn refuses_when_the_source_queue_is_full_and_forgets_idle_sources() {
        let admission = Seats::new(limits(1, 0, 1));
        let seat = admission.admit(ip(1)).await.unwrap();
        let queued = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(ip(1)).await })
        };
        while admission.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        assert_eq!(
            admission.admit(ip(1)).await.unwrap_err(),
            Refusal::QueueFull
        );
        // Another source has a queue of its own.
        let other = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(ip(2)).await })
        };
        while admission.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        drop(seat);
        drop(queued.await.unwrap().unwrap());
        drop(other.await.unwrap().unwrap());
        assert_eq!(admission.running(), 0);
        assert_eq!(admission.tracked_sources(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_caller_that_waited_too_long_is_refused_and_leaves_the_queue() {
        let admission = Seats::new(SeatLimits {
            max_wait: Duration::from_secs(5),
            ..limits(1, 0, 10)
        });
        let seat = admission.admit(ip(1)).await.unwrap();
        let refused = admission.admit(ip(2)).await.unwrap_err();
        assert_eq!(refused, Refusal::WaitedTooLong);
        assert_eq!(admission.waiting(), 0);
        drop(seat);
        assert_eq!(admission.tracked_sources(), 0);
        assert!(admission.admit(ip(2)).await.is_ok());
    }

    #[tokio::test]
    async fn a_cancelled_waiter_gives_its_turn_to_the_next() {
        let admission = Seats::new(limits(1, 0, 10));
        let seat = admission.admit(ip(1)).await.unwrap();
        let cancelled = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(ip(2)).await })
        };
        while admission.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        let next = {
            let admission = admission.clone();
            tokio::spawn(async move { admission.admit(ip(3)).await })
        };
        while admission.waiting() < 2 {
            tokio::task::yield_now().await;
        }
        cancelled.abort();
        let _ = cancelled.await;
        assert_eq!(admission.waiting(), 1);
        drop(seat);
        let seat = next.await.unwrap().unwrap();
        assert_eq!(seat.source, ip(3));
        drop(seat);
        assert_eq!(admission.running(), 0);
    }

    #[tokio::test]
    async fn ipv4_mapped_addresses_are_their_ipv4_source() {
        let admission = Seats::new(limits(10, 1, 0));
        let _seat = admission.admit(ip(1)).await.unwrap();
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(
            admission.admit(Some(mapped)).await.unwrap_err(),
            Refusal::QueueFull
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn many_callers_all_get_seats_and_all_are_given_back() {
        let admission = Seats::new(limits(4, 2, 1000));
        let calls: Vec<_> = (0..400u32)
            .map(|i| {
                let admission = admission.clone();
                tokio::spawn(async move {
                    let seat = admission.admit(ip((i % 3) as u8)).await?;
                    tokio::task::yield_now().await;
                    drop(seat);
                    Ok::<_, Refusal>(())
                })
            })
            .collect();
        for call in calls {
            call.await.unwrap().unwrap();
        }
        assert_eq!(admission.running(), 0);
        assert_eq!(admission.waiting(), 0);
        assert_eq!(admission.tracked_sources(), 0);
    }
}
