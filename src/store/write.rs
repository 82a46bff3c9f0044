//! The write path: a queue of writers in which the first becomes the leader,
//! takes every write queued behind it, appends them all with one `pwrite`,
//! in `SyncMode::Always` makes them durable with one `fdatasync`, and only
//! then publishes them to the index under one lock. Followers wait
//! (yielding the CPU for a while when writes are synced, then parked) until
//! the leader hands them their outcome. This is group commit (LevelDB and
//! RocksDB use the same shape): concurrent writers share system calls, and a
//! single writer pays only an uncontended lock.
//!
//! Conditional writes (delete of a key that may be present, compare-and-set)
//! are decided by the leader in queue order, against the writes appended
//! earlier in the same group and then against the index, so they see every
//! earlier write. A write whose sync fails is never published: readers never
//! see a value its writer was told failed.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread::{self, Thread};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Inner, Writer};
use crate::error::{Error, Result};
use crate::format::{OP_HEADER_LEN, RecordBuilder};
use crate::keydir::{KeyEntry, RecordPointer};
use crate::log::SegmentId;

/// What a queued write does.
pub(crate) enum WriteKind {
    /// Append the record unconditionally.
    Batch,
    /// Append the (single-delete) record only if the key is present.
    DeleteIfPresent,
    /// Append the (single-put) record only if the key's current live value
    /// equals this (empty: only if the key is absent).
    CompareAndSet(Vec<u8>),
}

/// One operation inside a queued record, located in the builder's bytes.
#[derive(Clone, Copy)]
pub(crate) struct OpMeta {
    /// Offset of the operation from the record start.
    pub(crate) offset: u32,
    /// Encoded length of the operation.
    pub(crate) len: u32,
    /// Length of its key.
    pub(crate) key_len: u16,
    /// Its expiry.
    pub(crate) expire_ts: u64,
    /// Whether it deletes.
    pub(crate) delete: bool,
}

impl OpMeta {
    fn key<'a>(&self, record: &'a [u8]) -> &'a [u8] {
        let at = self.offset as usize + OP_HEADER_LEN;
        &record[at..at + usize::from(self.key_len)]
    }

    fn value<'a>(&self, record: &'a [u8]) -> &'a [u8] {
        let at = self.offset as usize + OP_HEADER_LEN + usize::from(self.key_len);
        &record[at..self.offset as usize + self.len as usize]
    }
}

/// A record waiting to be appended.
pub(crate) struct WriteOp {
    pub(crate) kind: WriteKind,
    pub(crate) builder: RecordBuilder,
    pub(crate) ops: Vec<OpMeta>,
    /// The master's change number this record brings an applier to.
    pub(crate) applied: Option<u64>,
}

impl WriteOp {
    /// A record of `builder` with one operation per pushed offset.
    pub(crate) fn new(kind: WriteKind, builder: RecordBuilder, ops: Vec<OpMeta>) -> Self {
        WriteOp {
            kind,
            builder,
            ops,
            applied: None,
        }
    }

    fn first_key(&self) -> &[u8] {
        self.ops[0].key(self.builder.as_bytes())
    }
}

/// The change number of the appended record, or `None` when a conditional
/// write decided not to append.
pub(crate) type Outcome = Result<Option<u64>>;

/// A record the group appended (or is about to): where it went.
struct Appended {
    op: usize,
    segment: SegmentId,
    file_offset: u64,
    change_number: u64,
}

struct Slot {
    inner: Mutex<SlotInner>,
    thread: Thread,
}

struct SlotInner {
    ops: Option<Vec<WriteOp>>,
    outcomes: Option<Vec<Outcome>>,
    lead: bool,
}

/// Writers waiting for a leader. Lock order: the queue's mutex is taken
/// before any slot's mutex (when the lead is handed over), and no other lock
/// is held with either.
#[derive(Default)]
pub(crate) struct WriteQueue {
    inner: Mutex<QueueInner>,
    /// The largest recent group size (decaying): how many writers to wait
    /// for before a synced group starts.
    peak: AtomicUsize,
}

/// The longest a leader waits for writers to gather.
const MAX_GATHER: Duration = Duration::from_millis(1);

/// The longest a queued writer yields the CPU in a loop, watching for its
/// outcome, before it parks (it yields for at most two average syncs).
/// Waking from a park costs a futex wake and a reschedule, tens of
/// microseconds on a virtual machine: as much as a third of a group's
/// cycle, during which the writer could already have queued its next write.
const MAX_YIELDING: Duration = Duration::from_micros(500);
/// A `sched_yield` that takes longer than this gave the CPU to a thread
/// that ran for a while (not just another waiting writer's or the leader's
/// short turn); after `MAX_SLOW_YIELDS` of them the writer parks, so that
/// waiting writers do not take CPU from readers. The rule of RocksDB's
/// `write_thread_slow_yield_usec`, whose 3 µs here (2 cores, 4 writers)
/// counted the other writers' turns as slow and never yielded long enough.
const SLOW_YIELD: Duration = Duration::from_micros(20);
const MAX_SLOW_YIELDS: u32 = 3;

#[derive(Default)]
struct QueueInner {
    /// A leader is running.
    leading: bool,
    waiting: VecDeque<Arc<Slot>>,
}

/// Hands the lead on and fails the group's followers if the leader unwinds
/// (a bug), so that no writer waits forever.
struct LeaderGuard<'a> {
    inner: &'a Inner,
    followers: &'a [Arc<Slot>],
    armed: bool,
}

impl Drop for LeaderGuard<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let cause = "a writer thread panicked while leading a group".to_string();
        self.inner.commit.poison(cause.clone());
        for f in self.followers {
            let mut g = f.inner.lock();
            if g.outcomes.is_none() {
                // The leader took this slot's ops; say each one failed.
                g.outcomes = Some(vec![]);
            }
            drop(g);
            f.thread.unpark();
        }
        self.inner.hand_off();
    }
}

impl Inner {
    /// Queues `op` and returns its outcome once a leader (possibly this
    /// thread) has appended it, synced it if required, and published it.
    pub(crate) fn submit(&self, op: WriteOp) -> Outcome {
        self.submit_all(vec![op])
            .pop()
            .unwrap_or_else(|| Err(self.abandoned()))
    }

    /// Queues `ops` to be appended in order within one group (one `pwrite`,
    /// one sync), and returns their outcomes. Once one fails, the writer is
    /// poisoned and the rest fail too.
    pub(crate) fn submit_all(&self, ops: Vec<WriteOp>) -> Vec<Outcome> {
        let count = ops.len();
        let slot = {
            let mut q = self.queue.inner.lock();
            if !q.leading {
                q.leading = true;
                drop(q);
                return self.lead(ops);
            }
            let slot = Arc::new(Slot {
                inner: Mutex::new(SlotInner {
                    ops: Some(ops),
                    outcomes: None,
                    lead: false,
                }),
                thread: thread::current(),
            });
            q.waiting.push_back(Arc::clone(&slot));
            slot
        };
        let queued = Instant::now();
        // Only a synced group takes long enough for a yield to pay.
        let yield_for = if self.options.sync_mode.waits_for_sync() {
            (self.commit.sync_time() * 2).min(MAX_YIELDING)
        } else {
            Duration::ZERO
        };
        let mut slow_yields = 0;
        loop {
            {
                let mut g = slot.inner.lock();
                if let Some(mut outcomes) = g.outcomes.take() {
                    // A leader that unwound leaves the list empty.
                    while outcomes.len() < count {
                        outcomes.push(Err(self.abandoned()));
                    }
                    return outcomes;
                }
                if g.lead {
                    let ops = g.ops.take().expect("a slot handed the lead holds its ops");
                    drop(g);
                    return self.lead(ops);
                }
            }
            if slow_yields < MAX_SLOW_YIELDS && queued.elapsed() < yield_for {
                let before = Instant::now();
                thread::yield_now();
                if before.elapsed() > SLOW_YIELD {
                    slow_yields += 1;
                }
            } else {
                thread::park();
            }
        }
    }

    /// The error of a write whose leader unwound.
    fn abandoned(&self) -> Error {
        Error::Poisoned {
            cause: self
                .commit
                .poisoned()
                .unwrap_or_else(|| "a writer thread panicked while leading a group".into()),
        }
    }

    /// Runs one group: `first` and every write queued behind it.
    fn lead(&self, first: Vec<WriteOp>) -> Vec<Outcome> {
        self.gather();
        let followers: Vec<Arc<Slot>> = self.queue.inner.lock().waiting.drain(..).collect();
        let mut guard = LeaderGuard {
            inner: self,
            followers: &followers,
            armed: true,
        };
        let mut ops = first;
        let mine = ops.len();
        let mut counts = Vec::with_capacity(followers.len());
        for f in &followers {
            let theirs = f
                .inner
                .lock()
                .ops
                .take()
                .expect("a queued slot holds its ops");
            counts.push(theirs.len());
            ops.extend(theirs);
        }
        // The peak decays by one per group, so a drop in concurrency stops
        // the gathering wait within a few groups.
        let size = followers.len() + 1;
        let peak = self.queue.peak.load(Ordering::Relaxed);
        self.queue
            .peak
            .store(size.max(peak.saturating_sub(1)), Ordering::Relaxed);
        let outcomes = {
            let mut w = self.writer.lock();
            let (mut outcomes, mut appended) = self.apply_group(&mut w, &mut ops);
            if let (Some(last), true) = (appended.last(), self.options.sync_mode.waits_for_sync())
                && let Err(e) = self.commit.wait_durable(last.change_number)
            {
                // Every appended record of the group missed its sync: none
                // is acknowledged, none is published.
                for a in appended.drain(..) {
                    outcomes[a.op] = Err(e.duplicate());
                }
            }
            self.publish(&ops, &appended);
            outcomes
        };
        guard.armed = false;
        self.hand_off();
        let mut outcomes = outcomes.into_iter();
        let result: Vec<Outcome> = outcomes.by_ref().take(mine).collect();
        for (f, n) in followers.iter().zip(counts) {
            f.inner.lock().outcomes = Some(outcomes.by_ref().take(n).collect());
            f.thread.unpark();
        }
        result
    }

    /// Gives the lead to the first waiting writer, or ends the leadership.
    fn hand_off(&self) {
        let mut q = self.queue.inner.lock();
        match q.waiting.pop_front() {
            Some(next) => {
                next.inner.lock().lead = true;
                next.thread.unpark();
            }
            None => q.leading = false,
        }
    }

    /// Before a group that will be synced: when recent groups had several
    /// writers, give the writers just released by the previous group a
    /// moment to queue again (at most half an `fdatasync`), so that one sync
    /// serves them all instead of alternating half-groups. A single writer
    /// never waits.
    fn gather(&self) {
        if !self.options.sync_mode.waits_for_sync() {
            return;
        }
        let target = self.queue.peak.load(Ordering::Relaxed);
        if target < 2 {
            return;
        }
        let deadline = Instant::now() + (self.commit.sync_time() / 2).min(MAX_GATHER);
        while self.queue.inner.lock().waiting.len() + 1 < target && Instant::now() < deadline {
            thread::yield_now();
        }
    }

    /// Appends the group's records in order. Returns one outcome per op and
    /// the records written (not yet published).
    fn apply_group(&self, w: &mut Writer, ops: &mut [WriteOp]) -> (Vec<Outcome>, Vec<Appended>) {
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(ops.len());
        let mut appended: Vec<Appended> = Vec::with_capacity(ops.len());
        // `appended[unflushed..]` sit in `w.buffer`, not yet written.
        let mut unflushed = 0;
        w.buffer.clear();
        for i in 0..ops.len() {
            if let Err(e) = self.writable() {
                outcomes.push(Err(e));
                continue;
            }
            if !matches!(ops[i].kind, WriteKind::Batch) {
                match self.condition_holds(ops, &appended, i) {
                    Ok(true) => {}
                    Ok(false) => {
                        outcomes.push(Ok(None));
                        continue;
                    }
                    Err(e) => {
                        outcomes.push(Err(e));
                        continue;
                    }
                }
            }
            let len = ops[i].builder.len() as u64;
            if !w.active.fits(w.buffer.len() as u64 + len) {
                if let Err(e) = self.flush(w, &mut appended, &mut unflushed, &mut outcomes) {
                    // This write was never attempted: the writer is poisoned.
                    outcomes.push(Err(Error::Poisoned { cause: e.chain() }));
                    continue;
                }
                // A record larger than a whole segment goes alone into an
                // empty one, which then exceeds the segment size.
                if !w.active.fits(len)
                    && !w.active.is_empty()
                    && let Err(e) = self.rollover(w, false)
                {
                    outcomes.push(Err(e));
                    continue;
                }
            }
            let file_offset = w.active.offset + w.buffer.len() as u64;
            let start = w.active.position() + w.buffer.len() as u64;
            let (change_number, bytes) = ops[i].builder.stamp(start, self.commit.durable());
            w.buffer.extend_from_slice(bytes);
            appended.push(Appended {
                op: i,
                segment: w.active.id,
                file_offset,
                change_number,
            });
            outcomes.push(Ok(Some(change_number)));
        }
        // On failure every unflushed outcome already holds the error.
        let _ = self.flush(w, &mut appended, &mut unflushed, &mut outcomes);
        (outcomes, appended)
    }

    /// Writes the buffered records with one `pwrite`. On failure the writer
    /// is poisoned, and the buffered records get the error and are dropped
    /// from `appended`.
    fn flush(
        &self,
        w: &mut Writer,
        appended: &mut Vec<Appended>,
        unflushed: &mut usize,
        outcomes: &mut [Outcome],
    ) -> Result<()> {
        if *unflushed == appended.len() {
            return Ok(());
        }
        let buffer = std::mem::take(&mut w.buffer);
        let written = w.active.append(&buffer, &*self.fs);
        w.buffer = buffer;
        w.buffer.clear();
        match written {
            Ok(()) => {
                self.records_written
                    .fetch_add((appended.len() - *unflushed) as u64, Ordering::Relaxed);
                self.commit
                    .set_written(appended.last().map_or(0, |a| a.change_number));
                *unflushed = appended.len();
                Ok(())
            }
            Err(e) => {
                self.commit.poison(e.chain());
                for a in appended.drain(*unflushed..) {
                    outcomes[a.op] = Err(e.duplicate());
                }
                Err(e)
            }
        }
    }

    /// Makes the group's written records visible to readers, under one lock.
    fn publish(&self, ops: &[WriteOp], appended: &[Appended]) {
        if appended.is_empty() {
            return;
        }
        let mut state = self.state.write();
        if state.closed {
            return;
        }
        for a in appended {
            let op = &ops[a.op];
            let bytes = op.builder.as_bytes();
            let start = a.change_number - bytes.len() as u64;
            state.changes.note(start, a.segment, a.file_offset);
            if let Some(applied) = op.applied {
                self.applied.fetch_max(applied, Ordering::AcqRel);
            }
            for m in &op.ops {
                let entry = (!m.delete).then_some(KeyEntry {
                    pointer: RecordPointer {
                        segment: a.segment,
                        offset: (a.file_offset + u64::from(m.offset)) as u32,
                        len: m.len,
                    },
                    expire_ts: m.expire_ts,
                    change_number: a.change_number,
                });
                if m.delete {
                    state.note_tombstone(a.segment, m.len);
                }
                state.set(m.key(bytes), entry);
            }
            state.published = state.published.max(a.change_number);
        }
    }

    /// Whether conditional write `i` should append: judged against the
    /// newest write of its key earlier in this group, else the index.
    fn condition_holds(&self, ops: &[WriteOp], appended: &[Appended], i: usize) -> Result<bool> {
        let op = &ops[i];
        let key = op.first_key();
        let clock = &self.options.clock;
        let pending = appended.iter().rev().find_map(|a| {
            let bytes = ops[a.op].builder.as_bytes();
            ops[a.op]
                .ops
                .iter()
                .rev()
                .find(|m| m.key(bytes) == key)
                .map(|m| (m, bytes))
        });
        if let Some((m, bytes)) = pending {
            return Ok(match &op.kind {
                WriteKind::Batch => true,
                WriteKind::DeleteIfPresent => !m.delete,
                WriteKind::CompareAndSet(expected) => {
                    if m.delete || clock.is_expired(m.expire_ts) {
                        expected.is_empty()
                    } else {
                        !expected.is_empty() && m.value(bytes) == expected.as_slice()
                    }
                }
            });
        }
        let state = self.state.read();
        match &op.kind {
            WriteKind::Batch => Ok(true),
            WriteKind::DeleteIfPresent => Ok(state.keydir.get(key).is_some()),
            WriteKind::CompareAndSet(expected) => match state.live(key, clock) {
                None => Ok(expected.is_empty()),
                Some(_) if expected.is_empty() => Ok(false),
                Some(entry) => {
                    let mut buf = Vec::new();
                    let (value, _) = state.read_op(&self.dir, key, entry.pointer, &mut buf)?;
                    Ok(value == expected.as_slice())
                }
            },
        }
    }

    /// Fails when the store is closed or the writer poisoned.
    fn writable(&self) -> Result<()> {
        self.check_open()?;
        match self.commit.poisoned() {
            Some(cause) => Err(Error::Poisoned { cause }),
            None => Ok(()),
        }
    }
}
