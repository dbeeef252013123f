//! boomerang-ps, the process server: takes batches from agents, spools them durably,
//! acknowledges, forwards them untouched to the master target, and pushes back when
//! its spool is full.

pub mod cli;
pub mod config;
pub mod forward;
pub mod server;
pub mod spool;
