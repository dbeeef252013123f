//! `chaos --seed S --faults N [--disk-mib M] [--plan "F; F; ..." [--repeat R]]`: the
//! seeded fault campaign of [`boomerang_tests::chaos`]; exits 1 when a point was
//! wrong. `--plan` injects the listed faults first (see `Fault`'s `FromStr`: `kill
//! mt`, `cut ps`, `cut-some agent`, `ps-restart`, `mt replica.sync@1=enospc`), `R`
//! times over, to chase one sequence; the seed picks the rest. Needs root and FUSE.
//!
//! `chaos minute --source intercept|trace [--seed S] [--secs N] [--disk-mib M]`: the
//! minute of process-server and master-target kills under ext4 of
//! [`boomerang_tests::chaos::minute`]; exits 1 when a point was wrong (the trace
//! source also needs loop devices and tracefs).

use std::process::ExitCode;

use boomerang_tests::chaos::faults::Fault;

const USAGE: &str =
    "usage: chaos [--seed S] [--faults N] [--disk-mib M (>= 4)] [--plan \"F; F\" [--repeat R]]";

const MINUTE_USAGE: &str =
    "usage: chaos minute --source intercept|trace [--seed S] [--secs N] [--disk-mib M (>= 32)]";

fn main() -> ExitCode {
    if std::env::args().nth(1).as_deref() == Some("minute") {
        return minute(std::env::args().skip(2));
    }
    let mut seed = 7u64;
    let mut faults = 20u64;
    let mut disk_mib = 32u64;
    let mut plan: Vec<Fault> = Vec::new();
    let mut repeat = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        };
        let number = value.parse::<u64>().ok();
        match (flag.as_str(), number) {
            ("--seed", Some(v)) => seed = v,
            ("--faults", Some(v)) => faults = v,
            ("--disk-mib", Some(v)) if v >= 4 => disk_mib = v,
            ("--repeat", Some(v)) if v >= 1 => repeat = usize::try_from(v).unwrap_or(1),
            ("--plan", _) => {
                for f in value.split(';').map(str::trim).filter(|f| !f.is_empty()) {
                    match f.parse() {
                        Ok(f) => plan.push(f),
                        Err(e) => {
                            eprintln!("chaos: {e}");
                            return ExitCode::from(2);
                        }
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let planned: Vec<Fault> = plan
        .iter()
        .cloned()
        .cycle()
        .take(plan.len() * repeat)
        .collect();
    match boomerang_tests::chaos::run_planned(seed, planned, faults, disk_mib) {
        Ok(summary) => {
            println!("{}", summary.details());
            println!("{summary}");
            if summary.wrong > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("chaos: seed {seed}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn minute(mut args: impl Iterator<Item = String>) -> ExitCode {
    use boomerang_tests::chaos::minute::{self, MinuteOptions, Source};
    let mut opts = MinuteOptions::new(Source::Intercept, 9);
    while let Some(flag) = args.next() {
        let Some(value) = args.next() else {
            eprintln!("{MINUTE_USAGE}");
            return ExitCode::from(2);
        };
        let number = value.parse::<u64>().ok();
        match (flag.as_str(), number) {
            ("--seed", Some(v)) => opts.seed = v,
            ("--secs", Some(v)) if v >= 5 => opts.duration = std::time::Duration::from_secs(v),
            ("--disk-mib", Some(v)) if v >= 32 => opts.disk_mib = v,
            ("--source", _) => match value.parse() {
                Ok(s) => opts.source = s,
                Err(e) => {
                    eprintln!("chaos minute: {e}");
                    return ExitCode::from(2);
                }
            },
            _ => {
                eprintln!("{MINUTE_USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    match minute::run(&opts) {
        Ok(report) => {
            for w in &report.wrong {
                println!("wrong: {w}");
            }
            println!("kills: {:?}", report.kills);
            println!("{report}");
            if report.wrong.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("chaos minute: seed {}: {e:#}", opts.seed);
            ExitCode::FAILURE
        }
    }
}
