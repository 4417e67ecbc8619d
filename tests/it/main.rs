//! The one integration-test binary. It runs the real `vfio-early` binary (or the one named
//! by `VFIO_EARLY_BIN`, so the same tests check an installed package) against fake
//! machine trees built by [`fake`], and drives the library's binder against a simulated
//! kernel.

mod apply;
mod bind;
mod cli;
mod config_errors;
mod confine;
mod dump;
mod fake;
mod fixtures;
mod hostile;
mod initramfs;
mod rom;
mod status;
mod sysdisk;
mod tidy;
mod trial;
