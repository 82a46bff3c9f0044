//! A test hook that makes a chosen I/O call of the writer fail, so tests can
//! check that a failed write or sync poisons the writer and loses nothing
//! acknowledged. Production code passes through it at the cost of one atomic
//! load per I/O call.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which error an armed [`FaultInjector`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InjectedError {
    /// `EIO`: the device reported an error.
    Eio,
    /// `ENOSPC`: the file system is full.
    NoSpace,
}

/// The I/O calls that pass through the injector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoPoint {
    /// Appending a record to the active segment.
    Append,
    /// `fdatasync` of a segment.
    Sync,
    /// Creating a new segment file.
    Create,
    /// Truncating a segment (sealing or cutting a torn tail).
    Truncate,
    /// `fsync` of the store directory.
    SyncDir,
    /// Writing a merge's output.
    MergeWrite,
}

const DISARMED: u64 = u64::MAX;

/// Fails the n-th I/O call of the writer after it is armed, once.
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
    pub(crate) fn check(&self, _point: IoPoint) -> io::Result<()> {
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

/// Passes an I/O call through the optional injector.
pub(crate) fn check(faults: Option<&FaultInjector>, point: IoPoint) -> io::Result<()> {
    match faults {
        Some(f) => f.check(point),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fails_exactly_the_nth_call_once() {
        let f = FaultInjector::new();
        assert!(f.check(IoPoint::Append).is_ok());
        f.fail_after(2, InjectedError::NoSpace);
        assert!(f.check(IoPoint::Append).is_ok());
        assert!(f.check(IoPoint::Sync).is_ok());
        let e = f.check(IoPoint::Sync).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(28));
        assert!(f.check(IoPoint::Sync).is_ok());
        assert_eq!((f.calls(), f.fired()), (5, 1));
    }
}
