//! `istio-csr-rs request`: one certificate, verified, written to disk.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use rcgen::PublicKeyData;
use rustls_pki_types::UnixTime;
use x509_parser::prelude::{FromDer, X509Certificate};

use super::{KeyType, Target, WorkloadArgs, build_csr, metadata};
use crate::pki::chain::{self, Expected, RootBundle};
use crate::pki::pem;
use crate::proto::istio_v1_auth::IstioCertificateRequest;

#[derive(Debug, clap::Args)]
pub struct RequestArgs {
    #[command(flatten)]
    pub target: Target,
    /// Full SPIFFE identity to request (instead of --namespace/--service-account).
    #[arg(long, conflicts_with_all = ["namespace", "service_account"])]
    pub identity: Option<String>,
    #[command(flatten)]
    pub workload: WorkloadArgs,
    /// Requested lifetime (the server may shorten it). pilot-agent asks for 24h.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub ttl: Duration,
    #[arg(long, value_enum, default_value_t = KeyType::EcP256)]
    pub key_type: KeyType,
    /// Ask for this identity on behalf of a workload, as ztunnel does.
    #[arg(long)]
    pub impersonate: Option<String>,
    /// pilot-agent's CertSigner metadata.
    #[arg(long)]
    pub cert_signer: Option<String>,
    /// Where to write cert-chain.pem, key.pem and root-cert.pem.
    #[arg(long, default_value = ".")]
    pub out_dir: PathBuf,
}

/// Exits 0 on success, with the gRPC status code when the server refuses, 1 on local errors.
pub async fn run(args: RequestArgs) -> ExitCode {
    match request(&args).await {
        Ok(summary) => {
            println!("{summary}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            if let Some(status) = error.downcast_ref::<tonic::Status>() {
                eprintln!(
                    "error: server answered {:?}: {}",
                    status.code(),
                    status.message()
                );
                ExitCode::from(u8::try_from(status.code() as i32).unwrap_or(1))
            } else {
                eprintln!("error: {error:#}");
                ExitCode::FAILURE
            }
        }
    }
}

async fn request(args: &RequestArgs) -> anyhow::Result<String> {
    let identity = match (&args.impersonate, &args.identity) {
        (Some(impersonated), _) => impersonated.clone(),
        (None, Some(identity)) => identity.clone(),
        (None, None) => args.workload.identity()?,
    };
    let key = args.key_type.generate()?;
    let csr = build_csr(&identity, &key)?;
    let mut client = args.target.connect().await?;
    let token = args.target.token()?;
    let request = args.target.request(
        token.as_deref(),
        IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(args.ttl.as_secs()).unwrap_or(i64::MAX),
            metadata: Some(metadata(
                args.cert_signer.as_deref(),
                args.impersonate.as_deref(),
            )),
        },
    )?;
    let chain = client
        .create_certificate(request)
        .await?
        .into_inner()
        .cert_chain;

    // Trust what we were configured to trust, not what the server says the roots are.
    let trusted = std::fs::read(&args.target.root_cert)?;
    let trusted = RootBundle::from_pem(&trusted).context("--root-cert")?;
    let certs = check_response_shape(&chain)?;
    let spki = key.subject_public_key_info();
    let identities = [identity.clone()];
    let verified = chain::verify(
        &certs,
        &trusted,
        UnixTime::now(),
        &Expected::identities(&identities, &spki),
    )
    .context("the returned chain does not verify")?;
    let (_, leaf) = X509Certificate::from_der(verified.leaf())?;
    let not_after = leaf
        .validity()
        .not_after
        .to_datetime()
        .format(&time::format_description::well_known::Rfc3339)?;

    write_outputs(&args.out_dir, &chain, &key.serialize_pem())?;
    Ok(format!(
        "issued {identity} not_after={not_after} chain_length={} out_dir={}",
        chain.len(),
        args.out_dir.display()
    ))
}

/// Istio's expectations of `cert_chain`: at least leaf + roots; middle elements hold one
/// certificate each; the last element is the root bundle.
fn check_response_shape(
    chain: &[String],
) -> anyhow::Result<Vec<rustls_pki_types::CertificateDer<'static>>> {
    if chain.len() < 2 {
        bail!(
            "cert_chain has {} elements; Istio needs at least 2",
            chain.len()
        );
    }
    let mut certs = Vec::new();
    for (index, element) in chain[..chain.len() - 1].iter().enumerate() {
        let mut parsed = pem::parse_certificates(element.as_bytes())
            .with_context(|| format!("cert_chain[{index}]"))?;
        if parsed.len() != 1 {
            bail!(
                "cert_chain[{index}] holds {} certificates, not one",
                parsed.len()
            );
        }
        certs.append(&mut parsed);
    }
    let roots = chain.last().map(String::as_str).unwrap_or_default();
    pem::parse_certificates(roots.as_bytes()).context("last cert_chain element (roots)")?;
    Ok(certs)
}

/// Writes the three files. A directory that does not exist yet is made private (0700);
/// each file is written under a random name created exclusively (O_EXCL, 0600: tempfile's
/// defaults) and renamed into place, so no one can plant or read a half-written key.
fn write_outputs(dir: &Path, chain: &[String], key_pem: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let (roots, leaf_and_intermediates) = chain.split_last().context("empty chain")?;
    let write = |name: &str, contents: &str, mode: u32| -> anyhow::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.join(name);
        let mut file = tempfile::Builder::new()
            .prefix(&format!(".{name}."))
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)
            .with_context(|| format!("writing into {}", dir.display()))?;
        file.write_all(contents.as_bytes())?;
        file.as_file().sync_all()?;
        file.persist(&path)
            .with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    };
    write("key.pem", key_pem, 0o600)?;
    write("cert-chain.pem", &leaf_and_intermediates.concat(), 0o644)?;
    write("root-cert.pem", roots, 0o644)?;
    Ok(())
}
