//! Open-time recovery: reads every segment, verifies every checksum, rebuilds
//! the KeyDir, and decides what damaged bytes are: a torn tail of the newest
//! segment (never synced, so cut off) or corruption of durable data (an error,
//! or skipped and reported in the tolerant mode). Must not append records.
//!
//! Telling the two apart: every record header carries a log position that was
//! already durable when it was written. Damage at a position below what any
//! later intact record says was durable is corruption of synced data; damage
//! beyond it can only be a write that never reached the disk whole.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::error::{Error, IoContext, Result};
use crate::format::{
    FormatError, OP_HEADER_LEN, OpKind, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SegmentHeader,
    decode_record,
};
use crate::keydir::{KeyDir, KeyEntry, RecordPointer};
use crate::log::{
    FaultInjector, SealedSegment, SegmentId, SyncFailedMarker, sync_dir, truncate_synced,
};
use crate::options::RecoveryMode;
use crate::replication::ChangeIndex;

/// What `open` found and did while rebuilding the index.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Segment files read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Live keys in the index afterwards (expired ones included).
    pub keys: usize,
    /// Bytes of segment data read and verified.
    pub bytes_read: u64,
    /// A torn tail cut from the newest segment.
    pub truncated: Option<TruncatedTail>,
    /// Damaged ranges skipped under [`RecoveryMode::TolerateAnyCorruption`].
    pub skipped: Vec<DamagedRange>,
    /// Wall time spent.
    pub duration: Duration,
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

/// One segment after its scan.
#[derive(Debug)]
pub(crate) struct ScannedSegment {
    pub(crate) id: SegmentId,
    pub(crate) path: PathBuf,
    pub(crate) base_position: u64,
    /// File offset just past the last intact record.
    pub(crate) end_offset: u64,
    pub(crate) map: SealedSegment,
}

impl ScannedSegment {
    /// Logical position just past the last intact record.
    pub(crate) fn end_position(&self) -> u64 {
        self.base_position + (self.end_offset - SEGMENT_HEADER_LEN as u64)
    }
}

/// The state rebuilt from disk.
#[derive(Debug)]
pub(crate) struct Recovered {
    pub(crate) keydir: KeyDir,
    /// Sparse index from change numbers to records.
    pub(crate) changes: ChangeIndex,
    /// The highest applied number any record carries (replication).
    pub(crate) applied: u64,
    /// Segments in id order; the last one becomes the active segment.
    pub(crate) segments: Vec<ScannedSegment>,
    /// The highest segment id found on disk, skipped or removed ones
    /// included: new segments are numbered above it.
    pub(crate) highest_id: Option<SegmentId>,
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

/// Rebuilds the index from the segments in `dir`.
pub(crate) fn recover(
    dir: &Path,
    mode: RecoveryMode,
    faults: Option<&FaultInjector>,
) -> Result<Recovered> {
    recover_with(dir, mode, faults, false)
}

/// Reads and checks every segment of the store in `dir` as recovery would,
/// without changing anything: damage anywhere is listed in `skipped`, a torn
/// tail that an open would cut in `truncated`. Takes the directory lock, so
/// it fails with [`Error::Locked`] while the store is open.
pub fn verify(dir: &Path) -> Result<RecoveryReport> {
    if !dir.is_dir() {
        return Err(Error::InvalidPath {
            path: dir.to_path_buf(),
            reason: "not a store folder".into(),
        });
    }
    let _lock = crate::log::DirLock::acquire(dir)?;
    Ok(recover_with(dir, RecoveryMode::TolerateAnyCorruption, None, true)?.report)
}

fn recover_with(
    dir: &Path,
    mode: RecoveryMode,
    faults: Option<&FaultInjector>,
    dry_run: bool,
) -> Result<Recovered> {
    let started = Instant::now();
    let ids = list_segments(dir)?;
    let marker = SyncFailedMarker::in_dir(dir);
    // After a failed fdatasync, only the log up to this position is known
    // to be on disk, whatever the page cache still shows.
    let durable_limit = marker.read()?;
    let mut rebuilt = Rebuilt::default();
    let mut report = RecoveryReport::default();
    let mut segments: Vec<ScannedSegment> = Vec::with_capacity(ids.len());
    let mut skipped_previous = false;
    for (i, &id) in ids.iter().enumerate() {
        let newest = i + 1 == ids.len();
        let path = id.path_in(dir);
        let map = SealedSegment::open(&path)?;
        let expected_base = if std::mem::take(&mut skipped_previous) {
            None
        } else {
            segments.last().map(ScannedSegment::end_position)
        };
        let scanned = scan_segment(
            Scanning {
                id,
                path,
                map,
                expected_base,
                newest,
                mode,
                durable_limit: durable_limit.filter(|_| newest),
                dry_run,
            },
            &mut rebuilt,
            &mut report,
            faults,
        )?;
        match scanned {
            Scan::Segment(s) => segments.push(s),
            // A newest segment torn while being created holds nothing: it
            // was removed, so the segment before it is the newest again.
            Scan::Removed if dry_run => {}
            Scan::Removed => sync_dir(dir, faults)?,
            // Reported in `skipped`; the next segment's base will not match,
            // which is the same loss and is not reported twice.
            Scan::Skipped => skipped_previous = true,
        }
    }
    if let Some(limit) = durable_limit {
        let end = segments.last().map_or(0, ScannedSegment::end_position);
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
            marker.clear(faults)?;
        }
    }
    report.segments = ids.len();
    report.keys = rebuilt.keydir.len();
    report.duration = started.elapsed();
    Ok(Recovered {
        keydir: rebuilt.keydir,
        changes: rebuilt.changes,
        applied: rebuilt.applied,
        segments,
        highest_id: ids.last().copied(),
        report,
    })
}

/// What the replayed records build.
#[derive(Default)]
struct Rebuilt {
    keydir: KeyDir,
    changes: ChangeIndex,
    applied: u64,
}

/// What became of one segment file.
enum Scan {
    /// Read; its records are in the index.
    Segment(ScannedSegment),
    /// A newest segment torn during its creation, removed.
    Removed,
    /// A damaged segment skipped whole (tolerant mode only).
    Skipped,
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
    id: SegmentId,
    path: PathBuf,
    map: SealedSegment,
    /// Where the previous segment's log ends, when it was read.
    expected_base: Option<u64>,
    /// Whether this is the newest segment (only it can have a torn tail).
    newest: bool,
    mode: RecoveryMode,
    /// Records ending beyond this position are cut: an fsync failed.
    durable_limit: Option<u64>,
    /// Report what would be cut or removed, and change nothing.
    dry_run: bool,
}

fn scan_segment(
    seg: Scanning,
    rebuilt: &mut Rebuilt,
    report: &mut RecoveryReport,
    faults: Option<&FaultInjector>,
) -> Result<Scan> {
    let Scanning {
        id,
        path,
        map,
        expected_base,
        newest,
        mode,
        durable_limit,
        dry_run,
    } = seg;
    let bytes = map.bytes();
    let header = match SegmentHeader::decode(bytes) {
        Ok(h) => h,
        Err(FormatError::UnsupportedVersion(found)) => {
            return Err(Error::UnsupportedVersion {
                file: path,
                found,
                supported: crate::format::FORMAT_VERSION,
            });
        }
        Err(e) if newest && mode.cuts_torn_tail() && !has_intact_record_anywhere(bytes) => {
            // Crash while the segment was being created: nothing in it was
            // ever acknowledged. Remove it.
            let len = bytes.len() as u64;
            drop(map);
            report.truncated = Some(TruncatedTail {
                file: path.clone(),
                offset: 0,
                bytes: len,
                reason: format!("segment header: {e}"),
            });
            if !dry_run {
                fs::remove_file(&path)
                    .context(|| format!("remove torn segment {}", path.display()))?;
            }
            return Ok(Scan::Removed);
        }
        Err(e) if !newest && mode.skips_corruption() => {
            report.skipped.push(DamagedRange {
                file: path.clone(),
                start: 0,
                end: bytes.len() as u64,
                reason: format!("segment header: {e}; the whole segment is skipped"),
            });
            return Ok(Scan::Skipped);
        }
        Err(e) => return Err(Error::corruption(path, 0, format!("segment header: {e}"))),
    };
    if header.id != id {
        return Err(Error::corruption(
            path,
            0,
            format!(
                "header names segment {} but the file is segment {id}",
                header.id
            ),
        ));
    }
    if header
        .base_position
        .checked_add(2 * u64::from(u32::MAX))
        .is_none()
    {
        return Err(Error::corruption(
            path,
            0,
            format!(
                "segment base position {} leaves no room for records",
                header.base_position
            ),
        ));
    }
    if let Some(expected) = expected_base
        && expected != header.base_position
    {
        let reason = format!(
            "segment starts at log position {} but the previous one ends at {expected}",
            header.base_position
        );
        if !mode.skips_corruption() {
            return Err(Error::corruption(path, 0, reason));
        }
        // A segment file is missing (or the previous one lost its end): the
        // records at the missing log positions are gone. Say so.
        report.skipped.push(DamagedRange {
            file: path.clone(),
            start: 0,
            end: 0,
            reason: format!(
                "{reason}: log positions {expected}..{} are missing",
                header.base_position
            ),
        });
    }
    let base = header.base_position;
    let mut at = SEGMENT_HEADER_LEN;
    let mut cut_at = None;
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
                if Some(rec.header.change_number)
                    == expected_change_number(base, at, rec.header.record_len()) =>
            {
                let cn = rec.header.change_number;
                rebuilt
                    .changes
                    .note(cn - rec.header.record_len(), id, at as u64);
                if let Some(applied) = rec.applied {
                    rebuilt.applied = rebuilt.applied.max(applied);
                }
                for (off, op) in rec.ops() {
                    let pointer = RecordPointer {
                        segment: id,
                        offset: (at as u64 + u64::from(off)) as u32,
                        len: (OP_HEADER_LEN + op.key.len() + op.value.len()) as u32,
                    };
                    match op.kind {
                        OpKind::Put => {
                            rebuilt.keydir.insert_if_newer(
                                op.key,
                                KeyEntry {
                                    pointer,
                                    expire_ts: op.expire_ts,
                                    change_number: cn,
                                },
                            );
                        }
                        OpKind::Delete => {
                            if rebuilt
                                .keydir
                                .get(op.key)
                                .is_some_and(|e| e.change_number < cn)
                            {
                                rebuilt.keydir.remove(op.key);
                            }
                        }
                    }
                }
                report.records += 1;
                at += rec.header.record_len() as usize;
                continue;
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
    let end_offset = match cut_at {
        None => at.min(bytes.len()),
        Some((cut, reason)) => {
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
            let map = if dry_run {
                map
            } else {
                drop(map);
                let file = fs::OpenOptions::new()
                    .write(true)
                    .open(&path)
                    .context(|| format!("open {} to cut its torn tail", path.display()))?;
                truncate_synced(&file, &path, cut as u64, faults)?;
                SealedSegment::open(&path)?
            };
            return Ok(Scan::Segment(ScannedSegment {
                id,
                map,
                path,
                base_position: base,
                end_offset: cut as u64,
            }));
        }
    };
    Ok(Scan::Segment(ScannedSegment {
        id,
        path,
        base_position: base,
        end_offset: end_offset as u64,
        map,
    }))
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
