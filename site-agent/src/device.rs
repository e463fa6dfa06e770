//! The compute device: parsing `--device`, and the report `site-agent check` prints.

use std::fmt;

use anyhow::Result;
use tch::{Cuda, Device};

pub fn parse(spec: &str) -> Result<Device> {
    fedtalent_model::predict::parse_device(spec)
}

pub struct DeviceReport {
    pub torch_version: String,
    pub torch_lib: String,
    pub device: Device,
    pub cuda: bool,
    pub cudnn: bool,
    pub cudnn_version: Option<i64>,
    pub gpus: Vec<String>,
    pub memory: Option<(u64, u64)>,
}

/// Describes the device `spec` resolves to; fails clearly when CUDA is asked for and missing.
pub fn report(spec: &str) -> Result<DeviceReport> {
    let device = parse(spec)?;
    let cuda = Cuda::is_available();
    let cudnn = cuda && Cuda::cudnn_is_available();
    let (torch_lib, torch_version) = loaded_torch();
    let memory = if device.is_cuda() {
        // Touch the device so the runtime is initialised before asking it for memory.
        let _ = tch::Tensor::zeros([1], (tch::Kind::Float, device));
        fedtalent_model::infer::cuda_mem_info()
    } else {
        None
    };
    Ok(DeviceReport {
        torch_version,
        torch_lib,
        device,
        cuda,
        cudnn,
        cudnn_version: cudnn.then(tch::utils::version_cudnn),
        gpus: if cuda { gpu_names() } else { Vec::new() },
        memory,
    })
}

/// The libtorch this process actually loaded (rpath or LD_LIBRARY_PATH), and its version from
/// the `version.py` of the torch package it belongs to.
fn loaded_torch() -> (String, String) {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let lib = maps
        .lines()
        .filter_map(|l| l.split_whitespace().nth(5))
        .find(|p| p.ends_with("/libtorch_cpu.so"))
        .map(str::to_string);
    let Some(lib) = lib else { return ("unknown".into(), "unknown".into()) };
    let dir = std::path::Path::new(&lib).parent().expect("a file has a parent").to_path_buf();
    let version = std::fs::read_to_string(dir.join("../version.py"))
        .ok()
        .and_then(|v| {
            v.lines().find_map(|l| l.strip_prefix("__version__ = ").map(|s| s.trim_matches(['\'', '"']).to_string()))
        })
        .unwrap_or_else(|| "unknown".into());
    (dir.display().to_string(), version)
}

/// GPU names from `nvidia-smi` when present (libtorch exposes no device-name call through tch).
fn gpu_names() -> Vec<String> {
    let out = std::process::Command::new("nvidia-smi")
        .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
        .output();
    match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).lines().map(str::to_string).collect(),
        _ => (0..Cuda::device_count()).map(|i| format!("cuda:{i} (name unavailable: no nvidia-smi)")).collect(),
    }
}

impl fmt::Display for DeviceReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "torch {} ({})", self.torch_version, self.torch_lib)?;
        writeln!(
            f,
            "CUDA available: {}, cuDNN available: {}{}",
            self.cuda,
            self.cudnn,
            self.cudnn_version.map_or(String::new(), |v| format!(" (version {v})"))
        )?;
        for (i, gpu) in self.gpus.iter().enumerate() {
            writeln!(f, "GPU {i}: {gpu}")?;
        }
        if let Some((free, total)) = self.memory {
            writeln!(
                f,
                "GPU memory: {:.1} GiB free of {:.1} GiB",
                free as f64 / 1073741824.0,
                total as f64 / 1073741824.0
            )?;
        }
        write!(f, "training device: {:?}", self.device)
    }
}
