//! Ring eviction under the memory budget. A replica with the smallest budget, whose rings are
//! dropped over and over, must answer every apply and every read exactly as a replica whose
//! rings always fit; it must stay within its budget after every step, including a restart and
//! a snapshot install; and `check_consistency` (each ring equals its channel's tail in
//! RocksDB) must hold throughout. Random sends (small and near-maximal bodies, several
//! channels per entry) are interleaved with random reads, restarts and installs.

use chat_sm::{
    ChannelSeq, ChatState, Command, Config, Error, RING_BYTES_MAX_DEFAULT, RING_BYTES_MAX_MAX,
    RING_BYTES_MAX_MIN,
};
use proptest::prelude::*;
use tempfile::TempDir;

use crate::common::{apply, send, TestEntry};

const RING_LEN: usize = 8;
const CHANNELS: &[&str] = &["a", "b", "c", "d", "e"];

/// A replica with its own directory and ring budget.
struct Node {
    dir: TempDir,
    state: Option<ChatState>,
    ring_bytes_max: usize,
}

impl Node {
    fn new(ring_bytes_max: usize) -> Node {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut node = Node {
            dir,
            state: None,
            ring_bytes_max,
        };
        node.restart();
        node
    }

    fn state(&self) -> &ChatState {
        self.state.as_ref().expect("open")
    }

    /// Opens the state, closing it first if it is open.
    fn restart(&mut self) {
        drop(self.state.take());
        let mut config = Config::new(self.dir.path());
        config.ring_len = RING_LEN;
        config.ring_bytes_max = self.ring_bytes_max;
        self.state = Some(ChatState::open(config).expect("open"));
    }

    fn check(&self) {
        let state = self.state();
        assert!(
            state.ring_bytes() <= self.ring_bytes_max,
            "{} ring bytes over the budget of {}",
            state.ring_bytes(),
            self.ring_bytes_max
        );
        state.check_consistency().expect("consistent");
    }
}

#[derive(Clone, Debug)]
enum Op {
    /// One entry of sends, each (channel index, body length).
    Send(Vec<(usize, usize)>),
    History {
        channel: usize,
        from: u64,
        limit: usize,
    },
    Before {
        channel: usize,
        before: u64,
        limit: usize,
    },
    /// The tight replica restarts.
    Restart,
    /// The tight replica installs a snapshot of the roomy one, which holds the same state.
    Install,
}

fn arb_op() -> impl Strategy<Value = Op> {
    let body_len = prop_oneof![3 => 1usize..200, 2 => 6_000usize..=16 * 1024];
    let channel = 0..CHANNELS.len();
    prop_oneof![
        8 => prop::collection::vec((channel.clone(), body_len), 1..5).prop_map(Op::Send),
        4 => (channel.clone(), 0u64..40, 0usize..12)
            .prop_map(|(channel, from, limit)| Op::History { channel, from, limit }),
        4 => (channel, prop_oneof![0u64..40, Just(u64::MAX)], 0usize..12)
            .prop_map(|(channel, before, limit)| Op::Before { channel, before, limit }),
        1 => Just(Op::Restart),
        1 => Just(Op::Install),
    ]
}

/// Runs `ops` on a replica with the smallest budget and one with the default, comparing every
/// answer.
fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut tight = Node::new(RING_BYTES_MAX_MIN);
    let roomy = Node::new(RING_BYTES_MAX_DEFAULT);
    let mut index = 0u64;
    for op in ops {
        match op {
            Op::Send(sends) => {
                index += 1;
                let sends = sends
                    .iter()
                    .zip(index * 100..)
                    .map(|(&(channel, len), seq)| {
                        send(CHANNELS[channel], "Alice", &vec![seq as u8; len], 1, seq)
                    })
                    .collect();
                let entry = [(index, TestEntry::Cmd(Command::SendBatch(sends)))];
                prop_assert_eq!(apply(tight.state(), &entry), apply(roomy.state(), &entry));
            }
            &Op::History {
                channel,
                from,
                limit,
            } => {
                let read = |n: &Node| {
                    n.state()
                        .history(CHANNELS[channel], ChannelSeq(from), limit)
                };
                prop_assert_eq!(read(&tight).expect("read"), read(&roomy).expect("read"));
            }
            &Op::Before {
                channel,
                before,
                limit,
            } => {
                let read = |n: &Node| {
                    (n.state()).history_before(CHANNELS[channel], ChannelSeq(before), limit)
                };
                prop_assert_eq!(read(&tight).expect("read"), read(&roomy).expect("read"));
            }
            Op::Restart => tight.restart(),
            Op::Install => {
                let path = roomy.dir.path().join("snap.bin");
                roomy.state().build_snapshot(&path).expect("build");
                tight.state().install_snapshot(&path).expect("install");
            }
        }
        tight.check();
    }
    roomy.check();
    prop_assert_eq!(
        tight.state().dump().expect("dump"),
        roomy.state().dump().expect("dump")
    );
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn evicting_rings_never_changes_an_answer(ops in prop::collection::vec(arb_op(), 1..60)) {
        run(&ops)?;
    }
}

/// Two full rings of the largest bodies already pass the smallest budget: the rings must be
/// evicted, and every read of every channel must still come back whole, also after a restart
/// loads what fits.
#[test]
fn many_channels_of_large_bodies_stay_within_the_budget() {
    let mut tight = Node::new(RING_BYTES_MAX_MIN);
    let body = vec![7u8; chat_sm::MAX_BODY_BYTES];
    for index in 1..=40u64 {
        let channel = CHANNELS[index as usize % CHANNELS.len()];
        let entry = [(
            index,
            TestEntry::Cmd(Command::Send(send(channel, "Alice", &body, 1, index))),
        )];
        apply(tight.state(), &entry);
        tight.check();
        assert!(tight.state().ring_bytes() > 0, "the newest ring stays");
    }
    for restart in [false, true] {
        if restart {
            tight.restart();
            tight.check();
            assert!(tight.state().ring_bytes() > 0, "open loads what fits");
        }
        for channel in CHANNELS {
            let all = tight.state().history(channel, ChannelSeq(1), 100);
            assert_eq!(all.expect("read").len(), 8);
            let newest = (tight.state()).history_before(channel, ChannelSeq(u64::MAX), 3);
            let seqs: Vec<u64> = newest.expect("read").iter().map(|m| m.seq.0).collect();
            assert_eq!(seqs, vec![6, 7, 8]);
        }
    }
}

#[test]
fn ring_budget_out_of_bounds_is_refused() {
    for bad in [0, RING_BYTES_MAX_MIN - 1, RING_BYTES_MAX_MAX + 1] {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = Config::new(dir.path());
        config.ring_bytes_max = bad;
        let err = ChatState::open(config).err().expect("refused");
        assert!(
            matches!(&err, Error::InvalidConfig { reason } if reason.contains("ring_bytes_max")),
            "{err}"
        );
    }
}
