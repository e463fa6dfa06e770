//! The privacy accountant against Opacus' RDP accountant (`opacus.accountants.analysis.rdp`,
//! installed by scripts/setup.sh) over the same Rényi orders: ε within 1 % for a grid of noise
//! multipliers, round counts and δ, every site in every round (sample rate 1).

use std::path::PathBuf;
use std::process::Command;

use fedtalent_vocab::Privacy;

/// Opacus' ε for each `(σ, rounds, δ)`, one per line.
const ORACLE: &str = r#"
import sys
from opacus.accountants.analysis import rdp
orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [128, 256, 512, 1024]
for line in sys.stdin.read().split("\n"):
    if not line.strip():
        continue
    sigma, rounds, delta = line.split()
    r = rdp.compute_rdp(q=1.0, noise_multiplier=float(sigma), steps=int(rounds), orders=orders)
    eps, _ = rdp.get_privacy_spent(orders=orders, rdp=r, delta=float(delta))
    print(repr(float(eps)))
"#;

fn python() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.venv/bin/python")
}

#[test]
fn epsilon_matches_opacus() {
    let mut cases = Vec::new();
    for sigma in [0.5, 0.8, 1.0, 1.5, 3.0, 10.0] {
        for rounds in [1u32, 10, 100, 1000] {
            for delta in [1e-5, 1e-3] {
                cases.push((sigma, rounds, delta));
            }
        }
    }
    let input: String = cases.iter().map(|(s, r, d)| format!("{s} {r} {d:e}\n")).collect();
    let mut child = Command::new(python())
        .args(["-c", ORACLE])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("running {}: {e} (run scripts/setup.sh)", python().display()));
    use std::io::Write;
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "opacus oracle failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let theirs: Vec<f64> = String::from_utf8(out.stdout).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    assert_eq!(theirs.len(), cases.len());
    for ((sigma, rounds, delta), opacus) in cases.iter().zip(theirs) {
        let ours = Privacy { delta: *delta, ..Privacy::dp(1.0, *sigma) }.epsilon(*rounds);
        assert!(
            (ours - opacus).abs() <= 0.01 * opacus,
            "σ {sigma}, {rounds} rounds, δ {delta:e}: ε {ours} here, {opacus} in Opacus"
        );
    }
}
