//! One training iteration of the method, the same for `dino train` and the benchmark
//! ([`TrainStep`]): teacher forward on the global crops, student forward on all crops, DINO
//! loss and backward ([`forward_backward`]), the gradients combined over the job's processes,
//! the optimiser's step under the schedules' values, the teacher's EMA. The networks decide
//! what computes them: a ViT on the CPU runs on our engine (`src/engine/`: f32 products at
//! `--precision f32`, bf16 at bf16), the student's backbone as one operation of burn's graph;
//! everything else through burn's ops.

use std::time::Instant;

use burn::tensor::{Device, Gradients, Tensor, TensorData};
use rand::rngs::StdRng;

use super::checkpoint::TrainState;
use super::ema::update_teacher;
use super::loss::DinoLoss;
use super::optim::StepSettings;
use super::replicas;
use super::schedule::StepValues;
use crate::dist::Dist;
use crate::engine::Precision;
use crate::model::DinoModel;

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
    /// Every parameter's gradient, as burn's backward pass leaves them (the engine's backbone
    /// operation puts the backbone's there too).
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
    pub fn run(&mut self, mut state: TrainState, crops: &Crops, values: &StepValues, drop_rng: &mut StdRng) -> (TrainState, StepReport) {
        let mut clock = Instant::now();
        let mut lap = || {
            let seconds = clock.elapsed().as_secs_f64();
            clock = Instant::now();
            seconds
        };
        let mut out = forward_backward(&state.student, &state.teacher, &mut self.loss, self.dist, crops, self.precision, drop_rng, values.teacher_temp, &self.device);
        let forward_backward_seconds = lap();
        let images = replicas::combine_step(self.dist, &state.student, &mut out, crops.images);
        let times = StepTimes { forward_backward: forward_backward_seconds, combine: lap(), ..StepTimes::default() };
        let mut report = StepReport { loss: out.loss, teacher_entropy: out.teacher_entropy, kl: out.kl, images, times };
        if !out.loss.is_finite() {
            return (state, report);
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
        (state, report)
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
) -> StepOutput {
    let n = crops.images;
    let tensor = |pixels: &[f32], count, size| Tensor::<4>::from_data(TensorData::new(pixels.to_vec(), [count, 3, size, size]), device);
    let global = tensor(&crops.global, 2 * n, crops.global_size);
    let mut student_groups = vec![global.clone().autodiff()];
    if crops.local_number > 0 {
        student_groups.push(tensor(&crops.local, crops.local_number * n, crops.local_size).autodiff());
    }
    let teacher_out = teacher.forward(&[global], None, dist.group(), precision);
    let student_out = student.forward(&student_groups, Some(rng), dist.group(), precision);
    let out = loss_fn.forward(student_out, teacher_out, teacher_temp, dist);
    let loss = out.loss.clone().into_scalar::<f32>() as f64;
    StepOutput {
        loss,
        teacher_entropy: out.teacher_entropy.into_scalar::<f32>() as f64,
        kl: out.kl.into_scalar::<f32>() as f64,
        grads: out.loss.backward(),
    }
}
