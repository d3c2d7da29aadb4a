//! Tells when files may have changed: inotify on the parent directories (which also catches the
//! atomic `..data` symlink swap Kubernetes does for mounted ConfigMaps and Secrets), plus a slow
//! periodic tick in case a filesystem drops events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

/// Editors and `kubectl cp` write in several steps; one reload after the burst is enough.
const DEBOUNCE: Duration = Duration::from_millis(50);
/// The safety net for filesystems without inotify (some network volumes).
pub const DEFAULT_RESYNC: Duration = Duration::from_secs(30);

pub struct FileWatch {
    // Dropping the watcher stops the events, so it lives as long as the receiver.
    _watcher: notify::RecommendedWatcher,
    events: mpsc::Receiver<()>,
    resync: Duration,
}

impl FileWatch {
    /// Watches each path: a directory itself, a file through its parent directory.
    pub fn new(paths: &[PathBuf], resync: Duration) -> notify::Result<Self> {
        let (tx, events) = mpsc::channel(1);
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                // Reading the files (to reload them) raises access events: those are not changes.
                let is_change =
                    event.is_ok_and(|e| !matches!(e.kind, notify::EventKind::Access(_)));
                if is_change {
                    // A full channel already holds a pending wake-up: coalescing is what we want.
                    let _ = tx.try_send(());
                }
            })?;
        for path in paths {
            watcher.watch(&watch_target(path), RecursiveMode::NonRecursive)?;
        }
        Ok(Self {
            _watcher: watcher,
            events,
            resync,
        })
    }

    /// Resolves after a change (debounced) or when the resync interval has passed. Callers
    /// compare content fingerprints, so a spurious wake-up costs one read.
    pub async fn changed(&mut self) {
        if tokio::time::timeout(self.resync, self.events.recv())
            .await
            .is_ok()
        {
            tokio::time::sleep(DEBOUNCE).await;
            while self.events.try_recv().is_ok() {}
        }
    }
}

fn watch_target(path: &Path) -> PathBuf {
    if path.is_dir() {
        return path.to_path_buf();
    }
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

/// SHA-256 of a set of files' contents (missing files count as empty), to skip no-op reloads.
pub fn fingerprint(paths: &[PathBuf]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for path in paths {
        let bytes = std::fs::read(path).unwrap_or_default();
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(&bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn reports_a_rewrite_of_a_watched_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, "one").unwrap();
        let mut watch =
            FileWatch::new(std::slice::from_ref(&path), Duration::from_secs(3600)).unwrap();
        let before = fingerprint(std::slice::from_ref(&path));
        std::fs::write(&path, "two").unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("no change reported");
        assert_ne!(before, fingerprint(std::slice::from_ref(&path)));
    }

    #[tokio::test]
    async fn reports_a_kubernetes_style_symlink_swap() {
        let dir = tempfile::tempdir().unwrap();
        let v1 = dir.path().join("..v1");
        let v2 = dir.path().join("..v2");
        std::fs::create_dir(&v1).unwrap();
        std::fs::create_dir(&v2).unwrap();
        std::fs::write(v1.join("roots.pem"), "one").unwrap();
        std::fs::write(v2.join("roots.pem"), "two").unwrap();
        std::os::unix::fs::symlink("..v1", dir.path().join("..data")).unwrap();
        std::os::unix::fs::symlink("..data/roots.pem", dir.path().join("roots.pem")).unwrap();
        let path = dir.path().join("roots.pem");
        let mut watch =
            FileWatch::new(std::slice::from_ref(&path), Duration::from_secs(3600)).unwrap();
        // The swap: a new ..data link renamed over the old one.
        std::os::unix::fs::symlink("..v2", dir.path().join("..data_tmp")).unwrap();
        std::fs::rename(dir.path().join("..data_tmp"), dir.path().join("..data")).unwrap();
        tokio::time::timeout(Duration::from_secs(10), watch.changed())
            .await
            .expect("no change reported");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
    }
}
