//! Times the parts of one DINO training step (small-image preset sizes by default).
//! cargo run --release --example step_timing -- [batch] [global] [local] [nlocal] [patch] [out_dim]
//!     [arch] [head_hidden_dim] [head_bottleneck_dim]

use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use dino::model::{DinoHeadConfig, DinoModel, VitConfig};
use dino::train::{ema, loss::DinoLoss, optim};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let get = |i: usize, d: usize| args.get(i).map_or(d, |a| a.parse().expect("a number"));
    let (batch, gsize, lsize, nlocal, patch, out_dim) = (get(0, 128), get(1, 28), get(2, 12), get(3, 6), get(4, 4), get(5, 4096));
    let arch = args.get(6).map_or("vit_tiny", String::as_str);
    let (hidden, bottleneck) = (get(7, 2048), get(8, 256));
    let dev = Device::flex();
    let mut vit = VitConfig::from_arch(arch, patch).expect("known arch");
    vit.img_size = gsize;
    vit.drop_path_rate = 0.1;
    let mut rng = StdRng::seed_from_u64(0);
    let student = DinoModel { backbone: vit.init(&mut rng, &dev), head: DinoHeadConfig { hidden_dim: hidden, bottleneck_dim: bottleneck, ..DinoHeadConfig::new(vit.embed_dim, out_dim) }.init(&mut rng, &dev) };
    let mut teacher = student.valid();
    let mut student = student.fork(&dev.clone().autodiff()).train();
    let mut loss_fn = DinoLoss::new(out_dim, 2 + nlocal, 0.04, 0.04, 0, 1, &dev);
    let mut adamw = optim::AdamW::default();
    for step in 0..4 {
        let global = Tensor::<4>::random([2 * batch, 3, gsize, gsize], Distribution::Normal(0.0, 1.0), &dev);
        let local = Tensor::<4>::random([nlocal * batch, 3, lsize, lsize], Distribution::Normal(0.0, 1.0), &dev);
        let t0 = Instant::now();
        let t_out = teacher.forward(&[global.clone()], None);
        let _ = t_out.clone().into_data();
        let t1 = Instant::now();
        let s_out = student.forward(&[global.autodiff(), local.autodiff()], Some(&mut rng));
        let out = loss_fn.forward(s_out, t_out, 0);
        let _ = out.loss.clone().into_data();
        let t2 = Instant::now();
        let grads = out.loss.backward();
        let t3 = Instant::now();
        let never = |_: &str| false;
        let s = optim::StepSettings { lr: 1e-4, weight_decay: 0.04, clip_grad: Some(3.0), frozen: &never };
        student = adamw.step(student, grads, &s);
        let _ = student.head.last_layer.weight_v.val().into_data();
        let t4 = Instant::now();
        teacher = ema::update_teacher(teacher, &student, 0.996);
        let _ = teacher.head.last_layer.weight_v.val().into_data();
        let t5 = Instant::now();
        println!(
            "step {step}: teacher fwd {:.2}s  student fwd+loss {:.2}s  backward {:.2}s  adamw {:.2}s  ema {:.2}s  total {:.2}s",
            (t1 - t0).as_secs_f64(), (t2 - t1).as_secs_f64(), (t3 - t2).as_secs_f64(), (t4 - t3).as_secs_f64(), (t5 - t4).as_secs_f64(), (t5 - t0).as_secs_f64()
        );
    }
}
