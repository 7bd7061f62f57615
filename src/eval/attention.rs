//! Self-attention maps: the last block's cls-token attention to every patch, per head, as the
//! paper shows them, with the masks that keep the patches holding a given share of the
//! attention mass, and a colour map to draw them.

use burn::tensor::{Device, Tensor, TensorData};
use image::{Rgb, RgbImage};

use crate::model::VisionTransformer;
use crate::weights::HostTensor;

/// Per-head cls attention over the patch grid.
pub struct AttentionMaps {
    pub heads: usize,
    pub grid_h: usize,
    pub grid_w: usize,
    /// [heads, grid_h, grid_w], each head summing (with the cls token's self-attention) to 1.
    pub values: Vec<f32>,
}

impl AttentionMaps {
    pub fn head(&self, h: usize) -> &[f32] {
        let n = self.grid_h * self.grid_w;
        &self.values[h * n..(h + 1) * n]
    }

    /// The mean over heads.
    pub fn mean(&self) -> Vec<f32> {
        let n = self.grid_h * self.grid_w;
        (0..n).map(|i| (0..self.heads).map(|h| self.values[h * n + i]).sum::<f32>() / self.heads as f32).collect()
    }
}

/// The last block's cls attention of one image (normalised CHW pixels, `height` x `width`, both
/// multiples of the patch size).
pub fn cls_attention(vit: &VisionTransformer, chw: Vec<f32>, height: usize, width: usize, device: &Device) -> AttentionMaps {
    let p = vit.patch_size();
    let (grid_h, grid_w) = (height / p, width / p);
    let x = Tensor::<4>::from_data(TensorData::new(chw, [1, 3, height, width]), device);
    let attn = vit.last_self_attention(x);
    let [_, heads, tokens, _] = attn.dims();
    let cls_row = attn.slice_dim(2, 0..1).slice_dim(3, 1..tokens).reshape([heads * (tokens - 1)]);
    AttentionMaps { heads, grid_h, grid_w, values: HostTensor::from_tensor(cls_row).values }
}

/// The patches that hold a `threshold` share of the attention: the largest values, taken in
/// decreasing order until what is left out holds at most 1 - threshold of the mass.
pub fn mass_mask(attention: &[f32], threshold: f64) -> Vec<bool> {
    let total: f64 = attention.iter().map(|&a| a as f64).sum();
    let mut order: Vec<usize> = (0..attention.len()).collect();
    order.sort_by(|&a, &b| attention[a].total_cmp(&attention[b]));
    let mut keep = vec![false; attention.len()];
    let mut cumulative = 0.0;
    for i in order {
        cumulative += attention[i] as f64 / total;
        keep[i] = cumulative > 1.0 - threshold;
    }
    keep
}

/// Anchors of matplotlib's viridis colour map at 0, 1/8, ..., 1.
const VIRIDIS: [[f32; 3]; 9] = [
    [68.0, 1.0, 84.0],
    [71.0, 44.0, 122.0],
    [59.0, 81.0, 139.0],
    [44.0, 113.0, 142.0],
    [33.0, 144.0, 141.0],
    [39.0, 173.0, 129.0],
    [92.0, 200.0, 99.0],
    [170.0, 220.0, 50.0],
    [253.0, 231.0, 37.0],
];

/// The viridis colour of t in [0, 1].
pub fn viridis(t: f32) -> Rgb<u8> {
    let x = t.clamp(0.0, 1.0) * 8.0;
    let i = (x.floor() as usize).min(7);
    let f = x - i as f32;
    Rgb(std::array::from_fn(|c| (VIRIDIS[i][c] + f * (VIRIDIS[i + 1][c] - VIRIDIS[i][c])).round() as u8))
}

/// A grid of values drawn with viridis (min to max), each cell a `scale` x `scale` square
/// (nearest upsampling by the patch size).
pub fn heatmap(values: &[f32], grid_w: usize, grid_h: usize, scale: usize) -> RgbImage {
    let (lo, hi) = values.iter().fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let span = if hi > lo { hi - lo } else { 1.0 };
    RgbImage::from_fn((grid_w * scale) as u32, (grid_h * scale) as u32, |x, y| {
        let v = values[(y as usize / scale) * grid_w + x as usize / scale];
        viridis((v - lo) / span)
    })
}

/// A black and white mask, upsampled as `heatmap`.
pub fn mask_image(mask: &[bool], grid_w: usize, grid_h: usize, scale: usize) -> RgbImage {
    RgbImage::from_fn((grid_w * scale) as u32, (grid_h * scale) as u32, |x, y| {
        if mask[(y as usize / scale) * grid_w + x as usize / scale] { Rgb([255; 3]) } else { Rgb([0; 3]) }
    })
}

/// `top` blended over `base` with weight `alpha`.
pub fn blend(base: &RgbImage, top: &RgbImage, alpha: f32) -> RgbImage {
    RgbImage::from_fn(base.width(), base.height(), |x, y| {
        let (b, t) = (base.get_pixel(x, y), top.get_pixel(x, y));
        Rgb(std::array::from_fn(|c| ((1.0 - alpha) * b[c] as f32 + alpha * t[c] as f32).round() as u8))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mass_mask_keeps_the_smallest_top_set_holding_the_share() {
        let attention = [0.1, 0.4, 0.2, 0.3];
        // Sorted: 0.1 0.2 0.3 0.4, cumulative 0.1 0.3 0.6 1.0.
        assert_eq!(mass_mask(&attention, 0.5), vec![false, true, false, true]);
        assert_eq!(mass_mask(&attention, 0.35), vec![false, true, false, false]);
        assert_eq!(mass_mask(&attention, 0.95), vec![true, true, true, true]);
        // Unnormalised input (the cls token's own share is not among the patches) is rescaled.
        assert_eq!(mass_mask(&[1.0, 4.0, 2.0, 3.0], 0.5), vec![false, true, false, true]);
    }

    #[test]
    fn viridis_ends_and_middle() {
        assert_eq!(viridis(0.0), Rgb([68, 1, 84]));
        assert_eq!(viridis(1.0), Rgb([253, 231, 37]));
        assert_eq!(viridis(0.5), Rgb([33, 144, 141]));
        assert_eq!(viridis(1.0 / 16.0), Rgb([70, 23, 103]));
    }

    #[test]
    fn heatmap_upsamples_by_nearest() {
        let img = heatmap(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], 3, 2, 2);
        assert_eq!(img.dimensions(), (6, 4));
        assert_eq!(*img.get_pixel(0, 0), viridis(0.0));
        assert_eq!(*img.get_pixel(1, 1), viridis(0.0));
        assert_eq!(*img.get_pixel(5, 3), viridis(1.0));
        assert_eq!(*img.get_pixel(2, 2), viridis(0.8));
    }
}
