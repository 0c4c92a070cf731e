//! The bundle tools (`keygen`, `trust`, `pack`, `sign`, `verify`, `inspect`) as an
//! operator uses them: real files, real processes, exit codes and messages;
//! and interop with keys and signatures from openssl.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn turnout(dir: &Path, args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_turnout"))
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

#[track_caller]
fn ok(dir: &Path, args: &[&str]) -> String {
    let run = turnout(dir, args);
    assert_eq!(
        run.code, 0,
        "turnout {args:?} failed:\n{}{}",
        run.stdout, run.stderr
    );
    run.stdout
}

fn sh(dir: &Path, program: &str, args: &[&str]) -> Output {
    let out = Command::new(program)
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{program}: {e} (CI installs it)"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A temp dir with a release directory `app/` (an executable and a config).
/// `turnout pack app --name web --version VERSION --entry bin/web`, then `extra`.
fn pack_web<'a>(version: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "pack",
        "app",
        "--name",
        "web",
        "--version",
        version,
        "--entry",
        "bin/web",
    ];
    args.extend_from_slice(extra);
    args
}

fn workspace() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let app = dir.path().join("app");
    fs::create_dir_all(app.join("bin")).unwrap();
    fs::write(app.join("bin/web"), "#!/bin/sh\necho web\n").unwrap();
    fs::set_permissions(app.join("bin/web"), fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(app.join("config.toml"), "port = 8080\n").unwrap();
    dir
}

fn key_id(stdout: &str) -> String {
    stdout
        .lines()
        .next()
        .unwrap()
        .strip_prefix("key id ")
        .unwrap()
        .to_owned()
}

#[test]
fn keygen_trust_pack_verify_sign_inspect_round_trip() {
    let ws = workspace();
    let d = ws.path();
    let a = key_id(&ok(d, &["keygen", "--out", "a"]));
    let b = key_id(&ok(d, &["keygen", "--out", "b"]));
    assert_ne!(a, b);
    assert_eq!(
        fs::metadata(d.join("a.key.pem"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );

    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.pub.pem",
            "--key",
            "b.pub.pem",
            "--threshold",
            "2",
            "--out",
            "trust.json",
        ],
    );
    let packed = ok(
        d,
        &pack_web(
            "1.4.2",
            &[
                "--expires",
                "90d",
                "--provides",
                "api/v2",
                "--key",
                "a.key.pem",
                "--out",
                "web.tnt",
            ],
        ),
    );
    assert!(packed.contains("packed web 1.4.2: 2 files"), "{packed}");

    let one_of_two = turnout(d, &["verify", "web.tnt", "--trust", "trust.json"]);
    assert_eq!(one_of_two.code, 4, "{}", one_of_two.stderr);
    assert!(
        one_of_two.stderr.contains(&format!(
            "1 valid signature(s) by trusted keys ({a}), 2 required"
        )),
        "{}",
        one_of_two.stderr
    );

    ok(d, &["sign", "web.tnt", "--key", "b.key.pem"]);
    let verified = ok(d, &["verify", "web.tnt", "--trust", "trust.json"]);
    assert!(verified.starts_with("OK web 1.4.2: 2 files"), "{verified}");
    assert!(
        verified.contains("signed by 2 of 2 required keys"),
        "{verified}"
    );

    let inspected = ok(d, &["inspect", "web.tnt"]);
    assert!(
        inspected.contains(&format!("  {a}\n")) && inspected.contains(&format!("  {b}\n")),
        "{inspected}"
    );
    assert!(inspected.contains("entry      bin/web"), "{inspected}");
    assert!(inspected.contains("provides   api/v2"), "{inspected}");

    let json: serde_json::Value = serde_json::from_str(&ok(
        d,
        &["verify", "web.tnt", "--trust", "trust.json", "--json"],
    ))
    .unwrap();
    assert_eq!(json["valid"], true);
    assert_eq!(json["signed_by"].as_array().unwrap().len(), 2);
}

#[test]
fn signing_twice_with_one_key_does_not_double_count() {
    let ws = workspace();
    let d = ws.path();
    ok(d, &["keygen", "--out", "a"]);
    ok(d, &["keygen", "--out", "b"]);
    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.pub.pem",
            "--key",
            "b.pub.pem",
            "--threshold",
            "2",
            "--out",
            "trust.json",
        ],
    );
    ok(
        d,
        &pack_web("1.0.0", &["--key", "a.key.pem", "--out", "w.tnt"]),
    );
    ok(d, &["sign", "w.tnt", "--key", "a.key.pem"]);
    let inspected = ok(d, &["inspect", "w.tnt", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(
        json["signatures"].as_array().unwrap().len(),
        1,
        "{inspected}"
    );
    assert_eq!(
        turnout(d, &["verify", "w.tnt", "--trust", "trust.json"]).code,
        4
    );
}

#[test]
fn a_manifest_signed_by_openssl_verifies() {
    let ws = workspace();
    let d = ws.path();
    sh(
        d,
        "openssl",
        &["genpkey", "-algorithm", "ed25519", "-out", "hsm.key.pem"],
    );
    sh(
        d,
        "openssl",
        &[
            "pkey",
            "-in",
            "hsm.key.pem",
            "-pubout",
            "-out",
            "hsm.pub.pem",
        ],
    );
    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "hsm.pub.pem",
            "--threshold",
            "1",
            "--out",
            "trust.json",
        ],
    );
    // Packed unsigned, as a release pipeline whose keys live in an HSM would.
    let packed = ok(d, &pack_web("2.0.0", &["--out", "web.tnt"]));
    assert!(packed.contains("unsigned"), "{packed}");
    assert_eq!(
        turnout(d, &["verify", "web.tnt", "--trust", "trust.json"]).code,
        4
    );

    let manifest = sh(d, "tar", &["-xOf", "web.tnt", "manifest.json"]).stdout;
    fs::write(d.join("manifest.json"), manifest).unwrap();
    sh(
        d,
        "openssl",
        &[
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            "hsm.key.pem",
            "-in",
            "manifest.json",
            "-out",
            "sig.bin",
        ],
    );
    ok(
        d,
        &[
            "sign",
            "web.tnt",
            "--signature",
            "sig.bin",
            "--public-key",
            "hsm.pub.pem",
        ],
    );
    let verified = ok(d, &["verify", "web.tnt", "--trust", "trust.json"]);
    assert!(verified.contains("signed by 1 of 1"), "{verified}");
}

#[test]
fn keys_made_by_turnout_work_in_openssl() {
    let ws = workspace();
    let d = ws.path();
    ok(d, &["keygen", "--out", "a"]);
    fs::write(d.join("message"), b"exact bytes").unwrap();
    sh(
        d,
        "openssl",
        &[
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            "a.key.pem",
            "-in",
            "message",
            "-out",
            "sig",
        ],
    );
    sh(
        d,
        "openssl",
        &[
            "pkeyutl",
            "-verify",
            "-rawin",
            "-pubin",
            "-inkey",
            "a.pub.pem",
            "-in",
            "message",
            "-sigfile",
            "sig",
        ],
    );
}

#[test]
fn an_external_signature_that_does_not_verify_is_refused_and_the_bundle_kept() {
    let ws = workspace();
    let d = ws.path();
    ok(d, &["keygen", "--out", "a"]);
    ok(d, &["keygen", "--out", "b"]);
    ok(
        d,
        &pack_web("1.0.0", &["--key", "a.key.pem", "--out", "w.tnt"]),
    );
    let before = fs::read(d.join("w.tnt")).unwrap();
    fs::write(d.join("manifest.json"), b"not the manifest").unwrap();
    sh(
        d,
        "openssl",
        &[
            "pkeyutl",
            "-sign",
            "-rawin",
            "-inkey",
            "b.key.pem",
            "-in",
            "manifest.json",
            "-out",
            "sig",
        ],
    );
    let run = turnout(
        d,
        &[
            "sign",
            "w.tnt",
            "--signature",
            "sig",
            "--public-key",
            "b.pub.pem",
        ],
    );
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(
        run.stderr.contains("does not verify with key"),
        "{}",
        run.stderr
    );
    assert_eq!(fs::read(d.join("w.tnt")).unwrap(), before);
}

#[test]
fn trust_rotation_needs_the_current_threshold() {
    let ws = workspace();
    let d = ws.path();
    for name in ["a", "b", "c"] {
        ok(d, &["keygen", "--out", name]);
    }
    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.pub.pem",
            "--key",
            "b.pub.pem",
            "--threshold",
            "2",
            "--out",
            "v1.json",
        ],
    );

    let rotate = |sign_with: &[&str], out: &str| {
        let mut args = vec![
            "trust",
            "rotate",
            "--current",
            "v1.json",
            "--key",
            "b.pub.pem",
            "--key",
            "c.pub.pem",
            "--threshold",
            "1",
            "--out",
            out,
        ];
        for key in sign_with {
            args.extend(["--sign-with", key]);
        }
        turnout(d, &args)
    };
    let short = rotate(&["a.key.pem"], "v2.json");
    assert_eq!(short.code, 4, "{}", short.stderr);
    assert!(
        short.stderr.contains("not authorised by the current keys"),
        "{}",
        short.stderr
    );
    assert!(
        !d.join("v2.json").exists(),
        "a refused rotation must write nothing"
    );

    let out = rotate(&["a.key.pem", "b.key.pem"], "v2.json");
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.stdout.contains("trust version 2: 1 of 2 keys required"),
        "{}",
        out.stdout
    );
    ok(d, &["trust", "verify", "v2.json", "--current", "v1.json"]);

    // The old file cannot come back as a "rotation" of the new one.
    let replay = turnout(d, &["trust", "verify", "v1.json", "--current", "v2.json"]);
    assert_eq!(replay.code, 4);
    assert!(
        replay.stderr.contains("must raise the version"),
        "{}",
        replay.stderr
    );

    // A bundle signed by the new key c verifies under v2 and not under v1.
    ok(
        d,
        &pack_web("1.0.0", &["--key", "c.key.pem", "--out", "w.tnt"]),
    );
    ok(d, &["verify", "w.tnt", "--trust", "v2.json"]);
    assert_eq!(
        turnout(d, &["verify", "w.tnt", "--trust", "v1.json"]).code,
        4
    );
}

#[test]
fn keygen_never_overwrites_a_key() {
    let ws = workspace();
    let d = ws.path();
    ok(d, &["keygen", "--out", "a"]);
    let before = fs::read(d.join("a.key.pem")).unwrap();
    let run = turnout(d, &["keygen", "--out", "a"]);
    assert_eq!(run.code, 3);
    assert!(
        run.stderr.contains("a.key.pem already exists"),
        "{}",
        run.stderr
    );
    assert_eq!(fs::read(d.join("a.key.pem")).unwrap(), before);
}

#[test]
fn bad_inputs_get_distinct_exit_codes_and_say_what_was_expected() {
    let ws = workspace();
    let d = ws.path();
    ok(d, &["keygen", "--out", "a"]);
    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.pub.pem",
            "--threshold",
            "1",
            "--out",
            "trust.json",
        ],
    );
    fs::write(d.join("garbage.tnt"), vec![0x5a; 4096]).unwrap();

    let run = turnout(d, &["verify", "garbage.tnt", "--trust", "trust.json"]);
    assert_eq!(run.code, 4);
    assert!(
        run.stderr.contains("not a Turnout bundle"),
        "{}",
        run.stderr
    );

    let run = turnout(d, &["verify", "missing.tnt", "--trust", "trust.json"]);
    assert_eq!(run.code, 3);
    assert!(
        run.stderr.contains("cannot read missing.tnt"),
        "{}",
        run.stderr
    );

    let run = turnout(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.key.pem",
            "--threshold",
            "1",
            "--out",
            "t2.json",
        ],
    );
    assert_eq!(run.code, 3);
    assert!(
        run.stderr
            .contains("expected an Ed25519 public key in SPKI PEM"),
        "{}",
        run.stderr
    );

    let run = turnout(
        d,
        &[
            "trust",
            "init",
            "--key",
            "a.pub.pem",
            "--threshold",
            "2",
            "--out",
            "t2.json",
        ],
    );
    assert_eq!(run.code, 3);
    assert!(
        run.stderr.contains("threshold is 2 with 1 key(s)"),
        "{}",
        run.stderr
    );

    let run = turnout(d, &["sign", "garbage.tnt"]);
    assert_eq!(run.code, 2, "no key and no signature is a usage error");
}

#[test]
fn pack_refuses_what_a_bundle_cannot_hold_and_writes_nothing() {
    let ws = workspace();
    let d = ws.path();
    let pack = |version: &str| turnout(d, &pack_web(version, &["--out", "w.tnt"]));
    sh(d, "mkfifo", &["app/pipe"]);
    let run = pack("1.0.0");
    assert_eq!(run.code, 3, "{}", run.stderr);
    assert!(run.stderr.contains("a FIFO"), "{}", run.stderr);
    fs::remove_file(d.join("app/pipe")).unwrap();

    fs::set_permissions(d.join("app/bin/web"), fs::Permissions::from_mode(0o4755)).unwrap();
    let run = pack("1.0.0");
    assert_eq!(run.code, 3);
    assert!(run.stderr.contains("setuid"), "{}", run.stderr);
    fs::set_permissions(d.join("app/bin/web"), fs::Permissions::from_mode(0o644)).unwrap();

    let run = pack("1.0.0");
    assert_eq!(run.code, 3);
    assert!(
        run.stderr
            .contains("the entry bin/web is not executable (mode 0644)"),
        "{}",
        run.stderr
    );

    std::os::unix::fs::symlink("../../etc/passwd", d.join("app/escape")).unwrap();
    let run = pack("1.0.0");
    assert_eq!(run.code, 3);
    assert!(run.stderr.contains("points outside"), "{}", run.stderr);

    let leftovers: Vec<PathBuf> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| e == "tnt") || p.to_string_lossy().contains(".tmp-")
        })
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// The newcomer's first commands: `keygen --out keys/a` with no `keys/`
/// used to fail with the io error printed twice; `trust init` with one key
/// demanded `--threshold`.
#[test]
fn first_keys_need_no_preparation_and_errors_say_things_once() {
    let dir = workspace();
    let d = dir.path();
    ok(d, &["keygen", "--out", "keys/a"]);
    let mode = std::fs::metadata(d.join("keys")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o700,
        "the new key directory is private"
    );
    ok(
        d,
        &[
            "trust",
            "init",
            "--key",
            "keys/a.pub.pem",
            "--out",
            "trust.json",
        ],
    );
    ok(d, &["keygen", "--out", "keys/b"]);
    let two = turnout(
        d,
        &[
            "trust",
            "init",
            "--key",
            "keys/a.pub.pem",
            "--key",
            "keys/b.pub.pem",
            "--out",
            "t2.json",
        ],
    );
    assert_eq!(two.code, 3, "{}", two.stderr);
    assert!(
        two.stderr.contains("2 keys given and no --threshold"),
        "{}",
        two.stderr
    );
    assert!(!d.join("t2.json").exists());
    let missing = turnout(d, &["verify", "nowhere.tnt", "--trust", "trust.json"]);
    assert_eq!(missing.code, 3, "{}", missing.stderr);
    assert_eq!(
        missing.stderr.matches("No such file or directory").count(),
        1,
        "{}",
        missing.stderr
    );
}
