//! The local ingest protocol over real Unix sockets.

use std::collections::HashSet;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bulwark_agent::exposure::own_listening_sockets;
use bulwark_agent::ingest::{
    request_from_args, send, send_stream, IngestLimits, IngestPayload, IngestRecord, IngestServer,
    RecordSink, Reply, SendSummary, DEFAULT_SOCKET_MODE,
};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::timeout;

const T: Duration = Duration::from_secs(10);

/// Records what it is given and numbers it from 1000.
#[derive(Default)]
struct Recorder {
    inner: Mutex<(u64, Vec<(u64, IngestRecord)>)>,
}

impl Recorder {
    fn take(&self) -> Vec<(u64, IngestRecord)> {
        std::mem::take(&mut self.inner.lock().unwrap().1)
    }
}

/// The sink handed to the server; the test keeps the other handle.
struct Shared(Arc<Recorder>);

impl RecordSink for Shared {
    async fn accept(&self, record: IngestRecord) -> Result<u64, String> {
        if record.series == "full" {
            return Err("queue full (10 records); retry later".into());
        }
        let mut g = self.0.inner.lock().unwrap();
        let seq = 1000 + g.0;
        g.0 += 1;
        g.1.push((seq, record));
        Ok(seq)
    }
}

struct Agent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    stop: watch::Sender<bool>,
    task: JoinHandle<io::Result<()>>,
    recorder: Arc<Recorder>,
}

impl Agent {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        timeout(T, self.task).await.unwrap().unwrap().unwrap();
    }
}

fn start(limits: IngestLimits) -> Agent {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let server = IngestServer::bind(&path, DEFAULT_SOCKET_MODE)
        .unwrap()
        .with_limits(limits);
    let recorder = Arc::new(Recorder::default());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(Shared(recorder.clone()), rx));
    Agent {
        _dir: dir,
        path,
        stop,
        task,
        recorder,
    }
}

struct Conn {
    lines: tokio::io::Lines<BufReader<OwnedReadHalf>>,
    wr: OwnedWriteHalf,
}

impl Conn {
    async fn open(path: &Path) -> Conn {
        let (rd, wr) = UnixStream::connect(path).await.unwrap().into_split();
        Conn {
            lines: BufReader::new(rd).lines(),
            wr,
        }
    }

    async fn reply(&mut self) -> Option<Reply> {
        let line = timeout(T, self.lines.next_line())
            .await
            .expect("no reply in time")
            .ok()
            .flatten()?;
        Some(Reply::parse(&line).unwrap())
    }

    async fn ask(&mut self, line: &str) -> Reply {
        self.wr
            .write_all(format!("{line}\n").as_bytes())
            .await
            .unwrap();
        self.reply().await.expect("connection closed")
    }
}

fn rejected(r: &Reply) -> &str {
    match r {
        Reply::Rejected { error } => error,
        Reply::Accepted { seq } => panic!("accepted with seq {seq}"),
    }
}

#[tokio::test]
async fn valid_lines_are_accepted_with_the_sinks_seq() {
    let agent = start(IngestLimits::default());
    let record = IngestRecord {
        series: "cam/frame".into(),
        ts_ms: Some(1_795_773_600_123),
        payload: IngestPayload::Bytes(vec![0, 1, 2, 255]),
    };
    let replies = send(
        &agent.path,
        vec![
            r#"{"series":"line1/temp","payload":21.5}"#.into(),
            request_from_args("line1/state", None, Some("running"), None)
                .unwrap()
                .into(),
            r#"{"series":"line1/temp","payload":{"v":1},"ts":"2026-11-27T10:00:00.123Z"}"#.into(),
            bulwark_agent::ingest::RequestLine::from(&record),
        ],
    )
    .await
    .unwrap();
    assert_eq!(
        replies,
        (1000..1004)
            .map(|seq| Reply::Accepted { seq })
            .collect::<Vec<_>>()
    );
    let got = agent.recorder.take();
    let got: Vec<_> = got.into_iter().map(|(_, r)| r).collect();
    assert_eq!(got[0].payload, IngestPayload::Json(json!(21.5)));
    assert_eq!(got[0].ts_ms, None);
    assert_eq!(got[0].topic("gw-17"), "devices/gw-17/data/line1/temp");
    assert_eq!(got[1].payload, IngestPayload::Json(json!("running")));
    assert_eq!(got[2].ts_ms, Some(1_795_773_600_123));
    assert_eq!(got[3], record);
    agent.stop().await;
}

#[tokio::test]
async fn invalid_lines_are_rejected_and_the_connection_stays_usable() {
    let agent = start(IngestLimits::default());
    let mut c = Conn::open(&agent.path).await;
    let cases: &[(&str, &str)] = &[
        ("", "empty line"),
        ("not json", "not JSON: "),
        ("[1,2]", "request must be a JSON object"),
        (r#"{"payload":1}"#, "missing field `series`"),
        (
            r#"{"series":"a","payload":1,"topic":"x"}"#,
            "unknown field `topic`",
        ),
        (
            r#"{"series":"a","payload":1,"payload_b64":"AA=="}"#,
            "both payload and payload_b64 given",
        ),
        (r#"{"series":"a"}"#, "no payload"),
        (
            r#"{"series":"a","payload_b64":"%%%"}"#,
            "not valid standard base64",
        ),
        (r#"{"series":"","payload":1}"#, "series must not be empty"),
        (
            r#"{"series":"a/+","payload":1}"#,
            "series must not contain '+' or '#'",
        ),
        (
            r##"{"series":"#","payload":1}"##,
            "series must not contain '+' or '#'",
        ),
        (
            r#"{"series":"/devices/other/data/x","payload":1}"#,
            "must not start or end with '/'",
        ),
        (
            r#"{"series":"a/","payload":1}"#,
            "must not start or end with '/'",
        ),
        (r#"{"series":"a//b","payload":1}"#, "empty levels"),
        (
            r#"{"series":"$SYS/broker","payload":1}"#,
            "must not start with '$'",
        ),
        (r#"{"series":"a\u0000","payload":1}"#, "U+0000"),
        (
            r#"{"series":"a\tb","payload":1}"#,
            "control character U+0009",
        ),
        (
            r#"{"series":"../../status","payload":1}"#,
            "'.' or '..' levels",
        ),
        (
            r#"{"series":"a","payload":1,"ts":"noon"}"#,
            "not a usable RFC 3339 timestamp",
        ),
        (
            r#"{"series":"a","payload":1,"ts":-5}"#,
            "not a non-negative integer",
        ),
        (
            r#"{"series":"full","payload":1}"#,
            "queue full (10 records); retry later",
        ),
    ];
    for (line, want) in cases {
        let reply = c.ask(line).await;
        let error = rejected(&reply);
        assert!(error.contains(want), "{line}: {error:?} lacks {want:?}");
        // Still usable.
        assert!(
            c.ask(r#"{"series":"ok","payload":true}"#)
                .await
                .is_accepted(),
            "after {line}"
        );
    }
    let got = agent.recorder.take();
    assert_eq!(got.len(), cases.len());
    assert!(got.iter().all(|(_, r)| r.series == "ok"));
    agent.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_line_is_refused_without_reading_it_all() {
    let agent = start(IngestLimits::default());
    let (rd, mut wr) = UnixStream::connect(&agent.path).await.unwrap().into_split();
    let writer = tokio::spawn(async move {
        let chunk = vec![b'x'; 64 * 1024];
        let mut written = 0usize;
        while written < 10 * 1024 * 1024 {
            if let Err(e) = wr.write_all(&chunk).await {
                return (written, Some(e));
            }
            written += chunk.len();
        }
        (written, None)
    });
    let mut lines = BufReader::new(rd).lines();
    let line = timeout(T, lines.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        Reply::parse(&line).unwrap(),
        Reply::Rejected {
            error: "line longer than 262144 bytes".into()
        }
    );
    // Then the agent closes the connection ...
    let next = timeout(T, lines.next_line()).await.unwrap();
    assert!(matches!(next, Ok(None) | Err(_)), "{next:?}");
    // ... without having taken the 10 MB: the producer's writes fail early.
    let (written, error) = timeout(T, writer).await.unwrap().unwrap();
    assert!(error.is_some(), "all {written} bytes were taken");
    assert!(written < 2 * 1024 * 1024, "{written} bytes were taken");
    assert!(agent.recorder.take().is_empty());

    // The agent still serves others.
    let replies = send(&agent.path, [r#"{"series":"a","payload":1}"#])
        .await
        .unwrap();
    assert!(replies[0].is_accepted());
    agent.stop().await;
}

#[tokio::test]
async fn line_limit_is_configurable_and_send_reports_the_early_close() {
    let agent = start(IngestLimits {
        max_line_bytes: 100,
        ..IngestLimits::default()
    });
    let long = format!(r#"{{"series":"a","payload":"{}"}}"#, "x".repeat(100));
    let err = send(
        &agent.path,
        [
            r#"{"series":"a","payload":1}"#.to_string(),
            long,
            r#"{"series":"a","payload":2}"#.to_string(),
        ],
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("the agent closed the connection; 1 of 3 request(s) got no reply"),
        "{err}"
    );
    let got = agent.recorder.take();
    assert_eq!(got.len(), 1);
    agent.stop().await;
}

#[tokio::test]
async fn unterminated_last_line_is_answered() {
    let agent = start(IngestLimits::default());
    let mut s = UnixStream::connect(&agent.path).await.unwrap();
    s.write_all(br#"{"series":"a","payload":1}"#).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = String::new();
    timeout(T, s.read_to_string(&mut out))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out, "{\"ok\":true,\"seq\":1000}\n");
    agent.stop().await;
}

#[test]
fn socket_has_the_configured_mode() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o600, 0o660, 0o666] {
        let path = dir.path().join(format!("s{mode:o}.sock"));
        let server = IngestServer::bind(&path, mode).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, mode, "{mode:o}");
        assert_eq!(server.path(), path);
        drop(server);
        assert!(!path.exists(), "socket file removed with the server");
    }
    let err = IngestServer::bind(dir.path().join("x.sock"), 0o4660).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
}

#[tokio::test]
async fn stale_socket_is_replaced_but_a_live_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    assert!(path.exists(), "a stale socket file is left behind");
    let server = IngestServer::bind(&path, 0o600).unwrap();
    let recorder = Arc::new(Recorder::default());
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(Shared(recorder), rx));
    let replies = send(&path, [r#"{"series":"a","payload":1}"#])
        .await
        .unwrap();
    assert!(replies[0].is_accepted());

    // The path is now in use: a second agent must not take it over.
    let err = IngestServer::bind(&path, 0o600).unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse, "{err}");
    assert!(err.to_string().contains("in use"), "{err}");
    let replies = send(&path, [r#"{"series":"a","payload":2}"#])
        .await
        .unwrap();
    assert!(replies[0].is_accepted(), "the first agent still serves");

    stop.send(true).unwrap();
    timeout(T, task).await.unwrap().unwrap().unwrap();
    assert!(!path.exists(), "socket file removed at shutdown");
}

#[test]
fn regular_file_or_symlink_at_the_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    std::fs::write(&path, "precious").unwrap();
    let err = IngestServer::bind(&path, 0o660).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");

    let link = dir.path().join("link.sock");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let err = IngestServer::bind(&link, 0o660).unwrap_err();
    assert!(err.to_string().contains("is not a socket"), "{err}");
    assert_eq!(std::fs::read_to_string(&path).unwrap(), "precious");
}

#[test]
fn directory_writable_by_others_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    for mode in [0o777, 0o1777, 0o703] {
        let sub = dir.path().join(format!("d{mode:o}"));
        std::fs::create_dir(&sub).unwrap();
        std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = IngestServer::bind(sub.join("ingest.sock"), 0o660).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{mode:o}");
        assert!(err.to_string().contains("writable by every user"), "{err}");
        assert!(!sub.join("ingest.sock").exists());
    }
    // Group-writable is fine (a shared producer group).
    let sub = dir.path().join("group");
    std::fs::create_dir(&sub).unwrap();
    std::fs::set_permissions(&sub, std::fs::Permissions::from_mode(0o770)).unwrap();
    IngestServer::bind(sub.join("ingest.sock"), 0o660).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_clients_concurrently() {
    let agent = start(IngestLimits::default());
    let mut tasks = Vec::new();
    for client in 0..16 {
        let path = agent.path.clone();
        tasks.push(tokio::spawn(async move {
            let lines: Vec<String> = (0..50)
                .map(|n| format!(r#"{{"series":"client{client}","payload":{n}}}"#))
                .collect();
            send(&path, lines).await.unwrap()
        }));
    }
    let mut seqs = HashSet::new();
    for t in tasks {
        let replies = timeout(T, t).await.unwrap().unwrap();
        assert_eq!(replies.len(), 50);
        let mine: Vec<u64> = replies
            .iter()
            .map(|r| match r {
                Reply::Accepted { seq } => *seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "in order: {mine:?}");
        seqs.extend(mine);
    }
    assert_eq!(seqs.len(), 800);
    let got = agent.recorder.take();
    assert_eq!(got.len(), 800);
    // Each client's records reached the sink in the order it sent them.
    for client in 0..16 {
        let series = format!("client{client}");
        let payloads: Vec<_> = got
            .iter()
            .filter(|(_, r)| r.series == series)
            .map(|(_, r)| r.payload.clone())
            .collect();
        let want: Vec<_> = (0..50).map(|n| IngestPayload::Json(json!(n))).collect();
        assert_eq!(payloads, want);
    }
    agent.stop().await;
}

/// A sink that takes a varying time per record and answers with the payload number.
struct Slow;

impl RecordSink for Slow {
    async fn accept(&self, record: IngestRecord) -> Result<u64, String> {
        let IngestPayload::Json(v) = record.payload else {
            return Err("bytes".into());
        };
        let n = v.as_u64().ok_or("not a number")?;
        tokio::time::sleep(Duration::from_millis(n * 7 % 5)).await;
        Ok(n)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_requests_get_replies_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let server = IngestServer::bind(&path, 0o600).unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(Slow, rx));

    let mut c = Conn::open(&path).await;
    let mut batch = String::new();
    for n in 0..200u64 {
        if n % 10 == 3 {
            batch.push_str("{\"series\":\"a/#\",\"payload\":0}\n");
        } else {
            batch.push_str(&format!("{{\"series\":\"a\",\"payload\":{n}}}\n"));
        }
    }
    c.wr.write_all(batch.as_bytes()).await.unwrap();
    for n in 0..200u64 {
        let reply = c.reply().await.unwrap();
        if n % 10 == 3 {
            assert!(rejected(&reply).contains("'+' or '#'"), "{n}: {reply:?}");
        } else {
            assert_eq!(reply, Reply::Accepted { seq: n });
        }
    }
    stop.send(true).unwrap();
    timeout(T, task).await.unwrap().unwrap().unwrap();
}

#[tokio::test]
async fn connections_over_the_limit_are_refused() {
    let agent = start(IngestLimits {
        max_connections: 2,
        ..IngestLimits::default()
    });
    let mut a = Conn::open(&agent.path).await;
    let mut b = Conn::open(&agent.path).await;
    assert!(a.ask(r#"{"series":"a","payload":1}"#).await.is_accepted());
    assert!(b.ask(r#"{"series":"b","payload":1}"#).await.is_accepted());
    let mut c = Conn::open(&agent.path).await;
    let reply = c.reply().await.unwrap();
    assert!(
        rejected(&reply).contains("too many connections (limit 2)"),
        "{reply:?}"
    );
    assert!(c.reply().await.is_none(), "then closed");

    // A slot frees up when a producer leaves.
    drop(a);
    let mut accepted = false;
    for _ in 0..100 {
        let replies = send(&agent.path, [r#"{"series":"c","payload":1}"#]).await;
        if matches!(replies.as_deref(), Ok([Reply::Accepted { .. }])) {
            accepted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(accepted);
    assert!(b.ask(r#"{"series":"b","payload":2}"#).await.is_accepted());
    agent.stop().await;
}

#[tokio::test]
async fn shutdown_closes_connections_and_removes_the_socket() {
    let agent = start(IngestLimits::default());
    let path = agent.path.clone();
    let mut idle = Conn::open(&path).await;
    assert!(idle
        .ask(r#"{"series":"a","payload":1}"#)
        .await
        .is_accepted());
    let Agent {
        _dir, stop, task, ..
    } = agent;
    stop.send(true).unwrap();
    timeout(T, task).await.unwrap().unwrap().unwrap();
    assert!(idle.reply().await.is_none(), "idle producer sees the close");
    assert!(!path.exists());
    let err = send(&path, [r#"{"series":"a","payload":1}"#])
        .await
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("cannot connect to the agent's ingest socket"));
    assert!(err.to_string().contains(&path.display().to_string()));
}

#[tokio::test]
async fn send_stream_skips_blank_lines_and_numbers_replies() {
    let agent = start(IngestLimits::default());
    let input: &[u8] = b"\n{\"series\":\"a\",\"payload\":1}\n\n{\"series\":\"a+\",\"payload\":1}\n  \n{\"series\":\"b\",\"payload_b64\":\"AA==\"}";
    let mut seen = Vec::new();
    let summary = send_stream(&agent.path, input, |n, r| seen.push((n, r)))
        .await
        .unwrap();
    assert_eq!(
        summary,
        SendSummary {
            sent: 3,
            accepted: 2,
            rejected: 1
        }
    );
    assert_eq!(seen[0], (2, Reply::Accepted { seq: 1000 }));
    assert_eq!(seen[1].0, 4);
    assert!(rejected(&seen[1].1).contains("'+' or '#'"));
    assert_eq!(seen[2], (6, Reply::Accepted { seq: 1001 }));
    agent.stop().await;
}

/// The agent's ingest works over a Unix socket only: while it serves, this process holds no
/// listening TCP or UDP socket (nothing else in this test binary opens one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serving_opens_no_tcp_or_udp_listener() {
    let agent = start(IngestLimits::default());
    let mut c = Conn::open(&agent.path).await;
    assert!(c.ask(r#"{"series":"a","payload":1}"#).await.is_accepted());
    let own = own_listening_sockets(std::process::id()).unwrap();
    assert!(own.is_empty(), "{own:?}");
    agent.stop().await;
}

/// A sink that stores each batch when it is handed over (as the agent's queue does) and
/// answers only while its gate is open. Records of the series "full" are refused.
struct Batching {
    batches: Mutex<Vec<Vec<IngestRecord>>>,
    next_seq: Mutex<u64>,
    gate: watch::Receiver<bool>,
}

impl Batching {
    fn records(&self) -> usize {
        self.batches.lock().unwrap().iter().map(Vec::len).sum()
    }
}

struct BatchSink(Arc<Batching>);

impl RecordSink for BatchSink {
    async fn accept(&self, _record: IngestRecord) -> Result<u64, String> {
        Err("the server hands records over in batches".into())
    }

    fn accept_batch(
        &self,
        records: Vec<IngestRecord>,
    ) -> impl std::future::Future<Output = Vec<Result<u64, String>>> + Send {
        let answers: Vec<Result<u64, String>> = records
            .iter()
            .map(|r| {
                if r.series == "full" {
                    return Err("queue full; retry later".to_string());
                }
                let mut n = self.0.next_seq.lock().unwrap();
                *n += 1;
                Ok(*n)
            })
            .collect();
        self.0.batches.lock().unwrap().push(records);
        let mut gate = self.0.gate.clone();
        async move {
            let _ = gate.wait_for(|open| *open).await;
            answers
        }
    }
}

struct BatchAgent {
    _dir: tempfile::TempDir,
    path: PathBuf,
    sink: Arc<Batching>,
    gate: watch::Sender<bool>,
    stop: watch::Sender<bool>,
    task: JoinHandle<io::Result<()>>,
}

fn start_batching(limits: IngestLimits, open: bool) -> BatchAgent {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ingest.sock");
    let server = IngestServer::bind(&path, DEFAULT_SOCKET_MODE)
        .unwrap()
        .with_limits(limits);
    let (gate, gate_rx) = watch::channel(open);
    let sink = Arc::new(Batching {
        batches: Mutex::default(),
        next_seq: Mutex::new(0),
        gate: gate_rx,
    });
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(server.serve(BatchSink(sink.clone()), rx));
    BatchAgent {
        _dir: dir,
        path,
        sink,
        gate,
        stop,
        task,
    }
}

/// Waits until the sink has been handed `n` records.
async fn sink_sees(sink: &Batching, n: usize) {
    timeout(T, async {
        while sink.records() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the sink saw {} records, not {n}", sink.records()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_lines_go_to_the_sink_in_batches_and_replies_keep_order() {
    let agent = start_batching(IngestLimits::default(), true);
    let mut c = Conn::open(&agent.path).await;
    let mut text = String::new();
    for n in 0..300u64 {
        match n % 10 {
            3 => text.push_str("{\"series\":\"a/#\",\"payload\":0}\n"),
            7 => text.push_str("{\"series\":\"full\",\"payload\":0}\n"),
            _ => text.push_str(&format!("{{\"series\":\"a\",\"payload\":{n}}}\n")),
        }
    }
    c.wr.write_all(text.as_bytes()).await.unwrap();
    let mut last = 0;
    for n in 0..300u64 {
        let reply = c.reply().await.unwrap();
        match n % 10 {
            3 => assert!(rejected(&reply).contains("'+' or '#'"), "{n}: {reply:?}"),
            7 => assert_eq!(rejected(&reply), "queue full; retry later"),
            _ => match reply {
                Reply::Accepted { seq } => {
                    assert!(seq > last, "{n}: seq {seq} after {last}");
                    last = seq;
                }
                other => panic!("{n}: {other:?}"),
            },
        }
    }
    // The sink got the valid records in request order, several at a time.
    let batches = agent.sink.batches.lock().unwrap().clone();
    let payloads: Vec<IngestPayload> = batches
        .iter()
        .flatten()
        .filter(|r| r.series == "a")
        .map(|r| r.payload.clone())
        .collect();
    let want: Vec<IngestPayload> = (0..300u64)
        .filter(|n| n % 10 != 3 && n % 10 != 7)
        .map(|n| IngestPayload::Json(json!(n)))
        .collect();
    assert_eq!(payloads, want);
    assert!(
        batches.len() < 270,
        "{} batches for 270 records: not batched",
        batches.len()
    );
    agent.stop.send(true).unwrap();
    timeout(T, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_pauses_at_max_pending_lines_until_replies_go_out() {
    let agent = start_batching(
        IngestLimits {
            max_pending_lines: 10,
            ..IngestLimits::default()
        },
        false,
    );
    let mut c = Conn::open(&agent.path).await;
    let text: String = (0..100)
        .map(|n| format!("{{\"series\":\"a\",\"payload\":{n}}}\n"))
        .collect();
    c.wr.write_all(text.as_bytes()).await.unwrap();
    // While nothing is answered, the server takes 10 lines and no more.
    sink_sees(&agent.sink, 10).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent.sink.records(), 10);
    assert!(
        timeout(Duration::from_millis(100), c.lines.next_line())
            .await
            .is_err(),
        "answered before the sink did"
    );
    // Answers let it go on.
    agent.gate.send(true).unwrap();
    for seq in 1..=100 {
        assert_eq!(c.reply().await.unwrap(), Reply::Accepted { seq });
    }
    assert_eq!(agent.sink.records(), 100);
    agent.stop.send(true).unwrap();
    timeout(T, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_pauses_at_max_pending_bytes() {
    let line = "{\"series\":\"a\",\"payload\":1234567}";
    let agent = start_batching(
        IngestLimits {
            max_pending_bytes: 100,
            ..IngestLimits::default()
        },
        false,
    );
    let mut c = Conn::open(&agent.path).await;
    let text: String = (0..50).map(|_| format!("{line}\n")).collect();
    c.wr.write_all(text.as_bytes()).await.unwrap();
    // Lines are taken while fewer than 100 bytes are pending: the one that crosses the mark
    // is the last.
    let most = 100 / line.len() + 1;
    sink_sees(&agent.sink, most).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(agent.sink.records(), most);
    agent.gate.send(true).unwrap();
    for seq in 1..=50 {
        assert_eq!(c.reply().await.unwrap(), Reply::Accepted { seq });
    }
    // A line longer than max_pending_bytes still gets through on its own.
    let long = format!("{{\"series\":\"a\",\"payload\":\"{}\"}}", "x".repeat(500));
    assert!(c.ask(&long).await.is_accepted());
    agent.stop.send(true).unwrap();
    timeout(T, agent.task).await.unwrap().unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_answers_the_lines_already_taken() {
    let agent = start_batching(IngestLimits::default(), false);
    let mut c = Conn::open(&agent.path).await;
    let text: String = (0..20)
        .map(|n| format!("{{\"series\":\"a\",\"payload\":{n}}}\n"))
        .collect();
    c.wr.write_all(text.as_bytes()).await.unwrap();
    sink_sees(&agent.sink, 20).await;
    agent.stop.send(true).unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    agent.gate.send(true).unwrap();
    for seq in 1..=20 {
        assert_eq!(c.reply().await.unwrap(), Reply::Accepted { seq });
    }
    assert!(c.reply().await.is_none(), "then closed");
    timeout(T, agent.task).await.unwrap().unwrap().unwrap();
}
