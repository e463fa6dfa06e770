//! A federation on loopback for end-to-end tests: phantom datasets, the PKI, configs, and the
//! real `coordinator` and `site-agent` binaries as child processes.

use std::fs;
use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use fedtalent_coordinator::config::{FederationSection, Launch};
use fedtalent_coordinator::FederationConfig;
use fedtalent_data::{SiteDataConfig, ValCases};
use fedtalent_site_agent::config::{SiteConfig, SiteSection};
use fedtalent_vocab::{ClassRegion, LocalPolicy, Privacy, Transport};

/// The built binaries (`cargo build --workspace --bins`, done by `scripts/test.sh`).
pub fn binary(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(path.exists(), "{} is missing: run `cargo build --workspace --bins` first", path.display());
    path
}

/// Runs a binary to completion and returns its output (panics with its stderr on failure).
pub fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("starting a fedtalent binary");
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// The federation's knobs that tests vary.
#[derive(Clone, Debug)]
pub struct Plan {
    pub rounds: u32,
    pub local_steps: u32,
    pub min_sites: u32,
    pub deadline_s: u64,
    pub eval_every: u32,
    pub cases: usize,
    pub shape: [usize; 3],
    pub exit_when_done: bool,
    /// Model transfers as bf16 (both directions).
    pub bf16_transport: bool,
    pub preset: &'static str,
    /// FIRENet presets: one decoder per site, kept by its owner.
    pub per_site_decoders: bool,
    /// `[plan].site_encoder_stages`.
    pub site_encoder_stages: u32,
    /// `[plan.local]`: the round-boundary policy.
    pub local: LocalPolicy,
    /// `[plan.privacy]`; `None`: no differential privacy.
    pub privacy: Option<Privacy>,
    /// `[federation].launch`: rounds start once every site registered, or on `coordinator launch`.
    pub launch: Launch,
    /// `[site].torch_threads` of every site agent; `None`: libtorch's own choice.
    pub torch_threads: Option<usize>,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            rounds: 3,
            local_steps: 10,
            min_sites: 2,
            deadline_s: 120,
            eval_every: 1,
            cases: 4,
            shape: [24, 48, 48],
            exit_when_done: true,
            bf16_transport: false,
            preset: "tiny",
            per_site_decoders: false,
            site_encoder_stages: 0,
            local: LocalPolicy::default(),
            privacy: None,
            launch: Launch::Auto,
            torch_threads: None,
        }
    }
}

pub struct LocalFederation {
    pub dir: PathBuf,
    pub sites: Vec<String>,
    pub port: u16,
    pub plan: Plan,
}

impl LocalFederation {
    /// Phantom data for `kinds` (site names = phantom kinds), the PKI and every config.
    pub fn create(dir: &Path, kinds: &[&str], plan: Plan) -> Self {
        let sites: Vec<(&str, &str)> = kinds.iter().map(|k| (*k, *k)).collect();
        Self::create_named(dir, &sites, plan)
    }

    /// [`LocalFederation::create`] with site names of their own: `(name, phantom kind)` pairs,
    /// where a kind may repeat (each site still gets its own phantom patients).
    pub fn create_named(dir: &Path, sites: &[(&str, &str)], plan: Plan) -> Self {
        let (names, kinds): (Vec<&str>, Vec<&str>) = sites.iter().copied().unzip();
        let data = dir.join("data");
        let shape: Vec<String> = plan.shape.iter().map(|s| s.to_string()).collect();
        run_ok(
            Command::new(binary("site-agent"))
                .args(["synth", "--out"])
                .arg(&data)
                .args(["--cases", &plan.cases.to_string(), "--sites", &kinds.join(","), "--shape"])
                .args(&shape),
        );
        let port = free_udp_port();
        let coord = dir.join("coordinator");
        run_ok(Command::new(binary("coordinator")).args(["init", "--dir"]).arg(&coord).args([
            "--sites",
            &names.join(","),
            "--listen",
            &format!("127.0.0.1:{port}"),
        ]));
        let fed = Self { dir: dir.to_path_buf(), sites: names.iter().map(|s| s.to_string()).collect(), port, plan };
        fed.write_federation_toml(&fed.sites);
        // synth's sites.json lists the sites in the order of `--sites`.
        let phantoms = phantom_sites(&data);
        assert_eq!(phantoms.len(), sites.len(), "sites.json");
        for (site, phantom) in names.iter().zip(&phantoms) {
            let site_dir = dir.join(site);
            fs::create_dir_all(&site_dir).unwrap();
            run_ok(Command::new(binary("site-agent")).args(["keygen", "--site", site, "--dir"]).arg(&site_dir));
            run_ok(
                Command::new(binary("coordinator"))
                    .args(["sign", "--config"])
                    .arg(fed.config_path())
                    .arg("--csr")
                    .arg(site_dir.join(format!("{site}.csr"))),
            );
            let (dataset, classes) = phantom_entry(phantom);
            fed.write_site_toml(site, &dataset, classes);
        }
        fed
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.join("coordinator/federation.toml")
    }

    pub fn state_dir(&self) -> PathBuf {
        self.dir.join("coordinator/state")
    }

    pub fn site_dir(&self, site: &str) -> PathBuf {
        self.dir.join(site)
    }

    /// (Re)writes federation.toml with `allowed` as the site list.
    pub fn write_federation_toml(&self, allowed: &[String]) {
        let p = &self.plan;
        let config = FederationConfig {
            federation: FederationSection {
                name: "e2e".into(),
                listen: ([127, 0, 0, 1], self.port).into(),
                state_dir: "state".into(),
                pki_dir: "pki".into(),
                sites: allowed.to_vec(),
                launch: p.launch,
                keep_rounds: 10,
                exit_when_done: p.exit_when_done,
                transport: Default::default(),
                tcp_listen: None,
            },
            plan: fedtalent_vocab::Plan {
                eval_every: p.eval_every,
                min_sites: p.min_sites,
                round_deadline_s: p.deadline_s,
                transport: if p.bf16_transport { Transport::Bf16 } else { Transport::Native },
                per_site_decoders: p.per_site_decoders,
                site_encoder_stages: p.site_encoder_stages,
                local: p.local,
                privacy: p.privacy,
                ..fedtalent_vocab::Plan::new(p.preset, p.rounds, p.local_steps)
            },
        };
        config.write(&self.config_path()).unwrap();
    }

    fn write_site_toml(&self, site: &str, dataset: &Path, classes: Vec<ClassRegion>) {
        let mut config = self.site_config(site, dataset, classes);
        // The preset's spacing: the site preprocesses once, not again when it joins.
        config.data.target_spacing =
            fedtalent_model::Topology::preset(self.plan.preset).expect("a known preset").spacing;
        config.site.torch_threads = self.plan.torch_threads;
        config.write(&self.site_dir(site).join("site.toml")).unwrap();
    }

    /// The config of a site agent of this federation on `dataset` (CPU, one thread, one
    /// validation case); its key and certificate are `<site>.key` / `.crt` next to it.
    pub fn site_config(&self, site: &str, dataset: &Path, classes: Vec<ClassRegion>) -> SiteConfig {
        SiteConfig {
            site: SiteSection {
                name: site.into(),
                coordinator: format!("127.0.0.1:{}", self.port).parse().unwrap(),
                server_name: "localhost".into(),
                ca: "../coordinator/pki/ca.crt".into(),
                cert: format!("{site}.crt").into(),
                key: format!("{site}.key").into(),
                state_dir: "state".into(),
                device: "cpu".into(),
                threads: 1,
                seed: 0,
                torch_threads: None,
                exclusive_classes: false,
                transport: Default::default(),
                coordinator_tcp: None,
            },
            data: SiteDataConfig {
                dataset_dir: dataset.to_path_buf(),
                classes,
                val_cases: ValCases::Count(1),
                cache_dir: "cache".into(),
                target_spacing: SiteDataConfig::DEFAULT_TARGET_SPACING,
                label_interp: Default::default(),
                input_channels: None,
            },
        }
    }

    pub fn spawn_coordinator(&self) -> Child {
        self.spawn_coordinator_with(&[])
    }

    /// `coordinator serve` with `extra` arguments.
    pub fn spawn_coordinator_with(&self, extra: &[&str]) -> Child {
        self.spawn_logged(
            "coordinator",
            Command::new(binary("coordinator")).arg("serve").arg("--config").arg(self.config_path()).args(extra),
        )
    }

    pub fn spawn_site(&self, site: &str, extra: &[&str]) -> Child {
        let config = self.site_dir(site).join("site.toml");
        self.spawn_logged(site, Command::new(binary("site-agent")).arg("run").arg("--config").arg(config).args(extra))
    }

    /// Starts `cmd` at `info` with its stderr appended to `<who>.log` (read by [`Self::log`]).
    fn spawn_logged(&self, who: &str, cmd: &mut Command) -> Child {
        let log = fs::OpenOptions::new().create(true).append(true).open(self.dir.join(format!("{who}.log"))).unwrap();
        cmd.env("RUST_LOG", "info").stdout(Stdio::null()).stderr(log).spawn().unwrap()
    }

    /// `coordinator export --out <out>` of the state dir's newest round.
    pub fn export(&self, out: &Path) {
        run_ok(
            Command::new(binary("coordinator"))
                .args(["export", "--config"])
                .arg(self.config_path())
                .arg("--out")
                .arg(out),
        );
    }

    pub fn log(&self, who: &str) -> String {
        fs::read_to_string(self.dir.join(format!("{who}.log"))).unwrap_or_default()
    }

    /// Complete round checkpoints on disk.
    pub fn completed_rounds(&self) -> Vec<u32> {
        let Ok(entries) = fs::read_dir(self.state_dir().join("rounds")) else { return Vec::new() };
        let mut rounds: Vec<u32> = entries
            .filter_map(|e| e.ok()?.file_name().to_string_lossy().strip_prefix("round-")?.parse().ok())
            .collect();
        rounds.sort_unstable();
        rounds
    }

    pub fn round_record(&self, round: u32) -> serde_json::Value {
        let path = self.state_dir().join(format!("rounds/round-{round:06}/round.json"));
        serde_json::from_str(&fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))).unwrap()
    }

    /// The sites whose updates round `round` aggregated, in its record's order.
    pub fn round_sites(&self, round: u32) -> Vec<String> {
        let record = self.round_record(round);
        record["contributions"].as_array().unwrap().iter().map(|c| c["site"].as_str().unwrap().to_string()).collect()
    }

    /// Each completed round's `privacy` entry of the metrics, in round order.
    pub fn round_privacy(&self) -> Vec<serde_json::Value> {
        self.metrics().into_iter().filter(|m| m["kind"] == "round").map(|m| m["privacy"].clone()).collect()
    }

    pub fn metrics(&self) -> Vec<serde_json::Value> {
        fs::read_to_string(self.state_dir().join("metrics.jsonl"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// Waits until `done()` or panics after `timeout` with the logs.
    pub fn wait_until(&self, what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
        let start = Instant::now();
        while !done() {
            if start.elapsed() > timeout {
                let mut logs = String::new();
                for who in std::iter::once("coordinator").chain(self.sites.iter().map(String::as_str)) {
                    let log = self.log(who);
                    let tail: Vec<&str> = log.lines().rev().take(15).collect();
                    logs += &format!("--- {who} ---\n{}\n", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
                }
                panic!("timed out after {timeout:?} waiting for {what}\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

/// A phantom site's dataset folder and its `classes = [...]` TOML (from `synth`'s sites.json).
pub fn phantom_site(data: &Path, site: &str) -> (PathBuf, Vec<ClassRegion>) {
    let sites = phantom_sites(data);
    phantom_entry(sites.iter().find(|s| s["name"] == site).unwrap_or_else(|| panic!("no phantom site {site}")))
}

/// The entries of `synth`'s sites.json, in the order of its `--sites`.
fn phantom_sites(data: &Path) -> Vec<serde_json::Value> {
    let sites: serde_json::Value = serde_json::from_str(&fs::read_to_string(data.join("sites.json")).unwrap()).unwrap();
    sites.as_array().expect("sites.json is a list").clone()
}

/// The dataset folder and classes of one sites.json entry.
fn phantom_entry(entry: &serde_json::Value) -> (PathBuf, Vec<ClassRegion>) {
    let classes = serde_json::from_value(entry["classes"].clone()).expect("sites.json classes are class regions");
    (PathBuf::from(entry["dataset_dir"].as_str().unwrap()), classes)
}

/// Holds the machine for one test's federation: the tests of one binary run on parallel threads,
/// but a federation's processes already fill this machine's cores, and two at once only stretch
/// each other past their round deadlines.
pub fn one_federation_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    static MACHINE: std::sync::Mutex<()> = std::sync::Mutex::new(());
    // A failed test poisons the lock; the next test still runs alone.
    MACHINE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Waits for a child with a timeout; kills it and panics on timeout.
pub fn wait_child(child: &mut Child, timeout: Duration, what: &str) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            panic!("{what} did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Kills every child on drop (a failing test leaves no process behind).
pub struct Children(pub Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Every tensor of a safetensors file (panics naming the file).
pub fn read_tensors(path: &Path) -> Vec<(String, tch::Tensor)> {
    tch::Tensor::read_safetensors(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The tensor `name` of a set (panics naming it).
pub fn tensor<'a>(set: &'a [(String, tch::Tensor)], name: &str) -> &'a tch::Tensor {
    &set.iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("{name} missing")).1
}

/// A completed round's global model next to what each contributing site uploaded (its saved
/// local model), with the sqrt(n) weights recomputed from the round record.
pub struct RoundUploads {
    pub record: serde_json::Value,
    pub global: Vec<(String, tch::Tensor)>,
    pub locals: Vec<Vec<(String, tch::Tensor)>>,
    pub weights: Vec<f64>,
}

impl LocalFederation {
    pub fn round_uploads(&self, round: u32) -> RoundUploads {
        let record = self.round_record(round);
        let global = read_tensors(&self.state_dir().join(format!("rounds/round-{round:06}/model.safetensors")));
        let contributions = record["contributions"].as_array().unwrap();
        let roots: Vec<f64> = contributions.iter().map(|c| (c["n_cases"].as_u64().unwrap() as f64).sqrt()).collect();
        let total: f64 = roots.iter().sum();
        let locals = contributions
            .iter()
            .map(|c| read_tensors(&self.site_dir(c["site"].as_str().unwrap()).join("state/local_model.safetensors")))
            .collect();
        RoundUploads { record, global, locals, weights: roots.iter().map(|r| r / total).collect() }
    }
}

impl RoundUploads {
    /// `[plan.privacy]`'s DP check of a round whose global model before it was `before`: the
    /// global backbone minus (the previous one plus the sqrt(n)-weighted sum of each site's
    /// change clipped to `clip_norm`), the noise the coordinator added, has std `noise_std` to 5 %
    /// and mean zero (to 5 standard errors).
    pub fn assert_dp_noise(&self, before: &[(String, tch::Tensor)], clip_norm: f64, noise_std: f64) {
        let (residual, _) = self.dp_residual(before, clip_norm);
        let std = f64::try_from(residual.std(true)).unwrap();
        assert!((std / noise_std - 1.0).abs() < 0.05, "residual std {std} vs the stated noise {noise_std}");
        let mean = f64::try_from(residual.mean(tch::Kind::Double)).unwrap();
        assert!(mean.abs() < 5.0 * noise_std / (residual.numel() as f64).sqrt(), "residual mean {mean}");
    }

    /// The global backbone minus (`before`'s plus the sqrt(n)-weighted sum of each site's change
    /// clipped to `clip_norm`), flattened (f64), and each site's change norm.
    pub fn dp_residual(&self, before: &[(String, tch::Tensor)], clip_norm: f64) -> (tch::Tensor, Vec<f64>) {
        let backbone = |name: &str| !name.starts_with("seg_outputs");
        // Each site's change and its norm over the backbone, as it is clipped.
        let changes: Vec<Vec<tch::Tensor>> = self
            .locals
            .iter()
            .map(|local| {
                before
                    .iter()
                    .filter(|(n, _)| backbone(n))
                    .map(|(n, b)| tensor(local, n).to_kind(tch::Kind::Double) - b.to_kind(tch::Kind::Double))
                    .collect()
            })
            .collect();
        let norms: Vec<f64> = changes
            .iter()
            .map(|change| {
                change.iter().map(|t| f64::try_from(t.square().sum(tch::Kind::Double)).unwrap()).sum::<f64>().sqrt()
            })
            .collect();
        let mut residuals = Vec::new();
        for (i, (name, b)) in before.iter().filter(|(n, _)| backbone(n)).enumerate() {
            let mut expected = b.to_kind(tch::Kind::Double);
            for ((change, w), norm) in changes.iter().zip(&self.weights).zip(&norms) {
                expected += &change[i] * (*w * (clip_norm / norm).min(1.0));
            }
            residuals.push((tensor(&self.global, name).to_kind(tch::Kind::Double) - expected).flatten(0, -1));
        }
        (tch::Tensor::cat(&residuals, 0), norms)
    }

    /// Asserts that every global tensor for which `shared(name)` holds is the weighted mean of the
    /// uploads (float64, to 1e-6); returns how many tensors were compared.
    pub fn assert_weighted_mean(&self, shared: impl Fn(&str) -> bool) -> usize {
        let mut checked = 0;
        for (name, g) in self.global.iter().filter(|(n, _)| shared(n)) {
            let mut expected = tch::Tensor::zeros(g.size(), (tch::Kind::Double, tch::Device::Cpu));
            for (local, w) in self.locals.iter().zip(&self.weights) {
                expected += tensor(local, name).to_kind(tch::Kind::Double) * *w;
            }
            let diff = f64::try_from((g.to_kind(tch::Kind::Double) - expected).abs().max()).unwrap();
            assert!(diff < 1e-6, "{name}: aggregate differs by {diff}");
            checked += 1;
        }
        checked
    }
}

/// Every scalar of the TensorBoard event files in `dir`, read by TensorBoard's own event reader
/// (the oracle): tag -> [(step, value)], in the order written.
pub fn tensorboard_scalars(dir: &Path) -> std::collections::BTreeMap<String, Vec<(i64, f64)>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out =
        run_ok(Command::new(root.join(".venv/bin/python")).arg(root.join("scripts/tensorboard_scalars.py")).arg(dir));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the reader prints JSON");
    json.as_object()
        .expect("an object of tags")
        .iter()
        .map(|(tag, points)| {
            let points =
                points.as_array().unwrap().iter().map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap())).collect();
            (tag.clone(), points)
        })
        .collect()
}

/// What a running process has used so far, from /proc.
#[derive(Clone, Copy, Debug)]
pub struct ProcessUsage {
    /// Peak resident set (VmHWM).
    pub peak_rss_mib: f64,
    /// User plus system CPU time.
    pub cpu_s: f64,
}

/// The [`ProcessUsage`] of the running process `pid` (panics when it has exited).
pub fn process_usage(pid: u32) -> ProcessUsage {
    let proc = PathBuf::from(format!("/proc/{pid}"));
    let status = fs::read_to_string(proc.join("status")).unwrap_or_else(|e| panic!("process {pid}: {e}"));
    let peak_kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:")?.trim().strip_suffix("kB")?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in /proc/{pid}/status:\n{status}"));
    // utime and stime are the 14th and 15th fields, the 12th and 13th after the parenthesised
    // command name (which may hold spaces); /proc counts them in USER_HZ, 100 on Linux.
    let stat = fs::read_to_string(proc.join("stat")).unwrap();
    let after_name: Vec<&str> = stat[stat.rfind(')').expect("(comm) in stat") + 1..].split_whitespace().collect();
    let ticks = |i: usize| -> f64 { after_name[i].parse().unwrap_or_else(|_| panic!("/proc/{pid}/stat: {stat}")) };
    ProcessUsage { peak_rss_mib: peak_kib / 1024.0, cpu_s: (ticks(11) + ticks(12)) / 100.0 }
}
