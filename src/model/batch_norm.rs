//! BatchNorm as PyTorch computes it, for any rank with channels on axis 1 (BatchNorm1d on
//! [N, C], BatchNorm2d on [N, C, H, W]): evaluation on the running statistics, training on the
//! batch's, folding them into the running ones (momentum 0.1, unbiased variance). The ResNet
//! backbone and the DINO head's optional BatchNorm use it; the teacher runs it on batch
//! statistics too, as the reference's teacher (never put in eval mode) does. In a job of
//! several processes the batch statistics span every rank's batch, as the reference's
//! SyncBatchNorm does: the per-channel sums go over the ranks in the forward pass, and their
//! gradients in the backward pass, through one operation recorded in burn's graph.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, Flex};
use burn::module::{Module, Param, RunningState};
use burn::tensor::module::batch_norm_train;
use burn::tensor::{Device, Tensor, TensorData};

use crate::dist::Group;

/// PyTorch's BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;
/// PyTorch's BatchNorm momentum: running = (1 - m) * running + m * batch statistic.
const BN_MOMENTUM: f64 = 0.1;

/// Which statistics BatchNorm normalises with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stats {
    /// The stored running averages (evaluation).
    Running,
    /// The batch's own, also folded into the running averages (training); the batch is the
    /// union of every rank's in the group.
    Batch(Group),
}

/// y = (x - mean) / sqrt(var + eps) * weight + bias, per channel.
#[derive(Module, Debug)]
pub struct BatchNorm {
    pub weight: Param<Tensor<1>>,
    pub bias: Param<Tensor<1>>,
    pub running_mean: RunningState<Tensor<1>>,
    pub running_var: RunningState<Tensor<1>>,
}

impl BatchNorm {
    /// Weight 1, bias 0, running mean 0 and variance 1 (PyTorch's init).
    pub fn new(channels: usize, device: &Device) -> Self {
        Self::from_values(Tensor::ones([channels], device), Tensor::zeros([channels], device), Tensor::zeros([channels], device), Tensor::ones([channels], device))
    }

    pub fn from_values(weight: Tensor<1>, bias: Tensor<1>, running_mean: Tensor<1>, running_var: Tensor<1>) -> Self {
        Self {
            weight: Param::from_tensor(weight),
            bias: Param::from_tensor(bias),
            running_mean: RunningState::new(running_mean),
            running_var: RunningState::new(running_var),
        }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>, stats: Stats) -> Tensor<D> {
        let c = self.weight.dims()[0];
        let mut shape = [1; D];
        shape[1] = c;
        let group = match stats {
            Stats::Running => {
                let scale = self.weight.val() / self.running_var.value().add_scalar(BN_EPS).sqrt();
                let shift = self.bias.val() - self.running_mean.value() * scale.clone();
                return x * scale.reshape(shape) + shift.reshape(shape);
            }
            Stats::Batch(group) => group,
        };
        let local = (x.dims().iter().product::<usize>() / c) as f64;
        if group.ranks() == 1 {
            let out = batch_norm_train(x, self.weight.val(), self.bias.val(), BN_EPS);
            self.fold_into_running(out.mean.detach(), out.variance.detach(), local);
            return out.output;
        }
        // Two passes over the job's batch (the mean, then the squared deviations from it):
        // exact where one pass of sums and squares would cancel.
        let mut count = [local];
        group.sum_f64(&mut count);
        let n = count[0];
        let mean = sum_over_ranks(channel_sums(x.clone()), local, group).div_scalar(n);
        let centred = x - mean.clone().reshape(shape);
        let variance = sum_over_ranks(channel_sums(centred.clone().square()), local, group).div_scalar(n);
        let scale = variance.clone().add_scalar(BN_EPS).sqrt().recip() * self.weight.val();
        self.fold_into_running(mean.detach(), variance.detach(), n);
        centred * scale.reshape(shape) + self.bias.val().reshape(shape)
    }

    /// Blends a batch's mean and (biased) variance over `n` values per channel into the
    /// running statistics. The running variance is the unbiased one (PyTorch's), the
    /// normalisation the biased.
    fn fold_into_running(&self, mean: Tensor<1>, variance: Tensor<1>, n: f64) {
        let unbiased = variance.mul_scalar(n / (n - 1.0).max(1.0));
        let blend = |state: &RunningState<Tensor<1>>, batch: Tensor<1>| {
            state.update(state.value().mul_scalar(1.0 - BN_MOMENTUM) + batch.mul_scalar(BN_MOMENTUM));
            // Folds this thread's update in now, so the next read (a forward, a checkpoint,
            // an export) sees it.
            state.value_sync();
        };
        blend(&self.running_mean, mean);
        blend(&self.running_var, unbiased);
    }
}

/// Per-channel sums [C] of `x` (channels on axis 1).
fn channel_sums<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    let c = x.dims()[1];
    (0..D).filter(|&axis| axis != 1).fold(x, |t, axis| t.sum_dim(axis)).reshape([c])
}

/// Each rank's `local` per-channel sums [C] summed over the ranks, as an operation of burn's
/// graph when `local` is on it. Its backward sums the gradients over the ranks, each weighted
/// by its rank's share of the values (`values` per channel here): the trainer combines the
/// ranks' gradients weighted by their share of the batch, so rank r passes back
/// (1 / n_r) Σ_q n_q g_q, and the combined gradient is the job loss's own.
fn sum_over_ranks(local: Tensor<1>, values: f64, group: Group) -> Tensor<1> {
    let device = local.device();
    match local.clone().try_into_primitive::<Autodiff<Flex>>() {
        Ok(tracked) => {
            let node = tracked.node();
            let summed = summed_over_ranks(tracked.into_primitive(), 1.0, group);
            let op = SumOverRanks { values, group };
            Tensor::from_primitive::<Autodiff<Flex>>(op.prepare::<NoCheckpointing>([node]).compute_bound().stateless(summed))
        }
        Err(_) => {
            // Off burn's autodiff (the teacher), or on a GPU: a plain sum. The trainer refuses
            // synchronised BatchNorm on a GPU, where its gradient would miss the other ranks.
            assert!(!device.is_autodiff(), "BatchNorm statistics across processes need the CPU (flex) device");
            let summed = summed_over_ranks(local.try_into_primitive::<Flex>().expect("a flex tensor"), 1.0, group);
            Tensor::from_primitive::<Flex>(summed)
        }
    }
}

/// `weight` × `values` summed over the ranks (every rank calls it in the same order).
fn summed_over_ranks(values: FloatTensor<Flex>, weight: f64, group: Group) -> FloatTensor<Flex> {
    let data = Tensor::<1>::from_primitive::<Flex>(values).into_data();
    let shape = data.shape().clone();
    let mut sums: Vec<f64> = data.iter::<f32>().map(|v| f64::from(v) * weight).collect();
    group.sum_f64(&mut sums);
    let sums: Vec<f32> = sums.into_iter().map(|v| v as f32).collect();
    Tensor::<1>::from_data(TensorData::new(sums, shape), &Device::flex()).try_into_primitive::<Flex>().expect("a flex tensor")
}

/// The backward step of [`sum_over_ranks`].
#[derive(Debug)]
struct SumOverRanks {
    /// This rank's values per channel: its share of the job's batch.
    values: f64,
    group: Group,
}

impl Backward<Flex, 1> for SumOverRanks {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [parent] = ops.parents;
        let upstream = grads.consume::<Flex>(&ops.node);
        let shared = summed_over_ranks(upstream, self.values, self.group);
        if let Some(parent) = parent {
            let own = Tensor::<1>::from_primitive::<Flex>(shared).div_scalar(self.values);
            grads.register::<Flex>(parent.id, own.try_into_primitive::<Flex>().expect("a flex tensor"));
        }
    }
}
