//! dino: DINO self-supervised vision transformers (Caron et al., ICCV 2021) on Burn.

pub mod cli;
pub mod data;
pub mod eval;
pub mod bf16;
pub mod model;
pub mod npy;
pub mod pretrained;
pub mod pth;
pub mod train;
pub mod weights;
