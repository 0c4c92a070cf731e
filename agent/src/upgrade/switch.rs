//! The effects of an agent upgrade: the launcher, systemd's transient units
//! (the dead-man timer and the restart, both outside the agent's cgroup),
//! the revert, and what an agent does about the hand-off record when it
//! starts. The decisions are the pure functions of [`super`].

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use turnout_proto::messages::{OutcomeKind, ReleaseRef};

use super::{
    AgentRelease, AtStart, ENV_LAUNCHER, ENV_RELEASE, Handoff, Launch, Layout, Phase, Probation,
    at_start, launch_decision, probation,
};
use crate::service::{Agent, now_ms};

/// The installed binary and the words before `run` in its command line
/// (`["agent"]` for `turnout agent run`), without the global options.
pub fn launcher() -> (PathBuf, Vec<String>) {
    if let Some(words) = std::env::var(ENV_LAUNCHER)
        .ok()
        .and_then(|j| serde_json::from_str::<Vec<String>>(&j).ok())
        && let Some((exe, prefix)) = words.split_first()
    {
        return (PathBuf::from(exe), prefix.to_vec());
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let mut prefix = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(word) = args.next() {
        match word.as_str() {
            "run" => break,
            "--config" | "--log-format" => {
                args.next();
            }
            w if w.starts_with('-') => {}
            w => prefix.push(w.to_owned()),
        }
    }
    (exe, prefix)
}

/// Runs before the daemon: execs the agent `current` names (after putting
/// the old one back when a switch is past its deadline), in this process.
/// Returns when this binary is the one to run: no `current`, or this is
/// already the launched agent. `config` and `log_format` are passed on.
pub fn launch(state_dir: &Path, config: &Path, log_format: &str) {
    if std::env::var_os(ENV_RELEASE).is_some() {
        return;
    }
    let layout = Layout::new(state_dir);
    for _ in 0..3 {
        let handoff = match layout.handoff() {
            Ok(h) => h,
            Err(err) => {
                // `current` is what to run; the record only says whether a
                // switch is on probation, and a damaged one is never guessed at.
                tracing::error!(
                    "{} does not read ({err}): starting `current` as it is; the agent reports the damage \
                     and takes no agent upgrade until the file is removed",
                    layout.root().join("handoff.json").display()
                );
                None
            }
        };
        let current = layout.current();
        let boot = boot_id();
        let decision = launch_decision(
            handoff.as_ref(),
            current.as_deref(),
            boot.as_deref(),
            now_ms(),
        );
        let dir = match decision {
            Launch::Run(dir) => dir,
            Launch::NewBoot(deadline) => {
                let h = handoff.expect("a new boot has a record");
                tracing::warn!(
                    "the host rebooted while agent {} was on probation: it has until {} again",
                    h.to.release.version,
                    turnout_proto::desired::utc(deadline)
                );
                if let Err(err) =
                    layout.save_handoff(&Layout::new_boot(&h, deadline, boot.as_deref()))
                {
                    tracing::error!(
                        "recording the new deadline: {err}; starting the installed agent"
                    );
                    return;
                }
                continue;
            }
            Launch::RevertFirst(reason) => {
                let h = handoff.expect("a revert has a record");
                tracing::error!(
                    "agent upgrade to {} failed: {reason}; putting {} back",
                    h.to.release.version,
                    h.from.release.version
                );
                let verdict =
                    super::is_verdict(layout.progress(h.armed_ms).and_then(|p| p.link).as_deref());
                if let Err(err) = revert_links(&layout, &h, &reason, verdict) {
                    tracing::error!("putting the previous agent back: {err}");
                }
                continue;
            }
        };
        let Some(dir) = dir else {
            return;
        };
        // On probation: the dead-man timer must run. A reboot loses a
        // transient timer; arming one that exists fails, harmlessly. (Only
        // as a unit's main process: never a timer for a unit not our own.)
        if let Some(h) = handoff
            .as_ref()
            .filter(|h| h.phase == Phase::Armed && h.to.dir.as_deref() == Some(dir.as_str()))
            && own_unit().is_some()
            && arm(h, config).is_ok()
        {
            tracing::warn!(
                "the dead-man timer for the upgrade to {} was gone (a reboot?): armed again for {}",
                h.to.release.version,
                turnout_proto::desired::utc(h.deadline_ms)
            );
        }
        let entry = match layout.entry_of(&dir) {
            Ok(entry) => entry,
            Err(err) => {
                tracing::error!(
                    "the current agent release {dir} does not read ({err}); starting the installed agent"
                );
                return;
            }
        };
        let (exe, prefix) = launcher();
        let mut words = vec![exe.display().to_string()];
        words.extend(prefix);
        let err = std::process::Command::new(&entry)
            .arg("run")
            .env(ENV_RELEASE, &dir)
            .env(
                ENV_LAUNCHER,
                serde_json::to_string(&words).expect("strings serialise"),
            )
            .env("TURNOUT_AGENT_CONFIG", config)
            .env("TURNOUT_LOG_FORMAT", log_format)
            .exec();
        // Only here when the exec failed.
        tracing::error!("cannot start the agent {}: {err}", entry.display());
        match layout.handoff() {
            Ok(Some(h)) if h.phase == Phase::Armed && h.to.dir.as_deref() == Some(&dir) => {
                let reason = format!("it cannot be started: {err}");
                if let Err(err) = revert_links(&layout, &h, &reason, true) {
                    tracing::error!("putting the previous agent back: {err}");
                }
            }
            _ => {
                tracing::error!("starting the installed agent instead");
                return;
            }
        }
    }
}

/// Marks the switch reverted (durably, first), points `current` back at
/// the old agent and `previous` at the new one, and puts back the journal
/// as it was before the switch. Only while no agent runs.
pub fn revert_links(
    layout: &Layout,
    handoff: &Handoff,
    reason: &str,
    verdict: bool,
) -> std::io::Result<()> {
    let mut reverted = handoff.clone();
    if let Phase::Armed = reverted.phase {
        reverted.phase = Phase::Reverted {
            at_ms: now_ms(),
            reason: reason.to_owned(),
            verdict,
        };
        layout.save_handoff(&reverted)?;
    }
    layout.point("current", handoff.from.dir.as_deref())?;
    layout.point("previous", handoff.previous_before.as_deref())?;
    if layout.restore_journal()? {
        tracing::info!("the journal is back as it was before the switch");
    }
    Ok(())
}

/// This boot: the kernel's boot id and when PID 1 started. The kernel's id
/// alone does not change when a container reboots (and the agent's unit,
/// with `ProtectKernelTunables=`, reads the host kernel's even where the
/// container has its own); PID 1 of a rebooted container is a new process.
pub fn boot_id() -> Option<String> {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let init = std::fs::read_to_string("/proc/1/stat").ok()?;
    // Field 22, counted after the command name in parentheses.
    let started = init
        .rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(19)?
        .to_owned();
    Some(format!("{}/{started}", kernel.trim()))
}

/// The agent's own systemd unit: the service of its cgroup
/// (`/proc/self/cgroup`) whose main process it is. `None` when it does not
/// run as a service of its own: started from a shell, or as a child of
/// another service, whose unit it must never restart.
pub fn own_unit() -> Option<String> {
    let text = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let unit = text
        .lines()
        .filter_map(|line| line.rsplit('/').next())
        .find(|last| last.ends_with(".service"))?
        .to_owned();
    let out = std::process::Command::new("systemctl")
        .args(["show", "-p", "MainPID", "--value", &unit])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let main: u32 = String::from_utf8_lossy(&out.stdout).trim().parse().ok()?;
    (main == std::process::id()).then_some(unit)
}

/// Runs a command, waiting at most 30 s; `Err` has its output.
fn run(program: &str, args: &[String]) -> Result<(), String> {
    let mut child = std::process::Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read as _;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "{program} {} failed ({status}): {}",
                    args.join(" "),
                    err.trim()
                ));
            }
            Ok(None) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(None) => {
                let _ = child.kill();
                return Err(format!("{program} {} took over 30 s", args.join(" ")));
            }
            Err(err) => return Err(format!("waiting for {program}: {err}")),
        }
    }
}

/// Arms the dead-man timer for `handoff`: a transient systemd timer that
/// runs the installed binary's `upgrade revert` at the deadline.
pub fn arm(handoff: &Handoff, config: &Path) -> Result<(), String> {
    let (exe, prefix) = launcher();
    let secs = handoff
        .deadline_ms
        .saturating_sub(now_ms())
        .div_ceil(1000)
        .max(1);
    let mut args = vec![
        "--quiet".to_owned(),
        format!("--unit={}", handoff.deadman),
        format!("--on-active={secs}s"),
        "--timer-property=AccuracySec=1s".to_owned(),
        format!(
            "--description=Turnout: revert the agent upgrade to {} unless it confirms",
            handoff.to.release.version
        ),
        "--".to_owned(),
        exe.display().to_string(),
    ];
    args.extend(prefix);
    args.extend([
        "--config".to_owned(),
        config.display().to_string(),
        "upgrade".to_owned(),
        "revert".to_owned(),
        "--armed".to_owned(),
        handoff.armed_ms.to_string(),
    ]);
    run("systemd-run", &args)
}

/// Stops the dead-man timer (best effort: the revert also checks the record).
pub fn disarm(deadman: &str) {
    let _ = run(
        "systemctl",
        &[
            "stop".into(),
            format!("{deadman}.timer"),
            format!("{deadman}.service"),
        ],
    );
}

/// Restarts `unit` from a transient unit of its own: outside the agent's
/// cgroup, so stopping the agent does not stop the restart.
pub fn restart_later(unit: &str, id: u64) -> Result<(), String> {
    run(
        "systemd-run",
        &[
            "--quiet".into(),
            "--collect".into(),
            format!("--unit=turnout-agent-switch-{id}"),
            "--description=Turnout: restart the agent into its new release".into(),
            "systemctl".into(),
            "restart".into(),
            unit.to_owned(),
        ],
    )
}

/// What systemd says about `unit` (for the revert's reason).
fn unit_facts(unit: &str) -> Option<std::collections::BTreeMap<String, String>> {
    let out = std::process::Command::new("systemctl")
        .args([
            "show",
            unit,
            "-p",
            "ActiveState,SubState,Result,NRestarts,ExecMainStatus,ExecMainCode",
        ])
        .output()
        .ok()?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
    )
}

/// What systemd logged about `unit` since `since_ms`: how often its
/// watchdog killed it, and how its main process last ended
/// (`code=killed, status=9/KILL`), from the journal.
fn journal_facts(unit: &str, since_ms: u64) -> (usize, Option<String>) {
    let out = std::process::Command::new("journalctl")
        .args(["-u", unit, "-o", "cat", "--no-pager", "--since"])
        .arg(format!("@{}", since_ms / 1000))
        .stderr(std::process::Stdio::null())
        .output();
    let Ok(out) = out else {
        return (0, None);
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let watchdog = text
        .lines()
        .filter(|l| l.contains("Watchdog timeout"))
        .count();
    let ended = text
        .lines()
        .rev()
        .filter_map(|l| {
            l.split_once("Main process exited, ")
                .map(|(_, how)| how.trim_end_matches('.'))
        })
        .next()
        .map(str::to_owned);
    (watchdog, ended)
}

/// Why the new agent did not confirm, from systemd and its own last word.
fn diagnose(
    layout: &Layout,
    handoff: &Handoff,
    facts: Option<&std::collections::BTreeMap<String, String>>,
) -> (String, bool) {
    let secs = handoff.deadline_ms.saturating_sub(handoff.armed_ms) / 1000;
    let mut why = format!("it did not confirm itself within {secs}s");
    let (watchdog, last_end) = journal_facts(&handoff.unit, handoff.armed_ms);
    if watchdog > 0 {
        why.push_str(&format!(
            "; systemd's watchdog killed it {watchdog} time(s) (its main loop stopped)"
        ));
    }
    if let Some(facts) = facts {
        let get = |k: &str| facts.get(k).map_or("", String::as_str);
        let restarts: u64 = get("NRestarts").parse().unwrap_or(0);
        if get("Result") == "watchdog" && watchdog == 0 {
            why.push_str("; systemd's watchdog killed it (its main loop stopped)");
        } else if get("ActiveState") != "active" || restarts > 0 {
            why.push(';');
            if let Some(ended) = super::ended(get("ExecMainCode"), get("ExecMainStatus")) {
                why.push_str(&format!(" {ended},"));
            }
            if restarts > 0 {
                why.push_str(&format!(" restarted {restarts} time(s)"));
            }
            why.push_str(&format!(" (unit {})", get("ActiveState")));
            if let Some(how) = last_end.filter(|_| watchdog == 0) {
                why.push_str(&format!(", last ended with {how}"));
            }
        }
    }
    let word = layout.progress(handoff.armed_ms);
    if let Some(word) = &word {
        why.push_str(&format!("; its last word: {}", word.waiting));
    }
    let verdict = super::is_verdict(word.as_ref().and_then(|w| w.link.as_deref()));
    if !verdict {
        why.push_str(
            "; not held against it: the coordinator could not be verified, which may be the network",
        );
    }
    (why, verdict)
}

/// `turnout-agent upgrade revert --armed MS`, run by the dead-man timer:
/// when the switch armed at `armed_ms` is still unconfirmed, puts the old
/// agent back and restarts the unit. Does nothing for a confirmed, finished
/// or other switch.
pub fn revert(state_dir: &Path, armed_ms: u64) -> Result<String, String> {
    let layout = Layout::new(state_dir);
    let handoff = layout
        .handoff()
        .map_err(|e| format!("reading the hand-off record: {e}"))?;
    let current = layout.current();
    if !super::on_deadline(handoff.as_ref(), armed_ms, current.as_deref(), now_ms()) {
        return Ok("the upgrade confirmed, or is no longer in flight: nothing to revert".into());
    }
    let handoff = handoff.expect("on_deadline needs a record");
    let unit = handoff.unit.clone();
    let facts = unit_facts(&unit);
    let state = facts
        .as_ref()
        .and_then(|f| f.get("ActiveState").cloned())
        .unwrap_or_default();
    let plan = super::revert_for(&state);
    let (reason, verdict) = match plan {
        super::Revert::AndRestart => diagnose(&layout, &handoff, facts.as_ref()),
        super::Revert::AndLeaveStopped => (
            "the agent was stopped during its probation (by an operator?): the previous agent is put back \
             for the next start, and the unit is left stopped"
                .to_owned(),
            false,
        ),
    };
    // Nothing runs while the links and the journal change: the unconfirmed
    // agent is killed (it may be wedged: a stop would wait out its
    // TimeoutStopSec), and the stop cancels a restart systemd has pending.
    let _ = run(
        "systemctl",
        &[
            "kill".into(),
            "--kill-who=main".into(),
            "--signal=SIGKILL".into(),
            unit.clone(),
        ],
    );
    let _ = run("systemctl", &["stop".into(), unit.clone()]);
    revert_links(&layout, &handoff, &reason, verdict).map_err(|e| format!("flipping back: {e}"))?;
    if plan == super::Revert::AndRestart {
        let _ = run("systemctl", &["reset-failed".into(), unit.clone()]);
        run("systemctl", &["start".into(), unit])?;
    }
    Ok(format!(
        "reverted the agent upgrade to {}: {reason}",
        handoff.to.release.version
    ))
}

/// Which agent this process is: the release the launcher named, or the
/// installed binary (its version and the sha256 of its file).
pub fn identify(state_dir: &Path) -> AgentRelease {
    let layout = Layout::new(state_dir);
    if let Ok(dir) = std::env::var(ENV_RELEASE)
        && let Some(me) = layout.agent_release(Some(&dir))
    {
        return me;
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("/proc/self/exe"));
    let sha = crate::service::digest_of(&exe)
        .unwrap_or_else(|_| turnout_proto::Digest::from_bytes([0; 32]));
    AgentRelease {
        release: ReleaseRef {
            name: super::SELF_SERVICE.into(),
            version: crate::VERSION
                .parse()
                .unwrap_or_else(|_| "0.0.0".parse().expect("a version")),
            sha256: sha,
        },
        dir: None,
    }
}

/// What the daemon does about the hand-off record once it knows who it is:
/// records a revert or a confirmation left unfinished, and, when this is
/// the new agent, confirms it when its [`probation`] ends (a task, until
/// confirmed).
pub async fn settle(agent: Arc<Agent>, started: Instant) {
    let Some(me) = agent.myself().cloned() else {
        return;
    };
    let layout = Layout::new(&agent.config().state_dir);
    let handoff = match layout.handoff() {
        Ok(h) => h,
        Err(err) => {
            tracing::error!("the agent upgrade record does not read: {err}; left for an operator");
            return;
        }
    };
    match at_start(handoff.as_ref(), &me) {
        AtStart::Nothing => {}
        AtStart::Abandoned => {
            let h = handoff.expect("a record");
            tracing::warn!(
                "the switch to agent {} did not happen (armed at {}); dropped, it is tried again when wanted",
                h.to.release.version,
                turnout_proto::desired::utc(h.armed_ms)
            );
            disarm_off_thread(&h.deadman).await;
            // `previous` may have moved before the old agent stopped.
            let _ = layout.point("previous", h.previous_before.as_deref());
            let _ = layout.remove_handoff();
        }
        AtStart::RecordReverted { reason, verdict } => {
            let h = handoff.expect("a record");
            let text = format!("agent upgrade to {} failed: {reason}", h.to.release.version);
            tracing::error!("{text}; running {} again", me.release.version);
            disarm_off_thread(&h.deadman).await;
            // A verdict keeps the version from being tried again; otherwise
            // it is `failed`, tried again when the coordinator asks.
            let kind = if verdict {
                OutcomeKind::Reverted
            } else {
                OutcomeKind::Failed
            };
            if agent.record_self(kind, h.to.release, text).is_ok() {
                let _ = layout.remove_handoff();
                let _ = std::fs::remove_file(layout.journal_snapshot());
                let _ = std::fs::remove_file(layout.progress_path());
            }
        }
        AtStart::FinishConfirmed => {
            finish_confirmed(&agent, &layout, &handoff.expect("a record")).await;
        }
        AtStart::Confirm => {
            let h = handoff.expect("a record");
            confirm(&agent, &layout, h, started).await;
        }
    }
}

/// Moves the switch's deadline to `deadline`: the record first, then a new
/// timer, then the old one stopped (a timer that fires for a deadline since
/// moved does nothing).
async fn extend(layout: &Layout, h: &mut Handoff, deadline: u64) {
    let mut next = h.clone();
    next.deadline_ms = deadline;
    next.deadman = format!("turnout-agent-deadman-{}-{deadline}", h.armed_ms);
    if let Err(err) = layout.save_handoff(&next) {
        tracing::warn!("extending the upgrade's deadline: {err}");
        return;
    }
    let (armed, old) = (next.clone(), h.deadman.clone());
    let config = super::config_path();
    let result = tokio::task::spawn_blocking(move || {
        let result = arm(&armed, &config);
        if result.is_ok() {
            disarm(&old);
        }
        result
    })
    .await
    .unwrap_or_else(|e| Err(format!("panicked: {e}")));
    match result {
        Ok(()) => {
            tracing::info!(
                "the coordinator is unreachable: the upgrade's deadline moves to {} (an outage alone never reverts it)",
                turnout_proto::desired::utc(deadline)
            );
            *h = next;
        }
        Err(err) => {
            // The old timer still runs: the record must say its deadline.
            tracing::warn!("arming a later dead-man timer: {err}");
            let _ = layout.save_handoff(h);
        }
    }
}

/// [`disarm`], off the agent's only runtime thread.
async fn disarm_off_thread(deadman: &str) {
    let deadman = deadman.to_owned();
    let _ = tokio::task::spawn_blocking(move || disarm(&deadman)).await;
}

async fn finish_confirmed(agent: &Agent, layout: &Layout, h: &Handoff) {
    disarm_off_thread(&h.deadman).await;
    let text = format!(
        "agent {} confirmed itself (from {})",
        h.to.release.version, h.from.release.version
    );
    if agent
        .record_self(OutcomeKind::Committed, h.to.release.clone(), text.clone())
        .is_ok()
    {
        let _ = layout.remove_handoff();
        let _ = std::fs::remove_file(layout.progress_path());
        let _ = std::fs::remove_file(layout.journal_snapshot());
        tracing::info!("{text}");
        let removed = layout.prune();
        if !removed.is_empty() {
            tracing::info!("removed older agent releases: {}", removed.join(", "));
        }
    }
}

/// The new agent's side: waits out its [`probation`], writing what it
/// waits for to `progress` (the dead-man switch quotes it), then confirms.
/// While the coordinator is unreachable it keeps the deadline ahead, with
/// a new timer.
async fn confirm(agent: &Agent, layout: &Layout, mut h: Handoff, started: Instant) {
    let hold = super::hold(turnout_rt::notify::watchdog_interval());
    tracing::info!(
        "this agent ({}) is on probation until {}: it confirms itself after {}s up{}",
        h.to.release.version,
        turnout_proto::desired::utc(h.deadline_ms),
        hold.as_secs(),
        if h.needs_hello {
            " and a hello and report to the coordinator"
        } else {
            ""
        }
    );
    let mut said = String::new();
    loop {
        let link = agent.link().lock().expect("not poisoned").clone();
        let waiting = match probation(started.elapsed(), hold, h.needs_hello, &link) {
            Probation::Confirm => break,
            Probation::Wait(waiting) => waiting,
            Probation::Extend(waiting) => {
                let window = agent.config().upgrade_deadline;
                let deadline = super::extended(h.deadline_ms, now_ms(), window);
                if deadline != h.deadline_ms {
                    extend(layout, &mut h, deadline).await;
                }
                waiting
            }
        };
        let word = super::Progress {
            armed_ms: h.armed_ms,
            waiting,
            link: Some(link.state.clone()),
        };
        let text = serde_json::to_string(&word).expect("progress serialises");
        if text != said {
            let _ =
                turnout_rt::files::write_atomic(&layout.progress_path(), text.as_bytes(), 0o644);
            said = text;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    h.phase = Phase::Confirmed { at_ms: now_ms() };
    if let Err(err) = layout.save_handoff(&h) {
        tracing::error!("confirming the upgrade: {err}; the dead-man switch will revert it");
        return;
    }
    finish_confirmed(agent, layout, &h).await;
}
