//! Using the features: extraction and k-NN classification.

pub mod features;
pub mod knn;
