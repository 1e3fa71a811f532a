//! Summary statistics of per-item scores, defined once for every evaluation: the mean with its
//! standard error (lm-evaluation-harness's `mean_stderr`) and the size-weighted mean of groups
//! with lm-eval's pooled standard error (`pooled_sample_stderr`).
use serde::Serialize;

/// A mean and its standard error.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct MeanStderr {
    pub mean: f64,
    /// `sample stddev / √n` (None for a single item), as lm-eval's `mean_stderr`.
    pub stderr: Option<f64>,
}

/// lm-eval's `mean` and `mean_stderr` of per-item values.
pub fn mean_stderr(values: &[f64]) -> Option<MeanStderr> {
    if values.is_empty() {
        return None;
    }
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let stderr = (values.len() > 1)
        .then(|| (values.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / (n - 1.0)).sqrt() / n.sqrt());
    Some(MeanStderr { mean, stderr })
}

/// lm-eval's group aggregate: the size-weighted mean of the subjects' means and the pooled
/// standard error (`pooled_sample_stderr`).
pub fn pooled(parts: &[(MeanStderr, usize)]) -> Option<MeanStderr> {
    let total: usize = parts.iter().map(|p| p.1).sum();
    if parts.is_empty() || total == 0 {
        return None;
    }
    let mean = parts.iter().map(|(m, n)| m.mean * *n as f64).sum::<f64>() / total as f64;
    let stderr = (total > parts.len() && parts.iter().all(|(m, n)| m.stderr.is_some() || *n == 1)).then(|| {
        let var =
            parts.iter().map(|(m, n)| (*n as f64 - 1.0) * m.stderr.unwrap_or(0.0).powi(2) * *n as f64).sum::<f64>()
                / (total - parts.len()) as f64;
        (var / total as f64).sqrt()
    });
    Some(MeanStderr { mean, stderr })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stderr_and_pooling_follow_lm_eval() {
        let m = mean_stderr(&[1.0, 0.0, 1.0, 1.0]).unwrap();
        assert_eq!(m.mean, 0.75);
        assert!((m.stderr.unwrap() - 0.25).abs() < 1e-12); // stddev 0.5 / √4
        assert_eq!(mean_stderr(&[1.0]).unwrap().stderr, None);
        // pooled over two subjects of 4 items: Σ (n-1)·se²·n / (N - k), / N
        let p = pooled(&[(m, 4), (MeanStderr { mean: 0.25, stderr: Some(0.25) }, 4)]).unwrap();
        assert_eq!(p.mean, 0.5);
        let want = ((3.0 * 0.0625 * 4.0 * 2.0) / 6.0_f64 / 8.0).sqrt();
        assert!((p.stderr.unwrap() - want).abs() < 1e-12);
    }
}
