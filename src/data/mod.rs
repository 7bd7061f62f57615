//! Data: image sources, multi-crop augmentation and the parallel batch loader.

pub mod augment;
pub mod dataset;
pub mod loader;
pub mod palette;
