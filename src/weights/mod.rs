//! The bottom layer: tensors on the host and the files they live in — safetensors (ours and
//! anyone's), PyTorch `.pth` (`pth`), NumPy `.npy` (`npy`) — and named tensors in and out of
//! our modules under the official DINO key names (`blocks.0.attn.qkv.weight`,
//! `head.mlp.2.bias`, `head.last_layer.weight_v`, ...), with PyTorch's layouts: Linear weights
//! are [out, in] there and [in, out] in burn. Models, training and evaluation build on it;
//! it knows none of them.

pub mod npy;
pub mod pth;

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::tensor::{Tensor, TensorData};

/// A host-side f32 tensor.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl HostTensor {
    /// A tensor's values on the host as f32 (the tensor's own buffer where its backend hands
    /// it over whole, as burn's CPU backend does for a tensor nothing else holds; a copy
    /// otherwise).
    pub fn from_tensor<const D: usize>(t: Tensor<D>) -> Self {
        let data = t.into_data();
        Self { shape: data.shape().to_vec(), values: data.try_into_vec_as::<f32>().expect("float tensor") }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum WeightsError {
    #[error("missing key '{0}'")]
    Missing(String),
    #[error("key '{key}': shape {found:?} where the model expects {expected:?}")]
    Shape { key: String, found: Vec<usize>, expected: Vec<usize> },
    #[error("unexpected key '{0}' (not a parameter of this model)")]
    Unexpected(String),
}

/// How module paths become official names: the head's MLP is a PyTorch Sequential whose
/// Linear layers sit at indices 0, 2, 4 (GELU between) or 0, 3, 6 (with BatchNorm), and a
/// single-layer head is a bare Linear.
struct Naming {
    head_stride: usize,
    single_layer_head: bool,
}

impl Naming {
    fn of(paths: &[String]) -> Self {
        let has_bn = paths.iter().any(|p| p.starts_with("bn.") || p.contains("head.bn."));
        let mlp_layers = paths
            .iter()
            .filter_map(|p| {
                let rest = p.strip_prefix("head.").unwrap_or(p);
                rest.strip_prefix("mlp.")?.split('.').next()?.parse::<usize>().ok()
            })
            .max();
        Self { head_stride: if has_bn { 3 } else { 2 }, single_layer_head: mlp_layers == Some(0) }
    }

    fn official(&self, path: &str) -> String {
        let parts: Vec<&str> = path.split('.').collect();
        let mut out: Vec<String> = Vec::with_capacity(parts.len() + 1);
        let mut i = 0;
        while i < parts.len() {
            let part = parts[i];
            let next = parts.get(i + 1).copied();
            match (part, next.and_then(|n| n.parse::<usize>().ok())) {
                ("patch_embed", _) => {
                    out.push("patch_embed.proj".into());
                }
                ("mlp", Some(index)) => {
                    if !self.single_layer_head {
                        out.push(format!("mlp.{}", index * self.head_stride));
                    } else {
                        out.push("mlp".into());
                    }
                    i += 1;
                }
                ("bn", Some(index)) => {
                    out.push(format!("mlp.{}", index * self.head_stride + 1));
                    i += 1;
                }
                ("gamma", _) => out.push("weight".into()),
                ("beta", _) => out.push("bias".into()),
                _ => out.push(part.into()),
            }
            i += 1;
        }
        out.join(".")
    }
}

/// Burn Linear weights are stored transposed relative to PyTorch; the weight-norm layer
/// already uses PyTorch's layout.
fn is_transposed(path: &str, rank: usize) -> bool {
    rank == 2 && path.ends_with(".weight") && !path.contains("last_layer")
}

fn transpose_2d(shape: &[usize], values: &[f32]) -> (Vec<usize>, Vec<f32>) {
    let (r, c) = (shape[0], shape[1]);
    let mut out = vec![0f32; values.len()];
    for i in 0..r {
        for j in 0..c {
            out[j * r + i] = values[i * c + j];
        }
    }
    (vec![c, r], out)
}

/// What visits a module's float parameters, each with its dotted path
/// ("blocks.0.attn.qkv.weight"). Enum variants (`Network::Vit`) add no segment, so a
/// network's names are the same inside the enum as alone.
pub trait ParamVisitor {
    fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>);
}

/// What rebuilds a module's float parameters one by one, each with its dotted path.
pub trait ParamMapper {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>>;
}

/// Visits every float parameter of `module` in the module's order.
pub fn visit_params<M: Module, V: ParamVisitor>(module: &M, visitor: &mut V) {
    module.visit(&mut Walk { path: Vec::new(), inner: visitor });
}

/// Rebuilds every float parameter of `module` in the module's order.
pub fn map_params<M: Module, P: ParamMapper>(module: M, mapper: &mut P) -> M {
    module.map(&mut Walk { path: Vec::new(), inner: mapper })
}

/// burn's walk over a module tree, keeping the path: the one place that walks it.
struct Walk<'a, T> {
    path: Vec<String>,
    inner: &'a mut T,
}

impl<T> Walk<'_, T> {
    fn enter(&mut self, name: &str, container_type: &str) {
        self.path.push(if container_type.starts_with("Enum:") { String::new() } else { name.to_string() });
    }

    fn joined(&self) -> String {
        self.path.iter().filter(|s| !s.is_empty()).map(String::as_str).collect::<Vec<_>>().join(".")
    }
}

impl<V: ParamVisitor> ModuleVisitor for Walk<'_, V> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let path = self.joined();
        self.inner.visit(&path, param);
    }
}

impl<P: ParamMapper> ModuleMapper for Walk<'_, P> {
    fn enter_module(&mut self, name: &str, container_type: &str) {
        self.enter(name, container_type);
    }
    fn exit_module(&mut self, _: &str, _: &str) {
        self.path.pop();
    }
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let path = self.joined();
        self.inner.map(&path, param)
    }
}

/// Every float parameter's path and rank.
fn param_paths<M: Module>(module: &M) -> Vec<(String, usize)> {
    struct Paths(Vec<(String, usize)>);
    impl ParamVisitor for Paths {
        fn visit<const D: usize>(&mut self, path: &str, _: &Param<Tensor<D>>) {
            self.0.push((path.to_string(), D));
        }
    }
    let mut paths = Paths(Vec::new());
    visit_params(module, &mut paths);
    paths.0
}

/// Every parameter of `module` under its official name, in PyTorch layout.
pub fn export<M: Module>(module: &M) -> Vec<(String, HostTensor)> {
    struct Export {
        naming: Naming,
        out: Vec<(String, HostTensor)>,
    }
    impl ParamVisitor for Export {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
            let HostTensor { shape, values } = HostTensor::from_tensor(param.val());
            let (shape, values) = if is_transposed(path, D) { transpose_2d(&shape, &values) } else { (shape, values) };
            self.out.push((self.naming.official(path), HostTensor { shape, values }));
        }
    }
    let paths: Vec<String> = param_paths(module).into_iter().map(|(p, _)| p).collect();
    let mut export = Export { naming: Naming::of(&paths), out: Vec::new() };
    visit_params(module, &mut export);
    export.out
}

struct Import<'a> {
    naming: Naming,
    prefix: &'a str,
    source: &'a HashMap<String, HostTensor>,
    errors: Vec<WeightsError>,
}

impl ParamMapper for Import<'_> {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let key = format!("{}{}", self.prefix, self.naming.official(path));
        let Some(host) = self.source.get(&key) else {
            self.errors.push(WeightsError::Missing(key));
            return param;
        };
        let (shape, values) =
            if is_transposed(path, D) && host.shape.len() == 2 { transpose_2d(&host.shape, &host.values) } else { (host.shape.clone(), host.values.clone()) };
        let expected = param.lazy_shape().to_vec();
        if shape != expected {
            // Report shapes in the file's own layout.
            let expected = if is_transposed(path, D) { vec![expected[1], expected[0]] } else { expected };
            self.errors.push(WeightsError::Shape { key, found: host.shape.clone(), expected });
            return param;
        }
        let require_grad = param.is_require_grad();
        param.map(|old| {
            let device = old.device();
            let fresh = Tensor::<D>::from_data(TensorData::new(values, shape), &device.clone().without_autodiff());
            let fresh = if device.is_autodiff() { fresh.autodiff() } else { fresh };
            if require_grad { fresh.require_grad() } else { fresh }
        })
    }
}

/// Replaces every parameter of `module` with `source[prefix + official name]`; a key under
/// `prefix` that names no parameter is an error too. All problems are collected; the first is
/// returned.
pub fn import<M: Module>(module: M, source: &HashMap<String, HostTensor>, prefix: &str) -> Result<M, WeightsError> {
    let paths: Vec<String> = param_paths(&module).into_iter().map(|(p, _)| p).collect();
    let naming = Naming::of(&paths);
    let expected: std::collections::HashSet<String> = paths.iter().map(|p| format!("{prefix}{}", naming.official(p))).collect();
    let mut imp = Import { naming, prefix, source, errors: Vec::new() };
    let module = map_params(module, &mut imp);
    let mut unexpected: Vec<&String> = source.keys().filter(|k| k.starts_with(prefix) && !expected.contains(*k)).collect();
    unexpected.sort();
    imp.errors.extend(unexpected.into_iter().map(|k| WeightsError::Unexpected(k.clone())));
    match imp.errors.into_iter().next() {
        Some(e) => Err(e),
        None => Ok(module),
    }
}

/// Writes f32 tensors and string metadata as a safetensors file, atomically (a temporary file
/// renamed into place, so a crash never leaves a half-written file under `path`).
pub fn write_safetensors(path: &std::path::Path, tensors: Vec<(String, HostTensor)>, metadata: HashMap<String, String>) -> anyhow::Result<()> {
    write_atomically(path, &safetensors_bytes(tensors, metadata)?)
}

/// Writes `bytes` to a temporary file beside `path` and renames it into place.
pub fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use anyhow::Context;
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).with_context(|| format!("{}: cannot write", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("{}: cannot rename into place", path.display()))
}

/// The safetensors metadata keys of the files dino writes.
pub mod metadata {
    /// A ViT backbone's shape (`model::VitConfig` as JSON), in `dino export` files and in
    /// training checkpoints (format 2 on).
    pub const VIT_CONFIG: &str = "dino_vit";
    /// A ResNet backbone's shape (`model::ResNetConfig` as JSON), in training checkpoints
    /// (format 2 on), whose ResNet tensors carry our module's names, not torchvision's.
    pub const RESNET_CONFIG: &str = "dino_resnet";
    /// The side of the crops a backbone was trained on, in pixels (a JSON number), where the
    /// ViT shape does not say it: training checkpoints and exports of ResNets.
    pub const TRAINED_SIZE: &str = "dino_trained_size";
    /// A training checkpoint's record (format 2 on; `train::checkpoint`).
    pub const TRAIN_RECORD: &str = "dino_train";
    /// A format-1 training checkpoint's record: {format, progress, config, optimizer_steps},
    /// `config` being the run's `dino train` settings.
    pub const TRAIN_RECORD_FORMAT_1: &str = "dino";
}

/// Every tensor of a safetensors file (f32 only; `source` names the file in errors) and its
/// string metadata.
pub fn read_safetensors(bytes: &[u8], source: &std::path::Path) -> anyhow::Result<(HashMap<String, HostTensor>, HashMap<String, String>)> {
    use anyhow::Context;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).with_context(|| format!("{}: not a safetensors file", source.display()))?;
    let metadata = header.metadata().clone().unwrap_or_default();
    let st = safetensors::SafeTensors::deserialize(bytes).with_context(|| format!("{}: not a safetensors file", source.display()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        anyhow::ensure!(view.dtype() == safetensors::Dtype::F32, "{}: tensor '{name}' is {:?}, expected F32", source.display(), view.dtype());
        let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes"))).collect();
        tensors.insert(name, HostTensor { shape: view.shape().to_vec(), values });
    }
    Ok((tensors, metadata))
}

/// f32 tensors and string metadata as the bytes of a safetensors file.
pub fn safetensors_bytes(tensors: Vec<(String, HostTensor)>, metadata: HashMap<String, String>) -> anyhow::Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> =
        tensors.into_iter().map(|(n, t)| (n, t.shape, t.values.iter().flat_map(|v| v.to_le_bytes()).collect())).collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = bytes
        .iter()
        .map(|(n, shape, b)| (n.clone(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), b).expect("view")))
        .collect();
    Ok(safetensors::serialize(views, Some(metadata))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn official_names() {
        let n = Naming { head_stride: 2, single_layer_head: false };
        assert_eq!(n.official("backbone.patch_embed.weight"), "backbone.patch_embed.proj.weight");
        assert_eq!(n.official("blocks.3.mlp.fc1.bias"), "blocks.3.mlp.fc1.bias");
        assert_eq!(n.official("head.mlp.2.weight"), "head.mlp.4.weight");
        assert_eq!(n.official("head.last_layer.weight_g"), "head.last_layer.weight_g");
        let bn = Naming { head_stride: 3, single_layer_head: false };
        assert_eq!(bn.official("head.mlp.1.weight"), "head.mlp.3.weight");
        assert_eq!(bn.official("head.bn.1.gamma"), "head.mlp.4.weight");
        let single = Naming { head_stride: 2, single_layer_head: true };
        assert_eq!(single.official("mlp.0.bias"), "mlp.bias");
    }

    #[test]
    fn transpose_roundtrip() {
        let (shape, t) = transpose_2d(&[2, 3], &[1., 2., 3., 4., 5., 6.]);
        assert_eq!(shape, vec![3, 2]);
        assert_eq!(t, vec![1., 4., 2., 5., 3., 6.]);
    }
}
