//! Callbacks: a change made by one connection is answered only once every
//! other connection that watches the bucket has applied it, or its lease
//! has run out.
//!
//! A connection that negotiated the callbacks capability holds a [`Lease`]
//! from its `bucket.subscribe`. The client acknowledges each push it has
//! applied (`push.ack`). The lease lasts [`LEASE`] from the last message
//! the server heard from it; the client counts its own lease from the
//! moment it *sent* a request that got answered, so the client's lease
//! always ends first. Within its lease a client may answer `open` from its
//! caches: whatever another client closed before that open began was
//! either acknowledged by it or made the server wait out its lease.
//!
//! A client that keeps talking but stops acknowledging (stuck) is cut off
//! after [`LEASE`], and the change then waits for the lease it last had.
//! A lapsed lease is never renewed: the connection closes, and the client
//! reconnects and catches up before it trusts its caches again.

use crate::meta::BucketId;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a client's lease lasts after the server last heard from it.
pub const LEASE: Duration = Duration::from_secs(3);

/// One connection's promise to apply pushes promptly.
pub struct Lease {
    /// Every change through this sequence number is applied by the client.
    acked: AtomicU64,
    /// A change through this sequence number waits for the client's acknowledgement.
    wanted: AtomicU64,
    /// When the server last heard from the client, in ms since [`Callbacks`] began.
    heard_ms: AtomicU64,
    /// Wakes waiters on an acknowledgement.
    acks: tokio::sync::Notify,
    /// Set when the connection must be closed (it stopped acknowledging).
    revoked: AtomicBool,
    /// Wakes the connection when revoked.
    pub revocation: tokio::sync::Notify,
}

impl Lease {
    /// The client applied every change through `through`.
    pub fn ack(&self, through: u64) {
        self.acked.fetch_max(through, Ordering::AcqRel);
        self.acks.notify_waiters();
    }

    /// Is a change waiting for an acknowledgement the client has not sent?
    pub fn ack_wanted(&self) -> Option<u64> {
        let wanted = self.wanted.load(Ordering::Acquire);
        (wanted > self.acked.load(Ordering::Acquire)).then_some(wanted)
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::Acquire)
    }
}

/// The leases of every bucket.
pub struct Callbacks {
    epoch: Instant,
    leases: Mutex<HashMap<BucketId, Vec<Arc<Lease>>>>,
}

impl Default for Callbacks {
    fn default() -> Callbacks {
        Callbacks { epoch: Instant::now(), leases: Mutex::default() }
    }
}

impl Callbacks {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// A lease on bucket `b` for a client that has applied every change through `applied`.
    pub fn grant(&self, b: BucketId, applied: u64) -> Arc<Lease> {
        let lease = Arc::new(Lease {
            acked: AtomicU64::new(applied),
            wanted: AtomicU64::new(0),
            heard_ms: AtomicU64::new(self.now_ms()),
            acks: tokio::sync::Notify::new(),
            revoked: AtomicBool::new(false),
            revocation: tokio::sync::Notify::new(),
        });
        self.leases.lock().unwrap_or_else(|p| p.into_inner()).entry(b).or_default().push(lease.clone());
        lease
    }

    /// The connection holding `lease` ended: nobody waits for it any more.
    pub fn drop_lease(&self, b: BucketId, lease: &Arc<Lease>) {
        let mut leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = leases.get_mut(&b) {
            list.retain(|l| !Arc::ptr_eq(l, lease));
            if list.is_empty() {
                leases.remove(&b);
            }
        }
        lease.acks.notify_waiters();
    }

    /// The server heard from the client holding `lease`. A lease that has
    /// lapsed is not renewed but revoked: changes made meanwhile did not
    /// wait for this client, so it must reconnect and catch up.
    pub fn heard(&self, lease: &Lease) {
        let now = self.now_ms();
        if lease.heard_ms.load(Ordering::Acquire) + LEASE.as_millis() as u64 <= now {
            self.revoke(lease, "its lease lapsed");
        } else if !lease.is_revoked() {
            lease.heard_ms.store(now, Ordering::Release);
        }
    }

    pub fn revoke(&self, lease: &Lease, why: &str) {
        if !lease.revoked.swap(true, Ordering::AcqRel) {
            tracing::info!("closing a client's connection: {why}");
            lease.revocation.notify_waiters();
            lease.revocation.notify_one();
        }
    }

    /// Leases on bucket `b` other than `mine` that have not run out.
    pub fn others(&self, b: BucketId, mine: Option<&Arc<Lease>>) -> Vec<Arc<Lease>> {
        let now = self.now_ms();
        let leases = self.leases.lock().unwrap_or_else(|p| p.into_inner());
        leases
            .get(&b)
            .map(|list| {
                list.iter()
                    .filter(|l| mine.is_none_or(|m| !Arc::ptr_eq(l, m)))
                    .filter(|l| !l.is_revoked() && l.heard_ms.load(Ordering::Acquire) + LEASE.as_millis() as u64 > now)
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Ask `leases` to acknowledge change `seq` (their next push says so).
    /// Before waking the pushers, so the push that carries it asks.
    pub fn want(&self, leases: &[Arc<Lease>], seq: u64) {
        for lease in leases {
            lease.wanted.fetch_max(seq, Ordering::AcqRel);
        }
    }

    /// Wait until each of `leases` acknowledged change `seq`, or its lease
    /// ran out. A client still heard from but silent on acknowledgements
    /// for [`LEASE`] is revoked (its connection closes) and its last lease
    /// waited out.
    pub async fn wait(&self, leases: &[Arc<Lease>], seq: u64) {
        let started = self.now_ms();
        for lease in leases {
            loop {
                let acks = lease.acks.notified();
                tokio::pin!(acks);
                acks.as_mut().enable();
                if lease.acked.load(Ordering::Acquire) >= seq {
                    break;
                }
                let now = self.now_ms();
                let expires = lease.heard_ms.load(Ordering::Acquire) + LEASE.as_millis() as u64;
                if now >= expires {
                    break;
                }
                if lease.is_revoked() || now >= started + LEASE.as_millis() as u64 {
                    self.revoke(lease, &format!("it did not acknowledge change {seq} within {LEASE:?}"));
                    tokio::time::sleep(Duration::from_millis(expires - now)).await;
                    break;
                }
                let _ =
                    tokio::time::timeout(Duration::from_millis((expires - now).min(started + LEASE.as_millis() as u64 - now)), acks).await;
            }
        }
    }
}
