//! The engine inside burn's graph: [`features`] computes a ViT's image features for crop
//! groups on the engine in place of burn's ops. On burn's autodiff device (the student) the
//! whole backbone is one recorded operation whose backward pass is the engine's, and it puts
//! every backbone parameter's gradient where burn's autodiff would have put it; elsewhere (the
//! teacher, evaluation) it is the inference network. `model::vit` calls it, so a training step
//! has one code path whatever computes the backbone.

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::NoCheckpointing;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops};
use burn::backend::{Autodiff, Flex};
use burn::module::Param;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;

use super::Precision;
use super::matmul::Element;
use super::gradients::GradientSink;
use super::vit::{Mode, Tape, Vit, host};
use crate::model::VisionTransformer;

/// The image features [rows, D] (the cls token after the final norm) of normalised crop
/// groups ([B, 3, H, W] each; rows in group order) on the engine at `precision`, with
/// stochastic depth drawn from `rng` as `VisionTransformer::forward_train` draws it. Call it
/// where [`super::engine_runs`] says the engine computes `vit`.
pub fn features(vit: &VisionTransformer, groups: &[Tensor<4>], rng: Option<&mut StdRng>, precision: Precision) -> Tensor<2> {
    match precision {
        Precision::F32 => features_with::<f32>(vit, groups, rng),
        Precision::Bf16 => features_with::<u16>(vit, groups, rng),
    }
}

fn features_with<E: Element>(vit: &VisionTransformer, groups: &[Tensor<4>], mut rng: Option<&mut StdRng>) -> Tensor<2> {
    let device = groups.first().expect("at least one crop group").device();
    let dim = vit.embed_dim();
    let pixels = |group: &Tensor<4>| {
        let [images, _, h, w] = group.dims();
        (host(group.clone().without_autodiff()), images, (h, w))
    };
    let rows: usize = groups.iter().map(|g| g.dims()[0]).sum();
    let mode = if device.is_autodiff() { Mode::Training } else { Mode::Inference };
    let engine = Vit::<E>::new(vit, mode).expect("the engine runs here (engine_runs)");
    let mut features = Vec::with_capacity(rows * dim);
    let mut tapes = Vec::with_capacity(groups.len());
    for group in groups {
        let (values, images, size) = pixels(group);
        let (group_features, tape) = engine.forward(&values, images, size, rng.as_deref_mut());
        features.extend(group_features);
        tapes.extend(tape);
    }
    if mode == Mode::Inference {
        return Tensor::from_data(TensorData::new(features, [rows, dim]), &device);
    }
    let output = Tensor::<2>::from_data(TensorData::new(features, [rows, dim]), &Device::flex()).try_into_primitive::<Flex>().expect("a flex tensor");
    // The operation's one declared input is the cls token: what makes burn record it when the
    // backbone trains. Its backward pass registers every parameter's gradient by the
    // parameter's node, the cls token's among them.
    let cls_token = vit.cls_token.val().try_into_primitive::<Autodiff<Flex>>().expect("the student on burn's autodiff CPU device");
    let op = BackboneBackward { engine, tapes, vit: vit.clone() };
    Tensor::from_primitive::<Autodiff<Flex>>(op.prepare::<NoCheckpointing>([cls_token.node()]).compute_bound().stateless(output))
}

/// The backward step of the student's backbone: the engine's backward pass over each crop
/// group's tape.
struct BackboneBackward<E: Element> {
    engine: Vit<E>,
    tapes: Vec<Tape<E>>,
    /// The network the engine packed (its parameters are where the gradients go).
    vit: VisionTransformer,
}

impl<E: Element> std::fmt::Debug for BackboneBackward<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BackboneBackward({} crop groups)", self.tapes.len())
    }
}

impl<E: Element> Backward<Flex, 1> for BackboneBackward<E> {
    type State = ();

    fn backward(self, ops: Ops<(), 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<Flex>(&ops.node);
        let d_features = host(Tensor::<2>::from_primitive::<Flex>(upstream));
        let dim = self.vit.embed_dim();
        let mut backbone = self.engine.zero_gradients();
        let mut first = 0;
        for tape in &self.tapes {
            let rows = tape.images * dim;
            self.engine.backward(tape, &d_features[first..first + rows], &mut backbone);
            first += rows;
        }
        backbone.deliver(&self.vit, &mut Register { grads });
    }
}

/// Registers each gradient under its parameter's node, as burn's own operations do.
struct Register<'a> {
    grads: &'a mut Gradients,
}

impl GradientSink for Register<'_> {
    fn put<const D: usize>(&mut self, param: &Param<Tensor<D>>, values: Vec<f32>) {
        let tensor = param.val();
        if !tensor.is_require_grad() {
            return;
        }
        let shape = tensor.dims();
        let node: NodeId = tensor.try_into_primitive::<Autodiff<Flex>>().expect("a parameter on burn's autodiff CPU device").node().id();
        let grad = Tensor::<D>::from_data(TensorData::new(values, shape), &Device::flex()).try_into_primitive::<Flex>().expect("a flex tensor");
        self.grads.register::<Flex>(node, grad);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Module;
    use burn::tensor::Distribution;
    use rand::SeedableRng;

    use crate::model::VitConfig;
    use crate::weights::{ParamVisitor, export, visit_params};

    /// Relative error |a - b| / |b| over a whole tensor.
    fn relative_error(a: &[f32], b: &[f32]) -> f64 {
        let diff: f64 = a.iter().zip(b).map(|(x, y)| ((x - y) as f64).powi(2)).sum();
        let norm: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        (diff / norm.max(1e-30)).sqrt()
    }

    /// How a test computes the training features of crop groups.
    type Features = fn(&VisionTransformer, &[Tensor<4>], &mut StdRng) -> Tensor<2>;

    /// burn's own ops with the products at `precision`, group by group.
    fn through_burn(vit: &VisionTransformer, groups: &[Tensor<4>], rng: &mut StdRng, precision: Precision) -> Tensor<2> {
        Tensor::cat(groups.iter().map(|g| vit.forward_train(g.clone(), Some(&mut *rng), precision)).collect(), 0)
    }

    /// `candidate`'s features and gradients against burn's own ops on the f32 model: a random
    /// ViT with stochastic depth, one crop group at the trained size (37 tokens, so per-image
    /// views cross a 32-row block) and one resized (10 tokens, the position embedding goes
    /// through the bicubic resize), the same stochastic-depth draws on both sides, and a
    /// random feature gradient. The features and every parameter's gradient, as burn's
    /// backward pass leaves them, agree within the relative errors given (the products' input
    /// rounding for bf16, summation order for f32).
    fn check_against_burn(candidate: Features, feature_error: f64, gradient_error: f64) {
        let plain = Device::flex();
        let device = plain.clone().autodiff();
        let config = VitConfig { img_size: 48, patch_size: 8, embed_dim: 64, depth: 3, num_heads: 2, mlp_ratio: 4, drop_path_rate: 0.3 };
        let vit = config.init(&mut StdRng::seed_from_u64(0), &device);
        let groups: Vec<Tensor<4>> = [(5, 48), (4, 24)].map(|(batch, size)| Tensor::random([batch, 3, size, size], Distribution::Normal(0.0, 1.0), &plain)).to_vec();
        let upstream = Tensor::<2>::random([9, 64], Distribution::Normal(0.0, 1.0), &plain);

        let ad_groups: Vec<Tensor<4>> = groups.iter().map(|g| g.clone().autodiff()).collect();
        let burn_features = through_burn(&vit, &ad_groups, &mut StdRng::seed_from_u64(7), Precision::F32);
        let burn_grads = (burn_features.clone() * upstream.clone().autodiff()).sum().backward();
        let engine_features = candidate(&vit, &ad_groups, &mut StdRng::seed_from_u64(7));
        let engine_grads = (engine_features.clone() * upstream.autodiff()).sum().backward();

        let error = relative_error(&host(engine_features.without_autodiff()), &host(burn_features.without_autodiff()));
        eprintln!("features: relative error {error:.2e}");
        assert!(error < feature_error, "features: relative error {error}");
        struct Compare<'a> {
            engine: &'a burn::tensor::Gradients,
            burn: &'a burn::tensor::Gradients,
            limit: f64,
            compared: usize,
        }
        impl ParamVisitor for Compare<'_> {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
                let engine = param.grad(self.engine).unwrap_or_else(|| panic!("{path}: no gradient from the engine"));
                let burn = param.grad(self.burn).expect("burn's gradient");
                let error = relative_error(&host(engine), &host(burn));
                eprintln!("{path}: relative error {error:.2e}");
                assert!(error < self.limit, "{path}: relative error {error}");
                self.compared += 1;
            }
        }
        let mut compare = Compare { engine: &engine_grads, burn: &burn_grads, limit: gradient_error, compared: 0 };
        visit_params(&vit, &mut compare);
        assert_eq!(compare.compared, export(&vit).len(), "one gradient per parameter");
    }

    fn on_the_engine(precision: Precision) -> Features {
        eprintln!("engine path: {}, {precision:?}", super::super::cpu::Cpu::current().path().name());
        match precision {
            Precision::F32 => |vit, groups, rng| features(vit, groups, Some(rng), Precision::F32),
            Precision::Bf16 => |vit, groups, rng| features(vit, groups, Some(rng), Precision::Bf16),
        }
    }

    #[test]
    fn bf16_gradients_match_burn_autodiff_up_to_bf16_rounding() {
        check_against_burn(on_the_engine(Precision::Bf16), 0.01, 0.015);
    }

    #[test]
    fn f32_gradients_match_burn_autodiff_up_to_summation_order() {
        check_against_burn(on_the_engine(Precision::F32), 1e-5, 1e-4);
    }

    /// The GPUs' mixed precision (burn's ops with bf16 products, `model::matmul_at`), run by
    /// flex on the CPU: the same bf16 rounding of the products' inputs as the engine's, so the
    /// same tolerances; products of bf16 inputs are not the f32 ones, so it cannot pass as f32.
    #[test]
    fn burn_bf16_products_match_f32_up_to_bf16_rounding() {
        check_against_burn(|vit, groups, rng| through_burn(vit, groups, rng, Precision::Bf16), 0.01, 0.015);
        let vit = VitConfig { img_size: 16, patch_size: 8, embed_dim: 64, depth: 1, num_heads: 2, mlp_ratio: 4, drop_path_rate: 0.0 }.init(&mut StdRng::seed_from_u64(0), &Device::flex());
        let x = Tensor::<4>::random([2, 3, 16, 16], Distribution::Normal(0.0, 1.0), &Device::flex());
        let at = |precision| host(vit.forward_train(x.clone(), None, precision));
        assert_ne!(at(Precision::F32), at(Precision::Bf16), "bf16 products round their inputs");
    }

    /// The activation buffers a pass leaves behind are reused by the next pass of the same
    /// shape without zeroing: a pass over X after one over Y computes X's features and
    /// gradients bit for bit as before, so nothing reads what an earlier pass left there; at
    /// both precisions (bf16 products take transposed operands through another path).
    #[test]
    fn reused_buffers_leave_no_trace() {
        for precision in [Precision::F32, Precision::Bf16] {
            reuse_leaves_no_trace(precision);
        }
    }

    fn reuse_leaves_no_trace(precision: Precision) {
        let plain = Device::flex();
        let config = VitConfig { img_size: 48, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, mlp_ratio: 4, drop_path_rate: 0.3 };
        let vit = config.init(&mut StdRng::seed_from_u64(2), &plain.clone().autodiff());
        let input = |seed: u64| {
            let mut rng = StdRng::seed_from_u64(seed);
            [(3, 48), (2, 24)].map(|(batch, size)| {
                let values: Vec<f32> = (0..batch * 3 * size * size).map(|_| rand::Rng::random_range(&mut rng, -2.0..2.0)).collect();
                Tensor::<4>::from_data(burn::tensor::TensorData::new(values, [batch, 3, size, size]), &plain).autodiff()
            })
        };
        let pass = |seed: u64| {
            let features = features(&vit, &input(seed), Some(&mut StdRng::seed_from_u64(5)), precision);
            let grads = (features.clone() * features.clone()).sum().backward();
            let patch_grad = vit.patch_embed.weight.grad(&grads).expect("a gradient");
            let fc1_grad = vit.blocks[0].mlp.fc1.weight.grad(&grads).expect("a gradient");
            (host(features.without_autodiff()), host(patch_grad), host(fc1_grad))
        };
        let first = pass(1);
        let other = pass(2);
        assert_ne!(first.0, other.0, "two inputs, two sets of features");
        assert_eq!(pass(1), first);
    }

    /// Off burn's autodiff device the same call runs the network in inference mode: at f32 the
    /// same forward pass computes the same features, bit for bit (inference only fuses GELU
    /// into fc1's store, which at f32 rounds nothing in between).
    #[test]
    fn inference_features_equal_the_training_forward() {
        let device = Device::flex();
        let config = VitConfig { img_size: 48, patch_size: 8, embed_dim: 64, depth: 2, num_heads: 2, mlp_ratio: 4, drop_path_rate: 0.0 };
        let vit = config.init(&mut StdRng::seed_from_u64(1), &device.clone().autodiff());
        let group = Tensor::<4>::random([3, 3, 48, 48], Distribution::Normal(0.0, 1.0), &device);
        let inference = host(features(&vit.valid(), std::slice::from_ref(&group), None, Precision::F32));
        let training = host(features(&vit, &[group.autodiff()], None, Precision::F32).without_autodiff());
        assert_eq!(inference, training);
    }
}
