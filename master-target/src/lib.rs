//! boomerang-mt, the master target: applies verified batches to replica disks in
//! order, durably and idempotently, records at which cut each replica is consistent,
//! serves manifests for differential sync, and hosts the operator's commands (PKI,
//! status, quickstart).

pub mod cli;
pub mod config;
pub mod disk;
pub mod disks;
pub mod quickstart;
pub mod replica;
pub mod server;
pub mod status;
