//! Connection caps for one listener: at most `global` open connections in all, and at most
//! `per_ip` from one peer address, counted from accept, before the peer has said anything.
//!
//! A stranger who can open TCP connections could otherwise hold every file descriptor of the
//! node; the global cap keeps descriptors for storage and peers, the per-address cap keeps one
//! host from taking all of the global cap. The client listener (tarpc and push connections)
//! and the Raft listener each get their own [`ConnLimiter`].
//!
//! Who counts as one address:
//! - IPv4 addresses as they are; IPv4-mapped IPv6 addresses as the IPv4 address they carry, so
//!   a dual-stack listener counts a host once.
//! - IPv6 addresses by their /64 prefix: a single host is routinely given a whole /64, so
//!   counting single addresses would let it open `per_ip` connections per address.
//! - A connection whose peer address equals its local address comes from this machine (the
//!   kernel drops packets from outside that carry one of its own addresses as source) and is
//!   exempt from the per-address cap, though not from the global one: every local process
//!   shares that address, so on one machine the cap would only limit the operator's own load
//!   harnesses, test clients and nodes, which can exhaust the node by other means anyway.
//!
//! The state is one small map under a mutex, touched once at accept and once at close; it
//! holds an entry only for addresses with an open connection, so it is bounded by `global`.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use parking_lot::Mutex;

/// The caps of one listener.
///
/// Invariant (checked by [`ConnLimits::new`]): `1 <= per_ip <= global`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnLimits {
    global: usize,
    per_ip: usize,
}

impl ConnLimits {
    /// Caps of `global` open connections and `per_ip` from one address.
    ///
    /// # Errors
    /// A sentence naming the bad value, when `per_ip` is 0 or above `global`.
    pub fn new(global: usize, per_ip: usize) -> Result<ConnLimits, String> {
        if per_ip == 0 || per_ip > global {
            return Err(format!(
                "per-address connection cap {per_ip} must be 1 to the global cap ({global})"
            ));
        }
        Ok(ConnLimits { global, per_ip })
    }

    /// The global cap.
    pub fn global(&self) -> usize {
        self.global
    }

    /// The per-address cap.
    pub fn per_ip(&self) -> usize {
        self.per_ip
    }

    /// The same caps with the global one lowered to `global` (the per-address one with it,
    /// when it was higher); at least 1.
    pub fn lowered_to(self, global: usize) -> ConnLimits {
        let global = global.clamp(1, self.global);
        ConnLimits {
            global,
            per_ip: self.per_ip.min(global),
        }
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// The listener holds its global cap of connections.
    #[error("the listener is at its cap of {max} open connections")]
    Global {
        /// The global cap.
        max: usize,
    },
    /// The peer's address holds its cap of connections.
    #[error("the peer's address holds the per-address cap of {max} open connections")]
    PerIp {
        /// The per-address cap.
        max: usize,
    },
}

impl Refusal {
    /// Which cap, as a metric label.
    pub fn cap(self) -> &'static str {
        match self {
            Refusal::Global { .. } => "global",
            Refusal::PerIp { .. } => "per_ip",
        }
    }
}

/// Told of every refusal by [`ConnLimiter::admit`]; the node counts them in its metrics.
pub type RefusalObserver = Arc<dyn Fn(Refusal) + Send + Sync>;

/// What the per-address cap (and the per-address registration limit in `api.rs`) counts a
/// peer as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum AddrKey {
    V4(std::net::Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6Prefix(u64),
}

/// The counting key of `peer` on a connection whose local address is `local` (`None`: not
/// known), or `None` when the connection comes from this machine (exempt from the per-address
/// cap).
pub(crate) fn addr_key(peer: IpAddr, local: Option<IpAddr>) -> Option<AddrKey> {
    let canonical = |ip: IpAddr| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        IpAddr::V4(_) => ip,
    };
    let peer = canonical(peer);
    if local.map(canonical) == Some(peer) {
        return None;
    }
    Some(match peer {
        IpAddr::V4(v4) => AddrKey::V4(v4),
        IpAddr::V6(v6) => AddrKey::V6Prefix((u128::from(v6) >> 64) as u64),
    })
}

#[derive(Debug, Default)]
struct Counts {
    open: usize,
    by_addr: HashMap<AddrKey, usize>,
}

struct Inner {
    limits: ConnLimits,
    counts: Mutex<Counts>,
    observer: Option<RefusalObserver>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("limits", &self.limits)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// Counts the open connections of one listener and refuses those beyond its [`ConnLimits`].
///
/// Invariants: `open` equals the number of live [`ConnGuard`]s and never exceeds the global
/// cap; each address's count equals its live guards, never exceeds the per-address cap, and
/// an address with none has no entry.
#[derive(Debug, Clone)]
pub struct ConnLimiter(Arc<Inner>);

impl ConnLimiter {
    /// A limiter with no open connections.
    pub fn new(limits: ConnLimits) -> ConnLimiter {
        ConnLimiter(Arc::new(Inner {
            limits,
            counts: Mutex::default(),
            observer: None,
        }))
    }

    /// Like [`new`](Self::new), with `observer` told of each refusal [`admit`](Self::admit)
    /// makes.
    pub fn observed(limits: ConnLimits, observer: RefusalObserver) -> ConnLimiter {
        ConnLimiter(Arc::new(Inner {
            limits,
            counts: Mutex::default(),
            observer: Some(observer),
        }))
    }

    /// Counts a new connection from `peer`, accepted on local address `local` (`None` when not
    /// known); the returned guard uncounts it when dropped.
    ///
    /// # Errors
    /// [`Refusal`] when a cap is reached; nothing is counted then.
    pub fn acquire(&self, peer: IpAddr, local: Option<IpAddr>) -> Result<ConnGuard, Refusal> {
        let limits = self.0.limits;
        let key = addr_key(peer, local);
        let mut counts = self.0.counts.lock();
        if counts.open >= limits.global {
            return Err(Refusal::Global { max: limits.global });
        }
        if let Some(key) = key {
            let count = counts.by_addr.entry(key).or_insert(0);
            if *count >= limits.per_ip {
                return Err(Refusal::PerIp { max: limits.per_ip });
            }
            *count += 1;
        }
        counts.open += 1;
        assert!(
            counts.open <= limits.global,
            "open connections over the cap"
        );
        Ok(ConnGuard {
            inner: self.0.clone(),
            key,
        })
    }

    /// [`acquire`](Self::acquire) for a connection just accepted from `peer` on `local` (when
    /// known; an unspecified listener address never matches a peer), logging a refusal at
    /// `debug` with the `listener`'s name and telling the observer. The caller closes a
    /// refused connection.
    pub fn admit(
        &self,
        peer: SocketAddr,
        local: Option<SocketAddr>,
        listener: &'static str,
    ) -> Option<ConnGuard> {
        let local = local.map(|l| l.ip()).filter(|ip| !ip.is_unspecified());
        match self.acquire(peer.ip(), local) {
            Ok(guard) => Some(guard),
            Err(refusal) => {
                tracing::debug!(%peer, listener, %refusal, "connection refused");
                if let Some(observer) = &self.0.observer {
                    observer(refusal);
                }
                None
            }
        }
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.0.counts.lock().open
    }

    /// The caps.
    pub fn limits(&self) -> ConnLimits {
        self.0.limits
    }
}

/// One counted connection; dropping it uncounts it.
#[derive(Debug)]
pub struct ConnGuard {
    inner: Arc<Inner>,
    key: Option<AddrKey>,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        let mut counts = self.inner.counts.lock();
        // Each guard was counted once in `acquire`, so neither count can be zero here.
        counts.open = counts.open.saturating_sub(1);
        if let Some(key) = self.key {
            if let Some(count) = counts.by_addr.get_mut(&key) {
                *count -= 1;
                if *count == 0 {
                    counts.by_addr.remove(&key);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const LOCAL: &str = "10.0.0.1";

    #[test_case(3, 2, &["10.0.0.2", "10.0.0.2", "10.0.0.2"], &[true, true, false] ; "per address cap")]
    #[test_case(2, 2, &["10.0.0.2", "10.0.0.3", "10.0.0.4"], &[true, true, false] ; "global cap")]
    #[test_case(3, 1, &["10.0.0.1", "10.0.0.1", "10.0.0.1"], &[true, true, true] ; "this machine is exempt per address")]
    #[test_case(2, 1, &["10.0.0.1", "10.0.0.1", "10.0.0.1"], &[true, true, false] ; "but not from the global cap")]
    #[test_case(4, 1, &["::ffff:10.0.0.2", "10.0.0.2"], &[true, false] ; "mapped v6 counts as its v4")]
    #[test_case(4, 1, &["2001:db8::1", "2001:db8::2", "2001:db8:0:1::1"], &[true, false, true] ; "v6 counted per 64 prefix")]
    #[test_case(4, 1, &["127.0.0.2", "127.0.0.2"], &[true, false] ; "other loopback addresses count")]
    fn acquire_table(global: usize, per_ip: usize, peers: &[&str], admitted: &[bool]) {
        let limiter = ConnLimiter::new(ConnLimits::new(global, per_ip).unwrap());
        let mut guards = Vec::new();
        let got: Vec<bool> = peers
            .iter()
            .map(|peer| match limiter.acquire(ip(peer), Some(ip(LOCAL))) {
                Ok(guard) => {
                    guards.push(guard);
                    true
                }
                Err(_) => false,
            })
            .collect();
        assert_eq!(got, admitted);
        assert_eq!(limiter.open(), guards.len());
    }

    #[test]
    fn an_unknown_local_address_exempts_nobody() {
        let limiter = ConnLimiter::new(ConnLimits::new(4, 1).unwrap());
        let _a = limiter.acquire(ip("127.0.0.1"), None).unwrap();
        assert!(limiter.acquire(ip("127.0.0.1"), None).is_err());
        let peer = SocketAddr::from(([127, 0, 0, 1], 9));
        let unspecified = SocketAddr::from(([0, 0, 0, 0], 7));
        assert!(limiter.admit(peer, Some(unspecified), "test").is_none());
        let local = SocketAddr::from(([127, 0, 0, 1], 7));
        assert!(limiter.admit(peer, Some(local), "test").is_some());
    }

    #[test]
    fn the_observer_hears_each_refusal_of_admit() {
        let heard = Arc::new(Mutex::new(Vec::new()));
        let observer: RefusalObserver = {
            let heard = heard.clone();
            Arc::new(move |refusal: Refusal| heard.lock().push(refusal.cap()))
        };
        let limiter = ConnLimiter::observed(ConnLimits::new(2, 1).unwrap(), observer);
        let local = Some(SocketAddr::from(([10, 0, 0, 1], 7)));
        let from = |last: u8| SocketAddr::from(([10, 0, 0, last], 9));
        let _a = limiter.admit(from(2), local, "test").unwrap();
        assert!(limiter.admit(from(2), local, "test").is_none());
        let _b = limiter.admit(from(3), local, "test").unwrap();
        assert!(limiter.admit(from(4), local, "test").is_none());
        assert_eq!(*heard.lock(), ["per_ip", "global"]);
    }

    #[test]
    fn refusals_say_which_cap() {
        let limiter = ConnLimiter::new(ConnLimits::new(2, 1).unwrap());
        let _a = limiter.acquire(ip("10.0.0.2"), Some(ip(LOCAL))).unwrap();
        assert_eq!(
            limiter
                .acquire(ip("10.0.0.2"), Some(ip(LOCAL)))
                .unwrap_err(),
            Refusal::PerIp { max: 1 }
        );
        let _b = limiter.acquire(ip("10.0.0.3"), Some(ip(LOCAL))).unwrap();
        assert_eq!(
            limiter
                .acquire(ip("10.0.0.4"), Some(ip(LOCAL)))
                .unwrap_err(),
            Refusal::Global { max: 2 }
        );
    }

    #[test]
    fn dropping_a_guard_frees_its_slots_and_forgets_the_address() {
        let limiter = ConnLimiter::new(ConnLimits::new(2, 1).unwrap());
        let guard = limiter.acquire(ip("10.0.0.2"), Some(ip(LOCAL))).unwrap();
        assert!(limiter.acquire(ip("10.0.0.2"), Some(ip(LOCAL))).is_err());
        drop(guard);
        assert_eq!(limiter.open(), 0);
        assert!(limiter.0.counts.lock().by_addr.is_empty());
        let _again = limiter.acquire(ip("10.0.0.2"), Some(ip(LOCAL))).unwrap();
        assert_eq!(limiter.open(), 1);
    }

    #[test]
    fn a_refused_acquire_counts_nothing() {
        let limiter = ConnLimiter::new(ConnLimits::new(1, 1).unwrap());
        let _held = limiter.acquire(ip("10.0.0.2"), Some(ip(LOCAL))).unwrap();
        for _ in 0..10 {
            assert!(limiter.acquire(ip("10.0.0.3"), Some(ip(LOCAL))).is_err());
        }
        assert_eq!(limiter.open(), 1);
        assert_eq!(limiter.0.counts.lock().by_addr.len(), 1);
    }

    #[test_case(0, 0 ; "zero per address")]
    #[test_case(10, 11 ; "per address above global")]
    fn bad_limits_are_refused(global: usize, per_ip: usize) {
        assert!(ConnLimits::new(global, per_ip).is_err());
    }

    #[test]
    fn lowering_keeps_per_ip_within_global() {
        let limits = ConnLimits::new(100, 50).unwrap();
        assert_eq!(limits.lowered_to(20), ConnLimits::new(20, 20).unwrap());
        assert_eq!(limits.lowered_to(500), limits);
        assert_eq!(limits.lowered_to(0).global(), 1);
    }
}
