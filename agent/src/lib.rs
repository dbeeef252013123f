//! boomerang-agent, the protected machine's agent: finds what changed on its disks
//! and ships it, compressed and hashed, to its process server.
//!
//! The map:
//! - sources of changes: [`scan`] (read the disk, compare with the replica's hashes;
//!   the passes are run by [`sync`]), [`trace`] (kernel block tracepoints; driven by
//!   [`track`]), [`intercept`] with its write-order [`journal`] (FUSE; driven by
//!   [`track_journal`], points cut on time by [`journal_cuts`]);
//! - [`ship`]: batching, seqs, the send window and durable acks, for all of them;
//! - the session: [`link`] (the QUIC link to the process server) and [`control`]
//!   (check-ins with the master target, directives, the point schedule);
//! - around them: [`freeze`] (consistency pauses), [`state`] (each disk's durable
//!   progress), [`config`], [`cli`], [`fault`] (fault injection for tests),
//!   [`witness`] (each tag's bytes, for tests).

pub mod cli;
pub mod config;
pub mod control;
pub mod fault;
pub mod freeze;
pub mod intercept;
pub mod journal;
pub mod journal_cuts;
pub mod link;
pub mod scan;
pub mod ship;
pub mod source;
pub mod state;
pub mod sync;
pub mod trace;
pub mod track;
pub mod track_journal;
pub mod witness;
