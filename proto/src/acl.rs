//! POSIX ACLs as Linux passes them in the `system.posix_acl_access` and
//! `system.posix_acl_default` xattrs, and the rules that tie them to the
//! mode, as the kernel applies them on local filesystems: an access ACL's
//! owner, mask (or owning group) and other entries are the mode's
//! permission bits; `chmod` sets those entries; a new node in a directory
//! with a default ACL takes that ACL, limited by the mode it was created
//! with, instead of the umask.
//!
//! The xattr format: a little-endian `u32` version (2), then entries of
//! `u16` tag, `u16` permissions, `u32` id, sorted by tag then id.

/// The xattr holding a node's access ACL.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The xattr holding a directory's default ACL.
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// One entry: who (`tag`, and `id` for named users and groups) may do what (`perm`, rwx).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    tag: u16,
    perm: u16,
    id: u32,
}

/// A parsed ACL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acl(Vec<Entry>);

impl Acl {
    /// Parse and check an ACL xattr value: known tags, one of each of the
    /// owner, owning group and other entries, a mask whenever there are
    /// named entries, sorted as the kernel writes them.
    pub fn parse(value: &[u8]) -> Option<Acl> {
        let (version, body) = value.split_first_chunk::<4>()?;
        if u32::from_le_bytes(*version) != VERSION || body.len() % 8 != 0 {
            return None;
        }
        let entries: Vec<Entry> = body
            .chunks_exact(8)
            .map(|e| Entry {
                tag: u16::from_le_bytes([e[0], e[1]]),
                perm: u16::from_le_bytes([e[2], e[3]]),
                id: u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            })
            .collect();
        let count = |tag| entries.iter().filter(|e| e.tag == tag).count();
        let known = entries.iter().all(|e| matches!(e.tag, USER_OBJ | USER | GROUP_OBJ | GROUP | MASK | OTHER) && e.perm & !7 == 0);
        let sorted = entries.windows(2).all(|w| (w[0].tag, w[0].id) < (w[1].tag, w[1].id));
        let named = count(USER) + count(GROUP) > 0;
        let masks = count(MASK);
        let whole = count(USER_OBJ) == 1 && count(GROUP_OBJ) == 1 && count(OTHER) == 1 && masks <= 1 && (masks == 1 || !named);
        (known && sorted && whole).then_some(Acl(entries))
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = VERSION.to_le_bytes().to_vec();
        for e in &self.0 {
            out.extend_from_slice(&e.tag.to_le_bytes());
            out.extend_from_slice(&e.perm.to_le_bytes());
            out.extend_from_slice(&e.id.to_le_bytes());
        }
        out
    }

    /// Says no more than the mode does (owner, owning group, other only).
    pub fn is_minimal(&self) -> bool {
        self.0.iter().all(|e| matches!(e.tag, USER_OBJ | GROUP_OBJ | OTHER))
    }

    fn perm(&self, tag: u16) -> Option<u32> {
        self.0.iter().find(|e| e.tag == tag).map(|e| u32::from(e.perm))
    }

    fn set_perm(&mut self, tag: u16, f: impl Fn(u16) -> u16) {
        for e in self.0.iter_mut().filter(|e| e.tag == tag) {
            e.perm = f(e.perm);
        }
    }

    /// The group class: the mask if there is one, else the owning group.
    fn group_class(&self) -> u16 {
        if self.perm(MASK).is_some() { MASK } else { GROUP_OBJ }
    }

    /// `mode` with its permission bits taken from this (access) ACL.
    pub fn mode(&self, mode: u32) -> u32 {
        let bits = |tag| self.perm(tag).unwrap_or(0);
        (mode & !0o777) | bits(USER_OBJ) << 6 | bits(self.group_class()) << 3 | bits(OTHER)
    }

    /// `chmod`: the owner, group class and other entries take the mode's bits.
    pub fn chmod(&mut self, mode: u32) {
        let class = self.group_class();
        self.set_perm(USER_OBJ, |_| (mode >> 6 & 7) as u16);
        self.set_perm(class, |_| (mode >> 3 & 7) as u16);
        self.set_perm(OTHER, |_| (mode & 7) as u16);
    }

    /// A new node under a directory whose default ACL this is, created
    /// with `mode`: its access ACL (`None` when the mode says it all) and
    /// its mode, each limited by the other.
    pub fn inherit(&self, mode: u32) -> (Option<Acl>, u32) {
        let mut acl = self.clone();
        let class = acl.group_class();
        acl.set_perm(USER_OBJ, |p| p & (mode >> 6 & 7) as u16);
        acl.set_perm(class, |p| p & (mode >> 3 & 7) as u16);
        acl.set_perm(OTHER, |p| p & (mode & 7) as u16);
        let mode = acl.mode(mode);
        (if acl.is_minimal() { None } else { Some(acl) }, mode)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(entries: &[(u16, u16, u32)]) -> Acl {
        Acl(entries.iter().map(|&(tag, perm, id)| Entry { tag, perm, id }).collect())
    }

    const NONE: u32 = u32::MAX;

    #[test]
    fn round_trips_and_refuses_malformed_values() {
        let a = acl(&[(USER_OBJ, 7, NONE), (USER, 6, 1000), (GROUP_OBJ, 5, NONE), (MASK, 7, NONE), (OTHER, 0, NONE)]);
        assert_eq!(Acl::parse(&a.to_bytes()), Some(a.clone()));
        let mut bytes = a.to_bytes();
        bytes[0] = 1;
        assert_eq!(Acl::parse(&bytes), None, "version");
        assert_eq!(Acl::parse(&a.to_bytes()[..10]), None, "truncated");
        let no_mask = acl(&[(USER_OBJ, 7, NONE), (USER, 6, 1000), (GROUP_OBJ, 5, NONE), (OTHER, 0, NONE)]);
        assert_eq!(Acl::parse(&no_mask.to_bytes()), None, "a named entry needs a mask");
        let unsorted = acl(&[(GROUP_OBJ, 5, NONE), (USER_OBJ, 7, NONE), (OTHER, 0, NONE)]);
        assert_eq!(Acl::parse(&unsorted.to_bytes()), None, "order");
    }

    #[test]
    fn the_mask_is_the_group_class() {
        let a = acl(&[(USER_OBJ, 6, NONE), (USER, 7, 1000), (GROUP_OBJ, 4, NONE), (MASK, 5, NONE), (OTHER, 1, NONE)]);
        assert_eq!(a.mode(0o100000), 0o100651);
        assert!(!a.is_minimal());
        let mut b = a.clone();
        b.chmod(0o740);
        assert_eq!(b.mode(0), 0o740);
        assert_eq!(b.perm(GROUP_OBJ), Some(4), "chmod leaves the owning group to the mask");
        assert_eq!(b.perm(USER), Some(7), "and named entries alone");
    }

    #[test]
    fn a_new_node_takes_the_default_acl_limited_by_its_mode() {
        // setfacl -d -m u:1000:rwx,g::r-x,o::--- on a directory
        let default = acl(&[(USER_OBJ, 7, NONE), (USER, 7, 1000), (GROUP_OBJ, 5, NONE), (MASK, 7, NONE), (OTHER, 0, NONE)]);
        let (access, mode) = default.inherit(0o666);
        assert_eq!(mode, 0o660, "open(O_CREAT, 0666): no umask, the ACL limits it");
        assert_eq!(access.unwrap().perm(MASK), Some(6));
        let minimal = acl(&[(USER_OBJ, 7, NONE), (GROUP_OBJ, 7, NONE), (OTHER, 5, NONE)]);
        assert_eq!(minimal.inherit(0o777), (None, 0o775));
    }
}
