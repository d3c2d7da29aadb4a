//! What istiod's certificate must be, and whether the Secret in the cluster still is it. Pure:
//! no I/O, so every reason to reissue is a table test.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use rcgen::KeyPair;
use rustls_pki_types::UnixTime;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{IstiodCertArgs, IstiodKeyAlgorithm};
use crate::pki::chain::{self, Expected, RootBundle};
use crate::pki::identity;
use crate::pki::keys;
use crate::pki::leaf::LeafNames;
use crate::pki::pem;

/// The Secret istiod mounts when its own CA is off (`ENABLE_CA_SERVER=false`).
pub const SECRET_NAME: &str = "istiod-tls";
pub const SECRET_TYPE: &str = "kubernetes.io/tls";
/// istiod's service account, as istio-csr names it in the URI SAN.
const ISTIOD_SERVICE_ACCOUNT: &str = "istiod-service-account";
/// The revision whose Service is plain `istiod`.
const DEFAULT_REVISION: &str = "default";
/// Hash of the options the Secret was issued for: a changed option means a new certificate.
pub const SPEC_ANNOTATION: &str = "istio-csr-rs.io/istiod-cert-spec";
/// The issuer that signed it (`Issuer::signed_by`): a switch means a new certificate.
pub const ISSUER_ANNOTATION: &str = "istio-csr-rs.io/issued-by";
/// The API server refuses lifetimes the Kubernetes CSR API cannot honour, and a certificate
/// renewed more than once a minute would keep the signer busy for nothing.
const MIN_DURATION: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeySpec {
    Rsa(usize),
    EcdsaP256,
    EcdsaP384,
}

impl KeySpec {
    fn from_args(algorithm: IstiodKeyAlgorithm, size: Option<u32>) -> Result<Self, String> {
        match (algorithm, size) {
            (IstiodKeyAlgorithm::Rsa, None | Some(2048)) => Ok(KeySpec::Rsa(2048)),
            (IstiodKeyAlgorithm::Rsa, Some(bits @ (3072 | 4096))) => {
                Ok(KeySpec::Rsa(bits as usize))
            }
            (IstiodKeyAlgorithm::Ecdsa, None | Some(256)) => Ok(KeySpec::EcdsaP256),
            (IstiodKeyAlgorithm::Ecdsa, Some(384)) => Ok(KeySpec::EcdsaP384),
            (IstiodKeyAlgorithm::Rsa, Some(bits)) => Err(format!(
                "--istiod-cert-key-size {bits} is not an RSA size (2048, 3072 or 4096)"
            )),
            (IstiodKeyAlgorithm::Ecdsa, Some(bits)) => Err(format!(
                "--istiod-cert-key-size {bits} is not an ECDSA size (256 or 384)"
            )),
        }
    }

    /// A fresh private key of this kind.
    pub fn generate(self) -> Result<KeyPair, keys::KeyError> {
        match self {
            KeySpec::Rsa(bits) => keys::generate_rsa(bits),
            KeySpec::EcdsaP256 => keys::generate_ecdsa_p256(),
            KeySpec::EcdsaP384 => KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384)
                .map_err(|e| keys::KeyError::Malformed(e.to_string())),
        }
    }

    fn label(self) -> String {
        match self {
            KeySpec::Rsa(bits) => format!("rsa-{bits}"),
            KeySpec::EcdsaP256 => "ecdsa-p256".into(),
            KeySpec::EcdsaP384 => "ecdsa-p384".into(),
        }
    }
}

/// istiod's certificate as the flags describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IstiodCertSpec {
    pub namespace: String,
    pub names: LeafNames,
    pub key: KeySpec,
    pub duration: Duration,
    pub renew_before: Duration,
    /// Added to istiod's CertificateRequest.
    pub annotations: BTreeMap<String, String>,
}

impl IstiodCertSpec {
    /// istio-csr's names: `istiod.<ns>.svc` for the default revision, `istiod-<rev>.<ns>.svc`
    /// for the others, the additional names; CN `istiod.<ns>.svc`; the istiod SPIFFE URI.
    pub fn from_args(args: &IstiodCertArgs, trust_domain: &str) -> Result<Self, String> {
        let ns = &args.istiod_cert_namespace;
        if !identity::is_dns1123_label(ns) {
            return Err(format!(
                "--istiod-cert-namespace {ns:?} is not a namespace name"
            ));
        }
        if args.istiod_cert_istio_revisions.is_empty() {
            return Err("--istiod-cert-istio-revisions names no revision".into());
        }
        let mut dns = Vec::new();
        for revision in &args.istiod_cert_istio_revisions {
            let revision = revision.trim();
            let name = if revision == DEFAULT_REVISION {
                format!("istiod.{ns}.svc")
            } else if identity::is_dns1123_label(revision) {
                format!("istiod-{revision}.{ns}.svc")
            } else {
                return Err(format!(
                    "--istiod-cert-istio-revisions: {revision:?} is not a revision name"
                ));
            };
            push_unique(&mut dns, name);
        }
        for name in &args.istiod_cert_additional_dns_names {
            let name = name.trim();
            if !identity::is_dns1123_subdomain(name.strip_prefix("*.").unwrap_or(name)) {
                return Err(format!(
                    "--istiod-cert-additional-dns-names: {name:?} is not a DNS name"
                ));
            }
            push_unique(&mut dns, name.to_owned());
        }
        let key = KeySpec::from_args(args.istiod_cert_key_algorithm, args.istiod_cert_key_size)?;
        if args.istiod_cert_duration < MIN_DURATION {
            return Err("--istiod-cert-duration must be at least 1m".into());
        }
        if args.istiod_cert_renew_before >= args.istiod_cert_duration {
            return Err(format!(
                "--istiod-cert-renew-before ({}) must be shorter than --istiod-cert-duration ({})",
                humantime::format_duration(args.istiod_cert_renew_before),
                humantime::format_duration(args.istiod_cert_duration)
            ));
        }
        let mut annotations = BTreeMap::new();
        for pair in &args.istiod_cert_additional_annotations {
            let (key, value) = pair.split_once('=').ok_or_else(|| {
                format!("--istiod-cert-additional-annotations: {pair:?} is not key=value")
            })?;
            annotations.insert(key.trim().to_owned(), value.trim().to_owned());
        }
        Ok(Self {
            namespace: ns.clone(),
            names: LeafNames {
                uris: vec![format!(
                    "spiffe://{trust_domain}/ns/{ns}/sa/{ISTIOD_SERVICE_ACCOUNT}"
                )],
                dns,
                ips: Vec::new(),
                common_name: Some(format!("istiod.{ns}.svc")),
            },
            key,
            duration: args.istiod_cert_duration,
            renew_before: args.istiod_cert_renew_before,
            annotations,
        })
    }

    /// A digest of everything the certificate is made from (not the renewal schedule).
    pub fn fingerprint(&self) -> String {
        let canonical = format!(
            "names={:?};key={};duration={};annotations={:?}",
            self.names,
            self.key.label(),
            self.duration.as_secs(),
            self.annotations
        );
        hex::encode(
            &ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref()[..16],
        )
    }
}

fn push_unique(names: &mut Vec<String>, name: String) {
    if !names.contains(&name) {
        names.push(name);
    }
}

/// Why a new certificate is needed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reissue {
    Missing,
    WrongType,
    /// A key is missing or unreadable, or the certificate does not parse.
    Unreadable(&'static str),
    /// The chain does not verify against the roots in force, or names or key differ.
    Untrusted(String),
    RootsChanged,
    OptionsChanged,
    IssuerChanged,
    Due,
}

impl Reissue {
    /// A bounded label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Reissue::Missing => "missing",
            Reissue::WrongType => "wrong-type",
            Reissue::Unreadable(_) => "unreadable",
            Reissue::Untrusted(_) => "untrusted",
            Reissue::RootsChanged => "roots-changed",
            Reissue::OptionsChanged => "options-changed",
            Reissue::IssuerChanged => "issuer-changed",
            Reissue::Due => "due",
        }
    }
}

/// What to do about the Secret as it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// It is right; look again at `renew_at`.
    Keep {
        renew_at: OffsetDateTime,
    },
    Reissue(Reissue),
}

/// Judges the Secret: it must hold a chain that verifies against `roots` now, for exactly the
/// spec's names and for the key beside it, `ca.crt` must be the roots, it must have been made
/// from these options by this issuer, and it must not be due for renewal.
pub fn assess(
    secret: Option<&Secret>,
    spec: &IstiodCertSpec,
    roots: &RootBundle,
    signed_by: &str,
    now: OffsetDateTime,
) -> Verdict {
    match check(secret, spec, roots, signed_by, now) {
        Ok(renew_at) => Verdict::Keep { renew_at },
        Err(reason) => Verdict::Reissue(reason),
    }
}

fn check(
    secret: Option<&Secret>,
    spec: &IstiodCertSpec,
    roots: &RootBundle,
    signed_by: &str,
    now: OffsetDateTime,
) -> Result<OffsetDateTime, Reissue> {
    let secret = secret.ok_or(Reissue::Missing)?;
    if secret.type_.as_deref() != Some(SECRET_TYPE) {
        return Err(Reissue::WrongType);
    }
    let data = secret.data.as_ref().ok_or(Reissue::Unreadable("no data"))?;
    let get = |key: &'static str| {
        data.get(key)
            .map(|v| v.0.as_slice())
            .ok_or(Reissue::Unreadable(key))
    };
    let certs =
        pem::parse_certificates(get("tls.crt")?).map_err(|_| Reissue::Unreadable("tls.crt"))?;
    let key =
        keys::load_private_key_pem(get("tls.key")?).map_err(|_| Reissue::Unreadable("tls.key"))?;
    let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
    let unix = UnixTime::since_unix_epoch(Duration::from_secs(
        u64::try_from(now.unix_timestamp()).unwrap_or(0),
    ));
    let expected = Expected {
        uris: &spec.names.uris,
        dns: &spec.names.dns,
        ips: &spec.names.ips,
        spki_der: &spki,
    };
    chain::verify(&certs, roots, unix, &expected).map_err(|e| Reissue::Untrusted(e.to_string()))?;
    if get("ca.crt")? != roots.pem().as_bytes() {
        return Err(Reissue::RootsChanged);
    }
    let annotation = |key: &str| {
        secret
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(key))
            .map(String::as_str)
    };
    if annotation(SPEC_ANNOTATION) != Some(spec.fingerprint().as_str()) {
        return Err(Reissue::OptionsChanged);
    }
    if annotation(ISSUER_ANNOTATION) != Some(signed_by) {
        return Err(Reissue::IssuerChanged);
    }
    let (_, leaf) =
        X509Certificate::from_der(&certs[0]).map_err(|_| Reissue::Unreadable("tls.crt"))?;
    let not_after = leaf.validity().not_after.to_datetime();
    let renew_at = not_after - spec.renew_before;
    if now >= renew_at {
        return Err(Reissue::Due);
    }
    Ok(renew_at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use crate::pki::testing::{KeyAlg, TestCa};
    use clap::Parser;
    use k8s_openapi::ByteString;
    use kube::api::ObjectMeta;

    fn args(extra: &[&str]) -> IstiodCertArgs {
        let mut argv = vec!["istio-csr-rs", "serve"];
        argv.extend_from_slice(extra);
        let Command::Serve(serve) = Cli::try_parse_from(argv).unwrap().command else {
            panic!("not serve")
        };
        serve.istiod_cert
    }

    fn spec(extra: &[&str]) -> IstiodCertSpec {
        IstiodCertSpec::from_args(&args(extra), "cluster.local").unwrap()
    }

    #[test]
    fn names_follow_istio_csr_for_every_revision() {
        let spec = spec(&[
            "--istiod-cert-namespace=mesh",
            "--istiod-cert-istio-revisions=default,canary",
            "--istiod-cert-additional-dns-names=istiod.example.com",
        ]);
        assert_eq!(
            spec.names.dns,
            [
                "istiod.mesh.svc",
                "istiod-canary.mesh.svc",
                "istiod.example.com"
            ]
        );
        assert_eq!(spec.names.common_name.as_deref(), Some("istiod.mesh.svc"));
        assert_eq!(
            spec.names.uris,
            ["spiffe://cluster.local/ns/mesh/sa/istiod-service-account"]
        );
        assert_eq!(spec.key, KeySpec::Rsa(2048));
        assert_eq!(spec.duration, Duration::from_secs(3600));
        assert_eq!(spec.renew_before, Duration::from_secs(1800));
    }

    #[test]
    fn refuses_options_that_cannot_make_a_certificate() {
        for bad in [
            &["--istiod-cert-key-size=1024"][..],
            &[
                "--istiod-cert-key-algorithm=ECDSA",
                "--istiod-cert-key-size=2048",
            ],
            &["--istiod-cert-duration=1h", "--istiod-cert-renew-before=1h"],
            &[
                "--istiod-cert-duration=30s",
                "--istiod-cert-renew-before=10s",
            ],
            &["--istiod-cert-istio-revisions=Not_A_Revision"],
            &["--istiod-cert-additional-dns-names=bad name"],
            &["--istiod-cert-additional-annotations=novalue"],
            &["--istiod-cert-namespace=Istio_System"],
        ] {
            assert!(
                IstiodCertSpec::from_args(&args(bad), "cluster.local").is_err(),
                "{bad:?}"
            );
        }
        assert_eq!(
            spec(&[
                "--istiod-cert-key-algorithm=ecdsa",
                "--istiod-cert-key-size=384"
            ])
            .key,
            KeySpec::EcdsaP384
        );
    }

    #[test]
    fn the_fingerprint_follows_the_certificate_options_only() {
        let base = spec(&[]);
        assert_eq!(base.fingerprint(), spec(&[]).fingerprint());
        assert_eq!(
            base.fingerprint(),
            spec(&["--istiod-cert-renew-before=10m"]).fingerprint(),
            "the schedule is not part of the certificate"
        );
        for changed in [
            &["--istiod-cert-istio-revisions=canary"][..],
            &["--istiod-cert-key-algorithm=ECDSA"],
            &["--istiod-cert-duration=2h"],
            &["--istiod-cert-additional-dns-names=x.example.com"],
            &["--istiod-cert-additional-annotations=a=b"],
        ] {
            assert_ne!(
                base.fingerprint(),
                spec(changed).fingerprint(),
                "{changed:?}"
            );
        }
    }

    /// A Secret as the writer makes it, signed by `ca` for `spec`.
    fn secret_for(
        spec: &IstiodCertSpec,
        ca: &TestCa,
        roots: &RootBundle,
        signed_by: &str,
        now: OffsetDateTime,
        lifetime: time::Duration,
    ) -> Secret {
        let key = KeyAlg::EcdsaP256.generate();
        let leaf = crate::pki::leaf::sign_leaf(
            &spec.names,
            &key,
            (now - time::Duration::minutes(1), now + lifetime),
            &ca.issuer(),
        )
        .unwrap();
        let bytes = |s: String| ByteString(s.into_bytes());
        Secret {
            metadata: ObjectMeta {
                annotations: Some(
                    [
                        (SPEC_ANNOTATION.to_owned(), spec.fingerprint()),
                        (ISSUER_ANNOTATION.to_owned(), signed_by.to_owned()),
                    ]
                    .into(),
                ),
                ..Default::default()
            },
            type_: Some(SECRET_TYPE.into()),
            data: Some(
                [
                    ("tls.crt".to_owned(), bytes(pem::encode_certificate(&leaf))),
                    ("tls.key".to_owned(), bytes(key.serialize_pem())),
                    ("ca.crt".to_owned(), bytes(roots.pem().to_owned())),
                ]
                .into(),
            ),
            ..Default::default()
        }
    }

    #[test]
    fn keeps_a_good_secret_until_renew_before_its_expiry() {
        let spec = spec(&[]);
        let ca = TestCa::root("root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![ca.cert.clone()]).unwrap();
        let now = OffsetDateTime::now_utc();
        let good = secret_for(&spec, &ca, &roots, "cm:a", now, time::Duration::hours(1));
        let Verdict::Keep { renew_at } = assess(Some(&good), &spec, &roots, "cm:a", now) else {
            panic!("a fresh Secret is kept");
        };
        let expected = now + time::Duration::minutes(30);
        assert!(
            (renew_at - expected).abs() <= time::Duration::seconds(1),
            "{renew_at}"
        );
        assert_eq!(
            assess(Some(&good), &spec, &roots, "cm:a", renew_at),
            Verdict::Reissue(Reissue::Due)
        );
    }

    #[test]
    fn every_change_or_tampering_asks_for_a_new_certificate() {
        let spec = spec(&[]);
        let ca = TestCa::root("root", KeyAlg::EcdsaP256);
        let roots = RootBundle::from_certs(vec![ca.cert.clone()]).unwrap();
        let now = OffsetDateTime::now_utc();
        let good = secret_for(&spec, &ca, &roots, "cm:a", now, time::Duration::hours(1));
        let reason =
            |secret: Option<&Secret>, spec: &IstiodCertSpec, roots: &RootBundle, by| match assess(
                secret, spec, roots, by, now,
            ) {
                Verdict::Reissue(reason) => reason.label(),
                Verdict::Keep { .. } => "keep",
            };
        assert_eq!(reason(Some(&good), &spec, &roots, "cm:a"), "keep");
        assert_eq!(reason(None, &spec, &roots, "cm:a"), "missing");

        let mut opaque = good.clone();
        opaque.type_ = Some("Opaque".into());
        assert_eq!(reason(Some(&opaque), &spec, &roots, "cm:a"), "wrong-type");

        let mut no_key = good.clone();
        no_key.data.as_mut().unwrap().remove("tls.key");
        assert_eq!(reason(Some(&no_key), &spec, &roots, "cm:a"), "unreadable");

        let rogue = TestCa::root("rogue", KeyAlg::EcdsaP256);
        let forged = secret_for(&spec, &rogue, &roots, "cm:a", now, time::Duration::hours(1));
        let mut tampered = good.clone();
        tampered.data.as_mut().unwrap().insert(
            "tls.crt".into(),
            forged.data.as_ref().unwrap()["tls.crt"].clone(),
        );
        assert_eq!(reason(Some(&tampered), &spec, &roots, "cm:a"), "untrusted");

        let mut other_key = good.clone();
        other_key.data.as_mut().unwrap().insert(
            "tls.key".into(),
            ByteString(KeyAlg::EcdsaP256.generate().serialize_pem().into_bytes()),
        );
        assert_eq!(reason(Some(&other_key), &spec, &roots, "cm:a"), "untrusted");

        let canary = self::spec(&["--istiod-cert-istio-revisions=default,canary"]);
        assert_eq!(reason(Some(&good), &canary, &roots, "cm:a"), "untrusted");

        let renew = self::spec(&["--istiod-cert-additional-annotations=team=mesh"]);
        assert_eq!(
            reason(Some(&good), &renew, &roots, "cm:a"),
            "options-changed"
        );

        assert_eq!(reason(Some(&good), &spec, &roots, "cm:b"), "issuer-changed");

        let next = TestCa::root("next root", KeyAlg::EcdsaP256);
        let both = RootBundle::from_certs(vec![ca.cert.clone(), next.cert.clone()]).unwrap();
        assert_eq!(reason(Some(&good), &spec, &both, "cm:a"), "roots-changed");
        let only_next = RootBundle::from_certs(vec![next.cert.clone()]).unwrap();
        assert_eq!(reason(Some(&good), &spec, &only_next, "cm:a"), "untrusted");
    }
}
