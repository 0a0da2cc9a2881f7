//! The `specvm-graph` command as a user meets it: what it writes, what it
//! refuses, and what it says. (The page in a browser: tests/tests/graph.rs.)

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const BIN: &str = env!("CARGO_BIN_EXE_specvm-graph");

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("specgraph-cli-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).expect("a temp dir");
        Self(d)
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, text).expect("writing a stream");
        p
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting specvm-graph");
    let mut input = child.stdin.take().expect("piped");
    input.write_all(stdin.as_bytes()).expect("stdin");
    drop(input);
    child.wait_with_output().expect("its output")
}

fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

const STREAM: &str = r#"{"event":"started","id":"1:1","port":1,"us":100}
{"event":"joined","id":"1:1","port":2,"us":150}
{"event":"committed","id":"1:1","port":1,"us":200}
{"event":"joined","id":"1:1",
"#;

#[test]
fn writes_the_page_and_says_what_it_skipped() {
    let d = Dir::new("write");
    let f = d.file("br.jsonl", STREAM);
    let out = d.0.join("g.html");
    let o = run(&[s(&f), "-o", s(&out)], "");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr),
    );
    assert!(o.status.success(), "{stderr}");
    assert!(
        stdout.contains(
            "1 speculations (1 committed, 0 aborted, 0 open), 1 joins, 1 bridges, 1 malformed"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("br.jsonl: 1 malformed lines skipped; the first, line 4"),
        "{stderr}"
    );
    let page = std::fs::read_to_string(&out).expect("the page");
    assert!(page.contains(r#"data-malformed="1""#));
    assert!(page.contains(r#"data-kind="join" data-spec-id="1:1""#));

    // Not replaced without --force; replaced with it; stdin read alike.
    let o = run(&[s(&f), "-o", s(&out)], "");
    assert_eq!(o.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        stderr.starts_with("specvm-graph: error: ") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&out).expect("the page"), page);
    let o = run(
        &["--name", "br.jsonl", "-", "-o", s(&out), "--force"],
        STREAM,
    );
    assert!(o.status.success());
    assert_eq!(std::fs::read_to_string(&out).expect("the page"), page);
    let names: Vec<_> = std::fs::read_dir(&d.0)
        .expect("ls")
        .map(|e| e.expect("e").file_name())
        .collect();
    assert_eq!(names.len(), 2, "no temporary file left: {names:?}");
}

#[test]
fn bad_command_lines_fail_in_one_line() {
    let d = Dir::new("bad");
    // Good lines only: the one line on stderr is the error.
    let f = d.file(
        "a.jsonl",
        &STREAM[..STREAM.rfind("{\"event\":\"joined\"").expect("a join")],
    );
    let out = d.0.join("g.html");
    for (args, want) in [
        (vec![s(&f)], "--output"),
        (vec!["-o", s(&out)], "FILE"),
        (
            vec![s(&f), "--name", "x", "-o", s(&out)],
            "--name x names no FILE",
        ),
        (
            vec!["-", "-", "-o", s(&out)],
            "stdin (-) can be read only once",
        ),
        (
            vec!["/nonexistent/x.jsonl", "-o", s(&out)],
            "reading /nonexistent/x.jsonl",
        ),
        (vec![s(&d.0), "-o", s(&out)], "is a directory"),
        (vec![s(&f), "-o", s(&d.0)], "not a regular file"),
        (
            vec![s(&f), "-o", "/nonexistent/g.html"],
            "the folder /nonexistent",
        ),
        (vec![s(&f), "-o", s(&out), "--bogus"], "--bogus"),
    ] {
        let mut argv = args.clone();
        argv.push("--force");
        let o = run(&argv, "");
        let stderr = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(
            stderr.starts_with("specvm-graph: error: "),
            "{args:?}: {stderr}"
        );
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    assert!(!out.exists());
    let o = run(&["--help"], "");
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("--name"));
}
