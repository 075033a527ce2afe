//! The blackout's phases: every process of the demo (the driver, the old
//! VMM, the new one) marks the moments it passes, by `CLOCK_MONOTONIC`
//! (one clock for all of them), in a file the driver names in
//! [`TIMELINE_ENV`]; the driver prints the time between consecutive marks.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The variable naming the timeline file.
pub const TIMELINE_ENV: &str = "LUO_DEMO_TIMELINE";

/// Appends `name` at now (or at `ns`) to the timeline, if there is one;
/// a timeline that cannot be written loses the mark, never the demo.
pub fn mark_at(name: &str, ns: u64) {
    if let Some(path) = std::env::var_os(TIMELINE_ENV) {
        write(Path::new(&path), name, ns);
    }
}

/// Appends `name` at now to the timeline at `path` (the driver's marks).
pub fn mark_in(path: &Path, name: &str) {
    write(path, name, crate::sys::monotonic_ns());
}

fn write(path: &Path, name: &str, ns: u64) {
    let line = format!("{ns} {name}\n");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .append(true)
        .create(true)
        .open(path)
    {
        let _ = f.write_all(line.as_bytes());
    }
}

/// Appends `name` at now.
pub fn mark(name: &str) {
    mark_at(name, crate::sys::monotonic_ns());
}

/// Whether the timeline at `path` has the mark `name`.
pub fn has(path: &Path, name: &str) -> bool {
    std::fs::read_to_string(path).is_ok_and(|t| {
        t.lines()
            .any(|l| l.split_once(' ').is_some_and(|(_, n)| n == name))
    })
}

/// A fresh timeline file in `dir`.
pub fn fresh(dir: &Path, run: &str) -> PathBuf {
    let path = dir.join(format!("timeline-{run}"));
    let _ = std::fs::remove_file(&path);
    path
}

/// The phases from the mark `from` to the mark `to`, as lines to print.
pub fn phases(path: &Path, from: &str, to: &str) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut marks: Vec<(u64, &str)> = text
        .lines()
        .filter_map(|l| {
            let (ns, name) = l.split_once(' ')?;
            Some((ns.parse().ok()?, name))
        })
        .collect();
    marks.sort_by_key(|(ns, _)| *ns);
    let Some(start) = marks.iter().position(|(_, n)| *n == from) else {
        return Vec::new();
    };
    let end = marks
        .iter()
        .position(|(_, n)| *n == to)
        .unwrap_or(marks.len() - 1);
    marks[start..=end.max(start)]
        .windows(2)
        .map(|w| {
            format!(
                "    {:>7.1} ms  {} -> {}",
                (w[1].0 - w[0].0) as f64 / 1e6,
                w[0].1,
                w[1].1
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_run_between_consecutive_marks_in_time_order() {
        let dir = std::env::temp_dir().join(format!("luo-timeline-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = fresh(&dir, "t");
        std::fs::write(
            &path,
            "3000000 c\n1000000 a\n0 before\n2500000 b\n9000000 after\n",
        )
        .unwrap();
        let lines = phases(&path, "a", "c");
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(lines[0].contains("1.5 ms  a -> b"), "{lines:?}");
        assert!(lines[1].contains("0.5 ms  b -> c"), "{lines:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
