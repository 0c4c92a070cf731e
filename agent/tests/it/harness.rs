//! A host for the agent's tests: a state directory, a trust file, demo
//! bundles packed through the library, and `turnout-agent` as a real process.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use turnout_proto::keys::SecretKey;
use turnout_proto::trust::{Trust, TrustFile};

pub(crate) const AGENT: &str = env!("CARGO_BIN_EXE_turnout-agent");

pub(crate) use turnout_testkit::{free_port, wait_for};

pub(crate) struct Host {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) port: u16,
    key: SecretKey,
    daemon: Option<Child>,
}

impl Host {
    /// A host with one exec-supervised demo service `web` whose http check
    /// probes every 100 ms, fails after 3 failures, and commits after `min_healthy`.
    pub(crate) fn new(min_healthy: &str) -> Host {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([42; 32]);
        let trust =
            Trust::new(1, 1, std::time::SystemTime::UNIX_EPOCH, vec![key.public()]).unwrap();
        std::fs::write(
            dir.path().join("trust.json"),
            TrustFile::unsigned(trust).to_bytes(),
        )
        .unwrap();
        let port = free_port();
        let host = Host {
            dir,
            port,
            key,
            daemon: None,
        };
        host.write_config(&format!(
            r#"
            state_dir = "{state}"
            trust = "{trust}"
            [[service]]
            name = "web"
            supervisor = "exec"
            exec = ["bin/demo", "--port", "{port}"]
            stop_timeout = "2s"
            [service.bake]
            min_healthy = "{min_healthy}"
            deadline = "20s"
            [[service.check]]
            kind = "http"
            url = "http://127.0.0.1:{port}/healthz"
            interval = "100ms"
            failure = 3
            start_period = "1s"
            "#,
            state = host.state().display(),
            trust = host.path("trust.json").display(),
        ));
        host
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub(crate) fn state(&self) -> PathBuf {
        self.path("state")
    }

    pub(crate) fn write_config(&self, text: &str) {
        std::fs::write(self.path("agent.toml"), text).unwrap();
    }

    /// Packs a demo release `version` that behaves as `mode`; returns its path.
    pub(crate) fn bundle(&self, version: &str, mode: &str) -> PathBuf {
        self.bundle_with(version, mode, &[])
    }

    /// Like [`bundle`](Self::bundle), with extra payload files.
    pub(crate) fn bundle_with(
        &self,
        version: &str,
        mode: &str,
        extra: &[(&str, Vec<u8>)],
    ) -> PathBuf {
        let script = format!(
            "#!/bin/sh\nexec {AGENT} demo-service --behaviour \"$(dirname \"$0\")/../behaviour.toml\" \"$@\"\n"
        );
        let behaviour = format!("version = \"{version}\"\nmode = \"{mode}\"\nafter = \"1s\"\n");
        let mut files: Vec<turnout_testkit::File<'_>> = vec![
            ("behaviour.toml", 0o644, behaviour.into_bytes()),
            ("bin/demo", 0o755, script.into_bytes()),
        ];
        files.extend(extra.iter().map(|(p, d)| (*p, 0o644, d.clone())));
        let path = self.path(&format!("web-{version}-{mode}.tnt"));
        turnout_testkit::write_bundle(&path, "web", version, "bin/demo", &files, &[&self.key]);
        path
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(AGENT);
        command
            .args(args)
            .env("TURNOUT_AGENT_CONFIG", self.path("agent.toml"));
        command
    }

    /// Runs a `turnout-agent` command to completion.
    pub(crate) fn agent(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs a command and returns (exit code, stdout, stderr).
    pub(crate) fn run(&self, args: &[&str]) -> (i32, String, String) {
        let out = self.agent(args);
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `install BUNDLE --service web`.
    pub(crate) fn install(&self, bundle: &Path) -> (i32, String, String) {
        self.run(&["install", bundle.to_str().unwrap(), "--service", "web"])
    }

    /// `status --json` for service web.
    pub(crate) fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.run(&["status", "--json"]);
        assert_eq!(code, 0, "status failed: {err}");
        let all: serde_json::Value = serde_json::from_str(&out).unwrap();
        all[0].clone()
    }

    /// Starts `turnout-agent run` with `env`, and waits until it answers.
    pub(crate) fn start_daemon(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("daemon.log"))
            .unwrap();
        let mut command = self.command(&["run"]);
        command
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log);
        self.daemon = Some(command.spawn().unwrap());
        let socket = self.state().join("agent.sock");
        wait_for(
            "the daemon's control socket",
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&socket).is_ok() || self.daemon_exited(),
        );
    }

    /// Whether the daemon process has exited (and reaps it).
    pub(crate) fn daemon_exited(&mut self) -> bool {
        match self.daemon.as_mut() {
            None => true,
            Some(child) => child.try_wait().unwrap().is_some(),
        }
    }

    /// SIGTERM to the daemon, then waits for it.
    pub(crate) fn stop_daemon(&mut self) {
        if let Some(mut child) = self.daemon.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = child.wait();
        }
    }

    /// The version the demo service answers with right now, if it answers.
    pub(crate) fn served_version(&self) -> Option<String> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.split("\r\n\r\n")
            .nth(1)
            .map(|body| body.trim().to_owned())
    }

    pub(crate) fn daemon_log(&self) -> String {
        std::fs::read_to_string(self.path("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.stop_daemon();
        // A daemon killed by a test leaves its service's process group behind.
        let pidfile = self.state().join("services/web/exec.pid");
        if let Some(pid) = std::fs::read_to_string(pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
        {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// The version field of a release object in status JSON.
pub(crate) fn version(release: &serde_json::Value) -> Option<&str> {
    release.get("version").and_then(|v| v.as_str())
}
