//! `boomerang-mt quickstart`: the whole data path on one machine, without root. Makes
//! a throwaway CA, a sample disk (an ext4 image filled from this machine's own files
//! with `mkfs.ext4 -d`, so it holds real file-system content and free, zero space),
//! starts the master target and a process server on loopback, replicates the disk
//! with an agent, adds a few percent of new files to it (`debugfs -w`), replicates
//! the delta, and checks the replica byte for byte.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use boomerang_common::message::Role;
use boomerang_common::pki;

/// Quickstart flags.
#[derive(Debug, clap::Args)]
pub struct QuickstartArgs {
    /// Size of the sample disk in MiB.
    #[arg(long, default_value_t = 384)]
    pub size_mib: u64,
    /// Percent of the disk to change between the two syncs.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=50))]
    pub change_percent: u64,
    /// Work directory (default: a new temporary directory, removed afterwards).
    #[arg(long)]
    pub work_dir: Option<PathBuf>,
    /// Keep the work directory (disk, replica, logs) afterwards.
    #[arg(long)]
    pub keep: bool,
}

/// A daemon child, stopped (SIGTERM, then SIGKILL) when dropped.
struct Daemon {
    name: &'static str,
    child: Child,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            // SAFETY: sending a signal to our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!(
            "quickstart: {} did not stop on SIGTERM and was killed",
            self.name
        );
    }
}

fn sibling_binary(name: &str) -> anyhow::Result<PathBuf> {
    let me = std::env::current_exe().context("locating this binary")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!("{} not found beside {}: build all binaries first (cargo build --release --workspace --bins)", name, me.display());
    }
    Ok(path)
}

fn start(
    name: &'static str,
    bin: &Path,
    args: &[String],
    log: &Path,
) -> anyhow::Result<(Daemon, String)> {
    let log_file =
        std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let mut child = Command::new(bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from {name}"))?;
    let daemon = Daemon { name, child };
    let mut line = String::new();
    BufReader::new(stdout)
        .read_line(&mut line)
        .with_context(|| format!("reading {name}'s first line"))?;
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .ok_or_else(|| anyhow!("{name} did not start; its log {} says why", log.display()))?
        .to_string();
    Ok((daemon, addr))
}

fn run_tool(cmd: &mut Command, what: &str) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Copies regular files from this machine's /usr into `dir` until `budget` bytes.
fn stage_files(dir: &Path, budget: u64) -> anyhow::Result<u64> {
    let mut copied = 0u64;
    let mut stack = vec![PathBuf::from("/usr/share"), PathBuf::from("/usr/lib")];
    let mut n = 0u64;
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        let mut entries: Vec<_> = entries.flatten().collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                stack.push(e.path());
            } else if ft.is_file() {
                let Ok(meta) = e.metadata() else { continue };
                if meta.len() == 0 || meta.len() > 16 << 20 || copied + meta.len() > budget {
                    continue;
                }
                let sub = dir.join(format!("{:03}", n / 500));
                std::fs::create_dir_all(&sub)?;
                let dest = sub.join(format!("{n:06}-{}", e.file_name().to_string_lossy()));
                if std::fs::copy(e.path(), &dest).is_ok() {
                    copied += meta.len();
                    n += 1;
                }
            }
            if copied >= budget * 95 / 100 {
                return Ok(copied);
            }
        }
    }
    Ok(copied)
}

fn pseudo_random_file(path: &Path, len: u64, seed: u64) -> anyhow::Result<()> {
    let mut x = seed | 1;
    let mut buf = vec![0u8; usize::try_from(len).context("file size")?];
    for b in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let bytes = x.to_le_bytes();
        b.copy_from_slice(&bytes[..b.len()]);
    }
    std::fs::write(path, buf).with_context(|| format!("writing {}", path.display()))
}

fn files_identical(a: &Path, b: &Path) -> anyhow::Result<(bool, String)> {
    let mut fa = std::fs::File::open(a).with_context(|| format!("opening {}", a.display()))?;
    let mut fb = std::fs::File::open(b).with_context(|| format!("opening {}", b.display()))?;
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let mut hasher = blake3::Hasher::new();
    loop {
        let na = read_full(&mut fa, &mut ba)?;
        let nb = read_full(&mut fb, &mut bb)?;
        if na != nb || ba[..na] != bb[..nb] {
            return Ok((false, String::new()));
        }
        if na == 0 {
            return Ok((true, hasher.finalize().to_hex().to_string()));
        }
        hasher.update(&ba[..na]);
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match f.read(&mut buf[done..])? {
            0 => break,
            n => done += n,
        }
    }
    Ok(done)
}

fn sync(
    agent: &Path,
    ps: &str,
    work: &Path,
    disk: &Path,
    log: &Path,
) -> anyhow::Result<serde_json::Value> {
    let log_file = std::fs::File::create(log)?;
    let out = Command::new(agent)
        .args(["sync", "--ps", ps, "--pki-dir"])
        .arg(work.join("pki"))
        .args(["--name", "agent1", "--state-dir"])
        .arg(work.join("agent"))
        .arg("--disk")
        .arg(format!("sample={}", disk.display()))
        .arg("--json")
        .stderr(log_file)
        .output()
        .context("running the agent")?;
    if !out.status.success() {
        bail!("the agent's sync failed; see {}", log.display());
    }
    serde_json::from_slice(&out.stdout).context("reading the agent's report")
}

fn field(v: &serde_json::Value, disk_field: &str) -> u64 {
    v["disks"][0][disk_field].as_u64().unwrap_or(0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

/// Makes an ext4 image of `size` bytes at `disk`, about 55 % full of this machine's
/// files from /usr (`mkfs.ext4 -d`, no root needed), the rest free and zero. Stages
/// the files under `scratch`. Returns the bytes of files staged.
pub fn make_sample_disk(disk: &Path, size: u64, scratch: &Path) -> anyhow::Result<u64> {
    let staging = scratch.join("staging");
    std::fs::create_dir_all(&staging)?;
    let staged = stage_files(&staging, size * 55 / 100)?;
    std::fs::File::create(disk)?.set_len(size)?;
    run_tool(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-E", "root_owner=0:0", "-d"])
            .arg(&staging)
            .arg(disk),
        "mkfs.ext4 -d (package e2fsprogs)",
    )?;
    std::fs::remove_dir_all(&staging)?;
    Ok(staged)
}

/// Adds `bytes` of new incompressible files to the ext4 image `disk` with
/// `debugfs -w` (no root needed), in four files.
pub fn add_files(disk: &Path, bytes: u64, scratch: &Path) -> anyhow::Result<()> {
    let files = 4u64;
    let seed = boomerang_common::config::now_ms();
    for i in 0..files {
        let name = format!("boomerang-new-{seed}-{i}.bin");
        let src = scratch.join(&name);
        pseudo_random_file(&src, bytes / files, seed + i)?;
        run_tool(
            Command::new("debugfs")
                .args(["-w", "-R"])
                .arg(format!("write {} {name}", src.display()))
                .arg(disk),
            "debugfs -w (package e2fsprogs)",
        )?;
        std::fs::remove_file(&src)?;
    }
    Ok(())
}

/// Runs the quickstart.
pub fn run(args: QuickstartArgs) -> anyhow::Result<()> {
    if args.size_mib < 64 {
        bail!("--size-mib must be at least 64");
    }
    let tmp;
    let work = match &args.work_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = std::env::temp_dir().join(format!("boomerang-quickstart-{}", std::process::id()));
            std::fs::create_dir_all(&tmp)?;
            tmp.clone()
        }
    };
    let result = run_in(&args, &work);
    if args.keep || result.is_err() {
        println!("work directory kept: {}", work.display());
    } else {
        let _ = std::fs::remove_dir_all(&work);
    }
    result
}

fn run_in(args: &QuickstartArgs, work: &Path) -> anyhow::Result<()> {
    let agent = sibling_binary("boomerang-agent")?;
    let ps_bin = sibling_binary("boomerang-ps")?;
    let mt_bin = std::env::current_exe()?;
    let pki_dir = work.join("pki");
    println!(
        "[1/6] deployment CA and certificates in {}",
        pki_dir.display()
    );
    pki::init_ca(&pki_dir)?;
    for (role, name) in [
        (Role::Agent, "agent1"),
        (Role::Ps, "ps1"),
        (Role::Mt, "mt1"),
    ] {
        pki::issue(&pki_dir, role, name, &pki_dir)?;
    }

    let disk = work.join("sample-disk.img");
    let size = args.size_mib << 20;
    println!(
        "[2/6] sample disk: {} MiB ext4 image with files from /usr and free (zero) space",
        args.size_mib
    );
    let staged = make_sample_disk(&disk, size, work)?;
    println!("      {} of files staged", mib(staged));

    println!("[3/6] master target and process server on loopback");
    let (_mt, mt_addr) = start(
        "master target",
        &mt_bin,
        &[
            "run".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--pki-dir".into(),
            pki_dir.display().to_string(),
            "--name".into(),
            "mt1".into(),
            "--state-dir".into(),
            work.join("mt").display().to_string(),
        ],
        &work.join("mt.log"),
    )?;
    let (_ps, ps_addr) = start(
        "process server",
        &ps_bin,
        &[
            "run".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--master-target".into(),
            mt_addr.clone(),
            "--pki-dir".into(),
            pki_dir.display().to_string(),
            "--name".into(),
            "ps1".into(),
            "--spool-dir".into(),
            work.join("spool").display().to_string(),
        ],
        &work.join("ps.log"),
    )?;
    println!("      master target {mt_addr}, process server {ps_addr}");

    println!("[4/6] initial sync");
    let first = sync(&agent, &ps_addr, work, &disk, &work.join("agent-1.log"))?;
    report_line(&first);

    let change = size / 100 * args.change_percent;
    println!(
        "[5/6] adding {} of new files to the disk (debugfs -w), then syncing the delta",
        mib(change)
    );
    add_files(&disk, change, work)?;
    let second = sync(&agent, &ps_addr, work, &disk, &work.join("agent-2.log"))?;
    report_line(&second);

    println!("[6/6] verifying the replica");
    let replica = work.join("mt").join("replicas").join("sample.img");
    let (same, hash) = files_identical(&disk, &replica)?;
    let fsck = Command::new("e2fsck").args(["-fn"]).arg(&replica).output();
    let fsck_ok = matches!(&fsck, Ok(o) if o.status.success());
    println!();
    println!(
        "bytes read:      {} + {}",
        mib(field(&first, "bytes_read")),
        mib(field(&second, "bytes_read"))
    );
    println!(
        "bytes changed:   {} + {}",
        mib(field(&first, "bytes_changed")),
        mib(field(&second, "bytes_changed"))
    );
    println!(
        "bytes on wire:   {} + {}",
        mib(first["wire_tx_bytes"].as_u64().unwrap_or(0)),
        mib(second["wire_tx_bytes"].as_u64().unwrap_or(0))
    );
    println!(
        "throughput:      {:.0} MB/s initial, {:.0} MB/s delta (raw disk bytes per second)",
        rate(&first),
        rate(&second)
    );
    if same && fsck_ok {
        println!("result:          VERIFIED: replica identical to the source byte for byte (blake3 {}), e2fsck clean", &hash[..16]);
        Ok(())
    } else if same {
        println!(
            "result:          VERIFIED byte for byte (blake3 {}); e2fsck not run or unavailable",
            &hash[..16]
        );
        Ok(())
    } else {
        bail!(
            "the replica differs from the source: see the logs in {}",
            work.display()
        )
    }
}

fn rate(v: &serde_json::Value) -> f64 {
    let secs = v["seconds"].as_f64().unwrap_or(0.0).max(1e-9);
    field(v, "bytes_read") as f64 / secs / 1e6
}

fn report_line(v: &serde_json::Value) {
    println!(
        "      read {} in {:.2} s, {} changed, {} on the wire",
        mib(field(v, "bytes_read")),
        v["seconds"].as_f64().unwrap_or(0.0),
        mib(field(v, "bytes_changed")),
        mib(v["wire_tx_bytes"].as_u64().unwrap_or(0)),
    );
}
