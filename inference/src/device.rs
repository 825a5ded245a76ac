//! Where a model runs: the CPU, or a CUDA GPU in builds with the `cuda` feature.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::{Error, Result};

/// The device a model is loaded on, written `cpu`, `cuda` (the first GPU) or
/// `cuda:N` in config files and on the command line.
///
/// Only CPU models run on lineside's own kernels (channels-last convolutions,
/// micro-batches); on a GPU the same networks run on candle's CUDA ops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ComputeDevice {
    #[default]
    Cpu,
    /// A CUDA GPU, by ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// Whether this binary was built with the `cuda` feature.
    pub fn cuda_built() -> bool {
        candle_core::utils::cuda_is_available()
    }

    /// Refuses a GPU in a build that cannot drive one, before anything is loaded.
    pub fn check_supported(self) -> Result<()> {
        match self {
            ComputeDevice::Cuda(_) if !Self::cuda_built() => Err(Error::Device {
                device: self.to_string(),
                message: "this build has no CUDA support; rebuild with `cargo build --release --features cuda` \
                          (README, \"CUDA\")"
                    .into(),
            }),
            _ => Ok(()),
        }
    }

    /// Opens the device. On a GPU this creates a CUDA context, so open it once
    /// per model load, not per batch.
    pub fn open(self) -> Result<Device> {
        self.check_supported()?;
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda(ordinal) => Device::new_cuda(ordinal)
                .map_err(|e| Error::Device { device: self.to_string(), message: format!("cannot open it: {e}") }),
        }
    }
}

/// Which implementation runs a model's layers.
///
/// A CPU model runs on lineside's own kernels (channels-last convolutions,
/// depthwise and pooling kernels) wherever a layer has one; a GPU model runs
/// on candle's own tensor ops only, which every candle backend implements.
/// [`Kernels::Candle`] on the CPU runs that second path where it can be
/// checked here: the parity tests hold it to the PyTorch references, so the
/// network code a CUDA build runs is tested without a GPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernels {
    /// lineside's kernels where a layer has one (CPU only).
    Lineside,
    /// candle's tensor ops only, as on a GPU.
    Candle,
}

impl Kernels {
    /// What `device` runs: lineside's kernels exist for the CPU only.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cpu() { Kernels::Lineside } else { Kernels::Candle }
    }
}

impl fmt::Display for Kernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kernels::Lineside => "lineside",
            Kernels::Candle => "candle",
        })
    }
}

impl FromStr for Kernels {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "lineside" => Ok(Kernels::Lineside),
            "candle" => Ok(Kernels::Candle),
            _ => Err(format!("unknown kernels `{s}`: expected `lineside` or `candle`")),
        }
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

impl FromStr for ComputeDevice {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let invalid = || format!("unknown device `{s}`: expected `cpu`, `cuda` or `cuda:N`");
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(ComputeDevice::Cpu),
            "cuda" => Ok(ComputeDevice::Cuda(0)),
            // Digits only: `usize::from_str` would also take `+1`.
            other => match other.strip_prefix("cuda:") {
                Some(n) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
                    n.parse().map(ComputeDevice::Cuda).map_err(|_| invalid())
                }
                _ => Err(invalid()),
            },
        }
    }
}

impl TryFrom<String> for ComputeDevice {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<ComputeDevice> for String {
    fn from(d: ComputeDevice) -> Self {
        d.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_the_documented_forms() {
        for (text, device, shown) in [
            ("cpu", ComputeDevice::Cpu, "cpu"),
            ("CUDA", ComputeDevice::Cuda(0), "cuda:0"),
            ("cuda:3", ComputeDevice::Cuda(3), "cuda:3"),
        ] {
            assert_eq!(text.parse::<ComputeDevice>(), Ok(device), "{text}");
            assert_eq!(device.to_string(), shown);
        }
        for bad in ["", "gpu", "cuda:", "cuda:-1", "cuda:+1", "cuda:x", "cpu:0"] {
            let err = bad.parse::<ComputeDevice>().unwrap_err();
            assert!(err.contains("expected `cpu`, `cuda` or `cuda:N`"), "{bad}: {err}");
        }
    }

    #[test]
    fn kernels_parse_and_the_cpu_runs_lineside_kernels() {
        assert_eq!("Candle".parse::<Kernels>(), Ok(Kernels::Candle));
        assert_eq!("lineside".parse::<Kernels>(), Ok(Kernels::Lineside));
        assert!("onnx".parse::<Kernels>().unwrap_err().contains("`lineside` or `candle`"));
        assert_eq!(Kernels::for_device(&Device::Cpu), Kernels::Lineside);
    }

    #[test]
    fn the_cpu_always_opens() {
        assert!(ComputeDevice::Cpu.open().unwrap().is_cpu());
    }

    #[test]
    fn a_gpu_without_the_cuda_feature_is_refused_by_name() {
        if ComputeDevice::cuda_built() {
            return; // The CUDA build's own path is opening a real device.
        }
        let err = ComputeDevice::Cuda(1).open().unwrap_err().to_string();
        assert!(err.contains("cuda:1") && err.contains("--features cuda"), "{err}");
    }
}
