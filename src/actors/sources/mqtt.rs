//! The MQTT source actor: owns one MQTT 5 client and runs its two loops
//! ([`crate::mqtt::run_connection`], [`crate::mqtt::run_ingest`]); the logic is in
//! `src/mqtt.rs`. A loop that ends on its own (a panic, the event loop gone) fails the
//! actor, and the source supervisor starts a new client on the same session: what was
//! not acknowledged is redelivered and recognised.

use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

/// What a graceful stop may take at most (in-flight batches acknowledged, DISCONNECT).
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

pub struct MqttSource;

/// The source's arguments: what its ingest loop needs.
pub type MqttSourceArgs = crate::mqtt::IngestSetup;

pub enum MqttSourceMsg {
    Failed(String),
}

pub struct MqttSourceState {
    stop: watch::Sender<bool>,
    connection: Option<Completion>,
    ingest: Option<Completion>,
}

impl Actor for MqttSource {
    type Msg = MqttSourceMsg;
    type State = MqttSourceState;
    type Arguments = MqttSourceArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<MqttSourceMsg>,
        args: MqttSourceArgs,
    ) -> Result<MqttSourceState, ActorProcessingErr> {
        let options = crate::mqtt::options(&args.shared.config)?;
        let capacity = usize::from(args.shared.config.receive_maximum) + 1024;
        let (client, eventloop) = rumqttc::v5::AsyncClient::new(options, capacity);
        let (to_ingest, from_connection) = mpsc::channel(capacity);
        let (stop, stop_rx) = watch::channel(false);
        let (drained_tx, drained_rx) = watch::channel(false);
        args.shared.set_running(true);
        let watch = |name: &'static str, handle: JoinHandle<()>| {
            let myself = myself.clone();
            tokio::spawn(async move {
                let reason = match handle.await {
                    Ok(()) => format!("the {name} loop ended"),
                    Err(error) if error.is_panic() => format!("the {name} loop panicked: {error}"),
                    Err(_) => return, // aborted by post_stop
                };
                let _ = myself.send_message(MqttSourceMsg::Failed(reason));
            })
        };
        let connection = tokio::spawn(crate::mqtt::run_connection(
            Arc::clone(&args.shared),
            client.clone(),
            eventloop,
            to_ingest,
            stop_rx,
            drained_rx,
        ));
        let ingest = tokio::spawn(crate::mqtt::run_ingest(args, client, from_connection, drained_tx));
        // The watchers report a loop that ends while the actor runs; their handles go.
        let (connection_done, connection) = split(connection);
        let (ingest_done, ingest) = split(ingest);
        watch("connection", connection_done);
        watch("ingest", ingest_done);
        Ok(MqttSourceState { stop, connection: Some(connection), ingest: Some(ingest) })
    }

    async fn handle(
        &self,
        _myself: ActorRef<MqttSourceMsg>,
        message: MqttSourceMsg,
        state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            MqttSourceMsg::Failed(reason) if !*state.stop.borrow() => Err(reason.into()),
            MqttSourceMsg::Failed(_) => Ok(()),
        }
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<MqttSourceMsg>,
        state: &mut MqttSourceState,
    ) -> Result<(), ActorProcessingErr> {
        // Stop taking messages, let the ingest loop acknowledge what it took, disconnect.
        let _ = state.stop.send(true);
        let connection = state.connection.take();
        let ingest = state.ingest.take();
        let finished = tokio::time::timeout(STOP_TIMEOUT, async {
            if let Some(ingest) = ingest {
                ingest.wait().await;
            }
            if let Some(connection) = connection {
                connection.wait().await;
            }
        })
        .await;
        if finished.is_err() {
            tracing::warn!("mqtt source: stop timed out; unacknowledged messages will be redelivered");
        }
        Ok(())
    }
}

/// A task's completion, observable twice: by a watcher (to report an unexpected end)
/// and by `post_stop` (to wait for a graceful one), with the task aborted when the
/// second observer is dropped.
struct Completion {
    done: watch::Receiver<bool>,
    abort: tokio::task::AbortHandle,
}

impl Completion {
    async fn wait(mut self) {
        let _ = self.done.wait_for(|done| *done).await;
        // Stays aborted if the timeout drops this future first (see Drop).
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        self.abort.abort();
    }
}

fn split(handle: JoinHandle<()>) -> (JoinHandle<()>, Completion) {
    let abort = handle.abort_handle();
    let (tx, done) = watch::channel(false);
    let relay = tokio::spawn(async move {
        let outcome = handle.await;
        let _ = tx.send(true);
        if let Err(error) = outcome
            && error.is_panic()
        {
            std::panic::resume_unwind(error.into_panic());
        }
    });
    (relay, Completion { done, abort })
}
