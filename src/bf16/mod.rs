//! bf16 compute on Intel AMX, our own code where burn has no AMX path: a ViT inference engine
//! for features (`--precision bf16` on `extract`, `knn`, `linear`) and the student ViT's
//! forward and backward pass for training (`dino train --precision bf16`). Both are the
//! networks of `model::vit` with tile matrix products and fused, threaded element-wise passes
//! instead of burn's general tensor ops, checked against the f32 burn path.

pub mod amx;
mod rows;
pub mod student;
pub mod vit;

pub use student::StudentVit;
pub use vit::Bf16Vit;
