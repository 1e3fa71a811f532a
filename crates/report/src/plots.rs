//! PNG line plots of a stage's metrics (which plots a stage kind gets, and drawing them with
//! plotters' bitmap backend). Text is drawn with the DejaVu Sans subset embedded in this crate,
//! so no system font is needed.
use std::io::BufWriter;
use std::path::Path;
use std::sync::OnceLock;

use anyhow::{anyhow, Context, Result};
use plotters::prelude::*;

use crate::run::{MetricLog, Stage, StageKind};
use align_runs::metrics;

/// Printable ASCII and a few symbols of DejaVu Sans (licence in `assets/LICENSE-DejaVu.txt`).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans-subset.ttf");
const FONT_FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters once per process.
fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_ok());
    if ok {
        Ok(())
    } else {
        Err(anyhow!("the embedded plot font could not be loaded"))
    }
}

/// Where a plotted series comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A field of the training lines.
    Train(&'static str),
    /// A field of the evaluation lines (drawn with markers).
    Eval(&'static str),
}

/// One plot a stage kind gets when any of its series is present.
#[derive(Debug, Clone, PartialEq)]
pub struct PlotSpec {
    /// File-name part: `<stage>_<slug>.png`.
    pub slug: &'static str,
    pub title: &'static str,
    pub y_label: &'static str,
    pub series: Vec<(&'static str, Source)>,
}

fn spec(slug: &'static str, title: &'static str, y_label: &'static str, series: &[(&'static str, Source)]) -> PlotSpec {
    PlotSpec { slug, title, y_label, series: series.to_vec() }
}

/// The plots of a stage kind, in the order the report shows them (None = a stage whose kind
/// is not known yet: the generic training plots).
pub fn plot_specs(kind: Option<StageKind>) -> Vec<PlotSpec> {
    use Source::{Eval, Train};
    let loss =
        spec("loss", "loss", "loss", &[("train loss", Train(metrics::LOSS)), ("eval loss", Eval(metrics::EVAL_LOSS))]);
    let lr = spec("lr", "learning rate", "lr", &[("lr", Train(metrics::LR))]);
    let grad =
        spec("grad_norm", "gradient norm (before clipping)", "grad norm", &[("grad norm", Train(metrics::GRAD_NORM))]);
    match kind {
        None | Some(StageKind::Pretrain) | Some(StageKind::Sft) => vec![loss, lr, grad],
        Some(StageKind::Reward) => vec![
            loss,
            spec(
                "accuracy",
                "pairwise accuracy (chosen scored above rejected)",
                "accuracy",
                &[("train accuracy", Train("accuracy")), ("eval accuracy", Eval("eval_accuracy"))],
            ),
            spec(
                "rewards",
                "rewards",
                "reward",
                &[
                    ("chosen", Train("chosen_reward")),
                    ("rejected", Train("rejected_reward")),
                    ("margin", Train("margin")),
                    ("eval margin", Eval("eval_margin")),
                ],
            ),
            lr,
            grad,
        ],
        Some(StageKind::Dpo) => vec![
            loss,
            spec(
                "margins",
                "implicit rewards and margin",
                "reward",
                &[
                    ("chosen", Train("rewards/chosen")),
                    ("rejected", Train("rewards/rejected")),
                    ("margin", Train(metrics::REWARDS_MARGINS)),
                    ("eval margin", Eval("eval_rewards/margins")),
                ],
            ),
            spec(
                "accuracy",
                "reward accuracy (chosen above rejected)",
                "accuracy",
                &[("train", Train(metrics::REWARDS_ACCURACIES)), ("eval", Eval("eval_rewards/accuracies"))],
            ),
            spec(
                "logps",
                "log-probabilities of the answers",
                "log p",
                &[("chosen", Train("logps/chosen")), ("rejected", Train("logps/rejected"))],
            ),
            lr,
            grad,
        ],
        Some(StageKind::Ppo) => vec![
            spec(
                "reward",
                "reward",
                "reward",
                &[("rlhf reward (score - KL)", Train(metrics::RLHF_REWARD)), ("score", Train(metrics::SCORES))],
            ),
            spec("kl", "KL to the reference policy", "KL (nats)", &[("kl", Train(metrics::KL))]),
            spec(
                "response_length",
                "response length",
                "tokens",
                &[("mean response length", Train(metrics::RESPONSE_LENGTH))],
            ),
            spec("eos_rate", "answers ending on eos", "fraction", &[("eos rate", Train(metrics::EOS_RATE))]),
            spec(
                "policy",
                "policy update",
                "value",
                &[("approx KL", Train("policy/approxkl")), ("clip fraction", Train("policy/clipfrac"))],
            ),
            spec("entropy", "policy entropy", "entropy", &[("entropy", Train(metrics::ENTROPY))]),
            spec("value_loss", "value loss", "loss", &[("value loss", Train(metrics::VF_LOSS))]),
            lr,
            grad,
        ],
        Some(StageKind::Grpo) | Some(StageKind::Rloo) | Some(StageKind::ReinforcePp) => vec![
            spec(
                "reward",
                "reward (weighted sum of the reward functions)",
                "reward",
                &[("reward", Train("reward")), ("reward std", Train("reward_std"))],
            ),
            spec("kl", "KL to the reference policy", "KL (nats)", &[("kl", Train("kl"))]),
            spec(
                "completion_length",
                "completion length",
                "tokens",
                &[("mean", Train("completions/mean_length")), ("max", Train("completions/max_length"))],
            ),
            spec(
                "clip_ratio",
                "clipped tokens",
                "fraction",
                &[
                    ("region", Train("clip_ratio/region_mean")),
                    ("zero-std groups", Train("frac_reward_zero_std")),
                    ("truncated", Train("completions/clipped_ratio")),
                ],
            ),
            spec("entropy", "policy entropy", "entropy", &[("entropy", Train("entropy"))]),
            loss,
            lr,
            grad,
        ],
        Some(StageKind::Eval) | Some(StageKind::Tokenizer) | Some(StageKind::Init) => Vec::new(),
        Some(StageKind::Kto) => vec![
            loss,
            spec(
                "margins",
                "implicit rewards of desirable and undesirable completions",
                "reward",
                &[
                    ("desirable", Train("rewards/chosen")),
                    ("undesirable", Train("rewards/rejected")),
                    ("margin", Train(metrics::REWARDS_MARGINS)),
                    ("eval margin", Eval("eval_rewards/margins")),
                ],
            ),
            spec("kl", "KL reference point z0", "KL (nats)", &[("kl", Train("kl"))]),
            lr,
            grad,
        ],
        Some(StageKind::Distill) => vec![
            loss,
            spec(
                "divergence",
                "divergence to the teacher per completion token",
                "divergence",
                &[("train", Train("divergence")), ("eval", Eval("eval_divergence"))],
            ),
            lr,
            grad,
        ],
    }
}

/// One drawn series.
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub label: String,
    /// Finite `(step, value)` points.
    pub points: Vec<(f64, f64)>,
    pub markers: bool,
}

/// Everything one PNG shows.
#[derive(Debug, Clone, PartialEq)]
pub struct Plot {
    pub slug: String,
    pub title: String,
    pub y_label: String,
    pub lines: Vec<Line>,
    /// Steps whose loss was not finite (their update was skipped): red crosses on the x axis of
    /// the loss plot.
    pub nonfinite_steps: Vec<f64>,
}

fn line_of(log: &MetricLog, label: &str, source: Source) -> Option<Line> {
    let (series, markers) = match source {
        Source::Train(name) => (log.series(name), false),
        Source::Eval(name) => (log.eval_series(name), true),
    };
    let points: Vec<(f64, f64)> = series.into_iter().filter(|p| p.1.is_finite()).map(|(s, v)| (s as f64, v)).collect();
    (!points.is_empty()).then(|| Line { label: label.to_string(), points, markers })
}

/// The plots of a stage that have data (a plot is left out when none of its series is logged).
pub fn stage_plots(stage: &Stage) -> Vec<Plot> {
    plot_specs(stage.kind())
        .into_iter()
        .filter_map(|spec| {
            let lines: Vec<Line> =
                spec.series.iter().filter_map(|(label, source)| line_of(&stage.metrics, label, *source)).collect();
            let nonfinite_steps = if spec.slug == "loss" {
                stage
                    .metrics
                    .train
                    .iter()
                    .filter(|l| l.skipped_nonfinite || l.values.get(metrics::LOSS).is_some_and(|v| !v.is_finite()))
                    .map(|l| l.step as f64)
                    .collect()
            } else {
                Vec::new()
            };
            (!lines.is_empty()).then(|| Plot {
                slug: spec.slug.to_string(),
                title: format!("{}: {}", stage.name, spec.title),
                y_label: spec.y_label.to_string(),
                lines,
                nonfinite_steps,
            })
        })
        .collect()
}

/// An axis range around `values` with 5% padding (a flat or single value gets a visible band).
pub fn axis_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        let pad = (hi.abs() * 0.1).max(1e-3);
        return (lo - pad, hi + pad);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

/// An axis tick: up to 4 significant digits, scientific notation for very small or large values.
pub fn tick_label(v: f64) -> String {
    let a = v.abs();
    if a < 1e-12 {
        return "0".to_string();
    }
    if !(1e-3..1e5).contains(&a) {
        return format!("{v:.1e}");
    }
    let decimals = (3 - a.log10().floor() as i32).clamp(0, 6) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// A corner of the plot area for the legend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Corner {
    UpperRight,
    UpperLeft,
    LowerRight,
    LowerLeft,
}

impl Corner {
    fn position(self) -> SeriesLabelPosition {
        match self {
            Corner::UpperRight => SeriesLabelPosition::UpperRight,
            Corner::UpperLeft => SeriesLabelPosition::UpperLeft,
            Corner::LowerRight => SeriesLabelPosition::LowerRight,
            Corner::LowerLeft => SeriesLabelPosition::LowerLeft,
        }
    }
}

/// The corner whose box (40% of the width, 30% of the height) holds the fewest points, upper
/// right first on ties, so the legend hides as little data as possible.
pub fn legend_corner(plot: &Plot, xs: (f64, f64), ys: (f64, f64)) -> Corner {
    let fx = |x: f64| (x - xs.0) / (xs.1 - xs.0).max(f64::MIN_POSITIVE);
    let fy = |y: f64| (y - ys.0) / (ys.1 - ys.0).max(f64::MIN_POSITIVE);
    let corners = [Corner::UpperRight, Corner::UpperLeft, Corner::LowerRight, Corner::LowerLeft];
    let count = |c: Corner| {
        plot.lines
            .iter()
            .flat_map(|l| l.points.iter())
            .filter(|&&(x, y)| {
                let (x, y) = (fx(x), fy(y));
                let in_x = matches!(c, Corner::UpperRight | Corner::LowerRight) && x >= 0.6
                    || matches!(c, Corner::UpperLeft | Corner::LowerLeft) && x <= 0.4;
                let in_y = matches!(c, Corner::UpperRight | Corner::UpperLeft) && y >= 0.7
                    || matches!(c, Corner::LowerRight | Corner::LowerLeft) && y <= 0.3;
                in_x && in_y
            })
            .count()
    };
    corners.into_iter().min_by_key(|&c| count(c)).unwrap_or(Corner::UpperRight)
}

const PALETTE: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
];

/// Plot size in pixels.
pub const PLOT_SIZE: (u32, u32) = (900, 420);

fn draw<'a>(plot: &Plot, buf: &'a mut [u8], size: (u32, u32)) -> Result<(), Box<dyn std::error::Error + 'a>> {
    let root = BitMapBackend::with_buffer(buf, size).into_drawing_area();
    root.fill(&WHITE)?;
    let xs = axis_range(
        plot.lines.iter().flat_map(|l| l.points.iter().map(|p| p.0)).chain(plot.nonfinite_steps.iter().copied()),
    );
    let ys = axis_range(plot.lines.iter().flat_map(|l| l.points.iter().map(|p| p.1)));
    let mut chart = ChartBuilder::on(&root)
        .caption(&plot.title, (FONT_FAMILY, 22).into_font())
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(70)
        .build_cartesian_2d(xs.0..xs.1, ys.0..ys.1)?;
    chart
        .configure_mesh()
        .light_line_style(RGBColor(246, 246, 246))
        .bold_line_style(RGBColor(215, 215, 215))
        .x_desc("step")
        .y_desc(plot.y_label.as_str())
        .axis_desc_style((FONT_FAMILY, 15))
        .label_style((FONT_FAMILY, 13))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .y_label_formatter(&|v| tick_label(*v))
        .draw()?;
    for (i, line) in plot.lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let style = ShapeStyle::from(&color).stroke_width(2);
        chart
            .draw_series(LineSeries::new(line.points.iter().copied(), style))?
            .label(line.label.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
        if line.markers {
            chart.draw_series(line.points.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
        }
    }
    if !plot.nonfinite_steps.is_empty() {
        let y = ys.0 + (ys.1 - ys.0) * 0.03;
        let red = RGBColor(214, 39, 40);
        chart
            .draw_series(plot.nonfinite_steps.iter().map(|&x| Cross::new((x, y), 5, red.stroke_width(2))))?
            .label("non-finite step (skipped)")
            .legend(move |(x, y)| Cross::new((x + 10, y), 5, red.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .position(legend_corner(plot, xs, ys).position())
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(180, 180, 180))
        .label_font((FONT_FAMILY, 14))
        .draw()?;
    root.present()?;
    Ok(())
}

/// Draws `plot` into a PNG file at `path`.
pub fn render_png(plot: &Plot, path: &Path) -> Result<()> {
    ensure_font()?;
    let (w, h) = PLOT_SIZE;
    let mut buf = vec![0u8; (w * h * 3) as usize];
    draw(plot, &mut buf, (w, h)).map_err(|e| anyhow!("{}: cannot draw the plot: {e}", path.display()))?;
    let file = std::fs::File::create(path).with_context(|| format!("{}: cannot create", path.display()))?;
    let mut encoder = png::Encoder::new(BufWriter::new(file), w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().with_context(|| format!("{}: cannot write", path.display()))?;
    writer.write_image_data(&buf).with_context(|| format!("{}: cannot write", path.display()))?;
    writer.finish().with_context(|| format!("{}: cannot write", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(1.5), "1.5");
        assert_eq!(tick_label(2.0), "2");
        assert_eq!(tick_label(0.123456), "0.1235");
        assert_eq!(tick_label(1234.0), "1234");
        assert_eq!(tick_label(3e-5), "3.0e-5");
    }

    #[test]
    fn ranges_are_padded_and_never_empty() {
        assert_eq!(axis_range([0.0, 10.0].into_iter()), (-0.5, 10.5));
        let (lo, hi) = axis_range([2.0].into_iter());
        assert!(lo < 2.0 && hi > 2.0);
        assert_eq!(axis_range(std::iter::empty()), (0.0, 1.0));
    }

    #[test]
    fn the_legend_goes_where_the_data_is_not() {
        let line = |points: Vec<(f64, f64)>| Plot {
            slug: "x".into(),
            title: "x".into(),
            y_label: "y".into(),
            lines: vec![Line { label: "a".into(), points, markers: false }],
            nonfinite_steps: Vec::new(),
        };
        // a falling loss leaves the upper right empty
        let falling = line((0..10).map(|i| (i as f64, 10.0 - i as f64)).collect());
        assert_eq!(legend_corner(&falling, (0.0, 9.0), (1.0, 10.0)), Corner::UpperRight);
        // a rising reward fills the upper right and leaves the upper left
        let rising = line((0..10).map(|i| (i as f64, i as f64)).collect());
        assert_eq!(legend_corner(&rising, (0.0, 9.0), (0.0, 9.0)), Corner::UpperLeft);
    }

    #[test]
    fn every_training_kind_plots_its_loss_or_reward() {
        for kind in [StageKind::Pretrain, StageKind::Sft, StageKind::Reward, StageKind::Dpo] {
            assert_eq!(plot_specs(Some(kind))[0].slug, "loss");
        }
        let ppo: Vec<&str> = plot_specs(Some(StageKind::Ppo)).iter().map(|s| s.slug).collect();
        assert!(ppo.starts_with(&["reward", "kl", "response_length"]));
        assert!(plot_specs(Some(StageKind::Eval)).is_empty());
    }
}
