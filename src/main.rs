//! The `thinfs` binary.

fn main() {
    std::process::exit(thinfs::cli::main());
}
