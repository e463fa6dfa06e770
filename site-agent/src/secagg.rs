//! A site's part in a round's secure aggregation (`[plan.privacy].secure_aggregation`, crate
//! `fedtalent-secagg`): before training it advertises fresh keys and sends each peer its shares
//! (encrypted to that peer, relayed by the coordinator); its upload carries the backbone change,
//! sqrt(n)-weighted, clamped, fixed-point encoded and masked, as one `I32` tensor instead of the
//! backbone tensors; after the upload it answers the unmasking request.
//!
//! With DP on, the site clips its own change to `clip_norm` before masking (the coordinator
//! cannot see one site's change to clip it): Flower's client-side fixed clipping.

use std::future::Future;

use anyhow::{anyhow, bail, Result};
use fedtalent_model::wire;
use fedtalent_model::MultiTalentNet;
use fedtalent_protocol::{
    DType, EncryptedShare, Message, Plan, SecAggReply, SecAggRequest, SecAggRound, SecAggStage, TensorSet, WireTensor,
    MASKED_BACKBONE,
};
use fedtalent_secagg::{Client, Encoding, Params};
use tch::{Kind, Tensor};
use tracing::{info, warn};

/// The site's protocol state between its key stages and its unmasking answer.
pub(crate) struct SiteSecAgg {
    round: u32,
    client: Client,
    relayed: Vec<EncryptedShare>,
    /// The global backbone the round started from (the change is measured against it).
    global: Vec<Tensor>,
}

/// One request to the coordinator and its reply (on the agent's connection, whatever its
/// transport).
pub(crate) trait Request<E>: Fn(Message) -> Self::Reply {
    type Reply: Future<Output = std::result::Result<Message, E>>;
}

impl<F, Fut, E> Request<E> for F
where
    F: Fn(Message) -> Fut,
    Fut: Future<Output = std::result::Result<Message, E>>,
{
    type Reply = Fut;
}

/// One stage's request; `Ok(None)`: the coordinator dropped the site from the round.
async fn stage<E: Into<anyhow::Error>>(
    request: &impl Request<E>,
    round: u32,
    stage: SecAggStage,
) -> Result<Option<SecAggReply>> {
    match request(Message::SecAgg(SecAggRequest { round, stage })).await.map_err(Into::into)? {
        Message::SecAggReply(reply) => Ok(Some(reply)),
        Message::Error(refusal) => {
            warn!(round, "dropped from the round's secure aggregation: {refusal}");
            Ok(None)
        }
        other => bail!("unexpected {} in secure aggregation", other.kind()),
    }
}

fn params(plan: &Plan, round: u32, threshold: u32) -> Result<Params> {
    let p =
        plan.privacy.filter(|p| p.secure_aggregation).ok_or_else(|| anyhow!("the plan has no secure aggregation"))?;
    let encoding = Encoding { clip_range: p.secagg_clip_range, frac_bits: p.secagg_frac_bits };
    Ok(Params { round, threshold: threshold as usize, encoding })
}

/// Stages 0 and 1, before training: `Ok(None)` when the site is not in the round any more.
pub(crate) async fn key_stages<E: Into<anyhow::Error>>(
    request: &impl Request<E>,
    plan: &Plan,
    round: u32,
    secagg: SecAggRound,
    net: &MultiTalentNet,
) -> Result<Option<SiteSecAgg>> {
    let mut rng = rand::rngs::OsRng;
    let (mut client, keys) = Client::new(secagg.id, params(plan, round, secagg.threshold)?, &mut rng);
    let Some(reply) = stage(request, round, SecAggStage::Keys(keys)).await? else { return Ok(None) };
    let SecAggReply::Peers(peers) = reply else {
        bail!("secure aggregation: {reply:?} where the peers' keys were due")
    };
    let shares = client.share_keys(&peers, &mut rng)?;
    let Some(reply) = stage(request, round, SecAggStage::Shares(shares)).await? else { return Ok(None) };
    let SecAggReply::Relayed(relayed) = reply else { bail!("secure aggregation: {reply:?} where shares were due") };
    info!(round, peers = peers.len(), relayed = relayed.len(), "secure aggregation: keys shared");
    let global = net.params().backbone().iter().map(|(_, t)| t.detach().copy()).collect();
    Ok(Some(SiteSecAgg { round, client, relayed, global }))
}

impl SiteSecAgg {
    /// The update to send: `net`'s heads and decoder as `parts_to_wire` has them, and instead
    /// of its backbone the masked, weighted change.
    pub(crate) fn masked_upload(
        &mut self,
        plan: &Plan,
        net: &MultiTalentNet,
        selection: &wire::Selection,
        n_cases: u32,
    ) -> Result<TensorSet> {
        let backbone = net.params().backbone();
        let mut change: Vec<f32> = Vec::new();
        for ((_, now), before) in backbone.iter().zip(&self.global) {
            let d = (now.detach().to_kind(Kind::Float) - before.to_kind(Kind::Float)).to_device(tch::Device::Cpu);
            change.extend(Vec::<f32>::try_from(d.flatten(0, -1))?);
        }
        // Under local DP the change was clipped (and noised) before: clipping it again would
        // distort the noise.
        if let Some(p) = plan.privacy.filter(|p| p.differential() && !p.noised_by_sites()) {
            let norm = change.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            if norm > p.clip_norm {
                let factor = (p.clip_norm / norm) as f32;
                change.iter_mut().for_each(|v| *v *= factor);
                info!(round = self.round, norm, clip_norm = p.clip_norm, "backbone change clipped (DP)");
            }
        }
        let words = self.client.masked_input(&self.relayed, &change, (n_cases as f64).sqrt())?;
        let mut set = wire::parts_to_wire(net, selection);
        let names: std::collections::BTreeSet<String> = backbone.into_iter().map(|(n, _)| n).collect();
        set.tensors.retain(|t| !names.contains(&t.name));
        let data = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        set.tensors.push(WireTensor {
            name: MASKED_BACKBONE.to_string(),
            dtype: DType::I32,
            shape: vec![words.len() as u64],
            data,
        });
        Ok(set)
    }

    /// Stage 3, after the upload was accepted: the shares the coordinator asks for.
    pub(crate) async fn unmask<E: Into<anyhow::Error>>(mut self, request: &impl Request<E>) -> Result<()> {
        let round = self.round;
        let Some(reply) = stage(request, round, SecAggStage::UnmaskPoll).await? else { return Ok(()) };
        let SecAggReply::Unmasking { survivors, dropped } = reply else {
            bail!("secure aggregation: {reply:?} where the unmasking request was due")
        };
        let answer = self.client.unmask(&survivors, &dropped)?;
        if stage(request, round, SecAggStage::Unmask(answer)).await?.is_some() {
            info!(
                round,
                survivors = survivors.len(),
                dropped = dropped.len(),
                "secure aggregation: unmasking shares sent"
            );
        }
        Ok(())
    }
}
