//! The brokers as the tests see them, through the clients directly (not
//! the crate's adapters): publish plans, read what arrived, clean up.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, consumer::pull, stream};
use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind};
use tokio::runtime::Runtime;

/// A name no other test uses.
pub fn unique(prefix: &str) -> String {
    format!(
        "je-test-{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

fn required() -> bool {
    std::env::var("JE_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// Whether `url`'s host and port accept a connection; says `SKIPPED` (or
/// fails, when brokers are required) when not.
fn reachable(test: &str, what: &str, url: &str) -> bool {
    let authority = url.split("://").nth(1).unwrap_or(url);
    let authority = authority.split('/').next().unwrap_or(authority);
    let host_port = authority.rsplit('@').next().unwrap_or(authority);
    let answers = host_port
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .is_some_and(|addr| TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok());
    if !answers {
        assert!(
            !required(),
            "{test}: no {what} at {url}, and JE_REQUIRE_BROKERS=1"
        );
        eprintln!(
            "SKIPPED: {test}: no {what} at {url}; start one or set its URL (JE_REQUIRE_BROKERS=1 makes this a failure)"
        );
    }
    answers
}

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A message as a test reads it back.
#[derive(Debug)]
pub struct Got {
    pub body: Vec<u8>,
    pub message_id: Option<String>,
    pub headers: BTreeMap<String, String>,
}

/// RabbitMQ, with the queues and exchanges a test made (deleted on drop).
pub struct Rabbit {
    pub url: String,
    rt: Runtime,
    connection: Connection,
    channel: Channel,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Rabbit {
    /// The server at `JE_AMQP_URL`, or `None` (the test is skipped).
    pub fn connect(test: &str) -> Option<Rabbit> {
        let url = std::env::var("JE_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned());
        if !reachable(test, "RabbitMQ", &url) {
            return None;
        }
        let rt = runtime();
        let (connection, channel) = rt.block_on(async {
            let connection = Connection::connect(&url, ConnectionProperties::default())
                .await
                .unwrap();
            let channel = connection.create_channel().await.unwrap();
            channel
                .confirm_select(ConfirmSelectOptions::default())
                .await
                .unwrap();
            (connection, channel)
        });
        Some(Rabbit {
            url,
            rt,
            connection,
            channel,
            queues: Vec::new(),
            exchanges: Vec::new(),
        })
    }

    /// A new durable queue.
    pub fn queue(&mut self, prefix: &str) -> String {
        let name = unique(prefix);
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        self.rt
            .block_on(self.channel.queue_declare(
                ShortString::from(name.as_str()),
                options,
                FieldTable::default(),
            ))
            .unwrap();
        self.queues.push(name.clone());
        name
    }

    /// A new direct exchange routing `key` to `queue`.
    pub fn exchange_to(&mut self, queue: &str, key: &str) -> String {
        let name = unique("exchange");
        self.rt.block_on(async {
            let options = ExchangeDeclareOptions {
                durable: true,
                ..ExchangeDeclareOptions::default()
            };
            self.channel
                .exchange_declare(
                    ShortString::from(name.as_str()),
                    ExchangeKind::Direct,
                    options,
                    FieldTable::default(),
                )
                .await
                .unwrap();
            self.channel
                .queue_bind(
                    ShortString::from(queue),
                    ShortString::from(name.as_str()),
                    ShortString::from(key),
                    QueueBindOptions::default(),
                    FieldTable::default(),
                )
                .await
                .unwrap();
        });
        self.exchanges.push(name.clone());
        name
    }

    /// Publishes `body` to `queue`, confirmed.
    pub fn publish(&self, queue: &str, body: &[u8], message_id: Option<&str>) {
        let mut properties = BasicProperties::default().with_delivery_mode(2);
        if let Some(id) = message_id {
            properties = properties.with_message_id(ShortString::from(id));
        }
        let confirm = self.rt.block_on(async {
            self.channel
                .basic_publish(
                    ShortString::from(""),
                    ShortString::from(queue),
                    BasicPublishOptions::default(),
                    body,
                    properties,
                )
                .await
                .unwrap()
                .await
                .unwrap()
        });
        assert!(confirm.is_ack());
    }

    /// Every message in `queue`, taken off it in order.
    pub fn drain(&self, queue: &str) -> Vec<Got> {
        let mut got = Vec::new();
        self.rt.block_on(async {
            while let Some(message) = self
                .channel
                .basic_get(ShortString::from(queue), BasicGetOptions::default())
                .await
                .unwrap()
            {
                let delivery = message.delivery;
                delivery.ack(BasicAckOptions::default()).await.unwrap();
                got.push(Got {
                    message_id: delivery
                        .properties
                        .message_id()
                        .as_ref()
                        .map(|id| id.to_string()),
                    headers: headers_of(delivery.properties.headers().as_ref()),
                    body: delivery.data,
                });
            }
        });
        got
    }

    /// Messages ready in `queue`.
    pub fn count(&self, queue: &str) -> u32 {
        self.rt.block_on(async {
            let probe = self.connection.create_channel().await.unwrap();
            let options = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = probe
                .queue_declare(ShortString::from(queue), options, FieldTable::default())
                .await
                .unwrap();
            declared.message_count()
        })
    }

    /// Whether `queue` exists.
    pub fn exists(&self, queue: &str) -> bool {
        self.rt.block_on(async {
            let probe = self.connection.create_channel().await.unwrap();
            let options = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            probe
                .queue_declare(ShortString::from(queue), options, FieldTable::default())
                .await
                .is_ok()
        })
    }

    /// Deletes `queue` now.
    pub fn delete_queue(&self, queue: &str) {
        self.rt
            .block_on(
                self.channel
                    .queue_delete(ShortString::from(queue), QueueDeleteOptions::default()),
            )
            .unwrap();
    }
}

fn headers_of(table: Option<&FieldTable>) -> BTreeMap<String, String> {
    let mut headers = BTreeMap::new();
    for (name, value) in table.map(FieldTable::inner).into_iter().flatten() {
        let text = match value {
            AMQPValue::LongString(s) => s.to_string(),
            other => format!("{other:?}"),
        };
        headers.insert(name.to_string(), text);
    }
    headers
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.rt.block_on(async {
            let channel = self.connection.create_channel().await;
            let Ok(channel) = channel else { return };
            for queue in &self.queues {
                let _ = channel
                    .queue_delete(
                        ShortString::from(queue.as_str()),
                        QueueDeleteOptions::default(),
                    )
                    .await;
            }
            for exchange in &self.exchanges {
                let _ = channel
                    .exchange_delete(
                        ShortString::from(exchange.as_str()),
                        ExchangeDeleteOptions::default(),
                    )
                    .await;
            }
            let _ = self.connection.close(200, ShortString::from("bye")).await;
        });
    }
}

/// A NATS server, with the streams a test made or let the intake make
/// (deleted on drop).
pub struct Nats {
    pub url: String,
    rt: Runtime,
    client: async_nats::Client,
    js: jetstream::Context,
    streams: Vec<String>,
}

impl Nats {
    /// The server at `JE_NATS_URL`, or `None` (the test is skipped).
    pub fn connect(test: &str) -> Option<Nats> {
        let url =
            std::env::var("JE_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned());
        reachable(test, "NATS server", &url).then(|| Nats::connect_to(&url))
    }

    /// The server at `url`.
    pub fn connect_to(url: &str) -> Nats {
        let rt = runtime();
        let client = rt.block_on(async_nats::connect(url)).unwrap();
        // The context spawns a task of its own: inside the runtime.
        let js = rt.block_on(async { jetstream::new(client.clone()) });
        Nats {
            url: url.to_owned(),
            rt,
            client,
            js,
            streams: Vec::new(),
        }
    }

    /// A name for a stream someone else creates; deleted on drop.
    pub fn adopt_stream(&mut self, prefix: &str) -> String {
        let name = unique(prefix).replace('-', "_");
        self.streams.push(name.clone());
        name
    }

    /// A new stream capturing `subject`.
    pub fn create_stream(&mut self, prefix: &str, subject: &str) -> String {
        let name = self.adopt_stream(prefix);
        let config = stream::Config {
            name: name.clone(),
            subjects: vec![subject.to_owned()],
            ..stream::Config::default()
        };
        self.rt.block_on(self.js.create_stream(config)).unwrap();
        name
    }

    /// Publishes `body` to `subject`, with `Nats-Msg-Id` when given, and
    /// waits for the ack.
    pub fn publish(&self, subject: &str, body: &[u8], message_id: Option<&str>) {
        let mut headers = HeaderMap::new();
        if let Some(id) = message_id {
            headers.insert("Nats-Msg-Id", id);
        }
        self.rt.block_on(async {
            self.js
                .publish_with_headers(subject.to_owned(), headers, body.to_vec().into())
                .await
                .unwrap()
                .await
                .unwrap();
        });
    }

    /// Every message of `stream` on `subject`, in order.
    pub fn read(&self, stream: &str, subject: &str) -> Vec<Got> {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.unwrap();
            let consumer = stream
                .create_consumer(pull::Config {
                    filter_subject: subject.to_owned(),
                    ..pull::Config::default()
                })
                .await
                .unwrap();
            let mut got = Vec::new();
            loop {
                let mut batch = consumer.fetch().max_messages(100).messages().await.unwrap();
                let before = got.len();
                while let Some(message) = batch.next().await {
                    let message = message.unwrap();
                    message.ack().await.unwrap();
                    got.push(got_of(&message));
                }
                if got.len() == before {
                    return got;
                }
            }
        })
    }

    /// Messages stored in `stream`.
    pub fn count(&self, stream: &str) -> u64 {
        self.rt.block_on(async {
            let mut stream = self.js.get_stream(stream).await.unwrap();
            stream.info().await.unwrap().state.messages
        })
    }

    /// Messages of `stream` the consumer has still to deliver or to see
    /// acknowledged.
    pub fn pending(&self, stream: &str, consumer: &str) -> u64 {
        self.rt.block_on(async {
            let stream = self.js.get_stream(stream).await.unwrap();
            let mut consumer: jetstream::consumer::PullConsumer =
                stream.get_consumer(consumer).await.unwrap();
            let info = consumer.info().await.unwrap();
            info.num_pending + info.num_ack_pending as u64
        })
    }
}

fn got_of(message: &jetstream::Message) -> Got {
    let mut headers = BTreeMap::new();
    for (name, values) in message.headers.iter().flat_map(|h| h.iter()) {
        if let Some(value) = values.first() {
            headers.insert(name.to_string(), value.as_str().to_owned());
        }
    }
    Got {
        body: message.payload.to_vec(),
        message_id: headers.get("Nats-Msg-Id").cloned(),
        headers,
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.rt.block_on(async {
            for stream in &self.streams {
                let deleting = self.js.delete_stream(stream);
                let _ = tokio::time::timeout(Duration::from_secs(5), deleting).await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(2), self.client.flush()).await;
        });
    }
}

/// A `nats-server` of the test's own, with JetStream and a `max_payload`
/// of 16 MiB, stopped (killed) on drop.
pub struct PrivateNats {
    pub url: String,
    child: Child,
    config: PathBuf,
    _dir: tempfile::TempDir,
}

impl PrivateNats {
    /// Starts one, or `None` (the test is skipped) when `nats-server` is
    /// not installed.
    pub fn start(test: &str) -> Option<PrivateNats> {
        let installed = Command::new("nats-server")
            .arg("--version")
            .output()
            .is_ok();
        if !installed {
            assert!(
                !required(),
                "{test}: nats-server is not installed, and JE_REQUIRE_BROKERS=1"
            );
            eprintln!("SKIPPED: {test}: nats-server is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let config = dir.path().join("nats.conf");
        let store = dir.path().join("jetstream");
        std::fs::write(
            &config,
            format!(
                "listen: 127.0.0.1:{port}\nmax_payload: 16MB\njetstream {{ store_dir: {store:?} }}\n"
            ),
        )
        .unwrap();
        let child = spawn(&config);
        let url = format!("nats://127.0.0.1:{port}");
        wait_until_listening(port);
        Some(PrivateNats {
            url,
            child,
            config,
            _dir: dir,
        })
    }

    /// Kills the server (SIGKILL) and starts it again on the same port and
    /// store.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.config);
        let port = self.url.rsplit(':').next().unwrap().parse().unwrap();
        wait_until_listening(port);
    }
}

fn spawn(config: &std::path::Path) -> Child {
    Command::new("nats-server")
        .arg("-c")
        .arg(config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn wait_until_listening(port: u16) {
    let started = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "nats-server did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for PrivateNats {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
