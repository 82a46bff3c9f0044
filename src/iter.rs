//! Ordered iteration: the options DKV validates, and a chunked iterator that
//! holds the index's read lock only while it copies one short chunk, so it
//! never blocks writers for long. Must not write.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::serverpb::{IterateRequest, KvPair};
use crate::store::{ChunkLimits, Inner, PairSink};

/// Pairs copied per visit to the index: a 100-key prefix scan seeks the
/// index once and prefetches all its values before reading the first.
const CHUNK: usize = 128;
/// Index entries looked at per visit (expired ones are skipped), so one
/// visit stays short even across long runs of expired keys.
const MAX_VISITED: usize = 512;
/// Value bytes copied per visit, so large values do not hold the lock long.
const MAX_CHUNK_BYTES: usize = 1 << 20;
/// Chunk buffer bytes an [`Iter`] keeps between chunks: enough for a chunk
/// of small pairs, so a long iteration reuses it; a larger buffer (up to
/// [`MAX_CHUNK_BYTES`] and one record) is released between chunks and
/// reserved again before the next one takes the lock.
const KEPT_CHUNK_BYTES: usize = 64 << 10;
const LIMITS: ChunkLimits = ChunkLimits {
    pairs: CHUNK,
    visited: MAX_VISITED,
    bytes: MAX_CHUNK_BYTES,
};

/// One chunk's pairs, copied under the index's read lock into one buffer
/// that is reused from chunk to chunk, and read after the lock is released.
#[derive(Default)]
struct Chunk {
    bytes: Vec<u8>,
    /// Per pair: where its key starts in `bytes`, the key's and the
    /// value's lengths, its expiry.
    pairs: Vec<(usize, usize, usize, u64)>,
    /// Bytes to reserve in `bytes` before the next chunk takes the lock
    /// (an [`Iter`] that released a large buffer).
    reserve: usize,
    /// The record bytes the last chunk reserved room for (at least its
    /// keys' and values' bytes): what the next chunk of like pairs asks.
    asked: usize,
}

impl Chunk {
    /// Copies the next chunk at or after `cursor` (after it when
    /// `exclusive`). Returns the pairs read before a failing read, beside
    /// the result: the resume point and whether the range ended.
    fn read(
        &mut self,
        inner: &Inner,
        cursor: &[u8],
        exclusive: bool,
        prefix: Option<&[u8]>,
    ) -> Result<(Option<Vec<u8>>, bool)> {
        self.bytes.clear();
        self.pairs.clear();
        self.bytes.reserve(std::mem::take(&mut self.reserve));
        inner.scan_chunk(cursor, exclusive, prefix, LIMITS, self)
    }

    /// The pairs copied, in key order.
    fn pairs(&self) -> impl Iterator<Item = PairRef<'_>> {
        self.pairs
            .iter()
            .map(|&(at, key_len, value_len, expire_ts)| {
                let (key, rest) = self.bytes[at..].split_at(key_len);
                PairRef {
                    key,
                    value: &rest[..value_len],
                    expire_ts,
                }
            })
    }
}

impl PairSink for Chunk {
    fn reserve(&mut self, pairs: usize, bytes: usize) {
        self.asked = bytes;
        self.pairs.reserve(pairs);
        self.bytes.reserve(bytes);
    }

    fn push(&mut self, key_and_value: &[u8], key_len: usize, expire_ts: u64) {
        let value_len = key_and_value.len() - key_len;
        self.pairs
            .push((self.bytes.len(), key_len, value_len, expire_ts));
        self.bytes.extend_from_slice(key_and_value);
    }
}

/// Where iteration starts and which keys it yields.
///
/// An empty prefix or start key is the same as none, as in DKV.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IterationOptions {
    prefix: Option<Vec<u8>>,
    start_key: Option<Vec<u8>>,
}

impl IterationOptions {
    /// Every key, from the smallest.
    pub fn new() -> Self {
        Self::default()
    }

    /// Only keys that begin with `prefix`.
    pub fn with_prefix(mut self, prefix: impl Into<Vec<u8>>) -> Self {
        let p = prefix.into();
        self.prefix = (!p.is_empty()).then_some(p);
        self
    }

    /// Start at `start` (inclusive).
    pub fn with_start_key(mut self, start: impl Into<Vec<u8>>) -> Self {
        let s = start.into();
        self.start_key = (!s.is_empty()).then_some(s);
        self
    }

    /// The prefix, if any.
    pub fn prefix(&self) -> Option<&[u8]> {
        self.prefix.as_deref()
    }

    /// The start key, if any.
    pub fn start_key(&self) -> Option<&[u8]> {
        self.start_key.as_deref()
    }

    /// DKV's check: a start key must begin with the prefix.
    pub fn validate(&self) -> Result<()> {
        match (&self.prefix, &self.start_key) {
            (Some(p), Some(s)) if !s.starts_with(p) => Err(Error::InvalidIterationOptions),
            _ => Ok(()),
        }
    }
}

impl From<&IterateRequest> for IterationOptions {
    fn from(r: &IterateRequest) -> Self {
        IterationOptions::new()
            .with_prefix(r.key_prefix.clone())
            .with_start_key(r.start_key.clone())
    }
}

/// Iterator over a store's live keys in ascending bytewise order.
///
/// Each key's value is read when its chunk is fetched. A key present and
/// unchanged for the whole iteration is yielded exactly once; a key written
/// or deleted meanwhile may or may not be yielded (with its newest value).
pub struct Iter {
    inner: Arc<Inner>,
    prefix: Option<Vec<u8>>,
    /// Resume point: the last key looked at, and whether to start after it.
    cursor: Vec<u8>,
    exclusive: bool,
    buffer: VecDeque<KvPair>,
    chunk: Chunk,
    /// A read that failed, reported once the pairs before it are yielded.
    failed: Option<Error>,
    done: bool,
}

impl Iter {
    pub(crate) fn new(inner: Arc<Inner>, options: &IterationOptions) -> Self {
        let cursor = options
            .start_key()
            .or(options.prefix())
            .map(<[u8]>::to_vec)
            .unwrap_or_default();
        Iter {
            inner,
            prefix: options.prefix.clone(),
            cursor,
            exclusive: false,
            buffer: VecDeque::new(),
            chunk: Chunk::default(),
            failed: None,
            done: false,
        }
    }

    fn refill(&mut self) {
        // Copied under the lock into the reused chunk; the owned pairs,
        // two allocations each, are made after it is released.
        let read = self.chunk.read(
            &self.inner,
            &self.cursor,
            self.exclusive,
            self.prefix.as_deref(),
        );
        self.buffer.extend(self.chunk.pairs().map(|p| KvPair {
            key: p.key.to_vec(),
            value: p.value.to_vec(),
            expire_ts: p.expire_ts,
        }));
        match read {
            Ok((Some(k), finished)) => {
                self.cursor = k;
                self.exclusive = true;
                self.done = finished;
            }
            Ok((None, _)) => self.done = true,
            Err(e) => {
                self.failed = Some(e);
                self.done = true;
            }
        }
        if self.done {
            self.chunk = Chunk::default();
        } else if self.chunk.bytes.capacity() > KEPT_CHUNK_BYTES {
            // Released now, and allocated again before the next chunk
            // takes the index lock, at the size this chunk asked for (its
            // records' bytes, not just the keys' and values' it holds), so
            // that a chunk of like pairs does not grow it under the lock.
            self.chunk.reserve = self.chunk.asked;
            self.chunk.bytes = Vec::new();
        }
    }
}

impl Iterator for Iter {
    type Item = Result<KvPair>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(p) = self.buffer.pop_front() {
                return Some(Ok(p));
            }
            if let Some(e) = self.failed.take() {
                return Some(Err(e));
            }
            if self.done {
                return None;
            }
            self.refill();
        }
    }
}

/// A live pair lent to a [`Store::scan`](crate::Store::scan) visitor,
/// borrowed from a buffer the scan reuses: valid for the one call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairRef<'a> {
    /// The key.
    pub key: &'a [u8],
    /// The value.
    pub value: &'a [u8],
    /// Absolute expiry in Unix seconds; 0 = never.
    pub expire_ts: u64,
}

/// [`Store::scan`](crate::Store::scan): chunks as [`Iter`] reads them,
/// each copied into one reused buffer under the index's read lock, then
/// lent to `visit` with no lock held.
pub(crate) fn scan(
    inner: &Inner,
    options: &IterationOptions,
    mut visit: impl FnMut(PairRef<'_>) -> bool,
) -> Result<()> {
    let prefix = options.prefix();
    let mut cursor = options.start_key().or(prefix).unwrap_or_default().to_vec();
    let mut exclusive = false;
    let mut chunk = Chunk::default();
    loop {
        let read = chunk.read(inner, &cursor, exclusive, prefix);
        for pair in chunk.pairs() {
            if !visit(pair) {
                return Ok(());
            }
        }
        // The pairs read before a failing read were visited; then its error.
        let (last, finished) = read?;
        match last {
            Some(k) if !finished => {
                cursor = k;
                exclusive = true;
            }
            _ => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{KvStore, Options, Store, SyncMode};

    fn store_with(values: &[(&str, usize)]) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let options = Options {
            sync_mode: SyncMode::Never,
            ..Options::default()
        };
        let store = Store::open(dir.path(), options).unwrap();
        for &(key, len) in values {
            let pair = KvPair {
                key: key.into(),
                value: vec![7; len],
                expire_ts: 0,
            };
            store.put(&[pair]).unwrap();
        }
        (dir, store)
    }

    #[test]
    fn an_iterator_keeps_a_small_chunk_buffer_and_releases_a_large_one() {
        // 300 small pairs: the buffer of the first chunk is kept for the next.
        let keys: Vec<String> = (0..300).map(|i| format!("s{i:03}")).collect();
        let small: Vec<(&str, usize)> = keys.iter().map(|k| (k.as_str(), 10)).collect();
        let (_dir, store) = store_with(&small);
        let mut iter = store.iter(&IterationOptions::new()).unwrap();
        iter.next().unwrap().unwrap();
        let kept = iter.chunk.bytes.capacity();
        assert!(kept > 0 && kept <= KEPT_CHUNK_BYTES, "{kept}");
        assert_eq!(iter.count(), 299);

        // Two chunks of 100 KiB values: neither buffer outlives its chunk,
        // and an iterator that is done holds none.
        let big_keys: Vec<String> = (0..24).map(|i| format!("b{i:02}")).collect();
        let big: Vec<(&str, usize)> = big_keys.iter().map(|k| (k.as_str(), 100 << 10)).collect();
        let (_dir, store) = store_with(&big);
        let mut iter = store.iter(&IterationOptions::new()).unwrap();
        let first = iter.next().unwrap().unwrap();
        assert_eq!(first.value.len(), 100 << 10);
        assert_eq!(iter.chunk.bytes.capacity(), 0);
        let noted = iter.chunk.reserve;
        assert!(noted > 1 << 20, "the next chunk's size noted");
        assert!(iter.buffer.len() >= 9, "a 1 MiB chunk read ahead");
        // The second chunk (pairs like the first's) asks for no more than
        // was reserved before it took the lock: nothing grows under it.
        for _ in 0..=iter.buffer.len() {
            iter.next().unwrap().unwrap();
        }
        assert!(iter.chunk.asked > 0 && iter.chunk.asked <= noted);
        let rest: Vec<KvPair> = iter.by_ref().map(|p| p.unwrap()).collect();
        assert!(rest.len() < 23);
        assert_eq!(iter.chunk.bytes.capacity(), 0);
    }

    #[test]
    fn a_chunk_buffer_grows_once_to_the_bytes_it_is_told_of() {
        let keys: Vec<String> = (0..200).map(|i| format!("k{i:03}")).collect();
        let pairs: Vec<(&str, usize)> = keys.iter().map(|k| (k.as_str(), 50)).collect();
        let (_dir, store) = store_with(&pairs);
        let mut chunk = Chunk::default();
        let (last, finished) = chunk.read(&store.inner, b"", false, None).unwrap();
        assert!(!finished);
        assert_eq!(chunk.pairs.len(), CHUNK);
        // One growth, to exactly what was asked: doubling pair by pair
        // would leave a power of two, and a short reservation a larger one.
        assert_eq!(chunk.bytes.capacity(), chunk.asked);
        assert!(chunk.bytes.len() <= chunk.asked);
        let asked = chunk.asked;
        chunk.bytes = Vec::new();
        chunk.reserve = asked;
        chunk
            .read(&store.inner, &last.unwrap(), true, None)
            .unwrap();
        assert_eq!(chunk.pairs.len(), 200 - CHUNK);
        assert_eq!(
            chunk.bytes.capacity(),
            asked,
            "reserved before the lock, kept"
        );
    }
}
