//! The effect interpreter: the pure machine's effects performed on real
//! slots, a supervisor and health checks, each new state journaled before
//! its effects run (see [`Agent::drive`]).

use super::*;

impl Agent {
    /// Runs `event` and everything it leads to for service `name`.
    pub async fn drive(&self, name: &str, event: Event) -> Result<(), AgentError> {
        self.drive_with(name, event, None).await
    }

    pub(super) async fn drive_with(
        &self,
        name: &str,
        event: Event,
        bundle: Option<(&Trust, Digest)>,
    ) -> Result<(), AgentError> {
        let service = self.service(name)?;
        let mut events = VecDeque::from([event]);
        // Kept here, not re-read from the journal: a revert may go ahead
        // unrecorded while the journal cannot be written (see `persist`).
        let mut current = self.state(name)?;
        while let Some(event) = events.pop_front() {
            let (state, effects) =
                machine::next(current.clone(), event).map_err(|source| AgentError::Busy {
                    service: name.to_owned(),
                    source,
                })?;
            let now = self.clock.now_ms();
            let records: Vec<HistoryEntry> = effects
                .iter()
                .filter_map(|effect| match effect {
                    Effect::Record {
                        kind,
                        release,
                        reason,
                    } => Some(HistoryEntry {
                        kind: kind.clone(),
                        release: release.clone(),
                        reason: reason.clone(),
                        at_ms: now,
                    }),
                    _ => None,
                })
                .collect();
            let starting = matches!(current, State::Idle { .. });
            self.persist(name, &state, &records, now, starting).await?;
            for record in &records {
                let release = record
                    .release
                    .as_ref()
                    .map_or("-".to_owned(), |r| format!("{}@{}", r.name, r.version));
                tracing::info!(
                    service = %name,
                    release = %release,
                    outcome = %record.kind.as_str(),
                    "{} {release}: {}",
                    record.kind.as_str(),
                    record.reason
                );
            }
            if state.name() != current.name() {
                tracing::debug!(service = %name, "{} -> {}", current.name(), state.name());
            }
            current = state.clone();
            self.changed();
            let at_rest = matches!(state, State::Idle { committed: Some(_) });
            service.at_rest.store(at_rest, Ordering::SeqCst);
            turnout_rt::notify::notify(&format!("STATUS={}", self.status_line()));
            for effect in effects {
                events.extend(
                    self.perform(name, service, &state, effect, bundle.as_ref())
                        .await?,
                );
            }
        }
        Ok(())
    }

    /// Journals `state` before its effects run. A failed write (a full
    /// disk, most often) is retried with backoff and reported in `status`
    /// until it lands, so a transient failure never leaves a service
    /// "baking" for good. One exception keeps the bake's deadline whatever
    /// the journal does: a revert goes ahead unrecorded after a few
    /// attempts, since recovery from the state still journaled (switching
    /// or baking) reverts too.
    pub(super) async fn persist(
        &self,
        name: &str,
        state: &State,
        records: &[HistoryEntry],
        now: u64,
        starting: bool,
    ) -> Result<(), AgentError> {
        let mut attempt = 0u32;
        loop {
            let written = self
                .journal
                .lock()
                .expect("not poisoned")
                .persist(name, state, records, now);
            let err = match written {
                Ok(()) => {
                    if attempt > 0 {
                        tracing::info!(service = %name, "the journal is writable again; recorded {}",
                            state.name()
                        );
                    }
                    self.journal_error.lock().expect("not poisoned").take();
                    return Ok(());
                }
                // From rest nothing has been done yet: fail the operation at
                // once, with the reason, instead of waiting for the disk.
                Err(err) if starting => {
                    *self.journal_error.lock().expect("not poisoned") =
                        Some(format!("the journal cannot be written ({err})"));
                    return Err(err.into());
                }
                Err(err) => err,
            };
            attempt += 1;
            if attempt == 1 || attempt.is_multiple_of(60) {
                tracing::error!(service = %name, "writing the journal failed (attempt {attempt}): {err}; retrying, nothing moves until it is recorded"
                );
            }
            *self.journal_error.lock().expect("not poisoned") = Some(format!(
                "the journal cannot be written ({err}); {name} waits to record {}",
                state.name()
            ));
            // Baking and reverting are entered only from switching or
            // baking, whose recovery after a crash is a revert: going ahead
            // unrecorded changes nothing about what a restart would do, and
            // keeps the bake's deadline and the revert on time.
            if matches!(state, State::Baking { .. } | State::Reverting { .. }) && attempt >= 3 {
                tracing::warn!(service = %name, "going on to {} without recording it: the journal still cannot be written, and recovery from what it holds reverts anyway",
                    state.name()
                );
                return Ok(());
            }
            let wait = std::time::Duration::from_millis(100 << attempt.min(6));
            tokio::time::sleep(wait).await;
        }
    }

    pub(super) async fn perform(
        &self,
        name: &str,
        service: &Service,
        state: &State,
        effect: Effect,
        bundle: Option<&(&Trust, Digest)>,
    ) -> Result<Vec<Event>, AgentError> {
        match effect {
            Effect::Stage { source } => {
                let (trust, digest) = bundle.expect("an install carries its trust and digest");
                let staged = self
                    .stage(
                        name,
                        service,
                        state,
                        Path::new(&source),
                        trust,
                        digest.clone(),
                    )
                    .await;
                Ok(match staged {
                    Ok(target) => vec![Event::Staged { target }, Event::Switch],
                    Err(failure) => {
                        let (kind, release, reason) = *failure;
                        vec![Event::StageFailed {
                            kind,
                            release,
                            reason,
                        }]
                    }
                })
            }
            Effect::DiscardStaging => {
                service
                    .dir
                    .discard_staging()
                    .map_err(io_error(name, "emptying staging"))?;
                Ok(vec![])
            }
            Effect::Activate { release } => {
                if let State::Switching { previous, .. } = state {
                    // The health of what runs now, to tell "broke it" from
                    // "was broken"; with no previous release, nothing ran.
                    let note = match previous {
                        Some(_) => {
                            health::baseline(
                                &service.config.checks,
                                &*service.supervisor,
                                &service.http,
                                health::BASELINE_BUDGET,
                            )
                            .await
                        }
                        None => None,
                    };
                    *service.baseline_note.lock().expect("not poisoned") = note;
                }
                match release {
                    Some(release) => {
                        let slot = service.dir.slot_holding(&release).ok_or_else(|| {
                            AgentError::SlotLost {
                                service: name.to_owned(),
                                version: release.version.to_string(),
                            }
                        })?;
                        service
                            .dir
                            .point(slot)
                            .map_err(io_error(name, "switching current"))?;
                    }
                    None => {
                        service.supervisor.stop().await.map_err(|source| {
                            AgentError::Supervisor {
                                service: name.to_owned(),
                                source,
                            }
                        })?;
                        service
                            .dir
                            .unpoint()
                            .map_err(io_error(name, "removing current"))?;
                    }
                }
                Ok(vec![])
            }
            Effect::Restart => {
                let restarted = match self.launch(service) {
                    Ok(Some(launch)) => service
                        .supervisor
                        .restart(&launch)
                        .await
                        .map_err(|e| e.to_string()),
                    Ok(None) => Ok(()),
                    Err(reason) => Err(reason),
                };
                let restarts = service.supervisor.restarts().await;
                service.baseline_restarts.store(restarts, Ordering::SeqCst);
                Ok(match (state, restarted) {
                    (State::Switching { .. }, Ok(())) => vec![Event::Switched {
                        at_ms: self.clock.now_ms(),
                    }],
                    (State::Switching { .. }, Err(reason)) => vec![Event::Unhealthy { reason }],
                    (_, Err(reason)) => {
                        tracing::error!(service = %name, "restarting after the revert failed: {reason}");
                        vec![Event::Reverted]
                    }
                    (_, Ok(())) => {
                        self.await_restored(name, service).await;
                        vec![Event::Reverted]
                    }
                })
            }
            Effect::EnsureRunning { release } => {
                if let Some(release) = release {
                    repair_current_dir(name, &service.dir, self.clock.now_ms())?;
                    let slot = match service.dir.slot_holding(&release) {
                        Some(slot) => slot,
                        None => self.heal_slot(name, service, &release).await?,
                    };
                    if service.dir.active() != Some(slot) {
                        tracing::warn!(service = %name, "current did not point at the committed {}; repaired",
                            release.version
                        );
                        service
                            .dir
                            .point(slot)
                            .map_err(io_error(name, "repairing current"))?;
                    }
                    let launch = self.launch(service).map_err(|detail| AgentError::Io {
                        service: name.to_owned(),
                        what: "preparing to start the service".into(),
                        source: std::io::Error::other(detail),
                    })?;
                    if let Some(launch) = launch {
                        service
                            .supervisor
                            .ensure_running(&launch)
                            .await
                            .map_err(|source| AgentError::Supervisor {
                                service: name.to_owned(),
                                source,
                            })?;
                    }
                }
                Ok(vec![])
            }
            Effect::Bake => {
                let baseline = service.baseline_restarts.load(Ordering::SeqCst);
                let verdict = health::bake(
                    name,
                    &service.config.checks,
                    service.config.bake,
                    &*service.supervisor,
                    &service.http,
                    baseline,
                )
                .await;
                Ok(vec![match verdict {
                    Ok(reason) => Event::Healthy { reason },
                    Err(reason) => {
                        let note = service.baseline_note.lock().expect("not poisoned").clone();
                        Event::Unhealthy {
                            reason: match note {
                                Some(before) => format!(
                                    "{reason} (the previous release was already unhealthy before the switch: {before})"
                                ),
                                None => reason,
                            },
                        }
                    }
                }])
            }
            Effect::Record { .. } => Ok(vec![]),
        }
    }

    /// After a revert, waits (up to the bake deadline) until the restored
    /// release passes every check, so "reverted" means it serves again.
    pub(super) async fn await_restored(&self, name: &str, service: &Service) {
        if service.dir.active().is_none() {
            return;
        }
        let deadline = tokio::time::Instant::now() + service.config.bake.deadline;
        loop {
            match health::probe_all(&service.config.checks, &*service.supervisor, &service.http)
                .await
            {
                None => return,
                Some(failing) if tokio::time::Instant::now() >= deadline => {
                    tracing::warn!(service = %name, "the restored release is not healthy either: {failing}");
                    return;
                }
                Some(_) => tokio::time::sleep(std::time::Duration::from_millis(50)).await,
            }
        }
    }

    /// What the exec supervisor runs for the active slot; `None` if nothing is active.
    /// How to start the active release; `Ok(None)` when none is active.
    /// An exec service's environment file is read here, at each start: an
    /// unreadable one is an error, not a start without it.
    pub(super) fn launch(&self, service: &Service) -> Result<Option<Launch>, String> {
        let Some(held) = service
            .dir
            .active()
            .and_then(|active| service.dir.release_in(active))
        else {
            return Ok(None);
        };
        let release = service.dir.current_path();
        let SupervisorConfig::Exec { argv, host, .. } = &service.config.supervisor else {
            return Ok(Some(Launch {
                program: release.join(held.entry.as_str()),
                args: Vec::new(),
                cwd: release,
                env: Vec::new(),
            }));
        };
        let mut env = BTreeMap::new();
        if let Some(file) = &host.environment_file {
            let text = std::fs::read_to_string(file)
                .map_err(|e| format!("reading the environment file {}: {e}", file.display()))?;
            env.extend(
                crate::supervisor::parse_env_file(&text)
                    .map_err(|e| format!("the environment file {}: {e}", file.display()))?,
            );
        }
        env.extend(host.env.clone());
        let expand = |arg: &String| {
            crate::supervisor::expand(arg, &env).map_err(|e| {
                format!(
                    "exec argument {e}{}",
                    host.environment_file
                        .as_ref()
                        .map_or(" in env".to_owned(), |f| format!(
                            " in env or {}",
                            f.display()
                        ))
                )
            })
        };
        let (program, args) = match argv.split_first() {
            Some((program, args)) => (
                release.join(expand(program)?),
                args.iter().map(expand).collect::<Result<_, _>>()?,
            ),
            None => (release.join(held.entry.as_str()), Vec::new()),
        };
        let cwd = host
            .working_directory
            .as_ref()
            .map_or_else(|| release.clone(), |dir| release.join(dir));
        Ok(Some(Launch {
            program,
            args,
            cwd,
            env: env.into_iter().collect(),
        }))
    }

    /// Verifies and unpacks into the idle slot; the error is the outcome to record.
    pub(super) async fn stage(
        &self,
        name: &str,
        service: &Service,
        state: &State,
        bundle: &Path,
        trust: &Trust,
        digest: Digest,
    ) -> Result<ReleaseRef, StageFailure> {
        let committed = state.committed().cloned();
        let dir = service.dir.clone();
        let now = self.clock.now();
        let (trust, limits, bundle, name) = (
            trust.clone(),
            self.limits,
            bundle.to_owned(),
            name.to_owned(),
        );
        tokio::task::spawn_blocking(move || {
            stage_blocking(StageJob {
                name,
                dir,
                trust,
                limits,
                bundle,
                digest,
                committed,
                now,
            })
        })
        .await
        .unwrap_or_else(|err| {
            Err(Box::new((
                OutcomeKind::Failed,
                None,
                format!("staging panicked: {err}"),
            )))
        })
    }

    /// A service the journal knows nothing of (a new or emptied journal)
    /// but whose `current` points at a slot holding a release is taken to
    /// have that release committed: the slots are the truth for what each
    /// holds, and recovery then leaves the running service alone instead of
    /// stopping it and starting over.
    pub(super) fn adopt_from_slots(&self, name: &str) -> Result<(), AgentError> {
        let service = self.service(name)?;
        let mut journal = self.journal.lock().expect("not poisoned");
        if journal.knows(name)? {
            return Ok(());
        }
        let Some(held) = service
            .dir
            .active()
            .and_then(|slot| service.dir.release_in(slot))
        else {
            return Ok(());
        };
        let reason = format!(
            "rebuilt from the slots on disk: the journal had no record of {name}, and current points at {} {}",
            held.release.name, held.release.version
        );
        tracing::info!(service = %name, "{reason}");
        let now = self.clock.now_ms();
        journal.persist(
            name,
            &State::Idle {
                committed: Some(held.release.clone()),
            },
            &[HistoryEntry {
                kind: OutcomeKind::Committed,
                release: Some(held.release),
                reason,
                at_ms: now,
            }],
            now,
        )?;
        Ok(())
    }

    /// Unpacks the committed `release` again from the bundle cache when its
    /// slot is gone (deleted by hand, a disk replaced): the service comes
    /// back without a coordinator. Refused, with the reason, when the
    /// bundle is no longer cached or no longer verifies.
    pub(super) async fn heal_slot(
        &self,
        name: &str,
        service: &Service,
        release: &ReleaseRef,
    ) -> Result<crate::slots::Slot, AgentError> {
        let lost = |why: String| AgentError::SlotLost {
            service: name.to_owned(),
            version: format!("{} ({why})", release.version),
        };
        let cached = self
            .config
            .state_dir
            .join("cache")
            .join(format!("{}.tnt", release.sha256));
        if !cached.exists() {
            return Err(lost(format!(
                "its bundle is not in the cache either: install it again with `turnout-agent install BUNDLE --service {name}`"
            )));
        }
        if digest_of_file(&cached).await? != release.sha256 {
            return Err(lost(format!("the cached {} is damaged", cached.display())));
        }
        let trust = super::current_trust(&self.config)?.trust;
        tracing::warn!(service = %name, "the slot holding the committed {} {} is gone; unpacking it again from {}",
            release.name,
            release.version,
            cached.display()
        );
        let dir = service.dir.clone();
        let (limits, name_owned, digest) = (self.limits, name.to_owned(), release.sha256.clone());
        let now = self.clock.now();
        let staged = tokio::task::spawn_blocking(move || {
            stage_blocking(StageJob {
                name: name_owned,
                dir,
                trust,
                limits,
                bundle: cached,
                digest,
                committed: None,
                now,
            })
        })
        .await
        .map_err(|e| lost(format!("unpacking it again panicked: {e}")))?;
        if let Err(failure) = staged {
            return Err(lost(format!("unpacking it again failed: {}", failure.2)));
        }
        service
            .dir
            .slot_holding(release)
            .ok_or_else(|| lost("unpacked again, but no slot holds it".into()))
    }
}

/// A real directory where the `current` link belongs (someone copied a
/// release there by hand) is moved aside, so the link can be made again.
fn repair_current_dir(name: &str, dir: &ServiceDir, now_ms: u64) -> Result<(), AgentError> {
    let current = dir.current_path();
    let is_real_dir = std::fs::symlink_metadata(&current).is_ok_and(|m| m.file_type().is_dir());
    if is_real_dir {
        let aside = current.with_file_name(format!("current.moved-aside-{now_ms}"));
        std::fs::rename(&current, &aside)
            .map_err(io_error(name, "moving a directory named current aside"))?;
        tracing::warn!(service = %name, "{} was a directory, not the link to a slot; moved it to {} and linked current again",
            current.display(),
            aside.display()
        );
    }
    Ok(())
}

/// How staging failed: the outcome to record, the release if known, why.
type StageFailure = Box<(OutcomeKind, Option<ReleaseRef>, String)>;

/// One staging, carried onto the blocking pool: the bundle to verify and
/// unpack, for which service, against which trust and limits, at what time.
struct StageJob {
    name: String,
    dir: ServiceDir,
    trust: Trust,
    limits: Limits,
    bundle: PathBuf,
    digest: Digest,
    /// The service's committed release, if any (the downgrade rule).
    committed: Option<ReleaseRef>,
    now: SystemTime,
}

fn stage_blocking(job: StageJob) -> Result<ReleaseRef, StageFailure> {
    let StageJob {
        name,
        dir,
        trust,
        limits,
        bundle,
        digest,
        committed,
        now,
    } = job;
    let (name, dir, trust, limits, bundle) =
        (name.as_str(), &dir, &trust, &limits, bundle.as_path());
    let committed = committed.as_ref();
    let failed = |what: &str, err: &dyn std::fmt::Display| -> StageFailure {
        Box::new((OutcomeKind::Failed, None, format!("{what}: {err}")))
    };
    // The idle slot is the one not holding the committed release, whatever `current` says.
    let idle = committed
        .and_then(|c| dir.slot_holding(c))
        .map_or_else(|| dir.idle(), |active| !active);
    let other = dir.release_in(idle);
    dir.discard_staging()
        .map_err(|e| failed("emptying staging", &e))?;
    std::fs::create_dir_all(dir.unpack_path().parent().expect("staging has a parent"))
        .map_err(|e| failed("creating staging", &e))?;
    let file =
        File::open(bundle).map_err(|e| failed(&format!("reading {}", bundle.display()), &e))?;
    let reader = BufReader::with_capacity(256 * 1024, file);
    let (verified, sink) = match stage::unpack(reader, trust, now, limits, &dir.unpack_path()) {
        Ok(done) => done,
        Err(StageError::Bundle(err)) if err.is_refusal() => {
            // Named by its digest (what the coordinator asked for); the
            // name and version are the bundle's own claim, read untrusted.
            let claimed = File::open(bundle)
                .ok()
                .and_then(|f| turnout_proto::bundle::read_head(BufReader::new(f), limits).ok());
            let release = ReleaseRef {
                name: claimed
                    .as_ref()
                    .map_or_else(|| name.to_owned(), |h| h.manifest.name.to_string()),
                version: claimed
                    .map_or_else(|| semver::Version::new(0, 0, 0), |h| h.manifest.version),
                sha256: digest,
            };
            return Err(Box::new((
                OutcomeKind::Rejected,
                Some(release),
                format!("bundle rejected: {err}"),
            )));
        }
        Err(err) => return Err(failed("unpacking", &err)),
    };
    let m = &verified.manifest;
    let release = ReleaseRef {
        name: m.name.to_string(),
        version: m.version.clone(),
        sha256: digest,
    };
    let reject = |why: String| {
        let _ = dir.discard_staging();
        Err(Box::new((
            OutcomeKind::Rejected,
            Some(release.clone()),
            why,
        )))
    };
    if m.name.as_str() != name {
        return reject(format!(
            "bundle {} {} is a release of {}, not of {name}",
            m.name, m.version, m.name
        ));
    }
    if let Some(c) = committed {
        let is_rollback = other
            .as_ref()
            .is_some_and(|o| o.release.sha256 == release.sha256);
        if release.version < c.version && !is_rollback {
            return reject(format!(
                "downgrade refused: {} {} is older than the committed {}; only the release kept in the other \
                 slot may be gone back to (`turnout-agent rollback`)",
                m.name, m.version, c.version
            ));
        }
    }
    if m.files.iter().any(|f| f.path.as_str() == RELEASE_FILE)
        || m.links.iter().any(|l| l.path.as_str() == RELEASE_FILE)
    {
        return reject(format!(
            "the payload holds {RELEASE_FILE}, a name the agent reserves for itself"
        ));
    }
    let fail = |what: &str, err: std::io::Error| {
        let _ = dir.discard_staging();
        Err(Box::new((
            OutcomeKind::Failed,
            Some(release.clone()),
            format!("{what}: {err}"),
        )))
    };
    if let Err(err) = sink.sync() {
        return fail("flushing the unpacked release to disk", err);
    }
    let held = SlotRelease {
        format: crate::slots::RELEASE_FILE_FORMAT,
        release: release.clone(),
        entry: m.entry.clone(),
        installed_ms: now
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64),
        manifest_sha256: Some(manifest_digest(&verified.manifest_bytes)),
        expires: m.expires,
    };
    if let Err(err) = dir.promote(idle, &held) {
        return fail(
            &format!("moving the release into the {} slot", idle.name()),
            err,
        );
    }
    Ok(release)
}
