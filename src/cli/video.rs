//! `dino video-seg`'s flags: propagates a first-frame mask through a folder of frames
//! (`eval::video`, the DAVIS 2017 protocol), one palette PNG per frame, and with --gt scores
//! the result with DAVIS's J and F.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::DeviceArgs;
use crate::data::dataset::{image_files, image_size};
use crate::data::palette::LabelMap;
use crate::eval::video::{self, PropagationConfig, SegmentSettings};

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
    #[command(flatten)]
    pub device: DeviceArgs,
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

pub fn run(args: VideoArgs) -> Result<()> {
    let device = args.device.open()?;
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
    let (width, height) = image_size(&frames[0]).with_context(|| format!("{}", frames[0].display()))?;
    if (first.width, first.height) != (width as usize, height as usize) {
        bail!("--first_mask {}: {}x{} but the frames are {width}x{height}", first_mask.display(), first.width, first.height);
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
    std::fs::create_dir_all(&args.output_dir).with_context(|| format!("--output_dir {}: cannot create", args.output_dir.display()))?;

    let settings = SegmentSettings {
        scale: args.scale,
        n_last_frames: args.n_last_frames,
        propagation: PropagationConfig { temperature: args.temperature, topk: args.topk, neighbourhood: args.size_mask_neighborhood },
    };
    let predictions = video::segment(vit, &frames, &first, classes, settings, &args.output_dir, &device)?;
    if let Some(gt_files) = gt_files {
        video::report_scores(&predictions, &gt_files, classes, &args.output_dir)?;
    }
    Ok(())
}
