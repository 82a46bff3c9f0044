//! Whole-keyspace snapshots: `get_snapshot` streams the keyspace as it was
//! at one change number, and `put_snapshot` replaces the store's keyspace
//! (and its change-number state) with a verified stream. Must not hold the
//! index lock for longer than one chunk.
//!
//! A snapshot stands at the newest published change number when it is
//! opened. Keys changed after that keep their old index entry in the
//! snapshot's *view* (kept only while the snapshot is open), so the stream
//! reads each key's value as of that point without copying the index and
//! without holding up writers.

use std::io::{self, Read};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::backup::{GlobalMutation, mark_complete, staging_folder};
use crate::error::{Error, Result};
use crate::format::RecordBuilder;
use crate::format::snapshot::{
    ENTRY_FRAME_LEN, SNAPSHOT_HEADER_LEN, SnapshotHeader, TRAILER_MARK, TRAILER_REST_LEN,
    check_body_len, decode_entry_body, decode_trailer, encode_entry, encode_trailer,
};
use crate::keydir::KeyEntry;
use crate::options::{Options, SyncMode};
use crate::serverpb::KvPair;
use crate::store::{Inner, KvStore, OpMeta, SnapshotView, Store, WriteKind, WriteOp};

/// Pairs encoded per visit to the index.
const CHUNK_PAIRS: usize = 256;
/// Value bytes encoded per visit to the index.
const CHUNK_BYTES: usize = 1 << 20;

/// A snapshot stream being read; see the module comment. Dropping it
/// releases the versions it kept.
pub struct SnapshotReader {
    inner: Arc<Inner>,
    view: u64,
    header: SnapshotHeader,
    /// Encoded bytes not yet handed out, from `pos`.
    out: Vec<u8>,
    pos: usize,
    /// Resume point in key order, and whether to start after it.
    cursor: Vec<u8>,
    exclusive: bool,
    stage: Stage,
    count: u64,
    crc: crc32fast::Hasher,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    Header,
    Entries,
    Trailer,
    Done,
}

impl SnapshotReader {
    /// The change number the snapshot stands at.
    pub fn change_number(&self) -> u64 {
        self.header.change_number
    }

    /// The master change number the store had applied at that point.
    pub fn applied_change_number(&self) -> u64 {
        self.header.applied
    }

    fn emit(&mut self, bytes_from: usize) {
        self.crc.update(&self.out[bytes_from..]);
    }

    /// Encodes the next chunk of entries; returns whether the keyspace is
    /// exhausted.
    fn next_chunk(&mut self) -> Result<bool> {
        let now = self.inner.options.clock.now();
        let state = self.inner.state.read();
        state.check_open()?;
        let view = state.views.get(&self.view).ok_or_else(|| {
            Error::InvalidOptions(
                "the store's contents were replaced while the snapshot was read".into(),
            )
        })?;
        // The index's next keys, with their version as of the snapshot.
        let mut keys: Vec<(&[u8], Option<KeyEntry>)> = Vec::with_capacity(CHUNK_PAIRS);
        let mut exhausted = true;
        state
            .keydir
            .scan_from(&self.cursor, self.exclusive, |key, entry| {
                if keys.len() >= CHUNK_PAIRS {
                    exhausted = false;
                    return false;
                }
                keys.push((key, (entry.change_number <= view.at).then_some(entry)));
                true
            });
        // Keys changed since the snapshot keep their older version in the
        // view; merge those in the same key range.
        let upper = if exhausted {
            None
        } else {
            keys.last().map(|k| k.0.to_vec())
        };
        let lower = if self.exclusive {
            std::ops::Bound::Excluded(self.cursor.clone())
        } else {
            std::ops::Bound::Included(self.cursor.clone())
        };
        let upper_bound = match &upper {
            Some(u) => std::ops::Bound::Included(u.clone()),
            None => std::ops::Bound::Unbounded,
        };
        let mut merged: std::collections::BTreeMap<Vec<u8>, Option<KeyEntry>> =
            keys.iter().map(|(k, e)| (k.to_vec(), *e)).collect();
        for (k, e) in view.preserved.range((lower, upper_bound)) {
            merged.insert(k.clone(), Some(*e));
        }
        let start = self.out.len();
        let mut buf = Vec::new();
        let mut bytes = 0;
        let mut read = 0;
        let mut stopped_at = None;
        for (key, entry) in &merged {
            if bytes >= CHUNK_BYTES {
                stopped_at = Some(key.clone());
                break;
            }
            let Some(entry) = entry else { continue };
            if entry.expire_ts != 0 && entry.expire_ts <= now {
                continue;
            }
            let (value, expire_ts) =
                state.read_op(&self.inner.dir, key, entry.pointer, &mut buf)?;
            encode_entry(&mut self.out, key, value, expire_ts);
            bytes += value.len();
            read += u64::from(entry.pointer.len);
            self.count += 1;
        }
        drop(state);
        self.inner.count_read(read);
        self.emit(start);
        // Resume before the first key not encoded, or after this range.
        match (stopped_at, upper) {
            (Some(k), _) => {
                self.cursor = k;
                self.exclusive = false;
                Ok(false)
            }
            (None, Some(u)) => {
                self.cursor = u;
                self.exclusive = true;
                Ok(false)
            }
            (None, None) => Ok(true),
        }
    }

    fn refill(&mut self) -> Result<()> {
        self.out.clear();
        self.pos = 0;
        match self.stage {
            Stage::Header => {
                self.out.extend_from_slice(&self.header.encode());
                self.emit(0);
                self.stage = Stage::Entries;
            }
            Stage::Entries => {
                if self.next_chunk()? {
                    self.stage = Stage::Trailer;
                }
            }
            Stage::Trailer => {
                let crc = self.crc.clone().finalize();
                encode_trailer(&mut self.out, self.count, crc);
                self.stage = Stage::Done;
            }
            Stage::Done => {}
        }
        Ok(())
    }
}

impl Read for SnapshotReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.out.len() {
            if self.stage == Stage::Done {
                return Ok(0);
            }
            self.refill().map_err(io::Error::other)?;
        }
        let n = buf.len().min(self.out.len() - self.pos);
        buf[..n].copy_from_slice(&self.out[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Drop for SnapshotReader {
    fn drop(&mut self) {
        let mut state = self.inner.state.write();
        state.views.remove(&self.view);
        state.release_retired();
    }
}

impl std::fmt::Debug for SnapshotReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotReader")
            .field("change_number", &self.header.change_number)
            .field("entries", &self.count)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens a snapshot stream of the whole keyspace as it is now; see
    /// [`SnapshotReader`]. The stream's format is in DESIGN.md.
    pub fn snapshot(&self) -> Result<SnapshotReader> {
        self.inner.check_open()?;
        let (view, at) = {
            let mut state = self.inner.state.write();
            state.check_open()?;
            let at = state.published;
            let id = state.next_view;
            state.next_view += 1;
            state.views.insert(
                id,
                SnapshotView {
                    at,
                    ..SnapshotView::default()
                },
            );
            (id, at)
        };
        Ok(SnapshotReader {
            inner: Arc::clone(&self.inner),
            view,
            header: SnapshotHeader {
                change_number: at,
                applied: self.inner.applied.load(Ordering::Acquire),
                created_unix: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            },
            out: Vec::new(),
            pos: 0,
            cursor: Vec::new(),
            exclusive: false,
            stage: Stage::Header,
            count: 0,
            crc: crc32fast::Hasher::new(),
        })
    }

    /// Replaces the whole keyspace with the snapshot read from `reader`:
    /// the stream is verified completely into a staged store beside this
    /// one, then swapped in crash-safely; afterwards the store reports the
    /// snapshot's change number as its latest applied one. A malformed
    /// stream is refused with [`Error::InvalidSnapshot`] and changes
    /// nothing. Returns the snapshot's change number.
    pub fn load_snapshot(&self, reader: &mut dyn Read) -> Result<u64> {
        let inner = &self.inner;
        inner.check_open()?;
        let _flag = GlobalMutation::take(inner)?;
        let staging = staging_folder(&*inner.fs, &inner.dir)?;
        let staged = stage_snapshot(&staging, reader, &inner.options);
        let header = match staged {
            Ok(h) => h,
            Err(e) => {
                let _ = crate::log::remove_dir_all(&*inner.fs, &staging);
                return Err(e);
            }
        };
        mark_complete(&*inner.fs, &staging)?;
        inner.swap_in(&staging)?;
        Ok(header.change_number)
    }
}

fn invalid(reason: impl Into<String>) -> Error {
    Error::InvalidSnapshot {
        reason: reason.into(),
    }
}

/// Reads exactly `buf.len()` bytes, calling a short stream a truncation.
fn read_exact(reader: &mut dyn Read, buf: &mut [u8], what: &str) -> Result<()> {
    reader.read_exact(buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid(format!("stream ends inside {what}")),
        _ => Error::io(format!("read the snapshot's {what}"), e),
    })
}

/// Writes the snapshot from `reader` into a new store at `staging`,
/// verifying every entry, the count and the checksum; returns its header.
fn stage_snapshot(
    staging: &std::path::Path,
    reader: &mut dyn Read,
    options: &Options,
) -> Result<SnapshotHeader> {
    let store = Store::open(
        staging,
        Options {
            sync_mode: SyncMode::Never,
            fault_injector: None,
            ..options.clone()
        },
    )?;
    let mut crc = crc32fast::Hasher::new();
    let mut head = [0u8; SNAPSHOT_HEADER_LEN];
    read_exact(reader, &mut head, "its header")?;
    let header = SnapshotHeader::decode(&head).map_err(|e| invalid(format!("header: {e}")))?;
    crc.update(&head);
    let mut batch: Vec<KvPair> = Vec::new();
    let mut batch_bytes = 0u64;
    let limit = options.batch_limit() / 2;
    let mut count = 0u64;
    let mut body = Vec::new();
    loop {
        let mut frame = [0u8; ENTRY_FRAME_LEN];
        read_exact(reader, &mut frame[..4], "an entry")?;
        let body_len = u32::from_le_bytes(frame[..4].try_into().unwrap_or_default());
        if body_len == TRAILER_MARK {
            let mut rest = [0u8; TRAILER_REST_LEN];
            read_exact(reader, &mut rest, "the trailer")?;
            let (expected, sum) = decode_trailer(&rest);
            if expected != count {
                return Err(invalid(format!(
                    "trailer counts {expected} entries, the stream held {count}"
                )));
            }
            if crc.finalize() != sum {
                return Err(invalid("stream checksum does not match"));
            }
            let mut extra = [0u8; 1];
            if reader
                .read(&mut extra)
                .map_err(|e| Error::io("read the snapshot", e))?
                != 0
            {
                return Err(invalid("bytes after the trailer"));
            }
            break;
        }
        let len = check_body_len(body_len).map_err(|e| invalid(e.to_string()))?;
        read_exact(reader, &mut frame[4..], "an entry")?;
        let body_crc = u32::from_le_bytes(frame[4..].try_into().unwrap_or_default());
        // Grows with the bytes that actually arrive, never to a length the
        // stream merely claims.
        body.clear();
        let got = reader
            .take(len as u64)
            .read_to_end(&mut body)
            .map_err(|e| Error::io("read a snapshot entry", e))?;
        if got != len {
            return Err(invalid("stream ends inside an entry"));
        }
        let (key, value, expire_ts) = decode_entry_body(&body, body_crc)
            .map_err(|e| invalid(format!("entry {count}: {e}")))?;
        crc.update(&frame);
        crc.update(&body);
        count += 1;
        batch_bytes += RecordBuilder::op_len(key.len(), value.len());
        batch.push(KvPair {
            key: key.to_vec(),
            value: value.to_vec(),
            expire_ts,
        });
        if batch_bytes >= limit || batch.len() >= 4096 {
            store.put(&batch)?;
            batch.clear();
            batch_bytes = 0;
        }
    }
    store.put(&batch)?;
    // The change-number state: the snapshot's number becomes the applied
    // one, so a slave bootstrapped from it resumes right after it.
    let marker = WriteOp {
        applied: Some(header.change_number),
        ..WriteOp::new(
            WriteKind::Batch,
            RecordBuilder::new(Some(header.change_number)),
            Vec::<OpMeta>::new(),
        )
    };
    store.inner.submit(marker)?;
    store.close()?;
    Ok(header)
}
