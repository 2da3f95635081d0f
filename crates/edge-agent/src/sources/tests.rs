use super::*;

use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use serde_json::json;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// How long a test waits for an event before it fails.
const WAIT: Duration = Duration::from_secs(10);

type Seen = Arc<Mutex<Vec<IngestRecord>>>;

/// A sink that accepts everything, collecting the records and announcing each one.
fn collecting_sink() -> (
    Arc<impl RecordSink>,
    Seen,
    mpsc::UnboundedReceiver<IngestRecord>,
) {
    let seen: Seen = Arc::default();
    let (tx, rx) = mpsc::unbounded_channel();
    let s = seen.clone();
    let seq = Arc::new(AtomicUsize::new(0));
    let sink = move |r: IngestRecord| {
        s.lock().unwrap().push(r.clone());
        let _ = tx.send(r);
        let n = seq.fetch_add(1, Ordering::SeqCst) as u64;
        async move { Ok(n) }
    };
    (Arc::new(sink), seen, rx)
}

async fn next(rx: &mut mpsc::UnboundedReceiver<IngestRecord>) -> IngestRecord {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("no record in time")
        .expect("sink gone")
}

fn json_of(r: &IngestRecord) -> &Value {
    match &r.payload {
        Payload::Json(v) => v,
        Payload::Bytes(b) => panic!("bytes payload {b:?}"),
    }
}

/// Waits until `cond` holds, checking every 10 ms.
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Configuration
// ---------------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Top {
    #[serde(default)]
    source: SourcesConfig,
}

fn parse_toml(text: &str) -> Result<SourcesConfig, String> {
    toml::from_str::<Top>(text)
        .map(|t| t.source)
        .map_err(|e| e.to_string())
}

#[test]
fn config_parses_with_defaults() {
    let c = parse_toml(
        r#"
        [[source.exec]]
        series = "gw/sensors"
        command = ["/usr/bin/sensors", "-j"]

        [[source.exec]]
        series = "gw/uptime"
        command = ["cat", "/proc/uptime"]
        interval_secs = 5
        timeout_secs = 2
        max_output_bytes = 100

        [[source.tail]]
        path = "values.jsonl"
        "#,
    )
    .unwrap();
    assert_eq!(
        c.exec[0],
        ExecSourceConfig {
            series: "gw/sensors".into(),
            command: vec!["/usr/bin/sensors".into(), "-j".into()],
            interval_secs: 60,
            timeout_secs: 10,
            max_output_bytes: 65536,
        }
    );
    assert_eq!(
        (
            c.exec[1].interval_secs,
            c.exec[1].timeout_secs,
            c.exec[1].max_output_bytes
        ),
        (5, 2, 100)
    );
    assert_eq!(
        c.tail,
        vec![TailSourceConfig {
            path: "values.jsonl".into(),
            poll_interval_ms: 500,
            max_line_bytes: 262_144,
        }]
    );
    assert!(c.validate().is_ok());
    assert_eq!(parse_toml("").unwrap(), SourcesConfig::default());

    let e = parse_toml("[[source.exec]]\nseries = \"a\"\ncommand = [\"x\"]\nshell = true\n")
        .unwrap_err();
    assert!(e.contains("unknown field `shell`"), "{e}");
    let e = parse_toml("[[source.tail]]\npath = \"x\"\npoll_ms = 1\n").unwrap_err();
    assert!(e.contains("unknown field `poll_ms`"), "{e}");
    let e = parse_toml("[source]\nhealth = true\n").unwrap_err();
    assert!(e.contains("unknown field `health`"), "{e}");
}

fn exec_cfg(command: &[&str]) -> ExecSourceConfig {
    ExecSourceConfig {
        series: "gw/test".into(),
        command: command.iter().map(|s| s.to_string()).collect(),
        interval_secs: 60,
        timeout_secs: 10,
        max_output_bytes: 65536,
    }
}

fn tail_cfg(path: &Path) -> TailSourceConfig {
    TailSourceConfig {
        path: path.to_path_buf(),
        poll_interval_ms: 10,
        max_line_bytes: DEFAULT_TAIL_MAX_LINE_BYTES,
    }
}

#[test]
fn validate_names_the_key_and_the_fix() {
    type Edit = fn(&mut SourcesConfig);
    let cases: &[(Edit, &str, &str)] = &[
        (
            |c| c.exec[0].series = String::new(),
            "source.exec[0].series",
            "must not be empty",
        ),
        (
            |c| c.exec[0].series = "a/+/b".into(),
            "source.exec[0].series",
            "'+' or '#'",
        ),
        (
            |c| c.exec[0].command.clear(),
            "source.exec[0].command",
            "give the program and its arguments",
        ),
        (
            |c| c.exec[0].command = vec![String::new()],
            "source.exec[0].command",
            "the program (the first element) is empty",
        ),
        (
            |c| c.exec[0].interval_secs = 0,
            "source.exec[0].interval_secs",
            "at least 1",
        ),
        (
            |c| c.exec[0].timeout_secs = 0,
            "source.exec[0].timeout_secs",
            "at least 1",
        ),
        (
            |c| c.exec[0].max_output_bytes = 0,
            "source.exec[0].max_output_bytes",
            "between 1 and",
        ),
        (
            |c| c.tail[1].path = PathBuf::new(),
            "source.tail[1].path",
            "is empty",
        ),
        (
            |c| c.tail[1].path = c.tail[0].path.clone(),
            "source.tail[1].path",
            "already followed by source.tail[0]",
        ),
        (
            |c| c.tail[0].poll_interval_ms = 0,
            "source.tail[0].poll_interval_ms",
            "at least 1",
        ),
        (
            |c| c.tail[0].max_line_bytes = MAX_BUFFER_BYTES + 1,
            "source.tail[0].max_line_bytes",
            "between 1 and",
        ),
    ];
    let good = SourcesConfig {
        exec: vec![exec_cfg(&["true"])],
        tail: vec![
            tail_cfg(Path::new("/a.jsonl")),
            tail_cfg(Path::new("/b.jsonl")),
        ],
    };
    assert_eq!(good.validate(), Ok(()));
    for (edit, key, want) in cases {
        let mut c = good.clone();
        edit(&mut c);
        let (k, msg) = c.validate().unwrap_err();
        assert_eq!(k, *key, "{msg}");
        assert!(msg.contains(want), "{key}: {msg:?} lacks {want:?}");
    }
}

#[test]
fn relative_tail_paths_are_resolved_against_the_config_directory() {
    let mut c = parse_toml(
        "[[source.tail]]\npath = \"values.jsonl\"\n[[source.tail]]\npath = \"/etc/agent/values.jsonl\"\n",
    )
    .unwrap();
    assert!(c.validate().is_ok());
    c.resolve_paths(Path::new("/etc/agent"));
    assert_eq!(c.tail[0].path, Path::new("/etc/agent/values.jsonl"));
    assert_eq!(c.tail[1].path, Path::new("/etc/agent/values.jsonl"));
    let (key, _) = c.validate().unwrap_err();
    assert_eq!(key, "source.tail[1].path");
}

// ---------------------------------------------------------------------------------------
// Exec source
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn exec_output_json_text_or_bytes() {
    let p = exec_once(&exec_cfg(&["sh", "-c", r#"echo '{"a": [1, 2]}'"#]))
        .await
        .unwrap();
    assert_eq!(p, Payload::Json(json!({"a": [1, 2]})));
    let p = exec_once(&exec_cfg(&["echo", "42"])).await.unwrap();
    assert_eq!(p, Payload::Json(json!(42)));
    let p = exec_once(&exec_cfg(&["printf", "  hello world \\n"]))
        .await
        .unwrap();
    assert_eq!(p, Payload::Json(json!("hello world")));
    let p = exec_once(&exec_cfg(&["printf", "\\377\\001"]))
        .await
        .unwrap();
    assert_eq!(p, Payload::Bytes(vec![0xff, 0x01]));
    // Arguments are passed as they are, without a shell.
    let p = exec_once(&exec_cfg(&["echo", "$HOME", "a;b"]))
        .await
        .unwrap();
    assert_eq!(p, Payload::Json(json!("$HOME a;b")));
}

#[tokio::test]
async fn exec_failure_gives_reason_and_stderr() {
    let f = exec_once(&exec_cfg(&[
        "sh",
        "-c",
        "echo 1; echo 'sensor offline' >&2; exit 3",
    ]))
    .await
    .unwrap_err();
    assert!(f.reason.contains("exit status: 3"), "{f:?}");
    assert_eq!(f.stderr, "sensor offline");

    let f = exec_once(&exec_cfg(&["/nonexistent/bulwark-probe"]))
        .await
        .unwrap_err();
    assert!(f.reason.contains("cannot start"), "{f:?}");

    // Only the first 512 bytes of standard error are kept.
    let f = exec_once(&exec_cfg(&[
        "sh",
        "-c",
        "yes e | head -c 10000 >&2; exit 1",
    ]))
    .await
    .unwrap_err();
    assert_eq!(f.stderr.len(), 511, "{f:?}"); // 512 bytes, the last newline trimmed
}

fn pid_running(pid: u32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat.rsplit(')').next().unwrap_or("").trim_start();
            !(state.starts_with('Z') || state.starts_with('X'))
        }
    }
}

fn read_pids(path: &Path) -> Vec<u32> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

#[tokio::test]
async fn exec_timeout_kills_the_command_and_what_it_started() {
    let dir = tempfile::tempdir().unwrap();
    let pids = dir.path().join("pids");
    let script = format!(
        "sleep 30 & echo $! > {p}.tmp; echo $$ >> {p}.tmp; mv {p}.tmp {p}; echo partial; wait",
        p = pids.display()
    );
    let mut cfg = exec_cfg(&["sh", "-c", &script]);
    cfg.timeout_secs = 1;
    let started = Instant::now();
    let f = exec_once(&cfg).await.unwrap_err();
    assert!(f.reason.contains("timeout_secs (1 s); killed"), "{f:?}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let pids = read_pids(&pids);
    assert_eq!(pids.len(), 2);
    for pid in pids {
        wait_until(&format!("pid {pid} to end"), || !pid_running(pid)).await;
    }
}

#[tokio::test]
async fn exec_output_limit() {
    let mut cfg = exec_cfg(&["printf", "1234567890"]);
    cfg.max_output_bytes = 10;
    assert_eq!(
        exec_once(&cfg).await.unwrap(),
        Payload::Json(json!(1_234_567_890))
    );
    cfg.max_output_bytes = 9;
    let f = exec_once(&cfg).await.unwrap_err();
    assert!(
        f.reason.contains("more than max_output_bytes (9 bytes)"),
        "{f:?}"
    );

    // Endless output is stopped at once, not at the timeout.
    let mut cfg = exec_cfg(&["yes"]);
    cfg.max_output_bytes = 1000;
    cfg.timeout_secs = 30;
    let started = Instant::now();
    let f = exec_once(&cfg).await.unwrap_err();
    assert!(f.reason.contains("max_output_bytes"), "{f:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn run_exec_submits_at_once_then_every_interval() {
    let (sink, seen, mut rx) = collecting_sink();
    let mut cfg = exec_cfg(&["sh", "-c", "echo '{\"v\": 7}'"]);
    cfg.interval_secs = 1;
    let (stop, stop_rx) = watch::channel(false);
    let started = Instant::now();
    let task = tokio::spawn(run_exec(cfg, sink, stop_rx));
    let r = next(&mut rx).await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "first run is immediate"
    );
    assert_eq!(r.series, "gw/test");
    assert_eq!(r.ts_ms, None);
    assert_eq!(json_of(&r), &json!({"v": 7}));
    let r = next(&mut rx).await;
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert_eq!(json_of(&r), &json!({"v": 7}));
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(seen.lock().unwrap().len() >= 2);
}

#[tokio::test]
async fn run_exec_failing_command_gives_no_record() {
    let (sink, seen, _rx) = collecting_sink();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("ran");
    let script = format!("echo x >> {}; exit 1", marker.display());
    let mut cfg = exec_cfg(&["sh", "-c", &script]);
    cfg.interval_secs = 1;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_exec(cfg, sink, stop_rx));
    // Two runs have ended (the second started after the first's outcome was handled).
    wait_until("two runs", || {
        fs::read_to_string(&marker)
            .unwrap_or_default()
            .lines()
            .count()
            >= 2
    })
    .await;
    stop.send(true).unwrap();
    tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    assert!(seen.lock().unwrap().is_empty());
}

#[tokio::test]
async fn run_exec_stops_promptly_and_kills_the_running_command() {
    let (sink, seen, _rx) = collecting_sink();
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!(
        "echo $$ > {p}.tmp; mv {p}.tmp {p}; exec sleep 30",
        p = pidfile.display()
    );
    let mut cfg = exec_cfg(&["sh", "-c", &script]);
    cfg.timeout_secs = 60;
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run_exec(cfg, sink, stop_rx));
    wait_until("the command to start", || pidfile.exists()).await;
    let pid = read_pids(&pidfile)[0];
    let stopping = Instant::now();
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("run_exec did not stop promptly")
        .unwrap();
    assert!(stopping.elapsed() < Duration::from_secs(2));
    wait_until("the command to be killed", || !pid_running(pid)).await;
    assert!(seen.lock().unwrap().is_empty());
}

// ---------------------------------------------------------------------------------------
// Tail source: the reader
// ---------------------------------------------------------------------------------------

fn append(path: &Path, text: &[u8]) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    f.write_all(text).unwrap();
}

fn line(n: u64) -> String {
    format!("{{\"series\":\"tail/test\",\"payload\":{n}}}\n")
}

#[test]
fn reader_splits_lines_waits_for_newlines_and_skips_long_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.jsonl");
    let mut r = TailReader::new(path.clone(), 10, None);
    // Missing file: nothing, no error.
    let p = r.poll().unwrap();
    assert!(p.events.is_empty() && !p.more);

    append(&path, b"abc\npart");
    let p = r.poll().unwrap();
    assert_eq!(
        p.events,
        vec![
            TailEvent::Start { offset: 0 },
            TailEvent::Line {
                start: 0,
                end: 4,
                bytes: b"abc".to_vec()
            },
        ]
    );
    assert!(r.poll().unwrap().events.is_empty());
    // The partial line is completed; a line of exactly 10 bytes plus "\r\n" is kept; then
    // an over-long line begins without its newline.
    append(&path, b"ial\n0123456789\r\n");
    append(&path, &[b'x'; 30]);
    let p = r.poll().unwrap();
    assert_eq!(
        p.events,
        vec![
            TailEvent::Line {
                start: 4,
                end: 12,
                bytes: b"partial".to_vec()
            },
            TailEvent::Line {
                start: 12,
                end: 24,
                bytes: b"0123456789\r".to_vec()
            },
        ]
    );
    append(&path, b"yyy\nok\n0123456789ab\nz\n");
    let p = r.poll().unwrap();
    assert_eq!(
        p.events,
        vec![
            TailEvent::TooLong { start: 24, end: 58 },
            TailEvent::Line {
                start: 58,
                end: 61,
                bytes: b"ok".to_vec()
            },
            TailEvent::TooLong { start: 61, end: 74 },
            TailEvent::Line {
                start: 74,
                end: 76,
                bytes: b"z".to_vec()
            },
        ]
    );
    assert_eq!(fs::metadata(&path).unwrap().len(), 76);
}

#[test]
fn reader_notices_truncation_and_replacement() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.jsonl");
    append(&path, b"one\ntwo\n");
    let mut r = TailReader::new(path.clone(), 100, None);
    let p = r.poll().unwrap();
    assert_eq!(p.events.len(), 3);
    // Truncated and shorter than before: from the start again.
    fs::write(&path, b"3\n").unwrap();
    let mut events = Vec::new();
    for _ in 0..3 {
        events.extend(r.poll().unwrap().events);
    }
    assert_eq!(
        events,
        vec![
            TailEvent::Start { offset: 0 },
            TailEvent::Line {
                start: 0,
                end: 2,
                bytes: b"3".to_vec()
            },
        ]
    );
    // Rotated: the old file is read to its end (including what was added after the
    // rename), then the new one from the start.
    fs::rename(&path, dir.path().join("f.jsonl.1")).unwrap();
    append(&dir.path().join("f.jsonl.1"), b"old\n");
    fs::write(&path, b"new\n").unwrap();
    let mut events = Vec::new();
    for _ in 0..4 {
        events.extend(r.poll().unwrap().events);
    }
    assert_eq!(
        events,
        vec![
            TailEvent::Line {
                start: 2,
                end: 6,
                bytes: b"old".to_vec()
            },
            TailEvent::Start { offset: 0 },
            TailEvent::Line {
                start: 0,
                end: 4,
                bytes: b"new".to_vec()
            },
        ]
    );
}

// ---------------------------------------------------------------------------------------
// Tail source: end to end
// ---------------------------------------------------------------------------------------

struct TailRun {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

fn start_tail<S: RecordSink>(cfg: TailSourceConfig, state_dir: &Path, sink: Arc<S>) -> TailRun {
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run_tail(cfg, state_dir.to_path_buf(), sink, rx));
    TailRun { stop, task }
}

impl TailRun {
    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("run_tail did not stop")
            .unwrap();
    }
}

fn payloads(seen: &Seen) -> Vec<Value> {
    seen.lock()
        .unwrap()
        .iter()
        .map(|r| json_of(r).clone())
        .collect()
}

fn saved_state(state_dir: &Path) -> Option<TailState> {
    let entry = fs::read_dir(state_dir)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().ends_with(".json"))?;
    serde_json::from_slice(&fs::read(entry.path()).ok()?).ok()
}

#[tokio::test]
async fn tail_delivers_lines_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    append(
        &path,
        format!("{}{}{}", line(1), line(2), line(3)).as_bytes(),
    );
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    for n in 1..=3 {
        let r = next(&mut rx).await;
        assert_eq!(r.series, "tail/test");
        assert_eq!(json_of(&r), &json!(n));
    }
    append(
        &path,
        br#"{"series":"tail/b","payload_b64":"AAE=","ts":1795773600123}"#,
    );
    append(&path, format!("\n{}", line(5)).as_bytes());
    let r = next(&mut rx).await;
    assert_eq!(r.series, "tail/b");
    assert_eq!(r.payload, Payload::Bytes(vec![0, 1]));
    assert_eq!(r.ts_ms, Some(1_795_773_600_123));
    assert_eq!(json_of(&next(&mut rx).await), &json!(5));
    run.stop().await;
    assert_eq!(seen.lock().unwrap().len(), 5);
}

#[tokio::test]
async fn tail_waits_for_the_rest_of_a_partial_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    append(&path, br#"{"series":"tail/test","pay"#);
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    // Give the reader many polls to (wrongly) take the partial line.
    tokio::time::sleep(Duration::from_millis(200)).await;
    append(&path, format!("load\":1}}\n{}", line(2)).as_bytes());
    assert_eq!(json_of(&next(&mut rx).await), &json!(1));
    assert_eq!(json_of(&next(&mut rx).await), &json!(2));
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn tail_waits_for_a_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("later.jsonl");
    let (sink, _seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    tokio::time::sleep(Duration::from_millis(50)).await;
    append(&path, line(1).as_bytes());
    assert_eq!(json_of(&next(&mut rx).await), &json!(1));
    run.stop().await;
}

#[tokio::test]
async fn tail_resumes_after_a_restart_without_redelivery() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let state_dir = dir.path().join("state");
    append(
        &path,
        format!("{}{}{}", line(1), line(2), line(3)).as_bytes(),
    );

    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    for n in 1..=3 {
        assert_eq!(json_of(&next(&mut rx).await), &json!(n));
    }
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(1), json!(2), json!(3)]);

    // The state file: private, names the path, holds the position.
    let entries: Vec<_> = fs::read_dir(&state_dir)
        .unwrap()
        .map(|e| e.unwrap())
        .collect();
    assert_eq!(entries.len(), 1, "{entries:?}");
    let name = entries[0].file_name().to_string_lossy().into_owned();
    assert!(
        name.starts_with("tail-") && name.ends_with(".json"),
        "{name}"
    );
    assert_eq!(entries[0].metadata().unwrap().mode() & 0o777, 0o600);
    let state = saved_state(&state_dir).unwrap();
    assert_eq!(state.path, path.to_string_lossy());
    assert_eq!(state.offset, fs::metadata(&path).unwrap().len());

    append(&path, line(4).as_bytes());
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    assert_eq!(json_of(&next(&mut rx).await), &json!(4));
    append(&path, line(5).as_bytes());
    assert_eq!(json_of(&next(&mut rx).await), &json!(5));
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(4), json!(5)]);
}

#[tokio::test]
async fn tail_resumes_after_being_killed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let state_dir = dir.path().join("state");
    append(&path, format!("{}{}", line(1), line(2)).as_bytes());

    let (sink, _seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    for n in 1..=2 {
        assert_eq!(json_of(&next(&mut rx).await), &json!(n));
    }
    let len = fs::metadata(&path).unwrap().len();
    wait_until("the position to be recorded", || {
        saved_state(&state_dir).is_some_and(|s| s.offset == len)
    })
    .await;
    // No shutdown: the task just disappears, as with kill -9.
    run.task.abort();
    let _ = run.task.await;

    append(&path, line(3).as_bytes());
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    assert_eq!(json_of(&next(&mut rx).await), &json!(3));
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(3)]);
}

#[tokio::test]
async fn tail_reads_a_file_replaced_while_stopped_from_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let state_dir = dir.path().join("state");
    append(&path, format!("{}{}", line(1), line(2)).as_bytes());
    let (sink, _seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    for n in 1..=2 {
        assert_eq!(json_of(&next(&mut rx).await), &json!(n));
    }
    run.stop().await;

    // Replaced by a longer file (the inode may even be reused).
    fs::remove_file(&path).unwrap();
    append(
        &path,
        format!("{}{}{}", line(7), line(8), line(9)).as_bytes(),
    );
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    for n in 7..=9 {
        assert_eq!(json_of(&next(&mut rx).await), &json!(n));
    }
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(7), json!(8), json!(9)]);
}

#[tokio::test]
async fn tail_restarts_at_zero_after_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    append(
        &path,
        format!("{}{}{}", line(1), line(2), line(3)).as_bytes(),
    );
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    for n in 1..=3 {
        assert_eq!(json_of(&next(&mut rx).await), &json!(n));
    }
    fs::write(&path, line(9)).unwrap();
    assert_eq!(json_of(&next(&mut rx).await), &json!(9));
    run.stop().await;
    assert_eq!(
        payloads(&seen),
        vec![json!(1), json!(2), json!(3), json!(9)]
    );
}

#[tokio::test]
async fn tail_follows_a_rotated_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let rotated = dir.path().join("values.jsonl.1");
    append(&path, line(1).as_bytes());
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    assert_eq!(json_of(&next(&mut rx).await), &json!(1));
    fs::rename(&path, &rotated).unwrap();
    append(&rotated, line(2).as_bytes());
    append(&path, line(3).as_bytes());
    assert_eq!(json_of(&next(&mut rx).await), &json!(2));
    assert_eq!(json_of(&next(&mut rx).await), &json!(3));
    append(&path, line(4).as_bytes());
    assert_eq!(json_of(&next(&mut rx).await), &json!(4));
    run.stop().await;
    assert_eq!(
        payloads(&seen),
        vec![json!(1), json!(2), json!(3), json!(4)]
    );
}

#[tokio::test]
async fn tail_skips_bad_and_overlong_lines() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let mut text = String::new();
    text.push_str("not json\n");
    text.push_str("{\"series\":\"a/+\",\"payload\":1}\n");
    text.push_str(&format!(
        "{{\"series\":\"x\",\"payload\":\"{}\"}}\n",
        "y".repeat(200)
    ));
    text.push('\n');
    text.push_str(&line(1));
    append(&path, text.as_bytes());
    let mut cfg = tail_cfg(&path);
    cfg.max_line_bytes = 64;
    let state_dir = dir.path().join("state");
    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(cfg.clone(), &state_dir, sink);
    assert_eq!(json_of(&next(&mut rx).await), &json!(1));
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(1)]);
    // The skipped lines count as handled: the position is after all of them.
    assert_eq!(
        saved_state(&state_dir).unwrap().offset,
        fs::metadata(&path).unwrap().len()
    );
}

/// A sink that refuses the first `refuse` offers, then accepts; every offer is announced.
fn refusing_sink(
    refuse: usize,
) -> (
    Arc<impl RecordSink>,
    Seen,
    mpsc::UnboundedReceiver<IngestRecord>,
) {
    let accepted: Seen = Arc::default();
    let (tx, rx) = mpsc::unbounded_channel();
    let offers = Arc::new(AtomicUsize::new(0));
    let acc = accepted.clone();
    let sink = move |r: IngestRecord| {
        let n = offers.fetch_add(1, Ordering::SeqCst);
        let _ = tx.send(r.clone());
        let result = if n < refuse {
            Err("queue busy; retry later".to_string())
        } else {
            acc.lock().unwrap().push(r);
            Ok(n as u64)
        };
        async move { result }
    };
    (Arc::new(sink), accepted, rx)
}

#[tokio::test]
async fn tail_retries_a_refused_record() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    append(&path, format!("{}{}", line(1), line(2)).as_bytes());
    let (sink, accepted, mut offers) = refusing_sink(2);
    let run = start_tail(tail_cfg(&path), &dir.path().join("state"), sink);
    let offered: Vec<Value> = {
        let mut v = Vec::new();
        for _ in 0..4 {
            v.push(json_of(&next(&mut offers).await).clone());
        }
        v
    };
    assert_eq!(offered, vec![json!(1), json!(1), json!(1), json!(2)]);
    run.stop().await;
    assert_eq!(payloads(&accepted), vec![json!(1), json!(2)]);
}

#[tokio::test]
async fn tail_delivers_a_never_accepted_line_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("values.jsonl");
    let state_dir = dir.path().join("state");
    append(&path, format!("{}{}", line(1), line(2)).as_bytes());
    // Accepts the first offer and refuses every other one.
    let (tx, mut offers) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicUsize::new(0));
    let sink = move |r: IngestRecord| {
        let _ = tx.send(r);
        let n = count.fetch_add(1, Ordering::SeqCst);
        async move {
            if n == 0 {
                Ok(1)
            } else {
                Err("queue busy; retry later".to_string())
            }
        }
    };
    let run = start_tail(tail_cfg(&path), &state_dir, Arc::new(sink));
    // Line 1 is accepted, line 2 refused; stop while it waits to retry.
    for n in [1, 2] {
        assert_eq!(json_of(&next(&mut offers).await), &json!(n));
    }
    run.stop().await;

    let (sink, seen, mut rx) = collecting_sink();
    let run = start_tail(tail_cfg(&path), &state_dir, sink);
    assert_eq!(json_of(&next(&mut rx).await), &json!(2));
    run.stop().await;
    assert_eq!(payloads(&seen), vec![json!(2)]);
}

// ---------------------------------------------------------------------------------------
// Host figures
// ---------------------------------------------------------------------------------------

const PROC_STAT: &str = "\
cpu  10132153 290696 3084719 46828483 16683 0 25195 0 175628 0
cpu0 1393280 32966 572056 13343292 6130 0 17875 0 23933 0
intr 1462898 0 0 0
ctxt 123456
btime 1700000000
";

#[test]
fn parses_proc_stat() {
    let t = parse_proc_stat_cpu(PROC_STAT).unwrap();
    assert_eq!(
        t,
        CpuTimes {
            total: 10132153 + 290696 + 3084719 + 46828483 + 16683 + 25195,
            idle: 46828483 + 16683,
        }
    );
    assert_eq!(parse_proc_stat_cpu("cpu0 1 2 3 4\n"), None);
    assert_eq!(parse_proc_stat_cpu("cpu  1 2 x 4\n"), None);
    assert_eq!(parse_proc_stat_cpu("cpu  1 2\n"), None);
    // Old kernels: only four fields.
    assert_eq!(
        parse_proc_stat_cpu("cpu  1 2 3 4\n"),
        Some(CpuTimes { total: 10, idle: 4 })
    );
}

#[test]
fn cpu_percent_between_samples() {
    let a = CpuTimes {
        total: 1000,
        idle: 800,
    };
    let b = CpuTimes {
        total: 1400,
        idle: 900,
    };
    assert_eq!(cpu_busy_percent(&a, &b), Some(75.0));
    assert_eq!(cpu_busy_percent(&a, &a), None);
    assert_eq!(cpu_busy_percent(&b, &a), None);
    let idle_only = CpuTimes {
        total: 1100,
        idle: 900,
    };
    assert_eq!(cpu_busy_percent(&a, &idle_only), Some(0.0));
}

#[test]
fn parses_loadavg_meminfo_and_uptime() {
    assert_eq!(parse_loadavg("0.52 0.58 0.59 2/1234 56789\n"), Some(0.52));
    assert_eq!(parse_loadavg(""), None);
    assert_eq!(parse_loadavg("nan 1 1"), None);

    let meminfo = "\
MemTotal:        8029876 kB
MemFree:          512000 kB
MemAvailable:    4014938 kB
Buffers:          100000 kB
Cached:          2000000 kB
HugePages_Total:       0
";
    assert_eq!(
        parse_meminfo(meminfo),
        Some(MemInfo {
            total_bytes: 8_029_876 * 1024,
            available_bytes: 4_014_938 * 1024,
        })
    );
    let old = "MemTotal: 1000 kB\nMemFree: 100 kB\nBuffers: 20 kB\nCached: 300 kB\n";
    assert_eq!(
        parse_meminfo(old),
        Some(MemInfo {
            total_bytes: 1000 * 1024,
            available_bytes: 420 * 1024,
        })
    );
    assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    // "MemTotalX" is not "MemTotal".
    assert_eq!(parse_meminfo("MemTotalX: 1 kB\n"), None);

    assert_eq!(parse_uptime("350735.47 234388.90\n"), Some(350_735));
    assert_eq!(parse_uptime("x 1"), None);
    assert_eq!(parse_uptime("-1 1"), None);
}

#[test]
fn host_sampler_reads_this_host() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = HostSampler::new();
    let first = s.sample(dir.path()).unwrap();
    assert_eq!(first.cpu_percent, None);
    assert!(first.mem_total_bytes > 0);
    assert!(first.mem_available_bytes <= first.mem_total_bytes);
    assert!(first.disk_total_bytes > 0);
    assert!(first.disk_available_bytes <= first.disk_total_bytes);
    assert_eq!(first.disk_path, dir.path().display().to_string());
    let second = s.sample(dir.path()).unwrap();
    if let Some(p) = second.cpu_percent {
        assert!((0.0..=100.0).contains(&p));
    }
    let e = s.sample(&dir.path().join("missing")).unwrap_err();
    assert!(e.to_string().contains("missing"), "{e}");
    let v = serde_json::to_value(&second).unwrap();
    assert!(v.get("mem_available_bytes").is_some());
}
