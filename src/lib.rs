//! dino: DINO self-supervised vision transformers (Caron et al., ICCV 2021) on Burn.

// All unsafe code is in `engine::cpu`, each block with the reason it is sound.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod cli;
pub mod data;
pub mod device;
pub mod dist;
pub mod eval;
pub mod engine;
pub mod model;
pub mod train;
pub mod weights;
