//! One-line health diagnosis of a training stage from its metrics: diverging, KL runaway, NaN
//! steps, over-fitting, loss not decreasing, or healthy. Every rule is a pure function of
//! numbers, so each is unit-tested on hand-made series; `docs/report.md` states the rules.
use std::fmt;

use crate::run::{MetricLog, StageKind};
use align_runs::metrics;

/// The knobs of the rules (the defaults are what `align report` and `align status` use).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// The "first" and "last" windows are this fraction of the finite steps (at least one step).
    pub window_fraction: f64,
    /// The loss counts as decreasing when the last window's mean is below the first window's
    /// mean by more than this fraction of its magnitude.
    pub min_decrease: f64,
    /// Diverging: the last window's mean is above the lowest window mean by more than this
    /// fraction of max(|lowest|, |first| / 10).
    pub diverge_rise: f64,
    /// Over-fitting: this many last evaluations each rose over the one before.
    pub overfit_evals: usize,
    /// KL runaway: the last window's mean of `objective/kl` is above this (nats).
    pub kl_bound: f64,
}

impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { window_fraction: 0.2, min_decrease: 0.01, diverge_rise: 0.5, overfit_evals: 3, kl_bound: 10.0 }
    }
}

/// What `diagnose` found; `Display` gives the one line.
#[derive(Debug, Clone, PartialEq)]
pub enum Diagnosis {
    /// No training lines.
    NoMetrics,
    /// The last step's loss is not finite.
    DivergingNonFinite { step: u64 },
    /// The loss rose sharply from its lowest window to the end.
    Diverging { low: f64, last: f64 },
    /// PPO: the KL to the reference is not finite or above the bound.
    KlRunaway { kl: f64, bound: f64 },
    /// Steps whose loss or gradient was not finite (and were skipped), but the run recovered.
    NanSteps { count: usize, steps: usize },
    /// The eval loss rose over the last evaluations while the train loss fell.
    OverFitting { eval_from: f64, eval_to: f64, train_from: f64, train_to: f64, evals: usize },
    /// The loss's last window is not below its first.
    NotDecreasing { first: f64, last: f64 },
    /// PPO: the reward's last window is not above its first.
    RewardNotIncreasing { first: f64, last: f64 },
    /// Nothing wrong: `metric` went from `from` (first window) to `to` (last window).
    Healthy { metric: &'static str, from: f64, to: f64 },
}

impl Diagnosis {
    /// True for the `Healthy` verdict.
    pub fn is_healthy(&self) -> bool {
        matches!(self, Diagnosis::Healthy { .. })
    }
}

/// A number as the diagnosis and status lines show it: 4 significant-ish digits.
pub fn format_value(v: f64) -> String {
    if !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e5).contains(&a) {
        format!("{v:.3e}")
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

impl fmt::Display for Diagnosis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v = format_value;
        match self {
            Diagnosis::NoMetrics => write!(f, "no metrics yet"),
            Diagnosis::DivergingNonFinite { step } => write!(f, "diverging: loss is not finite at the last step ({step})"),
            Diagnosis::Diverging { low, last } => {
                write!(f, "diverging: loss rose from {} (lowest) to {} (last 20%)", v(*low), v(*last))
            }
            Diagnosis::KlRunaway { kl, bound } => {
                write!(f, "KL runaway: objective/kl at {} (bound {})", v(*kl), v(*bound))
            }
            Diagnosis::NanSteps { count, steps } => write!(f, "NaN steps: {count} (of {steps})"),
            Diagnosis::OverFitting { eval_from, eval_to, train_from, train_to, evals } => write!(
                f,
                "over-fitting: eval loss rose over the last {evals} evaluations ({} → {}) while train loss fell ({} → {})",
                v(*eval_from),
                v(*eval_to),
                v(*train_from),
                v(*train_to)
            ),
            Diagnosis::NotDecreasing { first, last } => {
                write!(f, "loss not decreasing: {} (first 20%) → {} (last 20%)", v(*first), v(*last))
            }
            Diagnosis::RewardNotIncreasing { first, last } => {
                write!(f, "reward not increasing: {} (first 20%) → {} (last 20%)", v(*first), v(*last))
            }
            Diagnosis::Healthy { metric, from, to } => {
                let verb = if to < from { "fell" } else { "rose" };
                write!(f, "healthy: {metric} {verb} from {} to {}", v(*from), v(*to))
            }
        }
    }
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

/// The window length for `n` values: `fraction · n` rounded up, at least 1.
pub fn window_len(n: usize, fraction: f64) -> usize {
    ((n as f64 * fraction).ceil() as usize).clamp(1, n.max(1))
}

/// Means of the first and the last `fraction` of `values` (None when empty).
pub fn window_means(values: &[f64], fraction: f64) -> Option<(f64, f64)> {
    if values.is_empty() {
        return None;
    }
    let w = window_len(values.len(), fraction);
    Some((mean(&values[..w]), mean(&values[values.len() - w..])))
}

/// The lowest mean of `w` consecutive values.
pub fn lowest_window_mean(values: &[f64], w: usize) -> Option<f64> {
    if values.is_empty() || w == 0 {
        return None;
    }
    let w = w.min(values.len());
    values.windows(w).map(mean).min_by(f64::total_cmp)
}

/// Steps whose update was skipped or whose loss is not finite.
pub fn count_nonfinite_steps(log: &MetricLog) -> usize {
    log.train
        .iter()
        .filter(|l| l.skipped_nonfinite || l.values.get(metrics::LOSS).is_some_and(|v| !v.is_finite()))
        .count()
}

/// Diverging: the last window's mean is above the lowest window mean by more than
/// `rise · max(|lowest|, |first| / 10)`. Returns (lowest, last).
pub fn loss_divergence(losses: &[f64], t: &Thresholds) -> Option<(f64, f64)> {
    let (first, last) = window_means(losses, t.window_fraction)?;
    let low = lowest_window_mean(losses, window_len(losses.len(), t.window_fraction))?;
    let scale = low.abs().max(first.abs() / 10.0).max(1e-12);
    (last - low > t.diverge_rise * scale).then_some((low, last))
}

/// Over-fitting: the last `t.overfit_evals` eval losses each rose over the previous one, and the
/// train loss fell over the same span (mean of the last train window up to the first of those
/// evaluations → mean of the last train window up to the last one). Non-finite points are
/// ignored. Returns the diagnosis.
pub fn overfitting(train: &[(u64, f64)], eval: &[(u64, f64)], t: &Thresholds) -> Option<Diagnosis> {
    let k = t.overfit_evals.max(2);
    let eval: Vec<(u64, f64)> = eval.iter().copied().filter(|p| p.1.is_finite()).collect();
    let train: Vec<(u64, f64)> = train.iter().copied().filter(|p| p.1.is_finite()).collect();
    if eval.len() < k || train.is_empty() {
        return None;
    }
    let tail = &eval[eval.len() - k..];
    if !tail.windows(2).all(|p| p[1].1 > p[0].1) {
        return None;
    }
    let w = window_len(train.len(), t.window_fraction / 2.0);
    let train_mean_upto = |step: u64| {
        let upto: Vec<f64> = train.iter().filter(|p| p.0 <= step).map(|p| p.1).collect();
        (!upto.is_empty()).then(|| mean(&upto[upto.len().saturating_sub(w)..]))
    };
    let train_from = train_mean_upto(tail[0].0)?;
    let train_to = train_mean_upto(tail[k - 1].0)?;
    (train_to < train_from).then_some(Diagnosis::OverFitting {
        eval_from: tail[0].1,
        eval_to: tail[k - 1].1,
        train_from,
        train_to,
        evals: k,
    })
}

/// KL runaway: a non-finite KL, or the last window's mean above `bound`. Returns the KL shown.
pub fn kl_runaway(kl: &[f64], t: &Thresholds) -> Option<f64> {
    if let Some(bad) = kl.iter().rev().find(|v| !v.is_finite()) {
        return Some(*bad);
    }
    let (_, last) = window_means(kl, t.window_fraction)?;
    (last > t.kl_bound).then_some(last)
}

fn finite(series: &[(u64, f64)]) -> Vec<f64> {
    series.iter().map(|p| p.1).filter(|v| v.is_finite()).collect()
}

/// The diagnosis of one stage's metrics. Rules, first match wins: diverging (the last step's
/// loss is not finite, or the loss rose sharply from its lowest window), KL runaway (PPO), NaN
/// steps, over-fitting, loss not decreasing (PPO: reward not increasing), else healthy.
pub fn diagnose(kind: Option<StageKind>, log: &MetricLog, t: &Thresholds) -> Diagnosis {
    if log.train.is_empty() {
        return Diagnosis::NoMetrics;
    }
    let is_ppo = kind == Some(StageKind::Ppo);
    let loss_series = log.series(metrics::LOSS);
    if let Some(last) = log.train.last() {
        let loss_bad = last.values.get(metrics::LOSS).is_some_and(|v| !v.is_finite());
        if (loss_bad || last.skipped_nonfinite) && !loss_series.is_empty() {
            return Diagnosis::DivergingNonFinite { step: last.step };
        }
    }
    let losses = finite(&loss_series);
    if !is_ppo {
        if let Some((low, last)) = loss_divergence(&losses, t) {
            return Diagnosis::Diverging { low, last };
        }
    }
    if is_ppo {
        let kl: Vec<f64> = log.series(metrics::KL).iter().map(|p| p.1).collect();
        if let Some(kl) = kl_runaway(&kl, t) {
            return Diagnosis::KlRunaway { kl, bound: t.kl_bound };
        }
    }
    let nan = count_nonfinite_steps(log);
    if nan > 0 {
        return Diagnosis::NanSteps { count: nan, steps: log.train.len() };
    }
    if let Some(d) = overfitting(&loss_series, &log.eval_series(metrics::EVAL_LOSS), t) {
        return d;
    }
    if is_ppo {
        let reward = [metrics::RLHF_REWARD, metrics::SCORES]
            .into_iter()
            .map(|name| (name, finite(&log.series(name))))
            .find(|(_, v)| !v.is_empty());
        if let Some((name, values)) = reward {
            let Some((first, last)) = window_means(&values, t.window_fraction) else {
                return Diagnosis::NoMetrics;
            };
            if last <= first {
                return Diagnosis::RewardNotIncreasing { first, last };
            }
            let metric = if name == metrics::SCORES { "score" } else { "reward" };
            return Diagnosis::Healthy { metric, from: first, to: last };
        }
    }
    let Some((first, last)) = window_means(&losses, t.window_fraction) else {
        return Diagnosis::NoMetrics;
    };
    if losses.len() < 2 || last >= first - t.min_decrease * first.abs() {
        return Diagnosis::NotDecreasing { first, last };
    }
    Diagnosis::Healthy { metric: metrics::LOSS, from: first, to: last }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::MetricLine;

    fn log_of(losses: &[f64]) -> MetricLog {
        let train = losses
            .iter()
            .enumerate()
            .map(|(i, &v)| MetricLine {
                step: i as u64 + 1,
                values: [("loss".to_string(), v)].into_iter().collect(),
                skipped_nonfinite: !v.is_finite(),
            })
            .collect();
        MetricLog { train, eval: Vec::new() }
    }

    fn with_eval(mut log: MetricLog, evals: &[(u64, f64)]) -> MetricLog {
        log.eval = evals
            .iter()
            .map(|&(step, v)| MetricLine {
                step,
                values: [("eval_loss".to_string(), v)].into_iter().collect(),
                skipped_nonfinite: false,
            })
            .collect();
        log
    }

    fn t() -> Thresholds {
        Thresholds::default()
    }

    #[test]
    fn window_means_use_a_fifth_of_the_steps_rounded_up() {
        // 10 values: windows of 2
        let v = [10.0, 8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0];
        assert_eq!(window_means(&v, 0.2), Some((9.0, 0.5)));
        // 3 values: windows of 1
        assert_eq!(window_means(&[3.0, 2.0, 1.0], 0.2), Some((3.0, 1.0)));
        assert_eq!(window_means(&[], 0.2), None);
        assert_eq!(lowest_window_mean(&[4.0, 1.0, 2.0, 5.0], 2), Some(1.5));
    }

    #[test]
    fn falling_loss_is_healthy_with_first_and_last_window_means() {
        let d = diagnose(Some(StageKind::Sft), &log_of(&[2.0, 1.75, 1.5, 1.25, 1.0, 1.0, 0.75, 0.75, 0.5, 0.5]), &t());
        // 10 steps: windows of 2
        assert_eq!(d, Diagnosis::Healthy { metric: "loss", from: 1.875, to: 0.5 });
        assert_eq!(d.to_string(), "healthy: loss fell from 1.8750 to 0.5000");
    }

    #[test]
    fn flat_loss_is_not_decreasing() {
        let d = diagnose(Some(StageKind::Pretrain), &log_of(&[2.0, 2.1, 1.95, 2.05, 2.0]), &t());
        assert_eq!(d, Diagnosis::NotDecreasing { first: 2.0, last: 2.0 });
        assert_eq!(d.to_string(), "loss not decreasing: 2.0000 (first 20%) → 2.0000 (last 20%)");
        // a 0.5% fall is inside the 1% tolerance
        let d = diagnose(Some(StageKind::Sft), &log_of(&[2.0, 2.0, 2.0, 2.0, 1.99]), &t());
        assert!(matches!(d, Diagnosis::NotDecreasing { .. }), "{d}");
    }

    #[test]
    fn rising_or_nonfinite_loss_is_diverging() {
        // 2.0 → 3.5: lowest window 2.0, rise 1.5 > 0.5 · 2.0
        let d = diagnose(Some(StageKind::Sft), &log_of(&[2.0, 2.2, 2.6, 3.0, 3.5]), &t());
        assert_eq!(d, Diagnosis::Diverging { low: 2.0, last: 3.5 });
        // fell to 0.5 then came back up: last window (0.75 + 1.25) / 2 = 1.0 > 0.5 + 0.5 · 0.5
        let d = diagnose(Some(StageKind::Dpo), &log_of(&[2.0, 1.0, 0.5, 0.5, 0.75, 1.25]), &t());
        assert_eq!(d, Diagnosis::Diverging { low: 0.5, last: 1.0 });
        // a NaN at the last step
        let d = diagnose(Some(StageKind::Sft), &log_of(&[2.0, 1.5, f64::NAN]), &t());
        assert_eq!(d, Diagnosis::DivergingNonFinite { step: 3 });
        assert_eq!(d.to_string(), "diverging: loss is not finite at the last step (3)");
        // noise around a small loss is not divergence: 0.693 → 0.01 with ±0.01 noise
        let d = diagnose(Some(StageKind::Dpo), &log_of(&[0.693, 0.3, 0.05, 0.01, 0.02, 0.01, 0.015, 0.02]), &t());
        assert!(d.is_healthy(), "{d}");
    }

    #[test]
    fn skipped_steps_are_counted_when_the_run_recovered() {
        let log = log_of(&[2.0, f64::NAN, 1.5, f64::NAN, 1.0, 0.8]);
        assert_eq!(count_nonfinite_steps(&log), 2);
        let d = diagnose(Some(StageKind::Sft), &log, &t());
        assert_eq!(d, Diagnosis::NanSteps { count: 2, steps: 6 });
        assert_eq!(d.to_string(), "NaN steps: 2 (of 6)");
    }

    #[test]
    fn rising_eval_loss_while_train_falls_is_overfitting() {
        let train: Vec<f64> = (0..20).map(|i| 2.0 - i as f64 * 0.08).collect();
        let log = with_eval(log_of(&train), &[(5, 1.6), (10, 1.5), (15, 1.55), (20, 1.7)]);
        let d = diagnose(Some(StageKind::Sft), &log, &t());
        // w = ceil(20 · 0.1) = 2: train mean of steps 9..10 = (2.0-0.64 + 2.0-0.72)/2 = 1.32,
        // of steps 19..20 = (2.0-1.44 + 2.0-1.52)/2 = 0.52
        match d {
            Diagnosis::OverFitting { eval_from, eval_to, train_from, train_to, evals } => {
                assert_eq!((eval_from, eval_to, evals), (1.5, 1.7, 3));
                assert!((train_from - 1.32).abs() < 1e-9 && (train_to - 0.52).abs() < 1e-9);
            }
            other => panic!("{other}"),
        }
        // eval loss that dipped at the end is fine
        let log = with_eval(log_of(&train), &[(5, 1.6), (10, 1.5), (15, 1.55), (20, 1.52)]);
        assert!(diagnose(Some(StageKind::Sft), &log, &t()).is_healthy());
        // fewer than 3 evaluations cannot show it
        assert!(overfitting(&log_of(&train).series("loss"), &[(10, 1.5), (20, 1.7)], &t()).is_none());
    }

    fn ppo_log(kl: &[f64], reward: &[f64]) -> MetricLog {
        let train = kl
            .iter()
            .zip(reward)
            .enumerate()
            .map(|(i, (&k, &r))| MetricLine {
                step: i as u64 + 1,
                values: [
                    ("loss".to_string(), 0.1),
                    ("objective/kl".to_string(), k),
                    ("objective/rlhf_reward".to_string(), r),
                ]
                .into_iter()
                .collect(),
                skipped_nonfinite: false,
            })
            .collect();
        MetricLog { train, eval: Vec::new() }
    }

    #[test]
    fn ppo_kl_beyond_the_bound_is_a_runaway() {
        let d = diagnose(Some(StageKind::Ppo), &ppo_log(&[0.1, 1.0, 4.0, 9.0, 15.0], &[0.0; 5]), &t());
        assert_eq!(d, Diagnosis::KlRunaway { kl: 15.0, bound: 10.0 });
        assert_eq!(d.to_string(), "KL runaway: objective/kl at 15.0000 (bound 10.0000)");
        assert!(kl_runaway(&[0.1, f64::NAN, 0.2], &t()).is_some_and(f64::is_nan));
        assert_eq!(kl_runaway(&[0.1, 0.5, 2.0], &t()), None);
    }

    #[test]
    fn ppo_health_follows_the_reward() {
        let d = diagnose(Some(StageKind::Ppo), &ppo_log(&[0.1, 0.2, 0.3, 0.3, 0.4], &[0.0, 0.1, 0.3, 0.4, 0.6]), &t());
        assert_eq!(d, Diagnosis::Healthy { metric: "reward", from: 0.0, to: 0.6 });
        assert_eq!(d.to_string(), "healthy: reward rose from 0.0000 to 0.6000");
        let d = diagnose(Some(StageKind::Ppo), &ppo_log(&[0.1; 5], &[0.5, 0.4, 0.3, 0.3, 0.2]), &t());
        assert_eq!(d, Diagnosis::RewardNotIncreasing { first: 0.5, last: 0.2 });
    }

    #[test]
    fn no_lines_means_no_metrics() {
        assert_eq!(diagnose(Some(StageKind::Sft), &MetricLog::default(), &t()), Diagnosis::NoMetrics);
    }

    #[test]
    fn values_are_formatted_compactly() {
        assert_eq!(format_value(1.23456), "1.2346");
        assert_eq!(format_value(0.0), "0.0000");
        assert_eq!(format_value(123.456), "123.5");
        assert_eq!(format_value(2.5e-5), "2.500e-5");
        assert_eq!(format_value(f64::NAN), "NaN");
    }
}
