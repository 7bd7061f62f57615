//! The k-NN monitor of `dino train --knn_every N`: the teacher backbone's weighted k-NN top-1
//! (`ONLINE_KNN_K` neighbours at `ONLINE_KNN_TEMPERATURE`, the reference's evaluation
//! transform at the global crop size) on a labelled train/validation pair, opened once when
//! training starts.

use anyhow::{Context, Result, bail};
use burn::tensor::Device;

use super::config::{ONLINE_KNN_BATCH, ONLINE_KNN_K, ONLINE_KNN_TEMPERATURE, TrainConfig};
use crate::data::dataset::{Dataset, IdxSplit, SUBSET_SEED};
use crate::eval::features::{EvalTransform, FeatureLayout, REFERENCE_CROP, extract, network_features};
use crate::eval::knn::knn_accuracy;
use crate::model::Network;

pub struct OnlineKnn {
    train: Dataset,
    val: Dataset,
    transform: EvalTransform,
}

impl OnlineKnn {
    /// Opens the two sets; an error when either has no labels.
    pub fn open(cfg: &TrainConfig) -> Result<Self> {
        let mut train = Dataset::open(cfg.data(), IdxSplit::Train).with_context(|| format!("--data {}", cfg.data().display()))?;
        if train.num_classes().is_none() {
            bail!("--knn_every needs labels: --data {} has none (class subfolders or IDX labels)", cfg.data().display());
        }
        let val_path = match &cfg.val_data {
            Some(p) => p.clone(),
            None if matches!(train, Dataset::Idx { .. }) => cfg.data().to_path_buf(),
            None => bail!("--knn_every needs --val_data (a labelled folder) when --data is not an IDX directory"),
        };
        let mut val = Dataset::open(&val_path, IdxSplit::Test).with_context(|| format!("--val_data {}", val_path.display()))?;
        if val.num_classes().is_none() {
            bail!("--val_data {}: no labels", val_path.display());
        }
        train.keep_subset(cfg.knn_train_subset, SUBSET_SEED);
        val.keep_subset(cfg.knn_val_subset, SUBSET_SEED);
        Ok(Self { train, val, transform: EvalTransform { size: cfg.global_crop_size, crop: REFERENCE_CROP } })
    }

    /// Top-1 accuracy (percent) of the k-NN classifier on `backbone`'s features (a ViT's cls
    /// token, a ResNet's pooled output with its running statistics).
    pub fn top1(&self, backbone: &Network, device: &Device) -> Result<f64> {
        let kind = network_features(backbone, FeatureLayout::CLS, crate::engine::Precision::F32);
        let mut train = extract(kind, &self.train, self.transform, ONLINE_KNN_BATCH, device)?.into_labelled(&self.train)?;
        let mut val = extract(kind, &self.val, self.transform, ONLINE_KNN_BATCH, device)?.into_labelled(&self.val)?;
        if train.is_empty() || val.is_empty() {
            bail!("online k-NN: no readable labelled images");
        }
        train.l2_normalize();
        val.l2_normalize();
        Ok(knn_accuracy(&train, &val, &[ONLINE_KNN_K], ONLINE_KNN_TEMPERATURE, device)[0].top1)
    }
}
