//! Test support for Boomerang's multi-process integration tests and the end-to-end
//! benchmark: everything a test needs to drive the real `boomerang-agent`,
//! `boomerang-ps` and `boomerang-mt` binaries against real files and block devices.
//!
//! - [`privileged`]: gating of tests that need root, loop devices, ext4 tools or
//!   fsfreeze. A missing prerequisite prints `SKIPPED <test>: <reason>`, or panics when
//!   `BOOMERANG_PRIVILEGED_TESTS=1` (CI on a privileged runner must not skip silently).
//! - [`process`]: locating the binaries, [`Daemon`] (a supervised child process with a
//!   log file and a readiness line) and `run*` helpers for one-shot commands.
//! - [`cli`]: the only module that knows the binaries' command lines and `--json`
//!   output shapes; adapt it, not the tests, when the binaries change.
//! - [`pki`]: a throw-away deployment CA with certificates per peer ([`TestPki`]).
//! - [`cluster`]: a master target plus a process server, started and wired ([`Cluster`]).
//! - [`disk`]: deterministic mixed-content images, chunk rewrites, comparisons.
//! - [`loopdev`]: loop devices, ext4, mounts and fsfreeze, each a guard that undoes
//!   itself on drop (also while a test panics).
//! - [`tree`]: writing and hashing directory trees on a mounted filesystem.
//! - [`powercut`]: a FUSE passthrough that holds unsynced writes and directory
//!   changes back, so a test can cut the power ([`PowerCutFs`]) and restart a daemon
//!   on only what its fsyncs made durable.
//! - [`site_link`]: a counting UDP relay standing for the link between two sites
//!   ([`SiteLink`]): bytes on the wire, measured outside the binaries.
//! - [`tracefs`]: whether the trace source can work here, and sweeping the trace
//!   instances of killed agents.
//! - [`rng`]: the seeded, version-stable generator behind all generated data.
//!
//! Environment knobs: `BOOMERANG_PRIVILEGED_TESTS=1` (fail instead of skip),
//! `BOOMERANG_BIN_DIR` (where the binaries are), `BOOMERANG_KEEP_TEST_DIRS=1` (keep
//! scratch directories and logs for a post-mortem), `BOOMERANG_COMMAND_TIMEOUT_SECS`
//! (deadline of one-shot commands, default 600), `TMPDIR` (where scratch goes).

pub mod chaos;
pub mod cli;
pub mod cluster;
pub mod disk;
pub mod fswriter;
pub mod loopdev;
pub mod pki;
pub mod powercut;
pub mod privileged;
pub mod process;
pub mod rng;
pub mod site_link;
pub mod tracefs;
pub mod tree;

pub use cluster::{Cluster, ClusterConfig};
pub use disk::{
    block_differences, block_differences_ignoring, change_chunks, files_equal, first_difference,
    make_mixed_image, sha256_file,
};
pub use loopdev::{e2fsck_clean, e2fsck_recovers_clean, mkfs_ext4, FreezeGuard, LoopDevice, Mount};
pub use pki::TestPki;
pub use powercut::{require_power_cut, CutMode, PowerCutFs, PowerCutOptions};
pub use privileged::{require_privileged, Need};
pub use process::{bin, run, run_json, run_ok, scratch_dir, Daemon, DaemonSpec};
pub use site_link::{LinkBytes, SiteLink};
pub use tree::{assert_trees_equal, hash_tree, write_tree, TreeHashes};
