//! The wire contract from outside the crate: golden fixtures decode forever,
//! bad input gets an error naming what was wrong, and no input panics.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use sha2::{Digest as _, Sha256};
use turnout_proto::messages::{
    DesiredService, DesiredState, ErrorBody, ErrorCode, Health, Hello, Incompatible, Outcome,
    OutcomeKind, ReleaseRef, Report, ServiceReport, ServiceState, Slot, Welcome,
};
use turnout_proto::{
    Capability, CapabilitySet, DecodeError, Digest, Limits, Message, ProtoRange, ProtoVersion,
    Reader, decode, encode,
};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(fixtures_dir().join(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

/// Every fixture file, as `v1/hello.json`, sorted.
fn fixture_files() -> Vec<String> {
    let mut files = Vec::new();
    for version in std::fs::read_dir(fixtures_dir()).unwrap() {
        let version = version.unwrap();
        if !version.file_type().unwrap().is_dir() {
            continue;
        }
        for file in std::fs::read_dir(version.path()).unwrap() {
            let file = file.unwrap();
            files.push(format!(
                "{}/{}",
                version.file_name().to_string_lossy(),
                file.file_name().to_string_lossy()
            ));
        }
    }
    files.sort();
    files
}

/// Decodes a fixture as the message its file name names (`report.future.json` is a report).
fn decode_fixture(name: &str) -> Result<(), DecodeError> {
    let bytes = fixture(name);
    let stem = Path::new(name).file_name().unwrap().to_str().unwrap();
    match stem.split('.').next().unwrap() {
        "hello" => decode::<Hello>(&bytes).map(drop),
        "welcome" => decode::<Welcome>(&bytes).map(drop),
        "incompatible" => decode::<Incompatible>(&bytes).map(drop),
        "desired_state" => decode::<DesiredState>(&bytes).map(drop),
        "signed_desired_state" => decode::<turnout_proto::desired::SignedDesired>(&bytes).map(drop),
        "report" => decode::<Report>(&bytes).map(drop),
        "error" => decode::<ErrorBody>(&bytes).map(drop),
        other => panic!(
            "fixture {name}: no message is called {other:?}; name fixtures MESSAGE[.variant].json"
        ),
    }
}

#[test]
fn every_fixture_decodes() {
    let files = fixture_files();
    assert!(files.len() >= 10, "fixtures went missing: {files:?}");
    for name in files {
        if let Err(err) = decode_fixture(&name) {
            panic!("fixture {name} no longer decodes: {err}");
        }
    }
}

/// Fixtures are what deployed agents and coordinators send. A change that
/// breaks one must fail here, not be "fixed" by editing the fixture.
#[test]
fn fixtures_are_never_edited_or_removed() {
    let sums = String::from_utf8(fixture("SHA256SUMS")).unwrap();
    let listed: BTreeMap<&str, &str> = sums
        .lines()
        .map(|line| {
            let (digest, name) = line
                .split_once("  ")
                .expect("sha256sum format: DIGEST  NAME");
            (name, digest)
        })
        .collect();
    let present: BTreeSet<String> = fixture_files().into_iter().collect();
    for name in &present {
        let digest = hex::encode(Sha256::digest(fixture(name)));
        match listed.get(name.as_str()) {
            None => panic!(
                "fixture {name} is not in proto/tests/fixtures/SHA256SUMS; \
                 add it with: (cd proto/tests/fixtures && sha256sum {name} >> SHA256SUMS)"
            ),
            Some(expected) if *expected != digest => panic!(
                "fixture {name} was edited (sha256 {digest}, SHA256SUMS says {expected}). \
                 Deployed peers still send exactly these bytes, so they must keep decoding: \
                 restore the file, and put a new shape in a new fixture (or a new protocol \
                 version directory, fixtures/v2/) with its own line in SHA256SUMS"
            ),
            Some(_) => {}
        }
    }
    for name in listed.keys() {
        assert!(
            present.contains(*name),
            "fixture {name} is listed in SHA256SUMS but was deleted; restore it: \
             fixtures must keep decoding forever"
        );
    }
}

#[test]
fn hello_fixture_carries_the_agent_offer() {
    let hello = decode::<Hello>(&fixture("v1/hello.json")).unwrap();
    assert_eq!(hello.proto, ProtoVersion::V1);
    assert_eq!(hello.body.host.as_str(), "web-01.eu-1");
    assert_eq!(hello.body.proto_range.to_string(), "v1");
    assert_eq!(hello.body.capabilities, CapabilitySet::all_known());
    assert_eq!(hello.body.labels["role"], "web");
}

#[test]
fn a_hello_from_a_much_newer_agent_still_decodes() {
    // Written in v7 with fields this build never heard of: a frozen message
    // must still be read, so the coordinator can answer "incompatible".
    let hello = decode::<Hello>(&fixture("v1/hello.future.json")).unwrap();
    assert_eq!(hello.proto.get(), 7);
    assert_eq!(hello.body.proto_range.to_string(), "v5-v7");
    assert!(
        hello
            .body
            .capabilities
            .contains(&Capability::Unknown("x-quic".into()))
    );
    let agreed = turnout_proto::negotiate(
        &hello.body.offer(),
        &turnout_proto::Offer {
            software: "turnout 0.1.0".into(),
            range: turnout_proto::SUPPORTED,
            capabilities: CapabilitySet::all_known(),
        },
    );
    let refusal = agreed.unwrap_err();
    assert!(
        refusal.to_string().contains("upgrade the coordinator"),
        "{refusal}"
    );
}

#[test]
fn unknown_enum_values_and_fields_decode_to_unknown() {
    let report = decode::<Report>(&fixture("v1/report.future.json"))
        .unwrap()
        .body;
    let web = &report.services[0];
    assert_eq!(web.state, ServiceState::Unknown("draining".into()));
    assert_eq!(web.active_slot, Some(Slot::Unknown("purple".into())));
    assert_eq!(web.health, Health::Unknown("degraded".into()));
    let outcome = web.last_outcome.as_ref().unwrap();
    assert_eq!(outcome.kind, OutcomeKind::Unknown("preempted".into()));
    assert_eq!(
        web.committed.as_ref().unwrap().version.to_string(),
        "2.0.0-rc.1+build.5"
    );

    let error = decode::<ErrorBody>(&fixture("v1/error.future.json"))
        .unwrap()
        .body;
    assert_eq!(error.code, ErrorCode::Unknown("rate_limited".into()));
}

#[test]
fn report_fixture_round_trips_exactly() {
    let report = decode::<Report>(&fixture("v1/report.json")).unwrap();
    assert_eq!(report.body.services.len(), 2);
    assert_eq!(report.body.services[0].state, ServiceState::Baking);
    assert_eq!(report.body.services[1].health, Health::Unchecked);
    let again = decode::<Report>(&encode(report.proto, &report.body)).unwrap();
    assert_eq!(again, report);
}

#[test]
fn absent_optional_fields_take_their_defaults() {
    let desired = decode::<DesiredState>(&fixture("v1/desired_state.minimal.json")).unwrap();
    assert_eq!(desired.body.index, 0);
    assert!(desired.body.services.is_empty());
    let full = decode::<DesiredState>(&fixture("v1/desired_state.json"))
        .unwrap()
        .body;
    assert_eq!(full.services[0].rollout.as_deref(), Some("r-20261122-0007"));
}

// ---- bad input: each gives an error that names what was wrong ----

#[test]
fn empty_body() {
    for body in [&b""[..], b"  \n\t"] {
        let err = decode::<Report>(body).unwrap_err();
        assert_eq!(err, DecodeError::Empty { message: "report" });
        assert!(
            err.to_string()
                .contains("expected a JSON object with a \"proto\" field")
        );
    }
}

#[test]
fn malformed_json_names_line_and_column() {
    let err = decode::<Report>(b"{\"proto\": 1,\n \"host\": }").unwrap_err();
    let DecodeError::Syntax { line, column, .. } = &err else {
        panic!("expected a syntax error, got {err:?}");
    };
    assert_eq!((*line, *column), (2, 10), "{err}");
    assert!(
        err.to_string()
            .starts_with("report: malformed JSON at line 2, column 10"),
        "{err}"
    );
}

#[test]
fn trailing_garbage_is_malformed() {
    let err = decode::<ErrorBody>(br#"{"proto":1,"code":"internal","message":"x"} {"#).unwrap_err();
    assert!(matches!(err, DecodeError::Syntax { .. }), "{err:?}");
}

#[test]
fn wrong_type_names_the_field_path() {
    let body = br#"{"proto":1,"host":"h","seq":1,"desired_index":1,
        "services":[{"service":"web","state":"idle","health":42}]}"#;
    let err = decode::<Report>(body).unwrap_err();
    let DecodeError::Invalid { path, detail, .. } = &err else {
        panic!("expected an invalid-field error, got {err:?}");
    };
    assert_eq!(path, "services[0].health");
    assert!(detail.contains("invalid type: integer `42`"), "{detail}");
}

#[test]
fn missing_required_field_is_named() {
    let err = decode::<Report>(br#"{"proto":1,"host":"h","desired_index":1}"#).unwrap_err();
    assert!(err.to_string().contains("missing field `seq`"), "{err}");

    let err = decode::<Report>(br#"{"host":"h","seq":1,"desired_index":1}"#).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Invalid { path, .. } if path == "proto"),
        "{err:?}"
    );
    assert!(err.to_string().contains("missing field `proto`"), "{err}");
}

#[test]
fn a_top_level_array_is_not_a_message() {
    let err = decode::<Hello>(b"[1,2,3]").unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a JSON object, found an array"),
        "{err}"
    );
}

#[test]
fn an_invalid_name_is_refused_with_its_rule() {
    let body = br#"{"proto":1,"host":"h","index":1,"services":[{"service":"../etc",
        "release":{"name":"web","version":"1.0.0","sha256":"00"},"size":1}]}"#;
    // Fields are checked in name order, so the bad digest is named first ...
    let err = decode::<DesiredState>(body).unwrap_err();
    assert!(
        err.to_string().contains("invalid sha256 digest \"00\""),
        "{err}"
    );
    // ... and with it fixed, the bad service name.
    let body = String::from_utf8_lossy(body).replace("\"00\"", &format!("\"{}\"", "0".repeat(64)));
    let body = body.as_bytes();
    let err = decode::<DesiredState>(body).unwrap_err();
    assert!(
        matches!(&err, DecodeError::Invalid { path, .. } if path == "services[0].service"),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("invalid service name \"../etc\""),
        "{err}"
    );
}

#[test]
fn body_over_the_byte_limit_is_refused_before_parsing() {
    let reader = Reader {
        limits: Limits {
            max_body_bytes: 64,
            ..Limits::default()
        },
        ..Reader::default()
    };
    // Not even valid JSON: the size is checked first.
    let err = reader.decode::<Report>(&[b'{'; 65]).unwrap_err();
    assert_eq!(
        err,
        DecodeError::TooLarge {
            message: "report",
            size: 65,
            limit: 64
        }
    );
}

#[test]
fn counts_over_their_limits_are_refused() {
    let reader = Reader {
        limits: Limits {
            max_labels: 2,
            ..Limits::default()
        },
        ..Reader::default()
    };
    let body = br#"{"proto":1,"agent_version":"1","proto_range":{"min":1,"max":1},
        "host":"h","labels":{"a":"1","b":"2","c":"3"}}"#;
    let err = reader.decode::<Hello>(body).unwrap_err();
    assert_eq!(
        err.to_string(),
        "hello: `labels` has 3 entries, over the limit of 2"
    );
}

#[test]
fn a_version_the_reader_does_not_speak_is_refused_for_ordinary_messages() {
    let body = br#"{"proto":4,"host":"h","seq":1,"desired_index":1}"#;
    let err = decode::<Report>(body).unwrap_err();
    assert!(matches!(err, DecodeError::UnsupportedVersion { found, .. } if found.get() == 4));
    assert!(
        err.to_string()
            .contains("written in protocol v4, but this reader speaks v1"),
        "{err}"
    );
}

#[test]
fn deep_nesting_is_an_error_not_a_stack_overflow() {
    let mut body = br#"{"proto":1,"host":"h","seq":1,"desired_index":1,"x":"#.to_vec();
    body.extend(std::iter::repeat_n(b'[', 100_000));
    let err = decode::<Report>(&body).unwrap_err();
    assert!(
        err.to_string().contains("recursion limit exceeded"),
        "{err}"
    );
}

// ---- properties ----

fn digest() -> impl Strategy<Value = Digest> {
    any::<[u8; 32]>().prop_map(Digest::from_bytes)
}

fn version() -> impl Strategy<Value = semver::Version> {
    (
        0..50u64,
        0..50u64,
        0..50u64,
        proptest::option::of("[a-z]{1,5}\\.[1-9][0-9]?"),
    )
        .prop_map(|(major, minor, patch, pre)| {
            let mut version = semver::Version::new(major, minor, patch);
            if let Some(pre) = pre {
                version.pre = semver::Prerelease::new(&pre).unwrap();
            }
            version
        })
}

fn release() -> impl Strategy<Value = ReleaseRef> {
    ("[a-z][a-z0-9-]{0,12}", version(), digest()).prop_map(|(name, version, sha256)| ReleaseRef {
        name,
        version,
        sha256,
    })
}

fn range() -> impl Strategy<Value = ProtoRange> {
    (1..20u16, 0..5u16).prop_map(|(min, span)| {
        ProtoRange::new(
            ProtoVersion::new(min).unwrap(),
            ProtoVersion::new(min + span).unwrap(),
        )
        .unwrap()
    })
}

/// Known values, plus unknown ones that cannot collide with a known name.
fn wire_value<T: Clone + std::fmt::Debug + for<'a> From<&'a str> + 'static>(
    known: &'static [T],
) -> impl Strategy<Value = T> {
    prop_oneof![
        proptest::sample::select(known),
        "x-[a-z_]{1,10}".prop_map(|name| T::from(name.as_str())),
    ]
}

fn capabilities() -> impl Strategy<Value = CapabilitySet> {
    proptest::collection::vec(wire_value(Capability::KNOWN), 0..6)
        .prop_map(|names| names.into_iter().collect())
}

fn string_map() -> impl Strategy<Value = BTreeMap<String, String>> {
    proptest::collection::btree_map("[a-z_]{1,8}", "\\PC{0,12}", 0..4)
}

fn hello() -> impl Strategy<Value = Hello> {
    (
        "[0-9]\\.[0-9]\\.[0-9]",
        range(),
        capabilities(),
        "[a-z][a-z0-9.-]{0,20}",
        string_map(),
        string_map(),
    )
        .prop_map(
            |(agent_version, proto_range, capabilities, host, labels, facts)| Hello {
                agent_version,
                proto_range,
                capabilities,
                host: host.parse().unwrap(),
                labels,
                facts,
            },
        )
}

fn desired() -> impl Strategy<Value = DesiredState> {
    let service = (
        "[a-z][a-z0-9_-]{0,10}",
        release(),
        any::<u64>(),
        proptest::collection::vec("https://[a-z]{1,8}\\.invalid/[a-z]{1,8}", 0..3),
        proptest::option::of("r-[0-9]{1,6}"),
    )
        .prop_map(|(name, release, size, urls, rollout)| DesiredService {
            service: name.parse().unwrap(),
            release,
            size,
            urls,
            rollout,
        });
    (
        "[a-z][a-z0-9-]{0,12}",
        any::<u64>(),
        proptest::collection::vec(service, 0..4),
    )
        .prop_map(|(host, index, services)| DesiredState {
            host: host.parse().unwrap(),
            index,
            services,
            issued_at_ms: None,
            expires_ms: None,
            policy_version: None,
        })
}

fn report() -> impl Strategy<Value = Report> {
    let outcome = (
        wire_value(OutcomeKind::KNOWN),
        release(),
        "\\PC{0,40}",
        any::<u64>(),
    )
        .prop_map(|(kind, release, reason, at_ms)| Outcome {
            kind,
            release,
            reason,
            at_ms,
        });
    let service = (
        "[a-z][a-z0-9_-]{0,10}",
        wire_value(ServiceState::KNOWN),
        proptest::option::of(wire_value(Slot::KNOWN)),
        proptest::option::of(release()),
        proptest::option::of(release()),
        proptest::option::of(release()),
        wire_value(Health::KNOWN),
        proptest::option::of(outcome),
        proptest::option::of("\\PC{0,40}"),
    )
        .prop_map(
            |(
                name,
                state,
                active_slot,
                committed,
                other,
                target,
                health,
                last_outcome,
                last_error,
            )| {
                ServiceReport {
                    service: name.parse().unwrap(),
                    state,
                    active_slot,
                    committed,
                    other,
                    target,
                    health,
                    last_outcome,
                    last_error,
                }
            },
        );
    (
        "[a-z][a-z0-9-]{0,12}",
        any::<u64>(),
        any::<u64>(),
        proptest::collection::vec(service, 0..4),
    )
        .prop_map(|(host, seq, desired_index, services)| Report {
            host: host.parse().unwrap(),
            seq,
            desired_index,
            services,
            stale_since_ms: None,
            desired_refused: None,
            trust_version: None,
            trust_refused: None,
            policy_version: None,
            policy_refused: None,
            accepted_index: None,
        })
}

fn round_trips<T: Message + PartialEq + std::fmt::Debug>(message: &T) {
    let wire = encode(ProtoVersion::V1, message);
    let back =
        decode::<T>(&wire).unwrap_or_else(|e| panic!("{e}\n{}", String::from_utf8_lossy(&wire)));
    assert_eq!(&back.body, message);
    assert_eq!(back.proto, ProtoVersion::V1);
}

proptest! {
    #![proptest_config(ProptestConfig {
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/proptest-regressions/wire.txt"),
        )),
        ..ProptestConfig::default()
    })]

    #[test]
    fn hello_round_trips(message in hello()) {
        round_trips(&message);
    }

    #[test]
    fn welcome_round_trips(capabilities in capabilities(), interval in any::<u64>()) {
        round_trips(&Welcome { coordinator_version: "0.1.0".into(), capabilities, report_interval_ms: interval });
    }

    #[test]
    fn incompatible_round_trips(agent in range(), coordinator in range()) {
        round_trips(&Incompatible { agent, coordinator, coordinator_version: "turnout 0.1.0".into() });
    }

    #[test]
    fn desired_state_round_trips(message in desired()) {
        round_trips(&message);
    }

    #[test]
    fn report_round_trips(message in report()) {
        round_trips(&message);
    }

    #[test]
    fn error_round_trips(code in wire_value(ErrorCode::KNOWN), message in "\\PC{0,60}") {
        round_trips(&ErrorBody { code, message });
    }

    #[test]
    fn random_bytes_never_panic_the_decoder(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode::<Hello>(&bytes);
        let _ = decode::<Report>(&bytes);
        let _ = decode::<DesiredState>(&bytes);
        let _ = decode::<Welcome>(&bytes);
        let _ = decode::<Incompatible>(&bytes);
        let _ = decode::<ErrorBody>(&bytes);
    }

    #[test]
    fn mutated_fixtures_never_panic_the_decoder(
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<proptest::sample::Index>(),
    ) {
        let mut bytes = fixture("v1/report.json");
        let i = at.index(bytes.len());
        bytes[i] = byte;
        bytes.truncate(cut.index(bytes.len() + 1).max(i));
        let _ = decode::<Report>(&bytes);
    }
}

// ---- protocol v2 ----

/// The key the v2 signed fixture was signed with (seed 7s).
fn fixture_director() -> turnout_proto::keys::SecretKey {
    turnout_proto::keys::SecretKey::from_seed([7; 32])
}

#[test]
fn the_v2_signed_desired_state_fixture_verifies_and_holds_the_v1_document() {
    use turnout_proto::desired::{DesiredRefusal, SignedDesired, accept};
    let signed = decode::<SignedDesired>(&fixture("v2/signed_desired_state.json")).unwrap();
    assert_eq!(signed.proto, turnout_proto::ProtoVersion::V2);
    let director = fixture_director().public();
    let keys = [(director.id().clone(), director)].into();
    let host = "web-01.eu-1".parse().unwrap();
    let (doc, kept) = accept(
        &signed.body,
        &keys,
        &host,
        1_795_312_900_000,
        None,
        &turnout_proto::Limits::default(),
    )
    .unwrap();
    let v1 = decode::<DesiredState>(&fixture("v1/desired_state.json"))
        .unwrap()
        .body;
    assert_eq!(doc.services, v1.services, "the same desired state, signed");
    assert_eq!(kept.index, 42);
    // An hour after issue it has expired: a fixture replayed today is refused.
    let late = accept(
        &signed.body,
        &keys,
        &host,
        1_795_316_400_000,
        None,
        &Default::default(),
    );
    assert!(
        matches!(late, Err(DesiredRefusal::Expired { .. })),
        "{late:?}"
    );
}

#[test]
fn a_v2_report_carries_staleness_and_a_v1_reader_would_ignore_it() {
    let report = decode::<Report>(&fixture("v2/report.json")).unwrap();
    assert_eq!(report.proto, turnout_proto::ProtoVersion::V2);
    assert_eq!(report.body.stale_since_ms, Some(1_795_316_000_000));
    assert!(
        report
            .body
            .desired_refused
            .as_deref()
            .unwrap()
            .contains("expired")
    );
    // v1 documents keep their exact bytes: the new fields are never written empty.
    let v1 = decode::<Report>(&fixture("v1/report.json")).unwrap();
    let again = String::from_utf8(encode(v1.proto, &v1.body)).unwrap();
    assert!(
        !again.contains("stale_since_ms") && !again.contains("desired_refused"),
        "{again}"
    );
}

#[test]
fn a_v1_only_reader_refuses_v2_bodies_by_version() {
    let v1_only = turnout_proto::Reader {
        limits: turnout_proto::Limits::default(),
        accept: ProtoRange::new(
            turnout_proto::ProtoVersion::V1,
            turnout_proto::ProtoVersion::V1,
        )
        .unwrap(),
    };
    let err = v1_only
        .decode::<Report>(&fixture("v2/report.json"))
        .unwrap_err();
    assert!(
        matches!(err, DecodeError::UnsupportedVersion { .. }),
        "{err}"
    );
}
