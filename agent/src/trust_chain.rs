//! The release trust a host applies: the operator's trust file (`trust` in
//! the config), then every rotation the coordinator delivered that follows
//! from it, kept one file per version in `STATE_DIR/trust-rotations/` and
//! checked again, signature by signature, each time the trust is read. A
//! file put there by hand, damaged, or not signed as the rotation rules
//! require is skipped (and logged), so the directory can never loosen what
//! the operator's file allows; the agent's `/etc` is read-only to it, which
//! is why the rotations live in the state directory.

use std::path::{Path, PathBuf};

use turnout_proto::Limits;
use turnout_proto::trust::{TrustFile, apply_rotations};

use crate::config::Config;
use crate::service::AgentError;

/// Where accepted rotations are kept, one file per version.
pub const ROTATIONS_DIR: &str = "trust-rotations";

fn read(path: &Path) -> Result<TrustFile, AgentError> {
    let bytes = std::fs::read(path).map_err(|err| AgentError::Trust {
        path: path.to_owned(),
        detail: err.to_string(),
    })?;
    TrustFile::parse(&bytes, &Limits::default()).map_err(|err| AgentError::Trust {
        path: path.to_owned(),
        detail: err.to_string(),
    })
}

/// The rotations kept in `state_dir`, as files.
fn stored(state_dir: &Path) -> Vec<(PathBuf, TrustFile)> {
    let dir = state_dir.join(ROTATIONS_DIR);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        match read(&path) {
            Ok(file) => files.push((path, file)),
            Err(err) => tracing::warn!("skipping a kept trust rotation: {err}"),
        }
    }
    files
}

/// The trust this host applies now (see the module docs).
pub fn current(config: &Config) -> Result<TrustFile, AgentError> {
    let operator = read(&config.trust)?;
    let stored = stored(&config.state_dir);
    let files: Vec<TrustFile> = stored.into_iter().map(|(_, file)| file).collect();
    let (accepted, refusal) = apply_rotations(&operator.trust, &files);
    if let Some(err) = refusal {
        tracing::warn!(
            "a kept trust rotation in {} does not follow from the one before and is not applied: {err}",
            config.state_dir.join(ROTATIONS_DIR).display()
        );
    }
    Ok(accepted.cloned().unwrap_or(operator))
}

/// Keeps `files` (rotations already checked against the current trust) in
/// the state directory, each under its version.
pub fn keep(config: &Config, files: &[&TrustFile]) -> std::io::Result<()> {
    let dir = config.state_dir.join(ROTATIONS_DIR);
    std::fs::create_dir_all(&dir)?;
    for file in files {
        let path = dir.join(format!("{}.json", file.trust.version()));
        turnout_rt::files::write_atomic(&path, &file.to_bytes(), 0o644)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::SystemTime;

    use turnout_proto::keys::SecretKey;
    use turnout_proto::signature::SignatureEntry;
    use turnout_proto::trust::Trust;

    use super::*;

    fn config(dir: &Path) -> Config {
        let text = format!(
            "state_dir = \"{}\"\ntrust = \"{}\"\n",
            dir.join("state").display(),
            dir.join("trust.json").display()
        );
        std::fs::write(dir.join("agent.toml"), text).unwrap();
        Config::load(&dir.join("agent.toml")).unwrap()
    }

    fn trust(version: u64, keys: &[&SecretKey], signers: &[&SecretKey]) -> TrustFile {
        let t = Trust::new(
            version,
            1,
            SystemTime::UNIX_EPOCH,
            keys.iter().map(|k| k.public()).collect(),
        )
        .unwrap();
        let mut file = TrustFile::unsigned(t);
        for key in signers {
            file.signatures.push(SignatureEntry {
                key_id: key.public().id().clone(),
                sig: key.sign(&file.signed_bytes),
            });
        }
        file
    }

    #[test]
    fn kept_rotations_are_checked_again_and_one_put_there_by_hand_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, evil) = (
            SecretKey::from_seed([1; 32]),
            SecretKey::from_seed([2; 32]),
            SecretKey::from_seed([3; 32]),
        );
        std::fs::write(
            dir.path().join("trust.json"),
            trust(1, &[&a], &[]).to_bytes(),
        )
        .unwrap();
        let config = config(dir.path());
        assert_eq!(current(&config).unwrap().trust.version(), 1);
        let v2 = trust(2, &[&b], &[&a, &b]);
        keep(&config, &[&v2]).unwrap();
        assert_eq!(current(&config).unwrap().trust.version(), 2);
        // Unsigned, or signed by a key the trust does not list: skipped.
        let forged = trust(9, &[&evil], &[&evil]);
        std::fs::write(
            config.state_dir.join(ROTATIONS_DIR).join("9.json"),
            forged.to_bytes(),
        )
        .unwrap();
        std::fs::write(
            config.state_dir.join(ROTATIONS_DIR).join("8.json"),
            b"{ damaged",
        )
        .unwrap();
        let now = current(&config).unwrap();
        assert_eq!(now.trust.version(), 2);
        assert!(now.trust.keys().contains_key(b.public().id()));
    }
}
