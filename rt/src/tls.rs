//! TLS for the coordinator's clients (agents and the operator CLI): pins of
//! a CA's public key (`sha256:…`, as `kubeadm join` pins), learning the
//! coordinator's CA from a server whose chain matches a pin, and the client
//! settings that trust that CA and nothing else.
//!
//! First contact: the client knows only pins. [`discover`] opens one TLS
//! connection, accepts the server only if a certificate in the chain it
//! presents has a pinned public key *and* the server certificate verifies
//! against that certificate as a root, for the host name in the URL, and
//! returns the pinned CA. Every later connection verifies against the CA
//! (the agent keeps it as `ca.pem`) with ordinary chain and name checks.

use std::fmt;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
pub use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use sha2::{Digest, Sha256};

/// The one cryptographic provider every TLS connection of Turnout uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The sha256 of a certificate's SubjectPublicKeyInfo (the whole DER
/// structure, as `openssl x509 -pubkey | openssl pkey -pubin -outform der |
/// sha256sum` prints it), written `sha256:` and 64 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Pin([u8; 32]);

/// Why TLS material could not be read or trusted.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A pin is not `sha256:` and 64 hex digits.
    #[error("expected a CA pin as sha256: and 64 hex digits, found {0:?}")]
    BadPin(String),
    /// A certificate could not be parsed.
    #[error("not an X.509 certificate: {0}")]
    BadCertificate(String),
    /// A PEM file holds no certificate.
    #[error("expected PEM certificates (-----BEGIN CERTIFICATE-----), found none")]
    NoCertificates,
    /// The URL is not one TLS can be opened to.
    #[error("expected an https:// URL with a host, found {0:?}")]
    NotHttps(String),
    /// The server could not be reached.
    #[error("cannot reach {url}: {detail}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        detail: String,
    },
    /// No certificate of the server's chain has a pinned key.
    #[error(
        "its certificate chain is not the one the pin names: expected a CA key with {}, but the chain {url} \
         presents has {}; if the coordinator's CA changed, get a new join line (`turnout token create --enroll`), \
         otherwise something between here and the coordinator is intercepting TLS",
        list(expected, " or "),
        list(seen, ", ")
    )]
    PinMismatch {
        /// The URL.
        url: String,
        /// The pins the client was given.
        expected: Vec<Pin>,
        /// The pins of the certificates the server presented.
        seen: Vec<Pin>,
    },
    /// The chain has a pinned CA, but the server's certificate does not
    /// verify against it (wrong name, expired, not yet valid, …).
    #[error(
        "{url} has the pinned CA, but its certificate is not valid: {}",
        explain(detail)
    )]
    Invalid {
        /// The URL.
        url: String,
        /// rustls' words.
        detail: String,
    },
}

fn list(pins: &[Pin], separator: &str) -> String {
    if pins.is_empty() {
        return "no certificate".into();
    }
    pins.iter()
        .map(Pin::to_string)
        .collect::<Vec<_>>()
        .join(separator)
}

impl Pin {
    /// The pin of a DER certificate's public key.
    pub fn of_certificate(der: &CertificateDer<'_>) -> Result<Pin, TlsError> {
        let cert = webpki::EndEntityCert::try_from(der)
            .map_err(|e| TlsError::BadCertificate(format!("{e:?}")))?;
        Ok(Pin(
            Sha256::digest(cert.subject_public_key_info().as_ref()).into()
        ))
    }

    /// Parses `sha256:` and 64 hex digits.
    pub fn parse(text: &str) -> Result<Pin, TlsError> {
        let bad = || TlsError::BadPin(text.to_owned());
        let hex = text.trim().strip_prefix("sha256:").ok_or_else(bad)?;
        let bytes = crate::hex::decode(hex).map_err(|_| bad())?;
        Ok(Pin(bytes.try_into().map_err(|_| bad())?))
    }
}

impl fmt::Display for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", crate::hex::encode(self.0))
    }
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl std::str::FromStr for Pin {
    type Err = TlsError;
    fn from_str(text: &str) -> Result<Pin, TlsError> {
        Pin::parse(text)
    }
}

/// The certificates of a PEM file, in order; at least one.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates);
    }
    for cert in &certs {
        Pin::of_certificate(cert)?;
    }
    Ok(certs)
}

/// Certificates as PEM.
pub fn certificates_to_pem(certs: &[CertificateDer<'_>]) -> String {
    use base64::Engine as _;
    let mut out = String::new();
    for cert in certs {
        out.push_str("-----BEGIN CERTIFICATE-----\n");
        let text = base64::engine::general_purpose::STANDARD.encode(cert.as_ref());
        for line in text.as_bytes().chunks(64) {
            out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
            out.push('\n');
        }
        out.push_str("-----END CERTIFICATE-----\n");
    }
    out
}

/// ureq's TLS settings that trust exactly `cas` (with the usual chain,
/// validity and host-name checks), on [`provider`].
pub fn ureq_trusting(cas: &[CertificateDer<'_>]) -> ureq::tls::TlsConfig {
    let roots = cas
        .iter()
        .map(|der| ureq::tls::Certificate::from_der(der.as_ref()).to_owned())
        .collect();
    ureq::tls::TlsConfig::builder()
        .provider(ureq::tls::TlsProvider::Rustls)
        .root_certs(ureq::tls::RootCerts::Specific(Arc::new(roots)))
        .unversioned_rustls_crypto_provider(provider())
        .build()
}

/// Operator words for what rustls or ureq says about a TLS failure, with
/// what to do; text it does not recognise is returned as it is.
pub fn explain(detail: &str) -> String {
    let hint = if detail.contains("UnknownIssuer") || detail.contains("BadSignature") {
        "the certificate is not signed by a CA this client trusts: if the coordinator's CA changed, use its current \
         one (STATE_DIR/tls/ca.pem, or a new join line for a host), otherwise something is intercepting TLS"
    } else if detail.contains("NotValidForName") {
        "the certificate does not name the host in the URL; use a name or address the server certificate carries \
         (`turnout serve --init --san NAME`)"
    } else if detail.contains("NotValidYet") {
        "the certificate is not valid yet: check this machine's clock and the server's"
    } else if detail.contains("Expired") {
        "the certificate has expired: renew it on the coordinator (`turnout serve --init` issues a new one), or check \
         this machine's clock"
    } else if detail.contains("InvalidContentType")
        || detail.contains("CorruptMessage")
        || detail.contains("received corrupt message")
    {
        "the server did not answer with TLS: if it runs with --plaintext, use an http:// URL"
    } else {
        return detail.to_owned();
    };
    format!("{detail}: {hint}")
}

/// A TLS failure found in an error's chain: whether it is about the
/// peer's certificate (so the peer could not be trusted), and operator words
/// for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The peer's certificate was refused (untrusted, expired, wrong name).
    pub certificate: bool,
    /// What happened and what to do.
    pub detail: String,
}

/// The TLS failure in `err` or its sources, if any (ureq hands rustls'
/// errors back inside `std::io::Error`).
pub fn failure(err: &(dyn std::error::Error + 'static)) -> Option<Failure> {
    let mut next = Some(err);
    while let Some(err) = next {
        if let Some(tls) = err.downcast_ref::<rustls::Error>() {
            return Some(Failure {
                certificate: matches!(
                    tls,
                    rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented
                ),
                detail: explain(&format!("{tls:?}: {tls}")),
            });
        }
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(found) = failure(inner)
        {
            return Some(found);
        }
        next = err.source();
    }
    None
}

/// The TLS failure in a ureq error, if any (ureq's errors have no
/// `source()`, so [`failure`] cannot walk into them).
pub fn ureq_failure(err: &ureq::Error) -> Option<Failure> {
    match err {
        ureq::Error::Io(io) => failure(io),
        ureq::Error::Rustls(tls) => failure(tls),
        _ => None,
    }
}

/// What [`PinVerifier`] saw during a handshake.
#[derive(Default)]
struct Seen {
    pins: Vec<Pin>,
    matched: Option<CertificateDer<'static>>,
    invalid: Option<String>,
}

/// Accepts a server if a certificate in its chain has a pinned key and the
/// server's certificate verifies against that certificate, for the name.
#[derive(Debug)]
struct PinVerifier {
    pins: Vec<Pin>,
    provider: Arc<CryptoProvider>,
    seen: Arc<Mutex<Seen>>,
}

impl fmt::Debug for Seen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Seen").field("pins", &self.pins).finish()
    }
}

impl ServerCertVerifier for PinVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let mut seen = self.seen.lock().expect("not poisoned");
        for cert in std::iter::once(end_entity).chain(intermediates) {
            let Ok(pin) = Pin::of_certificate(cert) else {
                continue;
            };
            seen.pins.push(pin);
            if !self.pins.contains(&pin) || seen.matched.is_some() {
                continue;
            }
            let mut roots = RootCertStore::empty();
            if roots.add(cert.clone().into_owned()).is_err() {
                continue;
            }
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                self.provider.clone(),
            )
            .build()
            .map_err(|e| rustls::Error::General(e.to_string()))?;
            match verifier.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            ) {
                Ok(verified) => {
                    seen.matched = Some(cert.clone().into_owned());
                    return Ok(verified);
                }
                Err(err) => seen.invalid = Some(err.to_string()),
            }
        }
        Err(rustls::Error::General("no pinned CA in the chain".into()))
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
            &self.provider.signature_verification_algorithms,
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
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// The host and port of an `https://` URL.
pub fn https_host_port(url: &str) -> Result<(String, u16), TlsError> {
    let bad = || TlsError::NotHttps(url.to_owned());
    let rest = url.strip_prefix("https://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if authority.is_empty() || authority.contains('@') {
        return Err(bad());
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(bad)?;
        let port = match after.strip_prefix(':') {
            Some(p) => p.parse().map_err(|_| bad())?,
            None if after.is_empty() => 443,
            None => return Err(bad()),
        };
        (host.to_owned(), port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, p)) => (host.to_owned(), p.parse().map_err(|_| bad())?),
            None => (authority.to_owned(), 443),
        }
    };
    if host.is_empty() || port == 0 {
        return Err(bad());
    }
    Ok((host, port))
}

/// First contact: connects to `url` (https), accepts the server only if its
/// chain holds a CA with one of `pins` that the server certificate verifies
/// against for the URL's host, and returns that CA's certificate.
pub fn discover(
    url: &str,
    pins: &[Pin],
    timeout: Duration,
) -> Result<CertificateDer<'static>, TlsError> {
    let (host, port) = https_host_port(url)?;
    let connect_error = |detail: String| TlsError::Connect {
        url: url.to_owned(),
        detail,
    };
    let name = ServerName::try_from(host.clone()).map_err(|_| TlsError::NotHttps(url.into()))?;
    let address = (host.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| connect_error(e.to_string()))?
        .next()
        .ok_or_else(|| connect_error("the name has no address".into()))?;
    let mut tcp = TcpStream::connect_timeout(&address, timeout).map_err(|e| {
        connect_error(if e.kind() == std::io::ErrorKind::TimedOut {
            format!("no connection within {timeout:?}")
        } else {
            e.to_string()
        })
    })?;
    tcp.set_read_timeout(Some(timeout))
        .and_then(|()| tcp.set_write_timeout(Some(timeout)))
        .map_err(|e| connect_error(e.to_string()))?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let provider = provider();
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| connect_error(e.to_string()))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(PinVerifier {
            pins: pins.to_vec(),
            provider,
            seen: seen.clone(),
        }))
        .with_no_client_auth();
    let mut tls = rustls::ClientConnection::new(Arc::new(config), name)
        .map_err(|e| connect_error(e.to_string()))?;
    let handshake = loop {
        if !tls.is_handshaking() {
            break Ok(());
        }
        if let Err(err) = tls.complete_io(&mut tcp) {
            break Err(err);
        }
    };
    let seen = std::mem::take(&mut *seen.lock().expect("not poisoned"));
    if let Some(ca) = seen.matched
        && handshake.is_ok()
    {
        // Tell the server we are done; it does not matter if it heard.
        tls.send_close_notify();
        let _ = tls.complete_io(&mut tcp);
        return Ok(ca);
    }
    if let Some(detail) = seen.invalid {
        return Err(TlsError::Invalid {
            url: url.to_owned(),
            detail,
        });
    }
    if !seen.pins.is_empty() {
        return Err(TlsError::PinMismatch {
            url: url.to_owned(),
            expected: pins.to_vec(),
            seen: seen.pins,
        });
    }
    let detail = match handshake {
        Err(err)
            if matches!(
                err.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            format!(
                "no TLS answer within {timeout:?}: is this the coordinator's address and port, and is it running?"
            )
        }
        Err(err) => err.to_string(),
        Ok(()) => "the handshake ended without a certificate".into(),
    };
    Err(connect_error(explain(&detail)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_round_trip_and_bad_ones_are_named() {
        let pin = Pin([0xab; 32]);
        let text = pin.to_string();
        assert_eq!(text, format!("sha256:{}", "ab".repeat(32)));
        assert_eq!(Pin::parse(&text).unwrap(), pin);
        for bad in [
            "",
            "sha256:",
            "md5:abab",
            &format!("sha256:{}", "ab".repeat(31)),
            &format!("sha256:{}", "zz".repeat(32)),
        ] {
            let err = Pin::parse(bad).unwrap_err();
            assert!(
                matches!(err, TlsError::BadPin(ref t) if t == bad),
                "{bad:?}: {err}"
            );
            assert!(err.to_string().contains("sha256: and 64 hex digits"));
        }
    }

    #[test]
    fn https_urls_give_host_and_port_and_others_are_refused() {
        assert_eq!(
            https_host_port("https://10.0.0.5:7400").unwrap(),
            ("10.0.0.5".into(), 7400)
        );
        assert_eq!(
            https_host_port("https://coord.example/").unwrap(),
            ("coord.example".into(), 443)
        );
        assert_eq!(
            https_host_port("https://[::1]:7400/x").unwrap(),
            ("::1".into(), 7400)
        );
        for bad in [
            "http://10.0.0.5:7400",
            "https://",
            "https://:7400",
            "https://a:0",
            "https://u@h:1",
            "https://h:x",
        ] {
            assert!(
                matches!(https_host_port(bad), Err(TlsError::NotHttps(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        assert!(matches!(
            certificates_from_pem(b"hello"),
            Err(TlsError::NoCertificates)
        ));
    }

    #[test]
    fn a_server_that_never_answers_the_handshake_is_named_as_such() {
        // Accepts the connection (the kernel does, from the backlog) and
        // says nothing: discovery gives up after its timeout and says why,
        // not "os error 11".
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("https://{}", listener.local_addr().unwrap());
        let pin = Pin([1; 32]);
        let err = discover(&url, &[pin], Duration::from_millis(300)).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("no TLS answer within 300ms"), "{text}");
        assert!(!text.contains("os error"), "{text}");
        drop(listener);
    }
}
