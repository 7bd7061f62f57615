//! PyTorch `.pth` files (the zip format `torch.save` writes since PyTorch 1.6): a pickle
//! program (`data.pkl`) that describes nested dicts, lists and tensors, whose bytes live in
//! the archive's `data/<key>` entries. `pickle.rs` runs the program; this module reads the
//! archive and turns tensors of any float or integer type into f32 host tensors.

mod pickle;

use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result, bail};

pub use pickle::{Value, integers, list_items, read_pickle};
use pickle::Machine;
use crate::weights::HostTensor;

/// Element types of tensor storages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Dtype {
    F64,
    F32,
    F16,
    BF16,
    I64,
    I32,
    I16,
    I8,
    U8,
    Bool,
}

impl Dtype {
    fn from_storage(name: &str) -> Option<Self> {
        Some(match name {
            "DoubleStorage" => Self::F64,
            "FloatStorage" => Self::F32,
            "HalfStorage" => Self::F16,
            "BFloat16Storage" => Self::BF16,
            "LongStorage" => Self::I64,
            "IntStorage" => Self::I32,
            "ShortStorage" => Self::I16,
            "CharStorage" => Self::I8,
            "ByteStorage" => Self::U8,
            "BoolStorage" => Self::Bool,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        match self {
            Self::F64 | Self::I64 => 8,
            Self::F32 | Self::I32 => 4,
            Self::F16 | Self::BF16 | Self::I16 => 2,
            Self::I8 | Self::U8 | Self::Bool => 1,
        }
    }

    fn read(self, b: &[u8]) -> f32 {
        match self {
            Self::F64 => f64::from_le_bytes(b.try_into().unwrap()) as f32,
            Self::F32 => f32::from_le_bytes(b.try_into().unwrap()),
            Self::F16 => f16_to_f32(u16::from_le_bytes(b.try_into().unwrap())),
            Self::BF16 => f32::from_bits((u16::from_le_bytes(b.try_into().unwrap()) as u32) << 16),
            Self::I64 => i64::from_le_bytes(b.try_into().unwrap()) as f32,
            Self::I32 => i32::from_le_bytes(b.try_into().unwrap()) as f32,
            Self::I16 => i16::from_le_bytes(b.try_into().unwrap()) as f32,
            Self::I8 => b[0] as i8 as f32,
            Self::U8 | Self::Bool => b[0] as f32,
        }
    }
}

fn f16_to_f32(h: u16) -> f32 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = ((h >> 10) & 0x1f) as i32;
    let frac = (h & 0x3ff) as f32;
    sign * match exp {
        0 => frac * 2f32.powi(-24),
        31 if frac == 0.0 => f32::INFINITY,
        31 => f32::NAN,
        e => (1.0 + frac / 1024.0) * 2f32.powi(e - 15),
    }
}

/// A tensor's view of a storage.
#[derive(Debug, Clone)]
pub struct TensorRef {
    pub storage: String,
    pub dtype: Dtype,
    pub offset: usize,
    pub shape: Vec<usize>,
    pub stride: Vec<usize>,
}

/// An opened .pth archive: its object graph and the storages' bytes.
pub struct PthFile {
    pub root: Value,
    storages: HashMap<String, Vec<u8>>,
}

impl PthFile {
    pub fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).with_context(|| format!("{}: cannot open", path.display()))?;
        let mut archive = zip::ZipArchive::new(std::io::BufReader::new(file)).map_err(|_| {
            anyhow::anyhow!("{}: not a PyTorch zip checkpoint (files from PyTorch before 1.6 must be re-saved with a newer torch.save)", path.display())
        })?;
        let mut storages = HashMap::new();
        let mut pickle = None;
        for i in 0..archive.len() {
            let mut entry = archive.by_index(i)?;
            let name = entry.name().to_string();
            let mut bytes = Vec::with_capacity(entry.size() as usize);
            if name.ends_with("/data.pkl") {
                entry.read_to_end(&mut bytes)?;
                pickle = Some(bytes);
            } else if let Some((_, key)) = name.rsplit_once("/data/") {
                entry.read_to_end(&mut bytes)?;
                storages.insert(key.to_string(), bytes);
            }
        }
        let pickle = pickle.with_context(|| format!("{}: zip archive without data.pkl (not a torch.save file)", path.display()))?;
        let root = Machine::default().run(&pickle).with_context(|| format!("{}: unreadable pickle", path.display()))?;
        Ok(Self { root, storages })
    }

    /// The tensor's values in row-major order.
    pub fn tensor(&self, t: &TensorRef) -> Result<HostTensor> {
        let bytes = self.storages.get(&t.storage).with_context(|| format!("storage {} missing from the archive", t.storage))?;
        let size = t.dtype.size();
        let count: usize = t.shape.iter().product();
        let mut values = Vec::with_capacity(count);
        let mut index = vec![0usize; t.shape.len()];
        for _ in 0..count {
            let at = t.offset + index.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            let b = bytes.get(at * size..(at + 1) * size).with_context(|| format!("storage {} is shorter than its tensor", t.storage))?;
            values.push(t.dtype.read(b));
            for d in (0..index.len()).rev() {
                index[d] += 1;
                if index[d] < t.shape[d] {
                    break;
                }
                index[d] = 0;
            }
        }
        Ok(HostTensor { shape: t.shape.clone(), values })
    }

    /// Every tensor of a dict of tensors (a state dict), by key. Entries that are not tensors
    /// are left out.
    pub fn state_dict(&self, value: &Value) -> Result<HashMap<String, HostTensor>> {
        let Value::Dict(items) = value else { bail!("expected a state dict, found {}", value.kind()) };
        let mut out = HashMap::new();
        for (k, v) in items {
            if let (Value::Str(k), Value::Tensor(t)) = (k, v) {
                out.insert(k.clone(), self.tensor(t)?);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_precision_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x3555), 0.33325195);
        assert_eq!(f16_to_f32(0x0001), 2f32.powi(-24));
    }

    #[test]
    fn strided_views_are_read_in_row_major_order() {
        let storage: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        let file = PthFile { root: Value::None, storages: HashMap::from([("0".to_string(), storage)]) };
        // A transposed 2x3 view: shape [3, 2], strides [1, 3].
        let t = TensorRef { storage: "0".into(), dtype: Dtype::F32, offset: 0, shape: vec![3, 2], stride: vec![1, 3] };
        assert_eq!(file.tensor(&t).unwrap().values, vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
        let t = TensorRef { storage: "0".into(), dtype: Dtype::F32, offset: 4, shape: vec![2], stride: vec![1] };
        assert_eq!(file.tensor(&t).unwrap().values, vec![4.0, 5.0]);
        let t = TensorRef { storage: "0".into(), dtype: Dtype::F32, offset: 5, shape: vec![2], stride: vec![1] };
        assert!(file.tensor(&t).is_err());
    }
}
