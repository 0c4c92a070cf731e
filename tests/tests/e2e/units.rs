//! The shipped systemd units pass `systemd-analyze verify` with no warning
//! at all (an unknown or misspelled directive is only a warning to systemd,
//! so silence is the assertion), with their programs pointed at this build.

use std::path::Path;
use std::process::Command;

fn units_dir() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../systemd"))
}

#[test]
fn every_unit_passes_systemd_analyze_verify_silently() {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("systemd-analyze is missing: .ci/run installs systemd");
    }
    let dir = tempfile::tempdir().unwrap();
    let turnout = turnout_tests::turnout_bin();
    let mut units = Vec::new();
    for entry in std::fs::read_dir(units_dir()).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let (target, text) = match name.as_str() {
            "turnout-agent.service" | "turnout-coordinator.service" => (
                name.clone(),
                text.replace(
                    "/usr/local/bin/turnout-agent run",
                    &format!("{} agent run", turnout.display()),
                )
                .replace(
                    "/usr/local/bin/turnout ",
                    &format!("{} ", turnout.display()),
                ),
            ),
            "web.service.example" => (
                "web.service".to_owned(),
                text.replace(
                    "/var/lib/turnout/services/web/current/bin/web --port 8080",
                    "/bin/true",
                )
                .replace("/var/lib/turnout/services/web/current", "/tmp"),
            ),
            _ => continue,
        };
        std::fs::write(dir.path().join(&target), text).unwrap();
        units.push(dir.path().join(target));
    }
    assert_eq!(units.len(), 3, "the agent, coordinator and example units");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg("--man=no")
        .args(&units)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify warned:\n{text}"
    );
}
