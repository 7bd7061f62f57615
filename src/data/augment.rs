//! DINO's multi-crop augmentation: two global views and several local views of each image,
//! each randomly resized-cropped, flipped, colour-jittered, turned gray, blurred and (the second
//! global view) solarised with the reference's per-view probabilities, then normalised.

use fast_image_resize::images::Image;
use fast_image_resize::{FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::Rng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
const STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Multi-crop settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MultiCropConfig {
    pub global_size: usize,
    pub local_size: usize,
    pub local_crops_number: usize,
    pub global_crops_scale: (f64, f64),
    pub local_crops_scale: (f64, f64),
    /// Range of the Gaussian blur's sigma, in pixels of the crop.
    pub blur_sigma: (f64, f64),
}

impl MultiCropConfig {
    pub fn ncrops(&self) -> usize {
        2 + self.local_crops_number
    }
}

/// Per-view probabilities of the random photometric steps.
#[derive(Debug, Clone, Copy)]
struct ViewRecipe {
    blur: f64,
    solarize: f64,
}

const GLOBAL_1: ViewRecipe = ViewRecipe { blur: 1.0, solarize: 0.0 };
const GLOBAL_2: ViewRecipe = ViewRecipe { blur: 0.1, solarize: 0.2 };
const LOCAL: ViewRecipe = ViewRecipe { blur: 0.5, solarize: 0.0 };

/// What happened to one view (for tests and statistics).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ViewRecord {
    /// Crop box in the source: x, y, width, height.
    pub crop: (u32, u32, u32, u32),
    pub flipped: bool,
    /// Colour-jitter order (0 brightness, 1 contrast, 2 saturation, 3 hue) when applied.
    pub jitter: Option<[usize; 4]>,
    pub grayscale: bool,
    pub blur_sigma: Option<f32>,
    pub solarized: bool,
}

/// A view: normalised CHW pixels of a `size` x `size` crop.
pub struct View {
    pub size: usize,
    pub pixels: Vec<f32>,
    pub record: ViewRecord,
}

/// All views of one image: 2 global, then the local ones.
pub fn multi_crop(img: &RgbImage, cfg: &MultiCropConfig, rng: &mut impl Rng) -> Vec<View> {
    let mut views = Vec::with_capacity(cfg.ncrops());
    views.push(view(img, cfg.global_size, cfg.global_crops_scale, cfg.blur_sigma, GLOBAL_1, rng));
    views.push(view(img, cfg.global_size, cfg.global_crops_scale, cfg.blur_sigma, GLOBAL_2, rng));
    for _ in 0..cfg.local_crops_number {
        views.push(view(img, cfg.local_size, cfg.local_crops_scale, cfg.blur_sigma, LOCAL, rng));
    }
    views
}

fn view(img: &RgbImage, size: usize, scale: (f64, f64), blur_sigma: (f64, f64), recipe: ViewRecipe, rng: &mut impl Rng) -> View {
    let mut record = ViewRecord { crop: random_resized_crop_box(img.width(), img.height(), scale, rng), ..Default::default() };
    let (x, y, w, h) = record.crop;
    let mut px = resize_crop(img, (x as f64, y as f64, w as f64, h as f64), size);
    record.flipped = rng.random::<f64>() < 0.5;
    if record.flipped {
        flip_horizontal(&mut px, size);
    }
    if rng.random::<f64>() < 0.8 {
        let mut order = [0, 1, 2, 3];
        order.shuffle(rng);
        let brightness = rng.random_range(0.6..1.4) as f32;
        let contrast = rng.random_range(0.6..1.4) as f32;
        let saturation = rng.random_range(0.8..1.2) as f32;
        let hue = rng.random_range(-0.1..0.1) as f32;
        for step in order {
            match step {
                0 => px.iter_mut().for_each(|v| *v = (*v * brightness).clamp(0.0, 1.0)),
                1 => adjust_contrast(&mut px, contrast),
                2 => adjust_saturation(&mut px, saturation),
                _ => shift_hue(&mut px, hue),
            }
        }
        record.jitter = Some(order);
    }
    record.grayscale = rng.random::<f64>() < 0.2;
    if record.grayscale {
        adjust_saturation(&mut px, 0.0);
    }
    if rng.random::<f64>() < recipe.blur {
        let sigma = rng.random_range(blur_sigma.0..=blur_sigma.1) as f32;
        gaussian_blur(&mut px, size, sigma);
        record.blur_sigma = Some(sigma);
    }
    if recipe.solarize > 0.0 && rng.random::<f64>() < recipe.solarize {
        px.iter_mut().for_each(|v| if *v >= 0.5 { *v = 1.0 - *v });
        record.solarized = true;
    }
    View { size, pixels: normalize_to_chw(&px), record }
}

/// torchvision's RandomResizedCrop box: up to 10 tries of an area fraction in `scale` and a
/// log-uniform aspect ratio in [3/4, 4/3]; otherwise the largest centred box within the ratios.
pub fn random_resized_crop_box(width: u32, height: u32, scale: (f64, f64), rng: &mut impl Rng) -> (u32, u32, u32, u32) {
    let (w_img, h_img) = (width as f64, height as f64);
    let area = w_img * h_img;
    let (lo, hi) = ((3.0f64 / 4.0).ln(), (4.0f64 / 3.0).ln());
    for _ in 0..10 {
        let target = area * rng.random_range(scale.0..=scale.1);
        let ratio = rng.random_range(lo..=hi).exp();
        let w = (target * ratio).sqrt().round();
        let h = (target / ratio).sqrt().round();
        if w > 0.0 && h > 0.0 && w <= w_img && h <= h_img {
            let (w, h) = (w as u32, h as u32);
            let y = rng.random_range(0..=height - h);
            let x = rng.random_range(0..=width - w);
            return (x, y, w, h);
        }
    }
    let in_ratio = w_img / h_img;
    let (w, h) = if in_ratio < 0.75 {
        (width, (w_img / 0.75).round().min(h_img) as u32)
    } else if in_ratio > 4.0 / 3.0 {
        ((h_img * 4.0 / 3.0).round().min(w_img) as u32, height)
    } else {
        (width, height)
    };
    ((width - w) / 2, (height - h) / 2, w, h)
}

/// Crops the box and resizes it to size x size with a bicubic (Catmull-Rom, PIL's BICUBIC)
/// convolution that antialiases when shrinking. Returns HWC floats in [0, 1].
pub(crate) fn resize_crop(img: &RgbImage, crop: (f64, f64, f64, f64), size: usize) -> Vec<f32> {
    resize_crop_to(img, crop, size, size)
}

/// As [`resize_crop`], to a `width` x `height` output.
pub(crate) fn resize_crop_to(img: &RgbImage, (x, y, w, h): (f64, f64, f64, f64), width: usize, height: usize) -> Vec<f32> {
    let src = Image::from_vec_u8(img.width(), img.height(), img.as_raw().clone(), PixelType::U8x3).expect("rgb buffer");
    let mut dst = Image::new(width as u32, height as u32, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::CatmullRom))
        .crop(x, y, w, h);
    Resizer::new().resize(&src, &mut dst, &options).expect("resize");
    dst.buffer().iter().map(|&v| v as f32 / 255.0).collect()
}

pub(crate) fn flip_horizontal(px: &mut [f32], size: usize) {
    for row in px.chunks_mut(size * 3) {
        for x in 0..size / 2 {
            for c in 0..3 {
                row.swap(x * 3 + c, (size - 1 - x) * 3 + c);
            }
        }
    }
}

fn luma(p: &[f32]) -> f32 {
    0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
}

/// Blend with the mean gray level of the whole image (torchvision's adjust_contrast).
fn adjust_contrast(px: &mut [f32], factor: f32) {
    let mean = px.chunks(3).map(luma).sum::<f32>() / (px.len() / 3) as f32;
    px.iter_mut().for_each(|v| *v = (factor * *v + (1.0 - factor) * mean).clamp(0.0, 1.0));
}

/// Blend each pixel with its own gray level; factor 0 is grayscale.
fn adjust_saturation(px: &mut [f32], factor: f32) {
    for p in px.chunks_mut(3) {
        let g = luma(p);
        for v in p.iter_mut() {
            *v = (factor * *v + (1.0 - factor) * g).clamp(0.0, 1.0);
        }
    }
}

/// Rotates the hue by `shift` turns (HSV round trip).
fn shift_hue(px: &mut [f32], shift: f32) {
    for p in px.chunks_mut(3) {
        let (r, g, b) = (p[0], p[1], p[2]);
        let max = r.max(g).max(b);
        let min = r.min(g).min(b);
        let delta = max - min;
        if delta <= 0.0 {
            continue;
        }
        let h = if max == r {
            ((g - b) / delta).rem_euclid(6.0)
        } else if max == g {
            (b - r) / delta + 2.0
        } else {
            (r - g) / delta + 4.0
        } / 6.0;
        let h = (h + shift).rem_euclid(1.0) * 6.0;
        let (s, v) = (delta / max, max);
        let i = h.floor();
        let f = h - i;
        let (pp, q, t) = (v * (1.0 - s), v * (1.0 - s * f), v * (1.0 - s * (1.0 - f)));
        let (nr, ng, nb) = match i as i32 % 6 {
            0 => (v, t, pp),
            1 => (q, v, pp),
            2 => (pp, v, t),
            3 => (pp, q, v),
            4 => (t, pp, v),
            _ => (v, pp, q),
        };
        p[0] = nr;
        p[1] = ng;
        p[2] = nb;
    }
}

/// Separable Gaussian blur with radius ceil(3 sigma), edges extended.
fn gaussian_blur(px: &mut Vec<f32>, size: usize, sigma: f32) {
    let radius = (3.0 * sigma).ceil() as i64;
    let kernel: Vec<f32> = (-radius..=radius).map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp()).collect();
    let total: f32 = kernel.iter().sum();
    let kernel: Vec<f32> = kernel.iter().map(|k| k / total).collect();
    let rows = convolve(px, size, &kernel, (1, 0));
    *px = convolve(&rows, size, &kernel, (0, 1));
}

/// One pass of a 1-D kernel over an HWC image along direction (dx, dy).
fn convolve(src: &[f32], size: usize, kernel: &[f32], (dx, dy): (i64, i64)) -> Vec<f32> {
    let n = size as i64;
    let radius = (kernel.len() / 2) as i64;
    let mut out = vec![0f32; src.len()];
    for y in 0..n {
        for x in 0..n {
            for c in 0..3 {
                let mut acc = 0.0;
                for (k, w) in kernel.iter().enumerate() {
                    let o = k as i64 - radius;
                    let sx = (x + o * dx).clamp(0, n - 1);
                    let sy = (y + o * dy).clamp(0, n - 1);
                    acc += w * src[((sy * n + sx) * 3 + c) as usize];
                }
                out[((y * n + x) * 3 + c) as usize] = acc;
            }
        }
    }
    out
}

/// HWC [0, 1] pixels to CHW, normalised with the ImageNet mean and std.
pub(crate) fn normalize_to_chw(px: &[f32]) -> Vec<f32> {
    let plane = px.len() / 3;
    let mut out = vec![0f32; 3 * plane];
    for (i, p) in px.chunks(3).enumerate() {
        for c in 0..3 {
            out[c * plane + i] = (p[c] - MEAN[c]) / STD[c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn test_image() -> RgbImage {
        RgbImage::from_fn(40, 30, |x, y| image::Rgb([(x * 6) as u8, (y * 8) as u8, ((x + y) * 3) as u8]))
    }

    fn config() -> MultiCropConfig {
        MultiCropConfig { global_size: 16, local_size: 8, local_crops_number: 3, global_crops_scale: (0.4, 1.0), local_crops_scale: (0.05, 0.4), blur_sigma: (0.1, 2.0) }
    }

    /// |count - n p| within 3 sigma of a binomial.
    fn assert_frequency(what: &str, count: usize, n: usize, p: f64) {
        let sigma = (n as f64 * p * (1.0 - p)).sqrt().max(1e-9);
        let dev = (count as f64 - n as f64 * p).abs();
        assert!(dev <= 3.0 * sigma, "{what}: {count} of {n}, expected {:.1} +- {:.1}", n as f64 * p, 3.0 * sigma);
    }

    #[test]
    fn views_have_the_right_shapes_and_ranges() {
        let views = multi_crop(&test_image(), &config(), &mut StdRng::seed_from_u64(0));
        assert_eq!(views.len(), 5);
        for (i, v) in views.iter().enumerate() {
            let size = if i < 2 { 16 } else { 8 };
            assert_eq!(v.size, size);
            assert_eq!(v.pixels.len(), 3 * size * size);
            // Normalised [0, 1] values lie within [-mean/std, (1-mean)/std] per channel.
            for c in 0..3 {
                let (lo, hi) = (-MEAN[c] / STD[c] - 1e-5, (1.0 - MEAN[c]) / STD[c] + 1e-5);
                assert!(v.pixels[c * size * size..(c + 1) * size * size].iter().all(|p| (lo..=hi).contains(p)));
            }
        }
    }

    #[test]
    fn same_seed_same_views() {
        let a = multi_crop(&test_image(), &config(), &mut StdRng::seed_from_u64(7));
        let b = multi_crop(&test_image(), &config(), &mut StdRng::seed_from_u64(7));
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.pixels, y.pixels);
            assert_eq!(x.record, y.record);
        }
    }

    #[test]
    fn blur_sigma_stays_in_its_configured_range() {
        let cfg = MultiCropConfig { blur_sigma: (0.3, 0.4), ..config() };
        let mut rng = StdRng::seed_from_u64(3);
        let sigmas: Vec<f32> = (0..50).flat_map(|_| multi_crop(&test_image(), &cfg, &mut rng)).filter_map(|v| v.record.blur_sigma).collect();
        // The first global view is always blurred: at least 50 draws, all within range.
        assert!(sigmas.len() >= 50 && sigmas.iter().all(|s| (0.3..=0.4).contains(s)), "{sigmas:?}");
    }

    #[test]
    fn random_choices_happen_at_their_probabilities() {
        let img = test_image();
        let cfg = config();
        let n = 1500;
        let mut rng = StdRng::seed_from_u64(1);
        let mut counts = [[0usize; 5]; 3]; // per view kind: flip, jitter, gray, blur, solarize
        let kinds = |i: usize| if i < 2 { i } else { 2 };
        let mut per_kind = [0usize; 3];
        for _ in 0..n {
            for (i, v) in multi_crop(&img, &cfg, &mut rng).iter().enumerate() {
                let r = &v.record;
                let k = kinds(i);
                per_kind[k] += 1;
                for (slot, hit) in [r.flipped, r.jitter.is_some(), r.grayscale, r.blur_sigma.is_some(), r.solarized].into_iter().enumerate() {
                    counts[k][slot] += hit as usize;
                }
                if let Some(s) = r.blur_sigma {
                    assert!((0.1..=2.0).contains(&s));
                }
            }
        }
        let expected = [[0.5, 0.8, 0.2, 1.0, 0.0], [0.5, 0.8, 0.2, 0.1, 0.2], [0.5, 0.8, 0.2, 0.5, 0.0]];
        let names = ["flip", "jitter", "grayscale", "blur", "solarize"];
        for k in 0..3 {
            for slot in 0..5 {
                assert_frequency(&format!("view kind {k} {}", names[slot]), counts[k][slot], per_kind[k], expected[k][slot]);
            }
        }
    }

    #[test]
    fn crops_stay_inside_scale_and_ratio_bounds() {
        let mut rng = StdRng::seed_from_u64(2);
        for (w, h, scale) in [(40u32, 30u32, (0.4, 1.0)), (40, 30, (0.05, 0.4)), (224, 224, (0.05, 0.4))] {
            for _ in 0..2000 {
                let (x, y, cw, ch) = random_resized_crop_box(w, h, scale, &mut rng);
                assert!(x + cw <= w && y + ch <= h && cw > 0 && ch > 0);
                let area = (cw * ch) as f64 / (w * h) as f64;
                let ratio = cw as f64 / ch as f64;
                // Rounding each side to whole pixels moves area and ratio by at most a pixel.
                let slack_area = (cw + ch + 1) as f64 / (w * h) as f64;
                assert!(area >= scale.0 - slack_area && area <= scale.1 + slack_area, "area {area} for {scale:?}");
                let slack_ratio = ratio * (1.0 / cw as f64 + 1.0 / ch as f64);
                assert!(ratio >= 0.75 - slack_ratio && ratio <= 4.0 / 3.0 + slack_ratio, "ratio {ratio}");
            }
        }
    }

    #[test]
    fn photometric_steps_on_known_pixels() {
        let mut px = vec![0.2, 0.4, 0.6];
        adjust_saturation(&mut px, 0.0);
        let g = 0.299 * 0.2 + 0.587 * 0.4 + 0.114 * 0.6;
        assert!(px.iter().all(|v| (v - g).abs() < 1e-6));
        let mut px = vec![1.0, 0.0, 0.0];
        shift_hue(&mut px, 1.0 / 3.0); // red -> green
        assert!((px[0]).abs() < 1e-6 && (px[1] - 1.0).abs() < 1e-6 && px[2].abs() < 1e-6, "{px:?}");
        let mut px: Vec<f32> = (0..5 * 5 * 3).map(|i| (i % 7) as f32 / 7.0).collect();
        let mean_before: f32 = px.iter().sum::<f32>();
        gaussian_blur(&mut px, 5, 1.0);
        // Blurring redistributes but (edges aside) roughly keeps the mean, and stays in range.
        assert!(px.iter().all(|v| (0.0..=1.0).contains(v)));
        assert!((px.iter().sum::<f32>() - mean_before).abs() / mean_before < 0.1);
    }
}
