//! Apply throughput in CPU time, for a shared, noisy machine: applies `entries` entries of
//! `sends` 100-byte sends each (the workload of `benches/apply.rs`: 8 channels, every send new)
//! and reports sends per second of wall time and per second of CPU time of the applying thread
//! (from `/proc/thread-self/stat`, 10 ms resolution), which other tenants' load does not
//! inflate. RocksDB's flush and compaction threads run on other cores and are not counted.
//!
//! Run: `cargo run --release -p chat-sm --example apply_cpu -- [sends] [entries]`
//! (defaults 256 and 2000).

use std::time::Instant;

use chat_sm::{
    ApplyEntry, ApplyPayload, ChatState, ClientId, Command, Config, LogIndex, RaftMeta, SendCmd,
};

const BODY_LEN: usize = 100;
const CHANNELS: u64 = 8;

fn batch(next_seq: &mut u64, size: usize) -> Command {
    let sends: Vec<SendCmd> = (0..size)
        .map(|_| {
            *next_seq += 1;
            let seq = *next_seq;
            SendCmd {
                channel: format!("channel-{}", seq % CHANNELS),
                sender: "Alice".into(),
                body: vec![b'x'; BODY_LEN],
                client_id: ClientId([(seq % 251) as u8; 16]),
                client_seq: seq,
                at_ms: 1_700_000_000_000 + seq,
            }
        })
        .collect();
    if size == 1 {
        Command::Send(sends.into_iter().next().expect("one send"))
    } else {
        Command::SendBatch(sends)
    }
}

/// CPU time (user + system) of the calling thread, in seconds.
fn thread_cpu_seconds() -> f64 {
    cpu_seconds("/proc/thread-self/stat")
}

/// CPU time (user + system) of the whole process, RocksDB's background threads included.
fn process_cpu_seconds() -> f64 {
    cpu_seconds("/proc/self/stat")
}

fn cpu_seconds(stat_file: &str) -> f64 {
    let stat = std::fs::read_to_string(stat_file).expect("read stat");
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    ticks as f64 / 100.0
}

fn main() {
    let mut args = std::env::args().skip(1);
    let sends: usize = args.next().map_or(256, |a| a.parse().expect("sends"));
    let entries: u64 = args.next().map_or(2000, |a| a.parse().expect("entries"));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = ChatState::open(Config::new(dir.path())).expect("open");
    let mut next_seq = 0u64;
    let commands: Vec<Command> = (0..entries).map(|_| batch(&mut next_seq, sends)).collect();
    let (wall, cpu, process) = (Instant::now(), thread_cpu_seconds(), process_cpu_seconds());
    for (i, cmd) in commands.iter().enumerate() {
        let index = i as u64 + 1;
        let entry = ApplyEntry {
            index: LogIndex(index),
            payload: ApplyPayload::Command(cmd),
        };
        let meta = RaftMeta {
            last_applied: index.to_be_bytes().to_vec(),
            membership: None,
        };
        std::hint::black_box(state.apply(&[entry], meta));
    }
    let wall = wall.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu;
    let process = process_cpu_seconds() - process;
    let total = (sends as u64 * entries) as f64;
    println!(
        "{entries} entries x {sends} sends: wall {wall:.2} s ({:.0} sends/s), applying thread cpu {cpu:.2} s ({:.0} sends/cpu-s)",
        total / wall,
        total / cpu
    );
    let closing = process_cpu_seconds();
    drop(state);
    let closing = process_cpu_seconds() - closing;
    println!(
        "process cpu {process:.2} s ({:.2} us per send), closing {closing:.2} s",
        process * 1e6 / total
    );
}
