//! Builds a search index of 1,000,000 synthetic messages (100 channels, 1,000 senders, 12 words
//! each drawn from a Zipf vocabulary of 50,000 words) and times 2,400 queries of 12 kinds.
//!
//! Run with `cargo run --release -p proto --example search_index [WORDS_PER_MESSAGE]`.

use std::time::{Duration, Instant};

use proto::search::{Query, SearchIndex, MAX_HITS};

const MESSAGES: usize = 1_000_000;
const CHANNELS: usize = 100;
const SENDERS: usize = 1_000;
const VOCABULARY: usize = 50_000;
const QUERIES: usize = 2_400;

/// splitmix64: small, fast, deterministic.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Word of rank `rank`: two or three consonant-vowel syllables.
fn word(rank: usize) -> String {
    const CONSONANTS: &[u8] = b"bdfghjklmnprstvwzcqx";
    const VOWELS: &[u8] = b"aeiou";
    let syllable = |n: usize| {
        let n = n % 100;
        [CONSONANTS[n / 5] as char, VOWELS[n % 5] as char]
    };
    let mut out = String::new();
    out.extend(syllable(rank));
    out.extend(syllable(rank / 100));
    if rank >= 10_000 {
        out.extend(syllable(rank / 10_000));
    }
    out
}

struct Zipf {
    cumulative: Vec<f64>,
}

impl Zipf {
    fn new(n: usize) -> Self {
        let mut total = 0.0;
        let cumulative = (1..=n)
            .map(|rank| {
                total += 1.0 / rank as f64;
                total
            })
            .collect::<Vec<_>>();
        let cumulative = cumulative.into_iter().map(|c| c / total).collect();
        Zipf { cumulative }
    }

    fn sample(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.cumulative
            .partition_point(|&c| c < u)
            .min(self.cumulative.len() - 1)
    }
}

fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn message(rng: &mut Rng, zipf: &Zipf, words: &[String], count: usize, out: &mut String) {
    out.clear();
    for i in 0..count {
        if i > 0 {
            out.push(' ');
        }
        out.push_str(&words[zipf.sample(rng)]);
    }
}

const KINDS: [&str; 12] = [
    "rare word",
    "common word",
    "common + rare",
    "two common",
    "prefix (3 letters)",
    "rare + prefix",
    "from:user",
    "in:channel + word",
    "word, admits half",
    "common, admits none",
    "2-letter prefix + common, admits none",
    "prefix + two common, admits none",
];

fn main() {
    let per_message: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(12);
    let words: Vec<String> = (0..VOCABULARY).map(word).collect();
    let zipf = Zipf::new(VOCABULARY);
    let channel_names: Vec<String> = (0..CHANNELS).map(|c| format!("chan{c}")).collect();
    let sender_names: Vec<String> = (0..SENDERS).map(|s| format!("user{s}")).collect();

    // The cost of generating the texts alone, to subtract from the build.
    let mut rng = Rng(42);
    let mut text = String::new();
    let started = Instant::now();
    let mut bytes = 0;
    for _ in 0..MESSAGES {
        rng.below(CHANNELS);
        rng.below(SENDERS);
        message(&mut rng, &zipf, &words, per_message, &mut text);
        bytes += text.len();
    }
    let generation = started.elapsed();

    let rss_before = rss_kib();
    let mut rng = Rng(42);
    let mut index = SearchIndex::new();
    let mut next_seq = vec![0u64; CHANNELS];
    let started = Instant::now();
    for _ in 0..MESSAGES {
        let channel = rng.below(CHANNELS);
        let sender = rng.below(SENDERS);
        message(&mut rng, &zipf, &words, per_message, &mut text);
        index.insert(
            &channel_names[channel],
            next_seq[channel],
            &sender_names[sender],
            &text,
        );
        next_seq[channel] += 1;
    }
    let build = started.elapsed().saturating_sub(generation);
    let rss_after = rss_kib();
    println!(
        "built {} messages ({} MB of text) in {:.2} s ({:.2} µs/message); text generation {:.2} s excluded",
        index.len(),
        bytes / 1_000_000,
        build.as_secs_f64(),
        build.as_secs_f64() * 1e6 / MESSAGES as f64,
        generation.as_secs_f64(),
    );
    println!(
        "heap_bytes() = {:.1} MB; RSS grew by {:.1} MB ({} bytes/message by heap_bytes)",
        index.heap_bytes() as f64 / 1e6,
        (rss_after.saturating_sub(rss_before)) as f64 * 1024.0 / 1e6,
        index.heap_bytes() / MESSAGES,
    );

    let mut timings: Vec<Vec<Duration>> = vec![Vec::new(); KINDS.len()];
    let mut hit_counts = vec![0usize; KINDS.len()];
    let mut truncated = vec![0usize; KINDS.len()];
    let mut rng = Rng(7);
    let in_range = |rng: &mut Rng, low: usize, high: usize| low + rng.below(high - low);
    for i in 0..QUERIES {
        let kind = i % KINDS.len();
        let text = match kind {
            0 => words[in_range(&mut rng, 10_000, VOCABULARY)].clone(),
            1 => words[rng.below(20)].clone(),
            2 => format!(
                "{} {}",
                words[rng.below(20)],
                words[in_range(&mut rng, 10_000, VOCABULARY)]
            ),
            3 => format!("{} {}", words[rng.below(50)], words[rng.below(50)]),
            4 => format!("{}*", &words[zipf.sample(&mut rng)][..3]),
            5 => format!(
                "{} {}*",
                words[in_range(&mut rng, 10_000, VOCABULARY)],
                &words[zipf.sample(&mut rng)][..3]
            ),
            6 => format!("from:{}", sender_names[rng.below(SENDERS)]),
            7 => format!(
                "in:#{} {}",
                channel_names[rng.below(CHANNELS)],
                words[in_range(&mut rng, 100, 2_000)]
            ),
            8 | 9 => words[zipf.sample(&mut rng).min(999)].clone(),
            10 => format!(
                "{}* {}",
                &words[zipf.sample(&mut rng)][..2],
                words[rng.below(5)]
            ),
            11 => format!(
                "{}* {} {}",
                &words[zipf.sample(&mut rng)][..3],
                words[rng.below(5)],
                words[rng.below(5)]
            ),
            _ => unreachable!(),
        };
        let query = Query::parse(&text).expect("bench queries parse");
        let started = Instant::now();
        let page = match kind {
            8 => index.query(
                &query,
                |c| c.as_bytes().last().is_some_and(|b| b % 2 == 0),
                MAX_HITS,
            ),
            9..=11 => index.query(&query, |_| false, MAX_HITS),
            _ => index.query(&query, |_| true, MAX_HITS),
        };
        timings[kind].push(started.elapsed());
        hit_counts[kind] += page.hits.len();
        truncated[kind] += usize::from(page.truncated);
    }
    println!(
        "{:<38} {:>5} {:>9} {:>9} {:>9} {:>9} {:>6}",
        "kind (limit 100)", "n", "p50 ms", "p99 ms", "max ms", "avg hits", "trunc"
    );
    for (kind, times) in timings.iter_mut().enumerate() {
        times.sort();
        let at = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        println!(
            "{:<38} {:>5} {:>9.3} {:>9.3} {:>9.3} {:>9.1} {:>6}",
            KINDS[kind],
            times.len(),
            ms(at(0.5)),
            ms(at(0.99)),
            ms(at(1.0)),
            hit_counts[kind] as f64 / times.len() as f64,
            truncated[kind],
        );
    }

    // Retention trims 30% of every channel: the trim that pushes dead documents past a
    // quarter of all triggers the compaction.
    let mut slowest = Duration::ZERO;
    let started = Instant::now();
    for (channel, name) in channel_names.iter().enumerate() {
        let t = Instant::now();
        index.trim(name, next_seq[channel] * 3 / 10);
        slowest = slowest.max(t.elapsed());
    }
    println!(
        "trimmed 30% of each channel in {:.1} ms (slowest call, with the compaction: {:.1} ms); {} live, heap_bytes() = {:.1} MB",
        started.elapsed().as_secs_f64() * 1e3,
        slowest.as_secs_f64() * 1e3,
        index.len(),
        index.heap_bytes() as f64 / 1e6,
    );

    drop(index);

    // A worst case for a prefix term that is not the driver: a common word and a prefix whose
    // 128 tokens together are commoner still but never occur with it, so every candidate is
    // tested against all 128 lists and none matches.
    let mut index = SearchIndex::new();
    let mut rng = Rng(9);
    for seq in 0..600_000u64 {
        let text = if seq % 12 < 5 {
            format!("alpha {}", words[in_range(&mut rng, 1_000, VOCABULARY)])
        } else {
            format!(
                "zz{:03} {}",
                rng.below(128),
                words[in_range(&mut rng, 1_000, VOCABULARY)]
            )
        };
        index.insert("c", seq, "u", &text);
    }
    let query = Query::parse("alpha zz*").expect("parses");
    let mut times: Vec<Duration> = (0..20)
        .map(|_| {
            let started = Instant::now();
            let page = index.query(&query, |_| true, MAX_HITS);
            assert!(page.hits.is_empty() && page.truncated);
            started.elapsed()
        })
        .collect();
    times.sort();
    println!(
        "disjoint prefix check (250k-doc word, 128-token prefix over 350k docs): median {:.2} ms, max {:.2} ms",
        times[10].as_secs_f64() * 1e3,
        times[19].as_secs_f64() * 1e3,
    );
}
