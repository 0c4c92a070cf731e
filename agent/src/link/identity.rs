//! The host's identity: its ed25519 key (`identity.pem`, mode 0600), its
//! id and its coordinator (`coordinator.json`), made by enrolling.

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
    /// The identity in `state_dir`, if the host enrolled.
    pub fn load(state_dir: &Path) -> Result<Option<Identity>, LinkError> {
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
        Ok(Some(Identity {
            host: enrolled.host,
            key,
            coordinator: enrolled.coordinator,
        }))
    }

    /// Makes the host's key (once) and enrolls it with a token.
    pub fn enroll(
        state_dir: &Path,
        coordinator: &str,
        token: &str,
        host: &HostId,
        labels: &BTreeMap<String, String>,
    ) -> Result<Identity, LinkError> {
        let io = |what: &str| {
            let what = what.to_owned();
            move |source| LinkError::Io { what, source }
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
        let coordinator = coordinator.trim_end_matches('/').to_owned();
        let body = serde_json::json!({"token": token, "host": host, "public_key": key.public().to_pem(), "labels": labels});
        let (status, answer) = http(
            &client(),
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
        let enrolled = serde_json::to_vec_pretty(&Enrolled {
            format: ENROLLED_FORMAT,
            host: host.clone(),
            coordinator: coordinator.clone(),
        })
        .expect("serialises");
        turnout_rt::files::write_atomic(&state_dir.join("coordinator.json"), &enrolled, 0o644)
            .map_err(io("writing coordinator.json"))?;
        Ok(Identity {
            host: host.clone(),
            key,
            coordinator,
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
