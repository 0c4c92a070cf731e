//! Release-trust rotations delivered by the coordinator: after each hello
//! and every few minutes the link asks for the rotations the coordinator
//! holds (`GET /v1/agent/trust`), applies the newer ones in version order
//! only if each passes the rotation rules from the one before (higher
//! version, the current threshold of current keys, its own threshold of its
//! own keys), and keeps the result in `STATE_DIR/trust.json`. A refused
//! rotation is logged and reported; the trust stays where it was.

use turnout_proto::trust::{TrustFile, apply_rotations};

use super::*;

/// The most rotations read from one answer (the newest are what matter,
/// and the coordinator serves them oldest first).
const MAX_ROTATIONS: usize = 64;

impl Link {
    /// Asks for and applies trust rotations; failures to ask only log.
    pub(super) async fn refresh_trust(&self) {
        let (status, body) = match self.call("GET", "/v1/agent/trust".into(), Vec::new()).await {
            Ok(answer) => answer,
            Err(err) => {
                tracing::debug!("asking for trust rotations: {err}");
                return;
            }
        };
        if status != 200 {
            // A coordinator before protocol v2 has no such route.
            return;
        }
        #[derive(Deserialize)]
        struct Answer {
            #[serde(default)]
            files: Vec<String>,
        }
        let Ok(answer) = serde_json::from_slice::<Answer>(&body) else {
            tracing::warn!(
                "the coordinator's trust rotations do not read; keeping the trust as it is"
            );
            return;
        };
        let limits = turnout_proto::Limits::default();
        let mut offered = Vec::new();
        for text in answer.files.iter().take(MAX_ROTATIONS) {
            match TrustFile::parse(text.as_bytes(), &limits) {
                Ok(file) => offered.push(file),
                Err(err) => {
                    self.refuse_trust(format!(
                        "a trust rotation the coordinator offers does not read: {err}"
                    ));
                    return;
                }
            }
        }
        let config = self.agent.config();
        let current = match crate::service::current_trust(config) {
            Ok(current) => current,
            Err(err) => {
                tracing::warn!("{err}; not applying trust rotations");
                return;
            }
        };
        let (accepted, refusal) = apply_rotations(&current.trust, &offered);
        if let Some(next) = accepted {
            // Every step from the current trust to the newest accepted one:
            // each is checked again from the one before whenever the trust
            // is read.
            let mut sorted: Vec<&TrustFile> = offered.iter().collect();
            sorted.sort_by_key(|f| f.trust.version());
            let mut steps: Vec<&TrustFile> = Vec::new();
            let mut at = current.trust.clone();
            for file in sorted {
                if file.trust.version() <= at.version()
                    || file.trust.version() > next.trust.version()
                {
                    continue;
                }
                if at.accept_rotation(file).is_err() {
                    break;
                }
                at = file.trust.clone();
                steps.push(file);
            }
            let path = config.state_dir.join(crate::trust_chain::ROTATIONS_DIR);
            match crate::trust_chain::keep(config, &steps) {
                Ok(()) => tracing::info!(
                    "applied the release trust rotation to version {} (from version {}): bundles must now be \
                     signed by {} of its {} key(s)",
                    next.trust.version(),
                    current.trust.version(),
                    next.trust.threshold(),
                    next.trust.keys().len()
                ),
                Err(err) => {
                    tracing::warn!(
                        "writing {}: {err}; the trust stays at version {}",
                        path.display(),
                        current.trust.version()
                    );
                    return;
                }
            }
        }
        match refusal {
            Some(err) => self.refuse_trust(format!(
                "refused the release trust rotation the coordinator offers: {err}; the trust stays at version {}",
                accepted.map_or(current.trust.version(), |t| t.trust.version())
            )),
            None => {
                if self.trust_refused.lock().expect("not poisoned").take().is_some() {
                    tracing::info!("the coordinator no longer offers the refused trust rotation");
                }
            }
        }
    }

    fn refuse_trust(&self, text: String) {
        let mut refused = self.trust_refused.lock().expect("not poisoned");
        if refused.as_ref() != Some(&text) {
            tracing::error!("{text}");
        }
        *refused = Some(text);
    }

    /// The version of the trust this host applies, for reports.
    pub(super) fn trust_version(&self) -> Option<u64> {
        crate::service::current_trust(self.agent.config())
            .ok()
            .map(|t| t.trust.version())
    }
}
