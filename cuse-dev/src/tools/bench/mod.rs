//! `luo bench`: one workload against any device path (the in-kernel one or
//! ours): per-call latency of each ioctl next to the floor of a no-op ioctl
//! round trip, the time to preserve and to retrieve one memfd of each size
//! (4 KiB to 1 GiB by default), and the totals for many sessions and for many
//! files in one session.
//!
//! Each measured call is paired with a floor call made right before it, so a
//! row's ratio compares the two under the same conditions (CPU placement and
//! load drift a lot on small shared machines). Rows of one sample (a size, a
//! total) have no floor.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::Path;
use std::time::Instant;

use zerocopy::{FromBytes, Immutable, IntoBytes};

mod breakdown;
pub mod charts;
pub mod scale;
mod timer;

use timer::{pct, Timer};
pub use timer::{Floor, Row};

use crate::client::ioctl as lu;
use crate::client::run::daemon_socket;
use crate::control::{self, Request};
use crate::uapi::{self, FdArgs, GetNameArgs};

fn ioctl<T: IntoBytes + FromBytes + Immutable>(
    fd: &File,
    cmd: u32,
    arg: &mut T,
) -> std::io::Result<()> {
    lu::call(fd.as_fd(), cmd, arg)
}

/// CREATE_SESSION or RETRIEVE_SESSION of `name`.
fn create(dev: &File, name: &str, cmd: u32) -> std::io::Result<File> {
    let session = if cmd == uapi::CREATE_SESSION {
        lu::create_session(dev.as_fd(), name)?
    } else {
        lu::retrieve_session(dev.as_fd(), name)?
    };
    Ok(File::from(session))
}

fn memfd() -> std::io::Result<File> {
    luo_handlers::mem::memfd("luo-bench", 0, 0)
}

/// What a bench stage reports to the orchestrator.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct StageReport {
    /// Its rows.
    pub rows: Vec<Row>,
    /// The session stage 1 left for stage 2.
    pub session: String,
}

/// The workload.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Calls per ioctl row.
    pub calls: usize,
    /// Sizes of the single memfds preserved and retrieved, in KiB.
    pub sizes_kib: Vec<u64>,
    /// Sessions of the many-sessions total (one 4 KiB memfd each).
    pub sessions: usize,
    /// Files of the many-files total (in one session).
    pub files: usize,
}

/// Runs the workload and returns its rows. On our daemon, the preserve side
/// runs under `luo run`, a simulated update follows and the retrieve side
/// runs in the new epoch (an update ends the old epoch's processes, so each
/// side runs in its own process); on another device (the kernel's), the
/// preserve side runs here and the retrieve side, which needs a kexec, is
/// skipped (`--stage 1` and `--stage 2` run the sides around a real kexec).
///
/// # Errors
/// Any failing step, with what it was.
pub fn run(device: &Path, plan: &Plan) -> std::io::Result<Vec<Row>> {
    let Ok(socket) = daemon_socket(device) else {
        eprintln!(
            "note: {} is not a luo daemon; the retrieve side needs a kexec there and is skipped",
            device.display()
        );
        return stage1(device, plan, None, false).map(|r| r.rows);
    };
    let first = run_stage(device, plan, 1, None)?;
    let resp = control::call(&socket, &Request::Update, None)?;
    if !resp.ok {
        return Err(std::io::Error::other(resp.error.unwrap_or_default()));
    }
    let second = run_stage(device, plan, 2, Some(&first.session))?;
    Ok(first.rows.into_iter().chain(second.rows).collect())
}

fn run_stage(
    device: &Path,
    plan: &Plan,
    stage: u32,
    session: Option<&str>,
) -> std::io::Result<StageReport> {
    let mut args: Vec<String> = vec!["bench".into(), "--device".into()];
    args.push(device.to_string_lossy().into_owned());
    args.extend(plan_args(plan));
    args.extend(["--stage".into(), stage.to_string()]);
    if let Some(s) = session {
        args.extend(["--session".into(), s.to_owned()]);
    }
    super::under_luo_run(device, &args, &format!("bench stage {stage}"))
}

fn plan_args(plan: &Plan) -> Vec<String> {
    let sizes: Vec<String> = plan.sizes_kib.iter().map(u64::to_string).collect();
    vec![
        "--calls".into(),
        plan.calls.to_string(),
        "--sizes-kib".into(),
        sizes.join(","),
        "--sessions".into(),
        plan.sessions.to_string(),
        "--files".into(),
        plan.files.to_string(),
    ]
}

/// A human size for a row name.
pub fn size_name(kib: u64) -> String {
    match kib {
        k if k >= 1 << 20 && k % (1 << 20) == 0 => format!("{} GiB", k >> 20),
        k if k >= 1 << 10 && k % (1 << 10) == 0 => format!("{} MiB", k >> 10),
        k => format!("{k} KiB"),
    }
}

/// A memfd of `kib` KiB, every page written.
pub fn filled_memfd(kib: u64) -> std::io::Result<File> {
    use std::io::Write;
    let mut f = memfd()?;
    let chunk = vec![0x5Au8; 1 << 20];
    let mut left = kib * 1024;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    Ok(f)
}

/// One timed sample as a row without a floor.
fn once<F: FnOnce() -> std::io::Result<()>>(op: String, f: F) -> std::io::Result<Row> {
    let t = Instant::now();
    f()?;
    Ok(Row::sample(op, t.elapsed().as_secs_f64() * 1e6))
}

/// Session names of one bench run.
struct Names<'a>(&'a str);

impl Names<'_> {
    fn calls(&self, i: usize) -> String {
        format!("{}-{i}", self.0)
    }
    fn sizes(&self) -> String {
        format!("{}-sizes", self.0)
    }
    fn many(&self, i: usize) -> String {
        format!("{}-many-{i}", self.0)
    }
    fn files(&self) -> String {
        format!("{}-files", self.0)
    }
}

/// Stage 1: CREATE_SESSION, PRESERVE_FD and GET_NAME per call; one memfd of
/// each size preserved; the many-sessions and many-files totals. With `hold`,
/// the sessions are kept by a detached child for stage 2. `tag` names them
/// (default: from the pid).
///
/// # Errors
/// Any ioctl failure.
pub fn stage1(
    device: &Path,
    plan: &Plan,
    tag: Option<&str>,
    hold: bool,
) -> std::io::Result<StageReport> {
    crate::sys::raise_fd_limit();
    let dev = File::options().read(true).write(true).open(device)?;
    let tag = tag.map_or_else(|| format!("bench-{}", std::process::id()), str::to_owned);
    let names = Names(&tag);
    let timer = Timer {
        dev: &dev,
        socket: daemon_socket(device).ok(),
    };
    timer.fuse_floor().map_err(|e| match e.raw_os_error() {
        Some(libc::ENOTTY) => std::io::Error::other(format!(
            "{} is not a LUO device: its ioctls fail with {e}",
            device.display()
        )),
        _ => e,
    })?;
    let mut rows = Vec::new();
    let mut sessions = Vec::with_capacity(plan.calls);
    let mut i = 0;
    rows.push(
        timer.timed(("CREATE_SESSION", Floor::Trapped), plan.calls, || {
            i += 1;
            sessions.push(create(&dev, &names.calls(i), uapi::CREATE_SESSION)?);
            Ok(())
        })?,
    );
    let mut token = 0u64;
    rows.push(
        timer.timed(("SESSION_PRESERVE_FD", Floor::Fuse), plan.calls, || {
            let file = memfd()?;
            let mut a = FdArgs {
                size: 16,
                fd: file.as_raw_fd(),
                token,
            };
            token += 1;
            ioctl(&sessions[0], uapi::PRESERVE_FD, &mut a)
        })?,
    );
    rows.push(
        timer.timed(("SESSION_GET_NAME", Floor::Fuse), plan.calls, || {
            let mut a = GetNameArgs {
                size: 72,
                reserved: 0,
                name: [0; 64],
            };
            ioctl(&sessions[0], uapi::GET_NAME, &mut a)
        })?,
    );
    let sizes = create(&dev, &names.sizes(), uapi::CREATE_SESSION)?;
    for &kib in &plan.sizes_kib {
        let file = filled_memfd(kib)?;
        rows.push(once(format!("PRESERVE_FD {}", size_name(kib)), || {
            preserve(&sizes, &file, kib)
        })?);
    }
    let mut many = Vec::with_capacity(plan.sessions);
    rows.push(once(
        format!(
            "{} sessions: CREATE_SESSION + PRESERVE_FD each",
            plan.sessions
        ),
        || {
            for i in 0..plan.sessions {
                let s = create(&dev, &names.many(i), uapi::CREATE_SESSION)?;
                preserve(&s, &filled_memfd(4)?, 0)?;
                many.push(s);
            }
            Ok(())
        },
    )?);
    let files = create(&dev, &names.files(), uapi::CREATE_SESSION)?;
    let memfds: Vec<File> = (0..plan.files)
        .map(|_| filled_memfd(4))
        .collect::<std::io::Result<_>>()?;
    rows.push(once(
        format!("{} files: PRESERVE_FD each", plan.files),
        || {
            for (t, m) in memfds.iter().enumerate() {
                preserve(&files, m, t as u64)?;
            }
            Ok(())
        },
    )?);
    if hold {
        let all = sessions.into_iter().chain([sizes, files]).chain(many);
        crate::sys::hold_in_child(all.map(OwnedFd::from).collect())?;
    }
    Ok(StageReport { rows, session: tag })
}

fn preserve(session: &File, file: &File, token: u64) -> std::io::Result<()> {
    lu::preserve_fd(session.as_fd(), file.as_fd(), token)
}

/// SESSION_RETRIEVE_FD of `token`; the fd is kept open in `kept`.
fn retrieve(session: &File, token: u64, kept: &mut Vec<OwnedFd>) -> std::io::Result<()> {
    kept.push(lu::retrieve_fd(session.as_fd(), token)?);
    Ok(())
}

fn finish(session: &File) -> std::io::Result<()> {
    lu::finish(session.as_fd())
}

/// Stage 2: RETRIEVE_FD of every file of the per-call session, then each
/// size's memfd, then the totals, all from the sessions stage 1 left.
///
/// # Errors
/// Any ioctl failure.
pub fn stage2(device: &Path, plan: &Plan, tag: &str) -> std::io::Result<StageReport> {
    crate::sys::raise_fd_limit();
    let dev = File::options().read(true).write(true).open(device)?;
    let names = Names(tag);
    let timer = Timer {
        dev: &dev,
        socket: daemon_socket(device).ok(),
    };
    let incoming = create(&dev, &names.calls(1), uapi::RETRIEVE_SESSION)?;
    let mut token = 0u64;
    let mut kept = Vec::with_capacity(plan.calls);
    let retrieve_fd = ("SESSION_RETRIEVE_FD", Floor::Trapped);
    let mut rows = vec![timer.timed(retrieve_fd, plan.calls, || {
        token += 1;
        retrieve(&incoming, token - 1, &mut kept)
    })?];
    finish(&incoming)?;
    drop(kept);
    let sizes = create(&dev, &names.sizes(), uapi::RETRIEVE_SESSION)?;
    for &kib in &plan.sizes_kib {
        let mut got = Vec::new();
        rows.push(once(format!("RETRIEVE_FD {}", size_name(kib)), || {
            retrieve(&sizes, kib, &mut got)
        })?);
        check_size(&got[0], kib)?;
    }
    finish(&sizes)?;
    // The many sessions give the per-call rows of RETRIEVE_SESSION and
    // SESSION_FINISH (a session with an unretrieved file finishes it too).
    let mut many = Vec::with_capacity(plan.sessions);
    let mut i = 0;
    let retrieve_row = timer.timed(("RETRIEVE_SESSION", Floor::Trapped), plan.sessions, || {
        many.push(create(&dev, &names.many(i), uapi::RETRIEVE_SESSION)?);
        i += 1;
        Ok(())
    })?;
    let mut i = 0;
    let finish_row = timer.timed(("SESSION_FINISH", Floor::Fuse), plan.sessions, || {
        i += 1;
        finish(&many[i - 1])
    })?;
    let total: f64 = retrieve_row.micros.iter().chain(&finish_row.micros).sum();
    rows.push(retrieve_row);
    rows.push(finish_row);
    rows.push(Row::sample(
        format!("{} sessions: RETRIEVE_SESSION + FINISH each", plan.sessions),
        total,
    ));
    let files = create(&dev, &names.files(), uapi::RETRIEVE_SESSION)?;
    let mut got = Vec::with_capacity(plan.files);
    rows.push(once(
        format!("{} files: RETRIEVE_FD each", plan.files),
        || {
            for t in 0..plan.files {
                retrieve(&files, t as u64, &mut got)?;
            }
            Ok(())
        },
    )?);
    finish(&files)?;
    Ok(StageReport {
        rows,
        session: tag.to_owned(),
    })
}

/// A retrieved memfd must have its size back.
fn check_size(fd: &OwnedFd, kib: u64) -> std::io::Result<()> {
    let len = File::from(fd.try_clone()?).metadata()?.len();
    if len != kib * 1024 {
        return Err(std::io::Error::other(format!(
            "a {} memfd came back with {len} bytes",
            size_name(kib)
        )));
    }
    Ok(())
}

/// Prints rows as a Markdown table with each row's ratio to its own floor.
pub fn print(rows: &[Row], device: &Path) {
    let calls = rows.first().map_or(0, |r| r.micros.len());
    println!("device: {}   calls per row: {calls}", device.display());
    println!(
        "| ioctl | p50 (µs) | p99 (µs) | floor | floor p50 (µs) | floor p99 (µs) | p50 / floor p50 |"
    );
    println!("|---|---:|---:|---|---:|---:|---:|");
    for r in rows {
        let p50 = pct(&r.micros, 0.5);
        if r.floor.is_empty() {
            println!("| {} | {p50:.1} | | | | | |", r.op);
            continue;
        }
        let floor50 = pct(&r.floor, 0.5);
        println!(
            "| {} | {p50:.1} | {:.1} | {} | {floor50:.1} | {:.1} | {:.2} |",
            r.op,
            pct(&r.micros, 0.99),
            if r.trapped { "trapped" } else { "FUSE" },
            pct(&r.floor, 0.99),
            p50 / floor50
        );
    }
    breakdown::print(rows);
}

/// The rows in a console log's `BENCH LABEL JSON` lines (a stage report or a
/// list of rows), by label, in order of appearance.
///
/// # Errors
/// A line that does not parse.
pub fn read_log(log: &str) -> std::io::Result<Vec<(String, Vec<Row>)>> {
    let mut by_label: Vec<(String, Vec<Row>)> = Vec::new();
    for line in log.lines().map(|l| l.trim_end_matches('\r')) {
        let Some(rest) = line.strip_prefix("BENCH ") else {
            continue;
        };
        let Some((label, json)) = rest.split_once(' ') else {
            continue;
        };
        let rows: Vec<Row> = match serde_json::from_str::<StageReport>(json) {
            Ok(r) => r.rows,
            Err(_) => serde_json::from_str(json)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?,
        };
        match by_label.iter_mut().find(|(l, _)| l == label) {
            Some((_, all)) => all.extend(rows),
            None => by_label.push((label.to_owned(), rows)),
        }
    }
    Ok(by_label)
}

/// A side-by-side Markdown table: p50 (and p99 where there are many calls)
/// of every row for each label, and each label's p50 as a multiple of the
/// first label's.
pub fn side_by_side(runs: &[(String, Vec<Row>)]) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let Some((base_label, base)) = runs.first() else {
        return out;
    };
    let _ = write!(out, "| row |");
    for (label, _) in runs {
        let _ = write!(out, " {label} p50 (p99), µs |");
    }
    for (label, _) in &runs[1..] {
        let _ = write!(out, " {label} / {base_label} |");
    }
    let _ = write!(out, "\n|---|");
    for _ in 0..runs.len() * 2 - 1 {
        let _ = write!(out, "---:|");
    }
    out.push('\n');
    for row in base {
        let cells: Vec<Option<&Row>> = runs
            .iter()
            .map(|(_, rows)| rows.iter().find(|r| r.op == row.op))
            .collect();
        let _ = write!(out, "| {} |", row.op);
        for c in &cells {
            match c {
                Some(r) if r.micros.len() > 1 => {
                    let _ = write!(
                        out,
                        " {:.1} ({:.1}) |",
                        pct(&r.micros, 0.5),
                        pct(&r.micros, 0.99)
                    );
                }
                Some(r) => {
                    let _ = write!(out, " {:.1} |", pct(&r.micros, 0.5));
                }
                None => out.push_str(" — |"),
            }
        }
        let b = pct(&row.micros, 0.5);
        for c in &cells[1..] {
            match c {
                Some(r) => {
                    let _ = write!(out, " {:.2} |", pct(&r.micros, 0.5) / b);
                }
                None => out.push_str(" — |"),
            }
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_becomes_a_side_by_side_table() {
        let row = |op: &str, v: f64| Row {
            op: op.into(),
            micros: vec![v, v],
            floor: vec![1.0, 1.0],
            trapped: false,
            daemon: Vec::new(),
        };
        let k = StageReport {
            rows: vec![row("GET", 2.0)],
            session: "t".into(),
        };
        let k2 = StageReport {
            rows: vec![row("RETRIEVE", 4.0)],
            session: "t".into(),
        };
        let ours = vec![row("GET", 6.0), row("RETRIEVE", 8.0)];
        let log = format!(
            "noise\nBENCH kernel {}\nBENCH cuse {}\r\nBENCH kernel {}\n",
            serde_json::to_string(&k).unwrap(),
            serde_json::to_string(&ours).unwrap(),
            serde_json::to_string(&k2).unwrap()
        );
        let runs = read_log(&log).unwrap();
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].1.len(), 2);
        let table = side_by_side(&runs);
        assert!(
            table.contains("| GET | 2.0 (2.0) | 6.0 (6.0) | 3.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| RETRIEVE | 4.0 (4.0) | 8.0 (8.0) | 2.00 |"),
            "{table}"
        );
    }
}
