//! Per-segment accounting: how many of each segment's bytes hold live
//! data, kept exact by every index update (writes, deletes, merge
//! relocations) and rebuilt at open from the index. Merge chooses what to
//! rewrite from it; `Store::stats` reports it. Must not do I/O.

use crate::format::{MERGED_CN_LEN, RECORD_HEADER_LEN, SegmentKind};
use crate::keydir::KeyEntry;
use crate::log::SegmentId;

/// A merged record groups operations up to about this many bytes.
pub(crate) const MERGED_BLOCK_BYTES: usize = 64 << 10;

/// What the store knows about one segment's bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) kind: SegmentKind,
    /// Start of the log range the segment covers.
    pub(crate) base: u64,
    /// End of the covered range (for the active segment: as far as written
    /// when last sealed or opened; see `Store::stats`).
    pub(crate) end: u64,
    /// File bytes holding the segment's headers and records.
    pub(crate) bytes: u64,
    /// Bytes of the live keys' put operations in it.
    pub(crate) live: u64,
    /// Number of live keys whose put is in it.
    pub(crate) live_keys: u64,
    /// Bytes of delete operations (tombstones) in it.
    pub(crate) tombstones: u64,
    /// Bytes of live puts that carry an expiry.
    pub(crate) expiring: u64,
    /// No live put in it expires before this (Unix seconds; `u64::MAX`
    /// when none expires). A lower bound: not raised when keys leave.
    pub(crate) first_expiry: u64,
}

impl Usage {
    /// An empty segment of `kind` covering `base..end` in `bytes` bytes.
    pub(crate) fn new(kind: SegmentKind, base: u64, end: u64, bytes: u64) -> Self {
        Usage {
            kind,
            base,
            end,
            bytes,
            live: 0,
            live_keys: 0,
            tombstones: 0,
            expiring: 0,
            first_expiry: u64::MAX,
        }
    }

    pub(crate) fn add(&mut self, e: &KeyEntry) {
        self.live += u64::from(e.pointer.len);
        self.live_keys += 1;
        if e.expire_ts != 0 {
            self.expiring += u64::from(e.pointer.len);
            self.first_expiry = self.first_expiry.min(e.expire_ts);
        }
    }

    pub(crate) fn remove(&mut self, e: &KeyEntry) {
        self.live = self.live.saturating_sub(u64::from(e.pointer.len));
        self.live_keys = self.live_keys.saturating_sub(1);
        if e.expire_ts != 0 {
            self.expiring = self.expiring.saturating_sub(u64::from(e.pointer.len));
        }
    }

    /// Bytes a merge of this segment would write, at most (before
    /// expiry): its live puts and its tombstones, re-framed as merged
    /// records, plus the merged segment's headers when it stands alone.
    pub(crate) fn merged_estimate(&self, now: u64) -> u64 {
        let expired = if self.first_expiry <= now {
            self.expiring
        } else {
            0
        };
        let ops = self.live - expired + self.tombstones;
        let per_op = MERGED_CN_LEN as u64;
        // Tombstones are at least 21 bytes each: count them generously.
        let op_count = self.live_keys + self.tombstones / 21;
        ops + per_op * op_count + (ops / MERGED_BLOCK_BYTES as u64 + 1) * RECORD_HEADER_LEN as u64
    }

    /// Bytes a merge would give back, as a fraction of the segment's bytes.
    pub(crate) fn reclaimable_ratio(&self, now: u64) -> f64 {
        if self.bytes == 0 {
            return 0.0;
        }
        let keep = self.merged_estimate(now) + SegmentKind::Merged.records_start() as u64;
        self.bytes.saturating_sub(keep) as f64 / self.bytes as f64
    }
}

/// One segment as [`Store::stats`](crate::Store::stats) reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentStats {
    /// The segment's id (its file name).
    pub id: SegmentId,
    /// Log segment or merge output.
    pub kind: SegmentKind,
    /// Whether writes go to it now.
    pub active: bool,
    /// Start of the log range it covers.
    pub base_position: u64,
    /// End of the log range it covers.
    pub end_position: u64,
    /// File bytes holding headers and records.
    pub bytes: u64,
    /// Bytes of the operations of live, unexpired keys.
    pub live_bytes: u64,
    /// Everything else: overwritten, deleted and expired operations,
    /// tombstones, record and segment headers.
    pub dead_bytes: u64,
    /// Live, unexpired keys whose value is in it.
    pub live_keys: u64,
}

/// What [`Store::stats`](crate::Store::stats) reports.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreStats {
    /// Every segment, in log order.
    pub segments: Vec<SegmentStats>,
    /// Live, unexpired keys.
    pub keys: u64,
    /// Sum of the segments' live bytes.
    pub live_bytes: u64,
    /// Sum of the segments' dead bytes.
    pub dead_bytes: u64,
    /// Bytes of keys and values of the live keys (the user's data).
    pub data_bytes: u64,
    /// Merges completed since open.
    pub merges: u64,
    /// Segment bytes given back by those merges.
    pub merged_bytes_reclaimed: u64,
}

impl StoreStats {
    /// Bytes of all segments (`live_bytes + dead_bytes`).
    pub fn disk_bytes(&self) -> u64 {
        self.live_bytes + self.dead_bytes
    }

    /// Segment bytes per byte of key and value data (1.0 is no overhead).
    pub fn space_amplification(&self) -> f64 {
        if self.data_bytes == 0 {
            return 0.0;
        }
        self.disk_bytes() as f64 / self.data_bytes as f64
    }
}
