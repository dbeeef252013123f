//! boomerang-agent, the protected machine's agent: finds what changed on its disks
//! (scan today; kernel tracing and write intercept behind the same [`source`] trait
//! later) and ships it, compressed and hashed, to its process server.
//!
//! While it tracks continuously (`track`), the agent also checks in with the master
//! target every few seconds ([`control`]): it shuts down after a final point when its
//! group fails over, forgets its disks' state once the failover is committed, and,
//! with `coordinated_points`, cuts its interval points together with the other agents
//! of its group.

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
pub mod source;
pub mod state;
pub mod sync;
pub mod trace;
pub mod track;
pub mod track_journal;
