//! Image sources: a folder of images in torchvision's ImageFolder layout (class subfolders give
//! labels; a flat folder is unlabeled), or MNIST-format IDX files. Images come out as 8-bit RGB;
//! a file that cannot be read is an error for that index only, so callers can skip it.

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use image::RgbImage;

/// Largest image (in pixels) we decode; bigger files are skipped rather than exhausting memory.
const MAX_PIXELS: u64 = 100_000_000;

const IMAGE_EXTENSIONS: &[&str] = &["jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "pgm", "ppm", "pnm", "pbm", "gif"];

/// Seed of the evaluation commands' and the online k-NN's subsets: fixed, so that runs and
/// checkpoints are compared on the same images.
pub const SUBSET_SEED: u64 = 0;

/// Which IDX files of a directory to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdxSplit {
    /// `train-images-idx3-ubyte[.gz]` and `train-labels-idx1-ubyte[.gz]`.
    Train,
    /// `t10k-images-idx3-ubyte[.gz]` and `t10k-labels-idx1-ubyte[.gz]`.
    Test,
}

#[derive(Debug)]
pub enum Dataset {
    Folder { files: Vec<PathBuf>, labels: Vec<Option<usize>>, classes: Vec<String> },
    /// `records` are the images' record numbers in the files (they differ from the indices
    /// after `keep_subset`).
    Idx { pixels: Vec<u8>, rows: usize, cols: usize, labels: Vec<usize>, records: Vec<usize> },
}

impl Dataset {
    /// Whether `dir` holds the IDX image file of `split`.
    pub fn holds_idx(dir: &Path, split: IdxSplit) -> bool {
        find_idx(dir, split, "images").is_some()
    }

    /// Opens `path`: a directory holding IDX files (the split picks train or t10k), or any
    /// other directory, read as an image folder.
    pub fn open(path: &Path, split: IdxSplit) -> Result<Self> {
        if !path.is_dir() {
            bail!("{}: not a directory", path.display());
        }
        if find_idx(path, split, "images").is_some() {
            return Self::open_idx(path, split);
        }
        Self::open_folder(path)
    }

    pub fn open_folder(root: &Path) -> Result<Self> {
        let mut classes: Vec<String> = fs::read_dir(root)
            .with_context(|| format!("{}: cannot list", root.display()))?
            .filter_map(|e| e.ok())
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        classes.sort();
        let mut files = Vec::new();
        let mut labels = Vec::new();
        for f in image_files(root, false)? {
            files.push(f);
            labels.push(None);
        }
        for (label, class) in classes.iter().enumerate() {
            for f in image_files(&root.join(class), true)? {
                files.push(f);
                labels.push(Some(label));
            }
        }
        if files.is_empty() {
            bail!("{}: no image files (looked for {})", root.display(), IMAGE_EXTENSIONS.join(", "));
        }
        Ok(Self::Folder { files, labels, classes })
    }

    pub fn open_idx(dir: &Path, split: IdxSplit) -> Result<Self> {
        let images = find_idx(dir, split, "images").with_context(|| format!("{}: no IDX image file", dir.display()))?;
        let bytes = read_maybe_gz(&images)?;
        let (dims, data) = parse_idx(&bytes, 3).with_context(|| format!("{}: not an IDX image file", images.display()))?;
        let (n, rows, cols) = (dims[0], dims[1], dims[2]);
        let labels: Vec<usize> = match find_idx(dir, split, "labels") {
            Some(path) => {
                let bytes = read_maybe_gz(&path)?;
                let (ldims, ldata) = parse_idx(&bytes, 1).with_context(|| format!("{}: not an IDX label file", path.display()))?;
                if ldims[0] != n {
                    bail!("{}: {} labels for {} images", path.display(), ldims[0], n);
                }
                ldata.iter().map(|&l| l as usize).collect()
            }
            None => bail!("{}: no IDX label file next to {}", dir.display(), images.display()),
        };
        let records = (0..labels.len()).collect();
        Ok(Self::Idx { pixels: data.to_vec(), rows, cols, labels, records })
    }

    /// Keeps `n` images (all when `n` is 0 or at least the size), drawn per class in proportion
    /// to the class sizes (stratified; unlabelled images form one group), seeded by `seed`;
    /// the kept images stay in their original order.
    pub fn keep_subset(&mut self, n: usize, seed: u64) {
        if n == 0 || n >= self.len() {
            return;
        }
        let labels: Vec<Option<usize>> = (0..self.len()).map(|i| self.label(i)).collect();
        let keep = stratified_subset(&labels, n, seed);
        match self {
            Self::Folder { files, labels, .. } => {
                *files = keep.iter().map(|&i| files[i].clone()).collect();
                *labels = keep.iter().map(|&i| labels[i]).collect();
            }
            Self::Idx { pixels, rows, cols, labels, records } => {
                let size = *rows * *cols;
                *pixels = keep.iter().flat_map(|&i| pixels[i * size..(i + 1) * size].iter().copied()).collect();
                *labels = keep.iter().map(|&i| labels[i]).collect();
                *records = keep.iter().map(|&i| records[i]).collect();
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Folder { files, .. } => files.len(),
            Self::Idx { labels, .. } => labels.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn label(&self, index: usize) -> Option<usize> {
        match self {
            Self::Folder { labels, .. } => labels[index],
            Self::Idx { labels, .. } => Some(labels[index]),
        }
    }

    /// Number of classes when the data is labelled.
    pub fn num_classes(&self) -> Option<usize> {
        match self {
            Self::Folder { classes, .. } if !classes.is_empty() => Some(classes.len()),
            Self::Folder { .. } => None,
            Self::Idx { labels, .. } => labels.iter().max().map(|m| m + 1),
        }
    }

    /// A name for an index in messages: the file path, or the IDX record number.
    pub fn describe(&self, index: usize) -> String {
        match self {
            Self::Folder { files, .. } => files[index].display().to_string(),
            Self::Idx { records, .. } => format!("IDX record {}", records[index]),
        }
    }

    /// Decodes image `index` as RGB (gray is repeated over the three channels).
    pub fn load(&self, index: usize) -> Result<RgbImage> {
        match self {
            Self::Folder { files, .. } => decode_file(&files[index]),
            Self::Idx { pixels, rows, cols, .. } => {
                let plane = &pixels[index * rows * cols..(index + 1) * rows * cols];
                let rgb = plane.iter().flat_map(|&p| [p, p, p]).collect();
                Ok(RgbImage::from_raw(*cols as u32, *rows as u32, rgb).expect("buffer size"))
            }
        }
    }
}

/// Decodes one image file as RGB, whatever its extension says (the content decides), refusing
/// headers over the pixel limit before decoding.
pub fn decode_file(path: &Path) -> Result<RgbImage> {
    let (w, h) = image_size(path)?;
    if w == 0 || h == 0 {
        bail!("empty image ({w}x{h})");
    }
    if w as u64 * h as u64 > MAX_PIXELS {
        bail!("{w}x{h} pixels is over the {MAX_PIXELS}-pixel limit");
    }
    let mut reader = image::ImageReader::open(path)?.with_guessed_format()?;
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(MAX_PIXELS * 8);
    reader.limits(limits);
    Ok(reader.decode()?.to_rgb8())
}

/// Width and height of an image file from its header, whatever its extension says.
pub fn image_size(path: &Path) -> Result<(u32, u32)> {
    let reader = image::ImageReader::open(path)?.with_guessed_format()?;
    reader.into_dimensions().context("unreadable image header")
}

/// The image files under `dir` (by extension), sorted by path.
pub fn image_files(dir: &Path, recursive: bool) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let entries = fs::read_dir(&d).with_context(|| format!("{}: cannot list", d.display()))?;
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                if recursive {
                    stack.push(path);
                }
            } else if path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
            {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn find_idx(dir: &Path, split: IdxSplit, kind: &str) -> Option<PathBuf> {
    let prefix = match split {
        IdxSplit::Train => "train",
        IdxSplit::Test => "t10k",
    };
    let rank = if kind == "images" { 3 } else { 1 };
    let name = format!("{prefix}-{kind}-idx{rank}-ubyte");
    [name.clone(), format!("{name}.gz"), format!("{prefix}-{kind}.idx{rank}-ubyte")]
        .into_iter()
        .map(|n| dir.join(n))
        .find(|p| p.is_file())
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let raw = fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&raw[..])
            .read_to_end(&mut out)
            .with_context(|| format!("{}: broken gzip stream", path.display()))?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

/// Parses an unsigned-byte IDX file of the given rank: magic 0x00 0x00 0x08 rank, then
/// big-endian u32 dimensions, then the data.
fn parse_idx(bytes: &[u8], rank: usize) -> Result<(Vec<usize>, &[u8])> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 || bytes[2] != 0x08 || bytes[3] as usize != rank {
        bail!("bad magic number (want unsigned bytes of rank {rank})");
    }
    let header = 4 + 4 * rank;
    if bytes.len() < header {
        bail!("truncated header");
    }
    let dims: Vec<usize> =
        (0..rank).map(|i| u32::from_be_bytes(bytes[4 + 4 * i..8 + 4 * i].try_into().unwrap()) as usize).collect();
    let count: usize = dims.iter().product();
    if bytes.len() < header + count {
        bail!("truncated: {} data bytes, header says {count}", bytes.len() - header);
    }
    Ok((dims, &bytes[header..header + count]))
}

/// `n` indices of `labels`, ascending, with each label's share of `n` proportional to its share
/// of the whole (largest remainders get the leftover places), each group drawn by a seeded
/// shuffle.
pub fn stratified_subset(labels: &[Option<usize>], n: usize, seed: u64) -> Vec<usize> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    let mut groups: std::collections::BTreeMap<Option<usize>, Vec<usize>> = std::collections::BTreeMap::new();
    for (i, &label) in labels.iter().enumerate() {
        groups.entry(label).or_default().push(i);
    }
    let total = labels.len();
    let n = n.min(total);
    // Whole places first, then one more to the groups with the largest remainders.
    let mut quotas: Vec<(usize, usize)> = groups.values().map(|g| (g.len() * n / total, g.len() * n % total)).collect();
    let left = n - quotas.iter().map(|q| q.0).sum::<usize>();
    let mut by_remainder: Vec<usize> = (0..quotas.len()).collect();
    by_remainder.sort_by_key(|&g| std::cmp::Reverse(quotas[g].1));
    for &g in &by_remainder[..left] {
        quotas[g].0 += 1;
    }
    let mut keep = Vec::with_capacity(n);
    for (g, (label, mut members)) in groups.into_iter().enumerate() {
        let group_seed = crate::data::loader::mix_seed(seed, label.map_or(u64::MAX, |l| l as u64), 0x5B);
        members.shuffle(&mut rand::rngs::StdRng::seed_from_u64(group_seed));
        keep.extend_from_slice(&members[..quotas[g].0]);
    }
    keep.sort_unstable();
    keep
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn idx_header_is_checked() {
        let mut file = vec![0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 2];
        file.extend([1, 2, 3, 4]);
        let (dims, data) = parse_idx(&file, 3).unwrap();
        assert_eq!(dims, vec![2, 1, 2]);
        assert_eq!(data, &[1, 2, 3, 4]);
        assert!(parse_idx(&file[..18], 3).is_err());
        assert!(parse_idx(&file, 1).is_err());
    }

    #[test]
    fn subsets_keep_every_class_in_proportion() {
        // Sorted labels (a class-folder listing): 60 of class 0, 30 of class 1, 10 of class 2.
        let labels: Vec<Option<usize>> = [(0, 60), (1, 30), (2, 10)].iter().flat_map(|&(c, k)| vec![Some(c); k]).collect();
        let keep = stratified_subset(&labels, 10, 7);
        let count = |c| keep.iter().filter(|&&i| labels[i] == Some(c)).count();
        assert_eq!((count(0), count(1), count(2)), (6, 3, 1));
        assert!(keep.windows(2).all(|w| w[0] < w[1]), "ascending, no repeats");
        assert_eq!(keep, stratified_subset(&labels, 10, 7), "seeded");
        assert_ne!(keep, stratified_subset(&labels, 10, 8));
        // 7 of 100: quotas 4.2, 2.1, 0.7 -> 4, 2 and the largest remainder (class 2) gets the 7th.
        let keep = stratified_subset(&labels, 7, 0);
        assert_eq!((keep.iter().filter(|&&i| labels[i] == Some(0)).count(), keep.iter().filter(|&&i| labels[i] == Some(2)).count()), (4, 1));
        assert_eq!(keep.len(), 7);
        // Unlabelled images are drawn as one group.
        assert_eq!(stratified_subset(&[None; 20], 5, 1).len(), 5);
    }

    #[test]
    fn idx_subset_moves_pixels_with_labels() {
        let labels: Vec<usize> = (0..40).map(|i| i % 4).collect();
        let pixels: Vec<u8> = (0..40).flat_map(|i| [i as u8, 100 + i as u8]).collect();
        let mut d = Dataset::Idx { pixels, rows: 1, cols: 2, labels, records: (0..40).collect() };
        d.keep_subset(8, 3);
        assert_eq!(d.len(), 8);
        let Dataset::Idx { pixels, labels, .. } = &d else { unreachable!() };
        for (k, &label) in labels.iter().enumerate() {
            let original = pixels[2 * k] as usize;
            assert_eq!((original % 4, pixels[2 * k + 1] as usize), (label, 100 + original));
            assert_eq!(d.describe(k), format!("IDX record {original}"), "messages name the record in the file");
        }
        let mut per_class = [0; 4];
        labels.iter().for_each(|&l| per_class[l] += 1);
        assert_eq!(per_class, [2; 4]);
    }
}
