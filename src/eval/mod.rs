//! Using the features: extraction, k-NN and linear classification, attention maps, video segmentation, image retrieval, copy detection.

pub mod attention;
pub mod copy_detection;
pub mod features;
pub mod knn;
pub mod linear;
pub mod retrieval;
pub mod video;
