//! Crash images: a [`FileSystem`] that records every change a store makes
//! to disk, and a replay of that record that builds, for any point in it,
//! the files a power loss at that point could leave behind.
//!
//! The model keeps the durable and the volatile state of every file and
//! folder apart, as the kernel does:
//!
//! - a file's writes and size changes are volatile until `fdatasync` or
//!   `fsync` of that file;
//! - a folder's entries (a create, rename, link or removal in it) are
//!   volatile until `fsync` of that folder. A rename between two folders is
//!   two changes, one in each.
//!
//! A crash keeps the durable state and, per [`Loss`], none, all, or a
//! random prefix of each file's and folder's volatile changes, the last
//! write kept possibly torn, or ([`Loss::Reordered`]) each 512-byte block
//! of a file as of its own random number of the file's unsynced writes (a
//! block is never torn within itself: disks write sectors whole).
//! This is the model of ALICE (OSDI 2014) and LazyFS (VLDB 2024): it drops,
//! cuts, tears and reorders unsynced writes within a file and loses unsynced
//! creates and renames. A folder's changes are kept as a prefix (a
//! journaling file system commits them in order).
//!
//! Reads are not recorded: the recorder performs each call on the real
//! file system (its root should be in memory, `/dev/shm`, for speed), so
//! the store reads back what it wrote as it would from the page cache.
//!
//! ```no_run
//! use dkv_cask::crash::{Loss, Recorder};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let root = tempfile::tempdir()?;
//! let recorder = Recorder::new(root.path())?;
//! let options = dkv_cask::Options {
//!     file_system: recorder.clone(),
//!     ..dkv_cask::Options::default()
//! };
//! let store = dkv_cask::Store::open(root.path().join("db"), options)?;
//! // ... a workload ...
//! # drop(store);
//! let mut replay = recorder.replay();
//! for point in 0..=replay.len() {
//!     replay.advance_to(point);
//!     let image = tempfile::tempdir()?;
//!     replay.image(Loss::AllUnsynced).write_to(image.path())?;
//!     // open image.path().join("db") and check it
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::log::{FileSystem, StdFileSystem};

/// A file or folder of the model, numbered in order of creation.
type Node = usize;

/// The root folder's node.
const ROOT: Node = 0;

/// One recorded change.
#[derive(Clone, Debug)]
enum Op {
    /// A new file or folder `node` named `name` in folder `parent`.
    Create {
        parent: Node,
        name: OsString,
        node: Node,
        dir: bool,
    },
    /// Bytes written into a file.
    Write {
        node: Node,
        offset: u64,
        data: Arc<[u8]>,
    },
    /// A file cut or extended.
    SetLen { node: Node, len: u64 },
    /// `fsync` or `fdatasync` of a file.
    SyncFile { node: Node },
    /// A name for `node` in `parent` (a hard link, or one half of a rename
    /// between folders).
    Link {
        parent: Node,
        name: OsString,
        node: Node,
    },
    /// A name removed from `parent`.
    Unlink { parent: Node, name: OsString },
    /// A rename within one folder (atomic).
    Rename {
        parent: Node,
        from: OsString,
        to: OsString,
    },
    /// `fsync` of a folder.
    SyncDir { node: Node },
}

/// A [`FileSystem`] that performs every call on the real file system and
/// records it, for [`Replay`]. Files and folders under its root (those
/// there at the start, and those created through it) are tracked; a change
/// to anything else is counted in [`untracked`](Self::untracked) (a test
/// should check that it stays 0).
#[derive(Debug)]
pub struct Recorder {
    journal: Mutex<Journal>,
    /// The durable state the recording starts from.
    base: Model,
}

#[derive(Debug, Default)]
struct Journal {
    ops: Vec<Op>,
    /// Real (device, inode) to the model node it currently is.
    nodes: HashMap<(u64, u64), Node>,
    next_node: Node,
    untracked: u64,
}

impl Recorder {
    /// A recorder whose root is the existing folder `root`. What the folder
    /// already holds (files and folders, read now) is taken as durable.
    pub fn new(root: &Path) -> io::Result<Arc<Recorder>> {
        let mut journal = Journal {
            next_node: ROOT + 1,
            ..Journal::default()
        };
        let mut base = Model::default();
        journal
            .nodes
            .insert(identity(&std::fs::metadata(root)?), ROOT);
        journal.adopt_tree(root, ROOT, &mut base)?;
        Ok(Arc::new(Recorder {
            journal: Mutex::new(journal),
            base,
        }))
    }

    /// Changes recorded so far: the crash points are `0..=ops()`.
    pub fn ops(&self) -> usize {
        self.journal.lock().ops.len()
    }

    /// Changes made to files or folders the recorder does not track.
    pub fn untracked(&self) -> u64 {
        self.journal.lock().untracked
    }

    /// A replay of the changes recorded so far, at point 0 (before any).
    pub fn replay(&self) -> Replay {
        Replay {
            ops: self.journal.lock().ops.clone(),
            at: 0,
            model: self.base.clone(),
        }
    }

    /// Runs `f` (the real call) with the journal locked, then records what
    /// `record` makes of it.
    fn with<T>(
        &self,
        f: impl FnOnce() -> io::Result<T>,
        record: impl FnOnce(&mut Journal, &T) -> Option<Op>,
    ) -> io::Result<T> {
        let mut j = self.journal.lock();
        let value = f()?;
        match record(&mut j, &value) {
            Some(op) => j.ops.push(op),
            None => j.untracked += 1,
        }
        Ok(value)
    }
}

fn identity(m: &std::fs::Metadata) -> (u64, u64) {
    (m.dev(), m.ino())
}

impl Journal {
    /// Takes the existing contents of folder `dir` (node `node`) into
    /// `model` as durable.
    fn adopt_tree(&mut self, dir: &Path, node: Node, model: &mut Model) -> io::Result<()> {
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let path = entry.path();
            // A second name of a file already seen (a hard link) is the
            // same node.
            if let Some(known) = self.node_at(&path) {
                model.dir(node).durable.insert(entry.file_name(), known);
                continue;
            }
            let Some(child) = self.adopt(&path) else {
                continue;
            };
            model.dir(node).durable.insert(entry.file_name(), child);
            if entry.file_type()?.is_dir() {
                model.dirs.insert(child, DirState::default());
                self.adopt_tree(&path, child, model)?;
            } else {
                model.files.insert(
                    child,
                    FileState {
                        durable: std::fs::read(&path)?,
                        pending: Vec::new(),
                    },
                );
            }
        }
        Ok(())
    }

    fn node_of_file(&self, file: &File) -> Option<Node> {
        let m = file.metadata().ok()?;
        self.nodes.get(&identity(&m)).copied()
    }

    fn node_at(&self, path: &Path) -> Option<Node> {
        let m = std::fs::symlink_metadata(path).ok()?;
        self.nodes.get(&identity(&m)).copied()
    }

    /// The folder node holding `path`, and the name in it.
    fn parent_of(&self, path: &Path) -> Option<(Node, OsString)> {
        let name = path.file_name()?.to_os_string();
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        Some((self.node_at(parent)?, name))
    }

    /// A new node for the real file or folder at `path` (its inode may be a
    /// reused one: the old node keeps its place in the model).
    fn adopt(&mut self, path: &Path) -> Option<Node> {
        let m = std::fs::symlink_metadata(path).ok()?;
        let node = self.next_node;
        self.next_node += 1;
        self.nodes.insert(identity(&m), node);
        Some(node)
    }
}

impl FileSystem for Recorder {
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<File> {
        let mut j = self.journal.lock();
        let existing = j.node_at(path);
        let file = StdFileSystem.create(path, exclusive)?;
        let op = match existing {
            // Opened with truncation: the same file, emptied.
            Some(node) if !exclusive => Some(Op::SetLen { node, len: 0 }),
            _ => j.parent_of(path).and_then(|(parent, name)| {
                let node = j.adopt(path)?;
                Some(Op::Create {
                    parent,
                    name,
                    node,
                    dir: false,
                })
            }),
        };
        match op {
            Some(op) => j.ops.push(op),
            None => j.untracked += 1,
        }
        Ok(file)
    }

    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.with(
            || StdFileSystem.write_at(file, buf, offset),
            |j, ()| {
                Some(Op::Write {
                    node: j.node_of_file(file)?,
                    offset,
                    data: Arc::from(buf),
                })
            },
        )
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        self.with(
            || StdFileSystem.sync_data(file),
            |j, ()| {
                Some(Op::SyncFile {
                    node: j.node_of_file(file)?,
                })
            },
        )
    }

    fn sync_all(&self, file: &File) -> io::Result<()> {
        self.with(
            || StdFileSystem.sync_all(file),
            |j, ()| {
                Some(Op::SyncFile {
                    node: j.node_of_file(file)?,
                })
            },
        )
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.with(
            || StdFileSystem.set_len(file, len),
            |j, ()| {
                Some(Op::SetLen {
                    node: j.node_of_file(file)?,
                    len,
                })
            },
        )
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut j = self.journal.lock();
        let node = j.node_at(from);
        let source = j.parent_of(from);
        let target = j.parent_of(to);
        // Two names of one file: POSIX leaves both; nothing changes.
        let same_file = node.is_some() && node == j.node_at(to);
        StdFileSystem.rename(from, to)?;
        if same_file {
            return Ok(());
        }
        match (node, source, target) {
            (Some(_), Some((p1, from)), Some((p2, to))) if p1 == p2 => j.ops.push(Op::Rename {
                parent: p1,
                from,
                to,
            }),
            (Some(node), Some((p1, from)), Some((p2, to))) => {
                j.ops.push(Op::Link {
                    parent: p2,
                    name: to,
                    node,
                });
                j.ops.push(Op::Unlink {
                    parent: p1,
                    name: from,
                });
            }
            _ => j.untracked += 1,
        }
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut j = self.journal.lock();
        let place = j.parent_of(path);
        StdFileSystem.remove_file(path)?;
        match place {
            Some((parent, name)) => j.ops.push(Op::Unlink { parent, name }),
            None => j.untracked += 1,
        }
        Ok(())
    }

    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        let mut j = self.journal.lock();
        let node = j.node_at(original);
        let place = j.parent_of(link);
        StdFileSystem.hard_link(original, link)?;
        match (node, place) {
            (Some(node), Some((parent, name))) => j.ops.push(Op::Link { parent, name, node }),
            _ => j.untracked += 1,
        }
        Ok(())
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.with(
            || StdFileSystem.create_dir(path),
            |j, ()| {
                let (parent, name) = j.parent_of(path)?;
                let node = j.adopt(path)?;
                Some(Op::Create {
                    parent,
                    name,
                    node,
                    dir: true,
                })
            },
        )
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        let mut j = self.journal.lock();
        let place = j.parent_of(path);
        StdFileSystem.remove_dir(path)?;
        match place {
            Some((parent, name)) => j.ops.push(Op::Unlink { parent, name }),
            None => j.untracked += 1,
        }
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.with(
            || StdFileSystem.sync_dir(path),
            |j, ()| {
                Some(Op::SyncDir {
                    node: j.node_at(path)?,
                })
            },
        )
    }
}

/// Which volatile changes a crash keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Loss {
    /// Power loss with the worst luck: only what was synced survives.
    AllUnsynced,
    /// A process crash: the page cache survives, nothing is lost.
    Nothing,
    /// Power loss with mixed luck: each file and folder keeps a random
    /// prefix of its unsynced changes, and a write just past the prefix may
    /// survive torn (a random prefix of its bytes). Deterministic in
    /// `seed`.
    RandomPrefix {
        /// Seeds the choices.
        seed: u64,
    },
    /// Power loss after the page cache wrote back some unsynced blocks, in
    /// any order: each [`BLOCK`]-byte block of a file holds its content as
    /// of its own random number of the file's unsynced changes, and the
    /// file's length is its length as of another; a later write can thus
    /// survive while an earlier one beside it is lost or half there.
    /// Folders keep a random prefix of their changes, as in
    /// [`RandomPrefix`](Self::RandomPrefix). Deterministic in `seed`.
    Reordered {
        /// Seeds the choices.
        seed: u64,
    },
}

/// The unit a [`Loss::Reordered`] crash keeps or loses: a disk sector, so
/// that a page half written back is covered too.
pub const BLOCK: usize = 512;

/// One change to a file's content.
#[derive(Clone, Debug)]
enum FileChange {
    Write { offset: u64, data: Arc<[u8]> },
    SetLen(u64),
}

/// One change to a folder's entries.
#[derive(Clone, Debug)]
enum DirChange {
    Link(OsString, Node),
    Unlink(OsString),
    Rename(OsString, OsString),
}

#[derive(Clone, Debug, Default)]
struct FileState {
    durable: Vec<u8>,
    pending: Vec<FileChange>,
}

#[derive(Clone, Debug, Default)]
struct DirState {
    durable: BTreeMap<OsString, Node>,
    pending: Vec<DirChange>,
}

#[derive(Clone, Debug)]
struct Model {
    files: HashMap<Node, FileState>,
    dirs: HashMap<Node, DirState>,
}

impl Default for Model {
    fn default() -> Self {
        Model {
            files: HashMap::new(),
            dirs: HashMap::from([(ROOT, DirState::default())]),
        }
    }
}

fn apply_file(content: &mut Vec<u8>, change: &FileChange) {
    match change {
        FileChange::Write { offset, data } => {
            let (at, end) = (*offset as usize, *offset as usize + data.len());
            if content.len() < end {
                content.resize(end, 0);
            }
            content[at..end].copy_from_slice(data);
        }
        FileChange::SetLen(len) => content.resize(*len as usize, 0),
    }
}

fn apply_dir(entries: &mut BTreeMap<OsString, Node>, change: &DirChange) {
    match change {
        DirChange::Link(name, node) => {
            entries.insert(name.clone(), *node);
        }
        DirChange::Unlink(name) => {
            entries.remove(name);
        }
        DirChange::Rename(from, to) => {
            if let Some(node) = entries.remove(from) {
                entries.insert(to.clone(), node);
            }
        }
    }
}

impl Model {
    fn dir(&mut self, node: Node) -> &mut DirState {
        self.dirs.entry(node).or_default()
    }

    fn file(&mut self, node: Node) -> &mut FileState {
        self.files.entry(node).or_default()
    }

    fn apply(&mut self, op: &Op) {
        match op {
            Op::Create {
                parent,
                name,
                node,
                dir,
            } => {
                if *dir {
                    self.dirs.insert(*node, DirState::default());
                } else {
                    self.files.insert(*node, FileState::default());
                }
                self.dir(*parent)
                    .pending
                    .push(DirChange::Link(name.clone(), *node));
            }
            Op::Write { node, offset, data } => self.file(*node).pending.push(FileChange::Write {
                offset: *offset,
                data: Arc::clone(data),
            }),
            Op::SetLen { node, len } => self.file(*node).pending.push(FileChange::SetLen(*len)),
            Op::SyncFile { node } => {
                let f = self.file(*node);
                for change in std::mem::take(&mut f.pending) {
                    apply_file(&mut f.durable, &change);
                }
            }
            Op::Link { parent, name, node } => self
                .dir(*parent)
                .pending
                .push(DirChange::Link(name.clone(), *node)),
            Op::Unlink { parent, name } => self
                .dir(*parent)
                .pending
                .push(DirChange::Unlink(name.clone())),
            Op::Rename { parent, from, to } => self
                .dir(*parent)
                .pending
                .push(DirChange::Rename(from.clone(), to.clone())),
            Op::SyncDir { node } => {
                let d = self.dir(*node);
                for change in std::mem::take(&mut d.pending) {
                    apply_dir(&mut d.durable, &change);
                }
            }
        }
    }
}

/// The recorded changes, stepped through in order.
#[derive(Clone, Debug)]
pub struct Replay {
    ops: Vec<Op>,
    at: usize,
    model: Model,
}

/// What a crash leaves of one folder: its entries, by name.
#[derive(Clone, Debug, Default)]
pub struct Image {
    entries: BTreeMap<OsString, Entry>,
}

#[derive(Clone, Debug)]
enum Entry {
    /// A file: its node (names of one node are hard links) and content.
    File(Node, Arc<Vec<u8>>),
    Dir(Image),
}

/// A small deterministic generator (SplitMix64) for [`Loss::RandomPrefix`]
/// and [`Loss::Reordered`].
struct Choices(u64);

impl Choices {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..=n`.
    fn upto(&mut self, n: usize) -> usize {
        (self.next() % (n as u64 + 1)) as usize
    }
}

impl Replay {
    /// Number of recorded changes.
    pub fn len(&self) -> usize {
        self.ops.len()
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }

    /// The point reached: changes `0..point()` are applied.
    pub fn point(&self) -> usize {
        self.at
    }

    /// Applies the changes up to `point` (exclusive). Points only move
    /// forward; a smaller `point` is ignored.
    pub fn advance_to(&mut self, point: usize) {
        let point = point.min(self.ops.len());
        while self.at < point {
            self.model.apply(&self.ops[self.at]);
            self.at += 1;
        }
    }

    /// What a crash at the current point leaves on disk.
    pub fn image(&self, loss: Loss) -> Image {
        let mut choices = Choices(match loss {
            Loss::RandomPrefix { seed } | Loss::Reordered { seed } => seed,
            _ => 0,
        });
        let mut files = HashMap::new();
        self.folder(ROOT, loss, &mut choices, &mut files, 0)
    }

    fn keep(loss: Loss, choices: &mut Choices, pending: usize) -> usize {
        match loss {
            Loss::AllUnsynced => 0,
            Loss::Nothing => pending,
            Loss::RandomPrefix { .. } | Loss::Reordered { .. } => choices.upto(pending),
        }
    }

    fn folder(
        &self,
        node: Node,
        loss: Loss,
        choices: &mut Choices,
        files: &mut HashMap<Node, Arc<Vec<u8>>>,
        depth: usize,
    ) -> Image {
        let Some(state) = self.model.dirs.get(&node) else {
            return Image::default();
        };
        let mut entries = state.durable.clone();
        let keep = Self::keep(loss, choices, state.pending.len());
        for change in &state.pending[..keep] {
            apply_dir(&mut entries, change);
        }
        let mut image = Image::default();
        for (name, child) in entries {
            let entry = if self.model.dirs.contains_key(&child) {
                // A folder moved into itself cannot happen; the bound only
                // keeps a broken record from recursing forever.
                if depth > 64 {
                    continue;
                }
                Entry::Dir(self.folder(child, loss, choices, files, depth + 1))
            } else {
                let content = files
                    .entry(child)
                    .or_insert_with(|| Arc::new(self.content(child, loss, choices)));
                Entry::File(child, Arc::clone(content))
            };
            image.entries.insert(name, entry);
        }
        image
    }

    fn content(&self, node: Node, loss: Loss, choices: &mut Choices) -> Vec<u8> {
        let Some(state) = self.model.files.get(&node) else {
            return Vec::new();
        };
        if let Loss::Reordered { .. } = loss {
            return reordered(state, choices);
        }
        let mut content = state.durable.clone();
        let keep = Self::keep(loss, choices, state.pending.len());
        for change in &state.pending[..keep] {
            apply_file(&mut content, change);
        }
        if let (Loss::RandomPrefix { .. }, Some(FileChange::Write { offset, data })) =
            (loss, state.pending.get(keep))
            && choices.next().is_multiple_of(2)
        {
            let torn = choices.upto(data.len());
            apply_file(
                &mut content,
                &FileChange::Write {
                    offset: *offset,
                    data: Arc::from(&data[..torn]),
                },
            );
        }
        content
    }
}

/// A file after a [`Loss::Reordered`] crash: each block as of its own
/// random count of the unsynced changes, the length as of another. (A
/// block's content past a pending shrink is taken as the shrink left it,
/// zeros, even when the length chosen is from before it: stricter than a
/// disk, which may still hold the old bytes there.)
fn reordered(state: &FileState, choices: &mut Choices) -> Vec<u8> {
    let pending = &state.pending;
    if pending.is_empty() {
        return state.durable.clone();
    }
    // The file's length as of each count of changes applied.
    let mut lens = Vec::with_capacity(pending.len() + 1);
    lens.push(state.durable.len());
    for change in pending {
        let len = *lens.last().expect("one length pushed");
        lens.push(match change {
            FileChange::Write { offset, data } => len.max(*offset as usize + data.len()),
            FileChange::SetLen(l) => *l as usize,
        });
    }
    let longest = lens.iter().copied().max().unwrap_or(0);
    // Blocks grouped by the count of changes they are taken after.
    let mut at: Vec<Vec<usize>> = vec![Vec::new(); pending.len() + 1];
    for block in 0..longest.div_ceil(BLOCK) {
        at[choices.upto(pending.len())].push(block);
    }
    let len = lens[choices.upto(pending.len())];
    let mut out = vec![0u8; longest];
    let mut content = state.durable.clone();
    for (k, blocks) in at.iter().enumerate() {
        if k > 0 {
            apply_file(&mut content, &pending[k - 1]);
        }
        for &b in blocks {
            // Past the file's end as of `k`, the block reads as zeros.
            let start = (b * BLOCK).min(content.len());
            let end = ((b + 1) * BLOCK).min(content.len());
            out[start..end].copy_from_slice(&content[start..end]);
        }
    }
    out.truncate(len);
    out
}

impl Image {
    /// Writes the image's files and folders into the existing folder `dir`;
    /// two names of one file become hard links.
    pub fn write_to(&self, dir: &Path) -> io::Result<()> {
        self.write_linked(dir, &mut HashMap::new())
    }

    fn write_linked(
        &self,
        dir: &Path,
        written: &mut HashMap<Node, std::path::PathBuf>,
    ) -> io::Result<()> {
        for (name, entry) in &self.entries {
            let path = dir.join(name);
            match entry {
                Entry::File(node, bytes) => match written.get(node) {
                    Some(first) => std::fs::hard_link(first, &path)?,
                    None => {
                        std::fs::write(&path, &**bytes)?;
                        written.insert(*node, path);
                    }
                },
                Entry::Dir(image) => {
                    std::fs::create_dir(&path)?;
                    image.write_linked(&path, written)?;
                }
            }
        }
        Ok(())
    }

    /// The names in this folder.
    pub fn names(&self) -> impl Iterator<Item = &std::ffi::OsStr> {
        self.entries.keys().map(OsString::as_os_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn image_names(replay: &Replay, loss: Loss, sub: &str) -> Vec<String> {
        let image = replay.image(loss);
        let dir = match image.entries.get(std::ffi::OsStr::new(sub)) {
            Some(Entry::Dir(d)) => d.clone(),
            _ => return vec![],
        };
        dir.names()
            .map(|n| n.to_string_lossy().into_owned())
            .collect()
    }

    fn file(replay: &Replay, loss: Loss, sub: &str, name: &str) -> Option<Vec<u8>> {
        let image = replay.image(loss);
        match image.entries.get(std::ffi::OsStr::new(sub))? {
            Entry::Dir(d) => match d.entries.get(std::ffi::OsStr::new(name))? {
                Entry::File(_, b) => Some((**b).clone()),
                Entry::Dir(_) => None,
            },
            Entry::File(..) => None,
        }
    }

    #[test]
    fn unsynced_writes_creates_and_renames_are_lost_and_synced_ones_kept() {
        let root = tempfile::tempdir().unwrap();
        let rec = Recorder::new(root.path()).unwrap();
        let db = root.path().join("db");
        rec.create_dir(&db).unwrap();
        rec.sync_dir(root.path()).unwrap();
        let f = rec.create(&db.join("a"), true).unwrap();
        rec.write_at(&f, b"hello", 0).unwrap();
        rec.sync_data(&f).unwrap();
        let after_file_sync = rec.ops();
        rec.sync_dir(&db).unwrap();
        let after_dir_sync = rec.ops();
        rec.write_at(&f, b" world", 5).unwrap();
        rec.rename(&db.join("a"), &db.join("b")).unwrap();
        assert_eq!(rec.untracked(), 0);

        let mut replay = rec.replay();
        replay.advance_to(after_file_sync);
        // The data is durable, its name is not.
        assert!(image_names(&replay, Loss::AllUnsynced, "db").is_empty());
        assert_eq!(image_names(&replay, Loss::Nothing, "db"), ["a"]);
        replay.advance_to(after_dir_sync);
        assert_eq!(
            file(&replay, Loss::AllUnsynced, "db", "a").unwrap(),
            b"hello"
        );
        replay.advance_to(replay.len());
        assert_eq!(
            file(&replay, Loss::AllUnsynced, "db", "a").unwrap(),
            b"hello"
        );
        assert_eq!(
            file(&replay, Loss::Nothing, "db", "b").unwrap(),
            b"hello world"
        );
        assert!(file(&replay, Loss::Nothing, "db", "a").is_none());
        // Random prefixes give one of the states in between, torn writes
        // included, and never anything else.
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..200 {
            let loss = Loss::RandomPrefix { seed };
            let names = image_names(&replay, loss, "db");
            assert_eq!(names.len(), 1, "{names:?}");
            let bytes = file(&replay, loss, "db", &names[0]).unwrap();
            assert!(b"hello world".starts_with(&bytes) && bytes.len() >= 5);
            seen.insert((names[0].clone(), bytes.len()));
        }
        assert!(seen.len() > 4, "{seen:?}");
    }

    /// A recorder over a new folder holding one file `f`, its name synced.
    fn recorded_file() -> (tempfile::TempDir, Arc<Recorder>, File) {
        let root = tempfile::tempdir().unwrap();
        let rec = Recorder::new(root.path()).unwrap();
        let f = rec.create(&root.path().join("f"), true).unwrap();
        rec.sync_dir(root.path()).unwrap();
        (root, rec, f)
    }

    /// The content of `f` in the reordered image of `seed`.
    fn reordered_file(replay: &Replay, seed: u64) -> Vec<u8> {
        match replay
            .image(Loss::Reordered { seed })
            .entries
            .get(std::ffi::OsStr::new("f"))
        {
            Some(Entry::File(_, b)) => (**b).clone(),
            _ => panic!("the synced file is missing"),
        }
    }

    #[test]
    fn a_reordered_crash_keeps_each_block_of_a_file_as_of_its_own_point() {
        let (_root, rec, f) = recorded_file();
        // Three blocks synced as 'a's, then each block rewritten unsynced,
        // the last one first, and the file extended by a fourth block.
        rec.write_at(&f, &[b'a'; 3 * BLOCK], 0).unwrap();
        rec.sync_data(&f).unwrap();
        for (i, block) in [2usize, 1, 0].into_iter().enumerate() {
            rec.write_at(&f, &[b'b' + i as u8; BLOCK], (block * BLOCK) as u64)
                .unwrap();
        }
        rec.write_at(&f, &[b'z'; BLOCK], 3 * BLOCK as u64).unwrap();
        let mut replay = rec.replay();
        replay.advance_to(replay.len());
        let image = |seed| reordered_file(&replay, seed);
        let mut later_without_earlier = false;
        let mut lengths = std::collections::BTreeSet::new();
        for seed in 0..300 {
            let bytes = image(seed);
            lengths.insert(bytes.len());
            // Never shorter than what was synced; every block is whole and
            // holds the synced or one of its unsynced contents.
            assert!(bytes.len() == 3 * BLOCK || bytes.len() == 4 * BLOCK);
            let blocks: Vec<u8> = bytes.chunks(BLOCK).map(|c| c[0]).collect();
            for (i, c) in bytes.chunks(BLOCK).enumerate() {
                assert!(c.iter().all(|&b| b == c[0]), "block {i} is mixed");
                let allowed: &[u8] = match i {
                    0 => b"ad",
                    1 => b"ac",
                    2 => b"ab",
                    _ => b"z\0",
                };
                assert!(allowed.contains(&c[0]), "block {i}: {:?}", c[0] as char);
            }
            // The first rewrite (block 2) lost while a later one (block 0)
            // survived: the page cache wrote them back out of order.
            later_without_earlier |= blocks[0] == b'd' && blocks[2] == b'a';
        }
        assert!(later_without_earlier, "never out of order");
        assert_eq!(lengths.len(), 2, "{lengths:?}");
        // The same seed gives the same image.
        assert_eq!(image(7), image(7));
    }

    #[test]
    fn every_block_of_a_reordered_image_is_that_block_of_some_version_of_the_file() {
        let (_root, rec, f) = recorded_file();
        // A synced length that is no multiple of a block, then unsynced
        // writes of every shape (inside a block, across block boundaries,
        // past the end) and a shrink followed by growth.
        rec.write_at(&f, &[1; 1000], 0).unwrap();
        rec.sync_data(&f).unwrap();
        let mut seed = 0x5EED_u64;
        let mut versions = vec![vec![1u8; 1000]];
        for step in 0..12u8 {
            let mut v = versions.last().unwrap().clone();
            if step == 6 {
                rec.set_len(&f, 700).unwrap();
                v.truncate(700);
            } else {
                seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let offset = (seed >> 33) as usize % 3000;
                let len = 1 + (seed >> 20) as usize % 1500;
                let data = vec![step + 2; len];
                rec.write_at(&f, &data, offset as u64).unwrap();
                apply_file(
                    &mut v,
                    &FileChange::Write {
                        offset: offset as u64,
                        data: data.into(),
                    },
                );
            }
            versions.push(v);
        }
        let mut replay = rec.replay();
        replay.advance_to(replay.len());
        let block_of = |v: &[u8], b: usize| -> Vec<u8> {
            let mut block = v.get(b * BLOCK..).unwrap_or(&[]).to_vec();
            block.resize(BLOCK, 0);
            block.truncate(BLOCK);
            block
        };
        let mut images = std::collections::BTreeSet::new();
        let mut mixed = 0;
        for seed in 0..200 {
            let bytes = reordered_file(&replay, seed);
            assert!(
                versions.iter().any(|v| v.len() == bytes.len()),
                "length {} is no version's",
                bytes.len()
            );
            let mut sources = std::collections::BTreeSet::new();
            for (b, block) in bytes.chunks(BLOCK).enumerate() {
                let from: Vec<usize> = (0..versions.len())
                    .filter(|&k| block_of(&versions[k], b)[..block.len()] == *block)
                    .collect();
                assert!(!from.is_empty(), "seed {seed}: block {b} is no version's");
                sources.insert(from[0]);
            }
            mixed += usize::from(sources.len() > 1);
            images.insert(bytes);
        }
        assert!(mixed > 100, "only {mixed} images mix versions");
        assert!(images.len() > 100, "only {} distinct images", images.len());
    }

    #[test]
    fn images_write_out_as_real_folders() {
        let root = tempfile::tempdir().unwrap();
        let rec = Recorder::new(root.path()).unwrap();
        let db = root.path().join("db");
        rec.create_dir(&db).unwrap();
        let f = rec.create(&db.join("x"), true).unwrap();
        rec.write_at(&f, b"abc", 0).unwrap();
        rec.hard_link(&db.join("x"), &db.join("y")).unwrap();
        let mut replay = rec.replay();
        replay.advance_to(replay.len());
        let out = tempfile::tempdir().unwrap();
        replay.image(Loss::Nothing).write_to(out.path()).unwrap();
        assert_eq!(std::fs::read(out.path().join("db/x")).unwrap(), b"abc");
        assert_eq!(std::fs::read(out.path().join("db/y")).unwrap(), b"abc");
        let ino = |n: &str| std::fs::metadata(out.path().join(n)).unwrap().ino();
        assert_eq!(ino("db/x"), ino("db/y"), "hard links stay links");
        // A recorder over that image sees one file under two names, and a
        // rename from one name onto the other changes nothing.
        let again = Recorder::new(out.path()).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(out.path().join("db/y"))
            .unwrap();
        again.set_len(&f, 0).unwrap();
        again.sync_all(&f).unwrap();
        again
            .rename(&out.path().join("db/x"), &out.path().join("db/y"))
            .unwrap();
        let mut replay = again.replay();
        replay.advance_to(replay.len());
        for loss in [Loss::AllUnsynced, Loss::Nothing] {
            assert_eq!(file(&replay, loss, "db", "x").unwrap(), b"", "{loss:?}");
            assert_eq!(file(&replay, loss, "db", "y").unwrap(), b"", "{loss:?}");
        }
    }

    #[test]
    fn what_the_root_holds_is_durable_and_foreign_changes_are_counted() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("db")).unwrap();
        std::fs::write(root.path().join("db/old"), b"kept").unwrap();
        let rec = Recorder::new(root.path()).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(root.path().join("db/old"))
            .unwrap();
        rec.write_at(&f, b"lost", 0).unwrap();
        let mut replay = rec.replay();
        replay.advance_to(replay.len());
        assert_eq!(
            file(&replay, Loss::AllUnsynced, "db", "old").unwrap(),
            b"kept"
        );
        assert_eq!(file(&replay, Loss::Nothing, "db", "old").unwrap(), b"lost");

        let elsewhere = tempfile::tempdir().unwrap();
        rec.create(&elsewhere.path().join("f"), true).unwrap();
        assert_eq!((rec.ops(), rec.untracked()), (1, 1));
    }
}
