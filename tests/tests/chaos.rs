//! A short seeded fault campaign ([`boomerang_tests::chaos`]) on every CI run: faults
//! of every kind in all three roles (storage faults, kill -9, power cuts, a process
//! server restart with records in flight) while the agent tracks a disk through the
//! intercept source, every point checked against the workload. The seed is fixed (13)
//! so CI runs the same faults each time; `BOOMERANG_SEED` picks another. The long
//! campaign's figures are in benches/README.md.
//!
//! Needs root and FUSE (privileged: with `BOOMERANG_PRIVILEGED_TESTS=1` a missing
//! prerequisite fails the test).

use boomerang_tests::require_power_cut;

#[test]
fn a_short_seeded_fault_campaign_loses_nothing() {
    if !require_power_cut("a_short_seeded_fault_campaign_loses_nothing") {
        return;
    }
    let seed = std::env::var("BOOMERANG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(13);
    eprintln!("chaos seed {seed} (BOOMERANG_SEED={seed} replays it)");
    let summary = boomerang_tests::chaos::run(seed, 12, 16).expect("the campaign ran");
    eprintln!("{}", summary.details());
    eprintln!("{summary}");
    assert_eq!(summary.faults, 12);
    assert!(summary.checked >= 6, "{summary}");
    assert_eq!(summary.wrong, 0, "{summary}");
}

/// The agent's journal failing under the workload (a failed fdatasync poisons it, a
/// failed append drops the disk to the bitmap) makes the agent reopen the journal and
/// resync in a new generation by itself: points go on without any restart (no stall),
/// and every point is right.
#[test]
fn agent_journal_faults_resync_without_a_stall() {
    use boomerang_tests::chaos::faults::{Fault, Role};
    if !require_power_cut("agent_journal_faults_resync_without_a_stall") {
        return;
    }
    let agent = |rule: &str| Fault::Storage {
        role: Role::Agent,
        rule: rule.to_string(),
    };
    // Two faults a round; arming a rule restarts the agent, so each round's journal
    // sync fault comes second, where no restart follows it before the point is due.
    let planned = vec![
        agent("journal.write@2=eio"),
        agent("journal.sync@1=eio"),
        Fault::Kill(Role::Ps),
        agent("journal.sync@2=enospc"),
    ];
    let summary =
        boomerang_tests::chaos::run_planned(17, planned, 4, 16).expect("the campaign ran");
    eprintln!("{}", summary.details());
    eprintln!("{summary}");
    assert_eq!(summary.faults, 4);
    assert_eq!(summary.fired, 4, "every planned fault fired: {summary}");
    assert_eq!(summary.wrong, 0, "{summary}");
    assert_eq!(summary.stalls, 0, "{summary}");
}
