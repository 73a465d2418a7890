//! `Canary`: how fast this machine runs two fixed pieces of work, sampled through a measured
//! window.
//!
//! On a shared VM a CPU-second is not a fixed amount of work: the same build's CPU time per
//! message can differ by half between runs a few minutes apart while the work per message does
//! not. The canary times a compute unit (a sort that stays in the core's own caches) and a
//! memory unit (loads that miss every cache) in its own thread's CPU time, so being preempted
//! does not count, every [`PERIOD`]; the window's medians record the machine's phase beside
//! each run's figures. The system under test loads the same machine and moves them too, so
//! they are a record to read runs by, not a divisor.

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};
use std::thread::JoinHandle;
use std::time::Duration;

use rustix::time::{clock_gettime, ClockId};

/// Time between two samples: the canary takes under 1 % of one core.
const PERIOD: Duration = Duration::from_millis(100);

/// Values sorted per compute unit: about a hundred microseconds of branchy work over 64 KiB.
const UNIT_VALUES: usize = 8192;

/// Words in the memory unit's table: 64 MiB, twice this VM kind's L3, so its loads miss every
/// cache and time the memory system.
const MEMORY_WORDS: usize = 8 << 20;

/// Dependent loads per memory unit.
const MEMORY_LOADS: usize = 2048;

/// The canary's samples once stopped.
#[derive(Debug, Clone, PartialEq)]
pub struct CanaryReport {
    /// Median CPU microseconds of one unit; `None` when no unit completed.
    pub unit_us: Option<f64>,
    /// Median CPU microseconds of one memory unit (dependent loads that miss the caches).
    pub memory_us: Option<f64>,
    /// Units timed.
    pub units: usize,
    /// CPU the canary's thread used, to take out of the harness's own.
    pub cpu: Duration,
}

/// A running canary; [`Canary::stop`] ends it.
pub struct Canary {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<CanaryReport>,
}

impl Canary {
    /// Starts timing units on a thread of its own.
    pub fn start() -> Canary {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("bench-canary".to_owned())
            .spawn(move || sample(&flag))
            .expect("spawning the canary thread");
        Canary { stop, thread }
    }

    /// Stops sampling and returns the window's samples.
    pub fn stop(self) -> CanaryReport {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        self.thread
            .join()
            .expect("the canary thread does not panic")
    }
}

fn sample(stop: &AtomicBool) -> CanaryReport {
    let started = thread_cpu();
    let mut values = vec![0u64; UNIT_VALUES];
    let table = &*MEMORY_TABLE;
    let mut times = Vec::new();
    let mut memory_times = Vec::new();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    while !stop.load(Ordering::Relaxed) {
        let before = thread_cpu();
        seed = black_box(unit(&mut values, seed));
        let between = thread_cpu();
        seed = black_box(memory_unit(table, seed));
        let after = thread_cpu();
        times.push((between - before).as_secs_f64() * 1e6);
        memory_times.push((after - between).as_secs_f64() * 1e6);
        std::thread::park_timeout(PERIOD);
    }
    CanaryReport {
        unit_us: median(&mut times),
        memory_us: median(&mut memory_times),
        units: times.len(),
        cpu: thread_cpu() - started,
    }
}

/// One unit: fills `values` from a xorshift generator and sorts them. The same work every
/// time (the seed only changes which values, not how many), and nothing the optimiser can drop.
fn unit(values: &mut [u64], seed: u64) -> u64 {
    let mut x = seed | 1;
    for value in values.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *value = x;
    }
    values.sort_unstable();
    values[values.len() / 2] ^ x
}

/// The memory unit's table, every word written so that its pages are real; built once per
/// process, by the first canary, whose CPU is left out of the harness's.
static MEMORY_TABLE: LazyLock<Vec<u64>> = LazyLock::new(memory_table);

fn memory_table() -> Vec<u64> {
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    (0..MEMORY_WORDS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// One memory unit: a chain of loads, each at an address derived from the last word read.
fn memory_unit(table: &[u64], seed: u64) -> u64 {
    let mask = table.len() as u64 - 1;
    let mut at = seed & mask;
    for _ in 0..MEMORY_LOADS {
        at = (table[usize::try_from(at).unwrap_or(0)] ^ at.rotate_left(17)) & mask;
    }
    at
}

fn median(times: &mut [f64]) -> Option<f64> {
    if times.is_empty() {
        return None;
    }
    times.sort_by(f64::total_cmp);
    Some(times[times.len() / 2])
}

/// This thread's CPU time so far.
fn thread_cpu() -> Duration {
    let now = clock_gettime(ClockId::ThreadCPUTime);
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or(0),
        u32::try_from(now.tv_nsec).unwrap_or(0),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_yields_units_and_their_median() {
        let canary = Canary::start();
        std::thread::sleep(PERIOD * 4);
        let report = canary.stop();
        assert!(report.units >= 2, "{report:?}");
        let unit = report.unit_us.expect("units completed");
        assert!(unit > 0.0, "{report:?}");
        assert!(report.memory_us.is_some_and(|m| m > 0.0), "{report:?}");
        assert!(
            report.cpu.as_secs_f64() * 1e6 >= unit,
            "the thread's CPU includes every unit: {report:?}"
        );
    }

    #[test]
    fn a_unit_is_the_same_work_whatever_the_seed() {
        let mut values = vec![0u64; UNIT_VALUES];
        let a = unit(&mut values, 1);
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "sorted");
        let b = unit(&mut values, 2);
        assert_ne!(a, b, "the seed changes the values");
        let table: Vec<u64> = (0..1024).map(|i| i * 7919).collect();
        assert_eq!(
            memory_unit(&table, 5),
            memory_unit(&table, 5),
            "the same chain for the same seed"
        );
        assert_eq!(median(&mut []), None);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), Some(2.0));
    }
}
