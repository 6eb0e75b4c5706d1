//! Connecting to Postgres, with TLS when the URL asks for it (libpq's `sslmode` and
//! `sslrootcert`, which tokio-postgres does not fully understand on its own), and the typed
//! client of the extension's SQL API ([`QueueClient`]).

mod api;

pub use api::{DeadLetter, DeadLetterFilter, QueueClient, QueueRow};

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres::config::SslMode;
use tokio_postgres::{AsyncMessage, Client};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::error::Error;

/// libpq's TLS modes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsMode {
    /// No TLS.
    Disable,
    /// TLS if the server offers it, without verifying the certificate (libpq's default).
    Prefer,
    /// TLS required; the certificate is not verified.
    Require,
    /// TLS required; the certificate chain is verified, the host name is not.
    VerifyCa,
    /// TLS required; chain and host name are verified.
    VerifyFull,
}

/// A database URL split into what tokio-postgres parses and the TLS settings it does not.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectTarget {
    /// The URL without `sslmode`/`sslrootcert`.
    pub url: String,
    /// Requested TLS mode.
    pub tls: TlsMode,
    /// CA certificates (PEM file) to verify the server with; default: the web PKI roots.
    pub root_cert: Option<String>,
}

impl ConnectTarget {
    /// Splits the TLS parameters off a `postgres://` URL or a `key=value` string.
    pub fn parse(url: &str) -> Result<ConnectTarget, Error> {
        let mut tls = TlsMode::Prefer;
        let mut root_cert = None;
        let mut take = |key: &str, value: &str| -> Result<bool, Error> {
            match key {
                "sslmode" => {
                    tls = match value {
                        "disable" => TlsMode::Disable,
                        "allow" | "prefer" => TlsMode::Prefer,
                        "require" => TlsMode::Require,
                        "verify-ca" => TlsMode::VerifyCa,
                        "verify-full" => TlsMode::VerifyFull,
                        other => {
                            return Err(Error::DatabaseUrl(format!(
                                "unknown sslmode {other:?} (expected disable, prefer, require, verify-ca or verify-full)"
                            )))
                        }
                    };
                    Ok(true)
                }
                "sslrootcert" => {
                    root_cert = Some(value.to_string());
                    Ok(true)
                }
                _ => Ok(false),
            }
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_string(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                        if !take(k, &percent_decode(v))? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() {
                        base.to_string()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for pair in url.split_whitespace() {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if !take(k, v.trim_matches('\''))? {
                    kept.push(pair);
                }
            }
            kept.join(" ")
        };
        Ok(ConnectTarget {
            url: rest,
            tls,
            root_cert,
        })
    }
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = s.get(i + 1..i + 3).filter(|_| bytes[i] == b'%');
        if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the connection task does with notifications (LISTEN) the receiver has not taken.
#[derive(Clone, Copy, Debug)]
pub enum Notifications {
    /// Keep at most one waiting and drop the rest: wake-ups, where one is as good as many.
    /// The connection never waits for the receiver, so queries on it never stall.
    Coalesce,
    /// Keep at most this many waiting, then stop reading the connection until the
    /// receiver takes one: Postgres holds the rest in its notification queue. Nothing is
    /// dropped and memory stays bounded, but queries on the connection wait too.
    Bounded(usize),
}

/// Connects and spawns the connection task; notifications are coalesced
/// ([`Notifications::Coalesce`]). The receiver closes when the connection ends.
pub async fn connect(
    url: &str,
) -> Result<
    (
        Client,
        tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    ),
    Error,
> {
    connect_with(url, Notifications::Coalesce).await
}

/// [`connect`] with the given handling of notifications.
pub async fn connect_with(
    url: &str,
    notifications: Notifications,
) -> Result<
    (
        Client,
        tokio::sync::mpsc::Receiver<tokio_postgres::Notification>,
    ),
    Error,
> {
    let target = ConnectTarget::parse(url)?;
    let mut config: tokio_postgres::Config = target
        .url
        .parse()
        .map_err(|e: tokio_postgres::Error| Error::DatabaseUrl(e.to_string()))?;
    if config.get_application_name().is_none() {
        config.application_name("pgpipe");
    }
    config.ssl_mode(match target.tls {
        TlsMode::Disable => SslMode::Disable,
        TlsMode::Prefer => SslMode::Prefer,
        _ => SslMode::Require,
    });
    let tls = MakeRustlsConnect::new(tls_config(target.tls, target.root_cert.as_deref())?);
    // Name the server (never the user or password): "connection refused" alone does not
    // say which host and port were tried.
    let server = server_of(&config);
    let (client, mut connection) = config
        .connect(tls)
        .await
        .map_err(Error::pg(format!("connect to postgres at {server}")))?;
    let capacity = match notifications {
        Notifications::Coalesce => 1,
        Notifications::Bounded(n) => n.max(1),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(capacity);
    tokio::spawn(async move {
        loop {
            match std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                Some(Ok(AsyncMessage::Notification(n))) => match notifications {
                    Notifications::Coalesce => {
                        let _ = tx.try_send(n);
                    }
                    Notifications::Bounded(_) => {
                        // Waiting here stops reading the socket: backpressure to
                        // Postgres instead of an unbounded buffer in the forwarder.
                        if tx.send(n).await.is_err() {
                            break;
                        }
                    }
                },
                Some(Ok(AsyncMessage::Notice(notice))) => {
                    tracing::debug!(component = "db", %notice, "server notice");
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    tracing::debug!(component = "db", error = %e, "connection closed");
                    break;
                }
                None => break,
            }
        }
    });
    Ok((client, rx))
}

fn tls_config(mode: TlsMode, root_cert: Option<&str>) -> Result<rustls::ClientConfig, Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?;
    let roots = || -> Result<RootCertStore, Error> {
        let mut roots = RootCertStore::empty();
        match root_cert {
            Some(path) => {
                let pem = std::fs::read(path)
                    .map_err(|e| Error::Tls(format!("read sslrootcert {path}: {e}")))?;
                let certs = rustls_pemfile_certs(&pem)
                    .map_err(|e| Error::Tls(format!("parse sslrootcert {path}: {e}")))?;
                for cert in certs {
                    roots
                        .add(cert)
                        .map_err(|e| Error::Tls(format!("sslrootcert {path}: {e}")))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        Ok(roots)
    };
    let config = match mode {
        TlsMode::Disable | TlsMode::Prefer | TlsMode::Require => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
            .with_no_client_auth(),
        TlsMode::VerifyFull => builder
            .with_root_certificates(roots()?)
            .with_no_client_auth(),
        TlsMode::VerifyCa => {
            let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots()?),
                provider,
            )
            .build()
            .map_err(|e| Error::Tls(e.to_string()))?;
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ChainOnly(inner)))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

fn rustls_pemfile_certs(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, String> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())
}

/// `sslmode=require`: encrypt, trust any certificate (libpq's semantics).
#[derive(Debug)]
struct NoVerification(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `sslmode=verify-ca`: the chain must lead to a trusted root; the name may differ.
#[derive(Debug)]
struct ChainOnly(Arc<rustls::client::WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// The hosts and ports `config` connects to, for error messages (`db.internal:5432`).
fn server_of(config: &tokio_postgres::Config) -> String {
    use tokio_postgres::config::Host;
    let ports = config.get_ports();
    let servers: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(name) if name.contains(':') => format!("[{name}]:{port}"),
                Host::Tcp(name) => format!("{name}:{port}"),
                Host::Unix(dir) => format!("{}/.s.PGSQL.{port}", dir.display()),
            }
        })
        .collect();
    if servers.is_empty() {
        "the default server (localhost:5432)".to_string()
    } else {
        servers.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_are_split_off_urls() {
        let t = ConnectTarget::parse(
            "postgres://app@db:5432/shop?sslmode=verify-full&sslrootcert=/etc/ca%20dir/ca.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(t.url, "postgres://app@db:5432/shop?application_name=x");
        assert_eq!(t.tls, TlsMode::VerifyFull);
        assert_eq!(t.root_cert.as_deref(), Some("/etc/ca dir/ca.pem"));

        let t = ConnectTarget::parse("host=db user=app sslmode=require").unwrap();
        assert_eq!(t.url, "host=db user=app");
        assert_eq!(t.tls, TlsMode::Require);

        let t = ConnectTarget::parse("postgres://db/shop").unwrap();
        assert_eq!(t.tls, TlsMode::Prefer);
    }

    #[test]
    fn an_unknown_sslmode_is_named() {
        let err = ConnectTarget::parse("postgres://db/x?sslmode=always").unwrap_err();
        assert!(
            err.to_string().contains("unknown sslmode \"always\""),
            "{err}"
        );
    }
}
