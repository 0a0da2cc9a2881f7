//! `specvm-graph` (docs/graph.md) seen in a real browser: the page is
//! rendered from event streams, opened with Debian's headless Chromium
//! (`--dump-dom`, the DOM after the page's script ran), and every
//! speculation, join and outcome of the streams must be in the DOM, laid
//! out by the browser with a box inside the picture (the page's script
//! writes each element's `getBBox()` into `data-bbox` and `data-visible`,
//! and counts them in `#drawn`). No pixels are compared.
//!
//! - `a_real_scenario_is_drawn`: two bare-guest VMs (`net_node`) on a real
//!   netbridge; A speculates, B joins through A's frame, A commits; A
//!   speculates again, B joins, A aborts and B rolls back. The bridge's
//!   own event log, and both VMMs' event streams, are the input.
//! - `two_bridges_are_drawn_as_lanes`: `tests/fixtures/graph/host-*.jsonl`,
//!   two bridges' streams with speculations joined across them. They are
//!   written by hand in the bridge's event format, as peered bridges would
//!   report them: until peering lands no real bridge can share a
//!   speculation with another. One line is cut short (malformed), one is
//!   a kind this tool does not draw.
//!
//! Without `/usr/bin/chromium` (`apt-get install -y chromium`; or the
//! browser `SPECVM_CHROMIUM` names) both are recorded as skipped, never
//! passed.

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use specvm_tests::net_node::{poll, NetNode};
use specvm_tests::{
    record_skip, run_command, skip_without_kvm, specgraph_bin, specvm_bin, NetBridge, RunResult,
    TempDir,
};

fn wait_until(what: &str, f: impl FnMut() -> bool) {
    assert!(poll(TIMEOUT, f), "{what} never came");
}

/// Debian's Chromium; `SPECVM_CHROMIUM` names another.
fn chromium() -> PathBuf {
    std::env::var_os("SPECVM_CHROMIUM")
        .map_or_else(|| PathBuf::from("/usr/bin/chromium"), PathBuf::from)
}
/// The longest any one wait may take.
const TIMEOUT: Duration = Duration::from_secs(60);
/// How long Chromium may take to load, run and dump the page.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(90);

/// Records a skip and returns from the test when Chromium is missing.
macro_rules! skip_without_chromium {
    ($test:expr) => {
        if !chromium().is_file() {
            record_skip(
                $test,
                &format!(
                    "{} is missing: install it with `apt-get install -y chromium`",
                    chromium().display()
                ),
            );
            return;
        }
    };
}

// ---------------------------------------------------------------------
// What the streams say must be drawn.

/// The speculations, joins and outcomes of one bridge's stream, read here
/// with serde_json on its own (bad lines are left out, as the tool does).
#[derive(Debug, Default)]
struct Expected {
    /// Speculation id -> the outcomes announced for it.
    specs: BTreeMap<String, BTreeSet<String>>,
    /// (id, port) of every join.
    joins: Vec<(String, u64)>,
    /// (id, outcome, port) of every committed and aborted event.
    outcomes: Vec<(String, String, u64)>,
}

fn expected(stream: &str) -> Expected {
    let mut e = Expected::default();
    for line in stream.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let kind = v["event"].as_str().unwrap_or_default();
        let id = v["id"].as_str().unwrap_or_default().to_string();
        let port = v["port"].as_u64().unwrap_or(u64::MAX);
        match kind {
            "started" => {
                e.specs.entry(id).or_default();
            }
            "joined" => {
                e.specs.entry(id.clone()).or_default();
                e.joins.push((id, port));
            }
            "committed" | "aborted" => {
                e.specs
                    .entry(id.clone())
                    .or_default()
                    .insert(kind.to_string());
                e.outcomes.push((id, kind.to_string(), port));
            }
            _ => {}
        }
    }
    e
}

// ---------------------------------------------------------------------
// The browser and the DOM it dumps.

/// Opens `page` in headless Chromium and returns the DOM after its
/// scripts ran. Chromium runs in a process group of its own, killed as a
/// whole (by that group's id) if it overruns.
fn dump_dom(page: &Path, dir: &TempDir) -> String {
    let profile = dir.join("chromium-profile");
    std::fs::create_dir_all(&profile).expect("a profile folder");
    let mut cmd = Command::new(chromium());
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg("--dump-dom")
    .arg(format!("file://{}", page.display()))
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let mut child = cmd.spawn().expect("starting chromium");
    let group = Group(child.id());
    let out = std::thread::spawn({
        let mut stdout = child.stdout.take().expect("piped");
        move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stdout, &mut s);
            s
        }
    });
    let err = std::thread::spawn({
        let mut stderr = child.stderr.take().expect("piped");
        move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
            s
        }
    });
    let deadline = Instant::now() + BROWSER_TIMEOUT;
    let status = loop {
        match child.try_wait().expect("waiting for chromium") {
            Some(s) => break s,
            None if Instant::now() > deadline => {
                drop(group);
                let _ = child.wait();
                panic!(
                    "chromium did not dump {} within {BROWSER_TIMEOUT:?}",
                    page.display()
                );
            }
            None => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    drop(group);
    let dom = out.join().expect("stdout reader");
    let err = err.join().expect("stderr reader");
    assert!(status.success(), "chromium: {status}\n{err}");
    assert!(
        dom.contains("</html>"),
        "chromium dumped no page:\n{dom}\n{err}"
    );
    dom
}

/// Kills a process group this test started, by its id, when dropped:
/// what Chromium left running goes with it.
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        if let Ok(pgid) = i32::try_from(self.0) {
            // SAFETY: kill(2) with a negative pid signals the process
            // group `pgid`, which is Chromium's own (process_group(0)).
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
        }
    }
}

/// One start tag of the dumped DOM: its name and attributes.
#[derive(Debug, Clone)]
struct Tag {
    name: String,
    attrs: BTreeMap<String, String>,
    /// The text right after the tag, to the next `<`.
    text: String,
}

impl Tag {
    fn get(&self, a: &str) -> &str {
        self.attrs.get(a).map_or("", String::as_str)
    }
}

/// The start tags of `html`. Written here rather than with an HTML parser
/// crate (none is in the workspace, and html5ever's is heavy to build):
/// the page is our own markup as Chromium serializes it, where attribute
/// values are always double-quoted with `&`, `"`, `<` and `>` escaped.
fn tags(html: &str) -> Vec<Tag> {
    let mut out = Vec::new();
    let mut rest = html;
    while let Some(i) = rest.find('<') {
        rest = &rest[i + 1..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
            .collect();
        if name.is_empty() {
            continue;
        }
        rest = &rest[name.len()..];
        let mut attrs = BTreeMap::new();
        loop {
            rest = rest.trim_start();
            if rest.starts_with('>') || rest.starts_with("/>") || rest.is_empty() {
                rest = rest.trim_start_matches('/').trim_start_matches('>');
                break;
            }
            let key: String = rest
                .chars()
                .take_while(|c| !c.is_whitespace() && *c != '=' && *c != '>' && *c != '/')
                .collect();
            rest = &rest[key.len()..];
            let mut value = String::new();
            if let Some(r) = rest.strip_prefix("=\"") {
                let end = r.find('"').unwrap_or(r.len());
                value = unescape(&r[..end]);
                rest = &r[(end + 1).min(r.len())..];
            } else if key.is_empty() {
                // Something this scanner does not know: skip a character.
                rest = rest.get(1..).unwrap_or_default();
            }
            if !key.is_empty() {
                attrs.insert(key, value);
            }
        }
        let text = rest[..rest.find('<').unwrap_or(rest.len())].to_string();
        out.push(Tag {
            name,
            attrs,
            text: unescape(&text),
        });
    }
    out
}

fn unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&nbsp;", "\u{a0}")
        .replace("&amp;", "&")
}

/// The drawn things of kind `kind` (`speculation`, `join`, `outcome`).
fn of_kind<'a>(dom: &'a [Tag], kind: &str) -> Vec<&'a Tag> {
    dom.iter().filter(|t| t.get("data-kind") == kind).collect()
}

/// Panics unless the browser laid `t` out with a box inside the picture.
fn assert_visible(t: &Tag) {
    assert_eq!(t.get("data-visible"), "true", "not visible: {t:?}");
    let b: Vec<f64> = t
        .get("data-bbox")
        .split(' ')
        .map(|v| v.parse().unwrap_or(-1.0))
        .collect();
    assert!(b.len() == 4 && b[2] > 0.0 && b[3] > 0.0, "no box: {t:?}");
}

/// Checks that the page shows everything `e` expects in lane `lane`, and
/// returns how many speculations, joins and outcomes that is.
fn check_lane(dom: &[Tag], lane: &str, e: &Expected) -> (usize, usize, usize) {
    let specs = of_kind(dom, "speculation");
    let joins = of_kind(dom, "join");
    let outcomes = of_kind(dom, "outcome");
    for (id, announced) in &e.specs {
        let node: Vec<_> = specs
            .iter()
            .filter(|t| t.get("data-spec-id") == id)
            .collect();
        assert_eq!(node.len(), 1, "speculation {id} drawn {} times", node.len());
        assert_visible(node[0]);
        let want = match announced.len() {
            0 => "open",
            1 => announced.first().map_or("", String::as_str),
            _ => "conflict",
        };
        // Another lane may have announced an outcome this one has not.
        let drawn = node[0].get("data-outcome");
        assert!(
            drawn == want || want == "open",
            "{id}: drawn {drawn}, {lane} says {want}"
        );
    }
    for (id, port) in &e.joins {
        let port = port.to_string();
        let edge: Vec<_> = joins
            .iter()
            .filter(|t| {
                t.get("data-spec-id") == id
                    && t.get("data-port") == port
                    && t.get("data-lane") == lane
            })
            .collect();
        assert_eq!(
            edge.len(),
            1,
            "join of {id} by port {port} on {lane}: {edge:?}"
        );
        assert_visible(edge[0]);
        assert!(
            edge[0]
                .get("data-label")
                .starts_with(&format!("port {port}")),
            "{:?}",
            edge[0]
        );
        let node = specs
            .iter()
            .find(|t| t.get("data-spec-id") == id)
            .expect("its node");
        assert_eq!(edge[0].get("data-outcome"), node.get("data-outcome"));
    }
    for (id, outcome, port) in &e.outcomes {
        let port = port.to_string();
        let mark: Vec<_> = outcomes
            .iter()
            .filter(|t| {
                t.get("data-spec-id") == id
                    && t.get("data-outcome") == outcome
                    && t.get("data-port") == port
                    && t.get("data-lane") == lane
            })
            .collect();
        assert_eq!(mark.len(), 1, "{outcome} of {id} on {lane} port {port}");
        assert_visible(mark[0]);
    }
    (e.specs.len(), e.joins.len(), e.outcomes.len())
}

/// The page's script counted what the browser drew: it must match.
fn check_counts(dom: &[Tag], specs: usize, joins: usize, outcomes: usize) {
    assert_eq!(of_kind(dom, "speculation").len(), specs);
    assert_eq!(of_kind(dom, "join").len(), joins);
    assert_eq!(of_kind(dom, "outcome").len(), outcomes);
    let drawn = dom
        .iter()
        .find(|t| t.get("id") == "drawn")
        .expect("the #drawn paragraph");
    assert_eq!(
        drawn.get("data-speculation"),
        specs.to_string(),
        "{drawn:?}"
    );
    assert_eq!(drawn.get("data-join"), joins.to_string(), "{drawn:?}");
    assert_eq!(drawn.get("data-outcome"), outcomes.to_string(), "{drawn:?}");
    assert!(
        drawn.text.starts_with("Drawn, as this browser laid it out"),
        "{drawn:?}"
    );
}

fn summary(dom: &[Tag]) -> &Tag {
    dom.iter()
        .find(|t| t.get("id") == "summary")
        .expect("the summary")
}

/// Runs specvm-graph with `args` (and the file `stdin` on its standard
/// input: run_command closes stdin, so a shell gives it the file).
fn graph(args: &[&str], stdin: Option<&Path>) -> RunResult {
    let mut cmd = match stdin {
        Some(p) => {
            let mut sh = Command::new("sh");
            sh.arg("-c")
                .arg("exec \"$0\" \"$@\" < \"$STDIN_FILE\"")
                .arg(specgraph_bin())
                .env("STDIN_FILE", p);
            sh
        }
        None => Command::new(specgraph_bin()),
    };
    cmd.args(args);
    run_command(cmd, TIMEOUT)
}

// ---------------------------------------------------------------------
// The real scenario.

/// A `net_node` VM on the bridge, scripted through its console and API,
/// with a name for the messages.
struct Node {
    n: NetNode,
    name: &'static str,
}

impl Node {
    fn start(bridge: &NetBridge, name: &'static str, id: u32) -> Self {
        let n = NetNode::start(&bridge.dir, id, &bridge.net_arg());
        Self { n, name }
    }

    fn expect(&mut self, line: &str) {
        self.n.expect(line);
    }

    fn say(&mut self, text: &str) {
        self.n.say(text);
    }

    fn ctl_id(&self, op: &str, id: &str) {
        assert_eq!(
            self.n.ctl(op),
            format!(r#"{{"ok":true,"id":"{id}"}}"#),
            "VM {}",
            self.name
        );
    }

    /// Waits until the VM's checkpoint stack is `depth` deep.
    fn wait_depth(&self, depth: usize) {
        self.n.wait_depth(depth, Instant::now());
    }

    fn quit(self) {
        self.n.quit();
    }

    /// `specvm ctl events` of this VM, into `file`, until the VM ends.
    fn events(&self, file: &Path) -> Killed {
        let out = std::fs::File::create(file).expect("the events file");
        let child = Command::new(specvm_bin())
            .args([
                "ctl",
                "--api-sock",
                self.n.sock().to_str().expect("UTF-8"),
                "events",
            ])
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .expect("specvm ctl events");
        Killed(child)
    }
}

/// A child killed (by its PID) and reaped when dropped, if still running.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

#[test]
#[cfg_attr(no_kvm, ignore = "no usable /dev/kvm")]
fn a_real_scenario_is_drawn() {
    skip_without_kvm!();
    skip_without_chromium!("graph::a_real_scenario_is_drawn");
    let dir = TempDir::new("graph-real");
    let events_sock = dir.join("events.sock");
    let bridge = NetBridge::start_with(
        "graph-real",
        &["--events".as_ref(), events_sock.as_os_str()],
    );
    let count = |needle: &str| bridge.events().matches(needle).count();
    // A second page is drawn live, from the bridge's event socket, until
    // the test's Ctrl-C (SIGINT) once the scenario is over.
    wait_until("the event socket", || events_sock.exists());
    let live_page = dir.join("live.html");
    let live_err = dir.join("live.err");
    let live = Killed(
        Command::new(specgraph_bin())
            .arg("--name")
            .arg("bridge")
            .arg(&events_sock)
            .arg("-o")
            .arg(&live_page)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&live_err).expect("a file"))
            .spawn()
            .expect("starting specvm-graph"),
    );
    // It says so once connected, with Ctrl-C handled.
    wait_until("specvm-graph reading the socket", || {
        std::fs::read_to_string(&live_err).is_ok_and(|e| e.contains("Ctrl-C"))
    });
    let mut a = Node::start(&bridge, "A", 1);
    let mut b = Node::start(&bridge, "B", 2);
    wait_until("both ports", || count(r#""event":"port-up""#) == 2);
    // The VMMs' streams. The API says nothing when a stream is open; the
    // one event checked in them, B's rollback of 1:2, comes a whole
    // speculation (several `ctl` runs and waits) after they start.
    let a_events = a.events(&dir.join("vm-a.jsonl"));
    let b_events = b.events(&dir.join("vm-b.jsonl"));

    // 1:1 commits: B joins on A's frame, then A commits.
    a.ctl_id("speculate", "1:1");
    a.say("x");
    b.expect("net_node: got x");
    wait_until("B's join of 1:1", || {
        count(r#""event":"joined","id":"1:1""#) == 1
    });
    a.ctl_id("commit", "1:1");
    b.wait_depth(0);
    wait_until("B's ack of 1:1", || {
        count(r#""event":"acked","id":"1:1""#) == 1
    });

    // 1:2 aborts: B joins, A aborts, B rolls back.
    a.ctl_id("speculate", "1:2");
    a.say("y");
    b.expect("net_node: got y");
    wait_until("B's join of 1:2", || {
        count(r#""event":"joined","id":"1:2""#) == 1
    });
    a.ctl_id("abort", "1:2");
    b.wait_depth(0);
    wait_until("B's ack of 1:2", || {
        count(r#""event":"acked","id":"1:2""#) == 1
    });
    a.quit();
    b.quit();
    drop(a_events);
    drop(b_events);
    wait_until("the ports going", || count(r#""event":"port-down""#) == 2);

    let log = dir.join("bridge.jsonl");
    std::fs::write(&log, bridge.events()).expect("copying the event log");
    let vm_b = std::fs::read_to_string(dir.join("vm-b.jsonl")).expect("B's events");
    let page = dir.join("graph.html");
    let r = graph(
        &[
            "--name",
            "bridge",
            log.to_str().expect("UTF-8"),
            "--name",
            "vm A",
            dir.join("vm-a.jsonl").to_str().expect("UTF-8"),
            "--name",
            "vm B",
            dir.join("vm-b.jsonl").to_str().expect("UTF-8"),
            "-o",
            page.to_str().expect("UTF-8"),
        ],
        None,
    );
    r.assert_status(0);
    assert!(
        r.stdout
            .contains("2 speculations (1 committed, 1 aborted, 0 open), 2 joins"),
        "{r}"
    );

    // Ctrl-C to the live reader, by its PID: it draws what came.
    let pid = i32::try_from(live.0.id()).expect("a pid");
    // SAFETY: kill(2) on a child of this test that has not been reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
    let mut live = live;
    wait_until("specvm-graph to end", || {
        matches!(live.0.try_wait(), Ok(Some(_)))
    });
    let done = live.0.wait().expect("its status");
    let err = std::fs::read_to_string(&live_err).unwrap_or_default();
    assert!(done.success(), "specvm-graph on the socket: {done}\n{err}");

    let dom = tags(&dump_dom(&page, &dir));
    let e = expected(&bridge.events());
    // The scenario as it was run: the bridge must have said so too.
    assert_eq!(
        e.specs
            .iter()
            .map(|(k, v)| (k.as_str(), v.iter().cloned().collect::<Vec<_>>()))
            .collect::<Vec<_>>(),
        [
            ("1:1", vec!["committed".to_string()]),
            ("1:2", vec!["aborted".to_string()])
        ]
    );
    assert_eq!(e.joins.len(), 2);
    let (s, j, o) = check_lane(&dom, "bridge", &e);
    check_counts(&dom, s, j, o);
    let node = |id: &str| {
        of_kind(&dom, "speculation")
            .into_iter()
            .find(|t| t.get("data-spec-id") == id)
            .expect("drawn")
            .clone()
    };
    assert_eq!(node("1:1").get("data-outcome"), "committed");
    assert_eq!(node("1:2").get("data-outcome"), "aborted");
    // A started both on its port, whose VM the page names.
    assert_eq!(node("1:1").get("data-started"), "true");
    // B's own stream says it rolled 1:2 back; the node says so.
    assert!(vm_b.contains(r#""event":"rollback","id":"1:2""#), "{vm_b}");
    assert_eq!(node("1:2").get("data-rolled-back"), "vm B");
    assert_eq!(node("1:1").get("data-rolled-back"), "");
    // Both joins by B's port, acknowledged.
    for t in of_kind(&dom, "join") {
        assert_eq!(t.get("data-acked"), "true", "{t:?}");
    }
    let sum = summary(&dom);
    assert_eq!(sum.get("data-malformed"), "0");
    assert_eq!(sum.get("data-lanes"), "1");

    // The page drawn live from the socket shows the same.
    let dom = tags(&dump_dom(&live_page, &dir));
    let (s, j, o) = check_lane(&dom, "bridge", &e);
    check_counts(&dom, s, j, o);
    assert_eq!(summary(&dom).get("data-malformed"), "0");
}

#[test]
fn two_bridges_are_drawn_as_lanes() {
    skip_without_chromium!("graph::two_bridges_are_drawn_as_lanes");
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/graph");
    let (a, b) = (fixtures.join("host-a.jsonl"), fixtures.join("host-b.jsonl"));
    let dir = TempDir::new("graph-two");
    let page = dir.join("two.html");
    let page_arg = page.to_str().expect("UTF-8");
    // host-b comes on stdin.
    let r = graph(
        &[
            "--name",
            "host-a",
            a.to_str().expect("UTF-8"),
            "--name",
            "host-b",
            "-",
            "-o",
            page_arg,
        ],
        Some(&b),
    );
    r.assert_status(0);
    r.assert_stderr_contains("host-b: 1 malformed lines skipped; the first, line 10");
    r.assert_stderr_contains("peer-up");

    // The page is not replaced without --force, and is with it.
    let before = std::fs::read(&page).expect("the page");
    let again = graph(&[a.to_str().expect("UTF-8"), "-o", page_arg], None);
    again.assert_failed();
    again.assert_stderr_contains("exists: give --force");
    assert_eq!(std::fs::read(&page).expect("the page"), before);
    graph(
        &[
            "--name",
            "host-a",
            a.to_str().expect("UTF-8"),
            "--name",
            "host-b",
            b.to_str().expect("UTF-8"),
            "-o",
            page_arg,
            "--force",
        ],
        None,
    )
    .assert_status(0);
    assert_eq!(
        std::fs::read(&page).expect("the page"),
        before,
        "stdin and a file read alike"
    );

    let dom = tags(&dump_dom(&page, &dir));
    let read = |p: &Path| std::fs::read_to_string(p).expect("fixture");
    let (ea, eb) = (expected(&read(&a)), expected(&read(&b)));
    let (_, ja, oa) = check_lane(&dom, "host-a", &ea);
    let (_, jb, ob) = check_lane(&dom, "host-b", &eb);
    // Speculations seen on both bridges are one node each.
    let ids: BTreeSet<_> = ea.specs.keys().chain(eb.specs.keys()).collect();
    check_counts(&dom, ids.len(), ja + jb, oa + ob);
    assert_eq!(ids.len(), 4, "1:1, 2:1, 3:1, 4:2 (4:1's line is cut short)");
    let node = |id: &str| {
        of_kind(&dom, "speculation")
            .into_iter()
            .find(|t| t.get("data-spec-id") == id)
            .unwrap_or_else(|| panic!("{id} drawn"))
            .clone()
    };
    // Each node is drawn where it started, whatever the input order.
    for (id, lane, outcome) in [
        ("1:1", "host-a", "committed"),
        ("2:1", "host-a", "aborted"),
        ("3:1", "host-b", "aborted"),
        ("4:2", "host-b", "open"),
    ] {
        assert_eq!(node(id).get("data-lane"), lane, "{id}");
        assert_eq!(node(id).get("data-outcome"), outcome, "{id}");
    }
    // A join across bridges: 3:1 (on host-b) joined by host-a's port 1,
    // which is VM 1 (it started 1:1).
    let cross = of_kind(&dom, "join")
        .into_iter()
        .find(|t| t.get("data-spec-id") == "3:1" && t.get("data-lane") == "host-a")
        .expect("the cross-bridge join");
    assert_eq!(cross.get("data-label"), "port 1 · vm 1");
    // The lanes, the bad line and the other events.
    let sum = summary(&dom);
    assert_eq!(sum.get("data-lanes"), "2");
    assert_eq!(sum.get("data-malformed"), "1");
    let skipped = dom
        .iter()
        .find(|t| t.name == "details" && t.get("data-input") == "host-b")
        .expect("host-b's skipped lines");
    assert_eq!(skipped.get("data-malformed"), "1");
    assert_eq!(of_kind(&dom, "lease-expired").len(), 1);
    let lanes: BTreeSet<_> = dom
        .iter()
        .filter(|t| t.get("class") == "lane")
        .map(|t| t.get("data-lane").to_string())
        .collect();
    assert_eq!(
        lanes,
        BTreeSet::from(["host-a".to_string(), "host-b".to_string()])
    );
}
