//! boomerang-mt, the master target: applies verified batches to replica disks in
//! order, durably and idempotently, keeps a retention journal from which every
//! recovery point of a group can be given back, and runs the operator's failback
//! workflow (points, failover, test failover, commit, reprotect) beside PKI, status
//! and the quickstart.

pub mod cli;
pub mod config;
pub mod control;
pub mod disk;
pub mod disks;
pub mod failover;
pub mod groups;
pub mod materialize;
pub mod points;
pub mod prune;
pub mod quickstart;
pub mod replica;
pub mod retention;
pub mod retention_plan;
pub mod server;
pub mod status;
