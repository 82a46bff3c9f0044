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
//! 5. Write the hint file. The run's files are unlinked when the last
//!    reader of each lets go of it.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use crate::error::{Error, IoContext, Result};
use crate::format::{
    HintBuilder, HintEntry, HintHeader, MergeHeader, MergedBuilder, OP_HEADER_LEN, OpKind,
    RecordKind, SegmentHeader, SegmentKind, decode_record, op_key,
};
use crate::keydir::RecordPointer;
use crate::log::{IoPoint, SealedSegment, SegmentId, check_fault, sync_dir};
use crate::store::usage::MERGED_BLOCK_BYTES;
use crate::store::{Inner, Retired, SegmentReader, Store, StoreStats, Usage};

/// Index updates applied per hold of the index lock.
const RELOCATIONS_PER_LOCK: usize = 2048;
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
        for run in plan(&self.inner, true)? {
            let _merging = self.inner.merge_lock.lock();
            merge_run(&self.inner, &run, hook, &mut report)?;
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
        merge_run(&self.inner, run, hook, &mut report)?;
        if report.runs == 0 {
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
        let mut expired: HashMap<SegmentId, (u64, u64)> = HashMap::new();
        if usage.iter().any(|(_, u, _)| u.first_expiry <= now) {
            let mut cursor: Option<Vec<u8>> = None;
            loop {
                let state = self.inner.state.read();
                state.check_open()?;
                let mut seen = 0;
                let mut last = None;
                state.keydir.scan_from(
                    cursor.as_deref().unwrap_or(&[]),
                    cursor.is_some(),
                    |key, e| {
                        seen += 1;
                        if e.expire_ts != 0 && e.expire_ts <= now {
                            let x = expired.entry(e.pointer.segment).or_default();
                            x.0 += u64::from(e.pointer.len);
                            x.1 += 1;
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
                    None => break,
                }
            }
        }
        usage.sort_by_key(|(id, u, _)| (u.base, *id));
        let mut out = StoreStats::default();
        for (id, u, active) in usage {
            let (bytes, end) = if active {
                let header = SegmentKind::Log.records_start() as u64;
                (header + written.saturating_sub(u.base), written)
            } else {
                (u.bytes, u.end)
            };
            let (gone, gone_keys) = expired.get(&id).copied().unwrap_or_default();
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
    let state = inner.state.read();
    state.check_open()?;
    let mut order: Vec<(SegmentId, Usage, bool)> = state
        .usage
        .iter()
        .map(|(&id, &u)| {
            let sealed = matches!(
                state.segments.get(&id).map(|r| &**r),
                Some(SegmentReader::Sealed(_))
            );
            (id, u, sealed)
        })
        .collect();
    drop(state);
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
    let mut run_estimate = 0u64;
    for (id, u, sealed) in order {
        let eligible = sealed && (u.kind == SegmentKind::Merged || u.end < floor);
        if !eligible {
            close(&mut run);
            run_estimate = 0;
            continue;
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

/// Merges one run. On error nothing visible has changed (the output, if
/// written, is removed); the run stays as it was.
fn merge_run(
    inner: &Inner,
    run: &[SegmentId],
    hook: &mut dyn FnMut(MergeStep) -> bool,
    report: &mut MergeReport,
) -> Result<()> {
    let faults = inner.options.fault_injector.as_deref();
    let stopped = || Error::InvalidOptions("merge stopped by its test hook".into());
    // The run as the table has it now (a concurrent merge or a restore may
    // have changed it since it was planned).
    let (sources, lo, hi, prefix, generation) = {
        let state = inner.state.read();
        state.check_open()?;
        let mut sources = Vec::with_capacity(run.len());
        let mut span: Option<(u64, u64)> = None;
        for id in run {
            let (Some(reader), Some(u)) = (state.segments.get(id), state.usage.get(id)) else {
                return Ok(());
            };
            if reader.sealed_bytes().is_none() || span.is_some_and(|(_, end)| end != u.base) {
                return Ok(());
            }
            span = Some((span.map_or(u.base, |s| s.0), u.end));
            sources.push(Source {
                id: *id,
                reader: Arc::clone(reader),
                kind: u.kind,
                path: id.path_in(&inner.dir),
            });
        }
        let Some((lo, hi)) = span else { return Ok(()) };
        let oldest = state.usage.values().map(|u| u.base).min();
        (
            sources,
            lo,
            hi,
            oldest == Some(lo),
            inner.generation.load(Ordering::Acquire),
        )
    };
    let id = inner.allocate_segment_id()?;

    // Pass 1: the newest delete of each key in the run (a tombstone is
    // needed only while an older segment survives: never for a run that
    // starts the log), and the highest applied number.
    let mut newest_delete: HashMap<&[u8], u64> = HashMap::new();
    let mut applied = 0u64;
    for s in &sources {
        let bytes = s.bytes();
        if s.kind == SegmentKind::Merged {
            let m = MergeHeader::decode(bytes)
                .map_err(|e| Error::corruption(s.path.clone(), 0, e.to_string()))?;
            applied = applied.max(m.applied);
        }
        for_each_record(s, |_, record| {
            if let Some(a) = record.applied {
                applied = applied.max(a);
            }
            if !prefix {
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

    // Pass 2: copy what is live into the output.
    let tmp = id.merging_path_in(&inner.dir);
    let mut out = Output::create(&tmp, faults, inner.options.merge.bytes_per_second)?;
    let written = (|| -> Result<Copied> {
        out.put(
            &SegmentHeader {
                kind: SegmentKind::Merged,
                id,
                base_position: lo,
            }
            .encode(),
        )?;
        out.put(
            &MergeHeader {
                end_position: hi,
                applied,
            }
            .encode(),
        )?;
        // What stays, then sorted by key: the output (and its hint) is in key
        // order, so a range scan over merged data reads neighbouring bytes.
        let mut kept: Vec<Placed<'_>> = Vec::new();
        for (si, s) in sources.iter().enumerate() {
            for_each_record(s, |at, record| {
                if inner.merge_abort.load(Ordering::Acquire) {
                    return Err(Error::Closed);
                }
                let state = inner.state.read();
                state.check_open()?;
                for (off, cn, op) in record.entries() {
                    let offset = at + off as usize;
                    let len = OP_HEADER_LEN + op.key.len() + op.value.len();
                    let keep = match op.kind {
                        OpKind::Put => {
                            let here = RecordPointer {
                                segment: s.id,
                                offset: offset as u32,
                                len: len as u32,
                            };
                            !inner.options.clock.is_expired(op.expire_ts)
                                && state.keydir.get(op.key).is_some_and(|e| e.pointer == here)
                        }
                        OpKind::Delete => {
                            !prefix
                                && newest_delete.get(op.key) == Some(&cn)
                                && state
                                    .keydir
                                    .get(op.key)
                                    .is_none_or(|e| e.change_number < cn)
                        }
                    };
                    if keep {
                        kept.push(Placed {
                            source: si,
                            from: offset as u32,
                            entry: HintEntry {
                                kind: op.kind,
                                key: op.key,
                                offset: 0,
                                len: len as u32,
                                expire_ts: op.expire_ts,
                                change_number: cn,
                            },
                        });
                    }
                }
                Ok(())
            })?;
        }
        // One operation per key: a live put has no newer delete, and only
        // the newest delete of a key is kept; should two remain, the newer
        // wins.
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
        let mut copied = Copied::default();
        let mut block = MergedBuilder::default();
        let mut pending: Vec<Placed<'_>> = Vec::new();
        for mut p in kept {
            let len = p.entry.len as usize;
            if block.len() + MergedBuilder::entry_len(len) > MERGED_BLOCK_BYTES && !block.is_empty()
            {
                let start = out.len;
                out.put(block.finish())?;
                block.clear();
                copied.place(start, &mut pending);
                if inner.merge_abort.load(Ordering::Acquire) {
                    return Err(Error::Closed);
                }
            }
            let from = p.from as usize;
            let op = &sources[p.source].bytes()[from..from + len];
            p.entry.offset = block.push(p.entry.change_number, op);
            match p.entry.kind {
                OpKind::Put => copied.puts += 1,
                OpKind::Delete => {
                    copied.tombstones += 1;
                    copied.tombstone_bytes += len as u64;
                }
            }
            pending.push(p);
        }
        if !block.is_empty() {
            let start = out.len;
            out.put(block.finish())?;
            copied.place(start, &mut pending);
        }
        out.finish()?;
        if out.len as u64 > u64::from(u32::MAX) {
            return Err(Error::InvalidOptions(
                "merge output would exceed 4 GiB; lower segment_size".into(),
            ));
        }
        let mut hint = HintBuilder::new(&HintHeader {
            kind: SegmentKind::Merged,
            segment: id,
            segment_len: out.len as u64,
            base_position: lo,
            end_position: hi,
            applied,
            segment_crc: out.crc.clone().finalize(),
        });
        for p in &copied.placed {
            hint.push(&p.entry);
        }
        copied.hint = hint.finish(&[]);
        Ok(copied)
    })();
    let copied = match written {
        Ok(c) if hook(MergeStep::Written) => c,
        Ok(_) => return Err(stopped()),
        Err(e) => {
            drop(out);
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let path = id.path_in(&inner.dir);
    let committed = check_fault(faults, IoPoint::Create)
        .and_then(|()| fs::rename(&tmp, &path))
        .context(|| format!("rename {} into place", tmp.display()))
        .and_then(|()| sync_dir(&inner.dir, faults));
    if let Err(e) = committed {
        // Whether the rename is durable is unknown; either way the output
        // and the run hold the same keyspace. Drop the output so the table
        // and the folder agree.
        let _ = fs::remove_file(&tmp);
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    if !hook(MergeStep::Committed) {
        return Err(stopped());
    }

    // Apply: the output joins the table, then the index moves to it.
    let merged = Arc::new(SegmentReader::Sealed(SealedSegment::open(&path)?));
    let file_len = out.len as u64;
    let crc = out.crc.clone().finalize();
    {
        let mut state = inner.state.write();
        if state.check_open().is_err() || inner.generation.load(Ordering::Acquire) != generation {
            // The folder's contents were replaced meanwhile: this output
            // belongs to no store. The new contents never held its id's
            // file, and its name came from the old folder's id counter.
            return Err(Error::Closed);
        }
        state.segments.insert(id, Arc::clone(&merged));
        let mut u = Usage::new(SegmentKind::Merged, lo, hi, file_len);
        u.tombstones = copied.tombstone_bytes;
        state.usage.insert(id, u);
    }
    for chunk in copied.placed.chunks(RELOCATIONS_PER_LOCK) {
        let mut state = inner.state.write();
        for p in chunk {
            if p.entry.kind != OpKind::Put {
                continue;
            }
            let s = &sources[p.source];
            let Some(key) = s.bytes().get(p.from as usize..).and_then(op_key) else {
                continue;
            };
            let from = RecordPointer {
                segment: s.id,
                offset: p.from,
                len: p.entry.len,
            };
            let to = RecordPointer {
                segment: id,
                offset: p.entry.offset,
                len: p.entry.len,
            };
            state.relocate(key, from, to);
        }
    }
    let before: u64 = {
        let mut state = inner.state.write();
        let mut before = 0;
        let keep_for_views = !state.views.is_empty();
        let before_view = state.next_view;
        for s in &sources {
            before += state.usage.remove(&s.id).map_or(0, |u| u.bytes);
            if let Some(r) = state.segments.remove(&s.id) {
                r.retire();
                if keep_for_views {
                    state.retired.push(Retired {
                        before_view,
                        id: s.id,
                        reader: r,
                    });
                }
            }
        }
        state.changes.forget_below(hi);
        state.merges.0 += 1;
        state.merges.1 += before.saturating_sub(file_len);
        before
    };
    {
        let mut crcs = inner.sealed_crcs.lock();
        crcs.insert(id, (file_len, crc));
        for s in &sources {
            crcs.remove(&s.id);
        }
    }
    report.runs += 1;
    report.segments_merged += sources.len();
    report.bytes_before += before;
    report.bytes_after += file_len;
    report.puts_copied += copied.puts;
    report.tombstones_kept += copied.tombstones;
    if !hook(MergeStep::Applied) {
        return Err(stopped());
    }
    // A cache: a failure only means the next open scans the segment.
    let _ = crate::hint::write(&inner.dir, id, &copied.hint);
    Ok(())
}

/// An operation copied into the output.
struct Placed<'a> {
    /// Index of its source segment in the run.
    source: usize,
    /// Its offset in the source.
    from: u32,
    /// Its hint entry; `offset` is its offset in the output (in its block
    /// until the block is written).
    entry: HintEntry<'a>,
}

/// What pass 2 copied.
#[derive(Default)]
struct Copied<'a> {
    placed: Vec<Placed<'a>>,
    puts: u64,
    tombstones: u64,
    tombstone_bytes: u64,
    hint: Vec<u8>,
}

impl<'a> Copied<'a> {
    /// Records where the operations of a block written at `block_start`
    /// landed.
    fn place(&mut self, block_start: usize, pending: &mut Vec<Placed<'a>>) {
        for mut p in pending.drain(..) {
            p.entry.offset += block_start as u32;
            self.placed.push(p);
        }
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
    crc: crc32fast::Hasher,
    faults: Option<&'a crate::log::FaultInjector>,
    bytes_per_second: u64,
    started: Instant,
}

impl<'a> Output<'a> {
    fn create(
        path: &std::path::Path,
        faults: Option<&'a crate::log::FaultInjector>,
        bytes_per_second: u64,
    ) -> Result<Self> {
        let file = check_fault(faults, IoPoint::Create)
            .and_then(|()| OpenOptions::new().write(true).create_new(true).open(path))
            .context(|| format!("create {}", path.display()))?;
        Ok(Output {
            file,
            path: path.to_path_buf(),
            buf: Vec::with_capacity(WRITE_CHUNK + MERGED_BLOCK_BYTES),
            len: 0,
            crc: crc32fast::Hasher::new(),
            faults,
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
        check_fault(self.faults, IoPoint::MergeWrite)
            .and_then(|()| self.file.write_all(&self.buf))
            .context(|| format!("write {}", self.path.display()))?;
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
        check_fault(self.faults, IoPoint::Sync)
            .and_then(|()| self.file.sync_data())
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
                            if merge_run(&inner, &run, &mut |_| true, &mut report).is_err() {
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
