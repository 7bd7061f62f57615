//! NumPy `.npy` files (format version 1.0): what `dino extract` and `--save_raw` write, and what
//! `dino knn` reads back. Only little-endian, C-order arrays of f32/f64/i32/i64/u8 are read;
//! float32 and int64 are written, as `np.load` gives them to a Python user.

use std::path::Path;

use anyhow::{Context, Result, bail};

const MAGIC: &[u8] = b"\x93NUMPY";

fn write(path: &Path, descr: &str, shape: &[usize], payload: &[u8]) -> Result<()> {
    let dims: Vec<String> = shape.iter().map(|d| d.to_string()).collect();
    let shape = if dims.len() == 1 { format!("({},)", dims[0]) } else { format!("({})", dims.join(", ")) };
    let mut header = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {shape}, }}");
    // magic (6) + version (2) + length (2) + header + '\n' is padded to a multiple of 64 bytes.
    let unpadded = MAGIC.len() + 4 + header.len() + 1;
    header.push_str(&" ".repeat(unpadded.next_multiple_of(64) - unpadded));
    header.push('\n');
    let mut bytes = Vec::with_capacity(MAGIC.len() + 4 + header.len() + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&[1, 0]);
    bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(payload);
    std::fs::write(path, bytes).with_context(|| format!("{}: cannot write", path.display()))
}

/// Writes a float32 array of the given shape.
pub fn write_f32(path: &Path, values: &[f32], shape: &[usize]) -> Result<()> {
    assert_eq!(values.len(), shape.iter().product::<usize>(), "shape does not match the values");
    let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, "<f4", shape, &payload)
}

/// Writes a one-dimensional int64 array.
pub fn write_i64(path: &Path, values: &[i64]) -> Result<()> {
    let payload: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    write(path, "<i8", &[values.len()], &payload)
}

/// An array read from a file, converted to f64 (exact for every type read here except i64
/// beyond 2^53, which labels and features never reach).
pub struct Array {
    pub shape: Vec<usize>,
    pub values: Vec<f64>,
}

/// Reads a `.npy` file.
pub fn read(path: &Path) -> Result<Array> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    parse(&bytes).with_context(|| format!("{}: not a readable .npy file", path.display()))
}

fn parse(bytes: &[u8]) -> Result<Array> {
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        bail!("missing the NumPy magic bytes");
    }
    let (header_len, header_start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 if bytes.len() >= 12 => (u32::from_le_bytes(bytes[8..12].try_into().unwrap()) as usize, 12),
        v => bail!("unsupported format version {v}"),
    };
    let header = bytes.get(header_start..header_start + header_len).context("truncated header")?;
    let header = std::str::from_utf8(header).context("header is not text")?;
    let field = |name: &str| -> Result<&str> {
        let at = header.find(&format!("'{name}'")).with_context(|| format!("header has no '{name}'"))?;
        let rest = header[at + name.len() + 2..].trim_start();
        Ok(rest.strip_prefix(':').context("malformed header")?.trim_start())
    };
    if field("fortran_order")?.starts_with("True") {
        bail!("Fortran-order arrays are not supported");
    }
    let descr = field("descr")?;
    let descr = descr.strip_prefix('\'').and_then(|d| d.split('\'').next()).context("malformed descr")?;
    let shape_text = field("shape")?;
    let shape_text = shape_text.strip_prefix('(').and_then(|s| s.split(')').next()).context("malformed shape")?;
    let shape: Vec<usize> = shape_text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().with_context(|| format!("bad dimension '{s}'")))
        .collect::<Result<_>>()?;
    let count: usize = shape.iter().product();
    let data = &bytes[header_start + header_len..];
    let (width, convert): (usize, fn(&[u8]) -> f64) = match descr {
        "<f4" => (4, |b| f32::from_le_bytes(b.try_into().unwrap()) as f64),
        "<f8" => (8, |b| f64::from_le_bytes(b.try_into().unwrap())),
        "<i4" => (4, |b| i32::from_le_bytes(b.try_into().unwrap()) as f64),
        "<i8" => (8, |b| i64::from_le_bytes(b.try_into().unwrap()) as f64),
        "|u1" => (1, |b| b[0] as f64),
        other => bail!("unsupported dtype '{other}' (float32/64, int32/64, uint8 are read)"),
    };
    if data.len() != count * width {
        bail!("{} data bytes for shape {shape:?} of '{descr}' (expected {})", data.len(), count * width);
    }
    Ok(Array { shape, values: data.chunks_exact(width).map(convert).collect() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_header_layout() {
        let dir = std::env::temp_dir().join(format!("dino-npy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("a.npy");
        write_f32(&path, &[1.0, -2.5, 3.25, 0.0, 5.0, 6.0], &[2, 3]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let header_len = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + header_len) % 64, 0);
        assert_eq!(bytes[10 + header_len - 1], b'\n');
        assert!(std::str::from_utf8(&bytes[10..10 + header_len]).unwrap().contains("'shape': (2, 3)"));
        let a = read(&path).unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.values, vec![1.0, -2.5, 3.25, 0.0, 5.0, 6.0]);

        write_i64(&path, &[7, -1, 3]).unwrap();
        let a = read(&path).unwrap();
        assert_eq!((a.shape, a.values), (vec![3], vec![7.0, -1.0, 3.0]));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_what_it_cannot_read() {
        assert!(parse(b"not numpy at all").is_err());
        let mut bytes = MAGIC.to_vec();
        let header = "{'descr': '<f4', 'fortran_order': False, 'shape': (4,), }\n";
        bytes.extend_from_slice(&[1, 0]);
        bytes.extend_from_slice(&(header.len() as u16).to_le_bytes());
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend_from_slice(&[0; 12]);
        let err = parse(&bytes).err().unwrap().to_string();
        assert!(err.contains("12 data bytes"), "{err}");
    }
}
