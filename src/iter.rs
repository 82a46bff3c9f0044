//! Ordered iteration: the options DKV validates, and a chunked iterator that
//! holds the index's read lock only while it copies one short chunk, so it
//! never blocks writers for long. Must not write.

use std::collections::VecDeque;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::serverpb::{IterateRequest, KvPair};
use crate::store::{ChunkLimits, Inner};

/// Keys copied per visit to the index.
const CHUNK: usize = 32;
/// Index entries looked at per visit (expired ones are skipped), so one
/// visit stays short even across long runs of expired keys.
const MAX_VISITED: usize = 16 * CHUNK;
/// Value bytes copied per visit, so large values do not hold the lock long.
const MAX_CHUNK_BYTES: usize = 1 << 20;
const LIMITS: ChunkLimits = ChunkLimits {
    pairs: CHUNK,
    visited: MAX_VISITED,
    bytes: MAX_CHUNK_BYTES,
};
/// [`scan`]'s chunks are longer: it copies no pair out, so a longer hold of
/// the read lock (still bounded by `MAX_VISITED` entries) buys fewer index
/// seeks and more value loads in flight at once.
const SCAN_LIMITS: ChunkLimits = ChunkLimits {
    pairs: 4 * CHUNK,
    visited: MAX_VISITED,
    bytes: MAX_CHUNK_BYTES,
};

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
            done: false,
        }
    }

    fn refill(&mut self) -> Result<()> {
        let buffer = &mut self.buffer;
        let (last, finished) = self.inner.scan_chunk(
            &self.cursor,
            self.exclusive,
            self.prefix.as_deref(),
            LIMITS,
            &mut |p| {
                buffer.push_back(KvPair {
                    key: p.key.to_vec(),
                    value: p.value.to_vec(),
                    expire_ts: p.expire_ts,
                })
            },
        )?;
        match last {
            Some(k) => {
                self.cursor = k;
                self.exclusive = true;
            }
            None => self.done = true,
        }
        self.done |= finished;
        Ok(())
    }
}

impl Iterator for Iter {
    type Item = Result<KvPair>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(p) = self.buffer.pop_front() {
                return Some(Ok(p));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.refill() {
                self.done = true;
                return Some(Err(e));
            }
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
    let mut bytes: Vec<u8> = Vec::new();
    // Per pair: where its key starts, the key's and the value's lengths,
    // its expiry.
    let mut pairs: Vec<(usize, usize, usize, u64)> = Vec::with_capacity(CHUNK);
    loop {
        bytes.clear();
        pairs.clear();
        let read = inner.scan_chunk(&cursor, exclusive, prefix, SCAN_LIMITS, &mut |p| {
            pairs.push((bytes.len(), p.key.len(), p.value.len(), p.expire_ts));
            bytes.extend_from_slice(p.key);
            bytes.extend_from_slice(p.value);
        });
        for &(at, key_len, value_len, expire_ts) in &pairs {
            let (key, rest) = bytes[at..].split_at(key_len);
            let pair = PairRef {
                key,
                value: &rest[..value_len],
                expire_ts,
            };
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
