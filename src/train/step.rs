//! The models' part of one training iteration: teacher forward on the global crops, student
//! forward on all crops, DINO loss and backward. At `--precision f32` all of it goes through
//! burn's autodiff; at bf16 both ViT backbones run on the bf16 engines (`src/bf16/`) and only the
//! heads and the loss go through burn, the student's features entering burn's graph as a leaf
//! whose gradient the bf16 backbone's backward pass takes from there.

use std::collections::HashMap;

use anyhow::Result;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use rand::rngs::StdRng;

use super::loss::DinoLoss;
use crate::bf16::{Bf16Vit, Precision, StudentVit};
use crate::model::DinoModel;
use crate::weights::HostTensor;

/// One batch of normalised crops, view-major ([views · images, 3, size, size] each).
pub struct Crops {
    pub images: usize,
    pub global: Vec<f32>,
    pub global_size: usize,
    pub local: Vec<f32>,
    pub local_size: usize,
    pub local_number: usize,
}

/// The loss terms of a step and the student's gradients.
pub struct StepOutput {
    pub loss: f64,
    pub teacher_entropy: f64,
    pub kl: f64,
    /// Gradients burn's autodiff computed (the whole student at f32, the head at bf16).
    pub grads: Gradients,
    /// Gradients computed outside burn (the bf16 backbone), by parameter path in the student.
    pub by_name: HashMap<String, HostTensor>,
}

/// Teacher forward, student forward, loss and backward for one batch. `rng` draws the
/// student's stochastic depth; the loss sharpens the teacher at `teacher_temp` and updates its
/// centre.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    student: &DinoModel,
    teacher: &DinoModel,
    loss_fn: &mut DinoLoss,
    crops: &Crops,
    precision: Precision,
    rng: &mut StdRng,
    teacher_temp: f64,
    device: &Device,
) -> Result<StepOutput> {
    let n = crops.images;
    let (g, l) = (crops.global_size, crops.local_size);
    let local_count = crops.local_number * n;
    // At bf16, what the backbone's backward pass needs once burn's is done.
    let mut bf16_student = None;
    let (teacher_out, student_out) = match precision {
        Precision::F32 => {
            let tensor = |pixels: &[f32], count, size| Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [count, 3, size, size]), device);
            let global = tensor(&crops.global, 2 * n, g);
            let mut student_groups = vec![global.clone().autodiff()];
            if local_count > 0 {
                student_groups.push(tensor(&crops.local, local_count, l).autodiff());
            }
            (teacher.forward(&[global], None), student.forward(&student_groups, Some(rng)))
        }
        Precision::Bf16 => {
            let teacher_vit = Bf16Vit::new(teacher.backbone.vit("--precision bf16")?)?;
            let teacher_features = teacher_vit.features(&crops.global, 2 * n, (g, g));
            let dim = teacher_features.len() / (2 * n);
            let teacher_out = teacher.head.forward(Tensor::from_data(TensorData::new(teacher_features, [2 * n, dim]), device));

            let backbone = StudentVit::new(student.backbone.vit("--precision bf16")?)?;
            let mut features = Vec::new();
            let mut tapes = Vec::new();
            let groups = [(&crops.global, 2 * n, g), (&crops.local, local_count, l)];
            for (pixels, count, size) in groups.into_iter().filter(|(_, count, _)| *count > 0) {
                let (f, tape) = backbone.forward(pixels, count, (size, size), rng);
                features.extend(f);
                tapes.push((count, tape));
            }
            let rows = features.len() / dim;
            let leaf = Tensor::<2>::from_data(TensorData::new(features, [rows, dim]), &device.clone().autodiff()).require_grad();
            let student_out = student.head.forward(leaf.clone());
            bf16_student = Some((backbone, tapes, leaf));
            (teacher_out, student_out)
        }
    };
    let out = loss_fn.forward(student_out, teacher_out, teacher_temp);
    let loss = out.loss.clone().into_scalar::<f32>() as f64;
    let grads = out.loss.backward();
    let by_name = match bf16_student {
        None => HashMap::new(),
        Some((backbone, tapes, leaf)) => {
            let d_features = HostTensor::from_tensor(leaf.grad(&grads).expect("the features feed the loss")).values;
            let dim = d_features.len() / tapes.iter().map(|(count, _)| count).sum::<usize>();
            let mut backbone_grads = backbone.zero_gradients();
            let mut first = 0;
            for (count, tape) in &tapes {
                backbone.backward(tape, &d_features[first * dim..(first + count) * dim], &mut backbone_grads);
                first += count;
            }
            backbone_grads.named().into_iter().map(|(name, g)| (format!("backbone.{name}"), g)).collect()
        }
    };
    Ok(StepOutput {
        loss,
        teacher_entropy: out.teacher_entropy.into_scalar::<f32>() as f64,
        kl: out.kl.into_scalar::<f32>() as f64,
        grads,
        by_name,
    })
}
