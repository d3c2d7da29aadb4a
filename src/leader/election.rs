//! The Lease election as a pure state machine: what to write given the Lease just read, when
//! to step down, and what the release looks like. Time comes in as arguments, so every rule is
//! unit-tested without waiting.
//!
//! The rules are client-go's: a Lease held by someone else counts as expired only when this
//! replica has seen it unchanged for a whole lease duration on its OWN clock (never by
//! comparing the holder's timestamps with ours, which may be skewed).

use std::time::Duration;

use k8s_openapi::jiff::Timestamp;
use tokio::time::Instant;

/// The parts of a Lease's spec the election reads and writes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRecord {
    /// `None` or empty: released, free to take.
    pub holder: Option<String>,
    pub duration: Duration,
    pub acquired: Option<Timestamp>,
    pub renewed: Option<Timestamp>,
    pub transitions: i32,
}

impl LeaseRecord {
    fn holder(&self) -> Option<&str> {
        self.holder.as_deref().filter(|h| !h.is_empty())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Plan {
    /// No Lease exists: create it, held by us.
    Create(LeaseRecord),
    /// Take over (free or expired) or renew our own: write this record.
    Update(LeaseRecord),
    /// Someone else holds a live Lease.
    Follow { holder: String },
}

#[derive(Clone, Debug)]
pub struct Timing {
    pub lease_duration: Duration,
    pub renew_deadline: Duration,
    pub retry_period: Duration,
}

impl Timing {
    /// client-go's constraints: a leader must give up (renew deadline) before others may take
    /// over (lease duration), and must get several tries (retry period) before giving up.
    pub fn validate(&self) -> Result<(), String> {
        if self.retry_period.is_zero() {
            return Err("the retry period must be positive".into());
        }
        if self.renew_deadline <= self.retry_period {
            return Err("the renew deadline must be longer than the retry period".into());
        }
        if self.lease_duration <= self.renew_deadline {
            return Err("the lease duration must be longer than the renew deadline".into());
        }
        Ok(())
    }
}

pub struct Election {
    identity: String,
    timing: Timing,
    /// The record as last seen changing, and when (our clock).
    observed: Option<(LeaseRecord, Instant)>,
    /// Since when we lead: our clock for the renew deadline, and the last successful write.
    leading: Option<Leading>,
}

#[derive(Clone, Copy, Debug)]
struct Leading {
    last_renewed: Instant,
}

impl Election {
    pub fn new(identity: String, timing: Timing) -> Self {
        Self {
            identity,
            timing,
            observed: None,
            leading: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    pub fn is_leader(&self) -> bool {
        self.leading.is_some()
    }

    /// Decides from the Lease as just read (`None`: it does not exist).
    pub fn plan(&mut self, now: Instant, wall: Timestamp, read: Option<&LeaseRecord>) -> Plan {
        let Some(read) = read else {
            return Plan::Create(LeaseRecord {
                holder: Some(self.identity.clone()),
                duration: self.timing.lease_duration,
                acquired: Some(wall),
                renewed: Some(wall),
                transitions: 0,
            });
        };
        if self.observed.as_ref().is_none_or(|(seen, _)| seen != read) {
            self.observed = Some((read.clone(), now));
        }
        let seen_at = self.observed.as_ref().map_or(now, |(_, at)| *at);
        match read.holder() {
            Some(holder) if holder != self.identity => {
                if seen_at + read.duration > now {
                    // A live Lease of someone else: whatever we believed, we do not lead.
                    self.leading = None;
                    return Plan::Follow {
                        holder: holder.to_owned(),
                    };
                }
                Plan::Update(self.taken_over(read, wall))
            }
            Some(_) => Plan::Update(LeaseRecord {
                holder: Some(self.identity.clone()),
                duration: self.timing.lease_duration,
                acquired: read.acquired.or(Some(wall)),
                renewed: Some(wall),
                transitions: read.transitions,
            }),
            None => Plan::Update(self.taken_over(read, wall)),
        }
    }

    fn taken_over(&self, read: &LeaseRecord, wall: Timestamp) -> LeaseRecord {
        LeaseRecord {
            holder: Some(self.identity.clone()),
            duration: self.timing.lease_duration,
            acquired: Some(wall),
            renewed: Some(wall),
            transitions: read.transitions.saturating_add(1),
        }
    }

    /// Our write of `record` succeeded: we lead, renewed as of `now`.
    pub fn written(&mut self, now: Instant, record: LeaseRecord) {
        self.observed = Some((record, now));
        self.leading = Some(Leading { last_renewed: now });
    }

    /// A read or write failed (or conflicted). Returns true when this makes us step down: no
    /// successful renewal within the renew deadline.
    pub fn failed(&mut self, now: Instant) -> bool {
        match self.leading {
            Some(leading) if now >= leading.last_renewed + self.timing.renew_deadline => {
                self.leading = None;
                true
            }
            _ => false,
        }
    }

    /// How long the next call may take: a leader's must end by its renew deadline, so that it
    /// steps down before anyone else may take over.
    pub fn call_budget(&self, now: Instant) -> Duration {
        match self.leading {
            Some(leading) => (leading.last_renewed + self.timing.renew_deadline)
                .saturating_duration_since(now)
                .max(Duration::from_millis(100)),
            None => self.timing.renew_deadline,
        }
    }

    /// The record that releases the Lease on shutdown: no holder and a 1 s duration, so a
    /// standby takes over at its next try.
    pub fn release(&mut self, wall: Timestamp) -> Option<LeaseRecord> {
        self.leading.take()?;
        let (current, _) = self.observed.as_ref()?;
        Some(LeaseRecord {
            holder: None,
            duration: Duration::from_secs(1),
            acquired: Some(wall),
            renewed: Some(wall),
            transitions: current.transitions,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timing() -> Timing {
        Timing {
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }

    fn wall(seconds: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + seconds).unwrap()
    }

    fn held_by(holder: &str, transitions: i32, renewed: i64) -> LeaseRecord {
        LeaseRecord {
            holder: Some(holder.into()),
            duration: Duration::from_secs(15),
            acquired: Some(wall(0)),
            renewed: Some(wall(renewed)),
            transitions,
        }
    }

    #[test]
    fn creates_a_missing_lease_held_by_itself() {
        let mut election = Election::new("me".into(), timing());
        let plan = election.plan(Instant::now(), wall(0), None);
        let Plan::Create(record) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(record.holder.as_deref(), Some("me"));
        assert_eq!(record.transitions, 0);
        assert_eq!(record.duration, Duration::from_secs(15));
    }

    #[test]
    fn follows_a_live_lease_and_takes_it_only_after_a_whole_duration_unchanged() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        let other = held_by("other", 3, 100);
        assert_eq!(
            election.plan(t0, wall(0), Some(&other)),
            Plan::Follow {
                holder: "other".into()
            }
        );
        // Its renew time says long ago, but only our own clock counts.
        assert!(matches!(
            election.plan(t0 + Duration::from_secs(14), wall(14), Some(&other)),
            Plan::Follow { .. }
        ));
        let plan = election.plan(t0 + Duration::from_secs(15), wall(15), Some(&other));
        let Plan::Update(record) = plan else {
            panic!("{plan:?}")
        };
        assert_eq!(record.holder.as_deref(), Some("me"));
        assert_eq!(record.transitions, 4, "a takeover is a transition");
        assert_eq!(record.acquired, Some(wall(15)));
    }

    #[test]
    fn a_renewal_by_the_holder_restarts_the_expiry_clock() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        election.plan(t0, wall(0), Some(&held_by("other", 1, 0)));
        let renewed = held_by("other", 1, 10);
        assert!(matches!(
            election.plan(t0 + Duration::from_secs(10), wall(10), Some(&renewed)),
            Plan::Follow { .. }
        ));
        assert!(matches!(
            election.plan(t0 + Duration::from_secs(24), wall(24), Some(&renewed)),
            Plan::Follow { .. }
        ));
        assert!(matches!(
            election.plan(t0 + Duration::from_secs(25), wall(25), Some(&renewed)),
            Plan::Update(_)
        ));
    }

    #[test]
    fn a_released_lease_is_taken_at_once() {
        let mut election = Election::new("me".into(), timing());
        let mut released = held_by("other", 2, 0);
        released.holder = Some(String::new());
        let plan = election.plan(Instant::now(), wall(1), Some(&released));
        assert!(
            matches!(&plan, Plan::Update(r) if r.transitions == 3 && r.holder.as_deref() == Some("me")),
            "{plan:?}"
        );
    }

    #[test]
    fn renewing_its_own_lease_keeps_acquire_time_and_transitions() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        let mine = held_by("me", 5, 0);
        election.written(t0, mine.clone());
        let plan = election.plan(t0 + Duration::from_secs(2), wall(2), Some(&mine));
        assert_eq!(
            plan,
            Plan::Update(LeaseRecord {
                holder: Some("me".into()),
                duration: Duration::from_secs(15),
                acquired: Some(wall(0)),
                renewed: Some(wall(2)),
                transitions: 5,
            })
        );
    }

    #[test]
    fn steps_down_when_renewals_fail_past_the_deadline_and_budgets_calls_to_it() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        election.written(t0, held_by("me", 0, 0));
        assert!(election.is_leader());
        assert_eq!(election.call_budget(t0), Duration::from_secs(10));
        assert!(!election.failed(t0 + Duration::from_secs(4)));
        assert_eq!(
            election.call_budget(t0 + Duration::from_secs(4)),
            Duration::from_secs(6)
        );
        assert!(election.is_leader());
        assert!(election.failed(t0 + Duration::from_secs(10)));
        assert!(!election.is_leader());
        assert!(
            !election.failed(t0 + Duration::from_secs(11)),
            "steps down once"
        );
    }

    #[test]
    fn someone_else_holding_a_live_lease_means_not_leading() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        election.written(t0, held_by("me", 0, 0));
        let plan = election.plan(
            t0 + Duration::from_secs(2),
            wall(2),
            Some(&held_by("other", 1, 2)),
        );
        assert!(matches!(plan, Plan::Follow { .. }));
        assert!(!election.is_leader());
    }

    #[test]
    fn releases_only_what_it_holds() {
        let t0 = Instant::now();
        let mut election = Election::new("me".into(), timing());
        assert_eq!(election.release(wall(0)), None);
        election.written(t0, held_by("me", 7, 0));
        let released = election.release(wall(3)).unwrap();
        assert_eq!(released.holder, None);
        assert_eq!(released.duration, Duration::from_secs(1));
        assert_eq!(released.transitions, 7);
        assert!(!election.is_leader());
    }

    #[test]
    fn timing_must_leave_room_to_step_down_before_a_takeover() {
        assert!(timing().validate().is_ok());
        let mut bad = timing();
        bad.renew_deadline = Duration::from_secs(15);
        assert!(bad.validate().is_err());
        let mut bad = timing();
        bad.retry_period = Duration::from_secs(10);
        assert!(bad.validate().is_err());
        let mut bad = timing();
        bad.retry_period = Duration::ZERO;
        assert!(bad.validate().is_err());
    }
}
