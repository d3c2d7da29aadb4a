//! Static bearer tokens from a CSV file (`token,namespace,serviceaccount`), for standalone mode
//! and for meshes without Kubernetes. The file is reloaded when it changes; a broken update
//! keeps the tokens that were loaded before and logs why.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;

use super::{AuthMethod, Authenticator, AuthnError, Caller, Credentials, ServiceAccount};
use crate::cluster::ClusterTarget;
use crate::fswatch::{self, Follower};
use crate::pki::identity::SpiffeId;
use std::future::Future;

type TokenDigest = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

/// Tokens are kept only as SHA-256 digests: the lookup never compares secrets byte by byte and a
/// memory dump does not reveal them.
#[derive(Debug, Default)]
pub struct TokenTable {
    by_digest: HashMap<TokenDigest, Arc<Caller>>,
    /// SHA-256 of the file this table was read from, to skip reloads of unchanged content.
    source: [u8; 32],
}

impl TokenTable {
    pub fn parse(text: &str, trust_domain: &str, path: &Path) -> Result<Self, TokenFileError> {
        let mut by_digest = HashMap::new();
        // Windows editors start files with a byte-order mark; it is not part of the token.
        let body = text.strip_prefix('\u{feff}').unwrap_or(text);
        for (index, raw) in body.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |reason: &str| TokenFileError::Line {
                path: path.to_path_buf(),
                line: index + 1,
                reason: reason.to_owned(),
            };
            let fields: Vec<&str> = line.split(',').map(str::trim).collect();
            let [token, namespace, service_account] = fields[..] else {
                return Err(err("expected token,namespace,serviceaccount"));
            };
            if token.is_empty() || token.chars().any(char::is_whitespace) {
                return Err(err("empty token or token with white space"));
            }
            let identity = SpiffeId::new(trust_domain, namespace, service_account)
                .map_err(|e| err(&e.to_string()))?;
            let caller = Caller {
                identities: vec![identity],
                service_account: Some(ServiceAccount {
                    namespace: namespace.to_owned(),
                    name: service_account.to_owned(),
                }),
                pod: None,
                method: AuthMethod::StaticToken,
            };
            if by_digest.insert(digest(token), Arc::new(caller)).is_some() {
                return Err(err("token listed twice"));
            }
        }
        Ok(Self {
            by_digest,
            source: fswatch::fingerprint_of(&[text]),
        })
    }

    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    fn lookup(&self, token: &str) -> Option<&Caller> {
        self.by_digest.get(&digest(token)).map(Arc::as_ref)
    }
}

fn digest(token: &str) -> TokenDigest {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref());
    out
}

pub struct StaticTokens {
    path: PathBuf,
    trust_domain: String,
    table: ArcSwap<TokenTable>,
}

impl StaticTokens {
    /// Loads the file; it must be valid at start-up.
    pub fn load(path: &Path, trust_domain: &str) -> Result<Arc<Self>, TokenFileError> {
        let table = read_table(path, trust_domain)?;
        Ok(Arc::new(Self {
            path: path.to_path_buf(),
            trust_domain: trust_domain.to_owned(),
            table: ArcSwap::from_pointee(table),
        }))
    }

    /// Re-reads the file; on error the current tokens stay in force.
    pub fn reload(&self) -> Result<usize, TokenFileError> {
        let table = read_table(&self.path, &self.trust_domain)?;
        let count = table.len();
        self.table.store(Arc::new(table));
        Ok(count)
    }

    /// Watches the file; the returned task reloads on every change. The watch is in place when
    /// this returns, and a change made since the load is picked up at once.
    pub fn watch(
        self: Arc<Self>,
    ) -> notify::Result<impl Future<Output = anyhow::Result<()>> + use<>> {
        let paths = [self.path.clone()];
        let follower = Follower::watching(&paths, self.table.load().source)?;
        Ok(async move {
            follower
                .follow("static token file", &paths, || {
                    let count = self.reload()?;
                    tracing::info!(path = %self.path.display(), count, "reloaded static tokens");
                    Ok(())
                })
                .await
        })
    }
}

fn read_table(path: &Path, trust_domain: &str) -> Result<TokenTable, TokenFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    TokenTable::parse(&text, trust_domain, path)
}

#[async_trait]
impl Authenticator for StaticTokens {
    async fn authenticate(
        &self,
        credentials: &Credentials<'_>,
    ) -> Result<Option<Caller>, AuthnError> {
        let Some(token) = credentials.bearer else {
            return Ok(None);
        };
        // Static tokens are this replica's own: they are valid for the local cluster only.
        if *credentials.cluster != ClusterTarget::Local {
            return Err(AuthnError::InvalidToken);
        }
        self.table
            .load()
            .lookup(token)
            .cloned()
            .map(Some)
            .ok_or(AuthnError::InvalidToken)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<TokenTable, TokenFileError> {
        TokenTable::parse(text, "cluster.local", Path::new("tokens.csv"))
    }

    #[test]
    fn parses_tokens_comments_and_blank_lines() {
        let table = parse("# comment\n\nabc,default,default\n def , ns1 , sa.one \n").unwrap();
        assert_eq!(table.len(), 2);
        let caller = table.lookup("def").unwrap();
        assert_eq!(
            caller.identities,
            vec!["spiffe://cluster.local/ns/ns1/sa/sa.one".parse().unwrap()]
        );
        assert!(table.lookup("nope").is_none());
    }

    #[test]
    fn ignores_a_byte_order_mark() {
        let table = parse("\u{feff}abc,default,default\n").unwrap();
        assert!(table.lookup("abc").is_some());
    }

    #[test]
    fn refuses_broken_lines_with_their_line_number() {
        for (text, line) in [
            ("abc,default\n", 1),
            ("ok,a,b\nabc,default,default,extra\n", 2),
            ("abc,Default,default\n", 1),
            ("abc,default,sa/x\n", 1),
            (",default,default\n", 1),
            ("a b,default,default\n", 1),
            ("abc,a,b\nabc,c,d\n", 2),
        ] {
            match parse(text) {
                Err(TokenFileError::Line { line: got, .. }) => assert_eq!(got, line, "{text:?}"),
                other => panic!("{text:?}: {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn accepts_known_tokens_for_the_local_cluster_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(&path, "abc,default,default\n").unwrap();
        let tokens = StaticTokens::load(&path, "cluster.local").unwrap();
        let creds = |bearer| Credentials {
            bearer,
            peer_certs: None,
            cluster: &ClusterTarget::Local,
        };
        assert!(
            tokens
                .authenticate(&creds(Some("abc")))
                .await
                .unwrap()
                .is_some()
        );
        assert_eq!(
            tokens.authenticate(&creds(Some("abd"))).await,
            Err(AuthnError::InvalidToken)
        );
        assert_eq!(tokens.authenticate(&creds(None)).await, Ok(None));
    }

    #[test]
    fn a_broken_reload_keeps_the_previous_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.csv");
        std::fs::write(&path, "abc,default,default\n").unwrap();
        let tokens = StaticTokens::load(&path, "cluster.local").unwrap();
        std::fs::write(&path, "abc,default\n").unwrap();
        assert!(tokens.reload().is_err());
        assert!(tokens.table.load().lookup("abc").is_some());
        std::fs::write(&path, "xyz,default,default\n").unwrap();
        assert_eq!(tokens.reload().unwrap(), 1);
        assert!(tokens.table.load().lookup("abc").is_none());
        assert!(tokens.table.load().lookup("xyz").is_some());
    }
}
