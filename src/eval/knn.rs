//! Weighted k-NN classification on frozen features, the protocol of Wu et al. (2018) as DINO
//! evaluates with it: cosine similarity, the k most similar training features vote for their
//! class with weight exp(similarity / T), the class with the largest total wins.
//!
//! Similarities are computed a block of test rows against a block of training rows at a time,
//! keeping only a running top-k per test row, so memory stays bounded for any training set size.

use burn::tensor::{Device, Tensor, TensorData};

use crate::weights::HostTensor;

/// Row-major features with one label per row.
pub struct LabelledFeatures {
    pub dim: usize,
    pub values: Vec<f32>,
    pub labels: Vec<usize>,
}

impl LabelledFeatures {
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Divides each row by its L2 norm (rows of zeros stay zero).
    pub fn l2_normalize(&mut self) {
        super::features::l2_normalize_rows(&mut self.values, self.dim);
    }
}

/// Accuracy for one k, in percent.
#[derive(Debug, Clone, PartialEq)]
pub struct KnnAccuracy {
    pub k: usize,
    pub top1: f64,
    pub top5: f64,
}

const TEST_BLOCK: usize = 256;
const TRAIN_BLOCK: usize = 16384;

/// Classifies every test row for each k in `ks`. Features must already be L2-normalised.
/// Ties between classes go to the smaller class index.
pub fn knn_accuracy(train: &LabelledFeatures, test: &LabelledFeatures, ks: &[usize], temperature: f64, device: &Device) -> Vec<KnnAccuracy> {
    assert_eq!(train.dim, test.dim, "train and test features differ in width");
    let num_classes = train.labels.iter().chain(&test.labels).max().map_or(0, |m| m + 1);
    let k_max = ks.iter().copied().max().unwrap_or(0).min(train.len());
    let mut top1 = vec![0usize; ks.len()];
    let mut top5 = vec![0usize; ks.len()];
    for (block, test_rows) in test.values.chunks(TEST_BLOCK * test.dim).enumerate() {
        let rows = test_rows.len() / test.dim;
        let neighbours = nearest(train, test_rows, rows, k_max, device);
        for (r, list) in neighbours.iter().enumerate() {
            let truth = test.labels[block * TEST_BLOCK + r];
            for (i, &k) in ks.iter().enumerate() {
                let ranked = vote(&list[..k.min(list.len())], &train.labels, num_classes, temperature);
                top1[i] += (ranked.first() == Some(&truth)) as usize;
                top5[i] += ranked.iter().take(5.min(k)).any(|&c| c == truth) as usize;
            }
        }
    }
    let n = test.len().max(1) as f64;
    ks.iter()
        .enumerate()
        .map(|(i, &k)| KnnAccuracy { k, top1: 100.0 * top1[i] as f64 / n, top5: 100.0 * top5[i] as f64 / n })
        .collect()
}

/// For each of `rows` test rows, its `k` most similar training rows as (similarity, index),
/// most similar first (equal similarities: lower index first).
fn nearest(train: &LabelledFeatures, test_rows: &[f32], rows: usize, k: usize, device: &Device) -> Vec<Vec<(f32, usize)>> {
    let dim = train.dim;
    let queries = Tensor::<2>::from_data(TensorData::new(test_rows.to_vec(), [rows, dim]), device);
    let mut best: Vec<Vec<(f32, usize)>> = vec![Vec::with_capacity(2 * k); rows];
    for (block, train_rows) in train.values.chunks(TRAIN_BLOCK * dim).enumerate() {
        let n = train_rows.len() / dim;
        let keys = Tensor::<2>::from_data(TensorData::new(train_rows.to_vec(), [n, dim]), device);
        let sims = HostTensor::from_tensor(queries.clone().matmul(keys.transpose())).values;
        for (r, row) in sims.chunks(n).enumerate() {
            let list = &mut best[r];
            list.extend(row.iter().enumerate().map(|(j, &s)| (s, block * TRAIN_BLOCK + j)));
            keep_top(list, k);
        }
    }
    best
}

fn rank(a: &(f32, usize), b: &(f32, usize)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

fn keep_top(list: &mut Vec<(f32, usize)>, k: usize) {
    if list.len() > k {
        if k > 0 {
            list.select_nth_unstable_by(k - 1, rank);
        }
        list.truncate(k);
    }
    list.sort_by(rank);
}

/// Classes ranked by summed weight exp(similarity / T) of the neighbours voting for them.
fn vote(neighbours: &[(f32, usize)], train_labels: &[usize], num_classes: usize, temperature: f64) -> Vec<usize> {
    let mut weight = vec![0f64; num_classes];
    for &(sim, j) in neighbours {
        weight[train_labels[j]] += (sim as f64 / temperature).exp();
    }
    let mut classes: Vec<usize> = (0..num_classes).collect();
    classes.sort_by(|&a, &b| weight[b].total_cmp(&weight[a]).then(a.cmp(&b)));
    classes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn features(rows: &[[f32; 2]], labels: &[usize]) -> LabelledFeatures {
        let mut f = LabelledFeatures { dim: 2, values: rows.iter().flatten().copied().collect(), labels: labels.to_vec() };
        f.l2_normalize();
        f
    }

    #[test]
    fn weighted_vote_on_hand_made_features() {
        // Train: class 0 around the x axis, class 1 around the y axis.
        let train = features(&[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [0.2, 1.0]], &[0, 0, 1, 1, 1]);
        // Test 0 sits near class 0; test 1 near class 1.
        let test = features(&[[1.0, 0.05], [0.05, 1.0]], &[0, 1]);
        let dev = Device::flex();
        let r = knn_accuracy(&train, &test, &[1, 2, 5], 0.07, &dev);
        assert_eq!(r.iter().map(|a| a.top1).collect::<Vec<_>>(), vec![100.0, 100.0, 100.0]);
        // With k = 5 (more neighbours than class 0 has) the three class-1 votes are far from
        // test 0 (similarity ~0.05-0.25) while its two class-0 votes are close (~1), so the
        // exponential weights still pick class 0: exp(1/0.07) dwarfs exp(0.25/0.07).
        assert_eq!(r[2].top1, 100.0);
        // With T large the vote becomes a plain count: 3 class-1 votes beat 2 class-0 votes.
        let r = knn_accuracy(&train, &test, &[5], 1e6, &dev);
        assert_eq!(r[0].top1, 50.0);
        assert_eq!(r[0].top5, 100.0);
    }

    #[test]
    fn ties_go_to_the_smaller_class() {
        // Two identical train points of different classes: equal weights.
        let train = features(&[[1.0, 0.0], [1.0, 0.0]], &[1, 0]);
        let test = features(&[[1.0, 0.0]], &[0]);
        let dev = Device::flex();
        assert_eq!(knn_accuracy(&train, &test, &[2], 0.07, &dev)[0].top1, 100.0);
        let test = features(&[[1.0, 0.0]], &[1]);
        let r = knn_accuracy(&train, &test, &[2], 0.07, &dev);
        assert_eq!((r[0].top1, r[0].top5), (0.0, 100.0));
    }

    #[test]
    fn top_k_across_train_blocks_equals_a_full_sort() {
        let mut list: Vec<(f32, usize)> = (0..50).map(|i| (((i * 37) % 11) as f32, i)).collect();
        let mut sorted = list.clone();
        sorted.sort_by(rank);
        keep_top(&mut list, 7);
        assert_eq!(list, sorted[..7].to_vec());
    }
}
