//! TLS for the PostgreSQL store: libpq's `sslmode` and `sslrootcert` URL parameters, on rustls.
//!
//! tokio-postgres parses `sslmode` itself but knows only disable, prefer and require, and leaves
//! certificate checks to the connector it is given. So the TLS parameters are taken out of the
//! URL here, the rest goes to tokio-postgres, and the connector verifies as libpq does:
//!
//! | `sslmode`                   | encrypted            | chain checked           | host name checked |
//! |-----------------------------|----------------------|-------------------------|-------------------|
//! | `disable`                   | never                | no                      | no                |
//! | `allow`, `prefer` (default) | if the server offers | only with `sslrootcert` | no                |
//! | `require`                   | always               | only with `sslrootcert` | no                |
//! | `verify-ca`                 | always               | yes                     | no                |
//! | `verify-full`               | always               | yes                     | yes               |
//!
//! `sslrootcert=PATH` names a PEM file of trusted CAs. Without it, verify-ca and verify-full
//! trust the system's CAs (Mozilla's list where the system has none); `sslrootcert=system` says
//! so explicitly and, as in libpq, then means verify-full unless a weaker mode is asked for,
//! which is refused.

use super::{StoreError, StoreResult};
use futures::future::BoxFuture;
use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

/// libpq's `sslmode` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    /// Plain first, TLS if the server insists: tokio-postgres cannot start plain and retry, so
    /// this behaves as `prefer` (TLS if offered), which succeeds against the same servers.
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<SslMode, UrlError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(invalid(format!(
                    "unknown sslmode `{other}` (use disable, allow, prefer, require, verify-ca or verify-full)"
                )))
            }
        })
    }

    fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// What tokio-postgres does on the wire; the certificate checks are ours.
    fn wire(self) -> tokio_postgres::config::SslMode {
        use tokio_postgres::config::SslMode as Wire;
        match self {
            SslMode::Disable => Wire::Disable,
            SslMode::Allow | SslMode::Prefer => Wire::Prefer,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull => Wire::Require,
        }
    }
}

impl fmt::Display for SslMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where trusted CAs come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCerts {
    /// None named: the system's, and only where the mode verifies.
    Default,
    /// `sslrootcert=system`.
    System,
    /// `sslrootcert=PATH`: a PEM file.
    File(String),
}

/// The TLS settings of a store URL, as given (no file read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: SslMode,
    pub roots: RootCerts,
}

/// What is wrong with a store URL (never the URL itself: it may hold a password).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(String);

impl From<UrlError> for StoreError {
    fn from(e: UrlError) -> StoreError {
        StoreError::Invalid(format!("store URL: {e}"))
    }
}

fn invalid(reason: impl fmt::Display) -> UrlError {
    UrlError(reason.to_string())
}

/// Split a `postgres://` URL into tokio-postgres's config (with its wire-level `sslmode` set)
/// and our TLS settings. Reads no file: `komilion check` runs this too.
pub fn parse_url(url: &str) -> Result<(tokio_postgres::Config, TlsParams), UrlError> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, query),
        None => (url, ""),
    };
    let mut mode = None;
    let mut roots = RootCerts::Default;
    // Parameters we do not handle are passed on byte for byte, so tokio-postgres decodes them
    // as it always has.
    let mut kept = Vec::new();
    for param in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = param.split_once('=').unwrap_or((param, ""));
        let decode = |s: &str| {
            percent_decode_str(s)
                .decode_utf8()
                .map(|s| s.into_owned())
                .map_err(|_| invalid(format!("`{key}` is not UTF-8 once percent-decoded")))
        };
        match decode(key)?.as_str() {
            // As in libpq, a parameter given twice takes the last value.
            "sslmode" => mode = Some(SslMode::parse(&decode(value)?)?),
            "sslrootcert" => {
                roots = match decode(value)?.as_str() {
                    "" => return Err(invalid("sslrootcert is empty")),
                    "system" => RootCerts::System,
                    path => RootCerts::File(path.to_owned()),
                }
            }
            _ => kept.push(param),
        }
    }
    let mode = match (mode, &roots) {
        // libpq: trusting every public CA is only safe with the host name checked too.
        (None, RootCerts::System) => SslMode::VerifyFull,
        (Some(m), RootCerts::System) if m != SslMode::VerifyFull => {
            return Err(invalid(format!(
                "sslrootcert=system needs sslmode=verify-full, not {m} (any public CA would do)"
            )))
        }
        (Some(m), _) => m,
        // libpq's default; with ssl off on the server this is a plain connection as before.
        (None, _) => SslMode::Prefer,
    };
    let rest = if kept.is_empty() {
        base.to_owned()
    } else {
        format!("{base}?{}", kept.join("&"))
    };
    let mut config = tokio_postgres::Config::from_str(&rest).map_err(|e| invalid(super::error_chain(&e)))?;
    config.ssl_mode(mode.wire());
    Ok((config, TlsParams { mode, roots }))
}

impl TlsParams {
    /// The connector these settings describe (reads `sslrootcert`).
    pub fn connector(&self) -> StoreResult<MakeRustls> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let algorithms = provider.signature_verification_algorithms;
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| StoreError::Internal(format!("TLS set-up: {e}")))?;
        let mut config = match self.check() {
            Check::Nothing => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoNameCheck {
                    roots: None,
                    algorithms,
                }))
                .with_no_client_auth(),
            Check::Chain => builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoNameCheck {
                    roots: Some(Arc::new(self.root_store()?)),
                    algorithms,
                }))
                .with_no_client_auth(),
            Check::Full => {
                let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(self.root_store()?), provider)
                    .build()
                    .map_err(|e| StoreError::Internal(format!("TLS set-up: {e}")))?;
                builder.with_webpki_verifier(verifier).with_no_client_auth()
            }
        };
        // What libpq 17 sends: a PostgreSQL 17 server refuses direct TLS (`sslnegotiation=direct`)
        // without it, older servers ignore it.
        config.alpn_protocols = vec![b"postgresql".to_vec()];
        Ok(MakeRustls {
            config: Arc::new(config),
            mode: self.mode,
        })
    }

    fn check(&self) -> Check {
        match self.mode {
            SslMode::Disable => Check::Nothing,
            // libpq checks the chain in these modes whenever it has a root certificate file.
            SslMode::Allow | SslMode::Prefer | SslMode::Require => match self.roots {
                RootCerts::File(_) => Check::Chain,
                RootCerts::Default | RootCerts::System => Check::Nothing,
            },
            SslMode::VerifyCa => Check::Chain,
            SslMode::VerifyFull => Check::Full,
        }
    }

    fn root_store(&self) -> StoreResult<RootCertStore> {
        let mut store = RootCertStore::empty();
        match &self.roots {
            RootCerts::File(path) => {
                let pem = std::fs::read(path).map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                    store
                        .add(cert)
                        .map_err(|e| invalid(format!("sslrootcert {path}: {e}")))?;
                }
                if store.is_empty() {
                    return Err(invalid(format!("sslrootcert {path}: no PEM certificate in it")).into());
                }
            }
            RootCerts::Default | RootCerts::System => {
                // Unreadable entries are skipped; what matters is whether any CA is left.
                let (added, _) = store.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
                if added == 0 {
                    store.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
                }
            }
        }
        Ok(store)
    }
}

enum Check {
    Nothing,
    Chain,
    Full,
}

/// Makes the rustls connector for one host; what deadpool and the listener are given.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    mode: SslMode,
}

impl<S> MakeTlsConnect<S> for MakeRustls
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type TlsConnect = RustlsConnect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    fn make_tls_connect(&mut self, host: &str) -> Result<RustlsConnect, Self::Error> {
        Ok(RustlsConnect {
            config: self.config.clone(),
            host: ServerName::try_from(host)?.to_owned(),
            mode: self.mode,
        })
    }
}

pub struct RustlsConnect {
    config: Arc<ClientConfig>,
    host: ServerName<'static>,
    mode: SslMode,
}

/// A failed handshake, with the mode that asked for it: "certificate not trusted" reads
/// differently under verify-full than under require with an `sslrootcert`.
#[derive(Debug, thiserror::Error)]
#[error("sslmode={mode}: {cause}")]
pub struct HandshakeError {
    mode: SslMode,
    cause: io::Error,
}

impl<S> TlsConnect<S> for RustlsConnect
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    type Stream = RustlsStream<S>;
    type Error = HandshakeError;
    type Future = BoxFuture<'static, Result<RustlsStream<S>, HandshakeError>>;

    fn connect(self, stream: S) -> Self::Future {
        let connector = tokio_rustls::TlsConnector::from(self.config);
        let mode = self.mode;
        Box::pin(async move {
            match connector.connect(self.host, stream).await {
                Ok(stream) => Ok(RustlsStream(stream)),
                Err(cause) => Err(HandshakeError { mode, cause }),
            }
        })
    }
}

/// The encrypted connection.
pub struct RustlsStream<S>(tokio_rustls::client::TlsStream<S>);

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for RustlsStream<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for RustlsStream<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> tokio_postgres::tls::TlsStream for RustlsStream<S> {
    /// None offered, so SCRAM authenticates without channel binding (tokio-postgres's default
    /// `channel_binding=prefer`). tls-server-end-point needs the hash of the certificate's own
    /// signature algorithm, which would take an X.509 parser; `channel_binding=require` fails.
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The certificate checks that do not look at the name in the certificate.
/// - `roots: None` (`prefer`/`require` without a root certificate): encryption against passive
///   eavesdroppers, no proof of whom we talk to (libpq's behaviour, and why verify-full exists).
/// - `roots: Some` (verify-ca): the chain must lead to a trusted CA; the name is not looked at
///   (servers reached by an address their certificate does not name).
///
/// The handshake signature is checked either way, so the peer at least holds the key of the
/// certificate it shows.
#[derive(Debug)]
struct NoNameCheck {
    roots: Option<Arc<RootCertStore>>,
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for NoNameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if let Some(roots) = &self.roots {
            let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
            rustls::client::verify_server_cert_signed_by_trust_anchor(
                &cert,
                roots,
                intermediates,
                now,
                self.algorithms.all,
            )?;
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(url: &str) -> TlsParams {
        parse_url(url).unwrap().1
    }

    #[test]
    fn tls_params_are_taken_out_and_the_rest_passed_on() {
        let (config, tls) = parse_url(
            "postgres://u:p@db:5433/x?sslmode=verify-full&application_name=a%20b&sslrootcert=%2Fetc%2Fca.pem",
        )
        .unwrap();
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.roots, RootCerts::File("/etc/ca.pem".into()));
        assert_eq!(config.get_application_name(), Some("a b"));
        assert_eq!(config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert_eq!(config.get_ports(), [5433]);
    }

    #[test]
    fn modes_map_to_the_wire_as_libpq() {
        use tokio_postgres::config::SslMode as Wire;
        for (given, wire) in [
            ("", Wire::Prefer),
            ("?sslmode=disable", Wire::Disable),
            ("?sslmode=allow", Wire::Prefer),
            ("?sslmode=prefer", Wire::Prefer),
            ("?sslmode=require", Wire::Require),
            ("?sslmode=verify-ca", Wire::Require),
        ] {
            let (config, _) = parse_url(&format!("postgresql://localhost/db{given}")).unwrap();
            assert_eq!(config.get_ssl_mode(), wire, "{given}");
        }
        assert_eq!(params("postgres://h/db").mode, SslMode::Prefer, "libpq's default");
        assert_eq!(
            params("postgres://h/db?sslmode=require&sslmode=disable").mode,
            SslMode::Disable,
            "the last one counts"
        );
    }

    #[test]
    fn what_is_checked_follows_libpq() {
        let check = |url: &str| params(url).check();
        assert!(matches!(check("postgres://h/db?sslmode=require"), Check::Nothing));
        assert!(matches!(
            check("postgres://h/db?sslmode=require&sslrootcert=ca.pem"),
            Check::Chain
        ));
        assert!(matches!(check("postgres://h/db?sslmode=verify-ca"), Check::Chain));
        assert!(matches!(check("postgres://h/db?sslmode=verify-full"), Check::Full));
        assert!(matches!(check("postgres://h/db?sslrootcert=system"), Check::Full));
    }

    #[test]
    fn bad_tls_params_are_refused_with_the_reason() {
        let reason = |url: &str| parse_url(url).unwrap_err().to_string();
        assert!(reason("postgres://u:secret@h/db?sslmode=verify").contains("unknown sslmode `verify`"));
        assert!(reason("postgres://h/db?sslmode=require&sslrootcert=system").contains("needs sslmode=verify-full"));
        assert!(reason("postgres://h/db?sslrootcert=").contains("sslrootcert is empty"));
        assert!(reason("postgres://h/db?sslcert=client.pem").contains("sslcert"));
        assert!(
            !reason("postgres://u:secret@h/db?sslmode=nope").contains("secret"),
            "the password stays out of messages"
        );
    }

    #[test]
    fn an_unreadable_or_empty_root_file_is_named() {
        let err = params("postgres://h/db?sslmode=verify-ca&sslrootcert=/nonexistent/ca.pem")
            .connector()
            .err()
            .unwrap();
        assert!(
            matches!(&err, StoreError::Invalid(m) if m.contains("sslrootcert /nonexistent/ca.pem")),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = params(&format!(
            "postgres://h/db?sslmode=verify-full&sslrootcert={}",
            empty.display()
        ))
        .connector()
        .err()
        .unwrap();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");
    }

    #[test]
    fn connectors_build_for_every_mode_without_a_root_file() {
        for mode in ["disable", "allow", "prefer", "require", "verify-ca", "verify-full"] {
            params(&format!("postgres://h/db?sslmode={mode}")).connector().unwrap();
        }
    }
}
