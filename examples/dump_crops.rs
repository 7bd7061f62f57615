//! Writes the multi-crop views of a few images as PNGs, to eyeball the augmentation.
//! cargo run --example dump_crops -- DATA_DIR OUT_DIR [global] [local]

use dino::data::augment::{MultiCropConfig, multi_crop};
use dino::data::dataset::{Dataset, IdxSplit};
use rand::SeedableRng;
use rand::rngs::StdRng;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let data = Dataset::open(args[1].as_ref(), IdxSplit::Train).unwrap();
    let out = std::path::Path::new(&args[2]);
    let global = args.get(3).map_or(28, |s| s.parse().unwrap());
    let local = args.get(4).map_or(12, |s| s.parse().unwrap());
    let cfg = MultiCropConfig { global_size: global, local_size: local, local_crops_number: 4, global_crops_scale: (0.4, 1.0), local_crops_scale: (0.05, 0.4), blur_sigma: (0.1, 2.0) };
    let (mean, std) = ([0.485f32, 0.456, 0.406], [0.229f32, 0.224, 0.225]);
    for i in 0..4 {
        data.load(i).unwrap().save(out.join(format!("img{i}.png"))).unwrap();
        for (v, view) in multi_crop(&data.load(i).unwrap(), &cfg, &mut StdRng::seed_from_u64(i as u64)).iter().enumerate() {
            let s = view.size;
            let img = image::RgbImage::from_fn(s as u32, s as u32, |x, y| {
                let p = |c: usize| ((view.pixels[c * s * s + y as usize * s + x as usize] * std[c] + mean[c]) * 255.0).clamp(0.0, 255.0) as u8;
                image::Rgb([p(0), p(1), p(2)])
            });
            image::imageops::resize(&img, 112, 112, image::imageops::FilterType::Nearest).save(out.join(format!("img{i}_view{v}.png"))).unwrap();
        }
    }
}
