//! Namespace changes answered from the caches while this mount holds the
//! bucket's delegation ([`super::delegation`]): creates, removals and
//! renames of files cost no round trip. Each one checks what POSIX checks
//! against the caches, updates them the way the server will (same rules,
//! same timestamp), and queues the change. Whatever the caches cannot
//! decide (an unknown name, a directory moving, a file open here) goes to
//! the server as usual: these return `None` then.

use super::delegation::Failure;
use super::error::{FsError, Result};
use super::{Ctx, Fs, lock};
use super::{SetAttr, killed_mode};
use restfs_cache::meta::Entry as CachedEntry;
use restfs_proto::methods::{BatchOp, EntryParams, LinkParams, NewNodeParams, RenameParams, SetAttrParams};
use restfs_proto::{Attr, Errno, Ino, Kind, LINK_MAX, Name, SetTime, Timespec, acl};

fn err<T>(errno: Errno, why: &str) -> Option<Result<T>> {
    Some(Err(FsError::new(errno, format!("{why} (cached)"))))
}

impl Fs {
    /// `dir` with its times set to `at` and its link count moved by
    /// `links`; what is known of its xattrs still holds.
    fn touched(&self, mut dir: Attr, at: Timespec, links: i32) -> Attr {
        self.xattrs.committed(dir.ino, dir.ctime, at);
        dir.mtime = at;
        dir.ctime = at;
        dir.nlink = dir.nlink.saturating_add_signed(links);
        dir
    }

    /// May this mount answer locally now? (Cheap checks before waiting for
    /// room in the queue.)
    async fn may_answer_locally(&self) -> bool {
        // Pushes carry nothing new while the delegation is held (every
        // change is this mount's own), so the lease and a live cache suffice.
        let d = &self.remote.delegation;
        if !(d.active() && self.mc().is_some() && self.link().lease_valid()) {
            return false;
        }
        d.room().await;
        true
    }

    /// A directory's cached attributes, if it is a live directory.
    fn cached_dir(&self, ino: Ino) -> Option<Attr> {
        self.mc()?.attr(ino).ok().flatten().filter(|a| a.kind == Kind::Dir && a.nlink > 0)
    }

    /// Create a file or directory locally.
    pub(super) async fn local_mknod(&self, ctx: Ctx, parent: Ino, name: &[u8], kind: Kind, mode: u32) -> Option<Result<Attr>> {
        if !self.may_answer_locally().await {
            return None;
        }
        if self.acls() && !self.xattrs.knows_of(parent, acl::DEFAULT) {
            // Whether `parent` has a default ACL: asked once, then kept.
            let _ = self.getxattr(parent, acl::DEFAULT).await;
        }
        let m = self.mc()?;
        self.remote
            .delegation
            .answer(|l| {
                let dir = self.cached_dir(parent)?;
                // A default ACL decides the new node's mode and ACL: the
                // server applies it.
                if self.acls() && !self.xattrs.known_absent(parent, dir.ctime, acl::DEFAULT) {
                    return None;
                }
                match m.entry(parent, name).ok().flatten()? {
                    CachedEntry::Found(_) => return err(Errno::EEXIST, "the name exists"),
                    CachedEntry::Missing => {}
                }
                let ino = l.ino()?;
                let at = Timespec::now();
                let node = NewNodeParams {
                    parent,
                    name: Name::from(name),
                    kind,
                    mode: mode & 0o7777 & !ctx.umask,
                    uid: ctx.uid,
                    gid: ctx.gid,
                    rdev: 0,
                    ino: Some(ino),
                    umask: 0,
                };
                // The server's rules: BSD groups in a setgid directory, whose
                // subdirectories inherit the bit.
                let (mut mode, mut gid) = (node.mode, node.gid);
                if dir.mode & libc::S_ISGID != 0 {
                    gid = dir.gid;
                    if kind == Kind::Dir {
                        mode |= libc::S_ISGID;
                    }
                }
                let is_dir = kind == Kind::Dir;
                let attr = Attr {
                    ino,
                    kind,
                    mode,
                    uid: ctx.uid,
                    gid,
                    nlink: if is_dir { 2 } else { 1 },
                    size: 0,
                    atime: at,
                    mtime: at,
                    ctime: at,
                    rdev: 0,
                    version: 0,
                };
                let cached = m
                    .put_attr(&self.touched(dir, at, i32::from(is_dir)))
                    .and_then(|_| m.put_entry(parent, name, Some(&attr)))
                    .and_then(|_| if is_dir { m.put_listing(ino, parent, &[]) } else { Ok(()) });
                if let Err(e) = cached {
                    tracing::warn!("{e}");
                }
                self.xattrs.created(ino, at);
                self.claimed(parent, name);
                l.push(BatchOp::Mknod { at, node }, None);
                Some(Ok(attr))
            })
            .await
    }

    /// Remove a file's name locally.
    pub(super) async fn local_unlink(&self, parent: Ino, name: &[u8]) -> Option<Result<()>> {
        self.local_remove(parent, name, false).await
    }

    /// Remove an empty directory locally.
    pub(super) async fn local_rmdir(&self, parent: Ino, name: &[u8]) -> Option<Result<()>> {
        self.local_remove(parent, name, true).await
    }

    /// Unlink (`dir` false) or rmdir (`dir` true) locally.
    async fn local_remove(&self, parent: Ino, name: &[u8], dir: bool) -> Option<Result<()>> {
        if !self.may_answer_locally().await {
            return None;
        }
        let m = self.mc()?;
        self.remote
            .delegation
            .answer(|l| {
                let parent_attr = self.cached_dir(parent)?;
                let mut victim = match m.entry(parent, name).ok().flatten()? {
                    CachedEntry::Missing => return err(Errno::ENOENT, "no such entry"),
                    CachedEntry::Found(a) if dir && a.kind != Kind::Dir => return err(Errno::ENOTDIR, "rmdir of a non-directory"),
                    CachedEntry::Found(a) if !dir && a.kind == Kind::Dir => return err(Errno::EISDIR, "unlink of a directory"),
                    CachedEntry::Found(a) => a,
                };
                if dir {
                    let (_, entries) = m.listing(victim.ino).ok().flatten()?;
                    if !entries.is_empty() {
                        return err(Errno::ENOTEMPTY, "directory not empty");
                    }
                } else if self.open_file(victim.ino).is_some() {
                    // The server must hear of opens here before the last name goes.
                    return None;
                }
                let at = Timespec::now();
                let mut cached =
                    m.remove_entry(parent, name).and_then(|_| m.put_attr(&self.touched(parent_attr, at, if dir { -1 } else { 0 })));
                if !dir && victim.nlink > 1 {
                    victim.nlink -= 1;
                    victim.ctime = at;
                    cached = cached.and_then(|_| m.put_attr(&victim));
                } else if !dir {
                    lock(&self.gone).put(victim.ino, ());
                }
                if let Err(e) = cached {
                    tracing::warn!("{e}");
                }
                let entry = EntryParams { parent, name: Name::from(name) };
                l.push(if dir { BatchOp::Rmdir { at, entry } } else { BatchOp::Unlink { at, entry } }, None);
                Some(Ok(()))
            })
            .await
    }

    /// Rename a file locally (directories, which may move subtrees, and
    /// exchanges go to the server).
    pub(super) async fn local_rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        noreplace: bool,
    ) -> Option<Result<()>> {
        if !self.may_answer_locally().await {
            return None;
        }
        let m = self.mc()?;
        self.remote
            .delegation
            .answer(|l| {
                let old_dir = self.cached_dir(parent)?;
                let new_dir = if new_parent == parent { None } else { Some(self.cached_dir(new_parent)?) };
                let mut moving = match m.entry(parent, name).ok().flatten()? {
                    CachedEntry::Missing => return err(Errno::ENOENT, "no such entry"),
                    CachedEntry::Found(a) if a.kind == Kind::Dir => return None,
                    CachedEntry::Found(a) => a,
                };
                let replaced = match m.entry(new_parent, new_name).ok().flatten()? {
                    CachedEntry::Missing => None,
                    CachedEntry::Found(_) if noreplace => return err(Errno::EEXIST, "the target exists"),
                    CachedEntry::Found(a) if a.kind == Kind::Dir => {
                        return err(Errno::EISDIR, "cannot replace a directory with a non-directory");
                    }
                    // Two names of one inode (POSIX: nothing happens), or a file open here.
                    CachedEntry::Found(a) if a.ino == moving.ino || self.open_file(a.ino).is_some() => return None,
                    CachedEntry::Found(a) => Some(a),
                };
                let at = Timespec::now();
                moving.ctime = at;
                let mut cached = m.rename_entry(parent, name, new_parent, new_name).and_then(|_| m.put_attr(&moving));
                if let Some(mut gone) = replaced.filter(|a| a.nlink > 1) {
                    gone.nlink -= 1;
                    gone.ctime = at;
                    cached = cached.and_then(|_| m.put_attr(&gone));
                }
                cached = cached.and_then(|_| m.put_attr(&self.touched(old_dir, at, 0)));
                if let Some(new_dir) = new_dir {
                    cached = cached.and_then(|_| m.put_attr(&self.touched(new_dir, at, 0)));
                }
                if let Err(e) = cached {
                    tracing::warn!("{e}");
                }
                let rename =
                    RenameParams { parent, name: Name::from(name), new_parent, new_name: Name::from(new_name), noreplace, exchange: false };
                self.claimed(new_parent, new_name);
                l.push(BatchOp::Rename { at, rename }, None);
                Some(Ok(()))
            })
            .await
    }

    /// Give a file another name locally.
    pub(super) async fn local_link(&self, ino: Ino, parent: Ino, name: &[u8]) -> Option<Result<Attr>> {
        if !self.may_answer_locally().await {
            return None;
        }
        let m = self.mc()?;
        self.remote
            .delegation
            .answer(|l| {
                let dir = self.cached_dir(parent)?;
                // A file open here may carry changes its cached attributes lack.
                let mut file = m.attr(ino).ok().flatten().filter(|_| self.open_file(ino).is_none())?;
                match m.entry(parent, name).ok().flatten()? {
                    CachedEntry::Found(_) => return err(Errno::EEXIST, "the name exists"),
                    CachedEntry::Missing => {}
                }
                // The server's rules (`MetaStore::link`).
                if file.kind == Kind::Dir {
                    return err(Errno::EPERM, "cannot hard-link a directory");
                }
                if file.nlink == 0 {
                    return err(Errno::ENOENT, "cannot link an unlinked file");
                }
                if file.nlink >= LINK_MAX {
                    return err(Errno::EMLINK, "too many links");
                }
                let at = Timespec::now();
                file.nlink += 1;
                file.ctime = at;
                let cached = m
                    .put_attr(&file)
                    .and_then(|_| m.put_entry(parent, name, Some(&file)))
                    .and_then(|_| m.put_attr(&self.touched(dir, at, 0)));
                if let Err(e) = cached {
                    tracing::warn!("{e}");
                }
                self.claimed(parent, name);
                l.push(BatchOp::Link { at, link: LinkParams { ino, parent, name: Name::from(name) } }, None);
                Some(Ok(file))
            })
            .await
    }

    /// Change a node's mode, owner or times locally (a size change goes to
    /// the server: it drops blocks). An open file's changes are committed
    /// first, queued ahead of this one. Returns the new attributes, and
    /// whether set-ID bits were to be dropped (capabilities are the
    /// caller's to drop).
    pub(super) async fn local_setattr(&self, ino: Ino, s: &SetAttr) -> Option<Result<(Attr, bool)>> {
        if s.size.is_some() || !self.may_answer_locally().await {
            return None;
        }
        let m = self.mc()?;
        let file = self.open_file(ino);
        let mut st = match &file {
            Some(f) => Some(f.lock().await),
            None => None,
        };
        if let Some(st) = st.as_mut()
            && let Err(e) = self.commit(st).await
        {
            return Some(Err(e));
        }
        let answered = self
            .remote
            .delegation
            .answer(|l| {
                let mut a = match &st {
                    Some(st) => st.attr.clone(),
                    None => match m.attr(ino).ok().flatten() {
                        Some(a) => a,
                        // Purged by the server when its unlink arrives: nobody will see it.
                        None if lock(&self.gone).contains(&ino) => return err(Errno::ENOENT, "the file was removed"),
                        None => return None,
                    },
                };
                let before = a.ctime;
                let at = Timespec::now();
                let kill = s.kill_suidgid && a.kind == Kind::File;
                // The server's rules (`MetaStore::setattr`), at the same time.
                let mode = s.mode.or_else(|| (kill && killed_mode(a.mode) != a.mode).then(|| killed_mode(a.mode)));
                if mode.is_none() && s.uid.is_none() && s.gid.is_none() && s.atime.is_none() && s.mtime.is_none() {
                    // Only the set-ID check was asked for, and no bit needs dropping.
                    return Some(Ok((a, kill)));
                }
                let resolve = |t: SetTime| match t {
                    SetTime::Now => at,
                    SetTime::At(t) => t,
                };
                if let Some(mode) = mode {
                    a.mode = mode & 0o7777;
                }
                a.uid = s.uid.unwrap_or(a.uid);
                a.gid = s.gid.unwrap_or(a.gid);
                a.atime = s.atime.map_or(a.atime, resolve);
                a.mtime = s.mtime.map_or(a.mtime, resolve);
                a.ctime = at;
                let params = SetAttrParams { ino, mode, uid: s.uid, gid: s.gid, size: None, atime: s.atime, mtime: s.mtime };
                l.push(BatchOp::SetAttr { at, attr: params }, None);
                // No xattr changed but an access ACL, which follows the mode.
                match mode {
                    Some(mode) => self.xattrs.chmodded(ino, before, at, mode),
                    None => self.xattrs.committed(ino, before, at),
                }
                Some(Ok((a, kill)))
            })
            .await?;
        if let (Ok((a, _)), Some(st)) = (&answered, st.as_mut()) {
            st.refresh(a.clone());
        }
        if let Ok((a, _)) = &answered {
            self.merge(a);
        }
        Some(answered)
    }

    /// The server refused changes answered locally: drop what the caches
    /// (and the kernel's) learnt from them; the server's state comes back
    /// on the next lookups.
    pub(super) fn refused(&self, failures: Vec<Failure>) {
        let _changed = self.namespace_change();
        for (op, e) in failures {
            tracing::error!("the server refused a change this mount had already made: {op:?}: {e}");
            let (entries, inodes): (Vec<(Ino, &[u8])>, Vec<Ino>) = match &op {
                BatchOp::Mknod { node, .. } => (vec![(node.parent, node.name.as_bytes())], vec![node.parent]),
                BatchOp::Unlink { entry, .. } | BatchOp::Rmdir { entry, .. } => {
                    (vec![(entry.parent, entry.name.as_bytes())], vec![entry.parent])
                }
                BatchOp::Rename { rename: r, .. } => {
                    (vec![(r.parent, r.name.as_bytes()), (r.new_parent, r.new_name.as_bytes())], vec![r.parent, r.new_parent])
                }
                BatchOp::Link { link, .. } => (vec![(link.parent, link.name.as_bytes())], vec![link.parent, link.ino]),
                BatchOp::Commit { commit, .. } => (vec![], vec![commit.ino]),
                BatchOp::SetAttr { attr, .. } => (vec![], vec![attr.ino]),
            };
            for (parent, name) in entries {
                self.removed(parent, name);
                if let Some(k) = self.kernel.get() {
                    k.invalidate_entry(parent, name);
                }
            }
            for ino in inodes {
                self.forget(|m| m.forget_attr(ino));
                if let Some(k) = self.kernel.get() {
                    k.invalidate_inode(ino);
                }
            }
        }
    }
}
