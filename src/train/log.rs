//! Training records: one JSON object per epoch in `log.txt` (as the reference writes), one per
//! step in `metrics.jsonl`, and `training.png`, a plot of loss, teacher entropy,
//! teacher-student KL, learning rate and online k-NN over the steps, redrawn at each epoch end.

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
    /// Learning rate of the step (absent from logs of older versions).
    #[serde(default)]
    pub lr: f64,
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

/// The font of the plot's text, embedded so that drawing needs no system font library
/// (DejaVu Sans, from Debian's fonts-dejavu-core; licence in assets/DejaVuSans-LICENSE.txt).
static FONT: &[u8] = include_bytes!("../../assets/DejaVuSans.ttf");

fn register_font() {
    static REGISTERED: std::sync::Once = std::sync::Once::new();
    REGISTERED.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).unwrap_or_else(|_| panic!("the embedded font is a valid TrueType file"));
    });
}

/// One panel of the plot: a title, the points, a colour, and optionally a labelled dashed
/// reference line.
struct Panel {
    title: &'static str,
    points: Vec<(f64, f64)>,
    color: RGBColor,
    bound: Option<(f64, String)>,
    markers: bool,
}

/// Draws the run's curves against the step, one titled panel each, top to bottom: loss,
/// teacher entropy (with log(out_dim), its upper bound, dashed), KL(teacher || student), the
/// learning rate, and the online k-NN top-1 when `knn` holds (step, accuracy) points.
pub fn plot(metrics: &[StepMetrics], knn: &[(usize, f64)], out_dim: usize, path: &Path) -> Result<()> {
    if metrics.len() < 2 {
        return Ok(());
    }
    register_font();
    let series = |value: fn(&StepMetrics) -> f64| metrics.iter().map(|m| (m.step as f64, value(m))).collect::<Vec<_>>();
    let log_k = (out_dim as f64).ln();
    let mut panels = vec![
        Panel { title: "DINO loss", points: series(|m| m.loss), color: BLUE, bound: None, markers: false },
        Panel {
            title: "teacher entropy (nats)",
            points: series(|m| m.teacher_entropy),
            color: RGBColor(0, 150, 0),
            bound: Some((log_k, format!("log(out_dim) = {log_k:.2}: a uniform teacher"))),
            markers: false,
        },
        Panel { title: "KL(teacher || student)", points: series(|m| m.kl), color: RED, bound: None, markers: false },
        Panel { title: "learning rate", points: series(|m| m.lr), color: RGBColor(120, 60, 160), bound: None, markers: false },
    ];
    if !knn.is_empty() {
        let points = knn.iter().map(|&(step, top1)| (step as f64, top1)).collect();
        panels.push(Panel { title: "teacher 20-NN top-1 (%)", points, color: RGBColor(200, 120, 0), bound: None, markers: true });
    }
    let root = BitMapBackend::new(path, (900, 240 * panels.len() as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let (first, last) = (metrics[0].step as f64, metrics.last().unwrap().step as f64);
    let x_range = first..last.max(first + 1.0);
    for (area, panel) in root.split_evenly((panels.len(), 1)).iter().zip(&panels) {
        let (lo, hi) = value_range(&panel.points, panel.bound.as_ref().map(|b| b.0));
        let mut chart = ChartBuilder::on(area)
            .caption(panel.title, ("sans-serif", 18))
            .margin(8)
            .x_label_area_size(34)
            .y_label_area_size(70)
            .build_cartesian_2d(x_range.clone(), lo..hi)?;
        let scale = hi.abs().max(lo.abs());
        let y_format = move |v: &f64| if scale < 0.01 { format!("{v:.1e}") } else { format!("{v:.2}") };
        chart
            .configure_mesh()
            .x_desc("step")
            .x_labels(8)
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_labels(5)
            .y_label_formatter(&y_format)
            .label_style(("sans-serif", 13))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart.draw_series(LineSeries::new(panel.points.iter().copied(), panel.color.stroke_width(2)))?;
        if panel.markers {
            chart.draw_series(panel.points.iter().map(|&p| Circle::new(p, 4, panel.color.filled())))?;
        }
        if let Some((b, label)) = &panel.bound {
            chart.draw_series(DashedLineSeries::new(vec![(first, *b), (last, *b)], 8, 6, BLACK.stroke_width(1)))?;
            let below = b - 0.04 * (hi - lo);
            chart.draw_series(std::iter::once(Text::new(label.clone(), (first + 0.02 * (last - first), below), ("sans-serif", 13))))?;
        }
    }
    root.present().with_context(|| format!("{}: cannot write plot", path.display()))?;
    Ok(())
}

/// A y range holding every point and the bound, with a little room above and below; a flat or
/// empty range (or one with no finite value) gets a unit height.
fn value_range(points: &[(f64, f64)], bound: Option<f64>) -> (f64, f64) {
    let finite = points.iter().map(|p| p.1).chain(bound).filter(|v| v.is_finite());
    let (lo, hi) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| (lo.min(v), hi.max(v)));
    if hi.partial_cmp(&lo) != Some(std::cmp::Ordering::Greater) {
        let mid = if lo.is_finite() { lo } else { 0.0 };
        return (mid - 0.5, mid + 0.5);
    }
    let pad = 0.05 * (hi - lo);
    (lo - pad, hi + pad)
}

/// The (step, k-NN top-1) points of the epoch lines in log.txt that carry one; the step is the
/// last one run before the evaluation (the line's `global_step` counts the steps run).
pub fn read_knn_points(path: &Path) -> Vec<(usize, f64)> {
    let Ok(text) = std::fs::read_to_string(path) else { return Vec::new() };
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| Some(((v["global_step"].as_u64()? as usize).saturating_sub(1), v["knn_top1"].as_f64()?)))
        .collect()
}
