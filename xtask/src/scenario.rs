//! Boot scenarios: one TOML file per behaviour under `tests/boot/scenarios/`, parsed
//! strictly (unknown keys are errors) so a typo cannot turn an expectation off.
//! The format is documented in README.md ("Boot scenarios").

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Distro {
    Bookworm,
    Trixie,
}

impl Distro {
    pub fn name(self) -> &'static str {
        match self {
            Distro::Bookworm => "bookworm",
            Distro::Trixie => "trixie",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Generator {
    InitramfsTools,
    Dracut,
}

impl Generator {
    pub fn name(self) -> &'static str {
        match self {
            Generator::InitramfsTools => "initramfs-tools",
            Generator::Dracut => "dracut",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Iommu {
    Intel,
    Amd,
    None,
}

/// Where `vfio-early apply` runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ApplyIn {
    /// In the image before the boot (the usual case: the boot proves what apply made).
    #[default]
    Image,
    /// In the booted guest, by the probe (for refusals that need the guest's own devices).
    Guest,
}

/// What the guest's root filesystem sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Root {
    /// ext4 on the whole virtio disk.
    #[default]
    Plain,
    /// ext4 on the LVM volume `vfetest/root`, the disk its one physical volume (the
    /// image needs `lvm2`, e.g. from `setup`).
    Lvm,
}

/// How the guest gets to its kernel.
// The variants spell the values scenario files write (`uefi-systemd-boot`).
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Boot {
    /// QEMU loads the kernel and initramfs itself, with the command line of grub.cfg's
    /// first entry (`-kernel`, `-initrd`, `-append`).
    #[default]
    Direct,
    /// OVMF (UEFI) boots the disk: a GPT with an ESP holding systemd-boot (installed by
    /// `bootctl`) and the loader entries kernel-install made from `/etc/kernel/cmdline`.
    /// The image needs `systemd-boot` and `/etc/kernel/cmdline` (from `setup`).
    UefiSystemdBoot,
    /// As `uefi-systemd-boot`, with kernel-install's `layout=uki`: systemd-boot starts
    /// a unified kernel image (`EFI/Linux/*.efi`), whose embedded `.cmdline` ukify made
    /// from `/etc/kernel/cmdline`. The image also needs `systemd-ukify` and
    /// `/etc/kernel/install.conf` saying `layout=uki` (from `setup`).
    UefiUki,
    /// SeaBIOS boots the disk: a GPT with a BIOS boot partition holding GRUB's core
    /// image (`grub-install --target=i386-pc`) and the ext4 root, whose grub.cfg is
    /// the one `update-grub` wrote. The image needs `grub-pc` (from `setup`).
    BiosGrub,
    /// OVMF (UEFI) boots the disk: a GPT with an ESP holding GRUB at the removable
    /// path (`grub-install --target=x86_64-efi --removable --no-nvram`) and the ext4
    /// root with grub.cfg. The image needs `grub-efi-amd64` (from `setup`).
    UefiGrub,
}

impl Boot {
    /// As scenario files spell it.
    pub fn name(self) -> &'static str {
        match self {
            Boot::Direct => "direct",
            Boot::UefiSystemdBoot => "uefi-systemd-boot",
            Boot::UefiUki => "uefi-uki",
            Boot::BiosGrub => "bios-grub",
            Boot::UefiGrub => "uefi-grub",
        }
    }

    /// Firmware (OVMF) boots the disk's ESP with systemd-boot.
    pub fn is_systemd_boot(self) -> bool {
        matches!(self, Boot::UefiSystemdBoot | Boot::UefiUki)
    }

    /// GRUB from the disk reads the image's grub.cfg.
    pub fn is_grub(self) -> bool {
        matches!(self, Boot::BiosGrub | Boot::UefiGrub)
    }

    /// The disk has an EFI system partition, mounted at `/boot/efi` in the guest.
    pub fn has_esp(self) -> bool {
        self.is_systemd_boot() || self == Boot::UefiGrub
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub description: String,
    pub distro: Distro,
    pub generator: Generator,
    pub iommu: Iommu,
    /// QEMU `-device` strings; pin each with `addr=` (the AMD IOMMU takes a slot).
    #[serde(default)]
    pub devices: Vec<String>,
    /// Extra QEMU arguments (e.g. `-vga none`).
    #[serde(default)]
    pub qemu_args: Vec<String>,
    /// Shell run in the image (chroot) after the package is installed, before apply.
    #[serde(default)]
    pub setup: Option<String>,
    #[serde(default)]
    pub apply_in: ApplyIn,
    /// What the root filesystem sits on (`plain` or `lvm`).
    #[serde(default)]
    pub root: Root,
    /// How the guest boots (`direct`, `uefi-systemd-boot`, `bios-grub`, `uefi-grub`).
    #[serde(default)]
    pub boot: Boot,
    /// The text of `/etc/vfio-early.toml`.
    pub config: String,
    pub expect: Expect,
    /// Further boots on the same disk: each stage's actions run in the booted guest
    /// (after the probe's report), the guest powers off, and the next boot is checked
    /// against the stage's own `expect`.
    #[serde(default, rename = "stage")]
    pub stages: Vec<Stage>,
    /// Filled in by `load`.
    #[serde(skip)]
    pub path: PathBuf,
}

/// What to do in the booted guest before it shuts down, in this order: write the
/// config, `apply`, `undo`, each `apt` command, `run`; and what the next boot must
/// show. Every action must exit 0 (apply: `expect.apply_exit`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stage {
    /// The new text of `/etc/vfio-early.toml`.
    #[serde(default)]
    pub config: Option<String>,
    #[serde(default)]
    pub apply: bool,
    #[serde(default)]
    pub undo: bool,
    /// `apt-get` commands run offline in the guest (`-y --no-download`), e.g.
    /// `"purge vfio-early"`; what they install must already be in the image's apt
    /// cache (download it in `setup` with `apt-get install --download-only`).
    #[serde(default)]
    pub apt: Vec<String>,
    /// Shell run last.
    #[serde(default)]
    pub run: Option<String>,
    pub expect: Expect,
}

impl Stage {
    /// Whether the stage has an action; one without is only the next boot's
    /// expectations (a boot that goes on as the previous one left it).
    pub fn has_actions(&self) -> bool {
        self.config.is_some()
            || self.apply
            || self.undo
            || !self.apt.is_empty()
            || self.run.is_some()
    }

    /// The stage's actions as a shell script for the probe: one report section per
    /// action, `== action N WHAT`, its output, then `exit=STATUS`.
    pub fn script(&self) -> String {
        // Initramfs builds in the guest compress fast (COMPRESSLEVEL=1, a setting hosts
        // use too) and take the layer's module list (`layer::SMALL_INITRAMFS`): under
        // TCG, zstd -9 takes minutes an image, and MODULES=dep 74 s a build where the
        // list takes 48. initramfs-tools copies conf.d into the image, so the file's
        // name must not contain what `initramfs_lacks` looks for (`vfio-early`).
        let mut out = String::from(
            "# written by the boot harness: one stage's actions\n\
             mkdir -p /etc/initramfs-tools/conf.d\n\
             printf 'COMPRESSLEVEL=1\\n' > /etc/initramfs-tools/conf.d/zz-boot-harness\n",
        );
        let mut n = 0;
        let mut action = |what: &str, body: &str| {
            n += 1;
            out.push_str(&format!(
                "echo '== action {n} {what}'\n{body}\necho \"exit=$?\"\n"
            ));
        };
        if let Some(config) = &self.config {
            action(
                "config",
                &format!(
                    "cat > /etc/vfio-early.toml <<'VFE_STAGE_CONFIG'\n{config}\nVFE_STAGE_CONFIG"
                ),
            );
        }
        if self.apply {
            action("apply", "vfio-early apply 2>&1");
        }
        if self.undo {
            action("undo", "vfio-early undo 2>&1");
        }
        for a in &self.apt {
            action(
                &format!("apt-get {a}"),
                &format!("apt-get -y -q --no-download {a} 2>&1"),
            );
        }
        if let Some(run) = &self.run {
            action("run", &format!("( {run}\n) 2>&1"));
        }
        out
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Exit status of `vfio-early apply` (in the image or the guest).
    #[serde(default)]
    pub apply_exit: i32,
    /// Substrings of apply's output.
    #[serde(default)]
    pub apply_output: Vec<String>,
    /// Substrings of the output of the stage's `run` command.
    #[serde(default)]
    pub run_output: Vec<String>,
    /// PCI address → `vfio-pci`, a driver name, `none`, or `not vfio-pci`.
    #[serde(default)]
    pub drivers: BTreeMap<String, String>,
    /// Status check → verdict (`pass`, `warn`, `fail`); per-device checks as
    /// `"device 0000:00:05.0"`.
    #[serde(default)]
    pub status: BTreeMap<String, String>,
    /// Overall status verdict.
    #[serde(default)]
    pub status_verdict: Option<String>,
    /// Tokens that must be on `/proc/cmdline`.
    #[serde(default)]
    pub cmdline: Vec<String>,
    /// Tokens that must not be on `/proc/cmdline`.
    #[serde(default)]
    pub cmdline_absent: Vec<String>,
    /// Substrings that must appear in the kernel log lines the probe collected.
    #[serde(default)]
    pub kmsg: Vec<String>,
    /// Substrings of `vfio-early status` (human output).
    #[serde(default)]
    pub status_output: Vec<String>,
    /// Modules that must be loaded in the booted guest.
    #[serde(default)]
    pub modules_loaded: Vec<String>,
    /// With `apply_in = "guest"`: no file of apply's may exist after it ran.
    #[serde(default)]
    pub guest_files_absent: bool,
    /// Whether `/dev/vfio/` holds a group node.
    #[serde(default)]
    pub vfio_group_nodes: Option<bool>,
    /// Paths that must exist in the booted guest.
    #[serde(default)]
    pub paths_present: Vec<String>,
    /// Paths that must not exist in the booted guest.
    #[serde(default)]
    pub paths_absent: Vec<String>,
    /// Substrings of `vfio-early initramfs list` on the booted initramfs (our reader,
    /// run by the harness on the file the boot used).
    #[serde(default)]
    pub initramfs_has: Vec<String>,
    /// Substrings no line of that list may contain.
    #[serde(default)]
    pub initramfs_lacks: Vec<String>,
    /// The running kernel is the newest one installed in the guest.
    #[serde(default)]
    pub kernel_newest: bool,
    /// The firmware the guest booted through: `uefi` or `bios`.
    #[serde(default)]
    pub firmware: Option<Firmware>,
    /// What started the kernel: `systemd-boot`, `grub` or `direct` (QEMU itself).
    #[serde(default)]
    pub loader: Option<LoaderSeen>,
    /// Substrings of the boot's serial console (the kernel's and the initramfs's lines
    /// too, not only the probe's report).
    #[serde(default)]
    pub console: Vec<String>,
    /// `false` (stages only): the boot must end before the probe reports (a kernel
    /// panic, or a reboot, which ends QEMU: it runs with `-no-reboot`), and not by the
    /// timeout; a boot that reaches the probe fails. Only `console` is checked then.
    #[serde(default)]
    pub reaches_probe: Option<bool>,
}

impl Expect {
    /// Whether the boot these expectations are for must reach the probe.
    pub fn reaches_probe(&self) -> bool {
        self.reaches_probe != Some(false)
    }

    /// Every path the probe must report on (present or absent).
    pub fn paths(&self) -> impl Iterator<Item = &String> {
        self.paths_present.iter().chain(&self.paths_absent)
    }
}

/// The firmware a guest booted through, as the probe saw it (`/sys/firmware/efi`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Firmware {
    Uefi,
    Bios,
}

impl Firmware {
    /// As scenario files spell it.
    pub fn name(self) -> &'static str {
        match self {
            Firmware::Uefi => "uefi",
            Firmware::Bios => "bios",
        }
    }
}

/// What started the guest's kernel, as the probe saw it: systemd-boot's
/// `LoaderEntrySelected` EFI variable, GRUB's `BOOT_IMAGE=`, else QEMU's `-kernel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LoaderSeen {
    SystemdBoot,
    Grub,
    Direct,
}

impl LoaderSeen {
    /// As scenario files spell it.
    pub fn name(self) -> &'static str {
        match self {
            LoaderSeen::SystemdBoot => "systemd-boot",
            LoaderSeen::Grub => "grub",
            LoaderSeen::Direct => "direct",
        }
    }
}

impl Scenario {
    /// A rough cost, for running the longest scenarios first: a boot is one unit, and a
    /// stage with actions three more (under TCG an in-guest apply, undo, apt run or
    /// trial rebuilds an initramfs: about 70 s, three boots' worth).
    pub fn cost(&self) -> usize {
        1 + self
            .stages
            .iter()
            .map(|st| if st.has_actions() { 4 } else { 1 })
            .sum::<usize>()
    }

    pub fn name(&self) -> String {
        self.path
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "scenario".into())
    }
}

pub fn load(path: &Path) -> anyhow::Result<Scenario> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let mut s: Scenario =
        toml::from_str(&text).with_context(|| format!("scenario {}", path.display()))?;
    s.path = path.to_path_buf();
    if s.boot != Boot::Direct && s.root == Root::Lvm {
        bail!(
            "scenario {}: boot = \"{}\" takes a plain root only (its disk is a GPT with \
             a boot partition and an ext4 root partition)",
            path.display(),
            s.boot.name()
        );
    }
    check_stages(&s).with_context(|| format!("scenario {}", path.display()))?;
    for d in &s.devices {
        if !d.contains("addr=") {
            bail!(
                "scenario {}: device `{d}` has no addr=; pin every device (the AMD IOMMU takes a slot)",
                path.display()
            );
        }
    }
    Ok(s)
}

/// A boot that never reaches the probe can be checked only on its console, and runs no
/// stage's actions (the probe runs them).
fn check_stages(s: &Scenario) -> anyhow::Result<()> {
    if !s.expect.reaches_probe() {
        bail!("reaches_probe = false is for a stage's boot: the first boot runs the probe");
    }
    for (i, st) in s.stages.iter().enumerate() {
        let e = &st.expect;
        if e.reaches_probe() {
            continue;
        }
        if !checks_only_console(e) {
            bail!(
                "stage {}: with reaches_probe = false only `console` and the output of the \
                 stage's actions can be checked (the boot makes no report)",
                i + 1
            );
        }
        if s.stages.get(i + 1).is_some_and(Stage::has_actions) {
            bail!(
                "stage {}: its actions would run at the end of boot {}, which never reaches \
                 the probe (stage {}'s reaches_probe = false)",
                i + 2,
                i + 2,
                i + 1
            );
        }
    }
    Ok(())
}

fn checks_only_console(e: &Expect) -> bool {
    // The stage's actions ran in the boot before, whose report has their output.
    let rest = Expect {
        console: Vec::new(),
        reaches_probe: None,
        apply_exit: 0,
        apply_output: Vec::new(),
        run_output: Vec::new(),
        ..e.clone()
    };
    rest == Expect::default()
}

/// The probe's own count of boot `n` (1: the first): the boots before it that never
/// reached the probe did not count themselves.
pub fn probe_run(s: &Scenario, n: usize) -> usize {
    let skipped = (2..n)
        .filter(|b| {
            s.stages
                .get(b - 2)
                .is_some_and(|st| !st.expect.reaches_probe())
        })
        .count();
    n - skipped
}

/// Every scenario file in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> anyhow::Result<Vec<Scenario>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load(p)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shipped scenario parses (strictly), so a typo fails `cargo xtask test`
    /// even where no VM boots.
    #[test]
    fn every_shipped_scenario_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/boot/scenarios");
        let all = load_dir(&dir).expect("scenarios load");
        assert!(all.len() >= 10, "{} scenarios", all.len());
        for s in &all {
            assert!(!s.description.is_empty(), "{}", s.name());
        }
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let dir = tempfile_dir();
        let p = dir.join("typo.toml");
        std::fs::write(
            &p,
            "description = \"x\"\ndistro = \"bookworm\"\ngenerator = \"dracut\"\n\
             iommu = \"none\"\nconfig = \"\"\n[expect]\ndriverz = {}\n",
        )
        .expect("write");
        let err = format!("{:#}", load(&p).expect_err("typo accepted"));
        assert!(err.contains("driverz"), "{err}");
    }

    #[test]
    fn a_stage_runs_its_actions_in_order_each_reported() {
        let stage = Stage {
            config: Some("[iommu]\n".into()),
            apply: true,
            undo: true,
            apt: vec!["purge vfio-early".into()],
            run: Some("true".into()),
            expect: Expect::default(),
        };
        let script = stage.script();
        let order: Vec<&str> = script
            .lines()
            .filter_map(|l| l.strip_prefix("echo '== action "))
            .collect();
        assert_eq!(
            order,
            [
                "1 config'",
                "2 apply'",
                "3 undo'",
                "4 apt-get purge vfio-early'",
                "5 run'"
            ]
        );
        assert_eq!(script.matches("echo \"exit=$?\"").count(), 5, "{script}");
        assert!(script.contains("apt-get -y -q --no-download purge vfio-early"));
        assert!(script.contains("COMPRESSLEVEL=1"));
    }

    fn staged(stages: &str) -> Scenario {
        toml::from_str(&format!(
            "description = \"x\"\ndistro = \"trixie\"\ngenerator = \"initramfs-tools\"\n\
             iommu = \"intel\"\nconfig = \"\"\n[expect]\n{stages}"
        ))
        .expect("scenario")
    }

    #[test]
    fn a_boot_that_never_reaches_the_probe_checks_its_console_only_and_runs_nothing() {
        let ok = staged(
            "[[stage]]\nrun = \"vfio-early apply --trial\"\n[stage.expect]\n\
             reaches_probe = false\nconsole = [\"ALERT!\"]\n\
             [[stage]]\n[stage.expect]\ncmdline_absent = [\"vfio_early.trial\"]\n",
        );
        check_stages(&ok).expect("valid");
        assert!(!ok.stages[1].has_actions());
        let checks_report = staged(
            "[[stage]]\nrun = \"true\"\n[stage.expect]\nreaches_probe = false\n\
             drivers = { \"0000:00:05.0\" = \"e1000e\" }\n",
        );
        let err = check_stages(&checks_report).expect_err("a report check accepted");
        assert!(err.to_string().contains("only `console`"), "{err}");
        let acts_after = staged(
            "[[stage]]\nrun = \"true\"\n[stage.expect]\nreaches_probe = false\n\
             [[stage]]\nundo = true\n[stage.expect]\n",
        );
        let err = check_stages(&acts_after).expect_err("actions in an unreached boot");
        assert!(
            err.to_string().contains("boot 2, which never reaches"),
            "{err}"
        );
        let first = staged("reaches_probe = false\n");
        assert!(check_stages(&first).is_err());
    }

    #[test]
    fn the_probe_counts_only_the_boots_that_reached_it() {
        let s = staged(
            "[[stage]]\nrun = \"true\"\n[stage.expect]\nreaches_probe = false\n\
             [[stage]]\n[stage.expect]\n[[stage]]\nundo = true\n[stage.expect]\n",
        );
        // Boot 2 panics: boot 3 is the probe's second run, boot 4 its third.
        let runs: Vec<usize> = (1..=4).map(|n| probe_run(&s, n)).collect();
        assert_eq!(runs, [1, 2, 2, 3]);
        let plain = staged("[[stage]]\nundo = true\n[stage.expect]\n");
        assert_eq!(probe_run(&plain, 2), 2);
    }

    #[test]
    fn a_stage_with_actions_costs_more_than_a_boot() {
        let boots = staged("[[stage]]\n[stage.expect]\n[[stage]]\n[stage.expect]\n");
        let rebuild = staged("[[stage]]\nundo = true\n[stage.expect]\n");
        assert_eq!(boots.cost(), 3);
        assert_eq!(rebuild.cost(), 5);
        assert!(rebuild.cost() > boots.cost());
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("vfe-scenario-{}", std::process::id()));
        std::fs::create_dir_all(&d).expect("mkdir");
        d
    }
}
