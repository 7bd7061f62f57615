//! Training records: one JSON object per epoch in `log.txt` (as the reference writes), one per
//! step in `metrics.jsonl`, and `training.png`, a plot of loss, teacher entropy and
//! teacher-student KL over the steps, redrawn at each epoch end.

use std::fs::OpenOptions;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, Result};
use plotters::prelude::*;
use serde::{Deserialize, Serialize};

/// Per-step collapse metrics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: usize,
    pub loss: f64,
    pub teacher_entropy: f64,
    pub kl: f64,
}

/// Appends one JSON value as a line.
pub fn append_line<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut f = OpenOptions::new().create(true).append(true).open(path).with_context(|| format!("{}: cannot open", path.display()))?;
    writeln!(f, "{}", serde_json::to_string(value)?).with_context(|| format!("{}: cannot write", path.display()))
}

/// Reads the step metrics written so far, keeping the last record of each step (a resumed run
/// may repeat steps after the last checkpoint).
pub fn read_step_metrics(path: &Path) -> Vec<StepMetrics> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    let mut by_step = std::collections::BTreeMap::new();
    for m in text.lines().filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok()) {
        by_step.insert(m.step, m);
    }
    by_step.into_values().collect()
}

/// One plot panel: the metric it shows, its colour, and an optional dashed bound.
type Series = (Box<dyn Fn(&StepMetrics) -> f64>, RGBColor, Option<f64>);

/// Draws three stacked panels (top to bottom: loss, teacher entropy with log(out_dim) as the
/// dashed upper bound, KL) against the step. No text, so no font is needed.
pub fn plot(metrics: &[StepMetrics], out_dim: usize, path: &Path) -> Result<()> {
    if metrics.len() < 2 {
        return Ok(());
    }
    let root = BitMapBackend::new(path, (900, 900)).into_drawing_area();
    root.fill(&WHITE)?;
    let panels = root.split_evenly((3, 1));
    let last = metrics.last().unwrap().step as f64;
    let first = metrics[0].step as f64;
    let series: [Series; 3] = [
        (Box::new(|m| m.loss), BLUE, None),
        (Box::new(|m| m.teacher_entropy), RGBColor(0, 150, 0), Some((out_dim as f64).ln())),
        (Box::new(|m| m.kl), RED, None),
    ];
    for (panel, (value, color, bound)) in panels.iter().zip(series) {
        let values: Vec<f64> = metrics.iter().map(&value).collect();
        let mut lo = values.iter().cloned().fold(f64::INFINITY, f64::min).min(0.0);
        let mut hi = values.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        if let Some(b) = bound {
            hi = hi.max(b);
        }
        // Also catches NaN bounds (no finite metric): any non-increasing range gets a unit height.
        if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
            hi = lo + 1.0;
        }
        lo -= 0.02 * (hi - lo);
        let mut chart = ChartBuilder::on(panel).margin(12).build_cartesian_2d(first..last.max(first + 1.0), lo..hi * 1.02)?;
        chart.plotting_area().fill(&RGBColor(248, 248, 248))?;
        chart.draw_series(LineSeries::new(metrics.iter().map(|m| (m.step as f64, value(m))), color.stroke_width(2)))?;
        if let Some(b) = bound {
            chart.draw_series(DashedLineSeries::new(vec![(first, b), (last, b)], 8, 6, BLACK.stroke_width(1)))?;
        }
        chart.draw_series(LineSeries::new(vec![(first, 0.0), (last, 0.0)], BLACK.mix(0.3)))?;
    }
    root.present().with_context(|| format!("{}: cannot write plot", path.display()))?;
    Ok(())
}
