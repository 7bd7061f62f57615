//! One training iteration of the method, the same for `dino train` and the benchmark
//! ([`TrainStep`]): teacher forward on the global crops, student forward on all crops, DINO
//! loss and backward ([`forward_backward`]), the gradients combined over the job's processes,
//! the optimiser's step under the schedules' values, the teacher's EMA. A ViT on the CPU runs
//! both backbones on our engine (`src/engine/`: f32 products at `--precision f32`, bf16 at
//! bf16) and only the heads and the loss go through burn, the student's features entering
//! burn's graph as a leaf whose gradient the engine's backward pass takes from there;
//! everything else (ResNets, GPUs) goes through burn's autodiff.

use std::collections::HashMap;
use std::time::Instant;

use anyhow::Result;
use burn::module::Param;
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use rand::rngs::StdRng;

use super::checkpoint::TrainState;
use super::ema::update_teacher;
use super::loss::DinoLoss;
use super::optim::StepSettings;
use super::replicas;
use super::schedule::StepValues;
use crate::dist::{Dist, Group};
use crate::engine::matmul::Element;
use crate::engine::{InferenceVit, Precision, StudentVit};
use crate::model::DinoModel;
use crate::weights::{HostTensor, ParamVisitor, visit_params};

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
    /// Every parameter's gradient: burn's autodiff computes the head's (and the backbone's
    /// when burn runs it); the engine's backward pass puts the backbone's under the same
    /// parameters, so the optimiser finds all of them alike.
    pub grads: Gradients,
}

/// One training iteration, with what stays fixed across iterations: the job's processes, the
/// device, the precision, gradient clipping and the loss (whose centre moves every step).
pub struct TrainStep<'a> {
    pub dist: &'a Dist,
    pub device: Device,
    pub precision: Precision,
    /// Per-parameter gradient norm limit (`None`: no clipping).
    pub clip_grad: Option<f64>,
    pub loss: DinoLoss,
    /// Test hook: nudges this process's weights after each update (`replicas`).
    pub perturbed: bool,
}

/// What one iteration did: the global batch's loss terms and image count, and the seconds its
/// parts took (on a GPU, where work is queued, the parts' boundaries blur).
pub struct StepReport {
    pub loss: f64,
    pub teacher_entropy: f64,
    pub kl: f64,
    pub images: usize,
    pub times: StepTimes,
}

#[derive(Debug, Default, Clone, Copy)]
pub struct StepTimes {
    pub forward_backward: f64,
    /// Combining the gradients over the processes, waiting for the slowest included.
    pub combine: f64,
    pub optimizer: f64,
    pub ema: f64,
}

impl TrainStep<'_> {
    /// Trains `state` on one batch at the schedules' `values`; `drop_rng` draws the student's
    /// stochastic depth. A non-finite loss leaves the weights as they were (the loss's centre has
    /// already moved); the caller stops.
    pub fn run(&mut self, mut state: TrainState, crops: &Crops, values: &StepValues, drop_rng: &mut StdRng) -> Result<(TrainState, StepReport)> {
        let mut clock = Instant::now();
        let mut lap = || {
            let seconds = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            seconds
        };
        let mut out = forward_backward(&state.student, &state.teacher, &mut self.loss, self.dist, crops, self.precision, drop_rng, values.teacher_temp, &self.device)?;
        let forward_backward_seconds = lap();
        let images = replicas::combine_step(self.dist, &state.student, &mut out, crops.images);
        let times = StepTimes { forward_backward: forward_backward_seconds, combine: lap(), ..StepTimes::default() };
        let mut report = StepReport { loss: out.loss, teacher_entropy: out.teacher_entropy, kl: out.kl, images, times };
        if !out.loss.is_finite() {
            return Ok((state, report));
        }
        let frozen = |name: &str| values.last_layer_frozen && name.contains("last_layer");
        let settings = StepSettings { lr: values.lr, weight_decay: values.weight_decay, clip_grad: self.clip_grad, frozen: &frozen };
        state.student = state.optimizer.step(state.student, out.grads, &settings);
        if self.perturbed {
            state.student = replicas::nudge_for_test(state.student);
        }
        report.times.optimizer = lap();
        state.teacher = update_teacher(state.teacher, &state.student, values.teacher_momentum);
        report.times.ema = lap();
        Ok((state, report))
    }
}

/// Teacher forward, student forward, loss and backward for one batch. `rng` draws the
/// student's stochastic depth; the loss sharpens the teacher at `teacher_temp` and updates its
/// centre from every rank's teacher outputs.
#[allow(clippy::too_many_arguments)]
pub fn forward_backward(
    student: &DinoModel,
    teacher: &DinoModel,
    loss_fn: &mut DinoLoss,
    dist: &Dist,
    crops: &Crops,
    precision: Precision,
    rng: &mut StdRng,
    teacher_temp: f64,
    device: &Device,
) -> Result<StepOutput> {
    let engine_runs = student.backbone.vit("").is_ok_and(|vit| crate::engine::engine_runs(vit, device));
    let (teacher_out, student_out, backbone_backward) = match precision {
        Precision::Bf16 => engine_forward::<u16>(student, teacher, crops, rng, dist.group(), device)?,
        Precision::F32 if engine_runs => engine_forward::<f32>(student, teacher, crops, rng, dist.group(), device)?,
        Precision::F32 => burn_forward(student, teacher, crops, rng, dist.group(), device),
    };
    let out = loss_fn.forward(student_out, teacher_out, teacher_temp, dist);
    let loss = out.loss.clone().into_scalar::<f32>() as f64;
    let mut grads = out.loss.backward();
    if let Some(backward) = backbone_backward {
        backward(&mut grads);
    }
    Ok(StepOutput {
        loss,
        teacher_entropy: out.teacher_entropy.into_scalar::<f32>() as f64,
        kl: out.kl.into_scalar::<f32>() as f64,
        grads,
    })
}

/// The teacher's and the student's outputs, and, when the engine ran the student's backbone,
/// its backward pass, to run on the gradients once burn's backward is done.
type Forward<'a> = (Tensor<2>, Tensor<2>, Option<Box<dyn FnOnce(&mut Gradients) + 'a>>);

/// Both networks through burn: autodiff computes every gradient.
fn burn_forward<'a>(student: &DinoModel, teacher: &DinoModel, crops: &Crops, rng: &mut StdRng, group: Group, device: &Device) -> Forward<'a> {
    let n = crops.images;
    let tensor = |pixels: &[f32], count, size| Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [count, 3, size, size]), device);
    let global = tensor(&crops.global, 2 * n, crops.global_size);
    let mut student_groups = vec![global.clone().autodiff()];
    if crops.local_number > 0 {
        student_groups.push(tensor(&crops.local, crops.local_number * n, crops.local_size).autodiff());
    }
    (teacher.forward(&[global], None, group), student.forward(&student_groups, Some(rng), group), None)
}

/// Both ViT backbones on the engine at `E` products, the heads through burn: the student's
/// features enter burn's graph as a leaf, and the returned backward pass takes the leaf's
/// gradient through the engine and puts the backbone's gradients into burn's.
fn engine_forward<'a, E: Element>(student: &'a DinoModel, teacher: &DinoModel, crops: &Crops, rng: &mut StdRng, group: Group, device: &Device) -> Result<Forward<'a>> {
    let n = crops.images;
    let (g, l) = (crops.global_size, crops.local_size);
    let teacher_vit = InferenceVit::<E>::new(teacher.backbone.vit("the engine")?)?;
    let teacher_features = teacher_vit.features(&crops.global, 2 * n, (g, g));
    let dim = teacher_features.len() / (2 * n);
    let teacher_out = teacher.head.forward(Tensor::from_data(TensorData::new(teacher_features, [2 * n, dim]), device), group);

    let backbone = StudentVit::<E>::new(student.backbone.vit("the engine")?)?;
    let mut features = Vec::new();
    let mut tapes = Vec::new();
    let groups = [(&crops.global, 2 * n, g), (&crops.local, crops.local_number * n, l)];
    for (pixels, count, size) in groups.into_iter().filter(|(_, count, _)| *count > 0) {
        let (f, tape) = backbone.forward(pixels, count, (size, size), rng);
        features.extend(f);
        tapes.push((count, tape));
    }
    let rows = features.len() / dim;
    let leaf = Tensor::<2>::from_data(TensorData::new(features, [rows, dim]), &device.clone().autodiff()).require_grad();
    let student_out = student.head.forward(leaf.clone(), group);
    let backward = move |grads: &mut Gradients| {
        let d_features = HostTensor::from_tensor(leaf.grad(grads).expect("the features feed the loss")).values;
        let mut backbone_grads = backbone.zero_gradients();
        let mut first = 0;
        for (count, tape) in &tapes {
            backbone.backward(tape, &d_features[first * dim..(first + count) * dim], &mut backbone_grads);
            first += count;
        }
        attach_gradients(student, backbone_grads.named(), grads);
    };
    Ok((teacher_out, student_out, Some(Box::new(backward))))
}

/// Puts the engine's backbone gradients (by parameter path under `backbone.`) into `grads`,
/// each under its parameter, as burn's autodiff would have.
fn attach_gradients(student: &DinoModel, backbone: Vec<(String, HostTensor)>, grads: &mut Gradients) {
    struct Attach<'a> {
        grads: &'a mut Gradients,
        pending: HashMap<String, HostTensor>,
    }
    impl ParamVisitor for Attach<'_> {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.pending.remove(path) {
                let value = param.val();
                let device = value.clone().without_autodiff().device();
                value.grad_replace(self.grads, Tensor::from_data(TensorData::new(grad.values, grad.shape), &device));
            }
        }
    }
    let pending = backbone.into_iter().map(|(name, g)| (format!("backbone.{name}"), g)).collect();
    let mut attach = Attach { grads, pending };
    visit_params(student, &mut attach);
    assert!(attach.pending.is_empty(), "engine gradients for unknown parameters: {:?}", attach.pending.keys().collect::<Vec<_>>());
}
