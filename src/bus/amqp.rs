//! RabbitMQ (AMQP 0-9-1), with `lapin`: [`AmqpSource`] for the intake,
//! [`AmqpSink`] for the publisher.
//!
//! - The intake consumes with manual acknowledgements and a bounded
//!   prefetch; its queue (and the dead-letter queue) is declared durable
//!   when missing, and an existing one is used as it is.
//! - Everything the bus publishes (dead letters, evidence) is persistent,
//!   mandatory (an unroutable message is an error, not a silent drop) and
//!   sent on a channel in confirm mode: it counts only once the broker's
//!   publisher confirm says it holds it.

use std::collections::HashMap;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    BasicRejectOptions, ConfirmSelectOptions, ExchangeDeclareOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::{
    Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind, PublisherConfirm,
};

use super::intake::{Inbound, MessageSource};
use super::publish::{EvidenceMessage, EvidenceSink, Unconfirmed, send_then_confirm};
use super::runtime::{CLOSE_WAIT, Runtime};
use super::{BusError, HEADER_REASON, header_value, redact};

/// Persistent delivery: the broker writes the message to disk.
const PERSISTENT: u8 = 2;

/// How an [`AmqpSource`] consumes.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct AmqpSourceOptions {
    /// Unacknowledged messages the broker sends ahead (default 32).
    pub prefetch: u16,
    /// The dead-letter queue, declared durable when missing.
    pub dead_letter: Option<String>,
}

impl Default for AmqpSourceOptions {
    fn default() -> Self {
        AmqpSourceOptions {
            prefetch: 32,
            dead_letter: None,
        }
    }
}

impl AmqpSourceOptions {
    /// With `prefetch` messages sent ahead (at least one).
    pub fn with_prefetch(mut self, prefetch: u16) -> Self {
        self.prefetch = prefetch.max(1);
        self
    }

    /// Refused messages go to the queue `name`.
    pub fn with_dead_letter(mut self, name: impl Into<String>) -> Self {
        self.dead_letter = Some(name.into());
        self
    }
}

/// A RabbitMQ queue as a [`MessageSource`].
pub struct AmqpSource {
    runtime: Runtime,
    url: String,
    broker: String,
    queue: ShortString,
    dead_letter: Option<ShortString>,
    prefetch: u16,
    link: Option<SourceLink>,
    pending: HashMap<u64, Acker>,
    next_token: u64,
}

struct SourceLink {
    connection: Connection,
    consumer: Consumer,
    /// A channel in confirm mode for dead letters.
    confirms: Channel,
}

impl std::fmt::Debug for AmqpSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSource")
            .field("broker", &self.broker)
            .field("queue", &self.queue)
            .field("connected", &self.link.is_some())
            .finish_non_exhaustive()
    }
}

impl AmqpSource {
    /// Connects to `url` (`amqp://USER:PASS@HOST:PORT/VHOST`) and consumes
    /// `queue`, declaring it (and the dead-letter queue) durable if missing.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the broker cannot be reached; a
    /// [`BusError`] when it refuses the queue.
    pub fn connect(url: &str, queue: &str, options: AmqpSourceOptions) -> Result<Self, BusError> {
        let mut source = AmqpSource {
            runtime: Runtime::new("amqp-intake")?,
            url: url.to_owned(),
            broker: redact(url),
            queue: short_name(queue, "queue")?,
            dead_letter: options
                .dead_letter
                .as_deref()
                .map(|name| short_name(name, "dead-letter queue"))
                .transpose()?,
            prefetch: options.prefetch.max(1),
            link: None,
            pending: HashMap::new(),
            next_token: 0,
        };
        source.reconnect()?;
        Ok(source)
    }

    async fn open(&self) -> Result<SourceLink, BusError> {
        let broker = self.broker.as_str();
        let connection = connect(&self.url, broker, "job-executor intake").await?;
        declare_queue(&connection, broker, &self.queue).await?;
        if let Some(dead_letter) = &self.dead_letter {
            declare_queue(&connection, broker, dead_letter).await?;
        }
        let channel = new_channel(&connection, broker).await?;
        channel
            .basic_qos(self.prefetch, BasicQosOptions::default())
            .await
            .map_err(|e| classify(broker, "setting the prefetch", e))?;
        let consumer = channel
            .basic_consume(
                self.queue.clone(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(|e| classify(broker, &format!("consuming queue {}", self.queue), e))?;
        let confirms = confirm_channel(&connection, broker).await?;
        Ok(SourceLink {
            connection,
            consumer,
            confirms,
        })
    }

    fn take(&mut self, delivery: Delivery) -> Inbound {
        let token = self.next_token;
        self.next_token += 1;
        let message_id = delivery
            .properties
            .message_id()
            .as_ref()
            .map(|id| id.as_str().to_owned());
        self.pending.insert(token, delivery.acker);
        Inbound {
            message_id,
            body: delivery.data,
            redelivered: delivery.redelivered,
            token,
        }
    }

    fn settle(&mut self, message: &Inbound, how: Settle) -> Result<(), BusError> {
        let Some(acker) = self.pending.remove(&message.token) else {
            return Err(BusError::disconnected(
                &self.broker,
                "the message was delivered on a connection since lost; it comes back",
            ));
        };
        let done = self.runtime.block_on(async {
            match how {
                Settle::Ack => acker.ack(BasicAckOptions::default()).await,
                Settle::Release => {
                    acker
                        .nack(BasicNackOptions {
                            requeue: true,
                            ..BasicNackOptions::default()
                        })
                        .await
                }
                Settle::Reject => acker.reject(BasicRejectOptions { requeue: false }).await,
            }
        });
        match done {
            Ok(true) => Ok(()),
            Ok(false) => Err(BusError::disconnected(
                &self.broker,
                "the channel closed before the message was settled; it comes back",
            )),
            Err(e) => Err(classify(&self.broker, "settling a message", e)),
        }
    }
}

#[derive(Clone, Copy)]
enum Settle {
    Ack,
    Release,
    Reject,
}

impl MessageSource for AmqpSource {
    fn next(&mut self, wait: Duration) -> Result<Option<Inbound>, BusError> {
        let Some(link) = self.link.as_mut() else {
            return Err(BusError::disconnected(&self.broker, "not connected"));
        };
        match self.runtime.block_on_for(wait, link.consumer.next()) {
            None => Ok(None),
            Some(Some(Ok(delivery))) => Ok(Some(self.take(delivery))),
            Some(Some(Err(e))) => {
                self.link = None;
                Err(classify(&self.broker, "consuming", e))
            }
            Some(None) => {
                self.link = None;
                Err(BusError::disconnected(
                    &self.broker,
                    &format!("the broker cancelled the consumer of queue {}", self.queue),
                ))
            }
        }
    }

    fn ack(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, Settle::Ack)
    }

    fn release(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, Settle::Release)
    }

    fn reject(&mut self, message: &Inbound) -> Result<(), BusError> {
        self.settle(message, Settle::Reject)
    }

    fn dead_letter(&mut self, message: &Inbound, reason: &str) -> Result<bool, BusError> {
        let Some(queue) = &self.dead_letter else {
            return Ok(false);
        };
        let Some(link) = &self.link else {
            return Err(BusError::disconnected(&self.broker, "not connected"));
        };
        let mut properties = BasicProperties::default()
            .with_headers(string_table(&[(HEADER_REASON, header_value(reason))]));
        if let Some(id) = message.message_id.as_deref() {
            properties = properties.with_message_id(short_name(id, "message id")?);
        }
        let confirm = self.runtime.block_on(publish(
            &link.confirms,
            &ShortString::from(""),
            queue,
            &message.body,
            properties,
        ));
        check_confirm(&self.broker, confirm)?;
        Ok(true)
    }

    fn reconnect(&mut self) -> Result<(), BusError> {
        self.close();
        self.link = Some(self.runtime.block_on(self.open())?);
        Ok(())
    }

    fn close(&mut self) {
        // Unacknowledged messages, prefetched ones included, go back to the
        // queue when the connection closes.
        self.pending.clear();
        if let Some(link) = self.link.take() {
            self.runtime
                .block_on_for(CLOSE_WAIT, close_quietly(&link.connection));
        }
    }
}

impl Drop for AmqpSource {
    fn drop(&mut self) {
        self.close();
    }
}

/// A RabbitMQ exchange as an [`EvidenceSink`].
pub struct AmqpSink {
    runtime: Runtime,
    url: String,
    broker: String,
    exchange: ShortString,
    routing_key: ShortString,
    link: Option<(Connection, Channel)>,
}

impl std::fmt::Debug for AmqpSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AmqpSink")
            .field("broker", &self.broker)
            .field("exchange", &self.exchange)
            .field("routing_key", &self.routing_key)
            .finish_non_exhaustive()
    }
}

impl AmqpSink {
    /// Connects to `url` to publish to `exchange` (which must exist; `""`
    /// is the default exchange, where the routing key names a queue) with
    /// `routing_key`.
    ///
    /// # Errors
    /// [`BusError::Disconnected`] when the broker cannot be reached; a
    /// [`BusError`] when the exchange does not exist.
    pub fn connect(url: &str, exchange: &str, routing_key: &str) -> Result<Self, BusError> {
        let mut sink = AmqpSink {
            runtime: Runtime::new("amqp-publish")?,
            url: url.to_owned(),
            broker: redact(url),
            exchange: short_name(exchange, "exchange")?,
            routing_key: short_name(routing_key, "routing key")?,
            link: None,
        };
        sink.reconnect()?;
        Ok(sink)
    }

    async fn open(&self) -> Result<(Connection, Channel), BusError> {
        let connection = connect(&self.url, &self.broker, "job-executor publish").await?;
        if !self.exchange.as_str().is_empty() {
            let probe = new_channel(&connection, &self.broker).await?;
            let passive = ExchangeDeclareOptions {
                passive: true,
                ..ExchangeDeclareOptions::default()
            };
            probe
                .exchange_declare(
                    self.exchange.clone(),
                    ExchangeKind::Direct,
                    passive,
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    classify(
                        &self.broker,
                        &format!("exchange {} (it must exist)", self.exchange),
                        e,
                    )
                })?;
            close_channel_quietly(&probe).await;
        }
        let channel = confirm_channel(&connection, &self.broker).await?;
        Ok((connection, channel))
    }

    /// Sends the whole batch, then waits for the confirms in order.
    async fn publish_all(
        &self,
        channel: &Channel,
        batch: &[EvidenceMessage],
    ) -> Result<(), Unconfirmed> {
        let send = async |message: &EvidenceMessage| {
            let properties = BasicProperties::default()
                .with_headers(string_table(&message.headers()))
                .with_content_type(ShortString::from("application/json"))
                .with_message_id(short_name(&message.message_id, "message id")?);
            let routing = (&self.exchange, &self.routing_key);
            publish_start(channel, routing, &message.body, properties)
                .await
                .map_err(|e| classify(&self.broker, "publishing evidence", e))
        };
        let confirm = async |pending: PublisherConfirm| check_confirm(&self.broker, pending.await);
        send_then_confirm(batch, send, confirm).await
    }
}

impl EvidenceSink for AmqpSink {
    fn publish(&mut self, batch: &[EvidenceMessage]) -> Result<(), Unconfirmed> {
        let Some((_, channel)) = &self.link else {
            return Err(Unconfirmed {
                confirmed: 0,
                error: BusError::disconnected(&self.broker, "not connected"),
            });
        };
        let outcome = self.runtime.block_on(self.publish_all(channel, batch));
        if let Err(Unconfirmed { error, .. }) = &outcome
            && error.needs_reconnect()
        {
            self.close();
        }
        outcome
    }

    fn reconnect(&mut self) -> Result<(), BusError> {
        self.close();
        self.link = Some(self.runtime.block_on(self.open())?);
        Ok(())
    }

    fn close(&mut self) {
        if let Some((connection, _)) = self.link.take() {
            self.runtime
                .block_on_for(CLOSE_WAIT, close_quietly(&connection));
        }
    }
}

impl Drop for AmqpSink {
    fn drop(&mut self) {
        self.close();
    }
}

fn short_name(text: &str, what: &str) -> Result<ShortString, BusError> {
    ShortString::try_new(text).map_err(|_| {
        BusError::Config(format!(
            "AMQP {what} {text:?} is longer than 255 bytes, the most AMQP carries"
        ))
    })
}

fn string_table(entries: &[(&str, String)]) -> FieldTable {
    let mut table = FieldTable::default();
    for (name, value) in entries {
        table.insert(
            ShortString::from(*name),
            AMQPValue::LongString(LongString::from(value.as_str())),
        );
    }
    table
}

/// A channel-level refusal (a queue that does not exist, a precondition, a
/// permission) is the broker's answer and stays so; anything else — the
/// socket, the connection, a missed heartbeat — is a lost connection.
fn classify(broker: &str, context: &str, error: lapin::Error) -> BusError {
    if error.is_amqp_soft_error() {
        BusError::Broker {
            broker: broker.to_owned(),
            context: context.to_owned(),
            detail: error.to_string(),
        }
    } else {
        BusError::disconnected(broker, &format!("{context}: {error}"))
    }
}

async fn connect(url: &str, broker: &str, name: &str) -> Result<Connection, BusError> {
    let properties = ConnectionProperties::default().with_connection_name(LongString::from(name));
    Connection::connect(url, properties)
        .await
        .map_err(|e| BusError::disconnected(broker, &format!("connecting: {e}")))
}

async fn new_channel(connection: &Connection, broker: &str) -> Result<Channel, BusError> {
    connection
        .create_channel()
        .await
        .map_err(|e| classify(broker, "opening a channel", e))
}

async fn confirm_channel(connection: &Connection, broker: &str) -> Result<Channel, BusError> {
    let channel = new_channel(connection, broker).await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| classify(broker, "enabling publisher confirms", e))?;
    Ok(channel)
}

/// Declares `queue` durable unless it exists; an existing queue is used as
/// it is, whatever its arguments (a quorum queue, a length limit).
async fn declare_queue(
    connection: &Connection,
    broker: &str,
    queue: &ShortString,
) -> Result<(), BusError> {
    let probe = new_channel(connection, broker).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    let exists = probe
        .queue_declare(queue.clone(), passive, FieldTable::default())
        .await
        .is_ok();
    // A failed passive declare closes its channel; a successful one is
    // closed here.
    if exists {
        close_channel_quietly(&probe).await;
        return Ok(());
    }
    let channel = new_channel(connection, broker).await?;
    let durable = QueueDeclareOptions {
        durable: true,
        ..QueueDeclareOptions::default()
    };
    channel
        .queue_declare(queue.clone(), durable, FieldTable::default())
        .await
        .map_err(|e| classify(broker, &format!("declaring queue {queue}"), e))?;
    close_channel_quietly(&channel).await;
    Ok(())
}

/// Sends one persistent, mandatory message; the returned future is its
/// publisher confirm.
async fn publish_start(
    channel: &Channel,
    (exchange, routing_key): (&ShortString, &ShortString),
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<PublisherConfirm> {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    channel
        .basic_publish(
            exchange.clone(),
            routing_key.clone(),
            options,
            body,
            properties.with_delivery_mode(PERSISTENT),
        )
        .await
}

/// Sends one message and waits for its publisher confirm.
async fn publish(
    channel: &Channel,
    exchange: &ShortString,
    routing_key: &ShortString,
    body: &[u8],
    properties: BasicProperties,
) -> lapin::Result<Confirmation> {
    publish_start(channel, (exchange, routing_key), body, properties)
        .await?
        .await
}

/// Only a positive confirm of a routed message counts.
fn check_confirm(broker: &str, confirmation: lapin::Result<Confirmation>) -> Result<(), BusError> {
    let not_confirmed = |detail: String| BusError::NotConfirmed {
        broker: broker.to_owned(),
        detail,
    };
    match confirmation {
        Ok(Confirmation::Ack(None)) => Ok(()),
        Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned))) => {
            Err(not_confirmed(format!(
                "returned by the broker ({} {}): no queue is bound for it",
                returned.reply_code, returned.reply_text
            )))
        }
        Ok(Confirmation::Nack(None)) => Err(not_confirmed(
            "the broker could not take the message (negative confirm)".to_owned(),
        )),
        Ok(Confirmation::NotRequested) => Err(not_confirmed(
            "the channel is not in confirm mode".to_owned(),
        )),
        Err(e) => Err(classify(broker, "waiting for a publisher confirm", e)),
    }
}

async fn close_channel_quietly(channel: &Channel) {
    // Closing is a courtesy: the connection's end closes it anyway.
    let _ = channel.close(200, ShortString::from("done")).await;
}

async fn close_quietly(connection: &Connection) {
    // Closing is a courtesy: a dropped socket has the same effect for the
    // broker (unacknowledged messages go back to their queue).
    let _ = connection.close(200, ShortString::from("bye")).await;
}
