//! `dino video-seg`: propagates a first-frame mask through a folder of frames with the
//! backbone's patch features (the DAVIS 2017 protocol), writes one palette PNG per frame, and
//! with --gt scores the result with DAVIS's J and F.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Args;

use super::backbone::BackboneArgs;
use crate::data::augment::{normalize_to_chw, resize_crop_to};
use crate::data::dataset::{decode_file, image_files};
use crate::data::palette::LabelMap;
use crate::eval::features::l2_normalize_rows;
use crate::eval::video::{self, PropagationConfig};
use crate::model::VisionTransformer;
use crate::weights::HostTensor;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct VideoArgs {
    /// Folder of frames, in file-name order.
    #[arg(long, required_unless_present = "data_path")]
    pub frames: Option<PathBuf>,
    /// The first frame's mask: an indexed-palette (or gray) PNG, 0 = background, 1.. = objects.
    #[arg(long, required_unless_present = "data_path")]
    pub first_mask: Option<PathBuf>,
    /// The reference's DAVIS root (it segments every video): refused in one line that says
    /// how to run a video here. Hidden, as is its --bs.
    #[arg(long, hide = true)]
    pub data_path: Option<PathBuf>,
    #[arg(long, hide = true)]
    pub bs: Option<usize>,
    /// Where a mask PNG per frame is written (named after the frame).
    #[arg(long)]
    pub output_dir: PathBuf,
    /// Folder of ground-truth masks, one per frame in the same order: J and F are reported.
    #[arg(long)]
    pub gt: Option<PathBuf>,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    /// Frames are resized so the shorter side is this (the longer to a multiple of 64).
    #[arg(long, default_value_t = 480)]
    pub scale: usize,
    /// Previous frames used as context besides the first.
    #[arg(long, default_value_t = 7)]
    pub n_last_frames: usize,
    /// Sources within this many patches of the target (vertically and horizontally); 0: the
    /// whole frame, as in the reference.
    #[arg(long, default_value_t = 12)]
    pub size_mask_neighborhood: usize,
    /// Source patches each target patch takes its label from.
    #[arg(long, default_value_t = 5)]
    pub topk: usize,
    /// Temperature of the exp(cos / T) affinities.
    #[arg(long, default_value_t = 0.1)]
    pub temperature: f32,
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
    let tokens = vit.intermediate_layers(x, 1).pop().expect("one layer");
    let [_, n, d] = tokens.dims();
    let mut features = HostTensor::from_tensor(tokens.slice_dim(1, 1..n).reshape([n - 1, d])).values;
    l2_normalize_rows(&mut features, d);
    features
}

pub fn run(args: VideoArgs) -> Result<()> {
    let device = Device::flex();
    let (Some(frames_dir), Some(first_mask)) = (&args.frames, &args.first_mask) else {
        let root = args.data_path.as_deref().unwrap_or(std::path::Path::new("DAVIS")).display().to_string();
        bail!("--data_path: video-seg segments one video per run; give --frames {root}/JPEGImages/480p/VIDEO --first_mask {root}/Annotations/480p/VIDEO/00000.png (and --gt {root}/Annotations/480p/VIDEO for J and F)");
    };
    let frames = image_files(frames_dir, false).with_context(|| format!("--frames {}", frames_dir.display()))?;
    if frames.is_empty() {
        bail!("--frames {}: no image files", frames_dir.display());
    }
    let first = LabelMap::read(first_mask).with_context(|| format!("--first_mask {}", first_mask.display()))?;
    let classes = *first.labels.iter().max().unwrap_or(&0) as usize + 1;
    if classes < 2 {
        bail!("--first_mask {}: no object (all pixels are 0)", first_mask.display());
    }
    let gt_files = match &args.gt {
        Some(dir) => {
            let files = image_files(dir, false).with_context(|| format!("--gt {}", dir.display()))?;
            if files.len() != frames.len() {
                bail!("--gt {}: {} masks for {} frames", dir.display(), files.len(), frames.len());
            }
            Some(files)
        }
        None => None,
    };
    let backbone = args.backbone.load(&device)?;
    let vit = backbone.network.vit("video segmentation")?;
    let p = vit.patch_size();
    let cfg = PropagationConfig { temperature: args.temperature, topk: args.topk, neighbourhood: args.size_mask_neighborhood };
    std::fs::create_dir_all(&args.output_dir).with_context(|| format!("--output_dir {}: cannot create", args.output_dir.display()))?;

    let frame0 = decode_file(&frames[0]).with_context(|| format!("{}", frames[0].display()))?;
    let (ori_w, ori_h) = (frame0.width() as usize, frame0.height() as usize);
    if (first.width, first.height) != (ori_w, ori_h) {
        bail!("--first_mask {}: {}x{} but the frames are {ori_w}x{ori_h}", first_mask.display(), first.width, first.height);
    }
    let size = input_size(ori_w, ori_h, args.scale, p);
    if size.0 == 0 || size.1 == 0 {
        bail!("--scale {} is smaller than one {p}-pixel patch", args.scale);
    }
    let grid = (size.1 / p, size.0 / p);
    let dim = vit.embed_dim();
    let first_features = patch_features(vit, &frame0, size, &device);
    let first_soft = video::one_hot(&first.resize_nearest(grid.1, grid.0).labels, classes);
    let mut predictions = vec![first.clone()];
    first.write(&output_path(&args.output_dir, &frames[0]))?;

    let started = std::time::Instant::now();
    let mut recent: VecDeque<(Vec<f32>, Vec<f32>)> = VecDeque::new();
    for path in &frames[1..] {
        let frame = decode_file(path).with_context(|| format!("{}", path.display()))?;
        if (frame.width() as usize, frame.height() as usize) != (ori_w, ori_h) {
            bail!("{}: {}x{} but the first frame is {ori_w}x{ori_h}", path.display(), frame.width(), frame.height());
        }
        let features = patch_features(vit, &frame, size, &device);
        let mut contexts = vec![video::Context { features: &first_features, labels: &first_soft }];
        contexts.extend(recent.iter().map(|(f, l)| video::Context { features: f, labels: l }));
        let soft = video::propagate(&features, &contexts, grid, dim, classes, cfg);
        let labels = video::upsample_labels(&soft, grid, classes, p);
        let mask = LabelMap { width: size.0, height: size.1, labels, palette: first.palette.clone() }.resize_nearest(ori_w, ori_h);
        mask.write(&output_path(&args.output_dir, path))?;
        predictions.push(mask);
        if args.n_last_frames > 0 {
            if recent.len() == args.n_last_frames {
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
        args.output_dir.display()
    );
    if let Some(gt_files) = gt_files {
        report_scores(&predictions, &gt_files, classes, &args.output_dir)?;
    }
    Ok(())
}

/// The output mask of a frame: its file stem with .png.
fn output_path(dir: &Path, frame: &Path) -> PathBuf {
    dir.join(frame.file_stem().unwrap_or_default()).with_extension("png")
}

/// J and F per object over the frames between the first and the last (as DAVIS evaluates),
/// printed and written to metrics.json.
fn report_scores(predictions: &[LabelMap], gt_files: &[PathBuf], classes: usize, out: &Path) -> Result<()> {
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
            j += video::region_iou(&pred, &gt);
            f += video::boundary_f(&pred, &gt, truth.width, truth.height);
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
    use super::input_size;

    #[test]
    fn input_size_follows_the_reference_rule() {
        // DAVIS 480p: 854x480 -> 832x480.
        assert_eq!(input_size(854, 480, 480, 16), (832, 480));
        assert_eq!(input_size(480, 854, 480, 8), (480, 832));
        // Small scales stay multiples of the patch.
        assert_eq!(input_size(640, 480, 60, 8), (64, 56));
    }
}
