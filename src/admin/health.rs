//! Liveness and readiness, and the supervisor of the process's long-running tasks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use tokio_util::task::AbortOnDropHandle;

use crate::signer::issuer::Issuer;
use crate::signer::tls::ServingCertResolver;

/// What readiness is made of. Each part is owned by the subsystem that sets it.
pub struct Readiness {
    pub serving_cert: Arc<ServingCertResolver>,
    pub issuer: Arc<dyn Issuer>,
    pub grpc_listening: AtomicBool,
    /// Set first thing on SIGTERM, so load balancers drain this replica before it closes.
    pub shutting_down: AtomicBool,
}

impl Readiness {
    pub fn new(serving_cert: Arc<ServingCertResolver>, issuer: Arc<dyn Issuer>) -> Self {
        Self {
            serving_cert,
            issuer,
            grpc_listening: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
        }
    }

    pub fn checks(&self) -> Vec<(&'static str, bool)> {
        vec![
            ("serving-certificate", self.serving_cert.is_loaded()),
            ("grpc-listener", self.grpc_listening.load(Ordering::Acquire)),
            ("issuer", self.issuer.ready()),
            (
                "not-shutting-down",
                !self.shutting_down.load(Ordering::Acquire),
            ),
        ]
    }
}

/// The process is alive while every critical task runs. A task that ends or panics makes
/// `/livez` fail, so the kubelet restarts the pod, while signing goes on meanwhile: a dead file
/// watcher is no reason to drop requests in flight.
#[derive(Default)]
pub struct Liveness {
    dead: Mutex<Vec<(&'static str, String)>>,
    stopping: AtomicBool,
}

impl Liveness {
    /// Runs a critical task; its end (while not stopping) is recorded as a death.
    pub fn spawn(
        self: &Arc<Self>,
        name: &'static str,
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> AbortOnDropHandle<()> {
        let span = tracing::info_span!("task", name);
        let inner =
            AbortOnDropHandle::new(tokio::spawn(tracing::Instrument::instrument(task, span)));
        let liveness = self.clone();
        AbortOnDropHandle::new(tokio::spawn(async move {
            let reason = match inner.await {
                Ok(Ok(())) => "stopped".to_owned(),
                Ok(Err(error)) => format!("{error:#}"),
                Err(join) if join.is_panic() => "panicked".to_owned(),
                Err(_) => return,
            };
            if !liveness.stopping.load(Ordering::Acquire) {
                tracing::error!(task = name, %reason, "critical task ended; /livez now fails");
                liveness.record_death(name, reason);
            }
        }))
    }

    pub fn record_death(&self, name: &'static str, reason: String) {
        if let Ok(mut dead) = self.dead.lock() {
            dead.push((name, reason));
        }
    }

    /// Tasks end on purpose during shutdown: that is no death.
    pub fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }

    pub fn dead_tasks(&self) -> Vec<(&'static str, String)> {
        self.dead.lock().map(|d| d.clone()).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn dies_of(
        task: impl Future<Output = anyhow::Result<()>> + Send + 'static,
    ) -> Vec<(&'static str, String)> {
        let liveness = Arc::new(Liveness::default());
        let handle = liveness.spawn("victim", task);
        // The supervisor finishes right after the task; awaiting it is the synchronisation.
        let _ = handle.await;
        liveness.dead_tasks()
    }

    #[tokio::test]
    async fn a_failing_task_is_recorded_with_its_error() {
        let dead = dies_of(async { Err(anyhow::anyhow!("inotify gone")) }).await;
        assert_eq!(dead, vec![("victim", "inotify gone".to_owned())]);
    }

    #[tokio::test]
    async fn a_panicking_task_is_recorded() {
        let dead = dies_of(async { panic!("boom") }).await;
        assert_eq!(dead, vec![("victim", "panicked".to_owned())]);
    }

    #[tokio::test]
    async fn a_task_ending_during_shutdown_is_not_a_death() {
        let liveness = Arc::new(Liveness::default());
        liveness.stopping();
        let _ = liveness.spawn("victim", async { Ok(()) }).await;
        assert!(liveness.dead_tasks().is_empty());
    }
}
