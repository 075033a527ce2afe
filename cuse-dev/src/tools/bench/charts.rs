//! SVG charts of a bench run (`luo bench --svg DIR`), drawn with plotters'
//! SVG backend: each ioctl's p50 and p99 beside its floor's p50; for
//! `--scale`, each row's p50 against the sessions held; for `--compare LOG`,
//! the time to preserve and to retrieve one memfd against its size, one
//! line per device of the log (in-kernel LUO, ours, kmod-shim).

use std::path::Path;

use plotters::prelude::*;

use super::scale::Step;
use super::timer::{pct, Row};

const WIDTH: u32 = 960;
const HEIGHT: u32 = 480;

fn err(e: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::other(format!("drawing a chart: {e}"))
}

/// A row's name without the `SESSION_` every session command has.
fn short(op: &str) -> &str {
    op.strip_prefix("SESSION_").unwrap_or(op)
}

/// Grouped bars for every row that has a floor: p50, p99, floor p50 (µs).
///
/// # Errors
/// The chart cannot be drawn or written.
pub fn ioctls(rows: &[Row], path: &Path) -> std::io::Result<()> {
    let rows: Vec<&Row> = rows.iter().filter(|r| !r.floor.is_empty()).collect();
    let bars = |r: &Row| {
        [
            pct(&r.micros, 0.5),
            pct(&r.micros, 0.99),
            pct(&r.floor, 0.5),
        ]
    };
    let top = rows.iter().flat_map(|r| bars(r)).fold(1.0f64, f64::max) * 1.1;
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let names: Vec<&str> = rows.iter().map(|r| short(&r.op)).collect();
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Per-ioctl latency against its transport's floor",
            ("sans-serif", 20),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..rows.len() as f64 - 0.5, 0f64..top)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(rows.len())
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                names.get(i as usize).copied().unwrap_or("").to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("µs")
        .draw()
        .map_err(err)?;
    let series = [("p50", BLUE), ("p99", RED), ("floor p50", BLACK)];
    for (k, (label, color)) in series.into_iter().enumerate() {
        let left = -0.36 + 0.24 * k as f64;
        let rects = rows.iter().enumerate().map(|(i, r)| {
            let x = i as f64 + left;
            Rectangle::new([(x, 0.0), (x + 0.22, bars(r)[k])], color.mix(0.7).filled())
        });
        chart
            .draw_series(rects)
            .map_err(err)?
            .label(label)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 10, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

/// One line per row: its p50 (µs) against the sessions held (log scales).
///
/// # Errors
/// The chart cannot be drawn or written, or there are fewer than two steps.
pub fn scale(steps: &[Step], path: &Path) -> std::io::Result<()> {
    let Some(first) = steps.first() else {
        return Err(err("no steps"));
    };
    if steps.len() < 2 {
        return Err(err("one step is no line"));
    }
    let lines = first
        .rows
        .iter()
        .enumerate()
        .map(|(i, row)| {
            let pts = steps
                .iter()
                .filter_map(|s| Some((s.sessions.max(1) as f64, pct(&s.rows.get(i)?.micros, 0.5))))
                .collect();
            (short(&row.op).to_owned(), pts)
        })
        .collect();
    let chart = LineChart {
        caption: "Per-call p50 against the sessions held".into(),
        axes: ("sessions held", "p50, µs"),
        legend: SeriesLabelPosition::LowerRight,
    };
    chart.draw(lines, path)
}

/// The size in KiB a row such as "PRESERVE_FD 64 MiB" names after `prefix`.
fn size_of(op: &str, prefix: &str) -> Option<f64> {
    let (n, unit) = op.strip_prefix(prefix)?.trim().split_once(' ')?;
    let n: f64 = n.parse().ok()?;
    Some(match unit {
        "KiB" => n,
        "MiB" => n * 1024.0,
        "GiB" => n * 1024.0 * 1024.0,
        _ => return None,
    })
}

/// One line per labelled run: the `prefix` rows' time (ms) against the
/// memfd size (KiB), both on log scales.
///
/// # Errors
/// The chart cannot be drawn or written, or no run has such rows.
pub fn sizes(runs: &[(String, Vec<Row>)], prefix: &str, path: &Path) -> std::io::Result<()> {
    let lines: Vec<(String, Vec<(f64, f64)>)> = runs
        .iter()
        .map(|(label, rows)| {
            let mut pts: Vec<(f64, f64)> = rows
                .iter()
                .filter_map(|r| Some((size_of(&r.op, prefix)?, pct(&r.micros, 0.5) / 1e3)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            (label.clone(), pts)
        })
        .filter(|(_, pts)| !pts.is_empty())
        .collect();
    if lines.is_empty() {
        return Err(err(format!("no {prefix}<size> rows in the log")));
    }
    let chart = LineChart {
        caption: format!("{prefix}one memfd, by size"),
        axes: ("memfd size, KiB", "p50, ms"),
        legend: SeriesLabelPosition::UpperLeft,
    };
    chart.draw(lines, path)
}

/// A chart of lines with points, both axes on log scales.
struct LineChart {
    caption: String,
    /// The x and y axes' descriptions.
    axes: (&'static str, &'static str),
    legend: SeriesLabelPosition,
}

impl LineChart {
    /// Draws `lines` (a label and its points each) into `path`.
    fn draw(self, lines: Vec<(String, Vec<(f64, f64)>)>, path: &Path) -> std::io::Result<()> {
        let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN_POSITIVE, f64::MAX, 1e-3f64);
        for (x, y) in lines.iter().flat_map(|(_, p)| p.iter()) {
            (x0, x1, y0, y1) = (x0.min(*x), x1.max(*x), y0.min(*y), y1.max(*y));
        }
        let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(self.caption, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(70)
            .build_cartesian_2d(
                (x0 / 1.5..x1 * 1.5).log_scale(),
                (y0.max(1e-3) / 2.0..y1 * 2.0).log_scale(),
            )
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc(self.axes.0)
            .y_desc(self.axes.1)
            .draw()
            .map_err(err)?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN, BLACK];
        for (i, (label, pts)) in lines.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], color));
            chart
                .draw_series(pts.into_iter().map(|p| Circle::new(p, 3, color.filled())))
                .map_err(err)?;
        }
        chart
            .configure_series_labels()
            .position(self.legend)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()
            .map_err(err)?;
        root.present().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(op: &str, v: f64) -> Row {
        let mut r = Row::sample(op.to_owned(), v);
        r.micros = vec![v, v * 2.0];
        r.floor = vec![v / 2.0, v / 2.0];
        r
    }

    /// The charts name every row, in an SVG document.
    #[test]
    fn charts_are_svg_naming_every_row() {
        let dir = std::env::temp_dir().join(format!("luo-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let rows = vec![row("CREATE_SESSION", 100.0), row("SESSION_GET_NAME", 20.0)];
        ioctls(&rows, &dir.join("ioctls.svg")).unwrap();
        let steps = [10, 1000, 10000].map(|n| Step {
            sessions: n,
            rows: vec![row("SESSION_PRESERVE_FD", 90.0 + n as f64 / 1000.0)],
        });
        scale(&steps, &dir.join("scale.svg")).unwrap();
        let sized = |label: &str, f: f64| {
            let rows = [4, 1024, 1 << 20].map(|k| {
                row(
                    &format!("PRESERVE_FD {}", super::super::size_name(k)),
                    f * k as f64,
                )
            });
            (label.to_owned(), rows.into())
        };
        let runs = vec![sized("kernel", 2.0), sized("fuse-file", 0.5)];
        sizes(&runs, "PRESERVE_FD ", &dir.join("sizes.svg")).unwrap();
        assert!(sizes(&runs, "RETRIEVE_FD ", &dir.join("none.svg")).is_err());
        assert_eq!(size_of("RETRIEVE_FD 64 MiB", "RETRIEVE_FD "), Some(65536.0));
        for (file, names) in [
            (
                "ioctls.svg",
                &["CREATE_SESSION", "GET_NAME", "floor p50"][..],
            ),
            ("scale.svg", &["PRESERVE_FD", "sessions held"][..]),
            ("sizes.svg", &["kernel", "fuse-file", "memfd size"][..]),
        ] {
            let svg = std::fs::read_to_string(dir.join(file)).unwrap();
            assert!(
                svg.starts_with("<svg"),
                "{file}: {}",
                &svg[..40.min(svg.len())]
            );
            for n in names {
                assert!(svg.contains(n), "{file} does not name {n}");
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
