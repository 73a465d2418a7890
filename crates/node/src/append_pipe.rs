//! A follower's AppendEntries from one connection, handed to openraft in the order they came.
//!
//! The leader keeps several AppendEntries out at once (`PeerClient::stream_append`), so a
//! follower must give them to openraft in the order they were sent: one out of order finds
//! its `prev_log_id` missing and is refused as a conflict. tarpc runs each request on its own
//! task, and tasks start in no fixed order, so each `append` carries a ticket taken in wire
//! order when the connection read it ([`AppendPipe::ticket`]), and waits for its turn before
//! it submits. Submitting does not wait for openraft's answer: the requests go into one
//! `Raft::stream_append` per connection, which writes the next entries while the previous
//! ones are being synced, and answers in order.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::channel::mpsc;
use futures::StreamExt;
use openraft::error::{Fatal, RaftError};
use openraft::raft::{AppendEntriesRequest, AppendEntriesResponse, StreamAppendResult};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::raft::Raft;
use crate::types::{Runtime, TypeConfig};

type Answer = Result<StreamAppendResult<TypeConfig>, Fatal<TypeConfig>>;
type Submission = (AppendEntriesRequest<TypeConfig>, oneshot::Sender<Answer>);

/// The AppendEntries pipe of one inbound connection.
#[derive(Default)]
pub(crate) struct AppendPipe {
    /// The last ticket handed out; tickets start at 1.
    issued: AtomicU64,
    order: Mutex<Order>,
    turn: Notify,
    /// Where submissions go while the connection's `stream_append` runs.
    live: Mutex<Option<mpsc::UnboundedSender<Submission>>>,
}

#[derive(Default)]
struct Order {
    /// The ticket whose turn it is, less one.
    done: u64,
    /// Tickets given up before their turn (their request was refused or cancelled).
    abandoned: BTreeSet<u64>,
}

impl AppendPipe {
    /// The next ticket, in the order the connection reads requests.
    pub(crate) fn ticket(&self) -> u64 {
        self.issued.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Holds `ticket` until it is used or dropped; a dropped turn lets the next one go.
    pub(crate) fn turn(self: &Arc<Self>, ticket: u64) -> Turn {
        Turn {
            pipe: self.clone(),
            ticket,
        }
    }

    /// Submits `req` once `turn` comes up, then waits for openraft's answer.
    pub(crate) async fn append(
        &self,
        raft: &Raft,
        turn: Turn,
        req: AppendEntriesRequest<TypeConfig>,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RaftError<TypeConfig>> {
        turn.wait().await;
        let (tx, rx) = oneshot::channel();
        let mut submission = (req, tx);
        {
            let mut live = self.live.lock();
            for _ in 0..2 {
                let sender = live.get_or_insert_with(|| spawn_pipe(raft.clone()));
                match sender.unbounded_send(submission) {
                    Ok(()) => break,
                    // The pipe ended (after a refusal, which ends openraft's stream): a new one.
                    Err(e) => {
                        submission = e.into_inner();
                        *live = None;
                    }
                }
            }
        }
        drop(turn);
        match rx.await {
            Ok(Ok(result)) => Ok(AppendEntriesResponse::from(result)),
            Ok(Err(fatal)) => Err(RaftError::Fatal(fatal)),
            // Submitted behind a refused request in a pipe that has ended: the leader has
            // already dropped this stream, so nobody reads the answer.
            Err(_) => Err(RaftError::Fatal(Fatal::Stopped)),
        }
    }

    fn pass(&self, ticket: u64) {
        let mut guard = self.order.lock();
        let order = &mut *guard;
        if order.done + 1 == ticket {
            order.done = ticket;
            while order.abandoned.remove(&(order.done + 1)) {
                order.done += 1;
            }
        } else {
            order.abandoned.insert(ticket);
        }
        drop(guard);
        self.turn.notify_waiters();
    }
}

/// One request's place in its connection's order.
pub(crate) struct Turn {
    pipe: Arc<AppendPipe>,
    ticket: u64,
}

impl Turn {
    async fn wait(&self) {
        loop {
            let notified = self.pipe.turn.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.pipe.order.lock().done + 1 == self.ticket {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Turn {
    fn drop(&mut self) {
        self.pipe.pass(self.ticket);
    }
}

/// Runs one `Raft::stream_append` fed by the returned sender, answering each submission in
/// order. It ends with the first refusal or fatal error, as openraft's stream does.
fn spawn_pipe(raft: Raft) -> mpsc::UnboundedSender<Submission> {
    let (tx, mut rx) = mpsc::unbounded::<Submission>();
    // `stream_append` spawns through openraft's runtime, which draws from a seed the task
    // must carry.
    tokio::spawn(Runtime::scope(rand::random(), async move {
        let (input, requests) = mpsc::unbounded();
        let answers = raft.stream_append(requests);
        futures::pin_mut!(answers);
        let mut waiting: VecDeque<oneshot::Sender<Answer>> = VecDeque::new();
        loop {
            tokio::select! {
                submitted = rx.next() => {
                    let Some((req, waiter)) = submitted else { break };
                    if input.unbounded_send(req).is_err() {
                        break;
                    }
                    waiting.push_back(waiter);
                }
                answer = answers.next(), if !waiting.is_empty() => {
                    let Some(answer) = answer else { break };
                    let ended = !matches!(answer, Ok(Ok(_)));
                    if let Some(waiter) = waiting.pop_front() {
                        let _ = waiter.send(answer);
                    }
                    if ended {
                        break;
                    }
                }
            }
        }
    }));
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Tasks that start in any order take their turns in ticket order, and a turn given up
    /// (dropped unused, as a refused or cancelled request's is) lets the next one go.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn turns_follow_tickets_whatever_order_tasks_start_in() {
        let pipe = Arc::new(AppendPipe::default());
        let turns: Vec<Turn> = (0..64).map(|_| pipe.turn(pipe.ticket())).collect();
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for turn in turns.into_iter().rev() {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                if turn.ticket % 7 == 3 {
                    return; // given up: dropped without waiting
                }
                tokio::task::yield_now().await;
                turn.wait().await;
                order.lock().push(turn.ticket);
            }));
        }
        let all = futures::future::join_all(tasks);
        for task in tokio::time::timeout(std::time::Duration::from_secs(10), all)
            .await
            .expect("every turn comes up: none waits behind a ticket given up")
        {
            task.expect("task");
        }
        let expected: Vec<u64> = (1..=64).filter(|t| t % 7 != 3).collect();
        assert_eq!(*order.lock(), expected);
    }

    /// A turn dropped while waiting (its request cancelled) does not hold up the ones after it.
    #[tokio::test]
    async fn a_turn_cancelled_while_waiting_lets_the_next_go() {
        let pipe = Arc::new(AppendPipe::default());
        let first = pipe.turn(pipe.ticket());
        let second = pipe.turn(pipe.ticket());
        let third = pipe.turn(pipe.ticket());
        let waiting = tokio::spawn(async move { second.wait().await });
        tokio::task::yield_now().await;
        waiting.abort();
        assert!(waiting.await.is_err());
        drop(first);
        tokio::time::timeout(std::time::Duration::from_secs(5), third.wait())
            .await
            .expect("the third turn comes once the first passed and the second was cancelled");
    }
}
