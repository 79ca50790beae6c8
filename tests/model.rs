//! The filesystem core against an in-memory reference model.
//!
//! Property tests generate random sequences of namespace and data
//! operations — create (optionally writing through the create handle),
//! mkdir, write, truncate, rename (plain, `RENAME_NOREPLACE`,
//! `RENAME_EXCHANGE`), link, unlink, rmdir, reads — and run each one both
//! against the real core ([`restfs::fs::Fs`] talking to an in-process
//! `restfs_server::Server` over a WebSocket) and against a small model of
//! POSIX semantics kept in memory here. After every operation the outcome
//! must agree: success, or the same errno (ENOENT, EEXIST, ENOTDIR, EISDIR,
//! ENOTEMPTY, EINVAL for moving a directory into its own subtree, EPERM for
//! hard-linking a directory; renaming one link of an inode onto another is
//! a no-op), plus whatever the operation observed (bytes read, sizes,
//! link counts). Every few operations and at the end the whole tree is
//! listed through `opendir` and compared with the model: names, kinds,
//! inode identity (hard links share an inode, renames keep it), `..`, link
//! counts (a directory has 2 + its subdirectories), file sizes and the
//! complete content of every file.
//!
//! Names come from a tiny name space (`a`, `b`, `c`; literal paths are at
//! most three levels deep) so operations collide often. Buckets use 4 KiB blocks and
//! 2-block segments, so small writes already cross block and segment
//! boundaries, leave partial last blocks, and (with writes far past the end)
//! sparse holes; truncating down and extending again must read back zeros.
//! Data goes through the real path: open, write, flush, release (close),
//! i.e. upload and commit. Some operations keep two handles open on one
//! file (write through one, read through the other before closing), change
//! the size of a file while a handle holds unflushed data, write to a file
//! after its last name was unlinked or renamed over, or hold handles open
//! across later operations, to check the client's coherence.
//! Two clients (two connections, two cores) share each bucket and each
//! operation runs through one of them; like a mount, each core has a
//! (no-op) kernel cache connected and applies the server's change pushes.
//!
//! Generated operations name their paths either literally or as "the n-th
//! existing file / directory / node" or "name x in the n-th directory",
//! resolved against the model when the operation runs, so most operations
//! act on something that exists. A failure reports the operations as they
//! ran, with literal paths.
//!
//! One server runs per test function; every case gets a fresh bucket.
//! `PROPTEST_CASES` overrides the number of cases; `--nocapture` shows how
//! often each operation succeeded or failed with which errno.

use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use restfs::client::{Link, ServerUrl};
use restfs::fs::{Ctx, Fs, FsError, KernelCache, SetAttr};
use restfs_proto::methods::{BucketCreate, BucketCreateParams, BucketMount, BucketName};
use restfs_proto::{Errno, Ino, Kind};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Block size of the test buckets.
const BS: u64 = 4096;
/// Blocks per segment of the test buckets.
const SEGMENT_BLOCKS: u32 = 2;
/// Where writes "far past the end" land (block 20, segment 10).
const FAR: u64 = 20 * BS;
/// Chunk size for whole-file reads (deliberately not block aligned).
const READ_CHUNK: u32 = 5000;
/// Compare the whole tree after every this many operations (and at the end).
const TREE_EVERY: usize = 4;
/// Default number of cases, and most operations per case.
const CASES: u32 = 64;
const MAX_OPS: usize = 40;
/// Longest a case may take before it counts as hung.
const CASE_TIMEOUT: Duration = Duration::from_secs(120);

const CTX: Ctx = Ctx { uid: 1000, gid: 1000, umask: 0o022 };

// ---------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------

const NAMES: [&str; 3] = ["a", "b", "c"];

/// A path below the root: one to three names.
#[derive(Clone, PartialEq, Eq)]
struct P(Vec<&'static str>);

impl P {
    fn parent(&self) -> &[&'static str] {
        &self.0[..self.0.len() - 1]
    }
    fn name(&self) -> &'static str {
        self.0[self.0.len() - 1]
    }
}

impl fmt::Debug for P {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", self.0.join("/"))
    }
}

/// Write data: `len` non-zero bytes made from `seed` (equal seeds at equal
/// alignment give equal blocks, so deduplication is exercised too).
#[derive(Clone, Copy, PartialEq, Eq)]
struct Pat {
    seed: u8,
    len: usize,
}

impl Pat {
    fn bytes(self) -> Vec<u8> {
        (0..self.len).map(|i| 1 + ((self.seed as usize * 37 + i * 7) % 251) as u8).collect()
    }
}

/// A write: `pat` at `off`.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Wr {
    off: u64,
    pat: Pat,
}

impl fmt::Debug for Wr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Wr {{ off: {}, len: {}, seed: {} }}", self.off, self.pat.len, self.pat.seed)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RenameMode {
    Plain,
    NoReplace,
    Exchange,
}

/// An operation on paths of type `T`: [`T`] when it runs, [`Target`] when
/// generated (targets pick existing nodes when the operation runs).
#[derive(Clone, Debug)]
enum OpOf<T> {
    /// create (O_CREAT|O_EXCL), optionally write through the new handle, close.
    Create(T, Option<Wr>),
    Mkdir(T),
    /// open, write, close.
    Write(T, Wr),
    /// truncate(2) by path (setattr size).
    Truncate(T, u64),
    /// Truncate to `cut`, extend to `cut + grow`, then read the whole file.
    TruncExtend(T, u64, u64),
    Rename(T, T, RenameMode),
    Link(T, T),
    Unlink(T),
    Rmdir(T),
    /// open, read `len` bytes at `off`, close.
    Read(T, u64, u32),
    /// Two handles on one file: read through h2, write through h1, read
    /// through h2 (before any flush), close h1, write through h2, read all
    /// through h2, close h2; sizes by path while data is unflushed.
    TwoHandles {
        path: T,
        w1: Wr,
        w2: Wr,
        off: u64,
        len: u32,
    },
    /// open, write, truncate by path while the handle is open, write again
    /// through the handle, read all through it, close.
    OpenTruncate(T, Wr, u64, Wr),
    /// open, unlink the name, write and read through the handle, close.
    UnlinkOpen(T, Wr),
    /// open the file at the second path, rename the first path over it,
    /// write and read through the handle, close.
    ReplaceOpen(T, T, Wr),
    /// open a handle and keep it across the following operations.
    Hold(T),
    /// close one of the handles this client holds (by index), if any.
    Drop(u8),
}

type Op = OpOf<P>;
type GenOp = OpOf<Target>;

impl<T> OpOf<T> {
    fn map<U>(self, mut f: impl FnMut(T) -> U) -> OpOf<U> {
        match self {
            OpOf::Create(p, w) => OpOf::Create(f(p), w),
            OpOf::Mkdir(p) => OpOf::Mkdir(f(p)),
            OpOf::Write(p, w) => OpOf::Write(f(p), w),
            OpOf::Truncate(p, s) => OpOf::Truncate(f(p), s),
            OpOf::TruncExtend(p, c, g) => OpOf::TruncExtend(f(p), c, g),
            OpOf::Rename(a, b, m) => {
                let a = f(a);
                OpOf::Rename(a, f(b), m)
            }
            OpOf::Link(a, b) => {
                let a = f(a);
                OpOf::Link(a, f(b))
            }
            OpOf::Unlink(p) => OpOf::Unlink(f(p)),
            OpOf::Rmdir(p) => OpOf::Rmdir(f(p)),
            OpOf::Read(p, o, l) => OpOf::Read(f(p), o, l),
            OpOf::TwoHandles { path, w1, w2, off, len } => OpOf::TwoHandles { path: f(path), w1, w2, off, len },
            OpOf::OpenTruncate(p, a, s, b) => OpOf::OpenTruncate(f(p), a, s, b),
            OpOf::UnlinkOpen(p, w) => OpOf::UnlinkOpen(f(p), w),
            OpOf::Hold(p) => OpOf::Hold(f(p)),
            OpOf::Drop(i) => OpOf::Drop(i),
            OpOf::ReplaceOpen(a, b, w) => {
                let a = f(a);
                OpOf::ReplaceOpen(a, f(b), w)
            }
        }
    }
}

/// Where a generated operation acts: a literal path, or (by index, modulo
/// how many there are when the operation runs) an existing file, an
/// existing directory, anything existing, or a name inside an existing
/// directory (the root included). Existing-node targets keep most
/// operations from failing with ENOENT.
#[derive(Clone, Debug)]
enum Target {
    Path(P),
    File(u8),
    Dir(u8),
    Any(u8),
    Child(u8, &'static str),
}

impl Target {
    fn resolve(self, model: &Model) -> P {
        let (files, dirs) = model.paths();
        let pick = |v: &[P], i: u8| {
            if v.is_empty() { P(vec!["a"]) } else { v[i as usize % v.len()].clone() }
        };
        let below_root: Vec<P> = dirs.iter().filter(|d| !d.0.is_empty()).cloned().collect();
        match self {
            Target::Path(p) => p,
            Target::File(i) => pick(&files, i),
            Target::Dir(i) => pick(&below_root, i),
            Target::Any(i) => {
                let all: Vec<P> = files.iter().chain(&below_root).cloned().collect();
                pick(&all, i)
            }
            Target::Child(i, name) => {
                let mut p = dirs[i as usize % dirs.len()].clone();
                p.0.push(name);
                p
            }
        }
    }
}

/// What an operation observed on success.
#[derive(Clone, PartialEq, Eq)]
enum Obs {
    Data(Vec<u8>),
    Size(u64),
    Nlink(u32),
    /// Bytes a write reported written.
    Wrote(u32),
}

impl fmt::Debug for Obs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Obs::Data(d) => write!(f, "Data({} bytes)", d.len()),
            Obs::Size(s) => write!(f, "Size({s})"),
            Obs::Nlink(n) => write!(f, "Nlink({n})"),
            Obs::Wrote(n) => write!(f, "Wrote({n})"),
        }
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

fn name() -> impl Strategy<Value = &'static str> {
    prop::sample::select(&NAMES[..])
}

fn path() -> impl Strategy<Value = P> {
    prop_oneof![
        3 => prop::collection::vec(name(), 1..=1),
        3 => prop::collection::vec(name(), 2..=2),
        1 => prop::collection::vec(name(), 3..=3),
    ]
    .prop_map(P)
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        4 => 0..3 * BS + BS / 2,
        2 => prop::sample::select(vec![0, 1, BS - 1, BS, BS + 1, 2 * BS - 1, 2 * BS, 2 * BS + 1, 3 * BS]),
        1 => FAR..FAR + BS,
    ]
}

fn length() -> impl Strategy<Value = usize> {
    let bs = BS as usize;
    prop_oneof![
        4 => 1..=bs * 3 / 2,
        1 => prop::sample::select(vec![1, bs - 1, bs, bs + 1, 2 * bs]),
    ]
}

fn size() -> impl Strategy<Value = u64> {
    prop_oneof![
        3 => 0..4 * BS,
        2 => prop::sample::select(vec![0, 1, BS - 1, BS, BS + 1, 2 * BS, 3 * BS]),
        1 => FAR..FAR + 2 * BS,
    ]
}

fn wr() -> impl Strategy<Value = Wr> {
    (offset(), 0u8..8, length()).prop_map(|(off, seed, len)| Wr { off, pat: Pat { seed, len } })
}

fn rename_mode() -> impl Strategy<Value = RenameMode> {
    prop_oneof![
        6 => Just(RenameMode::Plain),
        1 => Just(RenameMode::NoReplace),
        1 => Just(RenameMode::Exchange),
    ]
}

fn t_path() -> impl Strategy<Value = Target> {
    path().prop_map(Target::Path)
}

fn t_file() -> impl Strategy<Value = Target> {
    prop_oneof![4 => any::<u8>().prop_map(Target::File), 1 => t_path()]
}

fn t_dir() -> impl Strategy<Value = Target> {
    prop_oneof![3 => any::<u8>().prop_map(Target::Dir), 1 => t_path()]
}

fn t_any() -> impl Strategy<Value = Target> {
    prop_oneof![3 => any::<u8>().prop_map(Target::Any), 1 => t_path()]
}

/// Mostly a new name in an existing directory.
fn t_new() -> impl Strategy<Value = Target> {
    prop_oneof![
        3 => (any::<u8>(), name()).prop_map(|(i, n)| Target::Child(i, n)),
        1 => t_path(),
    ]
}

fn op() -> impl Strategy<Value = GenOp> {
    prop_oneof![
        4 => (t_new(), prop::option::weighted(0.5, wr())).prop_map(|(p, w)| GenOp::Create(p, w)),
        3 => t_new().prop_map(GenOp::Mkdir),
        5 => (t_file(), wr()).prop_map(|(p, w)| GenOp::Write(p, w)),
        2 => (t_file(), size()).prop_map(|(p, s)| GenOp::Truncate(p, s)),
        1 => (t_file(), size(), 1..2 * BS).prop_map(|(p, c, g)| GenOp::TruncExtend(p, c, g)),
        5 => (t_any(), prop_oneof![t_new(), t_any()], rename_mode())
            .prop_map(|(a, b, m)| GenOp::Rename(a, b, m)),
        2 => (t_file(), prop_oneof![2 => t_new(), 1 => t_any()]).prop_map(|(a, b)| GenOp::Link(a, b)),
        2 => prop_oneof![3 => t_file(), 1 => t_any()].prop_map(GenOp::Unlink),
        2 => t_dir().prop_map(GenOp::Rmdir),
        2 => (t_file(), offset(), 1..3 * BS as u32).prop_map(|(p, o, l)| GenOp::Read(p, o, l)),
        2 => (t_file(), wr(), wr(), offset(), 1..3 * BS as u32).prop_map(|(path, w1, w2, off, len)| {
            GenOp::TwoHandles { path, w1, w2, off, len }
        }),
        1 => (t_file(), wr(), size(), wr()).prop_map(|(p, a, s, b)| GenOp::OpenTruncate(p, a, s, b)),
        1 => (t_file(), wr()).prop_map(|(p, w)| GenOp::UnlinkOpen(p, w)),
        1 => (t_any(), t_file(), wr()).prop_map(|(a, b, w)| GenOp::ReplaceOpen(a, b, w)),
        2 => t_file().prop_map(GenOp::Hold),
        1 => any::<u8>().prop_map(GenOp::Drop),
    ]
}

/// What a setup step puts at a path.
#[derive(Clone, Debug)]
enum Seed {
    Absent,
    Dir,
    File(Option<Wr>),
}

fn seed(absent: u32, dir: u32, file: u32) -> impl Strategy<Value = Seed> {
    prop_oneof![
        absent => Just(Seed::Absent),
        dir => Just(Seed::Dir),
        file => prop::option::weighted(0.7, wr()).prop_map(Seed::File),
    ]
}

/// A random starting tree (mostly directories at the top, files below),
/// as mkdir/create operations, so the random operations that follow find
/// something to act on instead of failing with ENOENT.
fn setup() -> impl Strategy<Value = Vec<(usize, GenOp)>> {
    (prop::collection::vec(seed(1, 3, 2), 3), prop::collection::vec(seed(2, 1, 3), 9)).prop_map(|(top, below)| {
        let mut ops = Vec::new();
        let mut add = |path: P, s: &Seed| match s {
            Seed::Absent => {}
            Seed::Dir => ops.push((0, GenOp::Mkdir(Target::Path(path)))),
            Seed::File(w) => ops.push((0, GenOp::Create(Target::Path(path), *w))),
        };
        for (i, t) in top.iter().enumerate() {
            add(P(vec![NAMES[i]]), t);
            if matches!(t, Seed::Dir) {
                for (j, b) in below[3 * i..3 * i + 3].iter().enumerate() {
                    add(P(vec![NAMES[i], NAMES[j]]), b);
                }
            }
        }
        ops
    })
}

/// A case: a starting tree, then random operations, each through client 0 or 1.
fn ops() -> impl Strategy<Value = Vec<(usize, GenOp)>> {
    (setup(), prop::collection::vec((0..2usize, op()), 1..=MAX_OPS)).prop_map(|(mut ops, more)| {
        ops.extend(more);
        ops
    })
}

// ---------------------------------------------------------------------------
// The reference model
// ---------------------------------------------------------------------------

type Id = u32;
const MROOT: Id = 0;

enum Node {
    File(Vec<u8>),
    Dir { parent: Id, entries: BTreeMap<&'static str, Id> },
}

struct Model {
    /// Live directories and every file ever made (unreachable files stay;
    /// nothing looks at them).
    nodes: HashMap<Id, Node>,
    next: Id,
    /// The core's inode number for each model node, learned at creation.
    inos: HashMap<Id, Ino>,
}

/// What the model expects of an operation.
struct Expect {
    result: Result<Vec<Obs>, Errno>,
    /// The node the operation created, if any.
    created: Option<Id>,
}

fn write_at(data: &mut Vec<u8>, off: u64, bytes: &[u8]) {
    let off = off as usize;
    if data.len() < off + bytes.len() {
        data.resize(off + bytes.len(), 0);
    }
    data[off..off + bytes.len()].copy_from_slice(bytes);
}

fn slice(data: &[u8], off: u64, len: u32) -> Vec<u8> {
    let start = (off as usize).min(data.len());
    let end = (off as usize).saturating_add(len as usize).min(data.len());
    data[start..end].to_vec()
}

impl Model {
    fn new(root_ino: Ino) -> Model {
        let mut nodes = HashMap::new();
        nodes.insert(MROOT, Node::Dir { parent: MROOT, entries: BTreeMap::new() });
        Model { nodes, next: 1, inos: HashMap::from([(MROOT, root_ino)]) }
    }

    fn node(&self, id: Id) -> &Node {
        &self.nodes[&id]
    }

    fn is_dir(&self, id: Id) -> bool {
        matches!(self.node(id), Node::Dir { .. })
    }

    /// Path walk as the kernel does it: lookups from the root.
    fn walk(&self, comps: &[&str]) -> Result<Id, Errno> {
        let mut cur = MROOT;
        for c in comps {
            match self.node(cur) {
                Node::Dir { entries, .. } => cur = *entries.get(c).ok_or(Errno::ENOENT)?,
                Node::File(_) => return Err(Errno::ENOTDIR),
            }
        }
        Ok(cur)
    }

    fn entries(&self, id: Id) -> Result<&BTreeMap<&'static str, Id>, Errno> {
        match self.node(id) {
            Node::Dir { entries, .. } => Ok(entries),
            Node::File(_) => Err(Errno::ENOTDIR),
        }
    }

    fn entries_mut(&mut self, id: Id) -> &mut BTreeMap<&'static str, Id> {
        match self.nodes.get_mut(&id) {
            Some(Node::Dir { entries, .. }) => entries,
            _ => panic!("model: {id} is not a directory"),
        }
    }

    fn set_parent(&mut self, id: Id, new_parent: Id) {
        if let Some(Node::Dir { parent, .. }) = self.nodes.get_mut(&id) {
            *parent = new_parent;
        }
    }

    /// A file's content; EISDIR for a directory (open or truncate of one).
    fn file_mut(&mut self, id: Id) -> Result<&mut Vec<u8>, Errno> {
        match self.nodes.get_mut(&id) {
            Some(Node::File(d)) => Ok(d),
            _ => Err(Errno::EISDIR),
        }
    }

    /// Is directory `d` the directory `ancestor` or below it?
    fn within(&self, mut d: Id, ancestor: Id) -> bool {
        loop {
            if d == ancestor {
                return true;
            }
            if d == MROOT {
                return false;
            }
            d = match self.node(d) {
                Node::Dir { parent, .. } => *parent,
                Node::File(_) => unreachable!(),
            };
        }
    }

    /// Names pointing at `id`, over all live directories.
    fn links(&self, id: Id) -> u32 {
        self.nodes
            .values()
            .map(|n| match n {
                Node::Dir { entries, .. } => entries.values().filter(|e| **e == id).count() as u32,
                Node::File(_) => 0,
            })
            .sum()
    }

    fn subdirs(&self, id: Id) -> u32 {
        match self.node(id) {
            Node::Dir { entries, .. } => entries.values().filter(|e| self.is_dir(**e)).count() as u32,
            Node::File(_) => 0,
        }
    }

    /// Paths of all files and all directories (the root as the empty path),
    /// in a stable order.
    fn paths(&self) -> (Vec<P>, Vec<P>) {
        let (mut files, mut dirs) = (Vec::new(), Vec::new());
        let mut stack = vec![(P(vec![]), MROOT)];
        while let Some((path, id)) = stack.pop() {
            if let Node::Dir { entries, .. } = self.node(id) {
                for (name, &child) in entries {
                    let mut p = path.clone();
                    p.0.push(name);
                    if self.is_dir(child) {
                        stack.push((p, child));
                    } else {
                        files.push(p);
                    }
                }
            }
            dirs.push(path);
        }
        files.sort_by(|a, b| a.0.cmp(&b.0));
        dirs.sort_by(|a, b| a.0.cmp(&b.0));
        (files, dirs)
    }

    fn add(&mut self, node: Node) -> Id {
        let id = self.next;
        self.next += 1;
        self.nodes.insert(id, node);
        id
    }

    /// Remove directory `id` (empty) from the live set.
    fn drop_dir(&mut self, id: Id) {
        self.nodes.remove(&id);
        self.inos.remove(&id);
    }

    /// rename(2) with the server's order of checks.
    fn rename(&mut self, from: &P, to: &P, mode: RenameMode) -> Result<(), Errno> {
        let sp = self.walk(from.parent())?;
        let dp = self.walk(to.parent())?;
        // Both parents must be directories before names are looked at.
        self.entries(sp)?;
        self.entries(dp)?;
        let s = *self.entries(sp)?.get(from.name()).ok_or(Errno::ENOENT)?;
        let d = self.entries(dp)?.get(to.name()).copied();
        if mode == RenameMode::Exchange {
            let d = d.ok_or(Errno::ENOENT)?;
            if d == s {
                return Ok(());
            }
            if (self.is_dir(s) && self.within(dp, s)) || (self.is_dir(d) && self.within(sp, d)) {
                return Err(Errno::EINVAL);
            }
            self.entries_mut(sp).insert(from.name(), d);
            self.entries_mut(dp).insert(to.name(), s);
            self.set_parent(s, dp);
            self.set_parent(d, sp);
            return Ok(());
        }
        if mode == RenameMode::NoReplace && d.is_some() {
            // RENAME_NOREPLACE: "fail with EEXIST if the target
            // exists" — even when it names the same inode.
            return Err(Errno::EEXIST);
        }
        if d == Some(s) {
            return Ok(()); // two links to one inode: do nothing
        }
        if self.is_dir(s) && self.within(dp, s) {
            return Err(Errno::EINVAL);
        }
        if let Some(d) = d {
            match (self.is_dir(s), self.is_dir(d)) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.entries(d)?.is_empty() => {
                    return Err(Errno::ENOTEMPTY);
                }
                _ => {}
            }
            self.entries_mut(dp).remove(to.name());
            if self.is_dir(d) {
                self.drop_dir(d);
            }
        }
        self.entries_mut(sp).remove(from.name());
        self.entries_mut(dp).insert(to.name(), s);
        self.set_parent(s, dp);
        Ok(())
    }

    fn apply(&mut self, op: &Op) -> Expect {
        let mut created = None;
        let result = self.apply_inner(op, &mut created);
        Expect { result, created }
    }

    fn apply_inner(&mut self, op: &Op, created: &mut Option<Id>) -> Result<Vec<Obs>, Errno> {
        match op {
            Op::Create(p, w) => {
                let parent = self.walk(p.parent())?;
                if self.entries(parent)?.contains_key(p.name()) {
                    return Err(Errno::EEXIST);
                }
                let mut data = Vec::new();
                if let Some(w) = w {
                    write_at(&mut data, w.off, &w.pat.bytes());
                }
                let id = self.add(Node::File(data));
                self.entries_mut(parent).insert(p.name(), id);
                *created = Some(id);
                Ok(vec![])
            }
            Op::Mkdir(p) => {
                let parent = self.walk(p.parent())?;
                if self.entries(parent)?.contains_key(p.name()) {
                    return Err(Errno::EEXIST);
                }
                let id = self.add(Node::Dir { parent, entries: BTreeMap::new() });
                self.entries_mut(parent).insert(p.name(), id);
                *created = Some(id);
                Ok(vec![])
            }
            Op::Write(p, w) => {
                let id = self.walk(&p.0)?;
                write_at(self.file_mut(id)?, w.off, &w.pat.bytes());
                Ok(vec![Obs::Wrote(w.pat.len as u32)])
            }
            Op::Truncate(p, size) => {
                let id = self.walk(&p.0)?;
                self.file_mut(id)?.resize(*size as usize, 0);
                Ok(vec![Obs::Size(*size)])
            }
            Op::TruncExtend(p, cut, grow) => {
                let id = self.walk(&p.0)?;
                let d = self.file_mut(id)?;
                d.resize(*cut as usize, 0);
                d.resize((cut + grow) as usize, 0);
                Ok(vec![Obs::Data(d.clone())])
            }
            Op::Rename(from, to, mode) => {
                self.rename(from, to, *mode)?;
                Ok(vec![])
            }
            Op::Link(from, to) => {
                let s = self.walk(&from.0)?;
                let dp = self.walk(to.parent())?;
                if self.is_dir(s) {
                    return Err(Errno::EPERM);
                }
                if self.entries(dp)?.contains_key(to.name()) {
                    return Err(Errno::EEXIST);
                }
                self.entries_mut(dp).insert(to.name(), s);
                Ok(vec![Obs::Nlink(self.links(s))])
            }
            Op::Unlink(p) => {
                let parent = self.walk(p.parent())?;
                let id = *self.entries(parent)?.get(p.name()).ok_or(Errno::ENOENT)?;
                if self.is_dir(id) {
                    return Err(Errno::EISDIR);
                }
                self.entries_mut(parent).remove(p.name());
                Ok(vec![])
            }
            Op::Rmdir(p) => {
                let parent = self.walk(p.parent())?;
                let id = *self.entries(parent)?.get(p.name()).ok_or(Errno::ENOENT)?;
                if !self.is_dir(id) {
                    return Err(Errno::ENOTDIR);
                }
                if !self.entries(id)?.is_empty() {
                    return Err(Errno::ENOTEMPTY);
                }
                self.entries_mut(parent).remove(p.name());
                self.drop_dir(id);
                Ok(vec![])
            }
            Op::Read(p, off, len) => {
                let id = self.walk(&p.0)?;
                Ok(vec![Obs::Data(slice(self.file_mut(id)?, *off, *len))])
            }
            Op::TwoHandles { path, w1, w2, off, len } => {
                let id = self.walk(&path.0)?;
                let d = self.file_mut(id)?;
                let mut obs = vec![Obs::Data(slice(d, *off, *len))];
                write_at(d, w1.off, &w1.pat.bytes());
                obs.push(Obs::Data(slice(d, *off, *len)));
                obs.push(Obs::Size(d.len() as u64)); // getattr
                obs.push(Obs::Size(d.len() as u64)); // lookup
                write_at(d, w2.off, &w2.pat.bytes());
                obs.push(Obs::Data(d.clone()));
                obs.push(Obs::Size(d.len() as u64));
                Ok(obs)
            }
            Op::OpenTruncate(p, a, size, b) => {
                let id = self.walk(&p.0)?;
                let d = self.file_mut(id)?;
                write_at(d, a.off, &a.pat.bytes());
                d.resize(*size as usize, 0);
                write_at(d, b.off, &b.pat.bytes());
                Ok(vec![Obs::Data(d.clone()), Obs::Size(d.len() as u64)])
            }
            Op::UnlinkOpen(p, w) => {
                let id = self.walk(&p.0)?;
                self.file_mut(id)?;
                let parent = self.walk(p.parent())?;
                self.entries_mut(parent).remove(p.name());
                let nlink = self.links(id);
                let d = self.file_mut(id)?;
                write_at(d, w.off, &w.pat.bytes());
                Ok(vec![Obs::Nlink(nlink), Obs::Data(d.clone()), Obs::Size(d.len() as u64)])
            }
            Op::Hold(p) => {
                let id = self.walk(&p.0)?;
                self.file_mut(id)?;
                Ok(vec![])
            }
            Op::Drop(_) => Ok(vec![]),
            Op::ReplaceOpen(from, to, w) => {
                let id = self.walk(&to.0)?;
                self.file_mut(id)?;
                self.rename(from, to, RenameMode::Plain)?;
                let nlink = self.links(id);
                let d = self.file_mut(id)?;
                write_at(d, w.off, &w.pat.bytes());
                Ok(vec![Obs::Nlink(nlink), Obs::Data(d.clone()), Obs::Size(d.len() as u64)])
            }
        }
    }

    /// The tree as the core should list it.
    fn tree(&self) -> Result<Tree, String> {
        let ino =
            |id: Id| -> Result<Ino, String> { self.inos.get(&id).copied().ok_or_else(|| format!("model node {id} has no core inode")) };
        let mut t = Tree::default();
        let mut owners: HashMap<Ino, Id> = HashMap::new();
        let mut stack = vec![("/".to_string(), MROOT)];
        t.entries.insert(
            "/".into(),
            Entry { kind: Kind::Dir, ino: ino(MROOT)?, nlink: 2 + self.subdirs(MROOT), size: None, dotdot: Some(ino(MROOT)?) },
        );
        while let Some((path, dir)) = stack.pop() {
            for (name, &id) in self.entries(dir).map_err(|e| e.to_string())? {
                let child = join(&path, name);
                let i = ino(id)?;
                if let Some(other) = owners.insert(i, id)
                    && other != id
                {
                    return Err(format!("core inode {i} was handed out for model nodes {other} and {id}"));
                }
                let entry = match self.node(id) {
                    Node::Dir { parent, .. } => {
                        stack.push((child.clone(), id));
                        Entry { kind: Kind::Dir, ino: i, nlink: 2 + self.subdirs(id), size: None, dotdot: Some(ino(*parent)?) }
                    }
                    Node::File(d) => {
                        t.contents.insert(i, d.clone());
                        Entry { kind: Kind::File, ino: i, nlink: self.links(id), size: Some(d.len() as u64), dotdot: None }
                    }
                };
                t.entries.insert(child, entry);
            }
        }
        Ok(t)
    }
}

// ---------------------------------------------------------------------------
// Trees
// ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
struct Entry {
    kind: Kind,
    ino: Ino,
    nlink: u32,
    /// Files only.
    size: Option<u64>,
    /// Directories only: what their listing gives as `..`.
    dotdot: Option<Ino>,
}

#[derive(Default)]
struct Tree {
    /// Every path ("/" is the root).
    entries: BTreeMap<String, Entry>,
    /// Content of every file, by inode.
    contents: BTreeMap<Ino, Vec<u8>>,
}

fn join(dir: &str, name: &str) -> String {
    if dir == "/" { format!("/{name}") } else { format!("{dir}/{name}") }
}

/// Where two byte strings differ, readably.
fn diff_bytes(core: &[u8], model: &[u8]) -> Option<String> {
    if core == model {
        return None;
    }
    let first = core.iter().zip(model).position(|(a, b)| a != b).unwrap_or(core.len().min(model.len()));
    let at = |d: &[u8]| d.get(first..(first + 8).min(d.len())).map(|s| format!("{s:?}")).unwrap_or_else(|| "<end>".into());
    Some(format!(
        "core has {} bytes, model {}; first difference at byte {first} (block {}, offset {}): core {} model {}",
        core.len(),
        model.len(),
        first as u64 / BS,
        first as u64 % BS,
        at(core),
        at(model),
    ))
}

fn diff_trees(core: &Tree, model: &Tree) -> Option<String> {
    let mut out = Vec::new();
    let paths: std::collections::BTreeSet<&String> = core.entries.keys().chain(model.entries.keys()).collect();
    for p in paths {
        match (core.entries.get(p), model.entries.get(p)) {
            (Some(c), Some(m)) if c == m => {}
            (c, m) => out.push(format!("  {p}: core {c:?}, model {m:?}")),
        }
    }
    if out.is_empty() {
        for (ino, want) in &model.contents {
            match core.contents.get(ino) {
                Some(got) => {
                    if let Some(d) = diff_bytes(got, want) {
                        let names: Vec<&String> = model.entries.iter().filter(|(_, e)| e.ino == *ino).map(|(p, _)| p).collect();
                        out.push(format!("  content of inode {ino} {names:?}: {d}"));
                    }
                }
                None => out.push(format!("  inode {ino}: not read from the core")),
            }
        }
    }
    (!out.is_empty()).then(|| out.join("\n"))
}

// ---------------------------------------------------------------------------
// Driving the core
// ---------------------------------------------------------------------------

fn en(e: FsError) -> Errno {
    e.errno
}

/// Path walk: one lookup per name, from `root`.
async fn walk(fs: &Fs, root: Ino, comps: &[&str]) -> Result<Ino, Errno> {
    let mut ino = root;
    for c in comps {
        ino = fs.lookup(ino, c.as_bytes()).await.map_err(en)?.ino;
    }
    Ok(ino)
}

async fn lookup_path(fs: &Fs, root: Ino, p: &P) -> Result<restfs_proto::Attr, Errno> {
    let parent = walk(fs, root, p.parent()).await?;
    fs.lookup(parent, p.name().as_bytes()).await.map_err(en)
}

/// Read through `fh` from 0 until a short read.
async fn read_all(fs: &Fs, fh: u64) -> Result<Vec<u8>, Errno> {
    let mut out = Vec::new();
    loop {
        let chunk = fs.read(fh, out.len() as u64, READ_CHUNK).await.map_err(en)?;
        let n = chunk.len();
        out.extend(chunk);
        if n < READ_CHUNK as usize {
            return Ok(out);
        }
    }
}

/// close(2): flush, then release.
async fn close(fs: &Fs, fh: u64) -> Result<(), Errno> {
    fs.flush(fh).await.map_err(en)?;
    fs.release(fh).await.map_err(en)
}

async fn write(fs: &Fs, fh: u64, w: &Wr) -> Result<u32, Errno> {
    fs.write(fh, w.off, w.pat.bytes().to_vec()).await.map_err(en)
}

async fn truncate(fs: &Fs, ino: Ino, size: u64) -> Result<restfs_proto::Attr, Errno> {
    fs.setattr(ino, SetAttr { size: Some(size), ..SetAttr::default() }).await.map_err(en)
}

/// Run `op` on the core: what it observed and the inode it created.
/// `held` are the handles this client keeps open across operations.
async fn exec(fs: &Fs, root: Ino, op: &Op, held: &mut Vec<u64>) -> Result<(Vec<Obs>, Option<Ino>), Errno> {
    match op {
        Op::Hold(p) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            held.push(fs.open(ino).await.map_err(en)?.fh);
            Ok((vec![], None))
        }
        Op::Drop(i) => {
            if !held.is_empty() {
                let fh = held.remove(*i as usize % held.len());
                close(fs, fh).await?;
            }
            Ok((vec![], None))
        }
        Op::Create(p, w) => {
            let parent = walk(fs, root, p.parent()).await?;
            let (attr, o) = fs.create(CTX, parent, p.name().as_bytes(), 0o644).await.map_err(en)?;
            if let Some(w) = w {
                write(fs, o.fh, w).await?;
            }
            close(fs, o.fh).await?;
            Ok((vec![], Some(attr.ino)))
        }
        Op::Mkdir(p) => {
            let parent = walk(fs, root, p.parent()).await?;
            let attr = fs.mkdir(CTX, parent, p.name().as_bytes(), 0o755).await.map_err(en)?;
            Ok((vec![], Some(attr.ino)))
        }
        Op::Write(p, w) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            let o = fs.open(ino).await.map_err(en)?;
            let n = write(fs, o.fh, w).await?;
            close(fs, o.fh).await?;
            Ok((vec![Obs::Wrote(n)], None))
        }
        Op::Truncate(p, size) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            let attr = truncate(fs, ino, *size).await?;
            Ok((vec![Obs::Size(attr.size)], None))
        }
        Op::TruncExtend(p, cut, grow) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            truncate(fs, ino, *cut).await?;
            truncate(fs, ino, cut + grow).await?;
            let o = fs.open(ino).await.map_err(en)?;
            let data = read_all(fs, o.fh).await?;
            close(fs, o.fh).await?;
            Ok((vec![Obs::Data(data)], None))
        }
        Op::Rename(from, to, mode) => {
            let sp = walk(fs, root, from.parent()).await?;
            let dp = walk(fs, root, to.parent()).await?;
            fs.rename(sp, from.name().as_bytes(), dp, to.name().as_bytes(), *mode == RenameMode::NoReplace, *mode == RenameMode::Exchange)
                .await
                .map_err(en)?;
            Ok((vec![], None))
        }
        Op::Link(from, to) => {
            let ino = lookup_path(fs, root, from).await?.ino;
            let dp = walk(fs, root, to.parent()).await?;
            let attr = fs.link_node(ino, dp, to.name().as_bytes()).await.map_err(en)?;
            Ok((vec![Obs::Nlink(attr.nlink)], None))
        }
        Op::Unlink(p) => {
            let parent = walk(fs, root, p.parent()).await?;
            fs.unlink(parent, p.name().as_bytes()).await.map_err(en)?;
            Ok((vec![], None))
        }
        Op::Rmdir(p) => {
            let parent = walk(fs, root, p.parent()).await?;
            fs.rmdir(parent, p.name().as_bytes()).await.map_err(en)?;
            Ok((vec![], None))
        }
        Op::Read(p, off, len) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            let o = fs.open(ino).await.map_err(en)?;
            let data = fs.read(o.fh, *off, *len).await.map_err(en)?;
            close(fs, o.fh).await?;
            Ok((vec![Obs::Data(data)], None))
        }
        Op::TwoHandles { path, w1, w2, off, len } => {
            let ino = lookup_path(fs, root, path).await?.ino;
            let h1 = fs.open(ino).await.map_err(en)?.fh;
            let h2 = fs.open(ino).await.map_err(en)?.fh;
            let mut obs = vec![Obs::Data(fs.read(h2, *off, *len).await.map_err(en)?)];
            write(fs, h1, w1).await?;
            obs.push(Obs::Data(fs.read(h2, *off, *len).await.map_err(en)?));
            obs.push(Obs::Size(fs.getattr(ino).await.map_err(en)?.size));
            obs.push(Obs::Size(lookup_path(fs, root, path).await?.size));
            close(fs, h1).await?;
            write(fs, h2, w2).await?;
            obs.push(Obs::Data(read_all(fs, h2).await?));
            obs.push(Obs::Size(fs.getattr(ino).await.map_err(en)?.size));
            close(fs, h2).await?;
            Ok((obs, None))
        }
        Op::OpenTruncate(p, a, size, b) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            let h = fs.open(ino).await.map_err(en)?.fh;
            write(fs, h, a).await?;
            truncate(fs, ino, *size).await?;
            write(fs, h, b).await?;
            let data = read_all(fs, h).await?;
            let size = fs.getattr(ino).await.map_err(en)?.size;
            close(fs, h).await?;
            Ok((vec![Obs::Data(data), Obs::Size(size)], None))
        }
        Op::UnlinkOpen(p, w) => {
            let ino = lookup_path(fs, root, p).await?.ino;
            let h = fs.open(ino).await.map_err(en)?.fh;
            let parent = walk(fs, root, p.parent()).await?;
            fs.unlink(parent, p.name().as_bytes()).await.map_err(en)?;
            let nlink = fs.getattr(ino).await.map_err(en)?.nlink;
            let (data, size) = write_read_close(fs, ino, h, w).await?;
            Ok((vec![Obs::Nlink(nlink), Obs::Data(data), Obs::Size(size)], None))
        }
        Op::ReplaceOpen(from, to, w) => {
            let ino = lookup_path(fs, root, to).await?.ino;
            let h = fs.open(ino).await.map_err(en)?.fh;
            let renamed = async {
                let sp = walk(fs, root, from.parent()).await?;
                let dp = walk(fs, root, to.parent()).await?;
                fs.rename(sp, from.name().as_bytes(), dp, to.name().as_bytes(), false, false).await.map_err(en)
            };
            if let Err(e) = renamed.await {
                close(fs, h).await?;
                return Err(e);
            }
            let nlink = fs.getattr(ino).await.map_err(en)?.nlink;
            let (data, size) = write_read_close(fs, ino, h, w).await?;
            Ok((vec![Obs::Nlink(nlink), Obs::Data(data), Obs::Size(size)], None))
        }
    }
}

/// Write `w` through handle `h` of `ino`, read the whole file back, note its
/// size, and close: what a file that lost its name still does.
async fn write_read_close(fs: &Fs, ino: Ino, h: u64, w: &Wr) -> Result<(Vec<u8>, u64), Errno> {
    write(fs, h, w).await?;
    let data = read_all(fs, h).await?;
    let size = fs.getattr(ino).await.map_err(en)?.size;
    close(fs, h).await?;
    Ok((data, size))
}

/// Read a file's whole content through a fresh handle.
async fn content(fs: &Fs, ino: Ino) -> Result<Vec<u8>, Errno> {
    let fh = fs.open(ino).await.map_err(en)?.fh;
    let data = read_all(fs, fh).await?;
    close(fs, fh).await?;
    Ok(data)
}

/// The tree as the core lists it.
async fn core_tree(fs: &Fs, root: Ino) -> Result<Tree, String> {
    let mut t = Tree::default();
    let r = fs.getattr(root).await.map_err(|e| format!("getattr of the root: {e}"))?;
    t.entries.insert("/".into(), Entry { kind: r.kind, ino: r.ino, nlink: r.nlink, size: None, dotdot: None });
    let mut stack = vec![("/".to_string(), root)];
    while let Some((path, ino)) = stack.pop() {
        let (fh, _) = fs.opendir(ino).await.map_err(|e| format!("opendir {path}: {e}"))?;
        let snap = fs.dir(fh, 0).await.map_err(|e| format!("dir {path}: {e}"))?;
        fs.releasedir(fh);
        t.entries.get_mut(&path).expect("listed above").dotdot = Some(snap.parent);
        for e in &snap.entries {
            let child = join(&path, &String::from_utf8_lossy(&e.name.0));
            let a = &e.attr;
            match a.kind {
                Kind::Dir => stack.push((child.clone(), a.ino)),
                Kind::File if !t.contents.contains_key(&a.ino) => {
                    let data = content(fs, a.ino).await.map_err(|e| format!("reading {child}: {e}"))?;
                    t.contents.insert(a.ino, data);
                }
                _ => {}
            }
            t.entries.insert(
                child,
                Entry { kind: a.kind, ino: a.ino, nlink: a.nlink, size: (a.kind == Kind::File).then_some(a.size), dotdot: None },
            );
        }
    }
    Ok(t)
}

fn compare_obs(model: &[Obs], core: &[Obs]) -> Result<(), String> {
    if model.len() != core.len() {
        return Err(format!("model observed {model:?}, core {core:?}"));
    }
    for (i, (m, c)) in model.iter().zip(core).enumerate() {
        let bad = match (m, c) {
            (Obs::Data(m), Obs::Data(c)) => diff_bytes(c, m),
            _ if m == c => None,
            _ => Some(format!("core {c:?}, model {m:?}")),
        };
        if let Some(bad) = bad {
            return Err(format!("observation #{i}: {bad}"));
        }
    }
    Ok(())
}

/// Outcomes per operation kind over the run: (successes, errnos).
/// Per operation: how often it ran, and its outcomes.
type Tally = BTreeMap<&'static str, (u32, BTreeMap<String, u32>)>;
static TALLY: std::sync::Mutex<Tally> = std::sync::Mutex::new(BTreeMap::new());

fn tally(op: &Op, r: &Result<Vec<Obs>, Errno>) {
    let kind = match op {
        Op::Create(..) => "create",
        Op::Mkdir(..) => "mkdir",
        Op::Write(..) => "write",
        Op::Truncate(..) => "truncate",
        Op::TruncExtend(..) => "trunc-extend",
        Op::Rename(_, _, RenameMode::Plain) => "rename",
        Op::Rename(_, _, RenameMode::NoReplace) => "rename-noreplace",
        Op::Rename(_, _, RenameMode::Exchange) => "rename-exchange",
        Op::Link(..) => "link",
        Op::Unlink(..) => "unlink",
        Op::Rmdir(..) => "rmdir",
        Op::Read(..) => "read",
        Op::TwoHandles { .. } => "two-handles",
        Op::OpenTruncate(..) => "open-truncate",
        Op::UnlinkOpen(..) => "unlink-open",
        Op::ReplaceOpen(..) => "replace-open",
        Op::Hold(..) => "hold",
        Op::Drop(..) => "drop",
    };
    let mut t = TALLY.lock().unwrap_or_else(|p| p.into_inner());
    let e = t.entry(kind).or_default();
    match r {
        Ok(_) => e.0 += 1,
        Err(errno) => *e.1.entry(errno.name().unwrap_or("?").to_string()).or_default() += 1,
    }
}

/// Print the tally (visible with `--nocapture`).
fn print_tally() {
    let t = TALLY.lock().unwrap_or_else(|p| p.into_inner());
    eprintln!("operation outcomes (model's view, including shrinking):");
    for (kind, (ok, errs)) in t.iter() {
        eprintln!("  {kind:>16}: {ok:>5} ok  {errs:?}");
    }
}

fn show<T>(r: &Result<T, Errno>) -> String {
    match r {
        Ok(_) => "succeeds".into(),
        Err(e) => format!("fails with {e}"),
    }
}

async fn connect(addr: SocketAddr) -> Result<Link, String> {
    let url = ServerUrl::parse(&format!("ws://{addr}/"))?;
    Link::connect(&url, Duration::from_secs(10)).await
}

/// A kernel without caches: the core's invalidations go nowhere, but the
/// paths that depend on having a kernel (applying pushes to open files) run.
struct NoKernel;

impl KernelCache for NoKernel {
    fn invalidate_attrs(&self, _: Ino) {}
    fn invalidate_inode(&self, _: Ino) {}
    fn invalidate_entry(&self, _: Ino, _: &[u8]) {}
}

/// One case: a fresh bucket, two clients, `ops` against core and model.
async fn run_case(addr: SocketAddr, bucket: String, ops: &[(usize, GenOp)]) -> Result<(), String> {
    let mut trace = Vec::new();
    run_ops(addr, bucket, ops, &mut trace).await.map_err(|e| format!("{e}\noperations as run (client, operation):\n{}", trace.join("\n")))
}

async fn run_ops(addr: SocketAddr, bucket: String, ops: &[(usize, GenOp)], trace: &mut Vec<String>) -> Result<(), String> {
    let admin = connect(addr).await?;
    admin
        .call::<BucketCreate>(BucketCreateParams {
            name: bucket.clone(),
            block_size: Some(BS as u32),
            segment_blocks: Some(SEGMENT_BLOCKS),
        })
        .await
        .map_err(|e| format!("bucket.create: {e}"))?;
    let mut clients = Vec::new();
    let mut root = 0;
    for _ in 0..2 {
        let link = connect(addr).await?;
        let m = link.call::<BucketMount>(BucketName { name: bucket.clone() }).await.map_err(|e| format!("bucket.mount: {e}"))?;
        root = m.root.ino;
        // As a mount has it: kernel caches connected, pushes applied.
        let fs = Arc::new(Fs::new(link, m.bucket, 64 << 20));
        fs.set_kernel_cache(Box::new(NoKernel));
        fs.subscribe().await.map_err(|e| format!("subscribe: {e}"))?;
        clients.push(fs);
    }
    let mut model = Model::new(root);
    let mut held: [Vec<u64>; 2] = Default::default();
    for (i, (c, gen_op)) in ops.iter().enumerate() {
        let op = &gen_op.clone().map(|t| t.resolve(&model));
        trace.push(format!("  #{i:<2} ({c}, {op:?}),"));
        let what = || format!("op #{i} (client {c}) {op:?}");
        let expect = model.apply(op);
        let got = exec(&clients[*c], root, op, &mut held[*c]).await;
        tally(op, &expect.result);
        match (&expect.result, &got) {
            (Err(m), Err(g)) if m == g => {}
            (Ok(m), Ok((g, ino))) => {
                compare_obs(m, g).map_err(|e| format!("{}: {e}", what()))?;
                match (expect.created, ino) {
                    (Some(id), Some(ino)) => {
                        model.inos.insert(id, *ino);
                    }
                    (None, None) => {}
                    _ => return Err(format!("{}: creation mismatch", what())),
                }
            }
            _ => {
                return Err(format!("{}: model {} but core {}", what(), show(&expect.result), show(&got)));
            }
        }
        if (i + 1) % TREE_EVERY == 0 || i + 1 == ops.len() {
            let core = core_tree(&clients[i % 2], root).await.map_err(|e| format!("after {}: listing the tree: {e}", what()))?;
            let want = model.tree()?;
            if let Some(d) = diff_trees(&core, &want) {
                return Err(format!("after {}: the tree differs:\n{d}", what()));
            }
        }
    }
    // Closing handles held to the end must not change anything either.
    if held.iter().any(|h| !h.is_empty()) {
        for (c, handles) in held.iter().enumerate() {
            for &fh in handles {
                close(&clients[c], fh).await.map_err(|e| format!("closing a held handle of client {c}: {e}"))?;
            }
        }
        trace.push("  (closing every held handle)".into());
        let core = core_tree(&clients[0], root).await.map_err(|e| format!("after closing held handles: listing the tree: {e}"))?;
        if let Some(d) = diff_trees(&core, &model.tree()?) {
            return Err(format!("after closing held handles: the tree differs:\n{d}"));
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Harness
// ---------------------------------------------------------------------------

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("tokio runtime"))
}

/// A server of its own, in a temporary directory.
struct Harness {
    server: Option<restfs_server::Server>,
    addr: SocketAddr,
    _data: tempfile::TempDir,
}

impl Harness {
    fn start() -> Harness {
        let data = tempfile::tempdir().expect("temporary directory");
        let server =
            runtime().block_on(restfs_server::Server::start("127.0.0.1:0".parse().expect("address"), data.path())).expect("server starts");
        Harness { addr: server.addr, server: Some(server), _data: data }
    }

    /// Run one case in a fresh bucket.
    fn check(&self, ops: &[(usize, GenOp)]) -> Result<(), TestCaseError> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let bucket = format!("model-{}", NEXT.fetch_add(1, Ordering::Relaxed));
        let case = async { tokio::time::timeout(CASE_TIMEOUT, run_case(self.addr, bucket, ops)).await };
        match runtime().block_on(case) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(TestCaseError::fail(e)),
            Err(_) => Err(TestCaseError::fail(format!("case did not finish within {CASE_TIMEOUT:?}"))),
        }
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            let _ = runtime().block_on(s.shutdown());
        }
    }
}

fn config() -> ProptestConfig {
    let mut config = ProptestConfig { cases: CASES, failure_persistence: None, max_shrink_iters: 2048, ..ProptestConfig::default() };
    if std::env::var_os("PROPTEST_CASES").is_some() {
        config.cases = ProptestConfig::default().cases;
    }
    config
}

#[test]
fn core_agrees_with_model() {
    let h = Harness::start();
    let mut runner = TestRunner::new(config());
    let result = runner.run(&ops(), |ops| h.check(&ops));
    print_tally();
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Fixed sequences for the cases the issue names explicitly, so they run
/// on every build whatever the random cases pick.
#[test]
fn fixed_sequences() {
    let p = |s: &'static str| P(s.split('/').collect());
    let w = |off: u64, len: usize, seed: u8| Wr { off, pat: Pat { seed, len } };
    let cases: Vec<Vec<(usize, Op)>> = vec![
        // Truncating a file that has unflushed writes through an open
        // handle: the size must stay truncated.
        vec![(0, Op::Create(p("a"), Some(w(0, 6000, 1)))), (0, Op::OpenTruncate(p("a"), w(100, 10, 2), 10, w(0, 1, 3)))],
        // Sparse hole: a write far past the end; the gap reads as zeros.
        vec![
            (0, Op::Create(p("a"), Some(w(10, 100, 1)))),
            (1, Op::Write(p("a"), w(FAR + 7, 5000, 2))),
            (0, Op::Read(p("a"), BS - 3, 3 * BS as u32)),
        ],
        // Truncate down into a block, then extend: the cut bytes read as zeros.
        vec![
            (0, Op::Create(p("a"), Some(w(0, 3 * BS as usize, 3)))),
            (0, Op::TruncExtend(p("a"), BS + 100, 2 * BS)),
            (1, Op::Truncate(p("a"), 10)),
            (1, Op::Truncate(p("a"), 3 * BS)),
            (0, Op::Read(p("a"), 0, 4 * BS as u32)),
        ],
        // Renaming one hard link onto another is a no-op; both names stay.
        vec![
            (0, Op::Mkdir(p("a"))),
            (0, Op::Create(p("a/b"), Some(w(1, 10, 4)))),
            (1, Op::Link(p("a/b"), p("c"))),
            (0, Op::Rename(p("c"), p("a/b"), RenameMode::Plain)),
            (1, Op::Rename(p("a/b"), p("c"), RenameMode::Exchange)),
        ],
        // A directory cannot move into its own subtree; over a non-empty one neither.
        vec![
            (0, Op::Mkdir(p("a"))),
            (0, Op::Mkdir(p("a/b"))),
            (0, Op::Rename(p("a"), p("a/b/c"), RenameMode::Plain)),
            (0, Op::Rename(p("a/b"), p("a"), RenameMode::Plain)),
            (0, Op::Mkdir(p("c"))),
            (0, Op::Rename(p("c"), p("a"), RenameMode::Plain)),
            (1, Op::Rename(p("a/b"), p("c"), RenameMode::Plain)),
            (1, Op::Rmdir(p("a"))),
        ],
        // Two handles, unflushed writes, truncate and unlink while open.
        vec![
            (0, Op::Create(p("a"), Some(w(0, 6000, 5)))),
            (1, Op::TwoHandles { path: p("a"), w1: w(BS - 10, 100, 6), w2: w(2 * BS + 1, 50, 7), off: BS - 20, len: 200 }),
            (0, Op::OpenTruncate(p("a"), w(100, 10, 1), BS / 2, w(BS, 10, 2))),
            (0, Op::Link(p("a"), p("b"))),
            (1, Op::UnlinkOpen(p("a"), w(0, 3, 3))),
            (1, Op::UnlinkOpen(p("b"), w(5, 3, 4))),
        ],
        // RENAME_NOREPLACE onto another link of the same inode is EEXIST.
        vec![(0, Op::Create(p("a"), None)), (0, Op::Link(p("a"), p("b"))), (1, Op::Rename(p("a"), p("b"), RenameMode::NoReplace))],
        // Renaming over a file open elsewhere; handles held across operations.
        vec![
            (0, Op::Create(p("a"), Some(w(0, 5000, 1)))),
            (0, Op::Create(p("b"), Some(w(0, 9000, 2)))),
            (0, Op::Hold(p("b"))),
            (1, Op::Hold(p("a"))),
            (1, Op::ReplaceOpen(p("a"), p("b"), w(BS, 10, 3))),
            (0, Op::Write(p("b"), w(2 * BS, 10, 4))),
            (1, Op::Truncate(p("b"), 100)),
            (0, Op::Read(p("b"), 0, BS as u32)),
            (0, Op::Drop(1)),
        ],
    ];
    let h = Harness::start();
    let mut failed = Vec::new();
    for (i, ops) in cases.into_iter().enumerate() {
        let ops: Vec<(usize, GenOp)> = ops.into_iter().map(|(c, op)| (c, op.map(Target::Path))).collect();
        if let Err(e) = h.check(&ops) {
            failed.push(format!("fixed sequence #{i}: {e}"));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

/// Found by `core_agrees_with_model` (an `UnlinkOpen` right after a
/// `Write` of the same file through the same client): close a file, open it
/// again at once, unlink its last name, and the open file must still exist.
/// The server decides at the first close's release that it was the last
/// open, but purges the inode later without checking again, so when the
/// re-open and the unlink get in between, the open, unlinked file vanishes
/// (`getattr` on it fails with ENOENT, its data is lost). Release is a
/// notification, so the server may process it after the calls that follow.
/// Several clients at once make the window likely enough to hit every run.
#[test]
fn reopen_and_unlink_right_after_close_keeps_the_file() {
    const CLIENTS: usize = 8;
    const ROUNDS: usize = 150;
    let h = Harness::start();
    let addr = h.addr;
    let lost: Result<Vec<String>, String> = runtime().block_on(async move {
        let admin = connect(addr).await?;
        admin
            .call::<BucketCreate>(BucketCreateParams {
                name: "reopen".into(),
                block_size: Some(BS as u32),
                segment_blocks: Some(SEGMENT_BLOCKS),
            })
            .await
            .map_err(|e| e.to_string())?;
        let mut tasks = Vec::new();
        for t in 0..CLIENTS {
            tasks.push(tokio::spawn(async move {
                let s = |e: FsError| e.to_string();
                let link = connect(addr).await?;
                let m = link.call::<BucketMount>(BucketName { name: "reopen".into() }).await.map_err(|e| e.to_string())?;
                let root = m.root.ino;
                let fs = Fs::new(link, m.bucket, 1 << 20);
                let name = format!("f{t}");
                let mut lost = Vec::new();
                for round in 0..ROUNDS {
                    let (attr, o) = fs.create(CTX, root, name.as_bytes(), 0o644).await.map_err(s)?;
                    fs.write(o.fh, 0, b"data".to_vec()).await.map_err(s)?;
                    fs.flush(o.fh).await.map_err(s)?;
                    fs.release(o.fh).await.map_err(s)?;
                    let fh = fs.open(attr.ino).await.map_err(s)?.fh;
                    fs.unlink(root, name.as_bytes()).await.map_err(s)?;
                    let got = fs.getattr(attr.ino).await;
                    if let Err(e) = &got {
                        lost.push(format!("client {t} round {round}: getattr of the open, unlinked inode {}: {e}", attr.ino));
                    }
                    let _ = fs.flush(fh).await;
                    let _ = fs.release(fh).await;
                }
                Ok::<_, String>(lost)
            }));
        }
        let mut lost = Vec::new();
        for t in tasks {
            lost.extend(t.await.map_err(|e| e.to_string())??);
        }
        Ok(lost)
    });
    let lost = lost.expect("the sequence runs");
    assert!(
        lost.is_empty(),
        "{} of {} open, unlinked files vanished, e.g.\n{}",
        lost.len(),
        CLIENTS * ROUNDS,
        lost.iter().take(5).cloned().collect::<Vec<_>>().join("\n")
    );
}
