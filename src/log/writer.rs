//! The active segment (appends copied into a shared map of the file or
//! written with `pwrite`, into a zero-filled preallocated file or one
//! allocated a step ahead of the records) and group commit (concurrent
//! writers that need durability share one `fdatasync`). Must not touch the
//! index.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::fsutil::SyncFailedMarker;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::SegmentId;
use super::fs::{FileSystem, write_zeros};
use super::fsutil::{sync_dir, truncate_synced};
use super::mmap::MapWriter;
use crate::error::{Error, IoContext, Result};
use crate::format::{SEGMENT_HEADER_LEN, SegmentHeader, SegmentKind};

/// How far ahead of the records an unpreallocated segment that is appended
/// to through its map is extended (`FileSystem::allocate`): one
/// `fallocate` per this many bytes of records.
const EXTEND_STEP: u64 = 1 << 20;

/// Appends shorter than this are copied into the active segment's map;
/// longer ones are written with `pwrite`, which costs less than the page
/// faults of a copy that fills whole pages.
const MAP_COPY_LIMIT: usize = 2048;

/// How the active segment's file is laid out and written to.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SegmentPlan {
    /// The segment size at which it is sealed.
    pub(crate) capacity: u64,
    /// Zero-fill the file up to `capacity` when creating or taking it over.
    pub(crate) preallocate: bool,
    /// Append by copying into the shared map (`Options::map_appends`).
    pub(crate) map_appends: bool,
}

/// Name of the zero-filled file prepared in the background for the next
/// segment. Recovery ignores it (it is not a `.seg` file).
pub const SPARE_FILE: &str = "spare.seg.tmp";

/// Prepares the next segment's file in the background: the zero fill of a
/// preallocated segment takes about as long as writing it (a 64 MiB segment
/// at disk speed), which would otherwise stall writers at every rollover.
#[derive(Debug)]
pub(crate) struct Spare {
    job: Option<std::thread::JoinHandle<std::io::Result<File>>>,
    /// Asks the zero fill to stop (close does not wait for a spare it will
    /// never use).
    cancel: Arc<AtomicBool>,
}

impl Spare {
    /// Starts preparing a spare of `capacity` bytes in `dir`.
    pub(crate) fn start(dir: &Path, capacity: u64, fs: Arc<dyn FileSystem>) -> Spare {
        let path = dir.join(SPARE_FILE);
        let cancel = Arc::new(AtomicBool::new(false));
        let stop = Arc::clone(&cancel);
        let job = std::thread::Builder::new()
            .name(super::SPARE_THREAD.into())
            .spawn(move || {
                super::best_effort(|| {
                    let file = fs.create(&path, false)?;
                    write_zeros(&*fs, &file, 0, capacity, &stop)?;
                    fs.sync_all(&file)?;
                    Ok(file)
                })
            })
            .ok();
        Spare { job, cancel }
    }

    /// Stops preparing the spare and waits for its thread (close: the
    /// half-filled `spare.seg.tmp` is ignored by recovery and refilled by
    /// the next open).
    pub(crate) fn cancel(&mut self) {
        self.cancel.store(true, Ordering::Release);
        if let Some(job) = self.job.take() {
            let _ = job.join();
        }
    }

    /// Whether the spare is prepared (or failed): taking it will not wait.
    pub(crate) fn is_ready(&self) -> bool {
        self.job.as_ref().is_none_or(|j| j.is_finished())
    }

    /// Waits for the spare; `None` if preparing it failed (the caller then
    /// creates the segment itself). Called at close too, so that no
    /// background write outlives the handle.
    pub(crate) fn take(&mut self) -> Option<File> {
        self.job.take()?.join().ok()?.ok()
    }
}

/// The segment new records are appended to.
#[derive(Debug)]
pub(crate) struct ActiveSegment {
    /// The segment's id.
    pub(crate) id: SegmentId,
    /// The open file, shared with readers for positional reads.
    pub(crate) file: Arc<File>,
    /// The file's path.
    pub(crate) path: PathBuf,
    /// Logical position of the first record.
    pub(crate) base_position: u64,
    /// File offset at which the next record goes.
    pub(crate) offset: u64,
    /// The segment size at which it is sealed.
    pub(crate) capacity: u64,
    /// A shared map of the file, `capacity` bytes long: readers read the
    /// published bytes through it, and with `map_appends` the writer copies
    /// records into it (records beyond the capacity, from a batch larger
    /// than a segment, are written with `pwrite` and read with `pread`).
    pub(crate) map: Option<MapWriter>,
    /// Append through `map` rather than with `pwrite`.
    map_appends: bool,
    /// The length up to which this writer made the file hold allocated
    /// blocks (zero-filled, `fallocate`d or written): with `map_appends`,
    /// bytes are copied into the map only below it (a copy past the end of
    /// the file, or into a hole on a full disk, would be a `SIGBUS`).
    backed: u64,
    /// CRC-32 of the file's bytes so far (header and records), kept while
    /// appending so that sealing knows the sealed file's checksum without
    /// reading it back; `None` for a segment taken over at open.
    crc: Option<crc32fast::Hasher>,
}

impl ActiveSegment {
    /// Creates a new segment file: header, zero fill up to `capacity` when
    /// `preallocate`, `fsync` of the file and of the directory.
    pub(crate) fn create(
        dir: &Path,
        id: SegmentId,
        base_position: u64,
        plan: SegmentPlan,
        fs: &dyn FileSystem,
    ) -> Result<Self> {
        let path = id.path_in(dir);
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            id,
            base_position,
        };
        let file = fs
            .create(&path, true)
            .context(|| format!("create segment {}", path.display()))?;
        fs.write_at(&file, &header.encode(), 0)
            .context(|| format!("write header of segment {}", path.display()))?;
        let mut seg = ActiveSegment {
            id,
            file: Arc::new(file),
            path,
            base_position,
            offset: SEGMENT_HEADER_LEN as u64,
            capacity: plan.capacity,
            map: None,
            map_appends: plan.map_appends,
            backed: SEGMENT_HEADER_LEN as u64,
            crc: Some(hasher_with(&header.encode())),
        };
        if plan.preallocate {
            seg.zero_fill(fs)?;
        }
        fs.sync_all(&seg.file)
            .context(|| format!("sync new segment {}", seg.path.display()))?;
        sync_dir(dir, fs)?;
        seg.map_file()?;
        Ok(seg)
    }

    /// Creates a new segment from a prepared spare when there is one (a
    /// header write, one sync, a rename and a folder sync), else as
    /// [`ActiveSegment::create`] does.
    pub(crate) fn create_from_spare(
        dir: &Path,
        id: SegmentId,
        base_position: u64,
        plan: SegmentPlan,
        spare: &mut Spare,
        fs: &dyn FileSystem,
    ) -> Result<Self> {
        let Some(file) = spare.take() else {
            let plan = SegmentPlan {
                preallocate: true,
                ..plan
            };
            return Self::create(dir, id, base_position, plan, fs);
        };
        let path = id.path_in(dir);
        let header = SegmentHeader {
            kind: SegmentKind::Log,
            id,
            base_position,
        };
        fs.write_at(&file, &header.encode(), 0)
            .and_then(|()| fs.sync_data(&file))
            .and_then(|()| fs.rename(&dir.join(SPARE_FILE), &path))
            .context(|| format!("turn the spare file into segment {}", path.display()))?;
        sync_dir(dir, fs)?;
        let len = file
            .metadata()
            .context(|| format!("stat segment {}", path.display()))?
            .len();
        let mut seg = ActiveSegment {
            id,
            file: Arc::new(file),
            path,
            base_position,
            offset: SEGMENT_HEADER_LEN as u64,
            capacity: plan.capacity.min(len).max(SEGMENT_HEADER_LEN as u64),
            map: None,
            map_appends: plan.map_appends,
            backed: len,
            crc: Some(hasher_with(&header.encode())),
        };
        seg.map_file()?;
        Ok(seg)
    }

    /// Takes over an existing segment whose valid records end at `offset`
    /// (recovery has cut anything after it).
    pub(crate) fn reopen(
        path: &Path,
        id: SegmentId,
        base_position: u64,
        offset: u64,
        plan: SegmentPlan,
        fs: &dyn FileSystem,
    ) -> Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .context(|| format!("open segment {}", path.display()))?;
        let len = file
            .metadata()
            .context(|| format!("stat segment {}", path.display()))?
            .len();
        let mut seg = ActiveSegment {
            id,
            file: Arc::new(file),
            path: path.to_path_buf(),
            base_position,
            offset,
            capacity: plan.capacity.max(offset),
            map: None,
            map_appends: plan.map_appends,
            // Not `len`: the zeros after the records may be a hole (a copy
            // of the store made by a sparse-aware tool), which a copy into
            // the map on a full disk would turn into a `SIGBUS`. The first
            // append allocates from the records' end (a no-op where the
            // blocks exist).
            backed: offset,
            crc: None,
        };
        if plan.preallocate && len < seg.capacity {
            seg.zero_fill(fs)?;
        }
        // What recovery found may still sit only in the page cache (the last
        // process wrote without syncing and exited). Make it durable before
        // the store reports it as such and stamps it as synced in new records.
        fs.sync_all(&seg.file)
            .context(|| format!("sync segment {}", path.display()))?;
        seg.map_file()?;
        Ok(seg)
    }

    /// Maps the file, `capacity` bytes long whether or not the file is that
    /// long yet: readers read only below the published offset, and the
    /// writer copies only below `backed`, both of which the file reaches.
    fn map_file(&mut self) -> Result<()> {
        let map = MapWriter::new(&self.file, self.capacity, self.offset, self.map_appends)
            .context(|| format!("map segment {}", self.path.display()))?;
        self.map = Some(map);
        Ok(())
    }

    /// Writes zeros from the current length up to the capacity, so later
    /// appends overwrite allocated blocks and do not grow the file.
    fn zero_fill(&mut self, fs: &dyn FileSystem) -> Result<()> {
        let len = self
            .file
            .metadata()
            .context(|| format!("stat segment {}", self.path.display()))?
            .len();
        write_zeros(
            fs,
            &self.file,
            len.max(self.offset),
            self.capacity,
            &AtomicBool::new(false),
        )
        .context(|| format!("preallocate segment {}", self.path.display()))?;
        self.backed = self.backed.max(self.capacity);
        Ok(())
    }

    /// Logical position at which the next record starts.
    pub(crate) fn position(&self) -> u64 {
        self.base_position + (self.offset - SEGMENT_HEADER_LEN as u64)
    }

    /// Whether a record of `len` bytes still fits.
    pub(crate) fn fits(&self, len: u64) -> bool {
        self.offset + len <= self.capacity
    }

    /// Whether the segment holds no record yet.
    pub(crate) fn is_empty(&self) -> bool {
        self.offset == SEGMENT_HEADER_LEN as u64
    }

    /// Writes records at the current offset and advances past them.
    pub(crate) fn append(&mut self, bytes: &[u8], fs: &dyn FileSystem) -> Result<()> {
        let end = self.offset + bytes.len() as u64;
        match &mut self.map {
            Some(map) if self.map_appends && end <= self.capacity => {
                if end > self.backed {
                    // Allocated zeros ahead of the records: a full disk
                    // fails here, with an error, rather than in a copy.
                    let to = end.next_multiple_of(EXTEND_STEP).min(self.capacity);
                    fs.allocate(&self.file, self.backed, to)
                        .context(|| format!("extend segment {}", self.id))?;
                    self.backed = to;
                }
                if fs.writes_through_maps() && bytes.len() < MAP_COPY_LIMIT {
                    map.write(self.offset, bytes, self.backed)
                } else {
                    fs.write_at(&self.file, bytes, self.offset)
                }
            }
            _ => fs.write_at(&self.file, bytes, self.offset),
        }
        .context(|| format!("append to segment {}", self.id))?;
        self.offset = end;
        self.backed = self.backed.max(end);
        if let Some(map) = &mut self.map {
            map.publish(self.offset);
        }
        if let Some(crc) = &mut self.crc {
            crc.update(bytes);
        }
        Ok(())
    }

    /// Makes the segment immutable: syncs its data and cuts the file to the
    /// records' end (dropping preallocated zeros). Returns the sealed file's
    /// CRC-32 when it was tracked.
    pub(crate) fn seal(&mut self, fs: &dyn FileSystem) -> Result<Option<u32>> {
        fs.sync_data(&self.file)
            .context(|| format!("sync segment {}", self.id))?;
        // Whatever happens next, nothing beyond the records is backed.
        self.backed = self.offset;
        truncate_synced(&self.file, &self.path, self.offset, fs)?;
        Ok(self.crc.clone().map(crc32fast::Hasher::finalize))
    }
}

fn hasher_with(bytes: &[u8]) -> crc32fast::Hasher {
    let mut h = crc32fast::Hasher::new();
    h.update(bytes);
    h
}

/// Group commit: tracks how far the log is written and how far it is
/// durable, and elects one waiting writer to `fdatasync` for everyone.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    written: AtomicU64,
    durable: AtomicU64,
    syncs: AtomicU64,
    /// Moving average of `fdatasync` durations, in nanoseconds.
    sync_nanos: AtomicU64,
    /// Protects the sync election and the file to sync. Lock order: taken
    /// after the writer lock when both are held, never before it.
    inner: Mutex<SyncInner>,
    done: Condvar,
    /// Where a failed sync is recorded for the next open.
    marker: SyncFailedMarker,
    /// Where the syncs (and the marker) go.
    fs: Arc<dyn FileSystem>,
}

#[derive(Debug)]
struct SyncInner {
    /// A writer is running `fdatasync` right now.
    syncing: bool,
    /// The active segment's file.
    file: Arc<File>,
    /// Set when a sync failed; every later write fails.
    poisoned: Option<String>,
}

impl GroupCommit {
    /// Starts with everything up to `position` written and durable; a
    /// failed sync is recorded in `dir`.
    pub(crate) fn new(file: Arc<File>, position: u64, dir: &Path, fs: Arc<dyn FileSystem>) -> Self {
        GroupCommit {
            written: AtomicU64::new(position),
            durable: AtomicU64::new(position),
            syncs: AtomicU64::new(0),
            sync_nanos: AtomicU64::new(0),
            inner: Mutex::new(SyncInner {
                syncing: false,
                file,
                poisoned: None,
            }),
            done: Condvar::new(),
            marker: SyncFailedMarker::in_dir(dir),
            fs,
        }
    }

    /// Logical position up to which records are written.
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Acquire)
    }

    /// Logical position up to which records are known durable.
    pub(crate) fn durable(&self) -> u64 {
        self.durable.load(Ordering::Acquire)
    }

    /// Number of `fdatasync` calls made for group commit.
    pub(crate) fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// Moving average of an `fdatasync`'s duration (zero before the first).
    pub(crate) fn sync_time(&self) -> Duration {
        Duration::from_nanos(self.sync_nanos.load(Ordering::Relaxed))
    }

    /// Records that the log is written up to `position`.
    pub(crate) fn set_written(&self, position: u64) {
        self.written.store(position, Ordering::Release);
    }

    /// After a rollover: the old segment is synced up to `durable`, and new
    /// records go to `file`.
    pub(crate) fn switch_file(&self, file: Arc<File>, durable: u64) {
        let mut g = self.inner.lock();
        g.file = file;
        self.durable.fetch_max(durable, Ordering::AcqRel);
    }

    /// The failure that poisoned the writer, if any.
    pub(crate) fn poisoned(&self) -> Option<String> {
        self.inner.lock().poisoned.clone()
    }

    /// Starts over on `file` with everything up to `position` written and
    /// durable, clearing a poison (the store's contents were replaced).
    pub(crate) fn reset(&self, file: Arc<File>, position: u64) {
        let mut g = self.inner.lock();
        g.file = file;
        g.poisoned = None;
        self.written.store(position, Ordering::Release);
        self.durable.store(position, Ordering::Release);
    }

    /// Marks the writer as poisoned by `cause`.
    pub(crate) fn poison(&self, cause: String) {
        let mut g = self.inner.lock();
        g.poisoned.get_or_insert(cause);
        self.done.notify_all();
    }

    /// Marks the writer as poisoned by a failed `fdatasync`. Such a failure
    /// means the page cache may hold bytes the disk never got, and Linux
    /// reports it only once, so a later open could read those bytes back
    /// and take them for durable. The last durable position is recorded
    /// (best effort) so that the next open cuts everything after it.
    pub(crate) fn sync_failed(&self, cause: String) {
        self.poison(cause);
        self.marker.record(self.durable(), &*self.fs);
    }

    /// Returns once everything up to `target` is durable, syncing if no
    /// other writer is already doing so.
    pub(crate) fn wait_durable(&self, target: u64) -> Result<()> {
        if self.durable() >= target {
            return Ok(());
        }
        let mut g = self.inner.lock();
        loop {
            if let Some(cause) = &g.poisoned {
                return Err(Error::Poisoned {
                    cause: cause.clone(),
                });
            }
            if self.durable() >= target {
                return Ok(());
            }
            if g.syncing {
                self.done.wait(&mut g);
                continue;
            }
            g.syncing = true;
            let file = Arc::clone(&g.file);
            let upto = self.written();
            drop(g);
            let started = Instant::now();
            let result = self.fs.sync_data(&file);
            self.syncs.fetch_add(1, Ordering::Relaxed);
            let took = started.elapsed().as_nanos().min(u128::from(u64::MAX)) as u64;
            let avg = self.sync_nanos.load(Ordering::Relaxed);
            let avg = if avg == 0 {
                took
            } else {
                avg - avg / 8 + took / 8
            };
            self.sync_nanos.store(avg, Ordering::Relaxed);
            g = self.inner.lock();
            g.syncing = false;
            match result {
                Ok(()) => {
                    self.durable.fetch_max(upto, Ordering::AcqRel);
                }
                Err(e) => {
                    let err = Error::io("sync the active segment", e);
                    // Poison before anyone can see `syncing` cleared: a
                    // second fsync would "succeed" (Linux reports a
                    // writeback error once) and bless lost data.
                    g.poisoned.get_or_insert_with(|| err.chain());
                    self.done.notify_all();
                    drop(g);
                    self.marker.record(self.durable(), &*self.fs);
                    return Err(err);
                }
            }
            self.done.notify_all();
        }
    }

    /// Syncs everything written so far.
    pub(crate) fn sync_all_written(&self) -> Result<()> {
        self.wait_durable(self.written())
    }
}
