//! The timeline: an inline SVG with one bar per step on a time axis.
//!
//! Geometry only: every coordinate is computed here from recorded times, so
//! the template draws what it is given. A job with few steps gets one row per
//! step, labelled; past [`ROWS_MAX`] steps the bars share one lane, and past
//! [`BARS_MAX`] runs of consecutive steps merge into one bar each (coloured
//! by the worst outcome among them), so a job of any size draws a picture of
//! bounded size.

use std::fmt;

use chrono::{DateTime, Utc};

use super::text::{duration, ellipsis};

/// Up to this many executed steps, each gets a labelled row of its own.
pub(crate) const ROWS_MAX: usize = 40;

/// The most bars drawn; more steps than this merge into runs.
pub(crate) const BARS_MAX: usize = 400;

/// Width of the drawing, in SVG user units; it scales to its box.
pub(crate) const WIDTH: u32 = 960;
const LABEL_WIDTH: f64 = 250.0;
const RIGHT_PAD: f64 = 20.0;
const MARKER_LANE: f64 = 30.0;
const TOP_PAD: f64 = 6.0;
const ROW_HEIGHT: f64 = 22.0;
const BAR_HEIGHT: f64 = 14.0;
const LANE_HEIGHT: f64 = 40.0;
const AXIS_HEIGHT: f64 = 30.0;
/// Narrower bars would vanish: a step of a microsecond in an hour-long job.
const BAR_WIDTH_MIN: f64 = 2.0;
/// Tick labels closer than this would overlap.
const TICKS_MAX: u64 = 8;
/// Marker labels closer than this go on alternate lines.
const MARKER_LABEL_SPACING: f64 = 90.0;

/// A coordinate, written with one decimal: enough for a screen, and the
/// same text on every machine.
#[derive(Copy, Clone, Debug, PartialEq, PartialOrd)]
pub(crate) struct Px(pub(crate) f64);

impl fmt::Display for Px {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:.1}", self.0)
    }
}

/// How a step ended, as the timeline colours it.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Outcome {
    /// The step succeeded.
    Succeeded,
    /// The handler failed, was missing, or panicked.
    Failed,
    /// The step ran past its deadline.
    TimedOut,
    /// The executor stopped while it ran; recorded by `recover`.
    Interrupted,
    /// Started, and no outcome recorded (yet).
    InDoubt,
}

impl Outcome {
    /// The CSS class and `data-outcome` value.
    pub(crate) fn class(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed-out",
            Outcome::Interrupted => "interrupted",
            Outcome::InDoubt => "in-doubt",
        }
    }

    /// Words for the legend and hover text.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::TimedOut => "timed out",
            Outcome::Interrupted => "interrupted",
            Outcome::InDoubt => "in doubt",
        }
    }
}

/// A moment the timeline marks with a vertical line.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub(crate) enum MomentKind {
    /// A step passed its deadline.
    TimedOut,
    /// A step was found in doubt and recorded interrupted.
    Interrupted,
    /// Someone asked the job to stop.
    CancelRequested,
    /// The job stopped as asked.
    Cancelled,
    /// An executor took the job up again.
    Resumed,
}

impl MomentKind {
    pub(crate) fn class(self) -> &'static str {
        match self {
            MomentKind::TimedOut => "timed-out",
            MomentKind::Interrupted => "interrupted",
            MomentKind::CancelRequested => "cancel-requested",
            MomentKind::Cancelled => "cancelled",
            MomentKind::Resumed => "resumed",
        }
    }

    pub(crate) fn label(self) -> &'static str {
        match self {
            MomentKind::TimedOut => "timed out",
            MomentKind::Interrupted => "interrupted",
            MomentKind::CancelRequested => "cancel requested",
            MomentKind::Cancelled => "cancelled",
            MomentKind::Resumed => "resumed",
        }
    }
}

/// One executed step, as the timeline needs it.
#[derive(Clone, Debug)]
pub(crate) struct StepSpan {
    pub(crate) index: u32,
    pub(crate) step_type: String,
    pub(crate) target: String,
    pub(crate) started_at: DateTime<Utc>,
    /// When its outcome was recorded; for a step in doubt, the job's last event.
    pub(crate) ended_at: DateTime<Utc>,
    pub(crate) outcome: Outcome,
    /// The failure kind and message, for the hover text.
    pub(crate) detail: Option<String>,
}

/// A marked moment.
#[derive(Clone, Debug)]
pub(crate) struct Moment {
    pub(crate) at: DateTime<Utc>,
    pub(crate) kind: MomentKind,
    pub(crate) title: String,
}

/// A drawn bar: one step, or a run of consecutive steps.
#[derive(Clone, Debug)]
pub(crate) struct Bar {
    pub(crate) x: Px,
    pub(crate) y: Px,
    pub(crate) width: Px,
    pub(crate) height: Px,
    pub(crate) outcome: Outcome,
    /// First step of the bar.
    pub(crate) first_step: u32,
    /// Steps the bar stands for.
    pub(crate) steps: usize,
    /// Row label, in row mode.
    pub(crate) label: Option<String>,
    pub(crate) label_y: Px,
    /// Hover text.
    pub(crate) title: String,
}

/// A time-axis tick.
#[derive(Clone, Debug)]
pub(crate) struct Tick {
    pub(crate) x: Px,
    pub(crate) label: String,
}

/// A drawn moment.
#[derive(Clone, Debug)]
pub(crate) struct Marker {
    pub(crate) x: Px,
    pub(crate) label_y: Px,
    /// The line starts just under its label.
    pub(crate) line_top: Px,
    pub(crate) anchor: &'static str,
    pub(crate) kind: MomentKind,
    pub(crate) title: String,
}

/// The whole drawing.
#[derive(Clone, Debug)]
pub(crate) struct Timeline {
    pub(crate) width: u32,
    pub(crate) height: Px,
    pub(crate) plot_left: Px,
    pub(crate) plot_right: Px,
    pub(crate) plot_top: Px,
    pub(crate) plot_bottom: Px,
    pub(crate) tick_label_y: Px,
    /// Where row and lane labels end, left of the plot.
    pub(crate) label_x: Px,
    pub(crate) lane_label_y: Px,
    /// One labelled row per step (few steps), or one shared lane.
    pub(crate) rows: bool,
    pub(crate) lane_label: String,
    pub(crate) bars: Vec<Bar>,
    pub(crate) ticks: Vec<Tick>,
    pub(crate) markers: Vec<Marker>,
    /// The outcomes drawn, for the legend, in a fixed order.
    pub(crate) legend: Vec<Outcome>,
    /// Says how bars were merged, when they were.
    pub(crate) note: Option<String>,
    /// Steps that executed, for the caption.
    pub(crate) steps: usize,
}

/// Draws `steps` (in execution order) and `moments` between `start` and `end`.
pub(crate) fn draw(
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    steps: &[StepSpan],
    moments: &[Moment],
) -> Timeline {
    let rows = steps.len() <= ROWS_MAX;
    let frame = Frame::new(start, end, rows.then_some(steps.len()), !moments.is_empty());
    let (bars, note) = if rows {
        (row_bars(&frame, steps), None)
    } else {
        lane_bars(&frame, steps)
    };
    let ticks = ticks(frame.span_us as u64)
        .into_iter()
        .map(|(offset_us, label)| Tick {
            x: Px(frame.plot_left + offset_us as f64 / frame.span_us * frame.plot_width()),
            label,
        })
        .collect();
    let mut legend: Vec<Outcome> = steps.iter().map(|s| s.outcome).collect();
    legend.sort();
    legend.dedup();
    Timeline {
        width: WIDTH,
        height: Px(frame.plot_bottom + AXIS_HEIGHT),
        plot_left: Px(frame.plot_left),
        plot_right: Px(frame.plot_right),
        plot_top: Px(frame.plot_top),
        plot_bottom: Px(frame.plot_bottom),
        tick_label_y: Px(frame.plot_bottom + 18.0),
        label_x: Px(frame.plot_left - 10.0),
        lane_label_y: Px(frame.plot_top + LANE_HEIGHT / 2.0 + 4.0),
        rows,
        lane_label: match steps {
            [] => "no step ran".to_owned(),
            [only] => format!("step {}", only.index),
            [first, .., last] => format!("steps {}–{}", first.index, last.index),
        },
        bars,
        ticks,
        markers: markers(&frame, moments),
        legend,
        note,
        steps: steps.len(),
    }
}

/// The plot's place in the drawing and its time axis.
struct Frame {
    start: DateTime<Utc>,
    /// The time the axis spans, in microseconds (at least a millisecond).
    span_us: f64,
    plot_left: f64,
    plot_right: f64,
    plot_top: f64,
    plot_bottom: f64,
}

impl Frame {
    /// The frame of a drawing with a labelled row for each of `rows` steps
    /// (`None`: one shared lane), and a lane for marker labels when
    /// something is `marked`.
    fn new(start: DateTime<Utc>, end: DateTime<Utc>, rows: Option<usize>, marked: bool) -> Frame {
        let plot_top = if marked { MARKER_LANE } else { TOP_PAD };
        let lanes_height = rows.map_or(LANE_HEIGHT, |n| ROW_HEIGHT * n.max(1) as f64);
        Frame {
            start,
            // A job whose events all carry one instant still needs an axis.
            span_us: (end - start)
                .num_microseconds()
                .unwrap_or(i64::MAX)
                .max(1_000) as f64,
            plot_left: LABEL_WIDTH,
            plot_right: f64::from(WIDTH) - RIGHT_PAD,
            plot_top,
            plot_bottom: plot_top + lanes_height,
        }
    }

    fn plot_width(&self) -> f64 {
        self.plot_right - self.plot_left
    }

    /// Where `at` falls on the axis, clamped to the plot.
    fn x_of(&self, at: DateTime<Utc>) -> f64 {
        let offset = (at - self.start).num_microseconds().unwrap_or(0).max(0) as f64;
        self.plot_left + (offset / self.span_us).min(1.0) * self.plot_width()
    }

    /// The box of a bar from `first`'s start to `last`'s end: x, width.
    fn bar(&self, first: &StepSpan, last: &StepSpan) -> (Px, Px) {
        let x = self.x_of(first.started_at);
        let width = (self.x_of(last.ended_at) - x).max(BAR_WIDTH_MIN);
        // A minimum-width bar at the right edge is drawn inside the plot.
        let x = x.min(self.plot_right - width);
        (Px(x), Px(width))
    }
}

/// One labelled bar per step, a row each.
fn row_bars(frame: &Frame, steps: &[StepSpan]) -> Vec<Bar> {
    steps
        .iter()
        .enumerate()
        .map(|(row, step)| {
            let row_top = frame.plot_top + ROW_HEIGHT * row as f64;
            let (x, width) = frame.bar(step, step);
            Bar {
                x,
                y: Px(row_top + (ROW_HEIGHT - BAR_HEIGHT) / 2.0),
                width,
                height: Px(BAR_HEIGHT),
                outcome: step.outcome,
                first_step: step.index,
                steps: 1,
                label: Some(ellipsis(
                    &format!("#{} {} · {}", step.index, step.step_type, step.target),
                    36,
                )),
                label_y: Px(row_top + ROW_HEIGHT / 2.0 + 4.0),
                title: step_title(step),
            }
        })
        .collect()
}

/// The bars of one shared lane: past [`BARS_MAX`] steps, a bar per run of
/// consecutive steps, and the note that says so.
fn lane_bars(frame: &Frame, steps: &[StepSpan]) -> (Vec<Bar>, Option<String>) {
    let per_bar = steps.len().div_ceil(BARS_MAX);
    let note = (per_bar > 1).then(|| {
        format!(
            "{} steps: each bar is a run of up to {per_bar} consecutive steps, coloured by the worst outcome among them",
            steps.len()
        )
    });
    let y = frame.plot_top + (LANE_HEIGHT - 2.0 * BAR_HEIGHT) / 2.0;
    let bars = steps
        .chunks(per_bar)
        .map(|run| {
            let (first, last) = (&run[0], &run[run.len() - 1]);
            let (x, width) = frame.bar(first, last);
            Bar {
                x,
                y: Px(y),
                width,
                height: Px(2.0 * BAR_HEIGHT),
                outcome: run.iter().map(|s| s.outcome).max().unwrap_or(first.outcome),
                first_step: first.index,
                steps: run.len(),
                label: None,
                label_y: Px(0.0),
                title: if run.len() == 1 {
                    step_title(first)
                } else {
                    run_title(run)
                },
            }
        })
        .collect();
    (bars, note)
}

/// A vertical line per moment, its label above the plot.
fn markers(frame: &Frame, moments: &[Moment]) -> Vec<Marker> {
    let mut markers = Vec::with_capacity(moments.len());
    let mut last_label_x = f64::NEG_INFINITY;
    let mut lower = false;
    for moment in moments {
        let x = frame.x_of(moment.at);
        // Labels that would collide alternate between two lines.
        lower = x - last_label_x < MARKER_LABEL_SPACING && !lower;
        last_label_x = x;
        let anchor = if x < frame.plot_left + 50.0 {
            "start"
        } else if x > frame.plot_right - 50.0 {
            "end"
        } else {
            "middle"
        };
        markers.push(Marker {
            x: Px(x),
            label_y: Px(if lower { 25.0 } else { 12.0 }),
            line_top: Px(if lower { 28.0 } else { 15.0 }),
            anchor,
            kind: moment.kind,
            title: moment.title.clone(),
        });
    }
    markers
}

fn step_title(step: &StepSpan) -> String {
    let took = duration(
        (step.ended_at - step.started_at)
            .num_microseconds()
            .unwrap_or(0),
    );
    let mut title = format!(
        "Step {} · {} → {}\n{}",
        step.index,
        step.step_type,
        step.target,
        step.outcome.label()
    );
    if step.outcome == Outcome::InDoubt {
        title.push_str(": started, no outcome recorded");
    } else {
        title.push_str(&format!(" after {took}"));
    }
    title.push_str(&format!(
        "\n{} → {}",
        crate::events::format_timestamp(&step.started_at),
        crate::events::format_timestamp(&step.ended_at)
    ));
    if let Some(detail) = &step.detail {
        title.push('\n');
        title.push_str(&ellipsis(detail, 300));
    }
    title
}

fn run_title(run: &[StepSpan]) -> String {
    let (first, last) = (&run[0], &run[run.len() - 1]);
    let mut counts: Vec<(Outcome, usize)> = Vec::new();
    for step in run {
        match counts.iter_mut().find(|(o, _)| *o == step.outcome) {
            Some((_, n)) => *n += 1,
            None => counts.push((step.outcome, 1)),
        }
    }
    counts.sort();
    let counts: Vec<String> = counts
        .iter()
        .map(|(outcome, n)| format!("{n} {}", outcome.label()))
        .collect();
    let mut title = format!(
        "Steps {}–{} ({} steps): {}\n{} → {} ({})",
        first.index,
        last.index,
        run.len(),
        counts.join(", "),
        crate::events::format_timestamp(&first.started_at),
        crate::events::format_timestamp(&last.ended_at),
        duration(
            (last.ended_at - first.started_at)
                .num_microseconds()
                .unwrap_or(0)
        ),
    );
    if let Some(failed) = run.iter().find(|s| s.outcome != Outcome::Succeeded) {
        title.push_str(&format!(
            "\nStep {}: {}",
            failed.index,
            failed.outcome.label()
        ));
        if let Some(detail) = &failed.detail {
            title.push_str(&format!(": {}", ellipsis(detail, 200)));
        }
    }
    title
}

/// Nice tick steps, in microseconds: 1-2-5 decades, then whole seconds,
/// minutes, hours and days.
const TICK_STEPS_US: &[u64] = &[
    1,
    2,
    5,
    10,
    20,
    50,
    100,
    200,
    500, // µs
    1_000,
    2_000,
    5_000,
    10_000,
    20_000,
    50_000,
    100_000,
    200_000,
    500_000, // ms
    1_000_000,
    2_000_000,
    5_000_000,
    10_000_000,
    15_000_000,
    30_000_000, // s
    60_000_000,
    120_000_000,
    300_000_000,
    600_000_000,
    900_000_000,
    1_800_000_000, // min
    3_600_000_000,
    7_200_000_000,
    21_600_000_000,
    43_200_000_000,
    86_400_000_000, // h, d
];

/// Ticks from 0 to `span_us` at the smallest nice step that gives at most
/// [`TICKS_MAX`] intervals: (offset, label).
fn ticks(span_us: u64) -> Vec<(u64, String)> {
    let step = TICK_STEPS_US
        .iter()
        .copied()
        .find(|step| span_us / step <= TICKS_MAX)
        .unwrap_or_else(|| span_us.div_ceil(TICKS_MAX).max(1));
    (0..=span_us / step)
        .map(|i| {
            let offset = i * step;
            let label = if offset == 0 {
                "0".to_owned()
            } else {
                format!("+{}", duration(offset as i64))
            };
            (offset, label)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeDelta;

    fn at(ms: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(946_684_800, 0).unwrap() + TimeDelta::milliseconds(ms)
    }

    fn span(index: u32, from_ms: i64, to_ms: i64, outcome: Outcome) -> StepSpan {
        StepSpan {
            index,
            step_type: "noop".into(),
            target: "t".into(),
            started_at: at(from_ms),
            ended_at: at(to_ms),
            outcome,
            detail: None,
        }
    }

    #[test]
    fn few_steps_get_one_labelled_row_each_on_the_time_axis() {
        let steps = [
            span(0, 0, 10, Outcome::Succeeded),
            span(1, 10, 40, Outcome::Failed),
        ];
        let drawn = draw(at(0), at(40), &steps, &[]);
        assert!(drawn.rows);
        assert_eq!(drawn.bars.len(), 2);
        let (a, b) = (&drawn.bars[0], &drawn.bars[1]);
        assert_eq!(a.x, Px(LABEL_WIDTH));
        // 10 ms of 40 ms is a quarter of the plot; the second bar ends at its right edge.
        let plot = f64::from(WIDTH) - RIGHT_PAD - LABEL_WIDTH;
        assert!((a.width.0 - plot / 4.0).abs() < 1e-9);
        assert!((b.x.0 + b.width.0 - (LABEL_WIDTH + plot)).abs() < 1e-9);
        assert!(b.y.0 > a.y.0, "one row per step");
        assert_eq!(drawn.legend, [Outcome::Succeeded, Outcome::Failed]);
        assert_eq!(a.label.as_deref(), Some("#0 noop · t"));
        assert!(b.title.contains("failed after 30 ms"), "{}", b.title);
    }

    #[test]
    fn many_steps_merge_into_bounded_runs_that_keep_the_worst_outcome() {
        let n = 10_000;
        let mut steps: Vec<StepSpan> = (0..n)
            .map(|i| span(i, i64::from(i), i64::from(i) + 1, Outcome::Succeeded))
            .collect();
        steps[7_777].outcome = Outcome::TimedOut;
        let drawn = draw(at(0), at(i64::from(n)), &steps, &[]);
        assert!(!drawn.rows);
        assert_eq!(drawn.bars.len(), BARS_MAX);
        assert_eq!(
            drawn.bars.iter().map(|b| b.steps).sum::<usize>(),
            n as usize
        );
        let worst: Vec<&Bar> = drawn
            .bars
            .iter()
            .filter(|b| b.outcome != Outcome::Succeeded)
            .collect();
        assert_eq!(worst.len(), 1);
        assert_eq!(worst[0].outcome, Outcome::TimedOut);
        assert!(
            worst[0].title.contains("Step 7777: timed out"),
            "{}",
            worst[0].title
        );
        assert!(drawn.note.unwrap().contains("up to 25 consecutive steps"));
    }

    #[test]
    fn ticks_are_round_and_few() {
        let labels = |span| -> Vec<String> { ticks(span).into_iter().map(|(_, l)| l).collect() };
        assert_eq!(
            labels(5_000),
            ["0", "+1 ms", "+2 ms", "+3 ms", "+4 ms", "+5 ms"]
        );
        assert_eq!(
            labels(1_000),
            ["0", "+200 µs", "+400 µs", "+600 µs", "+800 µs", "+1 ms"]
        );
        assert_eq!(labels(3_600_000_000)[1], "+10 min");
        for span in [1, 999, 12_345, 7_000_000, 99_999_999_999, u64::MAX / 2] {
            let n = ticks(span).len() as u64;
            assert!(
                (2..=TICKS_MAX + 1).contains(&n) || span < 8,
                "{span}: {n} ticks"
            );
        }
    }

    #[test]
    fn a_job_of_one_instant_and_markers_at_the_edges_stay_inside() {
        let steps = [span(0, 0, 0, Outcome::InDoubt)];
        let moments = [Moment {
            at: at(0),
            kind: MomentKind::Resumed,
            title: "resumed".into(),
        }];
        let drawn = draw(at(0), at(0), &steps, &moments);
        assert_eq!(drawn.bars[0].width, Px(BAR_WIDTH_MIN));
        assert_eq!(drawn.markers[0].anchor, "start");
        assert!(drawn.bars[0].title.contains("no outcome recorded"));
    }
}
