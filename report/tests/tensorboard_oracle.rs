//! The event writer against TensorBoard's own event reader (the `tensorboard` Python package
//! in the repo's venv, scripts/setup.sh): every scalar and step written reads back as written,
//! across two files in one folder (a restarted writer).

use std::path::PathBuf;
use std::process::Command;

use fedtalent_report::EventWriter;

fn read_back(dir: &std::path::Path) -> serde_json::Value {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = Command::new(root.join(".venv/bin/python"))
        .arg(root.join("scripts/tensorboard_scalars.py"))
        .arg(dir)
        .output()
        .expect("the venv's python (scripts/setup.sh)");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn tensorboard_reads_every_scalar_at_its_step() {
    let dir = tempfile::tempdir().unwrap();
    let mut written: Vec<(String, i64, f32)> = Vec::new();
    {
        let mut first = EventWriter::create(dir.path()).unwrap();
        for step in 0..300i64 {
            // Large steps take multi-byte varints; values of every sign and magnitude.
            let (s, v) = (step * 1000, (step as f32 * 0.37).sin() * 10f32.powi((step % 7) as i32 - 3));
            first.add_scalar("loss/step", v as f64, s).unwrap();
            written.push(("loss/step".into(), s, v));
        }
        first.flush().unwrap();
    }
    let mut second = EventWriter::create(dir.path()).unwrap();
    for (tag, step, v) in [("dice/liver/liver_tumour", 3, 0.8125f32), ("privacy/epsilon", 4, 2311.778)] {
        second.add_scalar(tag, v as f64, step).unwrap();
        written.push((tag.into(), step, v));
    }
    second.flush().unwrap();

    let read = read_back(dir.path());
    let mut count = 0;
    for (tag, step, value) in &written {
        let points = read[tag].as_array().unwrap_or_else(|| panic!("tag {tag} not read back: {read}"));
        let found = points.iter().find(|p| p[0].as_i64() == Some(*step)).unwrap_or_else(|| panic!("{tag} @ {step}"));
        assert_eq!(found[1].as_f64().unwrap() as f32, *value, "{tag} @ {step}");
        count += 1;
    }
    let total: usize = read.as_object().unwrap().values().map(|p| p.as_array().unwrap().len()).sum();
    assert_eq!(total, count, "the reader found scalars that were not written");
}
