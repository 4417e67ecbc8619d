//! Kernel command-line arguments: [`KernelToken`], one argument as the kernel reads it,
//! checked once when the config is parsed; its text for each file that carries it; and
//! pure token editing of the first line of `/etc/kernel/cmdline` (adding vfio-early's
//! tokens while keeping every token the user wrote, and taking exactly those back out).
//!
//! The kernel splits its command line with `next_arg()` (lib/cmdline.c): arguments are
//! separated by spaces, a double quote toggles "inside quotes" (spaces no longer split),
//! there is no escape character, and the value of `param="a b"` is `a b`. [`split_args`]
//! follows it to the letter, so a token such as `dyndbg="module vfio_pci +p"` stays one
//! token when a line is edited.
//!
//! A [`KernelToken`] is the subset that every destination can carry unchanged:
//! `param`, `param=value` or `param="value with spaces"`, in printable ASCII, without
//! `'` or `\`. `/etc/kernel/cmdline` (kernel-install, ukify's UKI `.cmdline`,
//! proxmox-boot-tool) takes the token as written. GRUB takes [`KernelToken::grub_word`]:
//! `10_linux` pastes it into grub.cfg's `linux` line, GRUB's own parser removes quotes and
//! expands `$`, and GRUB's loader quotes an argument with spaces again as `"param=a b"`,
//! which the kernel reads as the same param and value; a `'`, `\` or `"` left in an
//! argument would reach the kernel with a backslash before it, hence the subset.

use std::fmt;
use std::ops::Deref;
use std::str::FromStr;

use crate::config::shown;

/// The kernel's whole command line on x86 (`COMMAND_LINE_SIZE`); no argument is longer.
pub const MAX_TOKEN_LEN: usize = 2048;

/// Characters of a parameter name; with `=`, the characters GRUB's parser and the
/// shell leave alone outside quotes.
const PARAM_PUNCT: &str = "_-.,:/+@%";

/// Words GRUB's lexer (grub-core/script/yylex.l) reads as reserved words.
const GRUB_RESERVED: &[&str] = &[
    "case", "do", "done", "elif", "else", "esac", "fi", "for", "function", "if", "in", "select",
    "then", "until", "while",
];

/// One kernel command-line argument, valid for every destination (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KernelToken(String);

/// Why a string is not a [`KernelToken`]; shown to users as is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}\nfix: {fix}")]
pub struct TokenError {
    pub message: String,
    pub fix: String,
}

fn refuse(message: String, fix: impl Into<String>) -> TokenError {
    TokenError {
        message,
        fix: fix.into(),
    }
}

fn is_param_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || PARAM_PUNCT.contains(c)
}

impl FromStr for KernelToken {
    type Err = TokenError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        check_characters(s)?;
        check_shape(s)?;
        check_param_and_value(s)?;
        Ok(KernelToken(s.to_string()))
    }
}

const QUOTED_VALUE_FIX: &str = "to keep spaces in a value, enclose the value in double \
                                quotes: param=\"a b\" (in TOML: 'param=\"a b\"')";

/// No empty token, control character, non-ASCII character, single quote or backslash.
fn check_characters(s: &str) -> Result<(), TokenError> {
    let quoted_value_fix = QUOTED_VALUE_FIX;
    if s.is_empty() {
        return Err(refuse(
            "an empty kernel argument".into(),
            "remove the empty string from the list",
        ));
    }
    if let Some(c) = s.chars().find(|c| c.is_control()) {
        let fix = if c == '\n' || c == '\r' {
            "the kernel command line is one line: write each argument as its own list \
                 element"
        } else {
            "remove the control character"
        };
        return Err(refuse(
            format!(
                "`{}` has a control character ({}) in a kernel argument",
                shown(s),
                shown(&c.to_string())
            ),
            fix,
        ));
    }
    if let Some(c) = s.chars().find(|c| !c.is_ascii()) {
        return Err(refuse(
            format!(
                "`{}` has a character that is not ASCII (`{c}`, U+{:04X})",
                shown(s),
                u32::from(c)
            ),
            "write kernel arguments in ASCII; the kernel reads some bytes of other \
                 characters as spaces or control characters",
        ));
    }
    if s.contains('\'') {
        return Err(refuse(
            format!(
                "`{}` has a single quote; the kernel reads quotes only as `\"`",
                shown(s)
            ),
            quoted_value_fix,
        ));
    }
    if s.contains('\\') {
        // Tutorials escape `$` for GRUB by hand (`memmap=4G\$4G`); vfio-early does.
        let fix = match s.replace('\\', "").parse::<KernelToken>() {
            Ok(t) => format!(
                "write `{}`: vfio-early quotes each argument for GRUB itself",
                shown(&t)
            ),
            Err(_) => format!("remove the backslash; {quoted_value_fix}"),
        };
        return Err(refuse(
            format!(
                "`{}` has a backslash; the kernel has no escapes, and GRUB would pass \
                     it on doubled",
                shown(s)
            ),
            fix,
        ));
    }
    Ok(())
}

/// No spaces around, balanced quotes, one argument as the kernel splits them.
fn check_shape(s: &str) -> Result<(), TokenError> {
    let quoted_value_fix = QUOTED_VALUE_FIX;
    if s.starts_with(' ') || s.ends_with(' ') {
        return Err(refuse(
            format!("`{}` has a space before or after the argument", shown(s)),
            format!("remove the spaces around it; {quoted_value_fix}"),
        ));
    }
    if s.matches('"').count() % 2 == 1 {
        return Err(refuse(
            format!(
                "`{}` has an unbalanced double quote; the kernel would read the rest \
                     of the command line into this argument",
                shown(s)
            ),
            "close the quote at the end of the value: param=\"a b\"",
        ));
    }
    let args = split_args(s);
    if args.len() > 1 {
        // A few elements make the point; a pasted command line may hold hundreds.
        let mut list: Vec<String> = args
            .iter()
            .take(4)
            .map(|a| format!("\"{}\"", shown(a)))
            .collect();
        if args.len() > 4 {
            list.push("…".to_string());
        }
        return Err(refuse(
            format!("`{}` is {} kernel arguments, not one", shown(s), args.len()),
            format!(
                "write each argument as its own list element: [{}]; {quoted_value_fix}",
                list.join(", ")
            ),
        ));
    }
    Ok(())
}

/// A parameter name the kernel reads as one, a value quoted whole or not at all, and a
/// length the command line can hold.
fn check_param_and_value(s: &str) -> Result<(), TokenError> {
    let (param, value) = match s.split_once('=') {
        Some((p, v)) => (p, Some(v)),
        None => (s, None),
    };
    if param.starts_with('"') {
        let inner = s.trim_matches('"');
        let fix = match inner.split_once('=') {
            Some((p, v)) => format!("quote only the value: {p}=\"{v}\""),
            None => "remove the quotes".to_string(),
        };
        return Err(refuse(
            format!("`{}` is quoted as a whole", shown(s)),
            shown(&fix),
        ));
    }
    if param.is_empty() {
        return Err(refuse(
            format!("`{}` has no parameter name before `=`", shown(s)),
            "write it as param=value",
        ));
    }
    if let Some(c) = param.chars().find(|c| !is_param_char(*c)) {
        return Err(refuse(
            format!(
                "`{}` is not a kernel parameter: `{c}` cannot appear in a parameter name",
                shown(s)
            ),
            format!(
                "parameter names use letters, digits and `{PARAM_PUNCT}`; anything \
                     else belongs in a value, after `=`"
            ),
        ));
    }
    if let Some(v) = value {
        let inner = v
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(v);
        if inner.contains('"') {
            return Err(refuse(
                format!(
                    "`{}` has a double quote inside its value; quotes may only enclose \
                         the whole value",
                    shown(s)
                ),
                shown(&format!(
                    "enclose the whole value, with no quote inside: {param}=\"{}\"",
                    inner.replace('"', "")
                )),
            ));
        }
        if inner.contains("  ") {
            return Err(refuse(
                format!(
                    "`{}` has spaces in a row; kernel-install and ukify squeeze them \
                         to one",
                    shown(s)
                ),
                "separate words in a value by single spaces",
            ));
        }
    }
    if s.len() > MAX_TOKEN_LEN {
        return Err(refuse(
            format!(
                "a kernel argument of {} bytes is longer than the kernel's whole \
                     command line ({MAX_TOKEN_LEN} bytes on x86)",
                s.len()
            ),
            "shorten the argument",
        ));
    }
    Ok(())
}

impl KernelToken {
    /// The token as written: the form `/etc/kernel/cmdline` and a UKI carry.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The parameter name, as the kernel reads it.
    pub fn param(&self) -> &str {
        kernel_reads(&self.0).0
    }

    /// The value without its enclosing quotes, as the kernel reads it; `None` for a
    /// bare `param`.
    pub fn value(&self) -> Option<&str> {
        kernel_reads(&self.0).1
    }

    /// The token as a word of GRUB's script language, for grub.cfg's `linux` line.
    /// Plain tokens are written as they are; any other value is enclosed in double
    /// quotes with `$` escaped (inside GRUB's double quotes only `$`, `\` and `"` are
    /// special, and a token has no `\` or `"` in its value). GRUB removes the quotes
    /// and its loader passes `param=value`, quoted again when it has a space.
    pub fn grub_word(&self) -> String {
        let t = self.as_str();
        let plain = t.chars().all(|c| is_param_char(c) || c == '=');
        if plain && !GRUB_RESERVED.contains(&t) {
            return t.to_string();
        }
        let quote = |s: &str| format!("\"{}\"", s.replace('$', "\\$"));
        match self.value() {
            Some(v) => format!("{}={}", self.param(), quote(v)),
            None => quote(self.param()),
        }
    }
}

impl fmt::Display for KernelToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A token is a string wherever one is wanted (the plan carries strings).
impl Deref for KernelToken {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl serde::Serialize for KernelToken {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for KernelToken {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

fn is_space(b: u8) -> bool {
    // The kernel's isspace() on ASCII; its Latin-1 table also has 0xA0, which never
    // starts a UTF-8 character and never appears in a token.
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// `next_arg()` on text that starts at an argument: the argument's raw text, its param
/// and value as the kernel reads them, and the text after it with leading spaces
/// skipped. Every index is at an ASCII byte, so every slice is on a char boundary.
fn next_arg(args: &str) -> (&str, &str, Option<&str>, &str) {
    let b = args.as_bytes();
    let quoted = b.first() == Some(&b'"');
    let start = usize::from(quoted);
    let mut in_quote = quoted;
    // As in the kernel, an `=` right at the start is not a separator (0 means none).
    let mut equals = 0;
    let mut i = start;
    while i < b.len() {
        if is_space(b[i]) && !in_quote {
            break;
        }
        if equals == 0 && b[i] == b'=' && i > start {
            equals = i;
        }
        if b[i] == b'"' {
            in_quote = !in_quote;
        }
        i += 1;
    }
    let end = i;
    let ends_in_quote = end > start && b[end - 1] == b'"';
    let mut stripped = false;
    let (param, value) = if equals == 0 {
        let pe = if quoted && ends_in_quote {
            end - 1
        } else {
            end
        };
        (&args[start..pe], None)
    } else {
        let mut vs = equals + 1;
        let mut ve = end;
        if vs < end && b[vs] == b'"' {
            vs += 1;
            if ends_in_quote && end > vs {
                ve = end - 1;
                stripped = true;
            }
        }
        if quoted && ends_in_quote && !stripped && end > vs {
            ve = end - 1;
        }
        (&args[start..equals], Some(&args[vs..ve]))
    };
    (
        &args[..end],
        param,
        value,
        args[end..].trim_start_matches(|c: char| c.is_ascii() && is_space(c as u8)),
    )
}

/// The param and value the kernel reads from one argument's text.
pub fn kernel_reads(arg: &str) -> (&str, Option<&str>) {
    let (_, param, value, _) = next_arg(arg);
    (param, value)
}

/// The arguments of a command line, as the kernel splits them, in their raw text.
pub fn split_args(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line.trim_start_matches(|c: char| c.is_ascii() && is_space(c as u8));
    while !rest.is_empty() {
        let (raw, _, _, next) = next_arg(rest);
        out.push(raw);
        rest = next;
    }
    out
}

/// Whether a command line carries `token`: the same text, or an argument the kernel reads
/// as the same param and value (GRUB passes `dyndbg="a b"` on as `"dyndbg=a b"`).
pub fn cmdline_has(cmdline: &str, token: &str) -> bool {
    let want = kernel_reads(token);
    split_args(cmdline)
        .into_iter()
        .any(|a| a == token || kernel_reads(a) == want)
}

fn split_first_line(text: &str) -> (&str, Option<&str>) {
    match text.split_once('\n') {
        Some((f, r)) => (f, Some(r)),
        None => (text, None),
    }
}

/// Adds each token not already present to the end of the first line. Returns the new
/// text and the tokens actually added (the ones `undo` may remove).
pub fn add_tokens(text: &str, tokens: &[String]) -> (String, Vec<String>) {
    let (first, rest) = split_first_line(text);
    let mut line = first.trim_end().to_string();
    let mut added: Vec<String> = Vec::new();
    for t in tokens {
        if !cmdline_has(first, t) && !added.contains(t) {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(t);
            added.push(t.clone());
        }
    }
    let out = match rest {
        Some(r) => format!("{line}\n{r}"),
        None => format!("{line}\n"),
    };
    (out, added)
}

/// Removes each of `tokens` once from the first line, keeping the other tokens in order.
pub fn remove_tokens(text: &str, tokens: &[String]) -> String {
    let (first, rest) = split_first_line(text);
    let mut left: Vec<&str> = tokens.iter().map(String::as_str).collect();
    let kept: Vec<&str> = split_args(first)
        .into_iter()
        .filter(|t| {
            if let Some(i) = left.iter().position(|l| l == t) {
                left.remove(i);
                false
            } else {
                true
            }
        })
        .collect();
    let line = kept.join(" ");
    match rest {
        Some(r) => format!("{line}\n{r}"),
        None => format!("{line}\n"),
    }
}

/// A command line seeded from `/proc/cmdline`, as kernel-install does when
/// `/etc/kernel/cmdline` is absent: without `BOOT_IMAGE=` and `initrd=`.
pub fn seed_from_proc(proc_cmdline: &str) -> String {
    let kept: Vec<&str> = split_args(proc_cmdline)
        .into_iter()
        .filter(|t| !matches!(kernel_reads(t), ("BOOT_IMAGE" | "initrd", Some(_))))
        .collect();
    format!("{}\n", kept.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn token(t: &str) -> KernelToken {
        t.parse().unwrap()
    }

    fn refused(t: &str) -> TokenError {
        t.parse::<KernelToken>().unwrap_err()
    }

    #[test]
    fn adds_only_missing_tokens_and_keeps_the_rest() {
        let (out, added) = add_tokens(
            "root=ZFS=rpool/ROOT/pve-1 boot=zfs iommu=pt\n# second line kept\n",
            &s(&["intel_iommu=on", "iommu=pt"]),
        );
        assert_eq!(
            out,
            "root=ZFS=rpool/ROOT/pve-1 boot=zfs iommu=pt intel_iommu=on\n# second line kept\n"
        );
        assert_eq!(added, s(&["intel_iommu=on"]));
    }

    #[test]
    fn remove_undoes_add_exactly() {
        let original = "root=/dev/sda1 quiet\n";
        let (out, added) = add_tokens(original, &s(&["intel_iommu=on", "iommu=pt"]));
        assert_eq!(remove_tokens(&out, &added), original);
    }

    #[test]
    fn quoted_tokens_are_one_token_when_editing() {
        let original = "root=/dev/sda1 quiet\n";
        let ours = s(&["dyndbg=\"module vfio_pci +p\"", "iommu=pt"]);
        let (out, added) = add_tokens(original, &ours);
        assert_eq!(
            out,
            "root=/dev/sda1 quiet dyndbg=\"module vfio_pci +p\" iommu=pt\n"
        );
        // Present already: nothing added twice.
        assert_eq!(add_tokens(&out, &ours), (out.clone(), vec![]));
        // The user added a token after ours; ours come out, theirs stays.
        let edited = out.replace('\n', " foo=\"x y\"\n");
        assert_eq!(
            remove_tokens(&edited, &added),
            "root=/dev/sda1 quiet foo=\"x y\"\n"
        );
    }

    #[test]
    fn a_token_grub_quoted_again_counts_as_present() {
        let line = "BOOT_IMAGE=/vmlinuz root=/dev/sda1 \"dyndbg=module vfio_pci +p\"";
        assert!(cmdline_has(line, "dyndbg=\"module vfio_pci +p\""));
        assert!(!cmdline_has(line, "dyndbg=\"module vfio +p\""));
        assert!(cmdline_has(line, "root=/dev/sda1"));
        assert!(!cmdline_has(line, "vfio_pci"));
    }

    #[test]
    fn seed_drops_boot_image_and_initrd() {
        assert_eq!(
            seed_from_proc("BOOT_IMAGE=/vmlinuz-6.8 root=/dev/sda1 initrd=\\x ro\n"),
            "root=/dev/sda1 ro\n"
        );
        assert_eq!(
            seed_from_proc("\"BOOT_IMAGE=/my kernel\" ro \"dyndbg=a b\"\n"),
            "ro \"dyndbg=a b\"\n"
        );
    }

    /// `next_arg()`'s corner cases, read from lib/cmdline.c.
    #[test]
    fn splits_and_reads_like_the_kernel() {
        assert_eq!(
            split_args("  a b=\"c d\"  \"e=f g\" h=\"\" =x \"q\"\n"),
            vec!["a", "b=\"c d\"", "\"e=f g\"", "h=\"\"", "=x", "\"q\""]
        );
        assert_eq!(kernel_reads("b=\"c d\""), ("b", Some("c d")));
        assert_eq!(kernel_reads("\"e=f g\""), ("e", Some("f g")));
        assert_eq!(kernel_reads("h=\"\""), ("h", Some("")));
        assert_eq!(kernel_reads("h=\""), ("h", Some("")));
        assert_eq!(kernel_reads("=x"), ("=x", None));
        assert_eq!(kernel_reads("=x=y"), ("=x", Some("y")));
        assert_eq!(kernel_reads("\"q\""), ("q", None));
        assert_eq!(kernel_reads("a=b\"c d\""), ("a", Some("b\"c d\"")));
        assert_eq!(kernel_reads("a=b=c"), ("a", Some("b=c")));
        assert_eq!(split_args("a=\"b c"), vec!["a=\"b c"]);
        assert_eq!(split_args(""), Vec::<&str>::new());
    }

    #[test]
    fn tokens_the_kernel_takes() {
        for t in [
            "quiet",
            "intel_iommu=on",
            "vfio-pci.ids=10de:1b80,10de:10f0",
            "root=UUID=0b1c",
            "console=ttyS0,115200n8",
            "dyndbg=\"module vfio_pci +p\"",
            "acpi_osi=\"!Windows 2020\"",
            "memmap=4G$4G",
            "param=",
            "param=\"\"",
            "--",
            "-s",
            "x=$(reboot)",
            "x=\"`id` $(id) ; && | < > # * ? [ ] { }\"",
        ] {
            assert_eq!(token(t).as_str(), t);
        }
        assert_eq!(token("dyndbg=\"module vfio_pci +p\"").param(), "dyndbg");
        assert_eq!(
            token("dyndbg=\"module vfio_pci +p\"").value(),
            Some("module vfio_pci +p")
        );
        assert_eq!(token("quiet").value(), None);
    }

    #[test]
    fn tokens_refused_with_a_fix() {
        let cases = [
            ("", "empty"),
            ("quiet\nrd.break", "control character"),
            ("a\tb", "control character"),
            ("a\0", "control character"),
            ("caf\u{e9}=1", "not ASCII"),
            ("foo='a b'", "single quote"),
            ("foo=a\\b", "backslash"),
            (" quiet", "space before or after"),
            ("dyndbg=\"module vfio_pci +p", "unbalanced"),
            ("iommu=pt intel_iommu=on", "2 kernel arguments"),
            ("\"dyndbg=module vfio_pci +p\"", "quoted as a whole"),
            ("=x", "no parameter name"),
            ("$(reboot)", "cannot appear in a parameter name"),
            ("`id`", "cannot appear in a parameter name"),
            ("a;b=1", "cannot appear in a parameter name"),
            ("foo=a\"b c\"", "double quote inside"),
            ("foo=\"a  b\"", "spaces in a row"),
        ];
        for (t, why) in cases {
            let e = refused(t);
            assert!(e.message.contains(why), "{t:?}: {e}");
            assert!(!e.fix.is_empty(), "{t:?}");
            assert!(!e.message.contains('\n'), "{t:?}: {e}");
        }
        let long = format!("a={}", "b".repeat(MAX_TOKEN_LEN));
        assert!(refused(&long).message.contains("longer than"));
        assert!(refused("memmap=4G\\$4G").fix.contains("`memmap=4G$4G`"));
        assert!(refused("iommu=pt intel_iommu=on")
            .fix
            .contains("[\"iommu=pt\", \"intel_iommu=on\"]"));
    }

    #[test]
    fn grub_words() {
        for (t, word) in [
            ("intel_iommu=on", "intel_iommu=on"),
            ("root=UUID=0b1c", "root=UUID=0b1c"),
            (
                "dyndbg=\"module vfio_pci +p\"",
                "dyndbg=\"module vfio_pci +p\"",
            ),
            ("memmap=4G$4G", "memmap=\"4G\\$4G\""),
            ("x=\"$(reboot)\"", "x=\"\\$(reboot)\""),
            ("x=a;b", "x=\"a;b\""),
            ("param=\"\"", "param=\"\""),
            ("fi", "\"fi\""),
        ] {
            assert_eq!(token(t).grub_word(), word, "{t}");
        }
    }
}
