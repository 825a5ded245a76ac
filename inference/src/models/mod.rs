//! Model definitions and loading of timm hub-format model folders.

pub mod convnext;
pub mod efficientnet;
pub(crate) mod keep_warm;
pub mod linear_head;
mod micro_batch;
pub mod resnet;

pub use linear_head::LinearHead;
pub use micro_batch::{CHANNELS_LAST_MICRO_BATCH, CPU_MICRO_BATCH, MicroBatched};

use std::borrow::Cow;
use std::path::Path;

use candle_core::{D, Device, Tensor};

use crate::hub_config::HubConfig;
use crate::preprocess::Preprocessor;
use crate::weights::Weights;
use crate::{Error, Kernels, Result};

/// One feature map that a backbone exposes (timm's `feature_info`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FeatureInfo {
    /// The timm module whose output this is, e.g. `blocks.2`.
    pub module: String,
    pub channels: usize,
    /// Stride relative to the input.
    pub reduction: usize,
}

/// A vision backbone with a classification head.
pub trait ImageModel: Send + Sync {
    /// Runs the network on an `[N, 3, H, W]` batch. Returns the feature maps
    /// timm's `features_only=True` would (with `last`, only up to that index,
    /// and the network stops there) and, when `logits` is set, the logits
    /// (which need the whole network, so `last` is then ignored).
    fn forward_maps(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)>;

    /// Every feature map, and the logits when `logits` is set.
    fn forward_all(&self, x: &Tensor, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        self.forward_maps(x, None, logits)
    }

    /// timm's `feature_info` for [`ImageModel::forward_all`]'s feature maps.
    fn feature_info(&self) -> &[FeatureInfo];

    /// Size of the logits.
    fn num_classes(&self) -> usize;

    /// Logits `[N, classes]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, logits) = self.forward_all(x, true)?;
        Ok(logits.expect("forward_all returns logits when asked"))
    }

    /// Images per step when a CPU batch runs in micro-batches
    /// ([`MicroBatched`]).
    fn cpu_micro_batch(&self) -> usize {
        CPU_MICRO_BATCH
    }

    /// The network split at its global pool, where its logits are one
    /// linear layer over the pooled features ([`PooledHead`]).
    fn pooled_head(&self) -> Option<&dyn PooledHead> {
        None
    }

    /// Feature maps only; skips the head.
    fn forward_features(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        Ok(self.forward_all(x, false)?.0)
    }

    /// The feature maps up to index `last`, skipping the stages after it
    /// (PatchCore needs only mid-level maps).
    fn forward_features_until(&self, x: &Tensor, last: usize) -> Result<Vec<Tensor>> {
        let mut f = self.forward_maps(x, Some(last), false)?.0;
        f.truncate(last + 1);
        Ok(f)
    }
}

/// A network whose logits are one linear layer over its globally pooled
/// features, taken apart there: a batch run in steps ([`MicroBatched`])
/// pools every step and then runs the head once for the whole batch,
/// reading its weights once rather than once per step.
pub trait PooledHead: Send + Sync {
    /// The globally pooled features `[N, C]` that [`Self::head`] takes.
    fn forward_pooled(&self, x: &Tensor) -> Result<Tensor>;

    /// The layer from pooled features to logits.
    fn head(&self) -> &LinearHead;
}

/// A network whose logits are one linear layer over its global pool, from
/// the parts that differ between such networks (resnet, mobilenetv2,
/// efficientnet): [`ImageModel`] and [`PooledHead`] follow from them.
pub(crate) trait GlobalPoolNet: Send + Sync {
    /// The feature maps (up to the `last`-th; none when `last` is `None`)
    /// and, with `pooled`, the globally pooled features `[N, C]`.
    fn run(&self, x: &Tensor, last: Option<usize>, pooled: bool) -> Result<(Vec<Tensor>, Option<Tensor>)>;

    /// The layer from pooled features to logits.
    fn classifier(&self) -> &LinearHead;

    /// timm's `feature_info` for every map [`Self::run`] can give.
    fn maps_info(&self) -> &[FeatureInfo];

    /// Whether a CPU batch runs on the channels-last kernels, one image per
    /// step ([`CHANNELS_LAST_MICRO_BATCH`]).
    fn on_channels_last(&self) -> bool;
}

impl<T: GlobalPoolNet> PooledHead for T {
    /// On the channels-last path no feature map is turned back into NCHW.
    fn forward_pooled(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, None, true)?.1.expect("run pools when asked"))
    }

    fn head(&self) -> &LinearHead {
        self.classifier()
    }
}

impl<T: GlobalPoolNet> ImageModel for T {
    fn forward_maps(&self, x: &Tensor, last: Option<usize>, logits: bool) -> Result<(Vec<Tensor>, Option<Tensor>)> {
        let last = if logits { usize::MAX } else { last.unwrap_or(usize::MAX) };
        let (features, pooled) = self.run(x, Some(last), logits)?;
        Ok((features, pooled.map(|p| self.classifier().forward(&p)).transpose()?))
    }

    /// Logits only: no feature map is kept.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.classifier().forward(&self.forward_pooled(x)?)
    }

    fn pooled_head(&self) -> Option<&dyn PooledHead> {
        Some(self)
    }

    fn cpu_micro_batch(&self) -> usize {
        if self.on_channels_last() { CHANNELS_LAST_MICRO_BATCH } else { CPU_MICRO_BATCH }
    }

    fn feature_info(&self) -> &[FeatureInfo] {
        self.maps_info()
    }

    fn num_classes(&self) -> usize {
        self.classifier().classes()
    }
}

/// Architectures lineside can build, for error messages and `--help`.
pub fn supported_architectures() -> Vec<&'static str> {
    efficientnet::SUPPORTED.iter().chain(resnet::SUPPORTED).chain(convnext::SUPPORTED).copied().collect()
}

/// The two files of a timm hub-format model, from disk or embedded in the binary.
#[derive(Clone)]
pub struct ModelFiles {
    /// Where the files came from, for messages (`models/steel-surface`, `builtin:steel-surface`).
    pub origin: String,
    pub config_json: Cow<'static, str>,
    pub weights: Cow<'static, [u8]>,
}

impl ModelFiles {
    /// Reads `config.json` and `model.safetensors` from a folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read(&path).map_err(|source| Error::Io { path, source })
        };
        let config = read("config.json")?;
        let config = String::from_utf8(config).map_err(|e| Error::config("config.json", e.to_string()))?;
        Ok(Self {
            origin: dir.display().to_string(),
            config_json: Cow::Owned(config),
            weights: Cow::Owned(read("model.safetensors")?),
        })
    }

    /// A short content hash of config and weights: the model's version.
    pub fn content_version(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(self.config_json.as_bytes());
        h.update(&self.weights);
        let digest = h.finalize();
        digest[..6].iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A model ready to serve: network, preprocessing and labels.
pub struct LoadedModel {
    pub config: HubConfig,
    pub network: Box<dyn ImageModel>,
    pub preprocessor: Preprocessor,
    pub labels: Vec<String>,
    /// Content hash of the files it was loaded from.
    pub version: String,
    pub device: Device,
    /// What its layers run on ([`Self::load_on`]).
    pub kernels: Kernels,
}

impl LoadedModel {
    /// Builds the network that `config.json` names from the weights, on
    /// the kernels `device` runs ([`Kernels::for_device`]).
    pub fn load(files: &ModelFiles, device: &Device) -> Result<Self> {
        Self::load_on(files, device, Kernels::for_device(device))
    }

    /// [`Self::load`] on `kernels`: [`Kernels::Candle`] runs candle's ops
    /// only, the path a GPU runs, even on the CPU (to check it against
    /// references); a GPU runs candle's ops whatever is asked.
    pub fn load_on(files: &ModelFiles, device: &Device, kernels: Kernels) -> Result<Self> {
        let config = HubConfig::from_json(&files.config_json)?;
        let weights = Weights::from_buffer(format!("{}/model.safetensors", files.origin), &files.weights, device)?
            .with_kernels(kernels);
        let kernels = weights.kernels();
        let network: Box<dyn ImageModel> = if efficientnet::EfficientNet::supports(&config.architecture) {
            Box::new(efficientnet::EfficientNet::load(&config.architecture, &weights)?)
        } else if resnet::ResNet::supports(&config.architecture) {
            Box::new(resnet::ResNet::load(&config.architecture, &weights)?)
        } else if convnext::ConvNeXt::supports(&config.architecture) {
            Box::new(convnext::ConvNeXt::load(&config.architecture, &weights)?)
        } else {
            return Err(Error::UnsupportedArchitecture {
                found: config.architecture.clone(),
                supported: supported_architectures().join(", "),
            });
        };
        // Big CPU batches run in steps that keep the working set small.
        let network: Box<dyn ImageModel> = if device.is_cpu() { Box::new(MicroBatched::new(network)) } else { network };
        if network.num_classes() != config.num_classes {
            return Err(Error::config(
                "num_classes",
                format!("config says {}, classifier has {}", config.num_classes, network.num_classes()),
            ));
        }
        Ok(Self {
            preprocessor: Preprocessor::new(&config.pretrained_cfg),
            labels: config.labels(),
            version: files.content_version(),
            network,
            config,
            device: device.clone(),
            kernels,
        })
    }
}

/// Class probabilities for one image.
pub type Probabilities = Vec<f32>;

/// What a served model yields for one image.
#[derive(Debug, Clone)]
pub enum Output {
    /// Softmax probabilities, in label order.
    Classes(Probabilities),
    /// An anomaly score and map.
    Anomaly(crate::anomaly::AnomalyMap),
}

/// A classifier: batched logits → per-image softmax probabilities.
pub struct Classifier {
    pub model: LoadedModel,
}

impl Classifier {
    /// Probabilities for an `[N, 3, H, W]` batch.
    pub fn classify(&self, batch: &Tensor) -> Result<Vec<Probabilities>> {
        let logits = self.model.network.forward(batch)?;
        let probs = candle_nn::ops::softmax(&logits, D::Minus1)?;
        Ok(probs.to_vec2::<f32>()?)
    }
}

impl crate::batcher::BatchModel for Classifier {
    type Output = Output;

    fn input_shape(&self) -> (usize, usize, usize) {
        self.model.preprocessor.input_shape()
    }

    fn device(&self) -> &Device {
        &self.model.device
    }

    fn infer(&self, batch: &Tensor) -> Result<Vec<Output>> {
        Ok(self.classify(batch)?.into_iter().map(Output::Classes).collect())
    }
}

/// Helpers shared by the models' tests.
#[cfg(test)]
pub(crate) mod test_util {
    use candle_core::Tensor;

    use super::ImageModel;

    fn max_err(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap()
    }

    /// `fast` gives `slow`'s feature maps and logits on `x` within 1e-3,
    /// `forward` the same logits, and `forward_features_until(until)` the
    /// same maps up to that index.
    pub fn assert_same_outputs(fast: &dyn ImageModel, slow: &dyn ImageModel, x: &Tensor, until: usize, what: &str) {
        let (fm, fl) = fast.forward_all(x, true).unwrap();
        let (sm, sl) = slow.forward_all(x, true).unwrap();
        assert_eq!(fm.len(), sm.len(), "{what}");
        for (i, (a, b)) in fm.iter().zip(&sm).enumerate() {
            assert_eq!(a.dims(), b.dims(), "{what} map {i}");
            assert!(max_err(a, b) < 1e-3, "{what} map {i}: max err {}", max_err(a, b));
        }
        let (fl, sl) = (fl.unwrap(), sl.unwrap());
        assert!(max_err(&fl, &sl) < 1e-3, "{what} logits: max err {}", max_err(&fl, &sl));
        assert!(max_err(&fast.forward(x).unwrap(), &sl) < 1e-3, "{what} forward");
        let maps = fast.forward_features_until(x, until).unwrap();
        assert_eq!(maps.len(), until + 1, "{what}");
        assert!(max_err(&maps[until], &sm[until]) < 1e-3, "{what} until {until}");
    }
}
