//! Secure aggregation of the backbone (SecAgg, Bonawitz et al., CCS 2017; the protocol Flower's
//! SecAgg+ workflow runs, here with every site the neighbour of every other: a federation of
//! hospitals has a handful of sites, where SecAgg+'s sparse neighbour graph only saves work for
//! thousands). Pure state machines: the caller moves the messages.
//!
//! A round, for sites with ids `1..=n` (the Shamir evaluation points) and threshold `t`:
//! 0. **Advertise keys**: each site makes two X25519 key pairs, `c` (to encrypt shares to a
//!    peer) and `s` (pairwise masks), and sends both public keys ([`AdvertiseKeys`]). The
//!    coordinator relays the set `U1` to every site in it; it cannot use them (it holds no
//!    secret key).
//! 1. **Share keys**: each site draws a self-mask seed `b`, Shamir-splits `b` and its secret `s`
//!    key into `t`-of-`|U1|` shares and sends each peer its two shares encrypted with
//!    ChaCha20-Poly1305 under HKDF(X25519(c_sk, peer's c_pk)) ([`EncryptedShare`]). The
//!    coordinator relays them; `U2` = the sites whose shares it relayed.
//! 2. **Masked input**: each site of `U2` sends `y = x + PRG(b) + Σ_{v∈U2, v≠u} ±PRG(s_uv)`
//!    over Z_2^32 (+ where u > v, − where u < v, so pairwise masks cancel in the sum), with
//!    `x` its fixed-point encoded, sqrt(n)-weighted input ([`Encoding`]), and
//!    `s_uv = HKDF(X25519(s_sk_u, s_pk_v))`. `U3` = the sites whose masked input arrived.
//! 3. **Unmask**: the coordinator names the survivors `U3` and the dropped `U2 \ U3`; each
//!    survivor reveals its share of every survivor's `b` and of every dropped site's `s` key,
//!    never both for one site ([`UnmaskShares`]). With `t` answers the coordinator rebuilds
//!    them, removes the self masks of `U3` and the pairwise masks the survivors share with the
//!    dropped sites, and holds `Σ_{u∈U3} x_u` and nothing else.
//!
//! Any stage with fewer than `t` sites aborts the round ([`Error::TooFewSites`]); nothing of it
//! is reused: every round starts from fresh keys.
//!
//! Security model (as SecAgg's): the coordinator is honest-but-curious and fewer than `t`
//! sites collude with it; the coordinator also authenticates the sites (mutual TLS), which is
//! what keeps it from inventing sites (SecAgg's active-adversary variant signs the keys).

pub mod client;
mod crypto;
pub mod encoding;
pub mod server;
pub mod shamir;

pub use client::Client;
pub use encoding::Encoding;
pub use server::{Server, Unmasking};
pub use shamir::Share;

use serde::{Deserialize, Serialize};

/// A site's id in a round: its Shamir evaluation point, 1-based (0 would reveal the secret).
pub type SiteId = u32;

/// What every party of a round agrees on before it starts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// Binds keys, masks and ciphertexts to the round.
    pub round: u32,
    /// Shares needed to rebuild a secret, and the fewest sites any stage may go on with.
    pub threshold: usize,
    pub encoding: Encoding,
}

/// Stage 0, site → coordinator → every site: a site's public keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertiseKeys {
    pub id: SiteId,
    /// Encrypts the shares sent to this site.
    pub c_pk: [u8; 32],
    /// Agrees this site's pairwise masks.
    pub s_pk: [u8; 32],
}

/// Stage 1, site → coordinator → `to`: the shares of `from`'s secrets that `to` keeps,
/// encrypted to `to` (the coordinator cannot read them).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptedShare {
    pub from: SiteId,
    pub to: SiteId,
    pub ciphertext: Vec<u8>,
}

/// Stage 3, site → coordinator: the shares it held of each survivor's self-mask seed and of
/// each dropped site's mask key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnmaskShares {
    pub from: SiteId,
    pub seed_shares: Vec<(SiteId, Share)>,
    pub key_shares: Vec<(SiteId, Share)>,
}

/// Why a stage could not go on. `TooFewSites` is the clean abort of a round; the others name
/// a peer's message that breaks the protocol.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    #[error("secure aggregation of round {round} aborted at {stage}: {got} sites, the threshold is {threshold}")]
    TooFewSites { round: u32, stage: &'static str, got: usize, threshold: usize },
    #[error("secure aggregation: {0}")]
    Protocol(String),
    #[error("secure aggregation: input value {value} at index {index} is not a finite number")]
    NotFinite { index: usize, value: f32 },
    #[error("secure aggregation: {0}")]
    Overflow(String),
}

impl Error {
    fn protocol(reason: impl Into<String>) -> Self {
        Error::Protocol(reason.into())
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// Checks that a stage goes on with at least the threshold.
fn enough(params: &Params, stage: &'static str, got: usize) -> Result<()> {
    if got < params.threshold {
        return Err(Error::TooFewSites { round: params.round, stage, got, threshold: params.threshold });
    }
    Ok(())
}

/// Adds (`sign` +1) or subtracts (−1) the PRG stream of `seed` to `words`, over Z_2^32.
fn apply_mask(words: &mut [u32], seed: &[u8; 32], add: bool) {
    let mut prg = crypto::Prg::new(seed);
    for w in words.iter_mut() {
        let m = prg.next();
        *w = if add { w.wrapping_add(m) } else { w.wrapping_sub(m) };
    }
}
