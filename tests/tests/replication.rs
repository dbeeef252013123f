//! Replication end to end on image files, through the real binaries: exact copies,
//! differential resyncs that ship about what changed, resume after an agent crash,
//! end-to-end integrity, and the transport's refusals (foreign CA, wrong role,
//! malformed frames). None of these needs root.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use boomerang_common::config::TlsPaths;
use boomerang_common::delta::ExtentEncoder;
use boomerang_common::durable::StateFile;
use boomerang_common::message::{Message, Role};
use boomerang_common::pki::role_dns_name;
use boomerang_common::transport;
use boomerang_common::wire::HEADER_LEN;
use boomerang_common::{Batch, ChunkHash};
use boomerang_tests::cli::{AgentSyncArgs, SyncReport, CUT_SYNC_COMPLETE};
use boomerang_tests::process::{describe, failure_message, run_with_timeout};
use boomerang_tests::rng::DataRng;
use boomerang_tests::{
    change_chunks, first_difference, make_mixed_image, sha256_file, Cluster, ClusterConfig, Daemon,
    TestPki,
};
use serde_json::Value;

const MIB: u64 = 1 << 20;
/// The agent's default chunk size (`--chunk-kib 64`).
const CHUNK: u64 = 64 * 1024;
/// The agent's default batch unit: one batch per 4 MiB of disk.
const UNIT: u64 = 4 * MIB;
const DISK: &str = "disk0";
/// Longest any one agent sync of these small disks may take.
const SYNC_DEADLINE: Duration = Duration::from_secs(30);

fn cluster() -> Cluster {
    Cluster::start(ClusterConfig::default())
}

/// The replica file the master target reports for `disk`.
fn replica_path(cluster: &Cluster, disk: &str) -> PathBuf {
    let status = cluster.mt_status();
    status.raw["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|d| d["disk"] == disk))
        .and_then(|d| d["replica"].as_str())
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("mt status names no replica for {disk}: {}", status.raw))
}

/// The replica holds exactly the source's bytes (compared by the system `sha256sum`).
fn assert_replica_equals_source(cluster: &Cluster, disk: &str, source: &Path) {
    let replica = replica_path(cluster, disk);
    assert_eq!(
        sha256_file(&replica),
        sha256_file(source),
        "replica {} differs from the source, first at byte {:?}",
        replica.display(),
        first_difference(&replica, source)
    );
}

/// A field of disk `disk` in the agent's report that `cli::DiskSyncReport` leaves in `raw`.
fn report_field<'a>(report: &'a SyncReport, disk: &str, key: &str) -> &'a Value {
    report.raw["disks"]
        .as_array()
        .and_then(|disks| disks.iter().find(|d| d["disk"] == disk))
        .map(|d| &d[key])
        .unwrap_or_else(|| panic!("agent report has no disk {disk}: {}", report.raw))
}

/// Runs `cmd` (an agent sync with `--json`) with a deadline (a sync that hangs fails
/// the test in half a minute, not in the harness's ten), panics unless it exits 0, and
/// parses the report.
fn sync_report(cmd: &mut Command) -> SyncReport {
    let out = run_with_timeout(cmd, SYNC_DEADLINE);
    assert!(out.status.success(), "{}", failure_message(cmd, &out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let json = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("`{}` printed invalid JSON ({e}): {stdout}", describe(cmd)));
    SyncReport::from_json(&json)
}

/// One agent sync of `args`, see [`sync_report`].
fn sync(cluster: &Cluster, args: &AgentSyncArgs) -> SyncReport {
    sync_report(&mut cluster.agent_command(args))
}

/// Polls `done` every 20 ms until it holds or `timeout` passes; returns whether it held.
fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits up to 10 s for `needle` in a daemon's log (logs are written asynchronously).
fn assert_log_mentions(daemon: &Daemon, needle: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || daemon.log().contains(needle)),
        "{} does not mention {needle:?}; its tail:\n{}",
        daemon.log_path().display(),
        daemon.log_tail(30)
    );
}

/// A `size`-byte image of seeded random (incompressible) bytes.
fn random_image(path: &Path, size: u64, seed: u64) {
    let mut rng = DataRng::new(seed);
    let mut file = File::create(path).expect("create random image");
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..size / MIB {
        rng.fill(&mut buf);
        file.write_all(&buf).expect("write random image");
    }
}

/// What the agent's encoder (zstd level 1, raw when that saves under 1/16) makes of
/// the chunks at `offsets`: the payload bytes a differential sync must ship.
fn encoded_payload(path: &Path, offsets: &[u64]) -> u64 {
    let file = File::open(path).expect("open source image");
    let mut encoder = ExtentEncoder::new(1).expect("zstd encoder");
    let mut chunk = vec![0u8; usize::try_from(CHUNK).expect("chunk fits usize")];
    offsets
        .iter()
        .map(|&off| {
            file.read_exact_at(&mut chunk, off).expect("read chunk");
            encoder
                .encode(off, &chunk, ChunkHash::of(&chunk))
                .payload
                .len() as u64
        })
        .sum()
}

/// The agent's durable cursor: `(units acknowledged by the process server, units)` of
/// the pass in progress, or `None` when no pass is in progress or no state exists yet.
fn agent_pass_progress(state_file: &Path) -> Option<(u64, u64)> {
    let state = StateFile::<Value>::open(state_file).ok()?;
    let pass = state.get().get("pass")?;
    let acked = pass.get("acked_units")?.as_u64()?;
    let size = pass.get("geometry")?.get("size")?.as_u64()?;
    let unit = pass.get("geometry")?.get("unit_size")?.as_u64()?;
    Some((acked, size.div_ceil(unit)))
}

/// A multi-thread runtime for the tests that speak QUIC themselves.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn hello(name: &str) -> Message {
    Message::Hello {
        role: Role::Agent,
        name: name.to_string(),
        software: "replication-test".to_string(),
    }
}

// Rule 4 (a sync-complete cut holds exactly the source's bytes) and the scan source's
// zero skip: random, text and zero regions all arrive byte for byte.
#[test]
fn image_disk_replicates_exactly() {
    let cluster = cluster();
    let source = cluster.root().join("source.img");
    let size = 128 * MIB;
    make_mixed_image(&source, size, 1);

    let report = sync(&cluster, &cluster.agent1().disk(DISK, &source));
    let disk = report.disk(DISK);
    assert_eq!(disk.bytes_read, size, "{}", report.raw);
    assert_eq!(report_field(&report, DISK, "tag"), CUT_SYNC_COMPLETE);

    assert_replica_equals_source(&cluster, DISK, &source);
    let status = cluster.mt_status();
    let st = status.disk(DISK);
    assert_eq!(st.size, size);
    assert!(st.consistent, "replica not consistent: {}", status.raw);
    assert_eq!(st.cut.as_deref(), Some(CUT_SYNC_COMPLETE), "{}", status.raw);
    assert_eq!(st.integrity_failures, 0, "{}", status.raw);
}

// Generations (issue 3): a resized disk starts a new generation at both ends; the
// replica follows the new size and holds the source's bytes again, grown or shrunk.
#[test]
fn a_resized_disk_starts_a_new_generation_and_follows_the_size() {
    let cluster = cluster();
    let source = cluster.root().join("source.img");
    make_mixed_image(&source, 64 * MIB, 7);
    let args = cluster.agent1().disk(DISK, &source);
    sync(&cluster, &args);
    assert_eq!(cluster.mt_status().disk(DISK).generation, 1);
    for (size, generation) in [(96 * MIB, 2), (40 * MIB, 3)] {
        let f = File::options()
            .write(true)
            .open(&source)
            .expect("open source");
        f.set_len(size).expect("resize source");
        f.write_all_at(&[0x5a; 4096], size - 4096)
            .expect("write the new tail");
        drop(f);
        let report = sync(&cluster, &args);
        assert_eq!(report.disk(DISK).bytes_read, size, "{}", report.raw);
        let status = cluster.mt_status();
        let st = status.disk(DISK);
        assert_eq!(
            (st.size, st.generation),
            (size, generation),
            "{}",
            status.raw
        );
        assert!(st.consistent, "{}", status.raw);
        assert_replica_equals_source(&cluster, DISK, &source);
    }
}

// Performance shape: "skip unchanged chunks before they cost bandwidth". A resync after
// 1 % of the chunks changed sends about what those chunks compress to, and a resync of
// an unchanged disk sends next to nothing.
#[test]
fn differential_resync_ships_about_the_changed_bytes() {
    let cluster = cluster();
    let source = cluster.root().join("source.img");
    let size = 128 * MIB;
    make_mixed_image(&source, size, 2);
    let args = cluster.agent1().disk(DISK, &source);
    sync(&cluster, &args);

    let changed = change_chunks(&source, CHUNK, 0.01, 3);
    let compressed_changed = encoded_payload(&source, &changed);
    let manifest = size / CHUNK * 32;
    let report = sync(&cluster, &args);
    let disk = report.disk(DISK);
    assert_eq!(disk.chunks_changed, changed.len() as u64, "{}", report.raw);
    assert_eq!(disk.bytes_payload, compressed_changed, "{}", report.raw);

    // Fixed allowance on top of the payload, counted from what a resync sends:
    // - the QUIC + TLS 1.3 handshake with the client certificate chain: < 8 KiB;
    // - one request stream per batch (size / 4 MiB = 32), the tag, the manifest
    //   request and the OpenDisk announce: each a frame header (16), a batch header
    //   (disk id, generation, seq, count: ~40), QUIC packet and STREAM framing and AEAD
    //   tag (~60) and the ACKs of its answer (~50): 512 bytes each is generous;
    // - the drain's OpenDisk polls, one per 100 ms of sync, 512 bytes each;
    // - extent headers (49 bytes per changed chunk) and one QUIC packet header per
    //   ~1200 payload bytes (~60 bytes, 5 %), both covered by the 1.2 factor.
    // `manifest` (the replica's hashes) travels towards the agent; keeping it in the
    // budget covers the ACKs the agent sends for it.
    let requests = size / UNIT + 3;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let polls = (report.seconds * 10.0).ceil() as u64 + 2;
    let allowance = 8 * 1024 + (requests + polls) * 512;
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let budget = (1.2 * compressed_changed as f64) as u64 + manifest + allowance;
    eprintln!(
        "differential resync: {} chunks changed, {} bytes encoded, wire tx {} bytes \
         (budget {budget}: manifest {manifest}, allowance {allowance}), rx {}, {:.2} s",
        changed.len(),
        compressed_changed,
        report.wire_tx_bytes,
        report.wire_rx_bytes,
        report.seconds
    );
    assert!(
        report.wire_tx_bytes <= budget,
        "resync sent {} bytes for {compressed_changed} bytes of changed chunks (budget {budget})",
        report.wire_tx_bytes
    );
    assert_replica_equals_source(&cluster, DISK, &source);

    let unchanged = sync(&cluster, &args);
    eprintln!(
        "unchanged resync: wire tx {} bytes, rx {}, {:.2} s",
        unchanged.wire_tx_bytes, unchanged.wire_rx_bytes, unchanged.seconds
    );
    assert_eq!(unchanged.disk(DISK).chunks_changed, 0, "{}", unchanged.raw);
    assert!(
        unchanged.wire_tx_bytes <= size / 500,
        "an unchanged resync sent {} bytes, over 0.2 % of {size}",
        unchanged.wire_tx_bytes
    );
    assert_replica_equals_source(&cluster, DISK, &source);
}

// Rule 1 and rule 2: an agent SIGKILLed mid-pass loses nothing acknowledged; the next
// sync resumes after the acknowledged prefix (it reads less than the disk) and the
// replica still ends up exact.
#[test]
fn interrupted_agent_resumes() {
    let cluster = cluster();
    let source = cluster.root().join("source.img");
    let size = 256 * MIB;
    random_image(&source, size, 4);
    // The kill must land after the agent persisted part of the pass (it does so about
    // once a second) and before the pass ends. A machine fast enough to ship 256 MiB
    // in about a second gets a second try, on a fresh disk id, with the agent
    // throttled to one worker and one batch in flight.
    let throttled = cluster.root().join("throttled.toml");
    std::fs::write(&throttled, "workers = 1\nin_flight = 1\n").expect("write agent config");
    for (attempt, config) in [None, Some(&throttled)].into_iter().enumerate() {
        let disk = format!("resume{attempt}");
        let mut args = cluster.agent1().disk(&disk, &source);
        if let Some(config) = config {
            args.extra = vec!["--config".into(), config.into()];
        }
        let Some((acked, units)) = kill_agent_mid_pass(&cluster, &args, &disk) else {
            eprintln!("attempt {attempt}: the agent finished before it could be killed");
            continue;
        };

        let report = sync(&cluster, &args);
        let read = report.disk(&disk).bytes_read;
        eprintln!(
            "killed at {acked}/{units} units acknowledged; the resumed sync read {read} of {size} bytes"
        );
        assert!(
            read <= size - acked * UNIT,
            "the resumed sync read {read} bytes although {acked} units ({} bytes) were \
             acknowledged before the kill",
            acked * UNIT
        );
        assert_replica_equals_source(&cluster, &disk, &source);
        let status = cluster.mt_status();
        assert_eq!(
            status.disk(&disk).cut.as_deref(),
            Some(CUT_SYNC_COMPLETE),
            "{}",
            status.raw
        );
        return;
    }
    panic!("the agent finished every attempt before it could be killed mid-pass");
}

/// Starts an agent sync and SIGKILLs it once its state file shows part of the pass
/// acknowledged; returns `(acknowledged units, units)` then, or `None` when the agent
/// finished the pass first.
fn kill_agent_mid_pass(cluster: &Cluster, args: &AgentSyncArgs, disk: &str) -> Option<(u64, u64)> {
    let state_file = args.state_dir.join(format!("{disk}.state"));
    let log = File::create(cluster.logs_dir().join(format!("agent-killed-{disk}.log")))
        .expect("agent log");
    let mut agent = cluster
        .agent_command(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start the agent");
    let mut exited = None;
    let ready = wait_until(Duration::from_secs(30), || {
        let progress = agent_pass_progress(&state_file);
        exited = agent.try_wait().expect("waitpid on the agent");
        exited.is_some() || progress.is_some_and(|(acked, _)| acked > 0)
    });
    let _ = agent.kill(); // SIGKILL: the agent gets no chance to clean up
    let status = agent.wait().expect("reap the agent");
    assert!(ready, "the agent showed no progress within 30 s");
    // What the agent persisted up to its death is what the next sync resumes from.
    match (exited, agent_pass_progress(&state_file)) {
        (None, Some((acked, units))) if acked > 0 && acked < units => {
            assert!(
                !status.success(),
                "the agent exited 0 although it was killed"
            );
            Some((acked, units))
        }
        _ => None,
    }
}

// Rule 3: a batch whose payload no longer matches its blake3 is refused by the master
// target before it touches the replica, counted, logged, and sent again by the agent.
#[test]
fn corrupted_batch_is_refused_counted_and_resent() {
    let mut cluster = cluster();
    let source = cluster.root().join("source.img");
    let size = 64 * MIB;
    random_image(&source, size, 5);
    let args = cluster.agent1().disk(DISK, &source);

    let report = sync_report(
        cluster
            .agent_command(&args)
            .env("BOOMERANG_FAULTS", "batch.write@3=eio"),
    );
    let resent = report_field(&report, DISK, "resent")
        .as_u64()
        .unwrap_or_else(|| panic!("no `resent` in {}", report.raw));
    eprintln!("corrupted the third batch: resent {resent}");
    assert!(resent >= 1, "nothing was resent: {}", report.raw);

    let status = cluster.mt_status();
    let st = status.disk(DISK);
    assert_eq!(st.integrity_failures, 1, "{}", status.raw);
    assert!(st.consistent, "{}", status.raw);
    assert_replica_equals_source(&cluster, DISK, &source);
    assert_log_mentions(cluster.mt(), "integrity check failed");
}

// Issue 9, defect 2: a sync whose records the master target never takes (here every
// replica write fails with ENOSPC, so it answers but does not move) gives up after
// `drain_stall_secs` with a reason instead of waiting for ever, and leaves a hole
// flag: the next sync, against a healthy master target, starts a new generation and
// completes.
#[test]
fn a_sync_the_master_target_never_takes_gives_up_and_the_next_starts_over() {
    let mut cluster = cluster();
    let source = cluster.root().join("source.img");
    random_image(&source, 8 * MIB, 11);
    let config = cluster.root().join("agent.toml");
    std::fs::write(&config, "drain_stall_secs = 3\n").expect("write the agent config");
    let mut args = cluster.agent1().disk(DISK, &source);
    args.extra = vec!["--config".into(), config.into()];
    cluster.restart_mt_with(|s| s.env("BOOMERANG_FAULTS", "replica.write@1=enospc*"));

    let started = Instant::now();
    let out = cluster.agent_sync_output(&args);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the sync succeeded: {stderr}");
    assert!(
        stderr.contains("has not moved past seq") && stderr.contains("starts a new generation"),
        "the failure does not say why and what next: {stderr}"
    );
    assert!(
        took < Duration::from_secs(60),
        "it gave up only after {took:?}"
    );

    cluster.restart_mt_with(|s| s.env("BOOMERANG_FAULTS", ""));
    // The default wait: the process server may hold the disk back a few seconds
    // after the refusals before it tries the healthy master target.
    args.extra.clear();
    let report = sync(&cluster, &args);
    let generation = report_field(&report, DISK, "generation")
        .as_u64()
        .unwrap_or_else(|| panic!("no `generation` in {}", report.raw));
    eprintln!("gave up after {took:?}; the next sync shipped in generation {generation}");
    assert!(
        generation >= 2,
        "the next sync did not start a new generation: {}",
        report.raw
    );
    assert_replica_equals_source(&cluster, DISK, &source);
}

// Rule 6: a certificate from another CA is refused in the TLS handshake, the agent
// fails fast naming the refusal, and nothing reaches the master target.
#[test]
fn foreign_ca_agent_is_refused() {
    let mut cluster = cluster();
    let source = cluster.root().join("source.img");
    make_mixed_image(&source, 16 * MIB, 6);
    let foreign = TestPki::new(&[("agent1", "agent")]);
    let mut args = cluster.agent1().disk(DISK, &source);
    args.pki_dir = foreign.dir().to_path_buf();

    let started = Instant::now();
    let out: Output = run_with_timeout(&mut cluster.agent_command(&args), SYNC_DEADLINE);
    let took = started.elapsed();
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "foreign agent: {} after {took:?}: {}",
        out.status,
        stderr.trim()
    );
    assert!(!out.status.success(), "a foreign agent synced: {stderr}");
    assert!(took < Duration::from_secs(10), "refusal took {took:?}");
    assert!(
        stderr.contains("boomerang-agent: error:") && stderr.contains("refused the TLS handshake"),
        "the error does not name the TLS refusal: {stderr}"
    );
    assert_log_mentions(cluster.ps(), "refused connection");
    let status = cluster.mt_status();
    assert!(
        status.disks.is_empty(),
        "the master target knows disks: {}",
        status.raw
    );
}

// Rule 6: a role may only do its role's operations. An agent certificate (valid, same
// CA) that dials the master target directly is refused there.
#[test]
fn agent_certificate_cannot_talk_to_the_master_target() {
    let mut cluster = cluster();
    let tls = TlsPaths::in_dir(cluster.pki().dir(), "agent1");
    let mt = cluster.mt_addr();
    let (err, closed) = runtime().block_on(async move {
        let ep = transport::client_endpoint(&tls).expect("client endpoint");
        let err = tokio::time::timeout(
            Duration::from_secs(10),
            transport::connect(&ep, mt, Role::Mt, &hello("agent1")),
        )
        .await
        .expect("the master target neither answered nor refused within 10 s")
        .expect_err("the master target accepted an agent certificate");
        // The same dial step by step, to see how the master target ends it: the TLS
        // handshake succeeds (same CA), then the role is refused.
        let conn = ep
            .connect(mt, &role_dns_name(Role::Mt))
            .expect("dial the master target")
            .await
            .expect("the TLS handshake with a same-CA certificate succeeds");
        let hello_answer = transport::request(&conn, &hello("agent1")).await;
        assert!(hello_answer.is_err(), "the mt answered: {hello_answer:?}");
        let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
            .await
            .expect("the connection stayed open");
        ep.close(0u32.into(), b"test done");
        (err, closed)
    });
    eprintln!("agent -> mt: {err}; {closed}");
    match &closed {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(
                u64::from(c.error_code),
                u64::from(transport::CLOSE_REFUSED),
                "closed with {c}"
            );
            let reason = String::from_utf8_lossy(&c.reason);
            assert!(
                reason.contains("role agent may not connect here"),
                "close reason: {reason}"
            );
        }
        other => panic!("the connection ended by {other}, not by a refusal"),
    }
    assert_log_mentions(cluster.mt(), "role agent may not connect here");
    assert!(cluster.mt().is_running());
}

// Rule 5: a malformed frame (garbage, or a valid header claiming a body over the cap)
// closes that connection with a logged reason; the server keeps serving.
#[test]
fn malformed_frames_close_the_connection_and_the_server_survives() {
    let mut cluster = cluster();
    let tls = TlsPaths::in_dir(cluster.pki().dir(), "agent1");
    let ps = cluster.ps_addr();

    let mut garbage = vec![0u8; 64];
    DataRng::new(7).fill(&mut garbage);
    // A real batch frame's header with its body length rewritten to 1 GiB: magic,
    // version and kind are valid, the length is over MAX_BODY (64 MiB).
    let mut huge = Message::Batch(Batch {
        disk: DISK.to_string(),
        generation: 1,
        seq: 0,
        extents: Vec::new(),
    })
    .encode()[..HEADER_LEN]
        .to_vec();
    huge[8..12].copy_from_slice(&(1u32 << 30).to_le_bytes());

    for (what, frame) in [("64 random bytes", garbage), ("a 1 GiB body length", huge)] {
        let log_before = cluster.ps().log().matches("malformed frame").count();
        let tls = tls.clone();
        let closed = runtime().block_on(async move {
            let ep = transport::client_endpoint(&tls).expect("client endpoint");
            let conn = transport::connect(&ep, ps, Role::Ps, &hello("agent1"))
                .await
                .expect("agent1 connects to the process server");
            let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
            send.write_all(&frame).await.expect("write the frame");
            send.finish().expect("finish the stream");
            let answer = tokio::time::timeout(Duration::from_secs(10), recv.read_to_end(1 << 20))
                .await
                .expect("no answer and no close within 10 s");
            let closed = tokio::time::timeout(Duration::from_secs(10), conn.closed())
                .await
                .expect("the connection stayed open");
            ep.close(0u32.into(), b"test done");
            (answer.map(|a| a.len()), closed)
        });
        eprintln!("{what}: stream {:?}, connection {}", closed.0, closed.1);
        assert!(closed.0.is_err(), "{what}: the stream got an answer");
        match &closed.1 {
            quinn::ConnectionError::ApplicationClosed(c) => assert_eq!(
                u64::from(c.error_code),
                u64::from(transport::CLOSE_PROTOCOL),
                "{what}: closed with {c}"
            ),
            other => panic!("{what}: connection ended by {other}, not a protocol close"),
        }
        assert!(
            wait_until(Duration::from_secs(10), || {
                cluster.ps().log().matches("malformed frame").count() > log_before
            }),
            "{what}: the ps log does not mention a malformed frame:\n{}",
            cluster.ps().log_tail(20)
        );
        assert!(cluster.ps().is_running(), "{what}: the process server died");
    }

    let source = cluster.root().join("source.img");
    make_mixed_image(&source, 16 * MIB, 8);
    sync(&cluster, &cluster.agent1().disk(DISK, &source));
    assert_replica_equals_source(&cluster, DISK, &source);
}
