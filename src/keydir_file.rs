//! The keydir file (format in `format/keydir_file.rs`): a clean close saves
//! the whole index beside the segments, and the next open loads it instead
//! of reading every hint and scanning the active segment (DESIGN.md 2.8).
//!
//! It is a cache, trusted only as far as it can be checked: its checksum,
//! every segment it names present with the same id, kind, range, length
//! and sampled checksum (and nothing else on disk), nothing written after
//! the active segment's recorded end (its whole preallocated tail is
//! zero), every pointer inside its segment's records, and every change
//! start a record start of its log segment. Open removes it, and syncs the folder, before the
//! store accepts a write, so it never outlives the state it describes; it
//! is written without fsync (a torn or lost file fails a check, and open
//! reads the hints as it would without one).

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{IoContext, Result};
use crate::format::{
    HINT_SAMPLE_LEN, KeydirFile, KeydirFileBuilder, KeydirSegment, OP_HEADER_LEN,
    SEGMENT_HEADER_LEN, SegmentKind, sample_crc,
};
use crate::keydir::{KeyDir, KeyEntry};
use crate::log::{FileSystem, SegmentId};
use crate::recovery::LiveSums;
use crate::replication::ChangeIndex;

/// Name of the keydir file inside a store folder.
pub const KEYDIR_FILE: &str = "KEYDIR";
/// Name of the keydir file while it is written.
pub const KEYDIR_TMP_FILE: &str = "KEYDIR.tmp";

/// A segment as close leaves it: where its records end.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Closed {
    pub(crate) id: SegmentId,
    pub(crate) kind: SegmentKind,
    pub(crate) base_position: u64,
    pub(crate) end_position: u64,
    pub(crate) end_offset: u64,
    pub(crate) tombstones: u64,
}

/// Saves the index as the keydir file of `dir`. `segments` are every
/// segment, in log order, the active one last; all of them synced.
pub(crate) fn save(
    fs: &dyn FileSystem,
    dir: &Path,
    keydir: &KeyDir,
    segments: &[Closed],
    changes: &ChangeIndex,
    applied: u64,
) -> Result<()> {
    let capacity = keydir.key_bytes() + keydir.len() * crate::format::KEYDIR_ENTRY_LEN + (1 << 16);
    let mut b = KeydirFileBuilder::new(applied, changes.last(), capacity);
    for s in segments {
        let path = s.id.path_in(dir);
        let (file_len, sample_crc) =
            sample_crc_of_file(&path).context(|| format!("sample {}", path.display()))?;
        b.segment(&KeydirSegment {
            id: s.id,
            kind: s.kind,
            base_position: s.base_position,
            end_position: s.end_position,
            end_offset: s.end_offset,
            file_len,
            tombstones: s.tombstones,
            sample_crc,
        });
    }
    for (position, segment, offset) in changes.starts() {
        b.change_start(position, segment, offset);
    }
    keydir.scan_from(&[], false, |key, e| {
        b.key(key, &e);
        true
    });
    let bytes = b.finish();
    let tmp = dir.join(KEYDIR_TMP_FILE);
    crate::log::write_file(fs, &tmp, &bytes).context(|| format!("write {}", tmp.display()))?;
    let path = dir.join(KEYDIR_FILE);
    fs.rename(&tmp, &path)
        .context(|| format!("rename {}", tmp.display()))
}

/// The file's length and [`sample_crc`], read with two `pread`s.
fn sample_crc_of_file(path: &Path) -> io::Result<(u64, u32)> {
    let file = fs::File::open(path)?;
    let len = file.metadata()?.len();
    let n = len.min(HINT_SAMPLE_LEN as u64) as usize;
    let mut ends = vec![0u8; 2 * n];
    file.read_exact_at(&mut ends[..n], 0)?;
    file.read_exact_at(&mut ends[n..], len - n as u64)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&ends);
    Ok((len, h.finalize()))
}

/// Removes the keydir file (and one being written) from `dir`; whether
/// anything was removed. The caller syncs the folder.
pub(crate) fn remove(fs: &dyn FileSystem, dir: &Path) -> Result<bool> {
    let mut removed = false;
    for name in [KEYDIR_FILE, KEYDIR_TMP_FILE] {
        let path = dir.join(name);
        match fs.remove_file(&path) {
            Ok(()) => removed = true,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(crate::Error::io(format!("remove {}", path.display()), e)),
        }
    }
    Ok(removed)
}

/// A segment as open found it, to check against the keydir file.
pub(crate) struct OnDisk<'a> {
    pub(crate) id: SegmentId,
    pub(crate) kind: SegmentKind,
    pub(crate) base_position: u64,
    /// End of the covered range, when the headers say it (merged).
    pub(crate) stated_end: Option<u64>,
    /// The whole file, mapped.
    pub(crate) bytes: &'a [u8],
}

/// What open takes from a usable keydir file.
pub(crate) struct Loaded {
    pub(crate) keydir: KeyDir,
    pub(crate) changes: ChangeIndex,
    pub(crate) applied: u64,
    /// (end position, end offset) of each segment, in the order given.
    pub(crate) ends: Vec<(u64, u64)>,
    pub(crate) tombstones: HashMap<SegmentId, u64>,
    pub(crate) live: Vec<(SegmentId, LiveSums)>,
}

/// Loads the keydir file of `dir` if it describes exactly the segments
/// `on_disk` (in log order). `Ok(None)`: there is none; `Err`: why the one
/// there cannot be used.
pub(crate) fn load(
    dir: &Path,
    on_disk: &[OnDisk<'_>],
) -> std::result::Result<Option<Loaded>, String> {
    let bytes = match fs::read(dir.join(KEYDIR_FILE)) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable: {e}")),
    };
    let file = KeydirFile::decode(&bytes).map_err(|e| format!("damaged: {e}"))?;
    if file.segments.len() != on_disk.len() {
        return Err(format!(
            "it names {} segments, the folder holds {}",
            file.segments.len(),
            on_disk.len()
        ));
    }
    let mut ends = Vec::with_capacity(on_disk.len());
    for (i, (s, d)) in file.segments.iter().zip(on_disk).enumerate() {
        let active = i + 1 == on_disk.len() && d.kind == SegmentKind::Log;
        check_segment(s, d, active).map_err(|why| format!("segment {}: {why}", d.id))?;
        ends.push((s.end_position, s.end_offset));
    }
    // Segments by id, for the pointers' checks and the live sums.
    let mut table: Vec<(SegmentId, usize)> =
        on_disk.iter().enumerate().map(|(i, d)| (d.id, i)).collect();
    table.sort_unstable();
    let slot = |id: SegmentId| {
        table
            .binary_search_by_key(&id, |&(id, _)| id)
            .ok()
            .map(|i| table[i].1)
    };
    let mut changes = ChangeIndex::default();
    for (position, segment, offset) in file.change_starts() {
        // A record start in a log segment, at the position its offset
        // gives (change numbers are log positions).
        let fits = slot(segment).is_some_and(|i| {
            let d = &on_disk[i];
            d.kind == SegmentKind::Log
                && offset >= SEGMENT_HEADER_LEN as u64
                && offset < ends[i].1
                && d.base_position
                    .checked_add(offset - SEGMENT_HEADER_LEN as u64)
                    == Some(position)
        });
        if !fits {
            return Err(format!(
                "a change start that is no record start of {segment}"
            ));
        }
        changes.insert_start(position, segment, offset);
    }
    // Only a spacing hint for the next start to note (its segment may have
    // been merged away since): restored as it was, if inside the log.
    let log_end = ends.last().map_or(0, |&(end, _)| end);
    if file
        .last_start
        .is_some_and(|(position, _)| position > log_end)
    {
        return Err("the last change start lies beyond the log".into());
    }
    changes.set_last(file.last_start);
    let mut sums = vec![LiveSums::default(); on_disk.len()];
    let mut bad: Option<String> = None;
    let mut last: Option<(SegmentId, usize)> = None;
    let keydir = KeyDir::from_sorted(file.entries().map_while(|(key, e)| {
        let i = match last {
            Some((id, i)) if id == e.pointer.segment => Some(i),
            _ => slot(e.pointer.segment),
        };
        match i.filter(|&i| points_into(&e, key, on_disk[i].kind, ends[i].1)) {
            Some(i) => {
                last = Some((e.pointer.segment, i));
                sums[i].add(&e);
                Some((key, e))
            }
            None => {
                bad = Some(format!(
                    "a key points outside the records of {}",
                    e.pointer.segment
                ));
                None
            }
        }
    }));
    if let Some(why) = bad {
        return Err(why);
    }
    let keydir = keydir.ok_or("keys out of order")?;
    Ok(Some(Loaded {
        keydir,
        changes,
        applied: file.applied,
        ends,
        tombstones: file
            .segments
            .iter()
            .filter(|s| s.tombstones > 0)
            .map(|s| (s.id, s.tombstones))
            .collect(),
        live: on_disk.iter().map(|d| d.id).zip(sums).collect(),
    }))
}

/// Whether segment `d` on disk is the one `s` describes.
fn check_segment(
    s: &KeydirSegment,
    d: &OnDisk<'_>,
    active: bool,
) -> std::result::Result<(), String> {
    let len = d.bytes.len() as u64;
    if (s.id, s.kind, s.base_position) != (d.id, d.kind, d.base_position) {
        return Err(format!(
            "described as {:?} {} from {}, found {:?} {} from {}",
            s.kind, s.id, s.base_position, d.kind, d.id, d.base_position
        ));
    }
    if s.file_len != len || s.sample_crc != sample_crc(d.bytes) {
        return Err("the file changed".into());
    }
    if s.tombstones > len {
        return Err("more tombstone bytes than the file holds".into());
    }
    let records = d.kind.records_start() as u64;
    if active {
        // The only segment whose end is not its length: nothing may have
        // been appended after the recorded end (zeros there are the
        // preallocated space a record would fill).
        let logical = s
            .end_offset
            .checked_sub(records)
            .and_then(|n| d.base_position.checked_add(n));
        if s.end_offset > len || logical != Some(s.end_position) {
            return Err("its recorded end does not fit the file".into());
        }
        if !all_zero(&d.bytes[s.end_offset as usize..]) {
            return Err("bytes were written after its recorded end".into());
        }
    } else {
        let end = d
            .stated_end
            .or_else(|| d.base_position.checked_add(len - SEGMENT_HEADER_LEN as u64));
        if (Some(s.end_position), s.end_offset) != (end, len) {
            return Err("its recorded end is not the file's end".into());
        }
    }
    Ok(())
}

/// Whether every byte is zero (word by word: a preallocated tail may be
/// most of a segment).
fn all_zero(bytes: &[u8]) -> bool {
    let mut words = bytes.chunks_exact(8);
    let whole = words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0);
    whole && words.remainder().iter().all(|&b| b == 0)
}

/// Whether `e` (the entry of `key`) lies within the records of a segment
/// of `kind` whose records end at `end_offset`.
fn points_into(e: &KeyEntry, key: &[u8], kind: SegmentKind, end_offset: u64) -> bool {
    let start = u64::from(e.pointer.offset);
    start >= kind.records_start() as u64
        && start + u64::from(e.pointer.len) <= end_offset
        && e.pointer.len as usize >= OP_HEADER_LEN + key.len()
}
