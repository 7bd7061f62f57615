//! Copy detection on Copydays with frozen features, as the reference's
//! `eval_copy_detection.py` runs it: images resized to `imsize`² (bicubic), features = the last
//! block's cls token next to the GeM (p = 4) of its patch tokens, optionally PCA-whitened with
//! an operator learnt on separate images, the database (the originals, plus distractors)
//! searched for each query's 20 nearest by cosine, and the mAP of each block of queries.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use rayon::prelude::*;

use super::features::{FeatureCache, FeatureKind, FeatureLayout, l2_normalize_rows, progress_bar};
use super::retrieval::{Relevant, average_precision, similarities};
use crate::data::augment::{normalize_to_chw, resize_crop};
use crate::data::dataset::Dataset;
use crate::weights::{self, HostTensor};

/// The GeM exponent of the patch tokens.
pub const GEM_EXPONENT: f32 = 4.0;
/// How many database images each query retrieves (the reference's top 20: a positive ranked
/// lower counts as missed).
pub const RETRIEVED: usize = 20;
/// The power of the eigenvalues the whitening divides by (0.5: full whitening).
pub const WHITENING_POWER: f64 = 0.5;

/// The layout of copy-detection features: cls, then GeM of the patch tokens.
pub const LAYOUT: FeatureLayout = FeatureLayout { n_last_blocks: 1, avgpool_patchtokens: false, gem_patchtokens: Some(GEM_EXPONENT) };

/// The query blocks of Copydays, in the reference's order (the database is `original`).
pub const BLOCKS: [&str; 20] = [
    "original", "strong", "jpegqual/3", "jpegqual/5", "jpegqual/8", "jpegqual/10", "jpegqual/15", "jpegqual/20", "jpegqual/30", "jpegqual/50",
    "jpegqual/75", "crops/10", "crops/15", "crops/20", "crops/30", "crops/40", "crops/50", "crops/60", "crops/70", "crops/80",
];

/// Features of every image of `images` (row-major), each resized to `imsize`² with a bicubic
/// filter. An unreadable image is an error naming it.
pub fn features(kind: FeatureKind, images: &Dataset, imsize: usize, batch: usize, device: &Device) -> Result<(Vec<f32>, usize)> {
    let mut values = Vec::new();
    let mut dim = 0;
    let progress = progress_bar(images.len() as u64);
    let indices: Vec<usize> = (0..images.len()).collect();
    for chunk in indices.chunks(batch.max(1)) {
        let pixels: Vec<Vec<f32>> = chunk
            .par_iter()
            .map(|&i| {
                let img = images.load(i).with_context(|| images.describe(i))?;
                let whole = (0.0, 0.0, img.width() as f64, img.height() as f64);
                Ok(normalize_to_chw(&resize_crop(&img, whole, imsize)))
            })
            .collect::<Result<_>>()?;
        let x = Tensor::<4>::from_data(TensorData::new(pixels.concat(), [chunk.len(), 3, imsize, imsize]), device);
        let f = HostTensor::from_tensor(kind.features(x)).values;
        dim = f.len() / chunk.len();
        values.extend(f);
        progress.inc(chunk.len() as u64);
    }
    progress.finish_and_clear();
    Ok((values, dim))
}

/// PCA whitening: x ↦ P (x − mean), P = diag(λ^−power) Vᵀ from the eigen-decomposition of
/// the (uncentred, as the reference computes it) second-moment matrix of the fitting
/// features, eigenvalues below 1e-5 of the largest raised to that floor.
#[derive(Debug, Clone, PartialEq)]
pub struct Whitening {
    pub mean: Vec<f32>,
    /// Row-major [dim, dim].
    pub projection: Vec<f32>,
}

impl Whitening {
    pub fn fit(features: &[f32], dim: usize) -> Result<Self> {
        let n = features.len() / dim;
        if n == 0 {
            bail!("no images to fit the whitening on");
        }
        let mut mean = vec![0f64; dim];
        let mut moment = nalgebra::DMatrix::<f64>::zeros(dim, dim);
        // FᵀF as matrix products over blocks of rows (nalgebra's blocked gemm), not one
        // rank-1 update per image: 20k × 1536 features is 5·10¹⁰ multiply-adds.
        const ROWS_PER_BLOCK: usize = 1024;
        for block in features.chunks(dim * ROWS_PER_BLOCK) {
            let f = nalgebra::DMatrix::from_row_iterator(block.len() / dim, dim, block.iter().map(|&v| v as f64));
            moment.gemm_tr(1.0, &f, &f, 1.0);
            for row in block.chunks(dim) {
                mean.iter_mut().zip(row).for_each(|(m, &v)| *m += v as f64);
            }
        }
        moment /= n as f64;
        let eigen = nalgebra::SymmetricEigen::new(moment);
        let floor = eigen.eigenvalues.max() * 1e-5;
        let mut order: Vec<usize> = (0..dim).collect();
        order.sort_by(|&a, &b| eigen.eigenvalues[b].total_cmp(&eigen.eigenvalues[a]));
        let mut projection = Vec::with_capacity(dim * dim);
        for &k in &order {
            let scale = eigen.eigenvalues[k].max(floor).powf(-WHITENING_POWER);
            projection.extend(eigen.eigenvectors.column(k).iter().map(|&v| (v * scale) as f32));
        }
        Ok(Self { mean: mean.iter().map(|m| (m / n as f64) as f32).collect(), projection })
    }

    /// Whitens every row of `features` in place.
    pub fn apply(&self, features: &mut [f32]) {
        let dim = self.mean.len();
        features.par_chunks_mut(dim).for_each(|row| {
            let centred: Vec<f32> = row.iter().zip(&self.mean).map(|(v, m)| v - m).collect();
            for (out, p) in row.iter_mut().zip(self.projection.chunks(dim)) {
                *out = p.iter().zip(&centred).map(|(a, b)| a * b).sum();
            }
        });
    }

    pub fn save(&self, path: &Path) -> Result<()> {
        let dim = self.mean.len();
        let tensors = vec![
            ("mean".to_string(), HostTensor { shape: vec![dim], values: self.mean.clone() }),
            ("projection".to_string(), HostTensor { shape: vec![dim, dim], values: self.projection.clone() }),
        ];
        weights::write_safetensors(path, tensors, Default::default())
    }

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
        let (mut tensors, _) = weights::read_safetensors(&bytes, path)?;
        let mut take = |name: &str| tensors.remove(name).with_context(|| format!("{}: no '{name}' (not a whitening file)", path.display()));
        let (mean, projection) = (take("mean")?, take("projection")?);
        let dim = mean.values.len();
        if projection.shape != [dim, dim] {
            bail!("{}: projection is {:?}, expected [{dim}, {dim}]", path.display(), projection.shape);
        }
        Ok(Self { mean: mean.values, projection: projection.values })
    }
}

/// The Copydays folders: `original` (the database) and the query blocks present under `root`.
pub struct Copydays {
    pub originals: Dataset,
    pub blocks: Vec<(String, Dataset)>,
}

impl Copydays {
    pub fn open(root: &Path) -> Result<Self> {
        let block = |name: &str| -> Result<Dataset> {
            let dir = root.join(name);
            let files = crate::data::dataset::image_files(&dir, false).with_context(|| format!("--data_path: Copydays block '{name}'"))?;
            Ok(Dataset::Folder { labels: vec![None; files.len()], files, classes: Vec::new() })
        };
        let originals = block("original")?;
        if originals.is_empty() {
            bail!("--data_path {}: Copydays block 'original' holds no images", root.display());
        }
        let blocks = BLOCKS.iter().filter(|b| root.join(b).is_dir()).map(|b| Ok((b.to_string(), block(b)?))).collect::<Result<Vec<_>>>()?;
        Ok(Self { originals, blocks })
    }
}

/// The file name of image `i` of a folder dataset.
fn file_name(d: &Dataset, i: usize) -> String {
    match d {
        Dataset::Folder { files, .. } => files[i].file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        _ => String::new(),
    }
}

/// Each query's positives among the originals: the original of the same name, or, for the
/// `strong` block (whose names differ), every original whose first four characters — the
/// image's id — match.
pub fn positives(originals: &Dataset, block: &str, queries: &Dataset) -> Result<Vec<Relevant>> {
    let names: Vec<String> = (0..originals.len()).map(|i| file_name(originals, i)).collect();
    (0..queries.len())
        .map(|q| {
            let name = file_name(queries, q);
            let positives: Vec<usize> = if block == "strong" {
                let id: String = name.chars().take(4).collect();
                names.iter().enumerate().filter(|(_, n)| n.chars().take(4).collect::<String>() == id).map(|(i, _)| i).collect()
            } else {
                names.iter().position(|n| *n == name).into_iter().collect()
            };
            if positives.is_empty() {
                bail!("{}: no original of that name in the database", queries.describe(q));
            }
            Ok(Relevant { positives, junk: Vec::new() })
        })
        .collect()
}

/// The mAP of one block: each query's 20 nearest database images by cosine (L2-normalised
/// features), AP over those (a positive ranked lower counts as missed). One similarity row per
/// query in memory at a time, per thread.
pub fn block_map(database: &[f32], queries: &[f32], dim: usize, relevant: &[Relevant]) -> f64 {
    let total: f64 = queries
        .par_chunks(dim)
        .zip(relevant)
        .map(|(q, rel)| {
            let sims = similarities(database, q);
            let mut order: Vec<usize> = (0..sims.len()).collect();
            let retrieved = RETRIEVED.min(order.len());
            let by_rank = |&a: &usize, &b: &usize| sims[b].total_cmp(&sims[a]).then(a.cmp(&b));
            if retrieved < order.len() {
                order.select_nth_unstable_by(retrieved, by_rank);
            }
            order.truncate(retrieved);
            order.sort_by(by_rank);
            let positions: Vec<usize> = order.iter().enumerate().filter(|(_, id)| rel.positives.contains(id)).map(|(at, _)| at).collect();
            average_precision(&positions, rel.positives.len())
        })
        .sum();
    total / relevant.len().max(1) as f64
}

/// Everything the command needs besides the backbone.
pub struct Setup {
    pub data_path: PathBuf,
    pub distractors: Option<PathBuf>,
    pub whitening_images: Option<PathBuf>,
    pub whitening_file: Option<PathBuf>,
    pub imsize: usize,
    pub batch: usize,
}

/// Runs the protocol; returns each block's mAP (fraction) in `BLOCKS` order.
pub fn evaluate(kind: FeatureKind, setup: &Setup, cache: Option<&FeatureCache>, device: &Device) -> Result<Vec<(String, f64)>> {
    let cached = |set: &str, images: &Dataset| {
        let compute = || features(kind, images, setup.imsize, setup.batch, device);
        match cache {
            Some(cache) => cache.get(set, images, compute),
            None => compute(),
        }
    };
    let copydays = Copydays::open(&setup.data_path)?;
    let (mut database, dim) = cached("original", &copydays.originals)?;
    if let Some(dir) = &setup.distractors {
        let distractors = Dataset::open_folder(dir).with_context(|| format!("--distractors_path {}", dir.display()))?;
        eprintln!("{} distractors", distractors.len());
        database.extend(cached("distractors", &distractors)?.0);
    }
    let whitening = match (&setup.whitening_images, &setup.whitening_file) {
        (Some(dir), file) => {
            let images = Dataset::open_folder(dir).with_context(|| format!("--whitening_path {}", dir.display()))?;
            let w = Whitening::fit(&cached("whitening", &images)?.0, dim)?;
            if let Some(file) = file {
                w.save(file).with_context(|| format!("--whitening_file {}", file.display()))?;
            }
            Some(w)
        }
        (None, Some(file)) => Some(Whitening::load(file).with_context(|| format!("--whitening_file {}", file.display()))?),
        (None, None) => None,
    };
    if let Some(w) = &whitening {
        if w.mean.len() != dim {
            bail!("the whitening is {}-d but these features are {dim}-d (another backbone?)", w.mean.len());
        }
        w.apply(&mut database);
    }
    l2_normalize_rows(&mut database, dim);
    let mut scores = Vec::new();
    for (name, queries) in &copydays.blocks {
        let relevant = positives(&copydays.originals, name, queries)?;
        let mut q = cached(&format!("queries/{name}"), queries)?.0;
        if let Some(w) = &whitening {
            w.apply(&mut q);
        }
        l2_normalize_rows(&mut q, dim);
        scores.push((name.clone(), block_map(&database, &q, dim, &relevant)));
    }
    Ok(scores)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On zero-mean fitting features (where the uncentred moment the fit uses is the
    /// covariance) the whitened features have the identity as second moment.
    #[test]
    fn whitening_makes_the_second_moment_the_identity() {
        // Zero-mean 3-d points with correlated coordinates.
        let base = [[1.0f32, 2.0, 0.5], [-1.0, -2.0, -0.5], [2.0, -1.0, 1.0], [-2.0, 1.0, -1.0], [0.5, 0.5, -3.0], [-0.5, -0.5, 3.0]];
        let features: Vec<f32> = base.iter().flatten().copied().collect();
        let w = Whitening::fit(&features, 3).unwrap();
        assert!(w.mean.iter().all(|m| m.abs() < 1e-6));
        let mut white = features.clone();
        w.apply(&mut white);
        for a in 0..3 {
            for b in 0..3 {
                let m: f32 = white.chunks(3).map(|r| r[a] * r[b]).sum::<f32>() / 6.0;
                assert!((m - if a == b { 1.0 } else { 0.0 }).abs() < 1e-4, "moment[{a}][{b}] = {m}");
            }
        }
        // Saved and loaded unchanged.
        let path = std::env::temp_dir().join(format!("dino-whitening-{}.safetensors", std::process::id()));
        w.save(&path).unwrap();
        assert_eq!(Whitening::load(&path).unwrap(), w);
        let _ = std::fs::remove_file(path);
    }

    /// Components are ordered by decreasing eigenvalue: the first output coordinate is the
    /// direction of largest spread.
    #[test]
    fn whitening_orders_components_by_energy() {
        let features = [3.0f32, 0.0, -3.0, 0.0, 0.0, 1.0, 0.0, -1.0];
        let w = Whitening::fit(&features, 2).unwrap();
        // Second moments (9 + 9) / 4 = 4.5 along x and 2 / 4 = 0.5 along y: the projection's
        // rows are ±(1/√4.5, 0), then ±(0, 1/√0.5).
        assert!((w.projection[0].abs() - 1.0 / 4.5f32.sqrt()).abs() < 1e-6 && w.projection[1].abs() < 1e-6, "{:?}", w.projection);
        assert!(w.projection[2].abs() < 1e-6 && (w.projection[3].abs() - 2f32.sqrt()).abs() < 1e-6, "{:?}", w.projection);
    }
}
