//! `turnout-agent install-unit`: puts the agent on a host as a systemd
//! service, from the files in the repository's `systemd/` and `docs/`.

use std::path::Path;
use std::process::Command;

const UNIT: &str = include_str!("../../systemd/turnout-agent.service");
const TMPFILES: &str = include_str!("../../systemd/turnout.tmpfiles.conf");
const CONFIG: &str = include_str!("../../systemd/agent.toml.example");
const SERVICE_TEMPLATE: &str = include_str!("../../systemd/web.service.example");
const OPERATIONS: &str = include_str!("../../docs/operations.md");

fn write(
    root: &Path,
    path: &str,
    text: &str,
    mode: u32,
    keep_existing: bool,
) -> anyhow::Result<bool> {
    let dest = root.join(path.trim_start_matches('/'));
    if keep_existing && dest.exists() {
        return Ok(false);
    }
    std::fs::create_dir_all(dest.parent().expect("paths have parents"))?;
    turnout_rt::files::write_atomic(&dest, text.as_bytes(), mode)?;
    Ok(true)
}

/// Installs under `root`; on `/` also reloads systemd and creates the directories.
pub fn install(root: &Path) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    // `turnout agent …` carries the agent too: install whichever binary this is.
    let (bin, exec_start) = if exe.file_name().is_some_and(|n| n == "turnout-agent") {
        (
            "/usr/local/bin/turnout-agent",
            "/usr/local/bin/turnout-agent run",
        )
    } else {
        ("/usr/local/bin/turnout", "/usr/local/bin/turnout agent run")
    };
    let dest = root.join(bin.trim_start_matches('/'));
    std::fs::create_dir_all(dest.parent().expect("a parent"))?;
    if exe != dest {
        let temp = dest.with_extension("turnout-new");
        std::fs::copy(&exe, &temp)?;
        std::fs::rename(&temp, &dest)?;
    }
    println!("installed {}", dest.display());
    let unit = UNIT.replace("/usr/local/bin/turnout-agent run", exec_start);
    write(
        root,
        "/etc/systemd/system/turnout-agent.service",
        &unit,
        0o644,
        false,
    )?;
    write(
        root,
        "/usr/lib/tmpfiles.d/turnout.conf",
        TMPFILES,
        0o644,
        false,
    )?;
    write(
        root,
        "/usr/local/share/doc/turnout/operations.md",
        OPERATIONS,
        0o644,
        false,
    )?;
    write(
        root,
        "/usr/local/share/doc/turnout/web.service.example",
        SERVICE_TEMPLATE,
        0o644,
        false,
    )?;
    let config_written = write(root, "/etc/turnout/agent.toml", CONFIG, 0o644, true)?;
    println!("installed the unit turnout-agent.service, tmpfiles.d/turnout.conf and the docs");
    println!(
        "{} /etc/turnout/agent.toml",
        if config_written {
            "wrote an example config to"
        } else {
            "kept the existing"
        }
    );
    if root == Path::new("/") {
        for (program, args) in [
            ("systemd-tmpfiles", vec!["--create", "turnout.conf"]),
            ("systemctl", vec!["daemon-reload"]),
        ] {
            let status = Command::new(program).args(&args).status();
            if !status.is_ok_and(|s| s.success()) {
                eprintln!(
                    "turnout-agent: `{program} {}` failed; run it by hand",
                    args.join(" ")
                );
            }
        }
    }
    println!("next: edit /etc/turnout/agent.toml, put the trust file at /etc/turnout/trust.json,");
    println!(
        "      `turnout-agent enroll --coordinator URL --token TOKEN`, then `systemctl enable --now turnout-agent`"
    );
    Ok(())
}
