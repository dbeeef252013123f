//! boomerang-agent, the protected machine's agent: finds what changed on its disks
//! (scan today; kernel tracing and write intercept behind the same [`source`] trait
//! later) and ships it, compressed and hashed, to its process server.

pub mod cli;
pub mod config;
pub mod fault;
pub mod freeze;
pub mod intercept;
pub mod journal;
pub mod link;
pub mod scan;
pub mod source;
pub mod state;
pub mod sync;
pub mod trace;
pub mod track;
pub mod track_journal;
