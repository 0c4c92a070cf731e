//! Bad input and faults: each gets a clear error and a distinct exit code,
//! and in every case the committed release keeps running.

use std::time::Duration;

use crate::harness::{Host, version, wait_for};

/// A host with v1 committed and its daemon running.
fn committed_host() -> Host {
    let mut host = Host::new("300ms");
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    host
}

fn still_serving_v1(host: &Host) {
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
    assert_eq!(version(&host.status()["committed"]), Some("1.0.0"));
}

#[test]
fn an_invalid_config_lists_every_problem_and_exits_3() {
    let host = Host::new("300ms");
    host.write_config("stat_dir = \"/x\"\n[[service]]\nname = \"web\"\nsupervisor = \"exec\"\n[[service.check]]\nkind = \"carrier-pigeon\"\n");
    let (code, _, err) = host.run(&["run"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("2 problem(s)"), "{err}");
    assert!(err.contains("stat_dir: unknown key"), "{err}");
    assert!(err.contains("service[0].check[0].kind: expected one of http, tcp, exec, systemd, process; found \"carrier-pigeon\""), "{err}");
}

#[test]
fn a_bundle_failing_verification_touches_nothing() {
    let host = committed_host();
    let mut bytes = std::fs::read(host.bundle("2.0.0", "healthy")).unwrap();
    let at = bytes.len() - 1536;
    bytes[at] ^= 0xff;
    std::fs::write(host.path("tampered.tnt"), bytes).unwrap();
    let (code, out, _) = host.install(&host.path("tampered.tnt"));
    assert_eq!(code, 4, "{out}");
    assert!(out.contains("rejected"), "{out}");
    assert!(out.contains("the payload was altered"), "{out}");
    still_serving_v1(&host);
    assert_eq!(
        host.status()["other"],
        serde_json::Value::Null,
        "the idle slot was not touched"
    );
}

#[test]
fn a_health_endpoint_refusing_connections_reverts() {
    let host = committed_host();
    let (code, out, _) = host.install(&host.bundle("2.0.0", "silent"));
    assert_eq!(code, 5, "{out}");
    assert!(out.contains("Connection refused"), "{out}");
    still_serving_v1(&host);
}

#[test]
fn a_second_install_while_one_runs_is_refused() {
    let host = committed_host();
    let slow = host.bundle("2.0.0", "healthy");
    std::thread::scope(|scope| {
        let first = scope.spawn(|| host.install(&slow));
        wait_for(
            "the first install to start",
            Duration::from_secs(10),
            || host.status()["state"] != "idle",
        );
        let (code, _, err) = host.install(&host.bundle("3.0.0", "healthy"));
        assert_eq!(code, 6, "{err}");
        assert!(err.contains("wait for the operation in progress"), "{err}");
        let (code, out, _) = first.join().unwrap();
        assert_eq!(code, 0, "the first install must be unharmed: {out}");
    });
    assert_eq!(host.served_version().as_deref(), Some("2.0.0"));
}

#[test]
fn a_journal_from_a_newer_agent_is_refused_at_start() {
    let mut host = committed_host();
    host.stop_daemon();
    let db = host.state().join("agent.db");
    rusqlite::Connection::open(&db)
        .unwrap()
        .pragma_update(None, "user_version", 42)
        .unwrap();
    let (code, _, err) = host.run(&["run"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("schema version 42") && err.contains("written by a newer turnout-agent"),
        "{err}"
    );
}

#[test]
fn current_pointing_at_a_missing_slot_is_repaired_at_start() {
    let mut host = committed_host();
    host.stop_daemon();
    let service = host.state().join("services/web");
    let active = std::fs::read_link(service.join("current")).unwrap();
    let missing = if active.to_str() == Some("blue") {
        "green"
    } else {
        "blue"
    };
    std::fs::remove_file(service.join("current")).unwrap();
    std::os::unix::fs::symlink(missing, service.join("current")).unwrap();
    host.start_daemon(&[]);
    assert_eq!(std::fs::read_link(service.join("current")).unwrap(), active);
    assert!(
        host.daemon_log()
            .contains("current did not point at the committed 1.0.0; repaired"),
        "{}",
        host.daemon_log()
    );
    wait_for("v1 to serve again", Duration::from_secs(10), || {
        host.served_version().as_deref() == Some("1.0.0")
    });
}

/// The journal and its WAL files.
fn journal_files(host: &Host) -> Vec<std::path::PathBuf> {
    ["agent.db", "agent.db-wal", "agent.db-shm"]
        .iter()
        .map(|f| host.state().join(f))
        .collect()
}

fn slots(host: &Host) -> Vec<(String, Vec<u8>)> {
    let service = host.state().join("services/web");
    ["blue", "green"]
        .iter()
        .filter_map(|slot| {
            let release = std::fs::read(service.join(slot).join(".turnout-release.json")).ok()?;
            Some(((*slot).to_owned(), release))
        })
        .collect()
}

/// A corrupted journal used to exit 1, so systemd restarted the agent in a
/// loop; now it is an invalid input (3, which the unit does not restart),
/// with what to do, and no slot is touched.
#[test]
fn a_damaged_journal_is_refused_with_exit_3_and_touches_nothing() {
    let mut host = committed_host();
    host.stop_daemon();
    let before = slots(&host);
    for file in journal_files(&host) {
        let _ = std::fs::remove_file(file);
    }
    std::fs::write(host.state().join("agent.db"), vec![0x5a; 8192]).unwrap();
    let (code, _, err) = host.run(&["run"]);
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("is damaged"), "{err}");
    assert!(err.contains("move it away"), "{err}");
    assert_eq!(slots(&host), before, "the slots are as they were");
}

/// An empty journal used to make the agent stop the service and install
/// again, overwriting the rollback slot; now what runs is taken from the
/// slots on disk, and both slots are kept.
#[test]
fn an_empty_journal_is_rebuilt_from_the_slots_on_disk() {
    let mut host = committed_host();
    let v2 = host.bundle("2.0.0", "healthy");
    assert_eq!(host.install(&v2).0, 0);
    host.stop_daemon();
    let before = slots(&host);
    assert_eq!(before.len(), 2);
    for file in journal_files(&host) {
        let _ = std::fs::remove_file(file);
    }
    std::fs::write(host.state().join("agent.db"), b"").unwrap();
    host.start_daemon(&[]);
    let status = host.status();
    assert_eq!(version(&status["committed"]), Some("2.0.0"), "{status}");
    assert_eq!(version(&status["other"]), Some("1.0.0"), "{status}");
    assert_eq!(slots(&host), before, "neither slot was rewritten");
    assert!(host.daemon_log().contains("rebuilt from the slots on disk"));
    wait_for("2.0.0 to serve", Duration::from_secs(10), || {
        host.served_version().as_deref() == Some("2.0.0")
    });
    // The rollback slot still works.
    let (code, out, _) = host.run(&["rollback", "--service", "web"]);
    assert_eq!(code, 0, "{out}");
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
}

/// A real directory where the `current` link belongs (a copy by hand) used
/// to stay; now it is moved aside and the link made again.
#[test]
fn a_directory_where_current_belongs_is_moved_aside() {
    let mut host = committed_host();
    host.stop_daemon();
    let service = host.state().join("services/web");
    let active = std::fs::read_link(service.join("current")).unwrap();
    std::fs::remove_file(service.join("current")).unwrap();
    std::fs::create_dir(service.join("current")).unwrap();
    std::fs::write(service.join("current/stray"), b"copied by hand").unwrap();
    host.start_daemon(&[]);
    assert_eq!(std::fs::read_link(service.join("current")).unwrap(), active);
    let aside: Vec<_> = std::fs::read_dir(&service)
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("current.moved-aside-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "kept, not deleted");
    assert!(aside[0].path().join("stray").exists());
    wait_for("v1 to serve again", Duration::from_secs(10), || {
        host.served_version().as_deref() == Some("1.0.0")
    });
}

#[test]
fn exec_services_need_the_daemon() {
    let host = Host::new("300ms");
    let (code, _, err) = host.install(&host.bundle("1.0.0", "healthy"));
    assert_eq!(code, 6, "{err}");
    assert!(err.contains("start the daemon first"), "{err}");
}

#[test]
fn a_missing_systemd_unit_is_refused_before_anything_is_touched() {
    let host = Host::new("300ms");
    // A fake systemctl that knows no units.
    let bin = host.path("bin");
    std::fs::create_dir_all(&bin).unwrap();
    std::fs::write(bin.join("systemctl"), "#!/bin/sh\nprintf 'LoadState=not-found\\nActiveState=inactive\\nNRestarts=0\\nMainPID=0\\n'\n").unwrap();
    std::fs::set_permissions(
        bin.join("systemctl"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    host.write_config(&format!(
        "state_dir = \"{}\"\ntrust = \"{}\"\n[[service]]\nname = \"web\"\nunit = \"web-missing.service\"\n",
        host.state().display(),
        host.path("trust.json").display()
    ));
    let bundle = host.bundle("1.0.0", "healthy");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let out = std::process::Command::new(crate::harness::AGENT)
        .args(["install", bundle.to_str().unwrap(), "--service", "web"])
        .env("TURNOUT_AGENT_CONFIG", host.path("agent.toml"))
        .env("PATH", path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("web-missing.service is not loaded (LoadState=not-found)"),
        "{err}"
    );
    assert!(
        !host.state().join("services/web/blue").exists(),
        "a slot was written"
    );
}

/// A small tmpfs on the host's state directory (root only), so its disk fills.
fn small_state_disk(host: &Host, size: &str) -> Option<turnout_testkit::Tmpfs> {
    turnout_testkit::Tmpfs::mount(&host.state(), size)
}

#[test]
fn disk_full_while_unpacking_keeps_the_committed_release() {
    let mut host = Host::new("300ms");
    let Some(_unmount) = small_state_disk(&host, "4m") else {
        return;
    };
    let state = host.state();
    let v1 = host.bundle("1.0.0", "healthy");
    let big = host.bundle_with("2.0.0", "healthy", &[("data/blob", vec![7; 6 << 20])]);
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let (code, out, _) = host.install(&big);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("No space left on device"), "{out}");
    still_serving_v1(&host);
    assert!(
        !state.join("services/web/staging/unpack").exists(),
        "staging left behind"
    );
    host.stop_daemon();
}

/// Fills the file system holding `dir` with one file; returns its path.
fn fill(dir: &std::path::Path) -> std::path::PathBuf {
    use std::io::Write;
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).unwrap();
    let block = vec![1u8; 64 * 1024];
    while file.write_all(&block).is_ok() {}
    let _ = file.sync_all();
    path
}

/// A host with 1.0.0 committed on a small disk, installing 2.0.0 (demo
/// `mode`): once the bake starts the disk is filled, and `during` runs with
/// the filler's path (it frees the disk when it is done). Returns the host,
/// its disk, and how the install ended; `None` when not root.
fn disk_fills_mid_bake(
    mode: &str,
    during: impl FnOnce(&Host, std::path::PathBuf),
) -> Option<(Host, turnout_testkit::Tmpfs, (i32, String, String))> {
    let mut host = Host::new("3s");
    let disk = small_state_disk(&host, "16m")?;
    let v1 = host.bundle("1.0.0", "healthy");
    let v2 = host.bundle("2.0.0", mode);
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let ended = std::thread::scope(|scope| {
        let install = scope.spawn(|| host.install(&v2));
        wait_for("the bake of 2.0.0", Duration::from_secs(20), || {
            host.status()["state"] == "baking"
        });
        during(&host, fill(&host.state()));
        install.join().unwrap()
    });
    Some((host, disk, ended))
}

/// A journal write failing mid-bake (disk full) used to leave the service
/// "baking" for good: installs and rollbacks refused, no deadline, only a
/// restart helped. Now the write is retried and reported, and the install
/// finishes once the disk has room again.
#[test]
fn a_journal_write_failing_mid_bake_is_retried_until_it_lands() {
    let Some((mut host, _disk, (code, out, err))) =
        disk_fills_mid_bake("healthy", |host, filler| {
            wait_for("the journal write to fail", Duration::from_secs(30), || {
                host.daemon_log().contains("writing the journal failed")
            });
            let status = host.status();
            assert!(
                status["journal_error"]
                    .as_str()
                    .is_some_and(|e| e.contains("the journal cannot be written")),
                "{status}"
            );
            std::fs::remove_file(filler).unwrap();
        })
    else {
        return;
    };
    assert_eq!(code, 0, "{out}{err}");
    let status = host.status();
    assert_eq!(status["state"], "idle", "{status}");
    assert_eq!(version(&status["committed"]), Some("2.0.0"));
    assert!(status["journal_error"].is_null(), "{status}");
    assert_eq!(host.served_version().as_deref(), Some("2.0.0"));
    assert!(host.daemon_log().contains("the journal is writable again"));
    host.stop_daemon();
}

/// The bake's deadline holds whatever the journal does: an unhealthy
/// release is reverted on time with the disk full, the revert going ahead
/// unrecorded.
#[test]
fn an_unhealthy_release_is_reverted_on_time_with_the_journal_unwritable() {
    let Some((mut host, _disk, _)) = disk_fills_mid_bake("fail-after", |host, filler| {
        wait_for("1.0.0 to serve again", Duration::from_secs(30), || {
            host.served_version().as_deref() == Some("1.0.0")
        });
        assert!(
            host.daemon_log().contains("writing the journal failed"),
            "{}",
            host.daemon_log()
        );
        assert!(
            host.daemon_log()
                .contains("going on to reverting without recording it"),
            "{}",
            host.daemon_log()
        );
        std::fs::remove_file(filler).unwrap();
    }) else {
        return;
    };
    wait_for("the revert to be recorded", Duration::from_secs(30), || {
        let status = host.status();
        status["state"] == "idle" && version(&status["committed"]) == Some("1.0.0")
    });
    host.stop_daemon();
}

/// A first install has no previous release: its failure used to be
/// explained with "the previous release was already unhealthy before the
/// switch", which confused every newcomer.
#[test]
fn a_failed_first_install_blames_no_previous_release() {
    let mut host = Host::new("300ms");
    let bad = host.bundle("1.0.0", "unhealthy");
    host.start_daemon(&[]);
    let (code, out, err) = host.install(&bad);
    assert_eq!(code, 5, "{out}{err}");
    let reason = host.status()["last_outcome"]["reason"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(reason.contains("check"), "{reason}");
    assert!(!reason.contains("previous release"), "{reason}");
    host.stop_daemon();
}

/// A bundle is the same on every host; what differs (a port, a region)
/// comes from the host: an environment file, `env`, `${NAME}` in `exec`.
/// Before, a newcomer had to write a wrapper script for it.
#[test]
fn an_exec_service_takes_its_port_from_the_hosts_environment_file() {
    let mut host = Host::new("300ms");
    let env_file = host.path("web.env");
    std::fs::write(&env_file, format!("# this host\nPORT={}\n", host.port)).unwrap();
    host.write_config(&format!(
        r#"
        state_dir = "{state}"
        trust = "{trust}"
        [[service]]
        name = "web"
        supervisor = "exec"
        exec = ["bin/demo", "--port", "${{PORT}}"]
        environment_file = "{env_file}"
        env = {{ GREETING = "hello" }}
        working_directory = "bin"
        [service.bake]
        min_healthy = "300ms"
        deadline = "20s"
        [[service.check]]
        kind = "http"
        url = "http://127.0.0.1:{port}/healthz"
        interval = "100ms"
        start_period = "1s"
        "#,
        state = host.state().display(),
        trust = host.path("trust.json").display(),
        env_file = env_file.display(),
        port = host.port,
    ));
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[]);
    let (code, out, err) = host.install(&v1);
    assert_eq!(code, 0, "{out}{err}{}", host.daemon_log());
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
    let pid = std::fs::read_to_string(host.state().join("services/web/exec.pid")).unwrap();
    let proc_dir = std::path::Path::new("/proc").join(pid.trim());
    let environ = std::fs::read(proc_dir.join("environ")).unwrap();
    assert!(
        environ
            .split(|b| *b == 0)
            .any(|var| var == b"GREETING=hello"),
        "env reaches the service"
    );
    assert!(
        std::fs::read_link(proc_dir.join("cwd"))
            .unwrap()
            .ends_with("bin"),
        "working_directory is relative to the release"
    );
    // A host whose environment file is gone does not start the service
    // without it: the install fails and says why.
    std::fs::remove_file(&env_file).unwrap();
    let v2 = host.bundle("2.0.0", "healthy");
    let (code, out, _) = host.install(&v2);
    assert_eq!(code, 5, "{out}");
    assert!(
        host.status()["last_outcome"]["reason"]
            .as_str()
            .unwrap()
            .contains("reading the environment file")
    );
    assert_eq!(host.served_version().as_deref(), Some("1.0.0"));
    host.stop_daemon();
}

/// The same signed release in another file (here: its signature listed
/// twice) has another digest. A coordinator alternating such copies used to
/// make a host reinstall and restart the release again and again; now it is
/// verified and only recorded under its new digest.
#[test]
fn the_same_release_in_another_file_is_not_installed_again() {
    let mut host = Host::new("300ms");
    let v1 = host.bundle("1.0.0", "healthy");
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let bytes = std::fs::read(&v1).unwrap();
    let head =
        turnout_proto::bundle::read_head(&bytes[..], &turnout_proto::Limits::default()).unwrap();
    let doubled: Vec<_> = head
        .signatures
        .iter()
        .chain(head.signatures.iter())
        .cloned()
        .collect();
    let copy = turnout_proto::bundle::rewrite_signatures(
        &bytes[..],
        Vec::new(),
        &doubled,
        &turnout_proto::Limits::default(),
    )
    .unwrap();
    assert_ne!(copy, bytes);
    std::fs::write(host.path("copy.tnt"), &copy).unwrap();
    let pid = std::fs::read_to_string(host.state().join("services/web/exec.pid")).unwrap();
    for _ in 0..2 {
        for bundle in [host.path("copy.tnt"), v1.clone()] {
            let (code, out, err) = host.install(&bundle);
            assert_eq!(code, 0, "{out}{err}");
            assert!(out.contains("from the same signed manifest"), "{out}");
        }
    }
    assert_eq!(
        std::fs::read_to_string(host.state().join("services/web/exec.pid")).unwrap(),
        pid,
        "never restarted"
    );
    let status = host.status();
    assert_eq!(version(&status["committed"]), Some("1.0.0"));
    assert!(status["other"].is_null(), "nothing was unpacked: {status}");
    still_serving_v1(&host);
    host.stop_daemon();
}

/// Found by attacking the journal fix: with the disk already full, an
/// install waited for the disk without a word, a second one waited too, and
/// both ran once space was freed. Nothing has been done at that point, so
/// the install now fails at once with the reason, and status says it.
#[test]
fn an_install_on_a_full_disk_fails_at_once_and_status_says_why() {
    let mut host = Host::new("300ms");
    let Some(_unmount) = small_state_disk(&host, "16m") else {
        return;
    };
    let v1 = host.bundle("1.0.0", "healthy");
    let v2 = host.bundle("2.0.0", "healthy");
    host.start_daemon(&[]);
    assert_eq!(host.install(&v1).0, 0);
    let filler = fill(&host.state());
    let (code, out, err) = host.install(&v2);
    assert_eq!(code, 1, "{out}{err}");
    assert!(format!("{out}{err}").contains("full"), "{out}{err}");
    let (_, text, _) = host.run(&["status"]);
    assert!(
        text.contains("journal: the journal cannot be written"),
        "{text}"
    );
    still_serving_v1(&host);
    std::fs::remove_file(filler).unwrap();
    assert_eq!(host.install(&v2).0, 0, "works again once there is room");
    assert!(host.status()["journal_error"].is_null());
    host.stop_daemon();
}

/// Found by attacking: an undefined `${NAME}` in `exec` became an empty
/// argument, and the service crash-looped after the next agent restart.
#[test]
fn an_undefined_variable_in_exec_is_a_config_error() {
    let host = Host::new("300ms");
    host.write_config(&format!(
        "state_dir = \"{}\"\ntrust = \"{}\"\n[[service]]\nname = \"web\"\nsupervisor = \"exec\"\nexec = [\"bin/demo\", \"--port\", \"${{NOPE}}\"]\n",
        host.state().display(),
        host.path("trust.json").display()
    ));
    let (code, _, err) = host.run(&["run"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains(
            "service[0].exec[2]: ${NOPE} is not set: add NOPE to env, or set environment_file"
        ),
        "{err}"
    );
}

/// Found by attacking: a real SQLite file damaged inside (not at its header)
/// failed without saying what to do.
#[test]
fn a_journal_damaged_inside_says_what_to_do() {
    let mut host = committed_host();
    host.stop_daemon();
    let db = host.state().join("agent.db");
    let mut bytes = std::fs::read(&db).unwrap();
    assert!(bytes.len() > 4096, "a journal of more than one page");
    for b in &mut bytes[4096..] {
        *b = 0xa5;
    }
    std::fs::write(&db, bytes).unwrap();
    for file in ["agent.db-wal", "agent.db-shm"] {
        let _ = std::fs::remove_file(host.state().join(file));
    }
    let (code, _, err) = host.run(&["run"]);
    assert_eq!(code, 3, "{err}");
    assert!(
        err.contains("is damaged") && err.contains("move it away"),
        "{err}"
    );
}

#[test]
fn check_reads_config_and_trust_and_status_makes_nothing_before_the_first_install() {
    let host = Host::new("1s");
    let (code, stdout, stderr) = host.run(&["check"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("1 service(s), trusting 1 key(s) (threshold 1)"),
        "{stdout}"
    );
    // Status with no daemon and no journal says so and creates nothing.
    let (code, stdout, stderr) = host.run(&["status"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("nothing is installed yet"), "{stdout}");
    assert!(
        !host.state().exists(),
        "status made {}",
        host.state().display()
    );
    // A missing trust file is a problem of the config's `trust` key: exit 3.
    std::fs::remove_file(host.path("trust.json")).unwrap();
    let (code, _, stderr) = host.run(&["check"]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("trust: expected a trust file"), "{stderr}");
    assert!(
        !host.state().exists(),
        "check made {}",
        host.state().display()
    );
}
