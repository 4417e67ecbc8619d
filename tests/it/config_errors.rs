//! Every kind of bad config, as the user sees it: file, line, column, the line, a fix;
//! exit status 2; nothing written.

use crate::fake::{text, workstation};

fn check_error(name: &str, config: &[u8]) {
    let m = workstation();
    std::fs::write(m.path("etc/vfio-early.toml"), config).expect("write");
    let before = m.read("sys/devices/pci0000:00/0000:01:00.0/driver_override");
    for args in [&["check"][..], &["bind"][..]] {
        let out = m.run(args);
        assert_eq!(out.status.code(), Some(2), "{name}: {:?}", args);
        let err = text(&m, &out.stderr);
        assert!(err.contains("<root>/etc/vfio-early.toml"), "{name}: {err}");
        assert!(err.contains("fix: "), "{name}: {err}");
        if args == ["check"] {
            insta::assert_snapshot!(name, err);
        }
    }
    assert_eq!(
        m.read("sys/devices/pci0000:00/0000:01:00.0/driver_override"),
        before,
        "{name}: a bad config changed sysfs"
    );
}

#[test]
fn unknown_key() {
    check_error(
        "unknown_key",
        b"[[device]]\nid = \"10de:1b80\"\nadress = \"01:00.0\"\n",
    );
}

#[test]
fn unknown_table() {
    check_error("unknown_table", b"[iommus]\npassthrough = true\n");
}

#[test]
fn wrong_type() {
    check_error("wrong_type", b"[iommu]\npassthrough = \"yes\"\n");
}

#[test]
fn duplicate_key() {
    check_error(
        "duplicate_key",
        b"[[device]]\nid = \"10de:1b80\"\nid = \"10de:10f0\"\n",
    );
}

#[test]
fn malformed_id() {
    check_error("malformed_id", b"[[device]]\nid = \"10de:1b8\"\n");
}

#[test]
fn malformed_address() {
    check_error(
        "malformed_address",
        b"[[device]]\nid = \"10de:1b80\"\naddress = \"01:00\"\n",
    );
}

#[test]
fn entry_without_id() {
    check_error(
        "entry_without_id",
        b"[[device]]\naddress = \"0000:01:00.0\"\n",
    );
}

#[test]
fn bad_enum_value() {
    check_error("bad_enum_value", b"[bootloader]\nkind = \"lilo\"\n");
}

#[test]
fn not_utf8() {
    check_error("not_utf8", b"# caf\xe9\n[[device]]\nid = \"10de:1b80\"\n");
}

#[test]
fn truncated() {
    check_error("truncated", b"[[device]]\nid = \"10de:1b");
}

#[test]
fn same_address_twice() {
    check_error(
        "same_address_twice",
        b"[[device]]\nid = \"8086:10d3\"\naddress = \"03:00.0\"\n\n[[device]]\nid = \"8086:10d3\"\naddress = \"0000:03:00.0\"\n",
    );
}

#[test]
fn missing_config_is_a_clear_error() {
    let m = workstation();
    let out = m.run(&["check"]);
    assert_eq!(out.status.code(), Some(2));
    insta::assert_snapshot!(text(&m, &out.stderr));
}
