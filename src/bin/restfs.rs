//! `restfs` (admin CLI); invoked as `mount.restfs`, the mount helper; and
//! invoked as `restfsd`, the server (so `restfs up` can start one even when
//! only this binary was built).

fn main() {
    let argv0 = std::env::args_os().next().unwrap_or_default();
    let invoked_as = std::path::Path::new(&argv0).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if invoked_as != "restfs" {
        set_process_name(&invoked_as);
    }
    // mount(8) runs `mount.restfs` for type restfs, `mount.fuse.restfs` for fuse.restfs.
    let code = if invoked_as.starts_with("mount.restfs") || invoked_as == "mount.fuse.restfs" {
        let args: Vec<String> = std::env::args().skip(1).collect();
        restfs::mount::main(&args)
    } else if invoked_as == "restfsd" {
        if restfs_server::cli::main() == std::process::ExitCode::SUCCESS { 0 } else { 1 }
    } else {
        restfs::admin::main()
    };
    std::process::exit(code);
}

/// Take the name it was invoked as, so `ps` and `pkill restfsd` see it:
/// the kernel names a process after its executable file, not its argv[0].
fn set_process_name(name: &str) {
    if let Ok(name) = std::ffi::CString::new(name) {
        // SAFETY: PR_SET_NAME reads a NUL-terminated string (keeping 15 bytes of it).
        unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr()) };
    }
}
