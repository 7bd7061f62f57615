//! AdamW as the reference uses it: PyTorch's update rule (epsilon 1e-8), learning rate and
//! weight decay set every iteration, no decay on biases and 1-D parameters, each parameter's
//! gradient clipped to a maximum norm, and named parameters that can be held frozen.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Gradients, Tensor};

/// Moments of one parameter, flattened.
#[derive(Debug, Clone)]
pub struct Moments {
    pub step: u64,
    pub exp_avg: Tensor<1>,
    pub exp_avg_sq: Tensor<1>,
}

#[derive(Debug, Clone)]
pub struct AdamW {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// State per parameter, keyed by its dotted path in the module ("blocks.0.attn.qkv.weight").
    pub state: HashMap<String, Moments>,
}

/// What one optimisation step does besides the AdamW rule itself.
pub struct StepSettings<'a> {
    pub lr: f64,
    /// Weight decay of the regularised group (weights with 2 or more dimensions).
    pub weight_decay: f64,
    /// Per-parameter gradient norm limit; `None` disables clipping.
    pub clip_grad: Option<f64>,
    /// Parameters whose gradient is discarded this step (no update, no state change).
    pub frozen: &'a dyn Fn(&str) -> bool,
}

impl Default for AdamW {
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.999, eps: 1e-8, state: HashMap::new() }
    }
}

/// True for parameters the reference keeps out of weight decay.
pub fn is_unregularized(name: &str, rank: usize) -> bool {
    name.ends_with(".bias") || rank == 1
}

impl AdamW {
    /// Applies one step to every parameter of `module` that has a gradient in `grads`.
    pub fn step<M: Module>(&mut self, module: M, grads: Gradients, settings: &StepSettings) -> M {
        let mut mapper = StepMapper { optim: self, grads, settings, path: Vec::new() };
        module.map(&mut mapper)
    }

    fn update<const D: usize>(&mut self, name: String, value: Tensor<D>, grad: Tensor<D>, s: &StepSettings) -> Tensor<D> {
        let dims = value.dims();
        let grad = grad.flatten::<1>(0, D - 1);
        let grad = match s.clip_grad {
            // grad * min(1, clip / (||grad|| + 1e-6)): the reference's per-parameter rule,
            // without reading the norm back to the host.
            Some(clip) => {
                let coef = grad.clone().square().sum().sqrt().add_scalar(1e-6).recip().mul_scalar(clip).clamp_max(1.0);
                grad * coef
            }
            None => grad,
        };
        let decay = if is_unregularized(&name, D) { 0.0 } else { s.weight_decay };
        let value = value.flatten::<1>(0, D - 1).mul_scalar(1.0 - s.lr * decay);
        let moments = self.state.entry(name).or_insert_with(|| Moments {
            step: 0,
            exp_avg: grad.zeros_like(),
            exp_avg_sq: grad.zeros_like(),
        });
        moments.step += 1;
        moments.exp_avg = moments.exp_avg.clone().mul_scalar(self.beta1) + grad.clone().mul_scalar(1.0 - self.beta1);
        moments.exp_avg_sq = moments.exp_avg_sq.clone().mul_scalar(self.beta2) + grad.square().mul_scalar(1.0 - self.beta2);
        let bias1 = 1.0 - self.beta1.powi(moments.step as i32);
        let bias2 = 1.0 - self.beta2.powi(moments.step as i32);
        let denom = moments.exp_avg_sq.clone().sqrt().div_scalar(bias2.sqrt()).add_scalar(self.eps);
        let value = value - (moments.exp_avg.clone() / denom).mul_scalar(s.lr / bias1);
        value.reshape(dims)
    }
}

struct StepMapper<'a, 'b> {
    optim: &'a mut AdamW,
    grads: Gradients,
    settings: &'a StepSettings<'b>,
    path: Vec<String>,
}

impl ModuleMapper for StepMapper<'_, '_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let Some(grad) = param.grad_remove(&mut self.grads) else {
            return param;
        };
        let name = self.path.join(".");
        if (self.settings.frozen)(&name) {
            return param;
        }
        param.map(|value| {
            let updated = self.optim.update(name, value.without_autodiff().detach(), grad, self.settings);
            Tensor::from_inner(updated).require_grad()
        })
    }
}
