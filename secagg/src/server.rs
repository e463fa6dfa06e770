//! The coordinator's side of a round: it collects and relays, and in the end holds only the
//! sum of the survivors' inputs. Each stage collects messages from the sites still in the
//! round, then is closed by the caller (at its deadline, or once every expected site sent);
//! closing a stage with fewer than the threshold aborts the round with
//! [`Error::TooFewSites`].

use std::collections::{BTreeMap, BTreeSet};

use crate::crypto::{self, KeyPair};
use crate::shamir::{self, Share};
use crate::{apply_mask, enough, AdvertiseKeys, EncryptedShare, Error, Params, Result, SiteId, UnmaskShares};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Advertise,
    ShareKeys,
    MaskedInput,
    Unmask,
    Done,
}

pub struct Server {
    params: Params,
    /// The input's length in words.
    len: usize,
    stage: Stage,
    keys: BTreeMap<SiteId, AdvertiseKeys>,
    /// Stage 1: by recipient, the ciphertexts addressed to it; the senders are U2.
    mailbox: BTreeMap<SiteId, Vec<EncryptedShare>>,
    shared: BTreeSet<SiteId>,
    /// Stage 2: the running sum of the masked inputs; their senders are U3.
    sum: Vec<u32>,
    masked: BTreeSet<SiteId>,
    /// Stage 3: the answers, by sender.
    answers: BTreeMap<SiteId, UnmaskShares>,
}

/// What the unmasking request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unmasking {
    /// U3: the sites whose masked input counts.
    pub survivors: Vec<SiteId>,
    /// U2 \ U3: sites that shared keys but whose masked input did not arrive.
    pub dropped: Vec<SiteId>,
}

impl Server {
    /// A round over inputs of `len` words.
    pub fn new(params: Params, len: usize) -> Self {
        Server {
            params,
            len,
            stage: Stage::Advertise,
            keys: BTreeMap::new(),
            mailbox: BTreeMap::new(),
            shared: BTreeSet::new(),
            sum: vec![0; len],
            masked: BTreeSet::new(),
            answers: BTreeMap::new(),
        }
    }

    pub fn params(&self) -> &Params {
        &self.params
    }

    pub fn stage(&self) -> Stage {
        self.stage
    }

    fn expect(&self, stage: Stage, what: &str) -> Result<()> {
        if self.stage != stage {
            return Err(Error::protocol(format!("{what} at stage {:?}", self.stage)));
        }
        Ok(())
    }

    /// Stage 0: a site's keys (once per site).
    pub fn advertise(&mut self, keys: AdvertiseKeys) -> Result<()> {
        self.expect(Stage::Advertise, "keys advertised")?;
        if keys.id == 0 || self.keys.contains_key(&keys.id) {
            return Err(Error::protocol(format!("site {} advertised keys twice (or id 0)", keys.id)));
        }
        self.keys.insert(keys.id, keys);
        Ok(())
    }

    /// Closes stage 0: U1, to relay to each of its sites.
    pub fn close_advertise(&mut self) -> Result<Vec<AdvertiseKeys>> {
        self.expect(Stage::Advertise, "closing the advertisement")?;
        self.stage = Stage::Done;
        enough(&self.params, "advertise keys", self.keys.len())?;
        self.stage = Stage::ShareKeys;
        Ok(self.keys.values().cloned().collect())
    }

    /// Stage 1: `from`'s ciphertexts, exactly one to every other site of U1.
    pub fn share_keys(&mut self, from: SiteId, shares: Vec<EncryptedShare>) -> Result<()> {
        self.expect(Stage::ShareKeys, "shares")?;
        if !self.keys.contains_key(&from) || self.shared.contains(&from) {
            return Err(Error::protocol(format!("site {from}: shares from a site not in U1, or sent twice")));
        }
        let to: BTreeSet<SiteId> = shares.iter().map(|e| e.to).collect();
        let others: BTreeSet<SiteId> = self.keys.keys().copied().filter(|&k| k != from).collect();
        if shares.iter().any(|e| e.from != from) || to != others || shares.len() != others.len() {
            return Err(Error::protocol(format!("site {from}: its shares are not one to every other site of U1")));
        }
        for e in shares {
            self.mailbox.entry(e.to).or_default().push(e);
        }
        self.shared.insert(from);
        Ok(())
    }

    /// Closes stage 1: U2 (the sites that shared).
    pub fn close_share_keys(&mut self) -> Result<Vec<SiteId>> {
        self.expect(Stage::ShareKeys, "closing the key sharing")?;
        self.stage = Stage::Done;
        enough(&self.params, "share keys", self.shared.len())?;
        self.stage = Stage::MaskedInput;
        Ok(self.shared.iter().copied().collect())
    }

    /// The ciphertexts to relay to `to`: from the sites of U2 only.
    pub fn shares_for(&self, to: SiteId) -> Vec<EncryptedShare> {
        let mut relayed: Vec<EncryptedShare> = self.mailbox.get(&to).cloned().unwrap_or_default();
        relayed.retain(|e| self.shared.contains(&e.from));
        relayed
    }

    /// Stage 2: `from`'s masked input, added to the running sum.
    pub fn masked_input(&mut self, from: SiteId, words: &[u32]) -> Result<()> {
        self.expect(Stage::MaskedInput, "masked input")?;
        if !self.shared.contains(&from) || self.masked.contains(&from) {
            return Err(Error::protocol(format!("site {from}: masked input from a site not in U2, or sent twice")));
        }
        if words.len() != self.len {
            return Err(Error::protocol(format!(
                "site {from}: {} masked words, the input has {}",
                words.len(),
                self.len
            )));
        }
        for (s, w) in self.sum.iter_mut().zip(words) {
            *s = s.wrapping_add(*w);
        }
        self.masked.insert(from);
        Ok(())
    }

    /// Closes stage 2: the unmasking request to send each survivor.
    pub fn close_masked_input(&mut self) -> Result<Unmasking> {
        self.expect(Stage::MaskedInput, "closing the masked input")?;
        self.stage = Stage::Done;
        enough(&self.params, "masked input", self.masked.len())?;
        self.stage = Stage::Unmask;
        Ok(self.unmasking())
    }

    fn unmasking(&self) -> Unmasking {
        Unmasking {
            survivors: self.masked.iter().copied().collect(),
            dropped: self.shared.difference(&self.masked).copied().collect(),
        }
    }

    /// Stage 3: a survivor's shares, which must answer exactly the unmasking request.
    pub fn unmask(&mut self, answer: UnmaskShares) -> Result<()> {
        self.expect(Stage::Unmask, "unmasking shares")?;
        let from = answer.from;
        if !self.masked.contains(&from) || self.answers.contains_key(&from) {
            return Err(Error::protocol(format!("site {from}: unmasking shares from a non-survivor, or sent twice")));
        }
        let request = self.unmasking();
        let seeds: Vec<SiteId> = answer.seed_shares.iter().map(|(id, _)| *id).collect();
        let keys: Vec<SiteId> = answer.key_shares.iter().map(|(id, _)| *id).collect();
        if seeds != request.survivors || keys != request.dropped {
            return Err(Error::protocol(format!("site {from}: its shares do not answer the unmasking request")));
        }
        if answer.seed_shares.iter().chain(&answer.key_shares).any(|(_, s)| s.x != from) {
            return Err(Error::protocol(format!("site {from}: shares of another holder")));
        }
        self.answers.insert(from, answer);
        Ok(())
    }

    /// How many sites advertised keys so far.
    pub fn advertised(&self) -> usize {
        self.keys.len()
    }

    /// How many sites sent their shares so far.
    pub fn shared(&self) -> usize {
        self.shared.len()
    }

    /// How many unmasking answers arrived (the round can finish with the threshold).
    pub fn answers(&self) -> usize {
        self.answers.len()
    }

    /// Closes stage 3: rebuilds the survivors' self-mask seeds and the dropped sites' mask keys,
    /// removes their masks, and returns `Σ_{u∈U3} x_u` (encoded) with U3.
    pub fn finish(&mut self) -> Result<(Vec<u32>, Vec<SiteId>)> {
        self.expect(Stage::Unmask, "finishing")?;
        self.stage = Stage::Done;
        enough(&self.params, "unmask", self.answers.len())?;
        let t = self.params.threshold;
        let request = self.unmasking();
        let gather = |pick: &dyn Fn(&UnmaskShares) -> &Vec<(SiteId, Share)>, id: SiteId| -> Vec<Share> {
            self.answers
                .values()
                .map(|a| pick(a).iter().find(|(i, _)| *i == id).expect("checked on arrival").1)
                .collect()
        };
        let mut sum = std::mem::take(&mut self.sum);
        for &u in &request.survivors {
            let seed = shamir::combine(&gather(&|a| &a.seed_shares, u), t)?;
            apply_mask(&mut sum, &seed, false);
        }
        for &d in &request.dropped {
            let secret = shamir::combine(&gather(&|a| &a.key_shares, d), t)?;
            let pair = KeyPair::from_secret(secret);
            if pair.public != self.keys[&d].s_pk {
                return Err(Error::protocol(format!("the rebuilt mask key of site {d} is not the one it advertised")));
            }
            // Survivor u added +mask if u > d, −mask if u < d: remove exactly that.
            for &u in &request.survivors {
                let seed = crypto::agree(&secret, &self.keys[&u].s_pk, self.params.round, crypto::LABEL_PAIRWISE)?;
                apply_mask(&mut sum, &seed, u < d);
            }
        }
        Ok((sum, request.survivors))
    }
}
