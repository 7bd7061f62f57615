//! Our ViT, head, loss and full training step against an independent PyTorch implementation
//! (fixtures from tests/fixtures/make_fixtures.py), to 1e-5 relative in f32.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Tensor};
use common::{Fixture, assert_close, assert_tensor_close};
use dino::weights::HostTensor;
use dino::model::{DinoHeadConfig, DinoModel, Network, VitConfig};
use dino::dist::Dist;
use dino::train::{ema, loss::DinoLoss, optim, schedule::teacher_temperatures};
use dino::weights;
use rand::SeedableRng;
use rand::rngs::StdRng;

const TOL: f64 = 1e-5;

fn device() -> Device {
    Device::flex()
}

fn vit_config(c: &serde_json::Value) -> VitConfig {
    VitConfig {
        img_size: c["img_size"].as_u64().unwrap() as usize,
        patch_size: c["patch_size"].as_u64().unwrap() as usize,
        embed_dim: c["embed_dim"].as_u64().unwrap() as usize,
        depth: c["depth"].as_u64().unwrap() as usize,
        num_heads: c["num_heads"].as_u64().unwrap() as usize,
        mlp_ratio: c["mlp_ratio"].as_u64().unwrap() as usize,
        drop_path_rate: 0.0,
    }
}

fn head_config(c: &serde_json::Value) -> DinoHeadConfig {
    DinoHeadConfig {
        hidden_dim: c["hidden_dim"].as_u64().unwrap() as usize,
        bottleneck_dim: c["bottleneck_dim"].as_u64().unwrap() as usize,
        nlayers: c["nlayers"].as_u64().unwrap() as usize,
        use_bn: c["use_bn"].as_bool().unwrap_or(false),
        ..DinoHeadConfig::new(c["in_dim"].as_u64().unwrap() as usize, c["out_dim"].as_u64().unwrap() as usize)
    }
}

#[test]
fn vit_outputs_match_pytorch_at_three_resolutions() {
    let fx = Fixture::load("vit.safetensors");
    let dev = device();
    let vit = vit_config(&fx.config["vit"]).init(&mut StdRng::seed_from_u64(1), &dev);
    let vit = weights::import(vit, &fx.tensors, "weights.").unwrap();
    let last_n = fx.config["last_n"].as_u64().unwrap() as usize;
    for name in ["global", "local", "wide"] {
        let x: Tensor<4> = fx.tensor(&format!("{name}.input"), &dev);
        assert_tensor_close(&format!("{name} cls"), vit.forward(x.clone()), fx.host(&format!("{name}.cls")), TOL);
        let layers = vit.intermediate_layers(x.clone(), last_n, dino::engine::Precision::F32);
        assert_eq!(layers.len(), last_n);
        for (i, tokens) in layers.into_iter().enumerate() {
            assert_tensor_close(&format!("{name} layer {i}"), tokens, fx.host(&format!("{name}.layers.{i}")), TOL);
        }
        assert_tensor_close(&format!("{name} attention"), vit.last_self_attention(x), fx.host(&format!("{name}.attention")), TOL);
    }
}

#[test]
fn head_output_matches_pytorch() {
    let fx = Fixture::load("head.safetensors");
    let dev = device();
    let head = head_config(&fx.config["head"]).init(&mut StdRng::seed_from_u64(1), &dev);
    let head = weights::import(head, &fx.tensors, "weights.").unwrap();
    assert_tensor_close("head", head.forward(fx.tensor("input", &dev), dino::dist::Group::single()), fx.host("output"), TOL);
}

/// A head with BatchNorm normalises each batch with its own statistics and folds them into the
/// running ones, as PyTorch's train mode does, also on the plain (non-autodiff) device the
/// teacher runs on: two batches, outputs and running statistics against PyTorch.
#[test]
fn batchnorm_head_uses_batch_statistics_for_the_teacher_too() {
    let fx = Fixture::load("head_bn.safetensors");
    let dev = device();
    let head = head_config(&fx.config["head"]).init(&mut StdRng::seed_from_u64(1), &dev);
    let head = weights::import(head, &fx.tensors, "weights.").unwrap();
    for i in 0..2 {
        assert_tensor_close(&format!("output {i}"), head.forward(fx.tensor(&format!("input{i}"), &dev), dino::dist::Group::single()), fx.host(&format!("output{i}")), TOL);
    }
    let after: std::collections::HashMap<String, HostTensor> = weights::export(&head).into_iter().collect();
    let mut checked = 0;
    for (name, expected) in fx.tensors.iter().filter_map(|(k, v)| Some((k.strip_prefix("after.")?, v))) {
        assert_close(name, &after[name], expected, TOL);
        checked += 1;
    }
    assert_eq!(checked, 4, "two BatchNorms, mean and variance each");
}

#[test]
fn loss_and_center_match_pytorch_over_three_steps() {
    let fx = Fixture::load("loss.safetensors");
    let c = &fx.config;
    let dev = device();
    let mut loss = DinoLoss::new(c["out_dim"].as_u64().unwrap() as usize, c["ncrops"].as_u64().unwrap() as usize, &dev);
    let temps = teacher_temperatures(
        c["warmup_teacher_temp"].as_f64().unwrap(),
        c["teacher_temp"].as_f64().unwrap(),
        c["warmup_teacher_temp_epochs"].as_u64().unwrap() as usize,
        c["epochs"].as_u64().unwrap() as usize,
    );
    for (temp, expected) in temps.iter().zip(c["temperatures"].as_array().unwrap()) {
        assert!((temp - expected.as_f64().unwrap()).abs() < 1e-7);
    }
    for (epoch, &temp) in temps.iter().enumerate().take(3) {
        let out = loss.forward(fx.tensor(&format!("step{epoch}.student"), &dev), fx.tensor(&format!("step{epoch}.teacher"), &dev), temp, &Dist::single());
        assert_tensor_close(&format!("loss {epoch}"), out.loss, fx.host(&format!("step{epoch}.loss")), TOL);
        assert_tensor_close(&format!("entropy {epoch}"), out.teacher_entropy, fx.host(&format!("step{epoch}.entropy")), TOL);
        assert_tensor_close(&format!("kl {epoch}"), out.kl, fx.host(&format!("step{epoch}.kl")), 1e-4);
        assert_tensor_close(&format!("center {epoch}"), loss.center.clone(), fx.host(&format!("step{epoch}.center")), TOL);
    }
}

/// Two full steps (forward, loss, backward, clipping, frozen last layer at epoch 0, AdamW
/// with its no-decay group, teacher EMA) against PyTorch's AdamW on the same model.
#[test]
fn training_steps_match_pytorch() {
    let fx = Fixture::load("step.safetensors");
    let c = &fx.config;
    let dev = device();
    let ad = dev.clone().autodiff();
    let mut rng = StdRng::seed_from_u64(1);
    let vit = vit_config(&c["vit"]);
    let student = DinoModel { backbone: Network::Vit(vit.init(&mut rng, &dev)), head: head_config(&c["head"]).init(&mut rng, &dev) };
    let student = weights::import(student, &fx.tensors, "student.").unwrap();
    let mut teacher = student.valid();
    let mut student = student.fork(&ad).train();

    let ncrops = c["ncrops"].as_u64().unwrap() as usize;
    let batch = c["batch"].as_u64().unwrap() as usize;
    let out_dim = c["head"]["out_dim"].as_u64().unwrap() as usize;
    let clip = c["clip_grad"].as_f64().unwrap();
    let freeze_last_layer = c["freeze_last_layer"].as_u64().unwrap() as usize;
    let mut loss_fn = DinoLoss::new(out_dim, ncrops, &dev);
    let mut adamw = optim::Optimizer::new(optim::OptimizerKind::Adamw);

    let mut lrs = Vec::new();
    // The teacher takes 1 - momentum of the student's displacement at every step, so what it
    // can have drifted is bounded by the sum of those weights so far.
    let mut teacher_weight = 0.0;
    for (i, s) in c["steps"].as_array().unwrap().iter().enumerate() {
        let epoch = s["epoch"].as_u64().unwrap() as usize;
        let teacher_temp = s["teacher_temp"].as_f64().unwrap();
        let global: Tensor<5> = fx.tensor(&format!("step{i}.global"), &dev);
        let local: Tensor<5> = fx.tensor(&format!("step{i}.local"), &dev);
        let [_, _, _, gh, gw] = global.dims();
        let [_, _, _, lh, lw] = local.dims();
        let global = global.reshape([2 * batch, 3, gh, gw]);
        let local = local.reshape([(ncrops - 2) * batch, 3, lh, lw]);

        let teacher_out = teacher.forward(std::slice::from_ref(&global), None, dino::dist::Group::single(), dino::engine::Precision::F32);
        let student_out = student.forward(&[global.autodiff(), local.autodiff()], None, dino::dist::Group::single(), dino::engine::Precision::F32);
        let out = loss_fn.forward(student_out, teacher_out, teacher_temp, &Dist::single());
        assert_tensor_close(&format!("loss {i}"), out.loss.clone(), fx.host(&format!("step{i}.loss")), TOL);
        assert_tensor_close(&format!("center {i}"), loss_fn.center.clone(), fx.host(&format!("step{i}.center")), TOL);
        let grads = out.loss.backward();
        if i == 0 {
            check_gradients(&student, &grads, &fx);
        }
        let frozen = |name: &str| epoch < freeze_last_layer && name.contains("last_layer");
        let settings = optim::StepSettings {
            lr: s["lr"].as_f64().unwrap(),
            weight_decay: s["wd"].as_f64().unwrap(),
            clip_grad: Some(clip),
            frozen: &frozen,
        };
        student = adamw.step(student, grads, &settings);
        teacher = ema::update_teacher(teacher, &student, s["momentum"].as_f64().unwrap());

        lrs.push(s["lr"].as_f64().unwrap());
        for (name, value) in weights::export(&student) {
            let expected = fx.host(&format!("step{i}.student.{name}"));
            assert_step_close(&format!("step {i} student {name}"), &value, expected, &fx, &name, i, &lrs, 1.0);
        }
        teacher_weight += 1.0 - s["momentum"].as_f64().unwrap();
        for (name, value) in weights::export(&teacher) {
            let expected = fx.host(&format!("step{i}.teacher.{name}"));
            assert_step_close(&format!("step {i} teacher {name}"), &value, expected, &fx, &name, i, &lrs, teacher_weight);
        }
    }
}

/// Adam's first steps move a weight by about lr * g / (|g| + eps), which turns float32
/// rounding in a gradient far below its tensor's largest entry (|g| < 1e-3 max|g|, e.g. the
/// key part of the qkv bias, whose true gradient is exactly 0) into a different step in any
/// two implementations. Those entries only have to stay within the total learning rate of
/// the steps (scaled by the EMA weight for the teacher); all others agree to 1e-5 relative.
#[allow(clippy::too_many_arguments)]
fn assert_step_close(what: &str, actual: &HostTensor, expected: &HostTensor, fx: &Fixture, name: &str, step: usize, lrs: &[f64], weight: f64) {
    assert_eq!(actual.shape, expected.shape, "{what}: shape");
    let mut conditioned = vec![true; actual.values.len()];
    for j in 0..=step {
        if let Some(grad) = fx.tensors.get(&format!("step{j}.grad.{name}")) {
            let max = grad.values.iter().fold(0f32, |m, g| m.max(g.abs()));
            for (ok, g) in conditioned.iter_mut().zip(&grad.values) {
                *ok &= g.abs() >= 1e-3 * max;
            }
        }
    }
    let scale = expected.values.iter().fold(0f64, |m, x| m.max(x.abs() as f64));
    let budget = 2.0 * lrs.iter().sum::<f64>() * weight;
    let mut worst = 0f64;
    for ((a, e), ok) in actual.values.iter().zip(&expected.values).zip(&conditioned) {
        let diff = (a - e).abs() as f64;
        if *ok {
            worst = worst.max(diff / scale);
        } else {
            assert!(diff <= budget * 1.01, "{what}: ill-conditioned entry off by {diff:e} > {budget:e}");
        }
    }
    assert!(worst <= TOL, "{what}: relative error {worst:e} > {TOL:e}");
}

fn check_gradients(student: &DinoModel, grads: &burn::tensor::Gradients, fx: &Fixture) {
    let b = student.backbone.vit("gradient check").unwrap();
    let pairs: Vec<(&str, HostTensor)> = vec![
        ("backbone.pos_embed", common::grad_of(&b.pos_embed, grads)),
        ("backbone.cls_token", common::grad_of(&b.cls_token, grads)),
        ("backbone.patch_embed.proj.weight", common::grad_of(&b.patch_embed.weight, grads)),
        ("backbone.blocks.0.attn.qkv.weight", common::grad_of_linear(&b.blocks[0].attn.qkv.weight, grads)),
        ("backbone.blocks.1.norm2.bias", common::grad_of(&b.blocks[1].norm2.bias, grads)),
        ("backbone.norm.weight", common::grad_of(&b.norm.weight, grads)),
        ("head.mlp.0.weight", common::grad_of_linear(&student.head.mlp[0].weight, grads)),
        ("head.mlp.4.bias", common::grad_of(student.head.mlp[2].bias.as_ref().unwrap(), grads)),
        ("head.last_layer.weight_v", common::grad_of(&student.head.last_layer.weight_v, grads)),
    ];
    for (name, grad) in pairs {
        assert_close(&format!("grad {name}"), &grad, fx.host(&format!("step0.grad.{name}")), TOL);
    }
    assert!(student.head.last_layer.weight_g.grad(grads).is_none(), "weight_g is frozen at 1");
}
