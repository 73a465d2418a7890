//! `ReadMarks`: coalesces the read markers clients move into one Raft entry now and then.
//!
//! A client marks a channel read each time its user looks at new messages, so a thousand
//! connected users would write a thousand tiny entries a second if each mark were an entry.
//! Markers are not latency-critical (nobody waits on them but the next listing), so the
//! leader gathers the marks that arrive within [`MARK_WINDOW`] after the first one, keeps the
//! highest per user and channel, and proposes them as one `Command::MarkRead`. One entry is in
//! flight at a time; marks arriving meanwhile wait for the next.

use std::collections::HashMap;
use std::time::Duration;

use chat_sm::{ChannelSeq, ChatResponse, Command, ReadMark, RejectReason, MAX_BATCH_MARKS};
use tokio::sync::{mpsc, oneshot};

use crate::handover::WriteGate;
use crate::proposer::{map_write_error, ProposeError};
use crate::raft::Raft;

/// How long the leader gathers marks after the first one before proposing them together.
pub const MARK_WINDOW: Duration = Duration::from_millis(100);

/// Marks waiting for an entry; further marks wait for room.
const MARK_QUEUE_LEN: usize = 16_384;

/// A mark's outcome once its entry was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marked {
    /// The user's marker in the channel after the entry, or the deterministic rejection.
    pub result: Result<ChannelSeq, RejectReason>,
    /// Log index of the entry that carried it: a read token.
    pub log_index: u64,
}

struct Pending {
    mark: ReadMark,
    reply: oneshot::Sender<Result<Marked, ProposeError>>,
}

/// Handle to the marker task. Cheap to clone.
#[derive(Clone)]
pub struct ReadMarks {
    tx: mpsc::Sender<Pending>,
    gate: WriteGate,
}

impl ReadMarks {
    /// Starts the marker task for `raft`; it ends when every handle is dropped. Marks are
    /// refused while `gate` is closed, as sends are.
    pub fn spawn(raft: Raft, gate: WriteGate) -> ReadMarks {
        let (tx, rx) = mpsc::channel(MARK_QUEUE_LEN);
        tokio::spawn(run(raft, rx));
        ReadMarks { tx, gate }
    }

    /// Proposes `mark` with the others of its window and waits until their entry is applied.
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] when this node cannot propose; `Unavailable` when Raft
    /// stopped (the mark may or may not apply; marking again is harmless).
    pub async fn mark(&self, mark: ReadMark) -> Result<Marked, ProposeError> {
        if self.gate.is_closed() {
            return Err(ProposeError::NotLeader { leader: None });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { mark, reply })
            .await
            .map_err(|_| ProposeError::Unavailable("read marker task stopped"))?;
        rx.await
            .map_err(|_| ProposeError::Unavailable("read marker task dropped the mark"))?
    }
}

async fn run(raft: Raft, mut rx: mpsc::Receiver<Pending>) {
    while let Some(first) = rx.recv().await {
        tokio::time::sleep(MARK_WINDOW).await;
        let mut window = vec![first];
        while window.len() < MAX_BATCH_MARKS {
            match rx.try_recv() {
                Ok(next) => window.push(next),
                Err(_) => break,
            }
        }
        propose_window(&raft, window).await;
    }
}

/// One mark per (user, channel), the highest of the window; a lower one of the same pair
/// gets the same answer (the marker after the entry).
fn coalesce(window: Vec<Pending>) -> (Vec<ReadMark>, Vec<(usize, Pending)>) {
    let mut at: HashMap<(String, String), usize> = HashMap::new();
    let mut marks: Vec<ReadMark> = Vec::new();
    let mut waiters = Vec::with_capacity(window.len());
    for pending in window {
        let key = (pending.mark.user.clone(), pending.mark.channel.clone());
        let i = *at.entry(key).or_insert_with(|| {
            marks.push(pending.mark.clone());
            marks.len() - 1
        });
        marks[i].seq = marks[i].seq.max(pending.mark.seq);
        waiters.push((i, pending));
    }
    (marks, waiters)
}

async fn propose_window(raft: &Raft, window: Vec<Pending>) {
    let (marks, waiters) = coalesce(window);
    let count = marks.len();
    match raft.client_write(Command::MarkRead(marks).into()).await {
        Ok(response) => {
            let log_index = response.log_id.index;
            let results = match response.data {
                ChatResponse::Marked(results) => results,
                ChatResponse::Rejected(reason) => vec![Err(reason); count],
                other => panic!("state machine answered read markers with {other:?}"),
            };
            assert_eq!(results.len(), count, "one result per mark");
            for (i, pending) in waiters {
                let result = results[i].clone();
                // A caller that went away needs no answer: the marker moved regardless.
                let _ = pending.reply.send(Ok(Marked { result, log_index }));
            }
        }
        Err(e) => {
            let error = map_write_error(e);
            for (_, pending) in waiters {
                let _ = pending.reply.send(Err(error.clone()));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(user: &str, channel: &str, seq: u64) -> Pending {
        let (reply, _) = oneshot::channel();
        Pending {
            mark: ReadMark {
                user: user.into(),
                channel: channel.into(),
                seq: ChannelSeq(seq),
            },
            reply,
        }
    }

    #[test]
    fn a_window_keeps_the_highest_mark_per_user_and_channel() {
        let window = vec![
            pending("alice", "general", 5),
            pending("bob", "general", 3),
            pending("alice", "general", 9),
            pending("alice", "random", 2),
            pending("alice", "general", 7),
        ];
        let (marks, waiters) = coalesce(window);
        let got: Vec<_> = marks
            .iter()
            .map(|m| (m.user.as_str(), m.channel.as_str(), m.seq.0))
            .collect();
        assert_eq!(
            got,
            [
                ("alice", "general", 9),
                ("bob", "general", 3),
                ("alice", "random", 2)
            ]
        );
        let slots: Vec<usize> = waiters.iter().map(|(i, _)| *i).collect();
        assert_eq!(slots, [0, 1, 0, 2, 0]);
    }
}
