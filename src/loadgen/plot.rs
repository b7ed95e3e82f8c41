//! `loadgen --plot`: the run's timeline as an SVG picture, drawn with the
//! `plotters` crate (its SVG backend, no fonts needed). Three panels share
//! the time axis: throughput per second (seconds with BUSY answers or errors
//! marked on the line), p50/p99/p99.9 latency per second on a log scale (so
//! a 1 s stall and a 1 ms median are both readable), and the BUSY answers
//! and errors per second.

use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::SecondStats;

const WIDTH_PX: u32 = 1000;
const HEIGHT_PX: u32 = 900;
const TITLE_PX: u32 = 40;
const THROUGHPUT_PX: u32 = 320;
const LATENCY_PX: u32 = 340;
const FONT: &str = "sans-serif";
/// Ticks on the time axis of a long run.
const MAX_X_LABELS: usize = 11;
/// The count axis goes at least this high, so its ticks are whole numbers.
const EVENTS_AXIS_MIN: u64 = 10;

const OPS_COLOR: RGBColor = RGBColor(31, 119, 180);
const P50_COLOR: RGBColor = RGBColor(44, 160, 44);
const P99_COLOR: RGBColor = RGBColor(255, 127, 14);
const P999_COLOR: RGBColor = RGBColor(214, 39, 40);
const BUSY_COLOR: RGBColor = RGBColor(148, 103, 189);
const ERROR_COLOR: RGBColor = RGBColor(0, 0, 0);

/// The SVG document, or why it could not be drawn.
pub(super) fn timeline_svg(title: &str, seconds: &[SecondStats]) -> Result<String, String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH_PX, HEIGHT_PX)).into_drawing_area();
        draw(&root, title, seconds).map_err(|e| format!("plotting failed: {e}"))?;
        root.present()
            .map_err(|e| format!("plotting failed: {e}"))?;
    }
    Ok(svg)
}

/// A line of a chart: its legend, its colour, and its value in a second.
type Series<T> = (&'static str, RGBColor, fn(&SecondStats) -> T);

type DrawResult = Result<(), DrawingAreaErrorKind<std::io::Error>>;
type Area<'b> = DrawingArea<SVGBackend<'b>, Shift>;
type Chart<'a, 'b> = ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// The seconds of the run: what every panel's x axis shows.
struct TimeAxis {
    range: std::ops::Range<f64>,
    labels: usize,
}

/// One panel: caption, axes with their descriptions and tick labels.
fn panel<'a, 'b>(
    area: &'a Area<'b>,
    caption: &str,
    time: &TimeAxis,
    y_range: std::ops::Range<f64>,
    y_desc: &str,
    y_format: &dyn Fn(&f64) -> String,
) -> Result<Chart<'a, 'b>, DrawingAreaErrorKind<std::io::Error>> {
    let mut chart = ChartBuilder::on(area)
        .caption(caption, (FONT, 16))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(80)
        .build_cartesian_2d(time.range.clone(), y_range)?;
    chart
        .configure_mesh()
        .x_desc("time since the start of the measured run (s)")
        .x_label_formatter(&format_s)
        .x_labels(time.labels)
        .y_desc(y_desc)
        .y_label_formatter(y_format)
        .y_labels(10)
        .draw()?;
    Ok(chart)
}

/// A thick line, with its entry in the legend.
fn line(
    chart: &mut Chart,
    points: impl Iterator<Item = (f64, f64)>,
    name: &str,
    color: RGBColor,
) -> DrawResult {
    chart
        .draw_series(LineSeries::new(points, color.stroke_width(2)))?
        .label(name)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    Ok(())
}

fn legend<'a, 'b: 'a>(chart: &mut Chart<'a, 'b>, position: SeriesLabelPosition) -> DrawResult {
    chart
        .configure_series_labels()
        .position(position)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
}

fn draw(root: &Area, title: &str, seconds: &[SecondStats]) -> DrawResult {
    root.fill(&WHITE)?;
    let (top, rest) = root.split_vertically(TITLE_PX);
    top.draw_text(title, &(FONT, 18).into_text_style(&top), (12, 12))?;
    let (throughput, rest) = rest.split_vertically(THROUGHPUT_PX);
    let (latency, events) = rest.split_vertically(LATENCY_PX);
    // Second k covers [k-1, k) of the measured run: its point sits in the middle.
    let last = seconds.last().map_or(1, |s| s.second.max(1)) as f64;
    let first = seconds.first().map_or(1, |s| s.second.min(1)) as f64 - 1.0;
    let time = TimeAxis {
        range: first..last,
        // At most a tick a second: a short run gets whole seconds.
        labels: ((last - first) as usize + 1).min(MAX_X_LABELS),
    };
    let mid = |s: &SecondStats| s.second as f64 - 0.5;
    let whole = |v: &f64| format!("{v:.0}");

    // Throughput, with the seconds that saw BUSY or errors marked.
    let max_ops = seconds.iter().map(|s| s.ops).max().unwrap_or(0).max(1) as f64;
    let y_desc = "successful operations per second";
    let mut chart = panel(
        &throughput,
        "throughput",
        &time,
        0.0..max_ops * 1.15,
        y_desc,
        &whole,
    )?;
    let ops_line = seconds.iter().map(|s| (mid(s), s.ops as f64));
    line(&mut chart, ops_line, "ops/s", OPS_COLOR)?;
    let total_busy: u64 = seconds.iter().map(|s| s.busy).sum();
    let total_errors: u64 = seconds.iter().map(|s| s.errors).sum();
    let busy_marks = seconds
        .iter()
        .filter(|s| s.busy > 0)
        .map(|s| TriangleMarker::new((mid(s), s.ops as f64), 6, BUSY_COLOR.filled()));
    chart
        .draw_series(busy_marks)?
        .label(format!("second with BUSY answers ({total_busy} in all)"))
        .legend(|(x, y)| TriangleMarker::new((x + 10, y), 6, BUSY_COLOR.filled()));
    let error_marks = seconds
        .iter()
        .filter(|s| s.errors > 0)
        .map(|s| Cross::new((mid(s), s.ops as f64), 7, ERROR_COLOR.stroke_width(2)));
    chart
        .draw_series(error_marks)?
        .label(format!("second with errors ({total_errors} in all)"))
        .legend(|(x, y)| Cross::new((x + 10, y), 6, ERROR_COLOR.stroke_width(2)));
    legend(&mut chart, SeriesLabelPosition::LowerRight)?;

    // Latency percentiles per second: log10 of the latency on a linear
    // axis, labelled in ms, so ticks fall on whole and half decades (1, 3.2,
    // 10, 32, ... ms). Seconds without a measured success have no latency
    // and are left out.
    let latencies = |pick: fn(&SecondStats) -> f64| {
        seconds
            .iter()
            .filter(move |s| s.ops > 0 && pick(s) > 0.0)
            .map(move |s| (mid(s), pick(s)))
    };
    let all = latencies(|s| s.p50_ms).chain(latencies(|s| s.p999_ms.max(s.p99_ms)));
    let (low, high) = all.fold((f64::MAX, 0.0f64), |(lo, hi), (_, v)| {
        (lo.min(v), hi.max(v))
    });
    let (low, high) = if high > 0.0 {
        (low / 2.0, high * 2.0)
    } else {
        (0.01, 10.0)
    };
    let caption = "latency per second (log scale)";
    let in_ms = |v: &f64| format_ms(10f64.powf(*v));
    let y_range = low.log10()..high.log10();
    let mut chart = panel(&latency, caption, &time, y_range, "latency (ms)", &in_ms)?;
    let series: [Series<f64>; 3] = [
        ("p50", P50_COLOR, |s| s.p50_ms),
        ("p99", P99_COLOR, |s| s.p99_ms),
        ("p99.9", P999_COLOR, |s| s.p999_ms),
    ];
    for (name, color, pick) in series {
        let points = latencies(pick).map(|(x, ms)| (x, ms.log10()));
        line(&mut chart, points, name, color)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)?;

    // BUSY answers (retried) and failed operations per second.
    let max_events = seconds
        .iter()
        .map(|s| s.busy.max(s.errors))
        .max()
        .unwrap_or(0)
        .max(EVENTS_AXIS_MIN) as f64;
    let caption = "BUSY answers and errors per second";
    let y_range = 0.0..max_events * 1.15;
    let mut chart = panel(&events, caption, &time, y_range, "count per second", &whole)?;
    let counts: [Series<u64>; 2] = [
        ("BUSY (retried)", BUSY_COLOR, |s| s.busy),
        ("errors", ERROR_COLOR, |s| s.errors),
    ];
    for (name, color, pick) in counts {
        let points = seconds.iter().map(move |s| (mid(s), pick(s) as f64));
        line(&mut chart, points, name, color)?;
    }
    legend(&mut chart, SeriesLabelPosition::UpperRight)
}

/// A time tick label: whole seconds unless the run is that short.
fn format_s(s: &f64) -> String {
    if (s - s.round()).abs() < 1e-6 {
        format!("{s:.0}")
    } else {
        format!("{s:.1}")
    }
}

/// A latency tick label: enough digits to tell 0.05 from 0.5 ms.
fn format_ms(ms: f64) -> String {
    if ms >= 10.0 {
        format!("{ms:.0}")
    } else if ms >= 1.0 {
        format!("{ms:.1}")
    } else if ms >= 0.1 {
        format!("{ms:.2}")
    } else {
        format!("{ms:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(second: i64, ops: u64, busy: u64, errors: u64) -> SecondStats {
        SecondStats {
            second,
            ops,
            p50_ms: 1.0,
            p99_ms: 5.0,
            p999_ms: 40.0,
            busy,
            errors,
            ..Default::default()
        }
    }

    #[test]
    fn busy_and_error_seconds_are_marked_and_counted_in_the_legend() {
        let seconds = [
            second(1, 1000, 0, 0),
            second(2, 900, 7, 0),
            second(3, 0, 0, 2),
            second(4, 950, 3, 1),
        ];
        let svg = timeline_svg("a title", &seconds).unwrap();
        assert!(svg.contains("a title"));
        assert!(
            svg.contains("second with BUSY answers (10 in all)"),
            "{svg}"
        );
        assert!(svg.contains("second with errors (3 in all)"), "{svg}");
        // A filled triangle per second with BUSY (2), plus one in the legend.
        let busy_marks = svg
            .lines()
            .filter(|l| l.starts_with("<polygon") && l.contains("fill=\"#9467BD\""))
            .count();
        assert_eq!(busy_marks, 3, "{svg}");
        // A cross (two strokes) per second with errors (2), plus the legend's.
        let error_strokes = svg
            .lines()
            .filter(|l| {
                l.contains("<line")
                    && l.contains("stroke=\"#000000\"")
                    && l.contains("stroke-width=\"2\"")
            })
            .count();
        assert_eq!(error_strokes, 6, "{svg}");
    }

    #[test]
    fn an_empty_timeline_still_draws() {
        let svg = timeline_svg("nothing ran", &[]).unwrap();
        assert!(svg.contains("latency (ms)"));
    }
}
