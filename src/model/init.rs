//! Seeded parameter initialisation, drawn on the host so the same seed gives the same model
//! on every backend and thread count.

use burn::tensor::{Device, Tensor, TensorData};
use rand::Rng;
use rand_distr::{Distribution, StandardNormal};

/// A float tensor from row-major values.
pub fn tensor_from_vec<const D: usize>(values: Vec<f32>, shape: [usize; D], device: &Device) -> Tensor<D> {
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Normal(0, std) truncated to [-2, 2] (absolute bounds, as the reference's `trunc_normal_`).
pub fn trunc_normal<const D: usize>(shape: [usize; D], std: f64, rng: &mut impl Rng, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let values = (0..n)
        .map(|_| loop {
            let z: f64 = StandardNormal.sample(rng);
            let x = z * std;
            if (-2.0..=2.0).contains(&x) {
                break x as f32;
            }
        })
        .collect();
    tensor_from_vec(values, shape, device)
}

/// Uniform(-bound, bound): PyTorch's default Linear/Conv init has bound = 1/sqrt(fan_in).
pub fn uniform<const D: usize>(shape: [usize; D], bound: f64, rng: &mut impl Rng, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let values = (0..n).map(|_| rng.random_range(-bound..bound) as f32).collect();
    tensor_from_vec(values, shape, device)
}

/// Normal(0, std), untruncated (torchvision's Kaiming init of ResNet convolutions).
pub fn normal<const D: usize>(shape: [usize; D], std: f64, rng: &mut impl Rng, device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    let values = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (z * std) as f32
        })
        .collect();
    tensor_from_vec(values, shape, device)
}
