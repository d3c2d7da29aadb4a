//! What the Kubernetes-backed issuers share: request objects named here (so the clean-up
//! exists before the create is sent), one shared watch delivering each request's outcome to
//! its waiter by name, and deletion after every outcome.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use futures_util::StreamExt;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, ResourceExt};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::IssueError;

/// The prefix of every request name (istio-csr's generateName).
pub const NAME_PREFIX: &str = "istio-csr-";

/// A fresh request name: the prefix and 16 random base-36 characters.
pub fn request_name() -> String {
    const ALPHABET: &[u8; 36] = b"abcdefghijklmnopqrstuvwxyz0123456789";
    let mut bytes = [0u8; 16];
    // A failing system RNG would also fail every signature; a fixed suffix then only risks a
    // 409, reported as Unavailable.
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes);
    let suffix: String = bytes
        .iter()
        .map(|b| char::from(ALPHABET[usize::from(*b) % ALPHABET.len()]))
        .collect();
    format!("{NAME_PREFIX}{suffix}")
}

/// Waiters by request name, fed by the one shared watch. A waiter is registered before its
/// request is created, so no outcome can arrive too early; outcomes nobody waits for (other
/// replicas' requests, deletions after the answer) are dropped.
pub struct Waiters<O> {
    waiting: HashMap<String, oneshot::Sender<O>>,
}

impl<O> Default for Waiters<O> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
        }
    }
}

impl<O> Waiters<O> {
    pub fn deliver(&mut self, name: &str, outcome: O) {
        if let Some(tx) = self.waiting.remove(name) {
            let _ = tx.send(outcome);
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }
}

/// One registered waiter; dropping it (answered, timed out, or the caller gone) unregisters it.
pub struct Waiting<O> {
    pub answer: oneshot::Receiver<O>,
    name: String,
    waiters: Arc<Mutex<Waiters<O>>>,
}

impl<O> Waiting<O> {
    pub fn register(waiters: &Arc<Mutex<Waiters<O>>>, name: &str) -> Option<Self> {
        let (tx, answer) = oneshot::channel();
        waiters.lock().ok()?.waiting.insert(name.to_owned(), tx);
        Some(Self {
            answer,
            name: name.to_owned(),
            waiters: waiters.clone(),
        })
    }
}

impl<O> Drop for Waiting<O> {
    fn drop(&mut self) {
        if let Ok(mut waiters) = self.waiters.lock() {
            waiters.waiting.remove(&self.name);
        }
    }
}

/// What a request object came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome<T> {
    Issued(T),
    Denied(String),
    Failed(String),
    Deleted,
}

/// One request on its way: named here, with its clean-up and its waiter in place before the
/// create is sent (a caller that goes away mid-create leaves nothing, and no answer can come
/// before its waiter), and one deadline for all of it.
pub struct InFlight<K, T>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    pub name: String,
    pub deadline: Instant,
    /// The object's kind, for messages.
    kind: &'static str,
    api: Api<K>,
    cleanup: Cleanup<K>,
    waiting: Waiting<Outcome<T>>,
}

impl<K, T> InFlight<K, T>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
    K: Send + 'static,
{
    pub fn start(
        api: &Api<K>,
        waiters: &Arc<Mutex<Waiters<Outcome<T>>>>,
        preserve: bool,
        timeout: Duration,
        kind: &'static str,
    ) -> Result<Self, IssueError> {
        let name = request_name();
        let waiting = Waiting::register(waiters, &name)
            .ok_or_else(|| IssueError::internal("waiter registry poisoned"))?;
        Ok(Self {
            cleanup: Cleanup {
                api: api.clone(),
                name: name.clone(),
                preserve,
                settled: false,
            },
            name,
            deadline: Instant::now() + timeout,
            kind,
            api: api.clone(),
            waiting,
        })
    }

    /// Sends the create. An API server that does not answer is Unavailable; its own answer is
    /// returned for the issuer to classify.
    pub async fn create(&mut self, object: &K) -> Result<Result<K, kube::Error>, IssueError> {
        let created = tokio::time::timeout_at(
            self.deadline,
            self.api.create(&PostParams::default(), object),
        )
        .await
        .map_err(|_| {
            IssueError::unavailable(format!(
                "the API server did not answer the {} create",
                self.kind
            ))
        })?;
        self.cleanup.settled = true;
        Ok(created)
    }

    /// Waits for the answer until the deadline; the object is deleted afterwards either way.
    pub async fn answer(mut self) -> Result<T, IssueError> {
        match tokio::time::timeout_at(self.deadline, &mut self.waiting.answer).await {
            Err(_) => Err(IssueError::Timeout),
            Ok(Err(_)) => Err(IssueError::internal("watch stopped")),
            Ok(Ok(Outcome::Issued(issued))) => Ok(issued),
            Ok(Ok(Outcome::Denied(message))) => Err(IssueError::Denied(message)),
            Ok(Ok(Outcome::Failed(message))) => Err(IssueError::Failed(message)),
            Ok(Ok(Outcome::Deleted)) => Err(IssueError::Failed(format!(
                "the {} was deleted while waiting",
                self.kind
            ))),
        }
    }
}

/// The one shared watch of an issuer: every event `config` selects, dispatched to the waiters
/// by name; `synced` is called each time the watch has listed.
pub async fn dispatch_outcomes<K, T>(
    api: Api<K>,
    config: watcher::Config,
    waiters: Arc<Mutex<Waiters<Outcome<T>>>>,
    outcome_of: impl Fn(&K) -> Option<Outcome<T>>,
    synced: impl Fn(),
    kind: &'static str,
) -> anyhow::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let mut events = watcher(api, config).default_backoff().boxed();
    while let Some(event) = events.next().await {
        match event {
            Ok(watcher::Event::Apply(object) | watcher::Event::InitApply(object)) => {
                if let Some(outcome) = outcome_of(&object)
                    && let Ok(mut waiters) = waiters.lock()
                {
                    waiters.deliver(&object.name_any(), outcome);
                }
            }
            Ok(watcher::Event::Delete(object)) => {
                if let Ok(mut waiters) = waiters.lock() {
                    waiters.deliver(&object.name_any(), Outcome::Deleted);
                }
            }
            Ok(watcher::Event::InitDone) => synced(),
            Ok(watcher::Event::Init) => {}
            // The watcher re-lists and resumes by itself; its errors are worth a line only.
            Err(error) => tracing::warn!(%error, kind, "watch interrupted"),
        }
    }
    anyhow::bail!("the {kind} watch ended")
}

/// Deletes the request object when dropped (every outcome, the caller going away included),
/// unless requests are preserved.
pub struct Cleanup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    pub api: Api<K>,
    pub name: String,
    pub preserve: bool,
    /// The create has answered. Until then a 404 proves nothing: a create cut off in flight
    /// may still land, so deletion keeps trying for a while.
    pub settled: bool,
}

impl<K> Drop for Cleanup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    fn drop(&mut self) {
        if self.preserve {
            return;
        }
        let (api, name, settled) = (
            self.api.clone(),
            std::mem::take(&mut self.name),
            self.settled,
        );
        tokio::spawn(async move {
            // Before the create has answered, a 404 may only mean "not landed yet": keep
            // trying for about 25 s (200 ms doubling, 7 tries); after it, 3 tries suffice.
            let policy = ExponentialBuilder::new()
                .with_min_delay(Duration::from_millis(200))
                .with_max_times(if settled { 2 } else { 6 });
            let delete = || async {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(e)) if e.code == 404 && settled => Ok(()),
                    Err(error) => Err(error),
                }
            };
            let deleted = delete
                .retry(policy)
                .sleep(tokio::time::sleep)
                .notify(|error: &kube::Error, retry_in: Duration| {
                    tracing::debug!(%error, name, ?retry_in, "request object not deleted yet");
                })
                .await;
            match deleted {
                Ok(()) => {}
                // Still absent after every try: the create never landed.
                Err(kube::Error::Api(e)) if e.code == 404 => {}
                Err(error) => {
                    tracing::warn!(%error, name, "request object not deleted; it stays until removed by hand");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_reach_registered_waiters_only_and_dropped_waiters_unregister() {
        let waiters = Arc::new(Mutex::new(Waiters::default()));
        let mut waiting = Waiting::register(&waiters, "istio-csr-abc").unwrap();
        waiters.lock().unwrap().deliver("someone-else", 8);
        waiters.lock().unwrap().deliver("istio-csr-abc", 7);
        assert_eq!(waiting.answer.try_recv().unwrap(), 7);
        let gone = Waiting::register(&waiters, "istio-csr-def").unwrap();
        assert_eq!(waiters.lock().unwrap().len(), 1);
        drop(gone);
        drop(waiting);
        assert!(waiters.lock().unwrap().is_empty());
    }

    #[test]
    fn names_are_prefixed_random_and_valid_object_names() {
        let (a, b) = (request_name(), request_name());
        assert_ne!(a, b);
        assert!(a.starts_with(NAME_PREFIX) && a.len() == NAME_PREFIX.len() + 16);
        assert!(crate::pki::identity::is_dns1123_subdomain(&a));
    }
}
