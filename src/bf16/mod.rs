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

/// Arithmetic of a ViT backbone's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// f32 throughout: the reference's numbers.
    #[default]
    F32,
    /// bf16 matrix products with f32 accumulation on Intel AMX (ViT only).
    Bf16,
}

/// An error naming `flag` unless this CPU can run the bf16 engines.
pub fn check_available(flag: &str) -> anyhow::Result<()> {
    anyhow::ensure!(
        amx::available(),
        "{flag} bf16 needs a CPU with AMX-BF16 (Intel Xeon Sapphire Rapids or newer); this one has none, use {flag} f32"
    );
    Ok(())
}
