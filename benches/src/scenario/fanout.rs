//! `fanout`: publishers at a fixed total rate, S subscribers of the same topic spread over the
//! nodes; send-to-delivery latency, and what went missing or arrived twice.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;

use super::{
    connect_subscribers, connect_writers, micros_at, now_micros, read_stamp, stamped_body,
    timed_bar, CpuMeter,
};
use crate::stats::{Latencies, RunResult};
use crate::sut::System;

/// What one `fanout` run does.
#[derive(Debug, Clone)]
pub struct FanoutOptions {
    /// Publishers; the rate is split evenly among them.
    pub publishers: usize,
    /// Subscribers of the topic.
    pub subscribers: usize,
    /// Messages per second, all publishers together.
    pub rate: f64,
    /// Publishing time.
    pub duration: Duration,
    /// Deliveries of messages sent in the first `warmup` are counted but not timed.
    pub warmup: Duration,
    /// Body size in bytes (at least the stamp's 48).
    pub body: usize,
    /// How long subscribers may take to catch up after the last send.
    pub drain: Duration,
    /// Topic name; a fresh one per run keeps runs apart.
    pub topic: String,
}

/// What one publisher did.
struct PublisherTally {
    errors: u64,
    /// Send-to-ack of each timed message.
    acks: Latencies,
    /// How far behind its schedule it started a send after the warm-up, at worst.
    behind_max: Duration,
}

/// What one subscriber saw.
struct SubscriberTally {
    latencies: Latencies,
    /// Received flags by (publisher, counter): `seen[publisher][counter]`.
    seen: Vec<Vec<bool>>,
    duplicates: u64,
    errors: u64,
}

/// Runs `fanout` once.
///
/// # Errors
/// Publishers or subscribers could not connect.
pub async fn run(system: &dyn System, options: &FanoutOptions) -> Result<RunResult> {
    let subscribers = connect_subscribers(system, options.subscribers, &options.topic).await?;
    let publishers = connect_writers(system, options.publishers.max(1)).await?;
    let publisher_count = publishers.len();
    let per_publisher_rate = options.rate / publisher_count as f64;
    let per_publisher = (per_publisher_rate * options.duration.as_secs_f64()).ceil() as u64;
    let warmup_micros = u64::try_from(options.warmup.as_micros()).unwrap_or(u64::MAX);
    let sent_total = Arc::new(AtomicU64::new(0));
    let publishing_done = Arc::new(AtomicBool::new(false));
    let measure_from = now_micros() + warmup_micros;

    let mut subscriber_tasks = Vec::new();
    for mut subscriber in subscribers {
        let sent_total = sent_total.clone();
        let publishing_done = publishing_done.clone();
        let drain = options.drain;
        subscriber_tasks.push(tokio::spawn(async move {
            let mut tally = SubscriberTally {
                latencies: Latencies::new(),
                seen: vec![vec![false; per_publisher as usize]; publisher_count],
                duplicates: 0,
                errors: 0,
            };
            let mut received = 0u64;
            let mut drain_deadline: Option<tokio::time::Instant> = None;
            loop {
                if publishing_done.load(Ordering::Acquire) {
                    if received >= sent_total.load(Ordering::Acquire) {
                        break;
                    }
                    let deadline =
                        *drain_deadline.get_or_insert_with(|| tokio::time::Instant::now() + drain);
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                }
                let next =
                    tokio::time::timeout(Duration::from_millis(200), subscriber.next()).await;
                let body = match next {
                    Err(_) => continue,
                    Ok(Err(_)) => {
                        tally.errors += 1;
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                    Ok(Ok(body)) => body,
                };
                let arrived = now_micros();
                let Some((publisher, counter, sent)) = read_stamp(&body) else {
                    continue;
                };
                let Some(slot) = tally
                    .seen
                    .get_mut(publisher as usize)
                    .and_then(|s| s.get_mut(counter as usize))
                else {
                    continue;
                };
                if *slot {
                    tally.duplicates += 1;
                    continue;
                }
                *slot = true;
                received += 1;
                if sent >= measure_from {
                    tally
                        .latencies
                        .record(Duration::from_micros(arrived.saturating_sub(sent)));
                }
            }
            (tally, subscriber)
        }));
    }

    let bar = timed_bar(
        options.duration,
        &format!("{} fanout x{}", system.kind(), options.subscribers),
    );
    let started = Instant::now();
    let cpu = CpuMeter::start(system);
    let mut publisher_tasks = Vec::new();
    for (index, mut writer) in publishers.into_iter().enumerate() {
        let sent_total = sent_total.clone();
        let topic = options.topic.clone();
        let body_size = options.body;
        let interval = Duration::from_secs_f64(1.0 / per_publisher_rate);
        let duration = options.duration;
        // Publishers start evenly staggered within one interval.
        let offset = interval.mul_f64(index as f64 / publisher_count as f64);
        publisher_tasks.push(tokio::spawn(async move {
            let mut tally = PublisherTally {
                errors: 0,
                acks: Latencies::new(),
                behind_max: Duration::ZERO,
            };
            let start = Instant::now() + offset;
            let window_end = start + duration;
            for counter in 0..per_publisher {
                // Fixed schedule: a late send goes at once, the next keeps its own slot,
                // and nothing is sent after the window, so a publisher that fell behind
                // sends fewer (`sent_per_s` below the rate, `publisher_behind_ms_max`).
                // Latency runs from the actual send: one serial publisher's own backlog is
                // not the system's delivery latency, and shows in those two figures.
                let due = start + interval.mul_f64(counter as f64);
                if due >= window_end || Instant::now() >= window_end {
                    break;
                }
                tokio::time::sleep_until(due.into()).await;
                let sending = Instant::now();
                let sent_micros = micros_at(sending);
                // Warm-up sends (the first one also dials and logs in) are not judged.
                let timed = sent_micros >= measure_from;
                if timed {
                    tally.behind_max = tally.behind_max.max(sending.saturating_duration_since(due));
                }
                let body = stamped_body(body_size, index as u32, counter, sent_micros);
                match writer.write(&topic, body).await {
                    Ok(()) => {
                        sent_total.fetch_add(1, Ordering::AcqRel);
                        if timed {
                            tally.acks.record(sending.elapsed());
                        }
                    }
                    Err(_) => tally.errors += 1,
                }
            }
            (tally, writer)
        }));
    }
    let mut publish_errors = 0;
    let mut acks = Latencies::new();
    let mut behind_max = Duration::ZERO;
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                bar.set_position(started.elapsed().as_secs());
            }
        })
    };
    let mut publishers_done = Vec::with_capacity(publisher_tasks.len());
    for task in publisher_tasks {
        let (tally, writer) = task.await?;
        publishers_done.push(writer);
        publish_errors += tally.errors;
        acks.merge(&tally.acks);
        behind_max = behind_max.max(tally.behind_max);
    }
    let publish_time = started.elapsed();
    publishing_done.store(true, Ordering::Release);
    ticker.abort();
    bar.finish_and_clear();

    let sent = sent_total.load(Ordering::Acquire);
    let mut latencies = Latencies::new();
    let (mut delivered, mut duplicates, mut subscriber_errors) = (0u64, 0u64, 0u64);
    // Subscribers and publishers are dropped only once all subscribers are done: one closing
    // its connections would otherwise compete with the last deliveries to the others.
    let mut finished = Vec::with_capacity(subscriber_tasks.len());
    for task in subscriber_tasks {
        let (tally, subscriber) = task.await?;
        finished.push(subscriber);
        latencies.merge(&tally.latencies);
        delivered += tally.seen.iter().flatten().filter(|s| **s).count() as u64;
        duplicates += tally.duplicates;
        subscriber_errors += tally.errors;
    }
    let expected = sent * options.subscribers as u64;
    let mut result = RunResult::new("fanout", system.kind().name(), system.node_count());
    // Per message sent, each with its deliveries to every subscriber.
    cpu.finish(&mut result, sent);
    result.clients = publisher_count;
    result.subscribers = options.subscribers;
    result.rate_per_s = options.rate;
    result.body_bytes = options.body;
    result.duration_s = publish_time.as_secs_f64();
    result.ops = delivered;
    result.errors = publish_errors + subscriber_errors;
    result.throughput_per_s = delivered as f64 / publish_time.as_secs_f64();
    result.latency_ms = latencies.summary();
    // A message whose send failed may still have been written; only acknowledged sends are
    // expected, so such a message can only show up as extra, never as missing.
    result.missing = Some(expected.saturating_sub(delivered));
    result.duplicates = Some(duplicates);
    result.set("sent", sent);
    result.set("publish_errors", publish_errors);
    // Send-to-ack, the publisher's own wait: the rest of send-to-delivery is delivery.
    let acks = acks.summary();
    result.set("ack_p50_ms", acks.p50);
    result.set("ack_p99_ms", acks.p99);
    result.set("ack_max_ms", acks.max);
    // The rate the publishers kept up (below `rate_per_s` when the system fell behind).
    result.set("sent_per_s", sent as f64 / publish_time.as_secs_f64());
    result.set("publisher_behind_ms_max", behind_max.as_secs_f64() * 1e3);
    result.set("subscriber_errors", subscriber_errors);
    Ok(result)
}
