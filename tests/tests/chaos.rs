//! A short seeded fault campaign ([`boomerang_tests::chaos`]) on every CI run: a few
//! storage faults in the process server and the master target, each round's point
//! checked against the source. No root needed. The seed is fixed (13) so CI runs the
//! same faults each time; `BOOMERANG_SEED` picks another. The long campaign's figures
//! are in benches/README.md.

#[test]
fn a_short_seeded_fault_campaign_loses_nothing() {
    let seed = std::env::var("BOOMERANG_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(13);
    eprintln!("chaos seed {seed} (BOOMERANG_SEED={seed} replays it)");
    let summary = boomerang_tests::chaos::run(seed, 4, 16).expect("the campaign ran");
    eprintln!("{summary}");
    assert_eq!(summary.faults, 4);
    assert_eq!(summary.checked, 4, "{summary}");
    assert_eq!(summary.wrong, 0, "{summary}");
}
