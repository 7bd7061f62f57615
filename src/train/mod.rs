//! Training: the DINO loss, schedules, teacher EMA and optimiser.

pub mod ema;
pub mod loss;
pub mod optim;
pub mod schedule;
