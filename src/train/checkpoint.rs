//! Training checkpoints: student, teacher, optimizer buffers and the loss centre as tensors in
//! one safetensors file, with a versioned training record (progress, processes, optimiser
//! steps, the settings) and, for a ViT, the backbone's shape as JSON metadata. Written to a
//! temporary file and renamed, so a crash never leaves a half-written checkpoint. The
//! evaluation commands read the backbone through `model::pretrained`, not through this file.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use serde::{Deserialize, Serialize};

use super::config::TrainConfig;
use super::optim::{Optimizer, OptimizerKind, ParamState};
use super::schedule::Plan;
use crate::model::{DinoModel, ResNetConfig};
use crate::weights::{self, HostTensor, metadata};

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

/// Format of the training record this code writes. Format 1 (until 2026-12) kept the whole
/// `dino train` settings struct as the record, under the metadata key "dino"; format 2 keeps
/// what resuming needs in a record of its own, with the settings as a plain JSON copy that is
/// never read back, and the backbone's shape beside it for the evaluation commands.
const FORMAT: u32 = 2;

/// What a checkpoint says of its run besides the tensors.
#[derive(Serialize, Deserialize)]
struct TrainRecord {
    format: u32,
    progress: Progress,
    /// Processes the run spans; a resume must use as many.
    processes: usize,
    optimizer: OptimizerKind,
    /// Updates each parameter's optimiser state has seen.
    optimizer_steps: HashMap<String, u64>,
    /// The run's resolved settings, for whoever reads the file.
    settings: serde_json::Value,
}

impl TrainRecord {
    /// The record of a checkpoint's metadata, in either format.
    fn read(meta: &HashMap<String, String>, source: &Path) -> Result<Self> {
        let parse = |key: &str| meta.get(key).map(|s| serde_json::from_str::<serde_json::Value>(s)).transpose();
        let bad = || format!("{}: unreadable training record", source.display());
        if let Some(record) = parse(metadata::TRAIN_RECORD).with_context(bad)? {
            let record: Self = serde_json::from_value(record).with_context(bad)?;
            anyhow::ensure!(record.format <= FORMAT, "{}: checkpoint format {} is newer than this dino reads ({FORMAT})", source.display(), record.format);
            return Ok(record);
        }
        let Some(old) = parse(metadata::TRAIN_RECORD_FORMAT_1).with_context(bad)? else { bail!("{}: not a dino training checkpoint", source.display()) };
        let setting = |key: &str| old["config"].get(key).cloned();
        Ok(Self {
            format: 1,
            progress: serde_json::from_value(old["progress"].clone()).with_context(bad)?,
            processes: setting("processes").map(serde_json::from_value).transpose().with_context(bad)?.unwrap_or(1),
            optimizer: setting("optimizer").map(serde_json::from_value).transpose().with_context(bad)?.unwrap_or(OptimizerKind::Adamw),
            optimizer_steps: serde_json::from_value(old["optimizer_steps"].clone()).with_context(bad)?,
            settings: old["config"].clone(),
        })
    }
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
    let record = TrainRecord {
        format: FORMAT,
        progress: state.progress.clone(),
        processes: config.processes,
        optimizer: state.optimizer.kind,
        optimizer_steps,
        settings: serde_json::to_value(config)?,
    };
    let mut meta = HashMap::from([(metadata::TRAIN_RECORD.to_string(), serde_json::to_string(&record)?)]);
    meta.insert(metadata::TRAINED_SIZE.to_string(), config.global_crop_size.to_string());
    match (config.vit(), ResNetConfig::from_arch(&config.arch)) {
        (Some(vit), _) => meta.insert(metadata::VIT_CONFIG.to_string(), serde_json::to_string(&vit)?),
        (None, Some(resnet)) => meta.insert(metadata::RESNET_CONFIG.to_string(), serde_json::to_string(&resnet)?),
        (None, None) => unreachable!("validated --arch {}", config.arch),
    };
    weights::safetensors_bytes(tensors, meta)
}

/// A training state read back: the state, the loss centre and the processes its run spans.
pub struct Restored {
    pub state: TrainState,
    pub center: Tensor<2>,
    pub processes: usize,
}

/// Restores a checkpoint file into freshly built student and teacher models of the same shape.
pub fn load(path: &Path, student: DinoModel, teacher: DinoModel, device: &Device) -> Result<Restored> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    from_bytes(&bytes, path, student, teacher, device)
}

/// Restores the bytes of a checkpoint (named `source` in errors) into freshly built student and
/// teacher models of the same shape.
pub fn from_bytes(bytes: &[u8], source: &Path, student: DinoModel, teacher: DinoModel, device: &Device) -> Result<Restored> {
    let (tensors, meta) = weights::read_safetensors(bytes, source)?;
    let record = TrainRecord::read(&meta, source)?;
    let student = weights::import(student, &tensors, "student.").with_context(|| format!("{}: student", source.display()))?;
    let teacher = weights::import(teacher, &tensors, "teacher.").with_context(|| format!("{}: teacher", source.display()))?;
    let tensor = |name: &str| -> Result<Tensor<1>> {
        let t = tensors.get(name).with_context(|| format!("{}: missing '{name}'", source.display()))?;
        Ok(Tensor::from_data(TensorData::new(t.values.clone(), [t.values.len()]), device))
    };
    let mut optimizer = Optimizer::new(record.optimizer);
    for (name, step) in record.optimizer_steps {
        let buffers = optimizer.buffer_names().iter().map(|b| tensor(&format!("optim.{name}.{b}"))).collect::<Result<_>>()?;
        optimizer.state.insert(name, ParamState { step, buffers });
    }
    let center = tensor("center")?;
    let k = center.dims()[0];
    let state = TrainState { student, teacher, optimizer, progress: record.progress };
    Ok(Restored { state, center: center.reshape([1, k]), processes: record.processes })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::config::resolve_args;
    use rand::SeedableRng;

    /// tests/fixtures/checkpoint_v1 (make_checkpoint_v1.sh) holds a format-1 checkpoint of a
    /// ResNet-micro trained with SGD; it reads back whole, and written again in today's format it
    /// holds the same tensors, progress and optimiser record.
    #[test]
    fn format_1_checkpoints_resume_and_rewrite_unchanged() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/checkpoint_v1/checkpoint.safetensors");
        let flags = "dino train --data d --preset quick --arch resnet_micro --subset 64 --batch_size_per_gpu 16 --epochs 1 --warmup_epochs 1 --out_dim 64 \
                     --head_hidden_dim 32 --head_bottleneck_dim 16 --seed 3";
        let cfg = resolve_args(&flags.split_whitespace().collect::<Vec<_>>()).unwrap();
        let device = Device::flex();
        let fresh = || {
            let mut rng = rand::rngs::StdRng::seed_from_u64(0);
            let backbone = cfg.init_backbone(&mut rng, &device);
            let head = cfg.head(backbone.embed_dim()).init(&mut rng, &device);
            DinoModel { backbone, head }
        };
        let old_bytes = std::fs::read(&path).unwrap();
        let old = from_bytes(&old_bytes, &path, fresh(), fresh(), &device).unwrap();
        assert_eq!(old.state.progress, Progress { epoch: 1, step_in_epoch: 0, global_step: 4, plan: None });
        assert_eq!((old.processes, old.state.optimizer.kind), (1, OptimizerKind::Sgd));

        let new_bytes = to_bytes(&old.state, &old.center, &cfg).unwrap();
        let (old_tensors, _) = weights::read_safetensors(&old_bytes, &path).unwrap();
        let (new_tensors, meta) = weights::read_safetensors(&new_bytes, &path).unwrap();
        assert_eq!(old_tensors.len(), new_tensors.len());
        for (name, t) in &old_tensors {
            let again = new_tensors.get(name).unwrap_or_else(|| panic!("'{name}' lost on rewriting"));
            assert_eq!((&again.shape, &again.values), (&t.shape, &t.values), "{name}");
        }
        let record = TrainRecord::read(&meta, &path).unwrap();
        let old_record = TrainRecord::read(&weights::read_safetensors(&old_bytes, &path).unwrap().1, &path).unwrap();
        assert_eq!((record.format, record.optimizer_steps.clone()), (FORMAT, old_record.optimizer_steps));
        let again = from_bytes(&new_bytes, &path, fresh(), fresh(), &device).unwrap();
        assert_eq!((again.state.progress, again.processes), (old.state.progress, 1));
    }

    #[test]
    fn a_newer_format_is_refused_in_one_line() {
        let record = serde_json::json!({"format": FORMAT + 1, "progress": {"epoch": 0, "step_in_epoch": 0, "global_step": 0},
            "processes": 1, "optimizer": "adamw", "optimizer_steps": {}, "settings": {}});
        let meta = HashMap::from([(metadata::TRAIN_RECORD.to_string(), record.to_string())]);
        let e = TrainRecord::read(&meta, Path::new("new.safetensors")).err().unwrap().to_string();
        assert!(e.contains("new.safetensors") && e.contains("newer"), "{e}");
        let e = TrainRecord::read(&HashMap::new(), Path::new("plain.safetensors")).err().unwrap().to_string();
        assert!(e.contains("not a dino training checkpoint"), "{e}");
    }
}
