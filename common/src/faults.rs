//! Failure points at the storage seam: every write, fsync, truncate, rename, create,
//! remove and directory fsync that [`crate::storage`] performs passes a *site* named
//! `<scope>.<op>` (for example `spool.write`, `undo.sync`, `state.write`,
//! `replica.sync`, `atomic.rename`), and a test can make the n-th call at a site fail.
//!
//! Injection is compiled in only with the `faults` feature of this crate (the tests
//! crate turns it on, so the binaries the tests run carry it; a product build with
//! `cargo build -p boomerang-agent -p boomerang-ps -p boomerang-mt` does not). Without
//! the feature [`check`] is an inline no-op and arming anything is refused.
//!
//! A rule is written `SITE@N=FAULT[*TIMES]`:
//! - `SITE`: `scope.op`, where either part may be `*` (`*.sync`, `spool.*`).
//! - `N`: the rule fires on the n-th matching call (1-based) and on the `TIMES - 1`
//!   calls after it (`TIMES` defaults to 1; `*` alone means for ever).
//! - `FAULT`: `enospc`, `eio` (the call fails before touching the file), `short` (a
//!   write stores the first half of its bytes, then fails with ENOSPC; other ops fail
//!   with EIO), `crash` (the process is killed with SIGKILL before the call) or
//!   `crash-after` (killed right after the call succeeded).
//!
//! Rules come from the environment variable `BOOMERANG_FAULTS` (rules separated by
//! `;`, read once, for whole binaries) or from [`arm`] / [`arm_under`] in unit tests;
//! [`arm_under`] limits a rule to files below one directory, so tests running in
//! parallel threads of one process do not see each other's faults.

use std::path::{Path, PathBuf};

/// The kind of storage operation at a site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating a file or directory.
    Create,
    /// Writing bytes (also punching holes).
    Write,
    /// fsync / fdatasync of a file.
    Sync,
    /// Changing a file's length.
    Truncate,
    /// Renaming.
    Rename,
    /// fsync of a directory.
    DirSync,
    /// Removing a file.
    Remove,
    /// Reading a source disk (the agent's sites `source.read` and `capture.read`).
    Read,
}

impl Op {
    /// The op's name in a site.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Write => "write",
            Op::Sync => "sync",
            Op::Truncate => "truncate",
            Op::Rename => "rename",
            Op::DirSync => "dirsync",
            Op::Remove => "remove",
            Op::Read => "read",
        }
    }

    /// Every op, for campaigns that pick one.
    pub const ALL: [Op; 8] = [
        Op::Create,
        Op::Write,
        Op::Sync,
        Op::Truncate,
        Op::Rename,
        Op::DirSync,
        Op::Remove,
        Op::Read,
    ];
}

/// What an armed site does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fail with ENOSPC, touching nothing.
    NoSpace,
    /// Fail with EIO, touching nothing.
    Eio,
    /// A write stores half its bytes, then fails with ENOSPC; other ops fail with EIO.
    Short,
    /// SIGKILL before the call.
    Crash,
    /// SIGKILL right after the call.
    CrashAfter,
}

impl Fault {
    fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "enospc" => Fault::NoSpace,
            "eio" => Fault::Eio,
            "short" => Fault::Short,
            "crash" => Fault::Crash,
            "crash-after" => Fault::CrashAfter,
            other => {
                return Err(format!(
                    "unknown fault {other:?} (enospc, eio, short, crash, crash-after)"
                ))
            }
        })
    }

    /// The rule syntax's name of this fault.
    pub fn name(self) -> &'static str {
        match self {
            Fault::NoSpace => "enospc",
            Fault::Eio => "eio",
            Fault::Short => "short",
            Fault::Crash => "crash",
            Fault::CrashAfter => "crash-after",
        }
    }

    /// The OS error an injected failure returns.
    pub fn error(self) -> std::io::Error {
        std::io::Error::from_raw_os_error(match self {
            Fault::NoSpace | Fault::Short => libc::ENOSPC,
            _ => libc::EIO,
        })
    }
}

/// One parsed rule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Scope part of the site (`*` for any).
    pub scope: String,
    /// Op part of the site (`None` for any).
    pub op: Option<Op>,
    /// Fires from the n-th matching call (1-based).
    pub nth: u64,
    /// How many calls it fires for (`None`: for ever).
    pub times: Option<u64>,
    /// What it does.
    pub fault: Fault,
    /// Only files below this directory match.
    pub under: Option<PathBuf>,
}

impl Rule {
    /// Parses `SITE@N=FAULT[*TIMES]` (see the module doc).
    pub fn parse(spec: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("fault rule {spec:?}: {why} (expected SITE@N=FAULT[*TIMES])");
        let (site, rest) = spec.trim().split_once('@').ok_or_else(|| bad("no @"))?;
        let (nth, fault) = rest.split_once('=').ok_or_else(|| bad("no ="))?;
        let (fault, times) = match fault.split_once('*') {
            Some((f, "")) => (f, None),
            Some((f, t)) => (
                f,
                Some(t.parse::<u64>().map_err(|_| bad("TIMES is not a number"))?),
            ),
            None => (fault, Some(1)),
        };
        let (scope, op) = site
            .split_once('.')
            .ok_or_else(|| bad("SITE is not scope.op"))?;
        let op = match op {
            "*" => None,
            name => Some(
                Op::ALL
                    .into_iter()
                    .find(|o| o.name() == name)
                    .ok_or_else(|| bad("unknown op"))?,
            ),
        };
        let nth = nth.parse::<u64>().map_err(|_| bad("N is not a number"))?;
        if nth == 0 || scope.is_empty() || times == Some(0) {
            return Err(bad("N and TIMES start at 1, the scope is not empty"));
        }
        Ok(Rule {
            scope: scope.to_string(),
            op,
            nth,
            times,
            fault: Fault::parse(fault).map_err(|e| bad(&e))?,
            under: None,
        })
    }

    /// The rule in its own syntax.
    pub fn spec(&self) -> String {
        let times = match self.times {
            Some(1) => String::new(),
            Some(t) => format!("*{t}"),
            None => "*".into(),
        };
        format!(
            "{}.{}@{}={}{times}",
            self.scope,
            self.op.map_or("*", Op::name),
            self.nth,
            self.fault.name()
        )
    }

    #[cfg(feature = "faults")]
    fn matches(&self, scope: &str, op: Op, path: &Path) -> bool {
        (self.scope == "*" || self.scope == scope)
            && self.op.is_none_or(|o| o == op)
            && self.under.as_ref().is_none_or(|d| path.starts_with(d))
    }
}

/// Parses `;`-separated rules.
pub fn parse_rules(specs: &str) -> Result<Vec<Rule>, String> {
    specs
        .split(';')
        .filter(|s| !s.trim().is_empty())
        .map(Rule::parse)
        .collect()
}

/// Whether this build carries fault injection.
pub const fn compiled_in() -> bool {
    cfg!(feature = "faults")
}

/// The environment variable rules are read from.
pub const ENV: &str = "BOOMERANG_FAULTS";

/// Checks `BOOMERANG_FAULTS` at start-up: every binary calls this first, so a rule
/// that cannot take effect (a build without the feature, a typo) stops the process
/// with a clear message instead of a campaign that injects nothing.
pub fn init_from_env() -> Result<(), String> {
    let Ok(specs) = std::env::var(ENV) else {
        return Ok(());
    };
    if specs.trim().is_empty() {
        return Ok(());
    }
    let rules = parse_rules(&specs)?;
    if !compiled_in() {
        return Err(format!(
            "{ENV} is set but this build has no fault injection: build with \
             `--features boomerang-common/faults` (the tests crate does)"
        ));
    }
    imp::install_env(rules);
    Ok(())
}

/// A rule armed by [`arm`] or [`arm_under`]; dropping it disarms the rule.
#[derive(Debug)]
pub struct Armed {
    #[cfg_attr(not(feature = "faults"), allow(dead_code))]
    id: u64,
}

impl Armed {
    /// How many calls the rule has failed so far.
    pub fn fired(&self) -> u64 {
        imp::fired(self.id)
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        imp::disarm(self.id);
    }
}

/// Arms one rule for the whole process.
pub fn arm(spec: &str) -> Result<Armed, String> {
    let rule = Rule::parse(spec)?;
    imp::arm(rule).map(|id| Armed { id })
}

/// Arms one rule for files below `dir` only.
pub fn arm_under(dir: &Path, spec: &str) -> Result<Armed, String> {
    let mut rule = Rule::parse(spec)?;
    rule.under = Some(dir.to_path_buf());
    imp::arm(rule).map(|id| Armed { id })
}

/// Consults the armed rules for one call at `scope.op` on `path`: `Some(fault)` when
/// one fires. Crash faults that fire before the call never return.
#[inline]
pub fn check(scope: &str, op: Op, path: &Path) -> Option<Fault> {
    imp::check(scope, op, path)
}

/// Called after a call succeeded: kills the process when a `crash-after` rule fired.
#[inline]
pub fn after(fault: Option<Fault>) {
    if fault == Some(Fault::CrashAfter) {
        imp::die("crash-after");
    }
}

#[cfg(feature = "faults")]
mod imp {
    use std::path::Path;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Mutex, MutexGuard, OnceLock};

    use super::{Fault, Op, Rule};

    struct Slot {
        id: u64,
        rule: Rule,
        seen: u64,
        fired: u64,
    }

    static ANY: AtomicBool = AtomicBool::new(false);
    static NEXT_ID: AtomicU64 = AtomicU64::new(1);

    fn slots() -> MutexGuard<'static, Vec<Slot>> {
        static SLOTS: OnceLock<Mutex<Vec<Slot>>> = OnceLock::new();
        SLOTS
            .get_or_init(|| Mutex::new(Vec::new()))
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn install_env(rules: Vec<Rule>) {
        for rule in rules {
            tracing::warn!(rule = %rule.spec(), "fault injection armed");
            let _ = arm(rule);
        }
    }

    pub(super) fn arm(rule: Rule) -> Result<u64, String> {
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        let mut s = slots();
        s.push(Slot {
            id,
            rule,
            seen: 0,
            fired: 0,
        });
        ANY.store(true, Ordering::SeqCst);
        Ok(id)
    }

    pub(super) fn disarm(id: u64) {
        let mut s = slots();
        s.retain(|slot| slot.id != id);
        if s.is_empty() {
            ANY.store(false, Ordering::SeqCst);
        }
    }

    pub(super) fn fired(id: u64) -> u64 {
        slots().iter().find(|s| s.id == id).map_or(0, |s| s.fired)
    }

    pub(super) fn die(why: &str) -> ! {
        eprintln!("fault injection: {why}: SIGKILL");
        // SAFETY: kill(2) on our own pid with a constant signal; no memory involved.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort()
    }

    pub(super) fn check(scope: &str, op: Op, path: &Path) -> Option<Fault> {
        if !ANY.load(Ordering::Relaxed) {
            return None;
        }
        let mut hit = None;
        for slot in slots().iter_mut() {
            if !slot.rule.matches(scope, op, path) {
                continue;
            }
            slot.seen += 1;
            let first = slot.rule.nth;
            let fires = slot.seen >= first
                && slot
                    .rule
                    .times
                    .is_none_or(|t| slot.seen < first.saturating_add(t));
            if fires && hit.is_none() {
                slot.fired += 1;
                hit = Some(slot.rule.fault);
                tracing::warn!(
                    rule = %slot.rule.spec(),
                    site = format!("{scope}.{}", op.name()),
                    path = %path.display(),
                    "fault injection fired"
                );
            }
        }
        if hit == Some(Fault::Crash) {
            die(&format!(
                "crash at {scope}.{} on {}",
                op.name(),
                path.display()
            ));
        }
        hit
    }
}

#[cfg(not(feature = "faults"))]
mod imp {
    use std::path::Path;

    use super::{Fault, Op, Rule};

    pub(super) fn install_env(_rules: Vec<Rule>) {}

    pub(super) fn arm(_rule: Rule) -> Result<u64, String> {
        Err("this build has no fault injection (feature `faults` of boomerang-common)".into())
    }

    pub(super) fn disarm(_id: u64) {}

    pub(super) fn fired(_id: u64) -> u64 {
        0
    }

    pub(super) fn die(_why: &str) -> ! {
        std::process::abort()
    }

    #[inline(always)]
    pub(super) fn check(_scope: &str, _op: Op, _path: &Path) -> Option<Fault> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_parse_and_print_back() {
        for spec in [
            "spool.write@3=short",
            "*.sync@1=eio*",
            "undo.*@2=enospc*5",
            "state.rename@7=crash-after",
        ] {
            let rule = Rule::parse(spec).expect(spec);
            assert_eq!(rule.spec(), spec);
        }
        assert_eq!(
            Rule::parse("undo.write@4=eio").expect("parses"),
            Rule {
                scope: "undo".into(),
                op: Some(Op::Write),
                nth: 4,
                times: Some(1),
                fault: Fault::Eio,
                under: None,
            }
        );
        for bad in [
            "spool.write",
            "spool@1=eio",
            "spool.flush@1=eio",
            "spool.write@0=eio",
            "spool.write@x=eio",
            "spool.write@1=boom",
            "spool.write@1=eio*0",
        ] {
            assert!(Rule::parse(bad).is_err(), "{bad} must be refused");
        }
        assert_eq!(
            parse_rules("a.write@1=eio; b.sync@2=enospc;").map(|r| r.len()),
            Ok(2)
        );
    }

    #[cfg(feature = "faults")]
    #[test]
    fn an_armed_rule_fires_on_its_calls_only() {
        let dir = Path::new("/nonexistent/faults-test");
        let armed = arm_under(dir, "t.write@2=enospc*2").expect("arm");
        let f = dir.join("f");
        let hits: Vec<Option<Fault>> = (0..5).map(|_| check("t", Op::Write, &f)).collect();
        assert_eq!(
            hits,
            vec![None, Some(Fault::NoSpace), Some(Fault::NoSpace), None, None]
        );
        assert_eq!(check("t", Op::Sync, &f), None, "other ops do not match");
        assert_eq!(
            check("t", Op::Write, Path::new("/elsewhere")),
            None,
            "other directories do not match"
        );
        assert_eq!(armed.fired(), 2);
        drop(armed);
        assert_eq!(check("t", Op::Write, &f), None, "disarmed");
    }
}
