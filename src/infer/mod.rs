//! A CPU inference engine for ViT features in bf16 on Intel AMX (`--precision bf16`): the
//! same network as `model::vit`, with tile matrix products and fused, threaded element-wise
//! passes instead of burn's general tensor ops. Checked against the f32 burn path.

pub mod amx;
mod rows;
pub mod vit;

pub use vit::Bf16Vit;
