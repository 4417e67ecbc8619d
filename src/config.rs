//! `/etc/vfio-early.toml`: the config types, parsing, and error rendering.
//!
//! Parsing is apart from I/O: [`parse`] takes text and a display name, [`load`] reads a
//! file (a regular file of at most [`MAX_CONFIG_BYTES`], any bytes) and calls it. Unknown
//! keys, wrong types, duplicate keys, malformed ids, addresses, kernel arguments
//! ([`KernelToken`]) or module names ([`ModuleName`]), and non-UTF-8 input all become a
//! [`ConfigError`] carrying file, line and column, the offending line (a bounded excerpt
//! of a long one), and a fix. Defaults live here, on the types.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::kargs::KernelToken;
use crate::pci::{PciAddress, VendorDevice};

/// The largest config read (1 MiB); a real one is a few kilobytes.
pub const MAX_CONFIG_BYTES: u64 = 1024 * 1024;

/// Characters of a long source line shown in an error, around the column.
const EXCERPT_CHARS: usize = 200;

/// Characters of a message or fix line; longer ones end in `…`.
const MESSAGE_CHARS: usize = 400;

/// The whole config. Every table and key is optional; defaults suit most users.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default, rename = "device")]
    pub devices: Vec<DeviceEntry>,
    #[serde(default)]
    pub iommu: Iommu,
    #[serde(default)]
    pub kernel: Kernel,
    #[serde(default)]
    pub modules: Modules,
    #[serde(default)]
    pub kvm: Kvm,
    #[serde(default)]
    pub interrupts: Interrupts,
    #[serde(default)]
    pub bootloader: Bootloader,
}

/// One `[[device]]` entry: selects devices by id, optionally narrowed.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// `vendor:device`, as `lspci -nn` prints it.
    pub id: VendorDevice,
    /// Only the device at this address (and it must have `id`).
    #[serde(default)]
    pub address: Option<PciAddress>,
    /// Only devices with this subsystem `vendor:device`.
    #[serde(default)]
    pub subsystem: Option<VendorDevice>,
    /// Only devices whose class code starts with these hex digits (`"03"`, `"0300"`).
    #[serde(default)]
    pub class: Option<ClassPrefix>,
    /// Also take the other functions of the same slot (a GPU's HDMI audio).
    #[serde(default = "yes")]
    pub whole_slot: bool,
}

fn yes() -> bool {
    true
}

/// A class-code prefix of 2, 4 or 6 hex digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassPrefix {
    pub value: u32,
    pub digits: u8,
}

impl ClassPrefix {
    pub fn matches(&self, class: crate::pci::PciClass) -> bool {
        let shift = 4 * (6 - u32::from(self.digits));
        (class.0 >> shift) == self.value
    }
}

impl fmt::Display for ClassPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:0width$x}",
            self.value,
            width = usize::from(self.digits)
        )
    }
}

impl<'de> Deserialize<'de> for ClassPrefix {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = s.strip_prefix("0x").unwrap_or(&s);
        let ok = matches!(t.len(), 2 | 4 | 6) && t.chars().all(|c| c.is_ascii_hexdigit());
        let value = if ok {
            u32::from_str_radix(t, 16).ok()
        } else {
            None
        };
        match value {
            Some(value) => Ok(ClassPrefix {
                value,
                digits: t.len() as u8,
            }),
            None => Err(serde::de::Error::custom(format!(
                "`{s}` is not a PCI class\nfix: write 2, 4 or 6 hex digits as `lspci -n` \
                 shows them, e.g. \"03\" (display) or \"0403\" (audio)"
            ))),
        }
    }
}

impl Serialize for ClassPrefix {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// `[iommu]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Iommu {
    /// Which IOMMU to enable on the command line; `auto` reads the CPU vendor.
    #[serde(default)]
    pub vendor: IommuVendor,
    /// Add `iommu=pt`: host devices bypass translation (faster, the usual choice).
    #[serde(default = "yes")]
    pub passthrough: bool,
}

impl Default for Iommu {
    fn default() -> Self {
        Iommu {
            vendor: IommuVendor::Auto,
            passthrough: true,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum IommuVendor {
    #[default]
    Auto,
    Intel,
    Amd,
}

/// `[kernel]`: command-line arguments beyond the IOMMU.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kernel {
    /// What to do about the boot framebuffer holding a taken GPU's memory.
    #[serde(default)]
    pub framebuffer: Framebuffer,
    /// Add `pcie_aspm=off`.
    #[serde(default)]
    pub pcie_aspm_off: bool,
    /// Add `pci=noaer`.
    #[serde(default)]
    pub pci_noaer: bool,
    /// `pcie_acs_override=` values; only patched kernels (Proxmox) honour it.
    #[serde(default)]
    pub acs_override: Vec<AcsOverride>,
    /// Further arguments, appended as given; each one kernel argument.
    #[serde(default)]
    pub extra_args: Vec<KernelToken>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framebuffer {
    /// `initcall_blacklist=sysfb_init` only when a taken GPU is the boot VGA.
    #[default]
    Auto,
    /// Never add a framebuffer argument.
    Keep,
    /// Always add `initcall_blacklist=sysfb_init`.
    SysfbOff,
    /// Add `video=efifb:off video=vesafb:off video=simplefb:off` (also loses the
    /// host's text console on that GPU).
    VideoOff,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AcsOverride {
    Downstream,
    Multifunction,
    /// `id:vvvv:dddd` forms are not modelled; use `extra_args` for those.
    #[serde(rename = "downstream,multifunction")]
    Both,
}

/// `[modules]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Modules {
    /// `options vfio-pci disable_vga=1` (advised with OVMF guests).
    #[serde(default)]
    pub disable_vga: bool,
    /// Drivers to blacklist host-wide. Empty by default: vfio-early takes devices by
    /// address, so blacklisting is only needed for drivers that misbehave.
    #[serde(default)]
    pub blacklist: Vec<ModuleName>,
}

/// A kernel module name as kmod and the kernel take it: letters, digits, `_` and `-`, at
/// most 55 characters (the kernel's `MODULE_NAME_LEN` with its NUL, on 64-bit).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ModuleName(String);

impl ModuleName {
    pub const MAX_LEN: usize = 55;

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for ModuleName {
    type Err = crate::kargs::TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let fix = "write the module name as `lsmod` or `modinfo -F name` prints it: \
                   letters, digits, `_` and `-`, one name per list element";
        let bad = s
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '_' || *c == '-'));
        let message = if s.is_empty() {
            "an empty module name".to_string()
        } else if let Some(c) = bad {
            format!(
                "`{}` is not a module name: `{}` cannot appear in one",
                shown(s),
                shown(&c.to_string())
            )
        } else if s.chars().count() > Self::MAX_LEN {
            format!(
                "`{}` is not a module name: longer than {} characters",
                shown(s),
                Self::MAX_LEN
            )
        } else {
            return Ok(ModuleName(s.to_string()));
        };
        Err(crate::kargs::TokenError {
            message,
            fix: fix.to_string(),
        })
    }
}

impl fmt::Display for ModuleName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for ModuleName {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for ModuleName {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A value from the config as an error message shows it: control characters escaped
/// (TOML's way), at most 60 characters, so a message stays one short line.
pub fn shown(s: &str) -> String {
    const MAX: usize = 60;
    let mut out = String::new();
    for (n, c) in s.chars().enumerate() {
        if n == MAX {
            out.push('…');
            break;
        }
        match c {
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

/// `[kvm]`
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Kvm {
    /// `options kvm ignore_msrs=1` (some Windows tools and macOS guests need it).
    #[serde(default)]
    pub ignore_msrs: bool,
    /// `report_ignored_msrs`; set false to keep the log quiet with `ignore_msrs`.
    #[serde(default = "yes")]
    pub report_ignored_msrs: bool,
}

impl Default for Kvm {
    fn default() -> Self {
        Kvm {
            ignore_msrs: false,
            report_ignored_msrs: true,
        }
    }
}

/// `[interrupts]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Interrupts {
    /// `options vfio_iommu_type1 allow_unsafe_interrupts=1`: lets passthrough work without
    /// interrupt remapping, at the cost of letting a guest forge interrupts (MSI attacks).
    #[serde(default)]
    pub allow_unsafe: bool,
}

/// `[bootloader]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Bootloader {
    #[serde(default)]
    pub kind: BootloaderKind,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum BootloaderKind {
    #[default]
    Auto,
    Grub,
    SystemdBoot,
    ProxmoxBootTool,
    None,
}

/// A config that could not be read, with where and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based; 0 when the error has no position (unreadable file).
    pub line: usize,
    pub column: usize,
    pub message: String,
    /// The offending line's text, when there is one.
    pub source_line: Option<String>,
    /// Width of the span to underline, at least 1.
    pub span_len: usize,
    pub fix: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            writeln!(f, "{}: {}", self.file.display(), self.message)?;
        } else {
            writeln!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                self.line,
                self.column,
                self.message
            )?;
        }
        if let Some(text) = &self.source_line {
            let (text, column, span_len) = excerpt(text, self.column, self.span_len);
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            writeln!(f, "{pad} |")?;
            writeln!(f, "{num} | {text}")?;
            let lead: String = text
                .chars()
                .take(column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            writeln!(f, "{pad} | {lead}{}", "^".repeat(span_len.max(1)))?;
        }
        write!(f, "fix: {}", self.fix)
    }
}

/// The part of a source line an error shows: all of a short line, or
/// [`EXCERPT_CHARS`] characters around `column` with `…` where it was cut; control
/// characters (which the terminal would act on) as `\u{FFFD}`. Returns the text and the
/// column and underline width within it.
fn excerpt(text: &str, column: usize, span_len: usize) -> (String, usize, usize) {
    let chars: Vec<char> = text
        .chars()
        .map(|c| {
            if c.is_control() && c != '\t' {
                '\u{FFFD}'
            } else {
                c
            }
        })
        .collect();
    if chars.len() <= EXCERPT_CHARS {
        return (chars.into_iter().collect(), column, span_len);
    }
    let at = column.saturating_sub(1).min(chars.len());
    let start = at
        .saturating_sub(EXCERPT_CHARS / 2)
        .min(chars.len() - EXCERPT_CHARS);
    let end = start + EXCERPT_CHARS;
    let mut out = String::new();
    let mut column = at - start + 1;
    if start > 0 {
        out.push('…');
        column += 1;
    }
    out.extend(&chars[start..end]);
    if end < chars.len() {
        out.push('…');
    }
    let span_len = span_len.min(end.saturating_sub(at)).max(1);
    (out, column, span_len)
}

/// One line of at most [`MESSAGE_CHARS`] characters.
fn bounded(line: &str) -> String {
    match line.char_indices().nth(MESSAGE_CHARS) {
        Some((i, _)) => format!("{}…", &line[..i]),
        None => line.to_string(),
    }
}

/// Parses config text. `file` is only used in error messages.
pub fn parse(text: &str, file: &Path) -> Result<Config, ConfigError> {
    let config: Config = toml::from_str(text).map_err(|e| {
        let message = e.message().trim().to_string();
        let span = e
            .span()
            .map(|s| element_span(text, &s, &message).unwrap_or(s));
        error_at(text, file, span, &message)
    })?;
    validate(&config, text, file)?;
    Ok(config)
}

/// The TOML crate locates an error in a list element (a kernel argument, a module name)
/// at the whole list; this finds the element whose own check gives `message`.
fn element_span(
    text: &str,
    list: &std::ops::Range<usize>,
    message: &str,
) -> Option<std::ops::Range<usize>> {
    #[derive(Deserialize)]
    struct Wrapper {
        v: Vec<toml::Spanned<String>>,
    }
    const PREFIX: &str = "v = ";
    let slice = text.get(list.clone()).filter(|s| s.starts_with('['))?;
    let wrapper: Wrapper = toml::from_str(&format!("{PREFIX}{slice}")).ok()?;
    let gives_message = |value: &str| {
        let token = value.parse::<KernelToken>().err().map(|e| e.to_string());
        let module = value.parse::<ModuleName>().err().map(|e| e.to_string());
        token.as_deref() == Some(message) || module.as_deref() == Some(message)
    };
    wrapper
        .v
        .iter()
        .find(|item| gives_message(item.get_ref()))
        .and_then(|item| {
            let span = item.span();
            let start = span.start.checked_sub(PREFIX.len())?;
            let end = span.end.checked_sub(PREFIX.len())?;
            Some(list.start + start..list.start + end)
        })
}

/// Reads and parses a config file; any bytes in, a [`ConfigError`] for anything wrong.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(&read_text(path)?, path)
}

/// The config file's text; unreadable or non-UTF-8 files are located errors. Only a
/// regular file is read (a FIFO would block, a device could be endless), and at most
/// [`MAX_CONFIG_BYTES`] of it.
pub fn read_text(path: &Path) -> Result<String, ConfigError> {
    let unpositioned = |message: String, fix: &str| ConfigError {
        file: path.to_path_buf(),
        line: 0,
        column: 0,
        message,
        source_line: None,
        span_len: 1,
        fix: fix.to_string(),
    };
    let io_error = |e: std::io::Error| {
        let fix = if e.kind() == std::io::ErrorKind::NotFound {
            "create it (the package ships a commented example), or name another file \
             with --config"
        } else {
            "check the file's permissions; vfio-early must be able to read it"
        };
        unpositioned(format!("cannot read the config: {e}"), fix)
    };
    let not_regular = |kind: std::fs::FileType| {
        unpositioned(
            format!(
                "the config is not a regular file (it is {})",
                crate::root::file_kind(kind)
            ),
            "name a regular file with --config",
        )
    };
    // Checked before opening: opening a FIFO blocks until a writer comes.
    let meta = std::fs::metadata(path).map_err(io_error)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let file = std::fs::File::open(path).map_err(io_error)?;
    // And on what was opened, in case the path changed in between.
    let meta = file.metadata().map_err(io_error)?;
    if !meta.is_file() {
        return Err(not_regular(meta.file_type()));
    }
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(unpositioned(
            format!(
                "the config is larger than {} MiB",
                MAX_CONFIG_BYTES / (1024 * 1024)
            ),
            "a config is a few kilobytes; check that --config names the right file",
        ));
    }
    match String::from_utf8(bytes) {
        Ok(t) => Ok(t),
        Err(e) => {
            let good = e.utf8_error().valid_up_to();
            let bytes = e.into_bytes();
            let prefix = String::from_utf8_lossy(&bytes[..good]).into_owned();
            let (line, column) = line_col(&prefix, good);
            let line_text = String::from_utf8_lossy(&bytes)
                .lines()
                .nth(line - 1)
                .map(str::to_string);
            Err(ConfigError {
                file: path.to_path_buf(),
                line,
                column,
                message: format!("the file is not UTF-8 text (bad byte at offset {good})"),
                source_line: line_text,
                span_len: 1,
                fix: "save the file as UTF-8; TOML files must be UTF-8".to_string(),
            })
        }
    }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let col = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, col)
}

fn error_at(
    text: &str,
    file: &Path,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> ConfigError {
    let (line, column, source_line, span_len) = match span {
        Some(r) => {
            let (line, column) = line_col(text, r.start);
            let line_text = text.lines().nth(line - 1).unwrap_or("").to_string();
            // Underline at most to the end of the line.
            let rest = line_text.chars().count().saturating_sub(column - 1);
            let len = text
                .get(r.clone())
                .map(|s| s.chars().count())
                .unwrap_or(1)
                .min(rest)
                .max(1);
            (line, column, Some(line_text), len)
        }
        None => (0, 0, None, 1),
    };
    ConfigError {
        file: file.to_path_buf(),
        line,
        column,
        message: bounded(&first_line(message)),
        source_line,
        span_len,
        fix: bounded(&fix_for(message)),
    }
}

fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).to_string()
}

/// The fix to show for a parser message. Our own messages already say what to write;
/// the TOML crate's need a hint.
fn fix_for(message: &str) -> String {
    if let Some((_, fix)) = message.split_once("\nfix: ") {
        return fix.trim().to_string();
    }
    let m = message.to_ascii_lowercase();
    let expected = message
        .split_once("expected ")
        .map(|(_, e)| e.trim_start_matches("one of ").trim_end_matches('.').trim());
    let quoted = message.split('`').nth(1).unwrap_or("");
    if m.contains("unknown field") {
        if let Some(expected) = expected {
            let hint = nearest(quoted, expected)
                .map(|k| format!("did you mean `{k}`? "))
                .unwrap_or_default();
            return format!("{hint}the keys allowed here are {expected}");
        }
        return "remove or rename the key; see vfio-early.toml(5) for the keys".to_string();
    }
    if m.contains("unknown variant") {
        if let Some(expected) = expected {
            return format!("use one of {expected}");
        }
    }
    if m.contains("duplicate key") {
        return "each key may appear once per table; delete one of them".to_string();
    }
    if m.contains("missing field") {
        return "add the key; a [[device]] entry needs at least `id = \"vvvv:dddd\"`".to_string();
    }
    if m.contains("invalid type") {
        return "give the value the type shown (strings in quotes, true/false unquoted, \
                lists in [ ])"
            .to_string();
    }
    "correct the TOML syntax at the position shown".to_string()
}

/// The allowed key closest to a misspelt one (edit distance at most 2).
fn nearest(word: &str, expected: &str) -> Option<String> {
    expected
        .split(", ")
        .map(|k| k.trim_matches('`'))
        .map(|k| (edit_distance(word, k), k))
        .filter(|(d, _)| *d <= 2)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.to_string())
}

fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Checks that need the whole config: two entries for the same address, an address
/// whose entry is narrowed further in ways that cannot both hold.
fn validate(config: &Config, text: &str, file: &Path) -> Result<(), ConfigError> {
    let mut seen = std::collections::BTreeMap::new();
    for (i, entry) in config.devices.iter().enumerate() {
        if let Some(addr) = entry.address {
            if let Some(first) = seen.insert(addr, i) {
                let span = find_nth_entry_span(text, i);
                let mut err = error_at(
                    text,
                    file,
                    span,
                    &format!(
                        "device entries {} and {} both name address {addr}",
                        first + 1,
                        i + 1
                    ),
                );
                err.fix = "keep one entry per address".to_string();
                return Err(err);
            }
        }
    }
    Ok(())
}

/// The span of the `n`th `[[device]]` header, for whole-config errors.
fn find_nth_entry_span(text: &str, n: usize) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    let mut count = 0;
    for line in text.split_inclusive('\n') {
        if line.trim_start().starts_with("[[device]]") {
            if count == n {
                let start = offset + (line.len() - line.trim_start().len());
                return Some(start..start + "[[device]]".len());
            }
            count += 1;
        }
        offset += line.len();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Result<Config, ConfigError> {
        parse(text, Path::new("/etc/vfio-early.toml"))
    }

    #[test]
    fn empty_config_has_defaults() {
        let c = p("").unwrap();
        assert!(c.devices.is_empty());
        assert!(c.iommu.passthrough);
        assert_eq!(c.bootloader.kind, BootloaderKind::Auto);
        assert!(c.kvm.report_ignored_msrs);
    }

    #[test]
    fn device_entry_parses() {
        let c =
            p("[[device]]\nid = \"10DE:1B80\"\naddress = \"01:00.0\"\nclass = \"03\"\n").unwrap();
        let d = &c.devices[0];
        assert_eq!(d.id.to_string(), "10de:1b80");
        assert_eq!(
            d.address.map(|a| a.to_string()).as_deref(),
            Some("0000:01:00.0")
        );
        assert!(d.whole_slot);
        assert!(d.class.unwrap().matches(crate::pci::PciClass(0x030000)));
        assert!(!d.class.unwrap().matches(crate::pci::PciClass(0x040300)));
    }

    #[test]
    fn bad_id_points_at_the_value() {
        let e = p("[[device]]\nid = \"10de:zz\"\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 6));
        assert!(e.fix.contains("lspci -nn"), "{e}");
    }

    #[test]
    fn unknown_key_lists_allowed_keys() {
        let e = p("[iommu]\npasthrough = true\n").unwrap_err();
        assert_eq!(e.line, 2);
        assert!(e.fix.contains("passthrough"), "{}", e.fix);
    }

    #[test]
    fn duplicate_address_is_rejected() {
        let e = p("[[device]]\nid = \"8086:10d3\"\naddress = \"00:03.0\"\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:00:03.0\"\n").unwrap_err();
        assert_eq!(e.line, 4);
    }

    #[test]
    fn a_bad_kernel_argument_points_at_its_list_element() {
        let e = p("[kernel]\nextra_args = [\n  \"quiet\",\n  \"iommu=pt intel_iommu=on\",\n]\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (4, 3), "{e}");
        assert!(e.fix.contains("its own list element"), "{e}");
        let e = p("[kernel]\nextra_args = [\"quiet\", \"a\\nb\"]\n").unwrap_err();
        assert_eq!((e.line, e.column), (2, 24), "{e}");
        assert!(!e.message.contains('\n'), "{e}");
    }

    #[test]
    fn a_bad_module_name_points_at_its_list_element() {
        let e = p("[modules]\nblacklist = [\"nouveau\", \"amdgpu\\ninstall x /bin/sh\"]\n")
            .unwrap_err();
        assert_eq!((e.line, e.column), (2, 25), "{e}");
        assert!(e.message.contains("not a module name"), "{e}");
        for ok in ["nouveau", "snd-hda-intel", "snd_hda_codec_hdmi", "i915"] {
            assert_eq!(ok.parse::<ModuleName>().unwrap().as_str(), ok);
        }
        for bad in ["", "a b", "../x", "#x", "nouveau\n", &"m".repeat(56)] {
            assert!(bad.parse::<ModuleName>().is_err(), "{bad:?}");
        }
        assert!("m".repeat(55).parse::<ModuleName>().is_ok());
    }

    #[test]
    fn a_long_line_shows_an_excerpt_around_the_column() {
        let many = "\"y\", ".repeat(2000);
        let text = format!("[kernel]\nextra_args = [{many}\"a b\", {many}]\n");
        let e = p(&text).unwrap_err();
        let shown = e.to_string();
        assert!(shown.len() < 1500, "{} bytes:\n{shown}", shown.len());
        let lines: Vec<&str> = shown.lines().collect();
        // The excerpt's caret sits under the offending element.
        let (src, caret) = (lines[2], lines[3]);
        let at = caret.chars().position(|c| c == '^').unwrap();
        let under: String = src.chars().skip(at).take(6).collect();
        assert_eq!(under, "\"a b\",", "{shown}");
        assert!(src.contains('…'));
    }

    #[test]
    fn excerpt_keeps_short_lines_and_marks_cuts() {
        assert_eq!(excerpt("a\tb", 3, 1), ("a\tb".to_string(), 3, 1));
        assert_eq!(excerpt("a\u{1b}[2Jb", 1, 1).0, "a\u{FFFD}[2Jb");
        let long = "z".repeat(1000);
        let (t, col, span) = excerpt(&long, 500, 5);
        assert_eq!((t.chars().count(), col, span), (202, 102, 5));
        let (t, col, span) = excerpt(&long, 1000, 5);
        assert_eq!((t.chars().count(), col, span), (201, 201, 1));
        let (t, col, _) = excerpt(&long, 1, 1);
        assert_eq!((t.chars().count(), col), (201, 1));
    }

    #[test]
    fn line_col_counts_chars() {
        assert_eq!(line_col("ab\ncé d", 7), (2, 4));
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    const SHIPPED: &str = include_str!("../etc/vfio-early.toml");

    #[test]
    fn shipped_config_is_inert() {
        let c = parse(SHIPPED, Path::new("etc/vfio-early.toml")).unwrap();
        assert_eq!(c, Config::default());
    }

    /// Uncommenting every example line gives a valid config: the examples stay true.
    #[test]
    fn shipped_examples_parse_when_uncommented() {
        let text: String = SHIPPED
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| {
                l.starts_with('[') || l.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            })
            .map(|l| format!("{l}\n"))
            .collect();
        let c = parse(&text, Path::new("uncommented")).unwrap();
        assert_eq!(c.devices.len(), 2);
        assert!(!c.devices[1].whole_slot);
    }

    /// Every key the parser knows is documented in the shipped file.
    #[test]
    fn shipped_config_documents_every_key() {
        let full = Config {
            devices: vec![DeviceEntry {
                id: "0000:0000".parse().unwrap(),
                address: Some("00:00.0".parse().unwrap()),
                subsystem: Some("0000:0000".parse().unwrap()),
                class: Some(ClassPrefix {
                    value: 3,
                    digits: 2,
                }),
                whole_slot: true,
            }],
            ..Config::default()
        };
        let value = toml::Value::try_from(&full).unwrap();
        let mut keys = Vec::new();
        if let toml::Value::Table(t) = value {
            for (table, v) in t {
                match v {
                    toml::Value::Table(inner) => keys.extend(inner.keys().cloned()),
                    toml::Value::Array(a) => {
                        for item in a {
                            if let toml::Value::Table(inner) = item {
                                keys.extend(inner.keys().cloned());
                            }
                        }
                    }
                    _ => {}
                }
                keys.push(table);
            }
        }
        for key in keys {
            assert!(SHIPPED.contains(&key), "`{key}` is not documented");
        }
    }
}
