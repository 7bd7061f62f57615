//! The batch loader: a background thread that decodes and augments the images of upcoming
//! batches on a worker pool, so the training step rarely waits. Everything random is seeded by
//! (seed, epoch, image index), so batches are the same whatever the number of workers, and an
//! image's crops do not depend on how many processes share the training.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};
use std::thread::JoinHandle;

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rayon::prelude::*;

use super::augment::{MultiCropConfig, multi_crop};
use super::dataset::Dataset;

/// Crops of one batch, view-major: global is [2 * n, 3, G, G], local [locals * n, 3, L, L],
/// flattened, where n = `images` (smaller than the batch size when files were skipped).
pub struct Batch {
    pub step_in_epoch: usize,
    pub images: usize,
    pub global: Vec<f32>,
    pub local: Vec<f32>,
    /// Files of this batch that could not be read, with the reason.
    pub skipped: Vec<String>,
}

/// Mixes seed, epoch and index into one well-spread 64-bit seed (splitmix64 finaliser).
pub fn mix_seed(seed: u64, a: u64, b: u64) -> u64 {
    let mut z = seed ^ a.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ b.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Steps per epoch (the last partial batch is dropped, as in the reference).
pub fn steps_per_epoch(dataset_len: usize, batch_size: usize) -> usize {
    dataset_len / batch_size
}

/// The image order of an epoch.
pub fn epoch_order(len: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    order.shuffle(&mut StdRng::seed_from_u64(mix_seed(seed, epoch as u64, u64::MAX)));
    order
}

pub struct EpochLoader {
    pub batches: Receiver<Batch>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for EpochLoader {
    fn drop(&mut self) {
        // Closing the receiver stops the producer at its next send.
        let (_, dead) = sync_channel(0);
        drop(std::mem::replace(&mut self.batches, dead));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Which part of every global batch this process takes: the global batch of step s is the
/// images `order[s * B * ranks ..][.. B * ranks]` of the epoch's order, and rank r takes the r-th
/// run of `B` (= `batch_size`) of them.
#[derive(Debug, Clone, Copy)]
pub struct Shard {
    pub rank: usize,
    pub ranks: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };
}

/// Starts producing this process's `batch_size` images of every global batch of `epoch`, from
/// `first_step` on.
#[allow(clippy::too_many_arguments)]
pub fn start_epoch(
    dataset: Arc<Dataset>,
    crops: MultiCropConfig,
    batch_size: usize,
    shard: Shard,
    seed: u64,
    epoch: usize,
    first_step: usize,
    pool: Arc<rayon::ThreadPool>,
) -> EpochLoader {
    let (tx, rx) = sync_channel(2);
    let handle = std::thread::spawn(move || {
        let order = epoch_order(dataset.len(), seed, epoch);
        let steps = steps_per_epoch(dataset.len(), batch_size * shard.ranks);
        for step in first_step..steps {
            let first = (step * shard.ranks + shard.rank) * batch_size;
            let indices = &order[first..first + batch_size];
            let batch = pool.install(|| make_batch(&dataset, &crops, indices, seed, epoch, step));
            if tx.send(batch).is_err() {
                return;
            }
        }
    });
    EpochLoader { batches: rx, handle: Some(handle) }
}

fn make_batch(dataset: &Dataset, crops: &MultiCropConfig, indices: &[usize], seed: u64, epoch: usize, step: usize) -> Batch {
    let results: Vec<_> = indices
        .par_iter()
        .map(|&i| {
            let mut rng = StdRng::seed_from_u64(mix_seed(seed, epoch as u64, i as u64));
            dataset.load(i).map(|img| multi_crop(&img, crops, &mut rng)).map_err(|e| format!("{}: {e:#}", dataset.describe(i)))
        })
        .collect();
    let mut skipped = Vec::new();
    let mut views = Vec::new();
    for r in results {
        match r {
            Ok(v) => views.push(v),
            Err(e) => skipped.push(e),
        }
    }
    let n = views.len();
    let (g, l) = (crops.global_size, crops.local_size);
    let mut global = Vec::with_capacity(2 * n * 3 * g * g);
    let mut local = Vec::with_capacity(crops.local_crops_number * n * 3 * l * l);
    for v in 0..crops.ncrops() {
        let out = if v < 2 { &mut global } else { &mut local };
        for image_views in &views {
            out.extend_from_slice(&image_views[v].pixels);
        }
    }
    Batch { step_in_epoch: step, images: n, global, local, skipped }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_do_not_depend_on_the_number_of_workers() {
        let pixels: Vec<u8> = (0..12 * 20 * 20).map(|i| (i * 37 % 251) as u8).collect();
        let dataset = Arc::new(Dataset::Idx { pixels, rows: 20, cols: 20, labels: vec![0; 12], records: (0..12).collect() });
        let crops = MultiCropConfig { global_size: 12, local_size: 6, local_crops_number: 2, global_crops_scale: (0.4, 1.0), local_crops_scale: (0.05, 0.4), blur_sigma: (0.1, 2.0) };
        let collect = |workers: usize, first_step: usize| -> Vec<(usize, Vec<f32>, Vec<f32>)> {
            let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(workers).build().unwrap());
            let loader = start_epoch(dataset.clone(), crops.clone(), 4, Shard::WHOLE, 9, 3, first_step, pool);
            loader.batches.iter().map(|b| (b.step_in_epoch, b.global, b.local)).collect()
        };
        let one = collect(1, 0);
        assert_eq!(one.len(), 3);
        assert_eq!(one[0].1.len(), 2 * 4 * 3 * 12 * 12);
        assert_eq!(one[0].2.len(), 2 * 4 * 3 * 6 * 6);
        assert_eq!(one, collect(3, 0));
        // Resuming mid-epoch yields the same remaining batches.
        assert_eq!(one[1..], collect(2, 1)[..]);
    }

    /// Two ranks taking 2 images each of every global batch of 4 see, laid side by side, the
    /// crops one process taking all 4 sees (same images, same augmentation).
    #[test]
    fn shards_split_each_global_batch_into_the_same_crops() {
        let pixels: Vec<u8> = (0..12 * 20 * 20).map(|i| (i * 53 % 241) as u8).collect();
        let dataset = Arc::new(Dataset::Idx { pixels, rows: 20, cols: 20, labels: vec![0; 12], records: (0..12).collect() });
        let crops = MultiCropConfig { global_size: 12, local_size: 6, local_crops_number: 0, global_crops_scale: (0.4, 1.0), local_crops_scale: (0.05, 0.4), blur_sigma: (0.1, 2.0) };
        let pool = Arc::new(rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap());
        let run = |batch: usize, shard: Shard| -> Vec<Vec<f32>> {
            start_epoch(dataset.clone(), crops.clone(), batch, shard, 9, 1, 0, pool.clone()).batches.iter().map(|b| b.global).collect()
        };
        let whole = run(4, Shard::WHOLE);
        let halves = [run(2, Shard { rank: 0, ranks: 2 }), run(2, Shard { rank: 1, ranks: 2 })];
        assert_eq!(whole.len(), 3);
        assert_eq!(halves[0].len(), 3);
        let view = 3 * 12 * 12;
        for (step, global) in whole.iter().enumerate() {
            // View-major: global view v of image i is at (v * images + i) * view.
            for v in 0..2 {
                for i in 0..4 {
                    let (rank, j) = (i / 2, i % 2);
                    let mine = &halves[rank][step][(v * 2 + j) * view..][..view];
                    assert!(mine == &global[(v * 4 + i) * view..][..view], "step {step} view {v} image {i}");
                }
            }
        }
    }

    #[test]
    fn epoch_order_is_a_seeded_permutation() {
        let a = epoch_order(100, 5, 0);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(100, 5, 0));
        assert_ne!(a, epoch_order(100, 5, 1));
    }
}
