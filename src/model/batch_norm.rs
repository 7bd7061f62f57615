//! BatchNorm as PyTorch computes it, for any rank with channels on axis 1 (BatchNorm1d on
//! [N, C], BatchNorm2d on [N, C, H, W]): evaluation on the running statistics, training on the
//! batch's, folding them into the running ones (momentum 0.1, unbiased variance). The ResNet
//! backbone and the DINO head's optional BatchNorm use it; the teacher runs it on batch
//! statistics too, as the reference's teacher (never put in eval mode) does.

use burn::module::{Module, Param, RunningState};
use burn::tensor::module::batch_norm_train;
use burn::tensor::{Device, Tensor};

/// PyTorch's BatchNorm epsilon.
const BN_EPS: f64 = 1e-5;
/// PyTorch's BatchNorm momentum: running = (1 - m) * running + m * batch statistic.
const BN_MOMENTUM: f64 = 0.1;

/// Which statistics BatchNorm normalises with.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Stats {
    /// The stored running averages (evaluation).
    Running,
    /// The batch's own, also folded into the running averages (training).
    Batch,
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
        if stats == Stats::Running {
            let mut shape = [1; D];
            shape[1] = c;
            let scale = self.weight.val() / self.running_var.value().add_scalar(BN_EPS).sqrt();
            let shift = self.bias.val() - self.running_mean.value() * scale.clone();
            return x * scale.reshape(shape) + shift.reshape(shape);
        }
        let n = (x.dims().iter().product::<usize>() / c) as f64;
        let out = batch_norm_train(x, self.weight.val(), self.bias.val(), BN_EPS);
        // The running variance is the unbiased one (PyTorch's), the normalisation the biased.
        let unbiased = out.variance.detach().mul_scalar(n / (n - 1.0).max(1.0));
        let blend = |state: &RunningState<Tensor<1>>, batch: Tensor<1>| {
            state.update(state.value().mul_scalar(1.0 - BN_MOMENTUM) + batch.mul_scalar(BN_MOMENTUM));
            // Folds this thread's update in now, so the next read (a forward, a checkpoint,
            // an export) sees it.
            state.value_sync();
        };
        blend(&self.running_mean, out.mean.detach());
        blend(&self.running_var, unbiased);
        out.output
    }
}
