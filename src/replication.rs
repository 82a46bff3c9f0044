//! The log as a replication feed: DKV's `ChangePropagator` (a master hands
//! out committed changes by change number) and `ChangeApplier` (a slave
//! applies them and remembers how far it got), the sparse index that finds a
//! change number's record without scanning, and a follower loop. Change
//! numbers are log positions (DESIGN.md, "Change numbers"); the feed serves
//! only durable records, so a number a follower saw is never reused.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::error::{Error, Result};
use crate::format::{
    OpKind, RECORD_HEADER_LEN, Record, RecordBuilder, SEGMENT_HEADER_LEN, decode_header,
    decode_record,
};
use crate::log::SegmentId;
use crate::options::{MAX_KEY_LEN, MAX_VALUE_LEN};
use crate::serverpb::trxn_record::TrxnType;
use crate::serverpb::{ChangeRecord, TrxnRecord};
use crate::store::{OpMeta, SegmentReader, Store, WriteKind, WriteOp};

/// DKV's `ChangePropagator`: the master side of replication.
pub trait ChangePropagator {
    /// The change number of the newest durable record (the log position at
    /// its end); 0 for an empty store.
    fn latest_committed_change_number(&self) -> Result<u64>;

    /// Up to `max` change records in log order, starting with the record
    /// whose number range contains `from` (`from == 0` means the oldest
    /// available). Empty when `from` is past the latest number or `max` is
    /// 0. [`Error::ChangesCompacted`] when `from` is older than the log
    /// still holds.
    fn load_changes(&self, from: u64, max: usize) -> Result<Vec<ChangeRecord>>;
}

/// DKV's `ChangeApplier`: the slave side of replication.
pub trait ChangeApplier {
    /// The master's change number reached by the changes applied so far;
    /// durable together with the data it covers.
    fn latest_applied_change_number(&self) -> Result<u64>;

    /// Applies each change atomically together with the master's change
    /// number it reaches (`change_number + number_of_trxns - 1`), skipping
    /// changes already applied. Stops at the first failure. Returns the
    /// applied number reached, and the error if one stopped the call.
    fn save_changes(&self, changes: &[ChangeRecord]) -> (u64, Result<()>);
}

/// Log bytes between two entries of the sparse change index.
const INDEX_STRIDE: u64 = 64 << 10;

/// A sparse index of record starts: log position → (segment, file offset).
/// It holds the first record of every segment and at least one record per
/// [`INDEX_STRIDE`] bytes of log, so finding a change number reads at most
/// that much before the record.
#[derive(Debug, Default)]
pub(crate) struct ChangeIndex {
    starts: BTreeMap<u64, (SegmentId, u64)>,
    last: Option<(u64, SegmentId)>,
}

impl ChangeIndex {
    /// Notes a record starting at log position `start`, at `offset` of
    /// `segment`. Records must be noted in log order.
    pub(crate) fn note(&mut self, start: u64, segment: SegmentId, offset: u64) {
        let due = match self.last {
            None => true,
            Some((pos, seg)) => seg != segment || start >= pos + INDEX_STRIDE,
        };
        if due {
            self.starts.insert(start, (segment, offset));
            self.last = Some((start, segment));
        }
    }

    /// The kept record starts of `segment`: (log position, file offset).
    pub(crate) fn starts_in(
        &self,
        segment: SegmentId,
    ) -> impl Iterator<Item = (u64, u64)> + use<'_> {
        self.starts
            .iter()
            .filter(move |(_, (s, _))| *s == segment)
            .map(|(&p, &(_, o))| (p, o))
    }

    /// Every noted start: (log position, segment, file offset), ascending.
    pub(crate) fn starts(&self) -> impl Iterator<Item = (u64, SegmentId, u64)> + use<'_> {
        self.starts.iter().map(|(&p, &(s, o))| (p, s, o))
    }

    /// The last start noted: (log position, segment).
    pub(crate) fn last(&self) -> Option<(u64, SegmentId)> {
        self.last
    }

    /// Restores a start saved from [`starts`](Self::starts).
    pub(crate) fn insert_start(&mut self, position: u64, segment: SegmentId, offset: u64) {
        self.starts.insert(position, (segment, offset));
    }

    /// Restores the value saved from [`last`](Self::last).
    pub(crate) fn set_last(&mut self, last: Option<(u64, SegmentId)>) {
        self.last = last;
    }

    /// Stops serving every record that starts below `position` (merged
    /// away, or older than a merged range: the feed is a gapless suffix).
    pub(crate) fn forget_below(&mut self, position: u64) {
        self.starts = self.starts.split_off(&position);
    }

    /// The oldest change number the log holds (its first record's start
    /// plus one), if any record exists.
    pub(crate) fn oldest(&self) -> Option<u64> {
        self.starts.keys().next().map(|s| s + 1)
    }

    /// The indexed record start at or before the record holding `number`.
    fn seek(&self, number: u64) -> Option<(u64, SegmentId, u64)> {
        self.starts
            .range(..number)
            .next_back()
            .map(|(&p, &(s, o))| (p, s, o))
    }
}

/// Builds the DKV change record of one of our records.
fn change_record(record: &Record<'_>) -> ChangeRecord {
    let mut trxns: Vec<TrxnRecord> = record
        .ops()
        .map(|(_, op)| TrxnRecord {
            r#type: match op.kind {
                OpKind::Put => TrxnType::Put,
                OpKind::Delete => TrxnType::Delete,
            } as i32,
            key: op.key.to_vec(),
            value: op.value.to_vec(),
            expire_ts: op.expire_ts,
        })
        .collect();
    if trxns.is_empty() {
        // An applier's record of a change whose operations were all of
        // unknown types: one unknown operation keeps the DKV arithmetic
        // (`change_number + number_of_trxns - 1` = the record's end) whole.
        trxns.push(TrxnRecord::default());
    }
    let n = trxns.len() as u64;
    ChangeRecord {
        serialised_form: record.bytes().to_vec(),
        change_number: record.header.change_number + 1 - n,
        number_of_trxns: n as u32,
        trxns,
    }
}

/// An operation of a change, ready to apply.
pub(crate) enum ChangeOp {
    Put {
        key: Vec<u8>,
        value: Vec<u8>,
        expire_ts: u64,
    },
    Delete {
        key: Vec<u8>,
    },
}

fn invalid(change_number: u64, reason: impl Into<String>) -> Error {
    Error::InvalidChange {
        change_number,
        reason: reason.into(),
    }
}

/// The master's change number a change record brings its applier to.
pub(crate) fn last_number(change: &ChangeRecord) -> Result<u64> {
    let n = u64::from(change.number_of_trxns.max(1));
    change
        .change_number
        .checked_add(n - 1)
        .filter(|_| change.change_number > 0)
        .ok_or_else(|| invalid(change.change_number, "change number out of range"))
}

/// The operations of a change: from its `serialised_form` when that is one
/// of our records (verified), else from its `trxns` (any DKV master).
pub(crate) fn change_ops(change: &ChangeRecord) -> Result<Vec<ChangeOp>> {
    let cn = change.change_number;
    let last = last_number(change)?;
    let form = &change.serialised_form;
    // Our records carry their end position (= the last number) at bytes
    // 24..32 of the header; a RocksDB master's batch does not.
    let ours = form.len() >= RECORD_HEADER_LEN
        && form
            .get(24..32)
            .map(|b| u64::from_le_bytes(b.try_into().unwrap_or_default()))
            == Some(last);
    if ours {
        let record =
            decode_record(form).map_err(|e| invalid(cn, format!("serialised form: {e}")))?;
        if record.bytes().len() != form.len() {
            return Err(invalid(cn, "serialised form has bytes after its record"));
        }
        if record.header.kind != crate::format::RecordKind::Batch {
            return Err(invalid(cn, "serialised form is not a log record"));
        }
        let count = u64::from(record.header.op_count.max(1));
        if count != u64::from(change.number_of_trxns.max(1)) {
            return Err(invalid(
                cn,
                "number_of_trxns does not match the serialised form",
            ));
        }
        return Ok(record
            .ops()
            .map(|(_, op)| match op.kind {
                OpKind::Put => ChangeOp::Put {
                    key: op.key.to_vec(),
                    value: op.value.to_vec(),
                    expire_ts: op.expire_ts,
                },
                OpKind::Delete => ChangeOp::Delete {
                    key: op.key.to_vec(),
                },
            })
            .collect());
    }
    if change.trxns.is_empty() {
        return Err(invalid(
            cn,
            "neither trxns nor a serialised form this engine can verify",
        ));
    }
    let mut ops = Vec::with_capacity(change.trxns.len());
    for t in &change.trxns {
        let kind = TrxnType::try_from(t.r#type)
            .map_err(|_| invalid(cn, format!("unknown transaction type {}", t.r#type)))?;
        if kind != TrxnType::Unknown {
            if t.key.is_empty() || t.key.len() > MAX_KEY_LEN {
                return Err(invalid(cn, format!("key of {} bytes", t.key.len())));
            }
            if t.value.len() > MAX_VALUE_LEN {
                return Err(invalid(cn, format!("value of {} bytes", t.value.len())));
            }
        }
        match kind {
            TrxnType::Put => ops.push(ChangeOp::Put {
                key: t.key.clone(),
                value: t.value.clone(),
                expire_ts: t.expire_ts,
            }),
            TrxnType::Delete => ops.push(ChangeOp::Delete { key: t.key.clone() }),
            // DKV's appliers skip operations of unknown type (RocksDB merge
            // and log-data records).
            TrxnType::Unknown => {}
        }
    }
    Ok(ops)
}

/// Encodes a change as one of our records carrying the applied number.
fn write_op(ops: &[ChangeOp], applied: u64) -> WriteOp {
    let mut builder = RecordBuilder::new(Some(applied));
    let mut metas = Vec::with_capacity(ops.len());
    for op in ops {
        let meta = match op {
            ChangeOp::Put {
                key,
                value,
                expire_ts,
            } => OpMeta {
                offset: builder.push_put(key, value, *expire_ts),
                len: RecordBuilder::op_len(key.len(), value.len()) as u32,
                key_len: key.len() as u16,
                expire_ts: *expire_ts,
                delete: false,
            },
            ChangeOp::Delete { key } => OpMeta {
                offset: builder.push_delete(key),
                len: RecordBuilder::op_len(key.len(), 0) as u32,
                key_len: key.len() as u16,
                expire_ts: 0,
                delete: true,
            },
        };
        metas.push(meta);
    }
    let mut op = WriteOp::new(WriteKind::Batch, builder, metas);
    op.applied = Some(applied);
    op
}

impl ChangePropagator for Store {
    fn latest_committed_change_number(&self) -> Result<u64> {
        self.inner.check_open()?;
        Ok(self.inner.commit.durable())
    }

    fn load_changes(&self, from: u64, max: usize) -> Result<Vec<ChangeRecord>> {
        self.inner.measured(crate::metrics::Op::LoadChanges, || {
            self.load_changes_unmeasured(from, max)
        })
    }
}

impl Store {
    fn load_changes_unmeasured(&self, from: u64, max: usize) -> Result<Vec<ChangeRecord>> {
        self.inner.check_open()?;
        let durable = self.inner.commit.durable();
        if max == 0 || from > durable {
            return Ok(Vec::new());
        }
        // Find where to start and take the segment readers; then read with
        // no lock held.
        let (from, start, readers) = {
            let state = self.inner.state.read();
            state.check_open()?;
            let Some(oldest) = state.changes.oldest() else {
                // Every record up to `durable` was merged away.
                if from == 0 {
                    return Ok(Vec::new());
                }
                return Err(Error::ChangesCompacted {
                    requested: from,
                    oldest_available: durable + 1,
                });
            };
            let from = if from == 0 { oldest } else { from };
            if from < oldest {
                return Err(Error::ChangesCompacted {
                    requested: from,
                    oldest_available: oldest,
                });
            }
            let start = state.changes.seek(from).ok_or(Error::ChangesCompacted {
                requested: from,
                oldest_available: oldest,
            })?;
            // Only log segments hold the feed; merged ones (whose ids
            // interleave) cover older positions.
            let readers: Vec<(SegmentId, Arc<SegmentReader>)> = state
                .segments
                .range(start.1..)
                .filter(|(id, _)| {
                    state
                        .usage
                        .get(id)
                        .is_some_and(|u| u.kind == crate::format::SegmentKind::Log)
                })
                .map(|(&id, r)| (id, Arc::clone(r)))
                .collect();
            (from, start, readers)
        };
        let (mut position, _, mut offset) = start;
        let mut out = Vec::with_capacity(max.min(1024));
        let mut buf = Vec::new();
        'segments: for (i, (id, reader)) in readers.iter().enumerate() {
            if i > 0 {
                offset = SEGMENT_HEADER_LEN as u64;
            }
            loop {
                // No durable record starts at or past the durable position,
                // and the bytes there may be a group being copied in right
                // now (at a rollover, the first record of the new segment):
                // reading them could find a header half written.
                if position >= durable {
                    break 'segments;
                }
                let path = || id.path_in(&self.inner.dir);
                let header = match reader.read(offset, RECORD_HEADER_LEN, &mut buf)? {
                    Some(h) if h.iter().any(|&b| b != 0) => decode_header(h)
                        .map_err(|e| Error::corruption(path(), offset, e.to_string()))?,
                    // The end of this segment's records.
                    _ => continue 'segments,
                };
                let len = header.record_len() as usize;
                let end = header.change_number;
                if end > durable {
                    break 'segments;
                }
                if end - header.record_len() != position {
                    return Err(Error::corruption(
                        path(),
                        offset,
                        format!(
                            "the log jumps from position {position} to a record ending at {end}"
                        ),
                    ));
                }
                if end >= from {
                    let bytes = reader
                        .read(offset, len, &mut buf)?
                        .ok_or_else(|| Error::corruption(path(), offset, "record cut short"))?;
                    let record = decode_record(bytes)
                        .map_err(|e| Error::corruption(path(), offset, e.to_string()))?;
                    out.push(change_record(&record));
                    if out.len() >= max {
                        break 'segments;
                    }
                }
                position = end;
                offset += len as u64;
            }
        }
        Ok(out)
    }
}

impl ChangeApplier for Store {
    fn latest_applied_change_number(&self) -> Result<u64> {
        self.inner.check_open()?;
        Ok(self.inner.applied.load(Ordering::Acquire))
    }

    fn save_changes(&self, changes: &[ChangeRecord]) -> (u64, Result<()>) {
        let mut applied = 0;
        let result = self.inner.measured(crate::metrics::Op::SaveChanges, || {
            let (reached, result) = self.save_changes_unmeasured(changes);
            applied = reached;
            result
        });
        (applied, result)
    }
}

impl Store {
    fn save_changes_unmeasured(&self, changes: &[ChangeRecord]) -> (u64, Result<()>) {
        let _one_applier = self.inner.applier.lock();
        let mut applied = self.inner.applied.load(Ordering::Acquire);
        if let Err(e) = self.inner.check_open() {
            return (applied, Err(e));
        }
        // Decode and validate everything this call can apply before writing,
        // so that a malformed change stops the call without a partial group.
        let mut ops = Vec::new();
        let mut numbers = Vec::new();
        let mut stop = None;
        let mut reached = applied;
        for change in changes {
            let last = match last_number(change) {
                Ok(n) => n,
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            };
            if last <= reached {
                continue; // Delivered again: already applied.
            }
            let op = match change_ops(change).and_then(|c| {
                let op = write_op(&c, last);
                self.inner.check_batch_size(&op.builder).map(|()| op)
            }) {
                Ok(op) => op,
                Err(e) => {
                    stop = Some(e);
                    break;
                }
            };
            ops.push(op);
            numbers.push(last);
            reached = last;
        }
        for (outcome, number) in self.inner.submit_all(ops).into_iter().zip(numbers) {
            if let Err(e) = outcome {
                return (applied, Err(e));
            }
            applied = number;
        }
        match stop {
            Some(e) => (applied, Err(e)),
            None => (applied, Ok(())),
        }
    }
}

impl Store {
    /// Keeps every change from `from` on (a follower's `applied + 1`) in the
    /// log while [`Retention::honour_pins`](crate::Retention::honour_pins)
    /// is set, until the follower named `follower` moves or drops its pin.
    /// Pins live in memory: a follower re-pins after the master restarts.
    pub fn pin_changes(&self, follower: &str, from: u64) {
        self.inner.pins.lock().insert(follower.to_string(), from);
    }

    /// Drops the pin of `follower`.
    pub fn unpin_changes(&self, follower: &str) {
        self.inner.pins.lock().remove(follower);
    }

    /// The lowest change number the retention rules still want: merge keeps
    /// every record holding a number at or above it. It is the lowest of
    /// what the byte rule, the age rule (by segment modification times) and
    /// the pins ask for.
    pub fn retained_from(&self) -> Result<u64> {
        self.inner.retained_from()
    }
}

impl crate::store::Inner {
    /// See [`Store::retained_from`].
    pub(crate) fn retained_from(&self) -> Result<u64> {
        self.check_open()?;
        let retention = &self.options.retention;
        let durable = self.commit.durable();
        let mut floor = durable.saturating_sub(retention.bytes) + 1;
        if retention.honour_pins
            && let Some(&pin) = self.pins.lock().values().min()
        {
            floor = floor.min(pin);
        }
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention.age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let state = self.state.read();
        state.check_open()?;
        let mut logs: Vec<_> = state
            .usage
            .iter()
            .filter(|(_, u)| u.kind == crate::format::SegmentKind::Log)
            .collect();
        logs.sort_by_key(|(_, u)| u.base);
        for (id, u) in logs {
            let recent = std::fs::metadata(id.path_in(&self.dir))
                .and_then(|m| m.modified())
                .map_or(true, |t| t >= cutoff);
            if recent {
                floor = floor.min(u.base + 1);
                break;
            }
        }
        Ok(floor.max(state.changes.oldest().unwrap_or(0)))
    }
}

/// How far one round of [`replicate`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReplicationProgress {
    /// Change records received and handed to the applier.
    pub changes: usize,
    /// The applier's applied number afterwards.
    pub applied: u64,
    /// The master's latest committed number when asked.
    pub master: u64,
    /// `master - applied`, floored at 0.
    pub lag: u64,
}

/// Runs DKV's slave loop once: asks `master` for up to `batch` changes after
/// what `slave` applied (`from = applied + 1`), applies them, and reports
/// the lag. Fails, as DKV's slave does, when the master's number is behind
/// the slave's (a master restored to an older state).
pub fn replicate(
    master: &impl ChangePropagator,
    slave: &impl ChangeApplier,
    batch: usize,
) -> Result<ReplicationProgress> {
    let applied = slave.latest_applied_change_number()?;
    let from = applied + 1;
    let master_number = master.latest_committed_change_number()?;
    if master_number < applied {
        return Err(Error::MasterBehind {
            master: master_number,
            applied,
        });
    }
    let changes = if from > master_number {
        Vec::new()
    } else {
        master.load_changes(from, batch)?
    };
    let (applied, result) = slave.save_changes(&changes);
    result?;
    Ok(ReplicationProgress {
        changes: changes.len(),
        applied,
        master: master_number,
        lag: master_number.saturating_sub(applied),
    })
}

/// Runs [`replicate`] until the slave has caught up with the master's
/// number as read at each round (a round that brings no change ends it);
/// calls `progress` after every round.
pub fn replicate_until_caught_up(
    master: &impl ChangePropagator,
    slave: &impl ChangeApplier,
    batch: usize,
    mut progress: impl FnMut(&ReplicationProgress),
) -> Result<ReplicationProgress> {
    loop {
        let p = replicate(master, slave, batch)?;
        progress(&p);
        if p.lag == 0 || p.changes == 0 {
            return Ok(p);
        }
    }
}
