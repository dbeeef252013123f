//! Errors of the journal: one enum for the journal's operations, one for appends (so
//! that `Full`, which the caller handles by switching to bitmap mode, stands apart).

use std::io;
use std::path::PathBuf;

use boomerang_common::durable::DurableError;
use boomerang_common::seglog::LogError;
use thiserror::Error;

use super::MIN_CAPACITY;

/// Errors of the journal, naming the file and the step.
#[derive(Debug, Error)]
pub enum JournalError {
    /// A file-system step outside the log failed.
    #[error("journal {path}: {step}: {source}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// Which file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// The log of segments failed (IO, damage, another version); it names the file.
    #[error("{0}; if the journal is damaged, the disk needs a resync")]
    Log(LogError),
    /// The released-through state could not be read or stored.
    #[error("journal release state: {0}")]
    State(#[from] DurableError),
    /// The configured capacity is too small.
    #[error("journal capacity of {capacity} bytes is below the minimum of {MIN_CAPACITY}")]
    Capacity {
        /// The configured capacity.
        capacity: u64,
    },
    /// The caller asked for a record the journal cannot hold (a caller bug).
    #[error("journal record refused: {0}")]
    InvalidRecord(String),
    /// An fdatasync of the journal failed earlier: what was appended may not be on
    /// disk, and retrying cannot tell. Reopen the journal and start a new generation.
    #[error(
        "journal {dir}: {cause}; appended records may be lost, so the journal refuses \
         more until it is reopened and the disk resynced"
    )]
    Poisoned {
        /// The journal directory.
        dir: PathBuf,
        /// The failure that poisoned it.
        cause: String,
    },
    /// A release past the last record (a caller bug: the process server acked a record
    /// that was never appended).
    #[error("release through seq {seq} is past the journal's last record {last}")]
    ReleaseBeyondEnd {
        /// Seq asked for.
        seq: u64,
        /// Last seq appended.
        last: u64,
    },
}

/// Why an append failed.
#[derive(Debug, Error)]
pub enum AppendError {
    /// The record does not fit: switch the disk to bitmap mode
    /// ([`CaptureState::on_full`](super::CaptureState::on_full)). Also reported when the
    /// file system holding the journal is out of space.
    #[error("journal full: the record needs {needed} bytes, {free} of {capacity} are free")]
    Full {
        /// Bytes the record would take (with a new segment header if one was due).
        needed: u64,
        /// Bytes of the capacity not in use.
        free: u64,
        /// The capacity.
        capacity: u64,
    },
    /// Anything else.
    #[error(transparent)]
    Journal(#[from] JournalError),
}

impl From<LogError> for JournalError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Poisoned { dir, cause, .. } => JournalError::Poisoned { dir, cause },
            e => JournalError::Log(e),
        }
    }
}
