//! SVG plots of benchmark results (plotters, SVG backend: no fonts or images needed).

use std::path::Path;

use plotters::prelude::*;

use super::BenchError;

const SIZE: (u32, u32) = (800, 480);
const COLORS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
    RGBColor(44, 160, 44),
    RGBColor(255, 127, 14),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

fn plot_err(e: impl std::fmt::Display) -> BenchError {
    BenchError::Setup(format!("drawing a plot failed: {e}"))
}

/// A named series of (x, y) points.
pub struct Series {
    /// Legend label.
    pub label: String,
    /// Points.
    pub points: Vec<(f64, f64)>,
}

impl Series {
    /// A series.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Series {
            label: label.into(),
            points,
        }
    }
}

fn bounds(series: &[Series], log_x: bool, log_y: bool) -> ((f64, f64), (f64, f64)) {
    let xs = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|x| !log_x || *x > 0.0);
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .filter(|y| !log_y || *y > 0.0);
    let (x0, x1) = xs.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
    let (y0, y1) = ys.fold((f64::MAX, f64::MIN), |(a, b), y| (a.min(y), b.max(y)));
    let widen = |lo: f64, hi: f64, log: bool| {
        if lo > hi {
            return (1.0, 10.0);
        }
        if log {
            (lo / 1.5, hi * 1.5)
        } else {
            let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-9);
            ((lo - pad).min(0.0_f64.max(lo - pad)), hi + pad)
        }
    };
    (widen(x0, x1, log_x), widen(y0, y1, log_y))
}

/// Draws lines (with point markers) for each series.
pub fn lines(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    log_x: bool,
    log_y: bool,
    series: &[Series],
) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let ((x0, x1), (y0, y1)) = bounds(series, log_x, log_y);
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .draw()
                .map_err(plot_err)?;
            for (i, s) in series.iter().enumerate() {
                let color = COLORS[i % COLORS.len()];
                let points: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|(x, y)| (!log_x || *x > 0.0) && (!log_y || *y > 0.0))
                    .collect();
                chart
                    .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(s.label.clone())
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
                if points.len() <= 40 {
                    chart
                        .draw_series(points.iter().map(|p| Circle::new(*p, 3, color.filled())))
                        .map_err(plot_err)?;
                }
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }};
    }
    match (log_x, log_y) {
        (true, true) => draw!(builder
            .build_cartesian_2d((x0..x1).log_scale(), (y0..y1).log_scale())
            .map_err(plot_err)?),
        (true, false) => draw!(builder
            .build_cartesian_2d((x0..x1).log_scale(), y0..y1)
            .map_err(plot_err)?),
        (false, true) => draw!(builder
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(plot_err)?),
        (false, false) => draw!(builder.build_cartesian_2d(x0..x1, y0..y1).map_err(plot_err)?),
    }
    root.present().map_err(plot_err)
}

/// Cumulative distribution of each sample set, on a log time axis.
pub fn cdf(path: &Path, title: &str, x_desc: &str, samples: &[(&str, &[f64])]) -> Result<(), BenchError> {
    let series: Vec<Series> = samples
        .iter()
        .filter(|(_, s)| !s.is_empty())
        .map(|(label, s)| {
            let mut sorted = s.to_vec();
            sorted.sort_by(f64::total_cmp);
            let n = sorted.len() as f64;
            Series::new(
                format!("{label} (n={})", sorted.len()),
                sorted
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (*v, (i + 1) as f64 / n))
                    .collect(),
            )
        })
        .collect();
    lines(path, title, x_desc, "fraction of spawns", true, false, &series)
}

/// Vertical bars, one per (label, value), with the value written above each.
pub fn bars(path: &Path, title: &str, y_desc: &str, values: &[(String, f64)]) -> Result<(), BenchError> {
    let root = SVGBackend::new(path, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let top = values.iter().map(|v| v.1).fold(0.0, f64::max) * 1.2 + 1e-9;
    let n = values.len().max(1);
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(0f64..n as f64, 0f64..top)
        .map_err(plot_err)?;
    let labels: Vec<String> = values.iter().map(|v| v.0.clone()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - i as f64 - 0.5).abs() < 0.01 {
                labels.get(i).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_desc(y_desc)
        .draw()
        .map_err(plot_err)?;
    for (i, (_, value)) in values.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let x = i as f64;
        chart
            .draw_series(std::iter::once(Rectangle::new(
                [(x + 0.15, 0.0), (x + 0.85, *value)],
                color.filled(),
            )))
            .map_err(plot_err)?;
        chart
            .draw_series(std::iter::once(Text::new(
                format!("{value:.2}"),
                (x + 0.35, *value + top * 0.02),
                ("sans-serif", 14),
            )))
            .map_err(plot_err)?;
    }
    root.present().map_err(plot_err)
}
