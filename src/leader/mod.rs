//! Leader election on a `coordination.k8s.io/v1` Lease. Leadership only gates leader work (the
//! trust-bundle writers): it never ends the process and never touches signing. A replica that
//! cannot renew steps down and keeps competing; on shutdown the leader releases the Lease so a
//! standby takes over at its next try.

pub mod election;

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::PostParams;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use election::{Election, LeaseRecord, Plan, Timing};

pub const LEASE_NAME: &str = "istio-csr-rs";

/// What every part of the process sees of the election.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leadership {
    /// This replica's identity in the Lease.
    pub identity: String,
    pub is_leader: bool,
    /// The current holder, when known (this replica when leading).
    pub holder: Option<String>,
    /// When the holder acquired the Lease (its own clock, from the Lease).
    pub holder_since: Option<SystemTime>,
}

impl Leadership {
    pub fn starting(identity: String) -> Self {
        Self {
            identity,
            is_leader: false,
            holder: None,
            holder_since: None,
        }
    }
}

/// This replica's name in the Lease: the pod name when Kubernetes gives one, else the host
/// name; plus a random suffix, so a restarted process never mistakes its predecessor's Lease
/// for its own.
pub fn identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "istio-csr-rs".into());
    let mut suffix = [0u8; 4];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix);
    format!("{base}_{}", hex::encode(suffix))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ChangeLabels {
    event: &'static str,
}

#[derive(Clone)]
pub struct LeaderMetrics {
    is_leader: Gauge,
    changes: Family<ChangeLabels, Counter>,
}

impl LeaderMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            is_leader: Gauge::default(),
            changes: Family::default(),
        };
        registry.register(
            "leader_is_leader",
            "1 while this replica holds the leader Lease (and writes trust bundles), else 0.",
            metrics.is_leader.clone(),
        );
        registry.register(
            "leader_transitions",
            "Times this replica gained (acquired) or lost (lost) leadership.",
            metrics.changes.clone(),
        );
        metrics
    }
}

pub struct Elector {
    api: Api<Lease>,
    election: Election,
    timing: Timing,
    state: watch::Sender<Leadership>,
    metrics: LeaderMetrics,
}

impl Elector {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        identity: String,
        timing: Timing,
        metrics: LeaderMetrics,
    ) -> (Self, watch::Receiver<Leadership>) {
        let (state, rx) = watch::channel(Leadership::starting(identity.clone()));
        let elector = Self {
            api: Api::namespaced(client, namespace),
            election: Election::new(identity, timing.clone()),
            timing,
            state,
            metrics,
        };
        (elector, rx)
    }

    /// Competes until `stop`, then releases the Lease if held.
    pub async fn run(mut self, stop: CancellationToken) -> anyhow::Result<()> {
        loop {
            let now = Instant::now();
            let budget = self.election.call_budget(now);
            let was_leader = self.election.is_leader();
            let attempt = tokio::time::timeout(budget, self.try_once()).await;
            match attempt {
                Ok(Ok(())) => {}
                Ok(Err(error)) => {
                    tracing::warn!(error = %format!("{error:#}"), "leader election: Lease not read or written");
                    self.election.failed(Instant::now());
                }
                Err(_) => {
                    tracing::warn!(?budget, "leader election: Lease call timed out");
                    self.election.failed(Instant::now());
                }
            }
            if !self.election.is_leader() && was_leader {
                // Stepped down: who holds the Lease now is unknown until it is read again.
                self.publish(|s| {
                    s.is_leader = false;
                    s.holder = None;
                    s.holder_since = None;
                });
            }
            self.note_change(was_leader);
            let pause = jittered(self.timing.retry_period);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.cancelled() => break,
            }
        }
        self.release().await;
        Ok(())
    }

    fn note_change(&self, was_leader: bool) {
        let is_leader = self.election.is_leader();
        if is_leader != was_leader {
            let event = if is_leader { "acquired" } else { "lost" };
            self.metrics
                .changes
                .get_or_create(&ChangeLabels { event })
                .inc();
            self.metrics.is_leader.set(i64::from(is_leader));
            if is_leader {
                tracing::info!(identity = self.election.identity(), "became the leader");
            } else {
                tracing::warn!(
                    identity = self.election.identity(),
                    "no longer the leader; leader work stops, signing goes on"
                );
            }
        }
    }

    async fn try_once(&mut self) -> anyhow::Result<()> {
        // A renewal counts from before it was sent: followers may have seen it that early.
        let started = Instant::now();
        let lease = self.api.get_opt(LEASE_NAME).await?;
        let read = lease.as_ref().map(record_of);
        let now = Instant::now();
        match self.election.plan(now, Timestamp::now(), read.as_ref()) {
            Plan::Follow { holder } => {
                let since = read.as_ref().and_then(|r| r.acquired).map(SystemTime::from);
                self.publish(|s| {
                    s.is_leader = false;
                    s.holder = Some(holder);
                    s.holder_since = since;
                });
            }
            Plan::Create(record) => {
                let lease = lease_of(None, &record);
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => self.won(started, record),
                    // Someone else created it first: read it again next time.
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(error) => return Err(error.into()),
                }
            }
            Plan::Update(record) => {
                let updated = lease_of(lease, &record);
                match self
                    .api
                    .replace(LEASE_NAME, &PostParams::default(), &updated)
                    .await
                {
                    Ok(_) => self.won(started, record),
                    // Changed since we read it (resourceVersion): read it again next time.
                    Err(kube::Error::Api(e)) if e.code == 409 => {
                        self.election.failed(Instant::now());
                    }
                    Err(error) => return Err(error.into()),
                }
            }
        }
        Ok(())
    }

    fn won(&mut self, started: Instant, record: LeaseRecord) {
        let since = record.acquired.map(SystemTime::from);
        self.election.written(started, record);
        let identity = self.election.identity().to_owned();
        self.publish(|s| {
            s.is_leader = true;
            s.holder = Some(identity);
            s.holder_since = since;
        });
    }

    fn publish(&self, change: impl FnOnce(&mut Leadership)) {
        self.state.send_if_modified(|state| {
            let before = state.clone();
            change(state);
            *state != before
        });
    }

    /// Hands the Lease over: a standby sees it free at its next try, not a lease duration later.
    async fn release(&mut self) {
        let was_leader = self.election.is_leader();
        let Some(record) = self.election.release(Timestamp::now()) else {
            return;
        };
        self.publish(|s| {
            s.is_leader = false;
            s.holder = None;
            s.holder_since = None;
        });
        self.note_change(was_leader);
        let release = async {
            let current = self.api.get_opt(LEASE_NAME).await?;
            let Some(current) = current else {
                return Ok(());
            };
            // Only our own Lease: if someone took it meanwhile, it is theirs.
            let holder = current
                .spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_deref());
            if holder != Some(self.election.identity()) {
                return Ok(());
            }
            self.api
                .replace(
                    LEASE_NAME,
                    &PostParams::default(),
                    &lease_of(Some(current), &record),
                )
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(self.timing.renew_deadline, release).await {
            Ok(Ok(())) => tracing::info!("leader Lease released"),
            Ok(Err(error)) => {
                tracing::warn!(%error, "leader Lease not released; it expires by itself")
            }
            Err(_) => tracing::warn!("leader Lease release timed out; it expires by itself"),
        }
    }
}

/// 80% to 100% of the period: replicas do not retry in lockstep, and a released Lease is
/// still taken within one retry period.
fn jittered(period: Duration) -> Duration {
    period.mul_f64(0.8 + random_fraction() * 0.2)
}

/// A random number in [0, 1], in 256 steps: enough to spread retries apart.
fn random_fraction() -> f64 {
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    f64::from(byte[0]) / 255.0
}

/// Leases count whole seconds: round up, so followers never wait less than configured.
fn lease_seconds(duration: Duration) -> i32 {
    let seconds = duration.as_secs() + u64::from(duration.subsec_nanos() > 0);
    i32::try_from(seconds.max(1)).unwrap_or(i32::MAX)
}

fn record_of(lease: &Lease) -> LeaseRecord {
    let spec = lease.spec.clone().unwrap_or_default();
    LeaseRecord {
        holder: spec.holder_identity,
        duration: Duration::from_secs(
            u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0),
        ),
        acquired: spec.acquire_time.map(|t| t.0),
        renewed: spec.renew_time.map(|t| t.0),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

/// The Lease to write: `existing` keeps its metadata (resourceVersion makes the write
/// conditional), with the spec replaced by `record`.
fn lease_of(existing: Option<Lease>, record: &LeaseRecord) -> Lease {
    let metadata = existing.map(|l| l.metadata).unwrap_or_else(|| ObjectMeta {
        name: Some(LEASE_NAME.into()),
        ..Default::default()
    });
    Lease {
        metadata,
        spec: Some(LeaseSpec {
            holder_identity: record.holder.clone(),
            lease_duration_seconds: Some(lease_seconds(record.duration)),
            acquire_time: record.acquired.map(MicroTime),
            renew_time: record.renewed.map(MicroTime),
            lease_transitions: Some(record.transitions),
            ..Default::default()
        }),
    }
}
