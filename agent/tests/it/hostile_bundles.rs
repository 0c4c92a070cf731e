//! Verify-and-unpack against hostile input: every case is refused with its
//! own error, and the destination is left exactly as it was.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use proptest::prelude::*;
use turnout_agent::stage::{StageError, unpack};
use turnout_proto::Limits;
use turnout_proto::bundle::BundleError;
use turnout_proto::manifest::{ManifestError, Timestamp};
use turnout_proto::signature::SignatureError;
use turnout_proto::trust::Trust;

use crate::corpus::{Tar, files, good_bundle, key, manifest, signed, trust};

/// Stages `bundle` into `<tmp>/staging` and returns the bundle error, after
/// checking that the parent holds nothing but the sentinel it held before.
fn rejected_with(bundle: &[u8], trust: &Trust, limits: &Limits) -> BundleError {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("sentinel"), b"before").unwrap();
    let staging = dir.path().join("staging");
    let err = match unpack(bundle, trust, SystemTime::now(), limits, &staging) {
        Ok((verified, _)) => panic!("accepted a hostile bundle: {}", verified.manifest.version),
        Err(StageError::Bundle(err)) => err,
        Err(other) => panic!("staging failed for a reason other than the bundle: {other}"),
    };
    assert_untouched(dir.path());
    err
}

fn assert_untouched(dir: &Path) {
    let names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names, ["sentinel"], "the rejected bundle left files behind");
    assert_eq!(fs::read(dir.join("sentinel")).unwrap(), b"before");
}

fn rejected(bundle: &[u8]) -> BundleError {
    rejected_with(bundle, &trust(1, &[&key(1)]), &Limits::default())
}

/// A bundle of [`files`] signed by key 1, with `edit` applied to the files
/// written to the payload (the manifest describes the originals).
fn with_payload(edit: impl FnOnce(&mut Vec<(&'static str, u32, Vec<u8>)>)) -> Vec<u8> {
    let original = files();
    let (manifest, signatures) = signed(&manifest(&original, &[]), &[&key(1)]);
    let mut payload = original;
    edit(&mut payload);
    Tar::default()
        .head(&manifest, &signatures)
        .payload(&payload)
        .finish()
}

/// A bundle of [`files`] signed by key 1 followed by one extra raw member.
fn with_extra(name: &[u8], kind: tar::EntryType, link: &[u8]) -> Vec<u8> {
    let files = files();
    let (manifest, signatures) = signed(&manifest(&files, &[]), &[&key(1)]);
    let mut tar = Tar::default();
    tar.head(&manifest, &signatures).payload(&files);
    tar.raw(name, kind, link, 0, b"");
    tar.finish()
}

#[test]
fn a_good_bundle_unpacks_every_file_with_its_mode() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    let trust = trust(2, &[&key(1), &key(2)]);
    let (verified, _) = unpack(
        &good_bundle(&[&key(1), &key(2)])[..],
        &trust,
        SystemTime::now(),
        &Limits::default(),
        &staging,
    )
    .unwrap();
    assert_eq!(verified.signed_by.len(), 2);
    for (path, mode, data) in files() {
        let full = staging.join(path);
        assert_eq!(fs::read(&full).unwrap(), data, "{path}");
        assert_eq!(
            fs::metadata(&full).unwrap().permissions().mode() & 0o777,
            mode,
            "{path}"
        );
    }
    assert_eq!(
        fs::read_link(staging.join("bin/latest")).unwrap(),
        Path::new("web")
    );
}

#[test]
fn tampered_payload_byte() {
    let bundle = with_payload(|files| files[2].2[60_000] ^= 1);
    let err = rejected(&bundle);
    assert!(
        matches!(&err, BundleError::DigestMismatch { path, .. } if path.as_str() == "share/big.bin"),
        "{err}"
    );
    assert!(err.to_string().contains("the payload was altered"), "{err}");
}

#[test]
fn tampered_manifest_byte() {
    let files = files();
    let (manifest, signatures) = signed(&manifest(&files, &[]), &[&key(1)]);
    let text = String::from_utf8(manifest)
        .unwrap()
        .replace("1.4.2", "1.4.3");
    let bundle = Tar::default()
        .head(text.as_bytes(), &signatures)
        .payload(&files)
        .finish();
    let err = rejected(&bundle);
    assert!(
        matches!(err, BundleError::Signature(SignatureError::Invalid { .. })),
        "{err}"
    );
    assert!(
        err.to_string().contains("changed after it was signed"),
        "{err}"
    );
}

#[test]
fn signature_by_an_unknown_key() {
    let err = rejected(&good_bundle(&[&key(9)]));
    let unknown = key(9).public().id().clone();
    assert!(
        matches!(&err, BundleError::Signature(SignatureError::UnknownKey { unknown: ids, valid: 0, .. }) if ids == &[unknown]),
        "{err}"
    );
}

#[test]
fn valid_signatures_below_threshold() {
    let err = rejected_with(
        &good_bundle(&[&key(1)]),
        &trust(2, &[&key(1), &key(2)]),
        &Limits::default(),
    );
    assert!(
        matches!(&err, BundleError::Signature(SignatureError::BelowThreshold { valid, threshold: 2, .. }) if valid.len() == 1),
        "{err}"
    );
}

#[test]
fn the_same_key_repeated_to_reach_the_threshold() {
    let err = rejected_with(
        &good_bundle(&[&key(1), &key(1)]),
        &trust(2, &[&key(1), &key(2)]),
        &Limits::default(),
    );
    assert!(
        matches!(
            err,
            BundleError::Signature(SignatureError::Repeated {
                count: 2,
                valid: 1,
                ..
            })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("each key counts once"), "{err}");
}

#[test]
fn expired_manifest() {
    let files = files();
    let mut m = manifest(&files, &[]);
    m.expires = Some(Timestamp(SystemTime::now() - Duration::from_secs(60)));
    let (manifest, signatures) = signed(&m, &[&key(1)]);
    let err = rejected(
        &Tar::default()
            .head(&manifest, &signatures)
            .payload(&files)
            .finish(),
    );
    assert!(
        matches!(err, BundleError::Manifest(ManifestError::Expired { .. })),
        "{err}"
    );
}

#[test]
fn payload_member_not_in_the_manifest() {
    let bundle = with_payload(|files| files.push(("bin/backdoor", 0o755, b"#!/bin/sh\n".to_vec())));
    let err = rejected(&bundle);
    assert!(
        matches!(&err, BundleError::Unlisted { path, kind: "file" } if path.as_str() == "bin/backdoor"),
        "{err}"
    );
}

#[test]
fn manifest_entry_missing_from_the_payload() {
    let bundle = with_payload(|files| {
        files.remove(1);
    });
    let err = rejected(&bundle);
    assert!(
        matches!(&err, BundleError::Missing { path } if path.as_str() == "etc/config.toml"),
        "{err}"
    );
}

#[test]
fn size_mismatch() {
    let bundle = with_payload(|files| files[1].2.push(b'\n'));
    let err = rejected(&bundle);
    assert!(
        matches!(
            err,
            BundleError::SizeMismatch {
                manifest: 12,
                archive: 13,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn dot_dot_path() {
    let err = rejected(&with_extra(
        b"payload/../../etc/cron.d/evil",
        tar::EntryType::Regular,
        b"",
    ));
    assert!(
        matches!(&err, BundleError::UnsafePath { detail, .. } if detail.contains("'..'")),
        "{err}"
    );
}

#[test]
fn absolute_path() {
    let err = rejected(&with_extra(
        b"/etc/cron.d/evil",
        tar::EntryType::Regular,
        b"",
    ));
    assert!(
        matches!(&err, BundleError::UnsafePath { detail, .. } if detail.contains("absolute")),
        "{err}"
    );
}

#[test]
fn symlink_pointing_outside_the_payload() {
    // Listed in the signed manifest: refused before any payload byte is read.
    let files = files();
    let (manifest, signatures) = signed(
        &manifest(&files, &[("bin/passwd", "../../../etc/passwd")]),
        &[&key(1)],
    );
    let mut tar = Tar::default();
    tar.head(&manifest, &signatures).payload(&files);
    tar.raw(
        b"payload/bin/passwd",
        tar::EntryType::Symlink,
        b"../../../etc/passwd",
        0,
        b"",
    );
    let err = rejected(&tar.finish());
    assert!(
        matches!(
            err,
            BundleError::Manifest(ManifestError::LinkEscapes { .. })
        ),
        "{err}"
    );

    // Not listed: refused as an unlisted member.
    let err = rejected(&with_extra(
        b"payload/bin/shadow",
        tar::EntryType::Symlink,
        b"/etc/shadow",
    ));
    assert!(
        matches!(
            err,
            BundleError::Unlisted {
                kind: "symlink",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn symlink_retargeted_after_signing() {
    let files = files();
    let (manifest, signatures) = signed(&manifest(&files, &[("bin/latest", "web")]), &[&key(1)]);
    let mut tar = Tar::default();
    tar.head(&manifest, &signatures).payload(&files);
    tar.raw(
        b"payload/bin/latest",
        tar::EntryType::Symlink,
        b"/bin/sh",
        0,
        b"",
    );
    let err = rejected(&tar.finish());
    assert!(
        matches!(&err, BundleError::LinkMismatch { archive, .. } if archive == "/bin/sh"),
        "{err}"
    );
}

#[test]
fn hardlink_pointing_outside_the_payload() {
    let err = rejected(&with_extra(
        b"payload/etc/shadow",
        tar::EntryType::Link,
        b"/etc/shadow",
    ));
    assert!(
        matches!(&err, BundleError::HardLink { target, .. } if target == "/etc/shadow"),
        "{err}"
    );
}

#[test]
fn device_node() {
    let err = rejected(&with_extra(b"payload/dev/sda", tar::EntryType::Block, b""));
    assert!(
        matches!(&err, BundleError::SpecialFile { kind, .. } if kind == "block device"),
        "{err}"
    );
    let err = rejected(&with_extra(b"payload/dev/mem", tar::EntryType::Char, b""));
    assert!(
        matches!(&err, BundleError::SpecialFile { kind, .. } if kind == "character device"),
        "{err}"
    );
}

#[test]
fn fifo() {
    let err = rejected(&with_extra(b"payload/run/pipe", tar::EntryType::Fifo, b""));
    assert!(
        matches!(&err, BundleError::SpecialFile { kind, .. } if kind == "FIFO"),
        "{err}"
    );
}

#[test]
fn duplicate_paths() {
    let bundle = with_payload(|files| {
        let again = files[0].clone();
        files.push(again);
    });
    let err = rejected(&bundle);
    assert!(
        matches!(&err, BundleError::DuplicateMember { path } if path.as_str() == "bin/web"),
        "{err}"
    );
}

#[test]
fn truncated_archive() {
    let bundle = good_bundle(&[&key(1)]);
    // Cut inside share/big.bin's data.
    let err = rejected(&bundle[..bundle.len() / 2]);
    assert!(
        matches!(&err, BundleError::Truncated { member } if member == "payload/share/big.bin"),
        "{err}"
    );
    // Cut inside a header.
    let err = rejected(&bundle[..2048 + 100]);
    assert!(matches!(err, BundleError::Truncated { .. }), "{err}");
}

#[test]
fn manifest_over_the_limit() {
    let limits = Limits {
        max_manifest_bytes: 256,
        ..Limits::default()
    };
    let err = rejected_with(&good_bundle(&[&key(1)]), &trust(1, &[&key(1)]), &limits);
    assert!(
        matches!(
            err,
            BundleError::Manifest(ManifestError::TooLarge { limit: 256, .. })
        ),
        "{err}"
    );
}

#[test]
fn bundle_over_the_limit() {
    let bundle = good_bundle(&[&key(1)]);
    // Declared sizes fit; the archive as read does not.
    let limits = Limits {
        max_bundle_bytes: 75_000,
        ..Limits::default()
    };
    let err = rejected_with(&bundle, &trust(1, &[&key(1)]), &limits);
    assert!(
        matches!(err, BundleError::TooLarge { limit: 75_000 }),
        "{err}"
    );
}

#[test]
fn declared_size_far_larger_than_the_real_data() {
    // The manifest and the tar header both claim 1 GiB; 100 bytes follow.
    let mut files = files();
    let huge = 1 << 30;
    let mut m = manifest(&files, &[]);
    m.files[2].size = huge;
    let (manifest, signatures) = signed(&m, &[&key(1)]);
    files.truncate(2);
    let mut tar = Tar::default();
    tar.head(&manifest, &signatures).payload(&files);
    tar.raw(
        b"payload/share/big.bin",
        tar::EntryType::Regular,
        b"",
        huge,
        &[7; 100],
    );
    let err = rejected(&tar.0);
    assert!(
        matches!(&err, BundleError::Truncated { member } if member == "payload/share/big.bin"),
        "{err}"
    );

    // Past the bundle limit, it is refused from the manifest alone.
    m.files[2].size = 1 << 40;
    let (manifest, signatures) = signed(&m, &[&key(1)]);
    let err = rejected(&Tar::default().head(&manifest, &signatures).finish());
    assert!(
        matches!(
            err,
            BundleError::Manifest(ManifestError::OverLimit { what: "bytes", .. })
        ),
        "{err}"
    );
}

#[test]
fn garbage_that_is_not_a_tar() {
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let garbage: Vec<u8> = (0..4096)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let err = rejected(&garbage);
    assert!(matches!(err, BundleError::NotATar { .. }), "{err}");
    assert!(err.to_string().starts_with("not a Turnout bundle"), "{err}");
}

#[test]
fn empty_file() {
    let err = rejected(b"");
    assert!(matches!(err, BundleError::Empty), "{err}");
}

#[test]
fn manifest_not_first() {
    let files = files();
    let (manifest, signatures) = signed(&manifest(&files, &[]), &[&key(1)]);
    let mut tar = Tar::default();
    tar.payload(&files).head(&manifest, &signatures);
    let err = rejected(&tar.finish());
    assert!(
        matches!(
            err,
            BundleError::MissingMember {
                expected: "manifest.json",
                position: 1,
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn staging_refuses_an_existing_directory_and_keeps_it() {
    let dir = tempfile::tempdir().unwrap();
    let staging = dir.path().join("staging");
    fs::create_dir(&staging).unwrap();
    fs::write(staging.join("keep"), b"x").unwrap();
    let trust = trust(1, &[&key(1)]);
    let err = unpack(
        &good_bundle(&[&key(1)])[..],
        &trust,
        SystemTime::now(),
        &Limits::default(),
        &staging,
    )
    .unwrap_err();
    assert!(matches!(err, StageError::Exists(_)), "{err}");
    assert_eq!(fs::read(staging.join("keep")).unwrap(), b"x");
}

/// Stages `bundle`: refused, it leaves the parent as it was; accepted, what
/// unpacks is exactly the release.
fn refused_cleanly_or_intact(bundle: &[u8]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("sentinel"), b"before").unwrap();
    let staging = dir.path().join("staging");
    match unpack(
        bundle,
        &trust(1, &[&key(1)]),
        SystemTime::now(),
        &Limits::default(),
        &staging,
    ) {
        Err(_) => assert_untouched(dir.path()),
        Ok(_) => {
            for (path, _, data) in files() {
                prop_assert_eq!(
                    fs::read(staging.join(path)).unwrap(),
                    data,
                    "{} changed",
                    path
                );
            }
        }
    }
    Ok(())
}

/// Cases per property; `FUZZ_CASES=N` runs a longer fuzzing session.
fn cases() -> u32 {
    std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(96)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: Some(Box::new(
            proptest::test_runner::FileFailurePersistence::Direct("tests/proptest-regressions/hostile_bundles.txt"),
        )),
        ..ProptestConfig::default()
    })]

    /// Any single-byte change to a signed bundle is either refused, leaving
    /// nothing behind, or harmless: what unpacks is exactly the release.
    #[test]
    fn a_flipped_byte_is_refused_or_harmless(at in any::<proptest::sample::Index>(), xor in 1..=255u8) {
        let mut bundle = good_bundle(&[&key(1)]);
        let i = at.index(bundle.len());
        bundle[i] ^= xor;
        refused_cleanly_or_intact(&bundle).map_err(|e| TestCaseError::fail(format!("byte {i}: {e}")))?;
    }

    /// Fuzzing the bundle reader: several edits at once (changed, inserted,
    /// removed bytes; a cut) never panic, and never leave anything behind
    /// when refused. `FUZZ_CASES=N` runs more.
    #[test]
    fn edited_and_cut_bundles_are_refused_cleanly_or_unpack_the_release(
        edits in proptest::collection::vec((0u8..3, any::<proptest::sample::Index>(), any::<u8>()), 1..6),
        cut in proptest::option::of(any::<proptest::sample::Index>()),
    ) {
        let mut bundle = good_bundle(&[&key(1)]);
        for (kind, at, byte) in edits {
            let i = at.index(bundle.len());
            match kind {
                0 => bundle[i] ^= byte.max(1),
                1 => bundle.insert(i, byte),
                _ => {
                    bundle.remove(i);
                }
            }
        }
        if let Some(cut) = cut {
            bundle.truncate(cut.index(bundle.len()));
        }
        refused_cleanly_or_intact(&bundle)?;
    }
}

/// Bytes after the archive's end would give the same signed content a new
/// file digest: a coordinator alternating padded copies made a host
/// reinstall the same release again and again.
#[test]
fn data_after_the_end_of_the_archive() {
    let good = good_bundle(&[&key(1)]);
    for (tail, found) in [
        (b"garbage".to_vec(), 512 + 7),
        (vec![0u8; 512], 1024),
        (vec![0u8; 10_240], 512 + 10_240),
    ] {
        let mut padded = good.clone();
        padded.extend_from_slice(&tail);
        assert!(
            matches!(rejected(&padded), BundleError::TrailingData { found: f } if f == found),
            "{} trailing byte(s)",
            tail.len()
        );
    }
    // A missing second end block is a truncated archive, also refused.
    let cut = &good[..good.len() - 512];
    assert!(matches!(
        rejected(cut),
        BundleError::TrailingData { found: 0 }
    ));
}

/// Found by attacking: member names with escape sequences and line breaks
/// reached the operator's terminal through every command that named them.
#[test]
fn a_member_name_with_control_characters() {
    let err = rejected(&with_extra(
        b"payload/x\x1b[31mRED\nFAKE OK line",
        tar::EntryType::Regular,
        b"",
    ));
    assert!(matches!(&err, BundleError::UnsafePath { .. }), "{err}");
    let text = err.to_string();
    assert!(!text.contains('\x1b') && !text.contains('\n'), "{text}");
}
