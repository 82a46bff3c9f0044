//! Read-only memory maps of sealed segments: the crate's only `unsafe` code.
//! A sealed segment is never written again; it is only read and, later,
//! deleted. Must not map the active segment or anything writable.

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::{Mmap, MmapOptions};

use crate::error::{IoContext, Result};

/// A sealed segment mapped read-only into memory.
#[derive(Debug)]
pub(crate) struct SealedSegment {
    map: Option<Mmap>,
    path: PathBuf,
}

impl SealedSegment {
    /// Maps the whole file at `path` read-only.
    pub(crate) fn open(path: &Path) -> Result<Self> {
        let file = File::open(path).context(|| format!("open segment {}", path.display()))?;
        let len = file
            .metadata()
            .context(|| format!("stat segment {}", path.display()))?
            .len();
        let map = if len == 0 {
            None
        } else {
            Some(map_read_only(&file).context(|| format!("map segment {}", path.display()))?)
        };
        Ok(SealedSegment {
            map,
            path: path.to_path_buf(),
        })
    }

    /// The segment's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The segment's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

#[expect(unsafe_code, reason = "memmap2 cannot prove the file is not modified")]
fn map_read_only(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the mapped file is a sealed segment. The engine never writes,
    // truncates or extends a sealed segment again: it only reads it and
    // eventually unlinks it, which leaves an existing map valid. The store's
    // directory lock keeps other dkv-cask handles from writing to it. A
    // process outside the engine modifying the file breaks the store's
    // contract (DESIGN.md, "File-system assumptions"); reads then return
    // whatever bytes are there, and every read verifies a checksum.
    // Populating the map up front (MAP_POPULATE) moves page faults from the
    // read path to open and rollover.
    unsafe { MmapOptions::new().populate().map(file) }
}
