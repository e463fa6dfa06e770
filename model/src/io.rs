//! safetensors files, written atomically (temp file in the same dir, fsync, rename, fsync dir), so a
//! crash never leaves a half-written model, checkpoint or optimizer state behind. Every file is
//! owner-only (0600): they hold model weights (a site's heads are its own).

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use tch::{Device, Tensor};

/// Reads every tensor of a safetensors file (on the CPU), with the file named in errors.
pub fn read_tensors(path: &Path) -> Result<Vec<(String, Tensor)>> {
    Tensor::read_safetensors(path).with_context(|| format!("reading safetensors file {}", path.display()))
}

/// Writes named tensors as safetensors, atomically.
pub fn write_tensors_atomic(path: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let cpu: Vec<(String, Tensor)> =
        tensors.iter().map(|(n, t)| (n.clone(), t.detach().to_device(Device::Cpu).contiguous())).collect();
    write_atomic_with(path, |tmp| {
        Tensor::write_safetensors(&cpu, tmp).with_context(|| format!("writing {}", tmp.display()))
    })
}

/// Writes bytes atomically.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    fedtalent_atomic::write(path, bytes, 0o600).with_context(|| format!("writing {}", path.display()))
}

/// Runs `write` on a new owner-only temporary sibling of `path`, then syncs and renames it into
/// place ([`fedtalent_atomic::write_via_path`]).
pub fn write_atomic_with(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    fedtalent_atomic::write_via_path(path, 0o600, write)
}

/// Creates `dir` (and its parents) and makes it owner-only (0700): a state dir of model data.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    set_owner_only(dir, 0o700)
}

fn set_owner_only(path: &Path, mode: u32) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .with_context(|| format!("making {} owner-only", path.display()))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// Issue 21 item 17: model files are owner-only, and a symlink planted at the temporary
    /// name is not written through (nor renamed into place).
    #[test]
    fn atomic_writes_are_owner_only_and_ignore_planted_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        // The temporary names this writer used before and uses first now.
        for name in [".state.json.tmp-", ".state.json.tmp."] {
            let planted = dir.path().join(format!("{name}{}", std::process::id()));
            std::os::unix::fs::symlink(&victim, &planted).unwrap();
        }
        write_bytes_atomic(&path, b"model").unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&path).unwrap(), "model");
        assert_eq!(mode(&path), 0o600);
        let private = dir.path().join("site-state");
        create_private_dir(&private).unwrap();
        assert_eq!(mode(&private), 0o700);
    }
}
