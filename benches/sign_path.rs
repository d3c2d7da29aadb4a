//! The pure sign path of the built-in CA: CSR parse + policy + self-signature check, leaf
//! signing, and response assembly. Network, TLS and gRPC are measured by `istio-csr-rs bench`.

use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use istio_csr_rs::pki::chain::RootBundle;
use istio_csr_rs::pki::csr;
use istio_csr_rs::pki::testing::{CsrBuilder, KeyAlg, TestCa};
use istio_csr_rs::signer::issuer::local_ca::LoadedCa;
use time::OffsetDateTime;

const ID: &str = "spiffe://cluster.local/ns/default/sa/default";

fn loaded_ca(alg: KeyAlg) -> (LoadedCa, RootBundle, tempfile::TempDir) {
    let root = TestCa::root("bench root", alg);
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in [
        ("ca-cert.pem", root.cert_pem()),
        ("ca-key.pem", root.key_pem()),
        ("cert-chain.pem", root.cert_pem()),
        ("root-cert.pem", root.cert_pem()),
    ] {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let roots = RootBundle::from_certs(vec![root.cert.clone()]).unwrap();
    (LoadedCa::load(dir.path(), None).unwrap(), roots, dir)
}

fn sign_path(c: &mut Criterion) {
    let mut group = c.benchmark_group("sign_path");
    for (ca_name, ca_alg) in [("ecdsa-ca", KeyAlg::EcdsaP256), ("rsa-ca", KeyAlg::Rsa2048)] {
        let (ca, roots, _dir) = loaded_ca(ca_alg);
        for (csr_name, csr_alg) in [
            ("p256-csr", KeyAlg::EcdsaP256),
            ("rsa2048-csr", KeyAlg::Rsa2048),
        ] {
            let pem = CsrBuilder::new(csr_alg).uri(ID).build_pem();
            group.bench_function(format!("{csr_name}/{ca_name}"), |b| {
                b.iter(|| {
                    let checked = csr::parse_and_check(&pem).unwrap();
                    let chain = ca
                        .sign(
                            &checked.identities,
                            &checked.public_key,
                            Duration::from_secs(3600),
                            OffsetDateTime::now_utc(),
                        )
                        .unwrap();
                    chain.to_response(&roots)
                })
            });
        }
    }
    group.finish();
}

fn csr_check_only(c: &mut Criterion) {
    let pem = CsrBuilder::new(KeyAlg::EcdsaP256).uri(ID).build_pem();
    c.bench_function("csr_check/p256", |b| {
        b.iter(|| csr::parse_and_check(&pem).unwrap())
    });
}

criterion_group!(benches, sign_path, csr_check_only);
criterion_main!(benches);
