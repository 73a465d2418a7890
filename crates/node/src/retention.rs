//! Retention on a running cluster: the leader's expiry ticks, and the cluster default set by
//! an operator (`server retention`).
//!
//! What expires is decided by the state machine from the leader times in the log (see
//! chat-sm's `retention.rs`); this module only proposes the entries. Every
//! `expire_interval_ms` the leader proposes [`Command::Expire`] with its wall clock, when the
//! state says an expiry could remove something ([`ChatState::expiry_due`]), so an idle
//! cluster without retention writes nothing. A follower never proposes; after a failover the
//! new leader's first tick carries on.

use std::sync::Arc;
use std::time::Duration;

use chat_sm::{ChatResponse, ChatState, Command, Retention};
use openraft::error::{ClientWriteError, RaftError};
use openraft::ServerState;
use serde::{Deserialize, Serialize};

use crate::cluster::{check_cluster, JoinError};
use crate::raft::Raft;

/// Proposes an expiry every `interval` while this node leads. Runs until the node stops.
pub async fn expire_loop(raft: Raft, chat: Arc<ChatState>, interval: Duration) {
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticks.tick().await;
    loop {
        ticks.tick().await;
        if crate::raft::metrics_now(&raft).state != ServerState::Leader {
            continue;
        }
        let now = crate::api::now_ms();
        match chat.expiry_due(now) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "could not tell whether an expiry is due");
                continue;
            }
        }
        match raft
            .client_write(Command::Expire { at_ms: now }.into())
            .await
        {
            Ok(response) => tracing::debug!(response = ?response.data, "expiry applied"),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {}
            Err(e) => tracing::warn!(error = %e, "expiry not committed; the next tick retries"),
        }
    }
}

/// Reads, and with `set` replaces, the cluster's default retention (`server retention`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetentionRequest {
    /// The cluster the caller means.
    pub cluster: String,
    /// The new default; `None` only reads it.
    pub set: Option<proto::Retention>,
}

/// The leader's side of `server retention`: proposes the new default if one is given, and
/// answers the default in force once it applied here.
///
/// # Errors
/// [`JoinError::WrongCluster`]; [`JoinError::NotLeader`] with the leader this node knows;
/// [`JoinError::Busy`] when the entry could not be committed or was refused (an out-of-bounds
/// retention, which the command line checks first).
pub async fn handle_default_retention(
    raft: &Raft,
    chat: &ChatState,
    cluster: &str,
    request: &RetentionRequest,
) -> Result<proto::Retention, JoinError> {
    check_cluster(cluster, &request.cluster)?;
    let metrics = crate::raft::metrics_now(raft);
    if metrics.state != ServerState::Leader {
        let leader = metrics.current_leader;
        return Err(JoinError::NotLeader { leader });
    }
    let answer = |r: Retention| proto::Retention {
        max_age_ms: r.max_age_ms,
        max_count: r.max_count,
    };
    let Some(wanted) = request.set else {
        return Ok(answer(chat.default_retention()));
    };
    let retention = Retention {
        max_age_ms: wanted.max_age_ms,
        max_count: wanted.max_count,
    };
    match raft
        .client_write(Command::SetDefaultRetention(retention).into())
        .await
    {
        Ok(response) => match response.data {
            ChatResponse::DefaultRetentionSet => {
                tracing::info!(%wanted, "default retention set");
                Ok(answer(chat.default_retention()))
            }
            ChatResponse::Rejected(reason) => Err(JoinError::Busy(reason.to_string())),
            other => Err(JoinError::Busy(format!(
                "the state machine answered {other:?}"
            ))),
        },
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
            Err(JoinError::NotLeader {
                leader: f.leader_id,
            })
        }
        Err(e) => Err(JoinError::Busy(e.to_string())),
    }
}
