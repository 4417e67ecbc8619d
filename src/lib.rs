//! vfio-early: declarative PCI passthrough from the first moments of boot.
//!
//! The crate is a functional core behind a thin I/O shell: [`config`] and [`machine`]
//! are read once into data, [`plan`] decides (the only place that does), and the shell
//! modules ([`bind`], and the writers) carry the decisions out through one [`root::Root`].
//! See ARCHITECTURE.md for the map.

pub mod apply;
pub mod bind;
pub mod bootloader;
pub mod check;
pub mod cli;
pub mod command;
pub mod config;
pub mod context;
pub mod dump;
pub mod early;
pub mod entries;
pub mod grubmenu;
pub mod host;
pub mod initramfs;
pub mod kargs;
pub mod kmod;
pub mod kmsg;
pub mod list;
pub mod lock;
pub mod machine;
pub mod modprobe;
pub mod nextboot;
pub mod outcome;
pub mod paths;
pub mod pci;
pub mod plan;
pub mod rom;
pub mod root;
pub mod state;
pub mod status;
pub mod sysdisk;
pub mod trial;
