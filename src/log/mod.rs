//! The log layer: segment files on disk. File naming, the directory lock and
//! durability helpers, the active segment writer with group commit, the
//! read-only memory maps of sealed segments (the crate's only `unsafe`), and
//! the file-system trait all changes go through (with its fault-injection
//! layer). It knows nothing of keys or the index.

mod fault;
mod fs;
mod fsutil;
mod mmap;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};

pub use fault::{FaultInjector, InjectedError};
pub(crate) use fault::{Faulty, best_effort};
pub(crate) use fs::{COPYING_SUFFIX, copy_synced, create_dir_all, remove_dir_all, write_file};
pub use fs::{FileSystem, StdFileSystem};
pub(crate) use fsutil::{DirLock, SyncFailedMarker, sync_dir, truncate_synced};
pub use fsutil::{LOCK_FILE, SYNC_FAILED_FILE};
pub(crate) use mmap::{ActiveMap, SealedSegment, prefetch, prefetch_all};
pub use writer::SPARE_FILE;
pub(crate) use writer::{ActiveSegment, GroupCommit, SegmentPlan, Spare};

/// Name of the threads that write hint files in the background.
pub(crate) const HINT_THREAD: &str = "dkv-cask-hint";
/// Name of the thread that zero-fills the spare segment.
pub(crate) const SPARE_THREAD: &str = "dkv-cask-spare";

/// Extension of segment files.
pub const SEGMENT_EXTENSION: &str = "seg";
/// Extension of hint files (`0000000007.hint` describes `0000000007.seg`).
pub const HINT_EXTENSION: &str = "hint";
/// Extension of a merge's output while it is written; recovery removes
/// such files (a merge that had not committed).
pub const MERGING_EXTENSION: &str = "merging";

/// Identifies a segment file; ids grow with every new segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SegmentId(pub u32);

impl SegmentId {
    /// The id after this one.
    pub fn next(self) -> Option<SegmentId> {
        self.0.checked_add(1).map(SegmentId)
    }

    /// The segment's file name, e.g. `0000000007.seg`.
    pub fn file_name(self) -> String {
        format!("{:010}.{SEGMENT_EXTENSION}", self.0)
    }

    /// The segment's path inside `dir`.
    pub fn path_in(self, dir: &Path) -> PathBuf {
        dir.join(self.file_name())
    }

    /// The path of the segment's hint file inside `dir`.
    pub fn hint_path_in(self, dir: &Path) -> PathBuf {
        dir.join(format!("{:010}.{HINT_EXTENSION}", self.0))
    }

    /// The path a merge writes this segment at before committing it.
    pub fn merging_path_in(self, dir: &Path) -> PathBuf {
        dir.join(format!("{:010}.{MERGING_EXTENSION}", self.0))
    }

    /// Parses a segment file name; `None` for any other file.
    pub fn parse_file_name(name: &str) -> Option<SegmentId> {
        let stem = name.strip_suffix(SEGMENT_EXTENSION)?.strip_suffix('.')?;
        if stem.len() != 10 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        stem.parse().ok().map(SegmentId)
    }
}

impl fmt::Display for SegmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_file_names_round_trip_and_foreign_names_are_ignored() {
        let id = SegmentId(42);
        assert_eq!(id.file_name(), "0000000042.seg");
        assert_eq!(SegmentId::parse_file_name("0000000042.seg"), Some(id));
        for other in [
            "42.seg",
            "0000000042.hint",
            "LOCK",
            "000000004x.seg",
            ".seg",
        ] {
            assert_eq!(SegmentId::parse_file_name(other), None, "{other}");
        }
    }
}
