//! A throwaway certificate authority and server certificate for TLS clusters, and the
//! rustls client configuration that trusts it.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::CertificateDer;

use crate::process::RunAs;

/// The CA of a TLS cluster: its certificate on disk (for `sslrootcert=`) and in memory.
#[derive(Debug)]
pub(crate) struct TlsMaterial {
    pub ca_cert_path: PathBuf,
    pub ca_der: CertificateDer<'static>,
}

/// Generates a CA and a server certificate for `localhost` and `127.0.0.1`.
///
/// Writes `server.crt` and `server.key` (mode 0600, owned by `run_as`) into `data_dir`
/// and `ca.crt` (mode 0644) into `ca_dir`.
pub(crate) fn generate(ca_dir: &Path, data_dir: &Path, run_as: Option<RunAs>) -> TlsMaterial {
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA parameters");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "pgpipe test CA");
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_key = KeyPair::generate().expect("generate the CA key");
    let ca = CertifiedIssuer::self_signed(ca_params, ca_key).expect("self-sign the CA");

    let mut server_params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("server certificate parameters");
    server_params
        .distinguished_name
        .push(DnType::CommonName, "localhost");
    server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    server_params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    let server_key = KeyPair::generate().expect("generate the server key");
    let server_cert = server_params
        .signed_by(&server_key, &ca)
        .expect("sign the server certificate");

    write_file(
        &data_dir.join("server.crt"),
        &server_cert.pem(),
        0o600,
        run_as,
    );
    write_file(
        &data_dir.join("server.key"),
        &server_key.serialize_pem(),
        0o600,
        run_as,
    );
    let ca_cert_path = ca_dir.join("ca.crt");
    write_file(&ca_cert_path, &ca.pem(), 0o644, None);
    TlsMaterial {
        ca_cert_path,
        ca_der: ca.der().clone(),
    }
}

fn write_file(path: &Path, contents: &str, mode: u32, owner: Option<RunAs>) {
    fs::write(path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {}: {e}", path.display()));
    if let Some(user) = owner {
        std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
            .unwrap_or_else(|e| panic!("chown {}: {e}", path.display()));
    }
}

/// A tokio-postgres TLS connector (rustls with ring) that trusts only `ca`.
pub(crate) fn connector(ca: &CertificateDer<'static>) -> tokio_postgres_rustls::MakeRustlsConnect {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(ca.clone())
        .expect("add the test CA to the root store");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("rustls protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_postgres_rustls::MakeRustlsConnect::new(config)
}
