//! Training: the DINO loss, schedules, teacher EMA and optimiser.

pub mod checkpoint;
pub mod config;
pub mod ema;
pub mod log;
pub mod loss;
pub mod online_knn;
pub mod optim;
pub mod replicas;
pub mod schedule;
pub mod step;
pub mod trainer;
