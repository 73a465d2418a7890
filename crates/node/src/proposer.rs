//! `Proposer`: coalesces concurrent sends into one Raft entry.
//!
//! openraft turns each `client_write` into one log entry, and every entry costs a log frame, an
//! AppendEntries to each follower and an apply on every replica, so a leader that proposed one
//! entry per message would pay all of that per message. The proposer queues sends, and a
//! single task drains whatever is queued into one `Command::SendBatch` (bounded in count and
//! bytes), keeping up to `in_flight_max` batches in openraft at once. Under load batches grow by themselves; an idle
//! leader proposes a lone send at once, so a single sender pays no batching delay.
//!
//! Step 3 of "Life of a chat message" in ARCHITECTURE.md.

use std::sync::Arc;

use chat_sm::{ChatResponse, Command, RejectReason, SendCmd, Sent};
use openraft::error::{ClientWriteError, RaftError};

use tokio::sync::{mpsc, oneshot, Semaphore};

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
    /// Few on purpose: sends that arrive while the batches in flight commit wait and join the
    /// next one, so under load each entry carries more sends, and the per-entry costs (log
    /// frame, AppendEntries to every follower, their acks, one `apply` call and `WriteBatch`
    /// per replica) are paid less often. Measured on the 2-core benchmark VM, 3 nodes,
    /// 10 s runs (sends/s at 16 / 128 / 1024 closed-loop senders): 1 in flight 3,520 /
    /// 10,230 / 14,160; 2: 4,089 / 9,633 / 14,044; 4: 3,119 / 8,335 / 12,994; 8: 2,652 /
    /// 7,478 / 12,229. Two keeps one batch replicating while the previous one is applied
    /// and answered, which steadied the 1,024-sender tail (p999 198 ms against 336 ms).
    pub in_flight_max: usize,
    /// Sends waiting for a batch; further sends wait for room. Default 65536.
    pub queue_len: usize,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        ProposerConfig {
            batch_count_max: 1024,
            batch_bytes_max: 1 << 20,
            in_flight_max: 2,
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
    let permits = Arc::new(Semaphore::new(config.in_flight_max));
    while let Some(first) = rx.recv().await {
        // Wait for room before draining, so everything that queued meanwhile joins this batch.
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let batch = drain_batch(first, &mut rx, &config);
        metrics.batch_sends.observe(batch.len() as f64);
        let raft = raft.clone();
        let timing = metrics.propose_seconds.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            propose_batch(&raft, batch).await;
            timing.observe(started.elapsed().as_secs_f64());
            drop(permit);
        });
    }
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
}
