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
