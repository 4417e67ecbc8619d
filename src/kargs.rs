//! Kernel command-line token editing, as pure functions on strings: adding vfio-early's
//! tokens to the first line of `/etc/kernel/cmdline` while keeping every token the user
//! wrote, and taking exactly those tokens back out.

/// Adds each token not already present to the end of the first line. Returns the new
/// text and the tokens actually added (the ones `undo` may remove).
pub fn add_tokens(text: &str, tokens: &[String]) -> (String, Vec<String>) {
    let (first, rest) = match text.split_once('\n') {
        Some((f, r)) => (f, Some(r)),
        None => (text, None),
    };
    let present: Vec<&str> = first.split_whitespace().collect();
    let mut line = first.trim_end().to_string();
    let mut added = Vec::new();
    for t in tokens {
        if !present.contains(&t.as_str()) && !added.contains(t) {
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
    let (first, rest) = match text.split_once('\n') {
        Some((f, r)) => (f, Some(r)),
        None => (text, None),
    };
    let mut left: Vec<String> = tokens.to_vec();
    let kept: Vec<&str> = first
        .split_whitespace()
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
    let kept: Vec<&str> = proc_cmdline
        .split_whitespace()
        .filter(|t| !t.starts_with("BOOT_IMAGE=") && !t.starts_with("initrd="))
        .collect();
    format!("{}\n", kept.join(" "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
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
    fn seed_drops_boot_image_and_initrd() {
        assert_eq!(
            seed_from_proc("BOOT_IMAGE=/vmlinuz-6.8 root=/dev/sda1 initrd=\\x ro\n"),
            "root=/dev/sda1 ro\n"
        );
    }
}
