//! `mount.restfs` is the `restfs` binary under another name (mount(8) needs
//! the dot, which a Cargo binary name cannot hold). Link it next to the
//! binaries of this build so `target/<profile>/mount.restfs` exists.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    // OUT_DIR is target/<profile>/build/<pkg>-<hash>/out.
    let Some(profile_dir) = out.ancestors().nth(3) else {
        return;
    };
    let link = profile_dir.join("mount.restfs");
    let _ = std::fs::remove_file(&link);
    if let Err(e) = std::os::unix::fs::symlink("restfs", &link) {
        println!("cargo:warning=cannot link {}: {e}", link.display());
    }
}
