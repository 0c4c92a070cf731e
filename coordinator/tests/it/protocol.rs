//! Protocol v2 at the coordinator: each host is written the version it
//! agreed (v1 plain desired state for 0.1.0 agents, v2 signed and dated),
//! `min_agent_proto = 2` refuses v1 agents and lists them, and hosts that
//! report a stale desired state are listed and counted.

use std::time::Duration;

use serde_json::Value;
use turnout::coordinator::Settings;
use turnout_proto::desired::SignedDesired;
use turnout_proto::messages::{DesiredState, Incompatible, Welcome};
use turnout_proto::{ProtoRange, ProtoVersion};

use crate::fake::{FakeAgent, Server, now_ms};

fn settings() -> Settings {
    Settings {
        tick: Duration::from_millis(50),
        desired_expiry: Duration::from_secs(600),
        ..Settings::default()
    }
}

fn v1() -> ProtoRange {
    ProtoRange::new(ProtoVersion::V1, ProtoVersion::V1).unwrap()
}

#[test]
fn each_host_is_written_the_version_it_agreed_and_v2_desired_state_is_signed_and_dated() {
    let server = Server::start(settings());
    let release = server.push_release("1.0.0");
    let token = server.enroll_token(2);
    let mut old = FakeAgent::new(&server.url, "old-01", 1);
    let enrolled = old.enroll(&token, &[("role", "web")]);
    assert_eq!(enrolled.status, 200);
    let enrolled: Value = serde_json::from_slice(&enrolled.body).unwrap();
    let director = turnout_proto::keys::PublicKey::from_pem(
        enrolled["director_key"]
            .as_str()
            .expect("the enrollment carries the director key"),
    )
    .unwrap();
    let mut new = FakeAgent::new(&server.url, "new-01", 2);
    assert_eq!(new.enroll(&token, &[("role", "web")]).status, 200);

    // A 0.1.0 agent speaks v1 only: welcome, desired state in v1, unsigned.
    let hello = old.hello_with(v1(), &[("role", "web")]);
    assert_eq!(hello.status, 200, "{}", hello.text());
    let welcome = turnout_proto::decode::<Welcome>(&hello.body).unwrap();
    assert_eq!(welcome.proto, ProtoVersion::V1);
    assert_eq!(new.hello().status, 200);
    let first = server.push_release("0.9.0");
    for agent in [&mut old, &mut new] {
        agent.committed = Some(first.clone());
        assert_eq!(agent.report(None).status, 204);
    }

    {
        let spec = serde_json::json!({"spec": {"service": "web", "release": format!("web@{}", release.version), "waves": ["100%"], "max_parallel": 2}});
        let rollout: Value = server
            .client(Some(&server.admin))
            .post("/v1/rollouts", &spec)
            .unwrap();
        assert!(rollout["id"].is_string(), "{rollout}");
    }
    crate::fake::wait_for("both hosts to be told", Duration::from_secs(20), || {
        old.desired(0, "0s").services.len() == 1 && new.desired(0, "0s").services.len() == 1
    });

    let plain = old.signed("GET", "/v1/agent/desired?index=0", b"");
    let envelope = turnout_proto::decode::<DesiredState>(&plain.body).unwrap();
    assert_eq!(envelope.proto, ProtoVersion::V1);
    assert_eq!(
        envelope.body.expires_ms, None,
        "v1 documents stay as 0.1.0 reads them"
    );
    assert!(!plain.text().contains("signature"));

    let signed = new.signed("GET", "/v1/agent/desired?index=0", b"");
    let envelope = turnout_proto::decode::<SignedDesired>(&signed.body).unwrap();
    assert_eq!(envelope.proto, ProtoVersion::V2);
    assert_eq!(&envelope.body.signature.key_id, director.id());
    assert!(director.verifies(
        envelope.body.document.as_bytes(),
        &envelope.body.signature.sig
    ));
    let document: DesiredState = serde_json::from_str(&envelope.body.document).unwrap();
    assert_eq!(document.host.as_str(), "new-01");
    assert_eq!(document.services[0].release, release);
    let (issued, expires) = (document.issued_at_ms.unwrap(), document.expires_ms.unwrap());
    assert!(
        issued <= now_ms() && issued + 10_000 > now_ms(),
        "issued now"
    );
    assert_eq!(expires - issued, 600_000, "desired_expiry");
    // Every answer is issued afresh: a frozen coordinator cannot keep one alive.
    let again = new.signed("GET", "/v1/agent/desired?index=0", b"");
    let later: DesiredState = serde_json::from_str(
        &turnout_proto::decode::<SignedDesired>(&again.body)
            .unwrap()
            .body
            .document,
    )
    .unwrap();
    assert!(later.issued_at_ms.unwrap() >= issued);
    assert_eq!(later.index, document.index);

    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    let by_id = |id: &str| hosts.iter().find(|h| h["id"] == id).unwrap().clone();
    assert_eq!(by_id("old-01")["proto"], 1);
    assert_eq!(by_id("old-01")["legacy"], true);
    assert_eq!(by_id("new-01")["proto"], 2);
    assert_eq!(by_id("new-01")["legacy"], false);
}

#[test]
fn min_agent_proto_2_refuses_v1_agents_naming_both_ranges_and_lists_them() {
    let server = Server::start(Settings {
        min_agent_proto: ProtoVersion::V2,
        ..settings()
    });
    let token = server.enroll_token(2);
    let old = FakeAgent::new(&server.url, "old-01", 1);
    assert_eq!(old.enroll(&token, &[]).status, 200);
    let new = FakeAgent::new(&server.url, "new-01", 2);
    assert_eq!(new.enroll(&token, &[]).status, 200);

    let refused = old.hello_with(v1(), &[]);
    assert_eq!(refused.status, 409, "{}", refused.text());
    let why = turnout_proto::decode::<Incompatible>(&refused.body)
        .unwrap()
        .body;
    let text = why.to_string();
    assert!(text.contains("the agent speaks v1"), "{text}");
    assert!(text.contains("speaks v2"), "{text}");
    assert!(
        text.contains("upgrade this agent to a release that speaks v2"),
        "{text}"
    );
    assert_eq!(new.hello().status, 200);

    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    let old_row = hosts.iter().find(|h| h["id"] == "old-01").unwrap();
    assert_eq!(old_row["state"], "incompatible");
    assert!(
        old_row["incompatible"]
            .as_str()
            .unwrap()
            .contains("the agent speaks v1")
    );
    let new_row = hosts.iter().find(|h| h["id"] == "new-01").unwrap();
    assert_eq!(new_row["proto"], 2);
    assert_ne!(new_row["state"], "incompatible");
}

#[test]
fn hosts_that_report_a_stale_or_refused_desired_state_are_listed_and_counted() {
    let server = Server::start(settings());
    let release = server.push_release("1.0.0");
    let mut agent = FakeAgent::join(&server.url, "web-01", 1, &server.enroll_token(1), &release);
    let metrics = || -> String {
        server.coordinator.refresh_gauges().unwrap();
        server
            .client(Some(&server.admin))
            .get_text("/metrics")
            .unwrap()
    };
    assert!(metrics().contains("turnout_hosts_stale 0"), "{}", metrics());

    let since = now_ms() - 5_000;
    assert_eq!(
        agent
            .report_stale(
                Some(since),
                Some("the desired state has index 3, below index 7")
            )
            .status,
        204
    );
    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert_eq!(hosts[0]["stale_since_ms"], since);
    assert!(
        hosts[0]["desired_refused"]
            .as_str()
            .unwrap()
            .contains("below index 7")
    );
    assert!(metrics().contains("turnout_hosts_stale 1"), "{}", metrics());

    assert_eq!(agent.report_stale(None, None).status, 204);
    let hosts: Vec<Value> = server.client(Some(&server.admin)).get("/v1/hosts").unwrap();
    assert!(hosts[0]["stale_since_ms"].is_null());
    assert!(metrics().contains("turnout_hosts_stale 0"), "{}", metrics());
}

#[test]
fn a_host_that_accepted_a_higher_index_than_the_store_holds_moves_the_index_past_it() {
    // A coordinator restored from an older backup: its index for the host
    // is below what the host already accepted, and the host would refuse
    // every answer as a replay. The host's report says how far it got.
    let server = Server::start(settings());
    let release = server.push_release("1.0.0");
    let mut agent = FakeAgent::join(&server.url, "web-01", 1, &server.enroll_token(1), &release);
    let before = agent.desired(0, "0s").index;
    assert!(before < 40);
    assert_eq!(agent.report_accepted(40).status, 204);
    server.coordinator.flush().unwrap();
    let after = agent.desired(0, "0s");
    assert_eq!(after.index, 41, "moved past what the host accepted");
    let events: Vec<Value> = server
        .client(Some(&server.admin))
        .get("/v1/events")
        .unwrap();
    assert!(
        events.iter().any(|e| e["host"] == "web-01"
            && e["message"]
                .as_str()
                .unwrap()
                .contains("past index 40 that the host accepted before")),
        "{events:#?}"
    );
    // A host that is behind, or exactly where the store is (every report
    // of a host at rest), moves nothing.
    for accepted in [3, 41, 41] {
        assert_eq!(agent.report_accepted(accepted).status, 204);
        server.coordinator.flush().unwrap();
        assert_eq!(
            agent.desired(0, "0s").index,
            41,
            "after accepted {accepted}"
        );
    }
}

#[test]
fn a_rollout_leaves_out_hosts_that_refuse_or_are_stale_and_says_why() {
    let server = Server::start(settings());
    let first = server.push_release("1.0.0");
    server.push_release("2.0.0");
    let token = server.enroll_token(3);
    let mut ok = FakeAgent::join(&server.url, "web-01", 1, &token, &first);
    let mut refusing = FakeAgent::join(&server.url, "web-02", 2, &token, &first);
    let mut stale = FakeAgent::join(&server.url, "web-03", 3, &token, &first);
    assert_eq!(ok.report(None).status, 204);
    assert_eq!(
        refusing
            .report_stale(None, Some("the desired state has index 3, below index 7"))
            .status,
        204
    );
    assert_eq!(stale.report_stale(Some(now_ms() - 1_000), None).status, 204);
    let plan: Value = server
        .client(Some(&server.admin))
        .post(
            "/v1/rollouts/plan",
            &serde_json::json!({"spec": {"service": "web", "release": "web@2.0.0", "waves": ["100%"]}}),
        )
        .unwrap();
    let text = plan.to_string();
    assert!(text.contains("web-01"), "{text}");
    assert!(
        plan["excluded"]["web-02"]
            .as_str()
            .unwrap()
            .contains("refuses this coordinator's desired state: the desired state has index 3"),
        "{text}"
    );
    assert!(
        plan["excluded"]["web-03"]
            .as_str()
            .unwrap()
            .contains("stale since"),
        "{text}"
    );
}
