//! `Proposer`: coalesces concurrent sends into one Raft entry.
//!
//! openraft turns each `client_write` into one log entry, and every entry costs a log frame, an
//! AppendEntries to each follower and an apply on every replica, so a leader that proposed one
//! entry per message would pay all of that per message. The proposer queues sends, and a
//! single task drains whatever is queued into one `Command::SendBatch` (bounded in count and
//! bytes), keeping up to `in_flight_max` batches in openraft at once, a further one only once
//! the newest has been out for `overlap_after`. Under load batches grow by themselves; an idle
//! leader proposes a lone send at once, so a single sender pays no batching delay.
//!
//! Step 3 of "Life of a chat message" in ARCHITECTURE.md.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chat_sm::{ChatResponse, Command, RejectReason, SendCmd, Sent};
use openraft::error::{ClientWriteError, RaftError};

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::handover::WriteGate;
use crate::metrics::Metrics;
use crate::raft::Raft;
use crate::types::{Member, NodeId, TypeConfig};

/// Bounds on one proposed batch and on the proposer's queue.
#[derive(Debug, Clone)]
pub struct ProposerConfig {
    /// Most sends in one entry. Default 1024; at least 1.
    pub batch_count_max: usize,
    /// Most body bytes in one entry (a batch is closed once it reaches this). Default 1 MiB.
    pub batch_bytes_max: usize,
    /// Most batches proposed but not yet applied. Default 2; at least 1.
    ///
    /// Few on purpose: sends that arrive while a batch commits wait and join the next one, so
    /// under load each entry carries more sends, and the per-entry costs (log frame,
    /// AppendEntries to every follower, their acks, one `apply` and `WriteBatch` per replica)
    /// are paid less often. A second batch keeps proposing while a slow one is applied and
    /// answered.
    pub in_flight_max: usize,
    /// A batch is proposed while others are in flight only once the newest of them has been
    /// in flight this long; with none in flight it goes at once. Default 1 ms, about one
    /// commit of a lightly loaded cluster on a LAN.
    ///
    /// A commit that returns sooner takes the sends waiting for it into one entry rather than
    /// two, so a busy cluster on fast links pays its per-entry costs less often; where commits
    /// take longer (slow links, heavy load) batches still overlap.
    pub overlap_after: Duration,
    /// Sends waiting for a batch; further sends wait for room. Default 65536.
    pub queue_len: usize,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        ProposerConfig {
            batch_count_max: 1024,
            batch_bytes_max: 1 << 20,
            in_flight_max: 2,
            overlap_after: Duration::from_millis(1),
            queue_len: 65536,
        }
    }
}

/// A send's outcome once its entry was applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proposed {
    /// The message's channel seq, or the deterministic rejection.
    pub result: Result<Sent, RejectReason>,
    /// Log index of the entry that carried it: the sender's read token.
    pub log_index: u64,
}

/// Why a send was not applied, or may not have been.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProposeError {
    /// This node is not the leader; the send was definitely not applied here.
    #[error("not the leader")]
    NotLeader {
        /// The leader, if this node knows it.
        leader: Option<(NodeId, Member)>,
    },
    /// Raft is shutting down or stopped; the outcome is unknown, retry with the same key.
    #[error("raft is unavailable: {0}")]
    Unavailable(&'static str),
}

struct Pending {
    send: SendCmd,
    reply: oneshot::Sender<Result<Proposed, ProposeError>>,
}

/// Handle to the proposer task. Cheap to clone.
#[derive(Clone)]
pub struct Proposer {
    tx: mpsc::Sender<Pending>,
    gate: WriteGate,
}

impl Proposer {
    /// Starts the proposer task for `raft`. The task ends when every handle is dropped.
    /// Sends are refused while `gate` is closed (the disk watchdog closes it).
    pub fn spawn(
        raft: Raft,
        config: ProposerConfig,
        metrics: Arc<Metrics>,
        gate: WriteGate,
    ) -> Proposer {
        assert!(config.batch_count_max >= 1 && config.in_flight_max >= 1);
        let (tx, rx) = mpsc::channel(config.queue_len.max(1));
        tokio::spawn(run(raft, config, rx, metrics));
        Proposer { tx, gate }
    }

    /// Proposes one send and waits until its entry is applied (or fails).
    ///
    /// # Errors
    /// [`ProposeError::NotLeader`] when this node cannot propose; `Unavailable` when Raft
    /// stopped, in which case the send may or may not have been applied.
    #[tracing::instrument(level = "debug", skip_all, fields(channel = %send.channel, client_seq = send.client_seq))]
    pub async fn propose(&self, send: SendCmd) -> Result<Proposed, ProposeError> {
        if self.gate.is_closed() {
            // This node's disk is stalled: the client retries on the node that takes over.
            return Err(ProposeError::NotLeader { leader: None });
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { send, reply })
            .await
            .map_err(|_| ProposeError::Unavailable("proposer stopped"))?;
        tokio::select! {
            answer = rx => {
                answer.map_err(|_| ProposeError::Unavailable("proposer dropped the send"))?
            }
            // A send waiting on a stalled disk is answered as soon as the gate closes, as an
            // unknown outcome, never "not leader": it may be in an entry this node already
            // proposed, which can still commit. The client retries with the same key on the
            // node that takes over, and dedup makes the entry count once.
            () = self.gate.closed() => Err(ProposeError::Unavailable(
                "this node's disk stalled while the send waited; it may still commit: retry with \
                 the same key",
            )),
        }
    }
}

async fn run(
    raft: Raft,
    config: ProposerConfig,
    mut rx: mpsc::Receiver<Pending>,
    metrics: Arc<Metrics>,
) {
    schedule(&config, &mut rx, |batch| {
        metrics.batch_sends.observe(batch.len() as f64);
        let raft = raft.clone();
        let timing = metrics.propose_seconds.clone();
        async move {
            let started = Instant::now();
            propose_batch(&raft, batch).await;
            timing.observe(started.elapsed().as_secs_f64());
        }
    })
    .await;
}

/// Drains `rx` into batches and runs `propose` on each as its own task, keeping to
/// `config`'s bounds on what is in flight; returns when every sender of `rx` is gone (the
/// batches in flight still answer their sends).
async fn schedule<F, Fut>(config: &ProposerConfig, rx: &mut mpsc::Receiver<Pending>, mut propose: F)
where
    F: FnMut(Vec<Pending>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let mut in_flight = JoinSet::new();
    // When the newest batch in flight was proposed.
    let mut newest = Instant::now();
    while let Some(first) = rx.recv().await {
        // Wait for room before draining, so everything that queued meanwhile joins this batch.
        loop {
            while in_flight.try_join_next().is_some() {}
            if in_flight.is_empty() {
                break;
            }
            let overlap_at = newest + config.overlap_after;
            if in_flight.len() >= config.in_flight_max {
                in_flight.join_next().await;
            } else if Instant::now() >= overlap_at {
                break;
            } else {
                tokio::select! {
                    _ = in_flight.join_next() => {}
                    () = tokio::time::sleep_until(overlap_at) => {}
                }
            }
        }
        let batch = drain_batch(first, rx, config);
        newest = Instant::now();
        in_flight.spawn(propose(batch));
    }
    in_flight.detach_all();
}

/// Takes `first` plus whatever is queued now, up to the batch bounds.
fn drain_batch(
    first: Pending,
    rx: &mut mpsc::Receiver<Pending>,
    config: &ProposerConfig,
) -> Vec<Pending> {
    let mut bytes = first.send.body.len();
    let mut batch = vec![first];
    while batch.len() < config.batch_count_max && bytes < config.batch_bytes_max {
        match rx.try_recv() {
            Ok(next) => {
                bytes += next.send.body.len();
                batch.push(next);
            }
            Err(_) => break,
        }
    }
    batch
}

async fn propose_batch(raft: &Raft, batch: Vec<Pending>) {
    let (sends, replies): (Vec<SendCmd>, Vec<_>) =
        batch.into_iter().map(|p| (p.send, p.reply)).unzip();
    let count = sends.len();
    tracing::debug!(count, "proposing batch");
    match raft.client_write(Command::SendBatch(sends).into()).await {
        Ok(response) => {
            let log_index = response.log_id.index;
            let results = match response.data {
                ChatResponse::Batch(results) => results,
                // The whole batch refused (e.g. over MAX_BATCH_SENDS): every send gets the reason.
                ChatResponse::Rejected(reason) => vec![Err(reason); count],
                other => panic!("state machine answered a batch with {other:?}"),
            };
            assert_eq!(results.len(), count, "one result per send in the batch");
            for (reply, result) in replies.into_iter().zip(results) {
                // The caller may have given up (its RPC deadline passed); the send is applied
                // regardless, and a retry with the same key gets this same answer.
                let _ = reply.send(Ok(Proposed { result, log_index }));
            }
        }
        Err(e) => {
            let error = map_write_error(e);
            for reply in replies {
                // As above: a caller that went away needs no answer.
                let _ = reply.send(Err(error.clone()));
            }
        }
    }
}

pub(crate) fn map_write_error(
    e: RaftError<TypeConfig, ClientWriteError<TypeConfig>>,
) -> ProposeError {
    match e {
        // openraft answers ForwardToLeader either before proposing or after truncating the
        // entry as conflicting: both mean the entry was not applied.
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => ProposeError::NotLeader {
            leader: f.leader_id.zip(f.leader_node),
        },
        RaftError::APIError(ClientWriteError::ChangeMembershipError(_)) => {
            ProposeError::Unavailable("membership change in progress")
        }
        // The leader changed before the entry committed; it may still commit through the new
        // leader, so the outcome is unknown, never "not applied". The client's retry carries
        // the same idempotency key, so it cannot apply twice.
        RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)) => ProposeError::Unavailable(
            "the leader changed before the send committed; it may still commit: retry with the same key",
        ),
        // cellchat sets no write preconditions.
        RaftError::APIError(ClientWriteError::PreconditionFailed(_)) => {
            ProposeError::Unavailable("write precondition failed")
        }
        RaftError::Fatal(_) => ProposeError::Unavailable("raft stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::error::{ForwardReason, ForwardToLeader};

    fn forward() -> ForwardToLeader<TypeConfig> {
        ForwardToLeader {
            leader_id: Some(2),
            leader_node: None,
            reason: ForwardReason::NotLeader,
        }
    }

    /// "Not the leader" promises the send was not applied; an entry discarded on a leader
    /// change may still commit, so it must be answered as unknown.
    #[test]
    fn only_a_refusal_before_appending_is_a_definite_not_leader() {
        let before = RaftError::APIError(ClientWriteError::ForwardToLeader(forward()));
        assert!(matches!(
            map_write_error(before),
            ProposeError::NotLeader { .. }
        ));
        let discarded = RaftError::APIError(ClientWriteError::LogEntryDiscarded(forward()));
        assert!(matches!(
            map_write_error(discarded),
            ProposeError::Unavailable(_)
        ));
    }

    fn pending(client_seq: u64) -> Pending {
        let send = SendCmd {
            channel: "general".into(),
            sender: "alice".into(),
            body: vec![1],
            client_id: chat_sm::ClientId([7; 16]),
            client_seq,
            at_ms: 0,
        };
        // The reply is never awaited: the fake proposal below answers nothing.
        Pending {
            send,
            reply: oneshot::channel().0,
        }
    }

    /// A proposal the test ends: its sends' `client_seq`s, when it started, and the switch
    /// that finishes it.
    type Proposal = (Vec<u64>, Instant, oneshot::Sender<()>);

    /// Runs `schedule` with a fake proposal per batch, reported on the returned receiver.
    fn scheduler(
        config: ProposerConfig,
    ) -> (mpsc::Sender<Pending>, mpsc::UnboundedReceiver<Proposal>) {
        let (tx, mut rx) = mpsc::channel(64);
        let (proposed_tx, proposed) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            schedule(&config, &mut rx, |batch| {
                let (done, finished) = oneshot::channel();
                let seqs = batch.iter().map(|p| p.send.client_seq).collect();
                proposed_tx.send((seqs, Instant::now(), done)).unwrap();
                async move {
                    let _ = finished.await;
                }
            })
            .await;
        });
        (tx, proposed)
    }

    /// With none in flight a send goes at once; a second batch waits until the first has
    /// been out `overlap_after` (or has finished), and a third waits for room.
    #[tokio::test(start_paused = true)]
    async fn a_batch_overlaps_only_one_out_for_overlap_after() {
        // Whole milliseconds: tokio's timers tick once a millisecond.
        let overlap = Duration::from_millis(10);
        let config = ProposerConfig {
            in_flight_max: 2,
            overlap_after: overlap,
            ..ProposerConfig::default()
        };
        let (tx, mut proposed) = scheduler(config);
        let start = Instant::now();
        tx.send(pending(1)).await.unwrap();
        let (seqs, at1, done1) = proposed.recv().await.unwrap();
        assert_eq!(
            (seqs, at1),
            (vec![1], start),
            "an idle proposer proposes at once"
        );

        // Both queue while the first is out, and go together once it has been out `overlap`.
        tx.send(pending(2)).await.unwrap();
        tx.send(pending(3)).await.unwrap();
        let (seqs, at2, done2) = proposed.recv().await.unwrap();
        assert_eq!((seqs, at2 - at1), (vec![2, 3], overlap));

        // Two out: the next waits for one of them however long it takes.
        tx.send(pending(4)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(proposed.try_recv().is_err(), "proposed past in_flight_max");
        let freed = Instant::now();
        drop(done1);
        let (seqs, at3, done3) = proposed.recv().await.unwrap();
        assert_eq!((seqs, at3), (vec![4], freed));

        // A batch that finishes before `overlap_after` lets the next go when it finishes.
        drop(done2);
        drop(done3);
        tx.send(pending(5)).await.unwrap();
        let (seqs, at5, done5) = proposed.recv().await.unwrap();
        assert_eq!((seqs, at5), (vec![5], at3), "nothing in flight: at once");
        tx.send(pending(6)).await.unwrap();
        tokio::time::sleep(overlap / 4).await;
        assert!(
            proposed.try_recv().is_err(),
            "overlapped a batch out for too short a time"
        );
        let finished = Instant::now();
        assert!(finished - at5 < overlap);
        drop(done5);
        let (seqs, at6, _done6) = proposed.recv().await.unwrap();
        assert_eq!((seqs, at6), (vec![6], finished));
    }
}
