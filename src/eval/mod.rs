//! Using the features: extraction, k-NN classification, attention maps, video segmentation.

pub mod attention;
pub mod features;
pub mod knn;
pub mod video;
