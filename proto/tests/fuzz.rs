//! Fuzzing of every parser in `turnout-proto` with proptest: arbitrary
//! bytes, and mutations of valid inputs (the golden fixtures, a signed
//! trust file, a manifest). The property is the same everywhere: a parser
//! returns a value or its own error, and never panics, loops or allocates
//! past its limits. `FUZZ_CASES=N` runs more cases (the default is small
//! enough for CI; `docs/testing.md` has the long run).

use proptest::prelude::*;
use turnout_proto::manifest::Manifest;
use turnout_proto::messages::{DesiredState, ErrorBody, Hello, Incompatible, Report, Welcome};
use turnout_proto::request_auth::HostAuth;
use turnout_proto::trust::TrustFile;
use turnout_proto::{Limits, Reader};

fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(512)
}

const FIXTURES: &[&str] = &[
    include_str!("fixtures/v1/desired_state.json"),
    include_str!("fixtures/v1/desired_state.minimal.json"),
    include_str!("fixtures/v1/error.json"),
    include_str!("fixtures/v1/error.future.json"),
    include_str!("fixtures/v1/hello.json"),
    include_str!("fixtures/v1/hello.future.json"),
    include_str!("fixtures/v1/incompatible.json"),
    include_str!("fixtures/v1/report.json"),
    include_str!("fixtures/v1/report.future.json"),
    include_str!("fixtures/v1/welcome.json"),
    include_str!("fixtures/v2/report.json"),
    include_str!("fixtures/v2/signed_desired_state.json"),
    include_str!("fixtures/v2/welcome.json"),
];

/// Every wire decoder over `bytes`; none may panic.
fn decode_all(bytes: &[u8]) {
    let reader = Reader::default();
    let _ = reader.decode::<Hello>(bytes);
    let _ = reader.decode::<Welcome>(bytes);
    let _ = reader.decode::<Incompatible>(bytes);
    let _ = reader.decode::<DesiredState>(bytes);
    let _ = reader.decode::<Report>(bytes);
    let _ = reader.decode::<ErrorBody>(bytes);
    let _ = ErrorBody::message_of(bytes);
    // The signed desired state: decoded, then checked as an agent does
    // (signature, document, host, expiry, index) with the fixture's key.
    if let Ok(signed) = reader.decode::<turnout_proto::desired::SignedDesired>(bytes) {
        let director = turnout_proto::keys::SecretKey::from_seed([7; 32]).public();
        let keys = [(director.id().clone(), director)].into();
        let _ = turnout_proto::desired::accept(
            &signed.body,
            &keys,
            &"web-01.eu-1".parse().unwrap(),
            1_795_312_900_000,
            None,
            &Limits::default(),
        );
    }
}

/// A mutation of `input`: flipped, inserted, deleted and duplicated bytes.
fn mutated(input: &'static [u8]) -> impl Strategy<Value = Vec<u8>> {
    let len = input.len().max(1);
    proptest::collection::vec((0usize..4, 0..len, any::<u8>(), 0usize..64), 1..8).prop_map(
        move |edits| {
            let mut bytes = input.to_vec();
            for (kind, at, byte, span) in edits {
                let at = at.min(bytes.len());
                match kind {
                    0 if at < bytes.len() => bytes[at] = byte,
                    1 => bytes.insert(at, byte),
                    2 => {
                        let end = (at + span).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    _ => {
                        let end = (at + span).min(bytes.len());
                        let copy = bytes[at..end].to_vec();
                        bytes.splice(at..at, copy);
                    }
                }
            }
            bytes
        },
    )
}

/// JSON-shaped noise: structures the decoders must walk without trusting.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        "[a-z0-9_.@-]{0,12}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            proptest::collection::btree_map(
                prop_oneof![
                    Just("proto".to_owned()),
                    Just("host".to_owned()),
                    Just("services".to_owned()),
                    Just("index".to_owned()),
                    Just("seq".to_owned()),
                    Just("release".to_owned()),
                    Just("sha256".to_owned()),
                    Just("state".to_owned()),
                    "[a-z_]{1,10}",
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(), failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn wire_decoders_survive_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
    }

    #[test]
    fn wire_decoders_survive_mutated_fixtures(
        which in 0..FIXTURES.len(),
        bytes in (0..FIXTURES.len()).prop_flat_map(|i| mutated(FIXTURES[i].as_bytes())),
    ) {
        let _ = which;
        decode_all(&bytes);
    }

    #[test]
    fn wire_decoders_survive_json_shaped_noise(value in json_value()) {
        decode_all(value.to_string().as_bytes());
    }

    /// A document the director really signed, mangled before signing: the
    /// checks after the signature (parse, limits, host, dates, index) meet
    /// whatever a compromised coordinator could sign.
    #[test]
    fn signed_desired_documents_survive_anything_the_director_signs(
        document in prop_oneof![
            mutated(include_str!("fixtures/v1/desired_state.json").as_bytes()),
            json_value().prop_map(|v| v.to_string().into_bytes()),
        ],
    ) {
        let key = turnout_proto::keys::SecretKey::from_seed([7; 32]);
        let document = String::from_utf8_lossy(&document).into_owned();
        let signed = turnout_proto::desired::SignedDesired {
            signature: turnout_proto::signature::SignatureEntry {
                key_id: key.public().id().clone(),
                sig: key.sign(document.as_bytes()),
            },
            document,
        };
        let keys = [(key.public().id().clone(), key.public())].into();
        let _ = turnout_proto::desired::accept(
            &signed,
            &keys,
            &"web-01.eu-1".parse().unwrap(),
            1_795_312_900_000,
            None,
            &Limits::default(),
        );
    }

    #[test]
    fn manifests_and_trust_files_survive_mutation(
        manifest in mutated(MANIFEST.as_bytes()),
        trust in mutated(TRUST.as_bytes()),
        noise in proptest::collection::vec(any::<u8>(), 0..1024),
    ) {
        let limits = Limits::default();
        let _ = Manifest::parse(&manifest, &limits);
        let _ = Manifest::parse(&noise, &limits);
        let _ = TrustFile::parse(&trust, &limits);
        let _ = TrustFile::parse(&noise, &limits);
    }

    #[test]
    fn host_auth_headers_survive_anything(header in "\\PC{0,300}", raw in mutated(auth().as_bytes())) {
        let _ = HostAuth::parse(&header);
        let _ = HostAuth::parse(&String::from_utf8_lossy(&raw));
    }
}

const MANIFEST: &str = r#"{"format":1,"name":"web","version":"1.4.2","created":"2026-01-01T00:00:00Z","expires":"2027-01-01T00:00:00Z","entry":"bin/web","files":[{"path":"bin/web","size":12,"sha256":"0000000000000000000000000000000000000000000000000000000000000000","mode":"0755"}],"links":[{"path":"current","target":"bin/web"}],"provides":["api/v2"],"requires":[]}"#;

const TRUST: &str = r#"{"signed":{"format":1,"version":1,"threshold":1,"created":"2026-12-01T06:48:42Z","keys":[{"id":"ec038edbaf4548c3","public_key":"-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAC2EJHRmKnH8BXthpxzZKp/rnLuWVY4M0Y7JupJ7Sr0c=\n-----END PUBLIC KEY-----\n"}]},"signatures":[]}"#;

/// A real header, signed by a test key.
fn auth() -> &'static str {
    static AUTH: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    AUTH.get_or_init(|| {
        let key = turnout_proto::keys::SecretKey::from_seed([7; 32]);
        turnout_proto::request_auth::sign(
            &key,
            &"web-01".parse().unwrap(),
            "POST",
            "/v1/agent/report",
            1_796_000_000_000,
            b"{}",
        )
    })
}

/// The mutations start from valid inputs, so they reach deep into each parser.
#[test]
fn the_seeds_of_the_mutations_are_valid() {
    let limits = Limits::default();
    Manifest::parse(MANIFEST.as_bytes(), &limits).unwrap();
    TrustFile::parse(TRUST.as_bytes(), &limits).unwrap();
    HostAuth::parse(auth()).unwrap();
    let reader = Reader::default();
    reader.decode::<Hello>(FIXTURES[4].as_bytes()).unwrap();
    reader.decode::<Report>(FIXTURES[7].as_bytes()).unwrap();
    reader
        .decode::<DesiredState>(FIXTURES[0].as_bytes())
        .unwrap();
}
