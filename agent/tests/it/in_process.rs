//! The install cycle in this process: the real journal, slots and bundle
//! checks on a temporary directory, with a fake supervisor, a manual clock
//! and paused tokio time, so bakes of many seconds take none. These prove
//! the effect interpreter itself (commit, revert, recovery after a crash,
//! an expired bundle) in milliseconds, where the process tests prove the
//! same through real children and real time.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use turnout_agent::config::Config;
use turnout_agent::service::Agent;
use turnout_agent::slots::ServiceDir;
use turnout_agent::supervisor::Supervisor;
use turnout_agent::supervisor::fake::{CRASH_MARKER, Fake};
use turnout_proto::keys::SecretKey;
use turnout_proto::messages::OutcomeKind;
use turnout_proto::trust::{Trust, TrustFile};
use turnout_rt::ManualClock;

struct World {
    dir: tempfile::TempDir,
    key: SecretKey,
    clock: Arc<ManualClock>,
}

impl World {
    fn new() -> World {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([7; 32]);
        let trust = Trust::new(1, 1, std::time::UNIX_EPOCH, vec![key.public()]).unwrap();
        std::fs::write(
            dir.path().join("trust.json"),
            TrustFile::unsigned(trust).to_bytes(),
        )
        .unwrap();
        World {
            dir,
            key,
            clock: ManualClock::at(SystemTime::now()),
        }
    }

    /// A config with one systemd-supervised service `web`, judged by its
    /// supervisor (the fake) for `min_healthy`.
    fn config(&self, min_healthy: &str) -> Config {
        Config::parse(&format!(
            r#"
            state_dir = "{state}"
            trust = "{trust}"
            [[service]]
            name = "web"
            supervisor = "systemd"
            unit = "web.service"
            [service.bake]
            min_healthy = "{min_healthy}"
            deadline = "120s"
            [[service.check]]
            kind = "systemd"
            interval = "1s"
            start_period = "0s"
            "#,
            state = self.dir.path().join("state").display(),
            trust = self.dir.path().join("trust.json").display(),
        ))
        .unwrap()
    }

    /// An agent on this world's state, supervised by `fake`.
    fn agent(&self, min_healthy: &str, fake: &Arc<Fake>) -> Agent {
        let fake = Arc::clone(fake);
        Agent::open_with(
            self.config(min_healthy),
            self.clock.clone(),
            &move |_: &turnout_agent::config::ServiceConfig, _: &ServiceDir| {
                Arc::clone(&fake) as Arc<dyn Supervisor>
            },
        )
        .unwrap()
    }

    /// A release of web: a crashing one holds the fake's crash marker.
    fn bundle(&self, version: &str, crashes: bool, expires: Option<SystemTime>) -> PathBuf {
        let mut files: Vec<turnout_testkit::File<'_>> = vec![(
            "bin/web",
            0o755,
            format!("#!/bin/sh\n# {version}\n").into_bytes(),
        )];
        if crashes {
            files.push((CRASH_MARKER, 0o644, b"crash".to_vec()));
        }
        let path = self.dir.path().join(format!("web-{version}.tnt"));
        turnout_testkit::write_bundle_expiring(
            &path,
            "web",
            version,
            "bin/web",
            &files,
            &[&self.key],
            expires,
        );
        path
    }
}

async fn committed(agent: &Agent) -> Option<String> {
    let status = agent.status().await.unwrap();
    status[0].committed.as_ref().map(|c| c.version.to_string())
}

async fn install(agent: &Agent, bundle: &Path) -> OutcomeKind {
    agent.install("web", bundle, None).await.unwrap().kind()
}

#[tokio::test(start_paused = true)]
async fn a_healthy_release_bakes_and_commits() {
    let world = World::new();
    let fake = Arc::new(Fake::new());
    let agent = world.agent("30s", &fake);
    let v1 = world.bundle("1.0.0", false, None);
    let started = tokio::time::Instant::now();
    assert_eq!(install(&agent, &v1).await, OutcomeKind::Committed);
    assert!(
        tokio::time::Instant::now() - started >= Duration::from_secs(30),
        "it baked for min_healthy (in paused time)"
    );
    assert_eq!(committed(&agent).await.as_deref(), Some("1.0.0"));
    assert!(fake.running().is_some(), "the release runs");
    let history = agent.history("web", 10).unwrap();
    assert_eq!(history[0].kind, OutcomeKind::Committed);
}

#[tokio::test(start_paused = true)]
async fn a_crashing_release_is_reverted_to_the_committed_one() {
    let world = World::new();
    let fake = Arc::new(Fake::new());
    let agent = world.agent("30s", &fake);
    assert_eq!(
        install(&agent, &world.bundle("1.0.0", false, None)).await,
        OutcomeKind::Committed
    );
    let starts = fake.starts();
    let result = agent
        .install("web", &world.bundle("2.0.0", true, None), None)
        .await
        .unwrap();
    assert_eq!(result.kind(), OutcomeKind::Reverted, "{}", result.summary);
    assert!(
        result.summary.contains("not running") || result.summary.contains("crashed"),
        "{}",
        result.summary
    );
    assert_eq!(committed(&agent).await.as_deref(), Some("1.0.0"));
    assert_eq!(fake.starts(), starts + 2, "2.0.0 started, then 1.0.0 again");
    assert!(fake.running().is_some(), "1.0.0 runs again");
    let status = agent.status().await.unwrap();
    assert_eq!(status[0].state, "idle");
}

#[tokio::test(start_paused = true)]
async fn a_crash_mid_bake_is_recovered_to_the_previous_release() {
    let world = World::new();
    let fake = Arc::new(Fake::new());
    {
        let agent = world.agent("60s", &fake);
        assert_eq!(
            install(&agent, &world.bundle("1.0.0", false, None)).await,
            OutcomeKind::Committed
        );
        // The agent dies while 2.0.0 bakes: its install is dropped mid-way.
        let v2 = world.bundle("2.0.0", false, None);
        tokio::select! {
            result = agent.install("web", &v2, None) => panic!("the bake ended: {result:?}"),
            () = async {
                while agent.state_name("web").unwrap() != "baking" {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            } => {}
        }
    }
    // A new agent (after a reboot: nothing runs) recovers from the journal.
    let rebooted = Arc::new(Fake::new());
    let agent = world.agent("60s", &rebooted);
    assert_eq!(agent.state_name("web").unwrap(), "baking");
    for (name, recovered) in agent.recover_all().await {
        recovered.unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert_eq!(agent.state_name("web").unwrap(), "idle");
    assert_eq!(committed(&agent).await.as_deref(), Some("1.0.0"));
    let history = agent.history("web", 10).unwrap();
    assert_eq!(history[0].kind, OutcomeKind::Interrupted, "{history:?}");
    assert!(rebooted.running().is_some(), "1.0.0 was started again");
}

#[tokio::test(start_paused = true)]
async fn an_expired_bundle_is_rejected_by_the_agents_clock_and_touches_nothing() {
    let world = World::new();
    let fake = Arc::new(Fake::new());
    let agent = world.agent("5s", &fake);
    let in_an_hour = world.clock.now_plus(Duration::from_secs(3600));
    assert_eq!(
        install(&agent, &world.bundle("1.0.0", false, Some(in_an_hour))).await,
        OutcomeKind::Committed,
        "not expired yet"
    );
    let v2 = world.bundle("2.0.0", false, Some(in_an_hour));
    world.clock.advance(Duration::from_secs(2 * 3600));
    let starts = fake.starts();
    let result = agent.install("web", &v2, None).await.unwrap();
    assert_eq!(result.kind(), OutcomeKind::Rejected, "{}", result.summary);
    assert!(result.summary.contains("expired"), "{}", result.summary);
    assert_eq!(committed(&agent).await.as_deref(), Some("1.0.0"));
    assert_eq!(fake.starts(), starts, "nothing was restarted");
}

/// One line from a control-socket connection.
async fn control_line(stream: &mut tokio::net::UnixStream) -> String {
    use tokio::io::AsyncBufReadExt as _;
    let mut line = String::new();
    tokio::io::BufReader::new(stream)
        .read_line(&mut line)
        .await
        .unwrap();
    line
}

#[tokio::test]
async fn the_control_socket_answers_while_clients_hang_and_turns_a_flood_away() {
    use tokio::io::AsyncWriteExt as _;
    use turnout_agent::control::{Limits, serve_with};
    let world = World::new();
    let fake = Arc::new(Fake::new());
    let agent = Arc::new(world.agent("1s", &fake));
    let path = world.dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let limits = Limits {
        max_connections: 2,
        request_timeout: Duration::from_millis(300),
    };
    let server = tokio::spawn(serve_with(
        agent,
        listener,
        async move {
            let _ = stopped.await;
        },
        limits,
    ));
    // Two clients that never send a request take both places ...
    let mut idle = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut half = tokio::net::UnixStream::connect(&path).await.unwrap();
    half.write_all(br#"{"v":1,"op":"sta"#).await.unwrap();
    // ... so a third is told to try again, at once.
    let mut third = tokio::net::UnixStream::connect(&path).await.unwrap();
    let busy = control_line(&mut third).await;
    assert!(
        busy.contains("answering 2 local commands already"),
        "{busy}"
    );
    // The idle and the half-sent ones are closed after the timeout, saying why.
    for stream in [&mut idle, &mut half] {
        let closed = control_line(stream).await;
        assert!(closed.contains("no request line within 300ms"), "{closed}");
    }
    // Then a status request is answered.
    let mut ok = tokio::net::UnixStream::connect(&path).await.unwrap();
    ok.write_all(b"{\"v\":1,\"op\":\"status\"}\n")
        .await
        .unwrap();
    let status = control_line(&mut ok).await;
    assert!(status.starts_with("{\"status\":"), "{status}");
    // A line longer than the daemon reads is refused by name.
    let mut long = tokio::net::UnixStream::connect(&path).await.unwrap();
    let mut line = br#"{"v":1,"op":"status","pad":""#.to_vec();
    line.extend(std::iter::repeat_n(b'x', 70 * 1024));
    // The daemon stops reading at 64 KiB and answers: the rest may not fit.
    let _ = long.write_all(&line).await;
    let refused = control_line(&mut long).await;
    assert!(refused.contains("longer than 65536 bytes"), "{refused}");
    let _ = stop.send(());
    server.await.unwrap();
}
