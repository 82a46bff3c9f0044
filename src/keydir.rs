//! The KeyDir: an in-memory ordered index from key to the location of its
//! newest record. No I/O. Keys are stored inline in packed leaves of about
//! 8 KiB (no allocation per key), found through a small ordered directory of
//! leaf fences, so the cost per key is the key plus about 40 bytes.

use std::cmp::Ordering;

use byteorder::{ByteOrder, LittleEndian as LE};

use crate::log::{SegmentId, prefetch_all};

/// Where a record's operation lives: `len` bytes at `offset` of `segment`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordPointer {
    /// The segment file.
    pub segment: SegmentId,
    /// Byte offset of the operation within the segment file.
    pub offset: u32,
    /// Encoded length of the operation.
    pub len: u32,
}

/// What the KeyDir knows about a live key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyEntry {
    /// Location of the put operation holding the value.
    pub pointer: RecordPointer,
    /// Absolute expiry in Unix seconds, 0 = never.
    pub expire_ts: u64,
    /// Change number of the record that wrote the value.
    pub change_number: u64,
}

/// Encoded size of a [`KeyEntry`] inside a leaf.
const ENTRY_LEN: usize = 28;
/// Bytes of the key-length prefix inside a leaf.
const KEY_LEN_LEN: usize = 2;
/// A leaf splits once its packed bytes exceed this. 8 KiB rather than 4:
/// half the leaves make the fence directory and the leaf headers small
/// enough to stay in cache, which made lookups among 1M keys about 16%
/// faster (DESIGN.md 9); 16 KiB made inserts slower (longer shifts).
const LEAF_BYTES: usize = 8192;

impl KeyEntry {
    fn encode(&self, out: &mut [u8]) {
        LE::write_u32(&mut out[0..4], self.pointer.segment.0);
        LE::write_u32(&mut out[4..8], self.pointer.offset);
        LE::write_u32(&mut out[8..12], self.pointer.len);
        LE::write_u64(&mut out[12..20], self.expire_ts);
        LE::write_u64(&mut out[20..28], self.change_number);
    }

    fn decode(b: &[u8]) -> Self {
        KeyEntry {
            pointer: RecordPointer {
                segment: SegmentId(LE::read_u32(&b[0..4])),
                offset: LE::read_u32(&b[4..8]),
                len: LE::read_u32(&b[8..12]),
            },
            expire_ts: LE::read_u64(&b[12..20]),
            change_number: LE::read_u64(&b[20..28]),
        }
    }
}

/// A sorted run of entries packed as `[key len u16][key][entry]`, with the
/// start offset of each entry in `offs`. Every key shares its first
/// `hint_at` bytes with the others; `hints[i]` holds the next four bytes of
/// key `i` (big-endian, zero-padded), so a search compares small integers in
/// one short array and touches a key only to break a tie.
#[derive(Debug, Default)]
struct Leaf {
    data: Vec<u8>,
    offs: Vec<u32>,
    hints: Vec<u32>,
    hint_at: u16,
    /// The first `min(hint_at, 16)` bytes every key shares, kept beside the
    /// vectors' headers so that a search compares them without touching
    /// `data` (one cache miss fewer per lookup).
    shared: [u8; SHARED_INLINE],
    /// When nonzero, every entry takes this many bytes (all keys have one
    /// length), so entry `i` starts at `i * stride` and a lookup reads
    /// no offset from `offs` (one cache miss fewer). Kept exact by inserts;
    /// a removal leaves it as it was, and a split or rebuild recomputes it.
    stride: u32,
}

/// Bytes of the shared prefix a leaf keeps inline.
const SHARED_INLINE: usize = 16;

/// Four bytes of `key` from `at`, big-endian and zero-padded: ordering
/// hints agrees (non-strictly) with ordering keys that share `key[..at]`.
fn hint_of(key: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    if let Some(rest) = key.get(at..) {
        let n = rest.len().min(4);
        b[..n].copy_from_slice(&rest[..n]);
    }
    u32::from_be_bytes(b)
}

/// Length of the common prefix of `a` and `b`.
fn common_prefix(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl Leaf {
    /// Where entry `i` starts in `data`.
    fn start(&self, i: usize) -> usize {
        if self.stride != 0 {
            i * self.stride as usize
        } else {
            self.offs[i] as usize
        }
    }

    fn key(&self, i: usize) -> &[u8] {
        let at = self.start(i);
        let len = usize::from(LE::read_u16(&self.data[at..]));
        &self.data[at + KEY_LEN_LEN..at + KEY_LEN_LEN + len]
    }

    fn entry_at(&self, i: usize) -> (usize, usize) {
        let at = self.start(i);
        let len = usize::from(LE::read_u16(&self.data[at..]));
        let e = at + KEY_LEN_LEN + len;
        (e, e + ENTRY_LEN)
    }

    fn entry(&self, i: usize) -> KeyEntry {
        let (s, e) = self.entry_at(i);
        KeyEntry::decode(&self.data[s..e])
    }

    fn search(&self, key: &[u8]) -> Result<usize, usize> {
        let n = self.offs.len();
        if n == 0 {
            return Err(0);
        }
        let at = usize::from(self.hint_at);
        if at > 0 {
            // Every key starts with `shared`: a key that differs in it sorts
            // before or after all of them.
            let shared = match self.shared.get(..at) {
                Some(inline) => inline,
                None => &self.key(0)[..at],
            };
            let head = &key[..key.len().min(at)];
            match head.cmp(shared) {
                Ordering::Less => return Err(0),
                Ordering::Greater => return Err(n),
                Ordering::Equal if key.len() < at => return Err(0),
                Ordering::Equal => {}
            }
        }
        // Each step of the search loads the hint the step before chose, so
        // their cache misses would come one after another: ask for all of
        // the hints' lines first, so that the misses overlap and the search
        // finds its lines on the way.
        prefetch_all(&self.hints);
        let h = hint_of(key, at);
        let (mut lo, mut hi) = (0, n);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            match self.hints[mid].cmp(&h).then_with(|| self.key(mid).cmp(key)) {
                Ordering::Less => lo = mid + 1,
                Ordering::Greater => hi = mid,
                Ordering::Equal => return Ok(mid),
            }
        }
        Err(lo)
    }

    /// Recomputes `hint_at` as the keys' common prefix and every hint.
    fn rebuild_hints(&mut self) {
        let n = self.offs.len();
        let at = if n < 2 {
            0
        } else {
            common_prefix(self.key(0), self.key(n - 1)).min(usize::from(u16::MAX))
        };
        self.hint_at = at as u16;
        let inline = at.min(SHARED_INLINE);
        if inline > 0 {
            let first = &self.data[self.offs[0] as usize + KEY_LEN_LEN..];
            self.shared[..inline].copy_from_slice(&first[..inline]);
        }
        let size = self.data.len().checked_div(n).unwrap_or(0);
        let uniform = n > 0
            && self.data.len() == n * size
            && self
                .offs
                .iter()
                .enumerate()
                .all(|(i, &o)| o as usize == i * size);
        self.stride = if uniform { size as u32 } else { 0 };
        let hints: Vec<u32> = (0..n).map(|i| hint_of(self.key(i), at)).collect();
        self.hints = hints;
    }

    /// Grows a vector by at most an eighth, so slack stays small.
    fn reserve<T>(v: &mut Vec<T>, extra: usize) {
        if v.len() + extra > v.capacity() {
            v.reserve_exact(extra.max(v.len() / 8).max(4));
        }
    }

    fn insert_at(&mut self, i: usize, key: &[u8], entry: &KeyEntry) {
        let size = KEY_LEN_LEN + key.len() + ENTRY_LEN;
        self.stride = if self.offs.is_empty() || self.stride as usize == size {
            size as u32
        } else {
            0
        };
        let at = self.offs.get(i).map_or(self.data.len(), |&o| o as usize);
        Self::reserve(&mut self.data, size);
        Self::reserve(&mut self.offs, 1);
        let old_len = self.data.len();
        self.data.resize(old_len + size, 0);
        self.data.copy_within(at..old_len, at + size);
        LE::write_u16(&mut self.data[at..], key.len() as u16);
        self.data[at + KEY_LEN_LEN..at + KEY_LEN_LEN + key.len()].copy_from_slice(key);
        entry.encode(&mut self.data[at + KEY_LEN_LEN + key.len()..at + size]);
        for o in &mut self.offs[i..] {
            *o += size as u32;
        }
        self.offs.insert(i, at as u32);
        if self.offs.len() == 1 {
            self.hint_at = 0;
        }
        let shared = usize::from(self.hint_at);
        if self.offs.len() > 1 && shared > 0 {
            let other = if i == 0 { 1 } else { 0 };
            if common_prefix(key, self.key(other)) < shared {
                // The new key leaves the shared prefix: shorten it.
                self.hints.insert(i, 0);
                self.rebuild_hints();
                return;
            }
        }
        Self::reserve(&mut self.hints, 1);
        self.hints.insert(i, hint_of(key, shared));
    }

    fn remove_at(&mut self, i: usize) -> KeyEntry {
        let old = self.entry(i);
        let at = self.offs[i] as usize;
        let (_, end) = self.entry_at(i);
        let size = end - at;
        self.data.copy_within(end.., at);
        self.data.truncate(self.data.len() - size);
        self.offs.remove(i);
        self.hints.remove(i);
        for o in &mut self.offs[i..] {
            *o -= size as u32;
        }
        old
    }

    /// Splits off the upper part (by bytes, both parts non-empty); returns it.
    fn split(&mut self) -> Leaf {
        let half = self.data.len() / 2;
        let mid = self
            .offs
            .partition_point(|&o| (o as usize) < half)
            .clamp(1, self.offs.len() - 1);
        let cut = self.offs[mid] as usize;
        let mut right = Leaf {
            data: self.data[cut..].to_vec(),
            offs: self.offs[mid..].iter().map(|&o| o - cut as u32).collect(),
            hints: Vec::new(),
            hint_at: 0,
            shared: [0; SHARED_INLINE],
            stride: 0,
        };
        self.data.truncate(cut);
        self.offs.truncate(mid);
        self.data.shrink_to_fit();
        self.offs.shrink_to_fit();
        right.data.shrink_to_fit();
        right.offs.shrink_to_fit();
        self.rebuild_hints();
        right.rebuild_hints();
        self.hints.shrink_to_fit();
        right.hints.shrink_to_fit();
        right
    }

    fn heap_bytes(&self) -> usize {
        self.data.capacity() + self.offs.capacity() * 4 + self.hints.capacity() * 4
    }
}

/// A leaf's fence key. A short one is kept as three big-endian words of its
/// zero-padded bytes and its length, so that the directory's search
/// compares a few integers, with no pointer to chase and no byte swapping
/// per comparison.
#[derive(Clone, Debug, PartialEq, Eq)]
enum FenceKey {
    Inline { words: [u64; 3], len: u8 },
    Heap(Box<[u8]>),
}

/// Fence keys up to this length are stored inline.
const FENCE_INLINE: usize = 24;

impl FenceKey {
    fn new(key: &[u8]) -> Self {
        if key.len() <= FENCE_INLINE {
            let mut bytes = [0u8; FENCE_INLINE];
            bytes[..key.len()].copy_from_slice(key);
            let word = |i: usize| {
                let mut w = [0u8; 8];
                w.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
                u64::from_be_bytes(w)
            };
            FenceKey::Inline {
                words: [word(0), word(1), word(2)],
                len: key.len() as u8,
            }
        } else {
            FenceKey::Heap(key.into())
        }
    }

    /// Calls `f` with the key's bytes.
    fn with_bytes<R>(&self, f: impl FnOnce(&[u8]) -> R) -> R {
        match self {
            FenceKey::Inline { words, len } => {
                let mut bytes = [0u8; FENCE_INLINE];
                for (chunk, w) in bytes.chunks_exact_mut(8).zip(words) {
                    chunk.copy_from_slice(&w.to_be_bytes());
                }
                f(&bytes[..usize::from(*len)])
            }
            FenceKey::Heap(b) => f(b),
        }
    }

    /// Whether the key is at or below `long`, a key longer than
    /// [`FENCE_INLINE`] whose first bytes are `head` (inline): an inline
    /// key compares words with `head`, and equal words make it a prefix
    /// of `long` (its padding matched), so below it; no bytes are copied.
    fn at_or_below_long(&self, head: &FenceKey, long: &[u8]) -> bool {
        match (self, head) {
            (FenceKey::Inline { words, .. }, FenceKey::Inline { words: h, .. }) => {
                (words[0], words[1], words[2]) <= (h[0], h[1], h[2])
            }
            (FenceKey::Heap(b), _) => **b <= *long,
            (FenceKey::Inline { .. }, FenceKey::Heap(_)) => self.with_bytes(|b| b <= long),
        }
    }

    /// The key's bytes, copied.
    #[cfg(test)]
    fn to_vec(&self) -> Vec<u8> {
        self.with_bytes(<[u8]>::to_vec)
    }

    fn heap_bytes(&self) -> usize {
        match self {
            FenceKey::Inline { .. } => 0,
            FenceKey::Heap(b) => b.len(),
        }
    }
}

impl PartialOrd for FenceKey {
    #[inline(always)]
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for FenceKey {
    /// Bytewise order of the keys, as `[u8]` orders them (a lookup with a
    /// long key compares slices, so the two must agree). Two inline keys
    /// compare their words, then their lengths: padding changes nothing,
    /// since when the padded bytes first differ past the shorter key's end,
    /// that key is a prefix of the other and its zero sorts first, and when
    /// they are equal the shorter key is a prefix of the longer one.
    #[inline(always)]
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (FenceKey::Inline { words: x, len: a }, FenceKey::Inline { words: y, len: b }) => {
                (x[0], x[1], x[2], a).cmp(&(y[0], y[1], y[2], b))
            }
            _ => self.with_bytes(|x| other.with_bytes(|y| x.cmp(y))),
        }
    }
}

/// Fences per block of the fence directory, at most.
const FENCE_BLOCK: usize = 64;

/// The leaves' fences in ascending order, each with its leaf's slot: sorted
/// blocks of at most [`FENCE_BLOCK`] fences, and each block's first fence
/// copied into one array. A lookup bisects that array, then one block: about
/// 13 comparisons among the 8,000 fences of 1M random keys, without the linear
/// searches of a `BTreeMap`, which took 44% of a get's instructions
/// (DESIGN.md 9). A leaf split inserts into one block (splitting it when
/// full); the array of firsts only changes when a block does.
#[derive(Debug)]
struct Fences {
    /// Non-empty blocks; every fence of a block sorts before those of the
    /// next. The very first fence is the empty key.
    blocks: Vec<Vec<(FenceKey, u32)>>,
    /// `firsts[i]` is `blocks[i][0].0`.
    firsts: Vec<FenceKey>,
}

/// Where a fence is in [`Fences`]: its block and its place in the block.
#[derive(Clone, Copy, Debug)]
struct FencePos {
    block: usize,
    at: usize,
}

impl Fences {
    /// Fences in strictly ascending order, the first one the empty key.
    fn from_sorted(fences: Vec<(FenceKey, u32)>) -> Self {
        debug_assert!(
            fences
                .first()
                .is_some_and(|(f, _)| *f == FenceKey::new(&[]))
        );
        let blocks: Vec<Vec<(FenceKey, u32)>> = fences
            .chunks(FENCE_BLOCK)
            .map(|chunk| Self::block_of(chunk.iter().cloned()))
            .collect();
        let firsts = blocks.iter().map(|b| b[0].0.clone()).collect();
        Fences { blocks, firsts }
    }

    /// The last fence at or below `key` (there is one: the empty fence).
    fn below(&self, key: &[u8]) -> FencePos {
        if key.len() <= FENCE_INLINE {
            // An inline probe: the search compares integers, not slices.
            let probe = FenceKey::new(key);
            self.below_by(|f| *f <= probe)
        } else {
            let head = FenceKey::new(&key[..FENCE_INLINE]);
            self.below_by(|f| f.at_or_below_long(&head, key))
        }
    }

    /// The last fence for which `at_or_below` holds (true of a prefix of
    /// the fences, at least of the first).
    fn below_by(&self, at_or_below: impl Fn(&FenceKey) -> bool) -> FencePos {
        let block = self.firsts.partition_point(&at_or_below).saturating_sub(1);
        let at = self.blocks[block]
            .partition_point(|(f, _)| at_or_below(f))
            .saturating_sub(1);
        FencePos { block, at }
    }

    /// The fence at `pos` and its leaf's slot.
    fn get(&self, pos: FencePos) -> (&FenceKey, u32) {
        let (fence, id) = &self.blocks[pos.block][pos.at];
        (fence, *id)
    }

    /// The slot of the first fence's leaf (the empty fence's).
    fn first_slot(&self) -> u32 {
        self.blocks[0][0].1
    }

    /// Adds `fence`, which is not there yet, for the leaf in slot `id`.
    fn insert(&mut self, fence: FenceKey, id: u32) {
        let pos = self.below_by(|f| *f <= fence);
        let block = &mut self.blocks[pos.block];
        block.insert(pos.at + 1, (fence, id));
        if block.len() > FENCE_BLOCK {
            let upper = Self::block_of(block.drain(block.len() / 2..));
            self.firsts.insert(pos.block + 1, upper[0].0.clone());
            self.blocks.insert(pos.block + 1, upper);
        }
    }

    /// A block of `fences`, with room for one more than a full block, so
    /// that it never grows past that before it splits.
    fn block_of(fences: impl Iterator<Item = (FenceKey, u32)>) -> Vec<(FenceKey, u32)> {
        let mut block = Vec::with_capacity(FENCE_BLOCK + 1);
        block.extend(fences);
        block
    }

    /// Removes the fence at `pos`, which is not the first fence. A block
    /// left a quarter full joins its next or else its previous neighbour,
    /// when the two fit in one block.
    fn remove(&mut self, pos: FencePos) {
        debug_assert!(pos.block != 0 || pos.at != 0, "the empty fence stays");
        let b = pos.block;
        self.blocks[b].remove(pos.at);
        if self.blocks[b].is_empty() {
            self.blocks.remove(b);
            self.firsts.remove(b);
            return;
        }
        if pos.at == 0 {
            self.firsts[b] = self.blocks[b][0].0.clone();
        }
        if self.blocks[b].len() >= FENCE_BLOCK / 4 {
            return;
        }
        let fits = |other: &Vec<_>| self.blocks[b].len() + other.len() <= FENCE_BLOCK;
        let into = if self.blocks.get(b + 1).is_some_and(fits) {
            b
        } else if b > 0 && fits(&self.blocks[b - 1]) {
            b - 1
        } else {
            return;
        };
        // Block `into + 1` moves to the end of block `into`.
        let moved = self.blocks.remove(into + 1);
        self.firsts.remove(into + 1);
        self.blocks[into].extend(moved);
    }

    /// The slots of the leaves after the fence at `pos`, in order.
    fn slots_after(&self, pos: FencePos) -> impl Iterator<Item = u32> + '_ {
        self.blocks[pos.block][pos.at + 1..]
            .iter()
            .chain(self.blocks[pos.block + 1..].iter().flatten())
            .map(|&(_, id)| id)
    }

    /// Every fence and its slot, in order.
    #[cfg(test)]
    fn iter(&self) -> impl Iterator<Item = &(FenceKey, u32)> {
        self.blocks.iter().flatten()
    }

    /// Heap bytes of the blocks, the firsts and long fences' boxes.
    fn heap_bytes(&self) -> usize {
        let slot = std::mem::size_of::<(FenceKey, u32)>();
        let blocks: usize = self
            .blocks
            .iter()
            .map(|b| b.capacity() * slot + b.iter().map(|(f, _)| f.heap_bytes()).sum::<usize>())
            .sum();
        let firsts: usize = self.firsts.iter().map(FenceKey::heap_bytes).sum();
        blocks
            + self.blocks.capacity() * std::mem::size_of::<Vec<(FenceKey, u32)>>()
            + self.firsts.capacity() * std::mem::size_of::<FenceKey>()
            + firsts
    }
}

/// The in-memory index: key → [`KeyEntry`], in ascending bytewise key order.
#[derive(Debug)]
pub struct KeyDir {
    /// Leaf slots; a slot on the free list is empty.
    leaves: Vec<Leaf>,
    free: Vec<u32>,
    /// Fence (lowest possible key) of each leaf → its slot. The first fence
    /// is the empty key, so every key has a leaf.
    fences: Fences,
    len: usize,
    key_bytes: usize,
}

impl Default for KeyDir {
    fn default() -> Self {
        Self::new()
    }
}

impl KeyDir {
    /// An empty index.
    pub fn new() -> Self {
        let fences = Fences::from_sorted(vec![(FenceKey::new(&[]), 0)]);
        KeyDir {
            leaves: vec![Leaf::default()],
            free: Vec::new(),
            fences,
            len: 0,
            key_bytes: 0,
        }
    }

    /// Builds an index from entries in strictly ascending key order, packing
    /// leaves full: a linear pass with no search, for open. Returns `None`
    /// if the keys are not strictly ascending.
    pub fn from_sorted<'a>(
        entries: impl IntoIterator<Item = (&'a [u8], KeyEntry)>,
    ) -> Option<Self> {
        let mut leaves = Vec::new();
        let mut fences = Vec::new();
        let mut leaf = Leaf::default();
        let mut previous: Option<&[u8]> = None;
        let (mut len, mut key_bytes) = (0usize, 0usize);
        let finish = |leaf: &mut Leaf, leaves: &mut Vec<Leaf>, fences: &mut Vec<FenceKey>| {
            let mut done = std::mem::take(leaf);
            done.data.shrink_to_fit();
            done.offs.shrink_to_fit();
            done.rebuild_hints();
            fences.push(if leaves.is_empty() {
                FenceKey::new(&[])
            } else {
                FenceKey::new(done.key(0))
            });
            leaves.push(done);
        };
        for (key, entry) in entries {
            if previous.is_some_and(|p| p >= key) || key.len() > usize::from(u16::MAX) {
                return None;
            }
            previous = Some(key);
            let size = KEY_LEN_LEN + key.len() + ENTRY_LEN;
            if !leaf.offs.is_empty() && leaf.data.len() + size > LEAF_BYTES {
                finish(&mut leaf, &mut leaves, &mut fences);
            }
            if leaf.data.is_empty() {
                leaf.data.reserve_exact(LEAF_BYTES.max(size));
            }
            let at = leaf.data.len();
            leaf.offs.push(at as u32);
            leaf.data
                .extend_from_slice(&(key.len() as u16).to_le_bytes());
            leaf.data.extend_from_slice(key);
            leaf.data.resize(at + size, 0);
            entry.encode(&mut leaf.data[at + KEY_LEN_LEN + key.len()..at + size]);
            len += 1;
            key_bytes += key.len();
        }
        if !leaf.offs.is_empty() || leaves.is_empty() {
            finish(&mut leaf, &mut leaves, &mut fences);
        }
        let fences = Fences::from_sorted(
            fences
                .into_iter()
                .enumerate()
                .map(|(i, f)| (f, i as u32))
                .collect(),
        );
        Some(KeyDir {
            leaves,
            free: Vec::new(),
            fences,
            len,
            key_bytes,
        })
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Total bytes of all keys held.
    pub fn key_bytes(&self) -> usize {
        self.key_bytes
    }

    /// Heap bytes used by the index, keys included (allocator overhead not
    /// counted).
    pub fn memory_bytes(&self) -> usize {
        let leaves: usize = self.leaves.iter().map(Leaf::heap_bytes).sum();
        let slots = self.leaves.capacity() * std::mem::size_of::<Leaf>();
        leaves + slots + self.fences.heap_bytes() + self.free.capacity() * 4
    }

    /// The slot of the leaf that holds `key` if any does: the one of the
    /// last fence at or below it.
    fn leaf_for(&self, key: &[u8]) -> u32 {
        self.fences.get(self.fences.below(key)).1
    }

    /// The entry of `key`.
    pub fn get(&self, key: &[u8]) -> Option<KeyEntry> {
        let leaf = &self.leaves[self.leaf_for(key) as usize];
        leaf.search(key).ok().map(|i| leaf.entry(i))
    }

    /// Sets the entry of `key`; returns the entry it replaced.
    pub fn insert(&mut self, key: &[u8], entry: KeyEntry) -> Option<KeyEntry> {
        let id = self.leaf_for(key);
        let leaf = &mut self.leaves[id as usize];
        match leaf.search(key) {
            Ok(i) => {
                let old = leaf.entry(i);
                let (s, e) = leaf.entry_at(i);
                entry.encode(&mut leaf.data[s..e]);
                Some(old)
            }
            Err(i) => {
                leaf.insert_at(i, key, &entry);
                self.len += 1;
                self.key_bytes += key.len();
                self.split_if_needed(id);
                None
            }
        }
    }

    /// Replaces the entry of `key` with `f(entry)` when `f` returns one;
    /// returns the entry it replaced. One search, for updates that depend
    /// on the current entry (a merge moving a value).
    pub fn update(
        &mut self,
        key: &[u8],
        f: impl FnOnce(&KeyEntry) -> Option<KeyEntry>,
    ) -> Option<KeyEntry> {
        let id = self.leaf_for(key);
        let leaf = &mut self.leaves[id as usize];
        let i = leaf.search(key).ok()?;
        let old = leaf.entry(i);
        let new = f(&old)?;
        let (s, e) = leaf.entry_at(i);
        new.encode(&mut leaf.data[s..e]);
        Some(old)
    }

    /// Sets the entry of `key` unless the index already holds a newer one
    /// (a higher change number); returns whether it was set and what it
    /// replaced.
    pub fn insert_if_newer(&mut self, key: &[u8], entry: KeyEntry) -> (bool, Option<KeyEntry>) {
        match self.get(key) {
            Some(old) if old.change_number > entry.change_number => (false, None),
            _ => (true, self.insert(key, entry)),
        }
    }

    fn split_if_needed(&mut self, id: u32) {
        let leaf = &mut self.leaves[id as usize];
        if leaf.data.len() <= LEAF_BYTES || leaf.offs.len() < 2 {
            return;
        }
        let right = leaf.split();
        let fence = FenceKey::new(right.key(0));
        let rid = match self.free.pop() {
            Some(slot) => {
                self.leaves[slot as usize] = right;
                slot
            }
            None => {
                self.leaves.push(right);
                (self.leaves.len() - 1) as u32
            }
        };
        self.fences.insert(fence, rid);
        self.split_if_needed(id);
        self.split_if_needed(rid);
    }

    /// Removes `key`; returns its entry.
    pub fn remove(&mut self, key: &[u8]) -> Option<KeyEntry> {
        let pos = self.fences.below(key);
        let id = self.fences.get(pos).1;
        let leaf = &mut self.leaves[id as usize];
        let i = leaf.search(key).ok()?;
        let old = leaf.remove_at(i);
        self.len -= 1;
        self.key_bytes -= key.len();
        if leaf.offs.is_empty() && id != self.fences.first_slot() {
            // Drop the empty leaf: its range joins the leaf before it.
            self.fences.remove(pos);
            self.leaves[id as usize] = Leaf::default();
            self.free.push(id);
        } else if leaf.data.capacity() > 2 * leaf.data.len() + 64 {
            leaf.data.shrink_to(leaf.data.len() + leaf.data.len() / 8);
            leaf.offs.shrink_to(leaf.offs.len() + leaf.offs.len() / 8);
        }
        Some(old)
    }

    /// Calls `f` with each key at or after `from` (after it when
    /// `exclusive`), in ascending order, until `f` returns `false`.
    pub fn scan_from<'a>(
        &'a self,
        from: &[u8],
        exclusive: bool,
        mut f: impl FnMut(&'a [u8], KeyEntry) -> bool,
    ) {
        // One search finds the first leaf; the fences after it are looked
        // up only if the scan runs past that leaf.
        let pos = self.fences.below(from);
        let leaf = &self.leaves[self.fences.get(pos).1 as usize];
        let start = match leaf.search(from) {
            Ok(i) if exclusive => i + 1,
            Ok(i) | Err(i) => i,
        };
        if !Self::visit_leaf(leaf, start, &mut f) {
            return;
        }
        for id in self.fences.slots_after(pos) {
            if !Self::visit_leaf(&self.leaves[id as usize], 0, &mut f) {
                return;
            }
        }
    }

    /// Calls `f` with the keys of `leaf` from its `start`-th on; returns
    /// `false` as soon as `f` does.
    fn visit_leaf<'a>(
        leaf: &'a Leaf,
        start: usize,
        f: &mut impl FnMut(&'a [u8], KeyEntry) -> bool,
    ) -> bool {
        let n = leaf.offs.len();
        if start >= n {
            return true;
        }
        // Entries are packed back to back in key order, so one pass reads
        // each length, key and entry where the one before ended, with no
        // offset looked up per entry.
        let mut rest = &leaf.data[leaf.start(start)..];
        for _ in start..n {
            let (len, tail) = rest.split_at(KEY_LEN_LEN);
            let (key, tail) = tail.split_at(usize::from(LE::read_u16(len)));
            let (entry, tail) = tail.split_at(ENTRY_LEN);
            if !f(key, KeyEntry::decode(entry)) {
                return false;
            }
            rest = tail;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap as Model;
    use std::ops::Bound;

    /// The blocks are non-empty, at most full, in order, and their firsts
    /// are copies of their first fences.
    fn assert_well_formed(f: &Fences) {
        assert_eq!(f.blocks.len(), f.firsts.len());
        for (block, first) in f.blocks.iter().zip(&f.firsts) {
            assert!(
                !block.is_empty() && block.len() <= FENCE_BLOCK,
                "{}",
                block.len()
            );
            assert_eq!(&block[0].0, first);
        }
        let all: Vec<Vec<u8>> = f.iter().map(|(k, _)| k.to_vec()).collect();
        assert!(all.windows(2).all(|w| w[0] < w[1]), "fences out of order");
        assert_eq!(
            all.first(),
            Some(&Vec::new()),
            "the empty fence comes first"
        );
    }

    #[test]
    fn the_fence_directory_finds_the_fence_below_any_key_as_a_btreemap_does() {
        let mut s = 7u64;
        let mut fences = Fences::from_sorted(vec![(FenceKey::new(&[]), 0)]);
        let mut model: Model<Vec<u8>, u32> = Model::from([(Vec::new(), 0)]);
        // Short and long keys (past the inline size) over a small alphabet
        // with zero and high bytes, so that probes hit fences exactly, fall
        // between them, share long prefixes with them and differ from them
        // only in zero padding.
        let key = |s: &mut u64| -> Vec<u8> {
            let len = [1, 5, 16, 23, 24, 25, 40][(xorshift(s) % 7) as usize];
            (0..len)
                .map(|_| [0x00, b'a', 0x7f, 0xff][(xorshift(s) % 4) as usize])
                .collect()
        };
        for step in 0..20_000u32 {
            let k = key(&mut s);
            if xorshift(&mut s).is_multiple_of(3) && !k.is_empty() {
                // Remove the fence at or below a key, unless it is the first.
                let pos = fences.below(&k);
                let (found, _) = fences.get(pos);
                let expected = model
                    .range::<[u8], _>((Bound::Unbounded, Bound::Included(&k[..])))
                    .next_back()
                    .unwrap();
                assert_eq!(found.to_vec(), *expected.0, "below {k:?}");
                if !expected.0.is_empty() {
                    let gone = found.to_vec();
                    fences.remove(pos);
                    model.remove(&gone);
                }
            } else if let std::collections::btree_map::Entry::Vacant(slot) = model.entry(k) {
                fences.insert(FenceKey::new(slot.key()), step);
                slot.insert(step);
            }
            if step % 1000 == 0 {
                assert_well_formed(&fences);
            }
            let probe = key(&mut s);
            let pos = fences.below(&probe);
            let expected = model
                .range::<[u8], _>((Bound::Unbounded, Bound::Included(&probe[..])))
                .next_back()
                .unwrap();
            let (fence, id) = fences.get(pos);
            assert_eq!((fence.to_vec(), id), (expected.0.clone(), *expected.1));
            let after: Vec<u32> = fences.slots_after(pos).collect();
            let expected_after: Vec<u32> = model
                .range::<[u8], _>((Bound::Excluded(&expected.0[..]), Bound::Unbounded))
                .map(|(_, &id)| id)
                .collect();
            assert_eq!(after, expected_after, "after {probe:?}");
        }
        assert_well_formed(&fences);
        assert!(
            fences.blocks.len() > 3,
            "several blocks: {}",
            fences.blocks.len()
        );
    }

    #[test]
    fn a_long_key_finds_the_inline_fence_that_is_its_prefix() {
        let full = vec![b'k'; FENCE_INLINE];
        let zeros = b"k\0\0\0".to_vec();
        let mut fences = Fences::from_sorted(vec![(FenceKey::new(&[]), 0)]);
        fences.insert(FenceKey::new(&zeros), 1);
        fences.insert(FenceKey::new(&full), 2);
        let below = |key: &[u8]| fences.get(fences.below(key)).1;
        // Longer than a fence keeps inline, starting with a whole fence.
        assert_eq!(below(&[full.clone(), b"x".to_vec()].concat()), 2);
        // Starting with a fence whose zero bytes look like padding.
        let mut padded = zeros.clone();
        padded.resize(FENCE_INLINE + 1, 0);
        assert_eq!(below(&padded), 1);
        // Just below the first fence's bytes.
        assert_eq!(below(&[b"j".to_vec(), full].concat()), 0);
    }

    #[test]
    fn removing_fences_renews_a_blocks_first_merges_small_blocks_and_drops_empty_ones() {
        const B: u32 = FENCE_BLOCK as u32;
        let key = |i: u32| format!("f{i:04}").into_bytes();
        let mut all = vec![(FenceKey::new(&[]), 0)];
        all.extend((1..4 * B).map(|i| (FenceKey::new(&key(i)), i)));
        let mut fences = Fences::from_sorted(all);
        let lens = |f: &Fences| f.blocks.iter().map(Vec::len).collect::<Vec<usize>>();
        let b = FENCE_BLOCK;
        assert_eq!(lens(&fences), [b, b, b, b]);
        let slots = |f: &Fences| f.iter().map(|&(_, id)| id).collect::<Vec<u32>>();
        let mut model = slots(&fences);
        let mut remove = |f: &mut Fences, range: std::ops::RangeInclusive<u32>| {
            for i in range {
                let pos = f.below(&key(i));
                assert_eq!(f.get(pos).1, i, "the fence of {i}");
                f.remove(pos);
                model.retain(|&id| id != i);
                assert_well_formed(f);
                assert_eq!(slots(f), model);
            }
        };
        // The last block emptied (its neighbour is full): it is dropped.
        remove(&mut fences, 3 * B..=4 * B - 1);
        assert_eq!(lens(&fences), [b, b, b]);
        // The second block's first fence: its copy in `firsts` follows.
        remove(&mut fences, B..=B);
        assert_eq!(fences.firsts[1].to_vec(), key(B + 1));
        // The third block down to 40, then the second below a quarter: it
        // takes in the third, which fits.
        remove(&mut fences, 2 * B..=2 * B + 23);
        assert_eq!(lens(&fences), [b, b - 1, 40]);
        remove(&mut fences, B + 1..=B + 48);
        assert_eq!(lens(&fences), [b, b / 4 - 1 + 40]);
        // The first block down to 10, then the last one below a quarter
        // from its end: with no next block, it joins the one before it.
        remove(&mut fences, 1..=54);
        assert_eq!(lens(&fences), [10, b / 4 - 1 + 40]);
        remove(&mut fences, 2 * B + 24..=3 * B - 1);
        assert_eq!(lens(&fences), [10 + b / 4 - 1]);
        assert_eq!(fences.get(fences.below(b"zzz")).1, *model.last().unwrap());
    }

    fn entry(n: u64) -> KeyEntry {
        KeyEntry {
            pointer: RecordPointer {
                segment: SegmentId(n as u32),
                offset: (n * 3) as u32,
                len: 7,
            },
            expire_ts: n,
            change_number: n,
        }
    }

    /// A small deterministic generator, so failures reproduce.
    fn xorshift(s: &mut u64) -> u64 {
        *s ^= *s << 13;
        *s ^= *s >> 7;
        *s ^= *s << 17;
        *s
    }

    /// Every key of `model` is found with its entry, and a whole scan
    /// yields exactly `model`, in order.
    fn assert_same(kd: &KeyDir, model: Model<Vec<u8>, KeyEntry>) {
        assert_eq!(kd.len(), model.len());
        for (k, v) in &model {
            assert_eq!(kd.get(k), Some(*v));
        }
        let mut all = Vec::new();
        kd.scan_from(b"", false, |k, e| {
            all.push((k.to_vec(), e));
            true
        });
        assert_eq!(all, model.into_iter().collect::<Vec<_>>());
    }

    #[test]
    fn agrees_with_a_btreemap_under_random_inserts_and_removes() {
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let mut kd = KeyDir::new();
        let mut model = Model::new();
        for step in 0..60_000u64 {
            let r = xorshift(&mut seed);
            let key_len = 1 + (r % 40) as usize;
            let key: Vec<u8> = (0..key_len)
                .map(|i| b'a' + ((r >> (i % 60)) % 4) as u8)
                .collect();
            if r.is_multiple_of(5) {
                assert_eq!(kd.remove(&key), model.remove(&key), "step {step}");
            } else {
                assert_eq!(kd.insert(&key, entry(step)), model.insert(key, entry(step)));
            }
        }
        assert_same(&kd, model);
    }

    /// Leaves whose keys all have one length find entries by arithmetic;
    /// a key of another length, inserted anywhere, and its removal, must
    /// leave every lookup and scan right.
    #[test]
    fn leaves_of_one_key_length_and_of_mixed_lengths_agree_with_a_btreemap() {
        let mut seed = 0x2545_F491_4F6C_DD1Du64;
        let mut kd = KeyDir::new();
        let mut model = Model::new();
        for step in 0..40_000u64 {
            let r = xorshift(&mut seed);
            let len = match r % 50 {
                0 => 15,
                1 => 17,
                _ => 16,
            };
            let key = format!("{:032}", r % 30_000).into_bytes()[32 - len..].to_vec();
            if r % 7 == 3 {
                assert_eq!(kd.remove(&key), model.remove(&key), "step {step}");
            } else {
                assert_eq!(
                    kd.insert(&key, entry(step)),
                    model.insert(key.clone(), entry(step))
                );
            }
            let probe = format!("{:016}", xorshift(&mut seed) % 30_000).into_bytes();
            assert_eq!(kd.get(&probe), model.get(&probe).copied(), "step {step}");
        }
        assert_same(&kd, model);
    }

    #[test]
    fn scan_from_starts_inclusive_or_exclusive_and_stops_when_told() {
        let mut kd = KeyDir::new();
        for i in 0..5000u64 {
            kd.insert(format!("k{i:05}").as_bytes(), entry(i));
        }
        let mut seen = Vec::new();
        kd.scan_from(b"k02500", false, |k, _| {
            seen.push(k.to_vec());
            seen.len() < 3
        });
        assert_eq!(seen, [b"k02500", b"k02501", b"k02502"]);
        seen.clear();
        kd.scan_from(b"k02500", true, |k, _| {
            seen.push(k.to_vec());
            false
        });
        assert_eq!(seen, [b"k02501"]);
    }

    #[test]
    fn a_scan_from_any_fence_or_its_neighbours_matches_the_model_across_leaves() {
        // Keys of two lengths (some past the inline fence size), then a
        // run removed so that whole leaves empty out and drop their fences.
        let mut kd = KeyDir::new();
        let mut model = Model::new();
        for i in 0..6000u64 {
            let key = if i % 3 == 0 {
                format!("key{i:05}-with-a-longer-tail").into_bytes()
            } else {
                format!("key{i:05}").into_bytes()
            };
            kd.insert(&key, entry(i));
            model.insert(key, entry(i));
        }
        for i in 2000..3500u64 {
            for key in [
                format!("key{i:05}").into_bytes(),
                format!("key{i:05}-with-a-longer-tail").into_bytes(),
            ] {
                assert_eq!(kd.remove(&key), model.remove(&key));
            }
        }
        let fences: Vec<Vec<u8>> = kd.fences.iter().map(|(f, _)| f.to_vec()).collect();
        assert!(fences.len() > 10, "several leaves: {}", fences.len());
        let mut starts = vec![Vec::new(), b"zzz".to_vec(), b"key02500".to_vec()];
        for f in &fences {
            starts.push(f.clone());
            let mut after = f.clone();
            after.push(0);
            starts.push(after);
            if let Some(shorter) = f.split_last().map(|(_, rest)| rest.to_vec()) {
                starts.push(shorter);
            }
            let below = (Bound::Unbounded, Bound::Excluded(f.as_slice()));
            starts.extend(
                model
                    .range::<[u8], _>(below)
                    .next_back()
                    .map(|(k, _)| k.clone()),
            );
        }
        for from in &starts {
            for exclusive in [false, true] {
                let lower = if exclusive {
                    Bound::Excluded(from.as_slice())
                } else {
                    Bound::Included(from.as_slice())
                };
                let want: Vec<(Vec<u8>, KeyEntry)> = model
                    .range::<[u8], _>((lower, Bound::Unbounded))
                    .take(300)
                    .map(|(k, v)| (k.clone(), *v))
                    .collect();
                let mut got = Vec::new();
                kd.scan_from(from, exclusive, |k, e| {
                    got.push((k.to_vec(), e));
                    got.len() < 300
                });
                assert_eq!(got, want, "from {from:?}, exclusive {exclusive}");
            }
        }
    }

    #[test]
    fn removing_everything_leaves_an_empty_usable_index() {
        let mut kd = KeyDir::new();
        for i in 0..3000u64 {
            kd.insert(&i.to_be_bytes(), entry(i));
        }
        for i in 0..3000u64 {
            assert_eq!(kd.remove(&i.to_be_bytes()), Some(entry(i)));
        }
        assert!(kd.is_empty());
        assert_eq!(kd.key_bytes(), 0);
        kd.scan_from(b"", false, |_, _| panic!("nothing to scan"));
        kd.insert(b"again", entry(1));
        assert_eq!(kd.get(b"again"), Some(entry(1)));
    }

    #[test]
    fn huge_keys_split_leaves_without_overflow() {
        let mut kd = KeyDir::new();
        for i in 0..20u8 {
            let key = vec![i; u16::MAX as usize];
            kd.insert(&key, entry(u64::from(i)));
        }
        for i in 0..20u8 {
            assert_eq!(
                kd.get(&vec![i; u16::MAX as usize]),
                Some(entry(u64::from(i)))
            );
        }
    }

    #[test]
    fn an_index_built_from_sorted_entries_equals_one_built_by_inserts_and_stays_usable() {
        let mut s = 7u64;
        let mut model = Model::new();
        for i in 0..20_000u64 {
            let len = 1 + (xorshift(&mut s) % 40) as usize;
            let key: Vec<u8> = (0..len)
                .map(|_| b'a' + (xorshift(&mut s) % 3) as u8)
                .collect();
            model.insert(key, entry(i));
        }
        let mut built = KeyDir::from_sorted(model.iter().map(|(k, e)| (k.as_slice(), *e))).unwrap();
        let mut scanned = Vec::new();
        built.scan_from(&[], false, |k, e| {
            scanned.push((k.to_vec(), e));
            true
        });
        assert_eq!(scanned, model.clone().into_iter().collect::<Vec<_>>());
        assert_eq!(built.len(), model.len());
        for (i, k) in model.keys().enumerate().step_by(7) {
            assert_eq!(built.get(k), Some(model[k]), "key {i}");
        }
        // Inserts and removes after the bulk load keep it right.
        for i in 0..5_000u64 {
            let key = format!("{}", xorshift(&mut s) % 9_000).into_bytes();
            if i % 3 == 0 {
                assert_eq!(built.remove(&key), model.remove(&key));
            } else {
                assert_eq!(built.insert(&key, entry(i)), model.insert(key, entry(i)));
            }
        }
        let mut scanned = Vec::new();
        built.scan_from(&[], false, |k, e| {
            scanned.push((k.to_vec(), e));
            true
        });
        assert_eq!(scanned, model.into_iter().collect::<Vec<_>>());
        assert!(KeyDir::from_sorted([(&b"b"[..], entry(1)), (&b"a"[..], entry(2))]).is_none());
        assert!(KeyDir::from_sorted([(&b"a"[..], entry(1)), (&b"a"[..], entry(2))]).is_none());
        assert_eq!(KeyDir::from_sorted(std::iter::empty()).unwrap().len(), 0);
    }

    #[test]
    fn insert_if_newer_keeps_the_highest_change_number() {
        let mut kd = KeyDir::new();
        assert!(kd.insert_if_newer(b"k", entry(5)).0);
        assert!(!kd.insert_if_newer(b"k", entry(3)).0);
        assert_eq!(kd.get(b"k"), Some(entry(5)));
        assert!(kd.insert_if_newer(b"k", entry(9)).0);
        assert_eq!(kd.get(b"k"), Some(entry(9)));
    }

    #[test]
    fn a_million_sixteen_byte_keys_cost_at_most_48_bytes_each_beyond_the_key() {
        let mut kd = KeyDir::new();
        let mut seed = 0x1234_5678_9ABC_DEF1u64;
        let n = 1_000_000u64;
        for i in 0..n {
            // Random order, as a hash-partitioned workload would insert.
            let k = xorshift(&mut seed);
            kd.insert(format!("{:016x}", k).as_bytes(), entry(i));
        }
        let per_key = kd.memory_bytes() as f64 / kd.len() as f64 - 16.0;
        assert!(kd.len() as u64 > n - 10, "keys collided: {}", kd.len());
        eprintln!("KeyDir: {per_key:.1} bytes per key beyond the key");
        assert!(per_key <= 48.0, "{per_key:.1} bytes per key beyond the key");
    }
}
