//! Where a bench row's time goes: the daemon's phases (see `profile`,
//! read by the timer over the control socket), beside the mean the caller measured; what
//! the daemon did not spend is the transport's (the kernel's FUSE or
//! seccomp path, scheduling, the caller's side of the syscall).

use super::timer::Row;
use crate::profile::ProfileRow;

/// The ioctl numbers of the floor calls (`profile`'s "not a LUO fd" and
/// the out-of-range command).
const FLOOR_NRS: [u8; 2] = [crate::profile::NOT_OURS, 0x3f];

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// The profile row of a bench row's own ioctl (the most frequent one that
/// is not a floor) and of its floor.
fn split(row: &Row) -> Option<(&ProfileRow, Option<&ProfileRow>)> {
    let own = row
        .daemon
        .iter()
        .filter(|p| !FLOOR_NRS.contains(&p.nr))
        .max_by_key(|p| p.calls)?;
    let floor = row
        .daemon
        .iter()
        .filter(|p| FLOOR_NRS.contains(&p.nr) && p.trapped == row.trapped)
        .max_by_key(|p| p.calls);
    Some((own, floor))
}

/// One line of the table: the caller's mean, each phase, the transport.
fn line(name: &str, caller_mean: f64, p: &ProfileRow) -> String {
    let phases: Vec<String> = p.micros.iter().map(|(_, m)| format!("{m:.1}")).collect();
    format!(
        "| {name} | {caller_mean:.1} | {} | {:.1} | {:.1} |",
        phases.join(" | "),
        p.total(),
        caller_mean - p.total()
    )
}

/// Prints the breakdown of every row that has one, as a Markdown table.
pub fn print(rows: &[Row]) {
    let Some(first) = rows.iter().find_map(|r| split(r).map(|(own, _)| own)) else {
        return;
    };
    let names: Vec<&str> = first.micros.iter().map(|(n, _)| n.as_str()).collect();
    println!();
    println!("Where the time goes (means, µs): the caller's view, the daemon's phases,");
    println!("and the rest, the transport (kernel path, scheduling, the caller's syscall).");
    println!(
        "| call | caller | {} | daemon | transport |",
        names.join(" | ")
    );
    println!("|---|---:|{}---:|---:|", "---:|".repeat(names.len()));
    for r in rows {
        let Some((own, floor)) = split(r) else {
            continue;
        };
        println!("{}", line(&r.op, mean(&r.micros), own));
        if let Some(f) = floor {
            let what = if r.trapped { "trapped" } else { "FUSE" };
            println!(
                "{}",
                line(&format!("… its {what} floor"), mean(&r.floor), f)
            );
        }
    }
}
