//! What the campaign can break, and how a seed picks it.

use crate::rng::DataRng;

/// A role of the three.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    /// The agent (its journal and state).
    Agent,
    /// The process server (its spool).
    Ps,
    /// The master target (replica, undo journal, state).
    Mt,
}

impl Role {
    /// Its short name.
    pub fn name(self) -> &'static str {
        match self {
            Role::Agent => "agent",
            Role::Ps => "ps",
            Role::Mt => "mt",
        }
    }
}

/// One fault of a round.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The role is restarted with this `BOOMERANG_FAULTS` rule armed: the n-th call at
    /// a storage site fails (ENOSPC, EIO, short write) or kills the process before or
    /// after the call.
    Storage {
        /// Whose storage.
        role: Role,
        /// `site@n=fault`.
        rule: String,
    },
    /// SIGKILL: the page cache survives.
    Kill(Role),
    /// SIGKILL, then every write of the role's state not yet fsynced is dropped (all
    /// of them, or a seeded subset): a power cut of the role's machine.
    PowerCut {
        /// Whose state.
        role: Role,
        /// Keep a seeded subset of the unsynced writes (else drop them all).
        keep_some: bool,
    },
    /// SIGTERM of the process server while the agent streams to it, then a start.
    PsRestart,
}

impl Fault {
    /// The kind, for the per-kind counts: `storage`, `kill`, `power-cut`, `ps-restart`.
    pub fn kind(&self) -> &'static str {
        match self {
            Fault::Storage { .. } => "storage",
            Fault::Kill(_) => "kill",
            Fault::PowerCut { .. } => "power-cut",
            Fault::PsRestart => "ps-restart",
        }
    }

    /// The role it hits.
    pub fn role(&self) -> Role {
        match self {
            Fault::Storage { role, .. } | Fault::Kill(role) | Fault::PowerCut { role, .. } => *role,
            Fault::PsRestart => Role::Ps,
        }
    }
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Storage { role, rule } => write!(f, "{} {rule}", role.name()),
            Fault::Kill(role) => write!(f, "kill -9 {}", role.name()),
            Fault::PowerCut { role, keep_some } => write!(
                f,
                "power cut {} ({})",
                role.name(),
                if *keep_some {
                    "a seeded subset of unsynced writes kept"
                } else {
                    "every unsynced write dropped"
                }
            ),
            Fault::PsRestart => write!(f, "ps restarted with records in flight"),
        }
    }
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `kill ROLE`, `cut ROLE` (every unsynced write dropped), `cut-some ROLE` (a
    /// seeded subset kept), `ps-restart`, or `ROLE site@n=fault` (a storage rule).
    fn from_str(s: &str) -> Result<Fault, String> {
        let role = |r: &str| match r {
            "agent" => Ok(Role::Agent),
            "ps" => Ok(Role::Ps),
            "mt" => Ok(Role::Mt),
            other => Err(format!("unknown role {other:?} (agent, ps, mt)")),
        };
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["ps-restart"] => Ok(Fault::PsRestart),
            ["kill", r] => Ok(Fault::Kill(role(r)?)),
            ["cut", r] => Ok(Fault::PowerCut {
                role: role(r)?,
                keep_some: false,
            }),
            ["cut-some", r] => Ok(Fault::PowerCut {
                role: role(r)?,
                keep_some: true,
            }),
            [r, rule] if rule.contains('@') && rule.contains('=') => Ok(Fault::Storage {
                role: role(r)?,
                rule: (*rule).to_string(),
            }),
            _ => Err(format!(
                "cannot read fault {s:?}: kill ROLE, cut ROLE, cut-some ROLE, ps-restart or ROLE site@n=fault"
            )),
        }
    }
}

// Storage sites each role reaches while it streams and takes points.
const AGENT_SITES: &[&str] = &["journal.write", "journal.sync", "state.write", "state.sync"];
const PS_SITES: &[&str] = &["spool.write", "spool.sync", "spool.remove", "spool.create"];
const MT_SITES: &[&str] = &[
    "replica.write",
    "replica.sync",
    "undo.write",
    "undo.sync",
    "state.write",
    "state.sync",
];
const STORAGE_FAULTS: &[&str] = &["enospc", "eio", "short", "crash", "crash-after"];
const ROLES: [Role; 3] = [Role::Agent, Role::Ps, Role::Mt];

fn pick<'a, T>(rng: &mut DataRng, from: &'a [T]) -> &'a T {
    &from[usize::try_from(rng.below(from.len() as u64)).unwrap_or(0)]
}

/// The fault of the next round.
pub fn choose(rng: &mut DataRng) -> Fault {
    match rng.below(10) {
        0..=3 => {
            let role = *pick(rng, &ROLES);
            let sites = match role {
                Role::Agent => AGENT_SITES,
                Role::Ps => PS_SITES,
                Role::Mt => MT_SITES,
            };
            let site = *pick(rng, sites);
            // A round writes a few MiB: a handful of calls at each site.
            let nth = if site.ends_with(".write") || site.ends_with(".sync") {
                rng.between(1, 8)
            } else {
                rng.between(1, 2)
            };
            Fault::Storage {
                role,
                rule: format!("{site}@{nth}={}", pick(rng, STORAGE_FAULTS)),
            }
        }
        4..=5 => Fault::Kill(*pick(rng, &ROLES)),
        6..=8 => Fault::PowerCut {
            role: *pick(rng, &ROLES),
            keep_some: rng.below(2) == 1,
        },
        _ => Fault::PsRestart,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_read_from_their_short_forms() {
        let read = |s: &str| s.parse::<Fault>();
        assert_eq!(read("kill mt"), Ok(Fault::Kill(Role::Mt)));
        assert_eq!(read("ps-restart"), Ok(Fault::PsRestart));
        assert_eq!(
            read("cut-some agent"),
            Ok(Fault::PowerCut {
                role: Role::Agent,
                keep_some: true
            })
        );
        assert_eq!(
            read(" mt  replica.sync@1=enospc "),
            Ok(Fault::Storage {
                role: Role::Mt,
                rule: "replica.sync@1=enospc".into()
            })
        );
        assert!(read("kill db").is_err());
        assert!(read("mt replica.sync").is_err());
    }
}
