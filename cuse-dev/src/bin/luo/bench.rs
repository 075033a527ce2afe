//! `luo bench`: a run, a two-stage run across a kexec, or a comparison of
//! logged runs side by side.

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::tools::bench::{self, Plan};

use crate::{fail, print_json};

pub fn bench(
    device: &Path,
    plan: &Plan,
    json: bool,
    stage: Option<u32>,
    session: Option<String>,
) -> ExitCode {
    let report = match (stage, session) {
        (Some(1), tag) => bench::stage1(device, plan, tag.as_deref(), true),
        (Some(_), Some(tag)) => bench::stage2(device, plan, &tag),
        (Some(_), None) => {
            eprintln!("luo: bench --stage 2 needs --session, the name stage 1 used");
            return ExitCode::FAILURE;
        }
        (None, _) => {
            return match bench::run(device, plan) {
                Ok(rows) if json => {
                    println!("{}", serde_json::to_string(&rows).expect("rows serialize"));
                    ExitCode::SUCCESS
                }
                Ok(rows) => {
                    bench::print(&rows, device);
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            };
        }
    };
    match report {
        Ok(r) => print_json(&r),
        Err(e) => fail(&e),
    }
}

/// `--scale` (the table, or JSON), or its measuring side (`--scale-stage`).
pub fn scale(
    device: &Path,
    (counts, stage_counts): (&[usize], &[usize]),
    calls: usize,
    json: bool,
) -> ExitCode {
    use luo_cuse_dev::tools::bench::scale;
    if !stage_counts.is_empty() {
        return match scale::stage(device, stage_counts, calls) {
            Ok(steps) => print_json(&steps),
            Err(e) => fail(&e),
        };
    }
    match scale::run(device, counts, calls) {
        Ok(steps) if json => print_json(&steps),
        Ok(steps) => {
            scale::print(&steps);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

pub fn compare(log: &Path) -> ExitCode {
    let text = match std::fs::read_to_string(log) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("luo: cannot read {}: {e}", log.display());
            return ExitCode::FAILURE;
        }
    };
    match bench::read_log(&text) {
        Ok(runs) if runs.is_empty() => {
            eprintln!("luo: {} holds no BENCH lines", log.display());
            ExitCode::FAILURE
        }
        Ok(runs) => {
            print!("{}", bench::side_by_side(&runs));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("luo: a BENCH line of {} does not parse: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}
