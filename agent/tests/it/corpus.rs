//! Builds bundles byte by byte, so tests can make every hostile variant a
//! real attacker could: any member name, type, size, order or content.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use sha2::{Digest as _, Sha256};
use turnout_proto::Digest;
use turnout_proto::keys::SecretKey;
use turnout_proto::manifest::{FileEntry, LinkEntry, Manifest, Mode, PayloadPath, Timestamp};
use turnout_proto::signature::SignatureEntry;
use turnout_proto::trust::Trust;

/// A release key from a fixed seed: tests are repeatable.
pub(crate) fn key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

/// A trust of the given keys.
pub(crate) fn trust(threshold: usize, keys: &[&SecretKey]) -> Trust {
    Trust::new(
        1,
        threshold,
        SystemTime::UNIX_EPOCH,
        keys.iter().map(|k| k.public()).collect(),
    )
    .unwrap()
}

/// The files of a small, valid release.
pub(crate) fn files() -> Vec<(&'static str, u32, Vec<u8>)> {
    vec![
        ("bin/web", 0o755, b"#!/bin/sh\nexec sleep 1000\n".to_vec()),
        ("etc/config.toml", 0o644, b"port = 8080\n".to_vec()),
        (
            "share/big.bin",
            0o644,
            (0..70_000u32).map(|i| (i % 251) as u8).collect(),
        ),
    ]
}

/// A manifest of web 1.4.2 listing `files` and `links`.
pub(crate) fn manifest(files: &[(&str, u32, Vec<u8>)], links: &[(&str, &str)]) -> Manifest {
    manifest_of("1.4.2", "bin/web", files, links)
}

/// A manifest of web `version` with `entry`, listing `files` and `links`.
pub(crate) fn manifest_of(
    version: &str,
    entry: &str,
    files: &[(&str, u32, Vec<u8>)],
    links: &[(&str, &str)],
) -> Manifest {
    Manifest {
        format: 1,
        name: "web".parse().unwrap(),
        version: version.parse().unwrap(),
        created: Timestamp(SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_000_000)),
        expires: None,
        entry: PayloadPath::new(entry).unwrap(),
        files: files
            .iter()
            .map(|(path, mode, data)| FileEntry {
                path: PayloadPath::new(path).unwrap(),
                size: data.len() as u64,
                sha256: Digest::from_bytes(Sha256::digest(data).into()),
                mode: Mode::new(*mode).unwrap(),
            })
            .collect(),
        links: links
            .iter()
            .map(|(path, target)| LinkEntry {
                path: PayloadPath::new(path).unwrap(),
                target: (*target).to_owned(),
            })
            .collect(),
        provides: vec![],
        requires: vec![],
        extra: BTreeMap::new(),
    }
}

/// `key`'s signature over exactly `manifest`.
pub(crate) fn signature(key: &SecretKey, manifest: &[u8]) -> SignatureEntry {
    SignatureEntry {
        key_id: key.public().id().clone(),
        sig: key.sign(manifest),
    }
}

/// The exact manifest bytes and one signature per key given.
pub(crate) fn signed(manifest: &Manifest, keys: &[&SecretKey]) -> (Vec<u8>, Vec<u8>) {
    let bytes = serde_json::to_vec_pretty(manifest).unwrap();
    let signatures: Vec<_> = keys.iter().map(|k| signature(k, &bytes)).collect();
    (bytes, serde_json::to_vec(&signatures).unwrap())
}

/// A tar archive written one raw member at a time.
#[derive(Default)]
pub(crate) struct Tar(pub(crate) Vec<u8>);

impl Tar {
    /// Appends a member with exactly this name, type, link name and data; the
    /// header's size field is `size` (normally `data.len()`).
    pub(crate) fn raw(
        &mut self,
        name: &[u8],
        kind: tar::EntryType,
        link: &[u8],
        size: u64,
        data: &[u8],
    ) -> &mut Tar {
        let mut header = tar::Header::new_old();
        header.set_entry_type(kind);
        header.set_size(size);
        header.set_mode(0o644);
        header.set_mtime(0);
        let old = header.as_old_mut();
        old.name[..name.len()].copy_from_slice(name);
        old.linkname[..link.len()].copy_from_slice(link);
        header.set_cksum();
        self.0.extend_from_slice(header.as_bytes());
        self.0.extend_from_slice(data);
        let pad = (512 - data.len() % 512) % 512;
        self.0.extend(std::iter::repeat_n(0, pad));
        self
    }

    /// Appends a regular file member.
    pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Tar {
        self.raw(
            name.as_bytes(),
            tar::EntryType::Regular,
            b"",
            data.len() as u64,
            data,
        )
    }

    /// Appends the manifest and signatures members.
    pub(crate) fn head(&mut self, manifest: &[u8], signatures: &[u8]) -> &mut Tar {
        self.file("manifest.json", manifest)
            .file("signatures.json", signatures)
    }

    /// Appends every file of `files` under payload/.
    pub(crate) fn payload(&mut self, files: &[(&str, u32, Vec<u8>)]) -> &mut Tar {
        for (path, _, data) in files {
            self.file(&format!("payload/{path}"), data);
        }
        self
    }

    /// The archive with its end-of-archive blocks.
    pub(crate) fn finish(&mut self) -> Vec<u8> {
        let mut bytes = std::mem::take(&mut self.0);
        bytes.extend(std::iter::repeat_n(0, 1024));
        bytes
    }
}

/// A valid bundle of [`files`] plus a link, signed by `keys`.
pub(crate) fn good_bundle(keys: &[&SecretKey]) -> Vec<u8> {
    let files = files();
    let links = [("bin/latest", "web")];
    let (manifest, signatures) = signed(&manifest(&files, &links), keys);
    let mut tar = Tar::default();
    tar.head(&manifest, &signatures).payload(&files);
    tar.raw(
        b"payload/bin/latest",
        tar::EntryType::Symlink,
        b"web",
        0,
        b"",
    );
    tar.finish()
}
