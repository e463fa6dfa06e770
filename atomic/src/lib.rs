//! Atomic file writes, the one implementation every fedtalent crate uses (keys and certificates,
//! models and checkpoints, site state, the preprocessing cache).
//!
//! A reader sees the old file or the new one, never a part: the bytes go to a temporary sibling
//! in the same directory, which is synced and renamed over the target, and the directory is
//! synced so that the rename survives a crash. The temporary file is created new (`O_EXCL`:
//! a file or symlink planted at its name is never written through) with its final mode before
//! any byte is written, so a private key is never readable by others, even transiently.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Writes `bytes` to `path` atomically with permission bits `mode` (on Unix).
pub fn write(path: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    write_with(path, mode, |file| file.write_all(bytes))
}

/// Writes `path` atomically through `fill`, which writes the content into the open temporary
/// file (buffer it as needed). Errors are `fill`'s own or an I/O error naming the file.
pub fn write_with<E: From<io::Error>>(
    path: &Path,
    mode: u32,
    fill: impl FnOnce(&mut File) -> Result<(), E>,
) -> Result<(), E> {
    let (mut file, tmp) = create_temp_sibling(path, mode)?;
    let filled = fill(&mut file).and_then(|()| file.sync_all().map_err(|e| named(e, "syncing", &tmp).into()));
    drop(file);
    finish(path, &tmp, filled)
}

/// Writes `path` atomically through `write`, which writes the temporary file by its path (for
/// writers that open the file themselves, such as safetensors'); the file is new and has `mode`
/// before `write` runs, and `mode` again after (a writer that re-created it would have reset it).
pub fn write_via_path<E: From<io::Error>>(
    path: &Path,
    mode: u32,
    write: impl FnOnce(&Path) -> Result<(), E>,
) -> Result<(), E> {
    let (file, tmp) = create_temp_sibling(path, mode)?;
    drop(file);
    let written = write(&tmp).and_then(|()| {
        set_mode(&tmp, mode)?;
        File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| named(e, "syncing", &tmp).into())
    });
    finish(path, &tmp, written)
}

/// Renames the written temporary file into place and syncs the directory, or removes it.
fn finish<E: From<io::Error>>(path: &Path, tmp: &Path, written: Result<(), E>) -> Result<(), E> {
    let result = written.and_then(|()| {
        fs::rename(tmp, path)
            .map_err(|e| io::Error::new(e.kind(), format!("renaming {} to {}: {e}", tmp.display(), path.display())))?;
        let dir = parent_dir(path);
        File::open(dir).and_then(|d| d.sync_all()).map_err(|e| named(e, "syncing directory", dir).into())
    });
    if result.is_err() {
        let _ = fs::remove_file(tmp);
    }
    result
}

/// Creates a new, empty temporary sibling of `path` (`.<name>.tmp.<pid>`, then `-1`, `-2`, …
/// while a name is taken), its directory first if missing. `O_EXCL` (`create_new`): an existing
/// file, or a symlink planted at that name, is never opened, so a write cannot be redirected
/// elsewhere. `mode` is set exactly (on Unix; open() would filter it by the umask).
pub fn create_temp_sibling(path: &Path, mode: u32) -> io::Result<(File, PathBuf)> {
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{}: no file name", path.display())))?
        .to_string_lossy()
        .into_owned();
    let dir = parent_dir(path);
    fs::create_dir_all(dir).map_err(|e| named(e, "creating directory", dir))?;
    for attempt in 0..100u32 {
        let suffix = if attempt == 0 { String::new() } else { format!("-{attempt}") };
        let tmp = path.with_file_name(format!(".{name}.tmp.{}{suffix}", std::process::id()));
        let mut options = OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
        match options.open(&tmp) {
            Ok(file) => {
                set_mode(&tmp, mode)?;
                return Ok((file, tmp));
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(named(e, "creating", &tmp)),
        }
    }
    Err(io::Error::new(io::ErrorKind::AlreadyExists, format!("no free temporary name next to {}", path.display())))
}

fn set_mode(path: &Path, mode: u32) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(path, fs::Permissions::from_mode(mode))
            .map_err(|e| named(e, "setting the mode of", path))?;
    }
    #[cfg(not(unix))]
    let _ = (path, mode);
    Ok(())
}

fn parent_dir(path: &Path) -> &Path {
    path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."))
}

/// The I/O error with what was being done and to which file.
fn named(e: io::Error, doing: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{doing} {}: {e}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn mode(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    /// A symlink planted at the temporary name is neither written through nor renamed into
    /// place; the file gets exactly its mode, whatever the umask.
    #[test]
    fn planted_symlinks_are_not_written_through_and_modes_are_exact() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("site.key");
        let victim = dir.path().join("victim");
        fs::write(&victim, "keep").unwrap();
        std::os::unix::fs::symlink(&victim, dir.path().join(format!(".site.key.tmp.{}", std::process::id()))).unwrap();
        write(&path, b"secret", 0o600).unwrap();
        assert_eq!(fs::read_to_string(&victim).unwrap(), "keep");
        assert!(!fs::symlink_metadata(&path).unwrap().file_type().is_symlink());
        assert_eq!(fs::read_to_string(&path).unwrap(), "secret");
        assert_eq!(mode(&path), 0o600);
        write(&path, b"public", 0o644).unwrap();
        assert_eq!((fs::read_to_string(&path).unwrap().as_str(), mode(&path)), ("public", 0o644));
    }

    /// A failing writer leaves the old file and no temporary file behind.
    #[test]
    fn a_failed_write_keeps_the_old_file_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.json");
        write(&path, b"old", 0o600).unwrap();
        let failed: io::Result<()> = write_with(&path, 0o600, |file| {
            file.write_all(b"half")?;
            Err(io::Error::other("disk full"))
        });
        assert!(failed.unwrap_err().to_string().contains("disk full"));
        let failed: io::Result<()> = write_via_path(&path, 0o600, |_| Err(io::Error::other("writer failed")));
        assert!(failed.is_err());
        assert_eq!(fs::read_to_string(&path).unwrap(), "old");
        let names: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("state.json")]);
    }

    /// A writer that re-creates the file by its path still leaves it with its mode, in place.
    #[test]
    fn writers_by_path_keep_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/model.safetensors");
        write_via_path(&path, 0o600, |tmp| {
            fs::remove_file(tmp)?;
            fs::write(tmp, b"tensors")
        })
        .unwrap();
        assert_eq!((fs::read(&path).unwrap(), mode(&path)), (b"tensors".to_vec(), 0o600));
    }
}
