//! The coordinator's side of TLS: its own CA and server certificate
//! (`turnout serve --init`, in `STATE_DIR/tls/`, keys mode 0600) or an
//! operator's certificate and key, served through a resolver that picks up
//! new files on SIGHUP or when they change, so a renewed certificate needs
//! no restart. The CA's pins are what join lines carry.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use sha2::Digest as _;
use turnout_rt::tls::Pin;

/// How long a server certificate made by `--init` is valid.
const SERVER_LIFETIME: Duration = Duration::from_secs(397 * 24 * 3600);
/// A server certificate this close to its end is renewed at start.
const RENEW_BEFORE: Duration = Duration::from_secs(30 * 24 * 3600);
/// How long the coordinator's own CA is valid.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// Where the TLS files of a coordinator live.
#[derive(Debug, Clone)]
pub struct Paths {
    /// The CA certificates agents trust (PEM; two during a rotation).
    pub ca: PathBuf,
    /// The CA's private key (made by `--init`; absent for an operator's own certificate).
    pub ca_key: PathBuf,
    /// The server's certificate chain (PEM: the server certificate, then its CA).
    pub cert: PathBuf,
    /// The server's private key.
    pub key: PathBuf,
}

/// A CA rotation under way (`STATE_DIR/tls/rotation.json`): agents trust
/// both CAs until `until_ms`, then the old one is dropped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct Rotation {
    /// The pin of the CA being retired.
    pub old: String,
    /// The pin of the new CA.
    pub new: String,
    /// When the old CA is dropped (ms since the epoch).
    pub until_ms: u64,
}

impl Paths {
    fn dir(&self) -> PathBuf {
        self.ca.parent().map(Path::to_owned).unwrap_or_default()
    }

    fn rotation(&self) -> PathBuf {
        self.dir().join("rotation.json")
    }

    fn names(&self) -> PathBuf {
        self.dir().join("names.json")
    }

    fn cross(&self) -> PathBuf {
        self.dir().join("cross.pem")
    }
}

impl Paths {
    /// The files `--init` makes in `state_dir/tls/`.
    pub fn in_state_dir(state_dir: &Path) -> Paths {
        let dir = state_dir.join("tls");
        Paths {
            ca: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            cert: dir.join("server.pem"),
            key: dir.join("server.key"),
        }
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsSetupError {
    /// A file is missing or unreadable.
    #[error("cannot read {path}: {source}; {hint}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
        /// What to do.
        hint: &'static str,
    },
    /// A file does not hold what it should.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Making a key or certificate failed.
    #[error("making the coordinator's TLS certificates: {0}")]
    Make(String),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

const NOT_INITIALISED: &str = "run `turnout serve --init --san NAME` once to make the coordinator's CA and certificate, \
     give your own with --tls-cert and --tls-key, or serve plain HTTP behind a TLS proxy with --plaintext";

fn read(path: &Path, hint: &'static str) -> Result<Vec<u8>, TlsSetupError> {
    std::fs::read(path).map_err(|source| TlsSetupError::Read {
        path: path.to_owned(),
        source,
        hint,
    })
}

fn write(path: &Path, bytes: &[u8], mode: u32) -> Result<(), TlsSetupError> {
    turnout_rt::files::write_atomic(path, bytes, mode).map_err(|source| TlsSetupError::Write {
        path: path.to_owned(),
        source,
    })
}

fn at(time: SystemTime) -> time::OffsetDateTime {
    let secs = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    time::OffsetDateTime::from_unix_timestamp(secs as i64)
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// What `--init` did.
#[derive(Debug, Default)]
pub struct Initialised {
    /// A new CA was made.
    pub new_ca: bool,
    /// A new server certificate was issued (first time, new names, or renewal).
    pub new_cert: bool,
}

/// Makes the CA (once) and a server certificate for `names` (DNS names or
/// IP addresses) when there is none, it lacks one of the names, or it ends
/// within 30 days. Keeps what is there otherwise.
pub fn init(
    paths: &Paths,
    names: &[String],
    now: SystemTime,
) -> Result<Initialised, TlsSetupError> {
    let mut done = Initialised::default();
    if let Some(dir) = paths.ca.parent() {
        std::fs::create_dir_all(dir).map_err(|source| TlsSetupError::Write {
            path: dir.to_owned(),
            source,
        })?;
        use std::os::unix::fs::PermissionsExt;
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700));
    }
    if !paths.ca_key.exists() {
        let (key, _, cert) = new_ca(now)?;
        write(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
        write(&paths.ca, cert.as_bytes(), 0o644)?;
        done.new_ca = true;
    }
    // --san adds names: those of earlier starts stay (hosts may reach the
    // coordinator by any of them).
    let mut all = stored_names(paths);
    for name in names {
        if !all.iter().any(|n| n.eq_ignore_ascii_case(name)) {
            all.push(name.clone());
        }
    }
    let names = &all;
    write(
        &paths.names(),
        &serde_json::to_vec(names).expect("names serialise"),
        0o644,
    )?;
    let needed = done.new_ca || !covers(paths, names, now);
    if needed {
        issue(paths, names, now)?;
        done.new_cert = true;
    }
    Ok(done)
}

/// A new CA: its key and its self-signed certificate, both PEM. Its name
/// carries its key's pin, so two CAs of one coordinator never share a name.
fn new_ca(
    now: SystemTime,
) -> Result<(rcgen::KeyPair, rcgen::CertificateParams, String), TlsSetupError> {
    use rcgen::PublicKeyData as _;
    let key = rcgen::KeyPair::generate().map_err(|e| TlsSetupError::Make(e.to_string()))?;
    let pin = turnout_rt::hex::encode(sha2::Sha256::digest(key.subject_public_key_info()));
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        format!("Turnout coordinator CA {} {}", at(now).date(), &pin[..12]),
    );
    // One intermediate allowed: a rotation serves the next CA cross-signed
    // by this one, which path-length-checking clients (OpenSSL) must accept.
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(1));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = at(now - Duration::from_secs(3600));
    params.not_after = at(now + CA_LIFETIME);
    let cert = params
        .self_signed(&key)
        .map_err(|e| TlsSetupError::Make(e.to_string()))?;
    Ok((key, params, cert.pem()))
}

/// Starts a CA rotation: a new CA beside the old one in `ca.pem` (agents
/// fetch it and trust both), its key replacing the old key; the server's
/// certificate is reissued under it at the next start, and the old CA is
/// dropped after `grace`. Returns the rotation.
pub fn rotate(paths: &Paths, grace: Duration, now: SystemTime) -> Result<Rotation, TlsSetupError> {
    if let Some(rotation) = rotation(paths)? {
        return Err(TlsSetupError::Invalid {
            path: paths.rotation(),
            detail: format!(
                "a rotation from {} to {} is under way until {}; rotate again after it ends",
                rotation.old,
                rotation.new,
                crate::cmd::remote::when(rotation.until_ms)
            ),
        });
    }
    let old = read_certs(&paths.ca)?;
    let old_pin = Pin::of_certificate(old.last().expect("at least one")).map_err(|e| {
        TlsSetupError::Invalid {
            path: paths.ca.clone(),
            detail: e.to_string(),
        }
    })?;
    let old_key = rcgen::KeyPair::from_pem(&String::from_utf8_lossy(&read(
        &paths.ca_key,
        NOT_INITIALISED,
    )?))
    .map_err(|e| TlsSetupError::Invalid {
        path: paths.ca_key.clone(),
        detail: format!("expected the CA's private key (PEM): {e}"),
    })?;
    let old_issuer = rcgen::Issuer::from_ca_cert_der(old.last().expect("at least one"), old_key)
        .map_err(|e| TlsSetupError::Make(e.to_string()))?;
    let (key, params, cert) = new_ca(now)?;
    // The new CA signed by the old one: served after the server's
    // certificate during the rotation, it lets a host that still trusts
    // only the old CA verify a certificate from the new one.
    let cross = params
        .signed_by(&key, &old_issuer)
        .map_err(|e| TlsSetupError::Make(e.to_string()))?;
    let new = turnout_rt::tls::certificates_from_pem(cert.as_bytes()).expect("made just now");
    let new_pin = Pin::of_certificate(&new[0]).expect("made just now");
    let rotation = Rotation {
        old: old_pin.to_string(),
        new: new_pin.to_string(),
        until_ms: ms(now + grace),
    };
    // Trust first, then the key: a crash in between leaves both CAs trusted
    // and the old key, which the next rotate replaces.
    write(
        &paths.ca,
        turnout_rt::tls::certificates_to_pem(&[old.as_slice(), new.as_slice()].concat()).as_bytes(),
        0o644,
    )?;
    write(&paths.cross(), cross.pem().as_bytes(), 0o644)?;
    write(
        &paths.rotation(),
        &serde_json::to_vec_pretty(&rotation).expect("serialises"),
        0o644,
    )?;
    write(&paths.ca_key, key.serialize_pem().as_bytes(), 0o600)?;
    issue(paths, &names(paths), now)?;
    Ok(rotation)
}

/// The names earlier `--init`s were given (none the first time).
fn stored_names(paths: &Paths) -> Vec<String> {
    std::fs::read(paths.names())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

/// The names `--init` was given for the server certificate.
fn names(paths: &Paths) -> Vec<String> {
    std::fs::read(paths.names())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| vec!["localhost".into(), "127.0.0.1".into()])
}

fn ms(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as u64
}

/// The rotation under way, if any.
pub fn rotation(paths: &Paths) -> Result<Option<Rotation>, TlsSetupError> {
    match std::fs::read(paths.rotation()) {
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(TlsSetupError::Read {
            path: paths.rotation(),
            source,
            hint: "",
        }),
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| TlsSetupError::Invalid {
                path: paths.rotation(),
                detail: e.to_string(),
            }),
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsSetupError> {
    turnout_rt::tls::certificates_from_pem(&read(path, NOT_INITIALISED)?).map_err(|e| {
        TlsSetupError::Invalid {
            path: path.to_owned(),
            detail: e.to_string(),
        }
    })
}

/// What the coordinator's own CA needs at a start (or a periodic check):
/// a rotation past its grace drops the old CA; a server certificate not
/// from the newest CA, near its end, or missing is issued again for the
/// names `--init` was given. Returns whether the certificate files changed.
pub fn maintain(paths: &Paths, now: SystemTime) -> Result<bool, TlsSetupError> {
    if !paths.ca_key.exists() {
        return Ok(false);
    }
    if let Some(rotation) = rotation(paths)?
        && rotation.until_ms <= ms(now)
    {
        let kept: Vec<CertificateDer<'static>> = read_certs(&paths.ca)?
            .into_iter()
            .filter(|c| Pin::of_certificate(c).is_ok_and(|p| p.to_string() != rotation.old))
            .collect();
        if !kept.is_empty() {
            write(
                &paths.ca,
                turnout_rt::tls::certificates_to_pem(&kept).as_bytes(),
                0o644,
            )?;
        }
        let _ = std::fs::remove_file(paths.rotation());
        let _ = std::fs::remove_file(paths.cross());
        tracing::info!(old = %rotation.old, "the CA rotation ended: the old CA is no longer trusted");
        issue(paths, &names(paths), now)?;
        return Ok(true);
    }
    let names = names(paths);
    if covers(paths, &names, now) && issued_by_newest(paths) {
        return Ok(false);
    }
    issue(paths, &names, now)?;
    tracing::info!(names = %names.join(","), "issued the coordinator's TLS certificate under its newest CA");
    Ok(true)
}

/// Whether the server certificate was issued by the last CA in `ca.pem`.
fn issued_by_newest(paths: &Paths) -> bool {
    let (Ok(chain), Ok(cas)) = (read_certs(&paths.cert), read_certs(&paths.ca)) else {
        return false;
    };
    let (Some(leaf), Some(newest)) = (chain.first(), cas.last()) else {
        return false;
    };
    match (
        x509_parser::parse_x509_certificate(leaf),
        x509_parser::parse_x509_certificate(newest),
    ) {
        (Ok((_, leaf)), Ok((_, ca))) => leaf.issuer().as_raw() == ca.subject().as_raw(),
        _ => false,
    }
}

/// Whether the server certificate exists, names all of `names` and has
/// more than 30 days left.
fn covers(paths: &Paths, names: &[String], now: SystemTime) -> bool {
    let Ok(pem) = std::fs::read(&paths.cert) else {
        return false;
    };
    let Some(leaf) = CertificateDer::pem_slice_iter(&pem)
        .next()
        .and_then(Result::ok)
    else {
        return false;
    };
    let Ok((_, parsed)) = x509_parser::parse_x509_certificate(&leaf) else {
        return false;
    };
    if parsed.validity().not_after.timestamp() < at(now + RENEW_BEFORE).unix_timestamp() {
        return false;
    }
    let Ok(cert) = webpki::EndEntityCert::try_from(&leaf) else {
        return false;
    };
    // The check clients make, so a name is covered exactly when they accept it.
    names.iter().all(|name| {
        rustls::pki_types::ServerName::try_from(name.as_str())
            .is_ok_and(|n| cert.verify_is_valid_for_subject_name(&n).is_ok())
    })
}

/// Issues a server certificate for `names` under the CA in `paths`.
fn issue(paths: &Paths, names: &[String], now: SystemTime) -> Result<(), TlsSetupError> {
    let ca_pem = String::from_utf8_lossy(&read(&paths.ca, NOT_INITIALISED)?).into_owned();
    let ca_key_pem = String::from_utf8_lossy(&read(&paths.ca_key, NOT_INITIALISED)?).into_owned();
    let ca_key = rcgen::KeyPair::from_pem(&ca_key_pem).map_err(|e| TlsSetupError::Invalid {
        path: paths.ca_key.clone(),
        detail: format!("expected the CA's private key (PEM): {e}"),
    })?;
    // The newest CA is the last in ca.pem (a rotation appends it).
    let ca_certs = turnout_rt::tls::certificates_from_pem(ca_pem.as_bytes()).map_err(|e| {
        TlsSetupError::Invalid {
            path: paths.ca.clone(),
            detail: e.to_string(),
        }
    })?;
    let ca_cert = ca_certs.last().expect("at least one").clone();
    let issuer = rcgen::Issuer::from_ca_cert_der(&ca_cert, ca_key)
        .map_err(|e| TlsSetupError::Make(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names.to_vec()).map_err(|e| {
        TlsSetupError::Make(format!("{e} (a --san is a DNS name or an IP address)"))
    })?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(
        rcgen::DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "turnout".into()),
    );
    params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = at(now - Duration::from_secs(3600));
    params.not_after = at(now + SERVER_LIFETIME);
    let key = rcgen::KeyPair::generate().map_err(|e| TlsSetupError::Make(e.to_string()))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| TlsSetupError::Make(e.to_string()))?;
    // During a rotation the new CA goes out cross-signed by the old one.
    // The old CA follows it, so a join line that pins the old CA still
    // finds it in the chain.
    let after = match std::fs::read_to_string(paths.cross()) {
        Ok(cross) => format!(
            "{cross}{}",
            turnout_rt::tls::certificates_to_pem(&ca_certs[..ca_certs.len() - 1])
        ),
        Err(_) => turnout_rt::tls::certificates_to_pem(&[ca_cert]),
    };
    let chain = format!("{}{after}", cert.pem());
    write(&paths.key, key.serialize_pem().as_bytes(), 0o600)?;
    write(&paths.cert, chain.as_bytes(), 0o644)?;
    Ok(())
}

/// The pins of the coordinator's own CAs (`ca.pem`), which join lines carry.
pub fn pins(paths: &Paths) -> Result<Vec<Pin>, TlsSetupError> {
    read_certs(&paths.ca)?
        .iter()
        .map(|c| {
            Pin::of_certificate(c).map_err(|e| TlsSetupError::Invalid {
                path: paths.ca.clone(),
                detail: e.to_string(),
            })
        })
        .collect()
}

/// An operator's certificate this close to its end is warned about.
const WARN_BEFORE: Duration = Duration::from_secs(14 * 24 * 3600);

/// Refuses a chain clients would refuse: a server certificate that is not
/// valid at `now`, or one alone whose CA is not in the file (agents keep
/// and pin the CAs that follow the server's certificate). Warns when it
/// ends within [`WARN_BEFORE`].
fn check_chain(
    path: &Path,
    chain: &[CertificateDer<'static>],
    now: SystemTime,
) -> Result<(), TlsSetupError> {
    let invalid = |detail: String| TlsSetupError::Invalid {
        path: path.to_owned(),
        detail,
    };
    let leaf = chain
        .first()
        .expect("certificates_from_pem returns one or more");
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf)
        .map_err(|e| invalid(format!("the first certificate cannot be read: {e}")))?;
    let validity = parsed.validity();
    let now_at = at(now);
    let stamp = |t: &x509_parser::time::ASN1Time| {
        humantime::format_rfc3339_seconds(
            SystemTime::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64),
        )
        .to_string()
    };
    let now_text = humantime::format_rfc3339_seconds(now).to_string();
    if validity.not_before.timestamp() > now_at.unix_timestamp() {
        return Err(invalid(format!(
            "the server certificate is valid only from {} (until {}), and this machine's clock says {now_text}: \
             check the clock, or give a certificate valid now",
            stamp(&validity.not_before),
            stamp(&validity.not_after)
        )));
    }
    if validity.not_after.timestamp() < now_at.unix_timestamp() {
        return Err(invalid(format!(
            "the server certificate expired at {}, and this machine's clock says {now_text}: every agent and \
             operator would refuse it; renew it and give the new one (or check the clock)",
            stamp(&validity.not_after)
        )));
    }
    if chain.len() == 1 && parsed.issuer() != parsed.subject() {
        return Err(invalid(format!(
            "the file holds only the server certificate, issued by \"{}\": agents and operators keep and pin \
             the CA certificates that follow it, so append the certificate of the CA that issued it (PEM) \
             after the server's",
            parsed.issuer()
        )));
    }
    if validity.not_after.timestamp() < at(now + WARN_BEFORE).unix_timestamp() {
        tracing::warn!(
            cert = %path.display(),
            "the server certificate expires at {}: renew it soon (a changed file is served without a restart)",
            stamp(&validity.not_after)
        );
    }
    Ok(())
}

/// Reads a certificate chain and its key into what rustls serves.
fn load(cert: &Path, key: &Path, now: SystemTime) -> Result<Arc<CertifiedKey>, TlsSetupError> {
    let chain =
        turnout_rt::tls::certificates_from_pem(&read(cert, NOT_INITIALISED)?).map_err(|e| {
            TlsSetupError::Invalid {
                path: cert.to_owned(),
                detail: e.to_string(),
            }
        })?;
    check_chain(cert, &chain, now)?;
    let key_der = PrivateKeyDer::from_pem_slice(&read(key, NOT_INITIALISED)?).map_err(|e| {
        TlsSetupError::Invalid {
            path: key.to_owned(),
            detail: format!("expected a private key in PEM (PKCS#8, SEC1 or PKCS#1): {e}"),
        }
    })?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| {
        TlsSetupError::Invalid {
            path: key.to_owned(),
            detail: format!("the key cannot sign TLS handshakes: {e}"),
        }
    })?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|e| TlsSetupError::Invalid {
        path: key.to_owned(),
        detail: format!(
            "the key does not belong to the certificate in {}: {e}",
            cert.display()
        ),
    })?;
    Ok(Arc::new(certified))
}

fn stamp(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The certificate the server presents, replaced when its files change.
#[derive(Debug)]
pub struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Option<SystemTime>, Option<SystemTime>)>,
}

impl Reloading {
    /// Loads `cert` and `key`; fails if they cannot be served (or would be
    /// refused by every client at `now`).
    pub fn open(cert: &Path, key: &Path, now: SystemTime) -> Result<Arc<Reloading>, TlsSetupError> {
        let loaded = load(cert, key, now)?;
        Ok(Arc::new(Reloading {
            cert: cert.to_owned(),
            key: key.to_owned(),
            current: RwLock::new((loaded, stamp(cert), stamp(key))),
        }))
    }

    /// Reads the files again if they changed (or `force`); a pair that
    /// cannot be served is logged and the one in use is kept. Returns
    /// whether a new certificate is now served.
    pub fn reload(&self, force: bool, now: SystemTime) -> bool {
        let stamps = (stamp(&self.cert), stamp(&self.key));
        {
            let current = self.current.read().expect("not poisoned");
            if !force && (current.1, current.2) == stamps {
                return false;
            }
        }
        match load(&self.cert, &self.key, now) {
            Ok(loaded) => {
                *self.current.write().expect("not poisoned") = (loaded, stamps.0, stamps.1);
                tracing::info!(cert = %self.cert.display(), "serving the certificate read again from its file");
                true
            }
            Err(err) => {
                // Remember the stamps: one complaint per change, not one per check.
                let mut current = self.current.write().expect("not poisoned");
                current.1 = stamps.0;
                current.2 = stamps.1;
                tracing::warn!("keeping the certificate in use: {err}");
                false
            }
        }
    }

    /// The CA certificates of the chain served now: those after the
    /// server's own, or the server's when it is alone (self-signed).
    pub fn cas(&self) -> Vec<CertificateDer<'static>> {
        let current = self.current.read().expect("not poisoned");
        let chain = &current.0.cert;
        if chain.len() > 1 {
            chain[1..].to_vec()
        } else {
            chain.clone()
        }
    }

    /// Reloads on SIGHUP and when the files change (checked every 10 s), until the task is dropped.
    pub async fn watch(self: Arc<Self>) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            return;
        };
        let mut tick = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                _ = hup.recv() => { self.reload(true, SystemTime::now()); }
                _ = tick.tick() => { self.reload(false, SystemTime::now()); }
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("not poisoned").0.clone())
    }
}

/// The TLS acceptor serving `resolver`'s certificate (TLS 1.2 and 1.3, HTTP/1.1).
pub fn acceptor(resolver: Arc<Reloading>) -> tokio_rustls::TlsAcceptor {
    let mut config = rustls::ServerConfig::builder_with_provider(turnout_rt::tls::provider())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default versions")
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_makes_a_ca_and_a_certificate_once_and_reissues_for_new_names() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_state_dir(dir.path());
        let now = SystemTime::now();
        let first = init(&paths, &["127.0.0.1".into(), "coord.test".into()], now).unwrap();
        assert!(first.new_ca && first.new_cert);
        use std::os::unix::fs::PermissionsExt;
        for key in [&paths.ca_key, &paths.key] {
            let mode = std::fs::metadata(key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        let pins_before = pins(&paths).unwrap();
        let again = init(&paths, &["coord.test".into()], now).unwrap();
        assert!(!again.new_ca && !again.new_cert, "nothing to do: {again:?}");
        // --san adds: a later init with other names keeps the earlier ones.
        init(&paths, &["other.test".into()], now).unwrap();
        assert!(covers(
            &paths,
            &["127.0.0.1".into(), "coord.test".into(), "other.test".into()],
            now
        ));
        let wider = init(&paths, &["coord.test".into(), "10.1.2.3".into()], now).unwrap();
        assert!(!wider.new_ca && wider.new_cert);
        assert_eq!(
            pins(&paths).unwrap(),
            pins_before,
            "the CA, and so the pin, stays"
        );
        // Near its end, the certificate is renewed at start.
        let later = now + SERVER_LIFETIME - Duration::from_secs(24 * 3600);
        assert!(
            init(&paths, &["coord.test".into()], later)
                .unwrap()
                .new_cert
        );
        Reloading::open(&paths.cert, &paths.key, later).unwrap();
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_and_the_served_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_state_dir(dir.path());
        init(&paths, &["127.0.0.1".into()], SystemTime::now()).unwrap();
        let served = Reloading::open(&paths.cert, &paths.key, SystemTime::now()).unwrap();
        let before = served.current.read().unwrap().0.clone();
        std::fs::copy(&paths.ca_key, &paths.key).unwrap();
        let err = Reloading::open(&paths.cert, &paths.key, SystemTime::now()).unwrap_err();
        assert!(
            err.to_string()
                .contains("does not belong to the certificate"),
            "{err}"
        );
        assert!(!served.reload(true, SystemTime::now()));
        assert!(Arc::ptr_eq(&served.current.read().unwrap().0, &before));
    }

    #[test]
    fn a_missing_certificate_says_how_to_make_one() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_state_dir(dir.path());
        let err = Reloading::open(&paths.cert, &paths.key, SystemTime::now()).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("turnout serve --init") && text.contains("--plaintext"),
            "{text}"
        );
    }

    #[test]
    fn a_certificate_clients_would_refuse_is_not_served_and_the_served_one_kept() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::in_state_dir(dir.path());
        let now = SystemTime::now();
        init(&paths, &["127.0.0.1".into()], now).unwrap();
        let served = Reloading::open(&paths.cert, &paths.key, now).unwrap();
        let before = served.current.read().unwrap().0.clone();

        // After its end (the clock moved on): refused, with both times.
        let after_end = now + SERVER_LIFETIME + Duration::from_secs(24 * 3600);
        let err = Reloading::open(&paths.cert, &paths.key, after_end).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("expired at") && text.contains("renew it"),
            "{text}"
        );
        assert!(!served.reload(true, after_end));
        // Before its start (a clock far behind): refused, says check the clock.
        let before_start = now - Duration::from_secs(30 * 24 * 3600);
        let err = Reloading::open(&paths.cert, &paths.key, before_start).unwrap_err();
        assert!(err.to_string().contains("valid only from"), "{err}");
        assert!(err.to_string().contains("check the clock"), "{err}");

        // The server's certificate without its CA: refused, says what to append.
        let chain =
            turnout_rt::tls::certificates_from_pem(&std::fs::read(&paths.cert).unwrap()).unwrap();
        std::fs::write(
            &paths.cert,
            turnout_rt::tls::certificates_to_pem(&chain[..1]),
        )
        .unwrap();
        let err = Reloading::open(&paths.cert, &paths.key, now).unwrap_err();
        assert!(
            err.to_string().contains("append the certificate of the CA"),
            "{err}"
        );
        assert!(!served.reload(true, now));
        assert!(Arc::ptr_eq(&served.current.read().unwrap().0, &before));
    }
}
