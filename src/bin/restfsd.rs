//! `restfsd`: the RestFS server (see the `restfs-server` crate). It lives in
//! the client package so one `cargo install` brings all three binaries.

fn main() -> std::process::ExitCode {
    restfs_server::cli::main()
}
