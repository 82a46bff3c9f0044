//! The write path: a queue of writers in which the first becomes the leader,
//! takes every write queued behind it, appends them all with one `pwrite`,
//! publishes them to the index under one lock, and, in `SyncMode::Always`,
//! makes them durable with one `fdatasync`. Followers sleep until the leader
//! hands them their outcome. This is group commit (LevelDB and RocksDB use
//! the same shape): concurrent writers share system calls, and a single
//! writer pays only an uncontended lock.
//!
//! Conditional writes (delete of a key that may be absent, compare-and-set)
//! are decided by the leader in queue order, after flushing what the group
//! appended so far, so they see every earlier write.

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
}

/// A record waiting to be appended.
pub(crate) struct WriteOp {
    pub(crate) kind: WriteKind,
    pub(crate) builder: RecordBuilder,
    pub(crate) ops: Vec<OpMeta>,
}

impl WriteOp {
    /// A record of `builder` with one operation per pushed offset.
    pub(crate) fn new(kind: WriteKind, builder: RecordBuilder, ops: Vec<OpMeta>) -> Self {
        WriteOp { kind, builder, ops }
    }

    fn first_key(&self) -> &[u8] {
        self.ops[0].key(self.builder.as_bytes())
    }
}

/// The change number of the appended record, or `None` when a conditional
/// write decided not to append.
pub(crate) type Outcome = Result<Option<u64>>;

struct Slot {
    inner: Mutex<SlotInner>,
    thread: Thread,
}

struct SlotInner {
    op: Option<WriteOp>,
    outcome: Option<Outcome>,
    lead: bool,
}

/// Writers waiting for a leader. Lock order: taken with no other lock held,
/// or while holding a slot's lock never.
#[derive(Default)]
pub(crate) struct WriteQueue {
    inner: Mutex<QueueInner>,
    /// The largest recent group size (decaying): how many writers to wait
    /// for before a synced group starts.
    peak: AtomicUsize,
}

/// The longest a leader waits for writers to gather.
const MAX_GATHER: Duration = Duration::from_millis(1);

#[derive(Default)]
struct QueueInner {
    /// A leader is running.
    leading: bool,
    waiting: VecDeque<Arc<Slot>>,
}

impl Inner {
    /// Queues `op` and returns its outcome once a leader (possibly this
    /// thread) has appended it, published it and, if required, synced it.
    pub(super) fn submit(&self, op: WriteOp) -> Outcome {
        let slot = {
            let mut q = self.queue.inner.lock();
            if !q.leading {
                q.leading = true;
                drop(q);
                return self.lead(op);
            }
            let slot = Arc::new(Slot {
                inner: Mutex::new(SlotInner {
                    op: Some(op),
                    outcome: None,
                    lead: false,
                }),
                thread: thread::current(),
            });
            q.waiting.push_back(Arc::clone(&slot));
            slot
        };
        loop {
            {
                let mut g = slot.inner.lock();
                if let Some(outcome) = g.outcome.take() {
                    return outcome;
                }
                if g.lead {
                    let op =
                        g.op.take()
                            .expect("a slot handed the lead still holds its op");
                    drop(g);
                    return self.lead(op);
                }
            }
            thread::park();
        }
    }

    /// Runs one group: `first` and every write queued behind it.
    fn lead(&self, first: WriteOp) -> Outcome {
        self.gather();
        let followers: Vec<Arc<Slot>> = self.queue.inner.lock().waiting.drain(..).collect();
        let size = followers.len() + 1;
        // The peak decays by one per group, so a drop in concurrency stops
        // the gathering wait within a few groups.
        let peak = self.queue.peak.load(Ordering::Relaxed);
        self.queue
            .peak
            .store(size.max(peak.saturating_sub(1)), Ordering::Relaxed);
        let mut ops = Vec::with_capacity(1 + followers.len());
        ops.push(first);
        for f in &followers {
            ops.push(
                f.inner
                    .lock()
                    .op
                    .take()
                    .expect("a queued slot holds its op"),
            );
        }
        let mut outcomes = {
            let mut w = self.writer.lock();
            self.apply_group(&mut w, &mut ops)
        };
        let last = outcomes
            .iter()
            .filter_map(|o| o.as_ref().ok().copied().flatten())
            .max();
        if let (Some(cn), true) = (last, self.options.sync_mode.waits_for_sync())
            && let Err(e) = self.commit.wait_durable(cn, self.faults())
        {
            // Every appended record of the group missed its sync.
            for o in outcomes.iter_mut().filter(|o| matches!(o, Ok(Some(_)))) {
                *o = Err(e.duplicate());
            }
        }
        // Hand the lead to the next writer before waking this group.
        {
            let mut q = self.queue.inner.lock();
            match q.waiting.pop_front() {
                Some(next) => {
                    next.inner.lock().lead = true;
                    next.thread.unpark();
                }
                None => q.leading = false,
            }
        }
        let mut outcomes = outcomes.into_iter();
        let mine = outcomes.next().expect("the leader's own outcome");
        for (f, outcome) in followers.iter().zip(outcomes) {
            f.inner.lock().outcome = Some(outcome);
            f.thread.unpark();
        }
        mine
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

    /// Appends the group's records in order; returns one outcome per op.
    fn apply_group(&self, w: &mut Writer, ops: &mut [WriteOp]) -> Vec<Outcome> {
        let mut outcomes: Vec<Outcome> = Vec::with_capacity(ops.len());
        // Records copied into `w.buffer` but not yet written: (op index,
        // file offset, change number).
        let mut pending: Vec<(usize, u64, u64)> = Vec::with_capacity(ops.len());
        w.buffer.clear();
        for i in 0..ops.len() {
            if let Err(e) = self.writable() {
                outcomes.push(Err(e));
                continue;
            }
            if !matches!(ops[i].kind, WriteKind::Batch) {
                if let Err(e) = self.flush_group(w, ops, &mut pending, &mut outcomes) {
                    // This write was never attempted: the writer is poisoned.
                    outcomes.push(Err(Error::Poisoned { cause: e.chain() }));
                    continue;
                }
                match self.condition_holds(&ops[i]) {
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
                let flushed = self.flush_group(w, ops, &mut pending, &mut outcomes);
                if let Err(e) = flushed {
                    outcomes.push(Err(Error::Poisoned { cause: e.chain() }));
                    continue;
                }
                if !w.active.fits(len)
                    && let Err(e) = self.rollover(w)
                {
                    // The rollover's own failure is this write's error.
                    outcomes.push(Err(e));
                    continue;
                }
            }
            let file_offset = w.active.offset + w.buffer.len() as u64;
            let start = w.active.position() + w.buffer.len() as u64;
            let (change_number, bytes) = ops[i].builder.stamp(start, self.commit.durable());
            w.buffer.extend_from_slice(bytes);
            pending.push((i, file_offset, change_number));
            outcomes.push(Ok(Some(change_number)));
        }
        if let Err(e) = self.flush_group(w, ops, &mut pending, &mut outcomes) {
            // Every pending outcome was already replaced by an error.
            drop(e);
        }
        outcomes
    }

    /// Writes the buffered records with one `pwrite` and publishes their
    /// operations to the index. On failure the writer is poisoned and every
    /// buffered record's outcome becomes an error.
    fn flush_group(
        &self,
        w: &mut Writer,
        ops: &[WriteOp],
        pending: &mut Vec<(usize, u64, u64)>,
        outcomes: &mut [Outcome],
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let buffer = std::mem::take(&mut w.buffer);
        let written = w.active.append(&buffer, self.faults());
        w.buffer = buffer;
        w.buffer.clear();
        if let Err(e) = written {
            self.commit.poison(e.chain());
            for &(i, _, _) in pending.iter() {
                outcomes[i] = Err(e.duplicate());
            }
            pending.clear();
            return Err(e);
        }
        let last = pending.last().map_or(0, |p| p.2);
        self.commit.set_written(last);
        let segment = w.active.id;
        let mut state = self.state.write();
        for &(i, file_offset, change_number) in pending.iter() {
            let op = &ops[i];
            let bytes = op.builder.as_bytes();
            for m in &op.ops {
                let key = m.key(bytes);
                if m.delete {
                    state.keydir.remove(key);
                } else {
                    state.keydir.insert(
                        key,
                        KeyEntry {
                            pointer: RecordPointer {
                                segment,
                                offset: (file_offset + u64::from(m.offset)) as u32,
                                len: m.len,
                            },
                            expire_ts: m.expire_ts,
                            change_number,
                        },
                    );
                }
            }
        }
        pending.clear();
        Ok(())
    }

    /// Whether a conditional write should append, judged on the current
    /// (fully flushed) state.
    fn condition_holds(&self, op: &WriteOp) -> Result<bool> {
        let key = op.first_key();
        let state = self.state.read();
        match &op.kind {
            WriteKind::Batch => Ok(true),
            WriteKind::DeleteIfPresent => Ok(state.keydir.get(key).is_some()),
            WriteKind::CompareAndSet(expected) => match state.live(key, &self.options.clock) {
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
