//! The fleet harness for the workspace end-to-end tests: a coordinator as a
//! child process (`turnout serve`), agents as child processes (`turnout agent
//! run`, exec supervisor, the demo service), signed demo releases, and a
//! proxy that can cut one host off or stall its answers ([`proxy`]).
//! Everything listens on 127.0.0.1 only, over TLS as in production.

pub mod hostile;
pub mod http;
pub mod proxy;

pub use proxy::{Proxy, ProxyTls};

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use turnout::client::Client;
use turnout::engine::Rollout;
use turnout_proto::keys::SecretKey;
use turnout_proto::trust::{Trust, TrustFile};

/// The `turnout` binary built beside this test (one binary runs both sides).
pub fn turnout_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let bin = dir.join("turnout");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo test --workspace` (or `cargo build --bin turnout`) first",
        bin.display()
    );
    bin
}

pub use turnout_testkit::{free_port, wait_for};

fn signal(child: &Child, signal: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), signal);
}

/// One agent host.
pub struct Host {
    /// Its id.
    pub id: String,
    /// Its demo service's port.
    pub port: u16,
    config: PathBuf,
    env: Vec<(String, String)>,
    child: Option<Child>,
    /// The proxy between it and the coordinator, when it has one.
    pub proxy: Option<Proxy>,
    /// The `turnout` binary its agent runs (this build's, or an older
    /// release's: `tests/compat`).
    pub bin: PathBuf,
}

impl Host {
    /// A host `id` living in `home`, trusting releases by the trust file at
    /// `trust`, managing service `web` (exec, the demo service on a free
    /// port) with a bake of `min_healthy`. Not enrolled, not started.
    pub fn new(id: &str, home: &Path, trust: &Path, min_healthy: &str) -> Host {
        std::fs::create_dir_all(home).unwrap();
        let port = free_port();
        let config = home.join("agent.toml");
        std::fs::write(
            &config,
            format!(
                "state_dir = \"{}\"\ntrust = \"{}\"\nlabels = {{ role = \"web\" }}\n[[service]]\nname = \"web\"\nsupervisor = \"exec\"\nexec = [\"bin/web\", \"--port\", \"{port}\"]\nstop_timeout = \"2s\"\n[service.bake]\nmin_healthy = \"{min_healthy}\"\ndeadline = \"15s\"\n[[service.check]]\nkind = \"http\"\nurl = \"http://127.0.0.1:{port}/healthz\"\ninterval = \"100ms\"\nfailure = 3\nstart_period = \"5s\"\n",
                home.join("state").display(),
                trust.display(),
            ),
        )
        .unwrap();
        Host {
            id: id.to_owned(),
            port,
            config,
            env: Vec::new(),
            child: None,
            proxy: None,
            bin: turnout_bin(),
        }
    }

    /// `turnout agent enroll` with `token` at `url` (`--ca-pin pin` when
    /// given); panics when it fails.
    pub fn enroll(&self, url: &str, token: &str, pin: Option<&str>) {
        let mut command = Command::new(&self.bin);
        command
            .args([
                "agent",
                "enroll",
                "--coordinator",
                url,
                "--token",
                token,
                "--host",
                &self.id,
            ])
            .env("TURNOUT_AGENT_CONFIG", &self.config);
        if let Some(pin) = pin {
            command.args(["--ca-pin", pin]);
        }
        let enrolled = command.output().unwrap();
        assert!(
            enrolled.status.success(),
            "{}",
            String::from_utf8_lossy(&enrolled.stderr)
        );
    }

    /// The pid of its service's main process now, if it runs.
    pub fn service_pid(&self) -> Option<i32> {
        std::fs::read_to_string(
            self.config
                .with_file_name("state")
                .join("services/web/exec.pid"),
        )
        .ok()
        .and_then(|p| p.trim().parse().ok())
    }

    /// `turnout agent status` as text.
    pub fn status_text(&self) -> String {
        let out = Command::new(&self.bin)
            .args(["agent", "status"])
            .env("TURNOUT_AGENT_CONFIG", &self.config)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The version its service answers with now.
    pub fn served(&self) -> Option<String> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream
            .write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).ok()?;
        text.split("\r\n\r\n").nth(1).map(|b| b.trim().to_owned())
    }

    /// `turnout agent status --json` for its service.
    pub fn status(&self) -> Value {
        let out = Command::new(&self.bin)
            .args(["agent", "status", "--json"])
            .env("TURNOUT_AGENT_CONFIG", &self.config)
            .output()
            .unwrap();
        let all: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        all[0].clone()
    }

    /// Starts its agent with `extra` environment.
    pub fn start(&mut self, extra: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.config.with_file_name("agent.log"))
            .unwrap();
        let mut command = Command::new(&self.bin);
        command
            .args(["agent", "run"])
            .env("TURNOUT_AGENT_CONFIG", &self.config)
            .stdout(Stdio::null())
            .stderr(log);
        command.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        command.envs(extra.iter().copied());
        self.child = Some(command.spawn().unwrap());
        let socket = self.config.with_file_name("state").join("agent.sock");
        wait_for(
            &format!("{}'s agent to start", self.id),
            Duration::from_secs(20),
            || std::os::unix::net::UnixStream::connect(&socket).is_ok(),
        );
    }

    /// Kills its agent with SIGKILL (its service process group lives on).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.config.with_file_name("agent.log")).unwrap_or_default()
    }

    /// Stops its agent (SIGTERM) and kills its service's process group.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            signal(&child, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        let pidfile = self
            .config
            .with_file_name("state")
            .join("services/web/exec.pid");
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

/// How to build a fleet.
pub struct Options {
    /// How many hosts.
    pub hosts: usize,
    /// The agents' bake: all checks green this long.
    pub min_healthy: &'static str,
    /// Environment for host `i` (0-based).
    pub env: Box<dyn Fn(usize) -> Vec<(String, String)>>,
    /// Hosts reaching the coordinator through a [`Proxy`].
    pub proxied: Vec<usize>,
    /// The `turnout` binary host `i` runs its agent with (None: this build's).
    pub agent_bin: Box<dyn Fn(usize) -> Option<PathBuf>>,
    /// The `turnout` binary the coordinator runs (None: this build's).
    pub coordinator_bin: Option<PathBuf>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            hosts: 3,
            min_healthy: "300ms",
            env: Box::new(|_| Vec::new()),
            proxied: Vec::new(),
            agent_bin: Box::new(|_| None),
            coordinator_bin: None,
        }
    }
}

/// A coordinator and its hosts.
pub struct Fleet {
    /// Everything lives here.
    pub dir: tempfile::TempDir,
    /// The coordinator's URL.
    pub url: String,
    /// An admin token.
    pub admin: String,
    /// The coordinator's CA pin, which hosts join with.
    pub pin: String,
    /// Extra arguments of `turnout serve` at the next (re)start.
    pub coordinator_args: Vec<String>,
    /// The `turnout` binary the coordinator runs at the next (re)start.
    pub coordinator_bin: PathBuf,
    port: u16,
    coordinator: Option<Child>,
    /// The hosts.
    pub hosts: Vec<Host>,
    key: SecretKey,
}

impl Fleet {
    /// Starts a coordinator, pushes web 1.0.0, 2.0.0 and 3.0.0 (unhealthy),
    /// enrolls and starts the hosts, and waits until every host reported.
    pub fn start(options: Options) -> Fleet {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([3; 32]);
        let trust = Trust::new(1, 1, SystemTime::UNIX_EPOCH, vec![key.public()]).unwrap();
        std::fs::write(
            dir.path().join("trust.json"),
            TrustFile::unsigned(trust).to_bytes(),
        )
        .unwrap();
        let port = free_port();
        let mut fleet = Fleet {
            url: format!("https://127.0.0.1:{port}"),
            admin: String::new(),
            pin: String::new(),
            coordinator_args: Vec::new(),
            coordinator_bin: options.coordinator_bin.clone().unwrap_or_else(turnout_bin),
            port,
            coordinator: None,
            hosts: Vec::new(),
            key,
            dir,
        };
        fleet.admin = fleet.start_coordinator(true).unwrap();
        fleet.pin = turnout_rt::tls::Pin::of_certificate(&fleet.ca()[0])
            .unwrap()
            .to_string();
        for (version, mode) in [
            ("1.0.0", "healthy"),
            ("2.0.0", "healthy"),
            ("3.0.0", "unhealthy"),
        ] {
            fleet.push(&fleet.bundle(version, mode, &fleet.key));
        }
        let token: Value = fleet
            .client()
            .post(
                "/v1/tokens",
                &json!({"enroll": true, "uses": options.hosts}),
            )
            .unwrap();
        for i in 0..options.hosts {
            let id = format!("host-{i:02}");
            let mut host = Host::new(
                &id,
                &fleet.dir.path().join(&id),
                &fleet.dir.path().join("trust.json"),
                options.min_healthy,
            );
            let proxy = options.proxied.contains(&i).then(|| {
                Proxy::start(
                    port,
                    Some(ProxyTls::relay(&fleet.dir.path().join("coordinator"))),
                )
            });
            let via = proxy.as_ref().map_or(fleet.url.clone(), |p| {
                format!("https://127.0.0.1:{}", p.port)
            });
            if let Some(bin) = (options.agent_bin)(i) {
                host.bin = bin;
            }
            host.enroll(&via, token["token"].as_str().unwrap(), Some(&fleet.pin));
            host.env = (options.env)(i);
            host.proxy = proxy;
            host.start(&[]);
            fleet.hosts.push(host);
        }
        fleet.wait_reported();
        fleet
    }

    /// Waits until every compatible host is online and has reported.
    pub fn wait_reported(&self) {
        wait_for("every host to report", Duration::from_secs(30), || {
            let hosts: Vec<Value> = self.client().get("/v1/hosts").unwrap_or_default();
            hosts.len() == self.hosts.len()
                && hosts.iter().all(|h| {
                    h["state"] == "incompatible"
                        || (h["state"] == "online" && !h["report"].is_null())
                })
        });
    }

    /// (Re)starts the coordinator on the same database; returns the admin token on `init`.
    pub fn start_coordinator(&mut self, init: bool) -> Option<String> {
        let mut command = Command::new(&self.coordinator_bin);
        command
            .args([
                "serve",
                "--listen",
                &format!("127.0.0.1:{}", self.port),
                "--report-interval",
                "500ms",
                "--state-dir",
            ])
            .arg(self.dir.path().join("coordinator"))
            .arg("--trust")
            .arg(self.dir.path().join("trust.json"))
            .args(&self.coordinator_args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        if init {
            command
                .arg("--init")
                .arg("--profile")
                .arg(self.dir.path().join("profile.toml"));
        }
        let mut child = command.spawn().unwrap();
        let token = init.then(|| {
            let mut line = String::new();
            BufReader::new(child.stdout.as_mut().unwrap())
                .read_line(&mut line)
                .unwrap();
            line.trim().rsplit(' ').next().unwrap().to_owned()
        });
        self.coordinator = Some(child);
        wait_for("the coordinator to listen", Duration::from_secs(20), || {
            TcpStream::connect(("127.0.0.1", self.port)).is_ok()
        });
        token
    }

    /// Kills the coordinator with SIGKILL.
    pub fn kill_coordinator(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            signal(&child, nix::sys::signal::Signal::SIGKILL);
            let _ = child.wait();
        }
    }

    /// The coordinator's CA (made by `turnout serve --init`).
    pub fn ca(&self) -> Vec<turnout_rt::tls::CertificateDer<'static>> {
        let pem = std::fs::read(self.dir.path().join("coordinator/tls/ca.pem")).unwrap();
        turnout_rt::tls::certificates_from_pem(&pem).unwrap()
    }

    /// `turnout ARGS…` (this build's) as the admin, against this fleet's
    /// coordinator and trusting its CA.
    pub fn turnout(&self, args: &[&str]) -> std::process::Output {
        Command::new(turnout_bin())
            .args(args)
            .args(["--coordinator", &self.url, "--token", &self.admin, "--ca"])
            .arg(self.dir.path().join("coordinator/tls/ca.pem"))
            .output()
            .unwrap()
    }

    /// An admin client, trusting the coordinator's CA.
    pub fn client(&self) -> Client {
        Client::with_ca(&self.url, Some(self.admin.clone()), &self.ca())
    }

    /// A one-script demo release of `web` signed by `key`.
    pub fn bundle(&self, version: &str, mode: &str, key: &SecretKey) -> PathBuf {
        demo_bundle(self.dir.path(), version, mode, key)
    }

    /// Pushes a bundle through the API.
    pub fn push(&self, bundle: &Path) -> Value {
        self.client()
            .post_stream("/v1/bundles", &mut std::fs::File::open(bundle).unwrap())
            .unwrap()
    }

    /// Starts a rollout of `spec`; returns its id.
    pub fn rollout(&self, spec: Value) -> String {
        let rollout: Rollout = self
            .client()
            .post("/v1/rollouts", &json!({"spec": spec}))
            .unwrap();
        rollout.id
    }

    /// The coordinator's `/metrics` page.
    pub fn metrics(&self) -> String {
        self.client().get_text("/metrics").unwrap()
    }

    /// Rounds of the coordinator's rollout loop so far, from `/metrics`.
    pub fn engine_rounds(&self) -> u64 {
        let text = self.metrics();
        text.lines()
            .find_map(|line| line.strip_prefix("turnout_engine_rounds_total "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or_else(|| panic!("no turnout_engine_rounds_total in /metrics:\n{text}"))
    }

    /// The rollout `id` now.
    pub fn get(&self, id: &str) -> Rollout {
        self.client().get(&format!("/v1/rollouts/{id}")).unwrap()
    }

    /// Waits until rollout `id` is in state `name`.
    #[track_caller]
    pub fn wait_state(&self, id: &str, name: &str, within: Duration) -> Rollout {
        wait_for(&format!("rollout {id} to be {name}"), within, || {
            self.get(id).state.name() == name
        });
        self.get(id)
    }

    /// The event-log messages of rollout `id`, as `host message`.
    pub fn events(&self, id: &str) -> Vec<String> {
        let events: Vec<Value> = self
            .client()
            .get(&format!("/v1/events?rollout={id}"))
            .unwrap();
        events
            .iter()
            .map(|e| {
                format!(
                    "{} {}",
                    e["host"].as_str().unwrap_or("-"),
                    e["message"].as_str().unwrap_or_default()
                )
            })
            .collect()
    }

    /// Installs web `version` on every host through a rollout.
    pub fn install_everywhere(&self, version: &str) {
        let id = self.rollout(json!({"service": "web", "release": format!("web@{version}"), "waves": ["100%"], "max_parallel": self.hosts.len()}));
        self.wait_state(&id, "succeeded", Duration::from_secs(40));
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.stop();
        }
        self.kill_coordinator();
    }
}

/// A one-script demo release of `web` (the demo service in `mode`:
/// healthy or unhealthy) signed by `key`, written in `dir`.
pub fn demo_bundle(dir: &Path, version: &str, mode: &str, key: &SecretKey) -> PathBuf {
    demo_bundle_signed(dir, version, mode, &[key])
}

/// Like [`demo_bundle`], signed by each of `keys`.
pub fn demo_bundle_signed(dir: &Path, version: &str, mode: &str, keys: &[&SecretKey]) -> PathBuf {
    let script = format!("#!/bin/sh\nexec \"{}\" demo-service --behaviour \"$(dirname \"$0\")/../behaviour.toml\" \"$@\"\n", turnout_bin().display()).into_bytes();
    let behaviour = format!("version = \"{version}\"\nmode = \"{mode}\"\n").into_bytes();
    let signers: Vec<String> = keys.iter().map(|k| k.public().id().to_string()).collect();
    let path = dir.join(format!("web-{version}-{mode}-{}.tnt", signers.join("-")));
    turnout_testkit::write_bundle(
        &path,
        "web",
        version,
        "bin/web",
        &[
            ("behaviour.toml", 0o644, behaviour),
            ("bin/web", 0o755, script),
        ],
        keys,
    );
    path
}
