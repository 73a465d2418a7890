//! Fault schedules derived from the seed, and the disk faults on a stopped node's WAL.
//!
//! The schedule is a list of [`Event`]s fixed before the cluster starts: same seed, same
//! options, same schedule. Only "the leader" is resolved at run time. Faults never overlap:
//! each one is healed before the next starts (see README for why).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context as _};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// One kind of fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fault {
    /// kill -9, pause, restart in the same data dir.
    Kill,
    /// SIGSTOP, pause, SIGCONT.
    Pause,
    /// Stop a follower, flip one bit in a frame that is not the log's tail, restart: it must
    /// refuse to start, naming file and offset; it then stays down.
    Bitflip,
    /// Stop a follower, cut bytes off the newest segment's last frame, restart: it must start.
    Truncate,
    /// iptables DROP between groups of nodes (netns mode).
    Partition,
    /// Random incoming packet loss on some nodes (netns mode).
    Loss,
    /// SIGSTOP a majority of the nodes, never the leader (on 3 nodes: both followers), for
    /// longer than a client's send deadline, then SIGCONT: the leader cannot commit, sends
    /// time out and are retried, and the entries they left commit after the resume.
    PauseMajority,
    /// Delay every byte into one node, both directions, by 20-150 ms (user-space proxies in
    /// front of every node; loopback mode).
    Latency,
    /// Remove a follower from the membership (`server remove-node`), keep it running outside
    /// the cluster for 0.5-1 interval, then restart it: it asks to join again (learner, then
    /// promoted back to voter).
    Membership,
    /// Every node at once loses what it had not fsync'd and dies (server `--weaken
    /// faulty-fs`, which the runner adds), then all restart: a power failure of the machine.
    PowerFail,
}

impl Fault {
    /// Every fault, in priority order.
    pub const ALL: [Fault; 10] = [
        Fault::Kill,
        Fault::Pause,
        Fault::PauseMajority,
        Fault::Latency,
        Fault::Membership,
        Fault::Bitflip,
        Fault::Truncate,
        Fault::Partition,
        Fault::Loss,
        Fault::PowerFail,
    ];

    /// The CLI spelling.
    pub fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill",
            Fault::Pause => "pause",
            Fault::PauseMajority => "pause-majority",
            Fault::Latency => "latency",
            Fault::Membership => "membership",
            Fault::Bitflip => "bitflip",
            Fault::Truncate => "truncate",
            Fault::Partition => "partition",
            Fault::Loss => "loss",
            Fault::PowerFail => "power-fail",
        }
    }

    /// Parses a CLI name.
    ///
    /// # Errors
    /// Unknown name.
    pub fn parse(s: &str) -> anyhow::Result<Fault> {
        Fault::ALL
            .into_iter()
            .find(|f| f.name() == s)
            .with_context(|| {
                let names: Vec<&str> = Fault::ALL.iter().map(|f| f.name()).collect();
                format!("unknown nemesis {s:?}; known: {}", names.join(","))
            })
    }

    /// Whether it needs netns mode.
    pub fn needs_netns(self) -> bool {
        matches!(self, Fault::Partition | Fault::Loss)
    }
}

/// One scheduled fault.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Start, from the start of the workload.
    pub at: Duration,
    /// How long it lasts before it is healed (for disk faults: how long the node stays down
    /// before the restart attempt).
    pub duration: Duration,
    /// What.
    pub fault: Fault,
    /// Kill/pause: target the leader (resolved at run time) instead of `node`.
    pub leader: bool,
    /// The target node (0-based); disk faults move to a live follower at run time if needed.
    pub node: usize,
    /// Partition: its shape (`one`, `halves`, `bridge`, `ring`); loss: `loss`.
    pub kind: &'static str,
    /// Partition and loss: for each node, the nodes it drops packets from.
    pub grudge: Vec<Vec<usize>>,
    /// Loss: the drop probability.
    pub probability: f64,
    /// Random bits for choosing a frame, byte and bit (disk faults).
    pub pick: u64,
}

impl Event {
    /// The JSON form, for test.json.
    pub fn to_json(&self) -> Value {
        let mut v = json!({
            "at_ms": self.at.as_millis() as u64,
            "duration_ms": self.duration.as_millis() as u64,
            "fault": self.fault.name(),
        });
        let map = v.as_object_mut().expect("object");
        match self.fault {
            Fault::Kill | Fault::Pause => {
                let target = if self.leader {
                    json!("leader")
                } else {
                    json!(node_name(self.node))
                };
                map.insert("target".into(), target);
            }
            Fault::PowerFail => {
                map.insert("target".into(), json!("all"));
            }
            Fault::PauseMajority => {
                map.insert("target".into(), json!("majority-but-leader"));
            }
            Fault::Latency => {
                map.insert("target".into(), json!(node_name(self.node)));
                map.insert("delay_ms".into(), json!(latency_ms(self.pick)));
            }
            Fault::Bitflip | Fault::Truncate | Fault::Membership => {
                map.insert("target".into(), json!(node_name(self.node)));
                map.insert("pick".into(), json!(self.pick));
            }
            Fault::Partition | Fault::Loss => {
                map.insert("kind".into(), json!(self.kind));
                map.insert("grudge".into(), grudge_json(&self.grudge));
                if self.fault == Fault::Loss {
                    map.insert("probability".into(), json!(self.probability));
                }
            }
        }
        v
    }
}

/// The one-way delay of a `latency` event, from its random bits: 20 to 150 ms.
pub fn latency_ms(pick: u64) -> u64 {
    20 + pick % 131
}

/// `n1`, `n2`, ... for 0-based `i`.
pub fn node_name(i: usize) -> String {
    format!("n{}", i + 1)
}

/// `{"n1": ["n2"], ...}`: who drops packets from whom (nodes that drop nothing are left out).
pub fn grudge_json(grudge: &[Vec<usize>]) -> Value {
    let mut map = serde_json::Map::new();
    for (i, from) in grudge.iter().enumerate() {
        if !from.is_empty() {
            let names: Vec<String> = from.iter().map(|&j| node_name(j)).collect();
            map.insert(node_name(i), json!(names));
        }
    }
    Value::Object(map)
}

fn complete_grudge(n: usize, groups: &[Vec<usize>]) -> Vec<Vec<usize>> {
    let mut grudge = vec![Vec::new(); n];
    for (gi, group) in groups.iter().enumerate() {
        for &node in group {
            for (gj, other) in groups.iter().enumerate() {
                if gi != gj {
                    grudge[node].extend(other.iter().copied());
                }
            }
        }
    }
    for g in &mut grudge {
        g.sort_unstable();
    }
    grudge
}

fn partition(rng: &mut StdRng, n: usize) -> (&'static str, Vec<Vec<usize>>) {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(rng);
    let mut kinds = vec!["one", "halves"];
    if n >= 3 {
        kinds.push("bridge");
    }
    if n == 5 {
        kinds.push("ring");
    }
    let kind = kinds[rng.random_range(0..kinds.len())];
    let grudge = match kind {
        "one" => complete_grudge(n, &[vec![order[0]], order[1..].to_vec()]),
        "halves" => {
            let (a, b) = order.split_at(n / 2);
            complete_grudge(n, &[a.to_vec(), b.to_vec()])
        }
        "bridge" => {
            // order[0] sees everyone; the other nodes split into two halves that do not.
            let rest = &order[1..];
            let (a, b) = rest.split_at(rest.len() / 2);
            let mut grudge = complete_grudge(n, &[a.to_vec(), b.to_vec()]);
            grudge[order[0]].clear();
            for g in &mut grudge {
                g.retain(|&x| x != order[0]);
            }
            grudge
        }
        _ => {
            // Majorities ring: each node sees itself and its two ring neighbours (3 of 5).
            let mut grudge = vec![Vec::new(); n];
            for (pos, &node) in order.iter().enumerate() {
                for d in [2, 3] {
                    grudge[node].push(order[(pos + d) % n]);
                }
                grudge[node].sort_unstable();
            }
            grudge
        }
    };
    (kind, grudge)
}

/// The fault schedule for `time_limit` of workload with `faults` enabled on `nodes` nodes.
/// Deterministic in its arguments.
pub fn schedule(
    seed: u64,
    faults: &[Fault],
    nodes: usize,
    time_limit: Duration,
    interval: Duration,
) -> Vec<Event> {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x6e65_6d65_7369_7321);
    let mut events = Vec::new();
    if faults.is_empty() || nodes == 0 {
        return events;
    }
    let interval_ms = interval.as_millis().max(1) as u64;
    let limit_ms = time_limit.as_millis() as u64;
    let mut t = rng.random_range(interval_ms / 4..=interval_ms / 2 + 1);
    let mut bitflips = 0;
    for _ in 0..10_000 {
        let fault = faults[rng.random_range(0..faults.len())];
        let duration_ms = match fault {
            Fault::Bitflip | Fault::Truncate | Fault::PowerFail => rng.random_range(300..=1_000),
            // Past the workload's 3 s send deadline, so every send caught in it is retried.
            Fault::PauseMajority => rng.random_range(3_500..=4_500),
            _ => rng.random_range(interval_ms / 2..=interval_ms),
        };
        if t + duration_ms + 1_000 > limit_ms {
            break;
        }
        let node = rng.random_range(0..nodes);
        let leader = rng.random_bool(0.5);
        let pick = rng.random::<u64>();
        let (kind, grudge, probability) = match fault {
            Fault::Partition => {
                let (kind, grudge) = partition(&mut rng, nodes);
                (kind, grudge, 0.0)
            }
            Fault::Loss => {
                let mut victims: Vec<usize> = (0..nodes).collect();
                victims.shuffle(&mut rng);
                victims.truncate(rng.random_range(1..=nodes));
                let p = rng.random_range(0.1..0.35);
                let mut grudge = vec![Vec::new(); nodes];
                for v in victims {
                    // Listed as "from every other node"; the rule drops from everyone, the
                    // harness's clients included.
                    grudge[v] = (0..nodes).filter(|&j| j != v).collect();
                }
                ("loss", grudge, p)
            }
            _ => ("", Vec::new(), 0.0),
        };
        // A corrupt node stays down for good: one per run, so a majority is left.
        if fault == Fault::Bitflip {
            bitflips += 1;
            if bitflips > 1 {
                continue;
            }
        }
        events.push(Event {
            at: Duration::from_millis(t),
            duration: Duration::from_millis(duration_ms),
            fault,
            leader,
            node,
            kind,
            grudge,
            probability,
            pick,
        });
        t += duration_ms + rng.random_range(interval_ms / 2..=interval_ms * 3 / 2);
    }
    events
}

/// One frame of a segment: its offset and payload length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    /// Byte offset of the frame header.
    pub offset: u64,
    /// Payload length.
    pub len: u64,
}

const SEGMENT_HEADER_LEN: u64 = 24;
const FRAME_HEADER_LEN: u64 = 16;

/// The WAL segments of a node's data dir, oldest first.
///
/// # Errors
/// The directory cannot be read.
pub fn segments(data_dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let dir = data_dir.join("log").join("wal");
    let mut segs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    segs.sort();
    Ok(segs)
}

/// The complete frames of a segment (the layout of raft-log's format.rs).
///
/// # Errors
/// The file cannot be read.
pub fn frames(path: &Path) -> anyhow::Result<Vec<Frame>> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut out = Vec::new();
    let mut off = SEGMENT_HEADER_LEN;
    let size = bytes.len() as u64;
    while off + FRAME_HEADER_LEN <= size {
        let at = usize::try_from(off).unwrap_or(usize::MAX);
        let header_len = usize::try_from(FRAME_HEADER_LEN).unwrap_or(usize::MAX);
        // Segments are preallocated with zeros: an all-zero header is the end of the data
        // (never a valid frame), not a frame of length 0. Counting the zero tail as frames
        // made bitflip hit zeros and truncate cut only zeros.
        if bytes[at..at + header_len].iter().all(|b| *b == 0) {
            break;
        }
        let len = u64::from(u32::from_le_bytes(
            bytes[at..at + 4].try_into().expect("4 bytes"),
        ));
        if off + FRAME_HEADER_LEN + len > size {
            break;
        }
        out.push(Frame { offset: off, len });
        off += FRAME_HEADER_LEN + len;
    }
    Ok(out)
}

/// What a bit flip did.
#[derive(Debug, Clone)]
pub struct Flip {
    /// The segment.
    pub file: PathBuf,
    /// Offset of the frame whose bytes were changed (what recovery should name).
    pub frame_offset: u64,
    /// Offset of the flipped byte.
    pub byte_offset: u64,
    /// Which bit.
    pub bit: u8,
    /// Whether the segment was an older, sealed one.
    pub sealed: bool,
}

/// Flips one bit in a frame that is not the log's last frame: in a sealed segment when there
/// is more than one, else in the newest segment before its last frame.
///
/// # Errors
/// No segment with a frame that is followed by another.
pub fn bitflip(data_dir: &Path, pick: u64) -> anyhow::Result<Flip> {
    let segs = segments(data_dir)?;
    let (file, candidates, sealed) = if segs.len() >= 2 {
        let file = segs[usize::try_from(pick % (segs.len() as u64 - 1)).unwrap_or(0)].clone();
        let fr = frames(&file)?;
        (file, fr, true)
    } else if let Some(file) = segs.last() {
        let mut fr = frames(file)?;
        fr.pop();
        (file.clone(), fr, false)
    } else {
        bail!("no WAL segment in {}", data_dir.display());
    };
    if candidates.is_empty() {
        bail!("{} has no frame followed by another", file.display());
    }
    let frame = candidates[usize::try_from((pick >> 8) % candidates.len() as u64).unwrap_or(0)];
    // Anywhere in the frame: header (length, crc, index) or payload.
    let within = (pick >> 24) % (FRAME_HEADER_LEN + frame.len);
    let byte_offset = frame.offset + within;
    let bit = u8::try_from(pick % 8).unwrap_or(0);
    let mut bytes = std::fs::read(&file)?;
    let at = usize::try_from(byte_offset).context("offset")?;
    bytes[at] ^= 1 << bit;
    std::fs::write(&file, &bytes).with_context(|| format!("writing {}", file.display()))?;
    Ok(Flip {
        file,
        frame_offset: frame.offset,
        byte_offset,
        bit,
        sealed,
    })
}

/// What a truncation did.
#[derive(Debug, Clone)]
pub struct Cut {
    /// The newest segment.
    pub file: PathBuf,
    /// Size before.
    pub from: u64,
    /// Size after.
    pub to: u64,
}

/// Cuts between 1 byte and the whole last frame off the newest segment: a torn tail.
///
/// # Errors
/// No segment, or it has no frame.
pub fn truncate(data_dir: &Path, pick: u64) -> anyhow::Result<Cut> {
    let segs = segments(data_dir)?;
    let file = segs
        .last()
        .with_context(|| format!("no WAL segment in {}", data_dir.display()))?
        .clone();
    let fr = frames(&file)?;
    let last = fr
        .last()
        .with_context(|| format!("{} has no frame", file.display()))?;
    let from = std::fs::metadata(&file)?.len();
    let frame_end = last.offset + FRAME_HEADER_LEN + last.len;
    // Keep at least the frame's first byte, so the tail is torn rather than cleanly cut.
    let cut = 1 + pick % (frame_end - last.offset - 1).max(1);
    let to = frame_end.saturating_sub(cut).max(last.offset + 1).min(from);
    let f = std::fs::OpenOptions::new().write(true).open(&file)?;
    f.set_len(to)?;
    f.sync_all()?;
    Ok(Cut { file, from, to })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_is_deterministic_and_bounded() {
        let faults = [Fault::Kill, Fault::Pause, Fault::Partition, Fault::Bitflip];
        let a = schedule(
            7,
            &faults,
            5,
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let b = schedule(
            7,
            &faults,
            5,
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        let c = schedule(
            8,
            &faults,
            5,
            Duration::from_secs(60),
            Duration::from_secs(5),
        );
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(!a.is_empty());
        assert!(a.iter().filter(|e| e.fault == Fault::Bitflip).count() <= 1);
        for pair in a.windows(2) {
            assert!(pair[0].at + pair[0].duration < pair[1].at, "faults overlap");
        }
        let last = a.last().expect("some");
        assert!(last.at + last.duration < Duration::from_secs(60));
    }

    #[test]
    fn partitions_keep_each_node_seeing_itself() {
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..50 {
            let (kind, grudge) = partition(&mut rng, 5);
            for (i, from) in grudge.iter().enumerate() {
                assert!(!from.contains(&i), "{kind}: n{i} drops itself");
            }
            if kind == "ring" {
                assert!(grudge.iter().all(|g| g.len() == 2));
            }
        }
    }

    #[test]
    fn bitflip_and_truncate_hit_the_expected_frames() {
        let dir = tempfile::tempdir().expect("tempdir");
        let wal = dir.path().join("log").join("wal");
        std::fs::create_dir_all(&wal).expect("mkdir");
        let mut bytes = vec![0u8; 24];
        for len in [5u32, 7, 3] {
            bytes.extend_from_slice(&len.to_le_bytes());
            bytes.extend_from_slice(&[0u8; 12]);
            bytes.extend(std::iter::repeat_n(1u8, len as usize));
        }
        let seg = wal.join("00000000000000000001.seg");
        std::fs::write(&seg, &bytes).expect("write");
        let f = frames(&seg).expect("frames");
        assert_eq!(f.len(), 3);
        assert_eq!(f[1].offset, 24 + 21);
        let flip = bitflip(dir.path(), 12345).expect("flip");
        assert!(flip.frame_offset < f[2].offset, "never the last frame");
        // The flip may have changed a length field: start from the clean file again.
        std::fs::write(&seg, &bytes).expect("write");
        let cut = truncate(dir.path(), 3).expect("cut");
        assert!(cut.to > f[2].offset && cut.to < cut.from);

        // A preallocated segment: the same frames, then zeros to the end of the file. The zero
        // tail is not frames; the flip and the cut must still land in real frames.
        let mut preallocated = bytes.clone();
        preallocated.resize(bytes.len() + 4096, 0);
        std::fs::write(&seg, &preallocated).expect("write");
        assert_eq!(frames(&seg).expect("frames"), f);
        for pick in [1u64, 12345, 987_654_321, u64::MAX] {
            std::fs::write(&seg, &preallocated).expect("write");
            let flip = bitflip(dir.path(), pick).expect("flip");
            assert!(flip.byte_offset < f[2].offset, "{pick}: {flip:?}");
            std::fs::write(&seg, &preallocated).expect("write");
            let cut = truncate(dir.path(), pick).expect("cut");
            let end = f[2].offset + FRAME_HEADER_LEN + f[2].len;
            assert!(cut.to > f[2].offset && cut.to < end, "{pick}: {cut:?}");
        }
    }
}
