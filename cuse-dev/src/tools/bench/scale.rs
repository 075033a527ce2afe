//! `luo bench --scale 10,1000,10000`: the per-call rows again with N
//! sessions already held, and PRESERVE_FD into a session already holding
//! [`BIG_SESSION`] files, to show that a call's cost does not grow with
//! what the daemon holds.
//!
//! One process under `luo run` does it all: it creates the background
//! sessions (empty: files in them would only add fds, and these machines
//! cap `RLIMIT_NOFILE` at 20 000) up to each N in turn, then times the rows;
//! the sessions a row creates are closed (and so dropped) before the next N.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;

use super::timer::{pct, Floor, Row, Timer};
use super::{create, ioctl, memfd};
use crate::client::run::daemon_socket;
use crate::uapi::{self, FdArgs, GetNameArgs};

/// Files of the session the last row preserves into.
pub const BIG_SESSION: usize = 2000;

/// The rows measured with `n` sessions held.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Step {
    /// Sessions held (besides the ones the rows make).
    pub sessions: usize,
    /// The rows.
    pub rows: Vec<Row>,
}

/// Runs [`stage`] under `luo run` and prints the table.
///
/// # Errors
/// The stage failed, or its report does not parse.
pub fn run(device: &Path, counts: &[usize], calls: usize) -> std::io::Result<Vec<Step>> {
    if counts.windows(2).any(|w| w[0] >= w[1]) {
        return Err(std::io::Error::other(
            "--scale takes session counts in increasing order, e.g. 10,1000,10000",
        ));
    }
    let list: Vec<String> = counts.iter().map(usize::to_string).collect();
    let args = [
        "bench".into(),
        "--device".into(),
        device.to_string_lossy().into_owned(),
        "--calls".into(),
        calls.to_string(),
        "--scale-stage".into(),
        list.join(","),
    ];
    crate::tools::under_luo_run(device, &args, "the scale stage")
}

/// The measuring side, under `luo run`: for each count, background
/// sessions up to it, then the rows.
///
/// # Errors
/// A call failed.
pub fn stage(device: &Path, counts: &[usize], calls: usize) -> std::io::Result<Vec<Step>> {
    crate::sys::raise_fd_limit();
    let dev = File::options().read(true).write(true).open(device)?;
    let timer = Timer {
        dev: &dev,
        socket: daemon_socket(device).ok(),
    };
    let tag = format!("scale-{}", std::process::id());
    let mut held: Vec<File> = Vec::new();
    let mut steps = Vec::new();
    for &n in counts {
        while held.len() < n {
            let name = format!("{tag}-bg-{}", held.len());
            held.push(create(&dev, &name, uapi::CREATE_SESSION)?);
        }
        eprintln!("luo bench --scale: {n} sessions held; timing {calls} calls per row");
        steps.push(Step {
            sessions: n,
            rows: rows(&timer, &format!("{tag}-{n}"), calls)?,
        });
    }
    Ok(steps)
}

/// CREATE_SESSION, GET_NAME, PRESERVE_FD into a new session and into one
/// holding [`BIG_SESSION`] files; every session made here is closed after.
fn rows(timer: &Timer<'_>, tag: &str, calls: usize) -> std::io::Result<Vec<Row>> {
    let dev = timer.dev;
    let mut made = Vec::with_capacity(calls);
    let mut i = 0;
    let mut rows = vec![timer.timed(("CREATE_SESSION", Floor::Trapped), calls, || {
        i += 1;
        made.push(create(dev, &format!("{tag}-c{i}"), uapi::CREATE_SESSION)?);
        Ok(())
    })?];
    drop(made);
    let session = create(dev, &format!("{tag}-small"), uapi::CREATE_SESSION)?;
    rows.push(timer.timed(("SESSION_GET_NAME", Floor::Fuse), calls, || {
        let mut a = GetNameArgs {
            size: 72,
            reserved: 0,
            name: [0; 64],
        };
        ioctl(&session, uapi::GET_NAME, &mut a)
    })?);
    let mut token = 0;
    rows.push(preserve_row(
        timer,
        &session,
        &mut token,
        calls,
        "SESSION_PRESERVE_FD",
    )?);
    let big = create(dev, &format!("{tag}-big"), uapi::CREATE_SESSION)?;
    let mut token = 0;
    for _ in 0..BIG_SESSION {
        preserve(&big, &mut token)?;
    }
    let op = "SESSION_PRESERVE_FD, 2000 files in the session";
    rows.push(preserve_row(timer, &big, &mut token, calls, op)?);
    Ok(rows)
}

fn preserve_row(
    timer: &Timer<'_>,
    session: &File,
    token: &mut u64,
    calls: usize,
    op: &'static str,
) -> std::io::Result<Row> {
    timer.timed((op, Floor::Fuse), calls, || preserve(session, token))
}

/// Preserves a fresh empty memfd at the next token.
fn preserve(session: &File, token: &mut u64) -> std::io::Result<()> {
    let file = memfd()?;
    let mut a = FdArgs {
        size: 16,
        fd: file.as_raw_fd(),
        token: *token,
    };
    *token += 1;
    ioctl(session, uapi::PRESERVE_FD, &mut a)
}

/// Prints one table: each row's p50 at each count, and its ratio to its
/// floor's p50 in the same step.
pub fn print(steps: &[Step]) {
    let Some(first) = steps.first() else { return };
    print!("| p50 µs (× its floor) |");
    for s in steps {
        print!(" {} sessions |", s.sessions);
    }
    println!();
    println!("|---|{}", "---:|".repeat(steps.len()));
    for (i, row) in first.rows.iter().enumerate() {
        print!("| {} |", row.op);
        for s in steps {
            let r = &s.rows[i];
            let p50 = pct(&r.micros, 0.5);
            print!(" {p50:.1} ({:.2}) |", p50 / pct(&r.floor, 0.5));
        }
        println!();
    }
}
