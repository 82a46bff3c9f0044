//! The crate's one error type. Every fallible public call returns [`Error`];
//! each variant says what went wrong and what the caller should do about it.
//! This module owns no I/O: it only describes failures.

use std::io;
use std::path::PathBuf;

/// Shorthand for results whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in dkv-cask.
///
/// `Display` is one sentence for this layer; `source()` gives the cause where
/// there is one (an I/O error). Corruption always names the file and offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// An operating-system call failed. `context` says what the engine was
    /// doing ("sync segment 7"). Retry only if the cause is transient; a
    /// failed write or sync also poisons the writer (see [`Error::Poisoned`]).
    #[error("I/O error while trying to {context}")]
    Io {
        /// What the engine was doing.
        context: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// Bytes on disk failed a checksum or a structural check. The store
    /// refuses to guess: open it with a more tolerant
    /// [`RecoveryMode`](crate::RecoveryMode), restore a backup, or inspect the
    /// file at `offset`.
    #[error("corruption in {} at offset {offset}: {reason}", file.display())]
    Corruption {
        /// The damaged file.
        file: PathBuf,
        /// Byte offset of the damage within that file.
        offset: u64,
        /// What check failed.
        reason: String,
    },

    /// A file was written by a format version this build does not read.
    /// Use a dkv-cask release that supports that version.
    #[error("{} has format version {found}, this build reads version {supported}", file.display())]
    UnsupportedVersion {
        /// The file.
        file: PathBuf,
        /// Version found in the file.
        found: u16,
        /// Version this build reads.
        supported: u16,
    },

    /// Another handle (in this process or another) holds the store's
    /// directory lock. Close that handle first.
    #[error("store directory {} is locked by another open handle", dir.display())]
    Locked {
        /// The store directory.
        dir: PathBuf,
    },

    /// An earlier write or sync failed, so the writer no longer trusts the
    /// file's state. Reads keep working; close and reopen the store to write
    /// again (recovery rebuilds the state from what is durable).
    #[error("writer is poisoned by an earlier failure ({cause}); close and reopen the store")]
    Poisoned {
        /// The failure that poisoned the writer.
        cause: String,
    },

    /// The store was closed; open it again to use it.
    #[error("store is closed")]
    Closed,

    /// A key was empty. Keys must hold at least one byte.
    #[error("key must not be empty")]
    EmptyKey,

    /// A key was longer than [`MAX_KEY_LEN`](crate::MAX_KEY_LEN).
    #[error("key of {len} bytes exceeds the maximum of {max} bytes")]
    KeyTooLarge {
        /// Length of the key given.
        len: usize,
        /// The maximum.
        max: usize,
    },

    /// A value was longer than [`MAX_VALUE_LEN`](crate::MAX_VALUE_LEN).
    #[error("value of {len} bytes exceeds the maximum of {max} bytes")]
    ValueTooLarge {
        /// Length of the value given.
        len: usize,
        /// The maximum.
        max: usize,
    },

    /// A batch would encode to more than
    /// [`Options::max_batch_bytes`](crate::Options::max_batch_bytes). Split
    /// it into smaller batches.
    #[error("batch of {bytes} encoded bytes exceeds the maximum of {max} bytes")]
    BatchTooLarge {
        /// Encoded size of the batch.
        bytes: u64,
        /// The maximum.
        max: u64,
    },

    /// Iteration options contradict each other; the text is DKV's.
    #[error("StartKey must have the same prefix as PrefixKey")]
    InvalidIterationOptions,

    /// A follower asked for changes older than the log still holds (merged
    /// away, or removed). Bootstrap it from a snapshot or backup instead.
    #[error(
        "change {requested} is no longer in the log; the oldest available is {oldest_available}"
    )]
    ChangesCompacted {
        /// The change number asked for.
        requested: u64,
        /// The oldest change number the log still holds.
        oldest_available: u64,
    },

    /// A change record handed to `save_changes` is malformed (bad checksum,
    /// lying lengths, unknown transaction type, ...). Nothing of it was
    /// applied; fix the master or the transport.
    #[error("change record {change_number} is invalid: {reason}")]
    InvalidChange {
        /// The record's change number.
        change_number: u64,
        /// What is wrong with it.
        reason: String,
    },

    /// The master's latest change number is behind what this slave already
    /// applied (DKV: "change number of the master node can not be lesser
    /// than the change number of the slave node"), as after the master was
    /// restored to an older state. Rebuild the slave.
    #[error(
        "change number of the master node can not be lesser than the change number of the slave node (master {master}, applied {applied})"
    )]
    MasterBehind {
        /// The master's latest committed change number.
        master: u64,
        /// The slave's applied change number.
        applied: u64,
    },

    /// A backup, restore or snapshot load is already running on this store;
    /// the text is DKV's. Try again when it has finished.
    #[error("Another global keyspace mutation is in progress")]
    GlobalMutationInProgress,

    /// A path given for a backup, restore or store folder is unusable; the
    /// reason says why (DKV's texts where DKV has one).
    #[error("{reason}: {}", path.display())]
    InvalidPath {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A backup is unfinished or damaged (a missing, truncated or altered
    /// file, a tampered manifest). Nothing was restored; use another backup.
    #[error("backup {} is not usable: {reason}", path.display())]
    InvalidBackup {
        /// The backup folder or the damaged file.
        path: PathBuf,
        /// What check failed.
        reason: String,
    },

    /// A snapshot stream is malformed (bad magic or version, a lying
    /// length, a bad checksum, truncation, a count that does not match).
    /// Nothing was loaded; take a new snapshot.
    #[error("snapshot stream is invalid: {reason}")]
    InvalidSnapshot {
        /// What check failed.
        reason: String,
    },

    /// [`Options`](crate::Options) hold an impossible combination; the text
    /// says which.
    #[error("invalid options: {0}")]
    InvalidOptions(String),
}

impl Error {
    /// Wraps an I/O error with what the engine was doing.
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    /// A copy of this error, to report one failure to every writer it hit.
    /// An I/O error keeps its context, kind, OS error code and message.
    pub(crate) fn duplicate(&self) -> Error {
        match self {
            Error::Io { context, source } => Error::Io {
                context: context.clone(),
                source: match source.raw_os_error() {
                    Some(code) => io::Error::from_raw_os_error(code),
                    None => io::Error::new(source.kind(), source.to_string()),
                },
            },
            Error::Poisoned { cause } => Error::Poisoned {
                cause: cause.clone(),
            },
            other => Error::Poisoned {
                cause: other.chain(),
            },
        }
    }

    /// This error and its causes, on one line.
    pub fn chain(&self) -> String {
        let mut s = self.to_string();
        let mut cause = std::error::Error::source(self);
        while let Some(c) = cause {
            s.push_str(": ");
            s.push_str(&c.to_string());
            cause = c.source();
        }
        s
    }

    /// A corruption error for `file` at `offset`.
    pub(crate) fn corruption(
        file: impl Into<PathBuf>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Self {
        Error::Corruption {
            file: file.into(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Adds "what was I doing" context to `io::Result`s.
pub(crate) trait IoContext<T> {
    /// Converts the error into [`Error::Io`] with the context produced by `f`.
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn context<S: Into<String>>(self, f: impl FnOnce() -> S) -> Result<T> {
        self.map_err(|e| Error::io(f(), e))
    }
}
