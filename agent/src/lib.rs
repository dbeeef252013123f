//! boomerang-agent, the protected machine's agent: finds what changed on its disks
//! and ships it, compressed and hashed, to its process server.
//!
//! The map:
//! - sources of changes: [`scan`] (read the disk, compare with the replica's hashes;
//!   the passes are run by [`sync`]), [`trace`] (kernel block tracepoints; driven by
//!   [`track_trace`]), [`intercept`] with its write-order [`journal`] (FUSE; driven by
//!   [`track_intercept`], points cut on time by [`journal_cuts`]);
//! - [`source`]: the seams between them and shipping: the scan's units
//!   ([`source::ChangeSource`]), the continuous sources' steps of ordered changes and
//!   cuts (`source::ChangeStream`); the memory each may hold;
//! - [`ship`]: batching, seqs, the send window and durable acks, for all of them;
//! - the group's session with the master target, apart from the drivers: [`link`]
//!   (the QUIC link to the process server) and [`session`] (check-ins, directives,
//!   coordinated points, the point schedule, the failover shutdown);
//! - around them: [`freeze`] (consistency pauses), [`state`] (each disk's durable
//!   progress), [`config`], [`cli`], [`fault`] (fault injection for tests),
//!   [`witness`] (each tag's bytes, for tests).

pub mod cli;
pub mod config;
pub mod fault;
pub mod freeze;
pub mod intercept;
pub mod journal;
pub mod journal_cuts;
pub mod link;
pub mod scan;
pub mod session;
pub mod ship;
pub mod source;
pub mod state;
pub mod sync;
pub mod trace;
pub mod track_intercept;
pub mod track_trace;
pub mod witness;
