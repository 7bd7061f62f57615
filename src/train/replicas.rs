//! What keeps the processes of a data-parallel run one model (`dist.rs` carries the bytes):
//! every rank starts from rank 0's state, each step's gradients and metrics are combined over
//! all ranks before anything uses them, and a checksum of the weights catches a rank that
//! drifted. With one process each of these leaves its input as it is.

use std::hash::{Hash, Hasher};
use std::path::Path;

use anyhow::{Result, bail};
use burn::module::Param;
use burn::tensor::{Device, Gradients, Tensor, TensorData};

use super::checkpoint::{self, TrainState};
use super::config::TrainConfig;
use super::step::StepOutput;
use crate::dist::Dist;
use crate::model::DinoModel;
use crate::weights::{HostTensor, ParamMapper, ParamVisitor, map_params, visit_params};

/// Rank 0's training state and loss centre on every rank: a fresh run starts from rank 0's
/// initial weights, a resumed one from the checkpoint rank 0 read (the other ranks need not see
/// the output folder). The state travels as the bytes of a checkpoint.
pub fn state_from_main(dist: &Dist, state: TrainState, center: Tensor<2>, cfg: &TrainConfig, device: &Device) -> Result<(TrainState, Tensor<2>)> {
    if dist.world_size() == 1 {
        return Ok((state, center));
    }
    let mut bytes = if dist.is_main() { checkpoint::to_bytes(&state, &center, cfg)? } else { Vec::new() };
    dist.broadcast_buffer(&mut bytes);
    if dist.is_main() {
        return Ok((state, center));
    }
    let restored = checkpoint::from_bytes(&bytes, Path::new("rank 0's training state"), state.student, state.teacher, device)?;
    Ok((restored.state, restored.center))
}

/// The whole job's step: `out` held this rank's loss terms and gradients over its `images`;
/// afterwards it holds the means over every rank's images (each rank's gradients weighted by its
/// share of the images, i.e. the gradient of the global batch's loss). Returns the global batch's
/// image count.
pub fn combine_step(dist: &Dist, student: &DinoModel, out: &mut StepOutput, images: usize) -> usize {
    let n = images as f64;
    let mut flat = if dist.world_size() > 1 { gradients_flat(student, &out.grads) } else { Vec::new() };
    // The gradient count rides along: ranks summing buffers of different lengths would be
    // undefined behaviour in MPI, so a mismatch must stop the job first.
    // (Equal sums of lengths and of their squares over the ranks mean equal lengths.)
    let len = flat.len() as f64;
    let mut sums = [n, out.loss * n, out.teacher_entropy * n, out.kl * n, len, len * len];
    dist.sum_f64(&mut sums);
    let [total, loss, entropy, kl, lengths, squares] = sums;
    let ranks = dist.world_size() as f64;
    assert!(lengths == ranks * len && squares == ranks * len * len, "rank {}: {len} gradient values, not what the other ranks have", dist.rank());
    (out.loss, out.teacher_entropy, out.kl) = (loss / total, entropy / total, kl / total);
    if dist.world_size() > 1 {
        let share = (n / total) as f32;
        flat.iter_mut().for_each(|g| *g *= share);
        dist.sum_f32(&mut flat);
        replace_gradients(student, &mut out.grads, &flat);
    }
    total as usize
}

/// Fails, naming the ranks, when some process's run differs from rank 0's in what decides the
/// steps and collectives each process takes (settings, dataset size): such ranks would call
/// the collectives out of step, which MPI does not survive.
pub fn check_same_run(dist: &Dist, cfg: &TrainConfig, dataset_len: usize) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    (serde_json::to_string(cfg)?, dataset_len).hash(&mut hasher);
    let differing = dist.ranks_differing_from_main(hasher.finish())?;
    if !differing.is_empty() {
        let ranks = differing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        bail!("rank {ranks}: settings or --data ({dataset_len} images) differ from rank 0's; every process must train on the same data with the same flags");
    }
    Ok(())
}

/// Fails, naming the ranks, when some rank's weights are not bit-identical to rank 0's.
pub fn check_in_step(dist: &Dist, student: &DinoModel, when: &str) -> Result<()> {
    if dist.world_size() == 1 {
        return Ok(());
    }
    let differing = dist.ranks_differing_from_main(fingerprint(student))?;
    if !differing.is_empty() {
        let ranks = differing.iter().map(|r| r.to_string()).collect::<Vec<_>>().join(", ");
        bail!("rank {ranks}: weights differ from rank 0's {when}; stopping before a checkpoint is written");
    }
    Ok(())
}

/// A 64-bit checksum of every parameter's bits, in module order.
fn fingerprint(model: &DinoModel) -> u64 {
    struct Fingerprint(std::collections::hash_map::DefaultHasher);
    impl ParamVisitor for Fingerprint {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<D>>) {
            HostTensor::from_tensor(param.val()).values.iter().for_each(|v| v.to_bits().hash(&mut self.0));
        }
    }
    let mut f = Fingerprint(Default::default());
    visit_params(model, &mut f);
    f.0.finish()
}

/// Every parameter gradient of `model` in `grads`, in module order, as one buffer.
fn gradients_flat(model: &DinoModel, grads: &Gradients) -> Vec<f32> {
    struct Gather<'a> {
        grads: &'a Gradients,
        out: Vec<f32>,
    }
    impl ParamVisitor for Gather<'_> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<D>>) {
            if let Some(grad) = param.val().grad(self.grads) {
                self.out.extend(HostTensor::from_tensor(grad).values);
            }
        }
    }
    let mut gather = Gather { grads, out: Vec::new() };
    visit_params(model, &mut gather);
    gather.out
}

/// The inverse of `gradients_flat`: the gradients of `grads`, in module order, replaced by the
/// values of `flat`.
fn replace_gradients(model: &DinoModel, grads: &mut Gradients, flat: &[f32]) {
    struct Scatter<'a> {
        grads: &'a mut Gradients,
        flat: &'a [f32],
    }
    impl ParamVisitor for Scatter<'_> {
        fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<D>>) {
            let value = param.val();
            let Some(grad) = value.grad(self.grads) else { return };
            let shape = grad.dims();
            let (mine, rest) = self.flat.split_at(shape.iter().product());
            self.flat = rest;
            let device = grad.device();
            value.grad_replace(self.grads, Tensor::from_data(TensorData::new(mine.to_vec(), shape), &device));
        }
    }
    let mut scatter = Scatter { grads, flat };
    visit_params(model, &mut scatter);
    assert!(scatter.flat.is_empty(), "gradient buffer longer than the model's gradients");
}

/// Test hook for the divergence check: true on rank r when `DINO_TEST_PERTURB_RANK=r`, whose
/// student then gets [`nudge_for_test`] after every step, as a rank with a faulty memory or a
/// nondeterministic kernel would.
pub fn perturbed_for_test(dist: &Dist) -> bool {
    std::env::var("DINO_TEST_PERTURB_RANK").ok().and_then(|r| r.parse::<usize>().ok()) == Some(dist.rank())
}

/// Moves the student's first weight by 1e-3.
pub fn nudge_for_test(student: DinoModel) -> DinoModel {
    struct Nudge(bool);
    impl ParamMapper for Nudge {
        fn map<const D: usize>(&mut self, _: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if std::mem::replace(&mut self.0, true) {
                return param;
            }
            param.map(|t| Tensor::from_inner(t.without_autodiff().detach().add_scalar(1e-3)).require_grad())
        }
    }
    map_params(student, &mut Nudge(false))
}
