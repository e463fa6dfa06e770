//! The network's input channels: each channel's name as datasets spell it (nnU-Net v2's
//! `channel_names`, the MSD's `modality`) and the intensity normalization it gets.
//!
//! The federation declares its channels (`[plan].input_channels`); every site's dataset must
//! declare the same names in the same order, since channel k of every site feeds the same input
//! filters of the shared network.

use std::fmt;

use serde::{Deserialize, Serialize};

/// The normalization a channel name selects. Serialized as nnU-Net's channel name for it, so a
/// dataset.json value and a declared scheme read the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum NormalizationScheme {
    /// Clip to the federation's foreground 0.5/99.5 percentiles, z-score with its foreground
    /// mean/std ([`crate::CtNormalization`], from the sites' merged histograms).
    #[serde(rename = "CT")]
    Ct,
    /// Per-image z-score (over the nonzero mask when the planner says so).
    #[serde(rename = "zscore")]
    ZScore,
    /// Intensities as stored.
    #[serde(rename = "noNorm")]
    NoNorm,
    /// Per-image min-max rescaling to [0, 1].
    #[serde(rename = "rescale_0_1")]
    RescaleTo01,
    /// uint8 intensities divided by 255.
    #[serde(rename = "rgb_to_0_1")]
    RgbTo01,
}

impl NormalizationScheme {
    /// nnU-Net v2's `get_normalization_scheme`: an exact, case-sensitive match of "CT", "noNorm",
    /// "zscore", "rescale_0_1" or "rgb_to_0_1"; any other name (MR sequences such as "T2", "FLAIR",
    /// "ADC", but also "ct") means z-score. nnU-Net's documentation spells the rescaling
    /// "rescale_to_0_1", but its code maps only "rescale_0_1", so nnU-Net z-scores a channel named
    /// "rescale_to_0_1"; this follows the code so that one dataset.json means the same in both.
    pub fn from_channel_name(name: &str) -> Self {
        match name {
            "CT" => Self::Ct,
            "noNorm" => Self::NoNorm,
            "zscore" => Self::ZScore,
            "rescale_0_1" => Self::RescaleTo01,
            "rgb_to_0_1" => Self::RgbTo01,
            _ => Self::ZScore,
        }
    }

    /// The channel name that selects this scheme (and its serialized form).
    pub fn channel_name(self) -> &'static str {
        match self {
            Self::Ct => "CT",
            Self::ZScore => "zscore",
            Self::NoNorm => "noNorm",
            Self::RescaleTo01 => "rescale_0_1",
            Self::RgbTo01 => "rgb_to_0_1",
        }
    }

    /// nnU-Net's class name for the scheme, as its plans record it.
    pub fn nnunet_class(self) -> &'static str {
        match self {
            Self::Ct => "CTNormalization",
            Self::ZScore => "ZScoreNormalization",
            Self::NoNorm => "NoNormalization",
            Self::RescaleTo01 => "RescaleTo01Normalization",
            Self::RgbTo01 => "RGBTo01Normalization",
        }
    }

    /// Whether the scheme can restrict itself to the nonzero mask (nnU-Net's
    /// `leaves_pixels_outside_mask_at_zero_if_use_mask_for_norm_is_true`): only z-score does.
    pub fn can_use_mask(self) -> bool {
        self == Self::ZScore
    }
}

/// One input channel of the network.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputChannel {
    /// The dataset's name of the channel: "CT", "T2", "ADC", "FLAIR", ...
    pub name: String,
    pub normalization: NormalizationScheme,
}

impl InputChannel {
    /// A channel named as in a dataset.json, with the normalization nnU-Net derives from the name.
    pub fn named(name: impl Into<String>) -> Self {
        let name = name.into();
        let normalization = NormalizationScheme::from_channel_name(&name);
        InputChannel { name, normalization }
    }
}

/// The network's input channels, in order. Written as a list of `{ name, normalization }`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct InputChannels(pub Vec<InputChannel>);

impl Default for InputChannels {
    /// One CT channel: every dataset and model from before channels were declared.
    fn default() -> Self {
        InputChannels::ct()
    }
}

/// Why a site's channels do not fit the federation's; the message names the channel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelMismatch {
    #[error("the dataset has {site_count} input channel(s) ({site}) but the federation declares {count} ({declared})")]
    Count { site_count: usize, site: InputChannels, count: usize, declared: InputChannels },
    #[error("input channel {index}: the dataset has {site:?} ({site_norm}) where the federation declares {declared:?} ({declared_norm})")]
    Channel { index: usize, site: String, site_norm: &'static str, declared: String, declared_norm: &'static str },
}

impl InputChannels {
    /// A single CT channel.
    pub fn ct() -> Self {
        InputChannels(vec![InputChannel::named("CT")])
    }

    /// Channels named in order, each normalized as nnU-Net derives from its name.
    pub fn named<S: Into<String>>(names: impl IntoIterator<Item = S>) -> Self {
        InputChannels(names.into_iter().map(InputChannel::named).collect())
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn iter(&self) -> impl Iterator<Item = &InputChannel> {
        self.0.iter()
    }

    /// Each channel's normalization, in order.
    pub fn schemes(&self) -> Vec<NormalizationScheme> {
        self.0.iter().map(|c| c.normalization).collect()
    }

    /// Whether any channel is CT (and so needs the federation's CT statistics).
    pub fn has_ct(&self) -> bool {
        self.0.iter().any(|c| c.normalization == NormalizationScheme::Ct)
    }

    /// Checks that a site's dataset channels (`self`) are the federation's `declared` ones: the
    /// same count, and channel by channel the same name and normalization.
    pub fn check_against(&self, declared: &InputChannels) -> Result<(), ChannelMismatch> {
        if self.len() != declared.len() {
            return Err(ChannelMismatch::Count {
                site_count: self.len(),
                site: self.clone(),
                count: declared.len(),
                declared: declared.clone(),
            });
        }
        match self.0.iter().zip(&declared.0).enumerate().find(|(_, (s, d))| s != d) {
            None => Ok(()),
            Some((index, (s, d))) => Err(ChannelMismatch::Channel {
                index,
                site: s.name.clone(),
                site_norm: s.normalization.channel_name(),
                declared: d.name.clone(),
                declared_norm: d.normalization.channel_name(),
            }),
        }
    }

    /// Problems of a declaration that needs no dataset: no channel, or a name given twice.
    pub fn problems(&self) -> Vec<String> {
        let mut out = Vec::new();
        if self.is_empty() {
            out.push("no input channel declared".to_string());
        }
        for (i, c) in self.0.iter().enumerate() {
            if c.name.trim().is_empty() {
                out.push(format!("input channel {i} has an empty name"));
            }
            if self.0[..i].iter().any(|o| o.name == c.name) {
                out.push(format!("input channel {i}: name {:?} is declared twice", c.name));
            }
        }
        out
    }
}

impl fmt::Display for InputChannels {
    /// `CT` or `T2 (zscore), ADC (zscore)`: the normalization is shown where the name does not
    /// say it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, c) in self.0.iter().enumerate() {
            if i > 0 {
                write!(f, ", ")?;
            }
            if c.name == c.normalization.channel_name() {
                write!(f, "{}", c.name)?;
            } else {
                write!(f, "{} ({})", c.name, c.normalization.channel_name())?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_names_map_as_in_nnunet_v2() {
        use NormalizationScheme::*;
        let cases = [
            ("CT", Ct),
            ("noNorm", NoNorm),
            ("zscore", ZScore),
            ("rescale_0_1", RescaleTo01),
            ("rgb_to_0_1", RgbTo01),
            // Anything else, including near misses, is z-score in nnU-Net v2.
            ("ct", ZScore),
            ("MRI", ZScore),
            ("T2", ZScore),
            ("FLAIR", ZScore),
            ("rescale_to_0_1", ZScore),
            ("", ZScore),
        ];
        for (name, scheme) in cases {
            assert_eq!(NormalizationScheme::from_channel_name(name), scheme, "{name:?}");
        }
        for scheme in [Ct, ZScore, NoNorm, RescaleTo01, RgbTo01] {
            assert_eq!(NormalizationScheme::from_channel_name(scheme.channel_name()), scheme);
            let json = serde_json::to_string(&scheme).unwrap();
            assert_eq!(json, format!("\"{}\"", scheme.channel_name()));
            assert_eq!(serde_json::from_str::<NormalizationScheme>(&json).unwrap(), scheme);
        }
    }

    #[test]
    fn a_mismatch_names_the_channel() {
        let fed = InputChannels::named(["T1", "T2"]);
        assert_eq!(InputChannels::named(["T1", "T2"]).check_against(&fed), Ok(()));
        let err = InputChannels::named(["T1", "ADC"]).check_against(&fed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "input channel 1: the dataset has \"ADC\" (zscore) where the federation declares \"T2\" (zscore)"
        );
        let err = InputChannels::ct().check_against(&fed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "the dataset has 1 input channel(s) (CT) but the federation declares 2 (T1 (zscore), T2 (zscore))"
        );
        let renormalized =
            InputChannels(vec![InputChannel { name: "CT".into(), normalization: NormalizationScheme::ZScore }]);
        assert!(renormalized.check_against(&InputChannels::ct()).is_err());
    }

    #[test]
    fn declarations_are_checked_and_default_to_ct() {
        assert_eq!(InputChannels::default(), InputChannels::ct());
        assert!(InputChannels::ct().problems().is_empty());
        assert_eq!(InputChannels(vec![]).problems(), vec!["no input channel declared"]);
        assert_eq!(
            InputChannels::named(["T2", "T2"]).problems(),
            vec!["input channel 1: name \"T2\" is declared twice"]
        );
    }
}
