//! The `vfio-early` binary: nothing but a call into [`vfio_early::cli::main`].

fn main() -> std::process::ExitCode {
    vfio_early::cli::main()
}
