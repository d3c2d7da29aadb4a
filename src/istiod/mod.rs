//! istiod's serving certificate (istio-csr's "dynamic istiod certificate"): with its own CA off
//! (`ENABLE_CA_SERVER=false`), istiod serves xDS with Secret `istiod-tls`. The leader keeps
//! that Secret right: a new key and certificate through the active signer (the one way in,
//! `signer::issuance`, so the chain is verified against the pinned roots), written with the
//! pinned bundle as `ca.crt`. It is renewed `renew-before` ahead of expiry and reissued at once
//! when it is deleted or altered (watched), or when the roots, the issuer or the options
//! change. The private key exists only in memory while writing, and in that Secret.
//!
//! Least privilege: the Helm chart creates the Secret empty and grants only get, list, watch
//! and update on it by name (charts/istio-csr-rs/templates/rbac.yaml). Without the right to
//! create it (or, for a Secret of the wrong type, to delete and re-create it), the leader signs
//! nothing and says what to do, at the retry backoff's rate; once the Secret appears, it is
//! filled at once.

pub mod spec;

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, anyhow};
use futures_util::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};
use rcgen::KeyPair;
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::bundle;
use crate::leader::Leadership;
use crate::pki::chain::RootBundle;
use crate::pki::pem;
use crate::retry::Delays;
use crate::signer::issuance::{Certified, Issuance, own_csr};
use crate::signer::issuer::{IssueRequest, Purpose};
pub use spec::{IstiodCertSpec, Reissue, SECRET_NAME, Verdict};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuedLabels {
    reason: &'static str,
}

#[derive(Clone)]
pub struct IstiodCertMetrics {
    issued: Family<IssuedLabels, Counter>,
    failures: Counter,
    not_after: Gauge,
}

impl IstiodCertMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            issued: Family::default(),
            failures: Counter::default(),
            not_after: Gauge::default(),
        };
        registry.register(
            "istiod_certificate_issued",
            "istiod-tls certificates issued and written by this replica, by reason (missing, due, untrusted, roots-changed, issuer-changed, options-changed, ...).",
            metrics.issued.clone(),
        );
        registry.register(
            "istiod_certificate_failures",
            "Failed attempts to issue or write istiod-tls (retried with backoff).",
            metrics.failures.clone(),
        );
        registry.register_with_unit(
            "istiod_certificate_expiry_timestamp",
            "notAfter of the istiod-tls certificate last judged good by this replica while leading, as a Unix time.",
            Unit::Seconds,
            metrics.not_after.clone(),
        );
        metrics
    }
}

/// Keeps `istiod-tls` right while this replica leads.
#[derive(Clone)]
pub struct IstiodCerts {
    pub client: kube::Client,
    pub spec: Arc<IstiodCertSpec>,
    pub issuance: Issuance,
    pub metrics: IstiodCertMetrics,
}

impl IstiodCerts {
    /// Runs only while this replica leads (a standby never writes); never ends by itself.
    pub async fn run_while_leader(
        self,
        leadership: watch::Receiver<Leadership>,
    ) -> anyhow::Result<()> {
        bundle::run_while_leader(leadership, "istiod certificate", move || self.clone().run()).await
    }

    /// Watches the Secret and the inputs it is made from; judges it after each change and at
    /// its renewal time; reissues when it is not right.
    async fn run(self) -> anyhow::Result<()> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &self.spec.namespace);
        let config =
            crate::cluster::client::watch_config().fields(&format!("metadata.name={SECRET_NAME}"));
        let mut events = watcher(api.clone(), config).default_backoff().boxed();
        let mut roots = self.issuance.roots().clone();
        let mut signed_by = self.issuance.issuer().signed_by();
        let mut issuer_can_change = true;
        let mut current: Option<Secret> = None;
        let mut listing: Option<Option<Secret>> = None;
        let mut synced = false;
        let mut dirty = false;
        // When to judge again: the renewal time, or the end of a failure's backoff.
        let mut wake_at: Option<Instant> = None;
        let mut backing_off = false;
        let mut backoff = Delays::default();
        // Writes with no judgement of "right" in between: more than two means the signer's
        // answers never satisfy the checks; back off rather than write in a loop.
        let mut writes_in_a_row = 0u32;
        loop {
            if synced && dirty && !backing_off {
                dirty = false;
                match self
                    .reconcile(&api, current.as_ref(), &roots, &signed_by)
                    .await
                {
                    Ok(Reconciled::Kept { renew_at }) => {
                        backoff.reset();
                        writes_in_a_row = 0;
                        wake_at = Some(instant_at(renew_at));
                    }
                    Ok(Reconciled::Wrote(written)) => {
                        writes_in_a_row += 1;
                        // Judged again at once from what was written, not from the watch's
                        // copy, which may come later.
                        current = Some(*written);
                        dirty = true;
                        if writes_in_a_row <= 2 {
                            continue;
                        }
                        let delay = backoff.next_delay();
                        tracing::error!(retry_in = ?delay, "istiod certificate reissued repeatedly without ever being judged right");
                        wake_at = Some(Instant::now() + delay);
                        backing_off = true;
                    }
                    Err(error) => {
                        self.metrics.failures.inc();
                        let delay = backoff.next_delay();
                        tracing::error!(error = %format!("{error:#}"), retry_in = ?delay, "istiod certificate not written");
                        wake_at = Some(Instant::now() + delay);
                        backing_off = true;
                        dirty = true;
                    }
                }
            }
            tokio::select! {
                event = events.next() => match event {
                    Some(Ok(watcher::Event::Init)) => listing = Some(None),
                    Some(Ok(watcher::Event::InitApply(secret))) => listing = Some(Some(secret)),
                    Some(Ok(watcher::Event::InitDone)) => {
                        current = listing.take().flatten();
                        synced = true;
                        dirty = true;
                    }
                    Some(Ok(watcher::Event::Apply(secret))) => {
                        // It appeared (e.g. created by an admin because this account may
                        // not): filled now rather than at the end of the backoff.
                        if current.is_none() {
                            backing_off = false;
                            wake_at = None;
                        }
                        current = Some(secret);
                        dirty = true;
                    }
                    Some(Ok(watcher::Event::Delete(_))) => {
                        current = None;
                        dirty = true;
                    }
                    Some(Err(error)) => {
                        tracing::warn!(%error, "istiod-tls watch interrupted");
                    }
                    None => anyhow::bail!("istiod-tls watch ended"),
                },
                Ok(()) = roots.changed() => {
                    roots.mark_unchanged();
                    dirty = true;
                }
                changed = signed_by.changed(), if issuer_can_change => match changed {
                    Ok(()) => {
                        signed_by.mark_unchanged();
                        dirty = true;
                    }
                    Err(_) => issuer_can_change = false,
                },
                () = sleep_until(wake_at) => {
                    wake_at = None;
                    backing_off = false;
                    dirty = true;
                }
            }
        }
    }

    #[tracing::instrument(
        name = "istiod certificate",
        skip_all,
        fields(namespace = %self.spec.namespace, exists = current.is_some())
    )]
    async fn reconcile(
        &self,
        api: &Api<Secret>,
        current: Option<&Secret>,
        roots: &watch::Receiver<Arc<RootBundle>>,
        signed_by: &watch::Receiver<String>,
    ) -> anyhow::Result<Reconciled> {
        let roots_now = roots.borrow().clone();
        let issuer_now = signed_by.borrow().clone();
        let now = OffsetDateTime::now_utc();
        let reason = match spec::assess(current, &self.spec, &roots_now, &issuer_now, now) {
            Verdict::Keep { renew_at } => {
                self.metrics
                    .not_after
                    .set((renew_at + self.spec.renew_before).unix_timestamp());
                return Ok(Reconciled::Kept { renew_at });
            }
            Verdict::Reissue(reason) => reason,
        };
        may_write(api, &self.spec.namespace, current).await?;
        tracing::info!(reason = reason.label(), detail = ?reason, namespace = %self.spec.namespace, "issuing istiod's certificate");
        let key_spec = self.spec.key;
        // RSA key generation takes a while: off the async workers.
        let key = tokio::task::spawn_blocking(move || key_spec.generate())
            .await
            .context("key generation task")??;
        let csr = own_csr(&self.spec.names, &key)?;
        let certified = self
            .issuance
            .issue(IssueRequest {
                purpose: Purpose::Istiod,
                csr: &csr,
                names: &self.spec.names,
                lifetime: self.spec.duration,
                route: None,
                annotations: &self.spec.annotations,
            })
            .await
            .context("signing")?;
        let desired = self.secret(current, &certified, &key, &issuer_now);
        let written = write(api, current, desired).await?;
        self.metrics
            .issued
            .get_or_create(&IssuedLabels {
                reason: reason.label(),
            })
            .inc();
        tracing::info!(
            lifetime_secs = certified.chain.lifetime_secs(),
            reason = reason.label(),
            "istiod-tls written"
        );
        Ok(Reconciled::Wrote(Box::new(written)))
    }

    /// The Secret to write: istiod's layout, keeping others' labels and annotations.
    fn secret(
        &self,
        current: Option<&Secret>,
        certified: &Certified,
        key: &KeyPair,
        issuer: &str,
    ) -> Secret {
        let mut metadata = current.map(|s| s.metadata.clone()).unwrap_or_default();
        metadata.name = Some(SECRET_NAME.to_owned());
        metadata.namespace = Some(self.spec.namespace.clone());
        metadata.managed_fields = None;
        let annotations = metadata.annotations.get_or_insert_with(BTreeMap::new);
        annotations.insert(spec::SPEC_ANNOTATION.to_owned(), self.spec.fingerprint());
        annotations.insert(spec::ISSUER_ANNOTATION.to_owned(), issuer.to_owned());
        let mut chain = pem::encode_certificate(certified.chain.leaf());
        for intermediate in certified.chain.intermediates() {
            chain.push_str(&pem::encode_certificate(intermediate));
        }
        let bytes = |s: String| ByteString(s.into_bytes());
        Secret {
            metadata,
            type_: Some(spec::SECRET_TYPE.to_owned()),
            data: Some(BTreeMap::from([
                ("tls.crt".to_owned(), bytes(chain)),
                ("tls.key".to_owned(), bytes(key.serialize_pem())),
                ("ca.crt".to_owned(), bytes(certified.roots.pem().to_owned())),
            ])),
            ..Default::default()
        }
    }
}

enum Reconciled {
    Kept { renew_at: OffsetDateTime },
    Wrote(Box<Secret>),
}

/// Creates, replaces (with the resourceVersion read, so a concurrent change is not lost
/// silently) or, when the type differs (immutable on Secrets), deletes and re-creates.
async fn write(
    api: &Api<Secret>,
    current: Option<&Secret>,
    desired: Secret,
) -> anyhow::Result<Secret> {
    let post = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PostParams::default()
    };
    let namespace = desired.metadata.namespace.clone().unwrap_or_default();
    match current {
        None => api
            .create(&post, &desired)
            .await
            .map_err(|e| forbidden_hint(e, &namespace, "create"))
            .context("creating istiod-tls"),
        Some(existing) if existing.type_ == desired.type_ => api
            .replace(SECRET_NAME, &post, &desired)
            .await
            .map_err(|e| forbidden_hint(e, &namespace, "update"))
            .context("updating istiod-tls"),
        Some(existing) => {
            let preconditions = Preconditions {
                uid: existing.metadata.uid.clone(),
                resource_version: existing.metadata.resource_version.clone(),
            };
            api.delete(
                SECRET_NAME,
                &DeleteParams {
                    preconditions: Some(preconditions),
                    ..DeleteParams::default()
                },
            )
            .await
            .context("deleting istiod-tls of the wrong type")?;
            let mut fresh = desired;
            fresh.metadata = ObjectMeta {
                name: fresh.metadata.name,
                namespace: fresh.metadata.namespace,
                labels: fresh.metadata.labels,
                annotations: fresh.metadata.annotations,
                ..ObjectMeta::default()
            };
            api.create(&post, &fresh)
                .await
                .context("re-creating istiod-tls")
        }
    }
}

const FIELD_MANAGER: &str = "istio-csr-rs";

/// The Secret the chart creates and this leader fills: istiod's type, empty keys (the API
/// server requires both keys of a kubernetes.io/tls Secret, not their contents).
pub fn empty_secret(namespace: &str) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(SECRET_NAME.to_owned()),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some(spec::SECRET_TYPE.to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(Vec::new())),
            ("tls.key".to_owned(), ByteString(Vec::new())),
        ])),
        ..Default::default()
    }
}

/// What a missing right on istiod-tls means and how to fix it, for the log.
fn create_forbidden(namespace: &str) -> anyhow::Error {
    anyhow!(
        "Secret {SECRET_NAME} does not exist in namespace {namespace} and this service account \
         may not create Secrets there: create {SECRET_NAME} empty (type {}, empty tls.crt and \
         tls.key; the Helm chart does, docs/istio.md shows it) or grant create on secrets in \
         {namespace}. It is filled as soon as it exists",
        spec::SECRET_TYPE
    )
}

fn wrong_type_forbidden(namespace: &str, found: Option<&str>) -> anyhow::Error {
    anyhow!(
        "Secret {SECRET_NAME} in namespace {namespace} has type {:?}, not {}, and a Secret's \
         type cannot change, but this service account may not delete and re-create it: replace \
         it with an empty {} Secret (docs/istio.md) or grant delete and create on secrets in \
         {namespace}",
        found.unwrap_or(""),
        spec::SECRET_TYPE,
        spec::SECRET_TYPE
    )
}

/// A refused write (403) says which right is missing; other errors pass unchanged.
fn forbidden_hint(error: kube::Error, namespace: &str, verb: &str) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) if status.code == 403 && verb == "create" => {
            create_forbidden(namespace)
        }
        kube::Error::Api(status) if status.code == 403 => {
            anyhow::Error::new(error).context(format!(
                "this service account may not {verb} Secret {SECRET_NAME} in namespace \
                 {namespace}: grant get, list, watch and update on it by name (the Helm \
                 chart's Role does)"
            ))
        }
        _ => anyhow::Error::new(error),
    }
}

/// Before signing: whether the write ahead is allowed. For a missing Secret (a create) or one
/// of the wrong type (a delete, then a create) the same requests go as dry runs, which the API
/// server authorizes like real ones and then discards; a refusal is reported with what to do,
/// and nothing is signed for a Secret that could not be written. Any other answer (a webhook
/// that cannot dry-run, a race with whoever creates it) leaves the decision to the real write.
async fn may_write(
    api: &Api<Secret>,
    namespace: &str,
    current: Option<&Secret>,
) -> anyhow::Result<()> {
    let dry_run = PostParams {
        dry_run: true,
        field_manager: Some(FIELD_MANAGER.into()),
    };
    match current {
        None => {
            if forbidden(&api.create(&dry_run, &empty_secret(namespace)).await) {
                return Err(create_forbidden(namespace));
            }
        }
        Some(existing) if existing.type_.as_deref() != Some(spec::SECRET_TYPE) => {
            let delete = DeleteParams {
                dry_run: true,
                ..DeleteParams::default()
            };
            // A dry-run create of a name that exists is authorized first, then refused (409).
            if forbidden(&api.delete(SECRET_NAME, &delete).await)
                || forbidden(&api.create(&dry_run, &empty_secret(namespace)).await)
            {
                return Err(wrong_type_forbidden(namespace, existing.type_.as_deref()));
            }
        }
        Some(_) => {}
    }
    Ok(())
}

fn forbidden<T>(result: &Result<T, kube::Error>) -> bool {
    matches!(result, Err(kube::Error::Api(status)) if status.code == 403)
}

/// The tokio instant of a wall-clock time (now when it has passed).
fn instant_at(at: OffsetDateTime) -> Instant {
    let wait = at - OffsetDateTime::now_utc();
    Instant::now() + std::time::Duration::try_from(wait).unwrap_or_default()
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
