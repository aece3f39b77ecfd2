//! NATS JetStream, with `async-nats`: [`JetStreamSource`] for the intake,
//! [`JetStreamSink`] for the publisher.
//!
//! - The intake reads through a durable pull consumer with explicit acks,
//!   on a stream created (file storage) when missing. A refused message is
//!   published to the dead-letter subject and the publish ack awaited
//!   before the message is acked; without a dead letter it is terminated
//!   (`term`): never redelivered, never lost silently (the reason is
//!   logged).
//! - The publisher sets `Nats-Msg-Id` to `<job_id>:<head>` and counts a
//!   message only once its publish ack is in; a republished message within
//!   the stream's duplicate window is dropped by the server.
//!
//! The client reconnects by itself, backing off as [`Backoff`] says; the
//! loops back off too while it does.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};
use async_nats::jetstream::context::{
    Context, CreateStreamErrorKind, PublishAckFuture, PublishErrorKind,
};
use async_nats::jetstream::message::AckKind;
use async_nats::jetstream::stream::ConsumerErrorKind;
use async_nats::jetstream::{self, Message, stream};
use async_nats::{Client, HeaderMap};
use futures_util::StreamExt;

use super::intake::{Inbound, MessageSource};
use super::publish::{EvidenceMessage, EvidenceSink, Unconfirmed, send_then_confirm};
use super::runtime::{CLOSE_WAIT, Runtime};
use super::{Backoff, BusError, HEADER_MESSAGE_ID, HEADER_REASON, header_value, redact};

/// The header JetStream dedupes on.
pub const NATS_MSG_ID: &str = "Nats-Msg-Id";

/// How a [`JetStreamSource`] consumes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct JetStreamSourceOptions {
    /// The durable consumer's name (default `job-executor-intake`):
    /// intakes sharing it share the work.
    pub consumer: String,
    /// Messages fetched at a time, held unacknowledged (default 32).
    pub batch: usize,
    /// The dead-letter subject; a stream must capture it (the intake's own
    /// stream does when the intake creates it).
    pub dead_letter: Option<String>,
    /// How long the server waits for an ack before it delivers a message
    /// again (default 30 s), for a consumer the intake creates.
    pub ack_wait: Duration,
}

impl Default for JetStreamSourceOptions {
    fn default() -> Self {
        JetStreamSourceOptions {
            consumer: "job-executor-intake".to_owned(),
            batch: 32,
            dead_letter: None,
            ack_wait: Duration::from_secs(30),
        }
    }
}

impl JetStreamSourceOptions {
    /// With the durable consumer `name`.
    pub fn with_consumer(mut self, name: impl Into<String>) -> Self {
        self.consumer = name.into();
        self
    }

    /// Fetching up to `batch` messages at a time (at least one).
    pub fn with_batch(mut self, batch: usize) -> Self {
        self.batch = batch.max(1);
        self
    }

    /// Refused messages go to the subject `subject`.
    pub fn with_dead_letter(mut self, subject: impl Into<String>) -> Self {
        self.dead_letter = Some(subject.into());
        self
    }

    /// With the server waiting `ack_wait` for an ack.
    pub fn with_ack_wait(mut self, ack_wait: Duration) -> Self {
        self.ack_wait = ack_wait;
        self
    }
}

/// A JetStream stream, read through a durable pull consumer, as a
/// [`MessageSource`].
pub struct JetStreamSource {
    runtime: Runtime,
    url: String,
    broker: String,
    stream: String,
    subject: String,
    options: JetStreamSourceOptions,
    link: Option<SourceLink>,
    fetched: VecDeque<Message>,
    pending: HashMap<u64, Message>,
    next_token: u64,
}

struct SourceLink {
    client: Client,
    context: Context,
    consumer: PullConsumer,
}

impl std::fmt::Debug for JetStreamSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSource")
            .field("broker", &self.broker)
            .field("stream", &self.stream)
            .field("subject", &self.subject)
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl JetStreamSource {
    /// Connects to `url` (`nats://HOST:PORT`) and reads `subject` of
    /// `stream` (created when missing, capturing `subject` and the dead
    /// letter's subject) through the durable consumer of `options`.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the server cannot be reached; a
    /// [`BusError`] when it refuses the stream or the consumer, or when no
    /// stream captures the dead-letter subject.
    pub fn connect(
        url: &str,
        stream: &str,
        subject: &str,
        options: JetStreamSourceOptions,
    ) -> Result<Self, BusError> {
        if let Some(dead_letter) = &options.dead_letter
            && subject_matches(subject, dead_letter)
        {
            return Err(BusError::Config(format!(
                "the dead-letter subject {dead_letter} is among the intake's subjects \
                 ({subject}): the intake would read its own dead letters"
            )));
        }
        let mut source = JetStreamSource {
            runtime: Runtime::new("nats-intake")?,
            url: url.to_owned(),
            broker: redact(url),
            stream: stream.to_owned(),
            subject: subject.to_owned(),
            options,
            link: None,
            fetched: VecDeque::new(),
            pending: HashMap::new(),
            next_token: 0,
        };
        source.reconnect()?;
        Ok(source)
    }

    async fn open(&self) -> Result<SourceLink, BusError> {
        let broker = self.broker.as_str();
        let client = connect(&self.url, broker, "job-executor intake").await?;
        let context = jetstream::new(client.clone());
        let mut subjects = vec![self.subject.clone()];
        subjects.extend(self.options.dead_letter.iter().cloned());
        let config = stream::Config {
            name: self.stream.clone(),
            subjects,
            storage: stream::StorageType::File,
            ..stream::Config::default()
        };
        let stream = context.get_or_create_stream(config).await.map_err(|e| {
            let server_said = matches!(e.kind(), CreateStreamErrorKind::JetStream(_));
            refused(broker, &format!("stream {}", self.stream), server_said, e)
        })?;
        if let Some(dead_letter) = &self.options.dead_letter {
            context
                .stream_by_subject(dead_letter.as_str())
                .await
                .map_err(|e| {
                    BusError::Config(format!(
                        "{broker}: no stream captures the dead-letter subject {dead_letter} ({e}); \
                     add it to a stream"
                    ))
                })?;
        }
        let name = &self.options.consumer;
        let config = pull::Config {
            durable_name: Some(name.clone()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: self.options.ack_wait,
            filter_subject: self.subject.clone(),
            ..pull::Config::default()
        };
        let consumer = stream
            .get_or_create_consumer(name, config)
            .await
            .map_err(|e| {
                let server_said = matches!(e.kind(), ConsumerErrorKind::JetStream(_));
                refused(broker, &format!("consumer {name}"), server_said, e)
            })?;
        Ok(SourceLink {
            client,
            context,
            consumer,
        })
    }

    /// Fetches what is there now; failing that, waits up to `wait` for one
    /// message. Every fetch ends before it returns, so nothing is left on
    /// its way to a subscription no one reads.
    async fn fetch(consumer: &PullConsumer, batch: usize, wait: Duration) -> FetchResult {
        let mut messages = Vec::new();
        let ready = consumer.fetch().max_messages(batch).messages().await;
        collect(ready, &mut messages).await?;
        // A pull request without an expiry would never end: no wait, no
        // second request.
        if messages.is_empty() && !wait.is_zero() {
            let waited = consumer
                .batch()
                .max_messages(1)
                .expires(wait)
                .messages()
                .await;
            collect(waited, &mut messages).await?;
        }
        Ok(messages)
    }

    fn hand_out(&mut self, message: Message) -> Inbound {
        let token = self.next_token;
        self.next_token += 1;
        let message_id = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(NATS_MSG_ID))
            .map(|id| id.as_str().to_owned());
        let redelivered = message.info().is_ok_and(|info| info.delivered > 1);
        let body = message.payload.to_vec();
        self.pending.insert(token, message);
        Inbound {
            message_id,
            body,
            redelivered,
            token,
        }
    }

    fn settle(&mut self, message: &Inbound, kind: AckKind) -> Result<(), BusError> {
        let Some(pending) = self.pending.remove(&message.token) else {
            return Err(BusError::disconnected(
                &self.broker,
                "the message is no longer held",
            ));
        };
        self.runtime
            .block_on(pending.ack_with(kind))
            .map_err(|e| BusError::disconnected(&self.broker, &format!("acknowledging: {e}")))
    }
}

type FetchResult = Result<Vec<Message>, String>;

async fn collect<S, E1, E2>(batch: Result<S, E1>, into: &mut Vec<Message>) -> Result<(), String>
where
    S: futures_util::Stream<Item = Result<Message, E2>> + Unpin,
    E1: std::fmt::Display,
    E2: std::fmt::Display,
{
    let mut batch = batch.map_err(|e| e.to_string())?;
    while let Some(message) = batch.next().await {
        into.push(message.map_err(|e| e.to_string())?);
    }
    Ok(())
}

impl MessageSource for JetStreamSource {
    fn next(&mut self, wait: Duration) -> Result<Option<Inbound>, BusError> {
        if self.fetched.is_empty() {
            let Some(link) = &self.link else {
                return Err(BusError::disconnected(&self.broker, "not connected"));
            };
            let fetch = Self::fetch(&link.consumer, self.options.batch, wait);
            // The server ends the wait at `wait`; the margin covers a
            // server that is gone.
            let fetched = self
                .runtime
                .block_on_for(wait + Duration::from_secs(5), fetch)
                .unwrap_or_else(|| Err("no answer to a pull request".to_owned()))
                .map_err(|e| BusError::disconnected(&self.broker, &format!("fetching: {e}")))?;
            self.fetched.extend(fetched);
        }
        Ok(self
            .fetched
            .pop_front()
            .map(|message| self.hand_out(message)))
    }

    fn ack(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, AckKind::Ack)
    }

    fn release(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, AckKind::Nak(None))
    }

    fn reject(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, AckKind::Term)
    }

    fn dead_letter(&mut self, message: &Inbound, reason: &str) -> Result<bool, BusError> {
        let Some(subject) = self.options.dead_letter.clone() else {
            return Ok(false);
        };
        let (Some(link), Some(held)) = (&self.link, self.pending.get(&message.token)) else {
            return Err(BusError::disconnected(
                &self.broker,
                "the message is no longer held",
            ));
        };
        let mut headers = HeaderMap::new();
        headers.insert(HEADER_REASON, header_value(reason).as_str());
        // One dead letter per stored message, however often it is refused:
        // the stream's duplicate window drops a second copy.
        if let Ok(info) = held.info() {
            let id = format!("dead-letter:{}:{}", info.stream, info.stream_sequence);
            headers.insert(NATS_MSG_ID, id.as_str());
        }
        if let Some(id) = &message.message_id {
            headers.insert(HEADER_MESSAGE_ID, header_value(id).as_str());
        }
        let body = message.body.clone().into();
        let acked = self.runtime.block_on(async {
            let ack = link.context.publish_with_headers(subject, headers, body);
            ack.await
                .map_err(publish_failed)?
                .await
                .map_err(publish_failed)
        });
        acked.map_err(|e| e.at(&self.broker))?;
        Ok(true)
    }

    fn reconnect(&mut self) -> Result<(), BusError> {
        self.close();
        self.link = Some(self.runtime.block_on(self.open())?);
        Ok(())
    }

    fn close(&mut self) {
        let mut unsettled: Vec<Message> = self.fetched.drain(..).collect();
        unsettled.extend(self.pending.drain().map(|(_, message)| message));
        if let Some(link) = self.link.take() {
            // What was fetched and not settled goes back at once rather
            // than after the ack wait; acks still buffered are sent. A
            // server that is gone gets a moment, not more.
            self.runtime.block_on_for(CLOSE_WAIT, async {
                for message in unsettled {
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                }
                let _ = link.client.flush().await;
            });
        }
    }
}

impl Drop for JetStreamSource {
    fn drop(&mut self) {
        self.close();
    }
}

/// A JetStream subject as an [`EvidenceSink`]. A stream must capture the
/// subject; its duplicate window is what drops a republished message.
pub struct JetStreamSink {
    runtime: Runtime,
    url: String,
    broker: String,
    subject: String,
    link: Option<(Client, Context)>,
}

impl std::fmt::Debug for JetStreamSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JetStreamSink")
            .field("broker", &self.broker)
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl JetStreamSink {
    /// Connects to `url` to publish to `subject`.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the server cannot be reached;
    /// [`BusError::Config`] when no stream captures `subject`.
    pub fn connect(url: &str, subject: &str) -> Result<Self, BusError> {
        let mut sink = JetStreamSink {
            runtime: Runtime::new("nats-publish")?,
            url: url.to_owned(),
            broker: redact(url),
            subject: subject.to_owned(),
            link: None,
        };
        sink.reconnect()?;
        Ok(sink)
    }

    async fn open(&self) -> Result<(Client, Context), BusError> {
        let client = connect(&self.url, &self.broker, "job-executor publish").await?;
        let context = jetstream::new(client.clone());
        context
            .stream_by_subject(self.subject.as_str())
            .await
            .map_err(|e| {
                BusError::Config(format!(
                    "{}: no stream captures the subject {} ({e}); create one",
                    self.broker, self.subject
                ))
            })?;
        Ok((client, context))
    }

    /// Sends the whole batch, then waits for the publish acks in order.
    async fn publish_all(
        &self,
        context: &Context,
        batch: &[EvidenceMessage],
    ) -> Result<(), Unconfirmed> {
        let send = async |message: &EvidenceMessage| {
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MSG_ID, message.message_id.as_str());
            for (name, value) in message.headers() {
                headers.insert(name, value.as_str());
            }
            let body = message.body.clone().into();
            context
                .publish_with_headers(self.subject.clone(), headers, body)
                .await
                .map_err(|e| publish_failed(e).at(&self.broker))
        };
        let confirm = async |ack: PublishAckFuture| {
            ack.await
                .map(drop)
                .map_err(|e| publish_failed(e).at(&self.broker))
        };
        send_then_confirm(batch, send, confirm).await
    }
}

impl EvidenceSink for JetStreamSink {
    fn publish(&mut self, batch: &[EvidenceMessage]) -> Result<(), Unconfirmed> {
        let Some((_, context)) = &self.link else {
            return Err(Unconfirmed {
                confirmed: 0,
                error: BusError::disconnected(&self.broker, "not connected"),
            });
        };
        self.runtime.block_on(self.publish_all(context, batch))
    }

    fn reconnect(&mut self) -> Result<(), BusError> {
        self.close();
        self.link = Some(self.runtime.block_on(self.open())?);
        Ok(())
    }

    fn close(&mut self) {
        if let Some((client, _)) = self.link.take() {
            self.runtime.block_on_for(CLOSE_WAIT, client.flush());
        }
    }
}

impl Drop for JetStreamSink {
    fn drop(&mut self) {
        self.close();
    }
}

/// A publish that failed, before the broker's name is known.
struct PublishFailure {
    too_large: bool,
    detail: String,
}

impl PublishFailure {
    /// A message over the server's `max_payload` will never fit: that is a
    /// refusal to report, not a failure to wait out.
    fn at(self, broker: &str) -> BusError {
        if self.too_large {
            BusError::Broker {
                broker: broker.to_owned(),
                context: "publishing".to_owned(),
                detail: self.detail,
            }
        } else {
            BusError::NotConfirmed {
                broker: broker.to_owned(),
                detail: self.detail,
            }
        }
    }
}

fn publish_failed(error: jetstream::context::PublishError) -> PublishFailure {
    PublishFailure {
        too_large: matches!(error.kind(), PublishErrorKind::MaxPayloadExceeded),
        detail: error.to_string(),
    }
}

/// A JetStream API error is the server's answer and stays so; a timeout
/// or a failed request is a lost connection.
fn refused(broker: &str, what: &str, server_said: bool, error: impl std::fmt::Display) -> BusError {
    if server_said {
        BusError::Broker {
            broker: broker.to_owned(),
            context: what.to_owned(),
            detail: error.to_string(),
        }
    } else {
        BusError::disconnected(broker, &format!("{what}: {error}"))
    }
}

async fn connect(url: &str, broker: &str, name: &str) -> Result<Client, BusError> {
    let backoff = Backoff::default();
    async_nats::ConnectOptions::new()
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .reconnect_delay_callback(move |attempt| {
            backoff.delay_jittered(u32::try_from(attempt).unwrap_or(u32::MAX))
        })
        .connect(url)
        .await
        .map_err(|e| BusError::disconnected(broker, &format!("connecting: {e}")))
}

/// Whether `filter` (NATS subject syntax: `*` one token, `>` the rest)
/// matches `subject`.
fn subject_matches(filter: &str, subject: &str) -> bool {
    let mut filter = filter.split('.');
    let mut subject = subject.split('.');
    loop {
        match (filter.next(), subject.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(f), Some(s)) if f == s => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::subject_matches;

    #[test]
    fn subject_filters_match_as_nats_does() {
        assert!(subject_matches("plans", "plans"));
        assert!(subject_matches("plans.*", "plans.in"));
        assert!(subject_matches("plans.>", "plans.in.dead"));
        assert!(subject_matches("*.in", "plans.in"));
        assert!(!subject_matches("plans.*", "plans.in.dead"));
        assert!(!subject_matches("plans", "plans.dead"));
        assert!(!subject_matches("plans.>", "plans"));
        assert!(!subject_matches("plans.in", "plans.dead"));
    }
}
