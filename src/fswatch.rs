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

/// The "reload on change, keep the previous value on error" loop behind every followed file
/// (the pinned roots, the static tokens, the built-in CA, the tenant signers): woken by a
/// change or the resync tick, it reloads only contents it has not seen, and reports a broken
/// version once instead of on every wake-up.
pub struct Follower {
    files: FileWatch,
    /// The contents last loaded, or last found broken.
    seen: [u8; 32],
}

impl Follower {
    /// Watches `paths` and takes their contents now as loaded. Made BEFORE the first load, so
    /// a change between the two is reloaded at the first `check` (at worst once too often).
    pub fn new(paths: &[PathBuf]) -> notify::Result<Self> {
        Self::watching(paths, fingerprint(paths))
    }

    /// Watches `paths`, whose value in force was loaded from contents `loaded` (a
    /// `fingerprint` taken with the load), so that any change since is reloaded.
    pub fn watching(paths: &[PathBuf], loaded: [u8; 32]) -> notify::Result<Self> {
        Ok(Self {
            files: FileWatch::new(paths, DEFAULT_RESYNC)?,
            seen: loaded,
        })
    }

    /// Calls `reload` when `contents` (a fingerprint of what the value comes from now) is
    /// new, or when `force`d (something else it depends on changed). `reload` puts the new
    /// value in force, or fails and leaves the old one; it may name the files to follow
    /// from now on.
    pub fn check(
        &mut self,
        what: &str,
        contents: [u8; 32],
        force: bool,
        reload: impl FnOnce() -> anyhow::Result<Option<Vec<PathBuf>>>,
    ) -> notify::Result<()> {
        if contents == self.seen && !force {
            return Ok(());
        }
        self.seen = contents;
        match reload() {
            Ok(Some(paths)) => {
                self.files = FileWatch::new(&paths, DEFAULT_RESYNC)?;
                self.seen = fingerprint(&paths);
            }
            Ok(None) => {}
            Err(error) => {
                tracing::error!(error = %format!("{error:#}"), "{what} not reloaded; keeping the previous one");
            }
        }
        Ok(())
    }

    /// Resolves after the next change or resync tick.
    pub async fn changed(&mut self) {
        self.files.changed().await;
    }

    /// The common case: follows `paths` for ever, reloading them whenever they change.
    pub async fn follow(
        mut self,
        what: &str,
        paths: &[PathBuf],
        mut reload: impl FnMut() -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        loop {
            self.check(what, fingerprint(paths), false, || reload().map(|()| None))?;
            self.changed().await;
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
    let contents: Vec<Vec<u8>> = paths
        .iter()
        .map(|path| std::fs::read(path).unwrap_or_default())
        .collect();
    fingerprint_of(&contents)
}

/// The same fingerprint, of contents already read.
pub fn fingerprint_of<B: AsRef<[u8]>>(contents: &[B]) -> [u8; 32] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for bytes in contents {
        let bytes = bytes.as_ref();
        ctx.update(&(bytes.len() as u64).to_be_bytes());
        ctx.update(bytes);
    }
    let mut out = [0u8; 32];
    out.copy_from_slice(ctx.finish().as_ref());
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reloads_only_new_contents_and_a_broken_version_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file");
        std::fs::write(&path, "one").unwrap();
        let paths = [path.clone()];
        let mut follower = Follower::new(&paths).unwrap();
        let mut reloads = 0;
        let mut check = |follower: &mut Follower, force: bool, ok: bool| {
            follower
                .check("test file", fingerprint(&paths), force, || {
                    reloads += 1;
                    if ok {
                        Ok(None)
                    } else {
                        anyhow::bail!("broken")
                    }
                })
                .unwrap();
            reloads
        };
        assert_eq!(
            check(&mut follower, false, true),
            0,
            "unchanged since new()"
        );
        std::fs::write(&path, "two").unwrap();
        assert_eq!(
            check(&mut follower, false, false),
            1,
            "a change is reloaded"
        );
        assert_eq!(
            check(&mut follower, false, true),
            1,
            "a broken version, once"
        );
        assert_eq!(check(&mut follower, true, true), 2, "forced");
        std::fs::write(&path, "three").unwrap();
        assert_eq!(check(&mut follower, false, true), 3);
        assert_eq!(check(&mut follower, false, true), 3);
    }

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
