//! `turnout demo`: the whole system on this machine in about a minute.
//!
//! In a fresh temporary directory it makes release keys and a trust file,
//! packs three releases of a demo web service (v1, v2 and a v3 that fails
//! its health check), starts a coordinator and N agents (real processes:
//! `turnout agent run`, exec supervisor, each with its own state directory
//! and port), and then shows, live: v1 installed everywhere; v2 rolled out
//! through a canary and waves; v3's canary failing and the fleet rolling back
//! on its own; and a final table of every host. It cleans up after itself,
//! also on Ctrl-C, unless `--keep` leaves the fleet running to explore.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use turnout_proto::keys::SecretKey;
use turnout_proto::trust::{Trust, TrustFile};

use crate::client::Client;
use crate::coordinator::{Coordinator, Settings};
use crate::engine::{Rollout, State};
use crate::exit::Exit;
use crate::store::Role;

/// Arguments of `turnout demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// How many hosts (agents) to run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u16).range(1..=50))]
    pub hosts: u16,
    /// Leave the fleet running at the end, print how to drive it, and wait for Ctrl-C.
    #[arg(long)]
    pub keep: bool,
}

/// Everything to stop and remove, also from the Ctrl-C handler.
#[derive(Default)]
struct Cleanup {
    dir: Option<PathBuf>,
    agents: Vec<Child>,
}

impl Cleanup {
    fn run(&mut self) {
        for child in &mut self.agents {
            // SIGTERM: each agent stops its exec-supervised service on the way out.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        for child in &mut self.agents {
            let _ = child.wait();
        }
        self.agents.clear();
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn say(text: &str) {
    println!("\n==> {text}");
}

/// Runs the demo.
pub fn run(args: &Args) -> anyhow::Result<Exit> {
    let cleanup = Arc::new(Mutex::new(Cleanup::default()));
    {
        let cleanup = Arc::clone(&cleanup);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("a runtime");
            runtime.block_on(async { tokio::signal::ctrl_c().await.expect("a Ctrl-C handler") });
            eprintln!("\ninterrupted: stopping the fleet and removing its files");
            cleanup.lock().expect("not poisoned").run();
            std::process::exit(130);
        });
    }
    let result = demo(args, &cleanup);
    if !args.keep || result.is_err() {
        cleanup.lock().expect("not poisoned").run();
    }
    result
}

fn demo(args: &Args, cleanup: &Arc<Mutex<Cleanup>>) -> anyhow::Result<Exit> {
    let started = Instant::now();
    let exe = std::env::current_exe().context("finding this program")?;
    let dir = std::env::temp_dir().join(format!("turnout-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    cleanup.lock().expect("not poisoned").dir = Some(dir.clone());

    say(&format!(
        "Turnout demo in {}: release keys, a trust file, and three signed releases of a web service",
        dir.display()
    ));
    let key = SecretKey::from_seed(random_seed()?);
    // A private key, even a throwaway one: readable by its owner only.
    turnout_rt::files::write_atomic(&dir.join("release.key.pem"), key.to_pem().as_bytes(), 0o600)?;
    let trust = Trust::new(1, 1, SystemTime::now(), vec![key.public()])?;
    std::fs::write(
        dir.join("trust.json"),
        TrustFile::unsigned(trust.clone()).to_bytes(),
    )?;
    let mut bundles = Vec::new();
    for (version, mode, what) in [
        ("1.0.0", "healthy", "healthy"),
        ("2.0.0", "healthy", "healthy"),
        ("3.0.0", "unhealthy", "answers 503 on /healthz"),
    ] {
        let path = pack_demo(&dir, &exe, &key, version, mode)?;
        println!("    packed and signed web {version} ({what})");
        bundles.push(path);
    }

    say(
        "Starting a coordinator on 127.0.0.1 (one process, one SQLite file), over TLS with its own CA",
    );
    let settings = Settings {
        report_interval: Duration::from_secs(1),
        tick: Duration::from_millis(100),
        ..Settings::default()
    };
    let coordinator = Arc::new(Coordinator::open(
        &dir.join("coordinator"),
        trust,
        settings,
    )?);
    let admin = coordinator
        .with_store(|s| s.create_token("demo", Role::Admin, None, coordinator.now_ms()))?
        .map_err(|refusal| anyhow::anyhow!("{refusal}"))?;
    let tls_paths = crate::tls::Paths::in_state_dir(&dir.join("coordinator"));
    crate::tls::init(
        &tls_paths,
        &["127.0.0.1".to_owned(), "localhost".to_owned()],
        SystemTime::now(),
    )?;
    let pins = crate::tls::pins(&tls_paths)?;
    coordinator.set_ca(pins.clone(), Some(std::fs::read_to_string(&tls_paths.ca)?));
    let served = crate::tls::Reloading::open(&tls_paths.cert, &tls_paths.key, SystemTime::now())?;
    let cas = turnout_rt::tls::certificates_from_pem(&std::fs::read(&tls_paths.ca)?)?;
    let (url_tx, url_rx) = std::sync::mpsc::channel();
    let serving = Arc::clone(&coordinator);
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        runtime.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("a loopback port");
            let _ = url_tx.send(format!(
                "https://{}",
                listener.local_addr().expect("an address")
            ));
            let acceptor = crate::tls::acceptor(served);
            let _ = crate::server::serve(serving, listener, Some(acceptor), std::future::pending())
                .await;
        });
    });
    let url = url_rx.recv().context("starting the coordinator")?;
    let client = Client::with_ca(&url, Some(admin.clone()), &cas);
    for bundle in &bundles {
        let _: Value = client.post_stream("/v1/bundles", &mut std::fs::File::open(bundle)?)?;
    }
    println!(
        "    listening on {url} (CA pin {}); pushed the three bundles (each verified against the trust file)",
        pins.first().map(ToString::to_string).unwrap_or_default()
    );

    say(&format!(
        "Starting {} hosts: each joins with the CA pin, then a `turnout agent run` with the demo service under the exec supervisor",
        args.hosts
    ));
    let token: Value = client.post(
        "/v1/tokens",
        &json!({"enroll": true, "uses": args.hosts, "ttl_secs": 600}),
    )?;
    let token = token["token"].as_str().unwrap_or_default().to_owned();
    for i in 1..=args.hosts {
        let host = format!("host-{i}");
        let home = dir.join(&host);
        std::fs::create_dir_all(&home)?;
        let port = free_port()?;
        let config = home.join("agent.toml");
        std::fs::write(&config, agent_config(&home, &dir.join("trust.json"), port))?;
        let enrolled = Command::new(&exe)
            .args([
                "agent",
                "enroll",
                "--coordinator",
                &url,
                "--token",
                &token,
                "--host",
                &host,
                "--ca-pin",
                &pins.first().map(ToString::to_string).unwrap_or_default(),
            ])
            .env("TURNOUT_AGENT_CONFIG", &config)
            .output()?;
        if !enrolled.status.success() {
            bail!(
                "{host} could not enroll: {}",
                String::from_utf8_lossy(&enrolled.stderr)
            );
        }
        let log = std::fs::File::create(home.join("agent.log"))?;
        let child = Command::new(&exe)
            .args(["agent", "run"])
            .env("TURNOUT_AGENT_CONFIG", &config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()?;
        cleanup.lock().expect("not poisoned").agents.push(child);
        println!("    {host}: enrolled with its own ed25519 key; demo service on 127.0.0.1:{port}");
    }
    wait_until(
        "every host to say hello and report",
        Duration::from_secs(30),
        || {
            let hosts: Vec<Value> = client.get("/v1/hosts").unwrap_or_default();
            hosts.len() == usize::from(args.hosts)
                && hosts
                    .iter()
                    .all(|h| h["state"] == "online" && !h["report"].is_null())
        },
    )?;

    say("Rollout 1: install web 1.0.0 on every host, two at a time");
    rollout(
        &client,
        &json!({"service": "web", "release": "web@1.0.0", "waves": ["100%"], "max_parallel": 2}),
    )?;

    say(
        "Rollout 2: web 2.0.0 through a canary, then 50%, then everyone; each host bakes on its health check",
    );
    rollout(
        &client,
        &json!({"service": "web", "release": "web@2.0.0", "waves": ["1", "50%", "100%"], "max_parallel": 2, "bake": "1s"}),
    )?;

    say(
        "Rollout 3: web 3.0.0, which fails its health check: the canary reverts itself, the gate trips, the rollout rolls back",
    );
    rollout(
        &client,
        &json!({"service": "web", "release": "web@3.0.0", "waves": ["1", "100%"], "max_parallel": 2}),
    )?;

    say("The fleet now");
    let hosts: Vec<Value> = client.get("/v1/hosts")?;
    println!(
        "    {:<10} {:<8} {:<10} {:<8} LAST OUTCOME",
        "HOST", "STATE", "COMMITTED", "SLOT"
    );
    for host in &hosts {
        let web = &host["report"]["services"][0];
        println!(
            "    {:<10} {:<8} {:<10} {:<8} {} {}",
            host["id"].as_str().unwrap_or_default(),
            host["state"].as_str().unwrap_or_default(),
            web["committed"]["version"].as_str().unwrap_or("-"),
            web["active_slot"].as_str().unwrap_or("-"),
            web["last_outcome"]["kind"].as_str().unwrap_or("-"),
            web["last_outcome"]["release"]["version"]
                .as_str()
                .unwrap_or("")
        );
    }
    let all_v2 = hosts
        .iter()
        .all(|h| h["report"]["services"][0]["committed"]["version"] == "2.0.0");
    println!(
        "\nDone in {:.0} s: v1 everywhere, v2 rolled out wave by wave, v3 refused by its canary and rolled back; every host runs 2.0.0.",
        started.elapsed().as_secs_f64()
    );
    if !all_v2 {
        bail!(
            "not every host ended on 2.0.0; the agents' logs are in {}",
            dir.display()
        );
    }
    if args.keep {
        println!("\nThe fleet keeps running. Drive it from another terminal:");
        println!(
            "    export TURNOUT_COORDINATOR={url} TURNOUT_TOKEN={admin} TURNOUT_CA={}",
            tls_paths.ca.display()
        );
        println!("    turnout host list");
        println!("    turnout rollout start --service web --release web@3.0.0 --waves 1,100%");
        println!("    turnout rollout watch web-3.0.0-2");
        println!(
            "Files, agent logs and keys are in {}. Ctrl-C stops everything and removes them.",
            dir.display()
        );
        loop {
            std::thread::park();
        }
    }
    Ok(Exit::Success)
}

/// Starts a rollout and prints its events until it finishes.
fn rollout(client: &Client, spec: &Value) -> anyhow::Result<()> {
    let started: Rollout = client.post("/v1/rollouts", &json!({"spec": spec}))?;
    let mut after = 0;
    loop {
        let events: Vec<Value> = client.get(&format!(
            "/v1/events?after={after}&rollout={}&wait=5s",
            started.id
        ))?;
        for event in &events {
            after = event["id"].as_u64().unwrap_or(after);
            println!(
                "    {:<8} {}",
                event["host"].as_str().unwrap_or(""),
                event["message"].as_str().unwrap_or_default()
            );
        }
        let rollout: Rollout = client.get(&format!("/v1/rollouts/{}", started.id))?;
        if rollout.state.is_finished() && events.is_empty() {
            println!("    => {}", rollout.state.name());
            return match (&rollout.state, spec["release"].as_str()) {
                (State::Succeeded, _) | (State::RolledBack, Some("web@3.0.0")) => Ok(()),
                (state, _) => bail!("rollout {} ended {}", rollout.id, state.name()),
            };
        }
    }
}

fn wait_until(
    what: &str,
    within: Duration,
    mut condition: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !condition() {
        if Instant::now() > deadline {
            bail!("timed out waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn random_seed() -> anyhow::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("the random source: {e}"))?;
    Ok(seed)
}

fn free_port() -> anyhow::Result<u16> {
    Ok(turnout_rt::net::free_port()?)
}

fn agent_config(home: &Path, trust: &Path, port: u16) -> String {
    format!(
        r#"state_dir = "{state}"
trust = "{trust}"
labels = {{ role = "web" }}

[[service]]
name = "web"
supervisor = "exec"
exec = ["bin/web", "--port", "{port}"]
stop_timeout = "2s"
[service.bake]
min_healthy = "1s"
deadline = "15s"
[[service.check]]
kind = "http"
url = "http://127.0.0.1:{port}/healthz"
interval = "200ms"
failure = 3
# The demo service listens at once; a real one may need the default 15s.
start_period = "2s"
"#,
        state = home.join("state").display(),
        trust = trust.display()
    )
}

/// Packs a demo release: an entry script running this program's demo
/// service, and the behaviour file that makes it healthy or not.
fn pack_demo(
    dir: &Path,
    exe: &Path,
    key: &SecretKey,
    version: &str,
    mode: &str,
) -> anyhow::Result<PathBuf> {
    let src = dir.join(format!("src-{version}"));
    std::fs::create_dir_all(src.join("bin"))?;
    let script = src.join("bin/web");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nexec \"{}\" demo-service --behaviour \"$(dirname \"$0\")/../behaviour.toml\" \"$@\"\n",
            exe.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::write(
        src.join("behaviour.toml"),
        format!("version = \"{version}\"\nmode = \"{mode}\"\n"),
    )?;
    let out = dir.join(format!("web-{version}.tnt"));
    let args = crate::cmd::pack::Args {
        dir: src,
        name: "web".parse()?,
        version: version.parse()?,
        entry: turnout_proto::manifest::PayloadPath::new("bin/web").map_err(anyhow::Error::msg)?,
        expires: None,
        provides: vec![],
        requires: vec![],
        keys: vec![],
        out: Some(out.clone()),
    };
    crate::cmd::pack::pack(&args, std::slice::from_ref(key))?;
    Ok(out)
}
