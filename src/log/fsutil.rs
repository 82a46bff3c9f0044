//! Durability steps as named helpers, and the directory lock. Each helper
//! does one documented sequence (create then fsync the directory, truncate
//! then fsync) so that no caller has to remember the order.

use std::fs::{File, OpenOptions};
use std::path::Path;
use std::time::{Duration, Instant};

use super::fault::{FaultInjector, IoPoint, check};
use crate::error::{Error, IoContext, Result};

/// How long a busy directory lock is retried before `Error::Locked`.
const LOCK_RETRY: Duration = Duration::from_millis(250);

/// Name of the lock file inside a store directory.
pub const LOCK_FILE: &str = "LOCK";

/// `fsync` of a directory, so that creates, renames and deletes in it are
/// durable.
pub(crate) fn sync_dir(dir: &Path, faults: Option<&FaultInjector>) -> Result<()> {
    check(faults, IoPoint::SyncDir)
        .and_then(|()| File::open(dir)?.sync_all())
        .context(|| format!("sync directory {}", dir.display()))
}

/// Truncates (or extends) `file` to `len` bytes and makes the new length
/// durable.
pub(crate) fn truncate_synced(
    file: &File,
    path: &Path,
    len: u64,
    faults: Option<&FaultInjector>,
) -> Result<()> {
    check(faults, IoPoint::Truncate)
        .and_then(|()| file.set_len(len))
        .and_then(|()| check(faults, IoPoint::Sync))
        .and_then(|()| file.sync_all())
        .context(|| format!("truncate {} to {len} bytes", path.display()))
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
