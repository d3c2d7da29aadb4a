//! Tier 3: Lease election between replicas on a real kube-apiserver, with short timings.

mod support;

use std::time::Duration;

use istio_csr_rs::leader::{Elector, LEASE_NAME, LeaderMetrics, Leadership, Timing};
use k8s_openapi::api::coordination::v1::Lease;
use support::kube::{TestCluster, shared};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::AbortOnDropHandle;

fn timing() -> Timing {
    Timing {
        lease_duration: Duration::from_secs(3),
        renew_deadline: Duration::from_secs(2),
        retry_period: Duration::from_millis(250),
    }
}

struct Replica {
    leadership: watch::Receiver<Leadership>,
    stop: CancellationToken,
    task: AbortOnDropHandle<anyhow::Result<()>>,
}

fn replica(client: kube::Client, namespace: &str, identity: &str) -> Replica {
    let mut registry = prometheus_client::registry::Registry::default();
    let (elector, leadership) = Elector::new(
        client,
        namespace,
        identity.to_owned(),
        timing(),
        LeaderMetrics::register(&mut registry),
    );
    let stop = CancellationToken::new();
    let task = AbortOnDropHandle::new(tokio::spawn(elector.run(stop.clone())));
    Replica {
        leadership,
        stop,
        task,
    }
}

impl Replica {
    async fn until(&mut self, leading: bool, within: Duration) -> bool {
        tokio::time::timeout(within, self.leadership.wait_for(|l| l.is_leader == leading))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn lease(cluster: &TestCluster, namespace: &str) -> Lease {
    kube::Api::<Lease>::namespaced(cluster.client().await, namespace)
        .get(LEASE_NAME)
        .await
        .unwrap()
}

#[tokio::test]
async fn one_replica_leads_and_a_release_hands_over_at_the_next_try() {
    let cluster = shared().await;
    cluster.namespace("lease-release").await;
    let mut a = replica(cluster.client().await, "lease-release", "replica-a");
    assert!(a.until(true, Duration::from_secs(5)).await, "nobody led");
    let mut b = replica(cluster.client().await, "lease-release", "replica-b");
    // B sees A hold the Lease and follows.
    let following = tokio::time::timeout(
        Duration::from_secs(5),
        b.leadership
            .wait_for(|l| l.holder.as_deref() == Some("replica-a")),
    )
    .await
    .is_ok();
    assert!(following);
    assert!(!b.leadership.borrow().is_leader);

    a.stop.cancel();
    a.task.await.unwrap().unwrap();
    // Released: B takes it at its next try, long before the 3 s lease would have expired.
    assert!(
        b.until(true, Duration::from_millis(1500)).await,
        "the standby did not take over a released Lease"
    );
    let spec = lease(cluster, "lease-release").await.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
    assert_eq!(spec.lease_transitions, Some(1));
}

#[tokio::test]
async fn a_vanished_leader_is_replaced_once_its_lease_expires() {
    let cluster = shared().await;
    cluster.namespace("lease-expiry").await;
    let mut a = replica(cluster.client().await, "lease-expiry", "replica-a");
    assert!(a.until(true, Duration::from_secs(5)).await);
    let mut b = replica(cluster.client().await, "lease-expiry", "replica-b");
    // A dies without a word (no release).
    let started = tokio::time::Instant::now();
    drop(a);
    assert!(b.until(true, Duration::from_secs(10)).await, "no takeover");
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "took a live Lease after {:?}",
        started.elapsed()
    );
    let spec = lease(cluster, "lease-expiry").await.spec.unwrap();
    assert_eq!(spec.holder_identity.as_deref(), Some("replica-b"));
}

#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_and_keeps_competing() {
    let cluster = shared().await;
    let namespace = "lease-revoked";
    cluster.namespace(namespace).await;
    cluster.service_account(namespace, "elector").await;
    let admin = cluster.client().await;
    let role: k8s_openapi::api::rbac::v1::Role = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "elector", "namespace": namespace},
        "rules": [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                   "verbs": ["get", "create", "update"]}]
    }))
    .unwrap();
    let binding: k8s_openapi::api::rbac::v1::RoleBinding =
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": "elector", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "elector"},
            "subjects": [{"kind": "ServiceAccount", "name": "elector", "namespace": namespace}]
        }))
        .unwrap();
    let pp = kube::api::PostParams::default();
    kube::Api::<k8s_openapi::api::rbac::v1::Role>::namespaced(admin.clone(), namespace)
        .create(&pp, &role)
        .await
        .unwrap();
    let bindings =
        kube::Api::<k8s_openapi::api::rbac::v1::RoleBinding>::namespaced(admin.clone(), namespace);
    bindings.create(&pp, &binding).await.unwrap();

    // Replica A runs as the service account; B as the admin.
    let token = cluster
        .token(
            namespace,
            "elector",
            &[support::kube::SA_ISSUER],
            3600,
            None,
        )
        .await;
    let mut a = replica(
        cluster.client_with_token(&token).await,
        namespace,
        "replica-a",
    );
    assert!(
        a.until(true, Duration::from_secs(5)).await,
        "A did not lead"
    );
    let mut b = replica(admin.clone(), namespace, "replica-b");

    // A loses the right to renew: it steps down within its renew deadline, before its Lease
    // expires for B; its task goes on.
    bindings
        .delete("elector", &Default::default())
        .await
        .unwrap();
    assert!(
        a.until(false, Duration::from_secs(5)).await,
        "A kept leading"
    );
    assert!(
        !a.task.is_finished(),
        "stepping down must not end the election"
    );
    assert!(
        b.until(true, Duration::from_secs(10)).await,
        "B never took over"
    );

    // A can write again and keeps competing: when B leaves, A leads again.
    bindings.create(&pp, &binding).await.unwrap();
    b.stop.cancel();
    b.task.await.unwrap().unwrap();
    assert!(
        a.until(true, Duration::from_secs(5)).await,
        "A did not come back"
    );
}

/// Records every leadership change of replica `index` as (when, index, leading).
fn record(
    index: usize,
    mut leadership: watch::Receiver<Leadership>,
    log: std::sync::Arc<std::sync::Mutex<Vec<(tokio::time::Instant, usize, bool)>>>,
) -> AbortOnDropHandle<()> {
    AbortOnDropHandle::new(tokio::spawn(async move {
        let mut was = false;
        loop {
            let now = leadership.borrow_and_update().is_leader;
            if now != was {
                log.lock()
                    .unwrap()
                    .push((tokio::time::Instant::now(), index, now));
                was = now;
            }
            if leadership.changed().await.is_err() {
                return;
            }
        }
    }))
}

#[tokio::test]
async fn of_three_competing_replicas_never_two_lead_at_once() {
    let cluster = shared().await;
    let namespace = "lease-exclusive";
    cluster.namespace(namespace).await;
    let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut replicas: Vec<Option<Replica>> = Vec::new();
    let mut recorders = Vec::new();
    for i in 0..3 {
        let r = replica(cluster.client().await, namespace, &format!("replica-{i}"));
        recorders.push(record(i, r.leadership.clone(), log.clone()));
        replicas.push(Some(r));
    }
    let leader_now = |replicas: &[Option<Replica>]| {
        replicas
            .iter()
            .position(|r| r.as_ref().is_some_and(|r| r.leadership.borrow().is_leader))
    };
    let until_a_leader = |replicas: &Vec<Option<Replica>>| {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut watches: Vec<_> = replicas
            .iter()
            .flatten()
            .map(|r| r.leadership.clone())
            .collect();
        async move {
            let any = futures_util::future::select_all(
                watches
                    .iter_mut()
                    .map(|w| Box::pin(async move { w.wait_for(|l| l.is_leader).await.is_ok() })),
            );
            tokio::time::timeout_at(deadline, any).await.is_ok()
        }
    };
    assert!(until_a_leader(&replicas).await, "nobody led");
    let first = leader_now(&replicas).unwrap();

    // A graceful handover: the leader stops and releases the Lease.
    let gone = replicas[first].take().unwrap();
    gone.stop.cancel();
    gone.task.await.unwrap().unwrap();
    assert!(
        until_a_leader(&replicas).await,
        "no successor after a release"
    );
    let second = leader_now(&replicas).unwrap();
    assert_ne!(second, first);

    // A crash: the next leader vanishes; it stops acting at that instant. Its recorder must
    // have logged it leading first, or that entry would come after the stop.
    let recorded = |log: &std::sync::Mutex<Vec<(tokio::time::Instant, usize, bool)>>| {
        log.lock()
            .unwrap()
            .iter()
            .any(|(_, index, leading)| *index == second && *leading)
    };
    tokio::time::timeout(Duration::from_secs(5), async {
        while !recorded(&log) {
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the recorder never saw the second leader");
    drop(replicas[second].take());
    log.lock()
        .unwrap()
        .push((tokio::time::Instant::now(), second, false));
    assert!(
        until_a_leader(&replicas).await,
        "no successor after a crash"
    );
    let third = leader_now(&replicas).unwrap();
    assert!(third != first && third != second);

    let mut events = log.lock().unwrap().clone();
    events.sort_by_key(|(at, _, leading)| (*at, *leading));
    let mut leading = std::collections::BTreeSet::new();
    for (at, index, now) in events {
        if now {
            leading.insert(index);
        } else {
            leading.remove(&index);
        }
        assert!(
            leading.len() <= 1,
            "replicas {leading:?} both led at {at:?}"
        );
    }
}
