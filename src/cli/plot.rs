//! `dkv-cask bench --plot FILE`: the bench's put and get rows drawn as one
//! SVG of two panels. Left, put throughput: one bar per `Never` put row and
//! per `Always` writer count, beside the disk's raw 4 KiB `pwrite` +
//! `fdatasync` rate as a dashed line (log scale, since the rates span two
//! orders of magnitude). Right, each row's latency distribution as a CDF on a
//! log time axis. The SVG backend writes text as `<text>` elements, so no
//! font is read: the viewer renders the labels.

use std::error::Error;
use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

use super::bench::Row;

/// Title of the throughput panel's y axis.
const THROUGHPUT_AXIS: &str = "throughput (ops/s, log scale)";
/// Title of the latency panel's x axis.
const LATENCY_AXIS: &str = "latency per operation (µs, log scale)";
/// Title of the latency panel's y axis.
const FRACTION_AXIS: &str = "fraction of operations at or below";

const FONT: &str = "sans-serif";
const NEVER_COLOR: RGBColor = RGBColor(0x4c, 0x78, 0xa8);
const ALWAYS_COLOR: RGBColor = RGBColor(0xf5, 0x85, 0x18);
const RAW_COLOR: RGBColor = RGBColor(0xd6, 0x27, 0x28);
/// The CDF curves' colours (Tableau 10, readable on white).
const COLORS: [RGBColor; 8] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
    RGBColor(0xff, 0x7f, 0x0e),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x8c, 0x56, 0x4b),
    RGBColor(0xe3, 0x77, 0xc2),
    RGBColor(0x7f, 0x7f, 0x7f),
];

/// A put row of the throughput panel.
struct Bar {
    label: String,
    rate: f64,
    durable: bool,
}

/// Writer count of a `put (Always), N writers` row.
fn writers(name: &str) -> Option<usize> {
    let rest = name.strip_prefix("put (Always), ")?;
    rest.split(' ').next()?.parse().ok()
}

/// Writes the plot of `rows` to `path`, headed by `title`.
pub(super) fn write_svg(path: &Path, title: &str, rows: &[Row]) -> Result<(), Box<dyn Error>> {
    let root = SVGBackend::new(path, (1280, 620)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FONT, 24))?;
    let (left, right) = root.split_horizontally(560);
    throughput_panel(&left, rows)?;
    latency_panel(&right, rows)?;
    root.present()?;
    Ok(())
}

fn throughput_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rows: &[Row],
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let mut bars = Vec::new();
    for (prefix, label) in [
        ("sequential put (Never)", "Never seq."),
        ("random put (Never)", "Never random"),
    ] {
        if let Some(r) = rows.iter().find(|r| r.name == prefix) {
            bars.push(Bar {
                label: label.into(),
                rate: r.rate(),
                durable: false,
            });
        }
    }
    let mut raw = None;
    for r in rows {
        if let Some(n) = writers(&r.name) {
            bars.push(Bar {
                label: format!("Always ×{n}"),
                rate: r.rate(),
                durable: true,
            });
            raw = r.reference.as_ref().map(|(_, rate)| *rate);
        }
    }
    let rates = bars.iter().map(|b| b.rate).chain(raw);
    let lo = rates.clone().fold(f64::INFINITY, f64::min).max(1.0);
    let hi = rates.fold(1.0, f64::max);
    let (lo, hi) = (decade_below(lo), decade_below(hi) * 100.0);
    let count = bars.len().max(2) as i32;
    let mut chart = ChartBuilder::on(area)
        .caption("durable and buffered put throughput", (FONT, 18))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d((0..count - 1).into_segmented(), (lo..hi).log_scale())?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_desc("sync mode (× writer threads)")
        .y_desc(THROUGHPUT_AXIS)
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) => bars
                .get(*i as usize)
                .map_or_else(String::new, |b| b.label.clone()),
            _ => String::new(),
        })
        .y_label_formatter(&|v| si(*v))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;

    for (durable, color, name) in [
        (false, NEVER_COLOR, "SyncMode::Never (no fsync)"),
        (true, ALWAYS_COLOR, "SyncMode::Always (group commit)"),
    ] {
        let shown = bars
            .iter()
            .enumerate()
            .filter(|(_, b)| b.durable == durable);
        chart
            .draw_series(shown.map(|(i, b)| {
                let i = i as i32;
                let corners = [
                    (SegmentValue::Exact(i), lo),
                    (SegmentValue::Exact(i + 1), b.rate.max(lo)),
                ];
                let mut bar = Rectangle::new(corners, color.filled());
                bar.set_margin(0, 0, 10, 10);
                bar
            }))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 16, y + 5)], color.filled()));
    }
    let value_style =
        TextStyle::from((FONT, 14).into_font()).pos(Pos::new(HPos::Center, VPos::Bottom));
    chart.draw_series(bars.iter().enumerate().map(|(i, b)| {
        let at = (SegmentValue::CenterOf(i as i32), b.rate.max(lo));
        Text::new(si(b.rate), at, value_style.clone())
    }))?;
    if let Some(raw) = raw {
        let line = [(SegmentValue::Exact(0), raw), (SegmentValue::Last, raw)];
        chart
            .draw_series(DashedLineSeries::new(line, 8, 5, RAW_COLOR.stroke_width(2)))?
            .label(format!("raw 4 KiB pwrite+fdatasync: {}/s", si(raw)))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RAW_COLOR.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .label_font((FONT, 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    Ok(())
}

fn latency_panel<DB: DrawingBackend>(
    area: &DrawingArea<DB, Shift>,
    rows: &[Row],
) -> Result<(), Box<dyn Error>>
where
    DB::ErrorType: 'static,
{
    let shown: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            !r.latencies.is_empty()
                && (r.name.contains("put (Never)")
                    || r.name == "random get"
                    || writers(&r.name).is_some())
        })
        .collect();
    let micros = |ns: u64| ns.max(1) as f64 / 1e3;
    let lo = shown
        .iter()
        .map(|r| micros(r.latencies[0]))
        .fold(f64::INFINITY, f64::min);
    let hi = shown
        .iter()
        .map(|r| micros(*r.latencies.last().expect("not empty")))
        .fold(0.0, f64::max);
    let (lo, hi) = if shown.is_empty() {
        (0.1, 1000.0)
    } else {
        (decade_below(lo), decade_below(hi) * 10.0)
    };
    let legend_rows = shown.len().div_ceil(2) as u32;
    let height = area.dim_in_pixel().1;
    let (plot_area, legend_area) = area.split_vertically(height - 12 - 22 * legend_rows);
    let mut chart = ChartBuilder::on(&plot_area)
        .caption("latency distribution (CDF)", (FONT, 18))
        .margin(12)
        .x_label_area_size(50)
        .y_label_area_size(60)
        .build_cartesian_2d((lo..hi).log_scale(), 0.0..1.0)?;
    chart
        .configure_mesh()
        .x_desc(LATENCY_AXIS)
        .y_desc(FRACTION_AXIS)
        .x_label_formatter(&|v| si(*v))
        .y_label_formatter(&|v| format!("{v:.1}"))
        .label_style((FONT, 14))
        .axis_desc_style((FONT, 15))
        .draw()?;
    // The legend goes under the chart, in two columns: inside it, it would
    // hide a curve wherever it were put.
    for (k, r) in shown.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        let points = cdf_points(&r.latencies)
            .into_iter()
            .map(|(ns, p)| (micros(ns), p));
        chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
        let (x, y) = (72 + (k % 2) as i32 * 330, 4 + (k / 2) as i32 * 22);
        let label = format!("{} (p99 {} µs)", r.name, si(r.percentile(0.99)));
        legend_area.draw(&PathElement::new(
            [(x, y + 8), (x + 22, y + 8)],
            color.stroke_width(3),
        ))?;
        legend_area.draw(&Text::new(label, (x + 30, y), (FONT, 14)))?;
    }
    Ok(())
}

/// About 600 points of the empirical CDF of `sorted`: even steps of the
/// fraction up to 0.99, then finer ones into the tail, and the maximum.
fn cdf_points(sorted: &[u64]) -> Vec<(u64, f64)> {
    let n = sorted.len();
    if n == 0 {
        return Vec::new();
    }
    let even = (0..400).map(|i| f64::from(i) / 400.0 * 0.99);
    let tail = (0..=200).map(|j| 1.0 - 10f64.powf(-2.0 - f64::from(j) / 50.0));
    let mut last = usize::MAX;
    let mut points = Vec::new();
    for p in even.chain(tail).chain([1.0]) {
        let i = ((n - 1) as f64 * p).round() as usize;
        if i != last {
            points.push((sorted[i], (i + 1) as f64 / n as f64));
            last = i;
        }
    }
    points
}

/// The power of ten at or below `v` (`v` > 0).
fn decade_below(v: f64) -> f64 {
    10f64.powf(v.log10().floor())
}

/// A short label: 0.5, 12, 3.4k, 51k, 1.2M.
fn si(v: f64) -> String {
    let (v, unit) = match v {
        v if v >= 1e6 => (v / 1e6, "M"),
        v if v >= 1e3 => (v / 1e3, "k"),
        v => (v, ""),
    };
    let digits = if v >= 10.0 || v == v.round() {
        0
    } else if v >= 1.0 {
        1
    } else {
        2
    };
    format!("{v:.digits$}{unit}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_cdf_points() {
        assert_eq!(si(51_234.0), "51k");
        assert_eq!(si(7_300.0), "7.3k");
        assert_eq!(si(0.25), "0.25");
        assert_eq!(si(100.0), "100");
        assert_eq!(writers("put (Always), 16 writers"), Some(16));
        assert_eq!(writers("random put (Never)"), None);
        let sorted: Vec<u64> = (1..=10_000).collect();
        let points = cdf_points(&sorted);
        assert!(points.len() < 700);
        assert_eq!(points.last(), Some(&(10_000, 1.0)));
        assert!(
            points
                .windows(2)
                .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1)
        );
        assert_eq!(decade_below(345.0), 100.0);
    }
}
