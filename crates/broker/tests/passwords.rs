//! Password file: Mosquitto interop (real `mosquitto_passwd`), timing of unknown users and
//! wrong passwords, the Verifier's bounds, and `bulwark-broker passwd` as a real process.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bulwark_broker::auth::passwords::{
    Argon2Params, Busy, PasswordConfig, PasswordFile, Verdict, Verifier,
};

const BIN: &str = env!("CARGO_BIN_EXE_bulwark-broker");

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

fn mosquitto_passwd(args: &[&str]) {
    let out = Command::new("mosquitto_passwd")
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run mosquitto_passwd ({e}): install the Debian package mosquitto (mosquitto_passwd)")
        });
    assert!(
        out.status.success(),
        "mosquitto_passwd {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn line_of<'a>(text: &'a str, user: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(&format!("{user}:")))
        .unwrap_or_else(|| panic!("no line for {user} in {text}"))
}

#[tokio::test]
async fn mosquitto_entries_verify_and_upgrade_to_argon2id() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let p = path.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", p, "alice", "alice-pw-7"]);
    mosquitto_passwd(&["-H", "sha512", "-b", p, "bob", "bob-pw-6"]);
    let text = fs::read_to_string(&path).unwrap();
    assert!(line_of(&text, "alice").starts_with("alice:$7$"), "{text}");
    assert!(line_of(&text, "bob").starts_with("bob:$6$"), "{text}");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();

    let mut file = PasswordFile::load(&path).unwrap();
    let upgrade = Verdict::Accepted { upgrade: true };
    assert_eq!(file.verify("alice", b"alice-pw-7"), upgrade);
    assert_eq!(file.verify("bob", b"bob-pw-6"), upgrade);
    assert_eq!(file.verify("alice", b"bob-pw-6"), Verdict::Rejected);
    assert_eq!(file.verify("bob", b"alice-pw-7"), Verdict::Rejected);
    assert_eq!(file.verify("bob", b"bob-pw-"), Verdict::Rejected);

    // alice: upgraded by hand; bob: by the Verifier on a successful login.
    file.upgrade("alice", b"alice-pw-7").unwrap();
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        line_of(&text, "alice").starts_with("alice:$argon2id$v=19$m=19456,t=2,p=1$"),
        "{text}"
    );
    assert!(line_of(&text, "bob").starts_with("bob:$6$"), "{text}");
    assert_eq!(mode(&path), 0o600);

    let shared = Arc::new(RwLock::new(file));
    let verifier = Verifier::new(shared.clone(), &PasswordConfig::new(&path));
    assert_eq!(verifier.verify("bob", b"bob-pw-6").await, Ok(upgrade));
    let text = fs::read_to_string(&path).unwrap();
    assert!(
        line_of(&text, "bob").starts_with("bob:$argon2id$"),
        "{text}"
    );
    assert_eq!(mode(&path), 0o600);
    let ok = Verdict::Accepted { upgrade: false };
    assert_eq!(verifier.verify("bob", b"bob-pw-6").await, Ok(ok));
    assert_eq!(
        verifier.verify("bob", b"alice-pw-7").await,
        Ok(Verdict::Rejected)
    );

    // From disk again: the old passwords still work as argon2id, wrong ones do not.
    let file = PasswordFile::load(&path).unwrap();
    assert_eq!(file.verify("alice", b"alice-pw-7"), ok);
    assert_eq!(file.verify("bob", b"bob-pw-6"), ok);
    assert_eq!(file.verify("alice", b"alice-pw-8"), Verdict::Rejected);
    assert_eq!(file.verify("bob", b"BOB-PW-6"), Verdict::Rejected);
    assert_eq!(file.verify("carol", b"bob-pw-6"), Verdict::Rejected);
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[test]
fn unknown_user_and_wrong_password_cost_an_argon2_verification() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    // A Mosquitto $6$ entry (mosquitto_passwd -H sha512, password "secret2"): cheap by itself,
    // so it must pay for the dummy argon2 too.
    fs::write(&path, "bob:$6$sFbJgWdCx9YT7YVZ$1MAqBmU8GMfUgn+9PKAQitL2I02bv+7PdF4sDtQ98yP7FnyLhSpafylBvfh8E5uwpGE6d8u3XqhRyu3oxENc0Q==\n").unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
    let mut file = PasswordFile::open_for_edit(&path, Argon2Params::default()).unwrap();
    file.add_or_replace("alice", b"right password").unwrap();
    file.save().unwrap();
    let file = PasswordFile::load(&path).unwrap();

    let time = |user: &str, pw: &[u8], expect: bool| {
        let start = Instant::now();
        let v = file.verify(user, pw);
        let took = start.elapsed();
        assert_eq!(v.is_accepted(), expect, "{user}");
        took
    };
    let (mut good, mut wrong, mut unknown, mut legacy_wrong) = (vec![], vec![], vec![], vec![]);
    for _ in 0..7 {
        good.push(time("alice", b"right password", true));
        wrong.push(time("alice", b"wrong password", false));
        unknown.push(time("mallory", b"right password", false));
        legacy_wrong.push(time("bob", b"wrong password", false));
    }
    let (good, wrong, unknown, legacy_wrong) = (
        median(good),
        median(wrong),
        median(unknown),
        median(legacy_wrong),
    );
    eprintln!(
        "argon2id m=19456,t=2,p=1 verification (median of 7): good {good:?}, wrong password {wrong:?}, unknown user {unknown:?}, wrong password on a $6$ entry {legacy_wrong:?}"
    );
    for (what, took) in [
        ("wrong password", wrong),
        ("unknown user", unknown),
        ("wrong password on a $6$ entry", legacy_wrong),
    ] {
        assert!(
            took.as_secs_f64() >= 0.4 * good.as_secs_f64(),
            "{what} took {took:?}, a good verification {good:?}: the difference reveals whether the user exists"
        );
    }
}

fn verifier(max_concurrent: usize, max_pending: usize) -> Verifier {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let mut file = PasswordFile::open_or_create(&path, Argon2Params::default()).unwrap();
    file.add_or_replace("alice", b"pw").unwrap();
    let mut config = PasswordConfig::new(&path);
    config.max_concurrent_verifications = max_concurrent;
    config.max_pending_verifications = max_pending;
    Verifier::new(Arc::new(RwLock::new(file)), &config)
}

#[tokio::test]
async fn busy_when_the_pending_bound_is_exceeded() {
    let v = verifier(1, 1);
    let results = futures_util::future::join_all((0..5).map(|_| v.verify("alice", b"pw"))).await;
    let busy = results.iter().filter(|r| **r == Err(Busy)).count();
    let accepted = results
        .iter()
        .filter(|r| **r == Ok(Verdict::Accepted { upgrade: false }))
        .count();
    // One runs, one waits, the other three are refused at once.
    assert!(busy >= 1 && accepted >= 2, "{results:?}");
    assert_eq!(busy + accepted, 5, "{results:?}");
    // Nothing stays counted once the burst is over.
    assert_eq!(
        v.verify("alice", b"pw").await,
        Ok(Verdict::Accepted { upgrade: false })
    );
}

#[tokio::test]
async fn a_cancelled_waiter_frees_its_pending_place() {
    let v = verifier(1, 1);
    let running = v.verify("alice", b"pw");
    let cancelled = tokio::time::timeout(Duration::from_millis(1), v.verify("alice", b"pw"));
    let later = async {
        // Runs after `cancelled` gave up: its place in the queue is free again.
        tokio::time::sleep(Duration::from_millis(5)).await;
        v.verify("alice", b"pw").await
    };
    let (a, b, c) = tokio::join!(running, cancelled, later);
    assert_eq!(a, Ok(Verdict::Accepted { upgrade: false }));
    assert!(
        b.is_err(),
        "the 1 ms timeout should have cancelled the waiter: {b:?}"
    );
    assert_eq!(c, Ok(Verdict::Accepted { upgrade: false }));
}

fn passwd(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .arg("passwd")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The command may exit before reading (a bad username): a broken pipe is fine.
    let written = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    if let Err(e) = written {
        assert_eq!(e.kind(), std::io::ErrorKind::BrokenPipe, "{e}");
    }
    child.wait_with_output().unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn passwd_cli_adds_lists_and_deletes() {
    const PW: &str = "Pl4nt-Fl00r-Secret";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let p = path.to_str().unwrap();

    let args = ["add", p, "scada-hmi"];
    assert!(!args.iter().any(|a| a.contains(PW)));
    let out = passwd(&args, &format!("{PW}\n"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains(PW), "{}", text(&out));
    assert!(
        text(&out).contains("added user scada-hmi"),
        "{}",
        text(&out)
    );
    assert_eq!(mode(&path), 0o600);
    let contents = fs::read_to_string(&path).unwrap();
    assert!(
        contents.starts_with("scada-hmi:$argon2id$v=19$"),
        "{contents}"
    );
    assert!(!contents.contains(PW));
    let file = PasswordFile::load(&path).unwrap();
    assert_eq!(
        file.verify("scada-hmi", PW.as_bytes()),
        Verdict::Accepted { upgrade: false }
    );
    assert_eq!(file.verify("scada-hmi", b"other"), Verdict::Rejected);

    // A second user; CRLF input; then a new password for the first.
    let out = passwd(&["add", p, "historian"], "h1st-pw\r\n");
    assert!(out.status.success(), "{}", text(&out));
    let out = passwd(&["add", p, "scada-hmi"], "new-pw\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        text(&out).contains("changed the password of scada-hmi"),
        "{}",
        text(&out)
    );
    let file = PasswordFile::load(&path).unwrap();
    assert!(file.verify("scada-hmi", b"new-pw").is_accepted());
    assert!(!file.verify("scada-hmi", PW.as_bytes()).is_accepted());
    assert!(file.verify("historian", b"h1st-pw").is_accepted());

    let out = passwd(&["list", p], "");
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "scada-hmi\targon2id\nhistorian\targon2id\n"
    );

    // Failures: exit 1, a message saying what to fix, nothing changed.
    let before = fs::read(&path).unwrap();
    for (args, stdin, needle) in [
        (vec!["delete", p, "nobody"], "", "no user nobody"),
        (vec!["add", p, "new-user"], "", "the password is empty"),
        (vec!["add", p, "bad:name"], "pw\n", "contains ':'"),
        (vec!["add", p, " padded"], "pw\n", "whitespace"),
    ] {
        let out = passwd(&args, stdin);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(needle), "{args:?}: {}", text(&out));
    }
    assert_eq!(fs::read(&path).unwrap(), before);
    let missing = dir.path().join("missing");
    let out = passwd(&["list", missing.to_str().unwrap()], "");
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("missing"), "{}", text(&out));

    let out = passwd(&["delete", p, "scada-hmi"], "");
    assert!(out.status.success(), "{}", text(&out));
    let out = passwd(&["delete", p, "historian"], "");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("no users left"), "{}", text(&out));
    assert_eq!(mode(&path), 0o600);
    assert!(PasswordFile::load(&path).is_err());
}

#[test]
fn passwd_cli_makes_a_mosquitto_file_private_and_keeps_its_entries() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("passwd");
    let p = path.to_str().unwrap();
    mosquitto_passwd(&["-c", "-b", p, "alice", "alice-pw"]);
    fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
    let err = PasswordFile::load(&path).unwrap_err().to_string();
    assert!(err.contains(&format!("chmod 600 {p}")), "{err}");

    let out = passwd(&["add", p, "bob"], "bob-pw\n");
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("now has mode 0600"), "{}", text(&out));
    assert_eq!(mode(&path), 0o600);
    let file = PasswordFile::load(&path).unwrap();
    assert_eq!(
        file.verify("alice", b"alice-pw"),
        Verdict::Accepted { upgrade: true }
    );
    assert_eq!(
        file.verify("bob", b"bob-pw"),
        Verdict::Accepted { upgrade: false }
    );
    let out = passwd(&["list", p], "");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("alice\tmosquitto $7$"),
        "{}",
        text(&out)
    );
}
