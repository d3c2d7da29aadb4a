//! What the Kubernetes-backed issuers share: request objects named here (so the clean-up
//! exists before the create is sent), one shared watch delivering each request's outcome to
//! its waiter by name, and deletion after every outcome.

use std::collections::HashMap;
use std::time::Duration;

use kube::Api;
use kube::api::DeleteParams;
use tokio::sync::oneshot;

/// The prefix of every request name (istio-csr's generateName).
pub const NAME_PREFIX: &str = "istio-csr-";
/// Terminal states seen before their waiter registered (the watch can beat `create` back);
/// bounded so that requests created by others cannot grow it forever.
const MAX_EARLY_OUTCOMES: usize = 4096;

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

/// Waiters by request name, fed by the one shared watch.
pub struct Waiters<O> {
    pub(super) waiting: HashMap<String, oneshot::Sender<O>>,
    pub(super) early: HashMap<String, O>,
}

impl<O> Default for Waiters<O> {
    fn default() -> Self {
        Self {
            waiting: HashMap::new(),
            early: HashMap::new(),
        }
    }
}

impl<O> Waiters<O> {
    pub fn deliver(&mut self, name: &str, outcome: O) {
        if let Some(tx) = self.waiting.remove(name) {
            let _ = tx.send(outcome);
        } else if name.starts_with(NAME_PREFIX) {
            if self.early.len() >= MAX_EARLY_OUTCOMES {
                self.early.clear();
            }
            self.early.insert(name.to_owned(), outcome);
        }
    }

    pub fn register(&mut self, name: &str) -> oneshot::Receiver<O> {
        let (tx, rx) = oneshot::channel();
        match self.early.remove(name) {
            Some(outcome) => {
                let _ = tx.send(outcome);
            }
            None => {
                self.waiting.insert(name.to_owned(), tx);
            }
        }
        rx
    }

    /// The waiter for `name` gave up.
    pub fn forget(&mut self, name: &str) {
        self.waiting.remove(name);
    }
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
}

impl<K> Drop for Cleanup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    fn drop(&mut self) {
        if self.preserve {
            return;
        }
        let (api, name) = (self.api.clone(), std::mem::take(&mut self.name));
        tokio::spawn(async move {
            for attempt in 0..3u32 {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => return,
                    Err(kube::Error::Api(e)) if e.code == 404 => return,
                    Err(error) => {
                        tracing::warn!(%error, name, attempt, "request object not deleted yet");
                        tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
                    }
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_outcome_seen_before_its_waiter_is_kept_for_it() {
        let mut waiters = Waiters::default();
        waiters.deliver("istio-csr-abc", 7);
        let mut rx = waiters.register("istio-csr-abc");
        assert_eq!(rx.try_recv().unwrap(), 7);
        // Requests of others are not kept.
        waiters.deliver("someone-else", 8);
        assert!(waiters.early.is_empty());
    }

    #[test]
    fn names_are_prefixed_random_and_valid_object_names() {
        let (a, b) = (request_name(), request_name());
        assert_ne!(a, b);
        assert!(a.starts_with(NAME_PREFIX) && a.len() == NAME_PREFIX.len() + 16);
        assert!(crate::pki::identity::is_dns1123_subdomain(&a));
    }
}
