//! Deadlines of one client RPC connection: `hello` within [`HELLO_TIMEOUT`], and then never
//! longer than the idle timeout without a request in flight.
//!
//! A connection costs a descriptor and buffers whether or not its peer ever speaks, so one
//! that never says hello, or stops using a connection it no longer needs, must not hold them.
//! The `ChatServer` of the connection records its hello and each request in an [`Activity`];
//! [`serve_watched`] runs the connection's serving future against a watchdog that reads it, and
//! closes the connection (drops the future, and with it the socket) when a deadline passes. An
//! open long poll is a request in flight, so a client waiting for messages is never idle.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// How long a new tarpc connection may take to complete `hello`, counted from when it is
/// served as tarpc (at most the route peek's timeout after accept). A real client says hello
/// in its first round trip, so this only ends connections that have nothing to say.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(5);

/// What one connection has done, written by its requests and read by its watchdog.
#[derive(Debug)]
pub struct Activity {
    start: Instant,
    hello: AtomicBool,
    in_flight: AtomicUsize,
    /// When a request last started or ended, in ms since `start`.
    last_ms: AtomicU64,
}

/// One request in flight; see [`Activity::busy`].
pub struct Busy(Arc<Activity>);

impl Activity {
    /// A connection that starts now.
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            start: Instant::now(),
            hello: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
        })
    }

    /// Records a completed `hello`.
    pub fn hello_done(&self) {
        self.hello.store(true, Ordering::Relaxed);
    }

    /// Records a request that runs until the returned guard is dropped.
    pub fn busy(self: &Arc<Self>) -> Busy {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.touch();
        Busy(self.clone())
    }

    fn touch(&self) {
        let ms = self.start.elapsed().as_millis();
        self.last_ms
            .fetch_max(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn state(&self) -> State {
        State {
            hello: self.hello.load(Ordering::Relaxed),
            in_flight: self.in_flight.load(Ordering::Relaxed),
            last: Duration::from_millis(self.last_ms.load(Ordering::Relaxed)),
        }
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A snapshot of an [`Activity`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct State {
    hello: bool,
    in_flight: usize,
    /// When a request last started or ended, since the connection started.
    last: Duration,
}

/// Why a connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// No `hello` within [`HELLO_TIMEOUT`].
    NoHello,
    /// No request in flight for the idle timeout.
    Idle,
}

impl CloseReason {
    fn as_str(self) -> &'static str {
        match self {
            CloseReason::NoHello => "no hello in time",
            CloseReason::Idle => "idle",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Look again after this long.
    Keep(Duration),
    Close(CloseReason),
}

/// The rule: `elapsed` since the connection started, in `state`, with `idle` as the idle
/// timeout.
fn verdict(state: State, elapsed: Duration, idle: Duration) -> Verdict {
    if !state.hello {
        return match HELLO_TIMEOUT.checked_sub(elapsed) {
            Some(left) if !left.is_zero() => Verdict::Keep(left),
            _ => Verdict::Close(CloseReason::NoHello),
        };
    }
    if state.in_flight > 0 {
        return Verdict::Keep(idle);
    }
    let quiet = elapsed.saturating_sub(state.last);
    match idle.checked_sub(quiet) {
        Some(left) if !left.is_zero() => Verdict::Keep(left),
        _ => Verdict::Close(CloseReason::Idle),
    }
}

/// Resolves when `activity` breaks a deadline, with the reason.
async fn watchdog(activity: &Activity, idle: Duration) -> CloseReason {
    loop {
        match verdict(activity.state(), activity.start.elapsed(), idle) {
            Verdict::Keep(wait) => tokio::time::sleep(wait).await,
            Verdict::Close(reason) => return reason,
        }
    }
}

/// What a connection's watchdog needs: its activity and its idle timeout.
#[derive(Debug, Clone)]
pub struct ConnWatch {
    pub activity: Arc<Activity>,
    pub idle: Duration,
}

/// Runs `serving` (one connection's tarpc serving future) until it ends or the connection
/// breaks a deadline of `watch`; then `serving` is dropped, which closes the connection.
pub async fn serve_watched(watch: ConnWatch, peer: SocketAddr, serving: impl Future<Output = ()>) {
    tokio::select! {
        () = serving => {}
        reason = watchdog(&watch.activity, watch.idle) => {
            tracing::debug!(%peer, reason = reason.as_str(), "closing client connection");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use test_case::test_case;

    const IDLE: Duration = Duration::from_secs(600);

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    fn state(hello: bool, in_flight: usize, last: u64) -> State {
        State {
            hello,
            in_flight,
            last: s(last),
        }
    }

    #[test_case(state(false, 0, 0), 0, Verdict::Keep(HELLO_TIMEOUT) ; "fresh")]
    #[test_case(state(false, 1, 4), 4, Verdict::Keep(s(1)) ; "requests without hello do not extend it")]
    #[test_case(state(false, 0, 0), 5, Verdict::Close(CloseReason::NoHello) ; "no hello at the deadline")]
    #[test_case(state(true, 0, 1), 5, Verdict::Keep(s(596)) ; "hello in time")]
    #[test_case(state(true, 0, 10), 610, Verdict::Close(CloseReason::Idle) ; "idle for the timeout")]
    #[test_case(state(true, 0, 10), 609, Verdict::Keep(s(1)) ; "just short of idle")]
    #[test_case(state(true, 1, 10), 10_000, Verdict::Keep(IDLE) ; "a long poll in flight is not idle")]
    fn verdict_table(state: State, elapsed: u64, expected: Verdict) {
        assert_eq!(verdict(state, s(elapsed), IDLE), expected);
    }

    async fn run_until_closed(activity: Arc<Activity>, idle: Duration) -> Duration {
        let start = Instant::now();
        let watch = ConnWatch { activity, idle };
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        serve_watched(watch, peer, std::future::pending()).await;
        start.elapsed()
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_connection_is_closed_after_the_hello_timeout() {
        let closed_after = run_until_closed(Activity::new(), IDLE).await;
        assert_eq!(closed_after, HELLO_TIMEOUT);
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_poll_keeps_a_connection_past_the_idle_timeout() {
        let activity = Activity::new();
        activity.hello_done();
        let poll = activity.busy();
        let idle = s(60);
        let closer = tokio::spawn(run_until_closed(activity.clone(), idle));
        tokio::time::sleep(s(300)).await;
        assert!(
            !closer.is_finished(),
            "closed while a request was in flight"
        );
        drop(poll);
        let closed_after = closer.await.unwrap();
        assert_eq!(closed_after, s(300) + idle);
    }

    #[tokio::test(start_paused = true)]
    async fn serving_that_ends_first_ends_the_watch() {
        let activity = Activity::new();
        let watch = ConnWatch {
            activity,
            idle: IDLE,
        };
        let peer = SocketAddr::from(([127, 0, 0, 1], 1));
        let start = Instant::now();
        serve_watched(watch, peer, tokio::time::sleep(s(1))).await;
        assert_eq!(start.elapsed(), s(1));
    }
}
