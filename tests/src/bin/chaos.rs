//! `chaos --seed S --faults N [--disk-mib M]`: the seeded fault campaign of
//! [`boomerang_tests::chaos`]; exits 1 when a point was wrong. Needs root and FUSE.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut seed = 7u64;
    let mut faults = 20u64;
    let mut disk_mib = 32u64;
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().and_then(|v| v.parse::<u64>().ok());
        match (flag.as_str(), value) {
            ("--seed", Some(v)) => seed = v,
            ("--faults", Some(v)) => faults = v,
            ("--disk-mib", Some(v)) if v >= 4 => disk_mib = v,
            _ => {
                eprintln!("usage: chaos [--seed S] [--faults N] [--disk-mib M (>= 4)]");
                return ExitCode::from(2);
            }
        }
    }
    match boomerang_tests::chaos::run(seed, faults, disk_mib) {
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
