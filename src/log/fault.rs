//! A test hook that makes a chosen file-system call fail, so tests can check
//! that a failed write or sync poisons the writer and loses nothing
//! acknowledged. It is a [`FileSystem`] layer, present only when
//! [`Options::fault_injector`](crate::Options::fault_injector) is set.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::fs::FileSystem;

/// Which error an armed [`FaultInjector`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedError {
    /// `EIO`: the device reported an error.
    Eio,
    /// `ENOSPC`: the file system is full.
    NoSpace,
}

const DISARMED: u64 = u64::MAX;

thread_local! {
    /// Set while this thread runs a best-effort step.
    static BEST_EFFORT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` as a best-effort step (writing a hint file, zero-filling the
/// spare segment, unlinking a merged-away segment): the fault injector
/// neither counts nor fails its calls. Their timing (background threads,
/// the last reader's drop) would make the n-th call differ from run to
/// run, and their failure is harmless by design: a segment without a hint
/// is scanned at the next open, a rollover without a spare creates its
/// segment, a superseded segment left behind is removed by the next open.
pub(crate) fn best_effort<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            BEST_EFFORT.set(self.0);
        }
    }
    let _reset = Reset(BEST_EFFORT.replace(true));
    f()
}

/// Fails the n-th file-system call after it is armed, once.
#[derive(Debug)]
pub struct FaultInjector {
    countdown: AtomicU64,
    error: AtomicU64,
    calls: AtomicU64,
    fired: AtomicU64,
}

impl Default for FaultInjector {
    fn default() -> Self {
        FaultInjector {
            countdown: AtomicU64::new(DISARMED),
            error: AtomicU64::new(0),
            calls: AtomicU64::new(0),
            fired: AtomicU64::new(0),
        }
    }
}

impl FaultInjector {
    /// A disarmed injector.
    pub fn new() -> Self {
        Self::default()
    }

    /// Arms the injector: after `n` more I/O calls succeed, the next one
    /// fails with `error`. Then it disarms itself.
    pub fn fail_after(&self, n: u64, error: InjectedError) {
        self.error.store(error as u64, Ordering::SeqCst);
        self.countdown.store(n, Ordering::SeqCst);
    }

    /// Disarms the injector.
    pub fn disarm(&self) {
        self.countdown.store(DISARMED, Ordering::SeqCst);
    }

    /// I/O calls seen so far (armed or not).
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// How many failures were injected.
    pub fn fired(&self) -> u64 {
        self.fired.load(Ordering::SeqCst)
    }

    /// Called before each I/O call; returns the injected error when due.
    /// Calls made inside [`best_effort`] steps are neither counted nor
    /// failed.
    pub(crate) fn check(&self) -> io::Result<()> {
        if BEST_EFFORT.get() {
            return Ok(());
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        let fire = self
            .countdown
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |c| match c {
                DISARMED => None,
                0 => Some(DISARMED),
                c => Some(c - 1),
            });
        if fire == Ok(0) {
            self.fired.fetch_add(1, Ordering::SeqCst);
            let err = if self.error.load(Ordering::SeqCst) == InjectedError::NoSpace as u64 {
                io::Error::from_raw_os_error(28) // ENOSPC
            } else {
                io::Error::from_raw_os_error(5) // EIO
            };
            return Err(err);
        }
        Ok(())
    }
}

/// A [`FileSystem`] whose calls first pass the injector.
#[derive(Debug)]
pub(crate) struct Faulty {
    /// The file system the calls go to when not failed.
    pub(crate) inner: Arc<dyn FileSystem>,
    /// Decides which call fails.
    pub(crate) faults: Arc<FaultInjector>,
}

impl FileSystem for Faulty {
    fn create(&self, path: &Path, exclusive: bool) -> io::Result<File> {
        self.faults.check()?;
        self.inner.create(path, exclusive)
    }
    fn write_at(&self, file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
        self.faults.check()?;
        self.inner.write_at(file, buf, offset)
    }
    fn sync_data(&self, file: &File) -> io::Result<()> {
        self.faults.check()?;
        self.inner.sync_data(file)
    }
    fn sync_all(&self, file: &File) -> io::Result<()> {
        self.faults.check()?;
        self.inner.sync_all(file)
    }
    fn set_len(&self, file: &File, len: u64) -> io::Result<()> {
        self.faults.check()?;
        self.inner.set_len(file, len)
    }
    fn allocate(&self, file: &File, from: u64, to: u64) -> io::Result<()> {
        self.faults.check()?;
        self.inner.allocate(file, from, to)
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.remove_file(path)
    }
    fn hard_link(&self, original: &Path, link: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.hard_link(original, link)
    }
    fn create_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.create_dir(path)
    }
    fn remove_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.remove_dir(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.check()?;
        self.inner.sync_dir(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_nth_call_once() {
        let f = FaultInjector::new();
        assert!(f.check().is_ok());
        f.fail_after(2, InjectedError::NoSpace);
        assert!(f.check().is_ok());
        assert!(f.check().is_ok());
        let e = f.check().unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        assert!(f.check().is_ok());
        assert_eq!((f.calls(), f.fired()), (5, 1));
    }
}
