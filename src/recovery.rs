//! Open-time recovery: rebuilds the KeyDir from the keydir file a clean close
//! saved (when every check on it holds), else from each sealed log segment's
//! hint or by reading it (merged segments always, on several threads when
//! large) and verifying every checksum once, and decides what damaged
//! bytes are: a torn tail of the newest segment (never synced, so cut off) or
//! corruption of durable data (an error, or skipped and reported in the
//! tolerant mode). Must not append records.
//!
//! Telling the two apart: every record header carries a log position that was
//! already durable when it was written. Damage at a position below what any
//! later intact record says was durable is corruption of synced data; damage
//! beyond it can only be a write that never reached the disk whole.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, IoContext, Result};
use crate::format::{
    FormatError, Hint, MergeHeader, OP_HEADER_LEN, OpKind, RECORD_HEADER_LEN, RecordKind,
    SEGMENT_HEADER_LEN, SegmentHeader, SegmentKind, decode_record, decode_verified_record,
};
use crate::keydir::{KeyDir, KeyEntry, RecordPointer};
use crate::keydir_file::{self, OnDisk};
use crate::log::{
    FileSystem, SealedSegment, SegmentId, SyncFailedMarker, sync_dir, truncate_synced,
};
use crate::options::RecoveryMode;
use crate::replication::ChangeIndex;

/// What `open` found and did while rebuilding the index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files found (superseded and removed ones included).
    pub segments: usize,
    /// Segments whose index entries came from their hint files.
    pub segments_from_hints: usize,
    /// Segments whose records were read and verified (the active segment,
    /// and sealed ones without a usable hint).
    pub segments_scanned: usize,
    /// Hint files that could not be used, and why; their segments were
    /// scanned and the hints rebuilt.
    pub hint_fallbacks: Vec<HintFallback>,
    /// Segments replaced by a committed merge whose removal a crash had
    /// interrupted; removed now.
    pub superseded_removed: usize,
    /// Output of merges that had not committed; removed now.
    pub unfinished_merges_removed: usize,
    /// Records replayed from scanned segments.
    pub records: u64,
    /// Live keys in the index afterwards (expired ones included).
    pub keys: usize,
    /// Bytes of segment data read and verified.
    pub bytes_read: u64,
    /// A torn tail cut from the newest segment.
    pub truncated: Option<TruncatedTail>,
    /// Damaged ranges skipped under [`RecoveryMode::TolerateAnyCorruption`].
    pub skipped: Vec<DamagedRange>,
    /// The index came whole from the keydir file a clean close wrote: no
    /// hint was read and no segment scanned.
    pub from_keydir_file: bool,
    /// A keydir file was found but not used, and why (the hints and
    /// segments were read instead).
    pub keydir_file_unused: Option<String>,
    /// Wall time spent.
    pub duration: Duration,
}

/// A hint file that open could not use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HintFallback {
    /// The segment, which was scanned instead.
    pub segment: SegmentId,
    /// Why the hint was not used (missing, damaged, older than the segment).
    pub reason: String,
}

/// Unsynced bytes cut from the end of the newest segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TruncatedTail {
    /// The segment file.
    pub file: PathBuf,
    /// Offset at which the file was cut.
    pub offset: u64,
    /// Bytes removed (preallocated zeros not counted).
    pub bytes: u64,
    /// Why the first removed byte did not decode.
    pub reason: String,
}

/// A damaged byte range that recovery skipped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedRange {
    /// The segment file.
    pub file: PathBuf,
    /// First damaged byte.
    pub start: u64,
    /// End of the damaged range (exclusive): the next intact record.
    pub end: u64,
    /// What check failed at `start`.
    pub reason: String,
}

/// One segment after recovery read it.
#[derive(Debug)]
pub(crate) struct ScannedSegment {
    pub(crate) id: SegmentId,
    pub(crate) kind: SegmentKind,
    pub(crate) path: PathBuf,
    pub(crate) base_position: u64,
    /// End of the log range the segment covers.
    pub(crate) end_position: u64,
    /// File offset just past the last intact record.
    pub(crate) end_offset: u64,
    pub(crate) map: SealedSegment,
    /// Where the index build finds the segment's operations.
    ops: Ops,
}

/// Where the index build finds a segment's operations.
#[derive(Debug)]
enum Ops {
    /// In its hint file (verified, and matching the segment).
    Hint(Vec<u8>),
    /// In the intact records at these file offsets.
    Records(Vec<u32>),
    /// In the intact records at these file offsets, one operation per key
    /// in strictly ascending key order (a merged segment as merges write
    /// it): read in place, without a sort.
    SortedRecords {
        offsets: Vec<u32>,
        /// Bytes of its delete operations.
        deleted: u64,
    },
    /// In the keydir file, loaded whole: the index is not built.
    Indexed,
}

/// The state rebuilt from disk.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) keydir: KeyDir,
    /// Sparse index from change numbers to records.
    pub(crate) changes: ChangeIndex,
    /// The highest applied number any record carries (replication).
    pub(crate) applied: u64,
    /// Segments in log order; the last one becomes the active segment when
    /// it is a log segment.
    pub(crate) segments: Vec<ScannedSegment>,
    /// The highest segment id found on disk, skipped or removed ones
    /// included: new segments are numbered above it.
    pub(crate) highest_id: Option<SegmentId>,
    /// Sealed segments read without a usable hint: hints to write.
    pub(crate) unhinted: Vec<SegmentId>,
    /// Bytes of delete operations per segment.
    pub(crate) tombstones: std::collections::HashMap<SegmentId, u64>,
    /// The live entries' sums per segment, counted while the index was
    /// built.
    pub(crate) live: Vec<(SegmentId, LiveSums)>,
    pub(crate) report: RecoveryReport,
}

/// Lists the segment ids in `dir`, ascending.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<SegmentId>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir).context(|| format!("list {}", dir.display()))? {
        let entry = entry.context(|| format!("list {}", dir.display()))?;
        if let Some(id) = entry
            .file_name()
            .to_str()
            .and_then(SegmentId::parse_file_name)
        {
            ids.push(id);
        }
    }
    ids.sort();
    Ok(ids)
}

/// Removes the output files of merges that had not committed.
fn remove_unfinished_merges(dir: &Path, fs: &dyn FileSystem) -> Result<usize> {
    let mut removed = 0;
    for entry in fs::read_dir(dir).context(|| format!("list {}", dir.display()))? {
        let entry = entry.context(|| format!("list {}", dir.display()))?;
        let path = entry.path();
        if path.extension().and_then(|e| e.to_str()) == Some(crate::log::MERGING_EXTENSION) {
            fs.remove_file(&path)
                .context(|| format!("remove {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Rebuilds the index from the segments in `dir`, from hint files where
/// they are usable.
pub(crate) fn recover(dir: &Path, mode: RecoveryMode, fs: &dyn FileSystem) -> Result<Recovered> {
    recover_with(dir, mode, fs, false, &mut |_| {})
}

/// Reads and checks every segment of the store in `dir` as recovery would,
/// without changing anything and without trusting hint files: damage
/// anywhere is listed in `skipped`, a torn tail that an open would cut in
/// `truncated`, and hint files that do not match their segment (checksum
/// of the whole segment included) in `hint_fallbacks`. Takes the directory lock, so it fails with
/// [`Error::Locked`] while the store is open.
pub fn verify(dir: &Path) -> Result<RecoveryReport> {
    verify_with_progress(dir, &mut |_, _| {})
}

/// [`verify`], calling `progress(bytes read, bytes to read)` after each
/// segment (for a progress bar). Every segment is read twice: once record
/// by record, once whole for the checksums its hint recorded.
pub fn verify_with_progress(dir: &Path, progress: crate::Progress<'_>) -> Result<RecoveryReport> {
    if !dir.is_dir() {
        return Err(Error::InvalidPath {
            path: dir.to_path_buf(),
            reason: "not a store folder".into(),
        });
    }
    let _lock = crate::log::DirLock::acquire(dir)?;
    let total = 2 * list_segments(dir)?
        .iter()
        .map(|id| fs::metadata(id.path_in(dir)).map_or(0, |m| m.len()))
        .sum::<u64>();
    let mut done = 0;
    let mut report = recover_with(
        dir,
        RecoveryMode::TolerateAnyCorruption,
        &crate::StdFileSystem,
        true,
        &mut |bytes| {
            done += bytes;
            progress(done, total);
        },
    )?
    .report;
    // Hints are caches: one that open would not use is reported, not damage.
    for id in list_segments(dir)? {
        let map = SealedSegment::open_lazy(&id.path_in(dir))?;
        done += map.bytes().len() as u64;
        progress(done.min(total), total);
        let merged =
            read_headers(map.bytes(), id).is_ok_and(|(h, _)| h.kind == SegmentKind::Merged);
        if merged && id.hint_path_in(dir).exists() {
            report.hint_fallbacks.push(HintFallback {
                segment: id,
                reason: "hint of a merged segment, left by an older build: \
                         never read, removed at the next open"
                    .into(),
            });
        } else if merged {
            continue;
        } else if let Err(reason) = crate::hint::check(dir, id, map.bytes()) {
            report.hint_fallbacks.push(HintFallback {
                segment: id,
                reason,
            });
        }
    }
    Ok(report)
}

/// A segment file whose headers decoded.
struct Opened {
    id: SegmentId,
    path: PathBuf,
    map: SealedSegment,
    header: SegmentHeader,
    merge: Option<MergeHeader>,
}

impl Opened {
    /// End of the covered log range, when the headers say it (merged).
    fn stated_end(&self) -> Option<u64> {
        self.merge.map(|m| m.end_position)
    }
}

fn recover_with(
    dir: &Path,
    mode: RecoveryMode,
    fs: &dyn FileSystem,
    dry_run: bool,
    read: &mut dyn FnMut(u64),
) -> Result<Recovered> {
    let started = Instant::now();
    let mut report = RecoveryReport::default();
    if !dry_run {
        report.unfinished_merges_removed = remove_unfinished_merges(dir, fs)?;
    }
    let ids = list_segments(dir)?;
    let marker = SyncFailedMarker::in_dir(dir);
    // After a failed fdatasync, only the log up to this position is known
    // to be on disk, whatever the page cache still shows.
    let durable_limit = marker.read()?;
    let mut rebuilt = Rebuilt::default();
    let mut dir_changed = report.unfinished_merges_removed > 0;

    // 1. Every segment's headers.
    let mut opened: Vec<Opened> = Vec::with_capacity(ids.len());
    // A segment skipped whole has no known range: the gap it leaves is
    // reported once, as the skip, not again by the tiling check.
    let mut skipped_whole = false;
    for (i, &id) in ids.iter().enumerate() {
        let newest = i + 1 == ids.len();
        let path = id.path_in(dir);
        let map = SealedSegment::open_lazy(&path)?;
        match read_headers(map.bytes(), id) {
            Ok((header, merge)) => opened.push(Opened {
                id,
                path,
                map,
                header,
                merge,
            }),
            Err(HeaderError::Version(found)) => {
                return Err(Error::UnsupportedVersion {
                    file: path,
                    found,
                    supported: crate::format::FORMAT_VERSION,
                });
            }
            Err(HeaderError::Format(e))
                if newest && mode.cuts_torn_tail() && !has_intact_record_anywhere(map.bytes()) =>
            {
                // Crash while a log segment was being created (merge output
                // appears only whole, by rename): nothing in it was ever
                // acknowledged. Remove it.
                let len = map.bytes().len() as u64;
                drop(map);
                report.truncated = Some(TruncatedTail {
                    file: path.clone(),
                    offset: 0,
                    bytes: len,
                    reason: format!("segment header: {e}"),
                });
                if !dry_run {
                    fs.remove_file(&path)
                        .context(|| format!("remove torn segment {}", path.display()))?;
                    dir_changed = true;
                }
            }
            Err(HeaderError::Format(e)) if !newest && mode.skips_corruption() => {
                report.skipped.push(DamagedRange {
                    file: path.clone(),
                    start: 0,
                    end: map.bytes().len() as u64,
                    reason: format!("segment header: {e}; the whole segment is skipped"),
                });
                skipped_whole = true;
            }
            Err(HeaderError::Format(e)) => {
                return Err(Error::corruption(path, 0, format!("segment header: {e}")));
            }
            Err(HeaderError::Other(reason)) => return Err(Error::corruption(path, 0, reason)),
        }
    }

    // 2. Segments replaced by a committed merge whose removal did not
    // finish.
    let merged: Vec<(u64, u64, SegmentId)> = opened
        .iter()
        .filter_map(|o| Some((o.header.base_position, o.stated_end()?, o.id)))
        .collect();
    let mut kept = Vec::with_capacity(opened.len());
    for o in opened {
        let lo = o.header.base_position;
        if o.stated_end() == Some(lo) {
            // A merged segment of an empty range holds nothing and covers
            // nothing (no change number lies in it). Older builds could
            // write one (found by fuzzing); drop it.
            if o.map.bytes().len() > SegmentKind::Merged.records_start() {
                return Err(Error::corruption(
                    o.path.clone(),
                    SegmentKind::Merged.records_start() as u64,
                    "records in a merged segment of an empty log range",
                ));
            }
            report.superseded_removed += 1;
            if !dry_run {
                drop(o.map);
                fs.remove_file(&o.path)
                    .context(|| format!("remove empty merged segment {}", o.path.display()))?;
                dir_changed = true;
            }
            continue;
        }
        let covered = merged.iter().any(|&(mlo, mhi, mid)| {
            mid != o.id
                && mlo <= lo
                && lo < mhi
                && match o.stated_end() {
                    None => true,
                    Some(hi) => hi <= mhi && ((mlo, mhi) != (lo, hi) || mid > o.id),
                }
        });
        if covered {
            report.superseded_removed += 1;
            if !dry_run {
                drop(o.map);
                fs.remove_file(&o.path)
                    .context(|| format!("remove merged-away segment {}", o.path.display()))?;
                dir_changed = true;
            }
        } else {
            kept.push(o);
        }
    }
    kept.sort_by_key(|o| (o.header.base_position, o.id));

    // 3a. A clean close's keydir file, when it describes exactly these
    // segments; removed either way (and the removal made durable below)
    // before the store accepts a write, so it never outlives its state.
    let mut loaded = None;
    if !dry_run {
        // After a failed sync no close wrote one; trust nothing that says
        // otherwise.
        if durable_limit.is_none() {
            let on_disk: Vec<OnDisk<'_>> = kept
                .iter()
                .map(|o| OnDisk {
                    id: o.id,
                    kind: o.header.kind,
                    base_position: o.header.base_position,
                    stated_end: o.stated_end(),
                    bytes: o.map.bytes(),
                })
                .collect();
            match keydir_file::load(dir, &on_disk) {
                Ok(l) => loaded = l,
                Err(reason) => report.keydir_file_unused = Some(reason),
            }
        }
        dir_changed |= keydir_file::remove(fs, dir)?;
    }
    if dir_changed && !dry_run {
        sync_dir(dir, fs)?;
    }
    if let Some(l) = loaded {
        return from_keydir_file(dir, fs, kept, l, ids, report, started);
    }

    // 3. Each segment in log order, from its hint or by scanning it; the
    // merged ones (which have no hint) read first, in parallel.
    let mut merged_reads = read_all_merged(&kept);
    let mut segments: Vec<ScannedSegment> = Vec::with_capacity(kept.len());
    let mut unhinted = Vec::new();
    let mut merged_end = 0u64;
    let count = kept.len();
    for (i, o) in kept.into_iter().enumerate() {
        let newest = i + 1 == count && o.header.kind == SegmentKind::Log;
        let expected_base = segments
            .last()
            .map(|s| s.end_position)
            .filter(|_| !skipped_whole);
        check_tiling(&o, expected_base, mode, &mut report)?;
        if let Some(end) = o.stated_end() {
            merged_end = merged_end.max(end);
        }
        // A merged segment has no hint: written in key order, it is read
        // about as fast as one (DESIGN.md 2.7).
        if !newest && !dry_run && o.header.kind == SegmentKind::Log {
            match load_hint(dir, &o, &mut rebuilt) {
                Ok(hint) => {
                    report.segments_from_hints += 1;
                    segments.push(ScannedSegment {
                        id: o.id,
                        kind: o.header.kind,
                        base_position: o.header.base_position,
                        end_position: o.stated_end().unwrap_or(
                            o.header.base_position + o.map.bytes().len() as u64
                                - SEGMENT_HEADER_LEN as u64,
                        ),
                        end_offset: o.map.bytes().len() as u64,
                        path: o.path,
                        map: o.map,
                        ops: Ops::Hint(hint),
                    });
                    continue;
                }
                Err(reason) => {
                    report.hint_fallbacks.push(HintFallback {
                        segment: o.id,
                        reason,
                    });
                    unhinted.push(o.id);
                }
            }
        }
        report.segments_scanned += 1;
        let len = o.map.bytes().len() as u64;
        let o_id = o.id;
        let scanned = scan_segment(
            Scanning {
                opened: o,
                newest,
                mode,
                durable_limit: durable_limit.filter(|_| newest),
                dry_run,
                merged_read: merged_reads.remove(&o_id),
            },
            &mut rebuilt,
            &mut report,
            fs,
        )?;
        read(len);
        segments.push(scanned);
    }
    if let Some(limit) = durable_limit {
        let end = segments.last().map_or(0, |s| s.end_position);
        if end > limit {
            return Err(Error::corruption(
                marker.path(),
                0,
                format!(
                    "an fsync failed when the log was durable up to {limit}, \
                     but the log still ends at {end} before its newest segment"
                ),
            ));
        }
        if !dry_run {
            marker.clear(fs)?;
        }
    }
    if !dry_run {
        crate::hint::remove_orphans(dir, fs, &merged_ids(&segments))?;
    }
    // The replication feed is the gapless log after the newest merged range.
    rebuilt.changes.forget_below(merged_end);
    let mut live = Vec::new();
    let keydir = build_index(&segments, &mut rebuilt.tombstones, &mut live)?;
    report.segments = ids.len();
    report.keys = keydir.len();
    report.duration = started.elapsed();
    Ok(Recovered {
        keydir,
        changes: rebuilt.changes,
        applied: rebuilt.applied,
        segments,
        highest_id: ids.last().copied(),
        unhinted,
        tombstones: rebuilt.tombstones,
        live,
        report,
    })
}

/// The state a clean close left, from its keydir file: `kept` are the
/// segments it describes, in log order.
fn from_keydir_file(
    dir: &Path,
    fs: &dyn FileSystem,
    kept: Vec<Opened>,
    loaded: keydir_file::Loaded,
    ids: Vec<SegmentId>,
    mut report: RecoveryReport,
    started: Instant,
) -> Result<Recovered> {
    let count = kept.len();
    let mut segments = Vec::with_capacity(count);
    let mut unhinted = Vec::new();
    for (i, (o, (end_position, end_offset))) in kept.into_iter().zip(loaded.ends).enumerate() {
        let active = i + 1 == count;
        if !active && o.header.kind == SegmentKind::Log && !o.id.hint_path_in(dir).exists() {
            unhinted.push(o.id);
        }
        segments.push(ScannedSegment {
            id: o.id,
            kind: o.header.kind,
            base_position: o.header.base_position,
            end_position,
            end_offset,
            path: o.path,
            map: o.map,
            ops: Ops::Indexed,
        });
    }
    crate::hint::remove_orphans(dir, fs, &merged_ids(&segments))?;
    report.from_keydir_file = true;
    report.segments = ids.len();
    report.keys = loaded.keydir.len();
    report.duration = started.elapsed();
    Ok(Recovered {
        keydir: loaded.keydir,
        changes: loaded.changes,
        applied: loaded.applied,
        segments,
        highest_id: ids.last().copied(),
        unhinted,
        tombstones: loaded.tombstones,
        live: loaded.live,
        report,
    })
}

/// The merged segments among `segments`: their hint files, which older
/// builds wrote, are no longer read.
fn merged_ids(segments: &[ScannedSegment]) -> Vec<SegmentId> {
    segments
        .iter()
        .filter(|s| s.kind == SegmentKind::Merged)
        .map(|s| s.id)
        .collect()
}

/// Why a segment's headers did not decode.
enum HeaderError {
    Version(u16),
    Format(FormatError),
    Other(String),
}

fn read_headers(
    bytes: &[u8],
    id: SegmentId,
) -> std::result::Result<(SegmentHeader, Option<MergeHeader>), HeaderError> {
    let header = SegmentHeader::decode(bytes).map_err(|e| match e {
        FormatError::UnsupportedVersion(v) => HeaderError::Version(v),
        e => HeaderError::Format(e),
    })?;
    if header.id != id {
        return Err(HeaderError::Other(format!(
            "header names segment {} but the file is segment {id}",
            header.id
        )));
    }
    if u32::try_from(bytes.len()).is_err() {
        // Record offsets are 32-bit: no segment this engine writes is longer.
        return Err(HeaderError::Other(format!(
            "segment of {} bytes: longer than the 4 GiB a record offset can address",
            bytes.len()
        )));
    }
    if header
        .base_position
        .checked_add(2 * u64::from(u32::MAX))
        .is_none()
    {
        return Err(HeaderError::Other(format!(
            "segment base position {} leaves no room for records",
            header.base_position
        )));
    }
    let merge = match header.kind {
        SegmentKind::Log => None,
        SegmentKind::Merged => {
            let m = MergeHeader::decode(bytes).map_err(HeaderError::Format)?;
            if m.end_position < header.base_position {
                return Err(HeaderError::Other(format!(
                    "merged segment covers {}..{}: its end is before its start",
                    header.base_position, m.end_position
                )));
            }
            if m.end_position
                .checked_add(2 * u64::from(u32::MAX))
                .is_none()
            {
                // The log goes on after the highest end: leave it room.
                return Err(HeaderError::Other(format!(
                    "merged segment end position {} leaves no room for records",
                    m.end_position
                )));
            }
            Some(m)
        }
    };
    Ok((header, merge))
}

/// Checks that a segment starts where the previous one ended.
fn check_tiling(
    o: &Opened,
    expected_base: Option<u64>,
    mode: RecoveryMode,
    report: &mut RecoveryReport,
) -> Result<()> {
    let Some(expected) = expected_base else {
        return Ok(());
    };
    if expected == o.header.base_position {
        return Ok(());
    }
    let reason = format!(
        "segment starts at log position {} but the previous one ends at {expected}",
        o.header.base_position
    );
    if !mode.skips_corruption() {
        return Err(Error::corruption(o.path.clone(), 0, reason));
    }
    // A segment file is missing (or the previous one lost its end): the
    // records at the missing log positions are gone. Say so.
    report.skipped.push(DamagedRange {
        file: o.path.clone(),
        start: 0,
        end: 0,
        reason: format!(
            "{reason}: log positions {expected}..{} are missing",
            o.header.base_position
        ),
    });
    Ok(())
}

/// Reads and checks the hint of a sealed segment, notes its change index
/// and applied number, and returns it; or says why it cannot be used.
fn load_hint(
    dir: &Path,
    o: &Opened,
    rebuilt: &mut Rebuilt,
) -> std::result::Result<Vec<u8>, String> {
    let bytes = crate::hint::read(dir, o.id)?;
    let hint = Hint::decode(&bytes).map_err(|e| format!("hint damaged: {e}"))?;
    crate::hint::matches(&hint, &o.header, o.merge.as_ref(), o.map.bytes())?;
    if o.header.kind == SegmentKind::Log {
        for offset in hint.record_starts() {
            let position = o.header.base_position + u64::from(offset) - SEGMENT_HEADER_LEN as u64;
            rebuilt.changes.note(position, o.id, u64::from(offset));
        }
    }
    rebuilt.applied = rebuilt.applied.max(hint.header.applied);
    Ok(bytes)
}

/// What the scans note besides the index.
#[derive(Default)]
struct Rebuilt {
    changes: ChangeIndex,
    applied: u64,
    tombstones: std::collections::HashMap<SegmentId, u64>,
}

/// The live entries of one segment, summed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LiveSums {
    pub(crate) bytes: u64,
    pub(crate) keys: u64,
    /// Bytes of entries with an expiry, and the earliest expiry.
    pub(crate) expiring: u64,
    pub(crate) first_expiry: u64,
}

impl Default for LiveSums {
    fn default() -> Self {
        LiveSums {
            bytes: 0,
            keys: 0,
            expiring: 0,
            first_expiry: u64::MAX,
        }
    }
}

impl LiveSums {
    pub(crate) fn add(&mut self, e: &KeyEntry) {
        self.bytes += u64::from(e.pointer.len);
        self.keys += 1;
        if e.expire_ts != 0 {
            self.expiring += u64::from(e.pointer.len);
            self.first_expiry = self.first_expiry.min(e.expire_ts);
        }
    }
}

/// One operation on its way into the index.
struct Found<'a> {
    key: &'a [u8],
    kind: OpKind,
    entry: KeyEntry,
}

/// A segment's operations, ascending by key, one per key (its newest).
type Run<'a> = Box<dyn Iterator<Item = Found<'a>> + 'a>;

/// Builds the index from every segment's operations: each segment gives a
/// run sorted by key holding its newest operation per key (hints are
/// stored that way; scanned records are sorted here), and the runs are
/// merged with the newest segment winning, a delete hiding the key. A
/// linear build replaces one search per operation (measured: 1M keys
/// from hints in 0.55 s by inserting, see DESIGN.md 5.4).
fn build_index(
    segments: &[ScannedSegment],
    tombstones: &mut std::collections::HashMap<SegmentId, u64>,
    live: &mut Vec<(SegmentId, LiveSums)>,
) -> Result<KeyDir> {
    let mut runs: Vec<Run<'_>> = Vec::with_capacity(segments.len());
    for s in segments {
        let pointer = |offset: u32, len: u32| RecordPointer {
            segment: s.id,
            offset,
            len,
        };
        match &s.ops {
            Ops::Indexed => {}
            Ops::Hint(bytes) => {
                // `load_hint` verified these bytes.
                let hint = Hint::decode_verified(bytes).map_err(|e| {
                    Error::corruption(s.id.hint_path_in(Path::new("")), 0, e.to_string())
                })?;
                let deleted: u64 = hint
                    .entries()
                    .filter(|e| e.kind == OpKind::Delete)
                    .map(|e| u64::from(e.len))
                    .sum();
                *tombstones.entry(s.id).or_default() += deleted;
                runs.push(Box::new(hint.entries().map(move |e| Found {
                    key: e.key,
                    kind: e.kind,
                    entry: KeyEntry {
                        pointer: pointer(e.offset, e.len),
                        expire_ts: e.expire_ts,
                        change_number: e.change_number,
                    },
                })));
            }
            Ops::SortedRecords { offsets, deleted } => {
                let bytes = s.map.bytes();
                if *deleted > 0 {
                    *tombstones.entry(s.id).or_default() += deleted;
                }
                // The scan verified these records and their key order.
                let ops = offsets.iter().flat_map(move |&at| {
                    decode_verified_record(&bytes[at as usize..])
                        .into_iter()
                        .flat_map(|rec| rec.entries())
                        .map(move |(off, cn, op)| (at + off, cn, op))
                });
                runs.push(Box::new(ops.map(move |(at, cn, op)| Found {
                    key: op.key,
                    kind: op.kind,
                    entry: KeyEntry {
                        pointer: pointer(
                            at,
                            (OP_HEADER_LEN + op.key.len() + op.value.len()) as u32,
                        ),
                        expire_ts: op.expire_ts,
                        change_number: cn,
                    },
                })));
            }
            Ops::Records(offsets) => {
                let bytes = s.map.bytes();
                // Each operation with its key's first 16 bytes as an
                // integer, so that most comparisons of the sort below are
                // one integer comparison instead of a `memcmp`.
                let mut found: Vec<(u128, Found<'_>)> = Vec::new();
                // The scan verified these records.
                for &at in offsets {
                    let Some(rec) = decode_verified_record(&bytes[at as usize..]) else {
                        continue;
                    };
                    for (off, cn, op) in rec.entries() {
                        let len = (OP_HEADER_LEN + op.key.len() + op.value.len()) as u32;
                        if op.kind == OpKind::Delete {
                            *tombstones.entry(s.id).or_default() += u64::from(len);
                        }
                        found.push((
                            key_prefix(op.key),
                            Found {
                                key: op.key,
                                kind: op.kind,
                                entry: KeyEntry {
                                    pointer: pointer(at + off, len),
                                    expire_ts: op.expire_ts,
                                    change_number: cn,
                                },
                            },
                        ));
                    }
                }
                // By key, and of one key's operations the newest (the
                // furthest into the file) first, which `dedup` keeps.
                found.sort_unstable_by(|(pa, a), (pb, b)| {
                    pa.cmp(pb)
                        .then_with(|| a.key.cmp(b.key))
                        .then_with(|| b.entry.pointer.offset.cmp(&a.entry.pointer.offset))
                });
                found.dedup_by(|(_, later), (_, kept)| later.key == kept.key);
                runs.push(Box::new(found.into_iter().map(|(_, f)| f)));
            }
        }
    }
    // Sums per segment, in a table indexed by the segment's place in
    // `segments` (found by id in a sorted list, once per change of segment).
    let mut ids: Vec<(SegmentId, usize)> = segments
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id, i))
        .collect();
    ids.sort_unstable();
    let mut sums = vec![LiveSums::default(); segments.len()];
    let mut last: Option<(SegmentId, usize)> = None;
    let built = KeyDir::from_sorted(merge_runs(runs).filter_map(|f| {
        if f.kind != OpKind::Put {
            return None;
        }
        let seg = f.entry.pointer.segment;
        let slot = match last {
            Some((id, slot)) if id == seg => Some(slot),
            _ => ids
                .binary_search_by_key(&seg, |&(id, _)| id)
                .ok()
                .map(|i| ids[i].1),
        };
        if let Some(slot) = slot {
            last = Some((seg, slot));
            sums[slot].add(&f.entry);
        }
        Some((f.key, f.entry))
    }));
    live.extend(segments.iter().map(|s| s.id).zip(sums));
    built.ok_or_else(|| {
        Error::corruption(
            PathBuf::from("(index build)"),
            0,
            "keys out of order while building the index",
        )
    })
}

/// Merges runs (each ascending by key, one operation per key) into one
/// ascending stream holding, for each key, the operation of the latest run
/// that has it.
fn merge_runs<'a>(mut runs: Vec<Run<'a>>) -> MergedRuns<'a> {
    let heads: Vec<Option<Found<'a>>> = runs.iter_mut().map(Iterator::next).collect();
    let heap = heads
        .iter()
        .enumerate()
        .filter_map(|(i, h)| Some(Head::new(h.as_ref()?.key, i)))
        .collect();
    MergedRuns { runs, heads, heap }
}

/// A run's next key in the merge heap, ordered so that the heap's top is
/// the smallest key and, of equal keys, the latest run. Keys are compared
/// by their first 16 bytes as one integer before any byte comparison: most
/// keys differ there, and a 1M-key merge spent a quarter of its time in
/// `memcmp` calls.
struct Head<'a> {
    prefix: u128,
    key: &'a [u8],
    run: usize,
}

impl<'a> Head<'a> {
    fn new(key: &'a [u8], run: usize) -> Self {
        Head {
            prefix: key_prefix(key),
            key,
            run,
        }
    }
}

/// A key's first 16 bytes (zero-padded) as a big-endian integer: comparing
/// two prefixes orders two keys unless the prefixes are equal.
fn key_prefix(key: &[u8]) -> u128 {
    if let Some(head) = key.first_chunk::<16>() {
        // One load, not a call to `memcpy` for a variable length.
        return u128::from_be_bytes(*head);
    }
    let mut b = [0u8; 16];
    b[..key.len()].copy_from_slice(key);
    u128::from_be_bytes(b)
}

impl PartialEq for Head<'_> {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == std::cmp::Ordering::Equal
    }
}

impl Eq for Head<'_> {}

impl PartialOrd for Head<'_> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Head<'_> {
    /// Reversed (the heap is a max-heap): a smaller key, or an equal key
    /// of a later run, is greater.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        other
            .prefix
            .cmp(&self.prefix)
            .then_with(|| other.key.cmp(self.key))
            .then_with(|| self.run.cmp(&other.run))
    }
}

/// See [`merge_runs`].
struct MergedRuns<'a> {
    runs: Vec<Run<'a>>,
    heads: Vec<Option<Found<'a>>>,
    heap: std::collections::BinaryHeap<Head<'a>>,
}

impl<'a> MergedRuns<'a> {
    /// Replaces the heap's top (run `i`'s current key) with the run's next
    /// key, or removes it when the run is done: one sift, not a pop and a
    /// push.
    fn advance_top(&mut self) {
        let Some(mut top) = self.heap.peek_mut() else {
            return;
        };
        let i = top.run;
        self.heads[i] = self.runs[i].next();
        match &self.heads[i] {
            Some(h) => *top = Head::new(h.key, i),
            None => {
                std::collections::binary_heap::PeekMut::pop(top);
            }
        }
    }
}

impl<'a> Iterator for MergedRuns<'a> {
    type Item = Found<'a>;

    fn next(&mut self) -> Option<Found<'a>> {
        let (key, run) = self.heap.peek().map(|h| (h.key, h.run))?;
        let winner = self.heads[run].take()?;
        self.advance_top();
        // Older runs' operations of the same key are hidden by the winner.
        while self.heap.peek().is_some_and(|h| h.key == key) {
            self.advance_top();
        }
        Some(winner)
    }
}

/// How a damaged position is to be treated.
enum Damage {
    /// Cut the file here: nothing after it was ever durable.
    TornTail,
    /// Durable data is damaged; the next intact record (if any) is at the
    /// given offset.
    Corrupt(Option<usize>),
}

/// One segment to scan, and what is known about it.
struct Scanning {
    opened: Opened,
    /// Whether this is the newest log segment (only it can have a torn
    /// tail).
    newest: bool,
    mode: RecoveryMode,
    /// Records ending beyond this position are cut: an fsync failed.
    durable_limit: Option<u64>,
    /// Report what would be cut or removed, and change nothing.
    dry_run: bool,
    /// A merged segment's records, when they were read already.
    merged_read: Option<MergedRead>,
}

fn scan_segment(
    seg: Scanning,
    rebuilt: &mut Rebuilt,
    report: &mut RecoveryReport,
    fs: &dyn FileSystem,
) -> Result<ScannedSegment> {
    let Scanning {
        opened,
        newest,
        mode,
        durable_limit,
        dry_run,
        merged_read,
    } = seg;
    if let Some(merge) = opened.merge {
        return scan_merged(opened, merge, mode, merged_read, rebuilt, report);
    }
    let Opened {
        id,
        path,
        map,
        header,
        ..
    } = opened;
    let bytes = map.bytes();
    let base = header.base_position;
    let mut at = SEGMENT_HEADER_LEN;
    let mut cut_at = None;
    let mut records = Vec::new();
    while at < bytes.len() {
        let rest = &bytes[at..];
        let failure = match decode_record(rest) {
            Ok(rec) if durable_limit.is_some_and(|limit| rec.header.change_number > limit) => {
                cut_at = Some((
                    at,
                    format!(
                        "records after log position {} were never durable: an fsync failed",
                        durable_limit.unwrap_or_default()
                    ),
                ));
                break;
            }
            Ok(rec)
                if rec.header.kind == RecordKind::Batch
                    && Some(rec.header.change_number)
                        == expected_change_number(base, at, rec.header.record_len()) =>
            {
                let cn = rec.header.change_number;
                rebuilt
                    .changes
                    .note(cn - rec.header.record_len(), id, at as u64);
                if let Some(applied) = rec.applied {
                    rebuilt.applied = rebuilt.applied.max(applied);
                }
                records.push(at as u32);
                report.records += 1;
                at += rec.header.record_len() as usize;
                continue;
            }
            Ok(rec) if rec.header.kind != RecordKind::Batch => {
                "a merged record in a log segment".to_string()
            }
            Ok(_) => "change number does not match the record's position".to_string(),
            Err(e) => e.to_string(),
        };
        if rest.iter().all(|&b| b == 0) {
            // Preallocated space, or the zero tail of a segment sealed
            // by a crash before it was truncated: a clean end.
            break;
        }
        let damage = classify(bytes, at, base, newest);
        match damage {
            Damage::TornTail if mode.cuts_torn_tail() => {
                cut_at = Some((at, failure));
                break;
            }
            Damage::Corrupt(next) if mode.skips_corruption() => {
                let end = next.unwrap_or(bytes.len());
                report.skipped.push(DamagedRange {
                    file: path.clone(),
                    start: at as u64,
                    end: end as u64,
                    reason: failure,
                });
                if next.is_none() && newest {
                    cut_at = Some((at, "skipped damage at the end".into()));
                    break;
                }
                at = end;
            }
            Damage::TornTail => {
                return Err(Error::corruption(
                    path,
                    at as u64,
                    format!(
                        "torn tail ({failure}); open with RecoveryMode::TolerateTornTail to cut it"
                    ),
                ));
            }
            Damage::Corrupt(_) => return Err(Error::corruption(path, at as u64, failure)),
        }
    }
    report.bytes_read += at.min(bytes.len()) as u64;
    let was_cut = cut_at.is_some();
    let end_offset = match &cut_at {
        None => at.min(bytes.len()),
        Some((cut, _)) => *cut,
    };
    if let Some((cut, reason)) = cut_at {
        let cut_bytes = bytes[cut..]
            .iter()
            .rposition(|&b| b != 0)
            .map_or(0, |p| p as u64 + 1);
        report.truncated = Some(TruncatedTail {
            file: path.clone(),
            offset: cut as u64,
            bytes: cut_bytes,
            reason,
        });
    }
    // A torn tail is cut. Zeros after the records of a sealed segment are
    // cut too: the crash came between its rollover's sync and truncate, and
    // finishing the truncate makes its length its records' (so a hint
    // matches it). The newest segment keeps its preallocated zeros.
    let truncate = !dry_run && end_offset < bytes.len() && (was_cut || !newest);
    let map = if truncate {
        drop(map);
        let file = fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .context(|| format!("open {} to truncate it", path.display()))?;
        truncate_synced(&file, &path, end_offset as u64, fs)?;
        SealedSegment::open(&path)?
    } else {
        map
    };
    Ok(ScannedSegment {
        id,
        kind: SegmentKind::Log,
        path,
        base_position: base,
        end_position: base + (end_offset - SEGMENT_HEADER_LEN) as u64,
        end_offset: end_offset as u64,
        map,
        ops: Ops::Records(records),
    })
}

/// What reading a merged segment's records found. Reading is a pure
/// function of the bytes, so several segments are read at once (see
/// [`read_all_merged`]).
struct MergedRead {
    /// Offsets of the intact records, in file order.
    records: Vec<u32>,
    /// Whether the keys are strictly ascending across all of them.
    ascending: bool,
    /// Bytes of delete operations.
    deleted: u64,
    /// Where reading stopped at something that is no merged record, and why.
    failure: Option<(usize, String)>,
}

/// Reads the records of a merged segment covering `(lo, hi]`.
fn read_merged(bytes: &[u8], lo: u64, hi: u64) -> MergedRead {
    let mut at = SegmentKind::Merged.records_start().min(bytes.len());
    let mut read = MergedRead {
        records: Vec::new(),
        ascending: true,
        deleted: 0,
        failure: None,
    };
    let mut last_key: Option<&[u8]> = None;
    while at < bytes.len() {
        let failure = match decode_record(&bytes[at..]) {
            Ok(rec) if rec.header.kind != RecordKind::Merged => {
                "a log record in a merged segment".to_string()
            }
            Ok(rec) if rec.entries().any(|(_, cn, _)| cn <= lo || cn > hi) => {
                format!("a change number outside the segment's range {lo}..{hi}")
            }
            Ok(rec) => {
                for (_, _, op) in rec.entries() {
                    read.ascending &= last_key.is_none_or(|last| last < op.key);
                    last_key = Some(op.key);
                    if op.kind == OpKind::Delete {
                        read.deleted += (OP_HEADER_LEN + op.key.len()) as u64;
                    }
                }
                read.records.push(at as u32);
                at += rec.header.record_len() as usize;
                continue;
            }
            Err(e) => e.to_string(),
        };
        read.failure = Some((at, failure));
        break;
    }
    read
}

/// Up to this many bytes of merged segments, open reads them on its own
/// thread: starting threads would cost more than it saves.
const PARALLEL_READ_BYTES: usize = 8 << 20;
/// Name of the threads that read merged segments at open.
const MERGED_READ_THREAD: &str = "dkv-cask-open";

/// Reads every merged segment among `segments`, on up to
/// `available_parallelism` threads (each segment whole on one thread)
/// when there is enough to read; by segment id.
fn read_all_merged(segments: &[Opened]) -> HashMap<SegmentId, MergedRead> {
    let mut merged: Vec<ToRead<'_>> = segments
        .iter()
        .filter_map(|o| {
            Some(ToRead {
                id: o.id,
                bytes: o.map.bytes(),
                lo: o.header.base_position,
                hi: o.merge?.end_position,
            })
        })
        .collect();
    let total: usize = merged.iter().map(|m| m.bytes.len()).sum();
    // Checked first: no thread starts for this little, and
    // `available_parallelism` may read the cgroup files on every call (it
    // did with the nightly standard library: 2.5% of the `ops_model` fuzz
    // target's time, which opens small stores over and over).
    if merged.len() < 2 || total <= PARALLEL_READ_BYTES {
        return HashMap::new();
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(merged.len());
    if threads < 2 {
        return HashMap::new();
    }
    // Largest first, each to the thread with the least so far.
    merged.sort_by_key(|m| std::cmp::Reverse(m.bytes.len()));
    let mut groups: Vec<(usize, Vec<ToRead<'_>>)> = vec![(0, Vec::new()); threads];
    for m in merged {
        let g = groups.iter_mut().min_by_key(|g| g.0).expect("threads >= 2");
        g.0 += m.bytes.len();
        g.1.push(m);
    }
    std::thread::scope(|scope| {
        // A group whose thread cannot start (a thread limit), or whose
        // thread panicked, is left out: `scan_merged` reads what is
        // missing on the opening thread.
        let jobs: Vec<_> = groups
            .into_iter()
            .filter_map(|(_, group)| {
                std::thread::Builder::new()
                    .name(MERGED_READ_THREAD.into())
                    .spawn_scoped(scope, move || {
                        group
                            .into_iter()
                            .map(|m| (m.id, read_merged(m.bytes, m.lo, m.hi)))
                            .collect::<Vec<_>>()
                    })
                    .ok()
            })
            .collect();
        jobs.into_iter()
            .filter_map(|j| j.join().ok())
            .flatten()
            .collect()
    })
}

/// A merged segment for [`read_all_merged`]: its id, bytes and range.
#[derive(Clone, Copy)]
struct ToRead<'a> {
    id: SegmentId,
    bytes: &'a [u8],
    lo: u64,
    hi: u64,
}

/// Reads a merged segment (or takes what [`read_all_merged`] read). It
/// was fsynced before it was renamed into place, so any damage is
/// corruption: an error, or in the tolerant mode the rest of the segment
/// is skipped.
fn scan_merged(
    opened: Opened,
    merge: MergeHeader,
    mode: RecoveryMode,
    read: Option<MergedRead>,
    rebuilt: &mut Rebuilt,
    report: &mut RecoveryReport,
) -> Result<ScannedSegment> {
    let Opened {
        id,
        path,
        map,
        header,
        ..
    } = opened;
    let bytes = map.bytes();
    let (lo, hi) = (header.base_position, merge.end_position);
    let read = read.unwrap_or_else(|| read_merged(bytes, lo, hi));
    report.records += read.records.len() as u64;
    if let Some((at, failure)) = read.failure {
        if !mode.skips_corruption() {
            return Err(Error::corruption(path, at as u64, failure));
        }
        report.skipped.push(DamagedRange {
            file: path.clone(),
            start: at as u64,
            end: bytes.len() as u64,
            reason: format!("{failure}; the rest of the merged segment is skipped"),
        });
    }
    report.bytes_read += bytes.len() as u64;
    rebuilt.applied = rebuilt.applied.max(merge.applied);
    Ok(ScannedSegment {
        id,
        kind: SegmentKind::Merged,
        end_offset: bytes.len() as u64,
        path,
        base_position: lo,
        end_position: hi,
        map,
        ops: if read.ascending {
            Ops::SortedRecords {
                offsets: read.records,
                deleted: read.deleted,
            }
        } else {
            Ops::Records(read.records)
        },
    })
}

/// The change number a record of `len` bytes at file offset `at` must carry.
fn expected_change_number(base: u64, at: usize, len: u64) -> Option<u64> {
    base.checked_add((at - SEGMENT_HEADER_LEN) as u64)?
        .checked_add(len)
}

/// Decides whether damage at `at` is a torn tail or corruption.
fn classify(bytes: &[u8], at: usize, base: u64, newest: bool) -> Damage {
    let next = find_next_record(bytes, at + 1, base);
    if !newest {
        return Damage::Corrupt(next);
    }
    let Some(next_at) = next else {
        return Damage::TornTail;
    };
    // The latest durable position claimed by any intact record after the damage.
    let mut durable = 0u64;
    let mut p = next_at;
    while let Some(q) = (p < bytes.len()).then_some(p) {
        match decode_record(&bytes[q..]) {
            Ok(r)
                if Some(r.header.change_number)
                    == expected_change_number(base, q, r.header.record_len()) =>
            {
                durable = durable.max(r.header.synced_position);
                p = q + r.header.record_len() as usize;
            }
            _ => match find_next_record(bytes, q + 1, base) {
                Some(n) => p = n,
                None => break,
            },
        }
    }
    let damaged_position = base + (at - SEGMENT_HEADER_LEN) as u64;
    if damaged_position < durable {
        Damage::Corrupt(Some(next_at))
    } else {
        Damage::TornTail
    }
}

/// Finds the first offset at or after `from` holding an intact record whose
/// change number matches its position.
fn find_next_record(bytes: &[u8], from: usize, base: u64) -> Option<usize> {
    let last = bytes.len().checked_sub(RECORD_HEADER_LEN)?;
    (from.max(SEGMENT_HEADER_LEN)..=last).find(|&p| {
        let payload_len = u64::from(LE::read_u32(&bytes[p + 4..]));
        let cn = LE::read_u64(&bytes[p + 24..]);
        expected_change_number(base, p, RECORD_HEADER_LEN as u64 + payload_len) == Some(cn)
            && decode_record(&bytes[p..]).is_ok()
    })
}

/// Whether any intact record exists in a segment whose header is unreadable.
fn has_intact_record_anywhere(bytes: &[u8]) -> bool {
    let Some(last) = bytes.len().checked_sub(RECORD_HEADER_LEN) else {
        return false;
    };
    let mut p = SEGMENT_HEADER_LEN.min(bytes.len());
    while p <= last {
        // A record header is never all zeros: jump over zero runs.
        match bytes[p..].iter().position(|&b| b != 0) {
            None => return false,
            Some(nz) if nz >= RECORD_HEADER_LEN => {
                p += nz + 1 - RECORD_HEADER_LEN;
                continue;
            }
            Some(_) => {}
        }
        if decode_record(&bytes[p..]).is_ok() {
            return true;
        }
        p += 1;
    }
    false
}
