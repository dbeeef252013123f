//! The control socket: how operator commands (`failover`, `test-failover`, `commit`,
//! `reprotect`, `protect`) reach the running master target, which owns the replicas
//! and their journals.
//!
//! `<state_dir>/control.sock`, a Unix socket with mode 0600 (root only). The client
//! sends one JSON request line; the daemon answers with JSON lines: events (progress,
//! lines for the operator), then one `done` or `failed`. An action goes on when the
//! client goes away; its outcome is in the group's record (`status`).

use std::collections::BTreeMap;
use std::io::{BufRead as _, BufReader, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tracing::{info, warn};

use crate::failover::{Event, Site};
use crate::points::PointChoice;

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// An operator request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Fail over to a point.
    Failover {
        /// Group.
        group: String,
        /// latest, latest-processed, latest-app or an id.
        point: String,
        /// Targets by disk (absolute paths); empty rolls the replicas in place.
        to: BTreeMap<String, PathBuf>,
    },
    /// Cancel a pending failover.
    Cancel {
        /// Group.
        group: String,
    },
    /// Materialize a point into scratch targets.
    TestFailover {
        /// Group.
        group: String,
        /// Point.
        point: String,
        /// Targets by disk.
        to: BTreeMap<String, PathBuf>,
    },
    /// Remove what test failovers made.
    TestCleanup {
        /// Group.
        group: String,
    },
    /// Commit a failover.
    Commit {
        /// Group.
        group: String,
    },
    /// Replicate the failed-back disks the other way.
    Reprotect {
        /// Group.
        group: String,
        /// Process server address.
        process_server: String,
        /// Name of the agent that will run here.
        agent_name: String,
    },
    /// Take a failed-back group back as a replication target.
    Protect {
        /// Group.
        group: String,
    },
}

/// One line of the daemon's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Reply {
    /// Progress or a line.
    Event(Event),
    /// Finished; the result.
    Done(serde_json::Value),
    /// Failed; why.
    Failed(String),
}

/// The socket's path.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Serves the control socket until the task is dropped.
pub async fn serve(
    state_dir: &Path,
    site: Arc<Site>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(state_dir);
    match std::fs::remove_file(&path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("removing the old {}", path.display())),
    }
    let listener = tokio::net::UnixListener::bind(&path)
        .with_context(|| format!("binding the control socket {}", path.display()))?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("chmod {}", path.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    let site = site.clone();
                    tokio::spawn(async move {
                        if let Err(e) = connection(stream, site).await {
                            warn!(error = %format!("{e:#}"), "control connection failed");
                        }
                    });
                }
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    }))
}

async fn connection(stream: tokio::net::UnixStream, site: Arc<Site>) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
    // Bytes, not a String: a line that is not UTF-8 is answered like any other
    // malformed request instead of dropping the connection unanswered.
    let mut line = Vec::new();
    reader
        .read_until(b'\n', &mut line)
        .await
        .context("reading the request")?;
    let request: Request = match serde_json::from_slice(&line) {
        Ok(r) => r,
        Err(e) => {
            let reply = Reply::Failed(format!("malformed request: {e}"));
            write.write_all(&line_of(&reply)).await?;
            return Ok(());
        }
    };
    info!(?request, "operator request");
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let action = tokio::spawn(async move { run(&site, request, &tx).await });
    // Events until the action ends and drops its sender; the client may go away.
    let mut client_gone = false;
    while let Some(ev) = rx.recv().await {
        if !client_gone && write.write_all(&line_of(&Reply::Event(ev))).await.is_err() {
            client_gone = true;
        }
    }
    let reply = match action.await {
        Ok(Ok(v)) => Reply::Done(v),
        Ok(Err(e)) => Reply::Failed(format!("{e:#}")),
        Err(e) => Reply::Failed(format!("the action failed: {e}")),
    };
    if let Reply::Failed(e) = &reply {
        warn!(error = %e, "operator request failed");
    }
    if !client_gone {
        write.write_all(&line_of(&reply)).await?;
    }
    Ok(())
}

fn line_of(reply: &Reply) -> Vec<u8> {
    let mut v = serde_json::to_vec(reply).unwrap_or_else(|_| b"{\"failed\":\"encode\"}".to_vec());
    v.push(b'\n');
    v
}

impl Request {
    /// The group the request acts on.
    pub fn group(&self) -> &str {
        match self {
            Request::Failover { group, .. }
            | Request::Cancel { group }
            | Request::TestFailover { group, .. }
            | Request::TestCleanup { group }
            | Request::Commit { group }
            | Request::Reprotect { group, .. }
            | Request::Protect { group } => group,
        }
    }
}

/// Runs a request; a failure is also kept as the group's last error (`status`).
async fn run(
    site: &Site,
    request: Request,
    ev: &crate::failover::Events,
) -> anyhow::Result<serde_json::Value> {
    let group = request.group().to_string();
    let result = act(site, request, ev).await;
    if let Err(e) = &result {
        let known = site.disks.all().iter().any(|d| d.record().group == group);
        if known {
            let msg = format!("{e:#}");
            if let Err(e2) = site.groups.update(&group, |r| r.last_error = Some(msg)) {
                warn!(error = %format!("{e2:#}"), "could not record the group's last error");
            }
        }
    }
    result
}

async fn act(
    site: &Site,
    request: Request,
    ev: &crate::failover::Events,
) -> anyhow::Result<serde_json::Value> {
    let v = match request {
        Request::Failover { group, point, to } => {
            let choice: PointChoice = point.parse().map_err(anyhow::Error::msg)?;
            serde_json::to_value(site.failover(&group, choice, to, ev).await?)?
        }
        Request::Cancel { group } => {
            site.cancel(&group, ev).await?;
            serde_json::json!({ "group": group, "state": "protected" })
        }
        Request::TestFailover { group, point, to } => {
            let choice: PointChoice = point.parse().map_err(anyhow::Error::msg)?;
            serde_json::to_value(site.test_failover(&group, choice, to, ev).await?)?
        }
        Request::TestCleanup { group } => {
            site.test_cleanup(&group, ev).await?;
            serde_json::json!({ "group": group })
        }
        Request::Commit { group } => {
            site.commit(&group, ev).await?;
            serde_json::json!({ "group": group, "state": "failed-back" })
        }
        Request::Reprotect {
            group,
            process_server,
            agent_name,
        } => {
            let paths = site
                .reprotect(&group, &process_server, &agent_name, ev)
                .await?;
            serde_json::json!({ "group": group, "state": "reprotecting", "agent_configs": paths })
        }
        Request::Protect { group } => {
            site.protect(&group, ev).await?;
            serde_json::json!({ "group": group, "state": "protected" })
        }
    };
    Ok(v)
}

/// Sends `request` to the daemon of `state_dir` and follows it to the end: lines go to
/// stdout (stderr with `json`), progress to a terminal's stderr. Returns the result.
pub fn call(state_dir: &Path, request: &Request, json: bool) -> anyhow::Result<serde_json::Value> {
    let path = socket_path(state_dir);
    let stream = std::os::unix::net::UnixStream::connect(&path).map_err(|e| {
        anyhow!(
            "cannot reach the master target daemon at {} ({e}): start `boomerang-mt run --state-dir {}` first",
            path.display(),
            state_dir.display()
        )
    })?;
    let mut w = stream.try_clone().context("control socket")?;
    let mut req = serde_json::to_vec(request)?;
    req.push(b'\n');
    w.write_all(&req).context("sending the request")?;
    let tty = std::io::stderr().is_terminal();
    let mut drawn = false;
    for line in BufReader::new(stream).lines() {
        let line = line.context("reading the daemon's answer")?;
        let reply: Reply = serde_json::from_str(&line)
            .with_context(|| format!("the daemon answered something unreadable: {line}"))?;
        match reply {
            Reply::Event(Event::Progress {
                disk,
                phase,
                done,
                total,
            }) => {
                let pct = done.saturating_mul(100).checked_div(total).unwrap_or(100);
                if tty {
                    eprint!(
                        "\r{disk}: {phase} {pct:>3}% ({} of {})   ",
                        crate::status::human(done),
                        crate::status::human(total)
                    );
                    drawn = true;
                    if done >= total {
                        eprintln!();
                        drawn = false;
                    }
                } else if done >= total {
                    eprintln!("{disk}: {phase} done ({})", crate::status::human(total));
                }
            }
            Reply::Event(Event::Line(l)) => {
                if drawn {
                    eprintln!();
                    drawn = false;
                }
                if json {
                    eprintln!("{l}");
                } else {
                    println!("{l}");
                }
            }
            Reply::Done(v) => return Ok(v),
            Reply::Failed(e) => bail!("{e}"),
        }
    }
    bail!("the master target closed the control connection before answering; see its log and `boomerang-mt status`")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disks::Disks;
    use crate::groups::Groups;

    async fn ask(path: &Path, line: &[u8]) -> Reply {
        let mut s = tokio::net::UnixStream::connect(path)
            .await
            .expect("connect");
        s.write_all(line).await.expect("send");
        let mut lines = tokio::io::BufReader::new(s).lines();
        let mut last = None;
        while let Some(l) = lines.next_line().await.expect("read") {
            last = Some(serde_json::from_str(&l).expect("a reply line"));
        }
        last.expect("an answer")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn malformed_requests_are_answered_and_the_socket_keeps_serving() {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let disks = Disks::open(&state, &dir.path().join("ret"), 1 << 20, Default::default())
            .expect("disks");
        let site = Arc::new(Site {
            disks: Arc::new(disks),
            groups: Arc::new(Groups::open(&state).expect("groups")),
            drain_timeout: std::time::Duration::from_secs(1),
        });
        let task = serve(&state, site).await.expect("serve");
        let path = socket_path(&state);
        for bad in [&b"not json\n"[..], b"{\"op\":\"explode\"}\n", b"\xff\xfe\n"] {
            match ask(&path, bad).await {
                Reply::Failed(why) => assert!(why.contains("malformed"), "{why}"),
                other => panic!("{other:?}"),
            }
        }
        // A well-formed request for an unknown group fails with a reason, no panic.
        match ask(&path, b"{\"op\":\"commit\",\"group\":\"nobody\"}\n").await {
            Reply::Failed(why) => assert!(why.contains("nobody"), "{why}"),
            other => panic!("{other:?}"),
        }
        task.abort();
    }
}
