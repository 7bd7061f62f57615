//! Frozen features of a dataset: the evaluation transform (the reference's resize-256 /
//! centre-crop-224, scaled to any size), then the backbone's cls output, batch by batch.

use anyhow::{Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use rayon::prelude::*;

use super::knn::LabelledFeatures;
use crate::data::augment::{normalize_to_chw, resize_crop};
use crate::data::dataset::Dataset;
pub use crate::engine::Precision;
use crate::engine::EngineVit;
use crate::model::{Network, ResNet, VisionTransformer};
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
        normalize_to_chw(&self.pixels(img))
    }

    /// HWC pixels in [0, 1].
    fn pixels(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = (img.width() as f64, img.height() as f64);
        let side = w.min(h) * self.crop;
        resize_crop(img, ((w - side) / 2.0, (h - side) / 2.0, side, side), self.size)
    }
}

/// What to compute per image.
#[derive(Clone, Copy)]
pub enum FeatureKind<'a> {
    /// ViT features through burn's ops, the products at a precision, see [`backbone_features`].
    Backbone(&'a VisionTransformer, FeatureLayout, Precision),
    /// The same ViT features from our CPU engine (`src/engine/`), at f32 or bf16.
    Engine(&'a EngineVit, FeatureLayout),
    /// A ResNet's pooled output.
    ResNet(&'a ResNet),
    /// The centre-crop pixels themselves, flattened (the raw-pixel baseline).
    Pixels,
}

impl FeatureKind<'_> {
    /// A backbone's features of a batch of normalised images.
    pub fn features(&self, x: Tensor<4>) -> Tensor<2> {
        match *self {
            FeatureKind::Backbone(vit, layout, precision) => backbone_features(vit, x, layout, precision),
            FeatureKind::Engine(engine, layout) => compose_features(engine.intermediate_layers(x, layout.n_last_blocks), layout),
            FeatureKind::ResNet(resnet) => resnet.forward(x),
            FeatureKind::Pixels => unreachable!("pixel features are not computed from tensors"),
        }
    }

    /// A ViT's patch size: the smallest image it can take.
    pub fn patch_size(&self) -> Option<usize> {
        match *self {
            FeatureKind::Backbone(vit, ..) => Some(vit.patch_size()),
            FeatureKind::Engine(engine, _) => Some(engine.patch_size()),
            FeatureKind::ResNet(_) | FeatureKind::Pixels => None,
        }
    }
}

/// Which backbone outputs form a feature.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FeatureLayout {
    /// Concatenate the normalised cls tokens of the last n blocks (1: the usual cls feature).
    pub n_last_blocks: usize,
    /// Also take the mean of the last block's patch tokens.
    pub avgpool_patchtokens: bool,
    /// Also take the generalised mean with this exponent of the last block's patch tokens
    /// (clamped at 1e-6 first), after the cls tokens: copy detection's GeM pooling.
    pub gem_patchtokens: Option<f32>,
}

impl FeatureLayout {
    /// The cls output alone, as k-NN uses it.
    pub const CLS: Self = Self { n_last_blocks: 1, avgpool_patchtokens: false, gem_patchtokens: None };

    /// Width of the feature of a backbone with `embed_dim` channels.
    pub fn dim(&self, embed_dim: usize) -> usize {
        embed_dim * (self.n_last_blocks + self.avgpool_patchtokens as usize + self.gem_patchtokens.is_some() as usize)
    }
}

/// The feature of each image in `x`, [B, layout.dim(D)]. With one block and the patch mean the
/// two are interleaved (cls_0, mean_0, cls_1, mean_1, ...), the order the reference's linear
/// evaluation produces, so its released linear classifiers apply; with several blocks the mean
/// follows the cls tokens. The matrix products run at `precision`.
pub fn backbone_features(vit: &VisionTransformer, x: Tensor<4>, layout: FeatureLayout, precision: Precision) -> Tensor<2> {
    if layout == FeatureLayout::CLS {
        return vit.forward_train(x, None, precision);
    }
    compose_features(vit.intermediate_layers(x, layout.n_last_blocks, precision), layout)
}

/// The features of `layout` from the normalised tokens of the last blocks.
fn compose_features(mut layers: Vec<Tensor<3>>, layout: FeatureLayout) -> Tensor<2> {
    let [b, tokens, d] = layers[0].dims();
    let cls = |t: Tensor<3>| t.slice_dim(1, 0..1).reshape([b, d]);
    let patches = || layers.last().unwrap().clone().slice_dim(1, 1..tokens);
    let mean = layout.avgpool_patchtokens.then(|| patches().mean_dim(1).reshape([b, d]));
    let gem = layout.gem_patchtokens.map(|p| patches().clamp_min(1e-6).powf_scalar(p).mean_dim(1).powf_scalar(1.0 / p).reshape([b, d]));
    match mean {
        Some(mean) if layers.len() == 1 && gem.is_none() => Tensor::stack::<3>(vec![cls(layers.pop().unwrap()), mean], 2).reshape([b, 2 * d]),
        mean => Tensor::cat(layers.into_iter().map(cls).chain(mean).chain(gem).collect(), 1),
    }
}

/// A network ready to compute features at a precision: a ViT on the CPU goes through our
/// engine (packed once), at f32 as at bf16; other networks and devices through burn.
pub struct FeatureNetwork<'a> {
    network: &'a Network,
    engine: Option<EngineVit>,
    precision: Precision,
}

impl<'a> FeatureNetwork<'a> {
    /// An error naming --precision when bf16 is asked of a ResNet or of a device without bf16
    /// products (`engine::check_precision`).
    pub fn new(network: &'a Network, precision: Precision) -> anyhow::Result<Self> {
        if precision != Precision::F32 {
            let vit = network.vit("--precision bf16")?;
            crate::engine::check_precision("--precision", precision, vit.head_width(), &vit.cls_token.val().device())?;
        }
        let engine = match network {
            Network::Vit(vit) if crate::engine::engine_runs(vit, &vit.cls_token.val().device()) => Some(EngineVit::new(vit, precision)?),
            _ => None,
        };
        Ok(Self { network, engine, precision })
    }

    /// The precision the features are computed at.
    pub fn precision(&self) -> Precision {
        self.precision
    }

    pub fn kind(&self, layout: FeatureLayout) -> FeatureKind<'_> {
        match &self.engine {
            Some(engine) => FeatureKind::Engine(engine, layout),
            None => network_features(self.network, layout, self.precision),
        }
    }
}

/// The features of a network through burn's ops: a ViT's with `layout`, its products at
/// `precision`; a ResNet's pooled output.
pub fn network_features(network: &Network, layout: FeatureLayout, precision: Precision) -> FeatureKind<'_> {
    match network {
        Network::Vit(v) => FeatureKind::Backbone(v, layout, precision),
        Network::ResNet(r) => FeatureKind::ResNet(r),
    }
}

/// Width of those features.
pub fn feature_dim(network: &Network, layout: FeatureLayout) -> usize {
    match network {
        Network::Vit(v) => layout.dim(v.embed_dim()),
        Network::ResNet(r) => r.out_dim(),
    }
}

/// Features of the readable images of a dataset, in dataset order, with their labels (when the
/// dataset has them) and their dataset indices.
pub struct Extracted {
    pub dim: usize,
    pub values: Vec<f32>,
    pub labels: Vec<Option<usize>>,
    pub indices: Vec<usize>,
}

impl Extracted {
    /// The features with their labels; an error naming the first unlabelled image.
    pub fn into_labelled(self, dataset: &Dataset) -> Result<LabelledFeatures> {
        let labels = self
            .labels
            .iter()
            .zip(&self.indices)
            .map(|(l, &i)| l.with_context(|| format!("{}: no label", dataset.describe(i))))
            .collect::<Result<_>>()?;
        Ok(LabelledFeatures { dim: self.dim, values: self.values, labels })
    }
}

/// Features of every readable image. Unreadable files are reported on stderr and left out.
pub fn extract(kind: FeatureKind, dataset: &Dataset, transform: EvalTransform, batch: usize, device: &Device) -> Result<Extracted> {
    if let Some(patch) = kind.patch_size()
        && transform.size < patch
    {
        anyhow::bail!("--image_size {} is smaller than the ViT's patch size {patch}", transform.size);
    }
    let mut out = Extracted { dim: 0, values: Vec::new(), labels: Vec::new(), indices: Vec::new() };
    let indices: Vec<usize> = (0..dataset.len()).collect();
    let progress = progress_bar(dataset.len() as u64);
    for chunk in indices.chunks(batch.max(1)) {
        let loaded: Vec<(usize, Result<RgbImage>)> = chunk.par_iter().map(|&i| (i, dataset.load(i))).collect();
        let mut pixels = Vec::new();
        let first_new = out.indices.len();
        for (i, img) in loaded {
            match img {
                Ok(img) => {
                    pixels.push(match kind {
                        FeatureKind::Pixels => transform.pixels(&img),
                        _ => transform.view(&img),
                    });
                    out.indices.push(i);
                    out.labels.push(dataset.label(i));
                }
                Err(e) => progress.suspend(|| eprintln!("warning: skipped {}: {e:#}", dataset.describe(i))),
            }
        }
        progress.inc(chunk.len() as u64);
        let n = out.indices.len() - first_new;
        if n == 0 {
            continue;
        }
        match kind {
            FeatureKind::Pixels => {
                out.dim = pixels[0].len();
                out.values.extend(pixels.concat());
            }
            _ => {
                let size = transform.size;
                let x = Tensor::<4>::from_data(TensorData::new(pixels.concat(), [n, 3, size, size]), device);
                let feats = HostTensor::from_tensor(kind.features(x)).values;
                out.dim = feats.len() / n;
                out.values.extend(feats);
            }
        }
    }
    progress.finish_and_clear();
    Ok(out)
}

/// A progress bar on stderr (indicatif draws nothing when stderr is not a terminal).
pub fn progress_bar(len: u64) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(ProgressStyle::with_template("{bar:40} {pos}/{len} images, {per_sec}, eta {eta}").expect("valid template"));
    bar
}

/// Divides each row of [n, dim] features by its L2 norm (rows of zeros stay zero).
pub fn l2_normalize_rows(values: &mut [f32], dim: usize) {
    values.par_chunks_mut(dim).for_each(|row| {
        let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= norm);
    });
}

/// Features kept on disk between runs of a tool, in `dino extract`'s format (`features.npy`,
/// `files.txt`) plus `settings.txt`: one folder per image set under the cache folder. A set is
/// reused only when its file list and its settings are exactly those of this run: the tool's
/// `settings` (backbone, sizes, pooling), this format's version, and every image file's
/// canonical path, size and modification time; otherwise it is computed and rewritten, with
/// `settings.txt` removed first and written last, so a run that dies midway leaves no set that
/// looks valid.
pub struct FeatureCache<'a> {
    pub dir: &'a std::path::Path,
    pub settings: String,
}

/// Bumped whenever what a cached feature holds changes.
const FEATURE_CACHE_VERSION: u32 = 1;

impl FeatureCache<'_> {
    /// The features of `images` under the name `set`, read back or computed by `compute`.
    pub fn get(&self, set: &str, images: &Dataset, compute: impl FnOnce() -> Result<(Vec<f32>, usize)>) -> Result<(Vec<f32>, usize)> {
        use std::hash::{Hash, Hasher};
        let dir = self.dir.join(set);
        let files: String = (0..images.len()).map(|i| images.describe(i) + "\n").collect();
        let mut stamp = std::collections::hash_map::DefaultHasher::new();
        if let Dataset::Folder { files, .. } = images {
            for f in files {
                let meta = std::fs::metadata(f).ok();
                (std::fs::canonicalize(f).ok(), meta.as_ref().map(|m| m.len()), meta.and_then(|m| m.modified().ok())).hash(&mut stamp);
            }
        }
        let settings = format!("{}\nformat {FEATURE_CACHE_VERSION}, images {:016x}\n", self.settings, stamp.finish());
        let same = |name: &str, expected: &str| std::fs::read_to_string(dir.join(name)).is_ok_and(|text| text == expected);
        if same("files.txt", &files)
            && same("settings.txt", &settings)
            && let Ok(array) = crate::weights::npy::read(&dir.join("features.npy"))
            && let [n, dim] = array.shape[..]
            && n == images.len()
        {
            eprintln!("{set}: {n} features read from {}", dir.display());
            return Ok((array.values.iter().map(|&v| v as f32).collect(), dim));
        }
        std::fs::create_dir_all(&dir).with_context(|| format!("--features_cache {}: cannot create", dir.display()))?;
        let _ = std::fs::remove_file(dir.join("settings.txt"));
        let (values, dim) = compute()?;
        crate::weights::npy::write_f32(&dir.join("features.npy"), &values, &[images.len(), dim])?;
        std::fs::write(dir.join("files.txt"), files)?;
        std::fs::write(dir.join("settings.txt"), settings)?;
        Ok((values, dim))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cache gives back what was computed for the same images and settings, and computes
    /// anew when a setting or an image file changes, or after a run that died while computing.
    #[test]
    fn feature_cache_reuses_only_what_matches() {
        let dir = std::env::temp_dir().join(format!("dino-feature-cache-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let files: Vec<std::path::PathBuf> = (0..2).map(|i| dir.join(format!("{i}.png"))).collect();
        let write = |path: &std::path::Path, value: u8, side: u32| image::RgbImage::from_pixel(side, side, image::Rgb([value; 3])).save(path).unwrap();
        write(&files[0], 10, 4);
        write(&files[1], 20, 4);
        let images = Dataset::Folder { labels: vec![None; 2], files: files.clone(), classes: Vec::new() };
        let store = dir.join("cache");
        let cache = |settings: &str| FeatureCache { dir: &store, settings: settings.to_string() };
        let computed = |v: f32| move || -> Result<(Vec<f32>, usize)> { Ok((vec![v, v, v, v], 2)) };
        let never = || -> Result<(Vec<f32>, usize)> { panic!("should have been read back") };
        assert_eq!(cache("a").get("set", &images, computed(1.0)).unwrap(), (vec![1.0; 4], 2));
        assert_eq!(cache("a").get("set", &images, never).unwrap(), (vec![1.0; 4], 2));
        assert_eq!(cache("b").get("set", &images, computed(2.0)).unwrap().0, vec![2.0; 4], "other settings");
        write(&files[1], 30, 6);
        assert_eq!(cache("b").get("set", &images, computed(3.0)).unwrap().0, vec![3.0; 4], "an image changed");
        assert!(cache("c").get("set", &images, || anyhow::bail!("killed")).is_err());
        assert_eq!(cache("b").get("set", &images, computed(4.0)).unwrap().0, vec![4.0; 4], "a dead run leaves nothing valid");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
