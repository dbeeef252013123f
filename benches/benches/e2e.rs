//! End-to-end throughput: the three real binaries on loopback replicate a 1 GiB ext4
//! image of this machine's own files (mkfs.ext4 -d; the free space is zero), then
//! resync it unchanged, then after 10 % of its 64 KiB chunks changed. Prints raw MB/s,
//! bytes on the wire and peak RSS of each process, beside references measured in the
//! same run: a plain read + blake3 + zstd-1 loop over the image, and rsync (daemon on
//! loopback) on the same change set when rsync is installed.
//!
//! Run: `cargo build --release --workspace --bins && cargo bench -p boomerang-benches --bench e2e`
//! Env: BENCH_SIZE_MIB (default 1024), BENCH_RUNS (default 3).

use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use boomerang_tests::cli::SyncReport;
use boomerang_tests::{change_chunks, files_equal, Cluster, ClusterConfig};

const CHUNK: usize = 64 * 1024;

#[derive(Debug, Default, Clone)]
struct Run {
    full_mbps: f64,
    full_wire: u64,
    same_mbps: f64,
    same_wire: u64,
    delta_mbps: f64,
    delta_secs: f64,
    delta_wire: u64,
    delta_changed: u64,
    agent_rss_kib: u64,
    ps_rss_kib: u64,
    mt_rss_kib: u64,
    loop_mbps: f64,
    rsync_delta_secs: Option<f64>,
    rsync_same_secs: Option<f64>,
    /// The same kind of 10 % delta once a recovery point exists (before-images go to
    /// the retention journal first).
    retained_delta_secs: f64,
    journal_bytes: u64,
    /// `test-failover` of the point before that delta into a new image file.
    materialize_secs: f64,
    /// Reference: `cp --sparse=always` of the replica plus `sync`, same run.
    copy_secs: f64,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The reference: one thread reading 4 MiB at a time, hashing 64 KiB chunks and
/// compressing the non-zero ones at zstd level 1.
fn plain_loop(path: &Path) -> f64 {
    let mut f = std::fs::File::open(path).expect("open image");
    let mut buf = vec![0u8; 4 << 20];
    let mut comp = zstd::bulk::Compressor::new(1).expect("zstd");
    let start = Instant::now();
    let mut total = 0u64;
    let mut sink = 0usize;
    loop {
        let n = f.read(&mut buf).expect("read image");
        if n == 0 {
            break;
        }
        for c in buf[..n].chunks(CHUNK) {
            sink ^= blake3::hash(c).as_bytes()[0] as usize;
            if c.iter().any(|&b| b != 0) {
                sink ^= comp.compress(c).expect("compress").len();
            }
        }
        total += n as u64;
    }
    std::hint::black_box(sink);
    total as f64 / start.elapsed().as_secs_f64() / 1e6
}

/// Runs an agent sync, returning its report and its peak RSS (from wait4).
fn timed_sync(cluster: &Cluster, image: &Path, extra: &[&str]) -> (SyncReport, u64) {
    let mut args = cluster.agent1().disk("d0", image).group("bench");
    args.extra
        .extend(extra.iter().map(std::ffi::OsString::from));
    let mut cmd = cluster.agent_command(&args);
    // Reaped below with wait4, which also reports the child's peak RSS.
    #[allow(clippy::zombie_processes)]
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start agent");
    let pid = i32::try_from(child.id()).expect("pid");
    let mut stdout = child.stdout.expect("stdout");
    let mut out = String::new();
    stdout.read_to_string(&mut out).expect("read report");
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waiting for our own child; both out-pointers are valid for the call.
    let rc = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(rc, pid, "wait4 failed");
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "agent sync failed: {out}"
    );
    let json = serde_json::from_str(&out).expect("agent JSON");
    (
        SyncReport::from_json(&json),
        u64::try_from(usage.ru_maxrss).unwrap_or(0),
    )
}

fn rsync_daemon(dir: &Path) -> Option<(std::process::Child, u16)> {
    Command::new("rsync").arg("--version").output().ok()?;
    let port = 20000 + (std::process::id() % 20000) as u16;
    let conf = dir.join("rsyncd.conf");
    std::fs::write(
        &conf,
        format!(
            "use chroot = no\nuid = root\ngid = root\n[m]\npath = {}\nread only = no\n",
            dir.join("dst").display()
        ),
    )
    .ok()?;
    std::fs::create_dir_all(dir.join("dst")).ok()?;
    let child = Command::new("rsync")
        .args(["--daemon", "--no-detach", "--address=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--config={}", conf.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    std::thread::sleep(Duration::from_millis(300));
    Some((child, port))
}

fn rsync_push(src: &Path, port: u16) -> f64 {
    let start = Instant::now();
    let st = Command::new("rsync")
        .args(["--inplace", "--no-whole-file", "-t"])
        .arg(src)
        .arg(format!("rsync://127.0.0.1:{port}/m/disk.img"))
        .status()
        .expect("rsync");
    assert!(st.success(), "rsync failed");
    start.elapsed().as_secs_f64()
}

fn one_run(size: u64, seed: u64) -> Run {
    let cluster = Cluster::start(ClusterConfig::default());
    let image = cluster.root().join("disk.img");
    boomerang_mt::quickstart::make_sample_disk(&image, size, cluster.root()).expect("sample disk");
    let mut run = Run {
        loop_mbps: plain_loop(&image),
        ..Run::default()
    };
    let rsync = rsync_daemon(cluster.root());
    if let Some((_, port)) = &rsync {
        rsync_push(&image, *port); // seed the rsync destination with the same image
    }

    let (full, rss1) = timed_sync(&cluster, &image, &[]);
    run.full_mbps = size as f64 / full.seconds / 1e6;
    run.full_wire = full.wire_tx_bytes;
    let (same, rss2) = timed_sync(&cluster, &image, &[]);
    run.same_mbps = size as f64 / same.seconds / 1e6;
    run.same_wire = same.wire_tx_bytes;

    change_chunks(&image, CHUNK as u64, 0.10, seed);
    let (delta, rss3) = timed_sync(&cluster, &image, &[]);
    run.delta_secs = delta.seconds;
    run.delta_mbps = size as f64 / delta.seconds / 1e6;
    run.delta_wire = delta.wire_tx_bytes;
    run.delta_changed = delta.bytes_changed();
    run.agent_rss_kib = rss1.max(rss2).max(rss3);
    if let Some((mut child, port)) = rsync {
        run.rsync_delta_secs = Some(rsync_push(&image, port));
        run.rsync_same_secs = Some(rsync_push(&image, port));
        let _ = child.kill();
        let _ = child.wait();
    }
    let replica = cluster.mt_state_dir().join("replicas").join("d0.img");
    assert!(
        files_equal(&image, &replica),
        "replica differs from the source"
    );

    // Retention: a point, the same kind of delta journaled, then the point given back.
    const POINT: [&str; 4] = ["--freeze-hook", "true", "--thaw-hook", "true"];
    timed_sync(&cluster, &image, &POINT);
    let at_point = boomerang_tests::sha256_file(&image);
    let point = cluster.mt_points("bench").last().expect("a point").id;
    change_chunks(&image, CHUNK as u64, 0.10, seed + 7);
    let (retained, _) = timed_sync(&cluster, &image, &POINT);
    run.retained_delta_secs = retained.seconds;
    run.journal_bytes = cluster.mt_status().raw["groups"][0]["journal_bytes"]
        .as_u64()
        .unwrap_or(0);
    let target = cluster.root().join("point.img");
    let started = std::time::Instant::now();
    cluster.mt_op(
        "test-failover",
        "bench",
        &boomerang_tests::cli::point_to_args(&point.to_string(), &[("d0".into(), target.clone())]),
    );
    run.materialize_secs = started.elapsed().as_secs_f64();
    assert_eq!(
        boomerang_tests::sha256_file(&target),
        at_point,
        "the point's bytes"
    );
    let copy = cluster.root().join("copy.img");
    let started = std::time::Instant::now();
    let ok = Command::new("cp")
        .arg("--sparse=always")
        .arg(&replica)
        .arg(&copy)
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("sync").status().is_ok_and(|s| s.success());
    assert!(ok, "cp of the replica failed");
    run.copy_secs = started.elapsed().as_secs_f64();
    let mut cluster = cluster;
    run.ps_rss_kib = cluster.ps().peak_rss_kib().unwrap_or(0);
    run.mt_rss_kib = cluster.mt().peak_rss_kib().unwrap_or(0);
    run
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        println!("e2e: bench");
        return;
    }
    let size = env_u64("BENCH_SIZE_MIB", 1024) << 20;
    let runs = env_u64("BENCH_RUNS", 3).max(1);
    let mut all = Vec::new();
    for i in 0..runs {
        let r = one_run(size, 1000 + i);
        eprintln!("run {i}: {r:?}");
        all.push(r);
    }
    let m = |f: fn(&Run) -> f64| median(all.iter().map(f).collect());
    let mib = |b: f64| b / (1 << 20) as f64;
    println!(
        "end-to-end, {} MiB ext4 image of /usr files, median of {runs} runs",
        size >> 20
    );
    println!(
        "  reference read+blake3+zstd-1 loop, 1 thread: {:>8.0} MB/s",
        m(|r| r.loop_mbps)
    );
    println!(
        "  full sync:             {:>8.0} MB/s   wire {:>8.1} MiB",
        m(|r| r.full_mbps),
        mib(m(|r| r.full_wire as f64))
    );
    println!(
        "  unchanged resync:      {:>8.0} MB/s   wire {:>8.3} MiB ({:.4} % of the disk)",
        m(|r| r.same_mbps),
        mib(m(|r| r.same_wire as f64)),
        100.0 * m(|r| r.same_wire as f64) / size as f64
    );
    println!(
        "  10 % delta resync:     {:>8.0} MB/s   wire {:>8.1} MiB for {:.1} MiB changed, {:.2} s",
        m(|r| r.delta_mbps),
        mib(m(|r| r.delta_wire as f64)),
        mib(m(|r| r.delta_changed as f64)),
        m(|r| r.delta_secs)
    );
    if all.iter().all(|r| r.rsync_delta_secs.is_some()) {
        let rd = m(|r| r.rsync_delta_secs.unwrap_or(0.0));
        let rs = m(|r| r.rsync_same_secs.unwrap_or(0.0));
        println!(
            "  rsync daemon, same delta: {rd:.2} s, unchanged: {rs:.2} s  -> boomerang delta is {:.1}x faster",
            rd / m(|r| r.delta_secs)
        );
    } else {
        println!("  rsync not installed: apt-get install rsync for the reference");
    }
    println!(
        "  10 % delta with a point to keep: {:.2} s ({:.2} s without), journal {:.1} MiB",
        m(|r| r.retained_delta_secs),
        m(|r| r.delta_secs),
        mib(m(|r| r.journal_bytes as f64))
    );
    println!(
        "  test-failover of that point: {:.2} s = {:.0} MB/s (copy, rewind, verify); reference cp --sparse + sync of the replica {:.2} s",
        m(|r| r.materialize_secs),
        size as f64 / m(|r| r.materialize_secs) / 1e6,
        m(|r| r.copy_secs)
    );
    println!(
        "  peak RSS: agent {:.0} MiB, process server {:.0} MiB, master target {:.0} MiB",
        m(|r| r.agent_rss_kib as f64) / 1024.0,
        m(|r| r.ps_rss_kib as f64) / 1024.0,
        m(|r| r.mt_rss_kib as f64) / 1024.0
    );
}
