//! The file-system calls that change what is on disk, behind one trait.
//!
//! Every create, write, sync, truncate, rename, link and removal the engine
//! makes goes through a [`FileSystem`]: in production the thin
//! [`StdFileSystem`] wrapper over `std::fs`; in tests a layer that fails the
//! n-th call ([`FaultInjector`](super::FaultInjector)) or one that records
//! every call and builds the disk images a crash could leave
//! ([`crate::crash::Recorder`]). Reads (`open`, `read`, memory maps,
//! listings) go to `std::fs` directly: they change nothing a crash could
//! lose.

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

/// The mutating file-system calls of the engine. Implementations must do
/// what the `std::fs` call of the same name does (a test layer may also
/// fail it, or record it), so that reads through `std::fs` see the result.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// Creates a file opened for reading and writing: a new one when
    /// `exclusive` (failing with `AlreadyExists` otherwise), else a new or
    /// emptied one.
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<File>;
    /// Writes all of `buf` at `offset` (`pwrite`).
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()>;
    /// `fdatasync`: the file's data and size are durable.
    fn sync_data(&self, file: &File) -> io::Result<()>;
    /// `fsync`: the file's data and metadata are durable.
    fn sync_all(&self, file: &File) -> io::Result<()>;
    /// Cuts or extends the file to `len` bytes.
    fn set_len(&self, file: &File, len: u64) -> io::Result<()>;
    /// Makes the bytes `[from, to)` of the file allocated blocks, extending
    /// the file with zeros to `to` if it is shorter (`fallocate`; never
    /// shortens it, never changes bytes already written), so that writes
    /// below `to` need no more space: a full disk fails this call rather
    /// than a later copy into a map. Default: [`set_len`](Self::set_len)
    /// when the file is shorter than `to`, which a layer that records or
    /// fails calls sees as an extension (it allocates nothing, so such a
    /// layer must not say yes to `writes_through_maps`).
    fn allocate(&self, file: &File, from: u64, to: u64) -> io::Result<()> {
        let _ = from;
        if file.metadata()?.len() < to {
            self.set_len(file, to)
        } else {
            Ok(())
        }
    }
    /// Renames a file or folder, replacing a file at `to`.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file's name.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Gives the file at `original` a second name, `link`.
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()>;
    /// Creates one folder.
    fn create_dir(&self, path: &Path) -> io::Result<()>;
    /// Removes an empty folder.
    fn remove_dir(&self, path: &Path) -> io::Result<()>;
    /// `fsync` of a folder: the creates, renames and removals in it are
    /// durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Whether the engine may append to the active segment by copying into
    /// a shared writable map of the file instead of calling
    /// [`write_at`](Self::write_at) (DESIGN.md 2.4). The bytes land in the
    /// same page cache either way, but a copy is no call that a layer could
    /// fail or record, so only the real file system says yes. Saying yes
    /// requires [`allocate`](Self::allocate) to really allocate blocks: a
    /// copy into a hole on a full disk is a `SIGBUS`. Default: `false`.
    fn writes_through_maps(&self) -> bool {
        false
    }
}

/// The production [`FileSystem`]: each call is the `std::fs` call.
#[derive(Clone, Copy, Debug, Default)]
pub struct StdFileSystem;

impl FileSystem for StdFileSystem {
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<File> {
        let mut o = OpenOptions::new();
        o.read(true).write(true);
        if exclusive {
            o.create_new(true);
        } else {
            o.create(true).truncate(true);
        }
        o.open(path)
    }

    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        file.write_all_at(buf, offset)
    }

    fn sync_data(&self, file: &File) -> io::Result<()> {
        file.sync_data()
    }

    fn sync_all(&self, file: &File) -> io::Result<()> {
        file.sync_all()
    }

    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        file.set_len(len)
    }

    fn allocate(&self, file: &File, from: u64, to: u64) -> io::Result<()> {
        let len = to.saturating_sub(from);
        if len == 0 {
            return Ok(());
        }
        match rustix::fs::fallocate(file, rustix::fs::FallocateFlags::empty(), from, len) {
            Ok(()) => Ok(()),
            // A file system without `fallocate` gets real zeros, which
            // allocate the blocks just as well.
            Err(rustix::io::Errno::OPNOTSUPP | rustix::io::Errno::NOSYS) => {
                write_zeros(self, file, from, to, &AtomicBool::new(false))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        fs::hard_link(original, link)
    }

    fn create_dir(&self, path: &Path) -> io::Result<()> {
        fs::create_dir(path)
    }

    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        fs::remove_dir(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn writes_through_maps(&self) -> bool {
        true
    }
}

/// Size of the zero buffer [`write_zeros`] writes from.
const ZERO_CHUNK: usize = 1 << 20;

/// Writes zeros into `file` from offset `from` up to `to`, a chunk at a
/// time, until done or `cancel` is set.
pub(crate) fn write_zeros(
    fs: &dyn FileSystem,
    file: &File,
    from: u64,
    to: u64,
    cancel: &AtomicBool,
) -> io::Result<()> {
    let zeros = vec![0u8; ZERO_CHUNK];
    let mut at = from;
    while at < to {
        if cancel.load(Ordering::Acquire) {
            return Err(io::Error::other("spare preparation cancelled"));
        }
        let n = (to - at).min(ZERO_CHUNK as u64) as usize;
        fs.write_at(file, &zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// Writes `contents` as the whole new content of `path` (not synced).
pub(crate) fn write_file(fs: &dyn FileSystem, path: &Path, contents: &[u8]) -> io::Result<File> {
    let file = fs.create(path, false)?;
    fs.write_at(&file, contents, 0)?;
    Ok(file)
}

/// Suffix of a copy being written (see [`copy_synced`]).
pub(crate) const COPYING_SUFFIX: &str = ".copying";

/// Copies the file `src` to `dst` and syncs the copy. The bytes go to a new
/// file beside `dst`, renamed over it once synced: `dst` is never opened
/// for writing, since it may be a hard link to `src` itself (a backup
/// folder's earlier link to a live segment), which truncating would empty.
pub(crate) fn copy_synced(fs: &dyn FileSystem, src: &Path, dst: &Path) -> io::Result<()> {
    const CHUNK: usize = 1 << 20;
    let mut name = dst.file_name().unwrap_or_default().to_os_string();
    name.push(COPYING_SUFFIX);
    let tmp = dst.with_file_name(name);
    match fs.remove_file(&tmp) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let from = File::open(src)?;
    let to = fs.create(&tmp, true)?;
    let mut buf = vec![0u8; CHUNK];
    let mut at = 0u64;
    loop {
        let n = match from.read_at(&mut buf, at) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        fs.write_at(&to, &buf[..n], at)?;
        at += n as u64;
    }
    fs.sync_all(&to)?;
    fs.rename(&tmp, dst)
}

/// Removes a folder and everything in it, depth first. Whatever vanished
/// meanwhile (removed by someone else) counts as removed.
pub(crate) fn remove_dir_all(fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
    let gone = |r: io::Result<()>| match r {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    };
    let entries = match std::fs::read_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            gone(remove_dir_all(fs, &entry.path()))?;
        } else {
            gone(fs.remove_file(&entry.path()))?;
        }
    }
    gone(fs.remove_dir(path))
}

/// Creates `path` and any missing parents.
pub(crate) fn create_dir_all(fs: &dyn FileSystem, path: &Path) -> io::Result<()> {
    if path.as_os_str().is_empty() || path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        create_dir_all(fs, parent)?;
    }
    match fs.create_dir(path) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => Ok(()),
        other => other,
    }
}
