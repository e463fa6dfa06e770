//! A site's side of a round. Each stage method may be called once, in order; a repeated or
//! out-of-order call is refused (a site must never answer an unmasking request twice: two
//! answers with different survivor sets could reveal both masks of one site).

use std::collections::BTreeMap;

use rand::{CryptoRng, RngCore};

use crate::crypto::{self, KeyPair};
use crate::shamir::{self, Share};
use crate::{apply_mask, enough, AdvertiseKeys, EncryptedShare, Error, Params, Result, SiteId, UnmaskShares};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Advertised,
    Shared,
    Masked,
    Done,
}

pub struct Client {
    id: SiteId,
    params: Params,
    stage: Stage,
    c: KeyPair,
    s: KeyPair,
    /// U1: every advertised site's keys, by id (this site's included).
    peers: BTreeMap<SiteId, AdvertiseKeys>,
    /// This site's self-mask seed b.
    seed: [u8; 32],
    /// The shares this site holds, of each sender's (b, s_sk), its own included; its keys are U2.
    held: BTreeMap<SiteId, (Share, Share)>,
}

const PLAINTEXT_BYTES: usize = 8 + 2 * Share::BYTES;

impl Client {
    /// Stage 0: fresh key pairs for the round; the keys to advertise.
    pub fn new(id: SiteId, params: Params, rng: &mut (impl RngCore + CryptoRng)) -> (Self, AdvertiseKeys) {
        assert!(id != 0, "site ids start at 1");
        let (c, s) = (KeyPair::generate(rng), KeyPair::generate(rng));
        let keys = AdvertiseKeys { id, c_pk: c.public, s_pk: s.public };
        let client = Client {
            id,
            params,
            stage: Stage::Advertised,
            c,
            s,
            peers: BTreeMap::new(),
            seed: [0; 32],
            held: BTreeMap::new(),
        };
        (client, keys)
    }

    pub fn id(&self) -> SiteId {
        self.id
    }

    fn expect(&mut self, stage: Stage, next: Stage, name: &str) -> Result<()> {
        if self.stage != stage {
            return Err(Error::protocol(format!("site {}: {name} at stage {:?}", self.id, self.stage)));
        }
        self.stage = next;
        Ok(())
    }

    /// Stage 1: given U1 (every advertised site, this one included), the encrypted shares of
    /// this site's self-mask seed and mask key, one for each peer.
    pub fn share_keys(
        &mut self,
        advertised: &[AdvertiseKeys],
        rng: &mut (impl RngCore + CryptoRng),
    ) -> Result<Vec<EncryptedShare>> {
        self.expect(Stage::Advertised, Stage::Shared, "share keys")?;
        enough(&self.params, "share keys", advertised.len())?;
        let mut seen_keys = std::collections::BTreeSet::new();
        for k in advertised {
            if k.id == 0 || self.peers.insert(k.id, k.clone()).is_some() {
                return Err(Error::protocol(format!("site id {} advertised twice (or 0)", k.id)));
            }
            if !seen_keys.insert(k.c_pk) || !seen_keys.insert(k.s_pk) {
                return Err(Error::protocol(format!("site {}: a public key another site advertised too", k.id)));
            }
        }
        let own = AdvertiseKeys { id: self.id, c_pk: self.c.public, s_pk: self.s.public };
        if self.peers.get(&self.id) != Some(&own) {
            return Err(Error::protocol(format!("site {}: its own keys are not among the advertised ones", self.id)));
        }
        rng.fill_bytes(&mut self.seed);
        let ids: Vec<SiteId> = self.peers.keys().copied().collect();
        let seed_shares = shamir::split(&self.seed, self.params.threshold, &ids, rng);
        let key_shares = shamir::split(&self.s.secret, self.params.threshold, &ids, rng);
        let mut out = Vec::with_capacity(ids.len() - 1);
        for ((&to, b), s) in ids.iter().zip(seed_shares).zip(key_shares) {
            if to == self.id {
                self.held.insert(self.id, (b, s));
                continue;
            }
            let pair = crypto::agree(&self.c.secret, &self.peers[&to].c_pk, self.params.round, crypto::LABEL_SHARES)?;
            let mut plain = Vec::with_capacity(PLAINTEXT_BYTES);
            plain.extend_from_slice(&self.id.to_le_bytes());
            plain.extend_from_slice(&to.to_le_bytes());
            plain.extend_from_slice(&b.to_bytes());
            plain.extend_from_slice(&s.to_bytes());
            out.push(EncryptedShare {
                from: self.id,
                to,
                ciphertext: crypto::seal(&pair, self.params.round, self.id, to, &plain),
            });
        }
        Ok(out)
    }

    /// Stage 2: given the shares relayed to this site (U2 = their senders and this site), its
    /// masked input: `values` encoded with `weight`, plus its self mask, plus or minus the
    /// pairwise mask of each peer in U2.
    pub fn masked_input(&mut self, received: &[EncryptedShare], values: &[f32], weight: f64) -> Result<Vec<u32>> {
        self.expect(Stage::Shared, Stage::Masked, "masked input")?;
        for e in received {
            let Some(sender) = self.peers.get(&e.from).filter(|_| e.from != self.id) else {
                return Err(Error::protocol(format!("site {}: shares relayed from unknown site {}", self.id, e.from)));
            };
            if e.to != self.id {
                return Err(Error::protocol(format!("site {}: shares for site {} relayed to it", self.id, e.to)));
            }
            let pair = crypto::agree(&self.c.secret, &sender.c_pk, self.params.round, crypto::LABEL_SHARES)?;
            let plain = crypto::open(&pair, self.params.round, e.from, e.to, &e.ciphertext)?;
            if plain.len() != PLAINTEXT_BYTES
                || plain[..4] != e.from.to_le_bytes()
                || plain[4..8] != self.id.to_le_bytes()
            {
                return Err(Error::protocol(format!(
                    "site {}: the shares from site {} name other sites",
                    self.id, e.from
                )));
            }
            let b = Share::from_bytes(&plain[8..8 + Share::BYTES])?;
            let s = Share::from_bytes(&plain[8 + Share::BYTES..])?;
            if b.x != self.id || s.x != self.id {
                return Err(Error::protocol(format!(
                    "site {}: site {} sent shares of another holder",
                    self.id, e.from
                )));
            }
            if self.held.insert(e.from, (b, s)).is_some() {
                return Err(Error::protocol(format!("site {}: shares from site {} relayed twice", self.id, e.from)));
            }
        }
        enough(&self.params, "masked input", self.held.len())?;
        let mut words = self.params.encoding.encode(values, weight)?;
        apply_mask(&mut words, &self.seed, true);
        for &peer in self.held.keys().filter(|&&p| p != self.id) {
            let seed =
                crypto::agree(&self.s.secret, &self.peers[&peer].s_pk, self.params.round, crypto::LABEL_PAIRWISE)?;
            apply_mask(&mut words, &seed, self.id > peer);
        }
        Ok(words)
    }

    /// Stage 3: the shares of each survivor's self-mask seed and of each dropped site's mask
    /// key. Refused when the survivors are fewer than the threshold, when a site is named both
    /// survivor and dropped, when this site is not a survivor, or when a named site is not in U2.
    pub fn unmask(&mut self, survivors: &[SiteId], dropped: &[SiteId]) -> Result<UnmaskShares> {
        self.expect(Stage::Masked, Stage::Done, "unmask")?;
        enough(&self.params, "unmask", survivors.len())?;
        if !survivors.contains(&self.id) {
            return Err(Error::protocol(format!("site {}: asked to unmask but not named a survivor", self.id)));
        }
        let mut named = std::collections::BTreeSet::new();
        for id in survivors.iter().chain(dropped) {
            if !named.insert(*id) {
                return Err(Error::protocol(format!(
                    "site {}: site {id} named twice in the unmasking request",
                    self.id
                )));
            }
            if !self.held.contains_key(id) {
                return Err(Error::protocol(format!("site {}: site {id} did not share its keys", self.id)));
            }
        }
        Ok(UnmaskShares {
            from: self.id,
            seed_shares: survivors.iter().map(|id| (*id, self.held[id].0)).collect(),
            key_shares: dropped.iter().map(|id| (*id, self.held[id].1)).collect(),
        })
    }
}
