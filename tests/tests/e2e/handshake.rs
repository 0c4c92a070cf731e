//! The agent and coordinator of one build agree on the newest protocol and
//! every capability, through the real encode and decode path.

use turnout_proto::messages::{Hello, Welcome};
use turnout_proto::{Envelope, SUPPORTED, decode, encode, negotiate};

#[test]
fn agent_and_coordinator_of_one_build_agree_on_everything() {
    let agent = turnout_agent::offer();
    let coordinator = turnout::offer();

    let hello = Hello {
        agent_version: turnout_agent::VERSION.into(),
        proto_range: agent.range,
        capabilities: agent.capabilities.clone(),
        host: "web-01".parse().unwrap(),
        labels: [("role".to_owned(), "web".to_owned())].into(),
        facts: Default::default(),
    };
    let wire = encode(SUPPORTED.max(), &hello);
    let Envelope { body: received, .. } = decode::<Hello>(&wire).unwrap();

    let agreed = negotiate(&received.offer(), &coordinator).unwrap();
    assert_eq!(agreed.version, SUPPORTED.max());
    assert_eq!(agreed.capabilities, agent.capabilities);
    assert_eq!(agreed.capabilities, coordinator.capabilities);

    let welcome = Welcome {
        coordinator_version: turnout::VERSION.into(),
        capabilities: agreed.capabilities.clone(),
        report_interval_ms: 10_000,
    };
    let back = decode::<Welcome>(&encode(agreed.version, &welcome)).unwrap();
    assert_eq!(back.proto, agreed.version);
    assert_eq!(back.body, welcome);
}
