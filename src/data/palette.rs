//! Indexed-colour (palette) PNG masks, the way DAVIS stores segmentations: each pixel holds an
//! object index (0 background), the palette only says how to draw it.

use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use anyhow::{Context, Result, bail};

/// A label per pixel, row-major, with the palette to draw it (RGB triples).
#[derive(Debug, Clone, PartialEq)]
pub struct LabelMap {
    pub width: usize,
    pub height: usize,
    pub labels: Vec<u8>,
    pub palette: Vec<u8>,
}

/// The DAVIS palette's first colours: black background, then red, green, yellow, blue, ...
/// (the PASCAL VOC colour map); used when a mask has none.
pub fn default_palette() -> Vec<u8> {
    (0..256u32)
        .flat_map(|i| {
            let (mut r, mut g, mut b) = (0u8, 0u8, 0u8);
            let mut c = i;
            for bit in 0..8 {
                r |= ((c & 1) as u8) << (7 - bit);
                g |= (((c >> 1) & 1) as u8) << (7 - bit);
                b |= (((c >> 2) & 1) as u8) << (7 - bit);
                c >>= 3;
            }
            [r, g, b]
        })
        .collect()
}

impl LabelMap {
    /// Reads a mask: an indexed PNG gives its indices; a gray PNG gives its values as labels.
    pub fn read(path: &Path) -> Result<Self> {
        let file = File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut decoder = png::Decoder::new(BufReader::new(file));
        decoder.set_transformations(png::Transformations::IDENTITY);
        let mut reader = decoder.read_info().with_context(|| format!("{}: not a PNG", path.display()))?;
        let info = reader.info();
        let (width, height) = (info.width as usize, info.height as usize);
        let (color, depth) = (info.color_type, info.bit_depth);
        let palette = info.palette.as_ref().map(|p| p.to_vec());
        let mut buf = vec![0; reader.output_buffer_size().context("image too large")?];
        let frame = reader.next_frame(&mut buf).with_context(|| format!("{}: unreadable PNG data", path.display()))?;
        if !matches!(color, png::ColorType::Indexed | png::ColorType::Grayscale) {
            bail!("{}: a mask must be an indexed-palette or gray PNG, this one is {color:?}", path.display());
        }
        let bits = depth as usize;
        if bits > 8 {
            bail!("{}: 16-bit masks are not supported", path.display());
        }
        let per_byte = 8 / bits;
        let mut labels = Vec::with_capacity(width * height);
        for row in buf[..frame.buffer_size()].chunks(frame.line_size).take(height) {
            labels.extend((0..width).map(|x| {
                let byte = row[x / per_byte];
                let shift = 8 - bits * (x % per_byte + 1);
                (byte >> shift) & ((1u16 << bits) - 1) as u8
            }));
        }
        Ok(Self { width, height, labels, palette: palette.unwrap_or_else(default_palette) })
    }

    /// Writes an 8-bit indexed PNG with this map's palette.
    pub fn write(&self, path: &Path) -> Result<()> {
        let file = File::create(path).with_context(|| format!("{}: cannot write", path.display()))?;
        let mut encoder = png::Encoder::new(BufWriter::new(file), self.width as u32, self.height as u32);
        encoder.set_color(png::ColorType::Indexed);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_palette(self.palette.clone());
        let mut writer = encoder.write_header()?;
        writer.write_image_data(&self.labels)?;
        writer.finish()?;
        Ok(())
    }

    /// Nearest-neighbour resize, sampling source pixel floor((x + 0.5) * in / out) as PIL does.
    pub fn resize_nearest(&self, width: usize, height: usize) -> Self {
        let src = |out: usize, size_in: usize, size_out: usize| (((out as f64 + 0.5) * size_in as f64 / size_out as f64) as usize).min(size_in - 1);
        let labels = (0..height)
            .flat_map(|y| (0..width).map(move |x| (x, y)))
            .map(|(x, y)| self.labels[src(y, self.height, height) * self.width + src(x, self.width, width)])
            .collect();
        Self { width, height, labels, palette: self.palette.clone() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_then_read_keeps_indices_and_palette() {
        let dir = std::env::temp_dir().join(format!("dino-palette-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.png");
        let map = LabelMap { width: 3, height: 2, labels: vec![0, 1, 2, 2, 1, 0], palette: default_palette() };
        map.write(&path).unwrap();
        assert_eq!(LabelMap::read(&path).unwrap(), map);
        // The image crate sees the palette colours: label 1 is DAVIS red, 2 green.
        let rgb = image::open(&path).unwrap().to_rgb8();
        assert_eq!(rgb.get_pixel(1, 0).0, [128, 0, 0]);
        assert_eq!(rgb.get_pixel(2, 0).0, [0, 128, 0]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn nearest_resize_matches_pil_sampling() {
        let map = LabelMap { width: 4, height: 1, labels: vec![1, 2, 3, 4], palette: vec![] };
        assert_eq!(map.resize_nearest(2, 1).labels, vec![2, 4]);
        assert_eq!(map.resize_nearest(8, 2).labels, vec![1, 1, 2, 2, 3, 3, 4, 4, 1, 1, 2, 2, 3, 3, 4, 4]);
    }
}
