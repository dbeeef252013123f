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
    let seed = boomerang_tests::rng::seed_from_env("chaos", || 13);
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

/// Issue 9 defect 4: crash-consistent points are cut on schedule while the link is
/// down. The process server is killed for 8 s under writes; the tags the agent cut
/// meanwhile wait in its journal and become points once the process server is back:
/// the listed points cover the outage with no gap between consecutive point times
/// above 2 s (the interval is 1 s).
#[test]
fn points_are_cut_on_schedule_while_the_process_server_is_down() {
    use boomerang_tests::chaos::agent::TrackingAgent;
    use boomerang_tests::chaos::workload::Workload;
    use boomerang_tests::{make_mixed_image, Cluster, ClusterConfig};
    use std::time::{Duration, Instant};
    if !require_power_cut("points_are_cut_on_schedule_while_the_process_server_is_down") {
        return;
    }
    let now_ms = boomerang_common::config::now_ms;
    let mut cluster = Cluster::start(ClusterConfig::default());
    let backing = cluster.root().join("disk.img");
    make_mixed_image(&backing, 16 << 20, 5);
    let initial = std::fs::read(&backing).expect("read the initial disk");
    let mut args = cluster.agent1().disk("d0", &backing).group("g1");
    args.json = false;
    let serve_dir = cluster.root().join("serve");
    std::fs::create_dir_all(&serve_dir).expect("serve dir");
    std::fs::create_dir_all(cluster.logs_dir()).expect("logs dir");
    let agent = TrackingAgent::start(
        &args,
        "d0",
        &serve_dir,
        &[],
        &cluster.logs_dir().join("agent.log"),
    )
    .expect("start the agent");
    let mut workload = Workload::new(initial, 5);
    let point_after = |cluster: &Cluster, ms: u64| {
        cluster
            .mt_points("g1")
            .iter()
            .any(|p| p.kind == "crash-consistent" && p.time_ms > ms)
    };
    let wait_point_after = |cluster: &Cluster, ms: u64, what: &str| {
        let until = Instant::now() + Duration::from_secs(60);
        while !point_after(cluster, ms) {
            assert!(Instant::now() < until, "no point after {what} within 60 s");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let write_for = |workload: &mut Workload, agent: &TrackingAgent, secs: u64| {
        let until = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < until {
            workload
                .write(agent.disk().expect("served disk"), 5)
                .expect("write");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    write_for(&mut workload, &agent, 2);
    wait_point_after(&cluster, now_ms(), "the first writes");
    cluster.ps().kill9();
    let down_from = now_ms();
    write_for(&mut workload, &agent, 8);
    let down_to = now_ms();
    cluster.restart_ps_with(|spec| spec);
    write_for(&mut workload, &agent, 1);
    wait_point_after(&cluster, now_ms(), "the process server came back");
    let times: Vec<u64> = cluster
        .mt_points("g1")
        .iter()
        .filter(|p| p.kind == "crash-consistent")
        .map(|p| p.time_ms)
        .filter(|&t| t + 2000 >= down_from && t <= down_to + 2000)
        .collect();
    eprintln!(
        "process server down {down_from}..{down_to} ({} ms): point times around it {times:?}",
        down_to - down_from
    );
    let inside = times
        .iter()
        .filter(|&&t| t > down_from && t < down_to)
        .count();
    assert!(
        inside >= 5,
        "{inside} points cut during an 8 s outage at a 1 s interval: {times:?}"
    );
    let widest = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(
        widest <= 2000,
        "{widest} ms between two points around the outage: {times:?}"
    );
    agent.stop();
}
