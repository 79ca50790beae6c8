//! `restfs` (admin CLI) and, when invoked as `mount.restfs`, the mount helper.

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = std::path::Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let code = if invoked_as.starts_with("mount.restfs") {
        let args: Vec<String> = std::env::args().skip(1).collect();
        restfs::mount::main(&args)
    } else {
        restfs::admin::main()
    };
    std::process::exit(code);
}
