//! `dino attention`: the last block's cls attention of one image, per head and averaged, as
//! PNGs, with the masks holding a share of the attention mass and an overlay on the image.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::DeviceArgs;
use crate::data::augment::{normalize_to_chw, resize_crop_to};
use crate::data::dataset::decode_file;
use crate::eval::attention::{blend, cls_attention, heatmap, mask_image, mass_mask};
use crate::weights::npy;

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct AttentionArgs {
    /// The image to look at (any format the image crate decodes).
    #[arg(long)]
    pub image_path: PathBuf,
    /// Where the PNGs (and attention.npy) are written.
    #[arg(long, default_value = ".")]
    pub output_dir: PathBuf,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    /// One number: the shorter side is resized to it (aspect kept; 0: native size). Two, H W
    /// (the reference's form): the image is resized to exactly H × W. Then it is cropped to a
    /// multiple of the patch size.
    #[arg(long, num_args = 1..=2, default_values_t = [480])]
    pub image_size: Vec<usize>,
    /// Masks keep the patches holding this share of each head's attention mass (0: no masks).
    #[arg(long, default_value_t = 0.6)]
    pub threshold: f64,
    /// Also write the raw attention [heads, grid_h, grid_w] as attention.npy.
    #[arg(long, default_value_t = false)]
    pub save_raw: bool,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    if !(0.0..=1.0).contains(&args.threshold) {
        bail!("--threshold must be in [0, 1], got {}", args.threshold);
    }
    let device = args.device.open()?;
    let img = decode_file(&args.image_path).with_context(|| format!("--image_path {}", args.image_path.display()))?;
    let backbone = args.backbone.load(&device)?;
    let vit = backbone.network.vit("attention maps")?;
    let p = vit.patch_size();

    // Resize (the shorter side to --image_size, or to exactly H x W), then keep the top-left
    // multiple of the patch.
    let (w, h) = (img.width() as f64, img.height() as f64);
    let (scale_x, scale_y) = match args.image_size[..] {
        [0] => (1.0, 1.0),
        [side] => (side as f64 / w.min(h), side as f64 / w.min(h)),
        [height, width] => (width as f64 / w, height as f64 / h),
        _ => unreachable!("clap takes one or two values"),
    };
    let (width, height) = (((w * scale_x).round() as usize) / p * p, ((h * scale_y).round() as usize) / p * p);
    if width == 0 || height == 0 {
        bail!("--image_path {}: {}x{} is smaller than one {p}-pixel patch at --image_size {:?}", args.image_path.display(), w, h, args.image_size);
    }
    let pixels = resize_crop_to(&img, (0.0, 0.0, width as f64 / scale_x, height as f64 / scale_y), width, height);
    let shown = image::RgbImage::from_raw(width as u32, height as u32, pixels.iter().map(|&v| (v * 255.0).round() as u8).collect())
        .expect("buffer size");

    let maps = cls_attention(vit, normalize_to_chw(&pixels), height, width, &device);
    let out = &args.output_dir;
    std::fs::create_dir_all(out).with_context(|| format!("--output_dir {}: cannot create", out.display()))?;
    let save = |img: &image::RgbImage, name: &str| -> Result<()> {
        let path = out.join(name);
        img.save(&path).with_context(|| format!("{}: cannot write", path.display()))
    };
    save(&shown, "image.png")?;
    let (gw, gh) = (maps.grid_w, maps.grid_h);
    for head in 0..maps.heads {
        save(&heatmap(maps.head(head), gw, gh, p), &format!("attn-head{head}.png"))?;
        if args.threshold > 0.0 {
            save(&mask_image(&mass_mask(maps.head(head), args.threshold), gw, gh, p), &format!("mask-head{head}.png"))?;
        }
    }
    let mean = maps.mean();
    let mean_map = heatmap(&mean, gw, gh, p);
    save(&mean_map, "attn-mean.png")?;
    save(&blend(&shown, &mean_map, 0.6), "overlay.png")?;
    if args.threshold > 0.0 {
        save(&mask_image(&mass_mask(&mean, args.threshold), gw, gh, p), "mask-mean.png")?;
    }
    if args.save_raw {
        npy::write_f32(&out.join("attention.npy"), &maps.values, &[maps.heads, gh, gw])?;
    }
    eprintln!("{} heads over a {gw}x{gh} patch grid ({width}x{height} px) -> {}", maps.heads, out.display());
    Ok(())
}
