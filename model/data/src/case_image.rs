//! A case's image as channels, however a dataset stores them: one 3D file (one channel), one 4D
//! file whose volumes are the channels (the MSD's layout), or one 3D file per channel named
//! `<case>_0000`, `<case>_0001`, ... (nnU-Net's). A case's image is named by one path: the single
//! file, or channel 0's `_0000` file, whose siblings hold the other channels.

use std::path::{Path, PathBuf};

use crate::nifti_io::{read_channel_files, read_image_info, read_nifti_channels, ChannelImage, NiftiIoError};

/// File endings a NIfTI image may have, longest first so `.nii.gz` wins over `.gz`.
const ENDINGS: [&str; 6] = [".nii.gz", ".hdr.gz", ".img.gz", ".nii", ".hdr", ".img"];

fn invalid(path: &Path, what: String) -> NiftiIoError {
    NiftiIoError::Invalid { path: path.display().to_string(), what }
}

/// A file name split into its stem and its NIfTI ending (empty when it has none we know).
fn split_ending(name: &str) -> (&str, &str) {
    let lower = name.to_ascii_lowercase();
    match ENDINGS.iter().find(|e| lower.ends_with(*e)) {
        Some(e) => name.split_at(name.len() - e.len()),
        None => (name, ""),
    }
}

/// The channel index of an nnU-Net channel file (`<case>_0003.nii.gz` → 3) and the case's stem.
pub fn channel_suffix(path: &Path) -> Option<(String, usize)> {
    let name = path.file_name()?.to_string_lossy().to_string();
    let (stem, _) = split_ending(&name);
    let (case, index) = stem.rsplit_once('_')?;
    if index.len() != 4 || !index.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((case.to_string(), index.parse().ok()?))
}

/// The file of channel `k` of the case whose channel 0 is `first` (`<case>_0000<ending>`).
pub fn channel_file(first: &Path, k: usize) -> Option<PathBuf> {
    let name = first.file_name()?.to_string_lossy().to_string();
    let (stem, ending) = split_ending(&name);
    let case = stem.strip_suffix("_0000")?;
    Some(first.with_file_name(format!("{case}_{k:04}{ending}")))
}

/// The files that hold a case's `channels` channels: `path` alone when it is one 3D file of a
/// one-channel dataset or a 4D file with one volume per channel, else `path` (a `_0000` file)
/// and its `_0001` … siblings. Reads headers only; errors name the file and what was expected.
pub fn case_image_files(path: &Path, channels: usize) -> Result<Vec<PathBuf>, NiftiIoError> {
    let volumes = read_image_info(path)?.channels;
    if volumes > 1 {
        if volumes != channels {
            return Err(invalid(
                path,
                format!(
                    "a 4D image with {volumes} volumes where {channels} input channel(s) are declared (one 3D volume \
                     each)"
                ),
            ));
        }
        return Ok(vec![path.to_path_buf()]);
    }
    if channels == 1 {
        return Ok(vec![path.to_path_buf()]);
    }
    if channel_file(path, 0).is_none() {
        return Err(invalid(
            path,
            format!(
                "one 3D volume where {channels} input channels are declared: expected a 4D image with \
                 {channels} volumes or the files <case>_0000 … _{:04}",
                channels - 1
            ),
        ));
    }
    let files: Vec<PathBuf> = (0..channels).filter_map(|k| channel_file(path, k)).collect();
    if let Some(missing) = files.iter().find(|f| !f.exists()) {
        return Err(invalid(
            missing,
            format!("missing: {channels} input channels are declared, one file each ({})", path.display()),
        ));
    }
    Ok(files)
}

/// Reads a case's image as its `channels` channels (see [`case_image_files`]), refusing any
/// other channel count by name.
pub fn read_case_image(path: &Path, channels: usize) -> Result<ChannelImage, NiftiIoError> {
    let files = case_image_files(path, channels)?;
    let image = match files.as_slice() {
        [single] => read_nifti_channels(single)?,
        several => read_channel_files(several)?,
    };
    if image.channels.len() != channels {
        return Err(invalid(
            path,
            format!("{} channel(s), but {channels} input channel(s) are declared", image.channels.len()),
        ));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_files_follow_nnunets_names() {
        let first = Path::new("/d/imagesTr/prostate_00_0000.nii.gz");
        assert_eq!(channel_file(first, 1).unwrap(), Path::new("/d/imagesTr/prostate_00_0001.nii.gz"));
        assert_eq!(channel_file(Path::new("/d/a_0000.hdr"), 12).unwrap(), Path::new("/d/a_0012.hdr"));
        assert!(channel_file(Path::new("/d/a.nii.gz"), 1).is_none());
        assert_eq!(channel_suffix(Path::new("/d/case_1_0003.nii")), Some(("case_1".into(), 3)));
        assert_eq!(channel_suffix(Path::new("/d/case.nii.gz")), None);
        assert_eq!(channel_suffix(Path::new("/d/case_12345.nii.gz")), None);
    }
}
