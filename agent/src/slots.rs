//! A service's directory on the host: two slots, the `current` link, and
//! the staging area (DESIGN.md §5).
//!
//! ```text
//! services/<name>/
//!   blue/  green/       unpacked releases, each with .turnout-release.json
//!   current -> blue     switched by rename(2) of a temporary link, then the directory is fsynced
//!   staging/            unpack area; emptied on any failure and on recovery
//! ```
//!
//! What a slot holds is read from its `.turnout-release.json` and which slot
//! is active from the `current` link: the disk is the truth for both, so the
//! journal never has to agree with it.

use std::fs::{self, File};
use std::io;
use std::ops::Not;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use turnout_proto::manifest::PayloadPath;
use turnout_proto::messages::{ReleaseRef, Slot as WireSlot};

/// The file in each slot that says what it holds.
pub const RELEASE_FILE: &str = ".turnout-release.json";

/// One of a service's two slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slot {
    /// `blue/`.
    Blue,
    /// `green/`.
    Green,
}

impl Not for Slot {
    type Output = Slot;

    fn not(self) -> Slot {
        match self {
            Slot::Blue => Slot::Green,
            Slot::Green => Slot::Blue,
        }
    }
}

impl Slot {
    /// The directory name.
    pub fn name(self) -> &'static str {
        match self {
            Slot::Blue => "blue",
            Slot::Green => "green",
        }
    }

    /// The wire form, for reports.
    pub fn wire(self) -> WireSlot {
        match self {
            Slot::Blue => WireSlot::Blue,
            Slot::Green => WireSlot::Green,
        }
    }
}

/// The format of `.turnout-release.json` this build writes. Files without
/// the field were written before it existed and are format 1. Readers
/// ignore fields they do not know; a change that old readers would
/// misread raises this.
pub const RELEASE_FILE_FORMAT: u32 = 1;

fn format_one() -> u32 {
    1
}

/// What `.turnout-release.json` records about a slot's release.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotRelease {
    /// The file's format ([`RELEASE_FILE_FORMAT`]).
    #[serde(default = "format_one")]
    pub format: u32,
    /// Which release.
    pub release: ReleaseRef,
    /// Its executable, from the manifest.
    pub entry: PayloadPath,
    /// When it was unpacked, ms since the epoch.
    pub installed_ms: u64,
    /// The sha256 of its `manifest.json`: what the release is, whatever
    /// bundle file carried it (absent in slots written before it was kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest_sha256: Option<turnout_proto::Digest>,
    /// When the release expires, from its signed manifest (absent: never,
    /// or a slot written before it was kept). A coordinator's rollback to an
    /// expired release is refused, as an install of it would be.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<turnout_proto::manifest::Timestamp>,
}

/// The directory of one service.
#[derive(Debug, Clone)]
pub struct ServiceDir {
    root: PathBuf,
}

fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

impl ServiceDir {
    /// The directory of `service` under `state_dir`; created if missing.
    pub fn open(state_dir: &Path, service: &str) -> io::Result<ServiceDir> {
        let root = state_dir.join("services").join(service);
        fs::create_dir_all(&root)?;
        Ok(ServiceDir { root })
    }

    /// The service's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A slot's directory.
    pub fn slot_path(&self, slot: Slot) -> PathBuf {
        self.root.join(slot.name())
    }

    /// The `current` link; the service runs `current/<entry>`.
    pub fn current_path(&self) -> PathBuf {
        self.root.join("current")
    }

    /// Where a bundle is unpacked before it replaces the idle slot.
    pub fn unpack_path(&self) -> PathBuf {
        self.root.join("staging").join("unpack")
    }

    /// The slot `current` points at, if it points at one that exists.
    pub fn active(&self) -> Option<Slot> {
        let target = fs::read_link(self.current_path()).ok()?;
        let slot = [Slot::Blue, Slot::Green]
            .into_iter()
            .find(|s| target == Path::new(s.name()))?;
        self.slot_path(slot).is_dir().then_some(slot)
    }

    /// The slot a new release goes into: the one not active.
    pub fn idle(&self) -> Slot {
        self.active().map_or(Slot::Blue, |active| !active)
    }

    /// What `slot` holds, if it holds a complete release.
    pub fn release_in(&self, slot: Slot) -> Option<SlotRelease> {
        let bytes = fs::read(self.slot_path(slot).join(RELEASE_FILE)).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// The slot holding `release` (same bundle digest), if any.
    pub fn slot_holding(&self, release: &ReleaseRef) -> Option<Slot> {
        [Slot::Blue, Slot::Green].into_iter().find(|slot| {
            self.release_in(*slot)
                .is_some_and(|held| held.release.sha256 == release.sha256)
        })
    }

    /// Points `current` at `slot` atomically: a new link renamed over the old
    /// one, then the directory fsynced, so after a crash it is one or the other.
    pub fn point(&self, slot: Slot) -> io::Result<()> {
        let temp = self.root.join("current.next");
        match fs::remove_file(&temp) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => return Err(err),
            _ => {}
        }
        std::os::unix::fs::symlink(slot.name(), &temp)?;
        fs::rename(&temp, self.current_path())?;
        sync_dir(&self.root)
    }

    /// Removes `current` (nothing committed to run).
    pub fn unpoint(&self) -> io::Result<()> {
        match fs::remove_file(self.current_path()) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => sync_dir(&self.root),
        }
    }

    /// Empties the staging area.
    pub fn discard_staging(&self) -> io::Result<()> {
        match fs::remove_dir_all(self.root.join("staging")) {
            Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
            _ => Ok(()),
        }
    }

    /// Replaces what `slot` says it holds (its release file), atomically.
    pub fn rewrite_release(&self, slot: Slot, release: &SlotRelease) -> io::Result<()> {
        turnout_rt::files::write_atomic(
            &self.slot_path(slot).join(RELEASE_FILE),
            &serde_json::to_vec_pretty(release).expect("releases serialise"),
            0o644,
        )
    }

    /// Makes the unpacked release at [`unpack_path`](Self::unpack_path) the
    /// content of `slot`: writes its release file, flushes, then swaps the
    /// directories by rename. `slot` must not be active.
    pub fn promote(&self, slot: Slot, release: &SlotRelease) -> io::Result<()> {
        let unpacked = self.unpack_path();
        let file = unpacked.join(RELEASE_FILE);
        fs::write(
            &file,
            serde_json::to_vec_pretty(release).expect("releases serialise"),
        )?;
        File::open(&file)?.sync_all()?;
        sync_dir(&unpacked)?;
        let destination = self.slot_path(slot);
        let old = self.root.join("staging").join("old");
        if destination.exists() {
            fs::rename(&destination, &old)?;
        }
        fs::rename(&unpacked, &destination)?;
        sync_dir(&self.root)?;
        if old.exists() {
            fs::remove_dir_all(&old)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn release(version: &str, fill: u8) -> SlotRelease {
        SlotRelease {
            format: RELEASE_FILE_FORMAT,
            release: ReleaseRef {
                name: "web".into(),
                version: version.parse().unwrap(),
                sha256: turnout_proto::Digest::from_bytes([fill; 32]),
            },
            entry: PayloadPath::new("bin/web").unwrap(),
            installed_ms: 1,
            manifest_sha256: None,
            expires: None,
        }
    }

    fn stage(dir: &ServiceDir, slot: Slot, release: &SlotRelease) {
        fs::create_dir_all(dir.unpack_path()).unwrap();
        fs::write(
            dir.unpack_path().join("marker"),
            release.release.version.to_string(),
        )
        .unwrap();
        dir.promote(slot, release).unwrap();
    }

    #[test]
    fn promote_and_point_switch_between_slots() {
        let state = tempfile::tempdir().unwrap();
        let dir = ServiceDir::open(state.path(), "web").unwrap();
        assert_eq!(dir.active(), None);
        assert_eq!(dir.idle(), Slot::Blue);

        let (v1, v2, v3) = (
            release("1.0.0", 1),
            release("2.0.0", 2),
            release("3.0.0", 3),
        );
        stage(&dir, dir.idle(), &v1);
        dir.point(Slot::Blue).unwrap();
        stage(&dir, dir.idle(), &v2);
        dir.point(Slot::Green).unwrap();
        assert_eq!(dir.slot_holding(&v1.release), Some(Slot::Blue));
        assert_eq!(dir.release_in(Slot::Green), Some(v2));

        // v3 replaces the idle slot (v1), never the active one.
        stage(&dir, dir.idle(), &v3);
        assert_eq!(dir.slot_holding(&v1.release), None);
        assert_eq!(
            fs::read_to_string(dir.current_path().join("marker")).unwrap(),
            "2.0.0"
        );
        assert!(!state.path().join("services/web/staging/old").exists());
    }

    #[test]
    fn a_link_to_a_missing_slot_is_not_active() {
        let state = tempfile::tempdir().unwrap();
        let dir = ServiceDir::open(state.path(), "web").unwrap();
        dir.point(Slot::Green).unwrap();
        assert_eq!(dir.active(), None, "green/ does not exist");
        dir.unpoint().unwrap();
        assert!(fs::symlink_metadata(dir.current_path()).is_err());
    }

    #[test]
    fn slots_are_opposites() {
        assert_eq!(!Slot::Blue, Slot::Green);
        assert_eq!(!!Slot::Blue, Slot::Blue);
    }
}
