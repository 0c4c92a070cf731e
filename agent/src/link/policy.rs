//! The release policy on the agent: floors and revocations signed by the
//! release keys, fetched from the coordinator (after each hello, every few
//! minutes, and whenever a desired state names a newer version), accepted
//! only with the trust file's threshold of signatures and a higher version,
//! kept in `STATE_DIR/policy.json`, and applied before every install and
//! every rollback the coordinator orders: a release below the floor or
//! revoked is rejected, with the rule and the policy version, and the
//! service is not touched.

use turnout_proto::policy::{Policy, PolicyFile, accept};

use super::*;

/// Where the accepted policy is kept.
const POLICY_FILE: &str = "policy.json";

/// The policy kept in `state_dir`, if any.
pub(super) fn load_policy(state_dir: &Path) -> Result<Option<Policy>, String> {
    let path = state_dir.join(POLICY_FILE);
    let bytes = match std::fs::read(&path) {
        Ok(bytes) => bytes,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(err) => return Err(damaged(&path, &err.to_string())),
    };
    PolicyFile::parse(&bytes, &turnout_proto::Limits::default())
        .map(|file| Some(file.policy))
        .map_err(|err| damaged(&path, &err.to_string()))
}

/// Why a host with a damaged `policy.json` starts no install or rollback:
/// the floors it held are unknown, and an older policy must not pass.
fn damaged(path: &Path, err: &str) -> String {
    format!(
        "{} is damaged ({err}): the floors and revocations it held are unknown, so installs and rollbacks wait; \
         remove the file to take the coordinator's current policy (signed by the release keys)",
        path.display()
    )
}

/// Why a release may not be installed or rolled back to under `policy`.
pub(super) enum PolicyVerdict {
    /// Allowed.
    Allowed,
    /// Below the floor or revoked: a verdict on the release.
    Rejected(String),
    /// The policy is stale: no new install until a fresh one arrives.
    Stale(String),
}

impl Link {
    /// Asks the coordinator for its release policy and takes it if the
    /// release keys signed it and it is newer; failures to ask only log.
    pub(super) async fn refresh_policy(&self) {
        {
            let mut damaged = self.policy_damaged.lock().expect("not poisoned");
            if damaged.is_some() {
                // Fails closed until the file reads again (or is removed).
                match load_policy(&self.agent.config().state_dir) {
                    Ok(held) => {
                        tracing::info!("{POLICY_FILE} reads again");
                        *self.policy.lock().expect("not poisoned") = held;
                        *damaged = None;
                    }
                    Err(_) => return,
                }
            }
        }
        let (status, body) = match self
            .call("GET", "/v1/agent/policy".into(), Vec::new())
            .await
        {
            Ok(answer) => answer,
            Err(err) => {
                tracing::debug!("asking for the release policy: {err}");
                return;
            }
        };
        if status != 200 {
            return; // a coordinator before protocol v2
        }
        #[derive(Deserialize)]
        struct Answer {
            policy: Option<String>,
        }
        let Some(text) = serde_json::from_slice::<Answer>(&body)
            .ok()
            .and_then(|a| a.policy)
        else {
            return;
        };
        let verdict = PolicyFile::parse(text.as_bytes(), &turnout_proto::Limits::default())
            .map_err(|e| e.to_string())
            .and_then(|file| {
                let trust = crate::service::current_trust(self.agent.config())
                    .map_err(|e| e.to_string())?;
                let held = self.policy.lock().expect("not poisoned").clone();
                accept(&trust.trust, held.as_ref(), &file).map_err(|e| e.to_string())?;
                Ok((file, held))
            });
        match verdict {
            Ok((file, held)) => {
                *self.policy_refused.lock().expect("not poisoned") = None;
                if held
                    .as_ref()
                    .is_some_and(|h| h.version >= file.policy.version)
                {
                    return;
                }
                let path = self.agent.config().state_dir.join(POLICY_FILE);
                if let Err(err) = turnout_rt::files::write_atomic(&path, &file.to_bytes(), 0o644) {
                    tracing::warn!("writing {}: {err}; keeping the policy held", path.display());
                    return;
                }
                tracing::info!(
                    "release policy v{} in force (signed by the release keys): {}",
                    file.policy.version,
                    file.policy.rules_text()
                );
                *self.policy.lock().expect("not poisoned") = Some(file.policy);
            }
            Err(why) => {
                let text = format!(
                    "refused the release policy the coordinator offers: {why}; the policy held stays"
                );
                let mut refused = self.policy_refused.lock().expect("not poisoned");
                if refused.as_ref() != Some(&text) {
                    tracing::error!("{text}");
                }
                *refused = Some(text);
            }
        }
    }

    /// What the policy held says of `release` for `service`; `install`:
    /// whether this is a new install (a stale policy blocks those, never a
    /// rollback within the rules).
    pub(super) fn policy_verdict(
        &self,
        service: &str,
        release: &ReleaseRef,
        install: bool,
    ) -> PolicyVerdict {
        if let Some(why) = self.policy_damaged.lock().expect("not poisoned").as_ref() {
            return PolicyVerdict::Stale(why.clone());
        }
        let policy = self.policy.lock().expect("not poisoned");
        let Some(policy) = policy.as_ref() else {
            return PolicyVerdict::Allowed;
        };
        if let Err(rule) = policy.check(service, release) {
            return PolicyVerdict::Rejected(rule);
        }
        if install && policy.expired(std::time::SystemTime::now()) {
            return PolicyVerdict::Stale(format!(
                "release policy v{} expired at {}: installs wait for a fresh policy signed by the release keys \
                 (`turnout policy set`)",
                policy.version, policy.expires
            ));
        }
        PolicyVerdict::Allowed
    }

    /// The version of the policy held, for reports.
    pub(super) fn policy_version(&self) -> Option<u64> {
        self.policy
            .lock()
            .expect("not poisoned")
            .as_ref()
            .map(|p| p.version)
    }

    /// Fetches the policy when a desired state names a newer version.
    pub(super) async fn follow_policy(&self, named: Option<u64>) {
        if named.is_some_and(|v| self.policy_version().is_none_or(|held| held < v)) {
            self.refresh_policy().await;
        }
    }
}
