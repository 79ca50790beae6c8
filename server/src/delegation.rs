//! Delegations: while one connection alone has a bucket mounted, the
//! server may delegate the bucket to it (`fs.delegate`). The holder then
//! answers namespace changes and closes itself, from its caches, and sends
//! them after the fact in ordered batches (`fs.batch`): nobody else can look
//! meanwhile. Its own changes are not pushed back to it.
//!
//! When another connection mounts the bucket, the server recalls the
//! delegation (`fs.recall`) and holds that mount until the holder has sent
//! everything it queued and returned the delegation. A holder that does not
//! return it within [`LEASE`] loses its connection (its lease is revoked),
//! which ends the delegation too.

use crate::callbacks::{Callbacks, LEASE, Lease};
use crate::meta::BucketId;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

/// Sends the holder its `fs.recall`.
pub type RecallFn = Box<dyn Fn() + Send + Sync>;

struct Holder {
    session: u64,
    recall: RecallFn,
    lease: Arc<Lease>,
    /// Set to true once the delegation ends.
    ended: tokio::sync::watch::Sender<bool>,
}

#[derive(Default)]
struct BucketUse {
    /// Connections that have the bucket mounted.
    mounted: HashSet<u64>,
    holder: Option<Holder>,
}

/// Who mounts which bucket, and who holds its delegation.
#[derive(Default)]
pub struct Delegations {
    buckets: Mutex<HashMap<BucketId, BucketUse>>,
}

impl Delegations {
    fn buckets(&self) -> std::sync::MutexGuard<'_, HashMap<BucketId, BucketUse>> {
        self.buckets.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connection `session` mounted bucket `b`.
    pub fn mounted(&self, b: BucketId, session: u64) {
        self.buckets().entry(b).or_default().mounted.insert(session);
    }

    /// Connection `session` let go of bucket `b` (it closed or mounted
    /// another): its delegation, if any, ends.
    pub fn unmounted(&self, b: BucketId, session: u64) {
        let mut buckets = self.buckets();
        if let Some(u) = buckets.get_mut(&b) {
            u.mounted.remove(&session);
            end_if_held(u, session);
            if u.mounted.is_empty() && u.holder.is_none() {
                buckets.remove(&b);
            }
        }
    }

    /// Delegate bucket `b` to `session` if no other connection has it
    /// mounted. True if `session` holds it now.
    pub fn grant(&self, b: BucketId, session: u64, lease: Arc<Lease>, recall: RecallFn) -> bool {
        let mut buckets = self.buckets();
        let u = buckets.entry(b).or_default();
        if let Some(h) = &u.holder {
            return h.session == session;
        }
        if u.mounted.len() != 1 || !u.mounted.contains(&session) {
            return false;
        }
        u.holder = Some(Holder { session, recall, lease, ended: tokio::sync::watch::channel(false).0 });
        true
    }

    /// The connections holding a delegation.
    pub fn holders(&self) -> Vec<u64> {
        self.buckets().values().filter_map(|u| u.holder.as_ref().map(|h| h.session)).collect()
    }

    /// Does `session` hold the delegation of bucket `b`?
    pub fn holds(&self, b: BucketId, session: u64) -> bool {
        self.buckets().get(&b).and_then(|u| u.holder.as_ref()).is_some_and(|h| h.session == session)
    }

    /// The holder returned the delegation.
    pub fn give_back(&self, b: BucketId, session: u64) {
        if let Some(u) = self.buckets().get_mut(&b) {
            end_if_held(u, session);
        }
    }

    /// Before `session` may use bucket `b`: end another connection's
    /// delegation of it, waiting until the holder has sent what it queued.
    pub async fn recall(&self, b: BucketId, session: u64, callbacks: &Callbacks) {
        for attempt in 0..2 {
            let (mut ended, lease) = {
                let buckets = self.buckets();
                match buckets.get(&b).and_then(|u| u.holder.as_ref()) {
                    Some(h) if h.session != session => {
                        if attempt == 0 {
                            (h.recall)();
                        }
                        (h.ended.subscribe(), h.lease.clone())
                    }
                    _ => return,
                }
            };
            if tokio::time::timeout(LEASE, ended.wait_for(|e| *e)).await.is_ok() {
                return;
            }
            // A silent holder loses its connection, which ends the delegation.
            callbacks.revoke(&lease, "it did not return a recalled delegation");
        }
        tracing::warn!("a delegation of bucket {b} outlived its holder's revocation; ending it");
        if let Some(u) = self.buckets().get_mut(&b)
            && let Some(h) = u.holder.take()
        {
            h.ended.send_replace(true);
        }
    }
}

fn end_if_held(u: &mut BucketUse, session: u64) {
    if u.holder.as_ref().is_some_and(|h| h.session == session)
        && let Some(h) = u.holder.take()
    {
        h.ended.send_replace(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn lease(c: &Callbacks) -> Arc<Lease> {
        c.grant(1, 0)
    }

    #[test]
    fn granted_only_to_a_lone_mount() {
        let (d, c) = (Delegations::default(), Callbacks::default());
        d.mounted(1, 10);
        d.mounted(1, 11);
        assert!(!d.grant(1, 10, lease(&c), Box::new(|| {})));
        d.unmounted(1, 11);
        assert!(d.grant(1, 10, lease(&c), Box::new(|| {})));
        assert!(d.holds(1, 10) && !d.holds(1, 11) && !d.holds(2, 10));
        d.mounted(2, 11);
        assert!(!d.grant(1, 11, lease(&c), Box::new(|| {})), "not mounted there");
        d.unmounted(1, 10);
        assert!(!d.holds(1, 10), "unmounting ends it");
    }

    #[tokio::test]
    async fn recall_waits_for_the_return() {
        let (d, c) = (Arc::new(Delegations::default()), Callbacks::default());
        d.mounted(1, 10);
        let recalls = Arc::new(AtomicUsize::new(0));
        let r = recalls.clone();
        assert!(d.grant(1, 10, lease(&c), Box::new(move || _ = r.fetch_add(1, Ordering::SeqCst))));
        d.mounted(1, 11);
        let d2 = d.clone();
        let giver = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            assert!(d2.holds(1, 10), "still held while the holder drains");
            d2.give_back(1, 10);
        });
        let t0 = std::time::Instant::now();
        d.recall(1, 11, &c).await;
        assert!(t0.elapsed() >= std::time::Duration::from_millis(50));
        assert_eq!(recalls.load(Ordering::SeqCst), 1);
        assert!(!d.holds(1, 10));
        giver.await.unwrap();
        // Nothing to recall: returns at once.
        d.recall(1, 11, &c).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_holder_is_revoked() {
        let (d, c) = (Delegations::default(), Callbacks::default());
        d.mounted(1, 10);
        let l = lease(&c);
        assert!(d.grant(1, 10, l.clone(), Box::new(|| {})));
        d.mounted(1, 11);
        d.recall(1, 11, &c).await;
        assert!(l.is_revoked());
        assert!(!d.holds(1, 10));
    }
}
