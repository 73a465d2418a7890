//! The process's open-file limit and the listeners' connection caps that must fit in it.
//!
//! Every connection holds a file descriptor, and so do RocksDB's files and the log's segments.
//! The default soft limit (1024 on most Linux systems) is far below the default client cap, so
//! the node raises its soft limit to the hard limit at start. If the caps still do not fit
//! beside [`STORAGE_FD_RESERVE`], they are lowered with a warning: a node that refuses
//! connections at its cap keeps working, one that runs out of descriptors fails its storage.

use crate::conn_limit::ConnLimits;

/// Descriptors kept free of connections for storage (RocksDB's SST and log files, WAL
/// segments, snapshot files), listeners and the runtime.
pub const STORAGE_FD_RESERVE: u64 = 1024;

/// Descriptors for the metrics listener's connections (its own cap, see `metrics.rs`).
pub const METRICS_FDS: u64 = crate::metrics::METRICS_CONNECTIONS_MAX as u64;

/// The limit asked for when the hard limit is unlimited: Linux refuses more than `nr_open`,
/// whose default is this.
const UNLIMITED_TARGET: u64 = 1 << 20;

/// Raises the soft open-file limit to the hard limit and returns the soft limit now in force
/// (the old one when raising failed, with a warning).
pub fn raise_nofile_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let old = getrlimit(Resource::Nofile);
    let current = old.current.unwrap_or(u64::MAX);
    let target = old.maximum.unwrap_or(UNLIMITED_TARGET);
    if current >= target {
        return current;
    }
    let new = Rlimit {
        current: Some(target),
        maximum: old.maximum,
    };
    match setrlimit(Resource::Nofile, new) {
        Ok(()) => {
            tracing::info!(from = current, to = target, "raised the open-file limit");
            target
        }
        Err(e) => {
            tracing::warn!(error = %e, limit = current, "cannot raise the open-file limit");
            current
        }
    }
}

/// The client and Raft caps lowered, if needed, so that both listeners' connections, the
/// metrics listener's and [`STORAGE_FD_RESERVE`] fit in `fd_limit` descriptors. The Raft
/// listener keeps its cap up to a quarter of what is left, since the cluster needs it; the
/// clients get the rest.
pub fn fit_caps(fd_limit: u64, client: ConnLimits, raft: ConnLimits) -> (ConnLimits, ConnLimits) {
    let free = fd_limit.saturating_sub(STORAGE_FD_RESERVE + METRICS_FDS);
    let free = usize::try_from(free).unwrap_or(usize::MAX);
    if client.global().saturating_add(raft.global()) <= free {
        return (client, raft);
    }
    let raft = raft.lowered_to(raft.global().min(free / 4));
    let client = client.lowered_to(free.saturating_sub(raft.global()));
    (client, raft)
}

/// [`raise_nofile_limit`], then [`fit_caps`] with a warning for each cap it lowered.
pub fn fit_caps_to_process(client: ConnLimits, raft: ConnLimits) -> (ConnLimits, ConnLimits) {
    let fd_limit = raise_nofile_limit();
    let (fitted_client, fitted_raft) = fit_caps(fd_limit, client, raft);
    for (what, asked, fitted) in [
        ("client", client, fitted_client),
        ("raft", raft, fitted_raft),
    ] {
        if asked != fitted {
            tracing::warn!(
                listener = what,
                asked = asked.global(),
                cap = fitted.global(),
                per_ip = fitted.per_ip(),
                fd_limit,
                reserve = STORAGE_FD_RESERVE,
                "lowered the connection cap to fit the open-file limit; raise the hard limit \
                 (ulimit -Hn, systemd LimitNOFILE) to allow more"
            );
        }
    }
    (fitted_client, fitted_raft)
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    fn limits(global: usize, per_ip: usize) -> ConnLimits {
        ConnLimits::new(global, per_ip).unwrap()
    }

    const OVERHEAD: u64 = STORAGE_FD_RESERVE + METRICS_FDS;

    #[test_case(1 << 20, (20_000, 256), (1024, 64) ; "plenty: unchanged")]
    #[test_case(OVERHEAD + 21_024, (20_000, 256), (1024, 64) ; "exactly enough: unchanged")]
    #[test_case(OVERHEAD + 21_023, (19_999, 256), (1024, 64) ; "one short: clients give one")]
    #[test_case(OVERHEAD + 2_000, (1_500, 256), (500, 64) ; "raft keeps a quarter")]
    #[test_case(OVERHEAD + 100, (75, 75), (25, 25) ; "per address follows the global cap")]
    #[test_case(1024, (1, 1), (1, 1) ; "less than the reserve: one each")]
    fn caps_fit_the_limit(fd_limit: u64, client: (usize, usize), raft: (usize, usize)) {
        let (c, r) = fit_caps(fd_limit, limits(20_000, 256), limits(1024, 64));
        assert_eq!((c.global(), c.per_ip()), client);
        assert_eq!((r.global(), r.per_ip()), raft);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        use rustix::process::{getrlimit, Resource};
        let now = raise_nofile_limit();
        let after = getrlimit(Resource::Nofile);
        assert_eq!(after.current, Some(now));
        if let Some(hard) = after.maximum {
            assert_eq!(now, hard);
        }
    }
}
