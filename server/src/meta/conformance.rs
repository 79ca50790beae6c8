//! The behaviour every [`MetaStore`] backend must show.
//!
//! [`run_all`] runs every check against one store. Each check works in a
//! bucket of its own (named after the check), so checks never see each
//! other's namespace. The block registry is shared by all buckets, so checks
//! that count what garbage collection removes first collect whatever earlier
//! checks left unreferenced, and every check hashes content of its own.

use super::{BlockLocation, BucketId, MetaStore};
use crate::error::Result;
use restfs_proto::methods::{NewNodeParams, RenameParams, SetAttrParams, XattrMode};
use restfs_proto::{Attr, BlockRef, BlockSlot, Errno, Hash, Ino, Kind, Name, ROOT_INO, SetTime, Timespec};
use std::fmt::Debug;

/// Block size of the buckets the checks create.
const BS: u32 = 4096;

/// A time long past, to see whether an operation sets a timestamp.
const OLD: Timespec = Timespec { sec: 1_000_000_000, nsec: 123_456_789 };
const OLDER: Timespec = Timespec { sec: 900_000_000, nsec: 7 };

pub fn run_all(store: &dyn MetaStore) {
    change_log_names_every_change(store);
    // Buckets.
    bucket_lifecycle(store);
    bucket_delete_empty_without_force(store);
    bucket_force_delete_drops_block_refs(store);
    buckets_are_isolated(store);
    // Creating nodes.
    mknod_kinds(store);
    mkdir_counts_links(store);
    create_errors(store);
    invalid_names(store);
    setgid_directory_inheritance(store);
    reserved_inode_numbers(store);
    // Timestamps and attributes.
    creating_and_removing_touch_parent(store);
    setattr_times_and_version(store);
    // Symlinks and links.
    symlink_and_readlink(store);
    link_and_unlink(store);
    unlink_last_link_deletes(store);
    unlinked_open_inode_survives_until_purge(store);
    orphans_are_listed_until_purged(store);
    rmdir_rules(store);
    // Rename.
    rename_plain(store);
    rename_over_file(store);
    rename_noreplace(store);
    rename_exchange_files(store);
    rename_exchange_dir_across_parents(store);
    rename_dir_into_own_subtree(store);
    rename_dir_over_dir(store);
    rename_kind_mismatch(store);
    rename_dir_across_parents(store);
    rename_hard_link_onto_itself(store);
    rename_errors(store);
    // Listing.
    readdir_pagination_and_order(store);
    // Extended attributes.
    xattr_basics(store);
    xattr_modes_and_limits(store);
    acls_follow_the_mode_and_pass_down(store);
    // Data.
    commit_and_block_map(store);
    commit_unregistered_block_is_atomic(store);
    commit_rejects_bad_slots(store);
    truncate_trims_block_map(store);
    block_registry(store);
    // Garbage collection.
    gc_respects_references_and_age(store);
    gc_after_overwrite_truncate_and_purge(store);
    // Replay cache.
    replay_cache_forgets_and_trims(store);
}

// --- helpers ---

/// A fresh bucket named `name`.
fn bucket(s: &dyn MetaStore, name: &str) -> BucketId {
    s.create_bucket(name, BS, 4).unwrap();
    s.bucket(name).unwrap().0
}

fn node(parent: Ino, name: &[u8], kind: Kind, mode: u32) -> NewNodeParams {
    NewNodeParams { parent, name: Name(name.to_vec()), kind, mode, uid: 1000, gid: 1000, rdev: 0, ino: None, umask: 0 }
}

fn mkfile(s: &dyn MetaStore, b: BucketId, parent: Ino, name: &str) -> Attr {
    s.mknod(b, &node(parent, name.as_bytes(), Kind::File, 0o644), None).unwrap()
}

fn mkdir(s: &dyn MetaStore, b: BucketId, parent: Ino, name: &str) -> Attr {
    s.mknod(b, &node(parent, name.as_bytes(), Kind::Dir, 0o755), None).unwrap()
}

fn rename_params(parent: Ino, name: &str, new_parent: Ino, new_name: &str) -> RenameParams {
    RenameParams { parent, name: Name::from(name), new_parent, new_name: Name::from(new_name), noreplace: false, exchange: false }
}

fn rename(s: &dyn MetaStore, b: BucketId, parent: Ino, name: &str, new_parent: Ino, new_name: &str) -> Result<()> {
    s.rename(b, &rename_params(parent, name, new_parent, new_name), &|_| false)
}

fn unlink(s: &dyn MetaStore, b: BucketId, parent: Ino, name: &str) -> Result<()> {
    s.unlink(b, parent, name.as_bytes(), &|_| false)
}

fn nlink(s: &dyn MetaStore, b: BucketId, ino: Ino) -> u32 {
    s.getattr(b, ino).unwrap().nlink
}

/// Every entry name of a directory, in listing order.
fn names(s: &dyn MetaStore, b: BucketId, dir: Ino) -> Vec<Vec<u8>> {
    let l = s.readdir(b, dir, None, 10_000).unwrap();
    assert!(!l.more);
    l.entries.into_iter().map(|e| e.name.0).collect()
}

fn set_times(s: &dyn MetaStore, b: BucketId, ino: Ino, atime: Timespec, mtime: Timespec) -> Attr {
    s.setattr(b, &SetAttrParams { ino, atime: Some(SetTime::At(atime)), mtime: Some(SetTime::At(mtime)), ..Default::default() }).unwrap()
}

#[track_caller]
fn expect_errno<T: Debug>(r: Result<T>, want: Errno) {
    match r {
        Ok(v) => panic!("expected {want}, got Ok({v:?})"),
        Err(e) => assert_eq!(e.errno(), want, "expected {want}, got {e}"),
    }
}

/// `dir` had its mtime set to [`OLD`] before an operation that began at `t0`:
/// assert the operation set its mtime and ctime.
#[track_caller]
fn assert_touched(s: &dyn MetaStore, b: BucketId, dir: Ino, t0: Timespec, what: &str) {
    let a = s.getattr(b, dir).unwrap();
    assert!(a.mtime >= t0 && a.mtime != OLD, "{what}: parent mtime not set ({:?} < {t0:?})", a.mtime);
    assert!(a.ctime >= t0, "{what}: parent ctime not set ({:?} < {t0:?})", a.ctime);
    assert_eq!(a.atime, OLDER, "{what}: parent atime changed");
}

/// Register a block with content unique to `tag`, of `len` bytes; inline
/// when `inline`.
fn add_block(s: &dyn MetaStore, tag: &str, len: usize, inline: bool) -> (Hash, Vec<u8>) {
    let data: Vec<u8> = tag.bytes().chain(std::iter::repeat(0xa5)).take(len).collect();
    assert_eq!(data.len(), len, "tag longer than the block");
    let h = Hash::of(&data);
    s.add_block(&h, len as u32, inline.then_some(&data[..])).unwrap();
    (h, data)
}

fn slot(index: u64, hash: Hash, len: u32) -> BlockSlot {
    BlockSlot { index, block: Some((hash, len)) }
}

fn map(s: &dyn MetaStore, b: BucketId, ino: Ino) -> (u64, Vec<BlockRef>) {
    s.block_map(b, ino, 0, u64::MAX).unwrap()
}

fn bref(index: u64, hash: Hash, len: u32) -> BlockRef {
    BlockRef { index, hash, len }
}

fn has(s: &dyn MetaStore, h: Hash) -> bool {
    s.has_blocks(&[h]).unwrap()[0]
}

// --- buckets ---

fn bucket_lifecycle(s: &dyn MetaStore) {
    let name = "conf-bucket-lifecycle";
    let info = s.create_bucket(name, 8192, 16).unwrap();
    assert_eq!(info.name, name);
    assert_eq!((info.block_size, info.segment_blocks), (8192, 16));
    assert_eq!((info.objects, info.bytes), (1, 0), "a new bucket holds only its root");
    expect_errno(s.create_bucket(name, 4096, 4), Errno::EEXIST);

    let listed = s.list_buckets().unwrap();
    assert_eq!(listed.iter().filter(|i| i.name == name).count(), 1);
    let (id, stat) = s.bucket(name).unwrap();
    assert_eq!(stat, info);
    assert_eq!(s.bucket_by_id(id).unwrap(), info);

    let root = s.getattr(id, ROOT_INO).unwrap();
    assert_eq!((root.ino, root.kind, root.nlink), (ROOT_INO, Kind::Dir, 2));
    let l = s.readdir(id, ROOT_INO, None, 100).unwrap();
    assert_eq!(l.parent, ROOT_INO, "the root is its own parent");
    assert!(l.entries.is_empty() && !l.more);

    expect_errno(s.bucket("conf-no-such-bucket"), Errno::ENOENT);
    expect_errno(s.delete_bucket("conf-no-such-bucket", false), Errno::ENOENT);
    expect_errno(s.delete_bucket("conf-no-such-bucket", true), Errno::ENOENT);

    mkfile(s, id, ROOT_INO, "f");
    assert_eq!(s.bucket(name).unwrap().1.objects, 2);
    expect_errno(s.delete_bucket(name, false), Errno::ENOTEMPTY);
    assert!(s.bucket(name).is_ok(), "a refused delete keeps the bucket");
    s.delete_bucket(name, true).unwrap();
    expect_errno(s.bucket(name), Errno::ENOENT);
    assert!(s.list_buckets().unwrap().iter().all(|i| i.name != name));
    // The name is free again, and the new bucket starts empty.
    let again = bucket(s, name);
    assert!(names(s, again, ROOT_INO).is_empty());
    s.delete_bucket(name, false).unwrap();
}

fn bucket_delete_empty_without_force(s: &dyn MetaStore) {
    let name = "conf-bucket-delete-empty";
    let b = bucket(s, name);
    mkfile(s, b, ROOT_INO, "f");
    unlink(s, b, ROOT_INO, "f").unwrap();
    s.delete_bucket(name, false).unwrap();
    expect_errno(s.bucket(name), Errno::ENOENT);
}

fn bucket_force_delete_drops_block_refs(s: &dyn MetaStore) {
    let name = "conf-bucket-force-delete";
    let b = bucket(s, name);
    let d = mkdir(s, b, ROOT_INO, "d");
    let f = mkfile(s, b, d.ino, "f");
    let (h, _) = add_block(s, name, 100, true);
    s.commit(b, f.ino, 100, &[slot(0, h, 100)], None).unwrap();
    s.collect_garbage(0).unwrap();
    assert!(has(s, h), "a referenced block survives garbage collection");
    s.delete_bucket(name, true).unwrap();
    let g = s.collect_garbage(0).unwrap();
    assert!(g.blocks >= 1);
    assert!(!has(s, h), "deleting a bucket drops its block references");
}

fn buckets_are_isolated(s: &dyn MetaStore) {
    let a = bucket(s, "conf-isolated-a");
    let b = bucket(s, "conf-isolated-b");
    let fa = mkfile(s, a, ROOT_INO, "same");
    let fb = mkfile(s, b, ROOT_INO, "same");
    assert_eq!(s.lookup(a, ROOT_INO, b"same").unwrap().ino, fa.ino);
    assert_eq!(s.lookup(b, ROOT_INO, b"same").unwrap().ino, fb.ino);
    let only_a = mkfile(s, a, ROOT_INO, "only-a");
    expect_errno(s.lookup(b, ROOT_INO, b"only-a"), Errno::ENOENT);
    if only_a.ino != fb.ino {
        expect_errno(s.getattr(b, only_a.ino), Errno::ENOENT);
    }
    assert_eq!(names(s, b, ROOT_INO), vec![b"same".to_vec()]);
}

// --- creating nodes ---

fn mknod_kinds(s: &dyn MetaStore) {
    let b = bucket(s, "conf-mknod-kinds");
    let cases = [
        ("file", Kind::File, 0, 0),
        ("fifo", Kind::Fifo, 0x0501, 0),
        ("sock", Kind::Socket, 0x0501, 0),
        ("chr", Kind::CharDev, 0x0501, 0x0501),
        ("blk", Kind::BlockDev, 0x0803, 0x0803),
    ];
    let mut inos = Vec::new();
    for (name, kind, rdev, want_rdev) in cases {
        let mut p = node(ROOT_INO, name.as_bytes(), kind, 0o640);
        p.rdev = rdev;
        p.uid = 7;
        p.gid = 8;
        let a = s.mknod(b, &p, None).unwrap();
        assert_eq!(a.kind, kind, "{name}");
        assert_eq!(a.mode, 0o640, "{name}: mode holds permission bits only");
        assert_eq!((a.uid, a.gid, a.nlink, a.size), (7, 8, 1, 0), "{name}");
        assert_eq!(a.rdev, want_rdev, "{name}: rdev is kept for devices only");
        assert!(a.ino != ROOT_INO && !inos.contains(&a.ino), "{name}: fresh inode number");
        inos.push(a.ino);
        assert_eq!(s.lookup(b, ROOT_INO, name.as_bytes()).unwrap(), a);
        assert_eq!(s.getattr(b, a.ino).unwrap(), a);
    }
    assert_eq!(nlink(s, b, ROOT_INO), 2, "non-directories do not add parent links");
    let mut listed = names(s, b, ROOT_INO);
    listed.sort();
    let mut want: Vec<Vec<u8>> = cases.iter().map(|c| c.0.as_bytes().to_vec()).collect();
    want.sort();
    assert_eq!(listed, want);
}

fn mkdir_counts_links(s: &dyn MetaStore) {
    let b = bucket(s, "conf-mkdir-links");
    let d = mkdir(s, b, ROOT_INO, "d");
    assert_eq!((d.kind, d.nlink, d.mode), (Kind::Dir, 2, 0o755));
    assert_eq!(nlink(s, b, ROOT_INO), 3);
    let e = mkdir(s, b, d.ino, "e");
    assert_eq!(e.nlink, 2);
    assert_eq!(nlink(s, b, d.ino), 3, "a subdirectory adds a link to its parent");
    assert_eq!(nlink(s, b, ROOT_INO), 3, "only the direct parent gains a link");
    mkfile(s, b, d.ino, "f");
    assert_eq!(nlink(s, b, d.ino), 3, "files do not add links to their parent");
    assert_eq!(s.readdir(b, e.ino, None, 10).unwrap().parent, d.ino);
    assert_eq!(s.readdir(b, d.ino, None, 10).unwrap().parent, ROOT_INO);
}

fn create_errors(s: &dyn MetaStore) {
    let b = bucket(s, "conf-create-errors");
    let f = mkfile(s, b, ROOT_INO, "f");
    mkdir(s, b, ROOT_INO, "d");
    for kind in [Kind::File, Kind::Dir, Kind::Fifo] {
        for existing in ["f", "d"] {
            expect_errno(s.mknod(b, &node(ROOT_INO, existing.as_bytes(), kind, 0o644), None), Errno::EEXIST);
        }
    }
    s.mknod(b, &node(ROOT_INO, b"l", Kind::Symlink, 0o777), Some(b"x")).unwrap();
    expect_errno(s.mknod(b, &node(ROOT_INO, b"l", Kind::Symlink, 0o777), Some(b"y")), Errno::EEXIST);
    assert_eq!(s.readlink(b, s.lookup(b, ROOT_INO, b"l").unwrap().ino).unwrap(), b"x", "a refused create changes nothing");
    expect_errno(s.mknod(b, &node(999_999, b"x", Kind::File, 0o644), None), Errno::ENOENT);
    expect_errno(s.mknod(b, &node(f.ino, b"x", Kind::File, 0o644), None), Errno::ENOTDIR);
    expect_errno(s.mknod(b, &node(f.ino, b"x", Kind::Dir, 0o755), None), Errno::ENOTDIR);
    expect_errno(s.lookup(b, ROOT_INO, b"missing"), Errno::ENOENT);
    expect_errno(s.lookup(b, f.ino, b"x"), Errno::ENOTDIR);
    expect_errno(s.lookup(b, 999_999, b"x"), Errno::ENOENT);
    expect_errno(s.getattr(b, 999_999), Errno::ENOENT);
    assert_eq!(nlink(s, b, ROOT_INO), 3, "failed creates change no link count");
    let mut listed = names(s, b, ROOT_INO);
    listed.sort();
    assert_eq!(listed, vec![b"d".to_vec(), b"f".to_vec(), b"l".to_vec()]);
}

fn invalid_names(s: &dyn MetaStore) {
    let b = bucket(s, "conf-invalid-names");
    let f = mkfile(s, b, ROOT_INO, "f");
    let long = vec![b'a'; 256];
    let cases: [(&[u8], Errno); 6] = [
        (b"", Errno::EINVAL),
        (b".", Errno::EINVAL),
        (b"..", Errno::EINVAL),
        (b"a/b", Errno::EINVAL),
        (b"a\0b", Errno::EINVAL),
        (&long, Errno::ENAMETOOLONG),
    ];
    for (name, want) in cases {
        for kind in [Kind::File, Kind::Dir, Kind::Fifo] {
            expect_errno(s.mknod(b, &node(ROOT_INO, name, kind, 0o644), None), want);
        }
        expect_errno(s.mknod(b, &node(ROOT_INO, name, Kind::Symlink, 0o777), Some(b"t")), want);
        expect_errno(s.lookup(b, ROOT_INO, name), want);
        expect_errno(s.link(b, f.ino, ROOT_INO, name), want);
        let p = RenameParams {
            parent: ROOT_INO,
            name: Name::from("f"),
            new_parent: ROOT_INO,
            new_name: Name(name.to_vec()),
            noreplace: false,
            exchange: false,
        };
        expect_errno(s.rename(b, &p, &|_| false), want);
    }
    assert_eq!(names(s, b, ROOT_INO), vec![b"f".to_vec()], "nothing half-created");
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, f.ino)), (2, 1));

    // 255 bytes is the limit, and names need not be UTF-8.
    let odd: Vec<u8> = (0..255).map(|i| 0x80 | (i as u8 & 0x7f)).collect();
    assert!(std::str::from_utf8(&odd).is_err());
    let a = s.mknod(b, &node(ROOT_INO, &odd, Kind::File, 0o644), None).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, &odd).unwrap().ino, a.ino);
    let d = s.mknod(b, &node(ROOT_INO, &[0xff; 255], Kind::Dir, 0o755), None).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, &[0xff; 255]).unwrap().ino, d.ino);
    let listed = names(s, b, ROOT_INO);
    assert!(listed.contains(&odd) && listed.contains(&vec![0xff; 255]));
}

fn setgid_directory_inheritance(s: &dyn MetaStore) {
    let b = bucket(s, "conf-setgid");
    let mut p = node(ROOT_INO, b"sg", Kind::Dir, 0o2775);
    p.gid = 500;
    let sg = s.mknod(b, &p, None).unwrap();
    assert_eq!((sg.mode, sg.gid), (0o2775, 500));

    let mut fp = node(sg.ino, b"file", Kind::File, 0o644);
    fp.gid = 7;
    let file = s.mknod(b, &fp, None).unwrap();
    assert_eq!(file.gid, 500, "a file in a setgid directory takes the directory's group");
    assert_eq!(file.mode, 0o644, "files do not inherit the setgid bit");

    let mut dp = node(sg.ino, b"sub", Kind::Dir, 0o755);
    dp.gid = 7;
    let sub = s.mknod(b, &dp, None).unwrap();
    assert_eq!(sub.gid, 500, "a subdirectory takes the directory's group");
    assert_eq!(sub.mode, 0o2755, "a subdirectory inherits the setgid bit");

    let mut deeper = node(sub.ino, b"deeper", Kind::Fifo, 0o600);
    deeper.gid = 9;
    assert_eq!(s.mknod(b, &deeper, None).unwrap().gid, 500, "inheritance continues down the tree");

    let plain = mkdir(s, b, ROOT_INO, "plain");
    let mut pp = node(plain.ino, b"f", Kind::File, 0o644);
    pp.gid = 7;
    assert_eq!(s.mknod(b, &pp, None).unwrap().gid, 7, "outside setgid directories the caller's group is kept");
    let mut pd = node(plain.ino, b"d", Kind::Dir, 0o755);
    pd.gid = 7;
    let d = s.mknod(b, &pd, None).unwrap();
    assert_eq!((d.gid, d.mode), (7, 0o755));
}

// --- timestamps and attributes ---

/// A delegation holder names its new nodes from a reservation, and stamps
/// its changes with its own time.
fn reserved_inode_numbers(s: &dyn MetaStore) {
    let b = bucket(s, "reserved_inode_numbers");
    let first = s.reserve_inos(b, 10).unwrap();
    assert!(first > ROOT_INO);
    // The server's own numbering goes on after the reservation.
    let plain = mkfile(s, b, ROOT_INO, "plain");
    assert!(plain.ino >= first + 10, "server picked {} inside the reservation {first}..{}", plain.ino, first + 10);
    let mut p = node(ROOT_INO, b"mine", Kind::Dir, 0o750);
    p.ino = Some(first + 3);
    let mine = super::stamped_at(OLD, || s.mknod(b, &p, None)).unwrap();
    assert_eq!((mine.ino, mine.kind, mine.nlink), (first + 3, Kind::Dir, 2));
    assert_eq!((mine.mtime, mine.ctime), (OLD, OLD));
    assert_eq!(s.getattr(b, ROOT_INO).unwrap().mtime, OLD, "the parent is stamped with the given time too");
    assert_eq!(s.lookup(b, ROOT_INO, b"mine").unwrap().ino, first + 3);
    // Stamping ends with the call.
    assert!(mkfile(s, b, ROOT_INO, "later").ctime > OLD);
    // A number in use, the root, or one never reserved is refused.
    for bad in [first + 3, plain.ino, ROOT_INO, plain.ino + 1000] {
        let mut p = node(ROOT_INO, b"again", Kind::File, 0o644);
        p.ino = Some(bad);
        expect_errno(s.mknod(b, &p, None), Errno::EINVAL);
    }
    assert_eq!(s.lookup(b, ROOT_INO, b"again").map(|a| a.ino).ok(), None);
}

fn creating_and_removing_touch_parent(s: &dyn MetaStore) {
    let b = bucket(s, "conf-parent-times");
    let d = mkdir(s, b, ROOT_INO, "d");
    let other = mkdir(s, b, ROOT_INO, "other");
    let step = |what: &str, op: &dyn Fn(), dirs: &[Ino]| {
        for &dir in dirs {
            set_times(s, b, dir, OLDER, OLD);
        }
        let t0 = Timespec::now();
        op();
        for &dir in dirs {
            assert_touched(s, b, dir, t0, what);
        }
    };
    step("mknod", &|| _ = mkfile(s, b, d.ino, "f"), &[d.ino]);
    step("mkdir", &|| _ = mkdir(s, b, d.ino, "sub"), &[d.ino]);
    step("symlink", &|| _ = s.mknod(b, &node(d.ino, b"l", Kind::Symlink, 0o777), Some(b"f")).unwrap(), &[d.ino]);
    let f = s.lookup(b, d.ino, b"f").unwrap();
    step("link", &|| _ = s.link(b, f.ino, d.ino, b"g").unwrap(), &[d.ino]);
    step("unlink", &|| unlink(s, b, d.ino, "g").unwrap(), &[d.ino]);
    step("rename within", &|| rename(s, b, d.ino, "f", d.ino, "f2").unwrap(), &[d.ino]);
    step("rename across", &|| rename(s, b, d.ino, "f2", other.ino, "f").unwrap(), &[d.ino, other.ino]);
    step("rmdir", &|| s.rmdir(b, d.ino, b"sub").unwrap(), &[d.ino]);

    // A change of a child's attributes does not touch the parent.
    set_times(s, b, other.ino, OLDER, OLD);
    s.setattr(b, &SetAttrParams { ino: f.ino, mode: Some(0o600), ..Default::default() }).unwrap();
    let o = s.getattr(b, other.ino).unwrap();
    assert_eq!((o.atime, o.mtime), (OLDER, OLD));
    // A failed create does not either.
    set_times(s, b, other.ino, OLDER, OLD);
    expect_errno(s.mknod(b, &node(other.ino, b"f", Kind::File, 0o644), None), Errno::EEXIST);
    assert_eq!(s.getattr(b, other.ino).unwrap().mtime, OLD);

    // A new node's own times are the parent's new mtime (one clock reading).
    let t0 = Timespec::now();
    let n = mkfile(s, b, other.ino, "new");
    let t1 = Timespec::now();
    assert!(n.mtime >= t0 && n.mtime <= t1 && n.ctime == n.mtime && n.atime == n.mtime);
}

fn setattr_times_and_version(s: &dyn MetaStore) {
    let b = bucket(s, "conf-setattr");
    let f = mkfile(s, b, ROOT_INO, "f");

    let t0 = Timespec::now();
    let a = set_times(s, b, f.ino, OLDER, OLD);
    assert_eq!((a.atime, a.mtime), (OLDER, OLD), "SetTime::At sets exact times");
    assert!(a.ctime >= t0, "setattr sets ctime");
    assert_eq!(a.version, f.version, "times are not data");
    assert_eq!(s.getattr(b, f.ino).unwrap(), a);

    let t0 = Timespec::now();
    let a = s.setattr(b, &SetAttrParams { ino: f.ino, mode: Some(0o4711), uid: Some(42), gid: Some(43), ..Default::default() }).unwrap();
    assert_eq!((a.mode, a.uid, a.gid), (0o4711, 42, 43));
    assert!(a.ctime >= t0, "chmod/chown set ctime");
    assert_eq!((a.atime, a.mtime, a.version, a.size), (OLDER, OLD, f.version, 0), "chmod/chown leave times, version and size");

    let t0 = Timespec::now();
    let a = s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(10), ..Default::default() }).unwrap();
    assert_eq!(a.size, 10);
    assert!(a.mtime >= t0 && a.ctime >= t0, "truncate sets mtime and ctime");
    assert_eq!(a.atime, OLDER, "truncate leaves atime");
    assert_eq!(a.version, f.version + 1, "truncate bumps the data version");
    let a = s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(0), ..Default::default() }).unwrap();
    assert_eq!((a.size, a.version), (0, f.version + 2));

    let t0 = Timespec::now();
    let a =
        s.setattr(b, &SetAttrParams { ino: f.ino, atime: Some(SetTime::Now), mtime: Some(SetTime::Now), ..Default::default() }).unwrap();
    let t1 = Timespec::now();
    assert!(a.atime >= t0 && a.atime <= t1, "SetTime::Now uses the clock");
    assert!(a.mtime >= t0 && a.mtime <= t1);
    assert!(a.ctime >= t0 && a.ctime <= t1);

    // Only one of the two times.
    let a = s.setattr(b, &SetAttrParams { ino: f.ino, mtime: Some(SetTime::At(OLD)), ..Default::default() }).unwrap();
    assert_eq!(a.mtime, OLD);
    assert!(a.atime >= t0, "atime untouched when only mtime is set");

    // Times before the epoch survive.
    let neg = Timespec { sec: -5, nsec: 250 };
    assert_eq!(set_times(s, b, f.ino, neg, neg).mtime, neg);

    let d = mkdir(s, b, ROOT_INO, "d");
    expect_errno(s.setattr(b, &SetAttrParams { ino: d.ino, size: Some(0), ..Default::default() }), Errno::EISDIR);
    let fifo = s.mknod(b, &node(ROOT_INO, b"fifo", Kind::Fifo, 0o644), None).unwrap();
    expect_errno(s.setattr(b, &SetAttrParams { ino: fifo.ino, size: Some(0), ..Default::default() }), Errno::EINVAL);
    expect_errno(s.setattr(b, &SetAttrParams { ino: 999_999, mode: Some(0o644), ..Default::default() }), Errno::ENOENT);
    // Directories take times and modes like any node.
    let a = set_times(s, b, d.ino, OLDER, OLD);
    assert_eq!((a.atime, a.mtime, a.kind), (OLDER, OLD, Kind::Dir));
}

// --- symlinks and links ---

fn symlink_and_readlink(s: &dyn MetaStore) {
    let b = bucket(s, "conf-symlink");
    let target = b"../some/where/else";
    let l = s.mknod(b, &node(ROOT_INO, b"l", Kind::Symlink, 0o777), Some(target)).unwrap();
    assert_eq!(l.kind, Kind::Symlink);
    assert_eq!(l.size, target.len() as u64, "a symlink's size is its target's length");
    assert_eq!(l.nlink, 1);
    assert_eq!(s.readlink(b, l.ino).unwrap(), target.to_vec());
    assert_eq!(s.lookup(b, ROOT_INO, b"l").unwrap(), l);

    let odd = [0xfe, b'/', 0x80, b'x'];
    let o = s.mknod(b, &node(ROOT_INO, b"odd", Kind::Symlink, 0o777), Some(&odd)).unwrap();
    assert_eq!(s.readlink(b, o.ino).unwrap(), odd.to_vec(), "targets are bytes");
    assert_eq!(o.size, 4);

    let f = mkfile(s, b, ROOT_INO, "f");
    let d = mkdir(s, b, ROOT_INO, "d");
    expect_errno(s.readlink(b, f.ino), Errno::EINVAL);
    expect_errno(s.readlink(b, d.ino), Errno::EINVAL);
    expect_errno(s.readlink(b, 999_999), Errno::ENOENT);

    // A symlink can be hard-linked and keeps its target.
    s.link(b, l.ino, d.ino, b"l2").unwrap();
    assert_eq!(s.readlink(b, s.lookup(b, d.ino, b"l2").unwrap().ino).unwrap(), target.to_vec());
    assert_eq!(nlink(s, b, l.ino), 2);
}

fn link_and_unlink(s: &dyn MetaStore) {
    let b = bucket(s, "conf-link");
    let f = mkfile(s, b, ROOT_INO, "a");
    let d = mkdir(s, b, ROOT_INO, "d");

    let t0 = Timespec::now();
    let l = s.link(b, f.ino, d.ino, b"b").unwrap();
    assert_eq!((l.ino, l.nlink), (f.ino, 2));
    assert!(l.ctime >= t0, "link sets the inode's ctime");
    assert_eq!(l.mtime, f.mtime, "link leaves the inode's mtime");
    assert_eq!(s.lookup(b, d.ino, b"b").unwrap().ino, f.ino);
    assert_eq!(s.getattr(b, f.ino).unwrap().nlink, 2);
    assert_eq!(nlink(s, b, d.ino), 2, "a hard link to a file adds no directory link");
    let l3 = s.link(b, f.ino, ROOT_INO, b"c").unwrap();
    assert_eq!(l3.nlink, 3);

    expect_errno(s.link(b, f.ino, d.ino, b"b"), Errno::EEXIST);
    expect_errno(s.link(b, f.ino, ROOT_INO, b"d"), Errno::EEXIST);
    expect_errno(s.link(b, d.ino, ROOT_INO, b"d2"), Errno::EPERM);
    expect_errno(s.link(b, ROOT_INO, d.ino, b"root"), Errno::EPERM);
    expect_errno(s.link(b, 999_999, ROOT_INO, b"x"), Errno::ENOENT);
    expect_errno(s.link(b, f.ino, 999_999, b"x"), Errno::ENOENT);
    expect_errno(s.link(b, f.ino, f.ino, b"x"), Errno::ENOTDIR);
    assert_eq!(nlink(s, b, f.ino), 3, "failed links change no count");

    let t0 = Timespec::now();
    unlink(s, b, ROOT_INO, "a").unwrap();
    let a = s.getattr(b, f.ino).unwrap();
    assert_eq!(a.nlink, 2);
    assert!(a.ctime >= t0, "unlink sets the inode's ctime");
    expect_errno(s.lookup(b, ROOT_INO, b"a"), Errno::ENOENT);
    assert_eq!(s.lookup(b, d.ino, b"b").unwrap().ino, f.ino);
    unlink(s, b, ROOT_INO, "c").unwrap();
    assert_eq!(nlink(s, b, f.ino), 1);

    expect_errno(unlink(s, b, ROOT_INO, "a"), Errno::ENOENT);
    expect_errno(unlink(s, b, 999_999, "a"), Errno::ENOENT);
    expect_errno(unlink(s, b, f.ino, "a"), Errno::ENOTDIR);
    expect_errno(unlink(s, b, ROOT_INO, "d"), Errno::EISDIR);
    assert!(s.getattr(b, d.ino).is_ok(), "a refused unlink keeps the directory");
}

fn unlink_last_link_deletes(s: &dyn MetaStore) {
    let b = bucket(s, "conf-unlink-last");
    let f = mkfile(s, b, ROOT_INO, "f");
    s.setxattr(b, f.ino, b"user.k", b"v", XattrMode::Any).unwrap();
    unlink(s, b, ROOT_INO, "f").unwrap();
    expect_errno(s.getattr(b, f.ino), Errno::ENOENT);
    expect_errno(s.lookup(b, ROOT_INO, b"f"), Errno::ENOENT);
    expect_errno(s.getxattr(b, f.ino, b"user.k"), Errno::ENOENT);
    assert!(names(s, b, ROOT_INO).is_empty());
    assert_eq!(s.bucket("conf-unlink-last").unwrap().1.objects, 1);
    // Special files, symlinks go the same way.
    let fifo = s.mknod(b, &node(ROOT_INO, b"p", Kind::Fifo, 0o644), None).unwrap();
    let l = s.mknod(b, &node(ROOT_INO, b"l", Kind::Symlink, 0o777), Some(b"t")).unwrap();
    unlink(s, b, ROOT_INO, "p").unwrap();
    unlink(s, b, ROOT_INO, "l").unwrap();
    expect_errno(s.getattr(b, fifo.ino), Errno::ENOENT);
    expect_errno(s.getattr(b, l.ino), Errno::ENOENT);
}

fn unlinked_open_inode_survives_until_purge(s: &dyn MetaStore) {
    let b = bucket(s, "conf-open-unlinked");
    let f = mkfile(s, b, ROOT_INO, "f");
    let other = mkfile(s, b, ROOT_INO, "other");
    let open = |ino: Ino| ino == f.ino;
    s.unlink(b, ROOT_INO, b"f", &open).unwrap();
    let a = s.getattr(b, f.ino).unwrap();
    assert_eq!(a.nlink, 0, "an open inode is kept with no links");
    expect_errno(s.lookup(b, ROOT_INO, b"f"), Errno::ENOENT);
    assert_eq!(names(s, b, ROOT_INO), vec![b"other".to_vec()]);
    // It stays usable while open.
    s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(5), ..Default::default() }).unwrap();
    s.setxattr(b, f.ino, b"user.k", b"v", XattrMode::Any).unwrap();
    assert_eq!(s.getattr(b, f.ino).unwrap().size, 5);

    // purge leaves linked inodes alone.
    assert!(!s.purge(b, other.ino, &|_| false).unwrap());
    assert_eq!(nlink(s, b, other.ino), 1);

    // Opened again before the purge ran: it stays.
    assert!(!s.purge(b, f.ino, &open).unwrap());
    assert_eq!(nlink(s, b, f.ino), 0);

    assert!(s.purge(b, f.ino, &|_| false).unwrap());
    expect_errno(s.getattr(b, f.ino), Errno::ENOENT);
    assert!(!s.purge(b, f.ino, &|_| false).unwrap()); // purging twice is harmless
    assert!(!s.purge(b, 999_999, &|_| false).unwrap());
}

fn orphans_are_listed_until_purged(s: &dyn MetaStore) {
    let b = bucket(s, "conf-orphans");
    let orphan = mkfile(s, b, ROOT_INO, "orphan");
    let kept = mkfile(s, b, ROOT_INO, "kept");
    s.unlink(b, ROOT_INO, b"orphan", &|_| true).unwrap();
    assert_eq!(nlink(s, b, orphan.ino), 0);
    let listed = s.orphans().unwrap();
    assert!(listed.contains(&(b, orphan.ino)), "{listed:?}");
    assert!(!listed.contains(&(b, kept.ino)), "{listed:?}");
    assert!(s.purge(b, orphan.ino, &|_| false).unwrap());
    assert!(!s.orphans().unwrap().contains(&(b, orphan.ino)), "purged, no longer listed");
}

fn rmdir_rules(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rmdir");
    let d = mkdir(s, b, ROOT_INO, "d");
    mkfile(s, b, d.ino, "f");
    assert_eq!(nlink(s, b, ROOT_INO), 3);
    expect_errno(s.rmdir(b, ROOT_INO, b"d"), Errno::ENOTEMPTY);
    let sub = mkdir(s, b, d.ino, "sub");
    unlink(s, b, d.ino, "f").unwrap();
    expect_errno(s.rmdir(b, ROOT_INO, b"d"), Errno::ENOTEMPTY);
    s.rmdir(b, d.ino, b"sub").unwrap();
    assert_eq!(nlink(s, b, d.ino), 2, "rmdir drops the parent's link");
    expect_errno(s.getattr(b, sub.ino), Errno::ENOENT);

    s.rmdir(b, ROOT_INO, b"d").unwrap();
    assert_eq!(nlink(s, b, ROOT_INO), 2);
    expect_errno(s.getattr(b, d.ino), Errno::ENOENT);
    expect_errno(s.lookup(b, ROOT_INO, b"d"), Errno::ENOENT);
    expect_errno(s.readdir(b, d.ino, None, 10), Errno::ENOENT);

    let g = mkfile(s, b, ROOT_INO, "g");
    expect_errno(s.rmdir(b, ROOT_INO, b"g"), Errno::ENOTDIR);
    expect_errno(s.rmdir(b, ROOT_INO, b"missing"), Errno::ENOENT);
    expect_errno(s.rmdir(b, g.ino, b"x"), Errno::ENOTDIR);
    expect_errno(s.rmdir(b, ROOT_INO, b"."), Errno::EINVAL);
    expect_errno(s.rmdir(b, ROOT_INO, b".."), Errno::EINVAL);
    let e = mkdir(s, b, ROOT_INO, "e");
    expect_errno(unlink(s, b, ROOT_INO, "e"), Errno::EISDIR);
    assert_eq!(nlink(s, b, e.ino), 2);
    assert_eq!(nlink(s, b, ROOT_INO), 3);
}

// --- rename ---

fn rename_plain(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-plain");
    let f = mkfile(s, b, ROOT_INO, "a");
    let d = mkdir(s, b, ROOT_INO, "d");
    set_times(s, b, f.ino, OLDER, OLD);
    let t0 = Timespec::now();
    rename(s, b, ROOT_INO, "a", ROOT_INO, "b").unwrap();
    expect_errno(s.lookup(b, ROOT_INO, b"a"), Errno::ENOENT);
    let a = s.lookup(b, ROOT_INO, b"b").unwrap();
    assert_eq!((a.ino, a.nlink), (f.ino, 1));
    assert!(a.ctime >= t0, "rename sets the moved inode's ctime");
    assert_eq!(a.mtime, OLD, "rename leaves the moved inode's mtime");

    rename(s, b, ROOT_INO, "b", d.ino, "c").unwrap();
    assert_eq!(s.lookup(b, d.ino, b"c").unwrap().ino, f.ino);
    assert_eq!(names(s, b, ROOT_INO), vec![b"d".to_vec()]);
    assert_eq!(names(s, b, d.ino), vec![b"c".to_vec()]);
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, d.ino)), (3, 2), "moving a file changes no directory link");

    // A directory renamed within its parent.
    let e = mkdir(s, b, ROOT_INO, "e");
    rename(s, b, ROOT_INO, "e", ROOT_INO, "e2").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"e2").unwrap().ino, e.ino);
    assert_eq!(nlink(s, b, ROOT_INO), 4);
    assert_eq!(s.readdir(b, e.ino, None, 10).unwrap().parent, ROOT_INO);

    // Renaming onto itself is a no-op.
    rename(s, b, ROOT_INO, "e2", ROOT_INO, "e2").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"e2").unwrap().ino, e.ino);
    assert_eq!(nlink(s, b, ROOT_INO), 4);
}

fn rename_over_file(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-over-file");
    let a = mkfile(s, b, ROOT_INO, "a");
    let victim = mkfile(s, b, ROOT_INO, "b");
    rename(s, b, ROOT_INO, "a", ROOT_INO, "b").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"b").unwrap().ino, a.ino);
    expect_errno(s.getattr(b, victim.ino), Errno::ENOENT);
    assert_eq!(names(s, b, ROOT_INO), vec![b"b".to_vec()]);

    // A replaced inode with other links keeps them.
    let c = mkfile(s, b, ROOT_INO, "c");
    let multi = mkfile(s, b, ROOT_INO, "m");
    s.link(b, multi.ino, ROOT_INO, b"m2").unwrap();
    rename(s, b, ROOT_INO, "c", ROOT_INO, "m").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"m").unwrap().ino, c.ino);
    assert_eq!(s.lookup(b, ROOT_INO, b"m2").unwrap().nlink, 1);

    // A replaced inode that is open is kept, unlinked, until purged.
    let d = mkfile(s, b, ROOT_INO, "d");
    let open = mkfile(s, b, ROOT_INO, "open");
    s.rename(b, &rename_params(ROOT_INO, "d", ROOT_INO, "open"), &|ino| ino == open.ino).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"open").unwrap().ino, d.ino);
    assert_eq!(nlink(s, b, open.ino), 0);
    s.purge(b, open.ino, &|_| false).unwrap();
    expect_errno(s.getattr(b, open.ino), Errno::ENOENT);
}

fn rename_noreplace(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-noreplace");
    let a = mkfile(s, b, ROOT_INO, "a");
    let c = mkfile(s, b, ROOT_INO, "c");
    let p = RenameParams { noreplace: true, ..rename_params(ROOT_INO, "a", ROOT_INO, "c") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::EEXIST);
    assert_eq!(s.lookup(b, ROOT_INO, b"a").unwrap().ino, a.ino);
    assert_eq!(s.lookup(b, ROOT_INO, b"c").unwrap().ino, c.ino);
    let p = RenameParams { noreplace: true, ..rename_params(ROOT_INO, "a", ROOT_INO, "free") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"free").unwrap().ino, a.ino);
    let p = RenameParams { noreplace: true, exchange: true, ..rename_params(ROOT_INO, "free", ROOT_INO, "c") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::EINVAL);
}

fn rename_exchange_files(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-exchange");
    let a = mkfile(s, b, ROOT_INO, "a");
    let d = mkdir(s, b, ROOT_INO, "d");
    let c = mkfile(s, b, d.ino, "c");
    let t0 = Timespec::now();
    let p = RenameParams { exchange: true, ..rename_params(ROOT_INO, "a", d.ino, "c") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"a").unwrap().ino, c.ino);
    assert_eq!(s.lookup(b, d.ino, b"c").unwrap().ino, a.ino);
    assert_eq!((nlink(s, b, a.ino), nlink(s, b, c.ino)), (1, 1));
    assert!(s.getattr(b, a.ino).unwrap().ctime >= t0 && s.getattr(b, c.ino).unwrap().ctime >= t0, "exchange sets both ctimes");
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, d.ino)), (3, 2));

    let p = RenameParams { exchange: true, ..rename_params(ROOT_INO, "a", ROOT_INO, "missing") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::ENOENT);
    let p = RenameParams { exchange: true, ..rename_params(ROOT_INO, "missing", ROOT_INO, "a") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::ENOENT);

    // Two directories in one parent.
    let x = mkdir(s, b, ROOT_INO, "x");
    let y = mkdir(s, b, ROOT_INO, "y");
    let p = RenameParams { exchange: true, ..rename_params(ROOT_INO, "x", ROOT_INO, "y") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"x").unwrap().ino, y.ino);
    assert_eq!(s.lookup(b, ROOT_INO, b"y").unwrap().ino, x.ino);
    assert_eq!(nlink(s, b, ROOT_INO), 5);
}

fn rename_exchange_dir_across_parents(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-exchange-dirs");
    let pa = mkdir(s, b, ROOT_INO, "A");
    let pb = mkdir(s, b, ROOT_INO, "B");
    let dir = mkdir(s, b, pa.ino, "x");
    mkfile(s, b, dir.ino, "inside");
    let file = mkfile(s, b, pb.ino, "y");
    assert_eq!((nlink(s, b, pa.ino), nlink(s, b, pb.ino)), (3, 2));

    let p = RenameParams { exchange: true, ..rename_params(pa.ino, "x", pb.ino, "y") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!(s.lookup(b, pa.ino, b"x").unwrap().ino, file.ino);
    assert_eq!(s.lookup(b, pb.ino, b"y").unwrap().ino, dir.ino);
    assert_eq!(nlink(s, b, pa.ino), 2, "the directory left A");
    assert_eq!(nlink(s, b, pb.ino), 3, "the directory arrived in B");
    assert_eq!(nlink(s, b, ROOT_INO), 4);
    assert_eq!(s.readdir(b, dir.ino, None, 10).unwrap().parent, pb.ino, "'..' follows the exchange");
    assert_eq!(names(s, b, dir.ino), vec![b"inside".to_vec()]);

    // And back the other way round.
    let p = RenameParams { exchange: true, ..rename_params(pa.ino, "x", pb.ino, "y") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!((nlink(s, b, pa.ino), nlink(s, b, pb.ino)), (3, 2));
    assert_eq!(s.readdir(b, dir.ino, None, 10).unwrap().parent, pa.ino);

    // Two directories across parents: counts stay, both '..' links follow.
    let other = mkdir(s, b, pb.ino, "z");
    let p = RenameParams { exchange: true, ..rename_params(pa.ino, "x", pb.ino, "z") };
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!((nlink(s, b, pa.ino), nlink(s, b, pb.ino)), (3, 3));
    assert_eq!(s.readdir(b, dir.ino, None, 10).unwrap().parent, pb.ino);
    assert_eq!(s.readdir(b, other.ino, None, 10).unwrap().parent, pa.ino);
    s.rename(b, &p, &|_| false).unwrap();
    assert_eq!(s.readdir(b, dir.ino, None, 10).unwrap().parent, pa.ino);

    // Exchanging a directory with something inside it is refused.
    let sub = mkdir(s, b, dir.ino, "sub");
    mkfile(s, b, sub.ino, "deep");
    let p = RenameParams { exchange: true, ..rename_params(pa.ino, "x", sub.ino, "deep") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::EINVAL);
    let p = RenameParams { exchange: true, ..rename_params(sub.ino, "deep", pa.ino, "x") };
    expect_errno(s.rename(b, &p, &|_| false), Errno::EINVAL);
    assert_eq!(s.lookup(b, pa.ino, b"x").unwrap().ino, dir.ino);
}

fn rename_dir_into_own_subtree(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-subtree");
    let d = mkdir(s, b, ROOT_INO, "d");
    let e = mkdir(s, b, d.ino, "e");
    let f = mkdir(s, b, e.ino, "f");
    expect_errno(rename(s, b, ROOT_INO, "d", d.ino, "x"), Errno::EINVAL);
    expect_errno(rename(s, b, ROOT_INO, "d", e.ino, "x"), Errno::EINVAL);
    expect_errno(rename(s, b, ROOT_INO, "d", f.ino, "x"), Errno::EINVAL);
    expect_errno(rename(s, b, d.ino, "e", f.ino, "x"), Errno::EINVAL);
    assert_eq!(s.lookup(b, ROOT_INO, b"d").unwrap().ino, d.ino);
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, d.ino), nlink(s, b, e.ino)), (3, 3, 3));
    assert_eq!(s.readdir(b, d.ino, None, 10).unwrap().parent, ROOT_INO);
    // Moving up the tree is fine.
    rename(s, b, e.ino, "f", ROOT_INO, "f").unwrap();
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, e.ino)), (4, 2));
}

fn rename_dir_over_dir(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-dir-over-dir");
    let src = mkdir(s, b, ROOT_INO, "src");
    let full = mkdir(s, b, ROOT_INO, "full");
    mkfile(s, b, full.ino, "f");
    let empty = mkdir(s, b, ROOT_INO, "empty");
    assert_eq!(nlink(s, b, ROOT_INO), 5);
    expect_errno(rename(s, b, ROOT_INO, "src", ROOT_INO, "full"), Errno::ENOTEMPTY);
    assert_eq!(s.lookup(b, ROOT_INO, b"full").unwrap().ino, full.ino);

    rename(s, b, ROOT_INO, "src", ROOT_INO, "empty").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"empty").unwrap().ino, src.ino);
    expect_errno(s.getattr(b, empty.ino), Errno::ENOENT);
    assert_eq!(nlink(s, b, ROOT_INO), 4, "the replaced directory's link is gone");

    // Over an empty directory in another parent.
    let other = mkdir(s, b, ROOT_INO, "other");
    let target = mkdir(s, b, other.ino, "t");
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, other.ino)), (5, 3));
    rename(s, b, ROOT_INO, "empty", other.ino, "t").unwrap();
    expect_errno(s.getattr(b, target.ino), Errno::ENOENT);
    assert_eq!(s.lookup(b, other.ino, b"t").unwrap().ino, src.ino);
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, other.ino)), (4, 3));
    assert_eq!(s.readdir(b, src.ino, None, 10).unwrap().parent, other.ino);
}

fn rename_kind_mismatch(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-kinds");
    let d = mkdir(s, b, ROOT_INO, "d");
    let f = mkfile(s, b, ROOT_INO, "f");
    expect_errno(rename(s, b, ROOT_INO, "d", ROOT_INO, "f"), Errno::ENOTDIR);
    expect_errno(rename(s, b, ROOT_INO, "f", ROOT_INO, "d"), Errno::EISDIR);
    assert_eq!(s.lookup(b, ROOT_INO, b"d").unwrap().ino, d.ino);
    assert_eq!(s.lookup(b, ROOT_INO, b"f").unwrap().ino, f.ino);
    assert_eq!((nlink(s, b, ROOT_INO), nlink(s, b, d.ino), nlink(s, b, f.ino)), (3, 2, 1));
}

fn rename_dir_across_parents(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-dir-across");
    let pa = mkdir(s, b, ROOT_INO, "A");
    let pb = mkdir(s, b, ROOT_INO, "B");
    let x = mkdir(s, b, pa.ino, "x");
    mkdir(s, b, x.ino, "child");
    assert_eq!((nlink(s, b, pa.ino), nlink(s, b, pb.ino)), (3, 2));
    set_times(s, b, pa.ino, OLDER, OLD);
    set_times(s, b, pb.ino, OLDER, OLD);
    let t0 = Timespec::now();
    rename(s, b, pa.ino, "x", pb.ino, "y").unwrap();
    assert_eq!(nlink(s, b, pa.ino), 2, "old parent loses the '..' link");
    assert_eq!(nlink(s, b, pb.ino), 3, "new parent gains it");
    assert_eq!(nlink(s, b, ROOT_INO), 4);
    assert_eq!(nlink(s, b, x.ino), 3, "the moved directory keeps its own count");
    assert_eq!(s.readdir(b, x.ino, None, 10).unwrap().parent, pb.ino);
    assert_touched(s, b, pa.ino, t0, "rename source parent");
    assert_touched(s, b, pb.ino, t0, "rename target parent");
    assert!(names(s, b, pa.ino).is_empty());
    assert_eq!(names(s, b, pb.ino), vec![b"y".to_vec()]);
    // The moved directory's subtree moved with it.
    assert_eq!(names(s, b, x.ino), vec![b"child".to_vec()]);
    // Now that A is empty, it can go; B cannot.
    s.rmdir(b, ROOT_INO, b"A").unwrap();
    expect_errno(s.rmdir(b, ROOT_INO, b"B"), Errno::ENOTEMPTY);
}

fn rename_hard_link_onto_itself(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-same-inode");
    let f = mkfile(s, b, ROOT_INO, "f");
    let d = mkdir(s, b, ROOT_INO, "d");
    s.link(b, f.ino, d.ino, b"g").unwrap();
    rename(s, b, ROOT_INO, "f", d.ino, "g").unwrap();
    assert_eq!(s.lookup(b, ROOT_INO, b"f").unwrap().ino, f.ino, "POSIX: both names remain");
    assert_eq!(s.lookup(b, d.ino, b"g").unwrap().ino, f.ino);
    assert_eq!(nlink(s, b, f.ino), 2);
}

fn rename_errors(s: &dyn MetaStore) {
    let b = bucket(s, "conf-rename-errors");
    let f = mkfile(s, b, ROOT_INO, "f");
    expect_errno(rename(s, b, ROOT_INO, "missing", ROOT_INO, "x"), Errno::ENOENT);
    expect_errno(rename(s, b, ROOT_INO, "f", 999_999, "x"), Errno::ENOENT);
    expect_errno(rename(s, b, 999_999, "f", ROOT_INO, "x"), Errno::ENOENT);
    expect_errno(rename(s, b, ROOT_INO, "f", f.ino, "x"), Errno::ENOTDIR);
    expect_errno(rename(s, b, ROOT_INO, "..", ROOT_INO, "x"), Errno::EINVAL);
    expect_errno(rename(s, b, ROOT_INO, "f", ROOT_INO, "a/b"), Errno::EINVAL);
    assert_eq!(names(s, b, ROOT_INO), vec![b"f".to_vec()]);
}

// --- listing ---

fn readdir_pagination_and_order(s: &dyn MetaStore) {
    let b = bucket(s, "conf-readdir");
    let d = mkdir(s, b, ROOT_INO, "d");
    // Created out of order; byte order is B < a < a0 < ab < zdir < 0xff.
    let order: [&[u8]; 6] = [b"B", b"a", b"a0", b"ab", b"zdir", &[0xff]];
    for i in [3, 5, 0, 2, 1] {
        s.mknod(b, &node(d.ino, order[i], Kind::File, 0o644), None).unwrap();
    }
    mkdir(s, b, d.ino, "zdir");
    let page = |after: Option<&[u8]>, limit: u32| {
        let l = s.readdir(b, d.ino, after, limit).unwrap();
        (l.entries.into_iter().map(|e| e.name.0).collect::<Vec<_>>(), l.more)
    };
    let want = |range: std::ops::Range<usize>| order[range].iter().map(|n| n.to_vec()).collect::<Vec<_>>();

    assert_eq!(s.readdir(b, d.ino, None, 2).unwrap().parent, ROOT_INO);
    assert_eq!(page(None, 2), (want(0..2), true));
    assert_eq!(page(Some(b"a"), 2), (want(2..4), true));
    assert_eq!(page(Some(b"ab"), 2), (want(4..6), false), "the last page says so");
    assert_eq!(page(None, 100), (want(0..6), false));
    // `after` need not name an entry.
    assert_eq!(page(Some(b"a00"), 1), (want(3..4), true));
    assert_eq!(page(Some(b"Z"), 1), (want(1..2), true));
    // A page exactly as long as what is left has no more.
    assert_eq!(page(Some(b"zdir"), 1), (want(5..6), false));
    assert_eq!(page(Some(&[0xff]), 10), (vec![], false));

    // Entries carry the attributes of what they name.
    let all = s.readdir(b, d.ino, None, 100).unwrap();
    assert_eq!(all.entries.len(), 6);
    for e in &all.entries {
        assert_eq!(e.attr, s.lookup(b, d.ino, &e.name.0).unwrap(), "{:?}", e.name);
        let kind = if e.name.0 == b"zdir" { Kind::Dir } else { Kind::File };
        assert_eq!(e.attr.kind, kind);
    }

    let f = s.lookup(b, d.ino, b"a").unwrap();
    expect_errno(s.readdir(b, f.ino, None, 10), Errno::ENOTDIR);
    expect_errno(s.readdir(b, 999_999, None, 10), Errno::ENOENT);
}

// --- extended attributes ---

fn xattr_basics(s: &dyn MetaStore) {
    let b = bucket(s, "conf-xattr");
    let f = mkfile(s, b, ROOT_INO, "f");
    let g = mkfile(s, b, ROOT_INO, "g");
    let d = mkdir(s, b, ROOT_INO, "d");
    assert!(s.listxattr(b, f.ino).unwrap().is_empty());

    let t0 = Timespec::now();
    s.setxattr(b, f.ino, b"user.a", b"1", XattrMode::Any).unwrap();
    assert!(s.getattr(b, f.ino).unwrap().ctime >= t0, "setxattr sets ctime");
    assert_eq!(s.getxattr(b, f.ino, b"user.a").unwrap(), b"1");
    s.setxattr(b, f.ino, b"user.a", b"2", XattrMode::Any).unwrap();
    assert_eq!(s.getxattr(b, f.ino, b"user.a").unwrap(), b"2", "Any replaces");
    s.setxattr(b, f.ino, b"trusted.t", &[0, 0xff, 7], XattrMode::Any).unwrap();
    s.setxattr(b, f.ino, b"security.s", b"", XattrMode::Any).unwrap();
    assert_eq!(s.getxattr(b, f.ino, b"trusted.t").unwrap(), vec![0, 0xff, 7], "values are bytes");
    assert_eq!(s.getxattr(b, f.ino, b"security.s").unwrap(), b"", "empty values are values");
    let mut listed = s.listxattr(b, f.ino).unwrap();
    listed.sort();
    assert_eq!(listed, vec![b"security.s".to_vec(), b"trusted.t".to_vec(), b"user.a".to_vec()]);

    // Per inode.
    assert!(s.listxattr(b, g.ino).unwrap().is_empty());
    expect_errno(s.getxattr(b, g.ino, b"user.a"), Errno::ENODATA);
    s.setxattr(b, d.ino, b"user.dir", b"x", XattrMode::Create).unwrap();
    assert_eq!(s.listxattr(b, d.ino).unwrap(), vec![b"user.dir".to_vec()]);

    let t0 = Timespec::now();
    s.removexattr(b, f.ino, b"user.a").unwrap();
    assert!(s.getattr(b, f.ino).unwrap().ctime >= t0, "removexattr sets ctime");
    expect_errno(s.getxattr(b, f.ino, b"user.a"), Errno::ENODATA);
    expect_errno(s.removexattr(b, f.ino, b"user.a"), Errno::ENODATA);
    assert_eq!(s.listxattr(b, f.ino).unwrap().len(), 2);

    expect_errno(s.getxattr(b, f.ino, b"user.missing"), Errno::ENODATA);
    expect_errno(s.getxattr(b, 999_999, b"user.a"), Errno::ENOENT);
    expect_errno(s.setxattr(b, 999_999, b"user.a", b"v", XattrMode::Any), Errno::ENOENT);
    expect_errno(s.listxattr(b, 999_999), Errno::ENOENT);
}

/// An ACL xattr value: (tag, permissions, id) entries (ids of the owner,
/// owning group, mask and other entries are ignored, as the kernel's).
fn acl_value(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// POSIX ACLs as Linux filesystems keep them: the access ACL's owner,
/// mask and other entries are the mode's bits (setting one sets the
/// other), a minimal ACL is the mode alone, and a directory's default ACL
/// is passed on to new nodes in place of the umask.
fn acls_follow_the_mode_and_pass_down(s: &dyn MetaStore) {
    let (access, default) = (&b"system.posix_acl_access"[..], &b"system.posix_acl_default"[..]);
    const ANY: u32 = u32::MAX;
    let b = bucket(s, "conf-acl");
    let f = mkfile(s, b, ROOT_INO, "f");
    // u::rw-, u:1001:rwx, g::r--, m::r-x, o::---
    let named = acl_value(&[(0x01, 6, ANY), (0x02, 7, 1001), (0x04, 4, ANY), (0x10, 5, ANY), (0x20, 0, ANY)]);
    s.setxattr(b, f.ino, access, &named, XattrMode::Any).unwrap();
    assert_eq!(s.getattr(b, f.ino).unwrap().mode, 0o650, "the mask is the group class");
    assert_eq!(s.getxattr(b, f.ino, access).unwrap(), named);
    s.setattr(b, &SetAttrParams { ino: f.ino, mode: Some(0o704), ..Default::default() }).unwrap();
    let chmodded = acl_value(&[(0x01, 7, ANY), (0x02, 7, 1001), (0x04, 4, ANY), (0x10, 0, ANY), (0x20, 4, ANY)]);
    assert_eq!(s.getxattr(b, f.ino, access).unwrap(), chmodded, "chmod sets the owner, mask and other entries");
    let minimal = acl_value(&[(0x01, 6, ANY), (0x04, 4, ANY), (0x20, 4, ANY)]);
    s.setxattr(b, f.ino, access, &minimal, XattrMode::Any).unwrap();
    assert_eq!(s.getattr(b, f.ino).unwrap().mode, 0o644);
    expect_errno(s.getxattr(b, f.ino, access), Errno::ENODATA);
    expect_errno(s.setxattr(b, f.ino, default, &minimal, XattrMode::Any), Errno::EACCES);

    let d = mkdir(s, b, ROOT_INO, "d");
    let mut umasked = node(d.ino, b"umasked", Kind::File, 0o666);
    umasked.umask = 0o022;
    assert_eq!(s.mknod(b, &umasked, None).unwrap().mode, 0o644, "no default ACL: the umask applies");
    // d:u::rwx, d:u:1001:rwx, d:g::r-x, d:m::rwx, d:o::---
    let inherited = acl_value(&[(0x01, 7, ANY), (0x02, 7, 1001), (0x04, 5, ANY), (0x10, 7, ANY), (0x20, 0, ANY)]);
    s.setxattr(b, d.ino, default, &inherited, XattrMode::Any).unwrap();
    let mut file = node(d.ino, b"file", Kind::File, 0o666);
    file.umask = 0o077;
    let file = s.mknod(b, &file, None).unwrap();
    assert_eq!(file.mode, 0o660, "the default ACL, limited by the mode, instead of the umask");
    let want = acl_value(&[(0x01, 6, ANY), (0x02, 7, 1001), (0x04, 5, ANY), (0x10, 6, ANY), (0x20, 0, ANY)]);
    assert_eq!(s.getxattr(b, file.ino, access).unwrap(), want);
    expect_errno(s.getxattr(b, file.ino, default), Errno::ENODATA);
    let sub = s.mknod(b, &node(d.ino, b"sub", Kind::Dir, 0o755), None).unwrap();
    assert_eq!(s.getxattr(b, sub.ino, default).unwrap(), inherited, "a subdirectory passes it on");
    assert_eq!(sub.mode & 0o777, 0o750);
    let link = s.mknod(b, &node(d.ino, b"link", Kind::Symlink, 0o777), Some(b"file")).unwrap();
    expect_errno(s.getxattr(b, link.ino, access), Errno::ENODATA);
}

fn xattr_modes_and_limits(s: &dyn MetaStore) {
    let b = bucket(s, "conf-xattr-modes");
    let f = mkfile(s, b, ROOT_INO, "f");
    s.setxattr(b, f.ino, b"user.k", b"v1", XattrMode::Create).unwrap();
    expect_errno(s.setxattr(b, f.ino, b"user.k", b"v2", XattrMode::Create), Errno::EEXIST);
    assert_eq!(s.getxattr(b, f.ino, b"user.k").unwrap(), b"v1");
    expect_errno(s.setxattr(b, f.ino, b"user.none", b"v", XattrMode::Replace), Errno::ENODATA);
    expect_errno(s.getxattr(b, f.ino, b"user.none"), Errno::ENODATA);
    s.setxattr(b, f.ino, b"user.k", b"v3", XattrMode::Replace).unwrap();
    assert_eq!(s.getxattr(b, f.ino, b"user.k").unwrap(), b"v3");

    for ns in [&b"system.other"[..], b"os2.foo", b"plain", b"user", b"USER.x"] {
        expect_errno(s.setxattr(b, f.ino, ns, b"v", XattrMode::Any), Errno::EOPNOTSUPP);
    }
    expect_errno(s.removexattr(b, f.ino, b"system.other"), Errno::EOPNOTSUPP);
    expect_errno(s.setxattr(b, f.ino, b"system.posix_acl_access", b"v", XattrMode::Any), Errno::EINVAL);

    let max = vec![0x5a; 65536];
    s.setxattr(b, f.ino, b"user.max", &max, XattrMode::Any).unwrap();
    assert_eq!(s.getxattr(b, f.ino, b"user.max").unwrap(), max);
    expect_errno(s.setxattr(b, f.ino, b"user.big", &vec![0; 65537], XattrMode::Any), Errno::E2BIG);
    expect_errno(s.getxattr(b, f.ino, b"user.big"), Errno::ENODATA);

    let mut long_name = b"user.".to_vec();
    long_name.resize(255, b'n');
    s.setxattr(b, f.ino, &long_name, b"v", XattrMode::Any).unwrap();
    long_name.push(b'n');
    expect_errno(s.setxattr(b, f.ino, &long_name, b"v", XattrMode::Any), Errno::ERANGE);
}

// --- data ---

fn commit_and_block_map(s: &dyn MetaStore) {
    let name = "conf-commit";
    let b = bucket(s, name);
    let f = mkfile(s, b, ROOT_INO, "f");
    assert_eq!(map(s, b, f.ino), (0, vec![]));
    let (h0, _) = add_block(s, "commit-0", BS as usize, true);
    let (h1, _) = add_block(s, "commit-1", 3000, false);

    let t0 = Timespec::now();
    let a = s.commit(b, f.ino, 4096 + 3000, &[slot(0, h0, 4096), slot(1, h1, 3000)], None).unwrap();
    assert_eq!((a.size, a.version), (7096, f.version + 1));
    assert!(a.mtime >= t0 && a.ctime >= t0, "commit sets mtime and ctime");
    assert_eq!(s.getattr(b, f.ino).unwrap(), a);
    assert_eq!(map(s, b, f.ino), (a.version, vec![bref(0, h0, 4096), bref(1, h1, 3000)]));
    assert_eq!(s.block_map(b, f.ino, 1, 1).unwrap().1, vec![bref(1, h1, 3000)], "a window of the map");
    assert_eq!(s.block_map(b, f.ino, 0, 1).unwrap().1, vec![bref(0, h0, 4096)]);
    assert!(s.block_map(b, f.ino, 2, 10).unwrap().1.is_empty());
    assert!(s.block_map(b, f.ino, u64::MAX - 5, 64).unwrap().1.is_empty(), "a window far past the end is empty");
    assert!(s.block_map(b, f.ino, 1 << 63, u64::MAX).unwrap().1.is_empty());
    assert_eq!(s.bucket(name).unwrap().1.bytes, 7096);

    // A commit that changes one slot keeps the others; an explicit mtime is kept.
    let when = Timespec { sec: 1_600_000_000, nsec: 42 };
    let a2 = s.commit(b, f.ino, 4096 + 3000, &[slot(0, h1, 3000)], Some(when)).unwrap();
    assert_eq!((a2.mtime, a2.version), (when, a.version + 1));
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, h1, 3000), bref(1, h1, 3000)]);

    // Holes.
    let a3 = s.commit(b, f.ino, 4096 + 3000, &[BlockSlot { index: 0, block: None }], None).unwrap();
    assert_eq!(map(s, b, f.ino), (a3.version, vec![bref(1, h1, 3000)]));
    assert_eq!(a3.size, 7096);

    // Growing with a sparse tail.
    let a4 = s.commit(b, f.ino, 10 * 4096, &[slot(5, h0, 4096)], None).unwrap();
    assert_eq!(a4.size, 40960);
    assert_eq!(map(s, b, f.ino).1, vec![bref(1, h1, 3000), bref(5, h0, 4096)]);

    // Shrinking through a commit trims the map as well.
    s.commit(b, f.ino, 4096 + 10, &[], None).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(1, h1, 10)]);
    // Growing, a last block claimed longer than the file is trimmed too.
    s.commit(b, f.ino, 2 * 4096 + 20, &[slot(2, h0, 4096)], None).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(1, h1, 10), bref(2, h0, 20)]);
    s.commit(b, f.ino, 4096 + 10, &[], None).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(1, h1, 10)]);

    let d = mkdir(s, b, ROOT_INO, "d");
    expect_errno(s.commit(b, d.ino, 10, &[slot(0, h0, 10)], None), Errno::EISDIR);
    let fifo = s.mknod(b, &node(ROOT_INO, b"p", Kind::Fifo, 0o644), None).unwrap();
    expect_errno(s.commit(b, fifo.ino, 10, &[slot(0, h0, 10)], None), Errno::EINVAL);
    expect_errno(s.commit(b, 999_999, 10, &[slot(0, h0, 10)], None), Errno::ENOENT);
    expect_errno(s.block_map(b, 999_999, 0, 1), Errno::ENOENT);
}

fn commit_unregistered_block_is_atomic(s: &dyn MetaStore) {
    let b = bucket(s, "conf-commit-eagain");
    let f = mkfile(s, b, ROOT_INO, "f");
    let (h0, _) = add_block(s, "eagain-0", 4096, true);
    let (h1, _) = add_block(s, "eagain-1", 4096, true);
    let before = s.commit(b, f.ino, 4096, &[slot(0, h0, 4096)], None).unwrap();
    let unknown = Hash::of(b"conf: never registered");
    assert!(!has(s, unknown));
    // A valid slot first, then the missing block: nothing may stick.
    let r = s.commit(b, f.ino, 3 * 4096, &[slot(0, h1, 4096), slot(1, h1, 4096), slot(2, unknown, 4096)], None);
    expect_errno(r, Errno::EAGAIN);
    assert_eq!(s.getattr(b, f.ino).unwrap(), before, "size, version and times unchanged");
    assert_eq!(map(s, b, f.ino), (before.version, vec![bref(0, h0, 4096)]));
    assert!(!has(s, unknown), "a failed commit registers nothing");
    // And no reference was taken on the blocks of the failed commit.
    unlink(s, b, ROOT_INO, "f").unwrap();
    s.collect_garbage(0).unwrap();
    assert!(!has(s, h0) && !has(s, h1));
}

fn commit_rejects_bad_slots(s: &dyn MetaStore) {
    let b = bucket(s, "conf-commit-einval");
    let f = mkfile(s, b, ROOT_INO, "f");
    let (h, _) = add_block(s, "einval", 3000, true);
    let before = s.commit(b, f.ino, 100, &[slot(0, h, 100)], None).unwrap();
    expect_errno(s.commit(b, f.ino, 4096, &[slot(1, h, 100)], None), Errno::EINVAL);
    expect_errno(s.commit(b, f.ino, 0, &[slot(0, h, 100)], None), Errno::EINVAL);
    expect_errno(s.commit(b, f.ino, 10_000, &[slot(3, h, 100)], None), Errno::EINVAL);
    expect_errno(s.commit(b, f.ino, 4096, &[slot(0, h, 3001)], None), Errno::EINVAL);
    assert_eq!(s.getattr(b, f.ino).unwrap(), before);
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, h, 100)]);
    // The slot just before the size is fine.
    s.commit(b, f.ino, 4097, &[slot(1, h, 1)], None).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, h, 100), bref(1, h, 1)]);
}

fn truncate_trims_block_map(s: &dyn MetaStore) {
    let b = bucket(s, "conf-truncate");
    let f = mkfile(s, b, ROOT_INO, "f");
    let hs: Vec<Hash> = (0..3).map(|i| add_block(s, &format!("truncate-{i}"), 4096, i != 1).0).collect();
    let slots: Vec<BlockSlot> = hs.iter().enumerate().map(|(i, h)| slot(i as u64, *h, 4096)).collect();
    let a = s.commit(b, f.ino, 3 * 4096, &slots, None).unwrap();

    let t = s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(4096 + 100), ..Default::default() }).unwrap();
    assert_eq!((t.size, t.version), (4196, a.version + 1));
    assert_eq!(map(s, b, f.ino), (t.version, vec![bref(0, hs[0], 4096), bref(1, hs[1], 100)]), "last slot trimmed, later ones dropped");

    // Extending does not bring bytes back.
    let t = s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(3 * 4096), ..Default::default() }).unwrap();
    assert_eq!(t.size, 3 * 4096);
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, hs[0], 4096), bref(1, hs[1], 100)]);

    // On a block boundary nothing is trimmed but the blocks past it.
    s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(4096), ..Default::default() }).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, hs[0], 4096)]);
    s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(1000), ..Default::default() }).unwrap();
    assert_eq!(map(s, b, f.ino).1, vec![bref(0, hs[0], 1000)]);
    let t = s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(0), ..Default::default() }).unwrap();
    assert_eq!(map(s, b, f.ino), (t.version, vec![]));
    assert_eq!(t.size, 0);
}

fn block_registry(s: &dyn MetaStore) {
    let (hi, di) = add_block(s, "registry-inline", 500, true);
    let (he, _) = add_block(s, "registry-external", 100_000, false);
    let unknown = Hash::of(b"conf: registry unknown");
    assert_eq!(s.has_blocks(&[hi, unknown, he]).unwrap(), vec![true, false, true]);
    assert!(s.has_blocks(&[]).unwrap().is_empty());
    assert_eq!(s.block_location(&hi).unwrap(), BlockLocation::Inline(di.clone()));
    assert_eq!(s.block_location(&he).unwrap(), BlockLocation::External);
    expect_errno(s.block_location(&unknown), Errno::ENOENT);
    // Registering again is harmless.
    s.add_block(&hi, 500, Some(&di)).unwrap();
    assert_eq!(s.block_location(&hi).unwrap(), BlockLocation::Inline(di));
    s.sync().unwrap();
}

// --- garbage collection ---

fn gc_respects_references_and_age(s: &dyn MetaStore) {
    let b = bucket(s, "conf-gc");
    let f = mkfile(s, b, ROOT_INO, "f");
    let g = mkfile(s, b, ROOT_INO, "g");
    s.collect_garbage(0).unwrap(); // what earlier checks left behind

    let (ext, _) = add_block(s, "gc-external", 3000, false);
    let (small, _) = add_block(s, "gc-inline", 10, true);
    let young = s.collect_garbage(3600).unwrap();
    assert_eq!(young.blocks, 0, "min_age protects freshly put blocks");
    assert!(has(s, ext) && has(s, small));

    s.commit(b, f.ino, 4096 + 10, &[slot(0, ext, 3000), slot(1, small, 10)], None).unwrap();
    s.commit(b, g.ino, 10, &[slot(0, small, 10)], None).unwrap();
    let none = s.collect_garbage(0).unwrap();
    assert_eq!((none.blocks, none.bytes), (0, 0), "referenced blocks are never collected");
    assert!(none.external.is_empty());

    unlink(s, b, ROOT_INO, "f").unwrap();
    assert_eq!(s.collect_garbage(3600).unwrap().blocks, 0, "a block just unreferenced is still young");
    let gone = s.collect_garbage(0).unwrap();
    assert_eq!((gone.blocks, gone.bytes), (1, 3000));
    assert_eq!(gone.external, vec![ext], "external blocks are reported for deletion");
    assert!(!has(s, ext));
    assert!(has(s, small), "still referenced by g");
    expect_errno(s.block_location(&ext), Errno::ENOENT);

    unlink(s, b, ROOT_INO, "g").unwrap();
    let gone = s.collect_garbage(0).unwrap();
    assert_eq!((gone.blocks, gone.bytes), (1, 10));
    assert!(gone.external.is_empty(), "inline blocks need no block-store delete");
    assert!(!has(s, small));
    assert_eq!(s.collect_garbage(0).unwrap().blocks, 0);
}

fn gc_after_overwrite_truncate_and_purge(s: &dyn MetaStore) {
    let b = bucket(s, "conf-gc-drops");
    let f = mkfile(s, b, ROOT_INO, "f");
    s.collect_garbage(0).unwrap();
    let (x, _) = add_block(s, "gc-overwritten", 4096, true);
    let (y, _) = add_block(s, "gc-replacement", 4096, true);
    let (z, _) = add_block(s, "gc-truncated", 4096, false);
    // The same block twice in one file holds two references.
    s.commit(b, f.ino, 3 * 4096, &[slot(0, x, 4096), slot(1, z, 4096), slot(2, x, 4096)], None).unwrap();

    s.commit(b, f.ino, 3 * 4096, &[slot(0, y, 4096)], None).unwrap();
    assert_eq!(s.collect_garbage(0).unwrap().blocks, 0, "x is still in slot 2");
    s.setattr(b, &SetAttrParams { ino: f.ino, size: Some(100), ..Default::default() }).unwrap();
    let g = s.collect_garbage(0).unwrap();
    assert_eq!((g.blocks, g.bytes, g.external), (2, 8192, vec![z]), "overwritten and truncated-away blocks go");
    assert!(has(s, y) && !has(s, x) && !has(s, z));

    // An unlinked but open file keeps its blocks until purged.
    s.unlink(b, ROOT_INO, b"f", &|_| true).unwrap();
    assert_eq!(s.collect_garbage(0).unwrap().blocks, 0);
    assert!(has(s, y));
    s.purge(b, f.ino, &|_| false).unwrap();
    assert_eq!(s.collect_garbage(0).unwrap().blocks, 1);
    assert!(!has(s, y));
}

/// Every mutation gets the bucket's next sequence number, and the log names
/// what it touched: attributes (including deletion) and directory entries.
fn change_log_names_every_change(s: &dyn MetaStore) {
    use crate::meta::Changed;
    let b = bucket(s, "conf-change-log");
    let start = s.changes_since(b, 0, 0).unwrap().seq;
    let f = mkfile(s, b, ROOT_INO, "f");
    let log = s.changes_since(b, start, 1000).unwrap();
    assert_eq!(log.seq, start + 1, "one mutation, one sequence number");
    let what: Vec<&Changed> = log.changes.iter().map(|(_, w)| w).collect();
    assert!(what.contains(&&Changed::Entry(ROOT_INO, b"f".to_vec())), "create logs the new entry: {what:?}");
    assert!(what.contains(&&Changed::Attr(f.ino)) && what.contains(&&Changed::Attr(ROOT_INO)), "create logs both inodes: {what:?}");
    s.unlink(b, ROOT_INO, b"f", &|_| false).unwrap();
    let log = s.changes_since(b, start + 1, 1000).unwrap();
    assert_eq!(log.seq, start + 2);
    let what: Vec<&Changed> = log.changes.iter().map(|(_, w)| w).collect();
    assert!(
        what.contains(&&Changed::Entry(ROOT_INO, b"f".to_vec())) && what.contains(&&Changed::Attr(f.ino)),
        "unlink logs the entry and the deleted inode: {what:?}"
    );
    // Reads log nothing; a failed mutation logs nothing.
    s.getattr(b, ROOT_INO).unwrap();
    expect_errno(s.unlink(b, ROOT_INO, b"f", &|_| false), Errno::ENOENT);
    assert_eq!(s.changes_since(b, 0, 0).unwrap().seq, start + 2);
    // Trimming moves the log start; older cursors are then out of reach.
    s.trim_changes(1).unwrap();
    assert!(s.changes_since(b, 0, 0).unwrap().log_start > start);
}

fn replay_cache_forgets_and_trims(s: &dyn MetaStore) {
    let got = |client: &str, request: &str| s.reply(client, request).unwrap();
    s.remember_reply("c1", "1", b"one").unwrap();
    s.remember_reply("c1", "2", b"two").unwrap();
    s.remember_reply("batches", "t1", b"batch one").unwrap();
    s.remember_reply("batches", "t2", b"batch two").unwrap();
    assert_eq!(got("c1", "1").as_deref(), Some(&b"one"[..]));
    assert_eq!(got("c2", "1"), None, "replies are per client");
    s.forget_replies("batches", &["t1".to_string(), "unknown".to_string()]).unwrap();
    assert_eq!(got("batches", "t1"), None);
    assert_eq!(got("batches", "t2").as_deref(), Some(&b"batch two"[..]));
    s.trim_replies(3600, "batches", 3600).unwrap();
    assert!(got("c1", "2").is_some() && got("batches", "t2").is_some(), "trimmed replies younger than the window");
    std::thread::sleep(std::time::Duration::from_millis(1100));
    s.trim_replies(0, "batches", 3600).unwrap();
    assert_eq!((got("c1", "1"), got("c1", "2")), (None, None), "replies older than the window survived");
    assert!(got("batches", "t2").is_some(), "the lasting client's replies follow their own window");
    s.trim_replies(0, "batches", 0).unwrap();
    assert_eq!(got("batches", "t2"), None);
}

#[cfg(test)]
mod tests {
    #[test]
    fn sqlite_backend_conforms() {
        let tmp = tempfile::tempdir().unwrap();
        let store = super::super::sqlite::SqliteMeta::open(&tmp.path().join("meta.db")).unwrap();
        super::run_all(&store);
    }

    #[test]
    fn sqlite_state_survives_reopen() {
        use super::super::MetaStore;
        use restfs_proto::ROOT_INO;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("meta.db");
        let ino = {
            let store = super::super::sqlite::SqliteMeta::open(&path).unwrap();
            let b = super::bucket(&store, "conf-reopen");
            let f = super::mkfile(&store, b, ROOT_INO, "f");
            store.sync().unwrap();
            f.ino
        };
        let store = super::super::sqlite::SqliteMeta::open(&path).unwrap();
        let (b, _) = store.bucket("conf-reopen").unwrap();
        assert_eq!(store.lookup(b, ROOT_INO, b"f").unwrap().ino, ino);
        // Inode numbers are not reused after a reopen.
        assert!(super::mkfile(&store, b, ROOT_INO, "g").ino > ino);
    }
}
