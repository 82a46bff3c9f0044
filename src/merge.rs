//! Merge: rewrites the live operations of a run of adjacent sealed
//! segments into one merged segment, and retires the run. Owns choosing
//! runs (thresholds, retention), the copy, the commit, and the background
//! thread. Must not hold the index lock while copying, must not write to a
//! log segment, and must not lose a tombstone that still hides something.
//!
//! Steps of one run (DESIGN.md 18 walks through a crash after each):
//! 1. Read the run's records; keep each put the index still points at
//!    (unexpired), and each delete that is its key's newest in the run
//!    while the key has no newer put and an older segment survives.
//! 2. Write them, each with its original change number, to
//!    `<id>.merging`; `fdatasync` it. ([`MergeStep::Written`])
//! 3. Rename it to `<id>.seg`; fsync the folder: the commit point. A
//!    merged segment supersedes every segment inside its log range.
//!    ([`MergeStep::Committed`])
//! 4. Point the index at the copies, a few thousand keys per lock hold;
//!    swap the run out of the segment table. ([`MergeStep::Applied`])
//! 5. Nothing more: a merged segment gets no hint file, since it is
//!    written in key order and open reads it about as fast as a hint
//!    (DESIGN.md 2.7). The run's files are unlinked when the last reader
//!    of each lets go of it.

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::format::{
    HintEntry, MergeHeader, MergedBuilder, OP_HEADER_LEN, OpKind, RecordKind, SegmentHeader,
    SegmentKind, decode_record,
};
use crate::keydir::RecordPointer;
use crate::log::{FileSystem, SealedSegment, SegmentId, sync_dir};
use crate::store::usage::MERGED_BLOCK_BYTES;
use crate::store::{Inner, Retired, SegmentReader, Store, StoreStats, Usage};

/// Index updates applied per hold of the index lock: about 0.1 ms of
/// writers' wait (`dkv-cask bench --suite merge` measured 2048 per hold,
/// about 2 ms, as the p99 of durable puts during a merge).
const RELOCATIONS_PER_LOCK: usize = 256;
/// Output buffered before each `write`.
const WRITE_CHUNK: usize = 1 << 20;

/// What a merge did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MergeReport {
    /// Runs merged (one merged segment each).
    pub runs: usize,
    /// Segments merged away.
    pub segments_merged: usize,
    /// Bytes of the merged-away segments.
    pub bytes_before: u64,
    /// Bytes of the merged segments written.
    pub bytes_after: u64,
    /// Live put operations copied.
    pub puts_copied: u64,
    /// Delete operations kept because they still hide an older value.
    pub tombstones_kept: u64,
    /// Wall time spent.
    pub duration: Duration,
}

/// The steps of one merge run, for crash tests.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MergeStep {
    /// The output is written and synced under its temporary name.
    Written,
    /// The output is renamed into place and the folder synced.
    Committed,
    /// The index points at the output; the run is retired.
    Applied,
}

impl Store {
    /// Merges every sealed segment that has anything to give back, as far
    /// as [`Retention`](crate::Retention) allows, after sealing the active
    /// segment (so everything written so far can be merged). Runs in the
    /// calling thread; readers and writers keep going. Returns what was
    /// done; an error leaves the store as it was before the failing run.
    pub fn merge(&self) -> Result<MergeReport> {
        self.merge_with_hook(&mut |_| true)
    }

    /// [`merge`](Self::merge) with a hook called after each step of each
    /// run; returning `false` stops the merge there, as a crash would
    /// (for crash tests).
    #[doc(hidden)]
    pub fn merge_with_hook(&self, hook: &mut dyn FnMut(MergeStep) -> bool) -> Result<MergeReport> {
        let started = Instant::now();
        self.inner.check_open()?;
        self.inner.seal_active()?;
        let mut report = MergeReport::default();
        // The plan is made before each run takes the merge lock: a run the
        // background merger changed meanwhile is skipped, and its segments
        // are planned again (at most 16 rounds: the background merger only
        // shrinks what is left to do).
        for _ in 0..16 {
            let mut stale = false;
            for run in plan(&self.inner, true)? {
                let _merging = self.inner.merge_lock.lock();
                stale |= !merge_run(&self.inner, &run, true, hook, &mut report)?;
            }
            if !stale {
                break;
            }
        }
        report.duration = started.elapsed();
        Ok(report)
    }

    /// Merges exactly the given adjacent sealed segments into one (for
    /// tests that need a chosen run), with the step hook of
    /// [`merge_with_hook`](Self::merge_with_hook). Retention is not
    /// consulted.
    #[doc(hidden)]
    pub fn merge_segments(
        &self,
        run: &[SegmentId],
        hook: &mut dyn FnMut(MergeStep) -> bool,
    ) -> Result<MergeReport> {
        self.inner.check_open()?;
        let _merging = self.inner.merge_lock.lock();
        let mut report = MergeReport::default();
        if !merge_run(&self.inner, run, false, hook, &mut report)? {
            return Err(Error::InvalidOptions(format!(
                "segments {run:?} are not adjacent sealed segments of this store"
            )));
        }
        Ok(report)
    }

    /// Live and dead bytes per segment, and the totals. Expired keys count
    /// as dead; finding them walks the index (a few thousand keys per hold
    /// of its lock) when some segment holds keys that may have expired.
    pub fn stats(&self) -> Result<StoreStats> {
        self.inner.check_open()?;
        let now = self.inner.options.clock.now();
        let written = self.inner.commit.written();
        let mut usage: Vec<(SegmentId, Usage, bool)> = {
            let state = self.inner.state.read();
            state.check_open()?;
            state
                .usage
                .iter()
                .map(|(&id, &u)| {
                    let active = matches!(
                        state.segments.get(&id).map(|r| &**r),
                        Some(SegmentReader::Active(..))
                    );
                    (id, u, active)
                })
                .collect()
        };
        // `plan` moves `first_expiry` past what it counted: walk whenever
        // some key may have expired.
        let expired = if usage.iter().any(|(_, u, _)| u.expiring > 0) {
            expired_by_segment(&self.inner, now)?
        } else {
            HashMap::new()
        };
        usage.sort_by_key(|(id, u, _)| (u.base, *id));
        let mut out = StoreStats::default();
        for (id, u, active) in usage {
            let (bytes, end) = if active {
                let header = SegmentKind::Log.records_start() as u64;
                (header + written.saturating_sub(u.base), written)
            } else {
                (u.bytes, u.end)
            };
            let (gone, gone_keys) = expired.get(&id).map_or((0, 0), |x| (x.bytes, x.keys));
            let live = u.live.saturating_sub(gone).min(bytes);
            let live_keys = u.live_keys.saturating_sub(gone_keys);
            out.keys += live_keys;
            out.live_bytes += live;
            out.dead_bytes += bytes - live;
            out.data_bytes += live.saturating_sub(OP_HEADER_LEN as u64 * live_keys);
            out.segments.push(crate::store::SegmentStats {
                id,
                kind: u.kind,
                active,
                base_position: u.base,
                end_position: end,
                bytes,
                live_bytes: live,
                dead_bytes: bytes - live,
                live_keys,
            });
        }
        let state = self.inner.state.read();
        (out.merges, out.merged_bytes_reclaimed) = state.merges;
        Ok(out)
    }
}

/// What has expired in one segment.
#[derive(Clone, Copy, Debug)]
struct Expired {
    /// Bytes and number of the live operations whose keys have expired.
    bytes: u64,
    keys: u64,
    /// The earliest expiry still ahead, `u64::MAX` if none.
    next: u64,
}

/// Walks the index (a few thousand keys per hold of its lock) for the
/// keys expired at `now`, per segment.
fn expired_by_segment(inner: &Inner, now: u64) -> Result<HashMap<SegmentId, Expired>> {
    let mut out: HashMap<SegmentId, Expired> = HashMap::new();
    let mut cursor: Option<Vec<u8>> = None;
    loop {
        let state = inner.state.read();
        state.check_open()?;
        let mut seen = 0;
        let mut last = None;
        state.keydir.scan_from(
            cursor.as_deref().unwrap_or(&[]),
            cursor.is_some(),
            |key, e| {
                seen += 1;
                if e.expire_ts != 0 {
                    let x = out.entry(e.pointer.segment).or_insert(Expired {
                        bytes: 0,
                        keys: 0,
                        next: u64::MAX,
                    });
                    if e.expire_ts <= now {
                        x.bytes += u64::from(e.pointer.len);
                        x.keys += 1;
                    } else {
                        x.next = x.next.min(e.expire_ts);
                    }
                }
                if seen == 4096 {
                    last = Some(key.to_vec());
                    return false;
                }
                true
            },
        );
        match last {
            Some(k) => cursor = Some(k),
            None => return Ok(out),
        }
    }
}

/// Chooses the runs to merge: adjacent sealed segments that retention lets
/// go (merged segments always; log segments whose whole range is below
/// [`Store::retained_from`]), grouped while their estimated output fits in
/// one segment. `forced` keeps every run that gives anything back;
/// otherwise a run needs a segment past `dead_ratio`, or the store past
/// `space_amplification` and the run giving back a tenth of its bytes.
pub(crate) fn plan(inner: &Inner, forced: bool) -> Result<Vec<Vec<SegmentId>>> {
    let floor = inner.retained_from()?;
    let now = inner.options.clock.now();
    let opts = &inner.options.merge;
    let limit = inner.options.segment_size;
    let mut order: Vec<(SegmentId, Usage, bool)> = {
        let state = inner.state.read();
        state.check_open()?;
        state
            .usage
            .iter()
            .map(|(&id, &u)| {
                let sealed = matches!(
                    state.segments.get(&id).map(|r| &**r),
                    Some(SegmentReader::Sealed(_))
                );
                (id, u, sealed)
            })
            .collect()
    };
    // Expired keys are counted only when some segment has keys that
    // expired since the last count; the count then moves each segment's
    // `first_expiry` to its next expiry, so a workload of keys expiring
    // one by one does not rewrite a segment for each.
    if order.iter().any(|(_, u, _)| u.first_expiry <= now) {
        let expired = expired_by_segment(inner, now)?;
        let mut state = inner.state.write();
        for (id, u, _) in &mut order {
            let x = expired.get(id);
            u.expiring = x.map_or(0, |x| x.bytes);
            u.first_expiry = if u.expiring > 0 { now } else { u64::MAX };
            if let Some(live) = state.usage.get_mut(id) {
                live.first_expiry = x.map_or(u64::MAX, |x| x.next);
            }
        }
    }
    order.sort_by_key(|(id, u, _)| (u.base, *id));
    let total: u64 = order.iter().map(|(_, u, _)| u.bytes).sum();
    let estimate: u64 = order
        .iter()
        .map(|(_, u, sealed)| {
            if *sealed {
                u.merged_estimate(now)
            } else {
                u.bytes
            }
        })
        .sum();
    let crowded = total as f64 > opts.space_amplification * estimate.max(1) as f64;
    let mut runs = Vec::new();
    let mut run: Vec<(SegmentId, Usage)> = Vec::new();
    let mut close = |run: &mut Vec<(SegmentId, Usage)>| {
        let taken = std::mem::take(run);
        let bytes: u64 = taken.iter().map(|(_, u)| u.bytes).sum();
        let out: u64 = taken
            .iter()
            .map(|(_, u)| u.merged_estimate(now))
            .sum::<u64>()
            + SegmentKind::Merged.records_start() as u64;
        let gain = bytes.saturating_sub(out);
        let worth = if forced {
            gain > 0
        } else {
            taken
                .iter()
                .any(|(_, u)| u.reclaimable_ratio(now) >= opts.dead_ratio)
                || (crowded && gain * 10 >= bytes)
        };
        if worth && !taken.is_empty() {
            runs.push(taken.into_iter().map(|(id, _)| id).collect());
        }
    };
    // A segment whose range holds another's start is never planned (see
    // `starts_inside`), so that a damaged store's overlapping segments do
    // not stop every other merge.
    let spans: Vec<(SegmentId, u64, u64, bool)> = order
        .iter()
        .map(|&(id, u, sealed)| (id, u.base, u.end, sealed))
        .collect();
    let mut run_estimate = 0u64;
    for (id, u, sealed) in order {
        let eligible = sealed
            && (u.kind == SegmentKind::Merged || u.end < floor)
            && starts_inside(spans.iter().copied(), &[id], u.base, u.end).is_none();
        let adjacent = run.last().is_none_or(|(_, last)| last.end == u.base);
        if !eligible || !adjacent {
            close(&mut run);
            run_estimate = 0;
            if !eligible {
                continue;
            }
        }
        let e = u.merged_estimate(now);
        if !run.is_empty() && run_estimate + e > limit {
            close(&mut run);
            run_estimate = 0;
        }
        run.push((id, u));
        run_estimate += e;
    }
    close(&mut run);
    Ok(runs)
}

/// The first segment, other than those `excluded`, that starts inside
/// `lo..hi` and may hold something (it is not empty, or it is the active
/// one): the next open would remove it as superseded by a merged segment
/// over `lo..hi`. Only overlapping ranges, in a damaged store opened with
/// `TolerateAnyCorruption`, make one. `segments` gives id, base, end and
/// whether sealed.
fn starts_inside(
    segments: impl IntoIterator<Item = (SegmentId, u64, u64, bool)>,
    excluded: &[SegmentId],
    lo: u64,
    hi: u64,
) -> Option<(SegmentId, u64)> {
    segments
        .into_iter()
        .find(|&(id, base, end, sealed)| {
            !excluded.contains(&id) && lo <= base && base < hi && (base < end || !sealed)
        })
        .map(|(id, base, ..)| (id, base))
}

/// A source segment of a run.
struct Source {
    id: SegmentId,
    reader: Arc<SegmentReader>,
    kind: SegmentKind,
    path: PathBuf,
}

impl Source {
    fn bytes(&self) -> &[u8] {
        self.reader.sealed_bytes().unwrap_or(&[])
    }
}

/// Merges one run; `false` when `run` is not (or no longer) a run of
/// adjacent sealed segments that retention lets go. On error nothing
/// visible has changed (the output, if written, is removed); the run stays
/// as it was. A failure to sync the folder after the rename poisons the
/// store (the commit's outcome is then unknown until reopen).
fn merge_run(
    inner: &Inner,
    run: &[SegmentId],
    respect_retention: bool,
    hook: &mut dyn FnMut(MergeStep) -> bool,
    report: &mut MergeReport,
) -> Result<bool> {
    let fs = &*inner.fs;
    let stopped = || Error::InvalidOptions("merge stopped by its test hook".into());
    if let Some(cause) = inner.commit.poisoned() {
        return Err(Error::Poisoned { cause });
    }
    // Pins may have moved since the run was planned.
    let floor = if respect_retention {
        inner.retained_from()?
    } else {
        u64::MAX
    };
    let run = match Run::take(inner, run, floor)? {
        Taken::Run(run) => run,
        // Segments without records: nothing to merge.
        Taken::Empty => return Ok(true),
        Taken::Invalid => return Ok(false),
        Taken::Overlapped {
            other,
            other_base,
            lo,
            hi,
        } => {
            return Err(Error::corruption(
                other.path_in(&inner.dir),
                0,
                format!(
                    "its log range starts at {other_base}, inside {lo}..{hi}, the range of \
                     the run {run:?}: the run is not merged (log ranges overlap only in a \
                     damaged store)"
                ),
            ));
        }
    };
    let id = inner.allocate_segment_id()?;
    let tmp = id.merging_path_in(&inner.dir);
    let (copied, map, out_len, crc) = match write_output(inner, &run, id, &tmp) {
        Ok(w) => w,
        Err(e) => {
            let _ = fs.remove_file(&tmp);
            return Err(e);
        }
    };
    if !hook(MergeStep::Written) {
        return Err(stopped());
    }
    // Whatever the copy judged from the index must be durable before the
    // output can replace the run: a put the copy dropped because a newer
    // write overwrote it is lost for good if that write is not.
    if let Err(e) = inner.commit.sync_all_written() {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    let path = id.path_in(&inner.dir);
    if let Err(e) = fs
        .rename(&tmp, &path)
        .context(|| format!("rename {} into place", tmp.display()))
    {
        let _ = fs.remove_file(&tmp);
        return Err(e);
    }
    if let Err(e) = sync_dir(&inner.dir, fs) {
        // The rename may or may not be durable: both are consistent on
        // disk, but the table can no longer say which. Reopen decides.
        inner.commit.poison(e.chain());
        return Err(e);
    }
    map.renamed(&path);
    if !hook(MergeStep::Committed) {
        return Err(stopped());
    }
    let before = apply(inner, &run, id, map, &copied, out_len, crc)?;
    report.runs += 1;
    report.segments_merged += run.sources.len();
    report.bytes_before += before;
    report.bytes_after += out_len;
    report.puts_copied += copied.puts;
    report.tombstones_kept += copied.tombstones;
    if !hook(MergeStep::Applied) {
        return Err(stopped());
    }
    Ok(true)
}

/// What [`Run::take`] found.
enum Taken {
    Run(Run),
    /// Adjacent sealed segments holding no records.
    Empty,
    /// Not a run of adjacent sealed segments that retention lets go.
    Invalid,
    /// Segment `other` starts inside the run's range `lo..hi` (ranges of a
    /// damaged store overlap): a merged segment would supersede it.
    Overlapped {
        other: SegmentId,
        other_base: u64,
        lo: u64,
        hi: u64,
    },
}

/// A run as the table has it when its merge starts.
struct Run {
    sources: Vec<Source>,
    /// Start of the log range it covers.
    lo: u64,
    /// End of the log range it covers.
    hi: u64,
    /// Whether it starts the log: no older segment can hold a key, so no
    /// tombstone is needed.
    prefix: bool,
    generation: u64,
}

impl Run {
    /// The run's segments, if they are still adjacent sealed segments of
    /// the table (a concurrent merge or a restore may have changed it since
    /// it was planned) and retention (`floor`) lets every log segment go.
    fn take(inner: &Inner, run: &[SegmentId], floor: u64) -> Result<Taken> {
        let state = inner.state.read();
        state.check_open()?;
        let mut sources = Vec::with_capacity(run.len());
        let mut span: Option<(u64, u64)> = None;
        for id in run {
            let (Some(reader), Some(u)) = (state.segments.get(id), state.usage.get(id)) else {
                return Ok(Taken::Invalid);
            };
            if reader.sealed_bytes().is_none()
                || span.is_some_and(|(_, end)| end != u.base)
                || (u.kind == SegmentKind::Log && u.end >= floor)
            {
                return Ok(Taken::Invalid);
            }
            span = Some((span.map_or(u.base, |s| s.0), u.end));
            sources.push(Source {
                id: *id,
                reader: Arc::clone(reader),
                kind: u.kind,
                path: id.path_in(&inner.dir),
            });
        }
        // An empty range (segments without records) has nothing to merge;
        // a merged segment covering it would sort beside the log segment
        // starting at the same position.
        let Some((lo, hi)) = span else {
            return Ok(Taken::Invalid);
        };
        if lo == hi {
            return Ok(Taken::Empty);
        }
        // The log ranges of a damaged store opened with
        // `TolerateAnyCorruption` may overlap. The next open removes every
        // segment that starts inside a merged segment's range, so a run
        // whose range holds another segment's start would lose that
        // segment's data: refused.
        let spans = state.usage.iter().map(|(&id, u)| {
            let sealed = state
                .segments
                .get(&id)
                .is_some_and(|r| r.sealed_bytes().is_some());
            (id, u.base, u.end, sealed)
        });
        if let Some((other, other_base)) = starts_inside(spans, run, lo, hi) {
            return Ok(Taken::Overlapped {
                other,
                other_base,
                lo,
                hi,
            });
        }
        let oldest = state.usage.values().map(|u| u.base).min();
        Ok(Taken::Run(Run {
            sources,
            lo,
            hi,
            prefix: oldest == Some(lo),
            generation: inner.generation.load(Ordering::Acquire),
        }))
    }
}

/// Writes the merged segment to `tmp` and syncs it; returns what was
/// copied, its read-only map, its length and CRC.
fn write_output<'a>(
    inner: &Inner,
    run: &'a Run,
    id: SegmentId,
    tmp: &std::path::Path,
) -> Result<(Copied<'a>, SealedSegment, u64, u32)> {
    let (kept, applied) = collect(inner, run)?;
    let mut out = Output::create(tmp, &*inner.fs, inner.options.merge.bytes_per_second)?;
    out.put(
        &SegmentHeader {
            kind: SegmentKind::Merged,
            id,
            base_position: run.lo,
        }
        .encode(),
    )?;
    out.put(
        &MergeHeader {
            end_position: run.hi,
            applied,
        }
        .encode(),
    )?;
    let mut copied = Copied::default();
    let mut block = MergedBuilder::default();
    let mut pending: Vec<Placed<'a>> = Vec::new();
    for mut p in kept {
        if p.action == Action::Forget {
            copied.forgotten.push(p);
            continue;
        }
        let len = p.entry.len as usize;
        if block.len() + MergedBuilder::entry_len(len) > MERGED_BLOCK_BYTES && !block.is_empty() {
            copied.flush(&mut out, &mut block, &mut pending)?;
            if inner.merge_abort.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
        }
        let cn = p.entry.change_number;
        p.entry.offset = if p.action == Action::Tombstone {
            block.push_delete(cn, p.entry.key)
        } else {
            let from = p.from as usize;
            block.push(cn, &run.sources[p.source].bytes()[from..from + len])
        };
        match p.entry.kind {
            OpKind::Put => copied.puts += 1,
            OpKind::Delete => {
                copied.tombstones += 1;
                copied.tombstone_bytes += u64::from(p.entry.len);
            }
        }
        pending.push(p);
    }
    if !block.is_empty() {
        copied.flush(&mut out, &mut block, &mut pending)?;
    }
    out.finish()?;
    // Mapped before the commit, so nothing after the commit can fail.
    let map = SealedSegment::open(tmp)?;
    let crc = out.crc.clone().finalize();
    Ok((copied, map, out.len as u64, crc))
}

/// Reads the run twice: first for the newest delete of each key and the
/// highest applied number, then to keep (in key order, one per key) every
/// put the index still points at (an expired one as a tombstone, unless
/// the run starts the log) and every newest delete that may still hide an
/// older value.
fn collect<'a>(inner: &Inner, run: &'a Run) -> Result<(Vec<Placed<'a>>, u64)> {
    let mut newest_delete: HashMap<&[u8], u64> = HashMap::new();
    let mut applied = 0u64;
    for s in &run.sources {
        if s.kind == SegmentKind::Merged {
            let m = MergeHeader::decode(s.bytes())
                .map_err(|e| Error::corruption(s.path.clone(), 0, e.to_string()))?;
            applied = applied.max(m.applied);
        }
        for_each_record(s, |_, record| {
            if let Some(a) = record.applied {
                applied = applied.max(a);
            }
            if !run.prefix {
                for (_, cn, op) in record.entries() {
                    if op.kind == OpKind::Delete {
                        let e = newest_delete.entry(op.key).or_default();
                        *e = (*e).max(cn);
                    }
                }
            }
            Ok(())
        })?;
    }
    let mut kept: Vec<Placed<'a>> = Vec::new();
    for (si, s) in run.sources.iter().enumerate() {
        for_each_record(s, |at, record| {
            if inner.merge_abort.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            let state = inner.state.read();
            state.check_open()?;
            for (off, cn, op) in record.entries() {
                let offset = at + off as usize;
                let len = (OP_HEADER_LEN + op.key.len() + op.value.len()) as u32;
                let mut placed = Placed {
                    source: si,
                    from: offset as u32,
                    from_len: len,
                    entry: HintEntry {
                        kind: op.kind,
                        key: op.key,
                        offset: 0,
                        len,
                        expire_ts: op.expire_ts,
                        change_number: cn,
                    },
                    action: Action::Copy,
                };
                match op.kind {
                    OpKind::Put => {
                        let here = RecordPointer {
                            segment: s.id,
                            offset: offset as u32,
                            len,
                        };
                        if state.keydir.get(op.key).is_none_or(|e| e.pointer != here) {
                            continue;
                        }
                        if inner.options.clock.is_expired(op.expire_ts) {
                            // Dropping it could bring back an older value of
                            // the key from a segment before the run.
                            placed.action = if run.prefix {
                                Action::Forget
                            } else {
                                Action::Tombstone
                            };
                            placed.entry = HintEntry {
                                kind: OpKind::Delete,
                                len: (OP_HEADER_LEN + op.key.len()) as u32,
                                expire_ts: 0,
                                ..placed.entry
                            };
                        }
                        kept.push(placed);
                    }
                    OpKind::Delete => {
                        let needed = !run.prefix
                            && newest_delete.get(op.key) == Some(&cn)
                            && state
                                .keydir
                                .get(op.key)
                                .is_none_or(|e| e.change_number < cn);
                        if needed {
                            kept.push(placed);
                        }
                    }
                }
            }
            Ok(())
        })?;
    }
    // One operation per key (a live put has no newer delete, and only the
    // newest delete of a key stays); should two remain, the newer wins. Key
    // order lets open read the output without a hint or a sort, and keeps neighbouring keys'
    // values together for range scans.
    kept.sort_by(|a, b| {
        a.entry
            .key
            .cmp(b.entry.key)
            .then(a.entry.change_number.cmp(&b.entry.change_number))
    });
    kept.dedup_by(|later, earlier| {
        let same = later.entry.key == earlier.entry.key;
        if same {
            std::mem::swap(later, earlier);
        }
        same
    });
    Ok((kept, applied))
}

/// Points the index at the output, a few hundred keys per hold of its
/// lock (an expired put written as a tombstone leaves the index); then
/// swaps the run out of the table. Returns the run's bytes.
fn apply(
    inner: &Inner,
    run: &Run,
    id: SegmentId,
    map: SealedSegment,
    copied: &Copied<'_>,
    out_len: u64,
    crc: u32,
) -> Result<u64> {
    {
        let mut state = inner.state.write();
        if state.check_open().is_err() || inner.generation.load(Ordering::Acquire) != run.generation
        {
            // The folder's contents were replaced meanwhile (close and
            // restore wait for a running merge, so this guards a bug).
            return Err(Error::Closed);
        }
        state
            .segments
            .insert(id, Arc::new(SegmentReader::Sealed(map)));
        let mut u = Usage::new(SegmentKind::Merged, run.lo, run.hi, out_len);
        u.tombstones = copied.tombstone_bytes;
        state.usage.insert(id, u);
    }
    let all = copied
        .placed
        .iter()
        .chain(&copied.forgotten)
        .collect::<Vec<_>>();
    for chunk in all.chunks(RELOCATIONS_PER_LOCK) {
        let mut state = inner.state.write();
        for p in chunk {
            if p.entry.kind == OpKind::Delete && p.action == Action::Copy {
                continue;
            }
            let from = RecordPointer {
                segment: run.sources[p.source].id,
                offset: p.from,
                len: p.from_len,
            };
            if p.action != Action::Copy {
                state.drop_if_at(p.entry.key, from);
            } else {
                let to = RecordPointer {
                    segment: id,
                    offset: p.entry.offset,
                    len: p.entry.len,
                };
                state.relocate(p.entry.key, from, to);
            }
        }
    }
    let mut retired = Vec::with_capacity(run.sources.len());
    let before = {
        let mut state = inner.state.write();
        let mut before = 0;
        let keep_for_views = !state.views.is_empty();
        let before_view = state.next_view;
        for s in &run.sources {
            before += state.usage.remove(&s.id).map_or(0, |u| u.bytes);
            if let Some(r) = state.segments.remove(&s.id) {
                r.retire(Arc::clone(&inner.fs));
                if keep_for_views {
                    state.retired.push(Retired {
                        before_view,
                        id: s.id,
                        reader: Arc::clone(&r),
                    });
                }
                retired.push(r);
            }
        }
        state.changes.forget_below(run.hi);
        state.merges.0 += 1;
        state.merges.1 += before.saturating_sub(out_len);
        before
    };
    // Unlinked (when this was the last reader) outside the index lock.
    drop(retired);
    let mut crcs = inner.sealed_crcs.lock();
    crcs.insert(id, (out_len, crc));
    for s in &run.sources {
        crcs.remove(&s.id);
    }
    Ok(before)
}

/// An operation copied into the output.
struct Placed<'a> {
    /// Index of its source segment in the run.
    source: usize,
    /// Its offset and length in the source.
    from: u32,
    from_len: u32,
    /// Its index entry; `offset` is its offset in the output (in its block
    /// until the block is written).
    entry: HintEntry<'a>,
    /// What becomes of it.
    action: Action,
}

/// What a merge does with an operation it keeps track of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Copied as it is.
    Copy,
    /// An expired put, written as a tombstone (it may hide an older value
    /// before the run); its key leaves the index.
    Tombstone,
    /// An expired put in a run that starts the log: not written; its key
    /// leaves the index.
    Forget,
}

/// What the copy wrote.
#[derive(Default)]
struct Copied<'a> {
    placed: Vec<Placed<'a>>,
    /// Expired puts left out of a run that starts the log.
    forgotten: Vec<Placed<'a>>,
    puts: u64,
    tombstones: u64,
    tombstone_bytes: u64,
}

impl<'a> Copied<'a> {
    /// Writes a finished block and records where its operations landed.
    fn flush(
        &mut self,
        out: &mut Output<'_>,
        block: &mut MergedBuilder,
        pending: &mut Vec<Placed<'a>>,
    ) -> Result<()> {
        let start = out.len;
        if start + block.len() > u32::MAX as usize {
            return Err(Error::InvalidOptions(
                "merge output would exceed 4 GiB; lower segment_size".into(),
            ));
        }
        out.put(block.finish())?;
        block.clear();
        for mut p in pending.drain(..) {
            p.entry.offset += start as u32;
            self.placed.push(p);
        }
        Ok(())
    }
}

/// Calls `f` with each record of a sealed segment and its file offset.
fn for_each_record<'a>(
    s: &'a Source,
    mut f: impl FnMut(usize, crate::format::Record<'a>) -> Result<()>,
) -> Result<()> {
    let bytes = s.bytes();
    let expected = match s.kind {
        SegmentKind::Log => RecordKind::Batch,
        SegmentKind::Merged => RecordKind::Merged,
    };
    let mut at = s.kind.records_start().min(bytes.len());
    while at < bytes.len() {
        let rest = &bytes[at..];
        match decode_record(rest) {
            Ok(r) if r.header.kind == expected => {
                f(at, r)?;
                at += r.header.record_len() as usize;
            }
            // The zero tail of a segment sealed by a crash before its
            // truncation.
            _ if rest.iter().all(|&b| b == 0) => break,
            Ok(_) => {
                return Err(Error::corruption(
                    s.path.clone(),
                    at as u64,
                    "record of the wrong kind for its segment",
                ));
            }
            Err(e) => return Err(Error::corruption(s.path.clone(), at as u64, e.to_string())),
        }
    }
    Ok(())
}

/// The merge output file: buffered, checksummed, paced.
struct Output<'a> {
    file: File,
    path: PathBuf,
    buf: Vec<u8>,
    /// Bytes put so far.
    len: usize,
    /// Bytes written to the file so far.
    written: u64,
    crc: crc32fast::Hasher,
    fs: &'a dyn FileSystem,
    bytes_per_second: u64,
    started: Instant,
}

impl<'a> Output<'a> {
    fn create(
        path: &std::path::Path,
        fs: &'a dyn FileSystem,
        bytes_per_second: u64,
    ) -> Result<Self> {
        let file = fs
            .create(path, true)
            .context(|| format!("create {}", path.display()))?;
        Ok(Output {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(WRITE_CHUNK + MERGED_BLOCK_BYTES),
            len: 0,
            written: 0,
            crc: crc32fast::Hasher::new(),
            fs,
            bytes_per_second,
            started: Instant::now(),
        })
    }

    fn put(&mut self, bytes: &[u8]) -> Result<()> {
        self.buf.extend_from_slice(bytes);
        self.crc.update(bytes);
        self.len += bytes.len();
        if self.buf.len() >= WRITE_CHUNK {
            self.write_out()?;
        }
        Ok(())
    }

    fn write_out(&mut self) -> Result<()> {
        self.fs
            .write_at(&self.file, &self.buf, self.written)
            .context(|| format!("write {}", self.path.display()))?;
        self.written += self.buf.len() as u64;
        self.buf.clear();
        if self.bytes_per_second > 0 {
            let due = Duration::from_secs_f64(self.len as f64 / self.bytes_per_second as f64);
            if let Some(wait) = due.checked_sub(self.started.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        Ok(())
    }

    fn finish(&mut self) -> Result<()> {
        self.write_out()?;
        self.fs
            .sync_data(&self.file)
            .context(|| format!("sync {}", self.path.display()))
    }
}

/// The background merge thread: checks the thresholds every
/// `check_interval` and whenever a segment is sealed.
pub(crate) struct Merger {
    signal: Arc<(Mutex<Signal>, Condvar)>,
    handle: JoinHandle<()>,
}

#[derive(Default)]
struct Signal {
    stop: bool,
    wake: bool,
}

impl Merger {
    pub(crate) fn start(inner: Weak<Inner>) -> Merger {
        let signal = Arc::new((Mutex::new(Signal::default()), Condvar::new()));
        let theirs = Arc::clone(&signal);
        let every = inner
            .upgrade()
            .map_or(Duration::from_secs(10), |i| i.options.merge.check_interval);
        let handle = std::thread::Builder::new()
            .name("dkv-cask-merge".into())
            .spawn(move || {
                let (lock, cv) = &*theirs;
                loop {
                    {
                        let mut s = lock.lock();
                        if !s.wake && !s.stop {
                            cv.wait_for(&mut s, every);
                        }
                        if s.stop {
                            break;
                        }
                        s.wake = false;
                    }
                    let Some(inner) = inner.upgrade() else { break };
                    // Failures are counted and retried at the next check;
                    // a merge error never changes what the store holds.
                    if let Ok(runs) = plan(&inner, false) {
                        for run in runs {
                            let _merging = inner.merge_lock.lock();
                            if inner.merge_abort.load(Ordering::Acquire) {
                                break;
                            }
                            let mut report = MergeReport::default();
                            if merge_run(&inner, &run, true, &mut |_| true, &mut report).is_err() {
                                inner.merge_failures.fetch_add(1, Ordering::Relaxed);
                                break;
                            }
                        }
                    }
                }
            })
            .expect("spawn the merge thread");
        Merger { signal, handle }
    }

    /// Asks for a threshold check now.
    pub(crate) fn wake(&self) {
        self.signal.0.lock().wake = true;
        self.signal.1.notify_all();
    }

    pub(crate) fn stop(self) {
        self.signal.0.lock().stop = true;
        self.signal.1.notify_all();
        let _ = self.handle.join();
    }
}
