//! POSIX ACLs through real mounts, set and read with the acl tools
//! (`setfacl`, `getfacl`): the kernel enforces them for other users, the
//! mode follows the access ACL and the ACL follows `chmod`, a directory's
//! default ACL passes to new files and directories in place of the umask,
//! and a second mount sees and enforces what the first set.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

/// Run `script` in `sh` as root, in `dir`; its stdout.
fn sh(dir: &Path, script: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(script).current_dir(dir).output().unwrap();
    assert!(out.status.success(), "{script}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Does `script` succeed when run as `nobody` (std drops root's groups)?
fn nobody_can(script: &str) -> bool {
    Command::new("sh").arg("-c").arg(script).uid(65534).gid(65534).output().unwrap().status.success()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn acls_are_enforced_follow_the_mode_and_pass_down_on_both_mounts() {
    let (server, root, pa, a) = one_mount("e2e-acl", ",allow_other");
    let f = pa.join("f");
    let f_path = f.display().to_string();
    sh(&pa, "touch f && chmod 600 f");
    assert!(!nobody_can(&format!("cat {f_path}")));

    sh(&pa, "setfacl -m u:nobody:rw f");
    assert_eq!(mode(&f), 0o660, "the mask is the group class");
    assert!(sh(&pa, "getfacl -cp f").contains("user:nobody:rw-"));
    assert!(nobody_can(&format!("echo by-nobody >> {f_path}")), "the ACL lets nobody write");
    assert_eq!(std::fs::read(&f).unwrap(), b"by-nobody\n");

    sh(&pa, "chmod 604 f");
    assert!(sh(&pa, "getfacl -cp f").contains("mask::---"), "chmod sets the mask");
    assert!(!nobody_can(&format!("echo again >> {f_path}")), "the mask limits the named entry");

    // A default ACL instead of the umask; without one, the umask applies
    // (by the mount itself, which answers creates under the delegation).
    wait_until("A holds the delegation", std::time::Duration::from_secs(10), || restfs::stats::read(&pa).is_ok_and(|s| s.delegated));
    sh(&pa, "mkdir d && setfacl -d -m u:nobody:rwx,g::r-x,o::--- d && umask 077 && touch d/new && mkdir d/sub && touch plain");
    assert_eq!(mode(&pa.join("d/new")), 0o660);
    assert_eq!(mode(&pa.join("d/sub")), 0o770);
    assert_eq!(mode(&pa.join("plain")), 0o600, "no default ACL: the umask");
    assert!(sh(&pa, "getfacl -cp d/sub").contains("default:user:nobody:rwx"), "a subdirectory passes it on");
    let new_path = pa.join("d/new").display().to_string();
    assert!(nobody_can(&format!("echo inherited > {new_path}")));

    // The second mount sees and enforces them; a change there reaches the first.
    let (pb, b) = second_mount_with(&server, &root, "allow_other");
    assert_eq!(sh(&pb, "getfacl -cp d/new"), sh(&pa, "getfacl -cp d/new"));
    assert!(nobody_can(&format!("cat {}", pb.join("d/new").display())));
    // Without the delegation the server applies the umask.
    sh(&pa, "umask 027 && touch served && mkdir served-dir");
    assert_eq!((mode(&pa.join("served")), mode(&pa.join("served-dir"))), (0o640, 0o750));
    sh(&pb, "setfacl -b d/new");
    assert!(!sh(&pa, "getfacl -cp d/new").contains("nobody"), "A sees B's removal");
    assert!(!nobody_can(&format!("cat {new_path}")), "and enforces it");
    b.unmount();
    a.unmount();
}
