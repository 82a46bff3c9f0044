//! Disk images for the power-loss, corruption and I/O-error tests: a model of
//! the writes a workload made and where each record landed, copies of closed
//! stores, and the byte surgery a crash or a bad disk would do. Works on
//! files only; knows the format only through the crate's public `format`
//! module and `SEGMENT_HEADER_BYTES`. Never opens a store for the caller.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use dkv_cask::format::{SegmentHeader, SegmentKind};
use dkv_cask::serverpb::KvPair;
use dkv_cask::{KvStore, Result, SEGMENT_EXTENSION, SEGMENT_HEADER_BYTES, SegmentId, Store};

use super::{Rng, pair};

/// What a store should hold: every live key and its value.
pub type Model = BTreeMap<Vec<u8>, Vec<u8>>;

/// Every live pair of `store` as a map (iteration errors panic).
pub fn contents(store: &Store) -> Model {
    super::all_pairs(store).into_iter().collect()
}

/// One write of a workload.
#[derive(Clone, Debug)]
pub enum Write {
    /// One atomic batch of puts (one record).
    Put(Vec<KvPair>),
    /// A delete of one key (one record when the key exists).
    Delete(Vec<u8>),
}

impl Write {
    /// Runs the write against `store`.
    pub fn run(&self, store: &impl KvStore) -> Result<()> {
        match self {
            Write::Put(pairs) => store.put(pairs),
            Write::Delete(key) => store.delete(key),
        }
    }

    /// Applies the write to a model of the store's contents.
    pub fn apply_to(&self, model: &mut Model) {
        match self {
            Write::Put(pairs) => {
                for p in pairs {
                    model.insert(p.key.clone(), p.value.clone());
                }
            }
            Write::Delete(key) => {
                model.remove(key);
            }
        }
    }

    /// The keys the write touches.
    pub fn keys(&self) -> Vec<Vec<u8>> {
        match self {
            Write::Put(pairs) => pairs.iter().map(|p| p.key.clone()).collect(),
            Write::Delete(key) => vec![key.clone()],
        }
    }

    /// A random single put, multi-pair batch (keys may repeat) or delete of
    /// a key live in `model`, over `key_space` keys, with printable values
    /// of 1 to `max_value` bytes (never a zero byte, so a record's last byte
    /// is never zero).
    pub fn random(rng: &mut Rng, model: &Model, key_space: u64, max_value: usize) -> Write {
        let put = |rng: &mut Rng| {
            let key = format!("key{:03}", rng.below(key_space));
            let len = 1 + rng.below(max_value as u64) as usize;
            let value: Vec<u8> = (0..len).map(|_| b'a' + rng.below(26) as u8).collect();
            pair(key, value)
        };
        match rng.below(10) {
            0..=4 => Write::Put(vec![put(rng)]),
            5..=7 => {
                let n = 2 + rng.below(4) as usize;
                Write::Put((0..n).map(|_| put(rng)).collect())
            }
            _ if !model.is_empty() => {
                let i = rng.below(model.len() as u64) as usize;
                Write::Delete(model.keys().nth(i).expect("key").clone())
            }
            _ => Write::Put(vec![put(rng)]),
        }
    }
}

/// A record a workload wrote: its log extent and what the store held after it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// The write that made the record.
    pub write: Write,
    /// Logical log position of the record's first byte.
    pub start: u64,
    /// The record's change number: the log position just past it.
    pub end: u64,
    /// The store's contents once the record is applied.
    pub after: Model,
}

/// The records a workload wrote, in log order, with the state at each
/// record boundary.
#[derive(Clone, Debug)]
pub struct History {
    /// Log position when the history started.
    pub initial_position: u64,
    /// Contents when the history started.
    pub initial: Model,
    /// The records, oldest first.
    pub records: Vec<Recorded>,
    /// The contents after every acknowledged write.
    pub model: Model,
}

impl History {
    /// Starts recording from `store`'s current contents.
    pub fn new(store: &Store) -> History {
        let initial = contents(store);
        History {
            initial_position: store.last_change_number(),
            model: initial.clone(),
            initial,
            records: Vec::new(),
        }
    }

    /// Runs `write`; on success notes the record it made (if any).
    pub fn run(&mut self, store: &Store, write: Write) -> Result<()> {
        let start = store.last_change_number();
        write.run(store)?;
        let end = store.last_change_number();
        write.apply_to(&mut self.model);
        if end != start {
            self.records.push(Recorded {
                write,
                start,
                end,
                after: self.model.clone(),
            });
        }
        Ok(())
    }

    /// Log position just past the newest record.
    pub fn end(&self) -> u64 {
        self.records.last().map_or(self.initial_position, |r| r.end)
    }

    /// The contents once every record ending at or before `position` is
    /// applied (the newest record boundary not after `position`).
    pub fn state_at(&self, position: u64) -> &Model {
        self.records
            .iter()
            .rev()
            .find(|r| r.end <= position)
            .map_or(&self.initial, |r| &r.after)
    }

    /// Whether `position` is a record boundary.
    pub fn is_boundary(&self, position: u64) -> bool {
        position == self.initial_position || self.records.iter().any(|r| r.end == position)
    }

    /// The contents if record `index` had never been written.
    pub fn replay_without(&self, index: usize) -> Model {
        let mut model = self.initial.clone();
        for (i, r) in self.records.iter().enumerate() {
            if i != index {
                r.write.apply_to(&mut model);
            }
        }
        model
    }

    /// Says which record boundary `state` matches, for failure messages.
    pub fn describe(&self, state: &Model) -> String {
        if *state == self.initial {
            return format!("the initial state (position {})", self.initial_position);
        }
        match self.records.iter().position(|r| r.after == *state) {
            Some(i) => format!(
                "the state after record {i} (position {})",
                self.records[i].end
            ),
            None => "no record boundary: a partial batch or a wrong value".to_string(),
        }
    }
}

/// Where a record lies on disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// The segment file.
    pub file: PathBuf,
    /// File offset of the record's first byte.
    pub start: u64,
    /// File offset just past the record.
    pub end: u64,
}

/// Segment files in `dir`, oldest (lowest id) first.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .expect("list store folder")
        .map(|e| e.expect("list store folder").path())
        .filter(|p| p.extension().is_some_and(|x| x == SEGMENT_EXTENSION))
        .collect();
    files.sort();
    files
}

/// The base log position recorded in a segment file's header.
pub fn segment_base(path: &Path) -> u64 {
    let bytes = fs::read(path).expect("read segment");
    SegmentHeader::decode(&bytes)
        .unwrap_or_else(|e| panic!("{}: bad header: {e}", path.display()))
        .base_position
}

/// A valid segment header for segment `id` starting at log position `base`.
pub fn segment_header(id: u32, base: u64) -> Vec<u8> {
    SegmentHeader {
        kind: SegmentKind::Log,
        id: SegmentId(id),
        base_position: base,
    }
    .encode()
    .to_vec()
}

/// Finds the file extent of the record covering log positions
/// `start..end` among the segments of `dir`.
pub fn locate(dir: &Path, start: u64, end: u64) -> Extent {
    let file = segment_files(dir)
        .into_iter()
        .rev()
        .find(|f| segment_base(f) <= start)
        .expect("a segment holding the record");
    let base = segment_base(&file);
    Extent {
        start: SEGMENT_HEADER_BYTES + (start - base),
        end: SEGMENT_HEADER_BYTES + (end - base),
        file,
    }
}

/// A temporary folder for short-lived disk images: in `/dev/shm` when it is
/// there, since the image tests open thousands of copies and every open
/// syncs (durability is simulated by the images themselves, so the file
/// system's own guarantees do not matter to them).
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = Path::new("/dev/shm");
    if shm.is_dir()
        && let Ok(dir) = tempfile::Builder::new().prefix("dkv-cask").tempdir_in(shm)
    {
        return dir;
    }
    tempfile::tempdir().expect("temp dir")
}

/// Copies every file of the store folder `src` into a new scratch folder.
/// The store must be closed, or the copy is what a crash would leave (the
/// page cache's view, not necessarily what is durable).
pub fn copy_store(src: &Path) -> tempfile::TempDir {
    let dst = scratch_dir();
    for entry in fs::read_dir(src).expect("list store folder") {
        let entry = entry.expect("list store folder");
        if entry.file_type().expect("file type").is_file() {
            // A live store may remove a file after it was listed (a hint's
            // temp file renamed, a merged-away segment unlinked): then it is
            // simply not in the copy, as after a crash at that moment.
            // (Regression: the merge crash tests failed now and then.)
            match fs::copy(entry.path(), dst.path().join(entry.file_name())) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => panic!("copy store file {}: {e}", entry.path().display()),
            }
        }
    }
    dst
}

/// Removes the hint files and the keydir file of the store in `dir`, so
/// that its next open reads and verifies every segment.
pub fn remove_hints(dir: &Path) {
    for entry in fs::read_dir(dir).expect("list store folder") {
        let path = entry.expect("list store folder").path();
        let keydir = path.file_name().is_some_and(|n| n == dkv_cask::KEYDIR_FILE);
        if keydir || path.extension().is_some_and(|e| e == "hint") {
            fs::remove_file(&path).expect("remove a cache file");
        }
    }
}

/// The same file name in another folder.
pub fn same_file_in(path: &Path, dir: &Path) -> PathBuf {
    dir.join(path.file_name().expect("file name"))
}

/// Offset just past the last non-zero byte: where a preallocated segment's
/// data ends.
pub fn data_end(bytes: &[u8]) -> usize {
    bytes.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1)
}

/// Overwrites `bytes` at `offset` of the file at `path` in place.
pub fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    let file = fs::OpenOptions::new()
        .write(true)
        .open(path)
        .expect("open file to damage it");
    file.write_all_at(bytes, offset).expect("damage file");
}

/// Flips one bit of the byte at `offset` of the file at `path`.
pub fn flip_bit(path: &Path, offset: u64, bit: u8) {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open file to damage it");
    let mut b = [0u8; 1];
    file.read_exact_at(&mut b, offset).expect("read byte");
    b[0] ^= 1 << (bit % 8);
    file.write_all_at(&b, offset).expect("damage file");
}

/// Random bytes of which at least one is non-zero.
pub fn garbage(rng: &mut Rng, len: usize) -> Vec<u8> {
    let mut g = rng.bytes(len);
    if let Some(first) = g.first_mut()
        && *first == 0
    {
        *first = 0xA5;
    }
    g
}

/// The two headers of merged segment 1 covering log range `0..end`, to
/// which a test appends merged records of its own.
#[allow(dead_code)]
pub fn merged_segment_headers(end: u64) -> Vec<u8> {
    use dkv_cask::format::{MergeHeader, SegmentHeader, SegmentKind};
    let segment = SegmentHeader {
        kind: SegmentKind::Merged,
        id: dkv_cask::SegmentId(1),
        base_position: 0,
    };
    let merge = MergeHeader {
        end_position: end,
        applied: 0,
    };
    [&segment.encode()[..], &merge.encode()[..]].concat()
}
