//! The store handle and the DKV interfaces it implements. It owns the write
//! path (validate, encode outside any lock, append under the writer lock,
//! publish to the index, wait for group commit), the read paths, and the
//! lifecycle (open, close). Byte layouts live in `format`, file handling in
//! `log`, rebuilding in `recovery`.
//!
//! Locks, in the order they may be taken:
//! 1. `Inner::writer` (the active segment): serialises appends, rollovers,
//!    compare-and-set and close.
//! 2. `Inner::state` (the index and the segment table): readers share it;
//!    writers take it exclusively only to publish a record's keys.
//! 3. `GroupCommit`'s own mutex, for sync election only.
//!
//! Readers never wait for an `fdatasync`: syncs run with no lock held.

pub(crate) mod usage;
mod write;

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::error::{Error, IoContext, Result};
use crate::format::{OP_HEADER_LEN, RecordBuilder, SEGMENT_HEADER_LEN, SegmentKind, decode_op};
use crate::iter::{Iter, IterationOptions, PairRef};
use crate::keydir::{KeyDir, KeyEntry, RecordPointer};
use crate::log::{
    ActiveMap, ActiveSegment, DirLock, FileSystem, GroupCommit, SealedSegment, SegmentId,
    SegmentPlan, Spare, prefetch, sync_dir,
};
use crate::metrics::Op;
use crate::options::{Clock, MAX_KEY_LEN, MAX_VALUE_LEN, Options, SyncMode};
use crate::recovery::{self, RecoveryReport};
use crate::replication::ChangeIndex;
use crate::serverpb::{CompareAndSetRequest, KvPair};
pub(crate) use usage::Usage;
pub use usage::{SegmentStats, StoreStats};
use write::WriteQueue;
pub(crate) use write::{OpMeta, WriteKind, WriteOp};

/// DKV's `KVStore`, translated to Rust.
///
/// Keys are non-empty byte strings; expiry is absolute Unix seconds, 0 for
/// never, and a key is expired once `expire_ts <= now`. Expired keys behave
/// as absent everywhere.
pub trait KvStore {
    /// Writes all `pairs` atomically: after a crash all or none of them are
    /// visible. An empty batch writes nothing.
    fn put(&self, pairs: &[KvPair]) -> Result<()>;

    /// Looks up `keys`; missing and expired keys are omitted, found ones come
    /// in request order (with their expiry). An empty value is a value.
    fn get(&self, keys: &[&[u8]]) -> Result<Vec<KvPair>>;

    /// Deletes `key`; deleting a missing key succeeds.
    fn delete(&self, key: &[u8]) -> Result<()>;

    /// Atomically replaces the key's value with `new_value` (and expiry
    /// `expire_ts`) if its current value equals `old_value`; an empty
    /// `old_value` means "create only if absent" (expired counts as absent).
    /// Returns whether the swap happened.
    fn compare_and_set(&self, request: &CompareAndSetRequest) -> Result<bool>;

    /// Iterates live keys in ascending order, after validating `options`.
    fn iterate(
        &self,
        options: &IterationOptions,
    ) -> Result<Box<dyn Iterator<Item = Result<KvPair>> + Send>>;

    /// A point-in-time stream of the whole keyspace (DKV's `GetSnapshot`);
    /// its format is in DESIGN.md. Writers are not held up while it is
    /// read, and memory stays bounded by the writes made meanwhile.
    fn get_snapshot(&self) -> Result<Box<dyn std::io::Read + Send>>;

    /// Replaces the whole keyspace, and the change-number state, with a
    /// stream made by `get_snapshot` (DKV's `PutSnapshot`). The stream is
    /// verified completely first; a malformed one changes nothing.
    fn put_snapshot(&self, reader: &mut dyn std::io::Read) -> Result<()>;

    /// Flushes and syncs everything written, releases the directory lock and
    /// reports any error. Later calls fail with [`Error::Closed`].
    fn close(&self) -> Result<()>;
}

/// An open dkv-cask store. Dropping it closes it on a best-effort basis;
/// call [`close`](KvStore::close) to see errors.
pub struct Store {
    pub(crate) inner: Arc<Inner>,
}

/// The shared state behind a [`Store`] and its iterators.
pub(crate) struct Inner {
    pub(crate) dir: PathBuf,
    pub(crate) options: Options,
    /// Where every change on disk goes: `options.io()`.
    pub(crate) fs: Arc<dyn FileSystem>,
    /// The directory lock; taken out by `close`.
    lock: Mutex<Option<DirLock>>,
    /// Writers waiting for a leader (see `write`); taken before lock 1.
    queue: WriteQueue,
    /// Lock 1: the append position and the active segment.
    writer: Mutex<Writer>,
    /// Lock 2: the index and the segment table.
    pub(crate) state: RwLock<State>,
    pub(crate) commit: GroupCommit,
    /// The master's change number reached by applied changes (replication).
    pub(crate) applied: AtomicU64,
    /// Serialises `save_changes` calls, so a change is never applied twice.
    pub(crate) applier: Mutex<()>,
    /// Followers' pins: name → the first change number each still needs.
    pub(crate) pins: Mutex<std::collections::BTreeMap<String, u64>>,
    /// Length and CRC-32 of sealed segments, known from sealing them or
    /// from reading them once (backups need them).
    pub(crate) sealed_crcs: Mutex<std::collections::HashMap<SegmentId, (u64, u32)>>,
    /// Set while a backup, restore or snapshot load runs.
    pub(crate) global_mutation: AtomicBool,
    /// Latency and errors per operation, when metrics are on.
    pub(crate) stat: std::sync::OnceLock<Arc<crate::metrics::Stat>>,
    /// The registered collectors, taken out by `close`.
    metrics: Mutex<Option<crate::metrics::StoreMetrics>>,
    /// Records appended since open.
    pub(crate) records_written: AtomicU64,
    /// Bytes of the records whose pairs gets, scans, iterators and
    /// snapshots handed out since open (see [`Inner::count_read`]).
    pub(crate) read_bytes: AtomicU64,
    /// The log position at open.
    pub(crate) opened_at: u64,
    closed: AtomicBool,
    pub(crate) report: RecoveryReport,
    /// The last rebuild of the index (open, or a swap of the folder's
    /// contents) skipped damaged ranges: close saves no keydir file, so
    /// that each open reads the segments again and reports them.
    damage_skipped: AtomicBool,
    /// The interval syncer, when `SyncMode::Interval`.
    syncer: Mutex<Option<Syncer>>,
    /// Held by a running merge; taken by whatever replaces the folder's
    /// contents (restore, snapshot load) and by close, after setting
    /// `merge_abort`, so that no merge outlives the files it reads.
    pub(crate) merge_lock: Mutex<()>,
    /// Asks a running merge to stop at its next block.
    pub(crate) merge_abort: AtomicBool,
    /// The background merge thread, when `MergeOptions::automatic`.
    merger: Mutex<Option<crate::merge::Merger>>,
    /// Background jobs (hint files) that close waits for.
    background: Mutex<Vec<JoinHandle<()>>>,
    /// Raised each time the folder's contents are replaced in place, so a
    /// background job started before does not write into the new contents.
    pub(crate) generation: Arc<AtomicU64>,
    /// Background merges that failed (retried at the next check).
    pub(crate) merge_failures: AtomicU64,
}

struct Writer {
    active: ActiveSegment,
    /// The records of one group, written with one `pwrite`.
    buffer: Vec<u8>,
    /// Id of the next segment: above every segment file seen, including
    /// ones recovery skipped.
    next_segment: SegmentId,
    /// The next segment's file, zero-filled in the background (only with
    /// `Options::preallocate`).
    spare: Option<Spare>,
}

/// What readers need: the index and a way to read every segment.
pub(crate) struct State {
    pub(crate) keydir: KeyDir,
    /// Bytes of log holding the live keys' operations.
    pub(crate) live_bytes: u64,
    /// The change number of the newest published record.
    pub(crate) published: u64,
    /// Open snapshots: id → the versions they still need.
    pub(crate) views: BTreeMap<u64, SnapshotView>,
    /// Id of the next snapshot view.
    pub(crate) next_view: u64,
    pub(crate) segments: BTreeMap<SegmentId, Arc<SegmentReader>>,
    /// What each segment in `segments` holds (kind, range, live bytes).
    pub(crate) usage: BTreeMap<SegmentId, Usage>,
    /// Segments merged away while snapshots were open: kept readable for
    /// the views opened before (ids below `before_view`).
    pub(crate) retired: Vec<Retired>,
    /// Sparse index from change numbers to records.
    pub(crate) changes: ChangeIndex,
    /// Merges completed since open, and the bytes they gave back.
    pub(crate) merges: (u64, u64),
    /// Set by `close` with the index emptied: readers that got the lock
    /// after it report `Closed` rather than an empty store.
    closed: bool,
}

/// A merged-away segment that open snapshots may still read.
pub(crate) struct Retired {
    pub(crate) before_view: u64,
    pub(crate) id: SegmentId,
    pub(crate) reader: Arc<SegmentReader>,
}

/// What an open snapshot needs: the point it stands at, and the version
/// at that point of every key changed since (kept until the view closes).
#[derive(Debug, Default)]
pub(crate) struct SnapshotView {
    /// The change number the snapshot stands at.
    pub(crate) at: u64,
    /// Key → its entry as of `at`, for keys overwritten or deleted since.
    pub(crate) preserved: BTreeMap<Vec<u8>, KeyEntry>,
}

impl State {
    /// Sets (or, with `None`, removes) the entry of `key`, first keeping
    /// the version each open snapshot still needs.
    pub(crate) fn set(&mut self, key: &[u8], entry: Option<KeyEntry>) {
        let old = match entry {
            Some(e) => {
                self.live_bytes += u64::from(e.pointer.len);
                if let Some(u) = self.usage.get_mut(&e.pointer.segment) {
                    u.add(&e);
                }
                self.keydir.insert(key, e)
            }
            None => self.keydir.remove(key),
        };
        if let Some(old) = old {
            self.live_bytes = self.live_bytes.saturating_sub(u64::from(old.pointer.len));
            if let Some(u) = self.usage.get_mut(&old.pointer.segment) {
                u.remove(&old);
            }
        }
        if let Some(old) = old
            && !self.views.is_empty()
        {
            for view in self.views.values_mut() {
                if old.change_number <= view.at && !view.preserved.contains_key(key) {
                    view.preserved.insert(key.to_vec(), old);
                }
            }
        }
    }

    /// Counts a delete operation of `len` bytes written to `segment`.
    pub(crate) fn note_tombstone(&mut self, segment: SegmentId, len: u32) {
        if let Some(u) = self.usage.get_mut(&segment) {
            u.tombstones += u64::from(len);
        }
    }

    /// Points `key` at `to` if it still points at `from` (a merge moved
    /// the operation; the entry's change number and expiry stay). Returns
    /// whether it did; snapshots need nothing kept, the value is the same.
    pub(crate) fn relocate(&mut self, key: &[u8], from: RecordPointer, to: RecordPointer) -> bool {
        let Some(old) = self.keydir.update(key, |e| {
            (e.pointer == from).then_some(KeyEntry { pointer: to, ..*e })
        }) else {
            return false;
        };
        if let Some(u) = self.usage.get_mut(&from.segment) {
            u.remove(&old);
        }
        if let Some(u) = self.usage.get_mut(&to.segment) {
            u.add(&KeyEntry { pointer: to, ..old });
        }
        true
    }

    /// Removes `key` if it still points at `at` (a merge dropped its
    /// expired value).
    pub(crate) fn drop_if_at(&mut self, key: &[u8], at: RecordPointer) {
        if self.keydir.get(key).is_some_and(|e| e.pointer == at) {
            self.set(key, None);
        }
    }

    /// Drops retired segments that no open snapshot can read any more.
    pub(crate) fn release_retired(&mut self) {
        let oldest_view = self.views.keys().next().copied();
        self.retired
            .retain(|r| oldest_view.is_some_and(|v| v < r.before_view));
    }

    /// The reader of segment `id`, retired ones included.
    fn reader(&self, id: SegmentId) -> Option<&SegmentReader> {
        match self.segments.get(&id) {
            Some(r) => Some(r),
            None => self.retired.iter().find(|r| r.id == id).map(|r| &*r.reader),
        }
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }
}

pub(crate) enum SegmentReader {
    /// Read through a read-only memory map.
    Sealed(SealedSegment),
    /// The file being appended to: read through its map below the
    /// published offset, else through positional reads.
    Active(Arc<File>, Option<Arc<ActiveMap>>),
}

impl SegmentReader {
    /// Marks a sealed segment merged away (see `SealedSegment::retire`).
    pub(crate) fn retire(&self, fs: Arc<dyn FileSystem>) {
        if let SegmentReader::Sealed(s) = self {
            s.retire(fs);
        }
    }

    /// Starts loading the operation at `pointer` into the cache when it is
    /// mapped (see [`prefetch`]), so that the misses of a scan's or a bulk
    /// get's values overlap before their checksums read the bytes.
    fn prefetch(&self, pointer: RecordPointer) {
        let bytes = match self {
            SegmentReader::Sealed(s) => s
                .bytes()
                .get(pointer.offset as usize..)
                .and_then(|b| b.get(..pointer.len as usize)),
            SegmentReader::Active(_, Some(map)) => {
                map.bytes(u64::from(pointer.offset), pointer.len as usize)
            }
            SegmentReader::Active(_, None) => None,
        };
        if let Some(b) = bytes {
            prefetch(b);
        }
    }

    /// A sealed segment's whole file.
    pub(crate) fn sealed_bytes(&self) -> Option<&[u8]> {
        match self {
            SegmentReader::Sealed(s) => Some(s.bytes()),
            SegmentReader::Active(..) => None,
        }
    }

    fn active(segment: &ActiveSegment) -> Arc<Self> {
        Arc::new(SegmentReader::Active(
            Arc::clone(&segment.file),
            segment.map.as_ref().map(|m| Arc::clone(m.map())),
        ))
    }

    /// The bytes `[offset, offset + len)`, or `None` past the segment's end
    /// (for the active segment: past what is published or in the file).
    /// `buf` holds bytes read from the active segment's file.
    pub(crate) fn read<'a>(
        &'a self,
        offset: u64,
        len: usize,
        buf: &'a mut Vec<u8>,
    ) -> Result<Option<&'a [u8]>> {
        match self {
            SegmentReader::Sealed(s) => Ok(usize::try_from(offset)
                .ok()
                .and_then(|o| s.bytes().get(o..o.checked_add(len)?))),
            SegmentReader::Active(file, map) => {
                if let Some(bytes) = map.as_ref().and_then(|m| m.bytes(offset, len)) {
                    return Ok(Some(bytes));
                }
                buf.resize(len, 0);
                match file.read_exact_at(buf, offset) {
                    Ok(()) => Ok(Some(buf)),
                    Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
                    Err(e) => Err(Error::io(format!("read {len} bytes at {offset}"), e)),
                }
            }
        }
    }
}

/// How much one visit to the index may copy.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ChunkLimits {
    /// Pairs copied.
    pub(crate) pairs: usize,
    /// Index entries looked at (expired ones included).
    pub(crate) visited: usize,
    /// Bytes of the records copied (operation header, key and value;
    /// checked before each pair, so one large value still makes progress).
    pub(crate) bytes: usize,
}

/// Keys of a bulk get looked up (and their values prefetched) before the
/// first of their values is read: enough misses in flight to fill the
/// CPU's miss buffers, few enough that the lines are still cached when read.
const GET_WINDOW: usize = 32;

/// How many values ahead of the one it reads a scan asks for cache lines:
/// a rolling window rather than every value of a chunk at once (up to 128
/// values, some 400 lines), so that the lines in flight stay within what
/// the CPU's miss buffers and L1 cache hold (DESIGN.md 4, `iterate`).
const SCAN_PREFETCH_AHEAD: usize = 12;

/// Where [`Inner::scan_chunk`] copies a chunk's pairs.
pub(crate) trait PairSink {
    /// Room for `pairs` more pairs of at most `bytes` key and value bytes
    /// in all, asked for once before they come (so a chunk's buffer grows
    /// once, not pair by pair).
    fn reserve(&mut self, pairs: usize, bytes: usize);
    /// One pair, in key order: its key (the first `key_len` bytes) and its
    /// value, back to back as a record holds them, so that one copy takes
    /// both.
    fn push(&mut self, key_and_value: &[u8], key_len: usize, expire_ts: u64);
}

struct Syncer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    handle: JoinHandle<()>,
}

fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::EmptyKey);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(Error::KeyTooLarge {
            len: key.len(),
            max: MAX_KEY_LEN,
        });
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Error::ValueTooLarge {
            len: value.len(),
            max: MAX_VALUE_LEN,
        });
    }
    Ok(())
}

/// A store's state rebuilt from its folder, ready to serve.
struct Assembled {
    live_bytes: u64,
    active: ActiveSegment,
    segments: BTreeMap<SegmentId, Arc<SegmentReader>>,
    usage: BTreeMap<SegmentId, Usage>,
    /// Sealed segments without a usable hint file.
    unhinted: Vec<SegmentId>,
    keydir: KeyDir,
    changes: ChangeIndex,
    applied: u64,
    next_segment: SegmentId,
    pub(crate) report: RecoveryReport,
}

/// Recovers the store in `dir` (whose lock the caller holds) and takes over
/// its newest segment as the active one.
fn assemble(dir: &Path, options: &Options, fs: &dyn FileSystem) -> Result<Assembled> {
    let recovered = recovery::recover(dir, options.recovery_mode, fs)?;
    let next_segment = recovered
        .highest_id
        .map_or(Some(SegmentId(1)), SegmentId::next)
        .ok_or_else(|| Error::InvalidOptions("segment ids are exhausted".into()))?;
    let mut segments = BTreeMap::new();
    let mut usage = BTreeMap::new();
    let mut scanned = recovered.segments;
    let mut unhinted = recovered.unhinted;
    // The log continues after the highest position any segment covers. In
    // a damaged store opened with `TolerateAnyCorruption` the ranges may
    // overlap, and the last segment by range may end below another's end:
    // it is then left sealed and a new segment starts at that end, so no
    // change number is used twice and no new write lands inside a range
    // that a merged segment could later cover (found by fuzzing).
    let log_end = scanned.iter().map(|s| s.end_position).max().unwrap_or(0);
    let active = match scanned.pop_if(|s| s.kind == SegmentKind::Log && s.end_position == log_end) {
        Some(last) => {
            let id = last.id;
            let (path, base, end) = (last.path.clone(), last.base_position, last.end_offset);
            drop(last);
            // Appended to from now on: its hint (if any) will be stale.
            let hint = id.hint_path_in(dir);
            match fs.remove_file(&hint) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::io(format!("remove {}", hint.display()), e));
                }
                _ => {}
            }
            unhinted.retain(|&u| u != id);
            ActiveSegment::reopen(&path, id, base, end, options.segment_plan(), fs)?
        }
        None => ActiveSegment::create(dir, next_segment, log_end, options.segment_plan(), fs)?,
    };
    for s in scanned {
        usage.insert(
            s.id,
            Usage::new(s.kind, s.base_position, s.end_position, s.end_offset),
        );
        segments.insert(s.id, Arc::new(SegmentReader::Sealed(s.map)));
    }
    usage.insert(
        active.id,
        Usage::new(
            SegmentKind::Log,
            active.base_position,
            active.position(),
            active.offset,
        ),
    );
    segments.insert(active.id, SegmentReader::active(&active));
    for (id, bytes) in &recovered.tombstones {
        if let Some(u) = usage.get_mut(id) {
            u.tombstones = *bytes;
        }
    }
    // A segment adopted as active may come from a rollover that crashed
    // before its folder was synced: make its directory entry durable before
    // anything is acknowledged in it.
    sync_dir(dir, fs)?;
    let next_segment = next_segment.max(active.id.next().unwrap_or(next_segment));
    let mut live_bytes = 0u64;
    for (id, sum) in &recovered.live {
        live_bytes += sum.bytes;
        if let Some(u) = usage.get_mut(id) {
            u.live = sum.bytes;
            u.live_keys = sum.keys;
            u.expiring = sum.expiring;
            u.first_expiry = sum.first_expiry;
        }
    }
    Ok(Assembled {
        live_bytes,
        active,
        segments,
        usage,
        unhinted,
        keydir: recovered.keydir,
        changes: recovered.changes,
        applied: recovered.applied,
        next_segment,
        report: recovered.report,
    })
}

impl Store {
    /// Opens the store in `dir`, creating the folder and an empty store if
    /// needed. Takes the directory lock, then rebuilds the index from the
    /// segments (see [`RecoveryReport`]).
    pub fn open(dir: impl AsRef<Path>, options: Options) -> Result<Store> {
        options.validate()?;
        let dir = dir.as_ref().to_path_buf();
        let io = options.io();
        crate::backup::settle_swaps(&dir, &*io)?;
        if dir.join(crate::backup::BACKUP_MANIFEST).exists() {
            return Err(Error::InvalidPath {
                path: dir,
                reason: "this folder holds a backup (its segments may be hard links into a live \
                         store): restore it instead of opening it"
                    .into(),
            });
        }
        if !dir.is_dir() {
            crate::log::create_dir_all(&*io, &dir)
                .context(|| format!("create store folder {}", dir.display()))?;
            if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
                sync_dir(parent, &*io)?;
            }
        }
        let lock = DirLock::acquire(&dir)?;
        let a = assemble(&dir, &options, &*io)?;
        let commit = GroupCommit::new(
            Arc::clone(&a.active.file),
            a.active.position(),
            &dir,
            Arc::clone(&io),
        );
        let published = a.active.position();
        let (preallocate, segment_size, dir_for_spare) =
            (options.preallocates(), options.segment_size, dir.clone());
        let inner = Arc::new(Inner {
            dir,
            options,
            fs: Arc::clone(&io),
            lock: Mutex::new(Some(lock)),
            queue: WriteQueue::default(),
            writer: Mutex::new(Writer {
                active: a.active,
                buffer: Vec::new(),
                next_segment: a.next_segment,
                spare: preallocate
                    .then(|| Spare::start(&dir_for_spare, segment_size, Arc::clone(&io))),
            }),
            state: RwLock::new(State {
                live_bytes: a.live_bytes,
                published,
                views: BTreeMap::new(),
                next_view: 0,
                keydir: a.keydir,
                segments: a.segments,
                usage: a.usage,
                retired: Vec::new(),
                changes: a.changes,
                merges: (0, 0),
                closed: false,
            }),
            commit,
            applied: AtomicU64::new(a.applied),
            applier: Mutex::new(()),
            pins: Mutex::new(std::collections::BTreeMap::new()),
            sealed_crcs: Mutex::new(std::collections::HashMap::new()),
            global_mutation: AtomicBool::new(false),
            stat: std::sync::OnceLock::new(),
            metrics: Mutex::new(None),
            records_written: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            opened_at: published,
            closed: AtomicBool::new(false),
            damage_skipped: AtomicBool::new(!a.report.skipped.is_empty()),
            report: a.report,
            syncer: Mutex::new(None),
            merge_lock: Mutex::new(()),
            merge_abort: AtomicBool::new(false),
            merger: Mutex::new(None),
            background: Mutex::new(Vec::new()),
            generation: Arc::new(AtomicU64::new(0)),
            merge_failures: AtomicU64::new(0),
        });
        inner.write_hints(a.unhinted);
        if inner.options.merge.automatic {
            *inner.merger.lock() = Some(crate::merge::Merger::start(Arc::downgrade(&inner)));
        }
        if let SyncMode::Interval(every) = inner.options.sync_mode {
            *inner.syncer.lock() = Some(Syncer::start(Arc::downgrade(&inner), every));
        }
        if let Some(m) = &inner.options.metrics {
            let registered = crate::metrics::StoreMetrics::register(m, Arc::downgrade(&inner))
                .map_err(|e| Error::InvalidOptions(format!("register metrics: {e}")));
            match registered {
                Ok(metrics) => {
                    let _ = inner.stat.set(metrics.stat());
                    *inner.metrics.lock() = Some(metrics);
                }
                Err(e) => {
                    let _ = inner.close();
                    return Err(e);
                }
            }
        }
        Ok(Store { inner })
    }

    /// The store's folder.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &Options {
        &self.inner.options
    }

    /// What recovery found and did when the store was opened.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// The change number of the newest record: the logical log position at
    /// its end. 0 for an empty store.
    pub fn last_change_number(&self) -> u64 {
        self.inner.commit.written()
    }

    /// The log position known durable.
    pub fn durable_change_number(&self) -> u64 {
        self.inner.commit.durable()
    }

    /// Number of keys in the index (expired keys not yet dropped included).
    pub fn key_count(&self) -> usize {
        self.inner.state.read().keydir.len()
    }

    /// Heap bytes used by the index, keys included.
    pub fn index_memory_bytes(&self) -> usize {
        self.inner.state.read().keydir.memory_bytes()
    }

    /// Number of `fdatasync` calls made by group commit so far.
    pub fn group_commit_syncs(&self) -> u64 {
        self.inner.commit.syncs()
    }

    /// Makes everything written so far durable, whatever the sync mode.
    pub fn sync(&self) -> Result<()> {
        self.inner.check_open()?;
        self.inner.commit.sync_all_written()
    }

    /// Iterates live keys in ascending order; see [`Iter`] for the
    /// consistency guarantee.
    pub fn iter(&self, options: &IterationOptions) -> Result<Iter> {
        self.inner.measured(Op::Iterate, || {
            self.inner.check_open()?;
            options.validate()?;
            Ok(Iter::new(Arc::clone(&self.inner), options))
        })
    }

    /// Calls `visit` with each live pair that [`iter`](Self::iter) would
    /// yield, in ascending key order, until it returns `false`. The pairs
    /// are lent: copied, a chunk at a time, into one buffer the scan
    /// reuses, so nothing is allocated per pair (`iter` allocates a key
    /// and a value for each). `visit` runs with no lock held and may use
    /// the store. Same consistency as [`Iter`]. A read that fails ends the
    /// scan with its error, after the pairs read before it were visited.
    ///
    /// ```
    /// # use dkv_cask::{IterationOptions, KvStore, Options, Store};
    /// # use dkv_cask::serverpb::KvPair;
    /// # let dir = tempfile::tempdir()?;
    /// let store = Store::open(dir.path(), Options::default())?;
    /// let pair = |k: &str| KvPair { key: k.into(), value: b"v".to_vec(), expire_ts: 0 };
    /// store.put(&[pair("user/1"), pair("user/2"), pair("zone/1")])?;
    /// let mut keys = Vec::new();
    /// store.scan(&IterationOptions::new().with_prefix("user/"), |p| {
    ///     keys.push(String::from_utf8_lossy(p.key).into_owned());
    ///     true
    /// })?;
    /// assert_eq!(keys, ["user/1", "user/2"]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn scan(
        &self,
        options: &IterationOptions,
        visit: impl FnMut(PairRef<'_>) -> bool,
    ) -> Result<()> {
        // Measured as `iter` is: the start, not the caller's visits.
        self.inner.measured(Op::Iterate, || {
            self.inner.check_open()?;
            options.validate()
        })?;
        crate::iter::scan(&self.inner, options, visit)
    }
}

impl Inner {
    /// Runs `f` as operation `op`, recording its latency and failure when
    /// metrics are on.
    /// Adds `bytes` of records whose pairs were handed out to the
    /// `read_bytes` metric (a get that fails hands out nothing).
    pub(crate) fn count_read(&self, bytes: u64) {
        if bytes > 0 {
            self.read_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
    }

    pub(crate) fn measured<T>(&self, op: Op, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let Some(stat) = self.stat.get() else {
            return f();
        };
        let started = std::time::Instant::now();
        let result = f();
        stat.record(op, started, result.is_err());
        result
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::Acquire) {
            Err(Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Seals the active segment and starts the next one. Any failure poisons
    /// the writer: the on-disk state is then only trusted after reopen.
    fn rollover(&self, w: &mut Writer, on_demand: bool) -> Result<()> {
        match w.active.seal(&*self.fs) {
            Ok(Some(crc)) => {
                self.sealed_crcs
                    .lock()
                    .insert(w.active.id, (w.active.offset, crc));
            }
            Ok(None) => {}
            Err(e) => {
                self.commit.sync_failed(e.chain());
                return Err(e);
            }
        }
        let result: Result<()> = (|| {
            let end = w.active.position();
            let next = w.next_segment;
            let after = next
                .next()
                .ok_or_else(|| Error::InvalidOptions("segment ids are exhausted".into()))?;
            // A seal on demand (a backup) does not wait for a spare still
            // being zero-filled: it starts an unpreallocated segment.
            let use_spare = !on_demand || w.spare.as_ref().is_some_and(Spare::is_ready);
            let new = match &mut w.spare {
                Some(spare) if use_spare => ActiveSegment::create_from_spare(
                    &self.dir,
                    next,
                    end,
                    self.options.segment_plan(),
                    spare,
                    &*self.fs,
                )?,
                _ => ActiveSegment::create(
                    &self.dir,
                    next,
                    end,
                    SegmentPlan {
                        preallocate: false,
                        ..self.options.segment_plan()
                    },
                    &*self.fs,
                )?,
            };
            if self.options.preallocates() && (use_spare || w.spare.is_none()) {
                w.spare = Some(Spare::start(
                    &self.dir,
                    self.options.segment_size,
                    Arc::clone(&self.fs),
                ));
            }
            let sealed = SealedSegment::open(&w.active.path)?;
            self.commit.switch_file(Arc::clone(&new.file), end);
            let sealed = Arc::new(SegmentReader::Sealed(sealed));
            let mut state = self.state.write();
            state.segments.insert(w.active.id, Arc::clone(&sealed));
            if let Some(u) = state.usage.get_mut(&w.active.id) {
                u.end = end;
                u.bytes = w.active.offset;
            }
            state.segments.insert(new.id, SegmentReader::active(&new));
            state
                .usage
                .insert(new.id, Usage::new(SegmentKind::Log, end, end, new.offset));
            drop(state);
            self.write_hint_of(w.active.id, sealed);
            w.active = new;
            w.next_segment = after;
            if let Some(m) = &*self.merger.lock() {
                m.wake();
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.commit.poison(e.chain());
        }
        result
    }

    /// Writes, in the background, the hint files of sealed segments that
    /// have none (found at open).
    fn write_hints(&self, ids: Vec<SegmentId>) {
        if ids.is_empty() {
            return;
        }
        let readers: Vec<_> = {
            let state = self.state.read();
            ids.iter()
                .filter_map(|id| Some((*id, Arc::clone(state.segments.get(id)?))))
                .collect()
        };
        for (id, reader) in readers {
            self.write_hint_of(id, reader);
        }
    }

    /// Writes the hint file of sealed segment `id` in the background. A
    /// failure only means the segment is scanned at the next open.
    pub(crate) fn write_hint_of(&self, id: SegmentId, reader: Arc<SegmentReader>) {
        let dir = self.dir.clone();
        let fs = Arc::clone(&self.fs);
        let generation = self.generation.load(Ordering::Acquire);
        let current = Arc::clone(&self.generation);
        let job = std::thread::Builder::new()
            .name(crate::log::HINT_THREAD.into())
            .spawn(move || {
                let Some(bytes) = reader.sealed_bytes() else {
                    return;
                };
                if let Some(hint) = crate::hint::build(bytes)
                    && current.load(Ordering::Acquire) == generation
                {
                    let _ = crate::log::best_effort(|| crate::hint::write(&*fs, &dir, id, &hint));
                }
            });
        if let Ok(handle) = job {
            let mut jobs = self.background.lock();
            jobs.retain(|h| !h.is_finished());
            jobs.push(handle);
        }
    }

    /// Waits for the background jobs started so far.
    fn join_background(&self) {
        let jobs = std::mem::take(&mut *self.background.lock());
        for job in jobs {
            let _ = job.join();
        }
    }

    /// Takes the next segment id (for a merge's output).
    pub(crate) fn allocate_segment_id(&self) -> Result<SegmentId> {
        let mut w = self.writer.lock();
        let id = w.next_segment;
        w.next_segment = id
            .next()
            .ok_or_else(|| Error::InvalidOptions("segment ids are exhausted".into()))?;
        Ok(id)
    }

    pub(crate) fn check_batch_size(&self, builder: &RecordBuilder) -> Result<()> {
        let bytes = builder.payload_len() as u64;
        if bytes > self.options.batch_limit() {
            return Err(Error::BatchTooLarge {
                bytes,
                max: self.options.batch_limit(),
            });
        }
        Ok(())
    }

    /// Replaces this store's contents, in place, with the complete, closed
    /// store staged at `staging` (beside the store's folder, marked
    /// complete): the folders are swapped crash-safely, the new contents
    /// recovered, and the handle's state replaced while writers wait.
    /// Failures from the swap on poison the writer (reopen settles it).
    pub(crate) fn swap_in(&self, staging: &Path) -> Result<()> {
        if let Some(s) = self.syncer.lock().take() {
            s.stop();
        }
        self.merge_abort.store(true, Ordering::Release);
        let _merging = self.merge_lock.lock();
        self.merge_abort.store(false, Ordering::Release);
        let result = (|| -> Result<()> {
            let mut w = self.writer.lock();
            // Under the writer lock: no rollover can start a hint job of the
            // old contents after this, and the ones started before finish.
            self.generation.fetch_add(1, Ordering::AcqRel);
            self.join_background();
            self.check_open()?;
            if let Some(mut spare) = w.spare.take() {
                spare.cancel();
            }
            crate::backup::swap_folders(&*self.fs, &self.dir, staging, &mut |_| true)?;
            let lock = DirLock::acquire(&self.dir)?;
            let a = assemble(&self.dir, &self.options, &*self.fs)?;
            let position = a.active.position();
            *self.lock.lock() = Some(lock);
            self.commit.reset(Arc::clone(&a.active.file), position);
            self.applied.store(a.applied, Ordering::Release);
            self.damage_skipped
                .store(!a.report.skipped.is_empty(), Ordering::Release);
            self.sealed_crcs.lock().clear();
            {
                let mut state = self.state.write();
                state.keydir = a.keydir;
                state.live_bytes = a.live_bytes;
                state.segments = a.segments;
                state.usage = a.usage;
                state.retired.clear();
                state.changes = a.changes;
                state.published = position;
                // Open snapshots of the old contents read nothing more.
                state.views.clear();
            }
            self.write_hints(a.unhinted);
            w.active = a.active;
            w.next_segment = a.next_segment;
            w.buffer.clear();
            if self.options.preallocates() {
                w.spare = Some(Spare::start(
                    &self.dir,
                    self.options.segment_size,
                    Arc::clone(&self.fs),
                ));
            }
            Ok(())
        })();
        if let Err(e) = &result {
            self.commit.poison(e.chain());
        }
        result
    }

    /// Seals the active segment (if it holds records) so that everything
    /// written so far lies in immutable, synced segments. Writers wait for
    /// the writer lock meanwhile: a sync, a truncate and the rename of the
    /// prepared spare segment. Returns the log position everything sealed
    /// ends at, and the sealed segments' ids and paths, oldest first.
    #[expect(clippy::type_complexity, reason = "one private caller")]
    pub(crate) fn seal_active(
        &self,
    ) -> Result<(u64, Vec<(SegmentId, PathBuf, Arc<SegmentReader>)>)> {
        let mut w = self.writer.lock();
        self.check_open()?;
        if let Some(cause) = self.commit.poisoned() {
            return Err(Error::Poisoned { cause });
        }
        if !w.active.is_empty() {
            self.rollover(&mut w, true)?;
        }
        let end = w.active.base_position;
        let state = self.state.read();
        // In log order: the last one is the newest log segment, the one a
        // restored store appends to.
        let mut sealed: Vec<_> = state
            .segments
            .iter()
            .filter(|&(&id, r)| id != w.active.id && matches!(**r, SegmentReader::Sealed(_)))
            .map(|(&id, r)| (id, id.path_in(&self.dir), Arc::clone(r)))
            .collect();
        sealed.sort_by_key(|(id, ..)| state.usage.get(id).map(|u| (u.base, u.end)));
        Ok((end, sealed))
    }

    /// The length and CRC-32 of a sealed segment, from the cache or by
    /// reading it (through `reader`, which the caller holds, so a merge
    /// retiring the segment meanwhile does not matter) once.
    pub(crate) fn sealed_crc(&self, id: SegmentId, reader: &SegmentReader) -> Result<(u64, u32)> {
        if let Some(&known) = self.sealed_crcs.lock().get(&id) {
            return Ok(known);
        }
        let bytes = reader
            .sealed_bytes()
            .ok_or_else(|| Error::corruption(id.path_in(&self.dir), 0, "segment is not sealed"))?;
        let known = (bytes.len() as u64, crate::format::crc32(bytes));
        self.sealed_crcs.lock().insert(id, known);
        Ok(known)
    }

    /// Copies live pairs at or after `cursor` into `out` (told first how
    /// many pairs and at most how many bytes follow), stopping after
    /// `limits.pairs` pairs, `limits.visited` index entries or
    /// `limits.bytes` value bytes, whichever comes first. Returns the last
    /// key looked at (the resume point) and whether the scan reached the end
    /// of the range.
    pub(crate) fn scan_chunk(
        &self,
        cursor: &[u8],
        exclusive: bool,
        prefix: Option<&[u8]>,
        limits: ChunkLimits,
        out: &mut dyn PairSink,
    ) -> Result<(Option<Vec<u8>>, bool)> {
        self.check_open()?;
        let now = self.options.clock.now();
        let state = self.state.read();
        state.check_open()?;
        let mut last: Option<&[u8]> = None;
        let mut finished = true;
        let mut visited = 0;
        let mut bytes = 0;
        // First the chunk's keys, where their values lie and the readers of
        // their segments (looked up once per run of keys in one segment),
        // the first values' cache lines asked for as soon as their places
        // are known, so that their misses (values of neighbouring keys lie
        // anywhere in the log) overlap with each other and with the walk of
        // the index...
        let mut found: Vec<(&[u8], RecordPointer, Option<&SegmentReader>)> =
            Vec::with_capacity(limits.pairs);
        let mut segment: Option<(SegmentId, Option<&SegmentReader>)> = None;
        state.keydir.scan_from(cursor, exclusive, |key, entry| {
            if let Some(p) = prefix
                && !key.starts_with(p)
            {
                return false;
            }
            if found.len() >= limits.pairs || visited >= limits.visited || bytes >= limits.bytes {
                finished = false;
                return false;
            }
            visited += 1;
            last = Some(key);
            if entry.expire_ts != 0 && entry.expire_ts <= now {
                return true;
            }
            bytes += entry.pointer.len as usize;
            let reader = match segment {
                Some((id, reader)) if id == entry.pointer.segment => reader,
                _ => {
                    let reader = state.reader(entry.pointer.segment);
                    segment = Some((entry.pointer.segment, reader));
                    reader
                }
            };
            if found.len() < SCAN_PREFETCH_AHEAD
                && let Some(r) = reader
            {
                r.prefetch(entry.pointer);
            }
            found.push((key, entry.pointer, reader));
            true
        });
        // ...then the values, checked and copied, each read asking for the
        // lines of the value `SCAN_PREFETCH_AHEAD` places on.
        out.reserve(found.len(), bytes);
        let mut buf = Vec::new();
        // The pairs copied before a failing read are handed out too, so
        // their records count.
        let mut read = 0;
        for (i, &(key, pointer, reader)) in found.iter().enumerate() {
            if let Some(&(_, ahead, Some(r))) = found.get(i + SCAN_PREFETCH_AHEAD) {
                r.prefetch(ahead);
            }
            let (key_and_value, expire_ts) =
                match read_op_in(reader, &self.dir, key, pointer, &mut buf) {
                    Ok(found) => found,
                    Err(e) => {
                        self.count_read(read);
                        return Err(e);
                    }
                };
            out.push(key_and_value, key.len(), expire_ts);
            read += u64::from(pointer.len);
        }
        self.count_read(read);
        Ok((last.map(<[u8]>::to_vec), finished))
    }

    fn close(&self) -> Result<()> {
        self.close_with(true)
    }

    /// Closes the store; with `save_keydir`, a clean close saves the index
    /// as the keydir file for a fast next open (not when the folder's
    /// contents are about to be replaced).
    pub(crate) fn close_with(&self, save_keydir: bool) -> Result<()> {
        if let Some(s) = self.syncer.lock().take() {
            s.stop();
        }
        self.merge_abort.store(true, Ordering::Release);
        // Not joined under the `merger` mutex: a rollover holding the
        // writer lock takes it to wake the merger, and the merger may be
        // waiting for the writer lock.
        let merger = self.merger.lock().take();
        if let Some(m) = merger {
            m.stop();
        }
        let merging = self.merge_lock.lock();
        self.join_background();
        let (result, active) = {
            let mut w = self.writer.lock();
            if self.closed.swap(true, Ordering::AcqRel) {
                return Ok(());
            }
            let active = (w.active.id, w.active.position(), w.active.offset);
            if let Some(mut spare) = w.spare.take() {
                spare.cancel();
            }
            // A reader still holding the active segment's map (a
            // replication read that began before close) reads no more
            // through it: the next open may cut the file below what was
            // published (after a failed sync), and a map read past a
            // file's end is a SIGBUS. It falls back to `pread`, which
            // reports a short file as an error.
            if let Some(map) = &mut w.active.map {
                map.withdraw();
            }
            let result = match self.commit.poisoned() {
                Some(cause) => Err(Error::Poisoned { cause }),
                None => self.commit.sync_all_written(),
            };
            (result, active)
        };
        {
            let mut state = self.state.write();
            if save_keydir
                && self.options.save_keydir
                && result.is_ok()
                && !self.damage_skipped.load(Ordering::Acquire)
            {
                // A cache: a failure only means a slower next open.
                let _ = crate::log::best_effort(|| self.save_keydir(&state, active));
            }
            state.closed = true;
            state.keydir = KeyDir::new();
            state.segments.clear();
            state.usage.clear();
            state.retired.clear();
        }
        drop(merging);
        if let Some(m) = self.metrics.lock().take() {
            m.unregister();
        }
        self.lock.lock().take();
        result
    }
}

impl Inner {
    /// Saves the index as the keydir file. `active` is the active
    /// segment's (id, end position, end offset); everything is synced.
    fn save_keydir(&self, state: &State, active: (SegmentId, u64, u64)) -> Result<()> {
        let mut segments: Vec<crate::keydir_file::Closed> = state
            .usage
            .iter()
            .map(|(&id, u)| {
                let (end_position, end_offset) = if id == active.0 {
                    (active.1, active.2)
                } else {
                    (u.end, u.bytes)
                };
                crate::keydir_file::Closed {
                    id,
                    kind: u.kind,
                    base_position: u.base,
                    end_position,
                    end_offset,
                    tombstones: u.tombstones,
                }
            })
            .collect();
        segments.sort_by_key(|s| (s.base_position, s.id));
        crate::keydir_file::save(
            &*self.fs,
            &self.dir,
            &state.keydir,
            &segments,
            &state.changes,
            self.applied.load(Ordering::Acquire),
        )
    }
}

impl State {
    /// Reads and verifies the put operation at `pointer`, which must hold
    /// `key`; returns its value and expiry. `buf` holds bytes read from the
    /// active segment.
    pub(crate) fn read_op<'a>(
        &'a self,
        dir: &Path,
        key: &[u8],
        pointer: RecordPointer,
        buf: &'a mut Vec<u8>,
    ) -> Result<(&'a [u8], u64)> {
        let (key_and_value, expire_ts) =
            read_op_in(self.reader(pointer.segment), dir, key, pointer, buf)?;
        Ok((&key_and_value[key.len()..], expire_ts))
    }

    /// The live entry of `key` (the clock is read only for keys that
    /// expire).
    fn live(&self, key: &[u8], clock: &Clock) -> Option<KeyEntry> {
        self.keydir
            .get(key)
            .filter(|e| !clock.is_expired(e.expire_ts))
    }
}

/// Reads the operation at `pointer` (through `reader`, as [`read_op_in`])
/// and appends its pair to `out`; returns the bytes read.
fn push_read(
    out: &mut Vec<KvPair>,
    buf: &mut Vec<u8>,
    dir: &Path,
    key: &[u8],
    pointer: RecordPointer,
    reader: Option<&SegmentReader>,
) -> Result<u64> {
    let (key_and_value, expire_ts) = read_op_in(reader, dir, key, pointer, buf)?;
    out.push(KvPair {
        key: key.to_vec(),
        value: key_and_value[key.len()..].to_vec(),
        expire_ts,
    });
    Ok(u64::from(pointer.len))
}

/// [`State::read_op`] through `reader`, the reader of `pointer.segment`
/// already looked up (`None`: the segment is not open), except that the
/// value comes with the key before it, as the record holds them: the
/// operation's key and value, back to back (the key is `key`), and its
/// expiry.
fn read_op_in<'a>(
    reader: Option<&'a SegmentReader>,
    dir: &Path,
    key: &[u8],
    pointer: RecordPointer,
    buf: &'a mut Vec<u8>,
) -> Result<(&'a [u8], u64)> {
    let offset = u64::from(pointer.offset);
    let len = pointer.len as usize;
    let bytes: &[u8] = match reader {
        Some(SegmentReader::Sealed(s)) => s
            .bytes()
            .get(offset as usize..offset as usize + len)
            .ok_or_else(|| {
                Error::corruption(
                    s.path(),
                    offset,
                    "indexed record lies beyond the segment's end",
                )
            })?,
        Some(SegmentReader::Active(file, map)) => {
            match map.as_ref().and_then(|m| m.bytes(offset, len)) {
                Some(bytes) => bytes,
                None => {
                    buf.resize(len, 0);
                    file.read_exact_at(buf, offset).context(|| {
                        format!(
                            "read {len} bytes at {offset} of segment {}",
                            pointer.segment
                        )
                    })?;
                    buf
                }
            }
        }
        None => {
            return Err(Error::corruption(
                pointer.segment.path_in(dir),
                offset,
                "indexed segment is not open",
            ));
        }
    };
    let corrupt = |reason: String| Error::corruption(pointer.segment.path_in(dir), offset, reason);
    let (op, len) = decode_op(bytes).map_err(|e| corrupt(e.to_string()))?;
    if op.key != key {
        return Err(corrupt("indexed operation holds another key".into()));
    }
    Ok((&bytes[OP_HEADER_LEN..len], op.expire_ts))
}

impl Syncer {
    fn start(inner: Weak<Inner>, every: Duration) -> Syncer {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let flag = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("dkv-cask-sync".into())
            .spawn(move || {
                let (lock, cv) = &*flag;
                let mut stopped = lock.lock();
                while !*stopped {
                    cv.wait_for(&mut stopped, every);
                    if *stopped {
                        break;
                    }
                    let Some(inner) = inner.upgrade() else { break };
                    // A failure poisons the writer; the next write reports it.
                    let _ = inner.commit.sync_all_written();
                }
            })
            .expect("spawn the interval sync thread");
        Syncer { stop, handle }
    }

    fn stop(self) {
        *self.stop.0.lock() = true;
        self.stop.1.notify_all();
        let _ = self.handle.join();
    }
}

impl KvStore for Store {
    fn put(&self, pairs: &[KvPair]) -> Result<()> {
        self.inner.measured(
            if pairs.len() == 1 {
                Op::Put
            } else {
                Op::MultiPut
            },
            || {
                self.inner.check_open()?;
                if pairs.is_empty() {
                    return Ok(());
                }
                let mut size = 0u64;
                for p in pairs {
                    check_key(&p.key)?;
                    check_value(&p.value)?;
                    size += RecordBuilder::op_len(p.key.len(), p.value.len());
                }
                if size > self.inner.options.batch_limit() {
                    return Err(Error::BatchTooLarge {
                        bytes: size,
                        max: self.inner.options.batch_limit(),
                    });
                }
                let mut builder = RecordBuilder::new(None);
                let mut ops = Vec::with_capacity(pairs.len());
                for p in pairs {
                    let offset = builder.push_put(&p.key, &p.value, p.expire_ts);
                    ops.push(OpMeta {
                        offset,
                        len: RecordBuilder::op_len(p.key.len(), p.value.len()) as u32,
                        key_len: p.key.len() as u16,
                        expire_ts: p.expire_ts,
                        delete: false,
                    });
                }
                self.inner
                    .submit(WriteOp::new(WriteKind::Batch, builder, ops))
                    .map(drop)
            },
        )
    }

    fn get(&self, keys: &[&[u8]]) -> Result<Vec<KvPair>> {
        self.inner.measured(
            if keys.len() == 1 {
                Op::Get
            } else {
                Op::MultiGet
            },
            || {
                self.inner.check_open()?;
                let clock = &self.inner.options.clock;
                let state = self.inner.state.read();
                state.check_open()?;
                // Room for a single get's pair up front (growing an empty
                // vector by one costs more than allocating it).
                let mut out = Vec::with_capacity(usize::from(keys.len() == 1));
                let mut buf = Vec::new();
                let mut read = 0u64;
                let dir = &self.inner.dir;
                if let [key] = keys {
                    if let Some(entry) = state.live(key, clock) {
                        let reader = state.reader(entry.pointer.segment);
                        read += push_read(&mut out, &mut buf, dir, key, entry.pointer, reader)?;
                    }
                } else {
                    // Keys are looked up a window at a time (kept on the
                    // stack: no allocation), each value's cache lines asked
                    // for as its entry is found, then the window's values
                    // are read, so that their misses overlap.
                    let mut found = [None; GET_WINDOW];
                    for window in keys.chunks(GET_WINDOW) {
                        let mut len = 0;
                        for &key in window {
                            let Some(entry) = state.live(key, clock) else {
                                continue;
                            };
                            let reader = state.reader(entry.pointer.segment);
                            if let Some(r) = reader {
                                r.prefetch(entry.pointer);
                            }
                            found[len] = Some((key, entry.pointer, reader));
                            len += 1;
                        }
                        out.reserve(len);
                        for &(key, pointer, reader) in found[..len].iter().flatten() {
                            read += push_read(&mut out, &mut buf, dir, key, pointer, reader)?;
                        }
                    }
                }
                self.inner.count_read(read);
                Ok(out)
            },
        )
    }

    fn delete(&self, key: &[u8]) -> Result<()> {
        self.inner.measured(Op::Delete, || {
            self.inner.check_open()?;
            check_key(key)?;
            let mut builder = RecordBuilder::new(None);
            let offset = builder.push_delete(key);
            let ops = vec![OpMeta {
                offset,
                len: RecordBuilder::op_len(key.len(), 0) as u32,
                key_len: key.len() as u16,
                expire_ts: 0,
                delete: true,
            }];
            self.inner
                .submit(WriteOp::new(WriteKind::DeleteIfPresent, builder, ops))
                .map(drop)
        })
    }

    fn compare_and_set(&self, request: &CompareAndSetRequest) -> Result<bool> {
        self.inner.measured(Op::CompareAndSet, || {
            self.inner.check_open()?;
            check_key(&request.key)?;
            check_value(&request.new_value)?;
            let mut builder = RecordBuilder::new(None);
            let offset = builder.push_put(&request.key, &request.new_value, request.expire_ts);
            self.inner.check_batch_size(&builder)?;
            let ops = vec![OpMeta {
                offset,
                len: RecordBuilder::op_len(request.key.len(), request.new_value.len()) as u32,
                key_len: request.key.len() as u16,
                expire_ts: request.expire_ts,
                delete: false,
            }];
            let kind = WriteKind::CompareAndSet(request.old_value.clone());
            let outcome = self.inner.submit(WriteOp::new(kind, builder, ops))?;
            Ok(outcome.is_some())
        })
    }

    fn iterate(
        &self,
        options: &IterationOptions,
    ) -> Result<Box<dyn Iterator<Item = Result<KvPair>> + Send>> {
        Ok(Box::new(self.iter(options)?))
    }

    fn get_snapshot(&self) -> Result<Box<dyn std::io::Read + Send>> {
        self.inner.measured(Op::GetSnapshot, || {
            let reader: Box<dyn std::io::Read + Send> = Box::new(self.snapshot()?);
            Ok(reader)
        })
    }

    fn put_snapshot(&self, reader: &mut dyn std::io::Read) -> Result<()> {
        self.inner
            .measured(Op::PutSnapshot, || self.load_snapshot(reader).map(drop))
    }

    fn close(&self) -> Result<()> {
        self.inner.close()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.inner.close();
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("dir", &self.inner.dir)
            .field("last_change_number", &self.last_change_number())
            .finish_non_exhaustive()
    }
}

/// Size of a segment file's header; exposed for tools that cut files.
pub const SEGMENT_HEADER_BYTES: u64 = SEGMENT_HEADER_LEN as u64;
