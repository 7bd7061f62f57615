//! Video object segmentation by label propagation (the DAVIS 2017 protocol of the paper):
//! each frame's patch features attend to the patches of the first frame and of the last few
//! frames within a spatial window; the labels of the top-k most similar source patches are
//! averaged with exp(cos / T) weights. [`segment`] runs it over a video's frames and writes a
//! mask per frame; [`report_scores`] gives the DAVIS measures, J (region IoU) and F (boundary
//! F-measure).

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use crate::data::augment::{normalize_to_chw, resize_crop_to};
use crate::data::dataset::decode_file;
use crate::data::palette::LabelMap;
use crate::engine::Precision;
use crate::eval::features::l2_normalize_rows;
use crate::model::VisionTransformer;
use crate::weights::HostTensor;

/// Propagation settings (defaults are the reference's).
#[derive(Debug, Clone, Copy)]
pub struct PropagationConfig {
    /// Softmax temperature of the affinities.
    pub temperature: f32,
    /// Number of source patches each target patch takes its label from.
    pub topk: usize,
    /// Sources are restricted to |dy| <= n and |dx| <= n patches around the target; 0 means
    /// no restriction (the reference's meaning).
    pub neighbourhood: usize,
}

/// One frame's L2-normalised patch features [grid_h * grid_w, dim] and soft labels
/// [grid_h * grid_w, classes].
pub struct Context<'a> {
    pub features: &'a [f32],
    pub labels: &'a [f32],
}

fn dot(a: &[f32], b: &[f32]) -> f32 {
    // Eight independent sums so the compiler can vectorise.
    let mut acc = [0f32; 8];
    let chunks = a.len() / 8 * 8;
    for (x, y) in a[..chunks].chunks_exact(8).zip(b[..chunks].chunks_exact(8)) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + a[chunks..].iter().zip(&b[chunks..]).map(|(x, y)| x * y).sum::<f32>()
}

/// Soft labels [grid_h * grid_w, classes] of a target frame from its normalised features and
/// the context frames.
pub fn propagate(target: &[f32], contexts: &[Context], grid: (usize, usize), dim: usize, classes: usize, cfg: PropagationConfig) -> Vec<f32> {
    let (gh, gw) = grid;
    let r = if cfg.neighbourhood == 0 { gh.max(gw) } else { cfg.neighbourhood } as isize;
    let mut out = vec![0f32; gh * gw * classes];
    out.par_chunks_mut(classes).enumerate().for_each(|(i, labels)| {
        let (y, x) = ((i / gw) as isize, (i % gw) as isize);
        let query = &target[i * dim..(i + 1) * dim];
        // (affinity, context, source position) of every source in the window.
        let mut candidates: Vec<(f32, usize, usize)> = Vec::new();
        for (c, ctx) in contexts.iter().enumerate() {
            for sy in (y - r).max(0)..=(y + r).min(gh as isize - 1) {
                for sx in (x - r).max(0)..=(x + r).min(gw as isize - 1) {
                    let j = sy as usize * gw + sx as usize;
                    let cos = dot(query, &ctx.features[j * dim..(j + 1) * dim]);
                    candidates.push(((cos / cfg.temperature).exp(), c, j));
                }
            }
        }
        // Keep every candidate at least as large as the k-th largest (ties included).
        let k = cfg.topk.clamp(1, candidates.len());
        let mut values: Vec<f32> = candidates.iter().map(|c| c.0).collect();
        let kth = *values.select_nth_unstable_by(k - 1, |a, b| b.total_cmp(a)).1;
        let kept: Vec<&(f32, usize, usize)> = candidates.iter().filter(|c| c.0 >= kth).collect();
        let total: f32 = kept.iter().map(|c| c.0).sum();
        for &&(a, c, j) in &kept {
            let source = &contexts[c].labels[j * classes..(j + 1) * classes];
            for (l, s) in labels.iter_mut().zip(source) {
                *l += a / total * s;
            }
        }
    });
    out
}

/// One-hot soft labels of a label grid.
pub fn one_hot(labels: &[u8], classes: usize) -> Vec<f32> {
    let mut out = vec![0f32; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        out[i * classes + l as usize] = 1.0;
    }
    out
}

/// Hard labels at pixel resolution from patch-grid soft labels: bilinear upsampling by the
/// patch size (align_corners=false), each class map rescaled to [0, 1], then the argmax.
pub fn upsample_labels(soft: &[f32], grid: (usize, usize), classes: usize, patch: usize) -> Vec<u8> {
    let (gh, gw) = grid;
    let (h, w) = (gh * patch, gw * patch);
    // Source coordinate and weights for each output row/column.
    let taps = |out: usize, size_in: usize| -> (usize, usize, f32) {
        let s = ((out as f32 + 0.5) / patch as f32 - 0.5).max(0.0);
        let i0 = (s.floor() as usize).min(size_in - 1);
        let i1 = (i0 + 1).min(size_in - 1);
        (i0, i1, s - i0 as f32)
    };
    let rows: Vec<_> = (0..h).map(|y| taps(y, gh)).collect();
    let cols: Vec<_> = (0..w).map(|x| taps(x, gw)).collect();
    let mut planes = vec![0f32; classes * h * w];
    for c in 0..classes {
        let at = |y: usize, x: usize| soft[(y * gw + x) * classes + c];
        let plane = &mut planes[c * h * w..(c + 1) * h * w];
        for (y, &(y0, y1, fy)) in rows.iter().enumerate() {
            for (x, &(x0, x1, fx)) in cols.iter().enumerate() {
                let top = at(y0, x0) * (1.0 - fx) + at(y0, x1) * fx;
                let bottom = at(y1, x0) * (1.0 - fx) + at(y1, x1) * fx;
                plane[y * w + x] = top * (1.0 - fy) + bottom * fy;
            }
        }
        let (lo, hi) = plane.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        if hi > lo {
            plane.iter_mut().for_each(|v| *v = (*v - lo) / (hi - lo));
        }
    }
    (0..h * w)
        .map(|p| {
            let mut best = 0;
            for c in 1..classes {
                if planes[c * h * w + p] > planes[best * h * w + p] {
                    best = c;
                }
            }
            best as u8
        })
        .collect()
}

/// Region similarity J: intersection over union of two binary masks (1 when both are empty).
pub fn region_iou(prediction: &[bool], truth: &[bool]) -> f64 {
    let inter = prediction.iter().zip(truth).filter(|(p, t)| **p && **t).count();
    let union = prediction.iter().zip(truth).filter(|(p, t)| **p || **t).count();
    if union == 0 { 1.0 } else { inter as f64 / union as f64 }
}

/// Boundary pixels of a binary mask: pixels that differ from their right, lower or lower-right
/// neighbour (DAVIS's seg2bmap at the mask's own resolution).
pub fn boundary(mask: &[bool], width: usize, height: usize) -> Vec<bool> {
    let at = |x: usize, y: usize| mask[y * width + x];
    let mut out = vec![false; mask.len()];
    for y in 0..height {
        for x in 0..width {
            let v = at(x, y);
            let right = x + 1 < width && at(x + 1, y) != v;
            let down = y + 1 < height && at(x, y + 1) != v;
            let diagonal = x + 1 < width && y + 1 < height && at(x + 1, y + 1) != v;
            out[y * width + x] = right || down || diagonal;
        }
    }
    out
}

/// `mask` dilated by a disk of radius `r` (offsets with dx^2 + dy^2 <= r^2).
fn dilate(mask: &[bool], width: usize, height: usize, r: usize) -> Vec<bool> {
    let r = r as isize;
    let offsets: Vec<(isize, isize)> =
        (-r..=r).flat_map(|dy| (-r..=r).map(move |dx| (dx, dy))).filter(|(dx, dy)| dx * dx + dy * dy <= r * r).collect();
    let mut out = vec![false; mask.len()];
    for (i, _) in mask.iter().enumerate().filter(|(_, m)| **m) {
        let (x, y) = ((i % width) as isize, (i / width) as isize);
        for &(dx, dy) in &offsets {
            let (nx, ny) = (x + dx, y + dy);
            if nx >= 0 && ny >= 0 && (nx as usize) < width && (ny as usize) < height {
                out[ny as usize * width + nx as usize] = true;
            }
        }
    }
    out
}

/// Contour accuracy F: the F-measure of boundary precision and recall, a boundary pixel
/// counting as matched within ceil(0.008 * image diagonal) pixels (the DAVIS tolerance).
pub fn boundary_f(prediction: &[bool], truth: &[bool], width: usize, height: usize) -> f64 {
    let tolerance = (0.008 * ((width * width + height * height) as f64).sqrt()).ceil() as usize;
    let (pb, tb) = (boundary(prediction, width, height), boundary(truth, width, height));
    let (np, nt) = (pb.iter().filter(|&&b| b).count(), tb.iter().filter(|&&b| b).count());
    let (precision, recall) = match (np, nt) {
        (0, 0) => (1.0, 1.0),
        (0, _) => (1.0, 0.0),
        (_, 0) => (0.0, 1.0),
        _ => {
            let (pd, td) = (dilate(&pb, width, height, tolerance), dilate(&tb, width, height, tolerance));
            let matched_p = pb.iter().zip(&td).filter(|(b, d)| **b && **d).count();
            let matched_t = tb.iter().zip(&pd).filter(|(b, d)| **b && **d).count();
            (matched_p as f64 / np as f64, matched_t as f64 / nt as f64)
        }
    };
    if precision + recall == 0.0 { 0.0 } else { 2.0 * precision * recall / (precision + recall) }
}

/// How a video is segmented (`dino video-seg`'s flags, where their defaults are documented).
#[derive(Debug, Clone, Copy)]
pub struct SegmentSettings {
    /// Frames are resized so the shorter side is this (the longer to a multiple of 64).
    pub scale: usize,
    /// Previous frames used as context besides the first.
    pub n_last_frames: usize,
    pub propagation: PropagationConfig,
}

/// Propagates `first` (the mask of `frames[0]`, labels below `classes`) through `frames` with
/// `vit`'s patch features, writes each frame's mask into `output_dir` (named after the frame)
/// and returns them all, the first included.
pub fn segment(vit: &VisionTransformer, frames: &[PathBuf], first: &LabelMap, classes: usize, s: SegmentSettings, output_dir: &Path, device: &Device) -> Result<Vec<LabelMap>> {
    let p = vit.patch_size();
    let frame0 = decode_file(&frames[0]).with_context(|| format!("{}", frames[0].display()))?;
    let (ori_w, ori_h) = (frame0.width() as usize, frame0.height() as usize);
    if (first.width, first.height) != (ori_w, ori_h) {
        bail!("the first mask is {}x{} but the frames are {ori_w}x{ori_h}", first.width, first.height);
    }
    let size = input_size(ori_w, ori_h, s.scale, p);
    if size.0 == 0 || size.1 == 0 {
        bail!("--scale {} is smaller than one {p}-pixel patch", s.scale);
    }
    let grid = (size.1 / p, size.0 / p);
    let dim = vit.embed_dim();
    let first_features = patch_features(vit, &frame0, size, device);
    let first_soft = one_hot(&first.resize_nearest(grid.1, grid.0).labels, classes);
    let mut predictions = vec![first.clone()];
    first.write(&output_path(output_dir, &frames[0]))?;

    let started = std::time::Instant::now();
    let mut recent: VecDeque<(Vec<f32>, Vec<f32>)> = VecDeque::new();
    for path in &frames[1..] {
        let frame = decode_file(path).with_context(|| format!("{}", path.display()))?;
        if (frame.width() as usize, frame.height() as usize) != (ori_w, ori_h) {
            bail!("{}: {}x{} but the first frame is {ori_w}x{ori_h}", path.display(), frame.width(), frame.height());
        }
        let features = patch_features(vit, &frame, size, device);
        let mut contexts = vec![Context { features: &first_features, labels: &first_soft }];
        contexts.extend(recent.iter().map(|(f, l)| Context { features: f, labels: l }));
        let soft = propagate(&features, &contexts, grid, dim, classes, s.propagation);
        let labels = upsample_labels(&soft, grid, classes, p);
        let mask = LabelMap { width: size.0, height: size.1, labels, palette: first.palette.clone() }.resize_nearest(ori_w, ori_h);
        mask.write(&output_path(output_dir, path))?;
        predictions.push(mask);
        if s.n_last_frames > 0 {
            if recent.len() == s.n_last_frames {
                recent.pop_front();
            }
            recent.push_back((features, soft));
        }
    }
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "{} frames propagated at {}x{} ({}x{} patches), {:.2}s per frame -> {}",
        frames.len() - 1,
        size.0,
        size.1,
        grid.1,
        grid.0,
        secs / (frames.len() - 1).max(1) as f64,
        output_dir.display()
    );
    Ok(predictions)
}

/// Network input size for a frame: shorter side `scale`, longer side scaled and rounded down
/// to a multiple of 64 as the reference does, both multiples of the patch size.
pub fn input_size(width: usize, height: usize, scale: usize, patch: usize) -> (usize, usize) {
    let long = |long: usize, short: usize| {
        let exact = scale as f64 * long as f64 / short as f64;
        let by64 = (exact / 64.0).floor() as usize * 64;
        if by64 >= patch { by64 } else { exact as usize }
    };
    let (w, h) = if height > width { (scale, long(height, width)) } else { (long(width, height), scale) };
    (w / patch * patch, h / patch * patch)
}

/// L2-normalised patch features [grid_h * grid_w, dim] of a frame.
fn patch_features(vit: &VisionTransformer, frame: &image::RgbImage, (w, h): (usize, usize), device: &Device) -> Vec<f32> {
    let pixels = resize_crop_to(frame, (0.0, 0.0, frame.width() as f64, frame.height() as f64), w, h);
    let x = Tensor::<4>::from_data(TensorData::new(normalize_to_chw(&pixels), [1, 3, h, w]), device);
    let tokens = vit.intermediate_layers(x, 1, Precision::F32).pop().expect("one layer");
    let [_, n, d] = tokens.dims();
    let mut features = HostTensor::from_tensor(tokens.slice_dim(1, 1..n).reshape([n - 1, d])).values;
    l2_normalize_rows(&mut features, d);
    features
}

/// The output mask of a frame: its file stem with .png.
fn output_path(dir: &Path, frame: &Path) -> PathBuf {
    dir.join(frame.file_stem().unwrap_or_default()).with_extension("png")
}

/// J and F per object over the frames between the first and the last (as DAVIS evaluates),
/// printed and written to metrics.json.
pub fn report_scores(predictions: &[LabelMap], gt_files: &[PathBuf], classes: usize, out: &Path) -> Result<()> {
    let n = predictions.len();
    let evaluated: Vec<usize> = if n >= 3 { (1..n - 1).collect() } else { (1..n).collect() };
    if evaluated.is_empty() {
        bail!("--gt: a single frame leaves nothing to evaluate");
    }
    let mut objects = Vec::new();
    let truths: Vec<LabelMap> = evaluated.iter().map(|&t| LabelMap::read(&gt_files[t])).collect::<Result<_>>()?;
    for (truth, &t) in truths.iter().zip(&evaluated) {
        if (truth.width, truth.height) != (predictions[t].width, predictions[t].height) {
            bail!("{}: {}x{} but the frames are {}x{}", gt_files[t].display(), truth.width, truth.height, predictions[t].width, predictions[t].height);
        }
    }
    for object in 1..classes as u8 {
        let (mut j, mut f) = (0.0, 0.0);
        for (truth, &t) in truths.iter().zip(&evaluated) {
            let pred: Vec<bool> = predictions[t].labels.iter().map(|&l| l == object).collect();
            let gt: Vec<bool> = truth.labels.iter().map(|&l| l == object).collect();
            j += region_iou(&pred, &gt);
            f += boundary_f(&pred, &gt, truth.width, truth.height);
        }
        let count = evaluated.len() as f64;
        objects.push(serde_json::json!({ "object": object, "J": j / count, "F": f / count }));
        println!("object {object}: J {:.4}  F {:.4}", j / count, f / count);
    }
    let mean = |key: &str| objects.iter().map(|o| o[key].as_f64().unwrap()).sum::<f64>() / objects.len() as f64;
    let (j_mean, f_mean) = (mean("J"), mean("F"));
    println!("J&F-Mean {:.4}  J-Mean {j_mean:.4}  F-Mean {f_mean:.4}  ({} frames evaluated)", (j_mean + f_mean) / 2.0, evaluated.len());
    let metrics = serde_json::json!({
        "J&F-Mean": (j_mean + f_mean) / 2.0, "J-Mean": j_mean, "F-Mean": f_mean,
        "frames_evaluated": evaluated.len(), "objects": objects,
    });
    let path = out.join("metrics.json");
    std::fs::write(&path, serde_json::to_string_pretty(&metrics)?).with_context(|| format!("{}: cannot write", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn square(width: usize, height: usize, x0: usize, y0: usize, side: usize) -> Vec<bool> {
        (0..width * height).map(|i| (x0..x0 + side).contains(&(i % width)) && (y0..y0 + side).contains(&(i / width))).collect()
    }

    #[test]
    fn region_iou_on_known_masks() {
        let a = square(10, 10, 0, 0, 4); // 16 pixels
        let b = square(10, 10, 2, 0, 4); // overlaps a in 2 x 4
        assert!((region_iou(&a, &b) - 8.0 / 24.0).abs() < 1e-12);
        assert_eq!(region_iou(&a, &a), 1.0);
        assert_eq!(region_iou(&[false; 4], &[false; 4]), 1.0);
        assert_eq!(region_iou(&a, &[false; 100]), 0.0);
    }

    #[test]
    fn boundary_marks_the_pixels_before_each_change() {
        // A 2x2 square at (1,1) in 4x4: the pixels whose right, lower or diagonal neighbour differs.
        let b = boundary(&square(4, 4, 1, 1, 2), 4, 4);
        let marked: Vec<usize> = (0..16).filter(|&i| b[i]).collect();
        assert_eq!(marked, vec![0, 1, 2, 4, 6, 8, 9, 10]);
    }

    #[test]
    fn boundary_f_on_known_masks() {
        // 100x100: tolerance ceil(0.008 * 141.4) = 2 pixels.
        let truth = square(100, 100, 20, 20, 40);
        assert_eq!(boundary_f(&truth, &truth, 100, 100), 1.0);
        // Shifted by 2: every boundary pixel is within the tolerance.
        assert_eq!(boundary_f(&square(100, 100, 22, 20, 40), &truth, 100, 100), 1.0);
        // A far-away square: nothing matches.
        assert_eq!(boundary_f(&square(100, 100, 70, 70, 20), &square(100, 100, 0, 0, 20), 100, 100), 0.0);
        // Prediction empty: precision 1, recall 0.
        assert_eq!(boundary_f(&[false; 10000], &truth, 100, 100), 0.0);
        assert_eq!(boundary_f(&[false; 10000], &[false; 10000], 100, 100), 1.0);
        // Shifted by 5 along x: 160 boundary pixels each, of which 80 (the horizontal edges)
        // lie within 2 pixels of the other's boundary: P = R = 0.5 (checked with a NumPy
        // transcription of DAVIS's seg2bmap and disk dilation).
        let f = boundary_f(&square(100, 100, 25, 20, 40), &truth, 100, 100);
        assert!((f - 0.5).abs() < 1e-12, "{f}");
    }

    #[test]
    fn propagation_copies_labels_between_identical_frames() {
        // A 3x3 grid with distinct features per position: each target's most similar source is
        // itself, so with top-1 the labels are copied exactly.
        let dim = 9;
        let mut features = vec![0f32; 9 * dim];
        for i in 0..9 {
            features[i * dim + i] = 1.0;
        }
        let labels: Vec<u8> = vec![0, 0, 1, 0, 1, 1, 2, 2, 2];
        let soft = one_hot(&labels, 3);
        let cfg = PropagationConfig { temperature: 0.1, topk: 1, neighbourhood: 1 };
        let out = propagate(&features, &[Context { features: &features, labels: &soft }], (3, 3), dim, 3, cfg);
        assert_eq!(out, soft);
        // With top-2 (one exact match at e^10 and orthogonal ones at e^0 tied), weights follow
        // exp(cos / T): the own label gets e^10 / (e^10 + m e^0) where m ties are all kept.
        let cfg = PropagationConfig { topk: 2, ..cfg };
        let out = propagate(&features, &[Context { features: &features, labels: &soft }], (3, 3), dim, 3, cfg);
        // Centre position: its 3x3 window holds itself and 8 orthogonal sources, all tied.
        let e10 = (10f32).exp();
        let own = e10 / (e10 + 8.0);
        // Label 1 is at positions 2, 4 (itself) and 5.
        assert!((out[4 * 3 + 1] - (own + 2.0 / (e10 + 8.0))).abs() < 1e-6);
        let sum: f32 = out[12..15].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn neighbourhood_restricts_the_sources() {
        // 1x5 grid; every source has the same feature, so all in the window tie.
        let dim = 1;
        let features = vec![1f32; 5];
        let soft = one_hot(&[1, 0, 0, 0, 2], 3);
        let cfg = PropagationConfig { temperature: 0.1, topk: 5, neighbourhood: 1 };
        let out = propagate(&features, &[Context { features: &features, labels: &soft }], (1, 5), dim, 3, cfg);
        // Position 0 sees sources 0 and 1: half label 1, half label 0.
        assert_eq!(&out[0..3], &[0.5, 0.5, 0.0]);
        // Neighbourhood 0: no restriction, every position sees all five sources.
        let all = propagate(&features, &[Context { features: &features, labels: &soft }], (1, 5), dim, 3, PropagationConfig { neighbourhood: 0, ..cfg });
        for p in 0..5 {
            assert!(all[p * 3..p * 3 + 3].iter().zip([0.6, 0.2, 0.2]).all(|(a, b)| (a - b).abs() < 1e-6), "position {p}: {:?}", &all[p * 3..p * 3 + 3]);
        }
        // Position 2 sees 1..=3, all label 0.
        assert_eq!(&out[6..9], &[1.0, 0.0, 0.0]);
    }

    #[test]
    fn upsampling_is_bilinear_then_argmax() {
        // 1x2 grid, patch 2: class 1 on the right patch only.
        let soft = vec![1.0, 0.0, 0.0, 1.0];
        let labels = upsample_labels(&soft, (1, 2), 2, 2);
        assert_eq!(labels, vec![0, 0, 1, 1, 0, 0, 1, 1]);
    }

    #[test]
    fn input_size_follows_the_reference_rule() {
        // DAVIS 480p: 854x480 -> 832x480.
        assert_eq!(input_size(854, 480, 480, 16), (832, 480));
        assert_eq!(input_size(480, 854, 480, 8), (480, 832));
        // Small scales stay multiples of the patch.
        assert_eq!(input_size(640, 480, 60, 8), (64, 56));
    }
}
