//! What the workspace's tests share: polling for a condition with a
//! deadline (never a fixed sleep), a free port, and signed release bundles
//! built from files in memory.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use sha2::{Digest as _, Sha256};
use turnout_proto::bundle::BundleWriter;
use turnout_proto::keys::SecretKey;
use turnout_proto::manifest::{FileEntry, Manifest, Mode, PayloadPath, Timestamp};
use turnout_proto::signature::SignatureEntry;

/// Polls `condition` every 20 ms until it holds; panics naming `what` once
/// `within` has passed.
#[track_caller]
pub fn wait_for(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A free TCP port on 127.0.0.1, outside the ephemeral range (see
/// `turnout_rt::net`).
pub fn free_port() -> u16 {
    turnout_rt::net::free_port().expect("a free port on 127.0.0.1")
}

/// A payload file: its path in the bundle, its mode, its bytes.
pub type File<'a> = (&'a str, u32, Vec<u8>);

/// Writes to `path` a bundle of release `name` `version` holding `files`,
/// run by `entry`, signed by each of `keys`.
pub fn write_bundle(
    path: &Path,
    name: &str,
    version: &str,
    entry: &str,
    files: &[File<'_>],
    keys: &[&SecretKey],
) {
    write_bundle_expiring(path, name, version, entry, files, keys, None);
}

/// Like [`write_bundle`], with a release that expires at `expires`.
pub fn write_bundle_expiring(
    path: &Path,
    name: &str,
    version: &str,
    entry: &str,
    files: &[File<'_>],
    keys: &[&SecretKey],
    expires: Option<SystemTime>,
) {
    let manifest = Manifest {
        format: 1,
        name: name.parse().unwrap(),
        version: version.parse().unwrap(),
        created: Timestamp(SystemTime::now()),
        expires: expires.map(Timestamp),
        entry: PayloadPath::new(entry).unwrap(),
        files: files
            .iter()
            .map(|(p, mode, data)| FileEntry {
                path: PayloadPath::new(p).unwrap(),
                size: data.len() as u64,
                sha256: turnout_proto::Digest::from_bytes(Sha256::digest(data).into()),
                mode: Mode::new(*mode).unwrap(),
            })
            .collect(),
        links: vec![],
        provides: vec![],
        requires: vec![],
        extra: BTreeMap::new(),
    };
    let bytes = serde_json::to_vec_pretty(&manifest).unwrap();
    let signatures: Vec<SignatureEntry> = keys
        .iter()
        .map(|key| SignatureEntry {
            key_id: key.public().id().clone(),
            sig: key.sign(&bytes),
        })
        .collect();
    let mut writer =
        BundleWriter::new(std::fs::File::create(path).unwrap(), &bytes, &signatures).unwrap();
    for (p, mode, data) in files {
        writer
            .file(
                &PayloadPath::new(p).unwrap(),
                Mode::new(*mode).unwrap(),
                data.len() as u64,
                &data[..],
            )
            .unwrap();
    }
    writer.finish().unwrap();
}

/// A small tmpfs mounted for a test (a disk that fills up); unmounted when
/// dropped. Mounting needs root: `mount` returns `None` otherwise, and the
/// test says it was skipped.
#[derive(Debug)]
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `16m`) on `path`, creating it.
    pub fn mount(path: &Path, size: &str) -> Option<Tmpfs> {
        let root = std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m));
        if root.ok() != Some(0) {
            eprintln!("skipped: mounting a small tmpfs needs root");
            return None;
        }
        std::fs::create_dir_all(path).expect("the mount point");
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(path)
            .status()
            .expect("mount runs");
        assert!(mounted.success(), "mount tmpfs on {}", path.display());
        Some(Tmpfs(path.to_owned()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

/// splitmix64: a small seeded generator, the same on every machine, for the
/// model-based tests' random timings (a failing seed replays exactly).
#[derive(Debug, Clone)]
pub struct Rng(pub u64);

impl Rng {
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number below `n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True `percent` times in a hundred.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(1000) < percent * 10
    }
}
