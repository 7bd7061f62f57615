//! Training checkpoints: student, teacher, optimizer buffers and the loss centre as tensors in
//! one safetensors file, with the progress (epoch, step) and config as JSON metadata. Written
//! to a temporary file and renamed, so a crash never leaves a half-written checkpoint.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::{Optimizer, ParamState};
use super::schedule::Plan;
use crate::model::{DinoModel, Network};
use rand::SeedableRng;
use rand::rngs::StdRng;
use crate::weights::{self, HostTensor};

/// Where training stands: the next step to run is `step_in_epoch` of `epoch`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Progress {
    pub epoch: usize,
    pub step_in_epoch: usize,
    pub global_step: usize,
    /// The plan a time budget fixed (`None` for an epoch plan, or before it is fixed).
    #[serde(default)]
    pub plan: Option<Plan>,
}

pub struct TrainState {
    pub student: DinoModel,
    pub teacher: DinoModel,
    pub optimizer: Optimizer,
    pub progress: Progress,
}

#[derive(Serialize, Deserialize)]
struct Metadata {
    format: u32,
    progress: Progress,
    config: TrainConfig,
    optimizer_steps: HashMap<String, u64>,
}

/// Writes the state and the loss centre atomically to `path`.
pub fn save(path: &Path, state: &TrainState, center: &Tensor<2>, config: &TrainConfig) -> Result<()> {
    weights::write_atomically(path, &to_bytes(state, center, config)?)
}

/// The state and the loss centre as the bytes of a checkpoint file.
pub fn to_bytes(state: &TrainState, center: &Tensor<2>, config: &TrainConfig) -> Result<Vec<u8>> {
    let mut tensors: Vec<(String, HostTensor)> = Vec::new();
    for (name, t) in weights::export(&state.student) {
        tensors.push((format!("student.{name}"), t));
    }
    for (name, t) in weights::export(&state.teacher) {
        tensors.push((format!("teacher.{name}"), t));
    }
    let mut optimizer_steps = HashMap::new();
    for (name, param_state) in &state.optimizer.state {
        for (buffer, t) in state.optimizer.buffer_names().iter().zip(&param_state.buffers) {
            tensors.push((format!("optim.{name}.{buffer}"), HostTensor::from_tensor(t.clone())));
        }
        optimizer_steps.insert(name.clone(), param_state.step);
    }
    tensors.push(("center".into(), HostTensor::from_tensor(center.clone())));
    let meta = Metadata { format: 1, progress: state.progress.clone(), config: config.clone(), optimizer_steps };
    let metadata = HashMap::from([("dino".to_string(), serde_json::to_string(&meta)?)]);
    weights::safetensors_bytes(tensors, metadata)
}

/// Reads every f32 tensor of a safetensors file.
pub fn read_tensors(bytes: &[u8], path: &Path) -> Result<HashMap<String, HostTensor>> {
    let st = safetensors::SafeTensors::deserialize(bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    let mut out = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            bail!("{}: tensor '{name}' is {:?}, expected F32", path.display(), view.dtype());
        }
        let values = view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect();
        out.insert(name, HostTensor { shape: view.shape().to_vec(), values });
    }
    Ok(out)
}

fn read_metadata(bytes: &[u8], path: &Path) -> Result<Metadata> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).with_context(|| format!("{}: not a safetensors file", path.display()))?;
    header
        .metadata()
        .as_ref()
        .and_then(|m| m.get("dino"))
        .map(|s| serde_json::from_str(s))
        .transpose()?
        .with_context(|| format!("{}: not a dino training checkpoint", path.display()))
}

/// The backbone of a training checkpoint (`key` is "teacher" or "student") and the config it
/// was trained with.
pub fn load_backbone(path: &Path, key: &str, device: &Device) -> Result<(Network, TrainConfig)> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let meta = read_metadata(&bytes, path)?;
    let tensors = read_tensors(&bytes, path)?;
    let network = meta.config.init_backbone(&mut StdRng::seed_from_u64(0), device);
    let network = weights::import(network, &tensors, &format!("{key}.backbone.")).with_context(|| format!("{}: {key}", path.display()))?;
    Ok((network, meta.config))
}

/// A training state read back: the state, the loss centre and the config it was trained with.
pub struct Restored {
    pub state: TrainState,
    pub center: Tensor<2>,
    pub config: TrainConfig,
}

/// Restores a checkpoint file into freshly built student and teacher models of the same shape.
pub fn load(path: &Path, student: DinoModel, teacher: DinoModel, device: &Device) -> Result<Restored> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    from_bytes(&bytes, path, student, teacher, device)
}

/// Restores the bytes of a checkpoint (named `source` in errors) into freshly built student and
/// teacher models of the same shape.
pub fn from_bytes(bytes: &[u8], source: &Path, student: DinoModel, teacher: DinoModel, device: &Device) -> Result<Restored> {
    let meta = read_metadata(bytes, source)?;
    let tensors = read_tensors(bytes, source)?;
    let student = weights::import(student, &tensors, "student.").with_context(|| format!("{}: student", source.display()))?;
    let teacher = weights::import(teacher, &tensors, "teacher.").with_context(|| format!("{}: teacher", source.display()))?;
    let tensor = |name: &str| -> Result<Tensor<1>> {
        let t = tensors.get(name).with_context(|| format!("{}: missing '{name}'", source.display()))?;
        Ok(Tensor::from_data(TensorData::new(t.values.clone(), [t.values.len()]), device))
    };
    let mut optimizer = Optimizer::new(meta.config.optimizer);
    for (name, step) in meta.optimizer_steps {
        let buffers = optimizer.buffer_names().iter().map(|b| tensor(&format!("optim.{name}.{b}"))).collect::<Result<_>>()?;
        optimizer.state.insert(name, ParamState { step, buffers });
    }
    let center = tensor("center")?;
    let k = center.dims()[0];
    let state = TrainState { student, teacher, optimizer, progress: meta.progress };
    Ok(Restored { state, center: center.reshape([1, k]), config: meta.config })
}
