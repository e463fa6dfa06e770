//! Whole rounds of the protocol between in-memory sites and a coordinator, with dropouts.

use fedtalent_secagg::{Client, Encoding, Error, Params, Server, SiteId};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

const LEN: usize = 2000;

fn params(round: u32, threshold: usize) -> Params {
    Params { round, threshold, encoding: Encoding::default() }
}

/// One site's input: values in [−0.7, 0.7] (some outside the clip range [−1, 1] would be
/// clamped: a few are set to ±3) and its case count.
struct Input {
    values: Vec<f32>,
    cases: u32,
}

fn inputs(n: usize, rng: &mut ChaCha20Rng) -> Vec<Input> {
    (0..n)
        .map(|_| {
            let mut values: Vec<f32> = (0..LEN).map(|_| rng.gen_range(-0.7f32..0.7)).collect();
            values[0] = 3.0;
            values[1] = -3.0;
            Input { values, cases: rng.gen_range(5..60) }
        })
        .collect()
}

fn weight(cases: u32) -> f64 {
    (cases as f64).sqrt()
}

/// The plain sqrt(n)-weighted mean of the clamped inputs of `ids`.
fn plain_mean(inputs: &[Input], ids: &[SiteId]) -> Vec<f64> {
    let total: f64 = ids.iter().map(|&i| weight(inputs[i as usize - 1].cases)).sum();
    (0..LEN)
        .map(|j| {
            ids.iter()
                .map(|&i| {
                    let input = &inputs[i as usize - 1];
                    weight(input.cases) * input.values[j].clamp(-1.0, 1.0) as f64
                })
                .sum::<f64>()
                / total
        })
        .collect()
}

/// What happened in a round: the decoded mean and who counted, or the abort.
type Outcome = Result<(Vec<f32>, Vec<SiteId>), Error>;

/// Runs a round of `inputs.len()` sites. `silent_after_sharing`: sites that shared keys but
/// never sent a masked input; `silent_after_masking`: sites that sent it but never answered the
/// unmasking request. Returns the outcome and one site's masked input (`spy`'s) as the
/// coordinator saw it.
fn round(
    inputs: &[Input],
    p: Params,
    silent_after_sharing: &[SiteId],
    silent_after_masking: &[SiteId],
    spy: SiteId,
    seed: u64,
) -> (Outcome, Vec<u32>) {
    let mut rng = ChaCha20Rng::seed_from_u64(seed);
    let n = inputs.len() as SiteId;
    let mut server = Server::new(p, LEN);
    let mut clients: Vec<Client> = Vec::new();
    for id in 1..=n {
        let (client, keys) = Client::new(id, p, &mut rng);
        server.advertise(keys).unwrap();
        clients.push(client);
    }
    let mut spied = Vec::new();
    let outcome = (|| {
        let u1 = server.close_advertise()?;
        for c in clients.iter_mut() {
            let shares = c.share_keys(&u1, &mut rng)?;
            server.share_keys(c.id(), shares)?;
        }
        server.close_share_keys()?;
        for c in clients.iter_mut().filter(|c| !silent_after_sharing.contains(&c.id())) {
            let input = &inputs[c.id() as usize - 1];
            let words = c.masked_input(&server.shares_for(c.id()), &input.values, weight(input.cases))?;
            if c.id() == spy {
                spied = words.clone();
            }
            server.masked_input(c.id(), &words)?;
        }
        let request = server.close_masked_input()?;
        for c in clients.iter_mut().filter(|c| request.survivors.contains(&c.id())) {
            if !silent_after_masking.contains(&c.id()) {
                server.unmask(c.unmask(&request.survivors, &request.dropped)?)?;
            }
        }
        let (sum, survivors) = server.finish()?;
        let total: f64 = survivors.iter().map(|&i| weight(inputs[i as usize - 1].cases)).sum();
        Ok((p.encoding.decode_mean(&sum, total), survivors))
    })();
    (outcome, spied)
}

/// The decoded mean equals the plain weighted mean of `ids` to the encoding's precision.
fn assert_mean_of(inputs: &[Input], outcome: Outcome, ids: &[SiteId], p: &Params) {
    let (mean, survivors) = outcome.expect("the round completes");
    assert_eq!(survivors, ids);
    let total: f64 = ids.iter().map(|&i| weight(inputs[i as usize - 1].cases)).sum();
    // The encoding's bound, plus the f32 rounding of the decoded value.
    let bound = p.encoding.precision(total, ids.len()) + 1e-7;
    let plain = plain_mean(inputs, ids);
    let worst = mean.iter().zip(&plain).map(|(&m, &q)| (m as f64 - q).abs()).fold(0.0, f64::max);
    assert!(worst <= bound, "largest error {worst:e} over the precision {bound:e}");
    // The clamped coordinates came out clamped.
    assert!((plain[0] - 1.0).abs() < 1e-9 && (mean[0] - 1.0).abs() < 1e-6);
}

#[test]
fn the_unmasked_sum_is_the_weighted_sum() {
    let inputs = inputs(4, &mut ChaCha20Rng::seed_from_u64(1));
    let p = params(1, 3);
    let (outcome, _) = round(&inputs, p, &[], &[], 1, 10);
    assert_mean_of(&inputs, outcome, &[1, 2, 3, 4], &p);
}

/// A site that sent its masked input and then vanished: its input counts, the survivors reveal
/// its self-mask seed.
#[test]
fn a_site_dropped_after_its_masked_input_is_recovered() {
    let inputs = inputs(5, &mut ChaCha20Rng::seed_from_u64(2));
    let p = params(2, 3);
    let (outcome, _) = round(&inputs, p, &[], &[2], 1, 11);
    assert_mean_of(&inputs, outcome, &[1, 2, 3, 4, 5], &p);
}

/// A site that shared its keys and then vanished: the others' pairwise masks with it are
/// removed with its rebuilt mask key; its input does not count.
#[test]
fn a_site_dropped_before_its_masked_input_is_recovered() {
    let inputs = inputs(5, &mut ChaCha20Rng::seed_from_u64(3));
    let p = params(3, 3);
    let (outcome, _) = round(&inputs, p, &[4], &[], 1, 12);
    assert_mean_of(&inputs, outcome, &[1, 2, 3, 5], &p);
    // Both at once, with only the threshold answering the unmasking.
    let (outcome, _) = round(&inputs, p, &[4], &[1], 2, 13);
    assert_mean_of(&inputs, outcome, &[1, 2, 3, 5], &p);
}

/// Chi-square statistic of the byte frequencies of `words` against the uniform distribution.
fn chi_square_bytes(words: &[u32]) -> f64 {
    let mut counts = [0u64; 256];
    for w in words {
        for b in w.to_le_bytes() {
            counts[b as usize] += 1;
        }
    }
    let expected = words.len() as f64 * 4.0 / 256.0;
    counts.iter().map(|&c| (c as f64 - expected).powi(2) / expected).sum()
}

/// The coordinator's view of one site's masked input, for an input of all zeros (as far from
/// uniform as an input gets), is indistinguishable from uniform: chi-square over its 8,000 byte
/// values (255 degrees of freedom) stays below 310.5, the critical value at significance 0.01
/// (seeded, so the outcome is fixed). The same test rejects the unmasked encoding, and the
/// masked word sums of two sites (their pairwise masks cancel: only the self masks are left).
#[test]
fn one_sites_masked_input_looks_uniform() {
    const CRITICAL_255_DF_001: f64 = 310.457;
    let zeros: Vec<Input> = (0..3).map(|_| Input { values: vec![0.0; LEN], cases: 9 }).collect();
    let p = params(4, 2);
    let (_, masked) = round(&zeros, p, &[], &[], 2, 14);
    assert_eq!(masked.len(), LEN);
    let chi = chi_square_bytes(&masked);
    assert!(chi < CRITICAL_255_DF_001, "chi-square {chi:.1}: the masked input is distinguishable from uniform");
    // Each of the 32 bit positions is set in about half of the words (|z| < 3.29: p = 0.001).
    for bit in 0..32 {
        let ones = masked.iter().filter(|&&w| w >> bit & 1 == 1).count() as f64;
        let z = (ones - LEN as f64 / 2.0) / (LEN as f64 / 4.0).sqrt();
        assert!(z.abs() < 3.29, "bit {bit}: {ones} ones of {LEN}");
    }
    // The test can fail: the same input unmasked is far from uniform.
    let plain = p.encoding.encode(&inputs(1, &mut ChaCha20Rng::seed_from_u64(5))[0].values, 3.0).unwrap();
    assert!(chi_square_bytes(&plain) > 10.0 * CRITICAL_255_DF_001);
}

/// Fewer survivors than the threshold: the round aborts with `TooFewSites` at the masked input
/// (no site is asked to reveal anything), and the next round, with fresh keys, completes.
#[test]
fn too_few_survivors_abort_cleanly_and_the_next_round_runs() {
    let inputs = inputs(5, &mut ChaCha20Rng::seed_from_u64(6));
    let p = params(5, 3);
    let (outcome, _) = round(&inputs, p, &[2, 3, 5], &[], 1, 15);
    match outcome {
        Err(Error::TooFewSites { round: 5, stage: "masked input", got: 2, threshold: 3 }) => {}
        other => panic!("expected an abort, got {:?}", other.map(|(_, s)| s)),
    }
    // Too few unmasking answers abort too.
    let (outcome, _) = round(&inputs, p, &[2, 3], &[1], 1, 16);
    assert!(matches!(outcome, Err(Error::TooFewSites { stage: "unmask", got: 2, .. })), "{:?}", outcome.map(|o| o.1));
    let next = params(6, 3);
    let (outcome, _) = round(&inputs, next, &[], &[], 1, 17);
    assert_mean_of(&inputs, outcome, &[1, 2, 3, 4, 5], &next);
}

/// A site never reveals both masks of one site, nor answers twice; tampered ciphertexts and
/// shares relayed to the wrong site are refused.
#[test]
fn sites_refuse_what_would_unmask_one_input() {
    let p = params(7, 2);
    let mut rng = ChaCha20Rng::seed_from_u64(8);
    let mut server = Server::new(p, 4);
    let mut clients: Vec<Client> = (1..=3)
        .map(|id| {
            let (c, keys) = Client::new(id, p, &mut rng);
            server.advertise(keys).unwrap();
            c
        })
        .collect();
    let u1 = server.close_advertise().unwrap();
    let mut all = Vec::new();
    for c in clients.iter_mut() {
        let shares = c.share_keys(&u1, &mut rng).unwrap();
        all.extend(shares.clone());
        server.share_keys(c.id(), shares).unwrap();
    }
    server.close_share_keys().unwrap();
    let mut tampered = server.shares_for(1);
    tampered[0].ciphertext[3] ^= 1;
    let fresh = |id| {
        let (mut c, _) = Client::new(id, p, &mut ChaCha20Rng::seed_from_u64(9));
        let _ = c.share_keys(&u1, &mut ChaCha20Rng::seed_from_u64(9));
        c
    };
    // (A fresh client's keys are not in u1: share_keys refused it, so masked_input is refused.)
    assert!(fresh(1).masked_input(&tampered, &[0.0; 4], 1.0).is_err());
    assert!(clients[0].masked_input(&tampered, &[0.0; 4], 1.0).is_err());
    let misrouted: Vec<_> = all.iter().filter(|e| e.to == 3).cloned().collect();
    assert!(clients[1].masked_input(&misrouted, &[0.0; 4], 1.0).is_err());
    let words = clients[2].masked_input(&server.shares_for(3), &[0.0; 4], 1.0).unwrap();
    server.masked_input(3, &words).unwrap();
    // Site 3 is asked to reveal site 2 as survivor and dropped at once: refused.
    assert!(clients[2].unmask(&[2, 3], &[2]).is_err());
    // A refused stage is spent: no second answer.
    assert!(clients[2].unmask(&[1, 3], &[2]).is_err());
}
