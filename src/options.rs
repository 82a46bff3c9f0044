//! How a store is opened: durability, recovery policy, segment sizing and the
//! clock used for expiry. Policies are enums with named predicates; every
//! field documents its default and unit. No I/O happens here.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::log::FaultInjector;

/// Longest key accepted, in bytes (the on-disk key length is a `u16`).
pub const MAX_KEY_LEN: usize = u16::MAX as usize;

/// Longest value accepted, in bytes. A batch must also fit in
/// [`Options::max_batch_bytes`].
pub const MAX_VALUE_LEN: usize = 16 << 20;

/// When a write becomes durable.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SyncMode {
    /// Never `fdatasync` on the write path. Data reaches the disk when the
    /// operating system writes it back, at segment rollover, or at close. A
    /// crash may lose recent writes, never part of a batch.
    Never,
    /// Every write returns only after its record is durable. Concurrent
    /// writers share one `fdatasync` (group commit).
    Always,
    /// A background thread syncs at this interval; a crash may lose up to
    /// one interval of acknowledged writes.
    Interval(Duration),
}

impl SyncMode {
    /// Whether a write waits for its record to be durable before returning.
    pub fn waits_for_sync(self) -> bool {
        matches!(self, SyncMode::Always)
    }
}

/// What `open` does with damaged bytes it finds while rebuilding the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecoveryMode {
    /// Any damage, even a torn record at the end of the newest segment, is
    /// an error. Preallocated zeros after the last record are not damage.
    Strict,
    /// A torn or partial record at the end of the newest segment (bytes that
    /// were never synced) is cut off and reported; damage anywhere else is an
    /// error naming the file and offset. The default.
    TolerateTornTail,
    /// Like `TolerateTornTail`, and damaged ranges anywhere are skipped and
    /// reported instead of failing the open. Records in a skipped range are
    /// lost.
    TolerateAnyCorruption,
}

impl RecoveryMode {
    /// Whether a torn tail of the newest segment may be cut off.
    pub fn cuts_torn_tail(self) -> bool {
        !matches!(self, RecoveryMode::Strict)
    }

    /// Whether damage before the tail may be skipped.
    pub fn skips_corruption(self) -> bool {
        matches!(self, RecoveryMode::TolerateAnyCorruption)
    }
}

/// The source of "now" for expiry decisions, in Unix seconds.
#[derive(Clone, Default)]
pub enum Clock {
    /// The system clock. The default.
    #[default]
    System,
    /// A clock the caller moves by hand (tests, simulations).
    Manual(Arc<AtomicU64>),
}

impl Clock {
    /// A manual clock starting at `now` seconds.
    pub fn manual(now: u64) -> Self {
        Clock::Manual(Arc::new(AtomicU64::new(now)))
    }

    /// The current time in Unix seconds.
    pub fn now(&self) -> u64 {
        match self {
            Clock::System => SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            Clock::Manual(t) => t.load(Ordering::Relaxed),
        }
    }

    /// Whether a record with `expire_ts` is expired now (0 never expires;
    /// otherwise expired when `expire_ts <= now`).
    pub fn is_expired(&self, expire_ts: u64) -> bool {
        // The clock is read only for keys that expire at all.
        expire_ts != 0 && expire_ts <= self.now()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Clock::System => f.write_str("System"),
            Clock::Manual(t) => write!(f, "Manual({})", t.load(Ordering::Relaxed)),
        }
    }
}

/// How much of the log is kept for followers when merge would otherwise
/// drop it. A record is kept while any rule wants it; merge (and nothing
/// else) drops log, so until a merge runs nothing is dropped.
/// [`Store::retained_from`](crate::Store::retained_from) says where the
/// kept log starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    /// Keep at least the newest this many bytes of log, in bytes.
    /// Default: 1 GiB.
    pub bytes: u64,
    /// Keep records written within this long. Default: 1 hour.
    pub age: Duration,
    /// Keep every record a pinned follower has not confirmed
    /// ([`Store::pin_changes`](crate::Store::pin_changes)). Default: `true`.
    pub honour_pins: bool,
}

impl Retention {
    /// Keeps nothing for followers: merge may take every sealed segment
    /// (a store without replicas, or one whose followers can start again
    /// from a snapshot).
    pub fn none() -> Self {
        Retention {
            bytes: 0,
            age: Duration::ZERO,
            honour_pins: false,
        }
    }
}

impl Default for Retention {
    fn default() -> Self {
        Retention {
            bytes: 1 << 30,
            age: Duration::from_secs(3600),
            honour_pins: true,
        }
    }
}

/// When and how merge runs (DESIGN.md 18). Merge rewrites the live data
/// of a run of adjacent sealed segments into one merged segment, leaving
/// the log that [`Retention`] keeps for followers alone.
#[derive(Clone, Debug, PartialEq)]
pub struct MergeOptions {
    /// Merge in a background thread whenever a threshold below is crossed
    /// (checked at every rollover and every `check_interval`).
    /// Default: `true`.
    pub automatic: bool,
    /// A sealed segment is worth merging once this fraction of its bytes
    /// would be given back (overwritten, deleted and expired data, and the
    /// framing a merged segment does without). Default: 0.5.
    pub dead_ratio: f64,
    /// Every segment with anything to give back is merged once the store's
    /// segments take more than this many times the bytes a full merge
    /// would leave. Default: 2.0.
    pub space_amplification: f64,
    /// Upper bound on the bytes a merge writes per second; 0 for no bound.
    /// Default: 0.
    pub bytes_per_second: u64,
    /// How often the background thread checks the thresholds. Default: 10 s.
    pub check_interval: Duration,
}

impl Default for MergeOptions {
    fn default() -> Self {
        MergeOptions {
            automatic: true,
            dead_ratio: 0.5,
            space_amplification: 2.0,
            bytes_per_second: 0,
            check_interval: Duration::from_secs(10),
        }
    }
}

/// Settings for [`Store::open`](crate::Store::open).
#[derive(Clone, Debug)]
pub struct Options {
    /// When writes become durable. Default: [`SyncMode::Always`], as DKV
    /// opens its engines with sync writes.
    pub sync_mode: SyncMode,
    /// What to do with damage found at open. Default:
    /// [`RecoveryMode::TolerateTornTail`].
    pub recovery_mode: RecoveryMode,
    /// Size at which the active segment is sealed and a new one started, in
    /// bytes. Default: 64 MiB. Minimum: 4 KiB.
    pub segment_size: u64,
    /// Whether, under [`SyncMode::Always`], a new segment is filled with
    /// zeros up to `segment_size` when created, so that later appends and
    /// `fdatasync` do not change the file's size (about twice as fast per
    /// sync on ext4). Default: `true`. Under `Never` and `Interval` segments
    /// are never zero-filled: appending to a growing file takes ext4's
    /// delayed-allocation path, which made single puts 1.8x faster here,
    /// and there a sync is rare (with [`map_appends`](Self::map_appends)
    /// they are allocated 1 MiB ahead instead). See
    /// [`Options::preallocates`].
    pub preallocate: bool,
    /// Under [`SyncMode::Never`] and [`SyncMode::Interval`], append to the
    /// active segment by copying records into a shared writable map of it
    /// rather than with one `pwrite` each (DESIGN.md 2.4): no system call
    /// per write, which made single puts up to twice as fast here. The
    /// segment is then extended with allocated zeros (`fallocate`) 1 MiB
    /// at a time ahead of the records, so that a full disk fails that call
    /// with a typed error before any copy. Either way an acknowledged write
    /// is in the page cache (a process crash keeps it) and `fdatasync`
    /// makes it durable. Under [`SyncMode::Always`] appends always use
    /// `pwrite`: every sync would write-protect the copied pages again,
    /// which made durable puts slower. Turn it off on copy-on-write file
    /// systems (btrfs, ZFS, reflinked XFS files), where a write into a full
    /// disk through a map is a `SIGBUS` instead of an error, and where a
    /// failing disk must give typed errors: any failed write fault (an I/O
    /// error paging the tail back in, a file system shut down) is a
    /// `SIGBUS` too. Nothing acknowledged is lost either way. Default:
    /// `true`.
    pub map_appends: bool,
    /// Save the whole index as the `KEYDIR` file at a clean close, so that
    /// the next open loads it instead of reading every hint (DESIGN.md
    /// 2.8): a 1M-key store opened in 68 ms instead of 221 ms here. The
    /// file costs about 30 bytes plus the key per key on disk while the
    /// store is closed (46 MB for 1M 16-byte keys), and about 55 ms of close
    /// per 1M keys. Open uses and removes one whatever this says. Default:
    /// `true`.
    pub save_keydir: bool,
    /// Largest encoded batch accepted by one write, in bytes (the sum of
    /// 20 bytes plus key and value per pair). Default: 32 MiB. The limit in
    /// force is capped at what fits in one segment
    /// ([`Options::batch_limit`]).
    pub max_batch_bytes: u64,
    /// Clock for expiry. Default: the system clock.
    pub clock: Clock,
    /// Log kept for replication followers. Default: see [`Retention`].
    pub retention: Retention,
    /// Merge thresholds and pacing. Default: see [`MergeOptions`].
    pub merge: MergeOptions,
    /// Prometheus metrics (DKV's `Stat` and the store's gauges), registered
    /// into the given registry. Default: `None` (no metrics).
    pub metrics: Option<crate::metrics::MetricsOptions>,
    /// The file system every change on disk goes through. Default:
    /// [`StdFileSystem`](crate::StdFileSystem); tests put a recording or
    /// failing layer here ([`crate::crash::Recorder`]).
    pub file_system: Arc<dyn crate::FileSystem>,
    /// Test hook: fails a chosen file-system call (a layer over
    /// `file_system`). Default: `None`.
    pub fault_injector: Option<Arc<FaultInjector>>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            sync_mode: SyncMode::Always,
            recovery_mode: RecoveryMode::TolerateTornTail,
            segment_size: 64 << 20,
            preallocate: true,
            map_appends: true,
            save_keydir: true,
            max_batch_bytes: 32 << 20,
            clock: Clock::System,
            retention: Retention::default(),
            merge: MergeOptions::default(),
            metrics: None,
            file_system: Arc::new(crate::StdFileSystem),
            fault_injector: None,
        }
    }
}

impl Options {
    /// The batch size limit in force: `max_batch_bytes`, capped so that a
    /// batch always fits in an empty segment.
    pub fn batch_limit(&self) -> u64 {
        self.max_batch_bytes.min(
            self.segment_size
                .saturating_sub(crate::format::max_overhead()),
        )
    }

    /// The file system to use: `file_system`, behind the fault injector
    /// when there is one.
    pub(crate) fn io(&self) -> Arc<dyn crate::FileSystem> {
        match &self.fault_injector {
            Some(faults) => Arc::new(crate::log::Faulty {
                inner: Arc::clone(&self.file_system),
                faults: Arc::clone(faults),
            }),
            None => Arc::clone(&self.file_system),
        }
    }

    /// How the active segment is laid out and written to.
    pub(crate) fn segment_plan(&self) -> crate::log::SegmentPlan {
        crate::log::SegmentPlan {
            capacity: self.segment_size,
            preallocate: self.preallocates(),
            map_appends: self.map_appends && self.sync_mode != SyncMode::Always,
        }
    }

    /// Whether new segments are preallocated: `preallocate` under
    /// [`SyncMode::Always`].
    pub fn preallocates(&self) -> bool {
        self.preallocate && self.sync_mode == SyncMode::Always
    }

    /// Checks that the options can work together.
    pub(crate) fn validate(&self) -> Result<()> {
        if self.segment_size < 4096 {
            return Err(Error::InvalidOptions(format!(
                "segment_size {} is below the minimum of 4096 bytes",
                self.segment_size
            )));
        }
        if self.segment_size > u64::from(u32::MAX) {
            return Err(Error::InvalidOptions(format!(
                "segment_size {} exceeds the maximum of {} bytes",
                self.segment_size,
                u32::MAX
            )));
        }
        if self.max_batch_bytes == 0 {
            return Err(Error::InvalidOptions(
                "max_batch_bytes must be at least 1".into(),
            ));
        }
        let m = &self.merge;
        if !(m.dead_ratio > 0.0 && m.dead_ratio <= 1.0) {
            return Err(Error::InvalidOptions(format!(
                "merge.dead_ratio {} must be in (0, 1]",
                m.dead_ratio
            )));
        }
        if m.space_amplification.is_nan() || m.space_amplification < 1.0 {
            return Err(Error::InvalidOptions(format!(
                "merge.space_amplification {} must be at least 1",
                m.space_amplification
            )));
        }
        if m.check_interval.is_zero() {
            return Err(Error::InvalidOptions(
                "merge.check_interval must be non-zero".into(),
            ));
        }
        if let SyncMode::Interval(d) = self.sync_mode
            && d.is_zero()
        {
            return Err(Error::InvalidOptions(
                "SyncMode::Interval needs a non-zero interval".into(),
            ));
        }
        Ok(())
    }
}
