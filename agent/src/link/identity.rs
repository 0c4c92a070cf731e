//! The host's identity: its ed25519 key (`identity.pem`, mode 0600), its
//! id and its coordinator (`coordinator.json`), and the CA the coordinator's
//! certificate must chain to (`ca.pem`), made by enrolling.
//!
//! Enrolling with an https coordinator needs a pin of its CA (the join line
//! carries one) or the CA's certificate: the first contact accepts the
//! server only if its chain matches, and every later connection is checked
//! against the CA kept in `ca.pem`, with host-name checks.

use super::*;

/// The host's identity: its key, its id, and its coordinator.
#[derive(Debug)]
pub struct Identity {
    /// The host's id in the fleet.
    pub host: HostId,
    /// Its ed25519 key (`STATE_DIR/identity.pem`, mode 0600).
    pub key: SecretKey,
    /// The coordinator's base URL.
    pub coordinator: String,
    /// The CA certificates its certificate must chain to (`ca.pem`; none for http).
    pub ca: Vec<CertificateDer<'static>>,
    /// The enrollment's files as they were read: a link notices another
    /// enrollment by this changing (see [`Identity::files`]).
    pub files: [u8; 32],
}

/// How an enrolling host learns to trust an https coordinator.
#[derive(Debug, Clone, Default)]
pub struct EnrollTrust {
    /// Pins of the coordinator's CA (`sha256:…`, from the join line).
    pub pins: Vec<turnout_rt::tls::Pin>,
    /// Or the CA certificates themselves (PEM).
    pub ca_pem: Option<Vec<u8>>,
}

const CA_FILE: &str = "ca.pem";

fn read_ca(state_dir: &Path, coordinator: &str) -> Result<Vec<CertificateDer<'static>>, LinkError> {
    if !coordinator.starts_with("https://") {
        return Ok(Vec::new());
    }
    let path = state_dir.join(CA_FILE);
    let pem = std::fs::read(&path).map_err(|source| LinkError::Io {
        what: format!(
            "reading {} (the CA of the https coordinator this host enrolled with; enroll again with the join line \
             from `turnout token create --enroll` to get it)",
            path.display()
        ),
        source,
    })?;
    turnout_rt::tls::certificates_from_pem(&pem).map_err(|e| LinkError::Io {
        what: format!("reading {}", path.display()),
        source: std::io::Error::other(e),
    })
}

/// The format of `coordinator.json` this build writes (files without the
/// field are format 1).
const ENROLLED_FORMAT: u32 = 1;

fn format_one() -> u32 {
    1
}

/// `coordinator.json`: which coordinator this host enrolled with, as whom.
#[derive(Serialize, Deserialize)]
struct Enrolled {
    #[serde(default = "format_one")]
    format: u32,
    host: HostId,
    coordinator: String,
}

impl Identity {
    /// A digest of the enrollment's files in `state_dir` (coordinator.json,
    /// identity.pem, ca.pem; a missing one counts as empty): it changes
    /// when the host enrolls again, so a running agent follows the new
    /// enrollment without a restart.
    pub fn files(state_dir: &Path) -> [u8; 32] {
        use sha2::Digest as _;
        let mut digest = sha2::Sha256::new();
        for name in ["coordinator.json", "identity.pem", CA_FILE] {
            let bytes = std::fs::read(state_dir.join(name)).unwrap_or_default();
            digest.update((bytes.len() as u64).to_le_bytes());
            digest.update(&bytes);
        }
        digest.finalize().into()
    }

    /// The identity in `state_dir`, if the host enrolled.
    pub fn load(state_dir: &Path) -> Result<Option<Identity>, LinkError> {
        // Before the files are read: a change while they are is seen later.
        let files = Identity::files(state_dir);
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| LinkError::Io { what, source }
        };
        let Ok(enrolled) = std::fs::read(state_dir.join("coordinator.json")) else {
            return Ok(None);
        };
        let enrolled: Enrolled = serde_json::from_slice(&enrolled).map_err(|e| LinkError::Io {
            what: "reading coordinator.json".into(),
            source: std::io::Error::other(e),
        })?;
        let pem = std::fs::read_to_string(state_dir.join("identity.pem"))
            .map_err(io("reading identity.pem"))?;
        let key = SecretKey::from_pem(&pem).map_err(|e| LinkError::Io {
            what: "reading identity.pem".into(),
            source: std::io::Error::other(e),
        })?;
        let ca = read_ca(state_dir, &enrolled.coordinator)?;
        Ok(Some(Identity {
            host: enrolled.host,
            key,
            coordinator: enrolled.coordinator,
            ca,
            files,
        }))
    }

    /// Makes the host's key (once) and enrolls it with a token.
    pub fn enroll(
        state_dir: &Path,
        coordinator: &str,
        token: &str,
        host: &HostId,
        labels: &BTreeMap<String, String>,
        trust: &EnrollTrust,
    ) -> Result<Identity, LinkError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| LinkError::Io { what, source }
        };
        let coordinator = coordinator.trim_end_matches('/').to_owned();
        // Trust first: nothing is written, no key made, for a coordinator
        // that cannot be verified.
        if !coordinator.starts_with("https://")
            && (!trust.pins.is_empty() || trust.ca_pem.is_some())
        {
            return Err(LinkError::Untrusted {
                url: coordinator,
                detail: "a CA pin or --ca was given for a plain http:// URL, which TLS never checks: use the coordinator's https:// URL".into(),
            });
        }
        let ca = if !coordinator.starts_with("https://") {
            tracing::warn!(
                "enrolling over plain HTTP ({coordinator}): the token and every desired state cross the network \
                 in clear text; use the coordinator's https:// URL and its CA pin"
            );
            Vec::new()
        } else if let Some(pem) = &trust.ca_pem {
            turnout_rt::tls::certificates_from_pem(pem).map_err(|e| LinkError::Io {
                what: "reading the CA given with --ca".into(),
                source: std::io::Error::other(e),
            })?
        } else if !trust.pins.is_empty() {
            let found =
                turnout_rt::tls::discover(&coordinator, &trust.pins, Duration::from_secs(20))
                    .map_err(|e| match e {
                        turnout_rt::tls::TlsError::Connect { url, detail } => {
                            LinkError::Unreachable { url, detail }
                        }
                        other => LinkError::Untrusted {
                            url: coordinator.clone(),
                            detail: other.to_string(),
                        },
                    })?;
            vec![found]
        } else {
            match read_ca(state_dir, &coordinator) {
                Ok(ca) => ca,
                Err(_) => {
                    return Err(LinkError::Untrusted {
                        url: coordinator.clone(),
                        detail: "an https coordinator needs its CA pin: pass --ca-pin sha256:… (the join line that \
                                 `turnout token create --enroll` prints has it) or --ca FILE"
                            .into(),
                    });
                }
            }
        };
        std::fs::create_dir_all(state_dir).map_err(io("creating the state directory"))?;
        let key_path = state_dir.join("identity.pem");
        let key = match std::fs::read_to_string(&key_path) {
            Ok(pem) => SecretKey::from_pem(&pem).map_err(|e| LinkError::Io {
                what: "reading identity.pem".into(),
                source: std::io::Error::other(e),
            })?,
            Err(_) => {
                let mut seed = [0u8; 32];
                getrandom::fill(&mut seed).map_err(|e| LinkError::Io {
                    what: "the random source".into(),
                    source: std::io::Error::other(e.to_string()),
                })?;
                let key = SecretKey::from_seed(seed);
                write_private(&key_path, key.to_pem().as_bytes())
                    .map_err(io("writing identity.pem"))?;
                key
            }
        };
        let body = serde_json::json!({"token": token, "host": host, "public_key": key.public().to_pem(), "labels": labels});
        let (status, answer) = http(
            &client(&ca),
            &coordinator,
            "POST",
            "/v1/enroll",
            None,
            body.to_string().as_bytes(),
        )?;
        if status != 200 {
            return Err(LinkError::Refused {
                what: "the enrollment".into(),
                status,
                message: error_message(&answer),
            });
        }
        // The director key signs every v2 desired state; it came over the
        // channel just verified against the pin. A coordinator before
        // protocol v2 sends none: this host then takes v1 desired state
        // until that coordinator is upgraded.
        #[derive(Deserialize)]
        struct Answer {
            director_key: Option<String>,
        }
        let director = serde_json::from_slice::<Answer>(&answer)
            .ok()
            .and_then(|a| a.director_key)
            .map(|pem| turnout_proto::keys::PublicKey::from_pem(&pem))
            .transpose()
            .map_err(|e| LinkError::Refused {
                what: "the enrollment".into(),
                status,
                message: format!("the coordinator's director key does not read: {e}"),
            })?;
        let directors: Vec<turnout_proto::desired::Director> = director
            .iter()
            .map(|key| turnout_proto::desired::Director {
                key: key.to_pem(),
                from: None,
            })
            .collect();
        super::signed::save_directors(state_dir, &directors)
            .map_err(io("writing director.json"))?;
        let enrolled = serde_json::to_vec_pretty(&Enrolled {
            format: ENROLLED_FORMAT,
            host: host.clone(),
            coordinator: coordinator.clone(),
        })
        .expect("serialises");
        if !ca.is_empty() {
            turnout_rt::files::write_atomic(
                &state_dir.join(CA_FILE),
                turnout_rt::tls::certificates_to_pem(&ca).as_bytes(),
                0o644,
            )
            .map_err(io("writing ca.pem"))?;
        }
        turnout_rt::files::write_atomic(&state_dir.join("coordinator.json"), &enrolled, 0o644)
            .map_err(io("writing coordinator.json"))?;
        Ok(Identity {
            host: host.clone(),
            key,
            coordinator,
            ca,
            files: Identity::files(state_dir),
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}
