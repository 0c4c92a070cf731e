//! Signed desired state on the agent (protocol v2): the coordinator's
//! director keys this host accepts (`director.json`, from enrollment or
//! asked once over the verified channel), the newest document it accepted
//! (`desired.json`, so no restart can be talked into an older one), and the
//! check every answer passes before the link acts on it
//! ([`turnout_proto::desired::accept`]).

use turnout_proto::desired::{
    Accepted, DesiredRefusal, Director, Handover, SignedDesired, accept, apply_handovers,
    director_keys, retire_predecessors,
};
use turnout_proto::keys::PublicKey;
use turnout_proto::{Limits, ProtoRange, ProtoVersion, Reader};

use super::*;

const DIRECTOR_FILE: &str = "director.json";
const ACCEPTED_FILE: &str = "desired.json";

/// How far the kept expiry may lag behind the one in memory before it is
/// written again: a restart then thinks the host stale at most this early.
const EXPIRY_WRITE_LAG_MS: u64 = 60_000;

/// `director.json`: the director keys this host accepts, and which key
/// handed each over.
#[derive(Serialize, Deserialize, Default)]
struct DirectorFile {
    keys: Vec<Director>,
}

/// The director keys kept in `state_dir` (none before protocol v2).
pub(super) fn load_directors(state_dir: &Path) -> Result<Vec<Director>, LinkError> {
    let path = state_dir.join(DIRECTOR_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(LinkError::Io {
                what: format!("reading {}", path.display()),
                source,
            });
        }
    };
    let invalid = |detail: String| LinkError::Io {
        what: format!(
            "reading {} (the coordinator's director keys; enroll the host again to renew it)",
            path.display()
        ),
        source: std::io::Error::other(detail),
    };
    let file: DirectorFile = serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    for director in &file.keys {
        PublicKey::from_pem(&director.key).map_err(|e| invalid(e.to_string()))?;
    }
    Ok(file.keys)
}

/// Keeps `keys` as the director keys this host accepts (none: removes the file).
pub(super) fn save_directors(state_dir: &Path, keys: &[Director]) -> std::io::Result<()> {
    let path = state_dir.join(DIRECTOR_FILE);
    if keys.is_empty() {
        return match std::fs::remove_file(&path) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        };
    }
    let file = DirectorFile {
        keys: keys.to_vec(),
    };
    turnout_rt::files::write_atomic(
        &path,
        &serde_json::to_vec_pretty(&file).expect("serialises"),
        0o644,
    )
}

/// The newest desired state this host accepted, if any (an unreadable
/// file is no record: the coordinator's next answer makes a new one, and
/// a replay still needs the director's signature on a fresh document).
pub(super) fn load_accepted(state_dir: &Path) -> Result<Option<Accepted>, String> {
    let path = state_dir.join(ACCEPTED_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(damaged_record(&path, &err.to_string())),
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|err| damaged_record(&path, &err.to_string()))
}

/// Why a host with a damaged `desired.json` takes no desired state: it
/// fails closed, since without the record an older document would pass.
fn damaged_record(path: &Path, err: &str) -> String {
    format!(
        "{} is damaged ({err}): without it this host could be given an older desired state again, so it takes \
         none; services keep running as they are. Remove the file to accept the coordinator's next signed \
         desired state",
        path.display()
    )
}

/// Why a host with a damaged `director.json` takes no desired state.
pub(super) fn damaged_directors(err: &LinkError) -> String {
    format!(
        "{DIRECTOR_FILE} is damaged: {err}: this host cannot tell its coordinator's desired state from a forgery, so it takes none; services \
         keep running as they are. Enroll the host again (`turnout-agent enroll` with a join line from \
         `turnout token create --enroll`) to trust the coordinator again"
    )
}

/// A body that was not the signed desired state the agreed version calls for.
fn undecodable(err: turnout_proto::DecodeError) -> DesiredRefusal {
    DesiredRefusal::Malformed(err.to_string())
}

/// `GET /v1/agent/director`: the keys the coordinator signs with, and the
/// handovers that lead to them.
#[derive(Deserialize)]
struct DirectorAnswer {
    #[serde(default)]
    keys: Vec<String>,
    #[serde(default)]
    handovers: Vec<Handover>,
}

impl Link {
    /// Checks a v2 desired-state answer and keeps what it proves; the
    /// refusal says why it is not acted on.
    pub(super) fn open_signed(&self, body: &[u8]) -> Result<DesiredState, DesiredRefusal> {
        let reader = Reader {
            limits: Limits::default(),
            accept: ProtoRange::new(ProtoVersion::V2, ProtoVersion::V2).expect("v2..=v2"),
        };
        let signed: SignedDesired = reader.decode(body).map_err(undecodable)?.body;
        let directors = director_keys(&self.directors.lock().expect("not poisoned"));
        let last = self.accepted.lock().expect("not poisoned").clone();
        let (state, keep) = accept(
            &signed,
            &directors,
            &self.identity.host,
            now_ms(),
            last.as_ref(),
            &Limits::default(),
        )?;
        let write = last.as_ref().is_none_or(|last| {
            last.director != keep.director
                || last.index != keep.index
                || keep.expires_ms > last.expires_ms + EXPIRY_WRITE_LAG_MS
        });
        if write {
            // Kept before acting on it: after a crash, the host still
            // refuses anything older.
            let path = self.agent.config().state_dir.join(ACCEPTED_FILE);
            if let Err(err) = turnout_rt::files::write_atomic(
                &path,
                &serde_json::to_vec(&keep).expect("serialises"),
                0o644,
            ) {
                // Not acted on: without the record, a restart could be
                // talked into an older document.
                return Err(DesiredRefusal::Malformed(format!(
                    "cannot keep the accepted index in {}: {err}",
                    path.display()
                )));
            }
        }
        *self.accepted.lock().expect("not poisoned") = Some(keep);
        self.retire_directors(&signed.signature.key_id);
        Ok(state)
    }

    /// The coordinator signs with `signer`: the keys it was handed over
    /// from are dropped (kept on disk first, so they stay dropped).
    fn retire_directors(&self, signer: &turnout_proto::keys::KeyId) {
        let mut directors = self.directors.lock().expect("not poisoned");
        let mut next = directors.clone();
        let dropped = retire_predecessors(&mut next, signer);
        if dropped.is_empty() {
            return;
        }
        if let Err(err) = save_directors(&self.agent.config().state_dir, &next) {
            tracing::warn!(
                "writing {DIRECTOR_FILE}: {err}; the old director keys stay accepted for now"
            );
            return;
        }
        let ids: Vec<String> = dropped.iter().map(ToString::to_string).collect();
        tracing::info!(
            "the coordinator signs with director key {signer} now: dropped the key(s) it replaced ({})",
            ids.join(", ")
        );
        *directors = next;
    }

    /// Asks the coordinator for director-key handovers and takes those a
    /// key this host accepts signed; returns whether any was taken.
    pub(super) async fn learn_handovers(&self) -> bool {
        let Ok(answer) = self.director_answer().await else {
            return false;
        };
        let mut directors = self.directors.lock().expect("not poisoned");
        let mut next = directors.clone();
        let added = apply_handovers(&mut next, &answer.handovers);
        if added.is_empty() {
            return false;
        }
        if let Err(err) = save_directors(&self.agent.config().state_dir, &next) {
            tracing::warn!("writing {DIRECTOR_FILE}: {err}; not taking the new director key");
            return false;
        }
        let ids: Vec<String> = added.iter().map(ToString::to_string).collect();
        tracing::info!(
            "took the coordinator's new director key {} (handed over by a key this host accepts)",
            ids.join(", ")
        );
        *directors = next;
        true
    }

    async fn director_answer(&self) -> Result<DirectorAnswer, LinkError> {
        let (status, body) = self
            .call("GET", "/v1/agent/director".into(), Vec::new())
            .await?;
        (status == 200)
            .then(|| serde_json::from_slice::<DirectorAnswer>(&body).ok())
            .flatten()
            .ok_or_else(|| LinkError::Refused {
                what: "the director key request".into(),
                status,
                message: format!(
                    "no director key in the answer ({}); desired state cannot be verified",
                    error_message(&body)
                ),
            })
    }

    /// Makes sure this host knows its coordinator's director key before it
    /// takes v2 desired state: a host enrolled before protocol v2 asks for
    /// it once, over the connection it already verified against its CA.
    pub(super) async fn ensure_director(&self) -> Result<(), LinkError> {
        if !self.directors.lock().expect("not poisoned").is_empty() {
            return Ok(());
        }
        let answer = self.director_answer().await?;
        let directors: Vec<Director> = answer
            .keys
            .iter()
            .filter_map(|pem| PublicKey::from_pem(pem).ok())
            .map(|key| Director {
                key: key.to_pem(),
                from: None,
            })
            .collect();
        if directors.is_empty() {
            return Err(LinkError::Refused {
                what: "the director key request".into(),
                status: 200,
                message: "no director key in the answer; desired state cannot be verified".into(),
            });
        }
        save_directors(&self.agent.config().state_dir, &directors).map_err(|source| {
            LinkError::Io {
                what: format!("writing {DIRECTOR_FILE}"),
                source,
            }
        })?;
        let ids: Vec<String> = director_keys(&directors)
            .keys()
            .map(ToString::to_string)
            .collect();
        tracing::info!(
            "learned the coordinator's director key {}: desired state must be signed by it",
            ids.join(", ")
        );
        *self.directors.lock().expect("not poisoned") = directors;
        Ok(())
    }

    /// Since when this host has had no valid desired state, if so.
    pub(super) fn stale_since(&self) -> Option<u64> {
        if *self.version.lock().expect("not poisoned") < ProtoVersion::V2 {
            return None;
        }
        self.accepted
            .lock()
            .expect("not poisoned")
            .as_ref()
            .and_then(|a| a.stale_since(now_ms()))
    }
}
