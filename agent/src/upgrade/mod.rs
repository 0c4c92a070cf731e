//! The agent's own releases: how a host's agent is upgraded through the same
//! signed, staged, reversible path as its services, and why a broken agent
//! can never strand a host.
//!
//! ```text
//! STATE_DIR/agent/
//!   releases/0.3.0-1a2b3c4d5e6f/   a verified `turnout-agent` bundle, unpacked
//!   current  -> releases/…         what the unit runs (absent: the installed binary)
//!   previous -> releases/…         what ran before (absent: the installed binary)
//!   handoff.json                   the switch in flight, between two agents
//!   installed.json                 the installed binary, as a release
//!   progress                       the new agent's last word, for the dead-man
//! ```
//!
//! The unit always starts the *installed* binary (`/usr/local/bin/turnout-agent`,
//! from a package or by hand): the launcher ([`switch::launch`]) execs
//! `current`'s entry in the same process, so systemd's watchdog and
//! `sd_notify` see the agent that really runs. The installed binary is the
//! floor: it launches, and it is what the dead-man switch runs to revert.
//!
//! A switch, driven by the running ("old") agent once every managed service
//! is idle: write `handoff.json` (armed) → arm the dead-man timer (a
//! transient systemd unit, outside the agent's cgroup) → flip `previous` and
//! `current` → restart the agent's unit from another transient unit. The new
//! agent confirms ([`probation`]) once it has been up for the hold period
//! and, when the old agent could reach the coordinator, after a hello and a
//! report succeeded. While the coordinator is unreachable the new agent
//! keeps moving its deadline ahead: an outage alone never reverts an
//! upgrade, and an agent that cannot talk to a coordinator that answers is
//! still reverted once it is back. Unconfirmed at the deadline, the timer runs
//! `turnout-agent upgrade revert`, which flips the links back and restarts
//! the unit; the old agent then records `agent upgrade to X failed: …` in its
//! journal, which the coordinator's gate reads, and [`converge`](crate::converge)
//! never tries that version again until an operator runs `upgrade retry`.
//! A deadline found already past when the agent starts (the timer is lost in
//! a reboot) is reverted by the launcher before anything runs.
//!
//! Everything here is pure: [`launch_decision`], [`at_start`],
//! [`probation`], [`extended`] and [`on_deadline`] decide; [`switch`]
//! carries out.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use turnout_proto::messages::ReleaseRef;

use crate::link::LinkStatus;
use crate::slots::SlotRelease;

pub mod switch;

static CONFIG_PATH: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Records the config file the daemon runs with (the dead-man switch's
/// revert is run with it).
pub fn set_config_path(path: &Path) {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let _ = CONFIG_PATH.set(absolute);
}

/// The config file the daemon runs with.
pub fn config_path() -> PathBuf {
    CONFIG_PATH
        .get()
        .cloned()
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_PATH))
}

/// The service name the agent's own releases go by, in desired state,
/// reports and rollouts (`turnout rollout start --service turnout-agent`).
pub const SELF_SERVICE: &str = "turnout-agent";
/// Set by the launcher for the agent it execs: the release directory it runs.
pub const ENV_RELEASE: &str = "TURNOUT_AGENT_RELEASE";
/// Set by the launcher: the installed binary and the words before `run`
/// (JSON), which the dead-man switch runs to revert.
pub const ENV_LAUNCHER: &str = "TURNOUT_AGENT_LAUNCHER";
/// `handoff.json`'s format.
pub const HANDOFF_FORMAT: u32 = 1;

/// Which agent: a release unpacked under `releases/`, or the installed binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRelease {
    /// The release (for the installed binary: its version and the sha256
    /// of the binary, which no bundle has).
    pub release: ReleaseRef,
    /// Its directory under `releases/`; `None` for the installed binary.
    #[serde(default)]
    pub dir: Option<String>,
}

/// Where a switch is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// The dead-man timer is armed; the new agent has not confirmed.
    Armed,
    /// The new agent confirmed itself.
    Confirmed {
        /// When.
        at_ms: u64,
    },
    /// The dead-man switch (or the launcher) put the old agent back.
    Reverted {
        /// When.
        at_ms: u64,
        /// Why, as the host reports it.
        reason: String,
        /// Whether this is a verdict on the new agent (it crashed, wedged,
        /// or could not talk to a coordinator that answered), which keeps
        /// it from being tried again; not when nothing was proven against
        /// it (an operator stopped it, the coordinator could not be
        /// verified: that may be the network).
        #[serde(default = "verdict_by_default")]
        verdict: bool,
    },
}

fn verdict_by_default() -> bool {
    true
}

/// `handoff.json`: the switch in flight, written by the old agent before
/// anything changes and read by the launcher, the new agent and the
/// dead-man switch. Unknown fields are ignored, so agents of different
/// versions read each other's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handoff {
    /// [`HANDOFF_FORMAT`].
    pub format: u32,
    /// The agent that ran.
    pub from: AgentRelease,
    /// The agent switched to.
    pub to: AgentRelease,
    /// When the timer was armed, ms since the epoch: also the switch's id.
    pub armed_ms: u64,
    /// Unconfirmed past this, ms since the epoch, the switch is reverted.
    pub deadline_ms: u64,
    /// The old agent could reach its coordinator: the new one confirms only
    /// after a hello and a report of its own (or while it is unreachable).
    pub needs_hello: bool,
    /// The agent's systemd unit.
    pub unit: String,
    /// The dead-man timer's unit name (without `.timer`).
    pub deadman: String,
    /// The boot the deadline belongs to (`/proc/sys/kernel/random/boot_id`):
    /// after a reboot the new agent gets a whole window again, since the
    /// host being down is no verdict on it.
    #[serde(default)]
    pub boot_id: Option<String>,
    /// How long the new agent has (the agent's `upgrade_deadline`), ms.
    #[serde(default)]
    pub window_ms: u64,
    /// Where `previous` pointed before the switch (`None`: the installed
    /// binary), put back by a revert: a failed agent never becomes the one
    /// a host would roll back to.
    #[serde(default)]
    pub previous_before: Option<String>,
    /// Where the switch is.
    #[serde(flatten)]
    pub phase: Phase,
}

/// What the launcher does when the unit starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Run this release (`None`: the installed binary itself).
    Run(Option<String>),
    /// Put the old agent back first, with this reason, then run it.
    RevertFirst(String),
    /// The host rebooted during the new agent's probation: record this
    /// deadline and this boot, then decide again.
    NewBoot(u64),
}

/// The launcher's decision, from the hand-off record, what `current` points
/// at, the boot and the time.
pub fn launch_decision(
    handoff: Option<&Handoff>,
    current: Option<&str>,
    boot_id: Option<&str>,
    now_ms: u64,
) -> Launch {
    if let Some(h) = handoff
        && h.to.dir.as_deref() == current
    {
        match &h.phase {
            Phase::Armed if boot_id.is_some() && h.boot_id.as_deref() != boot_id => {
                let window = if h.window_ms > 0 {
                    h.window_ms
                } else {
                    h.deadline_ms.saturating_sub(h.armed_ms)
                };
                return Launch::NewBoot(now_ms.saturating_add(window));
            }
            Phase::Armed if now_ms >= h.deadline_ms => {
                return Launch::RevertFirst(format!(
                    "it did not confirm itself by its deadline ({}); found when the agent started again \
                     (the dead-man timer did not run: a reboot, or the timer failed)",
                    turnout_proto::desired::utc(h.deadline_ms)
                ));
            }
            // A revert that stopped before flipping the links back.
            Phase::Reverted { reason, .. } if h.from.dir.as_deref() != current => {
                return Launch::RevertFirst(reason.clone());
            }
            _ => {}
        }
    }
    Launch::Run(current.map(str::to_owned))
}

/// What an agent that starts does about the hand-off record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtStart {
    /// No switch concerns this agent.
    Nothing,
    /// This is the new agent: confirm itself when [`may_confirm`] says so.
    Confirm,
    /// This is the new agent and it confirmed, but the record was not
    /// finished: record the commit and remove the record.
    FinishConfirmed,
    /// This is the old agent, put back: record the failure of the new one
    /// (`agent upgrade to X failed: reason`: `reverted` when a verdict,
    /// else `failed`, which is tried again) and remove the record.
    RecordReverted {
        /// Why.
        reason: String,
        /// Whether it is held against the new agent.
        verdict: bool,
    },
    /// The switch never happened (the old agent stopped between writing the
    /// record and flipping `current`): disarm, remove, nothing failed.
    Abandoned,
}

/// Decides [`AtStart`] for the agent `me`.
pub fn at_start(handoff: Option<&Handoff>, me: &AgentRelease) -> AtStart {
    let Some(h) = handoff else {
        return AtStart::Nothing;
    };
    let is = |a: &AgentRelease| a.dir == me.dir && a.release.sha256 == me.release.sha256;
    match &h.phase {
        Phase::Armed if is(&h.to) => AtStart::Confirm,
        Phase::Armed if is(&h.from) => AtStart::Abandoned,
        Phase::Confirmed { .. } if is(&h.to) => AtStart::FinishConfirmed,
        Phase::Reverted {
            reason, verdict, ..
        } if is(&h.from) => AtStart::RecordReverted {
            reason: reason.clone(),
            verdict: *verdict,
        },
        // Someone else's record (an operator moved `current` by hand):
        // nothing this agent can finish; dropped with a warning.
        _ => AtStart::Abandoned,
    }
}

/// What the dead-man switch does, by what systemd says of the unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Revert {
    /// Put the old agent back and start it.
    AndRestart,
    /// An operator stopped the agent during its probation: put the old agent
    /// back for the next start, and leave the unit stopped. No verdict.
    AndLeaveStopped,
}

/// [`Revert`] for a unit whose `ActiveState` is `active_state`: `inactive`
/// is a stop someone asked for (a crash is `failed`, a restart pending is
/// `activating`).
pub fn revert_for(active_state: &str) -> Revert {
    if active_state == "inactive" {
        Revert::AndLeaveStopped
    } else {
        Revert::AndRestart
    }
}

/// Whether a revert whose new agent's last link state was `link_state` is a
/// verdict on it: not when its coordinator could not be verified, which
/// proves nothing (a network that intercepts TLS looks just like that).
pub fn is_verdict(link_state: Option<&str>) -> bool {
    link_state != Some("untrusted")
}

/// How a main process ended, from systemd's `ExecMainCode` (1 exited,
/// 2 killed, 3 dumped core) and `ExecMainStatus` (the status or signal).
pub fn ended(code: &str, status: &str) -> Option<String> {
    match (code, status) {
        (_, "" | "0") | ("", _) => None,
        ("1", status) => Some(format!("it exited with status {status}")),
        ("2", signal) => Some(format!("it was killed by signal {signal}")),
        ("3", signal) => Some(format!("it dumped core on signal {signal}")),
        (_, status) => Some(format!("it ended with status {status}")),
    }
}

/// The new agent's last word (`progress`), for the dead-man switch: for
/// which switch, what it waited for, and its link's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// The switch ([`Handoff::armed_ms`]).
    pub armed_ms: u64,
    /// What it waited for.
    pub waiting: String,
    /// Its link's state (`refused`, `untrusted`, `unreachable`, …).
    #[serde(default)]
    pub link: Option<String>,
}

/// What the new agent reports about itself while its switch is in flight:
/// on probation it is `baking` and has committed nothing new yet (its
/// committed release is the one it falls back to), so a coordinator judges
/// it only once it confirmed itself.
pub fn reported(
    me: &AgentRelease,
    handoff: Option<&Handoff>,
) -> (bool, ReleaseRef, Option<ReleaseRef>) {
    match handoff {
        Some(h)
            if h.phase == Phase::Armed
                && h.to.dir == me.dir
                && h.to.release.sha256 == me.release.sha256 =>
        {
            (true, h.from.release.clone(), Some(me.release.clone()))
        }
        _ => (false, me.release.clone(), None),
    }
}

/// What the new agent does about its probation, now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probation {
    /// Confirm itself.
    Confirm,
    /// Wait, for this reason; the deadline stands.
    Wait(String),
    /// The coordinator is unreachable: wait for it, and keep the deadline
    /// ahead meanwhile ([`extended`]), so that an outage alone never
    /// reverts an upgrade, while an agent that cannot talk to a coordinator
    /// that answers is still reverted once it is back.
    Extend(String),
}

/// The new agent's probation: it confirms once it has been up (ready,
/// pinging its watchdog) for `hold` and — when the old agent could reach
/// the coordinator — a hello and report of its own succeeded.
pub fn probation(
    up_for: Duration,
    hold: Duration,
    needs_hello: bool,
    link: &LinkStatus,
) -> Probation {
    if up_for < hold {
        return Probation::Wait(format!(
            "up for {}s of the {}s hold",
            up_for.as_secs(),
            hold.as_secs()
        ));
    }
    if !needs_hello || link.reported_ms.is_some() {
        return Probation::Confirm;
    }
    let detail = link
        .detail
        .as_deref()
        .map_or(String::new(), |d| format!(": {d}"));
    match link.state.as_str() {
        "unreachable" => Probation::Extend(format!(
            "waiting for the coordinator, which is unreachable{detail}"
        )),
        "standalone" | "" => Probation::Wait("no hello to the coordinator yet".into()),
        state => Probation::Wait(format!("no successful hello and report ({state}{detail})")),
    }
}

/// The deadline after an [`Probation::Extend`] at `now_ms`: moved to a
/// whole `window` ahead once less than half of it is left, else unchanged.
pub fn extended(deadline_ms: u64, now_ms: u64, window: Duration) -> u64 {
    let window = window.as_millis() as u64;
    if deadline_ms.saturating_sub(now_ms) < window / 2 {
        now_ms.saturating_add(window)
    } else {
        deadline_ms
    }
}

/// How long a new agent must stay up before it may confirm: two watchdog
/// timeouts when systemd's watchdog is on (it has then survived two chances
/// to be killed as wedged), at least 5 s; 10 s without a watchdog.
pub fn hold(watchdog_ping: Option<Duration>) -> Duration {
    // `watchdog_ping` is half the timeout.
    watchdog_ping.map_or(Duration::from_secs(10), |ping| {
        (ping * 4).max(Duration::from_secs(5))
    })
}

/// Whether the dead-man switch armed at `armed_ms` reverts, given the
/// record, what `current` points at and the time: only an armed switch that
/// really flipped `current` to the new agent, past its deadline (a timer of
/// a deadline since extended does nothing).
pub fn on_deadline(
    handoff: Option<&Handoff>,
    armed_ms: u64,
    current: Option<&str>,
    now_ms: u64,
) -> bool {
    handoff.is_some_and(|h| {
        h.armed_ms == armed_ms
            && h.phase == Phase::Armed
            && h.to.dir.as_deref() == current
            && now_ms >= h.deadline_ms
    })
}

/// The files under `STATE_DIR/agent/`.
#[derive(Debug, Clone)]
pub struct Layout {
    root: PathBuf,
}

impl Layout {
    /// The layout under `state_dir`.
    pub fn new(state_dir: &Path) -> Layout {
        Layout {
            root: state_dir.join("agent"),
        }
    }

    /// `STATE_DIR/agent`.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where release `dir` is unpacked.
    pub fn release_dir(&self, dir: &str) -> PathBuf {
        self.root.join("releases").join(dir)
    }

    /// The directory name of `release`: `VERSION-SHA12`.
    pub fn dir_name(release: &ReleaseRef) -> String {
        let version = release.version.to_string().replace('+', "_");
        format!("{version}-{}", &release.sha256.as_str()[..12])
    }

    fn link(&self, name: &str) -> Option<String> {
        let target = std::fs::read_link(self.root.join(name)).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// The release `current` points at (`None`: the installed binary).
    pub fn current(&self) -> Option<String> {
        self.link("current")
    }

    /// The release `previous` points at (`None`: the installed binary).
    pub fn previous(&self) -> Option<String> {
        self.link("previous")
    }

    /// Points link `name` at release `dir`, or removes it (`None`), atomically.
    pub fn point(&self, name: &str, dir: Option<&str>) -> std::io::Result<()> {
        let path = self.root.join(name);
        match dir {
            Some(dir) => {
                let tmp = self.root.join(format!(".{name}.new"));
                let _ = std::fs::remove_file(&tmp);
                std::os::unix::fs::symlink(Path::new("releases").join(dir), &tmp)?;
                std::fs::rename(&tmp, &path)?;
            }
            None => match std::fs::remove_file(&path) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
                _ => {}
            },
        }
        turnout_rt::files::sync_dir(&self.root)
    }

    /// The release record of release `dir` (`release.json`).
    pub fn release_of(&self, dir: &str) -> std::io::Result<SlotRelease> {
        let bytes = std::fs::read(self.release_dir(dir).join(crate::slots::RELEASE_FILE))?;
        serde_json::from_slice(&bytes)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
    }

    /// The executable of release `dir`.
    pub fn entry_of(&self, dir: &str) -> std::io::Result<PathBuf> {
        let release = self.release_of(dir)?;
        Ok(self.release_dir(dir).join(release.entry.as_str()))
    }

    fn handoff_path(&self) -> PathBuf {
        self.root.join("handoff.json")
    }

    /// The switch in flight. A record that does not read is reported as an
    /// error: it is never guessed at.
    pub fn handoff(&self) -> std::io::Result<Option<Handoff>> {
        match std::fs::read(self.handoff_path()) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Writes the record, durably.
    pub fn save_handoff(&self, handoff: &Handoff) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        turnout_rt::files::write_atomic(
            &self.handoff_path(),
            &serde_json::to_vec_pretty(handoff).expect("records serialise"),
            0o644,
        )
    }

    /// Removes the record, durably.
    pub fn remove_handoff(&self) -> std::io::Result<()> {
        match std::fs::remove_file(self.handoff_path()) {
            Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        turnout_rt::files::sync_dir(&self.root)
    }

    /// The installed binary as a release, as recorded when the agent first
    /// left it.
    pub fn installed(&self) -> Option<AgentRelease> {
        let bytes = std::fs::read(self.root.join("installed.json")).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Records the installed binary as a release.
    pub fn save_installed(&self, installed: &AgentRelease) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.root)?;
        turnout_rt::files::write_atomic(
            &self.root.join("installed.json"),
            &serde_json::to_vec_pretty(installed).expect("records serialise"),
            0o644,
        )
    }

    /// The switch's record after a reboot: a new deadline, this boot.
    pub fn new_boot(handoff: &Handoff, deadline_ms: u64, boot_id: Option<&str>) -> Handoff {
        Handoff {
            deadline_ms,
            boot_id: boot_id.map(str::to_owned),
            ..handoff.clone()
        }
    }

    /// Removes every release but `current` and `previous` (and any partial
    /// unpacking): what a host keeps of its agents is two of them. Returns
    /// what it removed.
    pub fn prune(&self) -> Vec<String> {
        let keep = [self.current(), self.previous()];
        let Ok(entries) = std::fs::read_dir(self.root.join("releases")) else {
            return Vec::new();
        };
        let mut removed = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if keep.iter().flatten().any(|k| *k == name) {
                continue;
            }
            if std::fs::remove_dir_all(entry.path()).is_ok() {
                removed.push(name);
            }
        }
        removed
    }

    /// The new agent's last word about its confirmation.
    pub fn progress_path(&self) -> PathBuf {
        self.root.join("progress")
    }

    /// The new agent's last word about the switch armed at `armed_ms`
    /// (another switch's is no word about this one).
    pub fn progress(&self, armed_ms: u64) -> Option<Progress> {
        let bytes = std::fs::read(self.progress_path()).ok()?;
        serde_json::from_slice::<Progress>(&bytes)
            .ok()
            .filter(|p| p.armed_ms == armed_ms)
    }

    /// Where the journal is kept as it was before a switch: put back by a
    /// revert, so that an old agent never finds a journal a newer one migrated.
    pub fn journal_snapshot(&self) -> PathBuf {
        self.root.join("journal-before-switch.db")
    }

    /// Puts the journal kept before the switch back in place of
    /// `STATE_DIR/agent.db` (with its WAL files gone), when there is one.
    /// Only while no agent runs. Returns whether it did.
    pub fn restore_journal(&self) -> std::io::Result<bool> {
        let snapshot = self.journal_snapshot();
        if !snapshot.exists() {
            return Ok(false);
        }
        let state_dir = turnout_rt::files::parent(&self.root);
        let journal = state_dir.join("agent.db");
        let tmp = state_dir.join(".agent.db.restoring");
        std::fs::copy(&snapshot, &tmp)?;
        std::fs::File::open(&tmp)?.sync_all()?;
        for suffix in ["-wal", "-shm"] {
            let mut side = journal.clone().into_os_string();
            side.push(suffix);
            match std::fs::remove_file(&side) {
                Err(err) if err.kind() != std::io::ErrorKind::NotFound => return Err(err),
                _ => {}
            }
        }
        std::fs::rename(&tmp, &journal)?;
        turnout_rt::files::sync_dir(state_dir)?;
        Ok(true)
    }

    /// The agent release with bundle digest `sha256` still on this host:
    /// the installed binary (as recorded) or an unpacked release. A rollback
    /// to it needs no download.
    pub fn find(&self, sha256: &turnout_proto::Digest) -> Option<AgentRelease> {
        if let Some(installed) = self.installed().filter(|i| &i.release.sha256 == sha256) {
            return Some(installed);
        }
        let entries = std::fs::read_dir(self.root.join("releases")).ok()?;
        entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| !name.starts_with('.'))
            .find_map(|name| {
                self.agent_release(Some(&name))
                    .filter(|a| &a.release.sha256 == sha256)
            })
    }

    /// The release `dir` as an [`AgentRelease`] (`None`: the installed binary,
    /// if recorded).
    pub fn agent_release(&self, dir: Option<&str>) -> Option<AgentRelease> {
        match dir {
            Some(dir) => self.release_of(dir).ok().map(|r| AgentRelease {
                release: r.release,
                dir: Some(dir.to_owned()),
            }),
            None => self.installed(),
        }
    }
}

#[cfg(test)]
mod tests;
