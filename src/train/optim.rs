//! The optimisers the reference offers, each with PyTorch's update rule: AdamW (epsilon 1e-8,
//! decoupled weight decay; the ViT recipe) and SGD with momentum 0.9 (weight decay added to the
//! gradient; the ResNet recipe). Learning rate and weight decay are set every iteration,
//! biases and 1-D parameters get no decay, each parameter's gradient is clipped to a maximum
//! norm, and named parameters can be held frozen.

use std::collections::HashMap;

use burn::module::{Module, Param};
use burn::tensor::{Device, Gradients, Tensor, TensorData};
use clap::ValueEnum;
use serde::{Deserialize, Serialize};

use crate::weights::{HostTensor, ParamMapper, map_params};

/// Which update rule trains the student.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum OptimizerKind {
    Adamw,
    Sgd,
}

/// The per-parameter state: the number of updates and the rule's buffers, flattened, named
/// by `Optimizer::buffer_names`.
#[derive(Debug, Clone)]
pub struct ParamState {
    pub step: u64,
    pub buffers: Vec<Tensor<1>>,
}

#[derive(Debug, Clone)]
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// State per parameter, keyed by its dotted path in the module ("blocks.0.attn.qkv.weight").
    pub state: HashMap<String, ParamState>,
}

const ADAM_BETA1: f64 = 0.9;
const ADAM_BETA2: f64 = 0.999;
const ADAM_EPS: f64 = 1e-8;
const SGD_MOMENTUM: f64 = 0.9;

/// What one optimisation step does besides the update rule itself.
pub struct StepSettings<'a> {
    pub lr: f64,
    /// Weight decay of the regularised group (weights with 2 or more dimensions).
    pub weight_decay: f64,
    /// Per-parameter gradient norm limit; `None` disables clipping.
    pub clip_grad: Option<f64>,
    /// Parameters whose gradient is discarded this step (no update, no state change).
    pub frozen: &'a dyn Fn(&str) -> bool,
}

/// True for parameters the reference keeps out of weight decay.
pub fn is_unregularized(name: &str, rank: usize) -> bool {
    name.ends_with(".bias") || rank == 1
}

impl Optimizer {
    pub fn new(kind: OptimizerKind) -> Self {
        Self { kind, state: HashMap::new() }
    }

    /// Names of the per-parameter buffers (PyTorch's state names), in `ParamState` order.
    pub fn buffer_names(&self) -> &'static [&'static str] {
        match self.kind {
            OptimizerKind::Adamw => &["exp_avg", "exp_avg_sq"],
            OptimizerKind::Sgd => &["momentum_buffer"],
        }
    }

    /// Applies one step to every parameter of `module` that has a gradient in `grads`.
    pub fn step<M: Module>(&mut self, module: M, grads: Gradients, settings: &StepSettings) -> M {
        map_params(module, &mut StepMapper { optim: self, grads, settings })
    }

    fn update<const D: usize>(&mut self, name: String, value: Tensor<D>, grad: Tensor<D>, s: &StepSettings) -> Tensor<D> {
        let dims = value.dims();
        let device = value.device();
        let grad = grad.flatten::<1>(0, D - 1);
        let value = value.flatten::<1>(0, D - 1);
        let decay = if is_unregularized(&name, D) { 0.0 } else { s.weight_decay };
        let kind = self.kind;
        let buffers = self.buffer_names().len();
        let state = self.state.entry(name).or_insert_with(|| ParamState { step: 0, buffers: vec![grad.zeros_like(); buffers] });
        state.step += 1;
        let value = if device == Device::flex() {
            fused_on_host(kind, value, grad, state, decay, s)
        } else {
            with_tensor_ops(kind, value, grad, state, decay, s)
        };
        value.reshape(dims)
    }
}

/// The update as tensor operations, for GPUs: the gradient clipped without reading its norm
/// back to the host.
fn with_tensor_ops(kind: OptimizerKind, value: Tensor<1>, grad: Tensor<1>, state: &mut ParamState, decay: f64, s: &StepSettings) -> Tensor<1> {
    let grad = match s.clip_grad {
        // grad * min(1, clip / (||grad|| + 1e-6)): the reference's per-parameter rule.
        Some(clip) => {
            let coef = grad.clone().square().sum().sqrt().add_scalar(1e-6).recip().mul_scalar(clip).clamp_max(1.0);
            grad * coef
        }
        None => grad,
    };
    match kind {
        OptimizerKind::Adamw => {
            let value = value.mul_scalar(1.0 - s.lr * decay);
            let exp_avg = state.buffers[0].clone().mul_scalar(ADAM_BETA1) + grad.clone().mul_scalar(1.0 - ADAM_BETA1);
            let exp_avg_sq = state.buffers[1].clone().mul_scalar(ADAM_BETA2) + grad.square().mul_scalar(1.0 - ADAM_BETA2);
            let bias1 = 1.0 - ADAM_BETA1.powi(state.step as i32);
            let bias2 = 1.0 - ADAM_BETA2.powi(state.step as i32);
            let denom = exp_avg_sq.clone().sqrt().div_scalar(bias2.sqrt()).add_scalar(ADAM_EPS);
            let value = value - (exp_avg.clone() / denom).mul_scalar(s.lr / bias1);
            state.buffers = vec![exp_avg, exp_avg_sq];
            value
        }
        OptimizerKind::Sgd => {
            let grad = if decay > 0.0 { grad + value.clone().mul_scalar(decay) } else { grad };
            // PyTorch starts the momentum buffer at the first gradient itself.
            let buffer = if state.step == 1 { grad } else { state.buffers[0].clone().mul_scalar(SGD_MOMENTUM) + grad };
            let value = value - buffer.clone().mul_scalar(s.lr);
            state.buffers = vec![buffer];
            value
        }
    }
}

/// The same update in one threaded pass over host copies, for the CPU: burn's CPU backend
/// would run each of the ~17 tensor operations above as its own single-threaded pass with a
/// fresh output buffer (a quarter of the bf16 step's time went there at out_dim 65536).
fn fused_on_host(kind: OptimizerKind, value: Tensor<1>, grad: Tensor<1>, state: &mut ParamState, decay: f64, s: &StepSettings) -> Tensor<1> {
    use rayon::prelude::*;
    let device = value.device();
    let host = |t: Tensor<1>| HostTensor::from_tensor(t).values;
    let (mut value, grad) = (host(value), host(grad));
    let mut buffers: Vec<Vec<f32>> = state.buffers.drain(..).map(host).collect();
    let coef = match s.clip_grad {
        Some(clip) => {
            let norm = grad.par_iter().map(|&g| g as f64 * g as f64).sum::<f64>().sqrt();
            (clip / (norm + 1e-6)).min(1.0) as f32
        }
        None => 1.0,
    };
    const CHUNK: usize = 1 << 14;
    match kind {
        OptimizerKind::Adamw => {
            let bias1 = 1.0 - ADAM_BETA1.powi(state.step as i32);
            let bias2 = 1.0 - ADAM_BETA2.powi(state.step as i32);
            let (shrink, step_size, bias2_sqrt) = ((1.0 - s.lr * decay) as f32, (s.lr / bias1) as f32, bias2.sqrt() as f32);
            let (b1, b2, eps) = (ADAM_BETA1 as f32, ADAM_BETA2 as f32, ADAM_EPS as f32);
            let [exp_avg, exp_avg_sq] = &mut buffers[..] else { unreachable!("AdamW keeps two buffers") };
            value.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).zip(exp_avg.par_chunks_mut(CHUNK)).zip(exp_avg_sq.par_chunks_mut(CHUNK)).for_each(
                |(((p, g), m), v)| {
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let g = g * coef;
                        *m = *m * b1 + g * (1.0 - b1);
                        *v = *v * b2 + g * g * (1.0 - b2);
                        *p = *p * shrink - *m / (v.sqrt() / bias2_sqrt + eps) * step_size;
                    }
                },
            );
        }
        OptimizerKind::Sgd => {
            let (lr, decay, first) = (s.lr as f32, decay as f32, state.step == 1);
            let momentum = SGD_MOMENTUM as f32;
            value.par_chunks_mut(CHUNK).zip(grad.par_chunks(CHUNK)).zip(buffers[0].par_chunks_mut(CHUNK)).for_each(|((p, g), b)| {
                for ((p, &g), b) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                    let d = g * coef + decay * *p;
                    *b = if first { d } else { *b * momentum + d };
                    *p -= lr * *b;
                }
            });
        }
    }
    let tensor = |v: Vec<f32>| {
        let n = v.len();
        Tensor::from_data(TensorData::new(v, [n]), &device)
    };
    state.buffers = buffers.into_iter().map(tensor).collect();
    tensor(value)
}

struct StepMapper<'a, 'b> {
    optim: &'a mut Optimizer,
    grads: Gradients,
    settings: &'a StepSettings<'b>,
}

impl ParamMapper for StepMapper<'_, '_> {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = param.grad_remove(&mut self.grads) else {
            return param;
        };
        if (self.settings.frozen)(path) {
            return param;
        }
        param.map(|value| {
            let updated = self.optim.update(path.to_string(), value.without_autodiff().detach(), grad, self.settings);
            Tensor::from_inner(updated).require_grad()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    fn values(t: Tensor<2>) -> Vec<f32> {
        t.into_data().try_to_vec::<f32>().unwrap()
    }

    /// Two SGD steps worked by hand with PyTorch's rule: d = g + wd * p; buf = d on the first
    /// step, then 0.9 * buf + d; p -= lr * buf.
    #[test]
    fn sgd_follows_pytorch_momentum_and_weight_decay() {
        let dev = Device::flex();
        let t = |v: [f32; 2]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [1, 2]), &dev);
        let frozen = |_: &str| false;
        let s = StepSettings { lr: 0.1, weight_decay: 0.01, clip_grad: None, frozen: &frozen };
        let mut sgd = Optimizer::new(OptimizerKind::Sgd);
        let p = sgd.update("layer.weight".into(), t([1.0, 2.0]), t([0.5, -1.0]), &s);
        let expected = [0.949f32, 2.098];
        assert!(values(p.clone()).iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", values(p));
        let p = sgd.update("layer.weight".into(), p, t([0.5, -1.0]), &s);
        let expected = [0.852151f32, 2.284102];
        assert!(values(p.clone()).iter().zip(expected).all(|(a, b)| (a - b).abs() < 1e-6), "{:?}", values(p));
        // A bias gets no decay: p = 1 - 0.1 * 0.5.
        let b = sgd.update("layer.bias".into(), t([1.0, 1.0]), t([0.5, 0.5]), &s);
        assert!(values(b).iter().all(|v| (v - 0.95).abs() < 1e-6));
    }

    /// The CPU's fused pass and the tensor operations GPUs run agree, for both rules, with
    /// clipping on, over three steps (state carried).
    #[test]
    fn fused_host_update_equals_tensor_ops() {
        use burn::tensor::Distribution;
        let dev = Device::flex();
        let frozen = |_: &str| false;
        let s = StepSettings { lr: 0.01, weight_decay: 0.04, clip_grad: Some(0.5), frozen: &frozen };
        for kind in [OptimizerKind::Adamw, OptimizerKind::Sgd] {
            let buffers = Optimizer::new(kind).buffer_names().len();
            let start = Tensor::<1>::random([1000], Distribution::Normal(0.0, 1.0), &dev);
            let (mut fused, mut ops) = (start.clone(), start);
            let mut states = [(); 2].map(|_| ParamState { step: 0, buffers: vec![Tensor::zeros([1000], &dev); buffers] });
            for _ in 0..3 {
                let grad = Tensor::<1>::random([1000], Distribution::Normal(0.0, 2.0), &dev);
                states.iter_mut().for_each(|st| st.step += 1);
                fused = fused_on_host(kind, fused, grad.clone(), &mut states[0], 0.04, &s);
                ops = with_tensor_ops(kind, ops, grad, &mut states[1], 0.04, &s);
            }
            let host = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
            let (a, b) = (host(&fused), host(&ops));
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-6 * (1.0 + y.abs())), "{kind:?}");
            for (x, y) in states[0].buffers.iter().zip(&states[1].buffers) {
                assert!(host(x).iter().zip(host(y)).all(|(p, q)| (p - q).abs() < 1e-6 * (1.0 + q.abs())), "{kind:?} state");
            }
        }
    }
}
