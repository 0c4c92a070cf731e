//! The link's side of the agent's own releases (service `turnout-agent`):
//! decide with the same [`converge::decide`] as every service, download and
//! verify the bundle, unpack it under `agent/releases/`, check that the new
//! agent starts and speaks the protocol agreed with the coordinator, then
//! hand over through [`switch`] once every managed service is idle.

use std::time::Duration;

use serde::Deserialize;
use turnout_proto::messages::{
    DesiredService, Health, Outcome, OutcomeKind, ReleaseRef, ServiceReport, ServiceState,
};

use super::{Converged, Link, LinkError};
use crate::converge;
use crate::service::now_ms;
use crate::slots::{RELEASE_FILE, RELEASE_FILE_FORMAT, SlotRelease};
use crate::upgrade::{
    AgentRelease, HANDOFF_FORMAT, Handoff, Layout, Phase, SELF_SERVICE, config_path, switch,
};

/// What `turnout-agent version --json` prints, as far as the check reads it.
#[derive(Deserialize)]
struct Version {
    software: String,
    range: turnout_proto::ProtoRange,
}

impl Link {
    /// The agent the other link names (`previous`, or the installed binary).
    fn self_other(&self, layout: &Layout, me: &AgentRelease) -> Option<AgentRelease> {
        let previous = layout.previous();
        if me.dir.is_some() || previous.is_some() {
            layout
                .agent_release(previous.as_deref())
                .filter(|o| o.release.sha256 != me.release.sha256)
        } else {
            None
        }
    }

    /// Whether this agent is on probation (its switch not yet confirmed):
    /// then it starts nothing, so that a revert finds the host as the
    /// switch left it.
    pub(super) fn on_probation(&self) -> bool {
        let Some(me) = self.agent.myself() else {
            return false;
        };
        let layout = Layout::new(&self.agent.config().state_dir);
        crate::upgrade::reported(me, layout.handoff().ok().flatten().as_ref()).0
    }

    /// The agent's own entry in reports. On probation it is `baking`, its
    /// committed release still the one it falls back to: a coordinator
    /// judges it once it confirmed itself, never before.
    pub(super) fn self_report(&self) -> Option<ServiceReport> {
        let me = self.agent.myself()?.clone();
        let layout = Layout::new(&self.agent.config().state_dir);
        let last = self.agent.self_history(1).ok()?.into_iter().next();
        let switching = self.switching.lock().expect("not poisoned").clone();
        let handoff = layout.handoff();
        let (probation, committed, target) =
            crate::upgrade::reported(&me, handoff.as_ref().ok().and_then(Option::as_ref));
        let damaged = handoff.err().map(|err| {
            format!(
                "{} does not read ({err}): no agent upgrade is taken until it is removed",
                layout.root().join("handoff.json").display()
            )
        });
        Some(ServiceReport {
            service: SELF_SERVICE.parse().expect("a valid name"),
            state: if switching.is_some() {
                ServiceState::Switching
            } else if probation {
                ServiceState::Baking
            } else {
                ServiceState::Idle
            },
            active_slot: None,
            committed: Some(committed),
            other: self.self_other(&layout, &me).map(|o| o.release),
            target: switching.or(target),
            health: Health::Healthy,
            last_outcome: last.and_then(|o| {
                Some(Outcome {
                    kind: o.kind,
                    release: o.release?,
                    reason: o.reason,
                    at_ms: o.at_ms,
                })
            }),
            last_error: damaged.or_else(|| {
                self.refusals
                    .lock()
                    .expect("not poisoned")
                    .get(SELF_SERVICE)
                    .cloned()
            }),
        })
    }

    fn refuse_self(&self, text: String, record: Option<(OutcomeKind, &ReleaseRef)>) {
        let mut refusals = self.refusals.lock().expect("not poisoned");
        if refusals.get(SELF_SERVICE) == Some(&text) {
            return;
        }
        tracing::warn!(service = SELF_SERVICE, "{text}");
        refusals.insert(SELF_SERVICE.to_owned(), text.clone());
        drop(refusals);
        if let Some((kind, release)) = record {
            let _ = self.agent.record_self(kind, release.clone(), text);
        }
    }

    /// Moves the agent itself toward its desired release.
    pub(super) async fn converge_self(
        &self,
        desired: &DesiredService,
        capabilities: &turnout_proto::CapabilitySet,
    ) -> Result<Converged, LinkError> {
        let Some(me) = self.agent.myself().cloned() else {
            return Ok(Converged::Settled);
        };
        let layout = Layout::new(&self.agent.config().state_dir);
        let want = &desired.release;
        let other = self.self_other(&layout, &me);
        let history = self
            .agent
            .self_history(crate::journal::HISTORY_KEPT as usize)
            .unwrap_or_default();
        let in_flight = match layout.handoff() {
            Ok(h) => h.is_some(),
            Err(err) => {
                self.refuse_self(
                    format!(
                        "{} does not read ({err}); no agent upgrade is taken until it is removed \
                         (`turnout-agent upgrade status` shows what runs)",
                        layout.root().join("handoff.json").display()
                    ),
                    None,
                );
                return Ok(Converged::Settled);
            }
        };
        let local = converge::Local {
            idle: !in_flight,
            committed: Some(&me.release),
            other: other.as_ref().map(|o| &o.release),
            history: &history,
        };
        let decision = converge::decide(want, &local, true);
        match &decision {
            converge::Decision::Wait => return Ok(Converged::Waiting),
            converge::Decision::Nothing => {
                self.refusals
                    .lock()
                    .expect("not poisoned")
                    .remove(SELF_SERVICE);
                return Ok(Converged::Settled);
            }
            converge::Decision::Refuse { failure } => {
                self.refuse_self(
                    format!(
                        "agent {} failed on this host ({}: {}); it is not tried again until an operator runs \
                         `turnout-agent upgrade retry {}`",
                        want.version, failure.kind, failure.reason, want.version
                    ),
                    None,
                );
                return Ok(Converged::Settled);
            }
            converge::Decision::Rollback | converge::Decision::Install => {}
        }
        let unit = tokio::task::spawn_blocking(switch::own_unit)
            .await
            .ok()
            .flatten();
        let Some(unit) = unit else {
            self.refuse_self(
                format!(
                    "agent {} not installed: this agent does not run as a systemd service of its own, so it \
                     cannot restart itself safely; upgrade it by hand (docs/operations.md)",
                    want.version
                ),
                // No verdict on the release: tried again once the agent
                // runs under systemd.
                Some((OutcomeKind::Refused, want)),
            );
            return Ok(Converged::Settled);
        };
        // Still on this host (the previous agent, the installed binary, or a
        // release unpacked before): no download. Otherwise fetched and staged.
        let target = match layout.find(&want.sha256) {
            Some(target) => target,
            None => match self.stage_self(desired, capabilities, &layout).await? {
                Some(target) => target,
                None => return Ok(Converged::Acted),
            },
        };
        if !self.agent.all_idle() {
            // Never while a service installs or bakes: looked at again soon.
            return Ok(Converged::Waiting);
        }
        if !self.still_wanted(desired).await? {
            return Ok(Converged::Settled);
        }
        self.switch_self(&layout, me, target, unit).await
    }

    /// Downloads, verifies and unpacks the agent release `desired` names,
    /// and checks that it runs; `None` (recorded) when it must not be used.
    async fn stage_self(
        &self,
        desired: &DesiredService,
        capabilities: &turnout_proto::CapabilitySet,
        layout: &Layout,
    ) -> Result<Option<AgentRelease>, LinkError> {
        let want = &desired.release;
        let bundle = match self
            .download(
                desired,
                capabilities.contains(&turnout_proto::Capability::RangeDownload),
            )
            .await
        {
            Ok(path) => path,
            Err(LinkError::Io { what, source }) => {
                let reason =
                    format!("download failed: {what}: {source}; tried again at the next poll");
                let _ = self
                    .agent
                    .record_self(OutcomeKind::Failed, want.clone(), reason);
                return Ok(None);
            }
            Err(err) => return Err(err),
        };
        match self.manifest_release(&bundle, want).await {
            Ok(manifest) => {
                if self
                    .apply_policy(SELF_SERVICE, want, &manifest, true, None)
                    .is_some()
                {
                    return Ok(None);
                }
            }
            Err(mismatch) => {
                self.refuse_self(mismatch, Some((OutcomeKind::Rejected, want)));
                return Ok(None);
            }
        }
        let dir = Layout::dir_name(want);
        let staged = layout
            .release_of(&dir)
            .is_ok_and(|r| r.release.sha256 == want.sha256);
        if !staged && let Err((kind, reason)) = self.unpack_self(layout, &bundle, want, &dir).await
        {
            if kind == OutcomeKind::Rejected {
                self.refuse_self(reason, Some((kind, want)));
            } else {
                // A full disk or an I/O error: no verdict on the release.
                let reason = format!("{reason}; tried again at the next poll");
                tracing::warn!(service = SELF_SERVICE, "{reason}");
                let _ = self.agent.record_self(kind, want.clone(), reason);
            }
            return Ok(None);
        }
        let entry = layout.entry_of(&dir).map_err(|source| LinkError::Io {
            what: format!("reading the staged agent {dir}"),
            source,
        })?;
        if let Err(reason) = self.preflight(&entry).await {
            let text = format!(
                "agent {} not switched to: {reason}; it is not tried again",
                want.version
            );
            self.refuse_self(text, Some((OutcomeKind::Rejected, want)));
            return Ok(None);
        }
        Ok(Some(AgentRelease {
            release: want.clone(),
            dir: Some(dir),
        }))
    }

    /// Verifies the bundle against the trust held and unpacks it as
    /// `releases/DIR` (through a partial directory, renamed when complete).
    /// `Err` says whether the release was rejected (a verdict) or the
    /// unpacking failed (`failed`: tried again).
    async fn unpack_self(
        &self,
        layout: &Layout,
        bundle: &std::path::Path,
        want: &ReleaseRef,
        dir: &str,
    ) -> Result<(), (OutcomeKind, String)> {
        let failed = |text: String| (OutcomeKind::Failed, text);
        let trust = crate::service::current_trust(self.agent.config())
            .map_err(|e| failed(e.to_string()))?
            .trust;
        let (bundle, want) = (bundle.to_owned(), want.clone());
        let final_dir = layout.release_dir(dir);
        let partial = layout.release_dir(&format!(".{dir}.partial"));
        tokio::task::spawn_blocking(move || {
            let failed = |text: String| (OutcomeKind::Failed, text);
            std::fs::create_dir_all(partial.parent().expect("under releases"))
                .map_err(|e| failed(format!("creating the releases directory: {e}")))?;
            let _ = std::fs::remove_dir_all(&partial);
            let _ = std::fs::remove_dir_all(&final_dir);
            let file = std::fs::File::open(&bundle)
                .map_err(|e| failed(format!("reading {}: {e}", bundle.display())))?;
            let (verified, sink) = crate::stage::unpack(
                std::io::BufReader::new(file),
                &trust,
                std::time::SystemTime::now(),
                &turnout_proto::Limits::default(),
                &partial,
            )
            .map_err(|e| match e {
                crate::stage::StageError::Bundle(err) if err.is_refusal() => (
                    OutcomeKind::Rejected,
                    format!("agent {} rejected: {err}", want.version),
                ),
                other => failed(format!("unpacking agent {}: {other}", want.version)),
            })?;
            if verified.manifest.name.as_str() != SELF_SERVICE {
                let _ = std::fs::remove_dir_all(&partial);
                return Err((
                    OutcomeKind::Rejected,
                    format!(
                        "the bundle is release {} {}, not {SELF_SERVICE}; not installed as the agent",
                        verified.manifest.name, verified.manifest.version
                    ),
                ));
            }
            let record = SlotRelease {
                format: RELEASE_FILE_FORMAT,
                release: want.clone(),
                entry: verified.manifest.entry.clone(),
                installed_ms: now_ms(),
                manifest_sha256: None,
                expires: verified.manifest.expires,
            };
            let write = || -> std::io::Result<()> {
                sink.sync()?;
                turnout_rt::files::write_atomic(
                    &partial.join(RELEASE_FILE),
                    &serde_json::to_vec_pretty(&record).expect("records serialise"),
                    0o644,
                )?;
                std::fs::rename(&partial, &final_dir)?;
                turnout_rt::files::sync_dir(turnout_rt::files::parent(&final_dir))
            };
            write().map_err(|e| failed(format!("unpacking agent {}: {e}", want.version)))
        })
        .await
        .map_err(|e| (OutcomeKind::Failed, format!("unpacking panicked: {e}")))?
    }

    /// Runs `ENTRY version --json`: the new agent must start, say it is
    /// `turnout-agent`, and speak the protocol this host agreed with its
    /// coordinator (or it could not report after the switch).
    async fn preflight(&self, entry: &std::path::Path) -> Result<(), String> {
        let run = tokio::process::Command::new(entry)
            .args(["version", "--json"])
            .env_remove(crate::upgrade::ENV_RELEASE)
            .kill_on_drop(true)
            .output();
        let out = tokio::time::timeout(Duration::from_secs(20), run)
            .await
            .map_err(|_| "`version --json` did not answer within 20 s".to_owned())?
            .map_err(|e| format!("it does not start: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "`version --json` failed ({}): {}",
                out.status,
                turnout_proto::text::clean_lines(String::from_utf8_lossy(&out.stderr).trim())
            ));
        }
        let version: Version = serde_json::from_slice(&out.stdout)
            .map_err(|e| format!("`version --json` printed no version ({e})"))?;
        if !version.software.starts_with("turnout-agent") {
            return Err(format!(
                "it says it is {:?}, not turnout-agent",
                version.software
            ));
        }
        let agreed = *self.version.lock().expect("not poisoned");
        if !version.range.contains(agreed) {
            return Err(format!(
                "it speaks protocol {}, but this host and its coordinator agreed v{}: it could not report",
                version.range,
                agreed.get()
            ));
        }
        Ok(())
    }

    /// Hands over to `target`: record, dead-man timer, links, restart.
    async fn switch_self(
        &self,
        layout: &Layout,
        me: AgentRelease,
        target: AgentRelease,
        unit: String,
    ) -> Result<Converged, LinkError> {
        let now = now_ms();
        // The new agent needs its hold and a hello within the window: a
        // window shorter than that would revert every agent.
        let hold = crate::upgrade::hold(turnout_rt::notify::watchdog_interval());
        let configured = self.agent.config().upgrade_deadline;
        let deadline = configured.max(hold * 2 + Duration::from_secs(10));
        if deadline != configured {
            tracing::warn!(
                "upgrade_deadline ({}) is shorter than the new agent's hold ({}s) allows: using {}s",
                humantime::format_duration(configured),
                hold.as_secs(),
                deadline.as_secs()
            );
        }
        let handoff = Handoff {
            format: HANDOFF_FORMAT,
            from: me.clone(),
            to: target.clone(),
            armed_ms: now,
            deadline_ms: now + deadline.as_millis() as u64,
            needs_hello: true,
            unit: unit.clone(),
            deadman: format!("turnout-agent-deadman-{now}"),
            boot_id: switch::boot_id(),
            window_ms: deadline.as_millis() as u64,
            previous_before: layout.previous(),
            phase: Phase::Armed,
        };
        let fail = |reason: String| {
            tracing::error!(service = SELF_SERVICE, "{reason}");
            let _ = self
                .agent
                .record_self(OutcomeKind::Failed, target.release.clone(), reason);
            Ok(Converged::Acted)
        };
        let layout_for = layout.clone();
        let h = handoff.clone();
        let config = config_path();
        // The journal as it is now: a revert puts it back, so that the old
        // agent never finds one the new agent migrated.
        if let Err(err) = self.agent.snapshot_journal(&layout.journal_snapshot()) {
            return fail(format!(
                "agent {} not switched to: cannot keep a copy of the journal: {err}; tried again at the next poll",
                target.release.version
            ));
        }
        let _ = std::fs::remove_file(layout.progress_path());
        let armed = tokio::task::spawn_blocking(move || -> Result<(), String> {
            if h.from.dir.is_none() {
                layout_for
                    .save_installed(&h.from)
                    .map_err(|e| format!("recording the installed agent: {e}"))?;
            }
            layout_for
                .save_handoff(&h)
                .map_err(|e| format!("writing the hand-off record: {e}"))?;
            if let Err(err) = switch::arm(&h, &config) {
                let _ = layout_for.remove_handoff();
                return Err(format!("cannot arm the dead-man switch: {err}"));
            }
            let flip = layout_for
                .point("previous", h.from.dir.as_deref())
                .and_then(|()| layout_for.point("current", h.to.dir.as_deref()));
            if let Err(err) = flip {
                switch::disarm(&h.deadman);
                let _ = layout_for.point("current", h.from.dir.as_deref());
                let _ = layout_for.remove_handoff();
                return Err(format!("cannot point `current` at the new agent: {err}"));
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the switch panicked: {e}")));
        if let Err(reason) = armed {
            return fail(format!(
                "agent {} not switched to: {reason}; tried again at the next poll",
                target.release.version
            ));
        }
        *self.switching.lock().expect("not poisoned") = Some(target.release.clone());
        tracing::info!(
            "switching to agent {} (from {}): the dead-man switch reverts it unless it confirms by {}",
            target.release.version,
            me.release.version,
            turnout_proto::desired::utc(handoff.deadline_ms)
        );
        let _ = self.report(0).await;
        let id = handoff.armed_ms;
        let unit_for = unit.clone();
        let restarted = tokio::task::spawn_blocking(move || switch::restart_later(&unit_for, id))
            .await
            .unwrap_or_else(|e| Err(format!("panicked: {e}")));
        if let Err(err) = restarted {
            let _ =
                switch::revert_links(layout, &handoff, "the restart could not be started", false);
            switch::disarm(&handoff.deadman);
            let _ = layout.remove_handoff();
            *self.switching.lock().expect("not poisoned") = None;
            return fail(format!(
                "agent {} not switched to: cannot restart {unit}: {err}; tried again at the next poll",
                target.release.version
            ));
        }
        // systemd stops this process now; nothing more is started meanwhile.
        tokio::time::sleep(deadline + Duration::from_secs(60)).await;
        tracing::error!("still running long after asking systemd to restart {unit}");
        Ok(Converged::Acted)
    }
}
