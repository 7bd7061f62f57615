//! Image retrieval with frozen features, as the reference's `eval_image_retrieval.py` runs it:
//! every image shrunk to fit `imsize` (aspect kept), the backbone's cls output (optionally the
//! mean over scales 1, 1/√2 and 1/2), cosine ranking of the database for each query, and the
//! revisited Oxford/Paris protocol's scores — mAP and mean precision at k, junk images removed
//! from the ranking — for its Easy, Medium and Hard ground truths, or for plain class folders
//! (a query's positives are the database images of its class).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use super::features::{FeatureKind, l2_normalize_rows, progress_bar};
use crate::data::augment::normalize_to_chw;
use crate::data::dataset::Dataset;
use crate::weights::pth;
use crate::weights::HostTensor;

/// The scales the reference's multi-scale features average over.
pub const MULTI_SCALES: [f32; 3] = [1.0, std::f32::consts::FRAC_1_SQRT_2, 0.5];

/// What counts for one query: the database images that are correct answers, and those that are
/// neither right nor wrong (removed from its ranking before scoring).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Relevant {
    pub positives: Vec<usize>,
    pub junk: Vec<usize>,
}

/// A query set's scores: mAP over the queries that have positives, and the mean precision at
/// each k (both as fractions).
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub map: f64,
    pub precision_at: Vec<(usize, f64)>,
}

/// L2-normalised retrieval features of `images` (row-major, one row per image). An unreadable
/// image is an error naming it: a retrieval benchmark's ground truth refers to every image.
pub fn features(kind: FeatureKind, images: &Dataset, imsize: usize, multiscale: bool, device: &Device) -> Result<(Vec<f32>, usize)> {
    let mut values = Vec::new();
    let mut dim = 0;
    let progress = progress_bar(images.len() as u64);
    for i in 0..images.len() {
        let img = images.load(i).with_context(|| images.describe(i))?;
        let x = thumbnail_tensor(&img, imsize, kind.patch_size().unwrap_or(1), device).with_context(|| images.describe(i))?;
        let scales: &[f32] = if multiscale { &MULTI_SCALES } else { &[1.0] };
        let mut sum: Option<Vec<f32>> = None;
        for &scale in scales {
            let input = if scale == 1.0 {
                x.clone()
            } else {
                let options = InterpolateOptions::new(InterpolateMode::Bilinear).with_align_corners(false).with_scale_factor([scale, scale]);
                interpolate(x.clone(), options)
            };
            let f = HostTensor::from_tensor(kind.features(input)).values;
            match &mut sum {
                Some(s) => s.iter_mut().zip(&f).for_each(|(a, b)| *a += b),
                None => sum = Some(f),
            }
        }
        let mut f = sum.expect("at least one scale");
        dim = f.len();
        l2_normalize_rows(&mut f, dim);
        values.extend(f);
        progress.inc(1);
    }
    progress.finish_and_clear();
    Ok((values, dim))
}

/// The image shrunk (never enlarged) so that its longer side is at most `imsize`, aspect kept
/// (PIL's `thumbnail`, Lanczos), normalised, as a [1, 3, h, w] tensor.
fn thumbnail_tensor(img: &RgbImage, imsize: usize, patch: usize, device: &Device) -> Result<Tensor<4>> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let longer = w.max(h);
    let (tw, th) = if longer > imsize {
        let s = imsize as f64 / longer as f64;
        (((w as f64 * s).round() as usize).max(1), ((h as f64 * s).round() as usize).max(1))
    } else {
        (w, h)
    };
    if tw < patch || th < patch {
        bail!("{w}×{h} px becomes {tw}×{th} at --imsize {imsize}, smaller than a {patch}-px patch");
    }
    let small = if (tw, th) == (w, h) { img.clone() } else { image::imageops::resize(img, tw as u32, th as u32, image::imageops::FilterType::Lanczos3) };
    let hwc: Vec<f32> = small.as_raw().iter().map(|&v| v as f32 / 255.0).collect();
    Ok(Tensor::from_data(TensorData::new(normalize_to_chw(&hwc), [1, 3, th, tw]), device))
}

/// Cosine similarities of one query to every database image (features are L2-normalised).
pub fn similarities(database: &[f32], query: &[f32]) -> Vec<f32> {
    database.chunks(query.len()).map(|d| d.iter().zip(query).map(|(a, b)| a * b).sum()).collect()
}

/// The ranking's order of database images `a` and `b` (`Less`: `a` first): higher similarity
/// first, ties by database order.
fn rank_order(sims: &[f32], a: usize, b: usize) -> std::cmp::Ordering {
    sims[b].total_cmp(&sims[a]).then(a.cmp(&b))
}

/// Where the positives land in the ranking of the database by `sims` once junk is taken out
/// (0-based, increasing), without sorting the database: one pass counts, for each positive,
/// the kept images that rank above it. Memory stays at the similarity row, whatever the
/// database's size.
pub fn positive_positions(sims: &[f32], relevant: &Relevant) -> Vec<usize> {
    let mut is_junk = vec![false; sims.len()];
    relevant.junk.iter().filter(|&&j| j < sims.len()).for_each(|&j| is_junk[j] = true);
    let mut positives: Vec<usize> = relevant.positives.iter().copied().filter(|&p| p < sims.len() && !is_junk[p]).collect();
    positives.sort_unstable();
    positives.dedup();
    positives.sort_by(|&a, &b| rank_order(sims, a, b));
    // above[t]: kept images ranked above the t-th positive, via differences.
    let mut first_below = vec![0usize; positives.len() + 1];
    for j in (0..sims.len()).filter(|&j| !is_junk[j]) {
        let t = positives.partition_point(|&p| rank_order(sims, j, p).is_ge());
        first_below[t] += 1;
    }
    let mut above = 0;
    positives.iter().enumerate().map(|(t, _)| {
        above += first_below[t];
        above
    }).collect()
}

/// Average precision from the positions (0-based, increasing) of the positives found, out of
/// `positives` in all, the revisited protocol's (and the Holidays package's) way: the
/// precision-recall curve integrated by trapezoids, each positive adding a recall step of
/// 1/positives between the precision just before it and at it.
pub fn average_precision(positions: &[usize], positives: usize) -> f64 {
    let step = 1.0 / positives as f64;
    positions
        .iter()
        .enumerate()
        .map(|(found, &at)| {
            let before = if at == 0 { 1.0 } else { found as f64 / at as f64 };
            let at_it = (found + 1) as f64 / (at + 1) as f64;
            (before + at_it) / 2.0 * step
        })
        .sum()
}

/// Precision at each k, the revisited protocol's way: k is capped at the rank of the last
/// positive, so a query with few positives is not punished for k beyond them.
fn precision_at(positions: &[usize], ks: &[usize]) -> Vec<f64> {
    let last = positions.last().map_or(0, |p| p + 1);
    ks.iter()
        .map(|&k| {
            let kq = k.min(last);
            if kq == 0 { 0.0 } else { positions.iter().filter(|&&p| p < kq).count() as f64 / kq as f64 }
        })
        .collect()
}

/// mAP and mean precision at `ks` of every query against the database (L2-normalised
/// features, `dim` wide), over the queries that have positives; one similarity row per query
/// in memory at a time, per thread.
pub fn evaluate(database: &[f32], queries: &[f32], dim: usize, relevant: &[Relevant], ks: &[usize]) -> Scores {
    use rayon::prelude::*;
    let progress = progress_bar(relevant.len() as u64);
    let per_query: Vec<Option<(f64, Vec<f64>)>> = queries
        .par_chunks(dim)
        .zip(relevant)
        .map(|(q, rel)| {
            let scored = (!rel.positives.is_empty()).then(|| {
                let positions = positive_positions(&similarities(database, q), rel);
                (average_precision(&positions, rel.positives.len()), precision_at(&positions, ks))
            });
            progress.inc(1);
            scored
        })
        .collect();
    progress.finish_and_clear();
    let scored: Vec<&(f64, Vec<f64>)> = per_query.iter().flatten().collect();
    let n = scored.len().max(1) as f64;
    let precision_at = ks.iter().enumerate().map(|(i, &k)| (k, scored.iter().map(|(_, p)| p[i]).sum::<f64>() / n)).collect();
    Scores { map: scored.iter().map(|(ap, _)| ap).sum::<f64>() / n, precision_at }
}

/// One query's ground truth in the revisited datasets.
#[derive(Debug, Clone, Default)]
pub struct RevisitedQuery {
    pub easy: Vec<usize>,
    pub hard: Vec<usize>,
    pub junk: Vec<usize>,
}

/// The revisited protocols: which of a query's images are positives and which are junk.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Protocol {
    /// Positives: easy; junk: junk and hard.
    Easy,
    /// Positives: easy and hard; junk: junk.
    Medium,
    /// Positives: hard; junk: junk and easy.
    Hard,
}

impl RevisitedQuery {
    pub fn relevant(&self, protocol: Protocol) -> Relevant {
        let join = |a: &[usize], b: &[usize]| [a, b].concat();
        match protocol {
            Protocol::Easy => Relevant { positives: self.easy.clone(), junk: join(&self.junk, &self.hard) },
            Protocol::Medium => Relevant { positives: join(&self.easy, &self.hard), junk: self.junk.clone() },
            Protocol::Hard => Relevant { positives: self.hard.clone(), junk: join(&self.junk, &self.easy) },
        }
    }
}

/// A revisited Oxford or Paris dataset: `ROOT/NAME/jpg/*.jpg` and `ROOT/NAME/gnd_NAME.pkl`
/// (the pickle holding `imlist`, `qimlist` and, per query, `easy`, `hard` and `junk`).
pub struct Revisited {
    pub database: Dataset,
    pub queries: Dataset,
    pub ground_truth: Vec<RevisitedQuery>,
}

impl Revisited {
    pub fn open(root: &Path, name: &str) -> Result<Self> {
        let dir = root.join(name);
        let gnd_path = dir.join(format!("gnd_{name}.pkl"));
        let bytes = std::fs::read(&gnd_path).with_context(|| format!("{}: cannot read", gnd_path.display()))?;
        let gnd = pth::read_pickle(&bytes).with_context(|| format!("{}: not a pickle", gnd_path.display()))?;
        let context = |what: &str| format!("{}: {what}", gnd_path.display());
        let names = |key: &str| -> Result<Vec<PathBuf>> {
            let list = gnd.get(key).with_context(|| context(&format!("no '{key}'")))?;
            let items = pth::list_items(list).with_context(|| context(&format!("'{key}' is not a list")))?;
            items
                .iter()
                .map(|v| match v {
                    pth::Value::Str(s) => Ok(dir.join("jpg").join(format!("{s}.jpg"))),
                    other => bail!("{}", context(&format!("'{key}' holds a {} where image names belong", other.kind()))),
                })
                .collect()
        };
        let (images, query_images) = (names("imlist")?, names("qimlist")?);
        let per_query = pth::list_items(gnd.get("gnd").with_context(|| context("no 'gnd'"))?).with_context(|| context("'gnd' is not a list"))?;
        if per_query.len() != query_images.len() {
            bail!("{}", context(&format!("{} ground truths for {} queries", per_query.len(), query_images.len())));
        }
        let ground_truth = per_query
            .iter()
            .enumerate()
            .map(|(q, g)| {
                let ids = |key: &str| -> Result<Vec<usize>> {
                    let ids = g.get(key).map(pth::integers).transpose().with_context(|| context(&format!("query {q}: '{key}'")))?.unwrap_or_default();
                    if let Some(bad) = ids.iter().find(|&&i| i < 0 || i as usize >= images.len()) {
                        bail!("{}", context(&format!("query {q}: '{key}' names image {bad} of {}", images.len())));
                    }
                    Ok(ids.into_iter().map(|i| i as usize).collect())
                };
                Ok(RevisitedQuery { easy: ids("easy")?, hard: ids("hard")?, junk: ids("junk")? })
            })
            .collect::<Result<_>>()?;
        let as_dataset = |files: Vec<PathBuf>| Dataset::Folder { labels: vec![None; files.len()], files, classes: Vec::new() };
        Ok(Self { database: as_dataset(images), queries: as_dataset(query_images), ground_truth })
    }
}

/// For class folders: each query's positives are the database images of its class (by class
/// name); there is no junk.
pub fn class_relevance(database: &Dataset, queries: &Dataset) -> Result<Vec<Relevant>> {
    let class_of = |d: &Dataset, i: usize| -> Option<String> {
        match d {
            Dataset::Folder { classes, .. } => d.label(i).and_then(|l| classes.get(l).cloned()),
            _ => d.label(i).map(|l| l.to_string()),
        }
    };
    let database_classes: Vec<Option<String>> = (0..database.len()).map(|i| class_of(database, i)).collect();
    (0..queries.len())
        .map(|q| {
            let class = class_of(queries, q).with_context(|| format!("{}: a query needs a class (its folder)", queries.describe(q)))?;
            let positives = database_classes.iter().enumerate().filter(|(_, c)| c.as_deref() == Some(class.as_str())).map(|(i, _)| i).collect();
            Ok(Relevant { positives, junk: Vec::new() })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rel(positives: &[usize], junk: &[usize]) -> Relevant {
        Relevant { positives: positives.to_vec(), junk: junk.to_vec() }
    }

    /// Similarities that rank the database in `order` (first = most similar).
    fn sims_ranking(order: &[usize]) -> Vec<f32> {
        let mut sims = vec![0.0; order.len()];
        order.iter().enumerate().for_each(|(place, &id)| sims[id] = -(place as f32));
        sims
    }

    fn ap(order: &[usize], relevant: &Relevant) -> f64 {
        average_precision(&positive_positions(&sims_ranking(order), relevant), relevant.positives.len())
    }

    /// Worked by hand. Ranking 0..6, positives {1, 3}: positions 1 and 3. The first positive
    /// steps from precision 0/1 to 1/2, the second from 1/3 to 2/4, each over a recall of ½:
    /// AP = ½·(0 + ½)/2 + ½·(⅓ + ½)/2 = 1/8 + 5/24 = 1/3.
    #[test]
    fn average_precision_by_trapezoids() {
        let ranking: Vec<usize> = (0..6).collect();
        assert!((ap(&ranking, &rel(&[1, 3], &[])) - 1.0 / 3.0).abs() < 1e-12);
        // First place: (1 + 1)/2 = 1.
        assert_eq!(ap(&ranking, &rel(&[0], &[])), 1.0);
        // Junk 0 and 2 removed: positives 1 and 3 move to positions 0 and 1, AP 1.
        assert_eq!(ap(&ranking, &rel(&[1, 3], &[0, 2])), 1.0);
        // A positive the database does not hold counts as missed: ½·[(1 + 1)/2] = 0.5.
        assert_eq!(ap(&[0, 1, 2], &rel(&[0, 9], &[])), 0.5);
        // Reversed ranking: positives 3 and 1 land at 2 and 4.
        assert_eq!(positive_positions(&sims_ranking(&[5, 4, 3, 2, 1, 0]), &rel(&[1, 3], &[])), vec![2, 4]);
    }

    /// Positions agree with sorting the database, ties broken by database order.
    #[test]
    fn positions_match_a_sorted_ranking() {
        let sims = [0.5f32, 0.9, 0.5, -0.2, 0.9, 0.1, 0.5];
        let mut order: Vec<usize> = (0..sims.len()).collect();
        order.sort_by(|&a, &b| sims[b].total_cmp(&sims[a]).then(a.cmp(&b)));
        let relevant = rel(&[6, 0, 4], &[1]);
        let kept: Vec<usize> = order.iter().copied().filter(|i| *i != 1).collect();
        let mut expected: Vec<usize> = [6, 0, 4].iter().map(|p| kept.iter().position(|k| k == p).unwrap()).collect();
        expected.sort();
        assert_eq!(positive_positions(&sims, &relevant), expected);
    }

    /// Positives at 1-based ranks 2 and 4: k = 1 → 0/1; k = 5 capped at 4 → 2/4; k = 3 → 1/3.
    #[test]
    fn precision_at_k_caps_k_at_the_last_positive() {
        assert_eq!(precision_at(&[1, 3], &[1, 3, 5]), vec![0.0, 1.0 / 3.0, 0.5]);
    }

    /// Queries without positives are left out of the means.
    #[test]
    fn evaluation_averages_over_queries_with_positives() {
        // 2-d unit features: database along angles 0°, 30°, ..., 150°; queries at 0° and 150°.
        let angle = |deg: f32| [deg.to_radians().cos(), deg.to_radians().sin()];
        let database: Vec<f32> = (0..6).flat_map(|i| angle(30.0 * i as f32)).collect();
        let queries: Vec<f32> = [0.0f32, 150.0, 0.0].iter().flat_map(|&d| angle(d)).collect();
        // Query 0 ranks 0..6 in order, positives {1, 3}: AP 1/3; query 1 ranks 5 first: AP 1.
        let relevant = vec![rel(&[1, 3], &[]), rel(&[5], &[]), rel(&[], &[])];
        let s = evaluate(&database, &queries, 2, &relevant, &[1]);
        assert!((s.map - (1.0 / 3.0 + 1.0) / 2.0).abs() < 1e-12, "{s:?}");
        assert_eq!(s.precision_at, vec![(1, 0.5)]);
    }

    #[test]
    fn protocols_move_easy_and_hard_between_positives_and_junk() {
        let q = RevisitedQuery { easy: vec![1], hard: vec![2], junk: vec![3] };
        assert_eq!(q.relevant(Protocol::Easy), rel(&[1], &[3, 2]));
        assert_eq!(q.relevant(Protocol::Medium), rel(&[1, 2], &[3]));
        assert_eq!(q.relevant(Protocol::Hard), rel(&[2], &[3, 1]));
    }
}
