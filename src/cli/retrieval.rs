//! `dino retrieval`: the flags of image retrieval with frozen features (`eval/retrieval.rs`
//! holds the algorithm): a revisited Oxford/Paris dataset, or a database and a query folder.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Args;

use super::backbone::BackboneArgs;
use super::eval_args::{DeviceArgs, PrecisionArgs, ReferencePlumbing, open_dataset};
use crate::data::dataset::{Dataset, IdxSplit};
use crate::eval::features::{FeatureCache, FeatureLayout};
use crate::eval::retrieval::{self, Protocol, Revisited};

#[derive(Debug, Args)]
#[command(rename_all = "snake_case")]
pub struct RetrievalArgs {
    /// Root of the revisited datasets: DATA_PATH/DATASET/jpg/*.jpg and
    /// DATA_PATH/DATASET/gnd_DATASET.pkl (the reference's layout).
    #[arg(long, requires = "dataset", conflicts_with_all = ["database", "queries"])]
    pub data_path: Option<PathBuf>,
    /// Which revisited dataset under --data_path: roxford5k or rparis6k (any folder name of
    /// that layout works).
    #[arg(long, requires = "data_path")]
    pub dataset: Option<String>,
    /// Instead of --data_path: the images to search, in class folders.
    #[arg(long, requires = "queries")]
    pub database: Option<PathBuf>,
    /// The query images, in class folders named as the database's: a query's positives are
    /// the database images of its class.
    #[arg(long, requires = "database")]
    pub queries: Option<PathBuf>,
    #[command(flatten)]
    pub backbone: BackboneArgs,
    #[command(flatten)]
    pub device: DeviceArgs,
    #[command(flatten)]
    pub reference: ReferencePlumbing,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Images are shrunk (aspect kept, never enlarged) so that their longer side is at most this.
    #[arg(long, default_value_t = 224)]
    pub imsize: usize,
    /// Average the features at scales 1, 1/√2 and 1/2 (bare, or true/false as the reference).
    #[arg(long, default_value_t = false, num_args = 0..=1, default_missing_value = "true", action = clap::ArgAction::Set, value_parser = crate::cli::bool_value)]
    pub multiscale: bool,
    /// The k of the mean precision at k.
    #[arg(long, num_args = 1.., default_values_t = [1, 5, 10])]
    pub ks: Vec<usize>,
    /// Keep the features here (`dino extract`'s format, a folder per image set) and reuse them
    /// on the next run with the same images and settings.
    #[arg(long)]
    pub features_cache: Option<PathBuf>,
}

pub fn run(args: RetrievalArgs) -> Result<()> {
    args.reference.note();
    let device = args.device.open()?;
    if args.ks.contains(&0) {
        bail!("--ks values must be positive");
    }
    let (database, queries, revisited, name) = match (&args.data_path, &args.dataset, &args.database, &args.queries) {
        (Some(root), Some(dataset), None, None) => {
            let r = Revisited::open(root, dataset)?;
            (r.database, r.queries, Some(r.ground_truth), dataset.clone())
        }
        (None, None, Some(database), Some(queries)) => {
            let d = open_dataset(database, IdxSplit::Train, 0, "--database", true)?;
            let q = open_dataset(queries, IdxSplit::Test, 0, "--queries", true)?;
            (d, q, None, "queries".to_string())
        }
        _ => bail!("give --data_path and --dataset (revisited Oxford/Paris), or --database and --queries (class folders)"),
    };
    if database.is_empty() || queries.is_empty() {
        bail!("{name}: {} database images and {} queries; both must be non-empty", database.len(), queries.len());
    }
    let backbone = args.backbone.load(&device)?;
    let network = args.precision.prepare(&backbone.network)?;
    let kind = network.kind(FeatureLayout::CLS);
    let settings = format!("{} {:?} imsize {} multiscale {}", args.backbone.fingerprint(), network.precision(), args.imsize, args.multiscale);
    let cache = args.features_cache.as_deref().map(|dir| FeatureCache { dir, settings });
    let features = |set: &str, images: &Dataset| {
        let compute = || retrieval::features(kind, images, args.imsize, args.multiscale, &device);
        match &cache {
            Some(cache) => cache.get(set, images, compute),
            None => compute(),
        }
    };
    let (database_features, dim) = features("database", &database)?;
    let (query_features, _) = features("queries", &queries)?;
    eprintln!("features: {} database, {} queries, dim {dim}", database.len(), queries.len());
    let evaluate = |relevant: &[retrieval::Relevant]| retrieval::evaluate(&database_features, &query_features, dim, relevant, &args.ks);
    let percent = |s: &retrieval::Scores| (100.0 * s.map, s.precision_at.iter().map(|(k, p)| format!("{k}: {:.2}", 100.0 * p)).collect::<Vec<_>>().join(", "));
    match revisited {
        Some(ground_truth) => {
            let scores = [Protocol::Easy, Protocol::Medium, Protocol::Hard]
                .map(|p| evaluate(&ground_truth.iter().map(|g| g.relevant(p)).collect::<Vec<_>>()));
            let [e, m, h] = scores.each_ref().map(percent);
            println!(">> {name}: mAP E: {:.2}, M: {:.2}, H: {:.2}", e.0, m.0, h.0);
            println!(">> {name}: mP@k E: [{}], M: [{}], H: [{}]", e.1, m.1, h.1);
        }
        None => {
            let relevant = retrieval::class_relevance(&database, &queries)?;
            let (map, precision) = percent(&evaluate(&relevant));
            println!(">> {name}: mAP: {map:.2}");
            println!(">> {name}: mP@k: [{precision}]");
        }
    }
    Ok(())
}
