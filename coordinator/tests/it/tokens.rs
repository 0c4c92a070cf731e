//! Accountable operator tokens and host identities that cannot be taken
//! over, through the `turnout` CLI against a coordinator on a manual clock.

use std::collections::BTreeMap;
use std::process::{Command, Output};
use std::time::{Duration, SystemTime};

use serde_json::{Value, json};
use turnout::coordinator::Settings;
use turnout_rt::ManualClock;

use crate::fake::{FakeAgent, Server};

fn turnout(server: &Server, token: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_turnout"))
        .args(args)
        .env("TURNOUT_COORDINATOR", &server.url)
        .env("TURNOUT_TOKEN", token)
        .env("HOME", server.dir.path())
        .env_remove("TURNOUT_PROFILE")
        .output()
        .unwrap()
}

fn said(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn events(server: &Server) -> String {
    let out = turnout(server, &server.admin, &["events"]);
    said(&out)
}

#[test]
fn a_named_token_is_made_used_listed_revoked_and_expires_and_the_log_names_it() {
    let clock = ManualClock::at(SystemTime::now());
    let server = Server::start_with(
        Settings::default(),
        tempfile::tempdir().unwrap(),
        clock.clone(),
    );
    let admin = server.admin.clone();
    let made = turnout(
        &server,
        &admin,
        &[
            "token", "create", "--name", "alice", "--role", "operator", "--ttl", "30d",
        ],
    );
    assert_eq!(made.status.code(), Some(0), "{}", said(&made));
    let alice = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert!(alice.starts_with("tnt_"), "{alice}");
    let made = turnout(
        &server,
        &admin,
        &["token", "create", "--name", "bob", "--role", "operator"],
    );
    let bob = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    // A name is required and unique.
    let nameless = turnout(&server, &admin, &["token", "create", "--role", "operator"]);
    assert_eq!(nameless.status.code(), Some(2), "{}", said(&nameless));
    let again = turnout(&server, &admin, &["token", "create", "--name", "alice"]);
    assert_eq!(again.status.code(), Some(6), "{}", said(&again));
    assert!(said(&again).contains("exists already"), "{}", said(&again));

    // Alice's mutating call is logged as hers.
    let bundle = crate::fake::demo_bundle(server.dir.path(), "1.0.0");
    let pushed = turnout(
        &server,
        &alice,
        &["bundle", "push", bundle.to_str().unwrap()],
    );
    assert_eq!(pushed.status.code(), Some(0), "{}", said(&pushed));
    let log = events(&server);
    assert!(log.contains("alice (operator)"), "{log}");
    assert!(
        log.contains("operator token alice (operator) created"),
        "{log}"
    );

    // The list: names, roles, expiry and last use, never a secret.
    let list = turnout(&server, &admin, &["token", "list"]);
    let text = said(&list);
    assert_eq!(list.status.code(), Some(0), "{text}");
    for line in ["alice", "bob", "root"] {
        assert!(text.contains(line), "{line}: {text}");
    }
    assert!(!text.contains("tnt_"), "a secret in the list: {text}");
    let json: Vec<Value> =
        serde_json::from_slice(&turnout(&server, &admin, &["token", "list", "--json"]).stdout)
            .unwrap();
    let alice_row = json.iter().find(|t| t["name"] == "alice").unwrap();
    assert!(
        alice_row["last_used_ms"].is_u64() && alice_row["expires_ms"].is_u64(),
        "{alice_row}"
    );
    assert!(json.iter().find(|t| t["name"] == "bob").unwrap()["last_used_ms"].is_null());

    // Revoked: refused, saying so, exit 8; the log says who revoked it.
    let revoked = turnout(&server, &admin, &["token", "revoke", "alice"]);
    assert_eq!(revoked.status.code(), Some(0), "{}", said(&revoked));
    let refused = turnout(&server, &alice, &["host", "list"]);
    assert_eq!(refused.status.code(), Some(8), "{}", said(&refused));
    assert!(
        said(&refused).contains("\"alice\" was revoked at"),
        "{}",
        said(&refused)
    );
    assert!(events(&server).contains("operator token alice revoked"));
    let unknown = turnout(&server, &admin, &["token", "revoke", "alice"]);
    assert_eq!(unknown.status.code(), Some(3), "{}", said(&unknown));

    // Expired: a token with a TTL stops working when it ends.
    let made = turnout(
        &server,
        &admin,
        &["token", "create", "--name", "carol", "--ttl", "1h"],
    );
    let carol = String::from_utf8_lossy(&made.stdout).trim().to_owned();
    assert_eq!(
        turnout(&server, &carol, &["host", "list"]).status.code(),
        Some(0)
    );
    clock.advance(Duration::from_secs(3601));
    let expired = turnout(&server, &carol, &["host", "list"]);
    assert_eq!(expired.status.code(), Some(8), "{}", said(&expired));
    assert!(
        said(&expired).contains("\"carol\" expired at"),
        "{}",
        said(&expired)
    );
    // The last working admin token cannot be revoked: nobody could make
    // another.
    let last = turnout(&server, &admin, &["token", "revoke", "root"]);
    assert_eq!(last.status.code(), Some(6), "{}", said(&last));
    assert!(
        said(&last).contains("the last working admin token"),
        "{}",
        said(&last)
    );
    // Bob's, without a TTL, still works; each refusal was counted.
    assert_eq!(
        turnout(&server, &bob, &["host", "list"]).status.code(),
        Some(0)
    );
    let metrics = &server.coordinator.metrics;
    assert_eq!(metrics.auth_failures("operator_revoked"), 1);
    assert_eq!(metrics.auth_failures("operator_expired"), 1);
}

#[test]
fn a_host_id_cannot_be_taken_over_and_a_hello_cannot_move_a_host_into_a_selector() {
    let server = Server::start(Settings::default());
    let admin = server.admin.clone();
    let token = server.enroll_token(5);
    let web = FakeAgent::new(&server.url, "web-01", 1);
    assert_eq!(web.enroll(&token, &[("role", "web")]).status, 200);
    // A second key under the same id, with a token for many hosts: refused.
    let thief = FakeAgent::new(&server.url, "web-01", 2);
    let taken = thief.enroll(&token, &[("role", "web")]);
    assert_eq!(taken.status, 409, "{}", taken.text());
    assert!(taken.text().contains("--replace"), "{}", taken.text());
    // A token for that host that may replace its key: accepted, and logged.
    let out = turnout(
        &server,
        &admin,
        &[
            "token",
            "create",
            "--enroll",
            "--host",
            "web-01",
            "--replace",
            "--json",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let replace: Value = serde_json::from_slice(&out.stdout).unwrap();
    let replace = replace["token"].as_str().unwrap();
    let other = FakeAgent::new(&server.url, "db-01", 3);
    let wrong_host = other.enroll(replace, &[]);
    assert_eq!(wrong_host.status, 401, "{}", wrong_host.text());
    assert!(
        wrong_host.text().contains("is for host web-01, not db-01"),
        "{}",
        wrong_host.text()
    );
    assert_eq!(thief.enroll(replace, &[("role", "db")]).status, 200);
    let log = events(&server);
    assert!(
        log.contains("enrolled with a new key, replacing the old one"),
        "{log}"
    );
    assert!(
        log.contains("refused an enrollment with another key"),
        "{log}"
    );

    // Its hello says role=db: it is not selected as db, and its labels are
    // still the operator's; the host list shows what it reports.
    assert_eq!(
        thief
            .hello_with(turnout_proto::SUPPORTED, &[("role", "db")])
            .status,
        200
    );
    let selected: Vec<Value> = server
        .client(Some(&admin))
        .get("/v1/hosts?selector=role=db")
        .unwrap();
    assert!(selected.is_empty(), "{selected:?}");
    let hosts: Vec<Value> = server.client(Some(&admin)).get("/v1/hosts").unwrap();
    let expected: BTreeMap<String, String> = [("role".to_owned(), "web".to_owned())].into();
    assert_eq!(hosts[0]["labels"], json!(expected));
    assert_eq!(hosts[0]["reported_labels"]["role"], "db");
    let list = turnout(&server, &admin, &["host", "list"]);
    assert!(
        said(&list).contains("reports labels role=db"),
        "{}",
        said(&list)
    );
    // A value a selector could never match is refused.
    let bad = turnout(&server, &admin, &["host", "label", "web-01", "k=v,x=y"]);
    assert_eq!(bad.status.code(), Some(3), "{}", said(&bad));
    assert!(said(&bad).contains("without ','"), "{}", said(&bad));
    // The operator moves it, and says so in the log.
    let out = turnout(
        &server,
        &admin,
        &["host", "label", "web-01", "role=db", "tier-"],
    );
    assert_eq!(out.status.code(), Some(0), "{}", said(&out));
    let selected: Vec<Value> = server
        .client(Some(&admin))
        .get("/v1/hosts?selector=role=db")
        .unwrap();
    assert_eq!(selected.len(), 1);
    assert!(
        events(&server).contains("root (admin)")
            && events(&server).contains("labels set to role=db")
    );
}
