//! `luo bench`: a run, a two-stage run across a kexec, or a comparison of
//! logged runs side by side.

use std::path::Path;
use std::process::ExitCode;

use luo_cuse_dev::tools::bench::{self, Plan};

use crate::{fail, print_json};

pub fn bench(
    device: &Path,
    plan: &Plan,
    (json, svg): (bool, Option<&Path>),
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
            let rows = match bench::run(device, plan) {
                Ok(rows) => rows,
                Err(e) => return fail(&e),
            };
            if json {
                println!("{}", serde_json::to_string(&rows).expect("rows serialize"));
            } else {
                bench::print(&rows, device);
            }
            return chart(svg, "ioctls.svg", |p| bench::charts::ioctls(&rows, p));
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
    (json, svg): (bool, Option<&Path>),
) -> ExitCode {
    use luo_cuse_dev::tools::bench::scale;
    if !stage_counts.is_empty() {
        return match scale::stage(device, stage_counts, calls) {
            Ok(steps) => print_json(&steps),
            Err(e) => fail(&e),
        };
    }
    let steps = match scale::run(device, counts, calls) {
        Ok(steps) => steps,
        Err(e) => return fail(&e),
    };
    if json {
        print_json(&steps);
    } else {
        scale::print(&steps);
    }
    chart(svg, "scale.svg", |p| bench::charts::scale(&steps, p))
}

/// Writes the chart `name` into `dir`, if one was asked for.
fn chart(
    dir: Option<&Path>,
    name: &str,
    draw: impl FnOnce(&Path) -> std::io::Result<()>,
) -> ExitCode {
    let Some(dir) = dir else {
        return ExitCode::SUCCESS;
    };
    let path = dir.join(name);
    match std::fs::create_dir_all(dir).and_then(|()| draw(&path)) {
        Ok(()) => {
            eprintln!("luo bench: wrote {}", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("luo bench: cannot write {}: {e}", path.display());
            ExitCode::FAILURE
        }
    }
}

pub fn compare(log: &Path, svg: Option<&Path>) -> ExitCode {
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
            let draw = |prefix: &'static str, name| {
                chart(svg, name, |p| bench::charts::sizes(&runs, prefix, p))
            };
            let preserve = draw("PRESERVE_FD ", "sizes-preserve.svg");
            let retrieve = draw("RETRIEVE_FD ", "sizes-retrieve.svg");
            if preserve == ExitCode::SUCCESS {
                retrieve
            } else {
                preserve
            }
        }
        Err(e) => {
            eprintln!("luo: a BENCH line of {} does not parse: {e}", log.display());
            ExitCode::FAILURE
        }
    }
}
