//! Durability steps as named helpers, and the directory lock. Each helper
//! does one documented sequence (create then fsync the directory, truncate
//! then fsync) so that no caller has to remember the order.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::fs::FileSystem;
use crate::error::{Error, IoContext, Result};

/// How long a busy directory lock is retried before `Error::Locked`.
const LOCK_RETRY: Duration = Duration::from_millis(250);

/// Name of the lock file inside a store directory.
pub const LOCK_FILE: &str = "LOCK";

/// `fsync` of a directory, so that creates, renames and deletes in it are
/// durable.
pub(crate) fn sync_dir(dir: &Path, fs: &dyn FileSystem) -> Result<()> {
    fs.sync_dir(dir)
        .context(|| format!("sync directory {}", dir.display()))
}

/// Truncates (or extends) `file` to `len` bytes and makes the new length
/// durable.
pub(crate) fn truncate_synced(
    file: &File,
    path: &Path,
    len: u64,
    fs: &dyn FileSystem,
) -> Result<()> {
    fs.set_len(file, len)
        .and_then(|()| fs.sync_all(file))
        .context(|| format!("truncate {} to {len} bytes", path.display()))
}

/// Name of the file that records the last durable log position after a
/// failed `fdatasync`.
pub const SYNC_FAILED_FILE: &str = "SYNC-FAILED";

/// The record of a failed sync: a file holding the last log position known
/// durable, in decimal, written and synced (with its folder) when a sync
/// fails, read and removed by the next open after it has cut the log there.
#[derive(Debug)]
pub(crate) struct SyncFailedMarker {
    path: PathBuf,
}

impl SyncFailedMarker {
    /// The marker of the store in `dir`.
    pub(crate) fn in_dir(dir: &Path) -> Self {
        SyncFailedMarker {
            path: dir.join(SYNC_FAILED_FILE),
        }
    }

    /// Records `durable` unless a marker already holds a lower position.
    /// Best effort: the disk is already failing.
    pub(crate) fn record(&self, durable: u64, fs: &dyn FileSystem) {
        if matches!(self.read(), Ok(Some(p)) if p <= durable) {
            return;
        }
        let written = super::fs::write_file(fs, &self.path, format!("{durable}\n").as_bytes())
            .and_then(|f| fs.sync_all(&f));
        if written.is_ok()
            && let Some(dir) = self.path.parent()
        {
            let _ = sync_dir(dir, fs);
        }
    }

    /// The recorded position, if a marker exists.
    pub(crate) fn read(&self) -> Result<Option<u64>> {
        match fs::read_to_string(&self.path) {
            Ok(text) => text.trim().parse().map(Some).map_err(|_| {
                Error::corruption(
                    &self.path,
                    0,
                    "sync-failure marker does not hold a position",
                )
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::io(format!("read {}", self.path.display()), e)),
        }
    }

    /// Removes the marker once the log was cut, and syncs the folder.
    pub(crate) fn clear(&self, fs: &dyn FileSystem) -> Result<()> {
        match fs.remove_file(&self.path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io(format!("remove {}", self.path.display()), e)),
        }
        match self.path.parent() {
            Some(dir) => sync_dir(dir, fs),
            None => Ok(()),
        }
    }

    /// The marker's path.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// An exclusive lock on a store directory, held for the life of the handle.
/// It is an advisory `flock` on the `LOCK` file: a second open from this
/// process (another file description) or another process fails.
#[derive(Debug)]
pub(crate) struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock, or fails with [`Error::Locked`].
    pub(crate) fn acquire(dir: &Path) -> Result<Self> {
        let path = dir.join(LOCK_FILE);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .read(true)
            .write(true)
            .open(&path)
            .context(|| format!("open lock file {}", path.display()))?;
        // A process being spawned by another thread holds a copy of every
        // descriptor (and so of this lock's open file description) from fork
        // until exec closes it. A handle closed in that window releases its
        // lock only a moment later, so a busy lock is retried briefly before
        // it is reported.
        let deadline = Instant::now() + LOCK_RETRY;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(DirLock { _file: file }),
                Err(std::fs::TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(Error::Locked {
                        dir: dir.to_path_buf(),
                    });
                }
                Err(std::fs::TryLockError::Error(e)) => {
                    return Err(Error::io(format!("lock {}", path.display()), e));
                }
            }
        }
    }
}
