//! The `bulwark-pki` binary end to end.

use std::path::Path;
use std::process::{Command, Output};

fn run(cwd: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bulwark-pki"))
        .current_dir(cwd)
        .args(args)
        .output()
        .expect("run bulwark-pki")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn init_issue_revoke_show() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();

    let out = run(cwd, &["init", "--client", "press-7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("created  certs/dev/ca.pem"), "{text}");
    assert!(
        text.contains("created  certs/dev/clients/press-7.key"),
        "{text}"
    );

    let out = run(cwd, &["init", "--client", "press-7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("found    certs/dev/ca.pem"), "{text}");
    assert!(!text.contains("created"), "{text}");

    let out = run(cwd, &["issue-client", "hmi"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = run(cwd, &["issue-client", "hmi"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("already exists"), "{}", stderr(&out));

    let out = run(cwd, &["revoke", "press-7"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("CRL number 2"), "{}", stdout(&out));

    let out = run(cwd, &["show"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let line = |cn: &str| {
        text.lines()
            .find(|l| l.split_whitespace().nth(1) == Some(cn))
            .unwrap_or_else(|| panic!("no line for {cn} in\n{text}"))
            .to_owned()
    };
    assert!(line("press-7").ends_with("REVOKED"), "{text}");
    assert!(line("hmi").ends_with("valid"), "{text}");
    assert!(line("bulwark-broker").starts_with("server"), "{text}");
    assert!(text.contains("number 2, 1 revoked"), "{text}");
}

#[test]
fn custom_dir_and_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let cwd = tmp.path();

    let out = run(cwd, &["issue-client", "x", "--dir", "site/pki"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("run `bulwark-pki init --dir site/pki` first"),
        "{}",
        stderr(&out)
    );

    let out = run(
        cwd,
        &[
            "init",
            "--dir",
            "site/pki",
            "--server-name",
            "gw.plant.local",
            "--server-name",
            "10.0.4.20",
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(cwd.join("site/pki/server.pem").exists());

    let out = run(cwd, &["revoke", "ghost", "--dir", "site/pki"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("ghost.pem: no such file"),
        "{}",
        stderr(&out)
    );

    let out = run(cwd, &["--help"]);
    assert!(stdout(&out).contains("Examples:"));
}
