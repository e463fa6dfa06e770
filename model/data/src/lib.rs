//! fedtalent-data: everything between a hospital's dataset folder and a training batch.
//!
//! Arrays are [z, y, x] everywhere; spacings are [z, y, x] in mm. Affines map voxel (x, y, z)
//! indices to world coordinates, as nibabel's `img.affine`.

pub mod alloc;
pub mod case_image;
pub mod dataset;
pub mod nifti_io;
pub mod resample;

pub use case_image::{case_image_files, channel_file, channel_suffix, read_case_image};
pub use dataset::{check, Case, CheckReport, ClassSummary, Dataset, Layout, Problem, SiteDataConfig, ValCases};
pub use nifti_io::{
    read_channel_files, read_header, read_image_info, read_label_nifti, read_nifti, read_nifti_channels,
    write_mask_nifti, ChannelImage, ImageInfo, NiftiIoError, SpatialHeader, Volume,
};
pub use normalization::{nonzero_mask, use_mask_for_norm, Normalization, NormalizationError, NormalizationScheme};
pub use resample::{
    anisotropy_axis, resample, resample_image, resample_labels, resample_labels_to_spacing, resample_probabilities,
    target_shape, Interp, LabelInterp,
};

pub mod augment;
pub mod loader;
pub mod normalization;
pub mod preprocess;
pub mod sampler;
pub mod spatial;
pub mod synth;

pub use augment::{AugmentConfig, Augmenter};
pub use loader::{Batch, BatchLoader, CpuBatch, LoaderOptions};
pub use preprocess::{
    load_for_inference, preprocess_case, preprocess_cases, site_histogram, CaseMeta, InferenceImage, PreprocessOptions,
    PreprocessedCase,
};
pub use spatial::SpatialTransform;
pub use synth::{generate_sites, round_trip_ceiling, ClassCeiling, GeneratedSite, SiteKind, SynthOptions};
