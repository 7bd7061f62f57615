//! Frozen features of a dataset: the evaluation transform (the reference's resize-256 /
//! centre-crop-224, scaled to any size), then the backbone's cls output, batch by batch.

use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rayon::prelude::*;

use super::knn::LabelledFeatures;
use crate::data::augment::{normalize_to_chw, resize_crop};
use crate::data::dataset::Dataset;
use crate::model::VisionTransformer;
use crate::weights::HostTensor;

/// The reference's centre-crop fraction: 224 of 256.
pub const REFERENCE_CROP: f64 = 224.0 / 256.0;

/// How evaluation images become network inputs: a centre square holding `crop` of the shorter
/// side, resized (bicubic) to `size`.
#[derive(Debug, Clone, Copy)]
pub struct EvalTransform {
    pub size: usize,
    pub crop: f64,
}

impl EvalTransform {
    /// Normalised CHW pixels.
    pub fn view(&self, img: &RgbImage) -> Vec<f32> {
        normalize_to_chw(&self.pixels(img), self.size)
    }

    /// HWC pixels in [0, 1].
    fn pixels(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width() as f64, img.height() as f64);
        let side = w.min(h) * self.crop;
        resize_crop(img, ((w - side) / 2.0, (h - side) / 2.0, side, side), self.size)
    }
}

/// What to compute per image.
#[derive(Debug, Clone, Copy)]
pub enum FeatureKind<'a> {
    /// The backbone's cls output.
    Cls(&'a VisionTransformer),
    /// The centre-crop pixels themselves, flattened (the raw-pixel baseline).
    Pixels,
}

/// Features and labels of every readable, labelled image. Unreadable files are reported on
/// stderr and left out.
pub fn extract(kind: FeatureKind, dataset: &Dataset, transform: EvalTransform, batch: usize, device: &Device) -> Result<LabelledFeatures> {
    let mut out = LabelledFeatures { dim: 0, values: Vec::new(), labels: Vec::new() };
    let indices: Vec<usize> = (0..dataset.len()).filter(|&i| dataset.label(i).is_some()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        let loaded: Vec<(usize, Result<RgbImage>)> = chunk.par_iter().map(|&i| (i, dataset.load(i))).collect();
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for (i, img) in loaded {
            match img {
                Ok(img) => {
                    pixels.push(match kind {
                        FeatureKind::Cls(_) => transform.view(&img),
                        FeatureKind::Pixels => transform.pixels(&img),
                    });
                    labels.push(dataset.label(i).expect("labelled"));
                }
                Err(e) => eprintln!("warning: skipped {}: {e:#}", dataset.describe(i)),
            }
        }
        if labels.is_empty() {
            continue;
        }
        let n = labels.len();
        match kind {
            FeatureKind::Cls(vit) => {
                let size = transform.size;
                let x = Tensor::<4>::from_data(TensorData::new(pixels.concat(), [n, 3, size, size]), device);
                let feats = HostTensor::from_tensor(vit.forward(x)).values;
                out.dim = feats.len() / n;
                out.values.extend(feats);
            }
            FeatureKind::Pixels => {
                out.dim = pixels[0].len();
                out.values.extend(pixels.concat());
            }
        }
        out.labels.extend(labels);
    }
    Ok(out)
}
