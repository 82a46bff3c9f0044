//! Memory maps of segments, and the prefetch hints readers issue for
//! mapped records and the index's leaves: the crate's only `unsafe` code.
//!
//! A sealed segment is never written again; it is only read and, later,
//! deleted, so it is mapped whole and read-only. The active segment is
//! mapped shared and writable: readers read only the bytes below its
//! *published* offset, and the one writer copies records strictly beyond
//! that offset (DESIGN.md 2.4) and never truncates below it, so the bytes a
//! reader sees are immutable while it reads them. No other map is
//! writable.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use memmap2::{Mmap, MmapOptions, MmapRaw};

use super::fs::FileSystem;
use crate::error::{IoContext, Result};

/// A sealed segment mapped read-only into memory.
///
/// Once [`retire`](Self::retire)d (merged away), the file is unlinked when
/// the last holder of the map drops it, so readers that still hold it (a
/// replication read, a snapshot, a backup linking it) finish first.
#[derive(Debug)]
pub(crate) struct SealedSegment {
    map: Option<Mmap>,
    path: parking_lot::Mutex<PathBuf>,
    /// Device and inode of the mapped file, so that a retired segment never
    /// unlinks another file that took its name (after a restore).
    identity: (u64, u64),
    /// Set when retired: the file system that removes the file.
    retired: parking_lot::Mutex<Option<Arc<dyn FileSystem>>>,
}

impl SealedSegment {
    /// Maps the whole file at `path` read-only, reading it all into memory
    /// now (a segment just written, whose pages are cached).
    pub(crate) fn open(path: &Path) -> Result<Self> {
        Self::open_with(path, None, true)
    }

    /// Maps the whole file at `path` read-only without reading it: pages are
    /// faulted in by the reads that need them (segments loaded from hints,
    /// where reading every value at open would defeat the hint).
    pub(crate) fn open_lazy(path: &Path) -> Result<Self> {
        Self::open_with(path, None, false)
    }

    fn open_with(path: &Path, len: Option<u64>, populate: bool) -> Result<Self> {
        let file = File::open(path).context(|| format!("open segment {}", path.display()))?;
        let meta = file
            .metadata()
            .context(|| format!("stat segment {}", path.display()))?;
        let file_len = meta.len();
        let len = len.map_or(file_len, |l| l.min(file_len));
        let map = if len == 0 {
            None
        } else {
            Some(
                map_read_only(&file, len, populate)
                    .context(|| format!("map segment {}", path.display()))?,
            )
        };
        Ok(SealedSegment {
            map,
            path: parking_lot::Mutex::new(path.to_path_buf()),
            identity: (meta.dev(), meta.ino()),
            retired: parking_lot::Mutex::new(None),
        })
    }

    /// Marks the segment merged away: its file (and its hint) are removed
    /// when the last holder drops the map. A crash before then leaves a
    /// superseded file that the next open removes.
    pub(crate) fn retire(&self, fs: Arc<dyn FileSystem>) {
        *self.retired.lock() = Some(fs);
    }

    /// The segment's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        self.map.as_deref().unwrap_or(&[])
    }

    /// The segment's path.
    pub(crate) fn path(&self) -> PathBuf {
        self.path.lock().clone()
    }

    /// Records that the mapped file was renamed to `path` (a merge's output
    /// mapped before its commit).
    pub(crate) fn renamed(&self, path: &Path) {
        *self.path.lock() = path.to_path_buf();
    }
}

impl Drop for SealedSegment {
    fn drop(&mut self) {
        let Some(fs) = self.retired.get_mut().take() else {
            return;
        };
        let path = self.path.get_mut();
        let same = std::fs::metadata(&*path).is_ok_and(|m| (m.dev(), m.ino()) == self.identity);
        if same {
            // Best effort: a failure leaves a superseded file that the next
            // open removes.
            super::best_effort(|| {
                let _ = fs.remove_file(path);
                let _ = fs.remove_file(&path.with_extension(super::HINT_EXTENSION));
            });
        }
    }
}

/// Asks the CPU to start loading the cache lines of `bytes` without waiting
/// for them: its first [`PREFETCHED_LINES`] lines and its last byte's line.
/// A hint, so that the misses of many records read from a map in a row
/// overlap instead of coming one after another; it changes nothing a
/// program can observe and never faults. A prefetch retires at once but
/// takes one of the core's miss buffers, so a long run of them stalls when
/// those are all busy. On other architectures than x86_64 it does nothing.
pub(crate) fn prefetch(bytes: &[u8]) {
    const LINE: usize = 64;
    let Some(last) = bytes.len().checked_sub(1) else {
        return;
    };
    let mut at = 0;
    while at < last && at < PREFETCHED_LINES * LINE {
        prefetch_line(&raw const bytes[at]);
        at += LINE;
    }
    prefetch_line(&raw const bytes[last]);
}

/// Asks for the cache lines of `items` at once, as [`prefetch`] does for a
/// record: one prefetch per line for items of up to a line (only the first
/// line of each wider item). For a binary search, whose steps each load
/// what the step before chose, so that its misses overlap (the index's leaf
/// search, DESIGN.md 9).
pub(crate) fn prefetch_all<T>(items: &[T]) {
    const LINE: usize = 64;
    let Some(last) = items.last() else {
        return;
    };
    for item in items.iter().step_by((LINE / size_of::<T>().max(1)).max(1)) {
        prefetch_line(std::ptr::from_ref(item).cast());
    }
    // The slice need not start on a line: its last line may hold no item
    // the steps above landed on.
    prefetch_line(std::ptr::from_ref(last).cast());
}

/// Lines prefetched from the start of one record, besides its last one (a
/// larger value is read in order, which the hardware prefetcher follows by
/// itself). Chosen, not measured: the records measured (136 bytes) span at
/// most three lines; the load pass this replaced touched up to eight.
pub(crate) const PREFETCHED_LINES: usize = 4;

#[cfg(target_arch = "x86_64")]
#[expect(unsafe_code, reason = "the prefetch intrinsic is an unsafe function")]
fn prefetch_line(byte: *const u8) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    // SAFETY: `prefetch` is part of SSE, which every x86_64 CPU has. It is
    // a hint: it reads nothing the program sees, writes nothing and never
    // faults, whatever the address; callers pass the address of a live
    // reference.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(byte.cast()) }
}

/// Nothing: a plain load here would wait for its miss inside the caller's
/// loop (DESIGN.md 4 measured that as slower than no load) and could fault.
#[cfg(not(target_arch = "x86_64"))]
fn prefetch_line(byte: *const u8) {
    let _ = byte;
}

#[expect(unsafe_code, reason = "memmap2 cannot prove the file is not modified")]
fn map_read_only(file: &File, len: u64, populate: bool) -> std::io::Result<Mmap> {
    let len = usize::try_from(len).map_err(std::io::Error::other)?;
    // SAFETY: the mapped file is a sealed segment (or the sealed prefix of
    // one). The engine never writes, truncates below `len` or extends into
    // the mapped range again: it only reads it and eventually unlinks it,
    // which leaves an existing map valid. The store's directory lock keeps
    // other dkv-cask handles from writing to it. A process outside the
    // engine modifying the file breaks the store's contract (DESIGN.md,
    // "File-system assumptions"); reads then return whatever bytes are
    // there, and every read verifies a checksum.
    // Populating the map up front (MAP_POPULATE) moves page faults from the
    // read path to open and rollover.
    let mut options = MmapOptions::new();
    options.len(len);
    if populate {
        options.populate();
    }
    unsafe { options.map(file) }
}

/// A shared writable map of the active segment: readable below its
/// published offset, written beyond it, by its one [`MapWriter`] only.
#[derive(Debug)]
pub(crate) struct ActiveMap {
    raw: MmapRaw,
    len: u64,
    /// Bytes below this offset are written and never change again.
    published: AtomicU64,
    /// Set when the store closed: nothing is written any more.
    withdrawn: AtomicBool,
}

/// The one handle that writes an [`ActiveMap`]: made with it and never
/// cloned, so holding it by `&mut` makes its holder the map's only writer
/// (the type says what the writer lock ensures, and the map's unsafe copy
/// relies on).
#[derive(Debug)]
pub(crate) struct MapWriter {
    map: Arc<ActiveMap>,
}

impl MapWriter {
    /// Maps `len` bytes of `file` (the active segment: zero-filled to `len`
    /// when preallocated, else shorter and growing), with the bytes below
    /// `published` already written. Only published bytes are ever read, and
    /// the file always reaches the published offset, so no read touches a
    /// page past its end.
    ///
    /// With `populate` every page the file holds when it is mapped is
    /// mapped up front (`MAP_POPULATE`), so copies into the map do not
    /// fault page by page. A writer that appends with `pwrite` (the
    /// `map_appends` option off, or `SyncMode::Always`) passes `false`: the
    /// kernel write-protects every mapping of a page it writes back, so a
    /// mapped tail page costs each `fdatasync` a walk of the page's
    /// mappings and a TLB flush (1-writer durable puts gained 4–10 % without
    /// them; DESIGN.md 2.4). Readers then fault pages in as they first read
    /// them, and a tail page a reader has read is write-protected again at
    /// each sync.
    pub(super) fn new(
        file: &File,
        len: u64,
        published: u64,
        populate: bool,
    ) -> std::io::Result<Self> {
        let mut options = MmapOptions::new();
        options.len(usize::try_from(len).map_err(std::io::Error::other)?);
        if populate {
            options.populate();
        }
        let raw = options.map_raw(file)?;
        Ok(MapWriter {
            map: Arc::new(ActiveMap {
                raw,
                len,
                published: AtomicU64::new(published.min(len)),
                withdrawn: AtomicBool::new(false),
            }),
        })
    }

    /// The map, shared with readers.
    pub(crate) fn map(&self) -> &Arc<ActiveMap> {
        &self.map
    }

    /// Copies `bytes` into the map at `offset`: into the page cache, as a
    /// `pwrite` would, with `backed` the length up to which the writer made
    /// the file hold allocated blocks, since a copy past the file's end is
    /// a `SIGBUS`. The range must lie at or beyond the published offset,
    /// inside the map and below `backed`, and the map must not be
    /// withdrawn; otherwise nothing is written and the error says why.
    pub(crate) fn write(&mut self, offset: u64, bytes: &[u8], backed: u64) -> std::io::Result<()> {
        self.map.write(offset, bytes, backed)
    }

    /// Declares the bytes below `offset` written; they must never be
    /// written again, and the file is never truncated below `offset`.
    pub(crate) fn publish(&mut self, offset: u64) {
        self.map.publish(offset);
    }

    /// Makes every later [`ActiveMap::bytes`] call return `None` (the
    /// store closed: the file may be cut by the next open). Slices already
    /// handed out stay valid only as long as the file is not cut.
    pub(crate) fn withdraw(&mut self) {
        self.map.withdraw();
    }
}

impl ActiveMap {
    /// [`MapWriter::write`]; only the map's one writer calls it.
    fn write(&self, offset: u64, bytes: &[u8], backed: u64) -> std::io::Result<()> {
        let end = offset
            .checked_add(bytes.len() as u64)
            .filter(|&end| end <= self.len.min(backed));
        if end.is_none()
            || offset < self.published.load(Ordering::Acquire)
            || self.withdrawn.load(Ordering::Acquire)
        {
            return Err(std::io::Error::other(format!(
                "{} bytes at offset {offset} lie outside the writable part of a \
                 {}-byte map (backed up to {backed}, published up to {}{})",
                bytes.len(),
                self.len,
                self.published.load(Ordering::Acquire),
                if self.withdrawn.load(Ordering::Acquire) {
                    ", withdrawn"
                } else {
                    ""
                }
            )));
        }
        self.copy_in(offset as usize, bytes);
        Ok(())
    }

    #[expect(unsafe_code, reason = "writing a live map needs a raw pointer")]
    fn copy_in(&self, offset: usize, bytes: &[u8]) {
        // SAFETY: `write` checked that the range lies inside the mapping, at
        // or beyond the published offset, and that the map is not withdrawn
        // (after a close `published` drops to 0 while readers may still hold
        // slices). No reader reads there (`bytes` hands out published
        // ranges only), and only the map's one `MapWriter`, through a
        // `&mut` borrow, calls `write`, so no other copy runs at the same
        // time and nothing aliases the destination while it is written; `bytes`
        // comes from the heap, not from this map. The map is shared, so the
        // copy lands in the file's page cache.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.raw.as_mut_ptr().add(offset),
                bytes.len(),
            );
        }
    }

    /// [`MapWriter::publish`].
    fn publish(&self, offset: u64) {
        self.published
            .fetch_max(offset.min(self.len), Ordering::Release);
    }

    /// [`MapWriter::withdraw`].
    fn withdraw(&self) {
        self.withdrawn.store(true, Ordering::Release);
        self.published.store(0, Ordering::Release);
    }

    /// The bytes `[offset, offset + len)`, if they are all published.
    pub(crate) fn bytes(&self, offset: u64, len: usize) -> Option<&[u8]> {
        let end = offset.checked_add(len as u64)?;
        if end > self.published.load(Ordering::Acquire) {
            return None;
        }
        Some(self.published_range(offset as usize, len))
    }

    #[expect(unsafe_code, reason = "reading a live map needs a raw pointer")]
    fn published_range(&self, offset: usize, len: usize) -> &[u8] {
        // SAFETY: `bytes` checked that `offset + len` is at most the
        // published offset, which is at most the mapped length, so the range
        // lies inside the mapping. The Acquire load pairs with the writer's
        // Release in `publish`, which follows the copy into this map or the
        // `pwrite` of those bytes; Linux shares one page cache between
        // `pwrite` and shared maps, so the bytes are visible. The writer only writes beyond the published
        // offset and only truncates the file to at least it (at seal), so no
        // byte of the returned slice changes or disappears while `self`
        // lives, and the slice borrows `self`.
        unsafe { std::slice::from_raw_parts(self.raw.as_ptr().add(offset), len) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetching_any_length_from_a_map_or_the_heap_reads_within_the_slice() {
        // Lengths around the line size and the prefetched-lines cap, at an
        // odd start, so that the last line and the cap are both hit.
        let heap = vec![3u8; 4 * 64 * PREFETCHED_LINES + 7];
        for len in [0, 1, 63, 64, 65, 64 * PREFETCHED_LINES, heap.len() - 1] {
            prefetch(&heap[1..1 + len]);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sealed");
        std::fs::write(&path, &heap).unwrap();
        let file = File::open(&path).unwrap();
        let map = map_read_only(&file, heap.len() as u64, false).unwrap();
        prefetch(&map[heap.len() - 1..]);
        prefetch(&map[..]);
        assert_eq!(&map[..], &heap[..], "prefetching changes nothing");
    }

    #[test]
    fn prefetching_every_line_of_any_slice_changes_nothing() {
        // Empty, shorter than a line, across lines, at an odd start, of
        // items wider than a line and of items with no size.
        let hints: Vec<u32> = (0..100).collect();
        for len in [0, 1, 15, 16, 17, 99] {
            prefetch_all(&hints[1..1 + len]);
        }
        prefetch_all(&[[7u8; 100]; 5]);
        prefetch_all(&[(); 3]);
        prefetch_all::<u64>(&[]);
        assert!(
            hints.iter().copied().eq(0..100),
            "prefetching changes nothing"
        );
    }

    #[test]
    fn a_copy_lands_in_the_file_and_is_refused_below_the_published_offset_past_the_file_or_after_close()
     {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("active");
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        file.set_len(4096).unwrap();
        let mut writer = MapWriter::new(&file, 8192, 100, true).unwrap();
        let map = Arc::clone(writer.map());

        writer.write(100, b"record", 4096).unwrap();
        assert_eq!(&std::fs::read(&path).unwrap()[100..106], b"record");
        assert!(map.bytes(100, 6).is_none(), "not yet published");
        map.publish(106);
        assert_eq!(map.bytes(100, 6), Some(&b"record"[..]));

        let published = writer.write(99, b"xx", 4096).unwrap_err();
        assert!(published.to_string().contains("outside"), "{published}");
        assert!(writer.write(4095, b"xy", 4096).is_err(), "past the file");
        assert!(writer.write(8190, b"xyz", 1 << 20).is_err(), "past the map");
        assert!(writer.write(u64::MAX, b"x", u64::MAX).is_err(), "overflow");
        writer.withdraw();
        assert!(writer.write(200, b"x", 4096).is_err(), "after close");
        assert_eq!(&std::fs::read(&path).unwrap()[96..106], b"\0\0\0\0record");
    }
}
