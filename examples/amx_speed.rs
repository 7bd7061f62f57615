use burn::tensor::{Device, Distribution, Tensor};
use dino::infer::Bf16Vit;
use dino::model::VitConfig;
use rand::SeedableRng;
use std::time::Instant;
fn main() {
    let dev = Device::flex();
    let vit = VitConfig::from_arch("vit_small", 16).unwrap().init(&mut rand::rngs::StdRng::seed_from_u64(0), &dev);
    let engine = Bf16Vit::new(&vit);
    for _ in 0..4 {
        let x = Tensor::<4>::random([64, 3, 224, 224], Distribution::Normal(0.0, 1.0), &dev);
        let t = Instant::now();
        let out = engine.intermediate_layers(x, 1);
        let _ = out[0].clone().into_data();
        let s = t.elapsed().as_secs_f64();
        println!("{:.3}s {:.1} img/s", s, 64.0 / s);
    }
}
