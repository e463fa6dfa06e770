//! Training: a `tiny` network overfits a small synthetic batch; optimizer state survives a restart.

use fedtalent_model::loss::hard_dice;
use fedtalent_model::train::{TrainConfig, Trainer};
use fedtalent_model::{BatchTargets, ClassRegions, MultiTalentNet, Topology};
use tch::{Device, Kind, Tensor};

/// Two samples with a bright box (label 1) holding a brighter core (label 2) on noise.
fn synthetic_batch() -> (Tensor, Tensor) {
    tch::manual_seed(3);
    let labels = Tensor::zeros([2, 1, 16, 32, 32], (Kind::Int64, Device::Cpu));
    let _ = labels.get(0).get(0).narrow(0, 3, 9).narrow(1, 6, 16).narrow(2, 8, 14).fill_(1);
    let _ = labels.get(0).get(0).narrow(0, 5, 5).narrow(1, 9, 8).narrow(2, 11, 8).fill_(2);
    let _ = labels.get(1).get(0).narrow(0, 6, 8).narrow(1, 12, 14).narrow(2, 4, 18).fill_(1);
    let _ = labels.get(1).get(0).narrow(0, 8, 4).narrow(1, 15, 7).narrow(2, 9, 8).fill_(2);
    let image = labels.to_kind(Kind::Float) + Tensor::randn([2, 1, 16, 32, 32], (Kind::Float, Device::Cpu)) * 0.3;
    (image, labels)
}

/// libtorch's seed is process-global: tests that seed run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

#[test]
fn tiny_network_overfits_a_small_batch() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(0);
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    // liver = {1, 2}, tumour = {2}: overlapping regions.
    let regions = ClassRegions::all_annotated(&[vec![1, 2], vec![2]]);
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    // A long schedule horizon keeps the lr near 0.01 for the whole short run.
    let config = TrainConfig { total_steps: 2000, ..TrainConfig::default() };
    let mut trainer = Trainer::new(net, config).unwrap();
    let (image, labels) = synthetic_batch();
    let dice_now = |trainer: &Trainer| {
        let logits = tch::no_grad(|| trainer.net.forward(&image));
        hard_dice(&logits, &targets.targets(&labels).unwrap())
    };
    // Train until both classes are learnt (checked every 25 steps from 150 on), at most 400 steps:
    // the small tumour class takes a varying number of steps with libtorch's thread scheduling.
    let mut losses = Vec::new();
    while losses.len() < 400 {
        losses.push(trainer.train_step(&image, &labels, &targets).unwrap().loss);
        if losses.len() >= 150 && losses.len() % 25 == 0 && dice_now(&trainer).iter().all(|d| *d > 0.9) {
            break;
        }
    }
    let first: f64 = losses[..5].iter().sum::<f64>() / 5.0;
    let last: f64 = losses[losses.len() - 5..].iter().sum::<f64>() / 5.0;
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    let dice = dice_now(&trainer);
    for (c, d) in dice.iter().enumerate() {
        assert!(*d > 0.9, "class {c}: Dice {d} after overfitting (all: {dice:?}, losses {first} -> {last})");
    }
}

#[test]
fn optimizer_state_survives_a_restart() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let topo = Topology::preset("tiny").unwrap();
    let regions = ClassRegions::all_annotated(&[vec![1, 2]]);
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    let (image, labels) = synthetic_batch();
    let dir = tempfile::tempdir().unwrap();
    let (model_file, opt_file) = (dir.path().join("m.safetensors"), dir.path().join("opt.safetensors"));

    tch::manual_seed(1);
    let mut a = Trainer::new(MultiTalentNet::new(&topo, 1, Device::Cpu).unwrap(), TrainConfig::default()).unwrap();
    for _ in 0..3 {
        a.train_step(&image, &labels, &targets).unwrap();
    }
    a.net.save(&model_file).unwrap();
    a.optimizer.save(&opt_file).unwrap();

    let mut b = Trainer::new(MultiTalentNet::new(&topo, 1, Device::Cpu).unwrap(), TrainConfig::default()).unwrap();
    b.net.load(&model_file).unwrap();
    b.optimizer.load(&opt_file).unwrap();
    b.step = a.step;
    a.train_step(&image, &labels, &targets).unwrap();
    b.train_step(&image, &labels, &targets).unwrap();
    let mut max_diff = 0f64;
    for ((_, ta), (_, tb)) in a.net.params().named_tensors(false).iter().zip(b.net.params().named_tensors(false)) {
        max_diff = max_diff.max(f64::try_from((ta - tb).abs().max()).unwrap());
    }
    assert!(max_diff < 1e-6, "restored trainer diverged by {max_diff}");
    // Without the momentum buffers the step differs: the state is really used.
    let mut c = Trainer::new(MultiTalentNet::new(&topo, 1, Device::Cpu).unwrap(), TrainConfig::default()).unwrap();
    c.net.load(&model_file).unwrap();
    c.step = b.step - 1;
    c.train_step(&image, &labels, &targets).unwrap();
    let w = "seg_outputs.2.weight";
    let get = |t: &Trainer| t.net.params().iter().find(|p| p.name == w).unwrap().tensor.detach();
    assert!(f64::try_from((get(&b) - get(&c)).abs().max()).unwrap() > 1e-6);
    // A state file of another network is refused by name.
    let other = MultiTalentNet::new(&topo, 3, Device::Cpu).unwrap();
    let mut d = Trainer::new(other, TrainConfig::default()).unwrap();
    let err = format!("{:#}", d.optimizer.load(&opt_file).unwrap_err());
    assert!(err.contains("shape"), "{err}");
}

#[test]
fn poly_schedule() {
    use fedtalent_model::optim::poly_lr;
    assert_eq!(poly_lr(0.01, 0, 100), 0.01);
    assert!((poly_lr(0.01, 50, 100) - 0.01 * 0.5f64.powf(0.9)).abs() < 1e-15);
    assert_eq!(poly_lr(0.01, 100, 100), 0.0);
}

/// Heads-only steps (the round-start warm-up and the final heads round of a federation): the
/// backbone and its momentum stay bit-identical, the heads move; clearing momentum empties it.
#[test]
fn frozen_backbone_trains_only_the_heads_and_momentum_can_be_cleared() {
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(0);
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    let regions = ClassRegions::all_annotated(&[vec![1, 2], vec![2]]);
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    let mut trainer = Trainer::new(net, TrainConfig::default()).unwrap();
    let (image, labels) = synthetic_batch();
    trainer.train_step(&image, &labels, &targets).unwrap();
    let snapshot = |t: &Trainer| -> Vec<(String, bool, Tensor, Option<Tensor>)> {
        t.net
            .params()
            .iter()
            .map(|p| {
                let head = matches!(p.role, fedtalent_model::params::Role::Head { .. });
                (p.name.clone(), head, p.tensor.detach().copy(), t.optimizer.momentum_buffer(&p.name).map(|m| m.copy()))
            })
            .collect()
    };
    let before = snapshot(&trainer);
    trainer.freeze_backbone(true);
    for _ in 0..3 {
        trainer.train_step(&image, &labels, &targets).unwrap();
    }
    trainer.freeze_backbone(false);
    let after = snapshot(&trainer);
    let mut heads_moved = 0;
    for ((name, head, old, old_m), (_, _, new, new_m)) in before.iter().zip(&after) {
        if *head {
            heads_moved += usize::from(!old.equal(new));
        } else {
            assert!(old.equal(new), "backbone tensor {name} changed in a heads-only step");
            let same_momentum = match (old_m, new_m) {
                (Some(a), Some(b)) => a.equal(b),
                (None, None) => true,
                _ => false,
            };
            assert!(same_momentum, "momentum of backbone tensor {name} changed in a heads-only step");
        }
    }
    assert!(heads_moved > 0, "no head moved in heads-only steps");
    // Unfrozen again, the backbone trains.
    trainer.train_step(&image, &labels, &targets).unwrap();
    let name = &before.iter().find(|p| !p.1).unwrap().0;
    let first = trainer.net.params().iter().find(|p| &p.name == name).unwrap().tensor.detach();
    assert!(!first.equal(&after.iter().find(|p| &p.0 == name).unwrap().2), "backbone stayed frozen");
    assert!(trainer.optimizer.momentum_buffer(name).is_some());
    trainer.optimizer.clear_state();
    assert!(trainer.net.params().iter().all(|p| trainer.optimizer.momentum_buffer(&p.name).is_none()));
}

/// FIRENet's options end to end: Adam, and a dataset of mutually exclusive classes (box shell
/// {1}, core {2}) trained as one softmax. The network learns both, and its argmax prediction
/// never gives a voxel two classes.
#[test]
fn adam_and_a_softmax_site_overfit_a_small_batch() {
    use fedtalent_model::loss::exclusive_masks;
    use fedtalent_model::optim::{AdamConfig, OptimizerConfig};
    let _serial = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    tch::manual_seed(0);
    let topo = Topology::preset("tiny").unwrap();
    let net = MultiTalentNet::new(&topo, 2, Device::Cpu).unwrap();
    let regions = ClassRegions::all_annotated(&[vec![1], vec![2]]).into_exclusive().unwrap();
    let targets = BatchTargets::new(&[&regions, &regions], Device::Cpu).unwrap();
    let optimizer = OptimizerConfig::Adam(AdamConfig::default());
    // Above FIRENet's default (3e-4) so that the overfit takes under a hundred steps.
    let config = TrainConfig { base_lr: 1e-2, total_steps: 2000, optimizer, ..TrainConfig::default() };
    let mut trainer = Trainer::new(net, config).unwrap();
    let (image, labels) = synthetic_batch();
    let truth = targets.targets(&labels).unwrap();
    let predicted = |trainer: &Trainer| {
        let logits = tch::no_grad(|| trainer.net.forward(&image));
        exclusive_masks(&logits, 1, false).to_kind(Kind::Float)
    };
    let dice_now = |trainer: &Trainer| {
        let masks = predicted(trainer);
        // hard_dice thresholds logits at 0: masks − 0.5 are such logits.
        hard_dice(&(masks - 0.5), &truth)
    };
    let mut losses = Vec::new();
    while losses.len() < 400 {
        losses.push(trainer.train_step(&image, &labels, &targets).unwrap().loss);
        if losses.len() >= 50 && losses.len() % 25 == 0 && dice_now(&trainer).iter().all(|d| *d > 0.9) {
            break;
        }
    }
    let (first, last) = (losses[0], *losses.last().unwrap());
    assert!(last < first - 1.0, "loss did not fall: {first} -> {last}");
    let dice = dice_now(&trainer);
    assert!(dice.iter().all(|d| *d > 0.9), "Dice {dice:?} after {} Adam steps", losses.len());
    let overlap = predicted(&trainer).sum_dim_intlist(&[1i64][..], false, Kind::Float).max();
    assert!(f64::try_from(overlap).unwrap() <= 1.0, "a voxel got two classes");
    let first_conv = trainer.net.params().iter().next().unwrap().name.clone();
    assert_eq!(trainer.optimizer.adam_steps(&first_conv), Some(losses.len() as u64));
}
